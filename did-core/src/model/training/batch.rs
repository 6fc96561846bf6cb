//! The training passes and the batches they consume: which tokens go in,
//! which mask they see, and which rows get which loss weight.

use alloc::vec;
use alloc::vec::Vec;

use crate::error::invalid;
use crate::mask::AttentionMask;
use crate::noise::mask_tokens;
use crate::rng::{Purpose, RngStream};
use crate::schedule::{stratified_times, TrainingSchedule};
use crate::Error;

/// How a training sequence of length `L` is fed to the model.
///
/// ```
/// use did_core::model::Pass;
/// let bd3 = Pass::diffusion(4, 1024);
/// assert_eq!(bd3.tokens_per_sequence(1024), 2048); // x_t ⊕ x_0
/// assert_eq!(Pass::diffusion(1024, 1024), Pass::Full); // MDLM: one block
/// assert!(bd3.mask(1024)?.allows(4, 1024)); // noisy block 1 sees clean block 0
/// # Ok::<(), did_core::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// BD3-LM's vectorised pass over `x_t ⊕ x_0` (2L tokens, the training
    /// mask, both halves at RoPE positions `0..L`, logits for the `x_t` half).
    Bd3 {
        /// `L'`.
        block_size: usize,
    },
    /// `L` tokens, full attention (MDLM, block size = L).
    Full,
    /// `L` tokens, causal attention, targets shifted by one (AR).
    Causal,
}

impl Pass {
    /// Tokens the model sees per sequence.
    pub fn tokens_per_sequence(self, seq_len: usize) -> usize {
        match self {
            Pass::Bd3 { .. } => 2 * seq_len,
            Pass::Full | Pass::Causal => seq_len,
        }
    }

    /// The attention mask over those tokens.
    pub fn mask(self, seq_len: usize) -> Result<AttentionMask, Error> {
        match self {
            Pass::Bd3 { block_size } => AttentionMask::bd3_training(seq_len, block_size),
            Pass::Full => Ok(AttentionMask::Full),
            Pass::Causal => Ok(AttentionMask::causal()),
        }
    }

    /// Stretches of consecutive tokens that start at position 0 (RoPE and learned positions):
    /// the two halves of the BD3 stream, or the one sequence.
    pub fn position_segments(self) -> usize {
        match self {
            Pass::Bd3 { .. } => 2,
            Pass::Full | Pass::Causal => 1,
        }
    }

    /// The pass for a diffusion block size: vectorised BD3 below `L`, plain full attention at `L`.
    pub fn diffusion(block_size: usize, seq_len: usize) -> Pass {
        if block_size >= seq_len {
            Pass::Full
        } else {
            Pass::Bd3 { block_size }
        }
    }
}

/// One micro-batch, on the host: the model input, the target and weight of every output row.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainBatch {
    /// Sequences.
    pub batch: usize,
    /// `L`.
    pub seq_len: usize,
    /// The pass.
    pub pass: Pass,
    /// Model input `[batch, tokens_per_sequence]`.
    pub inputs: Vec<u32>,
    /// Target per output row `[batch, L]`.
    pub targets: Vec<u32>,
    /// Loss weight per output row: the NELBO weight over the token count, 0 where nothing is predicted.
    pub weights: Vec<f32>,
    /// Masked tokens (diffusion) or predicted tokens (AR).
    pub predicted: usize,
}

