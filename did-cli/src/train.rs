//! `did train`: the run itself is did-engine's (`did_engine::training`); the CLI installs the
//! Ctrl-C handler the run polls, reads the fault-injection switch, starts or joins the ranks of a
//! data-parallel launch (docs/training.md), and prints the summary.

use std::ops::Range;
use std::time::Duration;

use did_core::backend::Backend;
use did_core::collective::{Collective, CollectiveError, DataParallel};
use did_engine::launch::{rendezvous, Placement, Session, TcpCollective};
pub use did_engine::training::{Objective, TrainOptions};

/// `DID_FAULT_NAN_AT_STEP=N`: the fault-injection switch of the reliability tests (a NaN enters
/// the loss at optimizer step N; docs/reliability.md).
pub fn fault_nan_at_step() -> Result<Option<u32>, String> {
    match std::env::var("DID_FAULT_NAN_AT_STEP") {
        Err(_) => Ok(None),
        Ok(v) => v.trim().parse().map(Some).map_err(|_| {
            format!(
                "DID_FAULT_NAN_AT_STEP={v:?} is not a step number; unset it for normal training"
            )
        }),
    }
}

/// Runs training with Ctrl-C as its stop (a checkpoint after the current step); returns the
/// summary printed at the end.
pub fn train<B: Backend>(be: &B, opts: &TrainOptions) -> Result<String, String> {
    crate::interrupt::install();
    let opts = TrainOptions {
        stop: crate::interrupt::requested,
        ..opts.clone()
    };
    Ok(did_engine::training::train(be, &opts)?.to_string())
}

/// A backend that can train as one rank of many: what rank 0 hands every rank at the rendezvous,
/// and the collective the ranks sum through.
pub trait RankBackend: Backend + Sized {
    /// The sums between ranks.
    type Ranks: Collective<Self>;
    /// Rank 0's bytes for the other ranks (NCCL's unique id; nothing for TCP).
    fn rendezvous_bytes(&self) -> Result<Vec<u8>, String>;
    /// The collective over a finished rendezvous.
    fn ranks(&self, session: Session, timeout: Duration) -> Result<Self::Ranks, String>;
}

impl RankBackend for did_backend_cpu::CpuBackend {
    type Ranks = TcpCollective;
    fn rendezvous_bytes(&self) -> Result<Vec<u8>, String> {
        Ok(Vec::new())
    }
    fn ranks(&self, session: Session, timeout: Duration) -> Result<TcpCollective, String> {
        TcpCollective::new(session, timeout).map_err(|e| e.to_string())
    }
}

impl RankBackend for did_backend_cuda::CudaBackend {
    type Ranks = did_backend_cuda::NcclCollective;
    fn rendezvous_bytes(&self) -> Result<Vec<u8>, String> {
        did_backend_cuda::nccl_unique_id()
    }
    fn ranks(&self, session: Session, timeout: Duration) -> Result<Self::Ranks, String> {
        let place = &session.place;
        did_backend_cuda::NcclCollective::new(
            self,
            place.rank,
            place.world,
            &session.payload,
            timeout,
        )
        .map_err(|e| e.to_string())
    }
}

/// `did train` as one rank of a launch (`placement` from the environment), or alone: the ranks
/// meet at `MASTER_ADDR:MASTER_PORT` and sum their gradients (NCCL on GPUs, TCP on the CPU);
/// rank 0 prints the summary, the others nothing.
pub fn train_placed<B: RankBackend>(
    be: &B,
    opts: &TrainOptions,
    placement: Option<&Placement>,
    timeout: Duration,
) -> Result<String, String> {
    let Some(place) = placement.filter(|p| p.world > 1) else {
        return train(be, opts);
    };
    crate::interrupt::install();
    let bytes = if place.rank == 0 {
        be.rendezvous_bytes()?
    } else {
        Vec::new()
    };
    let session = rendezvous(place, &bytes, timeout)?;
    let mut comm = DiesAt {
        inner: be.ranks(session, timeout)?,
        sums_left: fault_exit_at_sum()?,
    };
    let opts = TrainOptions {
        stop: crate::interrupt::requested,
        ..opts.clone()
    };
    let summary = did_engine::training::train_with(be, &opts, &mut comm)?;
    Ok(if place.rank == 0 {
        format!("{} ranks: {summary}", place.world)
    } else {
        String::new()
    })
}

