//! The multi-stage driver: draft → remask → refine over any [`Denoiser`].

use alloc::vec::Vec;
use core::fmt;
use core::ops::Range;

use crate::denoiser::{DenoiseRequest, Denoiser, OutputPosition};
use crate::error::invalid;
use crate::refine::plan::ResolvedPlan;
use crate::refine::remask::{select_lowest, RemaskScope, RemaskStrategy};
use crate::rng::{Purpose, RngStream};
use crate::sample::batch::SequenceBatch;
use crate::sample::probs::subs_softmax;
use crate::sample::update::{fill_block, BlockScratch, SamplerConfig};
use crate::Error;

/// How to generate: the plan, the sampler, the remasking, where to stop.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateConfig {
    /// The stages (and with them the sequence length).
    pub plan: ResolvedPlan,
    /// Nucleus, within-block update, seed.
    pub sampler: SamplerConfig,
    /// How remask scores are obtained.
    pub remask: RemaskStrategy,
    /// Over which positions the lowest fraction is taken.
    pub scope: RemaskScope,
    /// End a sequence at its first drawn token with this id (variable length);
    /// `None` for fixed length.
    pub stop_at: Option<u32>,
    /// The RNG sample id of the first sequence; the others follow.
    pub first_sample: u32,
}

impl GenerateConfig {
    /// A config with the default sampler, snapshot remasking, global scope, fixed length.
    pub fn new(plan: ResolvedPlan, seed: u64) -> Self {
        GenerateConfig {
            plan,
            sampler: SamplerConfig { seed, ..SamplerConfig::default() },
            remask: RemaskStrategy::default(),
            scope: RemaskScope::default(),
            stop_at: None,
            first_sample: 0,
        }
    }
}

/// What one stage did.
#[derive(Debug, Clone, PartialEq)]
pub struct StageReport {
    /// Its attention block size.
    pub block_size: usize,
    /// The fraction remasked before it (`None` for the draft).
    pub remask_ratio: Option<f64>,
    /// Denoiser calls made, including post-hoc scoring.
    pub nfe: u32,
    /// Per sequence, the positions remasked before the stage (ascending).
    pub remasked: Vec<Vec<usize>>,
    /// `[batch, seq_len]` tokens after the stage.
    pub tokens: Vec<u32>,
}

/// The result of [`generate`].
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// The final batch: tokens, confidences, lengths.
    pub batch: SequenceBatch,
    /// One report per stage, the draft first.
    pub stages: Vec<StageReport>,
}

impl Generation {
    /// Total denoiser calls over all stages.
    pub fn nfe(&self) -> u32 {
        self.stages.iter().map(|s| s.nfe).sum()
    }
}

/// A generation failed: bad settings, or the model failed.
#[derive(Debug)]
pub enum GenerateError<E> {
    /// The settings or prompts were rejected.
    Config(Error),
    /// The denoiser returned an error.
    Denoiser(E),
}

impl<E: fmt::Display> fmt::Display for GenerateError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GenerateError::Config(e) => e.fmt(f),
            GenerateError::Denoiser(e) => write!(f, "the denoiser failed: {e}"),
        }
    }
}

#[cfg(feature = "std")]
impl<E: fmt::Debug + fmt::Display> std::error::Error for GenerateError<E> {}

impl<E> From<Error> for GenerateError<E> {
    fn from(e: Error) -> Self {
        GenerateError::Config(e)
    }
}

