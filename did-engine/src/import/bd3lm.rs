//! `did import bd3lm`: the Hugging Face checkpoints of BD3-LM
//! (`kuleshov-group/bd3lm-owt-block_size{4,8,16}`, the block-1024 pre-train)
//! and of MDLM (`kuleshov-group/mdlm-owt`). Both are the reference `DIT`
//! backbone, whose tensor names `did`'s DiT keeps (docs/bd3lm.md §7) behind a
//! `backbone.` prefix. Shapes come from the tensors, not from `config.json`
//! where the two could disagree (the published `cond_dim` default, the
//! "tied" head that never is); every tensor is checked and a wrong one named.

use crate::Error;
use std::path::Path;

use did_core::model::{Architecture, ModelConfig, ParamTable};
use serde::Deserialize;

use super::weights::{Tensor, Tensors};
use crate::checkpoint::{self, Checkpoint};

/// The fields of a `BD3LMConfig` / MDLM config that decide the network.
#[derive(Debug, Deserialize)]
struct DitConfig {
    #[serde(default)]
    model_type: Option<String>,
    /// BD3-LM's training block; MDLM has none (its block is the whole length).
    #[serde(default)]
    block_size: Option<usize>,
    vocab_size: usize,
    model_length: usize,
    hidden_dim: usize,
    n_blocks: usize,
    n_heads: usize,
    #[serde(default = "default_dropout")]
    dropout: f32,
    #[serde(default)]
    time_conditioning: bool,
    #[serde(default = "yes")]
    adaln: bool,
    #[serde(default)]
    causal: bool,
}

fn default_dropout() -> f32 {
    0.1
}
fn yes() -> bool {
    true
}

/// Options of `did import bd3lm`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Bd3lmOptions {
    /// The `[MASK]` id; `vocab_size − 1` (GPT-2's 50257) when `None`.
    pub mask_id: Option<u32>,
}

/// Reads a BD3-LM or MDLM folder (`config.json`, and `model.safetensors` or
/// `pytorch_model.bin`) into a checkpoint.
pub fn bd3lm(dir: &Path, opts: Bd3lmOptions) -> Result<Checkpoint, Error> {
    let config_json = std::fs::read(dir.join("config.json")).map_err(|e| {
        Error::Import(format!(
            "cannot read {}: {e}",
            dir.join("config.json").display()
        ))
    })?;
    parse_config(&config_json).map_err(|e| Error::Import(format!("{}: {e}", dir.display())))?;
    let tensors =
        Tensors::read_dir(dir).map_err(|e| Error::Import(format!("{}: {e}", dir.display())))?;
    let mut ckpt = bd3lm_from_tensors(&config_json, tensors, opts)
        .map_err(|e| Error::Import(format!("{}: {e}", dir.display())))?;
    ckpt.run
        .insert("imported_from".into(), dir.display().to_string());
    Ok(ckpt)
}

fn parse_config(config_json: &[u8]) -> Result<DitConfig, Error> {
    let c: DitConfig = serde_json::from_slice(config_json)
        .map_err(|e| Error::Import(format!("config.json: not a BD3-LM or MDLM config ({e})")))?;
    if let Some(t) = c.model_type.as_deref() {
        if !matches!(t, "bd3lm" | "mdlm") {
            return Err(Error::Import(format!(
                "config.json: model_type {t:?}; `did import bd3lm` reads \"bd3lm\" and \"mdlm\" (GPT-2: `did import gpt2`)"
            )));
        }
    }
    if c.time_conditioning {
        return Err(Error::Import("config.json: time_conditioning = true; did's DiT runs at σ = 0, as BD3-LM's and MDLM's released models do, and has no time input".into()));
    }
    if c.causal {
        return Err(Error::Import(
            "config.json: causal = true is an autoregressive model, not a diffusion one".into(),
        ));
    }
    Ok(c)
}

