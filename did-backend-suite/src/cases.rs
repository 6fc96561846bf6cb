//! The cases of the suite: each op, forward and backward, on random shapes that include size 1
//! and non-multiples of 32, and each fused op against the calls it replaces.
//!
//! Each `pub fn name<H: Harness>()` is one test; [`backend_suite!`](crate::backend_suite) makes
//! them a backend's `#[test]`s.
#![allow(missing_docs)]

use did_core::backend::{
    AdamW, AttentionShape, Backend, DropoutMask, Gemm, NormShape, OptimizerStep, QkvOffsets,
    ResidualBranch, RopeShape, RowGroups, RowMajor, Slice, SliceMut, UpdatedWeights,
};
use did_core::mask::AttentionMask;
use did_core::rng::{Purpose, RngStream};
use quickcheck::TestResult;

use crate::{
    bf16_round, check, dims, down, down_at, fused_equals_composed, poisoned, qc, rand, verdict,
    Case, Harness, Out, BF16, F32,
};

pub struct MatmulCase {
    pub g: Gemm,
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    pub c: Vec<f32>,
}

impl Case for MatmulCase {
    fn run<B: Backend>(&self, be: &B) -> Result<Out, B::Error> {
        let (a, b) = (be.upload(&self.a)?, be.upload(&self.b)?);
        let mut c = if self.g.beta == 0.0 {
            poisoned(be, self.c.len())?
        } else {
            be.upload(&self.c)?
        };
        be.matmul(
            &self.g,
            Slice::whole(&a),
            Slice::whole(&b),
            SliceMut::whole(&mut c),
        )?;
        Ok(vec![("c", down(be, &c, self.c.len())?)])
    }
}

pub fn matmul_every_transpose_batch_and_broadcast<H: Harness>() {
    if !H::available("matmul_every_transpose_batch_and_broadcast") {
        return;
    }
    fn prop<H: Harness>(x: u8, y: u8, z: u8, seed: u64) -> TestResult {
        let (m, n, k) = (dims(x, 1, 70), dims(y, 1, 70), dims(z, 1, 70));
        let batch = dims((seed >> 8) as u8, 1, 3);
        let (ta, tb) = (seed & 1 == 1, seed & 2 == 2);
        let broadcast = seed & 4 == 4;
        let beta = if seed & 8 == 8 { 1.0 } else { 0.0 };
        let (lda, ldb) = (if ta { m } else { k }, if tb { k } else { n });
        let g = Gemm {
            trans_a: ta,
            trans_b: tb,
            m,
            n,
            k,
            lda,
            ldb,
            ldc: n,
            batch,
            stride_a: m * k,
            stride_b: if broadcast { 0 } else { k * n },
            stride_c: m * n,
            alpha: 0.75,
            beta,
        };
        let (ea, eb, ec) = g.extents();
        let case = MatmulCase {
            g,
            a: rand(seed, ea, 1.0),
            b: rand(seed ^ 1, eb, 1.0),
            c: rand(seed ^ 2, ec, 1.0),
        };
        verdict(check::<H, _>(
            &format!("matmul {g:?}"),
            &case,
            F32,
            Some(BF16),
        ))
    }
    qc(40, prop::<H>);
}

/// Rows `shape.stride` apart: the whole buffer comes back, so padding that either backend
/// touched would differ from the other's.
pub struct BiasCase {
    pub shape: RowMajor,
    pub x: Vec<f32>,
    pub bias: Vec<f32>,
    pub dbias: Vec<f32>,
}

impl Case for BiasCase {
    fn run<B: Backend>(&self, be: &B) -> Result<Out, B::Error> {
        let mut x = be.upload(&self.x)?;
        let bias = be.upload(&self.bias)?;
        be.bias_add_rows(SliceMut::whole(&mut x), Slice::whole(&bias), self.shape)?;
        let mut dbias = be.upload(&self.dbias)?;
        be.bias_backward_rows(Slice::whole(&x), SliceMut::whole(&mut dbias), self.shape)?;
        Ok(vec![
            ("x + bias", down(be, &x, self.x.len())?),
            ("dbias", down(be, &dbias, self.shape.cols)?),
        ])
    }
}

pub fn bias_forward_and_backward<H: Harness>() {
    if !H::available("bias_forward_and_backward") {
        return;
    }
    fn prop<H: Harness>(x: u8, y: u8, _z: u8, seed: u64) -> TestResult {
        let (rows, cols) = (dims(x, 1, 300), dims(y, 1, 100));
        // Dense rows, or padded to a multiple of 8 (the 16-byte loop in bf16) or of 7.
        let stride = match seed % 3 {
            0 => cols,
            1 => cols.next_multiple_of(8) + 8,
            _ => cols.next_multiple_of(7) + 1,
        };
        let shape = RowMajor::padded(rows, cols, stride);
        let case = BiasCase {
            shape,
            x: rand(seed, rows * stride, 1.0),
            bias: rand(seed ^ 1, cols, 1.0),
            dbias: rand(seed ^ 2, cols, 1.0),
        };
        verdict(check::<H, _>(
            &format!("bias {rows}×{cols}, stride {stride}"),
            &case,
            F32,
            Some(BF16),
        ))
    }
    qc(30, prop::<H>);
}

pub struct LayerNormCase {
    pub s: NormShape,
    pub with_bias: bool,
    pub x: Vec<f32>,
    pub w: Vec<f32>,
    pub b: Vec<f32>,
    pub dout: Vec<f32>,
    pub dx: Vec<f32>,
    pub dw: Vec<f32>,
}

