//! # did-backend-cuda
//!
//! The CUDA backend: every [`Backend`] op on an NVIDIA GPU through cudarc,
//! with kernels compiled at run time by NVRTC for the device (once per
//! process, [`kernels`]) and matmuls through cuBLAS strided-batched GEMM.
//!
//! - **Two precisions** ([`Precision`]): `F32` (every buffer f32, TF32 off:
//!   checked against the CPU backend at rtol ≈ 1e-4) and `Bf16` (buffers
//!   stored as bf16, all arithmetic and GEMM accumulation in f32).
//! - **Deterministic**: reductions go in a fixed order and no float is
//!   accumulated with atomics (the token-drawing kernel adds integers, whose
//!   sum does not depend on order), so the same seed gives bit-identical
//!   results run after run on the same GPU.
//! - **Dynamic loading**: the crate builds with no CUDA installed. Without the
//!   libraries or a device, [`CudaBackend::new`] returns
//!   [`CudaError::Unavailable`] naming what is missing; [`cuda_available`]
//!   asks first without touching a missing library.
//!
//! ```
//! use did_backend_cuda::{cuda_available, CudaBackend, Precision};
//! use did_core::backend::prelude::*;
//! use did_core::backend::{Gemm, Slice, SliceMut};
//! if !cuda_available() {
//!     return Ok(()); // this machine has no GPU
//! }
//! let gpu = CudaBackend::new(0, Precision::F32)?;
//! let x = gpu.upload(&[1.0, 2.0, 3.0, 4.0])?; // [2, 2]
//! let w = gpu.upload(&[1.0, 0.0, 0.0, 1.0])?; // identity, [out, in]
//! let mut y = gpu.zeros(4)?;
//! gpu.matmul(&Gemm::linear(2, 2, 2), Slice::whole(&x), Slice::whole(&w), SliceMut::whole(&mut y))?;
//! let mut host = [0.0; 4];
//! gpu.download(Slice::whole(&y), &mut host)?;
//! assert_eq!(host, [1.0, 2.0, 3.0, 4.0]);
//! # Ok::<(), did_backend_cuda::CudaError>(())
//! ```

#![deny(missing_docs)]

mod available;
mod buffer;
pub mod counters;
mod device;
pub mod draw;
mod error;
pub mod few_rows;
pub mod kernel;
pub mod kernels;
pub mod key_split;
mod launch;
pub mod nccl;
mod ops;
mod options;
pub mod rows_by_id;

pub use available::{cuda_available, probe};
pub use buffer::{CudaBuffer, CudaIds, LOGITS_ROW_ALIGNMENT};
pub use device::{AttentionKernel, CudaBackend, Precision};
pub use draw::DrawLocation;
pub use error::CudaError;
pub use key_split::KeySplit;
pub use nccl::{nccl_available, nccl_unique_id, NcclCollective};
pub use options::CudaOptions;
