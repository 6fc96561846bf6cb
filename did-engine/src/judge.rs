//! The causal judge of generative perplexity (BD3-LM's protocol, docs/bd3lm.md §5.2): a
//! `did train --objective ar` checkpoint that scores samples, GPT-2 ones decoded and re-encoded
//! first, in windows of its context with stride context/2.

use std::path::{Path, PathBuf};

use did_core::backend::Backend;
use did_core::model::{Architecture, Inference, Transformer};
use did_core::sample::stop::unigram_entropy;

use crate::checkpoint;
use crate::data::tokenizer::{tokenizer_for, Tokenizer, TokenizerKind};
use crate::Error;

/// A causal checkpoint that scores token sequences (BD3-LM's generative-perplexity protocol).
pub struct Judge<'a, B: Backend> {
    inference: Inference<'a, B>,
    tokenizer: TokenizerKind,
    vocab: usize,
    context: usize,
    /// `[MASK]`: never a target, left out of the softmax (an imported GPT-2's
    /// extra row would otherwise add e⁰ to every normaliser).
    mask: usize,
}

/// What the judge makes of one sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct JudgeScore {
    /// Σ NLL over the counted targets.
    pub nll: f64,
    /// Targets counted (not EOS, not the first token).
    pub targets: usize,
    /// Unigram entropy (nats) of the rescored ids, the leading EOS included.
    pub entropy: f64,
}

impl JudgeScore {
    /// The sample's perplexity, `exp(Σ NLL / targets)`.
    pub fn perplexity(&self) -> f64 {
        (self.nll / self.targets.max(1) as f64).exp()
    }
}

/// A judge's model and weights, loaded once.
pub struct JudgeModel {
    model: Transformer,
    weights: Vec<f32>,
    /// The checkpoint it came from.
    pub path: PathBuf,
}

impl JudgeModel {
    /// Loads a causal (`did train --objective ar`) checkpoint.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let ckpt = checkpoint::load(path)?;
        if ckpt.config.architecture != Architecture::Gpt2 {
            return Err(Error::Judge(format!(
                "the judge {} is a diffusion model; a judge is a causal checkpoint (`did train --objective ar`)",
                path.display()
            )));
        }
        Ok(JudgeModel {
            model: Transformer::new(ckpt.config).map_err(|e| Error::Judge(e.to_string()))?,
            weights: ckpt.ema.unwrap_or(ckpt.params),
            path: path.to_path_buf(),
        })
    }

    /// The judge on `be`, with `params` uploaded by the caller (`upload`).
    pub fn on<'a, B: Backend>(
        &'a self,
        be: &'a B,
        params: &'a B::Buffer,
    ) -> Result<Judge<'a, B>, Error> {
        let config = self.model.config();
        Ok(Judge {
            inference: Inference::new(be, &self.model, params)
                .map_err(|e| Error::Judge(e.to_string()))?,
            tokenizer: tokenizer_for(config.vocab_size)?,
            vocab: config.vocab_size,
            context: config.context,
            mask: config.mask_id as usize,
        })
    }

    /// The judge's weights on `be`.
    pub fn upload<B: Backend>(&self, be: &B) -> Result<B::Buffer, Error> {
        be.upload(&self.weights)
            .map_err(|e| Error::Judge(e.to_string()))
    }

    /// The judge's vocabulary.
    pub fn vocab(&self) -> usize {
        self.model.config().vocab_size
    }
}

impl<B: Backend> Judge<'_, B> {
    /// The tokenizer of the judge's vocabulary.
    pub fn tokenizer(&self) -> TokenizerKind {
        self.tokenizer
    }

    /// The judge's vocabulary size (ids at or above it are not the judge's).
    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// The ids the judge reads for a sample: GPT-2 samples are decoded to text
    /// and re-encoded (BD3-LM's retokenisation; the leading end-of-text becomes
    /// 50256 again); byte samples are already what the judge reads.
    pub fn rescored_ids(&self, sample: &[u32]) -> Vec<u32> {
        let eos = self.tokenizer.eos();
        match self.tokenizer {
            TokenizerKind::Bytes => sample.to_vec(),
            TokenizerKind::Gpt2 => {
                let body = sample.strip_prefix(&[eos]).unwrap_or(sample);
                let mut ids = vec![eos];
                ids.extend(
                    Tokenizer::new(self.tokenizer)
                        .encode(&Tokenizer::new(self.tokenizer).decode(body)),
                );
                ids
            }
        }
    }

    /// Scores a sample: next-token NLL of every target that is not end-of-text,
    /// in windows of the judge's context with stride context/2 (the first
    /// window scores positions 1‥C−1, each later one its last C/2 targets).
    pub fn score(&mut self, sample: &[u32]) -> Result<JudgeScore, Error> {
        let ids = self.rescored_ids(sample);
        let eos = self.tokenizer.eos();
        let entropy = unigram_entropy(&ids);
        let (c, v) = (self.context, self.vocab);
        let stride = (c / 2).max(1);
        let (mut nll, mut targets) = (0.0f64, 0usize);
        let mut start = 0;
        loop {
            let end = (start + c).min(ids.len());
            let window = &ids[start..end];
            if window.len() < 2 {
                break;
            }
            let logits = self
                .inference
                .logits_uncached(window, 1, 1)
                .map_err(|e| Error::Judge(e.to_string()))?;
            // Targets this window is responsible for: all of the first, the last `stride` of later ones.
            let first_target = if start == 0 {
                1
            } else {
                window.len().saturating_sub(stride).max(1)
            };
            for j in first_target..window.len() {
                let target = window[j];
                if target == eos {
                    continue;
                }
                let row = &logits[(j - 1) * v..j * v];
                let others = || row.iter().enumerate().filter(|&(k, _)| k != self.mask);
                let m = others().fold(f32::NEG_INFINITY, |a, (_, &b)| a.max(b)) as f64;
                let z: f64 = others().map(|(_, &x)| (x as f64 - m).exp()).sum();
                nll += m + z.ln() - row[target as usize] as f64;
                targets += 1;
            }
            if end == ids.len() {
                break;
            }
            start += stride;
        }
        Ok(JudgeScore {
            nll,
            targets,
            entropy,
        })
    }
}
