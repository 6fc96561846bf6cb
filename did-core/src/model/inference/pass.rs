//! The inference pass: the forward without saved activations, over the tokens of the block
//! being generated (with the [`KvCache`] of the committed ones) or over the whole sequence, and
//! the commit pass that stores a finished block's keys and values (docs/bd3lm.md §4.2). Past the
//! context length the window slides: a query sees the last `context` positions up to the end of
//! its block. RoPE is relative, so absolute positions give the same scores as BD3-LM's
//! window-relative ones (up to rounding).

use alloc::vec;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicUsize, Ordering};

use super::kv_cache::KvCache;
use crate::backend::{Backend, RecordingId, Slice, SliceMut};
use crate::error::invalid;
use crate::mask::AttentionMask;
use crate::model::network::activations::{time_embedding, BlockActivations, CondActivations};
use crate::model::network::config::Architecture;
use crate::model::network::transformer::{CachedGroup, Geometry, KeyValues, Transformer};
use crate::model::ModelConfig;
use crate::model::ModelError;
use crate::sample::categorical::SampledToken;
use crate::sample::nucleus::Nucleus;
use crate::sample::DrawSpec;

/// What a pass gives back at its output rows.
pub(crate) enum PassOutput<'o> {
    /// Raw logits, downloaded (`outputs × vocab`).
    Logits(&'o mut [f32]),
    /// One token per output row, drawn where the logits are ([`DrawOps::draw_tokens`](crate::backend::DrawOps::draw_tokens)).
    Tokens {
        mask_id: u32,
        nucleus: &'o Nucleus,
        draws: &'o [DrawSpec],
        out: &'o mut [SampledToken],
    },
}

/// How a pass uses the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CacheUse {
    /// Attend to the cache and this pass's tokens; do not keep them.
    Read,
    /// Attend, then keep this pass's keys and values as committed.
    Commit,
}

/// The forward of a model without saved activations, for sampling and scoring.
pub struct Inference<'a, B: Backend> {
    pub(super) be: &'a B,
    pub(super) model: &'a Transformer,
    params: &'a B::Buffer,
    cond: Option<CondActivations<B>>,
    scratch: Option<(usize, BlockActivations<B>, [B::Buffer; 2])>,
    /// Bumped when the scratch moves: recordings hold its addresses.
    scratch_generation: usize,
    head: Option<(usize, [B::Buffer; 5], B::Buffer)>,
    /// Whether passes are recorded: the backend can, and no recording has failed.
    recording: bool,
    /// Recorded passes, oldest first.
    recordings: Vec<(PassKey, RecordingId)>,
    /// The token ids every recorded pass reads.
    pass_ids: Option<B::Ids>,
}

impl<B: Backend> Drop for Inference<'_, B> {
    fn drop(&mut self) {
        for (_, id) in self.recordings.drain(..) {
            self.be.forget_recording(id);
        }
    }
}

impl<'a, B: Backend> Inference<'a, B> {
    /// Inference with `params` (usually the EMA weights). The DiT's constant
    /// modulation vectors are computed here, once.
    pub fn new(be: &'a B, model: &'a Transformer, params: &'a B::Buffer) -> Result<Self, B::Error> {
        let cfg = model.config();
        let cond = if cfg.architecture == Architecture::Dit {
            let (k, c) = (cfg.cond_dim, cfg.hidden);
            let mut cond = CondActivations {
                time_embedding: be.upload(&time_embedding(0.0))?,
                s1: be.zeros(k)?,
                s1a: be.zeros(k)?,
                s2: be.zeros(k)?,
                c: be.zeros(k)?,
                mods: be.zeros(cfg.layers * 6 * c)?,
                final_mod: be.zeros(2 * c)?,
            };
            model.cond_forward(be, params, &mut cond)?;
            Some(cond)
        } else {
            None
        };
        Ok(Inference {
            be,
            model,
            params,
            cond,
            scratch: None,
            scratch_generation: 0,
            head: None,
            recording: be.can_record(),
            recordings: Vec::new(),
            pass_ids: None,
        })
    }

