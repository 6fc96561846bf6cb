//! Where each parameter lives in the one flat parameter buffer, under the
//! names of the reference checkpoints (docs/bd3lm.md §7 without `backbone.`; HF
//! GPT-2 without `transformer.`), and how it is initialised.

use alloc::string::String;
use alloc::vec::Vec;
use alloc::{format, vec};

use crate::model::network::config::{Architecture, ModelConfig, TIME_EMBEDDING_DIM};
use crate::rng::{Purpose, RngStream};

/// How a tensor starts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// All zeros (adaLN and the DiT head, so every block starts as the identity).
    Zeros,
    /// All ones (LayerNorm weights).
    Ones,
    /// Uniform in `±bound` (PyTorch's default for Linear and the DiT embedding: `1/√fan_in`).
    Uniform(f32),
    /// Normal with this standard deviation (GPT-2).
    Normal(f32),
}

/// One named tensor of the flat buffer.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamEntry {
    /// Checkpoint name.
    pub name: String,
    /// Shape, PyTorch order (`[out, in]` for linear weights).
    pub shape: Vec<usize>,
    /// First element in the flat buffer.
    pub offset: usize,
    /// How it is initialised.
    pub init: Init,
}

impl ParamEntry {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    /// Whether it holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Offsets of one transformer block's tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockOffsets {
    /// LayerNorm before attention: weight, optional bias.
    pub norm1: (usize, Option<usize>),
    /// Fused qkv `[3C, C]`, optional bias `[3C]`.
    pub qkv: (usize, Option<usize>),
    /// Attention output `[C, C]`, optional bias.
    pub attn_out: (usize, Option<usize>),
    /// LayerNorm before the MLP.
    pub norm2: (usize, Option<usize>),
    /// MLP in `[M, C]` and bias `[M]`.
    pub fc1: (usize, usize),
    /// MLP out `[C, M]` and bias `[C]`.
    pub fc2: (usize, usize),
    /// adaLN `[6C, cond]` and bias `[6C]` (DiT).
    pub ada: Option<(usize, usize)>,
}

/// Offsets of everything outside the blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Token embedding `[V, C]` (also the GPT-2 head).
    pub embed: usize,
    /// Learned positions `[context, C]` (GPT-2).
    pub positions: Option<usize>,
    /// Conditioning MLP (DiT): `mlp.0` weight/bias, `mlp.2` weight/bias.
    pub sigma_map: Option<[usize; 4]>,
    /// The blocks.
    pub blocks: Vec<BlockOffsets>,
    /// Final LayerNorm weight and optional bias.
    pub final_norm: (usize, Option<usize>),
    /// Final adaLN `[2C, cond]` and bias (DiT).
    pub final_ada: Option<(usize, usize)>,
    /// Output head weight `[V, C]` (= `embed` when tied) and optional bias.
    pub head: (usize, Option<usize>),
}

/// Every tensor of a configuration, in checkpoint order.
///
/// ```
/// use did_core::model::{Architecture, ModelConfig, ParamTable};
/// let t = ParamTable::new(&ModelConfig::preset("small", Architecture::Dit)?);
/// let qkv = t.get("blocks.11.attn_qkv.weight").unwrap();
/// assert_eq!(qkv.shape, [2304, 768]); // q rows, then k, then v (docs/bd3lm.md §7)
/// assert!(t.get("blocks.0.attn_qkv.bias").is_none()); // the DiT's projections have no bias
/// let gpt2 = ParamTable::new(&ModelConfig::preset("small", Architecture::Gpt2)?);
/// assert_eq!(gpt2.layout().head.0, gpt2.layout().embed); // tied embeddings
/// # Ok::<(), did_core::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct ParamTable {
    entries: Vec<ParamEntry>,
    layout: Layout,
    total: usize,
}

struct Builder {
    entries: Vec<ParamEntry>,
    total: usize,
}

impl Builder {
    fn add(&mut self, name: String, shape: &[usize], init: Init) -> usize {
        let offset = self.total;
        let e = ParamEntry {
            name,
            shape: shape.to_vec(),
            offset,
            init,
        };
        self.total += e.len();
        self.entries.push(e);
        offset
    }
    /// A PyTorch `nn.Linear`: weight `[out, in]`, optional bias; both U(±1/√in).
    fn linear(
        &mut self,
        name: &str,
        d_in: usize,
        d_out: usize,
        bias: bool,
        init: Option<Init>,
    ) -> (usize, Option<usize>) {
        let default = Init::Uniform(1.0 / libm::sqrtf(d_in as f32));
        let w = self.add(
            format!("{name}.weight"),
            &[d_out, d_in],
            init.unwrap_or(default),
        );
        let b = bias.then(|| self.add(format!("{name}.bias"), &[d_out], init.unwrap_or(default)));
        (w, b)
    }
}