/// Runs the plan: drafts every sequence from its prompt with the first
/// stage's block size, then for each later stage remasks the lowest-scoring
/// fraction of drawn tokens and regenerates them with that stage's block size.
/// Regenerated tokens get fresh snapshot confidences; kept tokens keep theirs.
///
/// Prompts are pinned (never drawn or remasked); give each at least the BOS.
///
/// ```
/// use did_core::denoiser::{DenoiseRequest, Denoiser};
/// use did_core::refine::{generate, GenerateConfig, StagePlan};
/// /// Always prefers token (position mod 3).
/// struct Counter;
/// impl Denoiser for Counter {
///     type Error = core::convert::Infallible;
///     fn vocab_size(&self) -> usize { 4 }
///     fn mask_id(&self) -> u32 { 3 }
///     fn logits(&mut self, r: &DenoiseRequest<'_>, out: &mut [f32]) -> Result<(), Self::Error> {
///         for (o, row) in r.outputs.iter().zip(out.chunks_mut(4)) {
///             row.fill(-30.0);
///             row[o.pos as usize % 3] = 30.0;
///         }
///         Ok(())
///     }
/// }
/// let plan = "2,L:0.5".parse::<StagePlan>()?.resolve(8)?;
/// let out = generate(&mut Counter, &GenerateConfig::new(plan, 1), &[&[0]]).unwrap();
/// assert_eq!(out.batch.tokens, [0, 1, 2, 0, 1, 2, 0, 1]);
/// assert_eq!(out.stages[1].remasked[0].len(), 3); // floor(0.5 × 7 drawn tokens)
/// # Ok::<(), did_core::Error>(())
/// ```
pub fn generate<D: Denoiser>(
    denoiser: &mut D,
    config: &GenerateConfig,
    prompts: &[&[u32]],
) -> Result<Generation, GenerateError<D::Error>> {
    let seq_len = config.plan.seq_len();
    let mask_id = denoiser.mask_id();
    check_inputs(denoiser.vocab_size(), mask_id, config, prompts)?;
    let mut batch = SequenceBatch::from_prompts(prompts, seq_len, mask_id, config.first_sample);
    let mut scratch = BlockScratch::default();
    let mut stages = Vec::with_capacity(config.plan.stages().len());
    let mut previous_block = 0;
    for (index, stage) in config.plan.stages().iter().enumerate() {
        let mut nfe = 0;
        let mut remasked = alloc::vec![Vec::new(); batch.batch()];
        if let Some(ratio) = stage.remask_ratio {
            let (positions, calls) =
                choose_remask(denoiser, &batch, config, index as u32, ratio, previous_block, stage.block_size)?;
            nfe += calls;
            for (seq, picked) in positions.into_iter().enumerate() {
                for &pos in &picked {
                    batch.remask(seq, pos);
                }
                remasked[seq] = picked;
            }
        }
        nfe += run_stage(denoiser, &mut batch, stage.block_size, config, &mut scratch)?;
        stages.push(StageReport {
            block_size: stage.block_size,
            remask_ratio: stage.remask_ratio,
            nfe,
            remasked,
            tokens: batch.tokens.clone(),
        });
        previous_block = stage.block_size;
    }
    Ok(Generation { batch, stages })
}

fn check_inputs<D>(vocab: usize, mask_id: u32, config: &GenerateConfig, prompts: &[&[u32]]) -> Result<(), GenerateError<D>> {
    config.sampler.validate()?;
    let seq_len = config.plan.seq_len();
    if vocab < 2 || mask_id as usize >= vocab {
        return Err(invalid("denoiser", alloc::format!("mask id {mask_id} must be inside a vocabulary of at least 2 (got {vocab})")).into());
    }
    if config.first_sample as u64 + prompts.len() as u64 > u64::from(crate::rng::MAX_SAMPLE) + 1 {
        return Err(invalid("sample ids", "more than 2^24 samples per seed; change the seed for the next ones").into());
    }
    for (i, p) in prompts.iter().enumerate() {
        if p.is_empty() {
            return Err(invalid("prompt", alloc::format!("prompt {i} is empty; start it with the BOS token")).into());
        }
        if p.len() > seq_len {
            return Err(invalid(
                "prompt",
                alloc::format!("prompt {i} has {} tokens, more than the sequence length {seq_len}; shorten it or raise the length", p.len()),
            )
            .into());
        }
        if let Some(&t) = p.iter().find(|&&t| t == mask_id || t as usize >= vocab) {
            return Err(invalid("prompt", alloc::format!("prompt {i} holds token {t}, which is the mask or outside the vocabulary of {vocab}")).into());
        }
    }
    Ok(())
}

/// Fills every masked position with one attention block size, block by block,
/// committing each finished block but the last. Returns the calls made.
fn run_stage<D: Denoiser>(
    denoiser: &mut D,
    batch: &mut SequenceBatch,
    block_size: usize,
    config: &GenerateConfig,
    scratch: &mut BlockScratch,
) -> Result<u32, GenerateError<D::Error>> {
    let seq_len = batch.seq_len();
    denoiser.begin_stage(batch.batch(), seq_len, block_size).map_err(GenerateError::Denoiser)?;
    let mut calls = 0;
    let blocks = seq_len / block_size;
    for j in 0..blocks {
        let block = j * block_size..(j + 1) * block_size;
        if !batch.any_masked_in(block.start..seq_len) {
            break;
        }
        if batch.any_masked_in(block.clone()) {
            calls += fill_block(denoiser, batch, block.clone(), block_size, &config.sampler, scratch)
                .map_err(GenerateError::Denoiser)?;
        }
        if let Some(eos) = config.stop_at {
            for seq in 0..batch.batch() {
                batch.end_at_eos(seq, 1, eos);
            }
        }
        if j + 1 < blocks && batch.any_masked_in(block.end..seq_len) {
            commit(denoiser, batch, block, block_size)?;
        }
    }
    Ok(calls)
}

