//! The compute primitives a backend implements: the [`Backend`] trait.
//!
//! The granularity is the layer op, the size of an llm.c kernel. The model
//! code in did-core decides the order of ops once; a backend is free to fuse
//! inside an op. Every differentiable op has its forward and its backward
//! side by side.
//!
//! # Conventions
//!
//! - Buffers hold floats. Their storage precision is the backend's (f32, or
//!   bf16 storage with f32 accumulation); the host always sees f32.
//! - Tensors are row-major. A [`Slice`] is a buffer plus an element offset, so
//!   parameters and gradients can live in one flat buffer each (llm.c style;
//!   one gradient buffer makes a data-parallel all-reduce a single call).
//! - **Backward ops accumulate** (`+=`) into every gradient they produce, input
//!   gradients included; the trainer zeroes gradients once per step.
//! - Activation layout is `[batch, tokens, channels]`; attention heads are
//!   contiguous inside a token (`channel = head · head_dim + d`).
//! - Random draws (dropout, sampling) come from [`crate::rng`] streams, so
//!   every backend draws the same numbers.
//!
//! # Op families
//!
//! One trait per family, each in its own file; [`Backend`] requires them all and is
//! implemented for every type that implements them. Model code asks for [`Backend`]; a
//! function that needs one family can ask for just that one.
//!
//! | family | trait | ops |
//! |---|---|---|
//! | memory and views | [`MemoryOps`] | buffers, transfers, fills, copies ([`views`]: [`Slice`], [`RowMajor`], [`RowGroups`]); weights stored as [`WeightFormat`] |
//! | recording | [`RecordingOps`] | record a pass once, replay it (CUDA graphs) |
//! | linear | [`LinearOps`] | GEMM, bias |
//! | norm | [`NormOps`] | LayerNorm, adaLN modulation |
//! | attention | [`AttentionOps`] | rotary embedding, masked attention |
//! | activation and residual | [`ActivationOps`] | GELU, SiLU, dropout, gated residual |
//! | loss | [`LossOps`] | embedding, softmax cross-entropy |
//! | optimizer | [`OptimizerOps`] | sums, AdamW, EMA, one step's update |
//! | draw | [`DrawOps`] | tokens from logits |
//! | fused | [`FusedOps`] | composites of the above that a backend may fuse |
//!
//! A caller holding a concrete backend (not a `B: Backend`) brings the methods into scope
//! with `use did_core::backend::prelude::*`.

mod activation;
mod attention;
mod draw;
mod fused;
mod linear;
mod loss;
mod memory;
mod norm;
mod optim;
mod recording;
pub mod views;
mod weights;

pub use activation::{ActivationOps, DropoutMask};
pub use attention::{AttentionExtents, AttentionOps, AttentionShape, QkvOffsets, RopeShape};
pub use draw::DrawOps;
pub use fused::{linear_forward_then_in_steps, FusedOps, LinearThen, ResidualBranch};
pub use linear::{Gemm, LinearOps};
pub use loss::LossOps;
pub use memory::{first_id_outside, MemoryOps};
pub use norm::{NormOps, NormShape};
pub use optim::{AdamW, OptimizerOps, OptimizerStep, UpdatedWeights};
pub use recording::{RecordingId, RecordingOps};
pub use views::{RowGroups, RowMajor, Slice, SliceMut};
pub use weights::{UnknownWeightFormat, WeightFormat, WeightMatrix};

/// The compute primitives of a backend. See the module docs for conventions.
///
/// Model code is written once over `B: Backend`, llm.c style:
///
/// ```
/// use did_core::backend::{Backend, Gemm, Slice, SliceMut};
/// /// y[rows, d_out] = x[rows, d_in] · Wᵀ + b, with W stored [d_out, d_in].
/// fn linear_forward<B: Backend>(
///     backend: &B, x: Slice<'_, B::Buffer>, w: Slice<'_, B::Buffer>, b: Slice<'_, B::Buffer>,
///     mut y: SliceMut<'_, B::Buffer>, rows: usize, d_in: usize, d_out: usize,
/// ) -> Result<(), B::Error> {
///     backend.matmul(&Gemm::linear(rows, d_in, d_out), x, w, SliceMut { buf: &mut *y.buf, offset: y.offset })?;
///     backend.bias_add(y, b, rows, d_out)
/// }
/// ```
pub trait Backend:
    MemoryOps
    + RecordingOps
    + LinearOps
    + NormOps
    + AttentionOps
    + ActivationOps
    + LossOps
    + OptimizerOps
    + DrawOps
    + FusedOps
{
}

impl<T> Backend for T where
    T: MemoryOps
        + RecordingOps
        + LinearOps
        + NormOps
        + AttentionOps
        + ActivationOps
        + LossOps
        + OptimizerOps
        + DrawOps
        + FusedOps
        + ?Sized
{
}

/// Every family trait, for callers that hold a concrete backend:
/// `use did_core::backend::prelude::*`.
///
/// ```
/// use did_core::backend::prelude::*;
/// fn zeros_of<B: Backend>(be: &B, n: usize) -> Result<B::Buffer, B::Error> {
///     be.zeros(n)
/// }
/// ```
pub mod prelude {
    pub use super::{
        ActivationOps, AttentionOps, Backend, DrawOps, FusedOps, LinearOps, LossOps, MemoryOps,
        NormOps, OptimizerOps, RecordingOps,
    };
}
