//! The CUDA backend's op tests: the shared suite (did-backend-suite: every op, forward and
//! backward, against the CPU backend) in f32 and bf16 storage, and the cases only this backend
//! has — the few-rows linear kernel, the flash attention kernels and their key splits, token ids
//! checked before a launch, the f32-master optimizer step, rounding into storage, and the draw on
//! the device.

mod common;

use common::{gpu, with_gpu, CudaHarness};
use did_backend_cpu::CpuBackend;
use did_backend_cuda::{AttentionKernel, KeySplit, Precision};
use did_backend_suite::cases::{attention_case, run_update, AttentionCase, UpdateInputs};
use did_backend_suite::{
    bf16_round, compare, dims, down, poisoned, qc, rand, verdict, Case, Out, Tol, BF16, F32,
};
use did_core::backend::prelude::*;
use did_core::backend::{
    AdamW, AttentionShape, Backend, Gemm, LinearThen, OptimizerStep, Slice, SliceMut,
};
use did_core::mask::AttentionMask;
use did_core::rng::{Purpose, RngStream};
use did_core::sample::DrawSpec;
use quickcheck::TestResult;

did_backend_suite::backend_suite!(CudaHarness);

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