/// [`bd3lm`] from the bytes of `config.json` and `model.safetensors`.
pub fn bd3lm_from_bytes(config_json: &[u8], weights: &[u8]) -> Result<Checkpoint, Error> {
    bd3lm_from_tensors(
        config_json,
        Tensors::from_safetensors("model.safetensors", weights)?,
        Bd3lmOptions::default(),
    )
}

/// [`bd3lm`] from `config.json` and the tensors however they were stored.
pub fn bd3lm_from_tensors(
    config_json: &[u8],
    tensors: Tensors,
    opts: Bd3lmOptions,
) -> Result<Checkpoint, Error> {
    let hf = parse_config(config_json)?;
    // `backbone.` in the HF and Lightning layouts; `_orig_mod.` after torch.compile.
    let tensors = tensors.rename(|k| {
        let k = k.strip_prefix("_orig_mod.").unwrap_or(k);
        k.strip_prefix("backbone.").unwrap_or(k).to_string()
    });
    let shape = |name: &str| tensors.get(name).map(|t| t.shape.clone());
    let [vocab, hidden] = dims(&tensors, "vocab_embed.embedding")?;
    let [mlp_hidden, _] = dims(&tensors, "blocks.0.mlp.0.weight")?;
    let cond_dim = match shape("sigma_map.mlp.0.weight") {
        Some(s) if s.len() == 2 => s[0],
        _ if !hf.adaln => 1,
        _ => {
            return Err(Error::Import(format!(
                "{} has no sigma_map.mlp.0.weight [cond_dim, 256]; is it a BD3-LM or MDLM model?",
                tensors.file
            )))
        }
    };
    let layers = (0..)
        .take_while(|i| tensors.get(&format!("blocks.{i}.norm1.weight")).is_some())
        .count();
    for (what, config, weights) in [
        ("vocab_size", hf.vocab_size, vocab),
        ("hidden_dim", hf.hidden_dim, hidden),
        ("n_blocks", hf.n_blocks, layers),
    ] {
        if config != weights {
            return Err(Error::Import(format!(
                "config.json says {what} = {config} but the weights have {weights}; the weights are followed only where config.json is silent, so fix config.json"
            )));
        }
    }
    let last_id = u32::try_from(vocab)
        .ok()
        .and_then(|v| v.checked_sub(1))
        .ok_or_else(|| {
            Error::Import(format!(
                "vocab_embed.embedding has {vocab} rows; a vocabulary has 1 to 2³² ids"
            ))
        })?;
    let mask_id = opts.mask_id.unwrap_or(last_id);
    let rope_base = rope_base(&tensors, hidden / hf.n_heads.max(1))?;
    let config = ModelConfig {
        architecture: Architecture::Dit,
        vocab_size: vocab,
        mask_id,
        layers,
        hidden,
        heads: hf.n_heads,
        mlp_hidden,
        context: hf.model_length,
        cond_dim,
        dropout: hf.dropout,
        norm_eps: 1e-5,
        rope_base,
    };
    config
        .validate()
        .map_err(|e| Error::Import(format!("config.json: {e}")))?;

    let table = ParamTable::new(&config);
    let mut params = vec![0.0f32; table.total()];
    let mut used: Vec<&str> = Vec::new();
    for e in table.entries() {
        let out = &mut params[e.offset..e.offset + e.len()];
        let adaln_path = e.name.starts_with("sigma_map.") || e.name.contains("adaLN_modulation");
        if !hf.adaln && adaln_path {
            // Without adaLN the reference skips the modulation and gates by 1:
            // zero weights and a bias of 1 on each gate chunk do exactly that.
            if e.name.ends_with("adaLN_modulation.bias") && e.name.starts_with("blocks.") {
                out[2 * hidden..3 * hidden].fill(1.0);
                out[5 * hidden..6 * hidden].fill(1.0);
            }
            continue;
        }
        let t = tensors.require(&e.name, &e.shape, &format!("did's {}", e.name))?;
        out.copy_from_slice(&t.values);
        used.push(&e.name);
    }
    let mut run: std::collections::BTreeMap<String, String> = [
        (
            "source".to_string(),
            format!(
                "huggingface {}",
                hf.model_type.as_deref().unwrap_or("bd3lm")
            ),
        ),
        ("length".to_string(), hf.model_length.to_string()),
    ]
    .into();
    match hf.block_size {
        Some(b) if b < hf.model_length => run.insert("objective".into(), format!("bd3:{b}")),
        _ => run.insert("objective".into(), "mdlm".into()),
    };
    // The learned clip of the noise schedule, a hint for further fine-tuning (docs/bd3lm.md §1.6).
    for name in ["sampling_eps_min", "sampling_eps_max"] {
        if let Some(t) = tensors.get(name) {
            if let [v] = t.values.as_slice() {
                run.insert(name.to_string(), v.to_string());
            }
        }
    }
    let known = |k: &str| {
        used.contains(&k)
            || matches!(
                k,
                "rotary_emb.inv_freq" | "sampling_eps_min" | "sampling_eps_max"
            )
    };
    tensors.refuse_unknown(known, "a BD3-LM / MDLM DiT of this shape")?;
    Ok(Checkpoint::imported(config, params, run))
}

