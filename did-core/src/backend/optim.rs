//! Optimisation: sums for gradient norms, scaling, AdamW, the EMA, and the whole update of one step.

use super::{MemoryOps, Slice, SliceMut};

/// AdamW hyper-parameters for one step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamW {
    /// Learning rate of this step (after warm-up).
    pub lr: f32,
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// Denominator guard.
    pub eps: f32,
    /// Decoupled weight decay.
    pub weight_decay: f32,
    /// 1-based step, for bias correction.
    pub step: u32,
}

impl Default for AdamW {
    /// BD3-LM's defaults: lr 3e-4, β = (0.9, 0.999), ε = 1e-8, no weight decay.
    fn default() -> Self {
        AdamW {
            lr: 3e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            step: 1,
        }
    }
}

/// One optimizer update as [`OptimizerOps::optimizer_step`] applies it: the clip factor, AdamW, the
/// EMA's decay.
///
/// ```
/// use did_core::backend::{AdamW, OptimizerStep};
/// let step = OptimizerStep { adamw: AdamW::default(), grad_scale: 0.5, ema_decay: Some(0.999) };
/// assert_eq!(step.adamw.lr, 3e-4);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OptimizerStep {
    /// The AdamW hyper-parameters of this step.
    pub adamw: AdamW,
    /// What the gradients are multiplied by first (gradient-norm clipping; 1 leaves them).
    pub grad_scale: f32,
    /// The EMA's decay this step; `None` leaves the EMA (if any) as it is.
    pub ema_decay: Option<f32>,
}

/// Weights an optimizer updates: `master`, kept in f32 whatever the storage (from
/// [`MemoryOps::upload_f32`](crate::backend::MemoryOps::upload_f32)), and — on a backend that stores below f32
/// ([`MemoryOps::stores_below_f32`](crate::backend::MemoryOps::stores_below_f32)) — `rounded`, the copy in the storage precision that the
/// model reads, rewritten from `master` by every update. Where storage is f32 the master is what
/// the model reads and `rounded` is `None`.
///
/// ```
/// use did_core::backend::{Slice, SliceMut, UpdatedWeights};
/// let mut master = vec![0.5f32; 4];
/// let w = UpdatedWeights { master: SliceMut::whole(&mut master), rounded: None };
/// assert!(w.rounded.is_none());
/// ```
#[derive(Debug)]
pub struct UpdatedWeights<'a, T: ?Sized> {
    /// The weights in f32.
    pub master: SliceMut<'a, T>,
    /// Their copy in the storage precision, where that is below f32.
    pub rounded: Option<SliceMut<'a, T>>,
}

/// Sums, scaling and the optimizer's updates.
///
/// ```
/// use did_core::backend::{OptimizerOps, Slice};
/// fn grad_norm<B: OptimizerOps>(be: &B, grads: Slice<'_, B::Buffer>, n: usize) -> Result<f64, B::Error> {
///     Ok(be.sum_squares(grads, n)?.sqrt())
/// }
/// ```
pub trait OptimizerOps: MemoryOps {
    /// `Σ x` over `len` elements, in f64 (the loss of a batch from its per-row losses).
    fn sum(&self, x: Slice<'_, Self::Buffer>, len: usize) -> Result<f64, Self::Error>;
    /// `Σ x²` over `len` elements, in f64 (for the gradient norm).
    fn sum_squares(&self, x: Slice<'_, Self::Buffer>, len: usize) -> Result<f64, Self::Error>;
    /// `x *= factor` over `len` elements (gradient clipping).
    fn scale(
        &self,
        x: SliceMut<'_, Self::Buffer>,
        len: usize,
        factor: f32,
    ) -> Result<(), Self::Error>;
    /// One AdamW step over `len` parameters with moments `m`, `v`.
    #[allow(clippy::too_many_arguments)]
    fn adamw(
        &self,
        hp: &AdamW,
        params: SliceMut<'_, Self::Buffer>,
        grads: Slice<'_, Self::Buffer>,
        m: SliceMut<'_, Self::Buffer>,
        v: SliceMut<'_, Self::Buffer>,
        len: usize,
    ) -> Result<(), Self::Error>;
    /// `ema = decay·ema + (1 − decay)·params`.
    fn ema_update(
        &self,
        ema: SliceMut<'_, Self::Buffer>,
        params: Slice<'_, Self::Buffer>,
        len: usize,
        decay: f32,
    ) -> Result<(), Self::Error>;
    /// One optimizer update over `len` parameters: the gradients times `step.grad_scale`,
    /// AdamW on `params.master` with the f32 moments `m`, `v`, then the EMA's master
    /// `ema = decay·ema + (1 − decay)·params` at `step.ema_decay`, and the storage copies of
    /// both rewritten from their masters. `grads` is left unspecified (scaled or not). A GPU
    /// backend does it all in one pass over the parameters. Provided: [`OptimizerOps::scale`],
    /// [`OptimizerOps::adamw`], [`OptimizerOps::ema_update`] and [`MemoryOps::round_into`](crate::backend::MemoryOps::round_into).
    ///
    /// ```
    /// use did_core::backend::{AdamW, Backend, OptimizerStep, Slice, SliceMut, UpdatedWeights};
    /// fn update<B: Backend>(
    ///     be: &B, params: &mut B::Buffer, grads: &mut B::Buffer, m: &mut B::Buffer,
    ///     v: &mut B::Buffer, len: usize,
    /// ) -> Result<(), B::Error> {
    ///     let step = OptimizerStep { adamw: AdamW::default(), grad_scale: 1.0, ema_decay: None };
    ///     let params = UpdatedWeights { master: SliceMut::whole(params), rounded: None };
    ///     be.optimizer_step(&step, params, SliceMut::whole(grads), SliceMut::whole(m),
    ///         SliceMut::whole(v), None, len)
    /// }
    /// ```
    #[allow(clippy::too_many_arguments)]
    fn optimizer_step(
        &self,
        step: &OptimizerStep,
        params: UpdatedWeights<'_, Self::Buffer>,
        grads: SliceMut<'_, Self::Buffer>,
        m: SliceMut<'_, Self::Buffer>,
        v: SliceMut<'_, Self::Buffer>,
        ema: Option<UpdatedWeights<'_, Self::Buffer>>,
        len: usize,
    ) -> Result<(), Self::Error> {
        let (grads_buf, grads_at) = (grads.buf, grads.offset);
        if step.grad_scale != 1.0 {
            self.scale(
                SliceMut::at(&mut *grads_buf, grads_at),
                len,
                step.grad_scale,
            )?;
        }
        let (master, master_at) = (params.master.buf, params.master.offset);
        self.adamw(
            &step.adamw,
            SliceMut::at(&mut *master, master_at),
            Slice::at(&*grads_buf, grads_at),
            m,
            v,
            len,
        )?;
        if let Some(rounded) = params.rounded {
            self.round_into(Slice::at(&*master, master_at), rounded, len)?;
        }
        if let (Some(ema), Some(decay)) = (ema, step.ema_decay) {
            let (ema_master, ema_at) = (ema.master.buf, ema.master.offset);
            self.ema_update(
                SliceMut::at(&mut *ema_master, ema_at),
                Slice::at(&*master, master_at),
                len,
                decay,
            )?;
            if let Some(rounded) = ema.rounded {
                self.round_into(Slice::at(&*ema_master, ema_at), rounded, len)?;
            }
        }
        Ok(())
    }
}
