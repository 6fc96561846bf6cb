//! `did import`: checkpoints trained elsewhere as `did` checkpoints. Each
//! architecture's importer ([`gpt2`], [`bd3lm`]) maps names and shapes; the
//! [`weights`] module reads the tensors from whichever file holds them.

mod bd3lm;
mod gpt2;
pub mod torch_pickle;
pub mod weights;

pub use bd3lm::{bd3lm, bd3lm_from_bytes, bd3lm_from_tensors, import_bd3lm, Bd3lmOptions};
pub use gpt2::{gpt2, gpt2_from_bytes, gpt2_from_tensors, import_gpt2};
