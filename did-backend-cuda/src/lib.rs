//! The CUDA backend of `did`.
//!
//! It will implement [`did_core::backend::Backend`] with cudarc (dynamic
//! loading, so it builds on machines without CUDA), NVRTC-compiled kernels and
//! cuBLAS. The implementation is the subject of the CUDA backend issue; until
//! then this crate only fixes its place in the workspace.

pub use did_core;
