//! The transformer, written once over the [`crate::backend::Backend`] trait:
//! configuration ([`ModelConfig`]), the flat parameter layout under the
//! reference checkpoints' names ([`ParamTable`]), the training passes
//! ([`Pass`], [`diffusion_batch`], [`causal_batch`]), the forward and the
//! hand-written backward ([`Transformer`]), the optimiser ([`Trainer`]), and
//! KV-cached inference behind the sampler's [`crate::denoiser::Denoiser`]
//! ([`DiffusionDenoiser`]), and ancestral sampling from a causal model
//! ([`CausalSampler`]).
//!
//! Everything here that needs no backend runs as is:
//!
//! ```
//! use did_core::model::{diffusion_batch, Architecture, ModelConfig, Pass, Transformer};
//! use did_core::schedule::TrainingSchedule;
//! let model = Transformer::new(ModelConfig::preset("tiny", Architecture::Dit)?)?;
//! assert_eq!(model.table().get("blocks.0.attn_qkv.weight").map(|e| e.shape.clone()), Some(vec![768, 256]));
//! let x0: Vec<u32> = (0..256).collect();
//! let batch = diffusion_batch(&x0, 1, 256, 4, &TrainingSchedule::default(), did_core::GPT2_MASK, 1, 0)?;
//! assert_eq!(batch.pass, Pass::Bd3 { block_size: 4 });
//! # Ok::<(), did_core::Error>(())
//! ```
//!
//! A training step and draft → refine sampling with a real backend are the
//! runnable example at the top of the `did-backend-cpu` crate.

pub mod inference;
pub mod network;
pub mod training;

use core::fmt;

pub use inference::{
    CausalGeneration, CausalSampler, DiffusionDenoiser, Inference, JointRequest, KvCache,
};
pub use network::{
    loss_rows_for, memory_report, memory_report_on, time_embedding, Activations, Architecture,
    BackwardStage, BlockOffsets, DropoutStreams, GradientBuckets, Init, Layout, MemoryReport,
    ModelConfig, ParamEntry, ParamTable, StorageLayout, Transformer, LOSS_CHUNK_ELEMENTS,
    TIME_EMBEDDING_DIM,
};
pub use training::{
    causal_batch, diffusion_batch, BlockSizeDistribution, Pass, ResolvedBlockSizes, StepReport,
    TrainBatch, Trainer, TrainerConfig, TrainingState,
};

/// A model call failed: bad input (named, with the fix) or the backend.
#[derive(Debug)]
pub enum ModelError<E> {
    /// The request does not fit the model.
    Invalid(crate::Error),
    /// The backend failed.
    Backend(E),
    /// A collective operation between data-parallel ranks failed.
    Collective(crate::collective::CollectiveError),
}

impl<E> From<crate::Error> for ModelError<E> {
    fn from(e: crate::Error) -> Self {
        ModelError::Invalid(e)
    }
}

impl<E: fmt::Display> fmt::Display for ModelError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelError::Invalid(e) => e.fmt(f),
            ModelError::Backend(e) => write!(f, "backend: {e}"),
            ModelError::Collective(e) => write!(f, "data parallel: {e}"),
        }
    }
}

#[cfg(feature = "std")]
impl<E: fmt::Debug + fmt::Display> std::error::Error for ModelError<E> {}