/// The two dimensions of a matrix the shapes are read from.
fn dims(tensors: &Tensors, name: &str) -> Result<[usize; 2], Error> {
    match tensors.get(name) {
        Some(Tensor { shape, .. }) if shape.len() == 2 => Ok([shape[0], shape[1]]),
        Some(t) => Err(Error::Import(format!(
            "tensor {name} in {} has shape {:?}; a matrix was expected",
            tensors.file, t.shape
        ))),
        None => Err(Error::Import(format!(
            "{} has no tensor {name}; is it a BD3-LM or MDLM model?",
            tensors.file
        ))),
    }
}

/// RoPE's base, from the stored `inv_freq` when there is one (10000 otherwise):
/// `inv_freq[i] = base^(−2i/d)`, checked for every `i`.
fn rope_base(tensors: &Tensors, head_dim: usize) -> Result<f32, Error> {
    let Some(t) = tensors.get("rotary_emb.inv_freq") else {
        return Ok(10_000.0);
    };
    let f = &t.values;
    if t.shape != [head_dim / 2] || f.len() < 2 || f[1] <= 0.0 || f[1] >= 1.0 {
        return Err(Error::Import(format!(
            "rotary_emb.inv_freq has shape {:?} and values {:?}…; a rotary embedding over head dimension {head_dim} has [{}] decreasing from 1",
            t.shape,
            &f[..f.len().min(2)],
            head_dim / 2
        )));
    }
    let base = f64::from(f[1]).powf(-(head_dim as f64) / 2.0);
    for (i, &v) in f.iter().enumerate() {
        let want = base.powf(-2.0 * i as f64 / head_dim as f64);
        if (f64::from(v) - want).abs() > 1e-5 * want {
            return Err(Error::Import(format!(
                "rotary_emb.inv_freq[{i}] = {v}, not base^(−2i/d) for base {base:.1}; did's RoPE has that form"
            )));
        }
    }
    Ok(base.round() as f32)
}

/// `did import bd3lm DIR --out FILE`.
pub fn import_bd3lm(dir: &Path, out: &Path, opts: Bd3lmOptions) -> Result<String, Error> {
    let ckpt = bd3lm(dir, opts)?;
    checkpoint::save(out, &ckpt)?;
    let c = &ckpt.config;
    Ok(format!(
        "imported {} ({}) as a dit model ({} layers × {}, {} heads, cond {}, length {}, vocabulary {} with [MASK] = {}; {} parameters) into {}\n",
        dir.display(),
        ckpt.run.get("objective").map_or("?", String::as_str),
        c.layers,
        c.hidden,
        c.heads,
        c.cond_dim,
        c.context,
        c.vocab_size,
        c.mask_id,
        ckpt.params.len(),
        out.display()
    ))
}