impl Case for LayerNormCase {
    fn run<B: Backend>(&self, be: &B) -> Result<Out, B::Error> {
        let (rows, cols) = (self.s.rows, self.s.cols);
        let (x, w, b) = (
            be.upload(&self.x)?,
            be.upload(&self.w)?,
            be.upload(&self.b)?,
        );
        let mut out = poisoned(be, rows * cols)?;
        let (mut mean, mut rstd) = (poisoned(be, rows)?, poisoned(be, rows)?);
        be.layernorm_forward(
            &self.s,
            Slice::whole(&x),
            Slice::whole(&w),
            self.with_bias.then(|| Slice::whole(&b)),
            SliceMut::whole(&mut out),
            SliceMut::whole(&mut mean),
            SliceMut::whole(&mut rstd),
        )?;
        let dout = be.upload(&self.dout)?;
        let (mut dx, mut dw) = (be.upload(&self.dx)?, be.upload(&self.dw)?);
        be.layernorm_backward(
            &self.s,
            Slice::whole(&dout),
            Slice::whole(&x),
            Slice::whole(&w),
            Slice::whole(&mean),
            Slice::whole(&rstd),
            SliceMut::whole(&mut dx),
            SliceMut::whole(&mut dw),
        )?;
        Ok(vec![
            ("out", down(be, &out, rows * cols)?),
            ("mean", down(be, &mean, rows)?),
            ("rstd", down(be, &rstd, rows)?),
            ("dx", down(be, &dx, rows * cols)?),
            ("dweight", down(be, &dw, cols)?),
        ])
    }
}

pub fn layernorm_forward_and_backward<H: Harness>() {
    if !H::available("layernorm_forward_and_backward") {
        return;
    }
    fn prop<H: Harness>(x: u8, y: u8, z: u8, seed: u64) -> TestResult {
        let (rows, cols) = (dims(x, 1, 150), dims(y, 1, 600));
        let s = NormShape {
            rows,
            cols,
            eps: 1e-5,
        };
        let n = rows * cols;
        let case = LayerNormCase {
            s,
            with_bias: z % 2 == 0,
            x: rand(seed, n, 2.0)
                .iter()
                .enumerate()
                .map(|(i, v)| bf16_round(v + (i % 7) as f32 * 0.1))
                .collect(),
            w: rand(seed ^ 1, cols, 1.0),
            b: rand(seed ^ 2, cols, 1.0),
            dout: rand(seed ^ 3, n, 1.0),
            dx: rand(seed ^ 4, n, 1.0),
            dw: rand(seed ^ 5, cols, 1.0),
        };
        // rstd of a row of one element is 1/√eps: bf16's relative error only.
        verdict(check::<H, _>(
            &format!("layernorm {rows}×{cols}"),
            &case,
            F32,
            Some(BF16),
        ))
    }
    qc(30, prop::<H>);
}

pub struct ModulateCase {
    pub batch: usize,
    pub tokens: usize,
    pub channels: usize,
    pub gated: bool,
    pub x: Vec<f32>,
    pub shift: Vec<f32>,
    pub scale: Vec<f32>,
    pub dout: Vec<f32>,
    pub acc: Vec<f32>,
    pub acc_small: Vec<f32>,
}

impl Case for ModulateCase {
    fn run<B: Backend>(&self, be: &B) -> Result<Out, B::Error> {
        let (b, t, c) = (self.batch, self.tokens, self.channels);
        let n = b * t * c;
        let (x, shift, scale, dout) = (
            be.upload(&self.x)?,
            be.upload(&self.shift)?,
            be.upload(&self.scale)?,
            be.upload(&self.dout)?,
        );
        let mut out = poisoned(be, n)?;
        be.modulate_forward(
            Slice::whole(&x),
            Slice::whole(&shift),
            Slice::whole(&scale),
            SliceMut::whole(&mut out),
            b,
            t,
            c,
        )?;
        let (mut dx, mut dscale) = (poisoned(be, n)?, be.upload(&self.acc_small)?);
        be.modulate_backward(
            Slice::whole(&dout),
            Slice::whole(&x),
            Slice::whole(&scale),
            SliceMut::whole(&mut dx),
            SliceMut::whole(&mut dscale),
            b,
            t,
            c,
        )?;
        let mut residual = be.upload(&self.acc)?;
        let gate = self.gated.then(|| Slice::whole(&scale));
        be.gated_residual_forward(
            SliceMut::whole(&mut residual),
            Slice::whole(&x),
            gate,
            b,
            t,
            c,
        )?;
        let (mut dy, mut dgate) = (poisoned(be, n)?, be.upload(&self.acc_small)?);
        be.gated_residual_backward(
            Slice::whole(&dout),
            Slice::whole(&x),
            gate,
            SliceMut::whole(&mut dy),
            self.gated.then(|| SliceMut::whole(&mut dgate)),
            b,
            t,
            c,
        )?;
        Ok(vec![
            ("modulate out", down(be, &out, n)?),
            ("modulate dx", down(be, &dx, n)?),
            ("modulate dscale", down(be, &dscale, b * c)?),
            ("residual", down(be, &residual, n)?),
            ("gated dy", down(be, &dy, n)?),
            ("dgate", down(be, &dgate, b * c)?),
        ])
    }
}

pub fn modulation_and_gated_residual_forward_and_backward<H: Harness>() {
    if !H::available("modulation_and_gated_residual_forward_and_backward") {
        return;
    }
    fn prop<H: Harness>(x: u8, y: u8, z: u8, seed: u64) -> TestResult {
        let (batch, tokens, channels) = (dims(z, 1, 3), dims(x, 1, 130), dims(y, 1, 80));
        let n = batch * tokens * channels;
        let case = ModulateCase {
            batch,
            tokens,
            channels,
            gated: seed % 2 == 0,
            x: rand(seed, n, 1.0),
            shift: rand(seed ^ 1, batch * channels, 1.0),
            scale: rand(seed ^ 2, batch * channels, 1.0),
            dout: rand(seed ^ 3, n, 1.0),
            acc: rand(seed ^ 4, n, 1.0),
            acc_small: rand(seed ^ 5, batch * channels, 1.0),
        };
        verdict(check::<H, _>(
            &format!("modulate {batch}×{tokens}×{channels}"),
            &case,
            F32,
            Some(BF16),
        ))
    }
    qc(30, prop::<H>);
}

/// LayerNorm + modulation, bias + GELU and the out-of-place gated residual, each computed by the
/// fused call and by the calls it replaces: outputs `[fused..., composed...]`.
pub struct FusedCase {
    pub norm: NormShape,
    pub tokens: usize,
    pub cols4: usize,
    pub x: Vec<f32>,
    pub w: Vec<f32>,
    pub b: Vec<f32>,
    pub shift: Vec<f32>,
    pub scale: Vec<f32>,
    pub pre: Vec<f32>,
    pub bias4: Vec<f32>,
    pub y: Vec<f32>,
}

