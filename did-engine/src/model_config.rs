//! Model configurations from TOML: a preset, optionally with fields
//! overridden, or every field spelled out.
//!
//! ```toml
//! [model]
//! preset = "tiny"          # start from a preset (tiny, small) ...
//! architecture = "dit"     # dit (diffusion) or gpt2 (causal)
//! layers = 6               # ... and override what differs
//! ```

use crate::Error;
use did_core::model::{Architecture, ModelConfig};
use serde::Deserialize;

/// The `[model]` table. Every field is optional when a preset is named.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    preset: Option<String>,
    architecture: Option<String>,
    vocab_size: Option<usize>,
    mask_id: Option<u32>,
    layers: Option<usize>,
    hidden: Option<usize>,
    heads: Option<usize>,
    mlp_hidden: Option<usize>,
    context: Option<usize>,
    cond_dim: Option<usize>,
    dropout: Option<f32>,
    norm_eps: Option<f32>,
    rope_base: Option<f32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    model: ModelSection,
    /// A run file's training settings (`train_config`), not the model's business.
    #[serde(rename = "train")]
    _train: Option<toml::Table>,
}

/// Parses a TOML file with a `[model]` table into a validated configuration.
///
/// ```
/// let c = did_engine::model_config::from_toml("[model]\npreset = \"tiny\"\nlayers = 2\n")?;
/// assert_eq!((c.layers, c.hidden), (2, 256));
/// # Ok::<(), String>(())
/// ```
pub fn from_toml(text: &str) -> Result<ModelConfig, Error> {
    let file: File = toml::from_str(text)
        .map_err(|e| Error::Config(format!("model config: {}", e.message())))?;
    from_section(&file.model)
}

/// A configuration from a parsed `[model]` table.
pub fn from_section(m: &ModelSection) -> Result<ModelConfig, Error> {
    let architecture: Architecture = match &m.architecture {
        Some(a) => a
            .parse()
            .map_err(|e| Error::Config(format!("model config: {e}")))?,
        None => Architecture::Dit,
    };
    let base = match &m.preset {
        Some(p) => Some(
            ModelConfig::preset(p, architecture)
                .map_err(|e| Error::Config(format!("model config: {e}")))?,
        ),
        None => None,
    };
    let pick = |name: &str, v: Option<usize>, base: Option<usize>| -> Result<usize, Error> {
        v.or(base).ok_or_else(|| Error::Config(format!("model config: `{name}` is missing; set it, or name a `preset` (tiny, small) to start from")))
    };
    let b = base.as_ref();
    let hidden = pick("hidden", m.hidden, b.map(|b| b.hidden))?;
    let config = ModelConfig {
        architecture,
        vocab_size: pick("vocab_size", m.vocab_size, b.map(|b| b.vocab_size))?,
        mask_id: m
            .mask_id
            .or(b.map(|b| b.mask_id))
            .unwrap_or(did_core::GPT2_MASK),
        layers: pick("layers", m.layers, b.map(|b| b.layers))?,
        hidden,
        heads: pick("heads", m.heads, b.map(|b| b.heads))?,
        mlp_hidden: m
            .mlp_hidden
            .or(b.map(|b| b.mlp_hidden))
            .unwrap_or(4 * hidden),
        context: pick("context", m.context, b.map(|b| b.context))?,
        cond_dim: m.cond_dim.or(b.map(|b| b.cond_dim)).unwrap_or(128),
        dropout: m.dropout.or(b.map(|b| b.dropout)).unwrap_or(0.1),
        norm_eps: m.norm_eps.or(b.map(|b| b.norm_eps)).unwrap_or(1e-5),
        rope_base: m.rope_base.or(b.map(|b| b.rope_base)).unwrap_or(10_000.0),
    };
    config
        .validate()
        .map_err(|e| Error::Config(format!("model config: {e}")))?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_and_overrides() {
        let c = from_toml("[model]\npreset = \"small\"\narchitecture = \"gpt2\"\ncontext = 512\n")
            .unwrap();
        assert_eq!(
            (c.architecture, c.layers, c.context),
            (Architecture::Gpt2, 12, 512)
        );
        let full = from_toml(
            "[model]\narchitecture = \"dit\"\nvocab_size = 18\nmask_id = 17\nlayers = 1\nhidden = 8\nheads = 2\ncontext = 16\n",
        )
        .unwrap();
        assert_eq!((full.mlp_hidden, full.cond_dim), (32, 128));
    }

    #[test]
    fn bad_input_names_the_field_and_the_fix() {
        let cases = [
            ("[model]\nhidden = 8\n", "`vocab_size` is missing"),
            ("[model]\npreset = \"huge\"\n", "expected `tiny` or `small`"),
            (
                "[model]\npreset = \"tiny\"\nheads = 3\n",
                "multiple of `heads`",
            ),
            (
                "[model]\npreset = \"tiny\"\nlayres = 3\n",
                "unknown field `layres`",
            ),
            (
                "[model]\npreset = \"tiny\"\ndropout = 1.5\n",
                "`dropout` must be in [0, 1)",
            ),
            (
                "[model]\npreset = \"tiny\"\nmask_id = 70000\n",
                "`mask_id` 70000 must be below",
            ),
            ("[model]\npreset = \"tiny\"\nlayers = -1\n", "model config"),
            (
                "[model]\npreset = \"tiny\"\nlayers = 100000\n",
                "exceeds the supported maximum",
            ),
            ("not toml", "model config"),
        ];
        for (text, want) in cases {
            let err = from_toml(text).unwrap_err().to_string();
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }
}
