//! # did-backend-cpu
//!
//! The reference backend: every [`Backend`] op on the CPU, in f32 (the
//! product) or f64 (the oracle of the gradient checks). Matmuls go through one
//! strided-batched GEMM helper over matrixmultiply (AVX-512 kernels on, its
//! own thread pool); row-wise ops and attention run on rayon. Every reduction
//! is split into fixed chunks summed in a fixed order, so results do not
//! depend on the thread count; matrixmultiply splits work by output tiles, so
//! its results do not either.
//!
//! One module per op family under [`ops`], each with its forward and backward
//! side by side.
//!
//! Training a model and sampling from it with draft → snapshot remask →
//! refine (the model code is did-core's, written once over the trait):
//!
//! ```
//! use did_backend_cpu::CpuBackend;
//! use did_core::model::{diffusion_batch, Architecture, DiffusionDenoiser, ModelConfig, Trainer, TrainerConfig, Transformer};
//! use did_core::refine::{generate, GenerateConfig, StagePlan};
//! use did_core::schedule::TrainingSchedule;
//!
//! let config = ModelConfig { vocab_size: 12, mask_id: 11, layers: 2, hidden: 32, heads: 2, mlp_hidden: 64,
//!     context: 16, ..ModelConfig::preset("tiny", Architecture::Dit)? };
//! let model = Transformer::new(config)?;
//! let be = CpuBackend::new();
//! let mut trainer = Trainer::new(&be, &model, TrainerConfig::default(), &model.table().initial_values(1), 1)?;
//! let x0: Vec<u32> = (0..2 * 16).map(|i| (i % 10) as u32).collect();
//! let batch = diffusion_batch(&x0, 2, 16, 4, &TrainingSchedule::default(), 11, 1, 0)?;
//! let report = trainer.step(&be, &model, &[batch])?;
//! assert!(report.loss > 0.0 && report.grad_norm > 0.0);
//!
//! let plan: StagePlan = "4,L:0.25".parse()?;
//! let mut denoiser = DiffusionDenoiser::new(&be, &model, trainer.eval_params(), true)?;
//! let g = generate(&mut denoiser, &GenerateConfig::new(plan.resolve(16)?, 7), &[&[10]])?;
//! assert!(g.batch.tokens.iter().all(|&t| t != 11)); // nothing left masked
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! ```
//! use did_backend_cpu::CpuBackend;
//! use did_core::backend::prelude::*;
//! use did_core::backend::{Gemm, Slice, SliceMut};
//! let cpu = CpuBackend::<f32>::new();
//! let x = cpu.upload(&[1.0, 2.0, 3.0, 4.0])?; // [2, 2]
//! let w = cpu.upload(&[1.0, 0.0, 0.0, 1.0])?; // identity, [out, in]
//! let mut y = cpu.zeros(4)?;
//! cpu.matmul(&Gemm::linear(2, 2, 2), Slice::whole(&x), Slice::whole(&w), SliceMut::whole(&mut y))?;
//! let mut host = [0.0; 4];
//! cpu.download(Slice::whole(&y), &mut host)?;
//! assert_eq!(host, [1.0, 2.0, 3.0, 4.0]);
//! # Ok::<(), did_backend_cpu::CpuError>(())
//! ```

#![deny(missing_docs)]

use core::marker::PhantomData;
use std::sync::atomic::{AtomicUsize, Ordering};

use did_core::backend::prelude::*;
use did_core::backend::{
    AdamW, AttentionShape, Gemm, NormShape, QkvOffsets, RopeShape, RowMajor, Slice, SliceMut,
    WeightFormat, WeightMatrix,
};
use did_core::mask::AttentionMask;
use did_core::rng::RngStream;
use did_core::sample::categorical::SampledToken;
use did_core::sample::nucleus::Nucleus;
use did_core::sample::DrawSpec;

mod buffer;
mod float;
pub mod ops;

pub use buffer::CpuBuffer;
pub use float::CpuFloat;

