//! Training: the batches of each objective ([`batch`]), the block sizes of mix-scale training
//! ([`mix_scale`]) and the optimiser loop with its exact resume ([`trainer`]).

pub(crate) mod batch;
pub mod mix_scale;
pub(crate) mod trainer;

pub use batch::{causal_batch, diffusion_batch, Pass, TrainBatch};
pub use mix_scale::{BlockSizeDistribution, ResolvedBlockSizes};
pub use trainer::{StepReport, Trainer, TrainerConfig, TrainingState};
