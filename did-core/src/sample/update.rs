//! Within-block updates: how the masked positions of one block are revealed.
//!
//! First-hitting and DDPM-caching decide *which* positions are revealed at a
//! step before the model is called (those decisions do not depend on the
//! logits), and then ask the denoiser for logits at exactly those positions.
//! So a step that reveals nothing costs no call — BD3-LM's "caching" — and the
//! output head runs only where a token is drawn.
//!
//! The parallel updates (confidence threshold, entropy bound, k per call) draw
//! at every masked position of the block in one call and keep the draws the
//! model is surest of ([`crate::sample::parallel`]); the rest stay masked and
//! are drawn afresh at the next call. NFE is the number of denoiser calls made.
//!
//! The RNG step of a sequence counts the updates in which it had a masked
//! position, so a sequence draws the same numbers whatever batch it is in.

use alloc::string::ToString;
use alloc::vec::Vec;
use core::ops::Range;

use crate::denoiser::{Denoiser, HostDrawScratch, OutputPosition};
use crate::error::parse_error;
use crate::rng::Purpose;
use crate::sample::batch::SequenceBatch;
use crate::sample::categorical::{
    draw_token_and_entropy, Confidence, ConfidenceKind, DrawScratch, SampledToken,
};
use crate::sample::nucleus::Nucleus;
use crate::sample::parallel::{
    keep_above_threshold, keep_most_confident, keep_within_entropy_budget, Candidate,
};
use crate::sample::DrawSpec;
use crate::{error::invalid, Error};

/// How a block's masked positions are revealed.
///
/// ```
/// use did_core::sample::BlockUpdate;
/// // About two tokens per call inside blocks of 16.
/// let update = BlockUpdate::DdpmCaching { steps: 8 };
/// assert_ne!(update, BlockUpdate::default()); // the default is first-hitting
/// let rule: BlockUpdate = "threshold:0.9".parse()?;
/// assert_eq!(rule, BlockUpdate::ConfidenceThreshold { tau: 0.9 });
/// assert_eq!(rule.to_string(), "threshold:0.9");
/// # Ok::<(), did_core::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum BlockUpdate {
    /// One uniformly chosen masked position per call (Zheng et al.'s
    /// first-hitting sampler; every reported BD3-LM number, docs/bd3lm.md §4.3).
    /// A block with `n` masked positions takes exactly `n` calls.
    #[default]
    FirstHitting,
    /// The DDPM update on the grid `t_i = 1 − i/T`, `s = t_i − 1/T`, `i = 0..T`:
    /// each masked position stays masked with probability `s/t = (T−i−1)/(T−i)`,
    /// otherwise it is drawn. The last step has `s = 0` and reveals everything
    /// left, so the reference's division by zero at `t = 0` (docs/bd3lm.md §4.4)
    /// cannot happen. `T` ≈ block size / k reveals about k tokens per call.
    DdpmCaching {
        /// `T`, steps per block (≥ 1).
        steps: u32,
    },
    /// Draw at every masked position of the block; keep every draw whose
    /// confidence exceeds `tau`, or the most confident one where none does
    /// (Fast-dLLM's parallel decoding). Written `threshold:τ`.
    ConfidenceThreshold {
        /// τ ∈ (0, 1].
        tau: f64,
    },
    /// Draw at every masked position of the block; keep them in order of
    /// increasing entropy while the kept entropies, less the largest, sum to at
    /// most `budget` nats (the EB-sampler). Written `entropy:β`.
    EntropyBound {
        /// β ≥ 0, in nats.
        budget: f64,
    },
    /// Draw at every masked position of the block; keep the `k` most confident.
    /// The simple baseline of the parallel rules. Written `topk:k`.
    TopK {
        /// k ≥ 1 tokens per call.
        k: u32,
    },
}

impl BlockUpdate {
    /// Whether this update draws at every masked position of the block in each call.
    ///
    /// ```
    /// use did_core::sample::BlockUpdate;
    /// assert!(BlockUpdate::TopK { k: 2 }.is_parallel());
    /// assert!(!BlockUpdate::DdpmCaching { steps: 8 }.is_parallel());
    /// ```
    pub fn is_parallel(&self) -> bool {
        matches!(
            self,
            BlockUpdate::ConfidenceThreshold { .. }
                | BlockUpdate::EntropyBound { .. }
                | BlockUpdate::TopK { .. }
        )
    }