impl Case for FusedCase {
    fn run<B: Backend>(&self, be: &B) -> Result<Out, B::Error> {
        let (rows, cols) = (self.norm.rows, self.norm.cols);
        let (n, n4, seqs) = (rows * cols, rows * self.cols4, rows / self.tokens);
        let (x, w, b) = (
            be.upload(&self.x)?,
            be.upload(&self.w)?,
            be.upload(&self.b)?,
        );
        let (shift, scale, bias4, mut y) = (
            be.upload(&self.shift)?,
            be.upload(&self.scale)?,
            be.upload(&self.bias4)?,
            be.upload(&self.y)?,
        );
        let mut outs = Vec::new();
        for fused in [true, false] {
            let (mut ln, mut mean, mut rstd, mut h) = (
                poisoned(be, n)?,
                poisoned(be, rows)?,
                poisoned(be, rows)?,
                poisoned(be, n)?,
            );
            let (mut pre, mut g, mut res) =
                (be.upload(&self.pre)?, poisoned(be, n4)?, poisoned(be, n)?);
            let (mut biased, mut res_b) = (be.upload(&self.y)?, poisoned(be, n)?);
            let gate = Some(Slice::whole(&scale));
            if fused {
                be.layernorm_modulate_forward(
                    &self.norm,
                    Slice::whole(&x),
                    Slice::whole(&w),
                    Some(Slice::whole(&b)),
                    Slice::whole(&shift),
                    Slice::whole(&scale),
                    self.tokens,
                    SliceMut::whole(&mut ln),
                    SliceMut::whole(&mut mean),
                    SliceMut::whole(&mut rstd),
                    SliceMut::whole(&mut h),
                )?;
                be.bias_gelu_forward(
                    SliceMut::whole(&mut pre),
                    Slice::whole(&bias4),
                    SliceMut::whole(&mut g),
                    rows,
                    self.cols4,
                )?;
                let plain = ResidualBranch::plain(seqs, self.tokens, cols);
                be.residual_forward_into(
                    Slice::whole(&x),
                    SliceMut::whole(&mut y),
                    ResidualBranch { gate, ..plain },
                    SliceMut::whole(&mut res),
                )?;
                let plain = ResidualBranch::plain(seqs, self.tokens, cols);
                be.residual_forward_into(
                    Slice::whole(&x),
                    SliceMut::whole(&mut biased),
                    ResidualBranch {
                        bias: Some(Slice::whole(&b)),
                        gate,
                        ..plain
                    },
                    SliceMut::whole(&mut res_b),
                )?;
            } else {
                be.layernorm_forward(
                    &self.norm,
                    Slice::whole(&x),
                    Slice::whole(&w),
                    Some(Slice::whole(&b)),
                    SliceMut::whole(&mut ln),
                    SliceMut::whole(&mut mean),
                    SliceMut::whole(&mut rstd),
                )?;
                be.modulate_forward(
                    Slice::whole(&ln),
                    Slice::whole(&shift),
                    Slice::whole(&scale),
                    SliceMut::whole(&mut h),
                    seqs,
                    self.tokens,
                    cols,
                )?;
                be.bias_add(
                    SliceMut::whole(&mut pre),
                    Slice::whole(&bias4),
                    rows,
                    self.cols4,
                )?;
                be.gelu_forward(Slice::whole(&pre), SliceMut::whole(&mut g), n4)?;
                be.copy(Slice::whole(&x), SliceMut::whole(&mut res), n)?;
                be.gated_residual_forward(
                    SliceMut::whole(&mut res),
                    Slice::whole(&y),
                    gate,
                    seqs,
                    self.tokens,
                    cols,
                )?;
                be.bias_add(SliceMut::whole(&mut biased), Slice::whole(&b), rows, cols)?;
                be.copy(Slice::whole(&x), SliceMut::whole(&mut res_b), n)?;
                be.gated_residual_forward(
                    SliceMut::whole(&mut res_b),
                    Slice::whole(&biased),
                    gate,
                    seqs,
                    self.tokens,
                    cols,
                )?;
            }
            outs.extend([
                ("ln", down(be, &ln, n)?),
                ("mean", down(be, &mean, rows)?),
                ("rstd", down(be, &rstd, rows)?),
                ("modulated", down(be, &h, n)?),
                ("pre-activation", down(be, &pre, n4)?),
                ("gelu", down(be, &g, n4)?),
                ("residual", down(be, &res, n)?),
                ("biased y", down(be, &biased, n)?),
                ("bias + residual", down(be, &res_b, n)?),
            ]);
        }
        Ok(outs)
    }
}

/// Each fused forward against the CPU (whose fused calls are the provided compositions), and
/// on the GPU bit for bit equal to the calls it replaces, in both precisions.
pub fn fused_forwards_equal_the_calls_they_replace<H: Harness>() {
    if !H::available("fused_forwards_equal_the_calls_they_replace") {
        return;
    }
    fn prop<H: Harness>(x: u8, y: u8, z: u8, seed: u64) -> TestResult {
        let (seqs, tokens, cols) = (dims(z, 1, 3), dims(x, 1, 70), dims(y, 1, 300));
        let (rows, cols4) = (seqs * tokens, 4 * cols);
        let case = FusedCase {
            norm: NormShape {
                rows,
                cols,
                eps: 1e-5,
            },
            tokens,
            cols4,
            x: rand(seed, rows * cols, 2.0),
            w: rand(seed ^ 1, cols, 1.0),
            b: rand(seed ^ 2, cols, 1.0),
            shift: rand(seed ^ 3, seqs * cols, 1.0),
            scale: rand(seed ^ 4, seqs * cols, 1.0),
            pre: rand(seed ^ 5, rows * cols4, 2.0),
            bias4: rand(seed ^ 6, cols4, 1.0),
            y: rand(seed ^ 7, rows * cols, 1.0),
        };
        let label = format!("fused {seqs}×{tokens}×{cols}");
        verdict(
            check::<H, _>(&label, &case, F32, Some(BF16))
                .and_then(|()| fused_equals_composed::<H, _>(&label, &case)),
        )
    }
    qc(30, prop::<H>);
}

