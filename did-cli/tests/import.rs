//! `did import gpt2` against the real `transformers` code: a tiny random
//! GPT2LMHeadModel saved by Hugging Face (tests/fixtures/hf-gpt2-tiny, made by
//! scripts/make-hf-fixtures.py) gives the same logits in `did`, to 1e-4.

mod common;
use common::{did, scratch};

use std::path::Path;

use did_backend_cpu::CpuBackend;
use did_core::backend::Backend;
use did_core::model::{Inference, Transformer};
use safetensors::tensor::SafeTensors;

fn fixture() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf-gpt2-tiny")
}

#[test]
fn a_hugging_face_gpt2_gives_its_logits_in_did() {
    let dir = scratch("import-gpt2");
    let out = dir.join("gpt2-tiny.safetensors");
    let (code, stdout, err) = did(&[
        "import",
        "gpt2",
        fixture().to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("2 layers × 32"), "{stdout}");

    let expected = std::fs::read(fixture().join("expected.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&expected).unwrap();
    let ids: Vec<u32> = st
        .tensor("input_ids")
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as u32)
        .collect();
    let hf: Vec<f32> = st
        .tensor("logits")
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let (batch, n, v) = (2, 16, 300);

    let ckpt = did_cli::checkpoint::load(&out).unwrap();
    assert_eq!(ckpt.config.vocab_size, v + 1, "the vocabulary gains [MASK]");
    let model = Transformer::new(ckpt.config).unwrap();
    let be = CpuBackend::new();
    let params = be.upload(&ckpt.params).unwrap();
    let mut inf = Inference::new(&be, &model, &params).unwrap();
    let ours = inf.logits_uncached(&ids, batch, 1).unwrap();
    let mut worst = 0.0f32;
    for r in 0..batch * n {
        for k in 0..v {
            let (a, b) = (ours[r * (v + 1) + k], hf[r * v + k]);
            worst = worst.max((a - b).abs());
        }
        assert_eq!(ours[r * (v + 1) + v], 0.0, "the [MASK] row's logit");
    }
    assert!(worst < 1e-4, "largest logit difference {worst}");
    eprintln!("did vs transformers: largest logit difference {worst:.2e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_bad_hugging_face_folder_names_what_is_wrong() {
    let dir = scratch("import-bad");
    let src = dir.join("model");
    std::fs::create_dir_all(&src).unwrap();
    let out = dir.join("x.safetensors");
    let run = |d: &Path| {
        did(&[
            "import",
            "gpt2",
            d.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
    };
    // No config.json.
    let (code, _, err) = run(&src);
    assert_eq!(code, 2);
    assert!(err.contains("config.json"), "{err}");
    // Another activation.
    let config = std::fs::read_to_string(fixture().join("config.json")).unwrap();
    std::fs::write(src.join("config.json"), config.replace("gelu_new", "relu")).unwrap();
    let (code, _, err) = run(&src);
    assert_eq!(code, 2);
    assert!(err.contains("activation_function"), "{err}");
    // Only a PyTorch pickle.
    std::fs::write(src.join("config.json"), &config).unwrap();
    std::fs::write(src.join("pytorch_model.bin"), b"PK").unwrap();
    let (code, _, err) = run(&src);
    assert_eq!(code, 2);
    assert!(
        err.contains("pytorch_model.bin") && err.contains("safetensors"),
        "{err}"
    );
    // A config that does not match the weights: the tensor is named.
    std::fs::copy(
        fixture().join("model.safetensors"),
        src.join("model.safetensors"),
    )
    .unwrap();
    std::fs::write(
        src.join("config.json"),
        config.replace("\"n_embd\": 32", "\"n_embd\": 64"),
    )
    .unwrap();
    let (code, _, err) = run(&src);
    assert_eq!(code, 2);
    assert!(err.contains("shape"), "{err}");
    assert!(!out.exists(), "nothing is written on error");
    let _ = std::fs::remove_dir_all(&dir);
}