    /// Checks the rule's parameter; the error names the fix.
    ///
    /// ```
    /// use did_core::sample::BlockUpdate;
    /// assert!(BlockUpdate::EntropyBound { budget: 0.0 }.validate().is_ok());
    /// let e = BlockUpdate::ConfidenceThreshold { tau: 0.0 }.validate().unwrap_err();
    /// assert!(e.to_string().contains("threshold:0.9"));
    /// ```
    pub fn validate(&self) -> Result<(), Error> {
        match *self {
            BlockUpdate::DdpmCaching { steps: 0 } => Err(invalid(
                "DDPM steps",
                "T must be at least 1 step per block (ddpm:8)",
            )),
            BlockUpdate::ConfidenceThreshold { tau } if !(tau > 0.0 && tau <= 1.0) => Err(invalid(
                "confidence threshold",
                alloc::format!("τ = {tau} must be in (0, 1]; 0.9 is Fast-dLLM's (threshold:0.9)"),
            )),
            BlockUpdate::EntropyBound { budget } if !(budget >= 0.0 && budget.is_finite()) => {
                Err(invalid(
                    "entropy bound",
                    alloc::format!(
                        "β = {budget} must be a finite number of nats ≥ 0 (entropy:0.5)"
                    ),
                ))
            }
            BlockUpdate::TopK { k: 0 } => {
                Err(invalid("tokens per call", "k must be at least 1 (topk:2)"))
            }
            _ => Ok(()),
        }
    }
}

impl core::fmt::Display for BlockUpdate {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            BlockUpdate::FirstHitting => f.write_str("first-hitting"),
            BlockUpdate::DdpmCaching { steps } => write!(f, "ddpm:{steps}"),
            BlockUpdate::ConfidenceThreshold { tau } => write!(f, "threshold:{tau}"),
            BlockUpdate::EntropyBound { budget } => write!(f, "entropy:{budget}"),
            BlockUpdate::TopK { k } => write!(f, "topk:{k}"),
        }
    }
}

/// The update rules as a user writes them, for error messages.
///
/// ```
/// assert!(did_core::sample::UPDATE_RULES.contains("entropy:β"));
/// ```
pub const UPDATE_RULES: &str = "first-hitting, ddpm:T, threshold:τ, entropy:β or topk:k";

impl core::str::FromStr for BlockUpdate {
    type Err = Error;

    /// `first-hitting`, `ddpm:T`, `threshold:τ`, `entropy:β`, `topk:k`.
    fn from_str(text: &str) -> Result<Self, Error> {
        const WHAT: &str = "update rule";
        let t = text.trim();
        let (name, value) = match t.split_once(':') {
            Some((n, v)) => (n.trim(), Some(v.trim())),
            None => (t, None),
        };
        let number = |v: Option<&str>, example: &str| -> Result<f64, Error> {
            let v = v.ok_or_else(|| {
                parse_error(
                    WHAT,
                    text,
                    alloc::format!("{name} needs a value, e.g. {example}"),
                )
            })?;
            v.parse::<f64>().map_err(|_| {
                parse_error(
                    WHAT,
                    text,
                    alloc::format!("{v:?} is not a number; write e.g. {example}"),
                )
            })
        };
        let whole = |v: Option<&str>, example: &str| -> Result<u32, Error> {
            let x = number(v, example)?;
            if x >= 1.0 && x <= f64::from(u32::MAX) && x == libm::floor(x) {
                Ok(x as u32)
            } else {
                Err(parse_error(
                    WHAT,
                    text,
                    alloc::format!("{x} must be a whole number ≥ 1; write e.g. {example}"),
                ))
            }
        };
        let rule = match name {
            "first-hitting" | "fh" if value.is_none() => BlockUpdate::FirstHitting,
            "ddpm" => BlockUpdate::DdpmCaching {
                steps: whole(value, "ddpm:8")?,
            },
            "threshold" => BlockUpdate::ConfidenceThreshold {
                tau: number(value, "threshold:0.9")?,
            },
            "entropy" => BlockUpdate::EntropyBound {
                budget: number(value, "entropy:0.5")?,
            },
            "topk" => BlockUpdate::TopK {
                k: whole(value, "topk:2")?,
            },
            _ => {
                return Err(parse_error(
                    WHAT,
                    text,
                    alloc::format!("unknown rule; use {UPDATE_RULES}"),
                ))
            }
        };
        rule.validate()
            .map_err(|e| parse_error(WHAT, text, e.to_string()))?;
        Ok(rule)
    }
}