    /// The model.
    pub fn model(&self) -> &Transformer {
        self.model
    }

    /// The weights it runs with.
    pub(super) fn params(&self) -> &B::Buffer {
        self.params
    }

    fn ensure_scratch(&mut self, rows: usize) -> Result<(), B::Error> {
        if matches!(&self.scratch, Some((cap, ..)) if *cap >= rows) {
            return Ok(());
        }
        self.scratch = None;
        // The recordings read the old scratch.
        self.scratch_generation += 1;
        for (_, id) in self.recordings.drain(..) {
            self.be.forget_recording(id);
        }
        let cfg = self.model.config();
        let (c, m, be) = (cfg.hidden, cfg.mlp_hidden, self.be);
        let dit = cfg.architecture == Architecture::Dit;
        let z = |len: usize| be.zeros(len);
        let blk = BlockActivations {
            ln1: z(rows * c)?,
            mean1: z(rows)?,
            rstd1: z(rows)?,
            h1: z(if dit { rows * c } else { 0 })?,
            qkv: z(3 * rows * c)?,
            att: z(rows * c)?,
            lse: be.zeros_f32(rows * cfg.heads)?,
            y1: z(rows * c)?,
            x_mid: z(rows * c)?,
            ln2: z(rows * c)?,
            mean2: z(rows)?,
            rstd2: z(rows)?,
            h2: z(if dit { rows * c } else { 0 })?,
            f1: z(rows * m)?,
            g: z(rows * m)?,
            y2: z(rows * c)?,
        };
        self.scratch = Some((rows, blk, [z(rows * c)?, z(rows * c)?]));
        Ok(())
    }

    fn ensure_head(&mut self, rows: usize) -> Result<(), B::Error> {
        if matches!(&self.head, Some((cap, ..)) if *cap >= rows) {
            return Ok(());
        }
        self.head = None;
        let cfg = self.model.config();
        let (c, be) = (cfg.hidden, self.be);
        self.head = Some((
            rows,
            [
                be.zeros(rows * c)?,
                be.zeros(rows * c)?,
                be.zeros(rows)?,
                be.zeros(rows)?,
                be.zeros(rows * c)?,
            ],
            be.zeros(rows * cfg.vocab_size)?,
        ));
        Ok(())
    }