/// Why a CPU op refused to run. These are programming errors of the caller
/// (shapes that do not fit the buffers), reported instead of panicking.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CpuError {
    /// A view reaches past the end of its buffer.
    #[error("cpu backend: {what} needs elements {start}..{end} but the buffer holds {len}")]
    OutOfBounds {
        /// Which operand.
        what: &'static str,
        /// First element.
        start: usize,
        /// One past the last element.
        end: usize,
        /// The buffer's length.
        len: usize,
    },
    /// Shapes that do not agree.
    #[error("cpu backend: {0}")]
    Shape(String),
    /// An op that reads a weight matrix as floats, where the buffer stores it below f32.
    #[error("cpu backend: {what} reads the {rows}×{cols} weight matrix at element {offset} as f32, but it is stored in {format}; only linear forwards and the embedding read stored weights (upload the parameters with WeightFormat::F32 to train or export them)")]
    Stored {
        /// Which operand.
        what: &'static str,
        /// The matrix's format.
        format: did_core::backend::WeightFormat,
        /// Its first element.
        offset: usize,
        /// Its rows.
        rows: usize,
        /// Its columns.
        cols: usize,
    },
    /// A token id outside the table.
    #[error("cpu backend: token id {id} at row {row} is outside the table of {rows} rows")]
    TokenOutOfRange {
        /// The id.
        id: u32,
        /// Where it was.
        row: usize,
        /// Rows of the table.
        rows: usize,
    },
}

/// The CPU backend, computing in `T` (f32 by default).
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuBackend<T: CpuFloat = f32> {
    row_alignment: usize,
    /// Claims to record ops and never does ([`CpuBackend::with_failed_recordings`]).
    failed_recordings: bool,
    /// Counts [`RecordingOps::recording_failed`](did_core::backend::RecordingOps::recording_failed) calls ([`CpuBackend::counting_failed_recordings`]).
    failed_recording_reports: Option<&'static AtomicUsize>,
    /// The model reads weights rounded to bf16 ([`CpuBackend::with_bf16_weights`]).
    bf16_weights: bool,
    _t: PhantomData<T>,
}

impl CpuBackend<f32> {
    /// The f32 backend. The thread count is rayon's (`RAYON_NUM_THREADS`)
    /// for row-wise ops and attention, and matrixmultiply's
    /// (`MATMUL_NUM_THREADS`, at most 4) inside large GEMMs.
    pub const fn new() -> Self {
        Self::with_float()
    }
}

impl<T: CpuFloat> CpuBackend<T> {
    /// The backend computing in `T` (`CpuBackend::<f64>::with_float()` for gradient checks).
    pub const fn with_float() -> Self {
        CpuBackend {
            row_alignment: 1,
            failed_recordings: false,
            failed_recording_reports: None,
            bf16_weights: false,
            _t: PhantomData,
        }
    }

    /// The same backend asking for rows padded to a multiple of `elements`
    /// ([`MemoryOps::padded_row_stride`](did_core::backend::MemoryOps::padded_row_stride)), as a GPU backend does: the CPU's GEMMs gain nothing
    /// from it, but a model's padded logits can then be checked on the CPU against dense ones.
    ///
    /// ```
    /// use did_backend_cpu::CpuBackend;
    /// use did_core::backend::prelude::*;
    /// assert_eq!(CpuBackend::new().padded_row_stride(50_258), 50_258);
    /// assert_eq!(CpuBackend::new().with_row_alignment(64).padded_row_stride(50_258), 50_304);
    /// ```
    pub const fn with_row_alignment(mut self, elements: usize) -> Self {
        self.row_alignment = elements;
        self
    }

    /// The same backend claiming it can record ops ([`RecordingOps::can_record`](did_core::backend::RecordingOps::can_record)) but never
    /// recording (ops run at once, and [`RecordingOps::end_recording`](did_core::backend::RecordingOps::end_recording) gives `None`): what a GPU
    /// backend does when a capture fails, so a sampler's fallback can be checked on the CPU.
    ///
    /// ```
    /// use did_backend_cpu::CpuBackend;
    /// use did_core::backend::prelude::*;
    /// let be = CpuBackend::new().with_failed_recordings();
    /// assert!(be.can_record() && !CpuBackend::new().can_record());
    /// be.begin_recording()?;
    /// assert_eq!(be.end_recording()?, None);
    /// # Ok::<(), did_backend_cpu::CpuError>(())
    /// ```
    pub const fn with_failed_recordings(mut self) -> Self {
        self.failed_recordings = true;
        self
    }

