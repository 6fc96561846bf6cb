//! Helpers shared by the end-to-end tests of the `did` binary.
#![allow(dead_code)] // each test file uses its own subset

use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs `did ARGS`: (exit code, stdout, stderr).
pub fn did(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_did"))
        .args(args)
        .output()
        .expect("the did binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A fresh, empty scratch folder for one test.
pub fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("did-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir is writable");
    d
}

/// The excerpt with the bytes tokenizer (vocabulary 258: fast), and a 1-layer model file.
pub fn setup(dir: &Path) -> (PathBuf, PathBuf) {
    let data = dir.join("data");
    let excerpt =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/excerpt/gutenberg/carroll-alice.txt");
    let sotu = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/excerpt/sotu");
    let (code, _, err) = did(&[
        "data",
        "prepare",
        excerpt.to_str().unwrap(),
        sotu.to_str().unwrap(),
        "--tokenizer",
        "bytes",
        "--out",
        data.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let model = dir.join("model.toml");
    std::fs::write(&model, "[model]\narchitecture = \"dit\"\nvocab_size = 258\nmask_id = 257\nlayers = 1\nhidden = 32\nheads = 2\ncontext = 32\ncond_dim = 8\n").unwrap();
    (data, model)
}

/// `step:loss` of every line of a metrics.jsonl.
pub fn losses(metrics: &Path) -> Vec<String> {
    std::fs::read_to_string(metrics)
        .unwrap()
        .lines()
        .map(|l| {
            let loss = l.split("\"loss\":").nth(1).unwrap();
            let step = l
                .split("\"step\":")
                .nth(1)
                .unwrap()
                .split(',')
                .next()
                .unwrap();
            format!("{step}:{}", loss.split(',').next().unwrap())
        })
        .collect()
}
