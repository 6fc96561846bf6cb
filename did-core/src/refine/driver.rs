//! The multi-stage driver: draft → remask → refine over any [`Denoiser`].

use alloc::vec::Vec;
use core::fmt;
use core::ops::Range;

use crate::denoiser::{Denoiser, OutputPosition};
use crate::error::invalid;
use crate::refine::plan::ResolvedPlan;
use crate::refine::remask::{select_lowest, RemaskAmount, RemaskScope, RemaskStrategy};
use crate::rng::{Purpose, MAX_SAMPLE};
use crate::sample::batch::{SequenceBatch, SequenceId};
use crate::sample::probs::subs_softmax;
use crate::sample::update::{fill_block, BlockScratch, BlockUpdate, SamplerConfig};
use crate::Error;

/// How to generate: the plan, the sampler, the remasking, where to stop.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateConfig {
    /// The stages (and with them the sequence length).
    pub plan: ResolvedPlan,
    /// Nucleus, within-block update, confidence.
    pub sampler: SamplerConfig,
    /// How remask scores are obtained.
    pub remask: RemaskStrategy,
    /// Over which positions the lowest fraction is taken.
    pub scope: RemaskScope,
    /// End a sequence at its first drawn token with this id (variable length);
    /// `None` for fixed length.
    pub stop_at: Option<u32>,
    /// The seed of the sequences [`generate`] names (`(seed, first_sample + i)`);
    /// [`generate_each`] takes each sequence's own.
    pub seed: u64,
    /// The sample number of [`generate`]'s first sequence; the others follow.
    pub first_sample: u32,
}

impl GenerateConfig {
    /// A config with the default sampler, snapshot remasking, global scope, fixed length.
    pub fn new(plan: ResolvedPlan, seed: u64) -> Self {
        GenerateConfig {
            plan,
            sampler: SamplerConfig::default(),
            remask: RemaskStrategy::default(),
            scope: RemaskScope::default(),
            stop_at: None,
            seed,
            first_sample: 0,
        }
    }
}

/// What one stage did.
#[derive(Debug, Clone, PartialEq)]
pub struct StageReport {
    /// Its attention block size.
    pub block_size: usize,
    /// What was remasked before it (`None` for the draft).
    pub remask: Option<RemaskAmount>,
    /// How its blocks were filled.
    pub update: BlockUpdate,
    /// Denoiser calls made, including post-hoc scoring.
    pub nfe: u32,
    /// Per sequence, the calls that asked for at least one of its positions (post-hoc scoring
    /// asks for all): what the stage costs that sequence alone. None exceeds `nfe`.
    pub sequence_nfe: Vec<u32>,
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

    /// The calls sequence `seq` took part in over all stages: its NFE had it been sampled
    /// alone (equal to [`Self::nfe`] for one sequence).
    ///
    /// ```
    /// use did_core::denoiser::{DenoiseRequest, Denoiser};
    /// use did_core::refine::{generate, GenerateConfig, StagePlan};
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
    /// let plan = "4".parse::<StagePlan>()?.resolve(8)?;
    /// // A long prompt leaves the second sequence 3 positions to draw, the first 7.
    /// let out = generate(&mut Flat, &GenerateConfig::new(plan, 1), &[&[0], &[0, 1, 1, 1, 1]]).unwrap();
    /// assert_eq!((out.nfe(), out.sequence_nfe(0), out.sequence_nfe(1)), (7, 7, 3));
    /// # Ok::<(), did_core::Error>(())
    /// ```
    pub fn sequence_nfe(&self, seq: usize) -> u32 {
        self.stages
            .iter()
            .map(|s| s.sequence_nfe.get(seq).copied().unwrap_or(0))
            .sum()
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
    let ids = SequenceId::numbered(config.seed, config.first_sample, prompts.len());
    if u64::from(config.first_sample) + prompts.len() as u64 > u64::from(MAX_SAMPLE) + 1 {
        return Err(invalid(
            "sample ids",
            "more than 2^24 samples per seed; change the seed for the next ones",
        )
        .into());
    }
    generate_each(denoiser, config, prompts, &ids)
}

/// [`generate`] with each sequence named by its own [`SequenceId`] (`ids[i]` for
/// `prompts[i]`): a sequence draws the same tokens whatever else is in the batch, so a server
/// can batch requests that each carry their own seed.
///
/// ```
/// use did_core::denoiser::{DenoiseRequest, Denoiser};
/// use did_core::refine::{generate, generate_each, GenerateConfig, StagePlan};
/// use did_core::sample::SequenceId;
/// struct Flat; // every token equally likely
/// impl Denoiser for Flat {
///     type Error = core::convert::Infallible;
///     fn vocab_size(&self) -> usize { 9 }
///     fn mask_id(&self) -> u32 { 8 }
///     fn logits(&mut self, _: &DenoiseRequest<'_>, out: &mut [f32]) -> Result<(), Self::Error> {
///         out.fill(0.0);
///         Ok(())
///     }
/// }
/// let config = GenerateConfig::new("2,L:0.5".parse::<StagePlan>()?.resolve(8)?, 1);
/// let ids = [SequenceId { seed: 5, sample: 0 }, SequenceId { seed: 9, sample: 3 }];
/// let both = generate_each(&mut Flat, &config, &[&[0], &[0]], &ids).unwrap();
/// let alone = generate(&mut Flat, &GenerateConfig { seed: 9, first_sample: 3, ..config }, &[&[0]]).unwrap();
/// assert_eq!(both.batch.sequence(1), alone.batch.sequence(0));
/// # Ok::<(), did_core::Error>(())
/// ```
pub fn generate_each<D: Denoiser>(
    denoiser: &mut D,
    config: &GenerateConfig,
    prompts: &[&[u32]],
    ids: &[SequenceId],
) -> Result<Generation, GenerateError<D::Error>> {
    generate_observed(denoiser, config, prompts, ids, |_| {})
}

/// How far a generation has come, told to [`generate_observed`]'s observer.
#[derive(Debug, Clone)]
pub enum Progress<'a> {
    /// Stage `stage` finished drawing `block` in every sequence: a draft streams its text
    /// block by block from here.
    Block {
        /// The stage's index (0: the draft).
        stage: usize,
        /// The positions just drawn.
        block: Range<usize>,
        /// The batch as it stands.
        batch: &'a SequenceBatch,
    },
    /// Stage `stage` finished.
    Stage {
        /// The stage's index.
        stage: usize,
        /// What it did (its tokens, what it remasked).
        report: &'a StageReport,
    },
}

