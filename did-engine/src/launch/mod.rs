//! Starting a data-parallel run the way clusters start PyTorch's: where this process sits
//! ([`Placement`], from `torchrun`'s or SLURM's variables), a TCP rendezvous at
//! `MASTER_ADDR:MASTER_PORT` that checks every rank arrived with the same world size and hands
//! them rank 0's bytes (NCCL's unique id) ([`rendezvous`]), and the ranks' sums over those
//! connections for backends without NCCL ([`tcp::TcpCollective`]).

pub mod placement;
pub mod rendezvous;
pub mod tcp;

pub use placement::Placement;
pub use rendezvous::{rendezvous, Session};
pub use tcp::TcpCollective;