fn commit<D: Denoiser>(
    denoiser: &mut D,
    batch: &SequenceBatch,
    block: Range<usize>,
    block_size: usize,
) -> Result<(), GenerateError<D::Error>> {
    let request = DenoiseRequest {
        tokens: &batch.tokens,
        batch: batch.batch(),
        seq_len: batch.seq_len(),
        block_size,
        block,
        outputs: &[],
    };
    denoiser.commit_block(&request).map_err(GenerateError::Denoiser)
}

/// The positions to remask before stage `stage`, per sequence, and the calls spent scoring.
fn choose_remask<D: Denoiser>(
    denoiser: &mut D,
    batch: &SequenceBatch,
    config: &GenerateConfig,
    stage: u32,
    ratio: f64,
    previous_block: usize,
    block_size: usize,
) -> Result<(Vec<Vec<usize>>, u32), GenerateError<D::Error>> {
    let seq_len = batch.seq_len();
    let mut scores = alloc::vec![0.0f64; batch.batch() * seq_len];
    let mut calls = 0;
    match config.remask {
        RemaskStrategy::Snapshot(kind) => {
            for (s, c) in scores.iter_mut().zip(&batch.confidence) {
                *s = c.get(kind);
            }
        }
        RemaskStrategy::Random => {
            for seq in 0..batch.batch() {
                let stream = RngStream::new(config.sampler.seed, Purpose::Remask, batch.sample_ids[seq], stage);
                for pos in 0..seq_len {
                    scores[seq * seq_len + pos] = stream.uniform(0, pos as u32);
                }
            }
        }
        RemaskStrategy::PostHoc => {
            calls = score_post_hoc(denoiser, batch, block_size, config.sampler.max_outputs_per_call, &mut scores)?;
        }
    }
    let scope = match config.scope {
        RemaskScope::Global => None,
        RemaskScope::PerBlock => Some(previous_block),
    };
    let mut picked = Vec::with_capacity(batch.batch());
    let mut eligible = alloc::vec![false; seq_len];
    for seq in 0..batch.batch() {
        for (pos, e) in eligible.iter_mut().enumerate() {
            *e = batch.eligible(seq, pos);
        }
        picked.push(select_lowest(&scores[seq * seq_len..(seq + 1) * seq_len], &eligible, ratio, scope));
    }
    Ok((picked, calls))
}

/// Post-hoc scores: the probability of each visible drawn token when the
/// model re-reads the finished sequences (one pass from position 0).
fn score_post_hoc<D: Denoiser>(
    denoiser: &mut D,
    batch: &SequenceBatch,
    block_size: usize,
    max_outputs: usize,
    scores: &mut [f64],
) -> Result<u32, GenerateError<D::Error>> {
    let seq_len = batch.seq_len();
    let vocab = denoiser.vocab_size();
    let outputs: Vec<OutputPosition> = (0..batch.batch())
        .flat_map(|seq| (0..seq_len).filter(move |&p| batch.eligible(seq, p)).map(move |p| (seq, p)))
        .map(|(seq, pos)| OutputPosition { seq: seq as u32, pos: pos as u32 })
        .collect();
    denoiser.begin_stage(batch.batch(), seq_len, block_size).map_err(GenerateError::Denoiser)?;
    let mut logits = Vec::new();
    let mut probs = alloc::vec![0.0; vocab];
    let mut calls = 0;
    for chunk in outputs.chunks(max_outputs) {
        logits.clear();
        logits.resize(chunk.len() * vocab, 0.0);
        let request = DenoiseRequest {
            tokens: &batch.tokens,
            batch: batch.batch(),
            seq_len,
            block_size,
            block: 0..seq_len,
            outputs: chunk,
        };
        denoiser.logits(&request, &mut logits).map_err(GenerateError::Denoiser)?;
        calls += 1;
        for (o, row) in chunk.iter().zip(logits.chunks(vocab)) {
            let index = o.seq as usize * seq_len + o.pos as usize;
            subs_softmax(row, batch.mask_id(), &mut probs);
            scores[index] = probs[batch.tokens[index] as usize];
        }
    }
    Ok(calls)
}
