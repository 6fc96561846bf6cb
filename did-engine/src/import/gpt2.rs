//! `did import gpt2`: the Hugging Face GPT-2 family (gpt2 … gpt2-xl, or any
//! `GPT2LMHeadModel`), the paper's judge. Its `config.json` and weights map one
//! to one onto the `gpt2` architecture (learned positions, tied head, GELU-tanh).

use crate::Error;
use std::path::Path;

use did_core::model::{Architecture, ModelConfig, ParamTable};
use serde::Deserialize;

use super::weights::Tensors;
use crate::checkpoint::{self, Checkpoint};

/// The fields of a Hugging Face `GPT2Config` that decide the network.
#[derive(Debug, Deserialize)]
struct Gpt2Config {
    n_embd: usize,
    n_layer: usize,
    n_head: usize,
    n_positions: usize,
    vocab_size: usize,
    n_inner: Option<usize>,
    #[serde(default = "default_eps")]
    layer_norm_epsilon: f32,
    #[serde(default = "default_activation")]
    activation_function: String,
    #[serde(default)]
    scale_attn_by_inverse_layer_idx: bool,
    #[serde(default)]
    reorder_and_upcast_attn: bool,
    #[serde(default = "yes")]
    scale_attn_weights: bool,
    #[serde(default = "yes")]
    tie_word_embeddings: bool,
    #[serde(default = "default_dropout")]
    resid_pdrop: f32,
}

fn default_eps() -> f32 {
    1e-5
}
fn default_activation() -> String {
    "gelu_new".into()
}
fn yes() -> bool {
    true
}
fn default_dropout() -> f32 {
    0.1
}

/// The `did` configuration of a Hugging Face GPT-2: the vocabulary gains one
/// row, `[MASK]`, which the tied head turns into a logit of 0 that judges
/// leave out of their softmax.
fn config_of(c: &Gpt2Config) -> Result<ModelConfig, Error> {
    if !matches!(
        c.activation_function.as_str(),
        "gelu_new" | "gelu_pytorch_tanh"
    ) {
        return Err(Error::Import(format!(
            "activation_function {:?}: did's gpt2 uses GELU with the tanh approximation (gelu_new)",
            c.activation_function
        )));
    }
    if c.scale_attn_by_inverse_layer_idx || c.reorder_and_upcast_attn || !c.scale_attn_weights {
        return Err(Error::Import("scale_attn_by_inverse_layer_idx, reorder_and_upcast_attn and scale_attn_weights = false change the attention; did's gpt2 has GPT-2's plain scaled attention".into()));
    }
    if !c.tie_word_embeddings {
        return Err(Error::Import(
            "tie_word_embeddings = false: did's gpt2 ties the head to the embedding".into(),
        ));
    }
    let config = ModelConfig {
        architecture: Architecture::Gpt2,
        vocab_size: c.vocab_size + 1,
        mask_id: c.vocab_size as u32,
        layers: c.n_layer,
        hidden: c.n_embd,
        heads: c.n_head,
        mlp_hidden: c.n_inner.unwrap_or(4 * c.n_embd),
        context: c.n_positions,
        dropout: c.resid_pdrop,
        norm_eps: c.layer_norm_epsilon,
        ..ModelConfig::preset("tiny", Architecture::Gpt2)
            .map_err(|e| Error::Import(e.to_string()))?
    };
    config
        .validate()
        .map_err(|e| Error::Import(format!("config.json: {e}")))?;
    Ok(config)
}

fn parse_config(config_json: &[u8]) -> Result<(Gpt2Config, ModelConfig), Error> {
    let hf: Gpt2Config = serde_json::from_slice(config_json)
        .map_err(|e| Error::Import(format!("config.json: not a GPT-2 config ({e})")))?;
    let config = config_of(&hf)?;
    Ok((hf, config))
}