    /// The same backend adding one to `reports` each time it is told a pass could not be
    /// recorded ([`RecordingOps::recording_failed`](did_core::backend::RecordingOps::recording_failed)), so a test can see that a sampler says so.
    ///
    /// ```
    /// use std::sync::atomic::{AtomicUsize, Ordering};
    /// use did_backend_cpu::CpuBackend;
    /// use did_core::backend::prelude::*;
    /// static REPORTS: AtomicUsize = AtomicUsize::new(0);
    /// let be = CpuBackend::new().with_failed_recordings().counting_failed_recordings(&REPORTS);
    /// be.recording_failed(None);
    /// assert_eq!(REPORTS.load(Ordering::Relaxed), 1);
    /// ```
    pub const fn counting_failed_recordings(mut self, reports: &'static AtomicUsize) -> Self {
        self.failed_recording_reports = Some(reports);
        self
    }

    /// The same backend saying it stores below f32 ([`MemoryOps::stores_below_f32`](did_core::backend::MemoryOps::stores_below_f32)) and
    /// rounding to bf16 what [`MemoryOps::round_into`](did_core::backend::MemoryOps::round_into) writes, while every buffer stays in `T`:
    /// a trainer then keeps f32 master weights and gives the model bf16-valued copies, as on a
    /// bf16 GPU, so that layout can be checked on the CPU.
    ///
    /// ```
    /// use did_backend_cpu::CpuBackend;
    /// use did_core::backend::prelude::*;
    /// use did_core::backend::{Slice, SliceMut};
    /// let be = CpuBackend::new().with_bf16_weights();
    /// assert!(be.stores_below_f32() && !CpuBackend::new().stores_below_f32());
    /// let master = be.upload_f32(&[1.0 + 1.0 / 512.0, 0.1])?;
    /// let mut rounded = be.zeros(2)?;
    /// be.round_into(Slice::whole(&master), SliceMut::whole(&mut rounded), 2)?;
    /// assert_eq!(rounded, [1.0, 0.10009765625]); // bf16 keeps 8 significant bits
    /// # Ok::<(), did_backend_cpu::CpuError>(())
    /// ```
    pub const fn with_bf16_weights(mut self) -> Self {
        self.bf16_weights = true;
        self
    }
}

/// Refuses a float view of elements a stored weight matrix holds (their values are not there).
fn check_not_stored<T>(
    buf: &CpuBuffer<T>,
    start: usize,
    end: usize,
    what: &'static str,
) -> Result<(), CpuError> {
    match buf
        .stored()
        .and_then(|s| s.overlapping(start, end).map(|m| (s.format, m)))
    {
        Some((format, m)) => Err(CpuError::Stored {
            what,
            format,
            offset: m.offset,
            rows: m.rows,
            cols: m.cols,
        }),
        None => Ok(()),
    }
}

pub(crate) fn view<'a, T>(
    s: Slice<'a, CpuBuffer<T>>,
    len: usize,
    what: &'static str,
) -> Result<&'a [T], CpuError> {
    let end = s.offset.checked_add(len).ok_or(CpuError::OutOfBounds {
        what,
        start: s.offset,
        end: usize::MAX,
        len: s.buf.len(),
    })?;
    check_not_stored(s.buf, s.offset, end, what)?;
    s.buf.get(s.offset..end).ok_or(CpuError::OutOfBounds {
        what,
        start: s.offset,
        end,
        len: s.buf.len(),
    })
}

pub(crate) fn view_mut<'a, T>(
    s: SliceMut<'a, CpuBuffer<T>>,
    len: usize,
    what: &'static str,
) -> Result<&'a mut [T], CpuError> {
    let buf_len = s.buf.len();
    let end = s.offset.checked_add(len).ok_or(CpuError::OutOfBounds {
        what,
        start: s.offset,
        end: usize::MAX,
        len: buf_len,
    })?;
    check_not_stored(s.buf, s.offset, end, what)?;
    s.buf.get_mut(s.offset..end).ok_or(CpuError::OutOfBounds {
        what,
        start: s.offset,
        end,
        len: buf_len,
    })
}

fn ids_view<'a>(ids: &'a [u32], rows: usize, what: &'static str) -> Result<&'a [u32], CpuError> {
    ids.get(..rows).ok_or(CpuError::OutOfBounds {
        what,
        start: 0,
        end: rows,
        len: ids.len(),
    })
}

fn check_ids(ids: &[u32], table_rows: usize) -> Result<(), CpuError> {
    match did_core::backend::first_id_outside(ids, table_rows) {
        Some((row, id)) => Err(CpuError::TokenOutOfRange {
            id,
            row,
            rows: table_rows,
        }),
        None => Ok(()),
    }
}