/// Everything the within-block sampler needs besides the model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplerConfig {
    /// Top-p filtering of every draw.
    pub nucleus: Nucleus,
    /// The within-block update (a stage of a plan may name its own).
    pub update: BlockUpdate,
    /// Which confidence the threshold and k-per-call updates rank draws by.
    pub confidence: ConfidenceKind,
    /// At most this many logits rows per denoiser call (bounds host memory:
    /// rows × vocabulary × 4 bytes); larger steps are split into several calls.
    pub max_outputs_per_call: usize,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            nucleus: Nucleus::default(),
            update: BlockUpdate::default(),
            confidence: ConfidenceKind::default(),
            max_outputs_per_call: 1024,
        }
    }
}

impl SamplerConfig {
    /// Checks the settings.
    pub fn validate(&self) -> Result<(), Error> {
        self.update.validate()?;
        if self.max_outputs_per_call == 0 {
            return Err(invalid("max outputs per call", "must be at least 1"));
        }
        Ok(())
    }
}

/// Reusable buffers of the block sampler.
#[derive(Debug, Default)]
pub struct BlockScratch {
    reveals: Vec<OutputPosition>,
    specs: Vec<DrawSpec>,
    tokens: Vec<SampledToken>,
    drawn: Vec<(usize, SampledToken)>,
    entropies: Vec<f64>,
    host: HostDrawScratch,
    logits: Vec<f32>,
    draw: DrawScratch,
    masked: Vec<usize>,
    active: Vec<usize>,
    candidates: Vec<Candidate>,
    sequence_calls: Vec<u32>,
}

impl BlockScratch {
    /// Per sequence, the calls since the last [`Self::reset_sequence_calls`] that asked for at
    /// least one of its positions: what those calls cost the sequence had it been sampled
    /// alone (a batch's call count is at least the largest of these, not their sum).
    ///
    /// ```
    /// use did_core::denoiser::{DenoiseRequest, Denoiser};
    /// use did_core::sample::update::{fill_block, BlockScratch};
    /// use did_core::sample::{SamplerConfig, SequenceBatch, SequenceId};
    /// struct Flat;
    /// impl Denoiser for Flat {
    ///     type Error = core::convert::Infallible;
    ///     fn vocab_size(&self) -> usize { 3 }
    ///     fn mask_id(&self) -> u32 { 2 }
    ///     fn logits(&mut self, _: &DenoiseRequest<'_>, out: &mut [f32]) -> Result<(), Self::Error> {
    ///         out.fill(0.0);
    ///         Ok(())
    ///     }
    /// }
    /// // The second sequence's prompt fills two of the block's four positions.
    /// let mut batch = SequenceBatch::from_prompts(&[&[0], &[0, 1, 1]], 4, 2, &SequenceId::numbered(1, 0, 2));
    /// let mut scratch = BlockScratch::default();
    /// scratch.reset_sequence_calls(2);
    /// let calls = fill_block(&mut Flat, &mut batch, 0..4, 4, &SamplerConfig::default(), &mut scratch)?;
    /// assert_eq!((calls, scratch.sequence_calls()), (3, &[3, 1][..]));
    /// # Ok::<(), core::convert::Infallible>(())
    /// ```
    pub fn sequence_calls(&self) -> &[u32] {
        &self.sequence_calls
    }

    /// Starts counting [`Self::sequence_calls`] afresh for `batch` sequences.
    pub fn reset_sequence_calls(&mut self, batch: usize) {
        self.sequence_calls.clear();
        self.sequence_calls.resize(batch, 0);
    }
}

