//! `did import` against the real reference code: a tiny random
//! GPT2LMHeadModel saved by Hugging Face (tests/fixtures/hf-gpt2-tiny, made by
//! scripts/make-hf-fixtures.py) and a tiny random BD3LM built by
//! kuleshov-group/bd3lms' own modeling code (tests/fixtures/bd3lm-tiny, made by
//! scripts/make-bd3lm-fixtures.py) give the same logits in `did`, to 1e-4.

mod common;
use common::{did, scratch};
use did_core::backend::prelude::*;

use std::path::Path;

use did_backend_cpu::CpuBackend;
use did_core::model::{Activations, Inference, Pass, TrainBatch, Transformer};
use safetensors::tensor::SafeTensors;

fn fixture() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf-gpt2-tiny")
}

fn bd3lm_fixture() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bd3lm-tiny")
}

fn ints(st: &SafeTensors<'_>, name: &str) -> Vec<u32> {
    st.tensor(name)
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as u32)
        .collect()
}

fn floats(st: &SafeTensors<'_>, name: &str) -> Vec<f32> {
    st.tensor(name)
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn largest_difference(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn import(kind: &str, src: &Path, out: &Path) -> String {
    let (code, stdout, err) = did(&[
        "import",
        kind,
        src.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    stdout
}

/// The three ways the reference runs its network, against did's: the
/// vectorised training pass over x_t ⊕ x_0, block-causal sampling over x_0,
/// and the block-L (pre-train / MDLM) bidirectional pass.
#[test]
fn a_bd3lm_from_the_reference_code_gives_its_logits_in_did() {
    let dir = scratch("import-bd3lm");
    let out = dir.join("bd3lm-tiny.safetensors");
    let stdout = import("bd3lm", &bd3lm_fixture(), &out);
    assert!(
        stdout.contains("bd3:4") && stdout.contains("2 layers × 32"),
        "{stdout}"
    );

    let expected = std::fs::read(bd3lm_fixture().join("expected.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&expected).unwrap();
    let (x0, xt) = (ints(&st, "x0"), ints(&st, "xt"));
    let (batch, n, block) = (2, 16, 4);

    let ckpt = did_engine::checkpoint::load(&out).unwrap();
    assert_eq!(
        (
            ckpt.config.vocab_size,
            ckpt.config.mask_id,
            ckpt.config.cond_dim
        ),
        (64, 63, 24)
    );
    assert_eq!(ckpt.run["sampling_eps_min"], "0.05");
    let model = Transformer::new(ckpt.config).unwrap();
    let be = CpuBackend::new();
    let params = be.upload(&ckpt.params).unwrap();

    let mut inf = Inference::new(&be, &model, &params).unwrap();
    let sample = inf.logits_uncached(&x0, batch, block).unwrap();
    let full = inf.logits_uncached(&x0, batch, n).unwrap();

    let pass = Pass::Bd3 { block_size: block };
    let inputs: Vec<u32> = (0..batch)
        .flat_map(|s| {
            xt[s * n..(s + 1) * n]
                .iter()
                .chain(&x0[s * n..(s + 1) * n])
                .copied()
        })
        .collect();
    let train_batch = TrainBatch {
        batch,
        seq_len: n,
        pass,
        inputs,
        targets: x0.clone(),
        weights: vec![1.0; batch * n],
        predicted: batch * n,
    };
    let mut acts = Activations::new(&be, &ckpt.config, batch, n, pass).unwrap();
    model.load_batch(&be, &mut acts, &train_batch).unwrap();
    model.forward(&be, &params, &mut acts, None).unwrap();
    let mut train = vec![0.0; batch * n * 64];
    be.download(did_core::backend::Slice::whole(&acts.logits), &mut train)
        .unwrap();

    for (name, ours) in [
        ("logits_sample", &sample),
        ("logits_full", &full),
        ("logits_train", &train),
    ] {
        let worst = largest_difference(ours, &floats(&st, name));
        eprintln!("did vs bd3lms {name}: largest logit difference {worst:.2e}");
        assert!(worst < 1e-4, "{name}: largest logit difference {worst}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// pytorch_model.bin (torch.save's zip + pickle) holds the same weights as model.safetensors.
#[test]
fn pytorch_model_bin_imports_the_same_weights_as_safetensors() {
    let dir = scratch("import-bd3lm-bin");
    let src = dir.join("model");
    std::fs::create_dir_all(&src).unwrap();
    for f in ["config.json", "pytorch_model.bin"] {
        std::fs::copy(bd3lm_fixture().join(f), src.join(f)).unwrap();
    }
    let (from_bin, from_st) = (dir.join("bin.safetensors"), dir.join("st.safetensors"));
    import("bd3lm", &src, &from_bin);
    import("mdlm", &bd3lm_fixture(), &from_st);
    let (a, b) = (
        did_engine::checkpoint::load(&from_bin).unwrap(),
        did_engine::checkpoint::load(&from_st).unwrap(),
    );
    assert_eq!(a.config, b.config);
    assert!(a.params == b.params, "the two files give different weights");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_bad_bd3lm_folder_names_what_is_wrong() {
    let dir = scratch("import-bd3lm-bad");
    let src = dir.join("model");
    std::fs::create_dir_all(&src).unwrap();
    let out = dir.join("x.safetensors");
    let run = || {
        did(&[
            "import",
            "bd3lm",
            src.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
    };
    let config = std::fs::read_to_string(bd3lm_fixture().join("config.json")).unwrap();
    std::fs::copy(
        bd3lm_fixture().join("model.safetensors"),
        src.join("model.safetensors"),
    )
    .unwrap();
    // config.json disagrees with the weights.
    std::fs::write(
        src.join("config.json"),
        config.replace("\"hidden_dim\": 32", "\"hidden_dim\": 64"),
    )
    .unwrap();
    let (code, _, err) = run();
    assert_eq!(code, 2);
    assert!(
        err.contains("hidden_dim = 64") && err.contains("32"),
        "{err}"
    );
    // A time-conditioned model.
    std::fs::write(
        src.join("config.json"),
        config.replace(
            "\"time_conditioning\": false",
            "\"time_conditioning\": true",
        ),
    )
    .unwrap();
    let (code, _, err) = run();
    assert_eq!(code, 2);
    assert!(err.contains("time_conditioning"), "{err}");
    // A GPT-2 folder.
    std::fs::copy(fixture().join("config.json"), src.join("config.json")).unwrap();
    let (code, _, err) = run();
    assert_eq!(code, 2);
    assert!(
        err.contains("model_type") || err.contains("config.json"),
        "{err}"
    );
    assert!(!out.exists(), "nothing is written on error");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A wrong or missing tensor is named, whichever file it came from.
#[test]
fn a_wrong_bd3lm_tensor_is_named() {
    use did_engine::import::{bd3lm_from_tensors, weights::Tensors, Bd3lmOptions};
    let config = std::fs::read(bd3lm_fixture().join("config.json")).unwrap();
    let bytes = std::fs::read(bd3lm_fixture().join("model.safetensors")).unwrap();
    let good = Tensors::from_safetensors("model.safetensors", &bytes).unwrap();
    assert!(bd3lm_from_tensors(&config, good.clone(), Bd3lmOptions::default()).is_ok());
    let edit = |f: &dyn Fn(&str, &mut WeightsTensor) -> bool| {
        let kept = good.names().filter_map(|n| {
            let mut t = good.get(n).unwrap().clone();
            f(n, &mut t).then(|| (n.to_string(), t))
        });
        bd3lm_from_tensors(
            &config,
            Tensors::new("model.safetensors", kept.collect::<Vec<_>>()),
            Bd3lmOptions::default(),
        )
        .unwrap_err()
        .to_string()
    };
    type WeightsTensor = did_engine::import::weights::Tensor;
    let err = edit(&|n, _| n != "backbone.blocks.1.attn_out.weight");
    assert!(err.contains("blocks.1.attn_out.weight"), "{err}");
    let err = edit(&|n, t| {
        if n == "backbone.blocks.0.mlp.2.bias" {
            t.shape = vec![31];
            t.values.pop();
        }
        true
    });
    assert!(
        err.contains("blocks.0.mlp.2.bias") && err.contains("[31]"),
        "{err}"
    );
    let err = edit(&|n, t| {
        if n == "backbone.rotary_emb.inv_freq" {
            t.values[1] *= 1.5;
        }
        true
    });
    assert!(err.contains("inv_freq"), "{err}");
    // An empty vocabulary (config and weights agreeing on 0 rows) is an error, not an underflow.
    let empty_config = String::from_utf8(config.clone())
        .unwrap()
        .replace("\"vocab_size\": 64", "\"vocab_size\": 0");
    let kept = good.names().map(|n| {
        let mut t = good.get(n).unwrap().clone();
        if n == "backbone.vocab_embed.embedding" {
            t.shape = vec![0, 32];
            t.values.clear();
        }
        (n.to_string(), t)
    });
    let err = bd3lm_from_tensors(
        empty_config.as_bytes(),
        Tensors::new("model.safetensors", kept.collect::<Vec<_>>()),
        Bd3lmOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("0 rows"), "{err}");
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

    let ckpt = did_engine::checkpoint::load(&out).unwrap();
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
        err.contains("pytorch_model.bin") && err.contains("zip"),
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

/// A sharded checkpoint (model.safetensors.index.json and its shards, as
/// `save_pretrained` writes large models) imports the same weights as one file.
#[test]
fn sharded_safetensors_import_the_same_weights() {
    use safetensors::tensor::TensorView;
    let dir = scratch("import-sharded");
    let src = dir.join("model");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::copy(bd3lm_fixture().join("config.json"), src.join("config.json")).unwrap();
    let bytes = std::fs::read(bd3lm_fixture().join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    let (first, second) = names.split_at(names.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (shard, part) in [
        ("model-00001-of-00002.safetensors", first),
        ("model-00002-of-00002.safetensors", second),
    ] {
        let views: Vec<(String, TensorView<'_>)> = part
            .iter()
            .map(|n| (n.clone(), st.tensor(n).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, None, &src.join(shard)).unwrap();
        for n in part {
            weight_map.insert(n.clone(), shard.into());
        }
    }
    std::fs::write(
        src.join("model.safetensors.index.json"),
        serde_json::json!({ "metadata": {}, "weight_map": weight_map }).to_string(),
    )
    .unwrap();
    let (sharded, whole) = (
        dir.join("sharded.safetensors"),
        dir.join("whole.safetensors"),
    );
    import("bd3lm", &src, &sharded);
    import("bd3lm", &bd3lm_fixture(), &whole);
    let (a, b) = (
        did_engine::checkpoint::load(&sharded).unwrap(),
        did_engine::checkpoint::load(&whole).unwrap(),
    );
    assert!(a.params == b.params, "the shards give other weights");
    // An index naming a file outside the folder is refused.
    std::fs::write(
        src.join("model.safetensors.index.json"),
        r#"{"weight_map": {"x": "../elsewhere.safetensors"}}"#,
    )
    .unwrap();
    let (code, _, err) = did(&[
        "import",
        "bd3lm",
        src.to_str().unwrap(),
        "--out",
        sharded.to_str().unwrap(),
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("outside the folder"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