/// `DID_FAULT_EXIT_AT_SUM=N` (with `DID_FAULT_RANK=R`, default 1): the fault-injection switch of
/// the data-parallel tests: rank R's process exits (code 9, no clean-up) as it finishes its N-th
/// step's gradient sums, as a crashed rank would (docs/reliability.md).
fn fault_exit_at_sum() -> Result<Option<u64>, String> {
    let var = |name: &str| std::env::var(name).ok();
    let Some(n) = var("DID_FAULT_EXIT_AT_SUM") else {
        return Ok(None);
    };
    let parse = |name: &str, v: &str| {
        v.trim()
            .parse::<u64>()
            .map_err(|_| format!("{name}={v:?} is not a number; unset it for normal training"))
    };
    let n = parse("DID_FAULT_EXIT_AT_SUM", &n)?;
    let rank = var("DID_FAULT_RANK").map_or(Ok(1), |r| parse("DID_FAULT_RANK", &r))?;
    let me = var("RANK").and_then(|r| r.parse::<u64>().ok());
    Ok((me == Some(rank)).then_some(n))
}

/// A collective whose process dies at a chosen gradient sum ([`fault_exit_at_sum`]).
struct DiesAt<C> {
    inner: C,
    sums_left: Option<u64>,
}

impl<B: Backend, C: Collective<B>> Collective<B> for DiesAt<C> {
    fn place(&self) -> DataParallel {
        self.inner.place()
    }
    fn all_reduce_sum(
        &mut self,
        be: &B,
        buf: &mut B::Buffer,
        range: Range<usize>,
    ) -> Result<(), CollectiveError> {
        self.inner.all_reduce_sum(be, buf, range)
    }
    fn start_sum(
        &mut self,
        be: &B,
        buf: &mut B::Buffer,
        range: Range<usize>,
    ) -> Result<(), CollectiveError> {
        self.inner.start_sum(be, buf, range)
    }
    /// A step's gradient sums end here, so the N-th call is the N-th step's.
    fn finish_sums(&mut self, be: &B, buf: &mut B::Buffer) -> Result<(), CollectiveError> {
        if let Some(n) = self.sums_left.as_mut() {
            *n = n.saturating_sub(1);
            if *n == 0 {
                std::process::exit(9);
            }
        }
        self.inner.finish_sums(be, buf)
    }
    fn all_reduce_host(&mut self, values: &mut [f64]) -> Result<(), CollectiveError> {
        self.inner.all_reduce_host(values)
    }
    fn broadcast(
        &mut self,
        be: &B,
        buf: &mut B::Buffer,
        len: usize,
        root: usize,
    ) -> Result<(), CollectiveError> {
        self.inner.broadcast(be, buf, len, root)
    }
    fn barrier(&mut self) -> Result<(), CollectiveError> {
        Collective::<B>::barrier(&mut self.inner)
    }
}

