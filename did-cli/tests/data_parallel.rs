//! `did train` on several ranks (processes, over TCP on the CPU): `--gpus 2` against one process
//! accumulating 2 micro-batches (the same global batch, docs/training.md), a resume on another
//! world size, and a rank that dies.

mod common;
use common::{did, losses, scratch, setup};

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn train_args<'a>(data: &'a Path, model: &'a Path, out: &'a Path, steps: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--data",
        data.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--objective",
        "mix-scale",
        "--blocks",
        "4:0.5,L:0.5",
        "--batch",
        "2",
        "--steps",
        steps,
        "--checkpoint-every",
        "3",
        "--out",
        out.to_str().unwrap(),
    ]
}

fn loss_values(metrics: &Path) -> Vec<f64> {
    losses(metrics)
        .iter()
        .map(|l| l.split(':').nth(1).unwrap().parse().unwrap())
        .collect()
}

#[test]
fn two_ranks_train_as_one_rank_accumulating_two_and_resume_on_one() {
    let dir = scratch("dp");
    let (data, model) = setup(&dir);
    let (dp, single) = (dir.join("dp"), dir.join("single"));
    let mut args = train_args(&data, &model, &dp, "6");
    args.extend(["--gpus", "2", "--rank-timeout", "60"]);
    let (code, out, err) = did(&args);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("2 ranks: trained") && out.matches("trained").count() == 1,
        "{out}"
    );
    let mut args = train_args(&data, &model, &single, "6");
    args.extend(["--accumulate", "2"]);
    let (code, _, err) = did(&args);
    assert_eq!(code, 0, "{err}");

    // Rank 0 alone wrote: one line a step, and the checkpoints of steps 3 and 6.
    let (a, b) = (
        loss_values(&dp.join("metrics.jsonl")),
        loss_values(&single.join("metrics.jsonl")),
    );
    assert_eq!(a.len(), 6);
    assert_eq!(
        a[0].to_bits(),
        b[0].to_bits(),
        "the first step's batches differ"
    );
    for (x, y) in a.iter().zip(&b) {
        assert!(
            (x - y).abs() <= 1e-6 * y.abs(),
            "losses {a:?} against {b:?}"
        );
    }
    let ckpts: Vec<_> = std::fs::read_dir(&dp)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    assert_eq!(ckpts.len(), 2, "{ckpts:?}");

    // A start that fails on rank 0 (checkpoints there, no --resume) stops every rank, each saying
    // why, and writes nothing.
    let mut args = train_args(&data, &model, &dp, "8");
    args.extend(["--gpus", "2", "--rank-timeout", "60"]);
    let (code, _, err) = did(&args);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("already holds checkpoints") && err.contains("rank(s) [0] could not start"),
        "{err}"
    );
    assert_eq!(loss_values(&dp.join("metrics.jsonl")).len(), 6);

    // The checkpoint knows nothing of the world: one process accumulating 2 continues it.
    let mut args = train_args(&data, &model, &dp, "8");
    args.extend(["--accumulate", "2", "--resume"]);
    let (code, out, err) = did(&args);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("for 2 steps (now at step 8)"), "{out}");
    assert_eq!(loss_values(&dp.join("metrics.jsonl")).len(), 8);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_rank_that_dies_stops_the_others_with_its_name() {
    let dir = scratch("dp-fault");
    let (data, model) = setup(&dir);
    let out = dir.join("run");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // As torchrun would start them: rank 1 dies entering its 4th gradient sum (step 4).
    let mut args = train_args(&data, &model, &out, "10");
    args.extend(["--rank-timeout", "20"]);
    let started = Instant::now();
    let ranks: Vec<_> = (0..2)
        .map(|rank| {
            Command::new(env!("CARGO_BIN_EXE_did"))
                .args(&args)
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", "2")
                .env("LOCAL_RANK", rank.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .env("DID_FAULT_EXIT_AT_SUM", "4")
                .output_async()
        })
        .collect();
    let outputs: Vec<_> = ranks
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    assert!(started.elapsed() < Duration::from_secs(60));
    assert_eq!(outputs[1].status.code(), Some(9));
    let err = String::from_utf8_lossy(&outputs[0].stderr);
    assert_eq!(outputs[0].status.code(), Some(2), "{err}");
    assert!(
        err.contains("rank 1 left") && err.contains("--resume"),
        "{err}"
    );
    // What rank 0 saved before stays: the checkpoint of step 3, and --resume continues from it.
    assert!(out.join("ckpt-00000003.safetensors").exists());

    // Under `--gpus`, the launcher names the rank and stops the rest.
    let launched_out = dir.join("launched");
    let mut args = train_args(&data, &model, &launched_out, "10");
    args.extend(["--gpus", "2", "--rank-timeout", "20"]);
    let launched = Command::new(env!("CARGO_BIN_EXE_did"))
        .args(&args)
        .env("DID_FAULT_EXIT_AT_SUM", "2")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&launched.stderr);
    assert_eq!(launched.status.code(), Some(2), "{err}");
    assert!(
        err.contains("rank 1 of 2 failed") && err.contains("--resume"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `Command::spawn` with piped output, for processes that must run side by side.
trait SpawnPiped {
    fn output_async(&mut self) -> std::process::Child;
}

impl SpawnPiped for Command {
    fn output_async(&mut self) -> std::process::Child {
        self.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    }
}

#[test]
fn gpus_on_a_machine_without_cuda_is_refused_before_any_rank_starts() {
    if did_backend_cuda::cuda_available() {
        return; // a GPU machine: the ranks would start
    }
    let dir = scratch("dp-nocuda");
    let (data, model) = setup(&dir);
    let out = dir.join("run");
    let mut args = vec!["--backend", "cuda"];
    args.extend(train_args(&data, &model, &out, "2"));
    args.extend(["--gpus", "2"]);
    let (code, _, err) = did(&args);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--gpus 2 with --backend cuda"), "{err}");
    assert!(
        err.contains("was not found") || err.contains("no GPU") || err.contains("no usable GPU"),
        "{err}"
    );
    assert!(!out.exists(), "a rank started");
    let _ = std::fs::remove_dir_all(&dir);
}
