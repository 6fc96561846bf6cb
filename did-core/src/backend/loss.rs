//! The token embedding and the softmax cross-entropy loss.

use super::{MemoryOps, RowMajor, Slice, SliceMut};

/// The embedding and the cross-entropy loss.
///
/// ```
/// use did_core::backend::{LossOps, SliceMut, Slice};
/// fn embed<B: LossOps>(be: &B, ids: &B::Ids, table: Slice<'_, B::Buffer>, out: SliceMut<'_, B::Buffer>, rows: usize, d: usize) -> Result<(), B::Error> {
///     be.embedding_forward(ids, table, out, rows, d)
/// }
/// ```
pub trait LossOps: MemoryOps {
    /// `out[i, :] = table[ids[i], :]` for `rows` ids (learned positions use ids `0..T`).
    fn embedding_forward(
        &self,
        ids: &Self::Ids,
        table: Slice<'_, Self::Buffer>,
        out: SliceMut<'_, Self::Buffer>,
        rows: usize,
        channels: usize,
    ) -> Result<(), Self::Error>;
    /// `dtable[ids[i], :] += dout[i, :]`.
    fn embedding_backward(
        &self,
        ids: &Self::Ids,
        dout: Slice<'_, Self::Buffer>,
        dtable: SliceMut<'_, Self::Buffer>,
        rows: usize,
        channels: usize,
    ) -> Result<(), Self::Error>;
    /// Fused weighted softmax cross-entropy, forward and backward in one:
    /// for each row with `weights[r] ≠ 0`, `losses[r] = weights[r] · (−log softmax(logits[r])[targets[r]])`
    /// and `logits[r]` is overwritten by `grad_scale · weights[r] · (softmax − onehot)`;
    /// rows with weight 0 get loss 0 and gradient 0. Weights carry the NELBO
    /// `1/t` and the normalisation; `grad_scale` the loss scaling. The class
    /// `excluded` (SUBS: the model never predicts `[MASK]`) is left out of the
    /// softmax and gets gradient 0. `shape` is `[rows, vocab]` with its row stride (the
    /// padding between rows is neither read nor written).
    #[allow(clippy::too_many_arguments)]
    fn softmax_cross_entropy(
        &self,
        logits: SliceMut<'_, Self::Buffer>,
        targets: &Self::Ids,
        weights: Slice<'_, Self::Buffer>,
        losses: SliceMut<'_, Self::Buffer>,
        shape: RowMajor,
        excluded: Option<u32>,
        grad_scale: f32,
    ) -> Result<(), Self::Error>;
}