/// `did train --gpus N`: starts N copies of this command as ranks 0..N of one node (rank r on
/// device r), with the variables `torchrun` would set, and waits for them. When a rank fails the
/// others are stopped at once (checkpoints are written atomically, so none is lost) and the error
/// names the rank; `--resume` continues.
pub fn launch_local(n: usize, args: &[String]) -> Result<String, String> {
    if n == 0 {
        return Err("--gpus 0: start at least one rank".into());
    }
    let exe = std::env::current_exe()
        .map_err(|e| format!("cannot find the did executable to start the ranks: {e}"))?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("cannot find a free port for the rendezvous: {e}"))?
        .port();
    let child_args = without_gpus_flag(args);
    // Ctrl-C reaches every rank of the terminal's process group; this process waits for them.
    crate::interrupt::install();
    let mut ranks = Vec::with_capacity(n);
    for rank in 0..n {
        let child = std::process::Command::new(&exe)
            .args(&child_args)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", n.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("LOCAL_WORLD_SIZE", n.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .spawn();
        match child {
            Ok(c) => ranks.push(c),
            Err(e) => {
                ranks.iter_mut().for_each(|c| drop(c.kill()));
                return Err(format!("cannot start rank {rank}: {e}"));
            }
        }
    }
    let mut left: Vec<usize> = (0..n).collect();
    loop {
        // Every rank that has ended since the last look; a failure that is not did's own error
        // exit (2: a rank that saw another leave) is the likelier cause, so it is named first.
        let mut failed: Vec<(usize, std::process::ExitStatus)> = Vec::new();
        left.retain(|&r| match ranks[r].try_wait() {
            Ok(Some(status)) => {
                if !status.success() {
                    failed.push((r, status));
                }
                false
            }
            _ => true,
        });
        failed.sort_by_key(|(r, status)| (status.code() == Some(2), *r));
        if let Some(&(r, status)) = failed.first() {
            for &o in &left {
                let _ = ranks[o].kill();
                let _ = ranks[o].wait();
            }
            let others: Vec<String> = failed[1..]
                .iter()
                .map(|(o, s)| format!("rank {o}: {s}"))
                .collect();
            let also = if others.is_empty() {
                String::new()
            } else {
                format!(" (then {})", others.join(", "))
            };
            return Err(format!(
                "rank {r} of {n} failed ({status}){also}; the other ranks were stopped. The ranks' errors are above; continue with the same command and --resume"
            ));
        }
        if left.is_empty() {
            return Ok(String::new());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether this node has the `n` GPUs `--gpus n` asks for (`probe`: the CUDA backend's count of
/// devices, or why there is none), before any rank starts.
pub fn enough_gpus(n: usize, probe: Result<usize, String>) -> Result<(), String> {
    match probe {
        Ok(have) if have >= n => Ok(()),
        Ok(have) => Err(format!(
            "--gpus {n}: this node has {have} GPU(s); ask for at most {have}, or launch on more nodes with torchrun or srun"
        )),
        Err(why) => Err(format!("--gpus {n} with --backend cuda: {why}")),
    }
}

/// `args` without `--gpus N` / `--gpus=N` (and its alias `--ranks`).
fn without_gpus_flag(args: &[String]) -> Vec<String> {
    let mut out = Vec::with_capacity(args.len());
    let mut skip = false;
    for a in args {
        if std::mem::take(&mut skip) {
            continue;
        }
        match a.as_str() {
            "--gpus" | "--ranks" => skip = true,
            _ if a.starts_with("--gpus=") || a.starts_with("--ranks=") => {}
            _ => out.push(a.clone()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn more_ranks_than_gpus_is_refused_before_any_starts() {
        assert!(enough_gpus(2, Ok(2)).is_ok());
        let e = enough_gpus(4, Ok(2)).unwrap_err();
        assert!(
            e.contains("this node has 2 GPU(s)") && e.contains("at most 2"),
            "{e}"
        );
        let e = enough_gpus(2, Err("the driver sees no GPU".into())).unwrap_err();
        assert!(e.contains("the driver sees no GPU"), "{e}");
    }

    #[test]
    fn the_ranks_run_the_command_without_the_launch_flag() {
        let args: Vec<String> = [
            "train",
            "--gpus",
            "2",
            "--steps",
            "3",
            "--ranks=4",
            "--out",
            "o",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            without_gpus_flag(&args),
            ["train", "--steps", "3", "--out", "o"]
        );
    }
}
