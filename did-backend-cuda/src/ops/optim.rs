//! [`OptimizerOps`]: the fixed-order sums, AdamW, the EMA and the fused optimizer step
//! (`kernels/elementwise.cu`).

use cudarc::driver::DevicePtr;
use did_core::backend::prelude::*;
use did_core::backend::{AdamW, OptimizerStep, Slice, SliceMut, UpdatedWeights};

use crate::buffer::*;
use crate::counters::Event;
use crate::device::*;
use crate::launch::*;
use crate::CudaError;

impl OptimizerOps for CudaBackend {
    fn sum(&self, x: Slice<'_, CudaBuffer>, len: usize) -> Result<f64, CudaError> {
        self.reduce(x, len, false)
    }
    fn sum_squares(&self, x: Slice<'_, CudaBuffer>, len: usize) -> Result<f64, CudaError> {
        self.reduce(x, len, true)
    }
    fn scale(&self, x: SliceMut<'_, CudaBuffer>, len: usize, factor: f32) -> Result<(), CudaError> {
        let p = self.ptr_mut(x, len, "scale x")?;
        self.elements(len).scale(p, len as i64, factor)
    }
    fn adamw(
        &self,
        hp: &AdamW,
        params: SliceMut<'_, CudaBuffer>,
        grads: Slice<'_, CudaBuffer>,
        m: SliceMut<'_, CudaBuffer>,
        v: SliceMut<'_, CudaBuffer>,
        len: usize,
    ) -> Result<(), CudaError> {
        // Bias corrections in f32 on the host, as the CPU reference.
        let step = hp.step.max(1) as i32;
        let bc1 = 1.0 - hp.beta1.powi(step);
        let bc2 = 1.0 - hp.beta2.powi(step);
        self.elements(len).adamw(
            self.ptr_mut(params, len, "adamw params")?,
            self.ptr(grads, len, "adamw grads")?,
            self.ptr_mut(m, len, "adamw m")?,
            self.ptr_mut(v, len, "adamw v")?,
            len as i64,
            hp.lr,
            hp.beta1,
            hp.beta2,
            hp.eps,
            hp.weight_decay,
            bc1,
            bc2,
        )
    }
    fn ema_update(
        &self,
        ema: SliceMut<'_, CudaBuffer>,
        params: Slice<'_, CudaBuffer>,
        len: usize,
        decay: f32,
    ) -> Result<(), CudaError> {
        self.elements(len).ema_update(
            self.ptr_mut(ema, len, "ema")?,
            self.ptr(params, len, "ema params")?,
            len as i64,
            decay,
        )
    }
    /// One `optimizer_step` launch: masters, moments and the EMA in f32 (`upload_f32`,
    /// `zeros_f32`), gradients and the rounded copies in the storage precision.
    fn optimizer_step(
        &self,
        step: &OptimizerStep,
        params: UpdatedWeights<'_, CudaBuffer>,
        grads: SliceMut<'_, CudaBuffer>,
        m: SliceMut<'_, CudaBuffer>,
        v: SliceMut<'_, CudaBuffer>,
        ema: Option<UpdatedWeights<'_, CudaBuffer>>,
        len: usize,
    ) -> Result<(), CudaError> {
        let f32_at = |s: &SliceMut<'_, CudaBuffer>, what| self.f32_ptr(s.buf, s.offset, len, what);
        let stored_at = |s: Option<SliceMut<'_, CudaBuffer>>, what| match s {
            Some(s) => self.ptr_mut(s, len, what),
            None => Ok(0),
        };
        if self.precision == Precision::Bf16 && params.rounded.is_none() {
            return Err(CudaError::Shape(
                "optimizer_step: bf16 storage needs the weights' rounded copy for the model \
                 (the master is f32)"
                    .into(),
            ));
        }
        let master = f32_at(&params.master, "optimizer master weights")?;
        let rounded = stored_at(params.rounded, "optimizer rounded weights")?;
        let grads = self.ptr_mut(grads, len, "optimizer gradients")?;
        let m = f32_at(&m, "optimizer first moments")?;
        let v = f32_at(&v, "optimizer second moments")?;
        let (ema, ema_rounded, ema_decay) = match (ema, step.ema_decay) {
            (Some(ema), Some(decay)) => {
                if self.precision == Precision::Bf16 && ema.rounded.is_none() {
                    return Err(CudaError::Shape(
                        "optimizer_step: bf16 storage needs the EMA's rounded copy for the \
                         model (the EMA's master is f32)"
                            .into(),
                    ));
                }
                (
                    f32_at(&ema.master, "optimizer EMA")?,
                    stored_at(ema.rounded, "optimizer rounded EMA")?,
                    decay,
                )
            }
            _ => (0, 0, 0.0),
        };
        let hp = &step.adamw;
        // Bias corrections in f32 on the host, as the CPU reference.
        let t = hp.step.max(1) as i32;
        self.elements(len).optimizer_step(
            master,
            rounded,
            grads,
            m,
            v,
            ema,
            ema_rounded,
            len as i64,
            step.grad_scale,
            hp.lr,
            hp.beta1,
            hp.beta2,
            hp.eps,
            hp.weight_decay,
            1.0 - hp.beta1.powi(t),
            1.0 - hp.beta2.powi(t),
            ema_decay,
        )
    }
}

impl CudaBackend {
    pub(crate) fn reduce(
        &self,
        x: Slice<'_, CudaBuffer>,
        len: usize,
        squares: bool,
    ) -> Result<f64, CudaError> {
        let xp = self.ptr(x, len, "sum x")?;
        if len == 0 {
            return Ok(0.0);
        }
        // A grid that is a function of the length only (so the sum's order, and its bits, are
        // too): up to 1,024 blocks, about eight an SM on a large GPU (fewer left most of each SM
        // idle: docs/perf/gpu.md) — and no more blocks than chunks to read.
        let blocks = len.div_ceil(THREADS as usize * 8).clamp(1, 1024);
        let partial = self.stream.alloc_zeros::<f64>(blocks)?;
        let (pp, _sync) = partial.device_ptr(&self.stream);
        self.grid((blocks as u32, 1, 1), THREADS).sum_partial(
            xp,
            len as i64,
            squares as i32,
            pp,
        )?;
        self.counters.add(Event::Download, 1);
        let host = self.stream.clone_dtoh(&partial)?;
        self.stream.synchronize()?;
        Ok(host.iter().sum())
    }
}