/// A training branch's output into the residual — bias (or none), dropout, gated residual — and
/// the backward's dy with the dropout: the fused calls, then the calls they replace.
pub struct DropoutBranchCase {
    pub seqs: usize,
    pub tokens: usize,
    pub cols: usize,
    pub p: f32,
    pub x: Vec<f32>,
    pub y: Vec<f32>,
    pub bias: Vec<f32>,
    pub gate: Vec<f32>,
    pub dres: Vec<f32>,
}

impl Case for DropoutBranchCase {
    fn run<B: Backend>(&self, be: &B) -> Result<Out, B::Error> {
        let (seqs, tokens, cols) = (self.seqs, self.tokens, self.cols);
        let (rows, n) = (seqs * tokens, seqs * tokens * cols);
        let stream = RngStream::new(3, Purpose::Dropout, 2, 5);
        let mask = DropoutMask { p: self.p, stream };
        let (x, bias, gate) = (
            be.upload(&self.x)?,
            be.upload(&self.bias)?,
            be.upload(&self.gate)?,
        );
        let dres = be.upload(&self.dres)?;
        let g = Some(Slice::whole(&gate));
        let mut outs = Vec::new();
        for fused in [true, false] {
            for with_bias in [true, false] {
                let b = with_bias.then(|| Slice::whole(&bias));
                let (mut y, mut out) = (be.upload(&self.y)?, poisoned(be, n)?);
                if fused {
                    let branch = ResidualBranch {
                        bias: b,
                        dropout: Some(mask),
                        gate: g,
                        ..ResidualBranch::plain(seqs, tokens, cols)
                    };
                    be.residual_forward_into(
                        Slice::whole(&x),
                        SliceMut::whole(&mut y),
                        branch,
                        SliceMut::whole(&mut out),
                    )?;
                } else {
                    if let Some(b) = b {
                        be.bias_add(SliceMut::whole(&mut y), b, rows, cols)?;
                    }
                    be.dropout(SliceMut::whole(&mut y), n, self.p, &stream)?;
                    be.copy(Slice::whole(&x), SliceMut::whole(&mut out), n)?;
                    be.gated_residual_forward(
                        SliceMut::whole(&mut out),
                        Slice::whole(&y),
                        g,
                        seqs,
                        tokens,
                        cols,
                    )?;
                }
                outs.push(("dropped y", down(be, &y, n)?));
                outs.push(("out", down(be, &out, n)?));
            }
            let y = be.upload(&self.y)?;
            let mut dy = poisoned(be, n)?;
            let mut dgate = be.upload(&self.gate)?;
            if fused {
                let branch = ResidualBranch {
                    dropout: Some(mask),
                    gate: g,
                    ..ResidualBranch::plain(seqs, tokens, cols)
                };
                be.residual_backward(
                    Slice::whole(&dres),
                    Slice::whole(&y),
                    branch,
                    SliceMut::whole(&mut dy),
                    Some(SliceMut::whole(&mut dgate)),
                )?;
            } else {
                be.gated_residual_backward(
                    Slice::whole(&dres),
                    Slice::whole(&y),
                    g,
                    SliceMut::whole(&mut dy),
                    Some(SliceMut::whole(&mut dgate)),
                    seqs,
                    tokens,
                    cols,
                )?;
                be.dropout(SliceMut::whole(&mut dy), n, self.p, &stream)?;
            }
            outs.push(("dy", down(be, &dy, n)?));
            outs.push(("dgate", down(be, &dgate, seqs * cols)?));
        }
        Ok(outs)
    }
}

/// The fused branch output and its backward against the CPU, and on the GPU bit for bit equal
/// to the calls they replace, in both precisions; row lengths that keep and break the 16-byte
/// loops.
pub fn dropout_branches_equal_the_calls_they_replace<H: Harness>() {
    if !H::available("dropout_branches_equal_the_calls_they_replace") {
        return;
    }
    fn prop<H: Harness>(x: u8, y: u8, z: u8, seed: u64) -> TestResult {
        let (seqs, tokens, cols) = (dims(z, 1, 3), dims(x, 1, 70), dims(y, 1, 300));
        let n = seqs * tokens * cols;
        let case = DropoutBranchCase {
            seqs,
            tokens,
            cols,
            p: [0.1, 0.5, 1.0][seed as usize % 3],
            x: rand(seed, n, 2.0),
            y: rand(seed ^ 1, n, 1.0),
            bias: rand(seed ^ 2, cols, 1.0),
            gate: rand(seed ^ 3, seqs * cols, 1.0),
            dres: rand(seed ^ 4, n, 1.0),
        };
        let label = format!("dropout branch {seqs}×{tokens}×{cols}, p {}", case.p);
        verdict(
            check::<H, _>(&label, &case, F32, Some(BF16))
                .and_then(|()| fused_equals_composed::<H, _>(&label, &case)),
        )
    }
    qc(30, prop::<H>);
}

pub struct RopeCase {
    pub s: RopeShape,
    pub x: Vec<f32>,
}

impl Case for RopeCase {
    fn run<B: Backend>(&self, be: &B) -> Result<Out, B::Error> {
        let mut x = be.upload(&self.x)?;
        be.rope_forward(&self.s, SliceMut::whole(&mut x))?;
        let fwd = down(be, &x, self.x.len())?;
        let mut g = be.upload(&self.x)?;
        be.rope_backward(&self.s, SliceMut::whole(&mut g))?;
        Ok(vec![
            ("rotated", fwd),
            ("inverse-rotated", down(be, &g, self.x.len())?),
        ])
    }
}

pub fn rope_forward_and_backward_with_strides_and_offsets<H: Harness>() {
    if !H::available("rope_forward_and_backward_with_strides_and_offsets") {
        return;
    }
    fn prop<H: Harness>(x: u8, y: u8, z: u8, seed: u64) -> TestResult {
        let (heads, head_dim) = (dims(z, 1, 4), 2 * dims(y, 1, 40));
        let (batch, tokens) = (dims((seed >> 4) as u8, 1, 3), dims(x, 1, 60));
        let width = heads * head_dim;
        let stride = width * if seed % 2 == 0 { 1 } else { 3 };
        let s = RopeShape {
            batch,
            tokens,
            heads,
            head_dim,
            stride,
            batch_stride: tokens * stride,
            position_offset: (seed % 1000) as usize,
            base: 10_000.0,
        };
        let case = RopeCase {
            s,
            x: rand(seed, batch * tokens * stride, 1.0),
        };
        verdict(check::<H, _>(
            &format!("rope {s:?}"),
            &case,
            F32,
            Some(BF16),
        ))
    }
    qc(30, prop::<H>);
}

