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
        self.launch_elements(
            "scale",
            len,
            &[Arg::Ptr(p), Arg::I64(len as i64), Arg::F32(factor)],
        )
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
        let args = [
            Arg::Ptr(self.ptr_mut(params, len, "adamw params")?),
            Arg::Ptr(self.ptr(grads, len, "adamw grads")?),
            Arg::Ptr(self.ptr_mut(m, len, "adamw m")?),
            Arg::Ptr(self.ptr_mut(v, len, "adamw v")?),
            Arg::I64(len as i64),
            Arg::F32(hp.lr),
            Arg::F32(hp.beta1),
            Arg::F32(hp.beta2),
            Arg::F32(hp.eps),
            Arg::F32(hp.weight_decay),
            Arg::F32(bc1),
            Arg::F32(bc2),
        ];
        self.launch_elements("adamw", len, &args)
    }
    fn ema_update(
        &self,
        ema: SliceMut<'_, CudaBuffer>,
        params: Slice<'_, CudaBuffer>,
        len: usize,
        decay: f32,
    ) -> Result<(), CudaError> {
        let args = [
            Arg::Ptr(self.ptr_mut(ema, len, "ema")?),
            Arg::Ptr(self.ptr(params, len, "ema params")?),
            Arg::I64(len as i64),
            Arg::F32(decay),
        ];
        self.launch_elements("ema_update", len, &args)
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
        let args = [
            Arg::Ptr(master),
            Arg::Ptr(rounded),
            Arg::Ptr(grads),
            Arg::Ptr(m),
            Arg::Ptr(v),
            Arg::Ptr(ema),
            Arg::Ptr(ema_rounded),
            Arg::I64(len as i64),
            Arg::F32(step.grad_scale),
            Arg::F32(hp.lr),
            Arg::F32(hp.beta1),
            Arg::F32(hp.beta2),
            Arg::F32(hp.eps),
            Arg::F32(hp.weight_decay),
            Arg::F32(1.0 - hp.beta1.powi(t)),
            Arg::F32(1.0 - hp.beta2.powi(t)),
            Arg::F32(ema_decay),
        ];
        self.launch_elements("optimizer_step", len, &args)
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
        // too): up to 1,024 blocks, about eight an SM on an H200 — 256 left three quarters of each SM
        // idle over a whole gradient vector — and no more blocks than chunks to read.
        let blocks = len.div_ceil(THREADS as usize * 8).clamp(1, 1024);
        let partial = self.stream.alloc_zeros::<f64>(blocks)?;
        let (pp, _sync) = partial.device_ptr(&self.stream);
        self.launch(
            "sum_partial",
            (blocks as u32, 1, 1),
            THREADS,
            &[
                Arg::Ptr(xp),
                Arg::I64(len as i64),
                Arg::I32(squares as i32),
                Arg::Ptr(pp),
            ],
        )?;
        self.counters.add(Event::Download, 1);
        let host = self.stream.clone_dtoh(&partial)?;
        self.stream.synchronize()?;
        Ok(host.iter().sum())
    }
}
