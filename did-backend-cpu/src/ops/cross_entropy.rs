//! Fused weighted softmax cross-entropy: the loss and its gradient in one pass
//! over each logits row, written in place of the logits.

use did_core::backend::RowMajor;
use rayon::prelude::*;

use crate::CpuFloat;

/// See [`did_core::backend::LossOps::softmax_cross_entropy`].
pub fn softmax_cross_entropy<T: CpuFloat>(
    logits: &mut [T],
    targets: &[u32],
    weights: &[T],
    losses: &mut [T],
    shape: RowMajor,
    excluded: Option<u32>,
    grad_scale: T,
) {
    let (vocab, stride) = (shape.cols, shape.stride);
    if vocab == 0 {
        return;
    }
    let excluded = excluded.map(|e| e as usize).filter(|&e| e < vocab);
    logits
        .par_chunks_mut(stride.max(vocab))
        .zip(losses.par_iter_mut())
        .enumerate()
        .for_each(|(r, (row, loss))| {
            // The padding after the row's values is left alone.
            let row = &mut row[..vocab];
            let w = weights[r];
            if w == T::zero() {
                row.fill(T::zero());
                *loss = T::zero();
                return;
            }
            if let Some(e) = excluded {
                row[e] = T::neg_infinity();
            }
            let m = row.iter().copied().fold(T::neg_infinity(), T::max);
            let mut sum = T::zero();
            for x in row.iter_mut() {
                *x = (*x - m).exp();
                sum += *x;
            }
            let target = targets[r] as usize;
            let p_target = row[target] / sum;
            // −log p, from the max-shifted logit for accuracy: log(sum) − (z_t − m).
            *loss = w * (sum.ln() - (p_target * sum).ln());
            let g = grad_scale * w / sum;
            for x in row.iter_mut() {
                *x *= g;
            }
            row[target] -= grad_scale * w;
        });
}