    /// Runs `tokens` (`[batch, n]`, at absolute positions `start..start + n`)
    /// through the model under `mask` and gives back, at `outputs`
    /// (`(sequence, index in the pass)`), raw logits or drawn tokens.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn pass(
        &mut self,
        tokens: &[u32],
        batch: usize,
        start: usize,
        block_size: usize,
        cache: Option<(&mut KvCache<B>, CacheUse)>,
        outputs: &[(usize, usize)],
        out: PassOutput<'_>,
    ) -> Result<(), B::Error> {
        let (cache, cache_use) = match cache {
            Some((kv, u)) => (Some(kv), u),
            None => (None, CacheUse::Read),
        };
        let mut group = [PassGroup {
            batch,
            start,
            cache,
        }];
        self.pass_groups(tokens, block_size, &mut group, cache_use, outputs, out)
    }

    /// [`Self::pass`] over consecutive groups of sequences, each at its own block start with its
    /// own cache (every group has one, or there is one group without): the embedding, every
    /// linear layer and the head run over all the groups' rows at once, RoPE and attention
    /// group by group. `tokens` is `[Σ batch, n]`; outputs name sequences across the groups.
    pub(super) fn pass_groups(
        &mut self,
        tokens: &[u32],
        block_size: usize,
        groups: &mut [PassGroup<'_, B>],
        cache_use: CacheUse,
        outputs: &[(usize, usize)],
        out: PassOutput<'_>,
    ) -> Result<(), B::Error> {
        let cfg = *self.model.config();
        let (c, v, be) = (cfg.hidden, cfg.vocab_size, self.be);
        let batch: usize = groups.iter().map(|g| g.batch).sum();
        let cached = groups.iter().all(|g| g.cache.is_some());
        debug_assert!(batch > 0 && (cached || groups.len() == 1));
        let n = tokens.len() / batch;
        let rows = batch * n;
        self.ensure_scratch(rows)?;
        // A draft call's few rows through a cached pass: launches, not work, are its cost, so a
        // backend that can record replays the whole pass as one (a CUDA graph), recorded on
        // the first call at each block position and window. Its ids go to one buffer that
        // every recording reads.
        let recordable = self.recording
            && cfg.architecture == Architecture::Dit
            && cached
            && groups.len() == 1
            && rows <= MAX_RECORDED_ROWS;
        let fresh_ids;
        let ids: &B::Ids = if recordable {
            let ids = match &mut self.pass_ids {
                Some(ids) => ids,
                slot => slot.insert(be.upload_ids(&[0; MAX_RECORDED_ROWS])?),
            };
            be.upload_ids_into(tokens, ids)?;
            ids
        } else {
            fresh_ids = be.upload_ids(tokens)?;
            &fresh_ids
        };
        let position_ids = if cfg.architecture == Architecture::Gpt2 {
            let pos: Vec<u32> = groups
                .iter()
                .flat_map(|g| (0..g.batch * n).map(move |i| (g.start + i % n) as u32))
                .collect();
            Some(be.upload_ids(&pos)?)
        } else {
            None
        };
        let Some((_, blk, [x_a, x_b])) = self.scratch.as_mut() else {
            unreachable!("allocated above")
        };
        let mut dy_scratch = be.zeros(if position_ids.is_some() { rows * c } else { 0 })?;
        for g in groups.iter_mut() {
            let (window_start, end) = window(&cfg, g.start, n);
            if let Some(cache) = g.cache.as_deref_mut() {
                cache.make_room(be, c, window_start, end)?;
            }
        }
        let key = match &groups[..] {
            [PassGroup {
                cache: Some(kv),
                start,
                ..
            }] if recordable => Some(PassKey {
                batch,
                tokens: n,
                start: *start,
                block_size,
                cache_serial: kv.serial,
                base: kv.base,
                capacity: kv.capacity,
                scratch_generation: self.scratch_generation,
            }),
            _ => None,
        };
        let mut run = |groups: &mut [PassGroup<'_, B>]| {
            embed_and_blocks(
                be,
                self.model,
                self.params,
                self.cond.as_ref().map(|cd| &cd.mods),
                blk,
                [&mut *x_a, &mut *x_b],
                ids,
                position_ids.as_ref(),
                &mut dy_scratch,
                groups,
                n,
                block_size,
            )
        };
        match key {
            Some(key) => match self.recordings.iter().find(|(k, _)| *k == key) {
                Some(&(_, id)) => be.replay_recording(id)?,
                None => {
                    let ran = be.begin_recording().and_then(|()| {
                        let ran = run(groups);
                        // Recording ends whatever the pass did.
                        match (ran, be.end_recording()) {
                            (Ok(()), recorded) => recorded,
                            (Err(e), recorded) => {
                                if let Ok(Some(id)) = recorded {
                                    be.forget_recording(id);
                                }
                                Err(e)
                            }
                        }
                    });
                    match ran {
                        Ok(Some(id)) => {
                            if self.recordings.len() >= MAX_RECORDINGS {
                                be.forget_recording(self.recordings.remove(0).1);
                            }
                            self.recordings.push((key, id));
                            be.replay_recording(id)?;
                        }
                        failed => {
                            // The pass could not be recorded: run it, and never record again.
                            be.recording_failed(failed.as_ref().err());
                            self.recording = false;
                            run(groups)?;
                        }
                    }
                }
            },
            None => run(groups)?,
        }
        if cache_use == CacheUse::Commit {
            for g in groups.iter_mut() {
                if let Some(cache) = g.cache.as_deref_mut() {
                    cache.committed = g.start + n;
                }
            }
        }
        // Gather the output rows, then the head over them only.
        let k = outputs.len();
        if k == 0 {
            return Ok(());
        }
        self.ensure_head(k)?;
        let (Some((_, _, [x_a, x_b])), Some((_, [hx, lnf, mean, rstd, hf], logits))) =
            (self.scratch.as_ref(), self.head.as_mut())
        else {
            unreachable!("allocated above")
        };
        let last = if cfg.layers % 2 == 0 { x_a } else { x_b };
        // One launch for all rows: the embedding lookup is a row gather.
        let rows_out: Vec<u32> = outputs
            .iter()
            .map(|&(seq, idx)| (seq * n + idx) as u32)
            .collect();
        let rows_out = be.upload_ids(&rows_out)?;
        be.embedding_forward(&rows_out, Slice::whole(last), SliceMut::whole(hx), k, c)?;
        let final_mod = self.cond.as_ref().map(|cd| &cd.final_mod);
        self.model.head_forward(
            be,
            self.params,
            k,
            hx,
            lnf,
            mean,
            rstd,
            hf,
            final_mod,
            logits,
        )?;
        match out {
            PassOutput::Logits(out) => be.download(Slice::whole(logits), &mut out[..k * v]),
            PassOutput::Tokens {
                mask_id,
                nucleus,
                draws,
                out,
            } => be.draw_tokens(Slice::whole(logits), v, mask_id, nucleus, draws, out),
        }
    }

    /// Raw logits of a whole uncached pass over `tokens` (`[batch, n]` from
    /// position 0): block-causal with `block_size` for the DiT (`n` for full
    /// attention), causal for GPT-2; at most `context` positions are seen.
    /// Returns `[batch, n, V]`.
    pub fn logits_uncached(
        &mut self,
        tokens: &[u32],
        batch: usize,
        block_size: usize,
    ) -> Result<Vec<f32>, ModelError<B::Error>> {
        let n = self.check_tokens(tokens, batch)?;
        if self.model.config().architecture == Architecture::Gpt2 && n > self.model.config().context
        {
            return Err(invalid(
                "sequence length",
                "GPT-2 has learned positions up to its context; score shorter windows",
            )
            .into());
        }
        let outputs: Vec<(usize, usize)> = (0..batch)
            .flat_map(|s| (0..n).map(move |i| (s, i)))
            .collect();
        let mut out = vec![0.0; outputs.len() * self.model.config().vocab_size];
        self.pass(
            tokens,
            batch,
            0,
            block_size.max(1),
            None,
            &outputs,
            PassOutput::Logits(&mut out),
        )
        .map_err(ModelError::Backend)?;
        Ok(out)
    }

    pub(super) fn check_tokens(&self, tokens: &[u32], batch: usize) -> Result<usize, crate::Error> {
        if batch == 0 || tokens.is_empty() || tokens.len() % batch != 0 {
            return Err(invalid(
                "tokens",
                "need batch ≥ 1 sequences of equal, non-zero length",
            ));
        }
        let vocab = self.model.config().vocab_size;
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(invalid(
                "token id",
                alloc::format!("{bad} is outside the vocabulary of {vocab}"),
            ));
        }
        Ok(tokens.len() / batch)
    }
}

