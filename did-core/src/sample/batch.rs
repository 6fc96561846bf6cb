//! The batch being generated: tokens, snapshot confidences, what is pinned,
//! where each sequence ends, and the per-sequence RNG step counters.

use alloc::vec::Vec;
use core::ops::Range;

use crate::denoiser::{DenoiseRequest, OutputPosition};
use crate::sample::categorical::Confidence;

/// A batch of sequences of one length, being generated.
///
/// ```
/// use did_core::sample::SequenceBatch;
/// let mut b = SequenceBatch::from_prompts(&[&[50256], &[50256, 11]], 4, 50257, 0);
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
    /// Per sequence: its id in the RNG streams.
    pub sample_ids: Vec<u32>,
    /// Per sequence: how many within-block updates it has taken part in (the RNG step).
    pub steps: Vec<u32>,
}

impl SequenceBatch {
    /// Sequences of `seq_len` positions, each starting with its prompt
    /// (pinned) and masked elsewhere. Sample ids count up from `first_sample`.
    pub fn from_prompts(
        prompts: &[&[u32]],
        seq_len: usize,
        mask_id: u32,
        first_sample: u32,
    ) -> Self {
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
            sample_ids: (0..batch as u32)
                .map(|i| first_sample.wrapping_add(i))
                .collect(),
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
