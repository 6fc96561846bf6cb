//! The batch being generated: tokens, snapshot confidences, what is pinned,
//! where each sequence ends, and each sequence's name in the random streams
//! ([`SequenceId`]) with its step counter.

use alloc::vec::Vec;
use core::ops::Range;

use crate::denoiser::{DenoiseRequest, OutputPosition};
use crate::rng::{Purpose, RngStream};
use crate::sample::categorical::Confidence;

/// A sequence's name in the random streams: every draw made for it is addressed by its seed and
/// sample number, never by its place in a batch, so it draws the same tokens in any batch
/// (docs/design.md). `did sample --seed S` names its samples `(S, 0)`, `(S, 1)`, …; a server
/// gives each request its own seed.
///
/// ```
/// use did_core::sample::SequenceId;
/// assert_eq!(SequenceId::numbered(7, 2, 3), [
///     SequenceId { seed: 7, sample: 2 },
///     SequenceId { seed: 7, sample: 3 },
///     SequenceId { seed: 7, sample: 4 },
/// ]);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SequenceId {
    /// The seed of its streams.
    pub seed: u64,
    /// Its sample number under that seed (below 2^24).
    pub sample: u32,
}

impl SequenceId {
    /// `n` samples of `seed` from `first` on.
    pub fn numbered(seed: u64, first: u32, n: usize) -> Vec<SequenceId> {
        (0..n as u32)
            .map(|i| SequenceId {
                seed,
                sample: first.wrapping_add(i),
            })
            .collect()
    }
}

/// A batch of sequences of one length, being generated.
///
/// ```
/// use did_core::sample::SequenceBatch;
/// use did_core::sample::SequenceId;
/// let ids = SequenceId::numbered(1, 0, 2);
/// let mut b = SequenceBatch::from_prompts(&[&[50256], &[50256, 11]], 4, 50257, &ids);
/// assert_eq!(b.tokens, [50256, 50257, 50257, 50257, 50256, 11, 50257, 50257]);
/// assert!(!b.eligible(1, 1) && b.eligible(1, 2)); // prompts are pinned
/// b.tokens[2] = 50256;
/// assert!(b.end_at_eos(0, 1, 50256));
/// assert_eq!(b.sequence(0), [50256, 50257, 50256]);
/// ```
///
/// Invariants the samplers keep: a position that is not masked never changes
/// within a stage (SUBS carry-over); pinned positions (prompt, BOS) and
/// positions at or past a sequence's `length` are never masked or drawn.
#[derive(Debug, Clone, PartialEq)]
pub struct SequenceBatch {
    seq_len: usize,
    mask_id: u32,
    /// `[batch, seq_len]` token ids; masked positions hold the mask id.
    pub tokens: Vec<u32>,
    /// `[batch, seq_len]` snapshot confidences, recorded when each token was drawn.
    pub confidence: Vec<Confidence>,
    /// `[batch, seq_len]`: the token was given (prompt, BOS), not drawn.
    pub pinned: Vec<bool>,
    /// Per sequence: positions `≥ length` are padding after an end-of-sequence token.
    pub lengths: Vec<usize>,
    /// Per sequence: its name in the random streams.
    pub ids: Vec<SequenceId>,
    /// Per sequence: how many within-block updates it has taken part in (the RNG step).
    pub steps: Vec<u32>,
}

impl SequenceBatch {
    /// Sequences of `seq_len` positions, each starting with its prompt
    /// (pinned) and masked elsewhere; sequence `s` draws as `ids[s]` (as many ids as prompts).
    pub fn from_prompts(
        prompts: &[&[u32]],
        seq_len: usize,
        mask_id: u32,
        ids: &[SequenceId],
    ) -> Self {
        debug_assert_eq!(ids.len(), prompts.len());
        let batch = prompts.len();
        let mut tokens = alloc::vec![mask_id; batch * seq_len];
        let mut pinned = alloc::vec![false; batch * seq_len];
        let mut confidence =
            alloc::vec![Confidence { nucleus: 0.0, raw: 0.0, max: 0.0 }; batch * seq_len];
        for (s, prompt) in prompts.iter().enumerate() {
            for (i, &t) in prompt.iter().take(seq_len).enumerate() {
                tokens[s * seq_len + i] = t;
                pinned[s * seq_len + i] = true;
                confidence[s * seq_len + i] = Confidence::PINNED;
            }
        }
        SequenceBatch {
            seq_len,
            mask_id,
            tokens,
            confidence,
            pinned,
            lengths: alloc::vec![seq_len; batch],
            ids: ids.to_vec(),
            steps: alloc::vec![0; batch],
        }
    }

    /// How many sequences.
    pub fn batch(&self) -> usize {
        self.lengths.len()
    }

    /// Their length.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// The mask id.
    pub fn mask_id(&self) -> u32 {
        self.mask_id
    }

    /// The tokens of sequence `seq` up to its length.
    pub fn sequence(&self, seq: usize) -> &[u32] {
        &self.tokens[seq * self.seq_len..seq * self.seq_len + self.lengths[seq]]
    }

    /// Whether sequence `seq` may be remasked at `pos`: drawn, not pinned, before its end.
    pub fn eligible(&self, seq: usize, pos: usize) -> bool {
        pos < self.lengths[seq] && !self.pinned[seq * self.seq_len + pos]
    }

    /// The masked positions of sequence `seq` inside `range`.
    pub fn masked_in(&self, seq: usize, range: Range<usize>) -> impl Iterator<Item = usize> + '_ {
        let base = seq * self.seq_len;
        range.filter(move |&p| self.tokens[base + p] == self.mask_id)
    }

    /// Whether any sequence has a masked position in `range`.
    pub fn any_masked_in(&self, range: Range<usize>) -> bool {
        (0..self.batch()).any(|s| self.masked_in(s, range.clone()).next().is_some())
    }

    /// A denoiser request over this batch: attention block size `block_size`,
    /// queries for `block`, logits wanted at `outputs`.
    pub fn request<'a>(
        &'a self,
        block_size: usize,
        block: Range<usize>,
        outputs: &'a [OutputPosition],
    ) -> DenoiseRequest<'a> {
        DenoiseRequest {
            tokens: &self.tokens,
            batch: self.batch(),
            seq_len: self.seq_len,
            block_size,
            block,
            outputs,
        }
    }

    /// Sequence `seq`'s stream for `purpose` at `step`.
    pub fn stream(&self, seq: usize, purpose: Purpose, step: u32) -> RngStream {
        let id = self.ids[seq];
        RngStream::new(id.seed, purpose, id.sample, step)
    }

    /// Masks `pos` of sequence `seq` (remasking).
    pub fn remask(&mut self, seq: usize, pos: usize) {
        self.tokens[seq * self.seq_len + pos] = self.mask_id;
    }

    /// Ends sequence `seq` at its first `eos` drawn at a position `≥ from`:
    /// its length becomes that position + 1, and later positions are filled
    /// with `eos` (padding, never drawn or remasked). Returns whether it ended.
    pub fn end_at_eos(&mut self, seq: usize, from: usize, eos: u32) -> bool {
        let base = seq * self.seq_len;
        let end = self.lengths[seq];
        let found = (from..end).find(|&p| self.tokens[base + p] == eos && !self.pinned[base + p]);
        match found {
            Some(p) => {
                for q in p + 1..self.seq_len {
                    self.tokens[base + q] = eos;
                    self.confidence[base + q] = Confidence::PINNED;
                }
                self.lengths[seq] = p + 1;
                true
            }
            None => false,
        }
    }
}
