//! The reference CPU backend of `did`.
//!
//! It will implement [`did_core::backend::Backend`] in f32 with ndarray and
//! matrixmultiply, and serve as the oracle for the CUDA backend's
//! differential tests. The implementation is the subject of the transformer
//! issue; until then this crate only fixes its place in the workspace.

pub use did_core;
