//! The Diffusion-in-Diffusion method: draft with small blocks, remask the
//! least confident tokens, refine them with a large block.
//!
//! - [`plan`]: the stage-plan grammar and its checks;
//! - [`remask`]: which tokens are remasked (snapshot, post-hoc, random; a fixed fraction
//!   or every score below a threshold; global or per block);
//! - [`driver`]: [`generate`], the multi-stage loop over any [`crate::denoiser::Denoiser`]
//!   (mix-scale training, which teaches one network both scales, is in `crate::model::training`).

pub mod driver;
pub mod plan;
pub mod remask;

pub use driver::{
    generate, generate_each, generate_observed, GenerateConfig, GenerateError, Generation,
    Progress, StageReport,
};
pub use plan::{BlockSpec, ResolvedPlan, Stage, StagePlan, StageSpec};
pub use remask::{remask_count, select_lowest, RemaskAmount, RemaskScope, RemaskStrategy};
