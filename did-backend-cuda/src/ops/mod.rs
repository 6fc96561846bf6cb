//! The host side of each op family of [`did_core::backend::Backend`], one file a family, beside
//! the `.cu` sources in `kernels/` that they launch.

pub(crate) mod activation;
pub(crate) mod attention;
pub(crate) mod draw;
pub(crate) mod fused;
pub(crate) mod linear;
pub(crate) mod loss;
pub(crate) mod memory;
pub(crate) mod norm;
pub(crate) mod optim;
pub(crate) mod recording;