/// The most rows a recorded pass has: a draft call's block at a small batch, where launches,
/// not work, are the cost.
const MAX_RECORDED_ROWS: usize = 8;
/// Recordings an [`Inference`] keeps (one a block position and cache window); past it the
/// oldest goes.
const MAX_RECORDINGS: usize = 4096;

/// What a recorded pass's launches depend on besides its token ids: the same key, the same
/// launches over the same buffers at the same addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PassKey {
    batch: usize,
    tokens: usize,
    start: usize,
    block_size: usize,
    cache_serial: usize,
    base: usize,
    capacity: usize,
    scratch_generation: usize,
}

/// A fresh cache identity: a slide moves its slots to other buffers.
pub(super) fn next_cache_serial() -> usize {
    static SERIAL: AtomicUsize = AtomicUsize::new(0);
    SERIAL.fetch_add(1, Ordering::Relaxed)
}

/// Sequences of a pass that share a block start and (when there is one) a KV cache.
pub(super) struct PassGroup<'c, B: Backend> {
    /// How many.
    pub batch: usize,
    /// The absolute position of the pass's first token.
    pub start: usize,
    /// Their cache: its committed keys are read, and the pass's are written after them.
    pub cache: Option<&'c mut KvCache<B>>,
}

/// The first position a pass of `n` tokens from `start` sees (past the context the window
/// slides), and its end.
fn window(cfg: &ModelConfig, start: usize, n: usize) -> (usize, usize) {
    let end = start + n;
    (end.saturating_sub(cfg.context), end)
}

