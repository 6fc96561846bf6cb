//! # did-core
//!
//! The math of block discrete diffusion language models (BD3-LM) and of the
//! *Diffusion in Diffusion* draft → remask → refine method, written once and
//! shared by every backend. `no_std` + `alloc`; the only dependencies are
//! `num-traits`, `half` and `libm`.
//!
//! | concept | module |
//! |---|---|
//! | masking schedules, NELBO weight, stratified `t`, clip-range search | [`schedule`] |
//! | forward process `x_0 → x_t` with rejection resampling | [`noise`] |
//! | structural attention masks and tile classification | [`mask`] |
//! | Philox4x32-10 counter-based RNG and its documented streams | [`rng`] |
//! | softmax, nucleus, f64 Gumbel-max, confidence, within-block updates (first-hitting, DDPM, confidence threshold, entropy bound, k per call) | [`sample`] |
//! | stage plans with a rule per stage, remasking (fixed or adaptive), the multi-stage driver, mix-scale training | [`refine`] |
//! | what a model must provide to the sampler | [`denoiser`] |
//! | the compute primitives a backend implements | [`backend`] |
//! | what data-parallel training needs from its ranks | [`collective`] |
//!
//! The entry point for an engine builder is [`refine::generate`]: implement
//! [`denoiser::Denoiser`] for your model and call it with a [`refine::StagePlan`].
//!
//! ```
//! use did_core::refine::StagePlan;
//! let plan: StagePlan = "4,1024:0.25".parse()?;
//! let plan = plan.resolve(1024)?;
//! assert_eq!(plan.stages().len(), 2);
//! # Ok::<(), did_core::Error>(())
//! ```
#![cfg_attr(not(feature = "std"), no_std)]
#![deny(missing_docs)]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod backend;
pub mod collective;
pub mod denoiser;
mod error;
pub mod mask;
pub mod model;
pub mod noise;
pub mod refine;
pub mod rng;
pub mod sample;
pub mod schedule;

pub use error::Error;

/// GPT-2's `<|endoftext|>`: the BOS at position 0 and the separator between documents.
pub const GPT2_EOS: u32 = 50256;
/// The `[MASK]` token appended to the GPT-2 vocabulary.
pub const GPT2_MASK: u32 = 50257;
/// GPT-2's 50,257 tokens plus `[MASK]`.
pub const GPT2_VOCAB_WITH_MASK: usize = 50258;
