//! Memory: a backend's buffers, transfers between host and device, fills and copies.
//!
//! The base of every other family: it names the buffer, id and error types that their ops take.

use super::{RowGroups, Slice, SliceMut, WeightFormat, WeightMatrix};
use core::fmt;

/// The first token id of `ids` that is not below `rows` (a table's row
/// count), with its index: what a backend reports instead of reading past an
/// embedding table or a vocabulary.
///
/// ```
/// use did_core::backend::first_id_outside;
/// assert_eq!(first_id_outside(&[0, 5, 2, 9], 4), Some((1, 5)));
/// assert_eq!(first_id_outside(&[0, 3], 4), None);
/// ```
pub fn first_id_outside(ids: &[u32], rows: usize) -> Option<(usize, u32)> {
    ids.iter()
        .position(|&id| id as usize >= rows)
        .map(|i| (i, ids[i]))
}

/// Buffers and the moves between them: the base family, which names the types the others take.
///
/// ```
/// use did_core::backend::{MemoryOps, Slice};
/// fn round_trip<B: MemoryOps>(be: &B, host: &[f32]) -> Result<Vec<f32>, B::Error> {
///     let buf = be.upload(host)?;
///     let mut out = vec![0.0; host.len()];
///     be.download(Slice::whole(&buf), &mut out)?;
///     Ok(out)
/// }
/// ```
pub trait MemoryOps {
    /// A device buffer of floats.
    type Buffer;
    /// A device buffer of token ids.
    type Ids;
    /// The backend's error.
    type Error: fmt::Debug + fmt::Display;
    /// A short name for logs ("cpu", "cuda:0 bf16").
    fn name(&self) -> &str;
    /// A buffer of `len` floats, zeroed.
    fn zeros(&self, len: usize) -> Result<Self::Buffer, Self::Error>;
    /// `len` zeros kept in f32 whatever the storage precision: the attention's log-sum-exp,
    /// which scales a whole row of probabilities in the backward (stored in bf16 its rounding,
    /// up to |lse|·2⁻⁹, would scale them by e^{±that}). [`MemoryOps::download`] and
    /// [`MemoryOps::fill`] take it like any buffer; the attention ops take it as `lse`. Provided:
    /// [`MemoryOps::zeros`] (an f32 backend stores everything in f32).
    fn zeros_f32(&self, len: usize) -> Result<Self::Buffer, Self::Error> {
        self.zeros(len)
    }
    /// The row stride this backend's GEMMs read and write fastest for a matrix of `cols`
    /// columns: what the model lays the output head's logits out with ([`RowMajor`]). Provided:
    /// `cols`. A GPU backend rounds it up (cuBLAS reads rows that are not 16-byte aligned with
    /// narrow loads: GPT-2's 50,258 columns in bf16 are 100,516 bytes).
    ///
    /// ```
    /// use did_core::backend::Backend;
    /// fn logits_len<B: Backend>(be: &B, rows: usize, vocab: usize) -> usize {
    ///     rows * be.padded_row_stride(vocab)
    /// }
    /// ```
    fn padded_row_stride(&self, cols: usize) -> usize {
        cols
    }
    /// A buffer holding `host`.
    fn upload(&self, host: &[f32]) -> Result<Self::Buffer, Self::Error>;
    /// Whether this backend stores buffers below f32 (bf16): then an optimizer keeps its master
    /// weights, moments and EMA in f32 buffers ([`MemoryOps::upload_f32`]) and the model reads
    /// copies rounded to the storage ([`MemoryOps::round_into`]), since an update smaller than
    /// half a bf16 step of its weight (2⁻⁹ relative: an AdamW step of 3e-4 on a LayerNorm
    /// weight of 1, or any EMA update at decay 0.9999) would round back to the old value.
    /// Provided: `false`. A backend that says `true` overrides [`OptimizerOps::optimizer_step`](crate::backend::OptimizerOps::optimizer_step) (as
    /// the CUDA backend does) or has [`OptimizerOps::scale`](crate::backend::OptimizerOps::scale), [`OptimizerOps::adamw`](crate::backend::OptimizerOps::adamw) and
    /// [`OptimizerOps::ema_update`](crate::backend::OptimizerOps::ema_update) take those f32 buffers, which the provided update passes them.
    ///
    /// ```
    /// use did_core::backend::Backend;
    /// fn optimizer_bytes<B: Backend>(be: &B, params: usize) -> usize {
    ///     // master, m, v in f32, plus the rounded copy where storage is below f32
    ///     params * (12 + if be.stores_below_f32() { 2 } else { 0 })
    /// }
    /// ```
    fn stores_below_f32(&self) -> bool {
        false
    }
    /// A buffer holding the parameters `host` for inference, with the weight `matrices` (from
    /// [`Transformer::weight_matrices`](crate::model::Transformer::weight_matrices)) stored in
    /// `format` and everything else as [`MemoryOps::upload`] stores it. The model reads it like
    /// any parameter buffer; the linear forwards and the embedding read the matrices as stored.
    /// An error where the backend does not store `format` (it names the formats it does).
    ///
    /// ```
    /// use did_core::backend::{MemoryOps, WeightFormat};
    /// use did_core::model::{Architecture, ModelConfig, Transformer};
    /// fn upload_int8<B: MemoryOps>(be: &B, model: &Transformer, host: &[f32]) -> Result<B::Buffer, B::Error> {
    ///     be.upload_weights(host, &model.weight_matrices(), WeightFormat::Int8)
    /// }
    /// ```
    fn upload_weights(
        &self,
        host: &[f32],
        matrices: &[WeightMatrix],
        format: WeightFormat,
    ) -> Result<Self::Buffer, Self::Error>;
    /// A buffer holding `host` in f32 whatever the storage precision, like
    /// [`MemoryOps::zeros_f32`]: master weights, AdamW moments and the EMA
    /// ([`OptimizerOps::optimizer_step`](crate::backend::OptimizerOps::optimizer_step)). Provided: [`MemoryOps::upload`].
    fn upload_f32(&self, host: &[f32]) -> Result<Self::Buffer, Self::Error> {
        self.upload(host)
    }
    /// Writes `len` f32 values of `src` (from [`MemoryOps::upload_f32`] or
    /// [`MemoryOps::zeros_f32`]) into `dst` in the storage precision, rounded to nearest even.
    /// Provided: [`MemoryOps::copy`] (storage is f32).
    fn round_into(
        &self,
        src: Slice<'_, Self::Buffer>,
        dst: SliceMut<'_, Self::Buffer>,
        len: usize,
    ) -> Result<(), Self::Error> {
        self.copy(src, dst, len)
    }
    /// Copies `out.len()` elements starting at `src.offset` to the host.
    fn download(&self, src: Slice<'_, Self::Buffer>, out: &mut [f32]) -> Result<(), Self::Error>;
    /// Token ids on the device.
    fn upload_ids(&self, host: &[u32]) -> Result<Self::Ids, Self::Error>;
    /// Sets `len` elements to `value`.
    fn fill(
        &self,
        dst: SliceMut<'_, Self::Buffer>,
        len: usize,
        value: f32,
    ) -> Result<(), Self::Error>;
    /// Copies `len` elements.
    fn copy(
        &self,
        src: Slice<'_, Self::Buffer>,
        dst: SliceMut<'_, Self::Buffer>,
        len: usize,
    ) -> Result<(), Self::Error>;
    /// Copies `rows` rows of `cols` elements between row strides `src_stride`
    /// and `dst_stride` (gathering keys into a cache, one half of the 2L stream).
    #[allow(clippy::too_many_arguments)]
    fn copy_rows(
        &self,
        src: Slice<'_, Self::Buffer>,
        src_stride: usize,
        dst: SliceMut<'_, Self::Buffer>,
        dst_stride: usize,
        rows: usize,
        cols: usize,
    ) -> Result<(), Self::Error> {
        let SliceMut { buf, offset } = dst;
        for r in 0..rows {
            self.copy(
                Slice::at(src.buf, src.offset + r * src_stride),
                SliceMut::at(&mut *buf, offset + r * dst_stride),
                cols,
            )?;
        }
        Ok(())
    }
    /// Copies groups of strided rows ([`RowGroups`]): one call for what would
    /// be `groups` calls of [`MemoryOps::copy_rows`] (a GPU backend launches once).
    fn copy_row_groups(
        &self,
        src: Slice<'_, Self::Buffer>,
        dst: SliceMut<'_, Self::Buffer>,
        layout: &RowGroups,
    ) -> Result<(), Self::Error> {
        let SliceMut { buf, offset } = dst;
        for g in 0..layout.groups {
            self.copy_rows(
                Slice::at(src.buf, src.offset + g * layout.src_group_stride),
                layout.src_stride,
                SliceMut::at(&mut *buf, offset + g * layout.dst_group_stride),
                layout.dst_stride,
                layout.rows,
                layout.cols,
            )?;
        }
        Ok(())
    }
    /// Writes `host` into `ids`, keeping its device address where it fits, so that a
    /// [recording](crate::backend::RecordingOps::begin_recording) that reads `ids` reads the new ones when replayed.
    /// Provided: a fresh upload (a new address; such a backend does not record).
    fn upload_ids_into(&self, host: &[u32], ids: &mut Self::Ids) -> Result<(), Self::Error> {
        *ids = self.upload_ids(host)?;
        Ok(())
    }
    /// Waits for queued work (a no-op on synchronous backends).
    fn synchronize(&self) -> Result<(), Self::Error> {
        Ok(())
    }
}
