//! What data-parallel training needs from the ranks it runs on: a sum of gradients over the
//! ranks, a broadcast of the starting state, a barrier, and the addressing that makes a world
//! of `W` ranks with `A` micro-batches each the same computation as one rank with `W·A`.
//!
//! A step's global batch is `world × accumulation × batch` sequences. Rank `r`'s micro-batch `i`
//! of optimizer step `s` is global micro-batch [`DataParallel::micro_step`]
//! `s·(W·A) + r·A + i`: its data windows, diffusion times, masks and dropout are those of that
//! micro-batch on a single rank accumulating `W·A`. Gradients are scaled by `1/(W·A)` and summed
//! over ranks in rank order, so every rank applies the same update and ends each step with the
//! same parameters (docs/training.md says what is bit-identical and what is not). The sums start
//! bucket by bucket during the last micro-batch's backward ([`Collective::start_sum`], the buckets
//! of `model::GradientBuckets`), so a GPU can sum one layer's gradients while it computes the next.
//!
//! [`SingleProcess`] is the world of one: every operation is a no-op, and a trainer stepping with
//! it is bit for bit the trainer without one. Implementations for many ranks live with their
//! transport: threads (did-engine's `InProcess`) and NCCL (did-backend-cuda).

use alloc::string::String;
use core::fmt;
use core::ops::Range;

use crate::backend::Backend;

/// Why a collective operation failed: what happened, which rank saw it, and the fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CollectiveError {
    /// The rank that reports the failure.
    pub rank: usize,
    /// What happened and what to do.
    pub message: String,
}

impl fmt::Display for CollectiveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rank {}: {}", self.rank, self.message)
    }
}

/// Where this process sits in a data-parallel world.
///
/// ```
/// use did_core::collective::DataParallel;
/// let rank1 = DataParallel { rank: 1, world: 2 };
/// // Step 3 with 2 micro-batches per rank: rank 1 runs global micro-batches 14 and 15.
/// assert_eq!((rank1.micro_step(3, 2, 0), rank1.micro_step(3, 2, 1)), (14, 15));
/// assert_eq!(DataParallel::SINGLE.micro_step(3, 4, 2), 14);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataParallel {
    /// This process's rank, `0..world`.
    pub rank: usize,
    /// How many ranks there are.
    pub world: usize,
}

impl DataParallel {
    /// The world of one.
    pub const SINGLE: DataParallel = DataParallel { rank: 0, world: 1 };

    /// The global index of this rank's micro-batch `micro` of optimizer `step` when every rank
    /// runs `accumulation` micro-batches: the stream index of its windows, times, masks and
    /// dropout.
    pub fn micro_step(&self, step: u32, accumulation: usize, micro: usize) -> u32 {
        let per_step = (accumulation * self.world) as u32;
        step.wrapping_mul(per_step)
            .wrapping_add((self.rank * accumulation + micro) as u32)
    }
}

/// The operations a data-parallel trainer needs from its ranks. Every rank calls the same
/// operations in the same order; a sum is in rank order, so all ranks get the same bits.
pub trait Collective<B: Backend> {
    /// This rank and the world's size.
    fn place(&self) -> DataParallel;

    /// Replaces `buf[range]` with its sum over the ranks.
    fn all_reduce_sum(
        &mut self,
        be: &B,
        buf: &mut B::Buffer,
        range: Range<usize>,
    ) -> Result<(), CollectiveError>;

    /// Starts replacing `buf[range]` with its sum over the ranks: the backward has finished
    /// writing it and goes on with other ranges (docs/training.md, "Overlapping the sums").
    /// The sum is complete when [`finish_sums`](Self::finish_sums) returns. The default sums at
    /// once; a GPU collective queues the sum on its own stream.
    fn start_sum(
        &mut self,
        be: &B,
        buf: &mut B::Buffer,
        range: Range<usize>,
    ) -> Result<(), CollectiveError> {
        self.all_reduce_sum(be, buf, range)
    }

    /// Waits for every sum [`start_sum`](Self::start_sum) started, before anything reads them.
    fn finish_sums(&mut self, be: &B, buf: &mut B::Buffer) -> Result<(), CollectiveError> {
        let _ = (be, buf);
        Ok(())
    }

    /// Replaces host values with their sum over the ranks (a step's loss and token counts,
    /// checksums).
    fn all_reduce_host(&mut self, values: &mut [f64]) -> Result<(), CollectiveError>;

    /// Replaces `len` values of `buf` with rank `root`'s.
    fn broadcast(
        &mut self,
        be: &B,
        buf: &mut B::Buffer,
        len: usize,
        root: usize,
    ) -> Result<(), CollectiveError>;

    /// Returns once every rank has called it.
    fn barrier(&mut self) -> Result<(), CollectiveError>;
}

/// The world of one: nothing to reduce, broadcast or wait for.
///
/// ```
/// use did_core::backend::Backend;
/// use did_core::collective::{Collective, DataParallel, SingleProcess};
/// fn place<B: Backend>() -> DataParallel {
///     <SingleProcess as Collective<B>>::place(&SingleProcess)
/// }
/// assert_eq!(DataParallel::SINGLE, DataParallel { rank: 0, world: 1 });
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SingleProcess;

impl<B: Backend> Collective<B> for SingleProcess {
    fn place(&self) -> DataParallel {
        DataParallel::SINGLE
    }

    fn all_reduce_sum(
        &mut self,
        _: &B,
        _: &mut B::Buffer,
        _: Range<usize>,
    ) -> Result<(), CollectiveError> {
        Ok(())
    }

    fn all_reduce_host(&mut self, _: &mut [f64]) -> Result<(), CollectiveError> {
        Ok(())
    }

    fn broadcast(
        &mut self,
        _: &B,
        _: &mut B::Buffer,
        _: usize,
        _: usize,
    ) -> Result<(), CollectiveError> {
        Ok(())
    }

    fn barrier(&mut self) -> Result<(), CollectiveError> {
        Ok(())
    }
}

/// A checksum of parameters for comparing ranks: FNV-1a over the bits, as two 32-bit halves
/// that an f64 sum over up to 2²¹ ranks carries exactly.
///
/// ```
/// let a = did_core::collective::checksum(&[1.0, 2.0]);
/// assert_eq!(a, did_core::collective::checksum(&[1.0, 2.0]));
/// assert_ne!(a, did_core::collective::checksum(&[1.0, 2.0000002]));
/// ```
pub fn checksum(values: &[f32]) -> [u32; 2] {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for v in values {
        for b in v.to_bits().to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    [(h >> 32) as u32, h as u32]
}
