//! The anchor of the CPU target (docs/perf/cpu.md): the same BD3 DiT training
//! pass — forward over `x_t ⊕ x_0` with the 2L training mask and backward —
//! written with candle-core's CPU tensors and autograd, the way a user of
//! that library would write it (dense additive mask, materialised scores).

use candle_core::{DType, Device, Result, Tensor, Var, D};

/// The shape of the model (the `tiny` preset by default).
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Blocks.
    pub layers: usize,
    /// Width.
    pub hidden: usize,
    /// Heads.
    pub heads: usize,
    /// Vocabulary with `[MASK]`.
    pub vocab: usize,
    /// `L`.
    pub seq_len: usize,
    /// `L'`.
    pub block_size: usize,
    /// adaLN conditioning width.
    pub cond: usize,
    /// Residual dropout.
    pub dropout: f32,
}

struct Block {
    norm1: Var,
    qkv: Var,
    out: Var,
    norm2: Var,
    fc1: (Var, Var),
    fc2: (Var, Var),
    ada: (Var, Var),
}

/// The parameters and the fixed inputs of one pass.
pub struct CandleDit {
    shape: Shape,
    embed: Var,
    blocks: Vec<Block>,
    final_norm: Var,
    head: (Var, Var),
    final_ada: (Var, Var),
    cond: Tensor,
    cos: Tensor,
    sin: Tensor,
    mask_bias: Tensor,
    subs_bias: Tensor,
}

fn var(shape: &[usize], scale: f64, dev: &Device) -> Result<Var> {
    Var::from_tensor(&(Tensor::rand(0f32, 1f32, shape, dev)?.affine(2.0 * scale, -scale)?))
}