impl ParamTable {
    /// The table of `config` (assumed valid).
    pub fn new(config: &ModelConfig) -> Self {
        let (c, v, m) = (config.hidden, config.vocab_size, config.mlp_hidden);
        let mut b = Builder {
            entries: Vec::new(),
            total: 0,
        };
        let layout = match config.architecture {
            Architecture::Dit => {
                let cond = config.cond_dim;
                let embed = b.add(
                    "vocab_embed.embedding".into(),
                    &[v, c],
                    Init::Uniform(1.0 / libm::sqrtf(c as f32)),
                );
                let (s0w, s0b) = b.linear("sigma_map.mlp.0", TIME_EMBEDDING_DIM, cond, true, None);
                let (s2w, s2b) = b.linear("sigma_map.mlp.2", cond, cond, true, None);
                let blocks = (0..config.layers)
                    .map(|i| {
                        let p = format!("blocks.{i}");
                        let norm1 = b.add(format!("{p}.norm1.weight"), &[c], Init::Ones);
                        let qkv = b.linear(&format!("{p}.attn_qkv"), c, 3 * c, false, None);
                        let attn_out = b.linear(&format!("{p}.attn_out"), c, c, false, None);
                        let norm2 = b.add(format!("{p}.norm2.weight"), &[c], Init::Ones);
                        let (f1w, f1b) = b.linear(&format!("{p}.mlp.0"), c, m, true, None);
                        let (f2w, f2b) = b.linear(&format!("{p}.mlp.2"), m, c, true, None);
                        let (aw, ab) = b.linear(
                            &format!("{p}.adaLN_modulation"),
                            cond,
                            6 * c,
                            true,
                            Some(Init::Zeros),
                        );
                        BlockOffsets {
                            norm1: (norm1, None),
                            qkv,
                            attn_out,
                            norm2: (norm2, None),
                            fc1: (f1w, f1b.unwrap_or(0)),
                            fc2: (f2w, f2b.unwrap_or(0)),
                            ada: Some((aw, ab.unwrap_or(0))),
                        }
                    })
                    .collect();
                let final_norm = b.add("output_layer.norm_final.weight".into(), &[c], Init::Ones);
                let head = b.linear("output_layer.linear", c, v, true, Some(Init::Zeros));
                let (fw, fb) = b.linear(
                    "output_layer.adaLN_modulation",
                    cond,
                    2 * c,
                    true,
                    Some(Init::Zeros),
                );
                Layout {
                    embed,
                    positions: None,
                    sigma_map: Some([s0w, s0b.unwrap_or(0), s2w, s2b.unwrap_or(0)]),
                    blocks,
                    final_norm: (final_norm, None),
                    final_ada: Some((fw, fb.unwrap_or(0))),
                    head,
                }
            }
            Architecture::Gpt2 => {
                let normal = Init::Normal(0.02);
                // GPT-2 scales the residual projections by 1/√(2·layers).
                let resid = Init::Normal(0.02 / libm::sqrtf((2 * config.layers.max(1)) as f32));
                let embed = b.add("wte.weight".into(), &[v, c], normal);
                let positions = b.add(
                    "wpe.weight".into(),
                    &[config.context, c],
                    Init::Normal(0.01),
                );
                let norm = |b: &mut Builder, name: String| {
                    let w = b.add(format!("{name}.weight"), &[c], Init::Ones);
                    let bias = b.add(format!("{name}.bias"), &[c], Init::Zeros);
                    (w, Some(bias))
                };
                let linear =
                    |b: &mut Builder, name: String, d_in: usize, d_out: usize, init: Init| {
                        let w = b.add(format!("{name}.weight"), &[d_out, d_in], init);
                        let bias = b.add(format!("{name}.bias"), &[d_out], Init::Zeros);
                        (w, bias)
                    };
                let blocks = (0..config.layers)
                    .map(|i| {
                        let p = format!("h.{i}");
                        let norm1 = norm(&mut b, format!("{p}.ln_1"));
                        let (qw, qb) = linear(&mut b, format!("{p}.attn.c_attn"), c, 3 * c, normal);
                        let (ow, ob) = linear(&mut b, format!("{p}.attn.c_proj"), c, c, resid);
                        let norm2 = norm(&mut b, format!("{p}.ln_2"));
                        let fc1 = linear(&mut b, format!("{p}.mlp.c_fc"), c, m, normal);
                        let fc2 = linear(&mut b, format!("{p}.mlp.c_proj"), m, c, resid);
                        BlockOffsets {
                            norm1,
                            qkv: (qw, Some(qb)),
                            attn_out: (ow, Some(ob)),
                            norm2,
                            fc1,
                            fc2,
                            ada: None,
                        }
                    })
                    .collect();
                let final_norm = norm(&mut b, "ln_f".into());
                Layout {
                    embed,
                    positions: Some(positions),
                    sigma_map: None,
                    blocks,
                    final_norm,
                    final_ada: None,
                    head: (embed, None),
                }
            }
        };
        ParamTable {
            entries: b.entries,
            layout,
            total: b.total,
        }
    }

