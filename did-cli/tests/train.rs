//! End-to-end: prepare the excerpt, train a small model with checkpoints,
//! resume, and check that 2 × N resumed steps equal 2N straight steps bit for bit.

mod common;
use common::{did, losses, scratch, setup};

use std::path::{Path, PathBuf};
use std::process::Command;

#[test]
fn resume_continues_bit_for_bit() {
    let dir = scratch("resume");
    let (data, model) = setup(&dir);
    let common = |out: &Path, steps: &str| -> Vec<String> {
        [
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
            "--accumulate",
            "2",
            "--lr",
            "1e-3",
            "--warmup",
            "2",
            "--checkpoint-every",
            "3",
            "--valid-every",
            "3",
            "--valid-batches",
            "1",
            "--steps",
            steps,
            "--out",
            out.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let run = |args: Vec<String>| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, out, err) = did(&args);
        assert_eq!(code, 0, "{err}");
        out
    };
    let straight = dir.join("straight");
    let summary = run(common(&straight, "6"));
    assert!(summary.contains("for 6 steps"), "{summary}");
    assert!(summary.contains("validation loss"), "{summary}");
    let resumed = dir.join("resumed");
    run(common(&resumed, "3"));
    // Without --resume, an existing run is never overwritten.
    let args = common(&resumed, "6");
    let (code, _, err) = did(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, 2);
    assert!(err.contains("pass --resume"), "{err}");
    let mut args = common(&resumed, "6");
    args.push("--resume".into());
    let summary = run(args);
    assert!(summary.contains("for 3 steps (now at step 6)"), "{summary}");
    assert_eq!(
        losses(&straight.join("metrics.jsonl")),
        losses(&resumed.join("metrics.jsonl"))
    );
    let ckpts: Vec<_> = std::fs::read_dir(&resumed)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    assert_eq!(ckpts.len(), 2, "{ckpts:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_training_input_names_the_cause() {
    let dir = scratch("bad");
    let (data, model) = setup(&dir);
    let out = dir.join("out");
    let base = |extra: &[&str]| -> (i32, String) {
        let mut args = vec![
            "train",
            "--data",
            data.to_str().unwrap(),
            "--model",
            model.to_str().unwrap(),
            "--steps",
            "1",
            "--batch",
            "1",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let (code, _, err) = did(&args);
        (code, err)
    };
    for (extra, want) in [
        (&["--block", "5"][..], "must divide the length"),
        (&["--objective", "ar"][..], "gpt2 architecture"),
        (&["--objective", "gan"][..], "unknown objective"),
        (&["--length", "64"][..], "exceeds the model's context"),
        (&["--resume"][..], "no checkpoint"),
        (
            &["--model", "tiny", "--data", "/nonexistent"][..],
            "run `did data prepare` first",
        ),
        (
            &["--precision", "bf16"][..],
            "--precision bf16 needs --backend cuda",
        ),
    ] {
        let (code, err) = base(extra);
        assert_eq!(code, 2, "{extra:?}: {err}");
        assert!(err.contains(want), "{extra:?}: {err}");
    }
    // A GPT-2-vocabulary model on bytes data.
    std::fs::write(&model, "[model]\npreset = \"tiny\"\n").unwrap();
    let (code, err) = base(&[]);
    assert_eq!(code, 2);
    assert!(err.contains("vocabulary mismatch"), "{err}");
    // A corrupt checkpoint to resume from.
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(
        out.join("ckpt-00000001.safetensors"),
        b"\x08\x00\x00\x00\x00\x00\x00\x00{}",
    )
    .unwrap();
    let (code, err) = base(&["--model", "tiny", "--resume"]);
    assert_eq!(code, 2);
    assert!(err.contains("checkpoint"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn cuda_on_a_machine_without_it_names_what_is_missing() {
    if did_backend_cuda::cuda_available() {
        return; // a GPU machine: scripts/gpu-check.sh trains and samples there
    }
    let dir = scratch("no-cuda");
    let (data, model) = setup(&dir);
    let out = dir.join("run");
    let (code, _, err) = did(&[
        "--backend",
        "cuda",
        "train",
        "--data",
        data.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("CUDA is not available"), "{err}");
    assert!(
        err.contains("was not found") || err.contains("no GPU") || err.contains("no usable GPU"),
        "{err}"
    );
    assert!(
        !out.exists(),
        "nothing is written when the backend cannot start"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sample_with_weights_stored_in_bf16_and_int8() {
    let dir = scratch("weights");
    let (data, model) = setup(&dir);
    let ckpt = train_quickly(&data, &model, 2, 2, &dir.join("run"));
    let sample = |weights: &str, batch: &str| {
        let out = dir.join(format!("{weights}-{batch}.jsonl"));
        let (code, _, err) = did(&[
            "sample",
            "--checkpoint",
            ckpt.to_str().unwrap(),
            "--weights",
            weights,
            "--num-samples",
            "3",
            "--batch",
            batch,
            "--out",
            out.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "--weights {weights}: {err}");
        std::fs::read_to_string(&out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["tokens"].clone())
            .collect::<Vec<_>>()
    };
    for weights in ["bf16", "int8"] {
        let batched = sample(weights, "3");
        assert_eq!(batched.len(), 3);
        // Stored weights keep batch invariance to the bit: one at a time, the same tokens.
        assert_eq!(batched, sample(weights, "1"), "--weights {weights}");
    }
    let (code, _, err) = did(&[
        "sample",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--weights",
        "fp8",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("--weights") && err.contains("int8"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sample_with_every_remask_strategy() {
    let dir = scratch("sample");
    let (data, model) = setup(&dir);
    let ckpt = train_quickly(&data, &model, 2, 2, &dir.join("run"));
    for remask in [
        "snapshot",
        "snapshot-raw",
        "snapshot-max",
        "posthoc",
        "random",
    ] {
        let out = dir.join(format!("{remask}.jsonl"));
        let (code, stdout, err) = did(&[
            "sample",
            "--checkpoint",
            ckpt.to_str().unwrap(),
            "--stages",
            "4,L:0.25",
            "--remask",
            remask,
            "--num-samples",
            "3",
            "--batch",
            "2",
            "--prompt",
            "The",
            "--out",
            out.to_str().unwrap(),
            "--show-diff",
        ]);
        assert_eq!(code, 0, "{remask}: {err}");
        assert_eq!(stdout.matches("--- refined").count(), 3, "{stdout}");
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(&out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3);
        for l in &lines {
            // 32 positions, BOS + "The" pinned: floor(0.25 · 28) = 7 remasked, never a prompt position.
            let remasked: Vec<u64> = l["remasked"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap())
                .collect();
            assert_eq!(remasked.len(), 7, "{l}");
            assert!(remasked.iter().all(|&p| p >= 4), "{l}");
            assert!(l["text"].as_str().unwrap().starts_with("The"), "{l}");
            assert_eq!(l["nfe"].as_array().unwrap().len(), 2);
            // Each stage's time in the model, with its calls (post-hoc scoring's included).
            let stages = l["batch_stages"].as_array().unwrap();
            assert_eq!(stages.len(), 2, "{l}");
            for ((stage, (nfe, block)), own) in stages
                .iter()
                .zip(
                    l["batch_nfe"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .zip(l["block_sizes"].as_array().unwrap()),
                )
                .zip(l["nfe"].as_array().unwrap())
            {
                assert_eq!(&stage["calls"], nfe, "{l}");
                // A sample's own calls: those that asked for one of its positions.
                assert!(own.as_u64().unwrap() <= nfe.as_u64().unwrap(), "{l}");
                assert_eq!(&stage["block"], block, "{l}");
                let s = stage["model_s"].as_f64().unwrap();
                assert!(
                    s >= 0.0 && s <= l["wall_s"].as_f64().unwrap() * 2.0 + 1e-3,
                    "{l}"
                );
            }
        }
    }
    // A refine stage smaller than the length needs --local-final (the refine-block ablation).
    let local = dir.join("local.jsonl");
    let sample_local = |extra: &[&str]| {
        let mut args = vec![
            "sample",
            "--checkpoint",
            ckpt.to_str().unwrap(),
            "--stages",
            "4,16:0.25",
            "--out",
            local.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        did(&args)
    };
    let (code, _, err) = sample_local(&[]);
    assert_eq!(code, 2);
    assert!(err.contains("--stages") && err.contains("16"), "{err}");
    let (code, _, err) = sample_local(&["--local-final"]);
    assert_eq!(code, 0, "{err}");
    let l: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(&local).unwrap().trim()).unwrap();
    assert_eq!(l["block_sizes"], serde_json::json!([4, 16]), "{l}");
    // An adaptive plan: parallel rules in both stages, remasking by a confidence threshold.
    let adaptive = dir.join("adaptive.jsonl");
    let (code, _, err) = did(&[
        "sample",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--stages",
        "4@threshold:0.5,L:below:0.5:0.1..0.5@entropy:1",
        "--num-samples",
        "3",
        "--batch",
        "3",
        "--out",
        adaptive.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    for line in std::fs::read_to_string(&adaptive).unwrap().lines() {
        let l: serde_json::Value = serde_json::from_str(line).unwrap();
        let remasked = l["remasked"].as_array().unwrap().len();
        let confidence = l["confidence"].as_array().unwrap();
        assert!(confidence[0].is_null(), "{l}"); // the BOS was given
        assert!(
            confidence[1..]
                .iter()
                .all(|c| c.as_f64().is_some_and(|c| c > 0.0 && c <= 1.0)),
            "{l}"
        );
        // 31 drawn positions: between floor(0.1 · 31) = 3 and floor(0.5 · 31) = 15 remasked.
        assert!((3..=15).contains(&remasked), "{l}");
        let own: Vec<u64> = l["nfe"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        let batch: Vec<u64> = l["batch_nfe"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert!(
            own.iter().zip(&batch).all(|(o, b)| o <= b && *o >= 1),
            "{l}"
        );
    }
    for (extra, want) in [
        (&["--stages", "4,L:1.5"][..], "--stages"),
        (&["--stages", "5"][..], "--stages"),
        (&["--remask", "loudest"][..], "unknown --remask"),
        (&["--sampler", "ddpm:0"][..], "--sampler"),
        (
            &["--sampler", "fast"][..],
            "unknown rule; use first-hitting",
        ),
        (&["--stages", "4@entropy:-1,L:0.25"][..], "β = -1"),
        (
            &[
                "--prompt",
                "a prompt far longer than the thirty-two byte context of this model",
            ][..],
            "shorten --prompt",
        ),
        (&["--top-p", "0"][..], "--top-p"),
    ] {
        let mut args = vec!["sample", "--checkpoint", ckpt.to_str().unwrap()];
        args.extend_from_slice(extra);
        let (code, _, err) = did(&args);
        assert_eq!(code, 2, "{extra:?}");
        assert!(err.contains(want), "{extra:?}: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Presses Ctrl-C (SIGINT) on `child` once `file` has two lines; its exit code and stderr.
#[cfg(unix)]
fn ctrl_c_once_written(
    child: std::process::Child,
    file: &Path,
    what: &str,
) -> (Option<i32>, String) {
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(file)
        .map(|s| s.lines().count())
        .unwrap_or(0)
        < 2
    {
        assert!(t0.elapsed().as_secs() < 120, "{what} did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[cfg(unix)]
#[test]
fn ctrl_c_stops_sampling_between_calls_and_keeps_the_written_samples() {
    let dir = scratch("ctrlc-sample");
    let (data, model) = setup(&dir);
    let ckpt = train_quickly(&data, &model, 1, 1, &dir.join("run"));
    let out = dir.join("samples.jsonl");
    let child = Command::new(env!("CARGO_BIN_EXE_did"))
        .args(["sample", "--checkpoint", ckpt.to_str().unwrap()])
        .args(["--num-samples", "1000000", "--batch", "1"])
        .args(["--out", out.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (code, err) = ctrl_c_once_written(child, &out, "sampling");
    assert_eq!(code, Some(2), "{err}");
    // Ctrl-C can land between two batches, before the new one's first call.
    assert!(
        err.contains("interrupted after")
            && (err.contains("calls in") || err.contains("before its first model call")),
        "{err}"
    );
    // Every line written is a whole sample, and the message says where they are.
    let lines = std::fs::read_to_string(&out).unwrap();
    let n = lines.lines().count();
    for l in lines.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert!(v["tokens"].is_array(), "{l}");
    }
    assert!(
        err.contains(&format!("the {n} samples before this batch are in")),
        "{n} lines: {err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[cfg(unix)]
#[test]
fn ctrl_c_saves_and_exits_cleanly() {
    let dir = scratch("ctrlc");
    let (data, model) = setup(&dir);
    let run = dir.join("run");
    let child = Command::new(env!("CARGO_BIN_EXE_did"))
        .args([
            "train",
            "--data",
            data.to_str().unwrap(),
            "--model",
            model.to_str().unwrap(),
            "--steps",
            "100000",
            "--batch",
            "1",
            "--checkpoint-every",
            "100000",
        ])
        .args(["--out", run.to_str().unwrap()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (code, err) = ctrl_c_once_written(child, &run.join("metrics.jsonl"), "training");
    assert_eq!(code, Some(2), "{err}");
    let step: u32 = err
        .split("saved step ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{err}"));
    assert!(
        run.join(format!("ckpt-{step:08}.safetensors")).exists(),
        "{err}"
    );
    let steps = (step + 1).to_string();
    let (code, summary, err) = did(&[
        "train",
        "--data",
        data.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--steps",
        &steps,
        "--batch",
        "1",
        "--out",
        run.to_str().unwrap(),
        "--resume",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        summary.contains(&format!("now at step {}", step + 1)),
        "{summary}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Trains `model` on `data` for `steps` steps of `batch` into `out`; returns its last checkpoint.
fn train_quickly(data: &Path, model: &Path, steps: u32, batch: u32, out: &Path) -> PathBuf {
    let (steps, batch) = (steps.to_string(), batch.to_string());
    let (code, _, err) = did(&[
        "train",
        "--data",
        data.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--steps",
        &steps,
        "--batch",
        &batch,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    newest(out)
}

fn newest(run: &Path) -> PathBuf {
    let mut c: Vec<PathBuf> = std::fs::read_dir(run)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    c.sort();
    c.pop().unwrap()
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn eval_nelbo_gen_ppl_and_entropy() {
    let dir = scratch("eval");
    let (data, model) = setup(&dir);
    let judge_model = dir.join("judge.toml");
    std::fs::write(&judge_model, "[model]\narchitecture = \"gpt2\"\nvocab_size = 258\nmask_id = 257\nlayers = 1\nhidden = 32\nheads = 2\ncontext = 32\n").unwrap();
    for (m, objective, out) in [(&model, "bd3", "dit"), (&judge_model, "ar", "ar")] {
        let out = dir.join(out);
        let (code, _, err) = did(&[
            "train",
            "--data",
            data.to_str().unwrap(),
            "--model",
            m.to_str().unwrap(),
            "--objective",
            objective,
            "--steps",
            "3",
            "--batch",
            "2",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{objective}: {err}");
    }
    let (dit, ar) = (newest(&dir.join("dit")), newest(&dir.join("ar")));
    let s = |p: &Path| p.to_str().unwrap().to_string();

    // NELBO at block 4, twice (same seed: same number), and the exact AR perplexity.
    let nelbo = |ckpt: &Path, extra: &[&str], out: &Path| {
        let mut args = vec![
            "eval".to_string(),
            "nelbo".into(),
            "--checkpoint".into(),
            s(ckpt),
            "--data".into(),
            s(&data),
            "--max-sequences".into(),
            "6".into(),
            "--batch".into(),
            "4".into(),
            "--json".into(),
            s(out),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        did(&args)
    };
    let (a, b) = (dir.join("n1.json"), dir.join("n2.json"));
    let (code, stdout, err) = nelbo(&dit, &["--block", "4"], &a);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("NELBO bound, block 4"), "{stdout}");
    assert_eq!(nelbo(&dit, &["--block", "4"], &b).0, 0);
    let (ja, jb) = (json(&a), json(&b));
    assert_eq!(ja["perplexity"], jb["perplexity"]);
    let ppl = ja["perplexity"].as_f64().unwrap();
    // Three steps from the reference initialisation: close to uniform over 257 ids, and a bound ≥ 1.
    assert!(ppl > 1.0 && ppl < 400.0, "{ja}");
    assert_eq!(ja["tokens"], 6 * 31);
    let (code, _, err) = nelbo(&dit, &["--split", "test", "--block", "32"], &a);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = nelbo(&dit, &[], &a);
    assert_eq!(code, 2);
    assert!(err.contains("name the block size"), "{err}");
    let (code, _, err) = nelbo(&dit, &["--block", "5"], &a);
    assert_eq!(code, 2);
    assert!(err.contains("must divide the length"), "{err}");
    let (code, stdout, err) = nelbo(&ar, &[], &a);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("exact (causal)"), "{stdout}");

    // Generative perplexity of fresh samples, then of a `did sample --out` file.
    let g = dir.join("g.json");
    let (code, stdout, err) = did(&[
        "eval",
        "gen-ppl",
        "--checkpoint",
        &s(&dit),
        "--judge",
        &s(&ar),
        "--num-samples",
        "3",
        "--batch",
        "2",
        "--json",
        &s(&g),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("gen PPL"), "{stdout}");
    let jg = json(&g);
    assert_eq!(jg["samples"], 3);
    assert_eq!(jg["per_sample"].as_array().unwrap().len(), 3);
    for key in [
        "gen_ppl_mean_per_sample",
        "gen_ppl_token_weighted",
        "entropy",
        "nfe_mean",
    ] {
        let v = jg[key].as_f64().unwrap();
        assert!(v.is_finite() && v > 0.0, "{key}: {jg}");
    }
    // The mean of per-sample perplexities is never below the token-weighted one (Jensen).
    assert!(
        jg["gen_ppl_mean_per_sample"].as_f64().unwrap()
            >= jg["gen_ppl_token_weighted"].as_f64().unwrap() - 1e-9
    );
    let samples = dir.join("s.jsonl");
    let (code, _, err) = did(&[
        "sample",
        "--checkpoint",
        &s(&dit),
        "--num-samples",
        "2",
        "--out",
        &s(&samples),
    ]);
    assert_eq!(code, 0, "{err}");
    let (code, stdout, err) = did(&[
        "eval",
        "gen-ppl",
        "--samples",
        &s(&samples),
        "--judge",
        &s(&ar),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("| 2 |"), "{stdout}");
    let (code, stdout, err) = did(&["eval", "entropy", &s(&samples)]);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("entropy"), "{stdout}");

    // Bad input: an impossible regeneration threshold, a diffusion judge, a broken samples file.
    let (code, _, err) = did(&[
        "eval",
        "gen-ppl",
        "--checkpoint",
        &s(&dit),
        "--judge",
        &s(&ar),
        "--regen-threshold",
        "9",
        "--max-tries",
        "1",
    ]);
    assert_eq!(code, 2);
    assert!(
        err.contains("stayed degenerate") && err.contains("--regen-threshold"),
        "{err}"
    );
    let (code, _, err) = did(&[
        "eval",
        "gen-ppl",
        "--checkpoint",
        &s(&dit),
        "--judge",
        &s(&dit),
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("is a diffusion model"), "{err}");
    std::fs::write(&samples, "{\"tokens\": [1, 2]}\nnot json\n").unwrap();
    let (code, _, err) = did(&["eval", "entropy", &s(&samples)]);
    assert_eq!(code, 2);
    assert!(err.contains("line 2"), "{err}");
    let (code, _, err) = did(&["eval", "gen-ppl", "--judge", &s(&ar)]);
    assert_eq!(code, 2);
    assert!(
        err.contains("--checkpoint") && err.contains("--samples"),
        "{err}"
    );

    // The AR baseline: a causal checkpoint samples left to right, one call
    // per drawn token, and is scored like any sampler (what
    // scripts/reproduce.sh runs; its JSON is what did-report reads).
    let ar_samples = dir.join("ar.jsonl");
    let (code, _, err) = did(&[
        "sample",
        "--checkpoint",
        &s(&ar),
        "--num-samples",
        "3",
        "--batch",
        "2",
        "--length",
        "24",
        "--out",
        &s(&ar_samples),
    ]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&ar_samples)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    for l in &lines {
        assert_eq!(l["tokens"].as_array().unwrap().len(), 24, "{l}");
        assert_eq!(l["nfe"], serde_json::json!([23]), "{l}");
    }
    let g = dir.join("ar.seed-1.json");
    let (code, _, err) = did(&[
        "eval",
        "gen-ppl",
        "--checkpoint",
        &s(&ar),
        "--judge",
        &s(&ar),
        "--num-samples",
        "2",
        "--batch",
        "2",
        "--length",
        "24",
        "--regen-threshold",
        "0",
        "--json",
        &s(&g),
    ]);
    assert_eq!(code, 0, "{err}");
    let (name, model, run, _) = did_report::results::read_seed_run(&g).unwrap();
    assert_eq!((name.as_str(), model.as_str(), run.seed), ("ar", "ar", 1));
    assert_eq!((run.samples, run.nfe), (2, 23.0));
    assert!(run.gen_ppl.is_finite() && run.word_ppl_charged.is_nan());
    assert!(run.first_text.is_some());
    let (code, _, err) = did(&["sample", "--checkpoint", &s(&ar), "--length", "33"]);
    assert_eq!(code, 2);
    assert!(err.contains("learned positions up to 32"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_run_file_sets_the_flags_and_typed_flags_win() {
    let dir = scratch("run-file");
    let (data, model) = setup(&dir);
    let out = dir.join("from-file");
    let run = dir.join("run.toml");
    let model_table = std::fs::read_to_string(&model).unwrap();
    std::fs::write(
        &run,
        format!(
            "{model_table}\n[train]\ndata = {:?}\nobjective = \"mix-scale\"\nblocks = \"4:0.5,L:0.5\"\nbatch = 2\nsteps = 2\nout = {:?}\nlr = 1e-3\n",
            data.to_str().unwrap(),
            out.to_str().unwrap()
        ),
    )
    .unwrap();
    let (code, stdout, err) = did(&["train", "--config", run.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("mix-scale"), "{stdout}");
    assert_eq!(losses(&out.join("metrics.jsonl")).len(), 2);
    // --steps typed on the command line wins over the file's 2.
    let (code, _, err) = did(&[
        "train",
        "--config",
        run.to_str().unwrap(),
        "--steps",
        "3",
        "--resume",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(losses(&out.join("metrics.jsonl")).len(), 3);
    // A misspelt key is named.
    std::fs::write(&run, "[train]\nbatch_size = 2\n").unwrap();
    let (code, _, err) = did(&["train", "--config", run.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("batch_size"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