/// A diffusion batch from clean sequences `x0` `[batch, L]`: per-block
/// stratified times, masking with position 0 pinned, and weights
/// `w(t_b) / (batch·L)` on masked rows (docs/bd3lm.md §1.4–§1.7). `step` selects
/// the random streams (the optimizer step × accumulation + micro-step).
///
/// ```
/// use did_core::model::{diffusion_batch, Pass};
/// use did_core::schedule::TrainingSchedule;
/// let x0: Vec<u32> = (0..16).collect();
/// let b = diffusion_batch(&x0, 2, 8, 4, &TrainingSchedule::default(), 99, 7, 0)?;
/// assert_eq!(b.pass, Pass::Bd3 { block_size: 4 });
/// assert_eq!(b.inputs.len(), 2 * 16);            // x_t ⊕ x_0 per sequence
/// assert_eq!(&b.inputs[8..16], &x0[..8]);        // the clean half
/// for (s, p) in (0..2).flat_map(|s| (0..8).map(move |p| (s, p))) {
///     // Exactly the masked positions of the x_t half carry a loss weight.
///     assert_eq!(b.weights[s * 8 + p] > 0.0, b.inputs[s * 16 + p] == 99);
/// }
/// # Ok::<(), did_core::Error>(())
/// ```
#[allow(clippy::too_many_arguments)]
pub fn diffusion_batch(
    x0: &[u32],
    batch: usize,
    seq_len: usize,
    block_size: usize,
    schedule: &TrainingSchedule,
    mask_id: u32,
    seed: u64,
    step: u32,
) -> Result<TrainBatch, Error> {
    if batch == 0 || seq_len == 0 || x0.len() != batch * seq_len {
        return Err(invalid(
            "training batch",
            "x0 must hold batch × seq_len tokens, batch ≥ 1",
        ));
    }
    if block_size == 0 || seq_len % block_size != 0 {
        return Err(invalid(
            "block size",
            alloc::format!("block size {block_size} must divide the sequence length {seq_len}"),
        ));
    }
    let blocks = seq_len / block_size;
    let mut times = vec![0.0; batch * blocks];
    stratified_times(
        &RngStream::new(seed, Purpose::Time, 0, step),
        batch,
        blocks,
        schedule.clip,
        &mut times,
    );
    let mut xt = vec![0; x0.len()];
    let predicted = mask_tokens(
        x0,
        seq_len,
        block_size,
        &times,
        schedule,
        &|_, pos| pos == 0,
        &RngStream::new(seed, Purpose::Noise, 0, step),
        mask_id,
        &mut xt,
    )?;
    let norm = (batch * seq_len) as f64;
    let weights = (0..batch * seq_len)
        .map(|i| {
            if xt[i] == mask_id {
                let t = times[(i / seq_len) * blocks + (i % seq_len) / block_size];
                (schedule.loss_weight(t) / norm) as f32
            } else {
                0.0
            }
        })
        .collect();
    let pass = Pass::diffusion(block_size, seq_len);
    let inputs = match pass {
        Pass::Bd3 { .. } => {
            let mut v = Vec::with_capacity(2 * x0.len());
            for (t, c) in xt.chunks(seq_len).zip(x0.chunks(seq_len)) {
                v.extend_from_slice(t);
                v.extend_from_slice(c);
            }
            v
        }
        _ => xt,
    };
    Ok(TrainBatch {
        batch,
        seq_len,
        pass,
        inputs,
        targets: x0.to_vec(),
        weights,
        predicted,
    })
}

/// An AR batch: row `i` predicts token `i + 1`; the last row of each sequence predicts nothing.
/// Weights `1 / (batch·(L − 1))`.
///
/// ```
/// let b = did_core::model::causal_batch(&[5, 6, 7, 8], 1, 4)?;
/// assert_eq!(&b.targets[..3], &[6, 7, 8]);
/// assert_eq!(b.weights[3], 0.0);
/// # Ok::<(), did_core::Error>(())
/// ```
pub fn causal_batch(x: &[u32], batch: usize, seq_len: usize) -> Result<TrainBatch, Error> {
    if batch == 0 || seq_len < 2 || x.len() != batch * seq_len {
        return Err(invalid(
            "training batch",
            "x must hold batch × seq_len tokens with seq_len ≥ 2",
        ));
    }
    let w = 1.0 / (batch * (seq_len - 1)) as f32;
    let mut targets = vec![0; x.len()];
    let mut weights = vec![0.0; x.len()];
    for i in 0..x.len() {
        if (i + 1) % seq_len != 0 {
            targets[i] = x[i + 1];
            weights[i] = w;
        }
    }
    Ok(TrainBatch {
        batch,
        seq_len,
        pass: Pass::Causal,
        inputs: x.to_vec(),
        targets,
        weights,
        predicted: batch * (seq_len - 1),
    })
}