impl<T: CpuFloat> MemoryOps for CpuBackend<T> {
    type Buffer = CpuBuffer<T>;
    type Ids = Vec<u32>;
    type Error = CpuError;
    fn name(&self) -> &str {
        if T::NAME == "f32" {
            "cpu"
        } else {
            "cpu f64"
        }
    }
    fn zeros(&self, len: usize) -> Result<CpuBuffer<T>, CpuError> {
        Ok(vec![T::zero(); len].into())
    }
    fn upload(&self, host: &[f32]) -> Result<CpuBuffer<T>, CpuError> {
        Ok(host
            .iter()
            .map(|&x| T::of_f32(x))
            .collect::<Vec<T>>()
            .into())
    }
    fn upload_weights(
        &self,
        host: &[f32],
        matrices: &[WeightMatrix],
        format: WeightFormat,
    ) -> Result<CpuBuffer<T>, CpuError> {
        match format {
            WeightFormat::F32 => self.upload(host),
            WeightFormat::Bf16 | WeightFormat::Int8 => {
                CpuBuffer::with_stored(host, matrices, format)
            }
        }
    }
    /// Stored weight matrices come back widened to f32.
    fn download(&self, src: Slice<'_, CpuBuffer<T>>, out: &mut [f32]) -> Result<(), CpuError> {
        let Some(stored) = src.buf.stored() else {
            let src = view(src, out.len(), "download source")?;
            for (o, &s) in out.iter_mut().zip(src) {
                *o = s.to_f32_lossy();
            }
            return Ok(());
        };
        let end = src.offset.saturating_add(out.len());
        if end > src.buf.len() {
            return Err(CpuError::OutOfBounds {
                what: "download source",
                start: src.offset,
                end,
                len: src.buf.len(),
            });
        }
        let range = src.offset..end;
        for (o, s) in out.iter_mut().zip(&src.buf[range.clone()]) {
            *o = s.to_f32_lossy();
        }
        let mut row = Vec::new();
        for (m, matrix) in &stored.matrices {
            row.resize(m.cols, 0.0);
            for r in 0..m.rows {
                let at = m.offset + r * m.cols;
                let (lo, hi) = (at.max(range.start), (at + m.cols).min(range.end));
                if lo < hi {
                    matrix.dequantize_row(r, &mut row);
                    out[lo - range.start..hi - range.start].copy_from_slice(&row[lo - at..hi - at]);
                }
            }
        }
        Ok(())
    }
    fn upload_ids(&self, host: &[u32]) -> Result<Vec<u32>, CpuError> {
        Ok(host.to_vec())
    }
    fn stores_below_f32(&self) -> bool {
        self.bf16_weights
    }
    fn round_into(
        &self,
        src: Slice<'_, CpuBuffer<T>>,
        dst: SliceMut<'_, CpuBuffer<T>>,
        len: usize,
    ) -> Result<(), CpuError> {
        let src = view(src, len, "round_into source")?;
        let dst = view_mut(dst, len, "round_into destination")?;
        if self.bf16_weights {
            for (d, &s) in dst.iter_mut().zip(src) {
                *d = T::of_f32(half::bf16::from_f32(s.to_f32_lossy()).to_f32());
            }
        } else {
            dst.copy_from_slice(src);
        }
        Ok(())
    }
    fn fill(
        &self,
        dst: SliceMut<'_, CpuBuffer<T>>,
        len: usize,
        value: f32,
    ) -> Result<(), CpuError> {
        view_mut(dst, len, "fill")?.fill(T::of_f32(value));
        Ok(())
    }
    fn copy(
        &self,
        src: Slice<'_, CpuBuffer<T>>,
        dst: SliceMut<'_, CpuBuffer<T>>,
        len: usize,
    ) -> Result<(), CpuError> {
        view_mut(dst, len, "copy destination")?.copy_from_slice(view(src, len, "copy source")?);
        Ok(())
    }
    fn padded_row_stride(&self, cols: usize) -> usize {
        cols.next_multiple_of(self.row_alignment.max(1))
    }
}