    /// All tensors, in checkpoint order.
    pub fn entries(&self) -> &[ParamEntry] {
        &self.entries
    }

    /// The tensor called `name`.
    pub fn get(&self, name: &str) -> Option<&ParamEntry> {
        self.entries.iter().find(|e| e.name == name)
    }

    /// Offsets by role.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The matrices a pass reads in full or by rows, which a backend may store below f32
    /// ([`WeightFormat`](crate::backend::WeightFormat)): the token embedding, every block's
    /// qkv, attention output and MLP weights, and the output head (once when tied). The
    /// conditioning MLP and adaLN weights are not among them: inference applies them once, when
    /// it starts, so they stay f32 with the norms and biases.
    ///
    /// ```
    /// use did_core::model::{Architecture, ModelConfig, ParamTable};
    /// let t = ParamTable::new(&ModelConfig::preset("small", Architecture::Dit)?);
    /// let m = t.weight_matrices();
    /// assert_eq!(m.len(), 2 + 4 * 12);
    /// let stored: usize = m.iter().map(|w| w.rows * w.cols).sum();
    /// assert_eq!(stored, 2 * 50_258 * 768 + 12 * 12 * 768 * 768);
    /// # Ok::<(), did_core::Error>(())
    /// ```
    pub fn weight_matrices(&self) -> Vec<crate::backend::WeightMatrix> {
        let lay = &self.layout;
        let mut offsets = vec![lay.embed];
        for b in &lay.blocks {
            offsets.extend([b.qkv.0, b.attn_out.0, b.fc1.0, b.fc2.0]);
        }
        if lay.head.0 != lay.embed {
            offsets.push(lay.head.0);
        }
        offsets
            .into_iter()
            .filter_map(|offset| self.entries.iter().find(|e| e.offset == offset))
            .filter(|e| e.shape.len() == 2)
            .map(|e| crate::backend::WeightMatrix {
                offset: e.offset,
                rows: e.shape[0],
                cols: e.shape[1],
            })
            .collect()
    }

    /// Total number of parameters.
    pub fn total(&self) -> usize {
        self.total
    }

    /// The initial parameters, drawn from [`Purpose::Init`] streams of `seed`
    /// (tensor `i` uses sample `i`), so every backend starts from the same weights.
    pub fn initial_values(&self, seed: u64) -> Vec<f32> {
        let mut out = vec![0.0f32; self.total];
        for (i, e) in self.entries.iter().enumerate() {
            let stream = RngStream::new(seed, Purpose::Init, i as u32, 0);
            let dst = &mut out[e.offset..e.offset + e.len()];
            match e.init {
                Init::Zeros => dst.fill(0.0),
                Init::Ones => dst.fill(1.0),
                Init::Uniform(bound) => {
                    for (j, x) in dst.iter_mut().enumerate() {
                        let u = stream.uniform(((j as u64) >> 32) as u32, j as u32);
                        *x = ((2.0 * u - 1.0) * f64::from(bound)) as f32;
                    }
                }
                Init::Normal(std) => {
                    for (j, x) in dst.iter_mut().enumerate() {
                        // Box–Muller on two open uniforms.
                        let u1 = stream.uniform(((j as u64) >> 31) as u32, (2 * j) as u32);
                        let u2 = stream.uniform(((j as u64) >> 31) as u32, (2 * j + 1) as u32);
                        let z = libm::sqrt(-2.0 * libm::log(u1))
                            * libm::cos(core::f64::consts::TAU * u2);
                        *x = (z * f64::from(std)) as f32;
                    }
                }
            }
        }
        out
    }

    /// Random values for every tensor (zero-initialised ones included), for
    /// gradient checks that must exercise every path.
    pub fn random_values(&self, seed: u64, scale: f32) -> Vec<f32> {
        let stream = RngStream::new(seed, Purpose::Init, crate::rng::MAX_SAMPLE, 1);
        let mut out: Vec<f32> = (0..self.total)
            .map(|j| {
                ((2.0 * stream.uniform(((j as u64) >> 32) as u32, j as u32) - 1.0)
                    * f64::from(scale)) as f32
            })
            .collect();
        for e in &self.entries {
            if e.init == Init::Ones {
                for x in &mut out[e.offset..e.offset + e.len()] {
                    *x += 1.0;
                }
            }
        }
        out
    }
}