/// A KV-cached pass's RoPE and cache append: queries and keys rotated in fused `[q | k | v]`
/// rows, then columns `col0 .. col0 + cols` of each row copied into cache slots from `slot`.
pub struct RopeCopyCase {
    pub s: RopeShape,
    pub col0: usize,
    pub append: RowGroups,
    pub slot: usize,
    pub x: Vec<f32>,
    pub cache: Vec<f32>,
}

impl Case for RopeCopyCase {
    fn run<B: Backend>(&self, be: &B) -> Result<Out, B::Error> {
        let mut outs = Vec::new();
        for fused in [true, false] {
            let mut x = be.upload(&self.x)?;
            let mut cache = be.upload(&self.cache)?;
            let dst = SliceMut::at(&mut cache, self.slot * self.append.dst_stride);
            if fused {
                be.rope_forward_and_copy(
                    &self.s,
                    SliceMut::whole(&mut x),
                    self.col0,
                    dst,
                    &self.append,
                )?;
            } else {
                be.rope_forward(&self.s, SliceMut::whole(&mut x))?;
                be.copy_row_groups(Slice::at(&x, self.col0), dst, &self.append)?;
            }
            outs.push(("rows", down(be, &x, self.x.len())?));
            outs.push(("cache", down(be, &cache, self.cache.len())?));
        }
        Ok(outs)
    }
}

/// RoPE with the cache append in one call against the CPU, and on the GPU bit for bit the
/// rotation then the copy, for the draft's window (the keys and values of fused qkv rows) and
/// for windows that start inside a head, lie inside the rotation or leave it.
pub fn rope_with_the_cache_append_equals_rope_then_the_copy<H: Harness>() {
    if !H::available("rope_with_the_cache_append_equals_rope_then_the_copy") {
        return;
    }
    fn prop<H: Harness>(x: u8, y: u8, z: u8, seed: u64) -> TestResult {
        let (heads, head_dim) = (dims(z, 1, 4), 2 * dims(y, 1, 40));
        let (batch, tokens) = (dims((seed >> 4) as u8, 1, 3), dims(x, 1, 20));
        let width = heads * head_dim;
        let stride = 3 * width;
        let (col0, cols) = match seed % 4 {
            0 | 1 => (width, 2 * width),
            2 => (width + 1, 2 * width - 1),
            _ => (1, width),
        };
        let (capacity, slot) = (tokens + 3, (seed >> 12) as usize % 4);
        let s = RopeShape {
            batch,
            tokens,
            heads: 2 * heads,
            head_dim,
            stride,
            batch_stride: tokens * stride,
            position_offset: (seed % 1000) as usize,
            base: 10_000.0,
        };
        let append = RowGroups {
            groups: batch,
            rows: tokens,
            cols,
            src_stride: stride,
            src_group_stride: tokens * stride,
            dst_stride: cols,
            dst_group_stride: capacity * cols,
        };
        let case = RopeCopyCase {
            s,
            col0,
            append,
            slot,
            x: rand(seed, batch * tokens * stride, 1.0),
            cache: rand(seed ^ 1, batch * capacity * cols, 1.0),
        };
        let label = format!("rope and copy of columns {col0}.. ({cols}) {s:?}");
        verdict(
            check::<H, _>(&label, &case, F32, Some(BF16))
                .and_then(|()| fused_equals_composed::<H, _>(&label, &case)),
        )
    }
    qc(30, prop::<H>);
}

pub struct AttentionCase {
    pub s: AttentionShape,
    pub mask: AttentionMask,
    pub qkv: Vec<f32>,
    pub kv: Vec<f32>,
    pub dout: Vec<f32>,
    /// What the gradient buffer holds before (the op overwrites the gradients and must leave
    /// the rest): a copy of the q buffer's layout, then one of the k | v buffer's.
    pub acc: Vec<f32>,
}

impl Case for AttentionCase {
    fn run<B: Backend>(&self, be: &B) -> Result<Out, B::Error> {
        let s = &self.s;
        let width = s.heads * s.head_dim;
        let q = be.upload(&self.qkv)?;
        let kv = be.upload(&self.kv)?;
        // k and v live in one buffer, v after k's `width` channels (a fused layout).
        let (k, v) = (Slice::at(&kv, 0), Slice::at(&kv, width));
        let mut out = poisoned(be, s.batch * s.q_len * width)?;
        // The log-sum-exp is kept in f32 whatever the storage (zeros_f32), NaN until written.
        let n_lse = s.batch * s.heads * s.q_len;
        let mut lse = be.zeros_f32(n_lse)?;
        be.fill(SliceMut::whole(&mut lse), n_lse, f32::NAN)?;
        be.attention_forward(
            s,
            &self.mask,
            Slice::whole(&q),
            k,
            v,
            SliceMut::whole(&mut out),
            SliceMut::whole(&mut lse),
        )?;
        let dout = be.upload(&self.dout)?;
        // Gradients laid out like the inputs, in one buffer: the q buffer's layout, then the
        // k | v buffer's (so the columns no gradient owns must come back untouched too).
        let mut grads = be.upload(&self.acc)?;
        let at = QkvOffsets {
            q: 0,
            k: self.qkv.len(),
            v: self.qkv.len() + width,
        };
        be.attention_backward(
            s,
            &self.mask,
            Slice::whole(&dout),
            Slice::whole(&q),
            k,
            v,
            Slice::whole(&out),
            Slice::whole(&lse),
            SliceMut::whole(&mut grads),
            at,
        )?;
        let nq = s.batch * s.q_len * width;
        Ok(vec![
            ("out", down(be, &out, nq)?),
            ("lse", down(be, &lse, s.batch * s.heads * s.q_len)?),
            ("dq", down(be, &grads, self.qkv.len())?),
            (
                "dk | dv",
                down_at(be, &grads, self.qkv.len(), self.kv.len())?,
            ),
        ])
    }
}

