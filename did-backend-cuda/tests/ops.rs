//! Every op, forward and backward: CUDA (f32 and bf16 storage) against the CPU
//! backend on random shapes that include size 1 and non-multiples of 32.
//! Outputs an op overwrites start as NaN (an unwritten element fails); outputs
//! it accumulates into start random, the same on both backends.

mod common;

use common::{
    bf16_round, check, check_with_attention, compare, dims, down, down_at, gpu, poisoned, rand,
    with_gpu, Case, Tol, BF16, F32,
};
use did_backend_cpu::CpuBackend;
use did_backend_cuda::{AttentionKernel, KeySplit, Precision};
use did_core::backend::prelude::*;
use did_core::backend::{
    AdamW, AttentionShape, Backend, DropoutMask, Gemm, LinearThen, NormShape, OptimizerStep,
    QkvOffsets, RopeShape, RowGroups, RowMajor, Slice, SliceMut, UpdatedWeights,
};
use did_core::mask::AttentionMask;
use did_core::rng::{Purpose, RngStream};
use did_core::sample::DrawSpec;
use quickcheck::{QuickCheck, TestResult};

type Out = Vec<(&'static str, Vec<f32>)>;

fn qc(tests: u64, f: fn(u8, u8, u8, u64) -> TestResult) {
    QuickCheck::new()
        .tests(tests)
        .max_tests(10 * tests)
        .quickcheck(f);
}

fn verdict(r: Result<(), String>) -> TestResult {
    match r {
        Ok(()) => TestResult::passed(),
        Err(e) => TestResult::error(e),
    }
}

// ---- matmul -----------------------------------------------------------------------

struct MatmulCase {
    g: Gemm,
    a: Vec<f32>,
    b: Vec<f32>,
    c: Vec<f32>,
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

#[test]
fn matmul_every_transpose_batch_and_broadcast() {
    if !gpu("matmul_every_transpose_batch_and_broadcast") {
        return;
    }
    fn prop(x: u8, y: u8, z: u8, seed: u64) -> TestResult {
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
        verdict(check(&format!("matmul {g:?}"), &case, F32, Some(BF16)))
    }
    qc(40, prop);
}

/// A linear forward over a few rows (`did_backend_cuda::few_rows`), `x` read from `x_offset`
/// and `W` from `w_offset` elements into their buffers, as the model reads a layer's weight at
/// its parameter offset (an offset that is not a multiple of 8 leaves the operand off a 16-byte
/// boundary: cuBLAS then).
struct FewRowsCase {
    g: Gemm,
    x_offset: usize,
    w_offset: usize,
    x: Vec<f32>,
    w: Vec<f32>,
    y: Vec<f32>,
}

impl Case for FewRowsCase {
    fn run<B: Backend>(&self, be: &B) -> Result<Out, B::Error> {
        let (x, w) = (be.upload(&self.x)?, be.upload(&self.w)?);
        let mut y = if self.g.beta == 0.0 {
            poisoned(be, self.y.len())?
        } else {
            be.upload(&self.y)?
        };
        be.matmul(
            &self.g,
            Slice::at(&x, self.x_offset),
            Slice::at(&w, self.w_offset),
            SliceMut::whole(&mut y),
        )?;
        Ok(vec![("y", down(be, &y, self.y.len())?)])
    }
}

impl FewRowsCase {
    /// Whether the backend should take the few-rows kernel rather than cuBLAS (the shapes
    /// these tests make always fit it; only the operands' alignment decides).
    fn takes_the_kernel(&self, kernel_on: bool) -> bool {
        kernel_on && self.x_offset % 8 == 0 && self.w_offset % 8 == 0
    }
}

/// The case in bf16 on the few-rows kernel and on cuBLAS, each against the CPU.
fn check_few_rows(label: &str, case: &FewRowsCase) -> Result<(), String> {
    let cpu = case
        .run(&did_backend_cpu::CpuBackend::new())
        .map_err(|e| format!("{label}: cpu: {e}"))?;
    for on in [true, false] {
        let gpu = common::with_gpu(Precision::Bf16, |g| {
            let before = g.few_rows_kernel();
            g.set_few_rows_kernel(on);
            let gemms = g.counts().gemms;
            let out = case.run(g);
            let cublas_calls = g.counts().gemms - gemms;
            g.set_few_rows_kernel(before);
            out.map(|out| (out, cublas_calls))
        })
        .map_err(|e| format!("{label}: gpu: {e}"))?;
        // A silent fall back to cuBLAS would pass the comparison below.
        let (gpu, cublas_calls) = gpu;
        let want = u64::from(!case.takes_the_kernel(on));
        if cublas_calls != want {
            return Err(format!(
                "{label}, few-rows kernel {on}: {cublas_calls} cuBLAS call(s), expected {want}"
            ));
        }
        common::compare(
            &format!("{label}, few-rows kernel {on}"),
            &cpu[0].1,
            &gpu[0].1,
            BF16,
        )?;
    }
    Ok(())
}

#[test]
fn few_row_linear_forwards_on_their_kernel_and_on_cublas() {
    if !gpu("few_row_linear_forwards_on_their_kernel_and_on_cublas") {
        return;
    }
    fn case(
        (m, n, k, lda): (usize, usize, usize, usize),
        beta: f32,
        (x_offset, w_offset): (usize, usize),
    ) -> FewRowsCase {
        let g = Gemm {
            lda,
            beta,
            ..Gemm::linear(m, k, n)
        };
        let (ea, eb, ec) = g.extents();
        FewRowsCase {
            g,
            x_offset,
            w_offset,
            x: rand(m as u64 ^ 7, x_offset + ea, 1.0),
            w: rand(n as u64 ^ 9, w_offset + eb, 0.1),
            y: rand(k as u64, ec, 1.0),
        }
    }
    // `small`'s draft shapes at batch 1 (q/k/v from the fused rows, the head over one row).
    for (m, n, k, lda) in [
        (4, 2304, 768, 768),
        (4, 768, 768, 2304),
        (4, 3072, 768, 768),
        (4, 768, 3072, 3072),
        (1, 50_258, 768, 768),
    ] {
        let c = case((m, n, k, lda), 0.0, (0, 0));
        if let Err(e) = check_few_rows(&format!("few rows {m}×{n}×{k}"), &c) {
            panic!("{e}");
        }
    }
    fn prop(x: u8, y: u8, z: u8, seed: u64) -> TestResult {
        let (m, n, k) = (dims(x, 1, 9), dims(y, 1, 200), 8 * dims(z, 1, 130));
        let lda = k + 8 * (seed as usize % 3);
        let beta = if seed & 8 == 8 { 1.0 } else { 0.0 };
        // Aligned offsets as the model's row and parameter offsets give them, and misaligned ones.
        let x_offset = [0, 8, 3, 0, 16][(seed % 5) as usize];
        let w_offset = [0, 24, 0, 5, 8][((seed >> 3) % 5) as usize];
        let c = case((m, n, k, lda), beta, (x_offset, w_offset));
        verdict(check_few_rows(
            &format!(
                "few rows {m}×{n}×{k}, lda {lda}, beta {beta}, x at {x_offset}, W at {w_offset}"
            ),
            &c,
        ))
    }
    qc(40, prop);
}

/// A draft layer's projection and what consumes it ([`FusedOps::linear_forward_then`](did_core::backend::FusedOps::linear_forward_then)): the
/// MLP's up-projection with bias + GELU, or a branch's projection into the residual.
struct ProjectionCase {
    rows: usize,
    d_in: usize,
    d_out: usize,
    /// Rows a gate; 0: the MLP's bias + GELU instead of a residual.
    tokens: usize,
    bias: bool,
    gate: bool,
    seed: u64,
}

impl ProjectionCase {
    /// `linear_forward_then`, or its two calls when `in_steps`.
    fn run_on<B: Backend>(&self, be: &B, in_steps: bool) -> Result<Out, B::Error> {
        let (m, k, n) = (self.rows, self.d_in, self.d_out);
        let x = be.upload(&rand(self.seed, m * k, 1.0))?;
        let w = be.upload(&rand(self.seed ^ 1, n * k, 0.1))?;
        let bias = be.upload(&rand(self.seed ^ 2, n, 1.0))?;
        let gate = be.upload(&rand(self.seed ^ 3, (m / self.tokens.max(1)) * n, 1.0))?;
        let residual = be.upload(&rand(self.seed ^ 4, m * n, 1.0))?;
        let (mut y, mut out) = (poisoned(be, m * n)?, poisoned(be, m * n)?);
        let then = if self.tokens == 0 {
            LinearThen::BiasGelu {
                bias: Slice::whole(&bias),
                gelu: SliceMut::whole(&mut out),
            }
        } else {
            LinearThen::GatedResidual {
                bias: self.bias.then(|| Slice::whole(&bias)),
                gate: self.gate.then(|| Slice::whole(&gate)),
                residual: Slice::whole(&residual),
                out: SliceMut::whole(&mut out),
                tokens: self.tokens,
            }
        };
        let (xs, ws, ys) = (Slice::whole(&x), Slice::whole(&w), SliceMut::whole(&mut y));
        if in_steps {
            did_core::backend::linear_forward_then_in_steps(be, xs, ws, ys, m, k, n, then)?;
        } else {
            be.linear_forward_then(xs, ws, ys, m, k, n, then)?;
        }
        Ok(vec![
            ("y", down(be, &y, m * n)?),
            ("out", down(be, &out, m * n)?),
        ])
    }
}

impl Case for ProjectionCase {
    fn run<B: Backend>(&self, be: &B) -> Result<Out, B::Error> {
        self.run_on(be, false)
    }
}

#[test]
fn fused_few_row_projections_equal_the_calls_they_replace() {
    if !gpu("fused_few_row_projections_equal_the_calls_they_replace") {
        return;
    }
    fn check(c: &ProjectionCase) -> Result<(), String> {
        let label = format!(
            "{}×{}×{}, {}",
            c.rows,
            c.d_out,
            c.d_in,
            if c.tokens == 0 {
                "bias + GELU".to_string()
            } else {
                format!(
                    "residual, {} rows a gate, bias {}, gate {}",
                    c.tokens, c.bias, c.gate
                )
            }
        );
        let cpu = c
            .run(&did_backend_cpu::CpuBackend::new())
            .map_err(|e| format!("{label}: cpu: {e}"))?;
        let (fused, steps) = common::with_gpu(Precision::Bf16, |g| {
            let before = g.few_rows_kernel();
            g.set_few_rows_kernel(true);
            let out = (c.run_on(g, false), c.run_on(g, true));
            g.set_few_rows_kernel(before);
            out
        });
        let fused = fused.map_err(|e| format!("{label}: gpu: {e}"))?;
        let steps = steps.map_err(|e| format!("{label}: gpu in steps: {e}"))?;
        for ((name, f), (_, s)) in fused.iter().zip(&steps) {
            // The fused kernel rounds where the two kernels store: the same bits.
            if f.iter().zip(s).any(|(a, b)| a.to_bits() != b.to_bits()) {
                return Err(format!("{label}: {name} differs from the two calls'"));
            }
        }
        for ((name, f), (_, want)) in fused.iter().zip(&cpu) {
            common::compare(&format!("{label}: {name}"), want, f, BF16)?;
        }
        Ok(())
    }
    // `small`'s draft layers at batch 1: attention out, MLP up, MLP down.
    for c in [
        ProjectionCase {
            rows: 4,
            d_in: 768,
            d_out: 768,
            tokens: 4,
            bias: false,
            gate: true,
            seed: 1,
        },
        ProjectionCase {
            rows: 4,
            d_in: 768,
            d_out: 3072,
            tokens: 0,
            bias: true,
            gate: false,
            seed: 2,
        },
        ProjectionCase {
            rows: 4,
            d_in: 3072,
            d_out: 768,
            tokens: 4,
            bias: true,
            gate: true,
            seed: 3,
        },
    ] {
        if let Err(e) = check(&c) {
            panic!("{e}");
        }
    }
    fn prop(x: u8, y: u8, z: u8, seed: u64) -> TestResult {
        let (rows, d_out, d_in) = (dims(x, 1, 9), dims(y, 1, 200), 8 * dims(z, 1, 60));
        let tokens = match seed % 3 {
            0 => 0,
            1 => rows,
            _ => (1..=rows)
                .rev()
                .find(|t| rows % t == 0 && *t < rows)
                .unwrap_or(rows),
        };
        verdict(check(&ProjectionCase {
            rows,
            d_in,
            d_out,
            tokens,
            bias: seed & 4 == 4,
            gate: seed & 8 == 8,
            seed,
        }))
    }
    qc(30, prop);
}

// ---- bias, LayerNorm ----------------------------------------------------------------

/// Rows `shape.stride` apart: the whole buffer comes back, so padding that either backend
/// touched would differ from the other's.
struct BiasCase {
    shape: RowMajor,
    x: Vec<f32>,
    bias: Vec<f32>,
    dbias: Vec<f32>,
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

#[test]
fn bias_forward_and_backward() {
    if !gpu("bias_forward_and_backward") {
        return;
    }
    fn prop(x: u8, y: u8, _z: u8, seed: u64) -> TestResult {
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
        verdict(check(
            &format!("bias {rows}×{cols}, stride {stride}"),
            &case,
            F32,
            Some(BF16),
        ))
    }
    qc(30, prop);
}

struct LayerNormCase {
    s: NormShape,
    with_bias: bool,
    x: Vec<f32>,
    w: Vec<f32>,
    b: Vec<f32>,
    dout: Vec<f32>,
    dx: Vec<f32>,
    dw: Vec<f32>,
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

#[test]
fn layernorm_forward_and_backward() {
    if !gpu("layernorm_forward_and_backward") {
        return;
    }
    fn prop(x: u8, y: u8, z: u8, seed: u64) -> TestResult {
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
        verdict(check(
            &format!("layernorm {rows}×{cols}"),
            &case,
            F32,
            Some(BF16),
        ))
    }
    qc(30, prop);
}

// ---- modulation and gated residuals ------------------------------------------------------

struct ModulateCase {
    batch: usize,
    tokens: usize,
    channels: usize,
    gated: bool,
    x: Vec<f32>,
    shift: Vec<f32>,
    scale: Vec<f32>,
    dout: Vec<f32>,
    acc: Vec<f32>,
    acc_small: Vec<f32>,
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

#[test]
fn modulation_and_gated_residual_forward_and_backward() {
    if !gpu("modulation_and_gated_residual_forward_and_backward") {
        return;
    }
    fn prop(x: u8, y: u8, z: u8, seed: u64) -> TestResult {
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
        verdict(check(
            &format!("modulate {batch}×{tokens}×{channels}"),
            &case,
            F32,
            Some(BF16),
        ))
    }
    qc(30, prop);
}

// ---- fused forwards ---------------------------------------------------------------------

/// LayerNorm + modulation, bias + GELU and the out-of-place gated residual, each computed by the
/// fused call and by the calls it replaces: outputs `[fused..., composed...]`.
struct FusedCase {
    norm: NormShape,
    tokens: usize,
    cols4: usize,
    x: Vec<f32>,
    w: Vec<f32>,
    b: Vec<f32>,
    shift: Vec<f32>,
    scale: Vec<f32>,
    pre: Vec<f32>,
    bias4: Vec<f32>,
    y: Vec<f32>,
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
        let (shift, scale, bias4, y) = (
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
                be.gated_residual_forward_into(
                    Slice::whole(&x),
                    Slice::whole(&y),
                    gate,
                    SliceMut::whole(&mut res),
                    seqs,
                    self.tokens,
                    cols,
                )?;
                be.bias_gated_residual_forward_into(
                    Slice::whole(&x),
                    SliceMut::whole(&mut biased),
                    Slice::whole(&b),
                    gate,
                    SliceMut::whole(&mut res_b),
                    seqs,
                    self.tokens,
                    cols,
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
#[test]
fn fused_forwards_equal_the_calls_they_replace() {
    if !gpu("fused_forwards_equal_the_calls_they_replace") {
        return;
    }
    fn prop(x: u8, y: u8, z: u8, seed: u64) -> TestResult {
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
            check(&label, &case, F32, Some(BF16))
                .and_then(|()| fused_equals_composed(&label, &case, Precision::F32))
                .and_then(|()| fused_equals_composed(&label, &case, Precision::Bf16)),
        )
    }
    qc(30, prop);
}

/// A training branch's output into the residual — bias (or none), dropout, gated residual — and
/// the backward's dy with the dropout: the fused calls, then the calls they replace.
struct DropoutBranchCase {
    seqs: usize,
    tokens: usize,
    cols: usize,
    p: f32,
    x: Vec<f32>,
    y: Vec<f32>,
    bias: Vec<f32>,
    gate: Vec<f32>,
    dres: Vec<f32>,
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
                    be.bias_dropout_gated_residual_forward_into(
                        Slice::whole(&x),
                        SliceMut::whole(&mut y),
                        b,
                        mask,
                        g,
                        SliceMut::whole(&mut out),
                        seqs,
                        tokens,
                        cols,
                    )?;
                } else {
                    if let Some(b) = b {
                        be.bias_add(SliceMut::whole(&mut y), b, rows, cols)?;
                    }
                    be.dropout(SliceMut::whole(&mut y), n, self.p, &stream)?;
                    be.gated_residual_forward_into(
                        Slice::whole(&x),
                        Slice::whole(&y),
                        g,
                        SliceMut::whole(&mut out),
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
                be.gated_residual_backward_dropout(
                    Slice::whole(&dres),
                    Slice::whole(&y),
                    g,
                    SliceMut::whole(&mut dy),
                    Some(SliceMut::whole(&mut dgate)),
                    mask,
                    seqs,
                    tokens,
                    cols,
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
#[test]
fn dropout_branches_equal_the_calls_they_replace() {
    if !gpu("dropout_branches_equal_the_calls_they_replace") {
        return;
    }
    fn prop(x: u8, y: u8, z: u8, seed: u64) -> TestResult {
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
            check(&label, &case, F32, Some(BF16))
                .and_then(|()| fused_equals_composed(&label, &case, Precision::F32))
                .and_then(|()| fused_equals_composed(&label, &case, Precision::Bf16)),
        )
    }
    qc(30, prop);
}

/// Runs `case` on the GPU in `precision`: its outputs are the fused calls' and then the same
/// number of the composed calls', which must be equal bit for bit.
fn fused_equals_composed(
    label: &str,
    case: &impl Case,
    precision: Precision,
) -> Result<(), String> {
    let out = common::with_gpu(precision, |g| case.run(g))
        .map_err(|e| format!("{label} {precision:?}: gpu: {e}"))?;
    let (fused, composed) = out.split_at(out.len() / 2);
    for ((name, f), (_, c)) in fused.iter().zip(composed) {
        let differ = f
            .iter()
            .zip(c)
            .position(|(a, b)| a.to_bits() != b.to_bits());
        if let Some(i) = differ {
            return Err(format!(
                "{label} {precision:?} {name}[{i}]: fused {} ≠ composed {}",
                f[i], c[i]
            ));
        }
    }
    Ok(())
}

// ---- RoPE ----------------------------------------------------------------------------

struct RopeCase {
    s: RopeShape,
    x: Vec<f32>,
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

#[test]
fn rope_forward_and_backward_with_strides_and_offsets() {
    if !gpu("rope_forward_and_backward_with_strides_and_offsets") {
        return;
    }
    fn prop(x: u8, y: u8, z: u8, seed: u64) -> TestResult {
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
        verdict(check(&format!("rope {s:?}"), &case, F32, Some(BF16)))
    }
    qc(30, prop);
}

/// A KV-cached pass's RoPE and cache append: queries and keys rotated in fused `[q | k | v]`
/// rows, then columns `col0 .. col0 + cols` of each row copied into cache slots from `slot`.
struct RopeCopyCase {
    s: RopeShape,
    col0: usize,
    append: RowGroups,
    slot: usize,
    x: Vec<f32>,
    cache: Vec<f32>,
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
#[test]
fn rope_with_the_cache_append_equals_rope_then_the_copy() {
    if !gpu("rope_with_the_cache_append_equals_rope_then_the_copy") {
        return;
    }
    fn prop(x: u8, y: u8, z: u8, seed: u64) -> TestResult {
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
            check(&label, &case, F32, Some(BF16))
                .and_then(|()| fused_equals_composed(&label, &case, Precision::F32))
                .and_then(|()| fused_equals_composed(&label, &case, Precision::Bf16)),
        )
    }
    qc(30, prop);
}

// ---- attention ---------------------------------------------------------------------------

struct AttentionCase {
    s: AttentionShape,
    mask: AttentionMask,
    qkv: Vec<f32>,
    kv: Vec<f32>,
    dout: Vec<f32>,
    /// What the gradient buffer holds before (the op overwrites the gradients and must leave
    /// the rest): a copy of the q buffer's layout, then one of the k | v buffer's.
    acc: Vec<f32>,
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
fn attention_mask(kind: u8, a: usize, b: usize, seed: u64) -> (AttentionMask, usize, usize) {
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
fn attention_case(z: u8, x: u8, y: u8, seed: u64, head_dim: usize) -> AttentionCase {
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

#[test]
fn attention_forward_and_backward_under_every_mask() {
    if !gpu("attention_forward_and_backward_under_every_mask") {
        return;
    }
    fn prop(x: u8, y: u8, z: u8, seed: u64) -> TestResult {
        let head_dim = match (seed >> 16) % 4 {
            0 => 64,
            1 => 1,
            _ => dims((seed >> 24) as u8, 2, 100),
        };
        let case = attention_case(z, x, y, seed, head_dim);
        // The correctness-first kernels at the element-wise tolerance; the flash kernels (the
        // bf16 default at head dimension 64) have their own test below.
        verdict(check_with_attention(
            &format!("attention {:?} {:?}", case.mask, case.s),
            &case,
            F32,
            Some(BF16),
            Some(AttentionKernel::Reference),
        ))
    }
    qc(60, prop);
}

/// The flash kernels (bf16, head dimension 64), forward and backward, against the CPU under
/// every mask kind, gradients written over random values.
#[test]
fn flash_attention_matches_the_cpu_under_every_mask() {
    if !gpu("flash_attention_matches_the_cpu_under_every_mask") {
        return;
    }
    fn prop(x: u8, y: u8, z: u8, seed: u64) -> TestResult {
        let case = attention_case(z, x, y, seed, 64);
        // The forward's key tiles whole, split as the backend chooses (these small launches
        // leave most SMs idle, so it splits wherever there are two tiles), or a tile a block.
        let split =
            [KeySplit::Off, KeySplit::Auto, KeySplit::TilesPerBlock(1)][(seed % 3) as usize];
        verdict(check_flash(&case, split))
    }
    qc(40, prop);
}

/// A batch-1 draft call's attention at the end of a 1024-token sample (12 heads, a block of 4
/// after 1,024 cached keys: 17 key tiles) through the flash kernels with the keys whole, split
/// a tile a block and split as the backend chooses, each against the CPU.
#[test]
fn flash_attention_splits_a_long_kv_cache_between_blocks() {
    if !gpu("flash_attention_splits_a_long_kv_cache_between_blocks") {
        return;
    }
    let (heads, head_dim, block, cached) = (12, 64, 4, 1024);
    let (width, kv_len) = (heads * head_dim, cached + block);
    let s = AttentionShape::over_cache(1, heads, head_dim, block, kv_len, kv_len);
    let case = AttentionCase {
        s,
        mask: AttentionMask::BlockCausal {
            block_size: block,
            query_offset: cached,
            key_offset: 0,
            window: None,
        },
        qkv: rand(11, block * 3 * width, 1.5),
        kv: rand(12, kv_len * 2 * width, 1.5),
        dout: rand(13, block * width, 1.0),
        acc: rand(14, (block * 3 + kv_len * 2) * width, 1.0),
    };
    for split in [
        KeySplit::Off,
        KeySplit::TilesPerBlock(1),
        KeySplit::TilesPerBlock(5),
        KeySplit::Auto,
    ] {
        if let Err(e) = check_flash(&case, split) {
            panic!("{e}");
        }
    }
}

/// One attention case through the flash kernels with the forward's key tiles split by
/// `split`, against the CPU.
fn check_flash(case: &AttentionCase, split: KeySplit) -> Result<(), String> {
    let label = format!(
        "flash attention, keys {split:?}, {:?} {:?}",
        case.mask, case.s
    );
    let cpu = case
        .run(&did_backend_cpu::CpuBackend::new())
        .map_err(|e| format!("{label}: cpu: {e}"))?;
    let gpu = common::with_gpu(Precision::Bf16, |g| {
        let before = (g.attention_kernel(), g.key_split());
        g.set_attention_kernel(AttentionKernel::Flash)?;
        g.set_key_split(split);
        let out = case.run(g);
        g.set_attention_kernel(before.0)?;
        g.set_key_split(before.1);
        out
    })
    .map_err(|e| format!("{label}: gpu: {e}"))?;
    // P (and in the backward dS) is rounded to bf16 before the next product: twice the
    // element-wise tolerance.
    let tol = common::Tol {
        rtol: 2.0 * BF16.rtol,
        atol: 2.0 * BF16.atol,
    };
    cpu.iter()
        .zip(&gpu)
        .try_for_each(|((name, c), (_, g))| common::compare(&format!("{label} {name}"), c, g, tol))
}

// ---- activations, dropout --------------------------------------------------------------

struct ActivationCase {
    x: Vec<f32>,
    dout: Vec<f32>,
    p: f32,
    stream: RngStream,
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

#[test]
fn activations_and_dropout() {
    if !gpu("activations_and_dropout") {
        return;
    }
    fn prop(x: u8, y: u8, _z: u8, seed: u64) -> TestResult {
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
        verdict(check(
            &format!("activations n = {n}"),
            &case,
            F32,
            Some(BF16),
        ))
    }
    qc(30, prop);
}

// ---- embeddings and the loss ----------------------------------------------------------------

struct EmbeddingCase {
    ids: Vec<u32>,
    table: Vec<f32>,
    dout: Vec<f32>,
    channels: usize,
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

#[test]
fn embedding_forward_backward_with_repeated_ids() {
    if !gpu("embedding_forward_backward_with_repeated_ids") {
        return;
    }
    fn prop(x: u8, y: u8, z: u8, seed: u64) -> TestResult {
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
        verdict(check(
            &format!("embedding {vocab}×{channels}, {rows} rows"),
            &case,
            F32,
            Some(BF16),
        ))
    }
    qc(30, prop);
}

#[test]
fn token_ids_outside_the_table_are_errors_not_faults() {
    if !gpu("token_ids_outside_the_table_are_errors_not_faults") {
        return;
    }
    common::with_gpu(did_backend_cuda::Precision::F32, |be| {
        let ids = be.upload_ids(&[0, 5, 2]).unwrap();
        let table = be.upload(&[0.0; 8]).unwrap(); // 4 rows of 2
        let mut out = be.zeros(6).unwrap();
        let err = be
            .embedding_forward(&ids, Slice::whole(&table), SliceMut::whole(&mut out), 3, 2)
            .unwrap_err();
        assert!(err.to_string().contains("token id 5 at row 1"), "{err}");
        let err = be
            .matmul(
                &Gemm::linear(4, 4, 4),
                Slice::whole(&table),
                Slice::whole(&table),
                SliceMut::whole(&mut out),
            )
            .unwrap_err();
        assert!(err.to_string().contains("buffer holds"), "{err}");
    });
}

struct CrossEntropyCase {
    shape: RowMajor,
    logits: Vec<f32>,
    targets: Vec<u32>,
    weights: Vec<f32>,
    excluded: Option<u32>,
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

#[test]
fn weighted_cross_entropy_with_an_excluded_class() {
    if !gpu("weighted_cross_entropy_with_an_excluded_class") {
        return;
    }
    fn prop(x: u8, y: u8, _z: u8, seed: u64) -> TestResult {
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
        verdict(check(
            &format!("cross-entropy {rows}×{vocab}, stride {stride}"),
            &case,
            F32,
            Some(BF16),
        ))
    }
    qc(20, prop);
}

// ---- optimiser, reductions, memory ---------------------------------------------------------

struct OptimCase {
    p: Vec<f32>,
    g: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
    hp: AdamW,
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

#[test]
fn adamw_ema_reductions_scale_fill_and_copies() {
    if !gpu("adamw_ema_reductions_scale_fill_and_copies") {
        return;
    }
    fn prop(x: u8, y: u8, _z: u8, seed: u64) -> TestResult {
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
        verdict(check(&format!("optim n = {n}"), &case, F32, Some(BF16)))
    }
    qc(20, prop);
}

/// What one optimizer update leaves: masters, moments, the EMA, and the copies the model reads
/// (the masters themselves where storage is f32).
struct Updated {
    master: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
    ema: Vec<f32>,
    rounded: Vec<f32>,
    ema_rounded: Vec<f32>,
}

struct UpdateInputs {
    p: Vec<f32>,
    g: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
    ema: Vec<f32>,
}

/// `optimizer_step` with f32 masters (and rounded copies where the backend stores below f32), or
/// — `composed` — the kernels it replaces on buffers in the storage precision.
fn run_update<B: Backend>(
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

/// `optimizer_step`: with f32 storage bit for bit the kernels it replaces (scale, adamw,
/// ema_update); with bf16 storage f32 masters, moments and EMA equal to the CPU's f32 update of
/// the same values to f32 rounding, and copies that are exactly the masters rounded to bf16.
/// A weight of 1 under lr 3e-4 moves in the bf16 master (bf16 storage itself would round each
/// step back: half a bf16 step there is 2⁻⁹).
#[test]
fn optimizer_step_keeps_f32_masters_and_equals_the_kernels_it_replaces() {
    if !gpu("optimizer_step_keeps_f32_masters_and_equals_the_kernels_it_replaces") {
        return;
    }
    let tight = Tol {
        rtol: 1e-5,
        atol: 1e-7,
    };
    let cases = [(1, 1u64), (37, 2), (4096, 3), (100_003, 4)];
    let mut result: Result<(), String> = Ok(());
    for (n, seed) in cases {
        let x = UpdateInputs {
            p: rand(seed, n, 1.0),
            g: rand(seed ^ 1, n, 1.0),
            m: rand(seed ^ 2, n, 0.1),
            v: rand(seed ^ 3, n, 0.1).iter().map(|v| v.abs()).collect(),
            ema: rand(seed ^ 4, n, 1.0),
        };
        for (grad_scale, ema_decay) in [(1.0, Some(0.99)), (0.37, Some(0.9999)), (0.5, None)] {
            let step = OptimizerStep {
                adamw: AdamW {
                    lr: 1e-3,
                    weight_decay: 0.01,
                    step: 3,
                    ..AdamW::default()
                },
                grad_scale,
                ema_decay,
            };
            let label = format!("n = {n}, grad scale {grad_scale}, EMA {ema_decay:?}");
            let run = || -> Result<(), String> {
                let cpu =
                    run_update(&CpuBackend::new(), &x, &step, false).map_err(|e| e.to_string())?;
                let fused = with_gpu(Precision::F32, |g| run_update(g, &x, &step, false))
                    .map_err(|e| e.to_string())?;
                let composed = with_gpu(Precision::F32, |g| run_update(g, &x, &step, true))
                    .map_err(|e| e.to_string())?;
                for (what, c, a, b) in [
                    ("master", &cpu.master, &fused.master, &composed.master),
                    ("m", &cpu.m, &fused.m, &composed.m),
                    ("v", &cpu.v, &fused.v, &composed.v),
                    ("ema", &cpu.ema, &fused.ema, &composed.ema),
                ] {
                    if a.iter()
                        .zip(b.iter())
                        .any(|(a, b)| a.to_bits() != b.to_bits())
                    {
                        return Err(format!(
                            "{label}: f32 {what} differs from scale + adamw + ema_update"
                        ));
                    }
                    compare(&format!("{label}: f32 {what} against the CPU"), c, a, F32)?;
                }
                let bf16 = with_gpu(Precision::Bf16, |g| run_update(g, &x, &step, false))
                    .map_err(|e| e.to_string())?;
                for (what, c, g) in [
                    ("master", &cpu.master, &bf16.master),
                    ("m", &cpu.m, &bf16.m),
                    ("v", &cpu.v, &bf16.v),
                    ("ema", &cpu.ema, &bf16.ema),
                ] {
                    compare(
                        &format!("{label}: bf16 {what} (f32) against the CPU"),
                        c,
                        g,
                        tight,
                    )?;
                }
                let mut copies = vec![("weights", &bf16.master, &bf16.rounded)];
                match ema_decay {
                    Some(_) => copies.push(("EMA", &bf16.ema, &bf16.ema_rounded)),
                    // No EMA update this step: its copy is left as it was (NaN-poisoned).
                    None if bf16.ema_rounded.iter().any(|r| !r.is_nan()) => {
                        return Err(format!(
                            "{label}: the EMA's copy was written without a decay"
                        ));
                    }
                    None => {}
                }
                for (what, master, rounded) in copies {
                    if master
                        .iter()
                        .zip(rounded.iter())
                        .any(|(m, r)| bf16_round(*m) != *r)
                    {
                        return Err(format!(
                            "{label}: the bf16 copy of the {what} is not its master rounded"
                        ));
                    }
                }
                Ok(())
            };
            if let Err(e) = run() {
                result = Err(e);
            }
        }
    }
    // A LayerNorm weight of 1, unit gradients, lr 3e-4: 20 steps move the master by ≈ 6e-3.
    let x = UpdateInputs {
        p: vec![1.0; 8],
        g: vec![1.0; 8],
        m: vec![0.0; 8],
        v: vec![0.0; 8],
        ema: vec![1.0; 8],
    };
    let moved = with_gpu(
        Precision::Bf16,
        |be| -> Result<f32, did_backend_cuda::CudaError> {
            let mut state = run_update(
                be,
                &x,
                &OptimizerStep {
                    adamw: AdamW {
                        step: 1,
                        ..AdamW::default()
                    },
                    grad_scale: 1.0,
                    ema_decay: None,
                },
                false,
            )?;
            for t in 2..=20 {
                let next = UpdateInputs {
                    p: state.master.clone(),
                    g: x.g.clone(),
                    m: state.m.clone(),
                    v: state.v.clone(),
                    ema: state.ema.clone(),
                };
                state = run_update(
                    be,
                    &next,
                    &OptimizerStep {
                        adamw: AdamW {
                            step: t,
                            ..AdamW::default()
                        },
                        grad_scale: 1.0,
                        ema_decay: None,
                    },
                    false,
                )?;
            }
            Ok(1.0 - state.master[0])
        },
    );
    match moved {
        Ok(d) if (d - 20.0 * 3e-4).abs() < 0.05 * 20.0 * 3e-4 => {}
        Ok(d) => {
            result = Err(format!(
                "bf16: 20 steps of lr 3e-4 moved a weight of 1 by {d}, not ≈ 6e-3"
            ))
        }
        Err(e) => result = Err(e.to_string()),
    }
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// `round_into`: an f32 buffer into the storage precision — the values themselves in f32
/// storage, each rounded to the nearest bf16 in bf16 storage — at an offset, nothing else written.
#[test]
fn round_into_writes_f32_values_in_the_storage_precision() {
    if !gpu("round_into_writes_f32_values_in_the_storage_precision") {
        return;
    }
    // Offsets 0 and 8 keep the 16-byte chunks (n a multiple of 8), offset 1 the plain loop.
    for (n, at) in [
        (1, 1),
        (7, 1),
        (8, 0),
        (1000, 1),
        (1000, 8),
        (65_536, 0),
        (65_537, 1),
    ] {
        let host: Vec<f32> = (0..n).map(|i| 1.0 + (i as f32) * 1e-4 - 3e-3).collect();
        for precision in [Precision::F32, Precision::Bf16] {
            let got = with_gpu(
                precision,
                |be| -> Result<Vec<f32>, did_backend_cuda::CudaError> {
                    let src = be.upload_f32(&host)?;
                    let mut dst = poisoned(be, n + at + 1)?;
                    be.round_into(Slice::whole(&src), SliceMut::at(&mut dst, at), n)?;
                    down(be, &dst, n + at + 1)
                },
            )
            .unwrap_or_else(|e| panic!("round_into n = {n} at {at} {precision:?}: {e}"));
            assert!(
                got[..at].iter().all(|x| x.is_nan()) && got[n + at].is_nan(),
                "round_into wrote outside its range"
            );
            for (i, (&g, &h)) in got[at..n + at].iter().zip(&host).enumerate() {
                let want = match precision {
                    Precision::F32 => h,
                    Precision::Bf16 => bf16_round(h),
                };
                assert_eq!(
                    g.to_bits(),
                    want.to_bits(),
                    "round_into n = {n} {precision:?}, element {i}"
                );
            }
        }
    }
}

// ---- sampling draws ----------------------------------------------------------------------------

#[test]
fn draws_are_the_cpus_on_the_host_and_on_the_device() {
    if !gpu("draws_are_the_cpus_on_the_host_and_on_the_device") {
        return;
    }
    use did_backend_cuda::DrawLocation;
    use did_core::sample::categorical::{draw_token, DrawScratch, SampledToken};
    use did_core::sample::nucleus::{Nucleus, NucleusRule};
    // A small vocabulary with many rows, and the real one with a batch-64 draft's rows.
    for (rows, vocab, scale) in [(37, 1000, 6.0), (256, 50_258, 4.0)] {
        let mask_id = vocab as u32 - 1;
        for nucleus in [
            Nucleus::default(),
            Nucleus::new(0.7, NucleusRule::SmallestCover).unwrap(),
            Nucleus::new(1.0, NucleusRule::Bd3).unwrap(),
        ] {
            let draws: Vec<DrawSpec> = (0..rows)
                .map(|r| DrawSpec {
                    stream: RngStream::new(9, Purpose::Categorical, r as u32 % 3, 4),
                    row: r as u32,
                })
                .collect();
            // bf16-exact logits (coarse, so ties are common): both storages hold them as given.
            let logits = rand(3, rows * vocab, scale);
            let mut scratch = DrawScratch::default();
            let expected: Vec<SampledToken> = logits
                .chunks_exact(vocab)
                .zip(&draws)
                .map(|(row, d)| draw_token(row, mask_id, &nucleus, &d.stream, d.row, &mut scratch))
                .collect();
            for precision in [Precision::F32, Precision::Bf16] {
                for location in [DrawLocation::Host, DrawLocation::Device] {
                    // Start from other draws, so a row the GPU leaves unwritten shows.
                    let mut out = vec![expected[0]; rows];
                    out.iter_mut().for_each(|t| t.id = u32::MAX);
                    let seconds = common::with_gpu(precision, |be| {
                        let buf = be.upload(&logits).unwrap();
                        be.set_draw_location(location);
                        let before = be.counts();
                        let start = std::time::Instant::now();
                        let result = be.draw_tokens(
                            Slice::whole(&buf),
                            vocab,
                            mask_id,
                            &nucleus,
                            &draws,
                            &mut out,
                        );
                        let seconds = start.elapsed().as_secs_f64();
                        be.set_draw_location(DrawLocation::Host);
                        result.unwrap();
                        // Every row is counted once, where it was drawn.
                        let after = be.counts();
                        let (device, redrawn, host) = (
                            after.device_draws - before.device_draws,
                            after.host_redraws - before.host_redraws,
                            after.host_draws - before.host_draws,
                        );
                        match location {
                            DrawLocation::Host => {
                                assert_eq!((device, redrawn, host), (0, 0, rows as u64))
                            }
                            DrawLocation::Device => {
                                assert_eq!((device + redrawn, host), (rows as u64, 0));
                                assert_eq!(after.kernels - before.kernels, 1);
                                eprintln!("{redrawn} of {rows} rows redrawn on the host");
                            }
                        }
                        seconds
                    });
                    let what =
                        format!("{rows} × {vocab}, {nucleus:?}, {precision:?}, {location:?}");
                    for (r, (got, want)) in out.iter().zip(&expected).enumerate() {
                        assert_eq!(got.id, want.id, "{what}: row {r}'s token");
                        let close = |a: f64, b: f64| match location {
                            DrawLocation::Host => a == b,
                            DrawLocation::Device => (a - b).abs() <= 1e-12 * b.abs(),
                        };
                        let (g, w) = (got.confidence, want.confidence);
                        assert!(
                            close(g.nucleus, w.nucleus)
                                && close(g.raw, w.raw)
                                && close(g.max, w.max),
                            "{what}: row {r}'s confidences {g:?}, the CPU's {w:?}"
                        );
                    }
                    eprintln!("{what}: the CPU's tokens, {seconds:.4} s");
                }
            }
        }
    }
}
