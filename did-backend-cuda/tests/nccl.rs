//! NCCL between ranks on threads, each with its own `CudaBackend` (rank r on device r when there
//! are several, or all on device 0 for a world of one): sums (whole and bucketed), broadcasts and
//! host sums reach every rank with the same bits (docs/training.md). The trainer over NCCL is
//! checked end to end by `scripts/gpu-check.sh`: `did train --gpus 2` against `--accumulate 2`.
//! Skips without CUDA or NCCL, unless DID_REQUIRE_CUDA=1 (`scripts/gpu-check.sh`), which also
//! requires NCCL.

mod common;

use std::time::Duration;

use did_backend_cuda::{nccl_available, nccl_unique_id, CudaBackend, NcclCollective, Precision};
use did_core::backend::prelude::*;
use did_core::backend::{Slice, SliceMut};
use did_core::collective::Collective;

fn nccl(test: &str) -> Option<usize> {
    if !common::gpu(test) {
        return None;
    }
    if !nccl_available() {
        assert!(
            std::env::var("DID_REQUIRE_CUDA").as_deref() != Ok("1"),
            "DID_REQUIRE_CUDA=1 but NCCL (libnccl.so.2) is missing for {test}"
        );
        eprintln!("SKIP (no NCCL): {test}");
        return None;
    }
    did_backend_cuda::probe().ok()
}

/// Runs `world` ranks on threads (rank r on device r % devices); each returns `rank_fn`'s value.
fn ranks<T: Send>(
    world: usize,
    devices: usize,
    rank_fn: impl Fn(usize, &CudaBackend, &mut NcclCollective) -> T + Sync,
) -> Vec<T> {
    let id = nccl_unique_id().unwrap();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let (id, rank_fn) = (&id, &rank_fn);
                s.spawn(move || {
                    let be = CudaBackend::new(rank % devices, Precision::F32).unwrap();
                    let mut comm =
                        NcclCollective::new(&be, rank, world, id, Duration::from_secs(60)).unwrap();
                    rank_fn(rank, &be, &mut comm)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn sums_and_broadcasts(world: usize, devices: usize) {
    let got = ranks(world, devices, |rank, be, comm| {
        let mut grads = be.upload(&[rank as f32 + 0.5, -1.0]).unwrap();
        comm.all_reduce_sum(be, &mut grads, 0..2).unwrap();
        let mut weights = be.upload(&[rank as f32; 3]).unwrap();
        comm.broadcast(be, &mut weights, 3, world - 1).unwrap();
        // Buckets started out of order and left in flight while the backend's stream works on
        // the same buffer elsewhere; the middle value is no bucket's and stays this rank's.
        let mut buckets = be.upload(&[1.0, 2.0, rank as f32, 3.0, 4.0]).unwrap();
        comm.start_sum(be, &mut buckets, 3..5).unwrap();
        comm.start_sum(be, &mut buckets, 0..2).unwrap();
        be.fill(SliceMut::at(&mut buckets, 2), 1, 10.0 + rank as f32)
            .unwrap();
        comm.finish_sums(be, &mut buckets).unwrap();
        let mut b = [0.0f32; 5];
        be.download(Slice::whole(&buckets), &mut b).unwrap();
        let n = world as f32;
        assert_eq!(b, [n, 2.0 * n, 10.0 + rank as f32, 3.0 * n, 4.0 * n]);
        let mut host = [rank as f64, 1.0];
        Collective::<CudaBackend>::all_reduce_host(comm, &mut host).unwrap();
        Collective::<CudaBackend>::barrier(comm).unwrap();
        let (mut g, mut w) = ([0.0f32; 2], [0.0f32; 3]);
        be.download(Slice::whole(&grads), &mut g).unwrap();
        be.download(Slice::whole(&weights), &mut w).unwrap();
        (g, w, host)
    });
    let n = world as f32;
    for (g, w, host) in &got {
        assert_eq!(g[0], (0..world).map(|r| r as f32 + 0.5).sum::<f32>());
        assert_eq!(g[1], -n);
        assert_eq!(*w, [(world - 1) as f32; 3]);
        assert_eq!(
            *host,
            [(0..world).map(|r| r as f64).sum::<f64>(), world as f64]
        );
        assert_eq!(
            g.map(f32::to_bits),
            got[0].0.map(f32::to_bits),
            "ranks got different bits"
        );
    }
}

#[test]
fn a_world_of_one_sums_to_itself() {
    let Some(_) = nccl("a_world_of_one_sums_to_itself") else {
        return;
    };
    sums_and_broadcasts(1, 1);
}

#[test]
fn two_gpus_sum_and_broadcast_alike() {
    let Some(devices) = nccl("two_gpus_sum_and_broadcast_alike") else {
        return;
    };
    if devices < 2 {
        eprintln!("SKIP (one GPU): two_gpus_sum_and_broadcast_alike");
        return;
    }
    sums_and_broadcasts(2, devices);
}