/// Reveals every masked position of `block` in every sequence of `batch`,
/// with attention block size `block_size`. Returns the number of denoiser calls.
///
/// ```
/// use did_core::denoiser::{DenoiseRequest, Denoiser};
/// use did_core::sample::update::{fill_block, BlockScratch};
/// use did_core::sample::{BlockUpdate, SamplerConfig, SequenceBatch, SequenceId};
/// struct Uniform;
/// impl Denoiser for Uniform {
///     type Error = core::convert::Infallible;
///     fn vocab_size(&self) -> usize { 5 }
///     fn mask_id(&self) -> u32 { 4 }
///     fn logits(&mut self, _: &DenoiseRequest<'_>, out: &mut [f32]) -> Result<(), Self::Error> {
///         out.fill(0.0);
///         Ok(())
///     }
/// }
/// let mut batch = SequenceBatch::from_prompts(&[&[0]], 8, 4, &SequenceId::numbered(1, 0, 1));
/// let config = SamplerConfig { update: BlockUpdate::DdpmCaching { steps: 2 }, ..SamplerConfig::default() };
/// let calls = fill_block(&mut Uniform, &mut batch, 4..8, 4, &config, &mut BlockScratch::default())?;
/// assert!(calls <= 2 && batch.masked_in(0, 4..8).next().is_none());
/// # Ok::<(), core::convert::Infallible>(())
/// ```
pub fn fill_block<D: Denoiser>(
    denoiser: &mut D,
    batch: &mut SequenceBatch,
    block: Range<usize>,
    block_size: usize,
    config: &SamplerConfig,
    scratch: &mut BlockScratch,
) -> Result<u32, D::Error> {
    let mut calls = 0;
    match config.update {
        BlockUpdate::FirstHitting => {
            while batch.any_masked_in(block.clone()) {
                scratch.reveals.clear();
                for seq in 0..batch.batch() {
                    scratch.masked.clear();
                    scratch.masked.extend(batch.masked_in(seq, block.clone()));
                    if scratch.masked.is_empty() {
                        continue;
                    }
                    let stream = batch.stream(seq, Purpose::RevealPosition, batch.steps[seq]);
                    let pick = (stream.uniform(0, 0) * scratch.masked.len() as f64) as usize;
                    let pos = scratch.masked[pick.min(scratch.masked.len() - 1)];
                    scratch.reveals.push(OutputPosition {
                        seq: seq as u32,
                        pos: pos as u32,
                    });
                }
                calls += reveal(denoiser, batch, &block, block_size, config, scratch)?;
                // First-hitting reveals one position in every sequence that had one.
                for r in &scratch.reveals {
                    let s = r.seq as usize;
                    batch.steps[s] = batch.steps[s].wrapping_add(1);
                }
            }
        }
        BlockUpdate::DdpmCaching { steps } => {
            let steps = steps.max(1);
            for i in 0..steps {
                if !batch.any_masked_in(block.clone()) {
                    break;
                }
                let stay = f64::from(steps - i - 1) / f64::from(steps - i);
                scratch.reveals.clear();
                scratch.active.clear();
                for seq in 0..batch.batch() {
                    let stream = batch.stream(seq, Purpose::StayMasked, batch.steps[seq]);
                    let mut any = false;
                    for pos in batch.masked_in(seq, block.clone()) {
                        any = true;
                        if stream.uniform(pos as u32, 0) >= stay {
                            scratch.reveals.push(OutputPosition {
                                seq: seq as u32,
                                pos: pos as u32,
                            });
                        }
                    }
                    if any {
                        scratch.active.push(seq);
                    }
                }
                calls += reveal(denoiser, batch, &block, block_size, config, scratch)?;
                // Every sequence that still had a masked position moved one step.
                for &seq in &scratch.active {
                    batch.steps[seq] = batch.steps[seq].wrapping_add(1);
                }
            }
        }
        rule => {
            while batch.any_masked_in(block.clone()) {
                calls += parallel_step(denoiser, batch, &block, block_size, rule, config, scratch)?;
            }
        }
    }
    Ok(calls)
}

/// One call of a parallel update: draws at every masked position of the block in every
/// sequence, keeps what `rule` keeps of each sequence's draws, and moves those sequences one
/// step. Returns the calls made (more than one only where `max_outputs_per_call` splits it).
fn parallel_step<D: Denoiser>(
    denoiser: &mut D,
    batch: &mut SequenceBatch,
    block: &Range<usize>,
    block_size: usize,
    rule: BlockUpdate,
    config: &SamplerConfig,
    scratch: &mut BlockScratch,
) -> Result<u32, D::Error> {
    scratch.reveals.clear();
    for seq in 0..batch.batch() {
        let masked = batch.masked_in(seq, block.clone());
        scratch.reveals.extend(masked.map(|pos| OutputPosition {
            seq: seq as u32,
            pos: pos as u32,
        }));
    }
    let with_entropy = matches!(rule, BlockUpdate::EntropyBound { .. });
    let calls = draw_all(
        denoiser,
        batch,
        block,
        block_size,
        config,
        with_entropy,
        scratch,
    )?;
    // `drawn` is in the order of `reveals`: grouped by sequence, positions ascending.
    let seq_len = batch.seq_len();
    let mut start = 0;
    while start < scratch.drawn.len() {
        let seq = scratch.drawn[start].0 / seq_len;
        let end = start
            + scratch.drawn[start..]
                .iter()
                .take_while(|(index, _)| index / seq_len == seq)
                .count();
        scratch.candidates.clear();
        for (i, &(index, token)) in scratch.drawn[start..end].iter().enumerate() {
            scratch.candidates.push(Candidate {
                pos: index % seq_len,
                confidence: token.confidence.get(config.confidence),
                entropy: scratch.entropies.get(start + i).copied().unwrap_or(0.0),
            });
        }
        let kept = match rule {
            BlockUpdate::ConfidenceThreshold { tau } => {
                keep_above_threshold(&scratch.candidates, tau)
            }
            BlockUpdate::EntropyBound { budget } => {
                keep_within_entropy_budget(&scratch.candidates, budget)
            }
            BlockUpdate::TopK { k } => keep_most_confident(&scratch.candidates, k as usize),
            BlockUpdate::FirstHitting | BlockUpdate::DdpmCaching { .. } => {
                (0..scratch.candidates.len()).collect()
            }
        };
        for i in kept {
            let (index, token) = scratch.drawn[start + i];
            batch.tokens[index] = token.id;
            batch.confidence[index] = token.confidence;
        }
        batch.steps[seq] = batch.steps[seq].wrapping_add(1);
        start = end;
    }
    Ok(calls)
}