/// A mask of each kind with its query and key counts: the BD3 training pass,
/// a KV-cached block (queries = one block after a cache, optional window),
/// full, and causal with a window.
pub fn attention_mask(kind: u8, a: usize, b: usize, seed: u64) -> (AttentionMask, usize, usize) {
    match kind % 4 {
        0 => {
            let block = 1 + b % 8;
            let l = block * (1 + a % 12);
            (
                AttentionMask::Bd3Training {
                    seq_len: l,
                    block_size: block,
                },
                2 * l,
                2 * l,
            )
        }
        1 => {
            let block = 1 + b % 16;
            let cached = block * (a % 6);
            let window = (seed % 3 == 0).then_some(block * 2 + (seed % 5) as usize);
            let key_offset = if window.is_some() {
                cached.saturating_sub(block)
            } else {
                0
            };
            let mask = AttentionMask::BlockCausal {
                block_size: block,
                query_offset: cached,
                key_offset,
                window,
            };
            (mask, block, cached + block - key_offset)
        }
        2 => (AttentionMask::Full, 1 + a % 70, 1 + b % 70),
        _ => {
            let window = (seed % 2 == 0).then_some(1 + (seed % 17) as usize);
            (
                AttentionMask::Causal {
                    query_offset: 0,
                    key_offset: 0,
                    window,
                },
                1 + a % 90,
                1 + a % 90,
            )
        }
    }
}

/// A random attention case under mask kind `z`: 1–3 heads of `head_dim`, batch 1–2, q inside
/// a fused qkv-like row of 3·width, k and v interleaved in rows of 2·width.
pub fn attention_case(z: u8, x: u8, y: u8, seed: u64, head_dim: usize) -> AttentionCase {
    let (mask, q_len, kv_len) = attention_mask(z, x as usize, y as usize, seed);
    let heads = dims((seed >> 8) as u8, 1, 3);
    let batch = dims((seed >> 32) as u8, 1, 2);
    let width = heads * head_dim;
    let s = AttentionShape::over_cache(batch, heads, head_dim, q_len, kv_len, kv_len);
    AttentionCase {
        s,
        mask,
        qkv: rand(seed, batch * q_len * 3 * width, 1.5),
        kv: rand(seed ^ 1, batch * kv_len * 2 * width, 1.5),
        dout: rand(seed ^ 2, batch * q_len * width, 1.0),
        acc: rand(seed ^ 3, batch * (q_len * 3 + kv_len * 2) * width, 1.0),
    }
}

pub fn attention_forward_and_backward_under_every_mask<H: Harness>() {
    if !H::available("attention_forward_and_backward_under_every_mask") {
        return;
    }
    fn prop<H: Harness>(x: u8, y: u8, z: u8, seed: u64) -> TestResult {
        let head_dim = match (seed >> 16) % 4 {
            0 => 64,
            1 => 1,
            _ => dims((seed >> 24) as u8, 2, 100),
        };
        let case = attention_case(z, x, y, seed, head_dim);
        // The correctness-first kernels at the element-wise tolerance; the flash kernels (the
        // bf16 default at head dimension 64) have their own test below.
        verdict(check::<H, _>(
            &format!("attention {:?} {:?}", case.mask, case.s),
            &case,
            F32,
            Some(BF16),
        ))
    }
    qc(60, prop::<H>);
}

pub struct ActivationCase {
    pub x: Vec<f32>,
    pub dout: Vec<f32>,
    pub p: f32,
    pub stream: RngStream,
}

impl Case for ActivationCase {
    fn run<B: Backend>(&self, be: &B) -> Result<Out, B::Error> {
        let n = self.x.len();
        let (x, dout) = (be.upload(&self.x)?, be.upload(&self.dout)?);
        let (mut gelu, mut silu) = (poisoned(be, n)?, poisoned(be, n)?);
        be.gelu_forward(Slice::whole(&x), SliceMut::whole(&mut gelu), n)?;
        be.silu_forward(Slice::whole(&x), SliceMut::whole(&mut silu), n)?;
        let (mut dgelu, mut dsilu) = (poisoned(be, n)?, poisoned(be, n)?);
        be.gelu_backward(
            Slice::whole(&dout),
            Slice::whole(&x),
            SliceMut::whole(&mut dgelu),
            n,
        )?;
        be.silu_backward(
            Slice::whole(&dout),
            Slice::whole(&x),
            SliceMut::whole(&mut dsilu),
            n,
        )?;
        let mut dropped = be.upload(&self.x)?;
        be.dropout(SliceMut::whole(&mut dropped), n, self.p, &self.stream)?;
        Ok(vec![
            ("gelu", down(be, &gelu, n)?),
            ("silu", down(be, &silu, n)?),
            ("dgelu", down(be, &dgelu, n)?),
            ("dsilu", down(be, &dsilu, n)?),
            ("dropout", down(be, &dropped, n)?),
        ])
    }
}

pub fn activations_and_dropout<H: Harness>() {
    if !H::available("activations_and_dropout") {
        return;
    }
    fn prop<H: Harness>(x: u8, y: u8, _z: u8, seed: u64) -> TestResult {
        let n = dims(x, 1, 255) * dims(y, 1, 40);
        let case = ActivationCase {
            x: rand(seed, n, 6.0),
            dout: rand(seed ^ 1, n, 1.0),
            p: [0.0, 0.1, 0.5, 1.0][(seed % 4) as usize],
            stream: RngStream::new(
                seed,
                Purpose::Dropout,
                (seed >> 40) as u32,
                (seed >> 8) as u32,
            ),
        };
        verdict(check::<H, _>(
            &format!("activations n = {n}"),
            &case,
            F32,
            Some(BF16),
        ))
    }
    qc(30, prop::<H>);
}

pub struct EmbeddingCase {
    pub ids: Vec<u32>,
    pub table: Vec<f32>,
    pub dout: Vec<f32>,
    pub channels: usize,
}

