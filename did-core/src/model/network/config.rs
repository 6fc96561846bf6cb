//! Model configurations: the two architectures as settings of one stack, and the presets.

use alloc::format;
use core::fmt;
use core::str::FromStr;

use crate::error::{invalid, parse_error};
use crate::Error;

/// Which transformer the stack is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Architecture {
    /// BD3-LM / MDLM's DiT (docs/bd3lm.md §3): weight-only LayerNorm, RoPE,
    /// bias-free fused qkv and output projections, tanh-GELU MLP with biases,
    /// adaLN modulation and gates from a constant conditioning vector, untied
    /// output head with bias.
    Dit,
    /// GPT-2: learned positions, LayerNorm with bias, biased projections,
    /// tied embeddings, causal attention. For AR baselines and judges.
    Gpt2,
}

impl fmt::Display for Architecture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Architecture::Dit => "dit",
            Architecture::Gpt2 => "gpt2",
        })
    }
}

impl FromStr for Architecture {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s.trim() {
            "dit" | "bd3lm" | "mdlm" => Ok(Architecture::Dit),
            "gpt2" | "ar" => Ok(Architecture::Gpt2),
            other => Err(parse_error(
                "architecture",
                other,
                "expected `dit` (diffusion) or `gpt2` (causal)",
            )),
        }
    }
}

/// The shape of a model. Every field is plain data, so a TOML file can describe any of it.
///
/// ```
/// use did_core::model::{Architecture, ModelConfig};
/// let small = ModelConfig::preset("small", Architecture::Dit)?;
/// assert_eq!((small.layers, small.hidden, small.heads, small.context), (12, 768, 12, 1024));
/// assert_eq!(small.parameter_count(), 169_627_218); // docs/bd3lm.md §7
/// # Ok::<(), did_core::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelConfig {
    /// DiT or GPT-2.
    pub architecture: Architecture,
    /// Rows of the embedding and the output head (50,258 with `[MASK]`).
    pub vocab_size: usize,
    /// The `[MASK]` id (DiT); the head never predicts it (SUBS).
    pub mask_id: u32,
    /// Transformer blocks.
    pub layers: usize,
    /// Residual width.
    pub hidden: usize,
    /// Attention heads (`hidden` must be a multiple; the head dimension must be even for RoPE).
    pub heads: usize,
    /// Inner width of the MLP (4 × hidden).
    pub mlp_hidden: usize,
    /// The training length and context window `L`.
    pub context: usize,
    /// Width of the adaLN conditioning vector (DiT; 128).
    pub cond_dim: usize,
    /// Dropout on the residual branches in training.
    pub dropout: f32,
    /// LayerNorm epsilon.
    pub norm_eps: f32,
    /// RoPE frequency base (DiT).
    pub rope_base: f32,
}

/// Width of the sinusoidal time embedding that feeds the conditioning MLP (docs/bd3lm.md §3).
pub const TIME_EMBEDDING_DIM: usize = 256;

impl ModelConfig {
    /// `tiny` (4 × 256, 4 heads, length 256) or `small` (12 × 768, 12 heads, length 1024,
    /// the paper's model), with the GPT-2 vocabulary plus `[MASK]`.
    pub fn preset(name: &str, architecture: Architecture) -> Result<Self, Error> {
        let (layers, hidden, heads, context) = match name.trim() {
            "tiny" => (4, 256, 4, 256),
            "small" => (12, 768, 12, 1024),
            other => {
                return Err(parse_error(
                    "model preset",
                    other,
                    "expected `tiny` or `small`, or describe the model in a config file",
                ))
            }
        };
        Ok(ModelConfig {
            architecture,
            vocab_size: crate::GPT2_VOCAB_WITH_MASK,
            mask_id: crate::GPT2_MASK,
            layers,
            hidden,
            heads,
            mlp_hidden: 4 * hidden,
            context,
            cond_dim: 128,
            dropout: 0.1,
            norm_eps: 1e-5,
            rope_base: 10_000.0,
        })
    }

    /// Channels per head.
    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads.max(1)
    }

    /// Checks that the shape is buildable; the message names the field and the fix.
    pub fn validate(&self) -> Result<(), Error> {
        let positive = [
            ("layers", self.layers),
            ("hidden", self.hidden),
            ("heads", self.heads),
            ("mlp_hidden", self.mlp_hidden),
            ("context", self.context),
            ("vocab_size", self.vocab_size),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(invalid(
                    "model config",
                    format!("`{name}` must be at least 1"),
                ));
            }
        }
        if self.hidden % self.heads != 0 {
            return Err(invalid(
                "model config",
                format!(
                    "`hidden` ({}) must be a multiple of `heads` ({})",
                    self.hidden, self.heads
                ),
            ));
        }
        if self.architecture == Architecture::Dit {
            if self.head_dim() % 2 != 0 {
                return Err(invalid(
                    "model config",
                    format!(
                        "RoPE needs an even head dimension; hidden/heads = {}",
                        self.head_dim()
                    ),
                ));
            }
            if self.cond_dim == 0 {
                return Err(invalid(
                    "model config",
                    "`cond_dim` must be at least 1 for the DiT",
                ));
            }
            if self.mask_id as usize >= self.vocab_size {
                return Err(invalid(
                    "model config",
                    format!(
                        "`mask_id` {} must be below `vocab_size` {}",
                        self.mask_id, self.vocab_size
                    ),
                ));
            }
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(invalid(
                "model config",
                format!("`dropout` must be in [0, 1); got {}", self.dropout),
            ));
        }
        let positive_eps = self.norm_eps.is_finite() && self.norm_eps > 0.0;
        let usable_base = self.rope_base.is_finite() && self.rope_base > 1.0;
        if !positive_eps || !usable_base {
            return Err(invalid(
                "model config",
                "`norm_eps` must be > 0 and `rope_base` > 1",
            ));
        }
        // Far above any model this runs, low enough that a hostile file cannot make us allocate without bound.
        let limits = [
            ("layers", self.layers, 4096),
            ("hidden", self.hidden, 1 << 16),
            ("heads", self.heads, 1 << 12),
            ("mlp_hidden", self.mlp_hidden, 1 << 18),
            ("vocab_size", self.vocab_size, 1 << 24),
            ("cond_dim", self.cond_dim, 1 << 16),
        ];
        for (name, v, max) in limits {
            if v > max {
                return Err(invalid(
                    "model config",
                    format!("`{name}` = {v} exceeds the supported maximum {max}"),
                ));
            }
        }
        let big = self
            .vocab_size
            .checked_mul(self.hidden)
            .and_then(|x| x.checked_mul(self.layers.max(1)));
        if big.is_none() || self.context > (1 << 24) {
            return Err(invalid("model config", "the model is too large to address"));
        }
        Ok(())
    }

    /// Trainable parameters.
    pub fn parameter_count(&self) -> usize {
        crate::model::network::params::ParamTable::new(self).total()
    }
}
