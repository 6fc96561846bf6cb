//! End-to-end: `did model-info` on presets, a TOML file, and bad input.

mod common;
use common::did;

#[test]
fn the_paper_model_has_the_reference_parameter_count() {
    let (code, out, _) = did(&["model-info", "small"]);
    assert_eq!(code, 0);
    assert!(out.contains("parameters: 169627218"), "{out}"); // docs/bd3lm.md §7
    assert!(out.contains("batch 8 × length 1024"), "{out}");
    // The CUDA backend's padded logits rows, said without a GPU.
    let (code, cuda, err) = did(&["--backend", "cuda", "model-info", "small"]);
    assert_eq!(code, 0, "{err}");
    assert!(cuda.contains("logits rows padded to 50304"), "{cuda}");
    assert!(!out.contains("padded"), "{out}");
    // bf16 storage: half the activations, and the optimizer's f32 masters beside the copies.
    let (code, bf16, err) = did(&[
        "--backend",
        "cuda",
        "--precision",
        "bf16",
        "model-info",
        "small",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        bf16.contains("(bf16, f32 optimizer state, logits rows padded to 50304)"),
        "{bf16}"
    );
    assert!(bf16.contains("f32 masters, EMA copy"), "{bf16}");
}

#[test]
fn a_toml_file_describes_a_model() {
    let dir = std::env::temp_dir().join(format!("did-model-info-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.toml");
    std::fs::write(
        &path,
        "[model]\npreset = \"tiny\"\narchitecture = \"gpt2\"\nlayers = 2\n",
    )
    .unwrap();
    let (code, out, err) = did(&["model-info", path.to_str().unwrap(), "--batch", "2"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with("gpt2 model: 2 layers × 256 hidden"),
        "{out}"
    );
    std::fs::write(&path, "[model]\npreset = \"tiny\"\nheads = 5\n").unwrap();
    let (code, _, err) = did(&["model-info", path.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("multiple of `heads`"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_flags_name_the_cause() {
    for (args, want) in [
        (vec!["model-info"], "<MODEL>"),
        (
            vec!["model-info", "tiny", "--batch", "0"],
            "invalid value '0' for '--batch <BATCH>'",
        ),
        (
            vec!["model-info", "tiny", "--length", "512"],
            "exceeds the model's context",
        ),
        (
            vec!["model-info", "tiny", "--block", "3"],
            "must divide the length",
        ),
        (vec!["model-info", "tiny", "--arch", "rnn"], "architecture"),
        (vec!["model-info", "tiny", "--batch"], "a value is required"),
        (
            vec!["model-info", "/nonexistent/model.toml"],
            "cannot read the model config",
        ),
    ] {
        let (code, _, err) = did(&args);
        assert_eq!(code, 2, "{args:?}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

#[test]
fn a_checkpoint_describes_its_model() {
    let ckpt =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/demo/judge.safetensors.gz");
    let (code, stdout, err) = common::did(&["model-info", ckpt.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        stdout.contains("gpt2 model: 4 layers × 256") && stdout.contains("3258368"),
        "{stdout}"
    );
}