impl Case for EmbeddingCase {
    fn run<B: Backend>(&self, be: &B) -> Result<Out, B::Error> {
        let rows = self.ids.len();
        let ids = be.upload_ids(&self.ids)?;
        let table = be.upload(&self.table)?;
        let mut out = poisoned(be, rows * self.channels)?;
        be.embedding_forward(
            &ids,
            Slice::whole(&table),
            SliceMut::whole(&mut out),
            rows,
            self.channels,
        )?;
        let dout = be.upload(&self.dout)?;
        let mut dtable = be.upload(&self.table)?;
        be.embedding_backward(
            &ids,
            Slice::whole(&dout),
            SliceMut::whole(&mut dtable),
            rows,
            self.channels,
        )?;
        Ok(vec![
            ("rows", down(be, &out, rows * self.channels)?),
            ("dtable", down(be, &dtable, self.table.len())?),
        ])
    }
}

pub fn embedding_forward_backward_with_repeated_ids<H: Harness>() {
    if !H::available("embedding_forward_backward_with_repeated_ids") {
        return;
    }
    fn prop<H: Harness>(x: u8, y: u8, z: u8, seed: u64) -> TestResult {
        let (vocab, channels, rows) = (dims(x, 1, 60), dims(y, 1, 90), dims(z, 1, 200));
        let s = RngStream::new(seed, Purpose::DataOrder, 0, 0);
        let ids: Vec<u32> = (0..rows)
            .map(|i| s.u32(0, i as u32) % vocab as u32)
            .collect();
        let case = EmbeddingCase {
            ids,
            table: rand(seed, vocab * channels, 1.0),
            dout: rand(seed ^ 1, rows * channels, 1.0),
            channels,
        };
        verdict(check::<H, _>(
            &format!("embedding {vocab}×{channels}, {rows} rows"),
            &case,
            F32,
            Some(BF16),
        ))
    }
    qc(30, prop::<H>);
}

pub struct CrossEntropyCase {
    pub shape: RowMajor,
    pub logits: Vec<f32>,
    pub targets: Vec<u32>,
    pub weights: Vec<f32>,
    pub excluded: Option<u32>,
}

impl Case for CrossEntropyCase {
    fn run<B: Backend>(&self, be: &B) -> Result<Out, B::Error> {
        let mut logits = be.upload(&self.logits)?;
        let targets = be.upload_ids(&self.targets)?;
        let weights = be.upload(&self.weights)?;
        let rows = self.shape.rows;
        let mut losses = poisoned(be, rows)?;
        be.softmax_cross_entropy(
            SliceMut::whole(&mut logits),
            &targets,
            Slice::whole(&weights),
            SliceMut::whole(&mut losses),
            self.shape,
            self.excluded,
            0.5,
        )?;
        let total = be.sum(Slice::whole(&losses), rows)?;
        // The whole buffer: the padding between rows must come back as it went.
        Ok(vec![
            ("losses", down(be, &losses, rows)?),
            ("gradient", down(be, &logits, self.logits.len())?),
            ("sum", vec![total as f32]),
        ])
    }
}

pub fn weighted_cross_entropy_with_an_excluded_class<H: Harness>() {
    if !H::available("weighted_cross_entropy_with_an_excluded_class") {
        return;
    }
    fn prop<H: Harness>(x: u8, y: u8, _z: u8, seed: u64) -> TestResult {
        let rows = dims(x, 1, 40);
        let vocab = if seed % 5 == 0 {
            50_258
        } else {
            dims(y, 2, 255) * 13
        };
        let excluded = (seed % 2 == 0).then_some((vocab - 1) as u32);
        let s = RngStream::new(seed, Purpose::DataOrder, 1, 0);
        let targets: Vec<u32> = (0..rows)
            .map(|i| s.u32(0, i as u32) % (vocab as u32 - 1))
            .collect();
        let weights: Vec<f32> = rand(seed ^ 1, rows, 1.0)
            .iter()
            .map(|w| {
                if *w < -0.5 {
                    0.0
                } else {
                    bf16_round(w.abs() * 3.0)
                }
            })
            .collect();
        // GPT-2's vocabulary padded as the CUDA backend pads the head's logits, or dense.
        let stride = if seed % 3 == 1 {
            vocab.next_multiple_of(64)
        } else {
            vocab
        };
        let case = CrossEntropyCase {
            shape: RowMajor::padded(rows, vocab, stride),
            logits: rand(seed, rows * stride, 8.0),
            targets,
            weights,
            excluded,
        };
        verdict(check::<H, _>(
            &format!("cross-entropy {rows}×{vocab}, stride {stride}"),
            &case,
            F32,
            Some(BF16),
        ))
    }
    qc(20, prop::<H>);
}

pub struct OptimCase {
    pub p: Vec<f32>,
    pub g: Vec<f32>,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    pub hp: AdamW,
}

impl Case for OptimCase {
    fn run<B: Backend>(&self, be: &B) -> Result<Out, B::Error> {
        let n = self.p.len();
        let (mut p, g) = (be.upload(&self.p)?, be.upload(&self.g)?);
        let (mut m, mut v) = (be.upload(&self.m)?, be.upload(&self.v)?);
        let sum = be.sum(Slice::whole(&g), n)?;
        let sq = be.sum_squares(Slice::whole(&g), n)?;
        be.adamw(
            &self.hp,
            SliceMut::whole(&mut p),
            Slice::whole(&g),
            SliceMut::whole(&mut m),
            SliceMut::whole(&mut v),
            n,
        )?;
        let mut ema = be.upload(&self.m)?;
        be.ema_update(SliceMut::whole(&mut ema), Slice::whole(&p), n, 0.99)?;
        let mut scaled = be.upload(&self.g)?;
        be.scale(SliceMut::whole(&mut scaled), n, 0.3)?;
        let mut filled = poisoned(be, n + 3)?;
        be.fill(SliceMut::at(&mut filled, 1), n, 2.5)?;
        be.fill(SliceMut::at(&mut filled, 0), 1, -1.0)?;
        be.fill(SliceMut::at(&mut filled, n + 1), 2, 0.0)?;
        // copy_rows: every other row of `g` viewed as [rows, 3] into a packed buffer.
        let rows = n / 6;
        let mut packed = poisoned(be, rows * 2)?;
        be.copy_rows(
            Slice::at(&g, 1),
            6,
            SliceMut::whole(&mut packed),
            2,
            rows,
            2,
        )?;
        // copy_row_groups: up to 3 groups of 2 rows × 2 (as many as `g` holds) into gapped groups.
        let groups = RowGroups {
            groups: (n.saturating_sub(2) / 11).min(3),
            rows: 2,
            cols: 2,
            src_stride: 5,
            src_group_stride: 11,
            dst_stride: 3,
            dst_group_stride: 7,
        };
        let mut grouped = poisoned(be, groups.dst_extent() + 1)?;
        be.fill(SliceMut::whole(&mut grouped), groups.dst_extent() + 1, 0.5)?;
        be.copy_row_groups(Slice::at(&g, 2), SliceMut::at(&mut grouped, 1), &groups)?;
        Ok(vec![
            ("sum", vec![sum as f32]),
            ("sum of squares", vec![sq as f32]),
            ("adamw params", down(be, &p, n)?),
            ("adamw m", down(be, &m, n)?),
            ("adamw v", down(be, &v, n)?),
            ("ema", down(be, &ema, n)?),
            ("scale", down(be, &scaled, n)?),
            ("fill", down(be, &filled, n + 3)?),
            ("copy_rows", down(be, &packed, rows * 2)?),
            (
                "copy_row_groups",
                down(be, &grouped, groups.dst_extent() + 1)?,
            ),
        ])
    }
}

