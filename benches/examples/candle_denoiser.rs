//! did-core inside another engine: the demo's diffusion model written with
//! candle-core's CPU tensors (no `did` backend involved) implements
//! `did_core::denoiser::Denoiser`, and did-core drafts, remasks by snapshot
//! confidence and refines with it. The same weights through did's own CPU
//! backend give the reference: the two engines should draw the same tokens.
//!
//! Run: `cargo run --release -p did-benches --example candle_denoiser`
//! (from the repository root: it reads data/demo/dit.safetensors.gz).

use did_core::backend::prelude::*;
use std::collections::HashMap;

use candle_core::{Device, Tensor, D};
use did_backend_cpu::CpuBackend;
use did_core::denoiser::{DenoiseRequest, Denoiser};
use did_core::model::{time_embedding, DiffusionDenoiser, ModelConfig, ParamTable, Transformer};
use did_core::refine::{generate, GenerateConfig, StagePlan};

type Result<T> = candle_core::Result<T>;

/// The BD3-LM DiT at inference (σ = 0, no dropout), written plainly in candle.
struct CandleDit {
    config: ModelConfig,
    w: HashMap<String, Tensor>,
    /// Per block the six adaLN vectors (shift, scale, gate for attention, then for the MLP), and the final two.
    mods: Vec<Vec<Tensor>>,
    final_mod: Vec<Tensor>,
}

fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let y = x.matmul(&w.t()?)?;
    match b {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

fn silu(x: &Tensor) -> Result<Tensor> {
    x * candle_core::Tensor::ones_like(x)?.broadcast_div(&(x.neg()?.exp()? + 1.0)?)?
}

impl CandleDit {
    fn new(config: ModelConfig, params: &[f32]) -> Result<Self> {
        let dev = Device::Cpu;
        let mut w = HashMap::new();
        for e in ParamTable::new(&config).entries() {
            let t = Tensor::from_slice(
                &params[e.offset..e.offset + e.len()],
                e.shape.as_slice(),
                &dev,
            )?;
            w.insert(e.name.clone(), t);
        }
        // c = SiLU(W₂·SiLU(W₀·e(σ = 0) + b₀) + b₂); every modulation vector follows from it.
        let e = Tensor::from_vec(time_embedding(0.0), (1, time_embedding(0.0).len()), &dev)?;
        let s1 = silu(&linear(
            &e,
            &w["sigma_map.mlp.0.weight"],
            Some(&w["sigma_map.mlp.0.bias"]),
        )?)?;
        let c = silu(&linear(
            &s1,
            &w["sigma_map.mlp.2.weight"],
            Some(&w["sigma_map.mlp.2.bias"]),
        )?)?;
        let chunks = |name: &str, n: usize| -> Result<Vec<Tensor>> {
            linear(
                &c,
                &w[&format!("{name}.weight")],
                Some(&w[&format!("{name}.bias")]),
            )?
            .chunk(n, D::Minus1)
        };
        let mods = (0..config.layers)
            .map(|l| chunks(&format!("blocks.{l}.adaLN_modulation"), 6))
            .collect::<Result<Vec<_>>>()?;
        let final_mod = chunks("output_layer.adaLN_modulation", 2)?;
        Ok(CandleDit {
            config,
            w,
            mods,
            final_mod,
        })
    }

    fn layernorm(&self, x: &Tensor, weight: &Tensor) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        xc.broadcast_div(&(var + f64::from(self.config.norm_eps))?.sqrt()?)?
            .broadcast_mul(weight)
    }

    fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
        x.broadcast_mul(&(scale + 1.0)?)?.broadcast_add(shift)
    }

    /// Rotate-half RoPE of `[heads, n, d]` at positions 0..n.
    fn rope(&self, x: &Tensor) -> Result<Tensor> {
        let (_, n, d) = x.dims3()?;
        let half = d / 2;
        let mut cos = Vec::with_capacity(n * d);
        let mut sin = Vec::with_capacity(n * d);
        for p in 0..n {
            for _ in 0..2 {
                for i in 0..half {
                    let a = p as f64
                        * f64::from(self.config.rope_base).powf(-2.0 * i as f64 / d as f64);
                    cos.push(a.cos() as f32);
                    sin.push(a.sin() as f32);
                }
            }
        }
        let (cos, sin) = (
            Tensor::from_vec(cos, (n, d), x.device())?,
            Tensor::from_vec(sin, (n, d), x.device())?,
        );
        let rotated = Tensor::cat(
            &[
                &x.narrow(D::Minus1, half, half)?.neg()?,
                &x.narrow(D::Minus1, 0, half)?,
            ],
            D::Minus1,
        )?;
        x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
    }

    /// Logits `[n, V]` of one sequence's first `n` tokens, attention block-causal with `block`.
    fn forward(&self, tokens: &[u32], block: usize) -> Result<Tensor> {
        let (c, h) = (self.config.hidden, self.config.heads);
        let d = c / h;
        let n = tokens.len();
        let ids = Tensor::from_slice(tokens, n, &Device::Cpu)?;
        let mut x = self.w["vocab_embed.embedding"].index_select(&ids, 0)?;
        let mask: Vec<f32> = (0..n * n)
            .map(|i| {
                if (i % n) / block <= (i / n) / block {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, (n, n), &Device::Cpu)?;
        for (l, m) in self.mods.iter().enumerate() {
            let p = |s: &str| &self.w[&format!("blocks.{l}.{s}")];
            let h1 = Self::modulate(&self.layernorm(&x, p("norm1.weight"))?, &m[0], &m[1])?;
            let qkv = linear(&h1, p("attn_qkv.weight"), None)?; // [n, 3C]
            let heads = |i: usize| -> Result<Tensor> {
                qkv.narrow(1, i * c, c)?
                    .reshape((n, h, d))?
                    .transpose(0, 1)?
                    .contiguous()
            };
            let (q, k, v) = (self.rope(&heads(0)?)?, self.rope(&heads(1)?)?, heads(2)?);
            let scores = (q.matmul(&k.t()?)? / (d as f64).sqrt())?.broadcast_add(&mask)?;
            let att =
                candle_core::Tensor::exp(&scores.broadcast_sub(&scores.max_keepdim(D::Minus1)?)?)?;
            let att = att
                .broadcast_div(&att.sum_keepdim(D::Minus1)?)?
                .matmul(&v)?; // [h, n, d]
            let att = att.transpose(0, 1)?.reshape((n, c))?;
            let y1 = linear(&att, p("attn_out.weight"), None)?;
            x = (x + y1.broadcast_mul(&m[2])?)?;
            let h2 = Self::modulate(&self.layernorm(&x, p("norm2.weight"))?, &m[3], &m[4])?;
            let f1 = linear(&h2, p("mlp.0.weight"), Some(p("mlp.0.bias")))?.gelu()?; // tanh form
            let y2 = linear(&f1, p("mlp.2.weight"), Some(p("mlp.2.bias")))?;
            x = (x + y2.broadcast_mul(&m[5])?)?;
        }
        let hf = Self::modulate(
            &self.layernorm(&x, &self.w["output_layer.norm_final.weight"])?,
            &self.final_mod[0],
            &self.final_mod[1],
        )?;
        linear(
            &hf,
            &self.w["output_layer.linear.weight"],
            Some(&self.w["output_layer.linear.bias"]),
        )
    }
}

impl Denoiser for CandleDit {
    type Error = candle_core::Error;
    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }
    fn mask_id(&self) -> u32 {
        self.config.mask_id
    }
    /// No cache: every call recomputes the visible prefix, which the contract allows.
    fn logits(&mut self, r: &DenoiseRequest<'_>, out: &mut [f32]) -> Result<()> {
        let v = self.config.vocab_size;
        let mut per_seq: HashMap<u32, Vec<f32>> = HashMap::new();
        for (i, o) in r.outputs.iter().enumerate() {
            let logits = match per_seq.entry(o.seq) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    let seq = &r.sequence(o.seq as usize)[..r.block.end];
                    e.insert(
                        self.forward(seq, r.block_size)?
                            .flatten_all()?
                            .to_vec1::<f32>()?,
                    )
                }
            };
            let row = &logits[o.pos as usize * v..(o.pos as usize + 1) * v];
            out[i * v..(i + 1) * v].copy_from_slice(row);
        }
        Ok(())
    }
}

fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    let ckpt = did_engine::checkpoint::load(std::path::Path::new("data/demo/dit.safetensors.gz"))?;
    let (config, len) = (ckpt.config, 64);
    let plan: StagePlan = "4,L:0.25".parse()?;
    let gen = GenerateConfig::new(plan.resolve(len)?, 7);
    let prompts: [&[u32]; 2] = [&[256], &[256]];
    let tokenizer = did_engine::data::tokenizer::Tokenizer::new(
        did_engine::data::tokenizer::TokenizerKind::Bytes,
    );

    let mut candle = CandleDit::new(config, &ckpt.params)?;
    let t0 = std::time::Instant::now();
    let ours = generate(&mut candle, &gen, &prompts).map_err(|e| format!("{e:?}"))?;
    let candle_s = t0.elapsed().as_secs_f64();

    let be = CpuBackend::new();
    let model = Transformer::new(config)?;
    let params = be.upload(&ckpt.params)?;
    let mut reference = DiffusionDenoiser::new(&be, &model, &params, true)?;
    let did = generate(&mut reference, &gen, &prompts).map_err(|e| format!("{e:?}"))?;

    for s in 0..2 {
        let seq = |t: &[u32]| tokenizer.decode(&t[s * len + 1..(s + 1) * len]);
        println!(
            "--- sample {s}, draft (candle)\n{}",
            seq(&ours.stages[0].tokens)
        );
        println!("--- refined (candle)\n{}", seq(&ours.batch.tokens));
    }
    let differ = ours
        .batch
        .tokens
        .iter()
        .zip(&did.batch.tokens)
        .filter(|(a, b)| a != b)
        .count();
    println!(
        "\ncandle engine: {} denoiser calls in {candle_s:.2} s; did's CPU backend, same seed: {} of {} tokens differ",
        ours.nfe(),
        differ,
        ours.batch.tokens.len()
    );
    Ok(())
}