impl<T: CpuFloat> RecordingOps for CpuBackend<T> {
    fn can_record(&self) -> bool {
        self.failed_recordings
    }
    fn recording_failed(&self, _why: Option<&CpuError>) {
        if let Some(reports) = self.failed_recording_reports {
            reports.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl<T: CpuFloat> LinearOps for CpuBackend<T> {
    fn matmul(
        &self,
        spec: &Gemm,
        a: Slice<'_, CpuBuffer<T>>,
        b: Slice<'_, CpuBuffer<T>>,
        c: SliceMut<'_, CpuBuffer<T>>,
    ) -> Result<(), CpuError> {
        if let Some((m, w)) = b.buf.stored().and_then(|s| s.starting_at(b.offset)) {
            return ops::stored::linear_forward(spec, m, w, a, c);
        }
        let (na, nb, nc) = spec.extents();
        ops::gemm::gemm(
            spec,
            view(a, na, "matmul A")?,
            view(b, nb, "matmul B")?,
            view_mut(c, nc, "matmul C")?,
        )
    }
    fn bias_add_rows(
        &self,
        x: SliceMut<'_, CpuBuffer<T>>,
        bias: Slice<'_, CpuBuffer<T>>,
        shape: RowMajor,
    ) -> Result<(), CpuError> {
        ops::bias::bias_add(
            view_mut(x, shape.extent(), "bias_add x")?,
            view(bias, shape.cols, "bias")?,
            shape.cols,
            shape.stride,
        );
        Ok(())
    }
    fn bias_backward_rows(
        &self,
        dy: Slice<'_, CpuBuffer<T>>,
        dbias: SliceMut<'_, CpuBuffer<T>>,
        shape: RowMajor,
    ) -> Result<(), CpuError> {
        ops::bias::bias_backward(
            view(dy, shape.extent(), "bias_backward dy")?,
            view_mut(dbias, shape.cols, "dbias")?,
            shape.rows,
            shape.cols,
            shape.stride,
        );
        Ok(())
    }
}

impl<T: CpuFloat> NormOps for CpuBackend<T> {
    fn layernorm_forward(
        &self,
        shape: &NormShape,
        x: Slice<'_, CpuBuffer<T>>,
        weight: Slice<'_, CpuBuffer<T>>,
        bias: Option<Slice<'_, CpuBuffer<T>>>,
        out: SliceMut<'_, CpuBuffer<T>>,
        mean: SliceMut<'_, CpuBuffer<T>>,
        rstd: SliceMut<'_, CpuBuffer<T>>,
    ) -> Result<(), CpuError> {
        let n = shape.rows * shape.cols;
        let bias = match bias {
            Some(b) => Some(view(b, shape.cols, "layernorm bias")?),
            None => None,
        };
        ops::layernorm::forward(
            shape,
            view(x, n, "layernorm x")?,
            view(weight, shape.cols, "layernorm weight")?,
            bias,
            view_mut(out, n, "layernorm out")?,
            view_mut(mean, shape.rows, "layernorm mean")?,
            view_mut(rstd, shape.rows, "layernorm rstd")?,
        );
        Ok(())
    }
    fn layernorm_backward(
        &self,
        shape: &NormShape,
        dout: Slice<'_, CpuBuffer<T>>,
        x: Slice<'_, CpuBuffer<T>>,
        weight: Slice<'_, CpuBuffer<T>>,
        mean: Slice<'_, CpuBuffer<T>>,
        rstd: Slice<'_, CpuBuffer<T>>,
        dx: SliceMut<'_, CpuBuffer<T>>,
        dweight: SliceMut<'_, CpuBuffer<T>>,
    ) -> Result<(), CpuError> {
        let n = shape.rows * shape.cols;
        ops::layernorm::backward(
            shape,
            view(dout, n, "layernorm dout")?,
            view(x, n, "layernorm x")?,
            view(weight, shape.cols, "layernorm weight")?,
            view(mean, shape.rows, "layernorm mean")?,
            view(rstd, shape.rows, "layernorm rstd")?,
            view_mut(dx, n, "layernorm dx")?,
            view_mut(dweight, shape.cols, "layernorm dweight")?,
        );
        Ok(())
    }
    fn modulate_forward(
        &self,
        x: Slice<'_, CpuBuffer<T>>,
        shift: Slice<'_, CpuBuffer<T>>,
        scale: Slice<'_, CpuBuffer<T>>,
        out: SliceMut<'_, CpuBuffer<T>>,
        batch: usize,
        tokens: usize,
        channels: usize,
    ) -> Result<(), CpuError> {
        let n = batch * tokens * channels;
        ops::modulate::forward(
            view(x, n, "modulate x")?,
            view(shift, batch * channels, "modulate shift")?,
            view(scale, batch * channels, "modulate scale")?,
            view_mut(out, n, "modulate out")?,
            tokens,
            channels,
        );
        Ok(())
    }
    fn modulate_backward(
        &self,
        dout: Slice<'_, CpuBuffer<T>>,
        x: Slice<'_, CpuBuffer<T>>,
        scale: Slice<'_, CpuBuffer<T>>,
        dx: SliceMut<'_, CpuBuffer<T>>,
        dscale: SliceMut<'_, CpuBuffer<T>>,
        batch: usize,
        tokens: usize,
        channels: usize,
    ) -> Result<(), CpuError> {
        let n = batch * tokens * channels;
        ops::modulate::backward(
            view(dout, n, "modulate dout")?,
            view(x, n, "modulate x")?,
            view(scale, batch * channels, "modulate scale")?,
            view_mut(dx, n, "modulate dx")?,
            view_mut(dscale, batch * channels, "modulate dscale")?,
            tokens,
            channels,
        );
        Ok(())
    }
}

impl<T: CpuFloat> AttentionOps for CpuBackend<T> {
    fn rope_forward(
        &self,
        shape: &RopeShape,
        x: SliceMut<'_, CpuBuffer<T>>,
    ) -> Result<(), CpuError> {
        let n = shape.extent();
        ops::rope::rotate(shape, view_mut(x, n, "rope x")?, false);
        Ok(())
    }
    fn rope_backward(
        &self,
        shape: &RopeShape,
        dx: SliceMut<'_, CpuBuffer<T>>,
    ) -> Result<(), CpuError> {
        let n = shape.extent();
        ops::rope::rotate(shape, view_mut(dx, n, "rope dx")?, true);
        Ok(())
    }
    fn attention_forward(
        &self,
        shape: &AttentionShape,
        mask: &AttentionMask,
        q: Slice<'_, CpuBuffer<T>>,
        k: Slice<'_, CpuBuffer<T>>,
        v: Slice<'_, CpuBuffer<T>>,
        out: SliceMut<'_, CpuBuffer<T>>,
        lse: SliceMut<'_, CpuBuffer<T>>,
    ) -> Result<(), CpuError> {
        let e = shape.extents().map_err(CpuError::Shape)?;
        ops::attention::forward(
            shape,
            mask,
            view(q, e.q, "attention q")?,
            view(k, e.k, "attention k")?,
            view(v, e.v, "attention v")?,
            view_mut(out, e.out, "attention out")?,
            view_mut(lse, e.lse, "attention lse")?,
        );
        Ok(())
    }
    fn attention_backward(
        &self,
        shape: &AttentionShape,
        mask: &AttentionMask,
        dout: Slice<'_, CpuBuffer<T>>,
        q: Slice<'_, CpuBuffer<T>>,
        k: Slice<'_, CpuBuffer<T>>,
        v: Slice<'_, CpuBuffer<T>>,
        out: Slice<'_, CpuBuffer<T>>,
        lse: Slice<'_, CpuBuffer<T>>,
        grads: SliceMut<'_, CpuBuffer<T>>,
        at: QkvOffsets,
    ) -> Result<(), CpuError> {
        let e = shape.extents().map_err(CpuError::Shape)?;
        ops::attention::backward(
            shape,
            mask,
            view(dout, e.out, "attention dout")?,
            view(q, e.q, "attention q")?,
            view(k, e.k, "attention k")?,
            view(v, e.v, "attention v")?,
            view(out, e.out, "attention out")?,
            view(lse, e.lse, "attention lse")?,
            view_mut(grads, at.span(&e), "attention gradients")?,
            at,
        );
        Ok(())
    }
}

impl<T: CpuFloat> ActivationOps for CpuBackend<T> {
    fn gated_residual_forward(
        &self,
        residual: SliceMut<'_, CpuBuffer<T>>,
        y: Slice<'_, CpuBuffer<T>>,
        gate: Option<Slice<'_, CpuBuffer<T>>>,
        batch: usize,
        tokens: usize,
        channels: usize,
    ) -> Result<(), CpuError> {
        let n = batch * tokens * channels;
        let gate = match gate {
            Some(g) => Some(view(g, batch * channels, "gate")?),
            None => None,
        };
        ops::modulate::gated_residual_forward(
            view_mut(residual, n, "residual")?,
            view(y, n, "gated y")?,
            gate,
            tokens,
            channels,
        );
        Ok(())
    }
    fn gated_residual_backward(
        &self,
        dresidual: Slice<'_, CpuBuffer<T>>,
        y: Slice<'_, CpuBuffer<T>>,
        gate: Option<Slice<'_, CpuBuffer<T>>>,
        dy: SliceMut<'_, CpuBuffer<T>>,
        dgate: Option<SliceMut<'_, CpuBuffer<T>>>,
        batch: usize,
        tokens: usize,
        channels: usize,
    ) -> Result<(), CpuError> {
        let n = batch * tokens * channels;
        let gate = match gate {
            Some(g) => Some(view(g, batch * channels, "gate")?),
            None => None,
        };
        let dgate = match dgate {
            Some(g) => Some(view_mut(g, batch * channels, "dgate")?),
            None => None,
        };
        ops::modulate::gated_residual_backward(
            view(dresidual, n, "dresidual")?,
            view(y, n, "gated y")?,
            gate,
            view_mut(dy, n, "gated dy")?,
            dgate,
            tokens,
            channels,
        );
        Ok(())
    }
    fn gelu_forward(
        &self,
        x: Slice<'_, CpuBuffer<T>>,
        out: SliceMut<'_, CpuBuffer<T>>,
        len: usize,
    ) -> Result<(), CpuError> {
        ops::activation::gelu_forward(view(x, len, "gelu x")?, view_mut(out, len, "gelu out")?);
        Ok(())
    }
    fn gelu_backward(
        &self,
        dout: Slice<'_, CpuBuffer<T>>,
        x: Slice<'_, CpuBuffer<T>>,
        dx: SliceMut<'_, CpuBuffer<T>>,
        len: usize,
    ) -> Result<(), CpuError> {
        ops::activation::gelu_backward(
            view(dout, len, "gelu dout")?,
            view(x, len, "gelu x")?,
            view_mut(dx, len, "gelu dx")?,
        );
        Ok(())
    }
    fn silu_forward(
        &self,
        x: Slice<'_, CpuBuffer<T>>,
        out: SliceMut<'_, CpuBuffer<T>>,
        len: usize,
    ) -> Result<(), CpuError> {
        ops::activation::silu_forward(view(x, len, "silu x")?, view_mut(out, len, "silu out")?);
        Ok(())
    }
    fn silu_backward(
        &self,
        dout: Slice<'_, CpuBuffer<T>>,
        x: Slice<'_, CpuBuffer<T>>,
        dx: SliceMut<'_, CpuBuffer<T>>,
        len: usize,
    ) -> Result<(), CpuError> {
        ops::activation::silu_backward(
            view(dout, len, "silu dout")?,
            view(x, len, "silu x")?,
            view_mut(dx, len, "silu dx")?,
        );
        Ok(())
    }
    fn dropout(
        &self,
        x: SliceMut<'_, CpuBuffer<T>>,
        len: usize,
        p: f32,
        stream: &RngStream,
    ) -> Result<(), CpuError> {
        ops::activation::dropout(view_mut(x, len, "dropout x")?, p, stream);
        Ok(())
    }
}

impl<T: CpuFloat> LossOps for CpuBackend<T> {
    fn embedding_forward(
        &self,
        ids: &Vec<u32>,
        table: Slice<'_, CpuBuffer<T>>,
        out: SliceMut<'_, CpuBuffer<T>>,
        rows: usize,
        channels: usize,
    ) -> Result<(), CpuError> {
        let ids = ids_view(ids, rows, "embedding ids")?;
        if let Some((m, w)) = table.buf.stored().and_then(|s| s.starting_at(table.offset)) {
            check_ids(ids, m.rows)?;
            return ops::stored::embedding_forward(ids, m, w, out, rows, channels);
        }
        let table_rows = (table.buf.len().saturating_sub(table.offset)) / channels.max(1);
        check_ids(ids, table_rows)?;
        let table = view(table, table_rows * channels, "embedding table")?;
        ops::embedding::forward(
            ids,
            table,
            view_mut(out, rows * channels, "embedding out")?,
            channels,
        );
        Ok(())
    }
    fn embedding_backward(
        &self,
        ids: &Vec<u32>,
        dout: Slice<'_, CpuBuffer<T>>,
        dtable: SliceMut<'_, CpuBuffer<T>>,
        rows: usize,
        channels: usize,
    ) -> Result<(), CpuError> {
        let ids = ids_view(ids, rows, "embedding ids")?;
        let table_rows = (dtable.buf.len().saturating_sub(dtable.offset)) / channels.max(1);
        check_ids(ids, table_rows)?;
        ops::embedding::backward(
            ids,
            view(dout, rows * channels, "embedding dout")?,
            view_mut(dtable, table_rows * channels, "embedding dtable")?,
            channels,
        );
        Ok(())
    }
    fn softmax_cross_entropy(
        &self,
        logits: SliceMut<'_, CpuBuffer<T>>,
        targets: &Vec<u32>,
        weights: Slice<'_, CpuBuffer<T>>,
        losses: SliceMut<'_, CpuBuffer<T>>,
        shape: RowMajor,
        excluded: Option<u32>,
        grad_scale: f32,
    ) -> Result<(), CpuError> {
        let (rows, vocab) = (shape.rows, shape.cols);
        let targets = ids_view(targets, rows, "cross-entropy targets")?;
        check_ids(targets, vocab)?;
        ops::cross_entropy::softmax_cross_entropy(
            view_mut(logits, shape.extent(), "cross-entropy logits")?,
            targets,
            view(weights, rows, "cross-entropy weights")?,
            view_mut(losses, rows, "cross-entropy losses")?,
            shape,
            excluded,
            T::of_f32(grad_scale),
        );
        Ok(())
    }
}

impl<T: CpuFloat> OptimizerOps for CpuBackend<T> {
    fn sum(&self, x: Slice<'_, CpuBuffer<T>>, len: usize) -> Result<f64, CpuError> {
        Ok(ops::optim::sum(view(x, len, "sum")?))
    }
    fn sum_squares(&self, x: Slice<'_, CpuBuffer<T>>, len: usize) -> Result<f64, CpuError> {
        Ok(ops::optim::sum_squares(view(x, len, "sum_squares")?))
    }
    fn scale(
        &self,
        x: SliceMut<'_, CpuBuffer<T>>,
        len: usize,
        factor: f32,
    ) -> Result<(), CpuError> {
        ops::optim::scale(view_mut(x, len, "scale")?, T::of_f32(factor));
        Ok(())
    }
    fn adamw(
        &self,
        hp: &AdamW,
        params: SliceMut<'_, CpuBuffer<T>>,
        grads: Slice<'_, CpuBuffer<T>>,
        m: SliceMut<'_, CpuBuffer<T>>,
        v: SliceMut<'_, CpuBuffer<T>>,
        len: usize,
    ) -> Result<(), CpuError> {
        ops::optim::adamw(
            hp,
            view_mut(params, len, "adamw params")?,
            view(grads, len, "adamw grads")?,
            view_mut(m, len, "adamw m")?,
            view_mut(v, len, "adamw v")?,
        );
        Ok(())
    }
    fn ema_update(
        &self,
        ema: SliceMut<'_, CpuBuffer<T>>,
        params: Slice<'_, CpuBuffer<T>>,
        len: usize,
        decay: f32,
    ) -> Result<(), CpuError> {
        ops::optim::ema_update(
            view_mut(ema, len, "ema")?,
            view(params, len, "ema params")?,
            T::of_f32(decay),
        );
        Ok(())
    }
}

impl<T: CpuFloat> DrawOps for CpuBackend<T> {
    /// Rows drawn in parallel (each is `draw_token` on its own stream: the same tokens).
    fn draw_tokens(
        &self,
        logits: Slice<'_, CpuBuffer<T>>,
        vocab: usize,
        mask_id: u32,
        nucleus: &Nucleus,
        draws: &[DrawSpec],
        out: &mut [SampledToken],
    ) -> Result<(), CpuError> {
        let rows = draws.len().min(out.len());
        let logits = view(logits, rows * vocab, "draw logits")?;
        ops::draw::draw_tokens(
            logits,
            vocab,
            mask_id,
            nucleus,
            &draws[..rows],
            &mut out[..rows],
        );
        Ok(())
    }
}

impl<T: CpuFloat> FusedOps for CpuBackend<T> {}