/// Who sees whom in a pass from `start`: causal for GPT-2, block-causal for the DiT; keys
/// counted from `key_offset`.
fn mask_at(cfg: &ModelConfig, start: usize, key_offset: usize, block_size: usize) -> AttentionMask {
    if cfg.architecture == Architecture::Gpt2 {
        AttentionMask::Causal {
            query_offset: start,
            key_offset,
            window: Some(cfg.context),
        }
    } else {
        AttentionMask::BlockCausal {
            block_size,
            query_offset: start,
            key_offset,
            window: Some(cfg.context),
        }
    }
}

/// The embedding and every block of a pass over `tokens` positions per sequence, into
/// `x[layers % 2]`: each group over its cache's window when it has one.
#[allow(clippy::too_many_arguments)]
fn embed_and_blocks<B: Backend>(
    be: &B,
    model: &Transformer,
    params: &B::Buffer,
    mods: Option<&B::Buffer>,
    blk: &mut BlockActivations<B>,
    x: [&mut B::Buffer; 2],
    ids: &B::Ids,
    position_ids: Option<&B::Ids>,
    dy_scratch: &mut B::Buffer,
    groups: &mut [PassGroup<'_, B>],
    tokens: usize,
    block_size: usize,
) -> Result<(), B::Error> {
    let [x_a, x_b] = x;
    let cfg = model.config();
    let batch: usize = groups.iter().map(|g| g.batch).sum();
    model.embed_forward(
        be,
        params,
        ids,
        position_ids,
        batch * tokens,
        x_a,
        dy_scratch,
    )?;
    // Without a cache (one group), keys are the pass's own tokens from position 0 up; GPT-2's
    // window starts where the queries' does.
    let start = groups[0].start;
    let own_keys = window(cfg, start, tokens).0.min(start);
    let own_keys = if cfg.architecture == Architecture::Gpt2 {
        own_keys
    } else {
        0
    };
    let geo = Geometry {
        batch,
        tokens,
        segments: 1,
        position_offset: start,
        mask: mask_at(cfg, start, own_keys, block_size),
    };
    for l in 0..cfg.layers {
        let kv = if groups.iter().all(|g| g.cache.is_some()) {
            KeyValues::Caches(
                groups
                    .iter_mut()
                    .filter_map(|g| {
                        let (window_start, end) = window(cfg, g.start, tokens);
                        let (batch, start) = (g.batch, g.start);
                        g.cache.as_deref_mut().map(|cache| {
                            let first = window_start.max(cache.base);
                            CachedGroup {
                                kv: &mut cache.kv[l],
                                batch,
                                capacity: cache.capacity,
                                write_slot: start - cache.base,
                                first_slot: first - cache.base,
                                kv_len: end - first,
                                position_offset: start,
                                mask: mask_at(cfg, start, first, block_size),
                            }
                        })
                    })
                    .collect(),
            )
        } else {
            KeyValues::OwnTokens
        };
        let (src, dst) = if l % 2 == 0 {
            (&*x_a, &mut *x_b)
        } else {
            (&*x_b, &mut *x_a)
        };
        model.block_forward(be, params, l, blk, mods, src, dst, &geo, kv, None)?;
    }
    Ok(())
}