/// Draws tokens at `scratch.reveals`, all from the tokens as they were before
/// this step, then writes them. Returns the number of calls made.
fn reveal<D: Denoiser>(
    denoiser: &mut D,
    batch: &mut SequenceBatch,
    block: &Range<usize>,
    block_size: usize,
    config: &SamplerConfig,
    scratch: &mut BlockScratch,
) -> Result<u32, D::Error> {
    let calls = draw_all(denoiser, batch, block, block_size, config, false, scratch)?;
    for &(index, token) in &scratch.drawn {
        batch.tokens[index] = token.id;
        batch.confidence[index] = token.confidence;
    }
    Ok(calls)
}

/// Draws a token at each of `scratch.reveals` (from the tokens as they are) into
/// `scratch.drawn` as `(index in batch.tokens, token)`, in the same order, and with
/// `with_entropy` each draw's entropy into `scratch.entropies`. Writes nothing to the batch.
///
/// Draws go through [`Denoiser::draw`], so a device may draw where its logits are; the
/// entropy needs the rows themselves, so then the logits come to the host and are drawn by
/// the reference draw, which every backend's draw equals token for token.
fn draw_all<D: Denoiser>(
    denoiser: &mut D,
    batch: &SequenceBatch,
    block: &Range<usize>,
    block_size: usize,
    config: &SamplerConfig,
    with_entropy: bool,
    scratch: &mut BlockScratch,
) -> Result<u32, D::Error> {
    let mask_id = batch.mask_id();
    let vocab = denoiser.vocab_size();
    let mut calls = 0;
    scratch.drawn.clear();
    scratch.entropies.clear();
    for chunk in scratch.reveals.chunks(config.max_outputs_per_call) {
        scratch.specs.clear();
        scratch.specs.extend(chunk.iter().map(|out| DrawSpec {
            stream: batch.stream(
                out.seq as usize,
                Purpose::Categorical,
                batch.steps[out.seq as usize],
            ),
            row: out.pos,
        }));
        scratch.tokens.clear();
        scratch.tokens.resize(
            chunk.len(),
            SampledToken {
                id: mask_id,
                confidence: Confidence::PINNED,
            },
        );
        let request = batch.request(block_size, block.clone(), chunk);
        if with_entropy {
            scratch.logits.clear();
            scratch.logits.resize(chunk.len() * vocab, 0.0);
            denoiser.logits(&request, &mut scratch.logits)?;
            for ((row, spec), slot) in scratch
                .logits
                .chunks(vocab)
                .zip(&scratch.specs)
                .zip(&mut scratch.tokens)
            {
                let (token, entropy) = draw_token_and_entropy(
                    row,
                    mask_id,
                    &config.nucleus,
                    &spec.stream,
                    spec.row,
                    &mut scratch.draw,
                );
                *slot = token;
                scratch.entropies.push(entropy);
            }
        } else {
            denoiser.draw(
                &request,
                mask_id,
                &config.nucleus,
                &scratch.specs,
                &mut scratch.host,
                &mut scratch.tokens,
            )?;
        }
        calls += 1;
        let mut last_seq = None;
        for out in chunk {
            if last_seq != Some(out.seq) {
                last_seq = Some(out.seq);
                if let Some(c) = scratch.sequence_calls.get_mut(out.seq as usize) {
                    *c += 1;
                }
            }
        }
        for (out, &token) in chunk.iter().zip(&scratch.tokens) {
            let index = out.seq as usize * batch.seq_len() + out.pos as usize;
            scratch.drawn.push((index, token));
        }
    }
    Ok(calls)
}