/// Reads a Hugging Face GPT-2 folder (`config.json`, and `model.safetensors`
/// or `pytorch_model.bin`) into a checkpoint.
pub fn gpt2(dir: &Path) -> Result<Checkpoint, Error> {
    let config_json = std::fs::read(dir.join("config.json")).map_err(|e| {
        Error::Import(format!(
            "cannot read {}: {e}",
            dir.join("config.json").display()
        ))
    })?;
    parse_config(&config_json).map_err(|e| Error::Import(format!("{}: {e}", dir.display())))?;
    let tensors = Tensors::read_dir(dir)?;
    let mut ckpt = gpt2_from_tensors(&config_json, tensors)
        .map_err(|e| Error::Import(format!("{}: {e}", dir.display())))?;
    ckpt.run
        .insert("imported_from".into(), dir.display().to_string());
    Ok(ckpt)
}

/// [`gpt2`] from the bytes of `config.json` and `model.safetensors`.
pub fn gpt2_from_bytes(config_json: &[u8], weights: &[u8]) -> Result<Checkpoint, Error> {
    gpt2_from_tensors(
        config_json,
        Tensors::from_safetensors("model.safetensors", weights)?,
    )
}

/// [`gpt2`] from `config.json` and the tensors however they were stored.
pub fn gpt2_from_tensors(config_json: &[u8], tensors: Tensors) -> Result<Checkpoint, Error> {
    let (hf, config) = parse_config(config_json)?;
    // Keys are `h.0.…` or `transformer.h.0.…` depending on how the model was saved.
    let tensors = tensors.rename(|k| k.strip_prefix("transformer.").unwrap_or(k).to_string());
    let (c, v) = (config.hidden, hf.vocab_size);
    let table = ParamTable::new(&config);
    let mut params = vec![0.0f32; table.total()];
    let mut used = vec!["lm_head.weight".to_string()];
    for e in table.entries() {
        // (HF name, HF shape, transposed): Conv1D stores [in, out], did [out, in].
        let (hf_name, shape, transpose): (String, Vec<usize>, bool) = match e.name.as_str() {
            "wte.weight" => ("wte.weight".into(), vec![v, c], false),
            n if n.ends_with(".attn.c_attn.weight")
                || n.ends_with(".attn.c_proj.weight")
                || n.ends_with(".mlp.c_fc.weight")
                || n.ends_with(".mlp.c_proj.weight") =>
            {
                (n.to_string(), vec![e.shape[1], e.shape[0]], true)
            }
            n => (n.to_string(), e.shape.clone(), false),
        };
        let x = &tensors
            .require(
                &hf_name,
                &shape,
                &format!("did's {}; is it a GPT-2 model?", e.name),
            )?
            .values;
        let out = &mut params[e.offset..e.offset + e.len()];
        if transpose {
            let (rows, cols) = (shape[0], shape[1]); // HF [in, out]
            for i in 0..rows {
                for j in 0..cols {
                    out[j * rows + i] = x[i * cols + j];
                }
            }
        } else {
            // wte gains the [MASK] row, left at zero.
            out[..x.len()].copy_from_slice(x);
        }
        used.push(hf_name);
    }
    if let (Some(head), Some(wte)) = (tensors.get("lm_head.weight"), tensors.get("wte.weight")) {
        if head != wte {
            return Err(Error::Import(
                "lm_head.weight differs from wte.weight: did's gpt2 ties the head to the embedding"
                    .into(),
            ));
        }
    }
    // Attention-mask buffers are not weights.
    tensors.refuse_unknown(
        |k| {
            used.iter().any(|u| u == k)
                || k.ends_with(".attn.bias")
                || k.ends_with(".attn.masked_bias")
        },
        "a GPT-2 of this config.json",
    )?;
    Ok(Checkpoint::imported(
        config,
        params,
        [(
            "source".to_string(),
            "huggingface GPT2LMHeadModel".to_string(),
        )]
        .into(),
    ))
}

/// `did import gpt2 DIR --out FILE`.
pub fn import_gpt2(dir: &Path, out: &Path) -> Result<String, Error> {
    let ckpt = gpt2(dir)?;
    checkpoint::save(out, &ckpt)?;
    Ok(format!(
        "imported {} as a gpt2 model ({} layers × {}, {} heads, context {}, vocabulary {} + [MASK]; {} parameters) into {}\n",
        dir.display(),
        ckpt.config.layers,
        ckpt.config.hidden,
        ckpt.config.heads,
        ckpt.config.context,
        ckpt.config.vocab_size - 1,
        ckpt.params.len(),
        out.display()
    ))
}