impl CandleDit {
    /// Random parameters (every path active) for `shape`.
    pub fn new(shape: Shape) -> Result<Self> {
        let dev = Device::Cpu;
        let (c, m, v, k) = (shape.hidden, 4 * shape.hidden, shape.vocab, shape.cond);
        let blocks = (0..shape.layers)
            .map(|_| {
                Ok(Block {
                    norm1: Var::from_tensor(&Tensor::ones(c, DType::F32, &dev)?)?,
                    qkv: var(&[3 * c, c], 0.05, &dev)?,
                    out: var(&[c, c], 0.05, &dev)?,
                    norm2: Var::from_tensor(&Tensor::ones(c, DType::F32, &dev)?)?,
                    fc1: (var(&[m, c], 0.05, &dev)?, var(&[m], 0.05, &dev)?),
                    fc2: (var(&[c, m], 0.03, &dev)?, var(&[c], 0.03, &dev)?),
                    ada: (var(&[6 * c, k], 0.05, &dev)?, var(&[6 * c], 0.05, &dev)?),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let (l, b) = (shape.seq_len, shape.block_size);
        // RoPE tables for positions 0..L, repeated for the x_0 half.
        let d = c / shape.heads;
        let half = d / 2;
        let mut cos = Vec::with_capacity(2 * l * d);
        let mut sin = Vec::with_capacity(2 * l * d);
        for _ in 0..2 {
            for p in 0..l {
                for rep in 0..2 {
                    let _ = rep;
                    for i in 0..half {
                        let a = p as f64 * 10_000f64.powf(-2.0 * i as f64 / d as f64);
                        cos.push(a.cos() as f32);
                        sin.push(a.sin() as f32);
                    }
                }
            }
        }
        // The BD3 training mask as an additive bias (did-core's `mask::AttentionMask::Bd3Training`).
        let n = 2 * l;
        let mut bias = vec![0f32; n * n];
        for q in 0..n {
            for kk in 0..n {
                let (qx0, kx0) = (q >= l, kk >= l);
                let (qb, kb) = ((q % l) / b, (kk % l) / b);
                let allowed = (qb == kb && qx0 == kx0)
                    || (!qx0 && kx0 && kb < qb)
                    || (qx0 && kx0 && kb <= qb);
                if !allowed {
                    bias[q * n + kk] = f32::NEG_INFINITY;
                }
            }
        }
        let mut subs = vec![0f32; v];
        subs[v - 1] = -1e30;
        Ok(CandleDit {
            shape,
            embed: var(&[v, c], 0.05, &dev)?,
            blocks,
            final_norm: Var::from_tensor(&Tensor::ones(c, DType::F32, &dev)?)?,
            head: (var(&[v, c], 0.02, &dev)?, var(&[v], 0.02, &dev)?),
            final_ada: (var(&[2 * c, k], 0.05, &dev)?, var(&[2 * c], 0.05, &dev)?),
            cond: Tensor::rand(0f32, 1f32, (1, k), &dev)?,
            cos: Tensor::from_vec(cos, (n, d), &dev)?,
            sin: Tensor::from_vec(sin, (n, d), &dev)?,
            mask_bias: Tensor::from_vec(bias, (n, n), &dev)?,
            subs_bias: Tensor::from_vec(subs, v, &dev)?,
        })
    }

    fn layernorm(x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        xc.broadcast_div(&(var + 1e-5)?.sqrt()?)?.broadcast_mul(w)
    }

    fn rope(&self, x: &Tensor) -> Result<Tensor> {
        // x: [B, H, 2L, D]
        let d = x.dim(D::Minus1)?;
        let x1 = x.narrow(D::Minus1, 0, d / 2)?;
        let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        x.broadcast_mul(&self.cos)? + rotated.broadcast_mul(&self.sin)?
    }

    fn dropout(&self, x: &Tensor) -> Result<Tensor> {
        let p = f64::from(self.shape.dropout);
        if p == 0.0 {
            return Ok(x.clone());
        }
        let keep = Tensor::rand(0f32, 1f32, x.shape(), x.device())?
            .ge(p)?
            .to_dtype(DType::F32)?;
        (x * keep)?.affine(1.0 / (1.0 - p), 0.0)
    }

    /// One forward and backward over `x_t ⊕ x_0` ids `[batch, 2L]` with NELBO
    /// weights `[batch·L]` and targets `[batch·L]`; returns the loss.
    pub fn forward_backward(
        &self,
        ids: &Tensor,
        targets: &Tensor,
        weights: &Tensor,
    ) -> Result<f32> {
        let s = self.shape;
        let (batch, n) = ids.dims2()?;
        let (c, h) = (s.hidden, s.heads);
        let d = c / h;
        let mut x = self
            .embed
            .as_tensor()
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((batch, n, c))?;
        for blk in &self.blocks {
            let mods = self
                .cond
                .matmul(&blk.ada.0.as_tensor().t()?)?
                .broadcast_add(blk.ada.1.as_tensor())?;
            let m = |i: usize| mods.narrow(1, i * c, c);
            let h1 = Self::layernorm(&x, blk.norm1.as_tensor())?
                .broadcast_mul(&(m(1)? + 1.0)?)?
                .broadcast_add(&m(0)?)?;
            let qkv = h1
                .reshape((batch * n, c))?
                .matmul(&blk.qkv.as_tensor().t()?)?
                .reshape((batch, n, 3, h, d))?;
            let heads = |i: usize| -> Result<Tensor> {
                qkv.narrow(2, i, 1)?
                    .squeeze(2)?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let (q, k, v) = (self.rope(&heads(0)?)?, self.rope(&heads(1)?)?, heads(2)?);
            let scores = (q.matmul(&k.t()?.contiguous()?)? * (1.0 / (d as f64).sqrt()))?
                .broadcast_add(&self.mask_bias)?;
            let max = scores.max_keepdim(D::Minus1)?;
            let e = scores.broadcast_sub(&max)?.exp()?;
            let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
            let att = p.matmul(&v)?.transpose(1, 2)?.reshape((batch * n, c))?;
            let y1 = self.dropout(
                &att.matmul(&blk.out.as_tensor().t()?)?
                    .reshape((batch, n, c))?,
            )?;
            x = (x + y1.broadcast_mul(&m(2)?)?)?;
            let h2 = Self::layernorm(&x, blk.norm2.as_tensor())?
                .broadcast_mul(&(m(4)? + 1.0)?)?
                .broadcast_add(&m(3)?)?;
            let f1 = h2
                .reshape((batch * n, c))?
                .matmul(&blk.fc1.0.as_tensor().t()?)?
                .broadcast_add(blk.fc1.1.as_tensor())?
                .gelu()?;
            let y2 = f1
                .matmul(&blk.fc2.0.as_tensor().t()?)?
                .broadcast_add(blk.fc2.1.as_tensor())?;
            let y2 = self.dropout(&y2.reshape((batch, n, c))?)?;
            x = (x + y2.broadcast_mul(&m(5)?)?)?;
        }
        let fm = self
            .cond
            .matmul(&self.final_ada.0.as_tensor().t()?)?
            .broadcast_add(self.final_ada.1.as_tensor())?;
        let xt = x.narrow(1, 0, s.seq_len)?;
        let hf = Self::layernorm(&xt, self.final_norm.as_tensor())?
            .broadcast_mul(&(fm.narrow(1, c, c)? + 1.0)?)?
            .broadcast_add(&fm.narrow(1, 0, c)?)?;
        let logits = hf
            .reshape((batch * s.seq_len, c))?
            .matmul(&self.head.0.as_tensor().t()?)?
            .broadcast_add(self.head.1.as_tensor())?;
        let logits = logits.broadcast_add(&self.subs_bias)?;
        let max = logits.max_keepdim(D::Minus1)?;
        let shifted = logits.broadcast_sub(&max)?;
        let log_z = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
        let logp = shifted
            .broadcast_sub(&log_z)?
            .gather(&targets.unsqueeze(1)?, 1)?
            .squeeze(1)?;
        let loss = (logp * weights)?.sum_all()?.neg()?;
        let grads = loss.backward()?;
        // Touch one gradient so nothing is optimised away.
        let _ = grads.get(self.embed.as_tensor());
        loss.to_scalar::<f32>()
    }
}