/// [`generate_each`], telling `observe` as each block and each stage finishes. The observer
/// only watches: the tokens are those of [`generate_each`].
///
/// ```
/// use did_core::denoiser::{DenoiseRequest, Denoiser};
/// use did_core::refine::{generate_observed, GenerateConfig, Progress, StagePlan};
/// use did_core::sample::SequenceId;
/// struct Flat;
/// impl Denoiser for Flat {
///     type Error = core::convert::Infallible;
///     fn vocab_size(&self) -> usize { 9 }
///     fn mask_id(&self) -> u32 { 8 }
///     fn logits(&mut self, _: &DenoiseRequest<'_>, out: &mut [f32]) -> Result<(), Self::Error> {
///         out.fill(0.0);
///         Ok(())
///     }
/// }
/// let config = GenerateConfig::new("4,L:0.5".parse::<StagePlan>()?.resolve(8)?, 1);
/// let mut seen = Vec::new();
/// generate_observed(&mut Flat, &config, &[&[0]], &SequenceId::numbered(1, 0, 1), |p| match p {
///     Progress::Block { stage, block, .. } => seen.push((stage, block.end)),
///     Progress::Stage { stage, .. } => seen.push((stage, 99)),
/// }).unwrap();
/// assert_eq!(seen, [(0, 4), (0, 8), (0, 99), (1, 8), (1, 99)]);
/// # Ok::<(), did_core::Error>(())
/// ```
pub fn generate_observed<D: Denoiser>(
    denoiser: &mut D,
    config: &GenerateConfig,
    prompts: &[&[u32]],
    ids: &[SequenceId],
    mut observe: impl FnMut(Progress<'_>),
) -> Result<Generation, GenerateError<D::Error>> {
    let seq_len = config.plan.seq_len();
    let mask_id = denoiser.mask_id();
    check_inputs(denoiser.vocab_size(), mask_id, config, prompts)?;
    if ids.len() != prompts.len() {
        return Err(invalid(
            "sequence ids",
            alloc::format!(
                "{} ids for {} prompts; give one per prompt",
                ids.len(),
                prompts.len()
            ),
        )
        .into());
    }
    if let Some(id) = ids.iter().find(|id| id.sample > MAX_SAMPLE) {
        return Err(invalid(
            "sequence ids",
            alloc::format!(
                "sample {} is past the 2^24 samples of a seed; change the seed",
                id.sample
            ),
        )
        .into());
    }
    let mut batch = SequenceBatch::from_prompts(prompts, seq_len, mask_id, ids);
    let mut scratch = BlockScratch::default();
    let mut stages = Vec::with_capacity(config.plan.stages().len());
    let mut previous_block = 0;
    for (index, stage) in config.plan.stages().iter().enumerate() {
        let mut nfe = 0;
        let mut scoring = 0;
        let mut remasked = alloc::vec![Vec::new(); batch.batch()];
        if let Some(amount) = stage.remask {
            let (positions, calls) = choose_remask(
                denoiser,
                &batch,
                config,
                index as u32,
                amount,
                previous_block,
                stage.block_size,
            )?;
            nfe += calls;
            scoring = calls;
            for (seq, picked) in positions.into_iter().enumerate() {
                for &pos in &picked {
                    batch.remask(seq, pos);
                }
                remasked[seq] = picked;
            }
        }
        scratch.reset_sequence_calls(batch.batch());
        let sampler = SamplerConfig {
            update: stage.update.unwrap_or(config.sampler.update),
            ..config.sampler
        };
        nfe += run_stage(
            denoiser,
            &mut batch,
            stage.block_size,
            &sampler,
            config.stop_at,
            &mut scratch,
            &mut |block, batch| {
                observe(Progress::Block {
                    stage: index,
                    block,
                    batch,
                })
            },
        )?;
        stages.push(StageReport {
            block_size: stage.block_size,
            remask: stage.remask,
            update: sampler.update,
            nfe,
            sequence_nfe: scratch
                .sequence_calls()
                .iter()
                .map(|&c| c + scoring)
                .collect(),
            remasked,
            tokens: batch.tokens.clone(),
        });
        if let Some(report) = stages.last() {
            observe(Progress::Stage {
                stage: index,
                report,
            });
        }
        previous_block = stage.block_size;
    }
    Ok(Generation { batch, stages })
}

fn check_inputs<D>(
    vocab: usize,
    mask_id: u32,
    config: &GenerateConfig,
    prompts: &[&[u32]],
) -> Result<(), GenerateError<D>> {
    config.sampler.validate()?;
    for stage in config.plan.stages() {
        if let Some(update) = stage.update {
            update.validate()?;
        }
        if let Some(amount) = stage.remask {
            amount.validate()?;
        }
    }
    let seq_len = config.plan.seq_len();
    if vocab < 2 || mask_id as usize >= vocab {
        return Err(invalid(
            "denoiser",
            alloc::format!(
                "mask id {mask_id} must be inside a vocabulary of at least 2 (got {vocab})"
            ),
        )
        .into());
    }
    for (i, p) in prompts.iter().enumerate() {
        if p.is_empty() {
            return Err(invalid(
                "prompt",
                alloc::format!("prompt {i} is empty; start it with the BOS token"),
            )
            .into());
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
    sampler: &SamplerConfig,
    stop_at: Option<u32>,
    scratch: &mut BlockScratch,
    block_done: &mut dyn FnMut(Range<usize>, &SequenceBatch),
) -> Result<u32, GenerateError<D::Error>> {
    let seq_len = batch.seq_len();
    denoiser
        .begin_stage(batch.batch(), seq_len, block_size)
        .map_err(GenerateError::Denoiser)?;
    let mut calls = 0;
    let blocks = seq_len / block_size;
    for j in 0..blocks {
        let block = j * block_size..(j + 1) * block_size;
        if !batch.any_masked_in(block.start..seq_len) {
            break;
        }
        if batch.any_masked_in(block.clone()) {
            calls += fill_block(denoiser, batch, block.clone(), block_size, sampler, scratch)
                .map_err(GenerateError::Denoiser)?;
        }
        if let Some(eos) = stop_at {
            for seq in 0..batch.batch() {
                batch.end_at_eos(seq, 1, eos);
            }
        }
        block_done(block.clone(), batch);
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
    denoiser
        .commit_block(&batch.request(block_size, block, &[]))
        .map_err(GenerateError::Denoiser)
}

/// Per sequence the positions to remask, and the denoiser calls spent scoring.
type RemaskChoice = (Vec<Vec<usize>>, u32);

/// The positions to remask before stage `stage`, per sequence, and the calls spent scoring.
fn choose_remask<D: Denoiser>(
    denoiser: &mut D,
    batch: &SequenceBatch,
    config: &GenerateConfig,
    stage: u32,
    amount: RemaskAmount,
    previous_block: usize,
    block_size: usize,
) -> Result<RemaskChoice, GenerateError<D::Error>> {
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
                let stream = batch.stream(seq, Purpose::Remask, stage);
                for pos in 0..seq_len {
                    scores[seq * seq_len + pos] = stream.uniform(0, pos as u32);
                }
            }
        }
        RemaskStrategy::PostHoc => {
            calls = score_post_hoc(
                denoiser,
                batch,
                block_size,
                config.sampler.max_outputs_per_call,
                &mut scores,
            )?;
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
        picked.push(select_lowest(
            &scores[seq * seq_len..(seq + 1) * seq_len],
            &eligible,
            amount,
            scope,
        ));
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
        .flat_map(|seq| {
            (0..seq_len)
                .filter(move |&p| batch.eligible(seq, p))
                .map(move |p| (seq, p))
        })
        .map(|(seq, pos)| OutputPosition {
            seq: seq as u32,
            pos: pos as u32,
        })
        .collect();
    denoiser
        .begin_stage(batch.batch(), seq_len, block_size)
        .map_err(GenerateError::Denoiser)?;
    let mut logits = Vec::new();
    let mut probs = alloc::vec![0.0; vocab];
    let mut calls = 0;
    for chunk in outputs.chunks(max_outputs) {
        logits.clear();
        logits.resize(chunk.len() * vocab, 0.0);
        let request = batch.request(block_size, 0..seq_len, chunk);
        denoiser
            .logits(&request, &mut logits)
            .map_err(GenerateError::Denoiser)?;
        calls += 1;
        for (o, row) in chunk.iter().zip(logits.chunks(vocab)) {
            let index = o.seq as usize * seq_len + o.pos as usize;
            subs_softmax(row, batch.mask_id(), &mut probs);
            scores[index] = probs[batch.tokens[index] as usize];
        }
    }
    Ok(calls)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::denoiser::DenoiseRequest;
    use crate::mask::AttentionMask;
    use crate::refine::plan::StagePlan;
    use crate::sample::update::BlockUpdate;
    use crate::sample::ConfidenceKind;
    use alloc::vec;
    use quickcheck::{quickcheck, TestResult};

    const V: usize = 12;
    const MASK: u32 = 11;
    const EOS: u32 = 10;

    /// A small deterministic "language model" whose logits at a position depend
    /// only on the tokens its attention mask lets it see. It checks the
    /// [`Denoiser`] contract on every call, optionally keeps a KV cache of
    /// committed blocks (reading them from the cache, not from the request),
    /// and records every request's tokens.
    #[derive(Default)]
    struct ToyLm {
        cached: bool,
        prefer_eos_at: Option<usize>,
        block_size: usize,
        committed_end: Vec<usize>,
        cache: Vec<u32>,
        seq_len: usize,
        calls: Vec<Vec<u32>>,
        commits: usize,
    }

    impl ToyLm {
        fn row(
            &self,
            tokens: &[u32],
            seq: usize,
            pos: usize,
            block_size: usize,
            block_start: usize,
            out: &mut [f32],
        ) {
            let mask = AttentionMask::BlockCausal {
                block_size,
                query_offset: 0,
                key_offset: 0,
                window: None,
            };
            let mut h: u64 = 1469598103934665603 ^ pos as u64;
            for k in 0..self.seq_len {
                if !mask.allows(pos, k) {
                    continue;
                }
                let t = if self.cached && k < block_start {
                    self.cache[seq * self.seq_len + k]
                } else {
                    tokens[seq * self.seq_len + k]
                };
                if t != MASK {
                    h = (h ^ (u64::from(t) << 8 | k as u64)).wrapping_mul(1099511628211);
                }
            }
            for (v, o) in out.iter_mut().enumerate() {
                *o =
                    ((h.rotate_left(v as u32 * 5) ^ (v as u64 * 2654435761)) % 1000) as f32 / 250.0;
            }
            out[MASK as usize] = 50.0; // SUBS must ignore it.
            if self.prefer_eos_at == Some(pos) {
                out[EOS as usize] = 60.0;
            } else {
                out[EOS as usize] = -60.0;
            }
        }
    }

    impl Denoiser for ToyLm {
        type Error = core::convert::Infallible;
        fn vocab_size(&self) -> usize {
            V
        }
        fn mask_id(&self) -> u32 {
            MASK
        }
        fn begin_stage(
            &mut self,
            batch: usize,
            seq_len: usize,
            block_size: usize,
        ) -> Result<(), Self::Error> {
            self.block_size = block_size;
            self.seq_len = seq_len;
            self.committed_end = vec![0; batch];
            self.cache = vec![MASK; batch * seq_len];
            Ok(())
        }
        fn logits(&mut self, r: &DenoiseRequest<'_>, out: &mut [f32]) -> Result<(), Self::Error> {
            assert_eq!(
                r.block_size, self.block_size,
                "block size differs from begin_stage"
            );
            let whole = r.block == (0..r.seq_len);
            assert!(
                whole || (r.block.start % r.block_size == 0 && r.block.len() == r.block_size),
                "misaligned block {:?}",
                r.block
            );
            assert!(
                r.block.start == self.committed_end[0] || whole,
                "block {:?} skips uncommitted blocks",
                r.block
            );
            for seq in 0..r.batch {
                for k in 0..r.block.start {
                    assert_eq!(
                        r.tokens[seq * r.seq_len + k],
                        self.cache[seq * r.seq_len + k],
                        "a committed token changed"
                    );
                }
            }
            for (o, row) in r.outputs.iter().zip(out.chunks_mut(V)) {
                assert!(
                    r.block.contains(&(o.pos as usize)),
                    "output outside the block"
                );
                self.row(
                    r.tokens,
                    o.seq as usize,
                    o.pos as usize,
                    r.block_size,
                    r.block.start,
                    row,
                );
            }
            self.calls.push(r.tokens.to_vec());
            Ok(())
        }
        fn commit_block(&mut self, r: &DenoiseRequest<'_>) -> Result<(), Self::Error> {
            assert_eq!(
                r.block.start, self.committed_end[0],
                "blocks committed out of order"
            );
            for seq in 0..r.batch {
                for k in r.block.clone() {
                    let t = r.tokens[seq * r.seq_len + k];
                    assert!(
                        t != MASK || r.tokens[seq * r.seq_len..].iter().all(|&x| x != MASK),
                        "committing a masked token"
                    );
                    self.cache[seq * r.seq_len + k] = t;
                }
                self.committed_end[seq] = r.block.end;
            }
            self.commits += 1;
            Ok(())
        }
    }

    fn plan(text: &str, l: usize) -> ResolvedPlan {
        text.parse::<StagePlan>().unwrap().resolve(l).unwrap()
    }

    fn prompts(n: usize) -> Vec<Vec<u32>> {
        (0..n)
            .map(|i| vec![EOS, (i % 3) as u32][..1 + i % 2].to_vec())
            .collect()
    }

    fn run(lm: &mut ToyLm, cfg: &GenerateConfig, n: usize) -> Generation {
        let p = prompts(n);
        let refs: Vec<&[u32]> = p.iter().map(|v| v.as_slice()).collect();
        generate(lm, cfg, &refs).unwrap()
    }

    /// A random valid plan for length `l`: sizes that divide `l`, non-decreasing, last = l;
    /// fixed and adaptive remask amounts, and some stages with their own update rule.
    fn random_plan(l: usize, picks: &[u8]) -> ResolvedPlan {
        let divisors: Vec<usize> = (1..=l).filter(|d| l % d == 0).collect();
        let mut sizes: Vec<usize> = picks
            .iter()
            .take(3)
            .map(|&p| divisors[usize::from(p) % divisors.len()])
            .collect();
        sizes.sort_unstable();
        let rule = |i: usize| match picks.get(i).map(|p| p / 64) {
            Some(1) => "@threshold:0.7",
            Some(2) => "@entropy:0.4",
            Some(3) => "@topk:2",
            _ => "",
        };
        let amounts = ["0.25", "below:0.5", "1", "below:0.3:0.1..0.6"];
        let mut text = alloc::format!("{}{}", sizes.first().copied().unwrap_or(1), rule(0));
        for (i, s) in sizes.iter().skip(1).enumerate() {
            text.push_str(&alloc::format!(",{s}:{}{}", amounts[i % 4], rule(i + 1)));
        }
        if sizes.len() > 1 || picks.len() % 2 == 0 {
            let last = amounts[picks.len() % 4];
            text.push_str(&alloc::format!(",{l}:{last}{}", rule(3)));
        }
        plan(&text, l)
    }

    /// Every update rule, by a random pick (`None`: first-hitting).
    fn update_rule(pick: Option<u8>) -> BlockUpdate {
        let Some(t) = pick else {
            return BlockUpdate::FirstHitting;
        };
        let v = t / 4;
        match t % 4 {
            0 => BlockUpdate::DdpmCaching {
                steps: u32::from(v % 9) + 1,
            },
            1 => BlockUpdate::ConfidenceThreshold {
                tau: [0.2, 0.5, 0.9, 1.0][usize::from(v % 4)],
            },
            2 => BlockUpdate::EntropyBound {
                budget: [0.0, 0.3, 1.0, 5.0][usize::from(v % 4)],
            },
            _ => BlockUpdate::TopK {
                k: u32::from(v % 4) + 1,
            },
        }
    }

    fn config(plan: ResolvedPlan, seed: u64, rule: Option<u8>, strategy: u8) -> GenerateConfig {
        let mut cfg = GenerateConfig::new(plan, seed);
        cfg.sampler.update = update_rule(rule);
        cfg.sampler.confidence = [
            ConfidenceKind::Nucleus,
            ConfidenceKind::Raw,
            ConfidenceKind::Max,
        ][usize::from(strategy / 8) % 3];
        cfg.remask = match strategy % 5 {
            0 => RemaskStrategy::Snapshot(ConfidenceKind::Nucleus),
            1 => RemaskStrategy::Snapshot(ConfidenceKind::Raw),
            2 => RemaskStrategy::Snapshot(ConfidenceKind::Max),
            3 => RemaskStrategy::PostHoc,
            _ => RemaskStrategy::Random,
        };
        cfg.scope = if strategy % 2 == 0 {
            RemaskScope::Global
        } else {
            RemaskScope::PerBlock
        };
        cfg
    }

    quickcheck! {
        fn every_position_is_unmasked_and_revealed_tokens_never_change(seed: u64, picks: Vec<u8>, ddpm: Option<u8>, strategy: u8) -> bool {
            let l = 24;
            let cfg = config(random_plan(l, &picks), seed, ddpm, strategy);
            let mut lm = ToyLm::default();
            let out = run(&mut lm, &cfg, 3);
            if out.batch.tokens.contains(&MASK) {
                return false;
            }
            // Within a stage, consecutive calls see revealed tokens unchanged.
            let mut call = 0;
            for stage in &out.stages {
                // Post-hoc scoring reads the finished previous stage in one call, before the remask.
                let scoring = usize::from(cfg.remask == RemaskStrategy::PostHoc && stage.remask.is_some());
                let calls = &lm.calls[call + scoring..call + stage.nfe as usize];
                for w in calls.windows(2) {
                    if w[0].iter().zip(&w[1]).any(|(&a, &b)| a != MASK && a != b) {
                        return false;
                    }
                }
                call += stage.nfe as usize;
            }
            call == lm.calls.len()
        }

        fn first_hitting_nfe_is_the_masked_count(seed: u64, block: u8) -> bool {
            let l = 32;
            let b = [1, 2, 4, 8, 16, 32][usize::from(block) % 6];
            let mut lm = ToyLm::default();
            let out = run(&mut lm, &GenerateConfig::new(plan(&alloc::format!("{b}"), l), seed), 1);
            out.stages[0].nfe as usize == l - 1
        }

        fn kv_cache_changes_nothing(seed: u64, picks: Vec<u8>, ddpm: Option<u8>, strategy: u8) -> bool {
            let cfg = config(random_plan(16, &picks), seed, ddpm, strategy);
            let plain = run(&mut ToyLm::default(), &cfg, 2);
            let cached = run(&mut ToyLm { cached: true, ..ToyLm::default() }, &cfg, 2);
            plain == cached
        }

        fn a_sequence_does_not_depend_on_its_batch(seed: u64, picks: Vec<u8>, ddpm: Option<u8>, strategy: u8) -> bool {
            let l = 16;
            let cfg = config(random_plan(l, &picks), seed, ddpm, strategy);
            // Each sequence has its own seed, as a server's requests do.
            let ids = [
                SequenceId { seed, sample: 0 },
                SequenceId { seed: seed ^ 0x9e37_79b9_7f4a_7c15, sample: 5 },
                SequenceId { seed: seed.wrapping_add(1), sample: 1 },
            ];
            let p = prompts(3);
            let refs: Vec<&[u32]> = p.iter().map(|v| v.as_slice()).collect();
            let together = generate_each(&mut ToyLm::default(), &cfg, &refs, &ids).unwrap();
            (0..3).all(|i| {
                let own = GenerateConfig { seed: ids[i].seed, first_sample: ids[i].sample, ..cfg.clone() };
                let alone = generate(&mut ToyLm::default(), &own, &[&p[i]]).unwrap();
                alone.batch.tokens[..] == together.batch.tokens[i * l..(i + 1) * l]
                    && alone.nfe() == together.sequence_nfe(i)
            }) && together.stages.iter().all(|st| st.sequence_nfe.iter().all(|&c| c <= st.nfe))
        }

        fn a_one_hot_denoiser_yields_its_argmax_whatever_the_plan(seed: u64, picks: Vec<u8>, ddpm: Option<u8>, strategy: u8) -> TestResult {
            struct OneHot;
            impl Denoiser for OneHot {
                type Error = core::convert::Infallible;
                fn vocab_size(&self) -> usize { V }
                fn mask_id(&self) -> u32 { MASK }
                fn logits(&mut self, r: &DenoiseRequest<'_>, out: &mut [f32]) -> Result<(), Self::Error> {
                    for (o, row) in r.outputs.iter().zip(out.chunks_mut(V)) {
                        row.fill(-100.0);
                        row[(o.pos as usize * 7) % 10] = 100.0;
                    }
                    Ok(())
                }
            }
            let l = 20;
            let cfg = config(random_plan(l, &picks), seed, ddpm, strategy);
            let out = generate(&mut OneHot, &cfg, &[&[EOS]]).unwrap();
            let want: Vec<u32> = (0..l).map(|p| if p == 0 { EOS } else { ((p * 7) % 10) as u32 }).collect();
            TestResult::from_bool(out.batch.tokens == want)
        }

        fn snapshot_remask_picks_the_drafts_least_confident(seed: u64, kind: u8, gamma: u8) -> bool {
            let l = 32;
            let kind = [ConfidenceKind::Nucleus, ConfidenceKind::Raw, ConfidenceKind::Max][usize::from(kind) % 3];
            let gamma = [0.1, 0.25, 0.5, 0.9][usize::from(gamma) % 4];
            let mut cfg = GenerateConfig::new(plan("4", l), seed);
            cfg.remask = RemaskStrategy::Snapshot(kind);
            let draft = run(&mut ToyLm::default(), &cfg, 2);
            cfg.plan = plan(&alloc::format!("4,L:{gamma}"), l);
            let refined = run(&mut ToyLm::default(), &cfg, 2);
            (0..2).all(|seq| {
                let scores: Vec<f64> = draft.batch.confidence[seq * l..(seq + 1) * l].iter().map(|c| c.get(kind)).collect();
                let eligible: Vec<bool> = (0..l).map(|p| draft.batch.eligible(seq, p)).collect();
                let want = select_lowest(&scores, &eligible, gamma, None);
                let drafted_prefix_kept = (0..l).filter(|p| !want.contains(p)).all(|p| refined.batch.tokens[seq * l + p] == draft.batch.tokens[seq * l + p]);
                refined.stages[1].remasked[seq] == want && drafted_prefix_kept && refined.stages[0].tokens == draft.batch.tokens
            })
        }
    }

    #[test]
    fn regenerated_tokens_get_fresh_confidences_and_kept_ones_keep_theirs() {
        let l = 32;
        let cfg = GenerateConfig::new(plan("4,L:0.5", l), 3);
        let draft = run(
            &mut ToyLm::default(),
            &GenerateConfig::new(plan("4", l), 3),
            1,
        );
        let out = run(&mut ToyLm::default(), &cfg, 1);
        let remasked = &out.stages[1].remasked[0];
        assert_eq!(remasked.len(), remask_count_for(l - 1, 0.5));
        for p in 1..l {
            if !remasked.contains(&p) {
                assert_eq!(out.batch.confidence[p], draft.batch.confidence[p]);
            }
        }
        // At least one regenerated confidence differs from its draft value.
        assert!(remasked
            .iter()
            .any(|&p| out.batch.confidence[p] != draft.batch.confidence[p]));
    }

    fn remask_count_for(n: usize, g: f64) -> usize {
        crate::refine::remask_count(g, n)
    }

    /// Records how many logits rows each call asked for, and which positions.
    struct CountingUniform {
        rows: Vec<usize>,
        positions: Vec<u32>,
    }
    impl Denoiser for CountingUniform {
        type Error = core::convert::Infallible;
        fn vocab_size(&self) -> usize {
            V
        }
        fn mask_id(&self) -> u32 {
            MASK
        }
        fn logits(&mut self, r: &DenoiseRequest<'_>, out: &mut [f32]) -> Result<(), Self::Error> {
            self.rows.push(r.outputs.len());
            self.positions.extend(r.outputs.iter().map(|o| o.pos));
            out.fill(0.0);
            Ok(())
        }
    }

    #[test]
    fn ddpm_reveals_the_fraction_one_minus_s_over_t_at_each_step() {
        // One block of 4096 with T = 4: step i reveals each masked position with
        // probability 1/(T − i): 1/4 of 4095, then 1/3 of the rest, 1/2, all.
        let l = 4096;
        let mut cfg = GenerateConfig::new(plan("L", l), 11);
        cfg.sampler.update = BlockUpdate::DdpmCaching { steps: 4 };
        cfg.sampler.max_outputs_per_call = l;
        let mut lm = CountingUniform {
            rows: Vec::new(),
            positions: Vec::new(),
        };
        generate(&mut lm, &cfg, &[&[EOS]]).unwrap();
        assert_eq!(lm.rows.len(), 4);
        let mut left = (l - 1) as f64;
        for (i, &n) in lm.rows.iter().enumerate() {
            let p = 1.0 / (4 - i) as f64;
            let (mean, sd) = (left * p, (left * p * (1.0 - p)).sqrt());
            assert!(
                (n as f64 - mean).abs() < 4.0 * sd + 1e-9,
                "step {i}: {n} revealed, expected {mean} ± {sd}"
            );
            left -= n as f64;
        }
        assert_eq!(left, 0.0);
    }

    #[test]
    fn first_hitting_picks_the_revealed_position_uniformly() {
        // Block 1 of a length-8 plan at block 4: the first call reveals one of positions 4..8.
        let mut counts = [0u32; 4];
        for seed in 0..4000 {
            let mut lm = CountingUniform {
                rows: Vec::new(),
                positions: Vec::new(),
            };
            generate(
                &mut lm,
                &GenerateConfig::new(plan("4", 8), seed),
                &[&[EOS, 1, 2, 3]],
            )
            .unwrap();
            counts[lm.positions[0] as usize - 4] += 1;
        }
        for c in counts {
            assert!(
                (c as f64 - 1000.0).abs() < 4.0 * (4000.0f64 * 0.25 * 0.75).sqrt(),
                "{counts:?}"
            );
        }
    }

    #[test]
    fn ddpm_with_one_step_calls_once_per_block_and_never_leaves_a_mask() {
        let l = 32;
        let mut cfg = GenerateConfig::new(plan("8", l), 5);
        cfg.sampler.update = BlockUpdate::DdpmCaching { steps: 1 };
        let out = run(&mut ToyLm::default(), &cfg, 2);
        assert_eq!(out.stages[0].nfe, 4);
        assert!(out.batch.tokens.iter().all(|&t| t != MASK));
    }

    #[test]
    fn ddpm_calls_no_more_than_the_masked_count() {
        let l = 32;
        let mut cfg = GenerateConfig::new(plan("16", l), 5);
        cfg.sampler.update = BlockUpdate::DdpmCaching { steps: 1000 };
        let out = run(&mut ToyLm::default(), &cfg, 1);
        assert!((out.stages[0].nfe as usize) < l);
        assert!(out.stages[0].nfe >= 2);
    }

    #[test]
    fn stops_at_eos_and_never_remasks_padding() {
        let l = 32;
        let mut cfg = GenerateConfig::new(plan("4,L:1", l), 1);
        cfg.stop_at = Some(EOS);
        let mut lm = ToyLm {
            prefer_eos_at: Some(9),
            ..ToyLm::default()
        };
        let out = run(&mut lm, &cfg, 1);
        assert_eq!(out.batch.lengths[0], 10);
        assert!(out.batch.tokens[10..].iter().all(|&t| t == EOS));
        assert!(out.stages[1].remasked[0].iter().all(|&p| p > 0 && p < 10));
        // The draft stopped after the block holding the EOS: blocks 3..8 were never drawn.
        assert_eq!(out.stages[0].nfe, 11);
    }

    #[test]
    fn commits_every_block_but_the_last() {
        let mut lm = ToyLm::default();
        let out = run(&mut lm, &GenerateConfig::new(plan("4,L:0.5", 16), 2), 1);
        assert_eq!(lm.commits, 3);
        assert_eq!(out.stages.len(), 2);
    }

    #[test]
    fn post_hoc_costs_scoring_calls_and_picks_the_lowest_rescored() {
        let l = 16;
        let mut cfg = GenerateConfig::new(plan("4,L:0.25", l), 4);
        cfg.remask = RemaskStrategy::PostHoc;
        let out = run(&mut ToyLm::default(), &cfg, 1);
        assert_eq!(
            out.stages[1].nfe as usize,
            1 + out.stages[1].remasked[0].len()
        );
    }

    #[test]
    fn bad_prompts_and_settings_are_errors() {
        let cfg = GenerateConfig::new(plan("4", 8), 0);
        let e = |p: &[u32]| {
            generate(&mut ToyLm::default(), &cfg, &[p])
                .unwrap_err()
                .to_string()
        };
        assert!(e(&[]).contains("empty"));
        assert!(e(&[EOS; 9]).contains("more than the sequence length"));
        assert!(e(&[EOS, MASK]).contains("mask"));
        assert!(e(&[EOS, 99]).contains("outside the vocabulary"));
        let mut bad = cfg.clone();
        bad.sampler.update = BlockUpdate::DdpmCaching { steps: 0 };
        assert!(generate(&mut ToyLm::default(), &bad, &[&[EOS]]).is_err());
    }

    /// Logits with one sure token per position (probability ≈ 1).
    struct Sure;
    impl Denoiser for Sure {
        type Error = core::convert::Infallible;
        fn vocab_size(&self) -> usize {
            V
        }
        fn mask_id(&self) -> u32 {
            MASK
        }
        fn logits(&mut self, r: &DenoiseRequest<'_>, out: &mut [f32]) -> Result<(), Self::Error> {
            for (o, row) in r.outputs.iter().zip(out.chunks_mut(V)) {
                row.fill(-100.0);
                row[o.pos as usize % 10] = 100.0;
            }
            Ok(())
        }
    }

    fn with_rule(text: &str, l: usize, rule: &str) -> GenerateConfig {
        let mut cfg = GenerateConfig::new(plan(text, l), 7);
        cfg.sampler.update = rule.parse().unwrap();
        cfg
    }

    #[test]
    fn a_sure_model_fills_each_block_in_one_call_under_every_parallel_rule() {
        for rule in ["threshold:0.9", "entropy:0.0", "topk:4"] {
            let out = generate(&mut Sure, &with_rule("4", 32, rule), &[&[EOS]]).unwrap();
            assert_eq!(out.stages[0].nfe, 8, "{rule}");
            assert!(!out.batch.tokens.contains(&MASK));
        }
    }

    #[test]
    fn parallel_rules_on_an_unsure_model_cost_what_they_should() {
        // Uniform logits: every draw has confidence 1/11 and entropy ln 11.
        let count = |rule: &str| {
            let mut lm = CountingUniform {
                rows: Vec::new(),
                positions: Vec::new(),
            };
            let out = generate(&mut lm, &with_rule("8", 32, rule), &[&[EOS]]).unwrap();
            assert_eq!(out.stages[0].nfe as usize, lm.rows.len());
            (out.stages[0].nfe, lm.rows)
        };
        // Nothing clears τ: one token per call, the most confident (all tie: the first).
        let (nfe, rows) = count("threshold:0.5");
        assert_eq!(nfe, 31);
        assert_eq!(&rows[..3], &[7, 6, 5]); // every masked position is asked each call
                                            // A budget below one entropy reveals one per call; one of 3 entropies reveals four.
        assert_eq!(count("entropy:1.0").0, 31);
        assert_eq!(count("entropy:7.5").0, 2 + 2 + 2 + 2);
        // k per call: ceil(7 / 3) + 3 × ceil(8 / 3).
        assert_eq!(count("topk:3").0, 3 + 3 * 3);
    }

    #[test]
    fn a_stage_rule_overrides_the_sampler_and_is_reported() {
        let mut cfg = GenerateConfig::new(plan("4@topk:4,L:0.5@threshold:0.9", 16), 3);
        cfg.sampler.update = BlockUpdate::FirstHitting;
        let out = generate(&mut Sure, &cfg, &[&[EOS]]).unwrap();
        assert_eq!(out.stages[0].update, BlockUpdate::TopK { k: 4 });
        assert_eq!(out.stages[0].nfe, 4);
        assert_eq!(
            out.stages[1].update,
            BlockUpdate::ConfidenceThreshold { tau: 0.9 }
        );
        assert_eq!(out.stages[1].nfe, 1);
    }

    #[test]
    fn max_outputs_per_call_splits_a_parallel_step_and_counts_each_call() {
        let mut cfg = with_rule("L", 32, "threshold:0.9");
        cfg.sampler.max_outputs_per_call = 10;
        let mut lm = CountingUniform {
            rows: Vec::new(),
            positions: Vec::new(),
        };
        let out = generate(&mut lm, &cfg, &[&[EOS]]).unwrap();
        assert!(lm.rows.iter().all(|&r| r <= 10));
        assert_eq!(out.nfe() as usize, lm.rows.len());
        let plain = generate(&mut lm, &with_rule("L", 32, "threshold:0.9"), &[&[EOS]]).unwrap();
        assert_eq!(plain.batch.tokens, out.batch.tokens);
    }

    quickcheck! {
        fn adaptive_remask_takes_the_scores_below_within_the_bounds(seed: u64, c: u8, lo: u8, hi: u8) -> bool {
            let l = 32;
            let (lo, hi) = (f64::from(lo.min(hi)) / 255.0, f64::from(lo.max(hi)) / 255.0);
            let c = f64::from(c) / 255.0;
            let amount = RemaskAmount::Below { score: c, min: lo, max: hi };
            let draft = run(&mut ToyLm::default(), &GenerateConfig::new(plan("4", l), seed), 2);
            let mut cfg = GenerateConfig::new(plan("4", l), seed);
            cfg.plan = plan(&alloc::format!("4,L:{amount}"), l);
            let refined = run(&mut ToyLm::default(), &cfg, 2);
            (0..2).all(|seq| {
                let eligible: Vec<usize> = (0..l).filter(|&p| draft.batch.eligible(seq, p)).collect();
                let n = eligible.len();
                let conf = |p: usize| draft.batch.confidence[seq * l + p].nucleus;
                let below = eligible.iter().filter(|&&p| conf(p) < c).count();
                let want = below.clamp(crate::refine::remask_count(lo, n), crate::refine::remask_count(hi, n));
                let got = &refined.stages[1].remasked[seq];
                let worst_kept = eligible.iter().filter(|p| !got.contains(p)).map(|&p| conf(p)).fold(f64::INFINITY, f64::min);
                got.len() == want && got.iter().all(|&p| conf(p) <= worst_kept)
            })
        }
    }
}
