//! Crash safety: `did train` killed with SIGKILL at many random moments —
//! some of them while a checkpoint is being written — and resumed each time
//! always has a loadable checkpoint, never goes back to an earlier step, and
//! ends with the loss trajectory and the weights of an uninterrupted run, bit
//! for bit. Then the faults: a NaN in the loss, an unwritable checkpoint.
//!
//! `DID_KILL_RUNS=N` changes the number of kills (default 24; the run gets
//! `max(100, 5·N)` steps, more when steps are fast enough that N killed runs
//! could finish them).

mod common;
use common::{did, losses, scratch, setup};

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn train_args(data: &Path, model: &Path, out: &Path, resume: bool) -> Vec<String> {
    train_steps(data, model, out, resume, "40")
}

fn train_steps(data: &Path, model: &Path, out: &Path, resume: bool, steps: &str) -> Vec<String> {
    let mut a: Vec<String> = [
        "train",
        "--data",
        data.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--objective",
        "mix-scale",
        "--steps",
        steps,
        "--batch",
        "2",
        "--checkpoint-every",
        "1",
        "--keep",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec();
    if resume {
        a.push("--resume".into());
    }
    a
}

fn spawn(args: &[String]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_did"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("did starts")
}

fn checkpoints(out: &Path) -> Vec<(u32, PathBuf)> {
    did_engine::checkpoint::list(out)
}

/// Whether a checkpoint's temporary file was written to since `since` (a
/// stale one, left by an earlier kill, does not count).
fn writing(out: &Path, since: std::time::SystemTime) -> bool {
    std::fs::read_dir(out)
        .map(|d| {
            d.flatten().any(|e| {
                e.path().to_string_lossy().ends_with(".tmp")
                    && e.metadata()
                        .and_then(|m| m.modified())
                        .is_ok_and(|t| t >= since)
            })
        })
        .unwrap_or(false)
}

/// A small deterministic generator for the kill moments (reproducible failures).
struct Lcg(u64);
impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

#[test]
fn sigkill_at_random_moments_loses_nothing_and_resumes_bit_for_bit() {
    let dir = scratch("kill9");
    let (data, model) = setup(&dir);
    let kills_wanted: usize = std::env::var("DID_KILL_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24);
    // A run makes a few steps before it is killed (it lives at most ≈ 0.3 s): leave room for
    // every kill. The uninterrupted reference run measures how fast a step is, and is run again
    // with more steps when the killed runs could otherwise finish the training.
    let mut steps = (5 * kills_wanted).max(100);
    let reference = dir.join("reference");
    loop {
        let _ = std::fs::remove_dir_all(&reference);
        let t0 = Instant::now();
        let (code, _, err) =
            did(
                &train_steps(&data, &model, &reference, false, &steps.to_string())
                    .iter()
                    .map(String::as_str)
                    .collect::<Vec<_>>(),
            );
        assert_eq!(code, 0, "{err}");
        let per_step = t0.elapsed().as_secs_f64() / steps as f64;
        let needed = (kills_wanted as f64 * 0.5 / per_step).ceil() as usize;
        if needed <= steps {
            break;
        }
        steps = needed.min(50_000);
    }
    let steps = steps.to_string();

    let out = dir.join("killed");
    let mut rng = Lcg(0x5eed_1234);
    let (mut runs, mut kills, mut during_write, mut lost) = (0, 0, 0, 0);
    let mut newest = 0u32;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let resume = !checkpoints(&out).is_empty();
        let spawned = std::time::SystemTime::now();
        let mut child = spawn(&train_steps(&data, &model, &out, resume, &steps));
        runs += 1;
        // Kill only runs that have steps left to lose.
        if kills < kills_wanted && newest.to_string() != steps {
            // Alternate: kill the moment a checkpoint write is seen, or after a random delay.
            let t0 = Instant::now();
            let limit = Duration::from_millis(20 + rng.below(280));
            let at_write = runs % 2 == 0;
            while t0.elapsed() < limit && child.try_wait().unwrap().is_none() {
                if at_write && writing(&out, spawned) {
                    break;
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            if child.try_wait().unwrap().is_none() {
                child.kill().unwrap(); // SIGKILL
                child.wait().unwrap();
                kills += 1;
                if writing(&out, spawned) {
                    during_write += 1;
                }
            }
        } else {
            let status = child.wait().unwrap();
            assert!(status.success(), "the last, uninterrupted run failed");
        }
        // Every saved step is still there: the newest checkpoint loads and never goes back.
        if let Some((step, path)) = checkpoints(&out).pop() {
            let ckpt = did_engine::checkpoint::load(&path).unwrap_or_else(|e| {
                panic!("after kill {kills}: the newest checkpoint does not load: {e}")
            });
            assert_eq!(ckpt.step, step);
            if step < newest {
                lost += 1;
            }
            newest = newest.max(step);
        }
        if newest.to_string() == steps {
            assert!(
                kills >= kills_wanted,
                "training finished after {kills} kills; give the run more steps for {kills_wanted}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the kill loop did not finish in 10 minutes"
        );
    }
    eprintln!(
        "kill -9 harness: {runs} runs, {kills} kills ({during_write} while a checkpoint was being written), {lost} checkpoints lost"
    );
    assert_eq!(lost, 0);
    assert!(kills >= kills_wanted);
    // Half the runs are killed the moment a fresh temporary checkpoint appears: some must have been.
    assert!(during_write > 0, "no kill landed during a checkpoint write");
    // The trajectory and the final weights are those of the uninterrupted run.
    assert_eq!(
        losses(&out.join("metrics.jsonl")),
        losses(&reference.join("metrics.jsonl"))
    );
    let last = |d: &Path| did_engine::checkpoint::load(&checkpoints(d).pop().unwrap().1).unwrap();
    let (a, b) = (last(&out), last(&reference));
    assert_eq!(
        (a.params == b.params, a.ema == b.ema, a.moments == b.moments),
        (true, true, true)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_nan_in_the_loss_stops_with_the_step_named_and_keeps_the_last_good_checkpoint() {
    let dir = scratch("nan");
    let (data, model) = setup(&dir);
    let out = dir.join("run");
    let args = train_args(&data, &model, &out, false);
    let out_cmd = Command::new(env!("CARGO_BIN_EXE_did"))
        .args(&args)
        .env("DID_FAULT_NAN_AT_STEP", "5")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out_cmd.stderr);
    assert_eq!(out_cmd.status.code(), Some(2), "{err}");
    assert!(
        err.contains("step 5") && err.to_lowercase().contains("nan"),
        "{err}"
    );
    let (step, path) = checkpoints(&out)
        .pop()
        .expect("the checkpoints before the fault stay");
    assert_eq!(step, 4);
    assert_eq!(did_engine::checkpoint::load(&path).unwrap().step, 4);
    // The run continues from there once the fault is gone, and the switch itself is checked.
    let (code, _, err) = did(&train_args(&data, &model, &out, true)
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    assert_eq!(code, 0, "{err}");
    let fresh = train_args(&data, &model, &dir.join("fresh"), false);
    let bad = Command::new(env!("CARGO_BIN_EXE_did"))
        .args(&fresh)
        .env("DID_FAULT_NAN_AT_STEP", "soon")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not a step number"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_unwritable_checkpoint_or_output_folder_is_a_clear_error_and_keeps_earlier_checkpoints() {
    let dir = scratch("unwritable");
    let (data, model) = setup(&dir);
    // The output folder cannot be created: its parent is a file (fails for root too).
    let blocker = dir.join("a-file");
    std::fs::write(&blocker, "x").unwrap();
    let (code, _, err) = did(&train_args(&data, &model, &blocker.join("run"), false)
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    assert_eq!(code, 2);
    assert!(
        err.contains("cannot create the output folder") && err.contains("--out"),
        "{err}"
    );
    // Step 3's checkpoint cannot be written (a folder sits where its temporary file goes).
    let out = dir.join("run");
    std::fs::create_dir_all(out.join("ckpt-00000003.safetensors.tmp")).unwrap();
    let (code, _, err) = did(&train_args(&data, &model, &out, false)
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("cannot write the checkpoint")
            && err.contains("earlier checkpoints are untouched"),
        "{err}"
    );
    let (step, path) = checkpoints(&out).pop().unwrap();
    assert_eq!(step, 2);
    assert!(did_engine::checkpoint::load(&path).is_ok());
    let _ = std::fs::remove_dir_all(&dir);
}
