//! The network: its configuration ([`config`]), the flat parameter table ([`params`]), the
//! transformer's layers with their forward and backward ([`transformer`]), and the activations a
//! training step keeps ([`activations`]), and which gradients are final when ([`buckets`]).

pub(crate) mod activations;
pub(crate) mod buckets;
pub(crate) mod config;
pub(crate) mod params;
pub(crate) mod transformer;

pub use activations::{
    loss_rows_for, memory_report, memory_report_on, time_embedding, Activations, MemoryReport,
    StorageLayout, LOSS_CHUNK_ELEMENTS,
};
pub use buckets::{BackwardStage, GradientBuckets};
pub use config::{Architecture, ModelConfig, TIME_EMBEDDING_DIM};
pub use params::{BlockOffsets, Init, Layout, ParamEntry, ParamTable};
pub use transformer::{DropoutStreams, Transformer};
