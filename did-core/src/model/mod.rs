//! The transformer, written once over the [`crate::backend::Backend`] trait:
//! configuration ([`ModelConfig`]), the flat parameter layout under the
//! reference checkpoints' names ([`ParamTable`]), the training passes
//! ([`Pass`], [`diffusion_batch`], [`causal_batch`]), the forward and the
//! hand-written backward ([`Transformer`]), the optimiser ([`Trainer`]), and
//! KV-cached inference behind the sampler's [`crate::denoiser::Denoiser`]
//! ([`DiffusionDenoiser`]).
//!
//! A training step, end to end, on any backend:
//!
//! ```ignore
//! let model = Transformer::new(ModelConfig::preset("tiny", Architecture::Dit)?)?;
//! let mut trainer = Trainer::new(&backend, &model, TrainerConfig::default(), seed)?;
//! let batch = diffusion_batch(&x0, 8, 256, 4, &schedule, model.config().mask_id, seed, step)?;
//! let report = trainer.step(&backend, &model, &[batch])?;
//! ```

mod activations;
mod config;
mod inference;
mod params;
mod pass;
mod trainer;
mod transformer;

use core::fmt;

pub use activations::{memory_report, time_embedding, Activations, MemoryReport};
pub use config::{Architecture, ModelConfig, TIME_EMBEDDING_DIM};
pub use inference::{DiffusionDenoiser, Inference, KvCache};
pub use params::{BlockOffsets, Init, Layout, ParamEntry, ParamTable};
pub use pass::{causal_batch, diffusion_batch, Pass, TrainBatch};
pub use trainer::{StepReport, Trainer, TrainerConfig};
pub use transformer::{DropoutStreams, Transformer};

/// A model call failed: bad input (named, with the fix) or the backend.
#[derive(Debug)]
pub enum ModelError<E> {
    /// The request does not fit the model.
    Invalid(crate::Error),
    /// The backend failed.
    Backend(E),
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
        }
    }
}

#[cfg(feature = "std")]
impl<E: fmt::Debug + fmt::Display> std::error::Error for ModelError<E> {}