pub fn adamw_ema_reductions_scale_fill_and_copies<H: Harness>() {
    if !H::available("adamw_ema_reductions_scale_fill_and_copies") {
        return;
    }
    fn prop<H: Harness>(x: u8, y: u8, _z: u8, seed: u64) -> TestResult {
        let n = dims(x, 1, 255) * dims(y, 1, 255) + (seed % 3) as usize;
        let case = OptimCase {
            p: rand(seed, n, 1.0),
            g: rand(seed ^ 1, n, 1.0),
            m: rand(seed ^ 2, n, 0.1),
            v: rand(seed ^ 3, n, 0.1).iter().map(|v| v.abs()).collect(),
            hp: AdamW {
                lr: 1e-3,
                weight_decay: 0.01,
                step: 1 + (seed % 500) as u32,
                ..AdamW::default()
            },
        };
        verdict(check::<H, _>(
            &format!("optim n = {n}"),
            &case,
            F32,
            Some(BF16),
        ))
    }
    qc(20, prop::<H>);
}

/// What one optimizer update leaves: masters, moments, the EMA, and the copies the model reads
/// (the masters themselves where storage is f32).
pub struct Updated {
    pub master: Vec<f32>,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    pub ema: Vec<f32>,
    pub rounded: Vec<f32>,
    pub ema_rounded: Vec<f32>,
}

pub struct UpdateInputs {
    pub p: Vec<f32>,
    pub g: Vec<f32>,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    pub ema: Vec<f32>,
}

/// `optimizer_step` with f32 masters (and rounded copies where the backend stores below f32), or
/// — `composed` — the kernels it replaces on buffers in the storage precision.
pub fn run_update<B: Backend>(
    be: &B,
    x: &UpdateInputs,
    step: &OptimizerStep,
    composed: bool,
) -> Result<Updated, B::Error> {
    let n = x.p.len();
    let f32_buf = |h: &[f32]| {
        if composed {
            be.upload(h)
        } else {
            be.upload_f32(h)
        }
    };
    let (mut master, mut m, mut v, mut ema) = (
        f32_buf(&x.p)?,
        f32_buf(&x.m)?,
        f32_buf(&x.v)?,
        f32_buf(&x.ema)?,
    );
    let mut grads = be.upload(&x.g)?;
    let below = !composed && be.stores_below_f32();
    let mut rounded = if below { Some(poisoned(be, n)?) } else { None };
    let mut ema_rounded = if below { Some(poisoned(be, n)?) } else { None };
    if composed {
        if step.grad_scale != 1.0 {
            be.scale(SliceMut::whole(&mut grads), n, step.grad_scale)?;
        }
        be.adamw(
            &step.adamw,
            SliceMut::whole(&mut master),
            Slice::whole(&grads),
            SliceMut::whole(&mut m),
            SliceMut::whole(&mut v),
            n,
        )?;
        if let Some(decay) = step.ema_decay {
            be.ema_update(SliceMut::whole(&mut ema), Slice::whole(&master), n, decay)?;
        }
    } else {
        be.optimizer_step(
            step,
            UpdatedWeights {
                master: SliceMut::whole(&mut master),
                rounded: rounded.as_mut().map(SliceMut::whole),
            },
            SliceMut::whole(&mut grads),
            SliceMut::whole(&mut m),
            SliceMut::whole(&mut v),
            Some(UpdatedWeights {
                master: SliceMut::whole(&mut ema),
                rounded: ema_rounded.as_mut().map(SliceMut::whole),
            }),
            n,
        )?;
    }
    let master_h = down(be, &master, n)?;
    let ema_h = down(be, &ema, n)?;
    Ok(Updated {
        rounded: match &rounded {
            Some(r) => down(be, r, n)?,
            None => master_h.clone(),
        },
        ema_rounded: match &ema_rounded {
            Some(r) => down(be, r, n)?,
            None => ema_h.clone(),
        },
        master: master_h,
        m: down(be, &m, n)?,
        v: down(be, &v, n)?,
        ema: ema_h,
    })
}

/// Makes every case of the suite a `#[test]` of the calling crate, run on the backend that
/// `$harness` (a [`Harness`]) describes.
#[macro_export]
macro_rules! backend_suite {
    ($harness:ty) => {
        $crate::backend_suite!(@tests $harness; matmul_every_transpose_batch_and_broadcast, bias_forward_and_backward, layernorm_forward_and_backward, modulation_and_gated_residual_forward_and_backward, fused_forwards_equal_the_calls_they_replace, dropout_branches_equal_the_calls_they_replace, rope_forward_and_backward_with_strides_and_offsets, rope_with_the_cache_append_equals_rope_then_the_copy, attention_forward_and_backward_under_every_mask, activations_and_dropout, embedding_forward_backward_with_repeated_ids, weighted_cross_entropy_with_an_excluded_class, adamw_ema_reductions_scale_fill_and_copies);
    };
    (@tests $harness:ty; $($case:ident),*) => {
        $(
            #[test]
            fn $case() {
                $crate::cases::$case::<$harness>();
            }
        )*
    };
}
