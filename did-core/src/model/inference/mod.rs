//! Inference: the forward without saved activations, with or without the KV cache
//! ([`kv_cache`]), the pass itself ([`pass`]), the diffusion model as the sampler's `Denoiser`
//! ([`denoiser`]), several denoisers' block calls run as one ([`together`]) and the causal
//! model's sampler ([`causal`]).

pub(crate) mod causal;
pub(crate) mod denoiser;
pub(crate) mod kv_cache;
pub(crate) mod pass;
pub(crate) mod together;

pub use causal::{CausalGeneration, CausalSampler};
pub use denoiser::DiffusionDenoiser;
pub use kv_cache::KvCache;
pub use pass::Inference;
pub use together::JointRequest;
