//! Sampling: from logits to a token and its confidence, and the within-block
//! updates of block diffusion.
//!
//! - [`probs`]: SUBS probabilities in f64 (the model never predicts `[MASK]`);
//! - [`nucleus`]: top-p filtering with BD3-LM's exact boundary rule;
//! - [`categorical`]: f64 Gumbel-max draws from Philox streams, and the
//!   snapshot confidences of the drawn token;
//! - [`update`]: the updates inside a block: first-hitting, DDPM-caching, and the
//!   parallel ones (confidence threshold, entropy bound, k per call);
//! - [`parallel`]: which draws a parallel update keeps;
//! - [`stop`]: the end of a variable-length sample and the entropy check.

pub mod batch;
pub mod categorical;
pub mod nucleus;
pub mod parallel;
pub mod probs;
pub mod stop;
pub mod update;

pub use batch::{SequenceBatch, SequenceId};
pub use categorical::{draw_token, Confidence, ConfidenceKind, DrawSpec, SampledToken};
pub use nucleus::{Nucleus, NucleusRule};
pub use update::{BlockUpdate, SamplerConfig, UPDATE_RULES};
