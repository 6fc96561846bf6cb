//! Every op of the CPU backend: the forward against a plain f64 reference,
//! the backward against f64 central finite differences of the forward, on
//! small random shapes (sizes that are not multiples of 8, and size 1).

use did_backend_cpu::{CpuBackend, CpuBuffer};
use did_core::backend::prelude::*;
use did_core::backend::{
    AdamW, AttentionShape, Gemm, NormShape, QkvOffsets, RopeShape, RowGroups, RowMajor, Slice,
    SliceMut,
};
use did_core::mask::AttentionMask;
use did_core::rng::{Purpose, RngStream};
use quickcheck::{QuickCheck, TestResult};

type F64 = CpuBackend<f64>;
type Buf = CpuBuffer<f64>;
const BE: F64 = CpuBackend::<f64>::with_float();

/// A CPU backend buffer holding `values`.
fn buf<T>(values: Vec<T>) -> CpuBuffer<T> {
    values.into()
}

fn rand(seed: u64, n: usize, scale: f64) -> Buf {
    let s = RngStream::new(seed, Purpose::Init, 7, 3);
    buf((0..n)
        .map(|i| (2.0 * s.uniform((i >> 30) as u32, i as u32) - 1.0) * scale)
        .collect())
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Central differences of `loss` with respect to every element of `inputs[which]`
/// (or a spread sample of at most 40 of them), compared with `analytic`.
fn check_grad(
    name: &str,
    inputs: &[Buf],
    which: usize,
    analytic: &[f64],
    loss: &dyn Fn(&[Buf]) -> f64,
) {
    let n = inputs[which].len();
    let step = (n / 40).max(1);
    let mut worst = 0.0f64;
    for i in (0..n).step_by(step) {
        let h = 1e-6 * inputs[which][i].abs().max(1.0);
        let mut plus = inputs.to_vec();
        plus[which][i] += h;
        let mut minus = inputs.to_vec();
        minus[which][i] -= h;
        let (lp, lm) = (loss(&plus), loss(&minus));
        let fd = (lp - lm) / (2.0 * h);
        // Round-off of the two losses (sums of many terms) bounds what the difference can resolve.
        let resolution = 1e-13 * (1.0 + lp.abs().max(lm.abs())) / h;
        let err = (fd - analytic[i]).abs() / (resolution + fd.abs().max(analytic[i].abs()) * 1e-5);
        worst = worst.max(err);
        assert!(
            err < 1.0,
            "{name}: input {which} element {i}: analytic {} vs finite difference {fd}",
            analytic[i]
        );
    }
    let _ = worst;
}

fn qc(tests: u64, f: fn(u8, u8, u8, u64) -> TestResult) {
    QuickCheck::new()
        .tests(tests)
        .max_tests(10 * tests)
        .quickcheck(f);
}

fn dims(a: u8, lo: usize, hi: usize) -> usize {
    lo + a as usize % (hi - lo + 1)
}

// ---- matmul --------------------------------------------------------------------------

fn naive_gemm(g: &Gemm, a: &[f64], b: &[f64], c: &mut [f64]) {
    for bi in 0..g.batch {
        for i in 0..g.m {
            for j in 0..g.n {
                let mut s = 0.0;
                for p in 0..g.k {
                    let av = if g.trans_a {
                        a[bi * g.stride_a + p * g.lda + i]
                    } else {
                        a[bi * g.stride_a + i * g.lda + p]
                    };
                    let bv = if g.trans_b {
                        b[bi * g.stride_b + j * g.ldb + p]
                    } else {
                        b[bi * g.stride_b + p * g.ldb + j]
                    };
                    s += av * bv;
                }
                let cv = &mut c[bi * g.stride_c + i * g.ldc + j];
                *cv = f64::from(g.alpha) * s
                    + if g.beta == 0.0 {
                        0.0
                    } else {
                        f64::from(g.beta) * *cv
                    };
            }
        }
    }
}

#[test]
fn matmul_matches_naive_in_f64_and_f32() {
    fn prop(a: u8, b: u8, c: u8, seed: u64) -> TestResult {
        let (m, n, k) = (dims(a, 1, 19), dims(b, 1, 17), dims(c, 1, 13));
        let batch = 1 + (seed % 3) as usize;
        let (ta, tb) = (seed & 8 != 0, seed & 16 != 0);
        let g = Gemm {
            trans_a: ta,
            trans_b: tb,
            m,
            n,
            k,
            lda: if ta { m + 1 } else { k + 2 },
            ldb: if tb { k } else { n + 3 },
            ldc: n + 1,
            batch,
            stride_a: (if ta { k * (m + 1) } else { m * (k + 2) }),
            stride_b: if seed & 32 != 0 {
                0
            } else if tb {
                n * k
            } else {
                k * (n + 3)
            },
            stride_c: m * (n + 1),
            alpha: if seed & 64 != 0 { 0.5 } else { 1.0 },
            beta: if seed & 128 != 0 { 1.0 } else { 0.0 },
        };
        let (na, nb, nc) = (
            batch * g.stride_a.max(1) + 64,
            batch * g.stride_b.max(1) + 64 + k * (n + 3),
            batch * g.stride_c + 64,
        );
        let (av, bv, cv) = (
            rand(seed, na, 1.0),
            rand(seed.wrapping_add(1), nb, 1.0),
            rand(seed.wrapping_add(2), nc, 1.0),
        );
        let mut want = cv.clone();
        naive_gemm(&g, &av, &bv, &mut want);
        let mut got = cv.clone();
        BE.matmul(
            &g,
            Slice::whole(&av),
            Slice::whole(&bv),
            SliceMut::whole(&mut got),
        )
        .unwrap();
        for (x, y) in got.iter().zip(want.iter()) {
            if (x - y).abs() > 1e-12 * (1.0 + y.abs()) {
                return TestResult::error(format!("{g:?}: {x} vs {y}"));
            }
        }
        // f32 agrees too.
        let f32b = CpuBackend::<f32>::new();
        let to32 = |v: &[f64]| buf(v.iter().map(|&x| x as f32).collect());
        let mut got32 = to32(&cv);
        f32b.matmul(
            &g,
            Slice::whole(&to32(&av)),
            Slice::whole(&to32(&bv)),
            SliceMut::whole(&mut got32),
        )
        .unwrap();
        for (x, y) in got32.iter().zip(want.iter()) {
            if (f64::from(*x) - y).abs() > 1e-4 * (1.0 + y.abs()) * k as f64 {
                return TestResult::error(format!("f32 {g:?}: {x} vs {y}"));
            }
        }
        TestResult::passed()
    }
    qc(60, prop);
}

#[test]
fn linear_layer_gradients_are_the_two_backward_gemms() {
    fn prop(a: u8, b: u8, c: u8, seed: u64) -> TestResult {
        let (rows, d_in, d_out) = (dims(a, 1, 11), dims(b, 1, 9), dims(c, 1, 10));
        let inputs = vec![
            rand(seed, rows * d_in, 1.0),
            rand(seed.wrapping_add(1), d_out * d_in, 1.0),
        ];
        let r = rand(seed.wrapping_add(2), rows * d_out, 1.0);
        let loss = |inp: &[Buf]| {
            let mut y = buf(vec![0.0; rows * d_out]);
            BE.matmul(
                &Gemm::linear(rows, d_in, d_out),
                Slice::whole(&inp[0]),
                Slice::whole(&inp[1]),
                SliceMut::whole(&mut y),
            )
            .unwrap();
            dot(&y, &r)
        };
        let (mut dx, mut dw) = (buf(vec![0.0; rows * d_in]), buf(vec![0.0; d_out * d_in]));
        BE.matmul(
            &Gemm::linear_input_grad(rows, d_in, d_out),
            Slice::whole(&r),
            Slice::whole(&inputs[1]),
            SliceMut::whole(&mut dx),
        )
        .unwrap();
        BE.matmul(
            &Gemm::linear_weight_grad(rows, d_in, d_out),
            Slice::whole(&r),
            Slice::whole(&inputs[0]),
            SliceMut::whole(&mut dw),
        )
        .unwrap();
        check_grad("linear dx", &inputs, 0, &dx, &loss);
        check_grad("linear dW", &inputs, 1, &dw, &loss);
        TestResult::passed()
    }
    qc(30, prop);
}

#[test]
fn matmul_rejects_views_past_the_buffer() {
    let g = Gemm::linear(4, 8, 8);
    let (a, b, mut c) = (buf(vec![0.0; 31]), buf(vec![0.0; 64]), buf(vec![0.0; 32]));
    let err = BE
        .matmul(
            &g,
            Slice::whole(&a),
            Slice::whole(&b),
            SliceMut::whole(&mut c),
        )
        .unwrap_err();
    assert!(err.to_string().contains("matmul A"), "{err}");
}

// ---- bias, layernorm, modulation, gated residual ----------------------------------------

#[test]
fn bias_and_layernorm_gradients() {
    fn prop(a: u8, b: u8, _c: u8, seed: u64) -> TestResult {
        let (rows, cols) = (dims(a, 1, 23), dims(b, 1, 37));
        let with_bias = seed & 1 == 1;
        let shape = NormShape {
            rows,
            cols,
            eps: 1e-5,
        };
        let x = rand(seed, rows * cols, 2.0);
        let w = buf(rand(seed.wrapping_add(1), cols, 0.5)
            .iter()
            .map(|v| v + 1.0)
            .collect());
        let bias = rand(seed.wrapping_add(2), cols, 0.5);
        let r = rand(seed.wrapping_add(3), rows * cols, 1.0);
        let fwd = |inp: &[Buf]| -> Buf {
            let (mut out, mut mean, mut rstd) = (
                buf(vec![0.0; rows * cols]),
                buf(vec![0.0; rows]),
                buf(vec![0.0; rows]),
            );
            BE.layernorm_forward(
                &shape,
                Slice::whole(&inp[0]),
                Slice::whole(&inp[1]),
                with_bias.then(|| Slice::whole(&inp[2])),
                SliceMut::whole(&mut out),
                SliceMut::whole(&mut mean),
                SliceMut::whole(&mut rstd),
            )
            .unwrap();
            out
        };
        let inputs = vec![x.clone(), w.clone(), bias.clone()];
        // Forward against the formula.
        let out = fwd(&inputs);
        for i in 0..rows {
            let row = &x[i * cols..(i + 1) * cols];
            let mu = row.iter().sum::<f64>() / cols as f64;
            let var = row.iter().map(|v| (v - mu).powi(2)).sum::<f64>() / cols as f64;
            for j in 0..cols {
                let want = (row[j] - mu) / (var + f64::from(1e-5f32)).sqrt() * w[j]
                    + if with_bias { bias[j] } else { 0.0 };
                if (out[i * cols + j] - want).abs() > 1e-10 {
                    return TestResult::error("layernorm forward");
                }
            }
        }
        let loss = |inp: &[Buf]| dot(&fwd(inp), &r);
        let (mut o, mut mean, mut rstd) = (
            buf(vec![0.0; rows * cols]),
            buf(vec![0.0; rows]),
            buf(vec![0.0; rows]),
        );
        BE.layernorm_forward(
            &shape,
            Slice::whole(&x),
            Slice::whole(&w),
            None,
            SliceMut::whole(&mut o),
            SliceMut::whole(&mut mean),
            SliceMut::whole(&mut rstd),
        )
        .unwrap();
        let (mut dx, mut dw, mut db) = (
            buf(vec![0.0; rows * cols]),
            buf(vec![0.0; cols]),
            buf(vec![0.0; cols]),
        );
        BE.layernorm_backward(
            &shape,
            Slice::whole(&r),
            Slice::whole(&x),
            Slice::whole(&w),
            Slice::whole(&mean),
            Slice::whole(&rstd),
            SliceMut::whole(&mut dx),
            SliceMut::whole(&mut dw),
        )
        .unwrap();
        BE.bias_backward(Slice::whole(&r), SliceMut::whole(&mut db), rows, cols)
            .unwrap();
        check_grad("layernorm dx", &inputs, 0, &dx, &loss);
        check_grad("layernorm dweight", &inputs, 1, &dw, &loss);
        if with_bias {
            check_grad("layernorm dbias", &inputs, 2, &db, &loss);
        }
        // bias_add: y = x + b
        let fb = |inp: &[Buf]| {
            let mut y = inp[0].clone();
            BE.bias_add(SliceMut::whole(&mut y), Slice::whole(&inp[2]), rows, cols)
                .unwrap();
            dot(&y, &r)
        };
        check_grad("bias", &inputs, 2, &db, &fb);
        TestResult::passed()
    }
    qc(30, prop);
}

#[test]
fn modulation_and_gated_residual_gradients() {
    fn prop(a: u8, b: u8, c: u8, seed: u64) -> TestResult {
        let (batch, tokens, ch) = (dims(a, 1, 3), dims(b, 1, 9), dims(c, 1, 21));
        let n = batch * tokens * ch;
        let inputs = vec![
            rand(seed, n, 1.0),
            rand(seed.wrapping_add(1), batch * ch, 1.0),
            rand(seed.wrapping_add(2), batch * ch, 1.0),
            rand(seed.wrapping_add(3), n, 1.0),
        ];
        let r = rand(seed.wrapping_add(4), n, 1.0);
        // modulate: out = x(1 + scale) + shift
        let fm = |inp: &[Buf]| {
            let mut out = buf(vec![0.0; n]);
            BE.modulate_forward(
                Slice::whole(&inp[0]),
                Slice::whole(&inp[1]),
                Slice::whole(&inp[2]),
                SliceMut::whole(&mut out),
                batch,
                tokens,
                ch,
            )
            .unwrap();
            dot(&out, &r)
        };
        // dx is written (NaN until then); the column sums accumulate.
        let (mut dx, mut dscale, mut dshift) = (
            buf(vec![f64::NAN; n]),
            buf(vec![0.0; batch * ch]),
            buf(vec![0.0; batch * ch]),
        );
        BE.modulate_backward(
            Slice::whole(&r),
            Slice::whole(&inputs[0]),
            Slice::whole(&inputs[2]),
            SliceMut::whole(&mut dx),
            SliceMut::whole(&mut dscale),
            batch,
            tokens,
            ch,
        )
        .unwrap();
        for s in 0..batch {
            BE.bias_backward(
                Slice::at(&r, s * tokens * ch),
                SliceMut::at(&mut dshift, s * ch),
                tokens,
                ch,
            )
            .unwrap();
        }
        check_grad("modulate dx", &inputs, 0, &dx, &fm);
        check_grad("modulate dshift", &inputs, 1, &dshift, &fm);
        check_grad("modulate dscale", &inputs, 2, &dscale, &fm);
        // gated residual: res += gate·y, with and without the gate
        for gated in [true, false] {
            let fg = |inp: &[Buf]| {
                let mut res = inp[0].clone();
                BE.gated_residual_forward(
                    SliceMut::whole(&mut res),
                    Slice::whole(&inp[3]),
                    gated.then(|| Slice::whole(&inp[1])),
                    batch,
                    tokens,
                    ch,
                )
                .unwrap();
                dot(&res, &r)
            };
            let (mut dy, mut dgate) = (buf(vec![f64::NAN; n]), buf(vec![0.0; batch * ch]));
            BE.gated_residual_backward(
                Slice::whole(&r),
                Slice::whole(&inputs[3]),
                gated.then(|| Slice::whole(&inputs[1])),
                SliceMut::whole(&mut dy),
                gated.then(|| SliceMut::whole(&mut dgate)),
                batch,
                tokens,
                ch,
            )
            .unwrap();
            check_grad("gated residual dy", &inputs, 3, &dy, &fg);
            if gated {
                check_grad("gated residual dgate", &inputs, 1, &dgate, &fg);
            }
        }
        TestResult::passed()
    }
    qc(30, prop);
}

// ---- RoPE --------------------------------------------------------------------------

#[test]
fn rope_matches_the_formula_and_inverts() {
    fn prop(a: u8, b: u8, c: u8, seed: u64) -> TestResult {
        let (batch, tokens, heads) = (dims(a, 1, 3), dims(b, 1, 11), dims(c, 1, 3));
        let head_dim = 2 * dims((seed % 7) as u8, 1, 5);
        let width = heads * head_dim;
        let stride = width + (seed % 3) as usize * 5;
        let shape = RopeShape {
            batch,
            tokens,
            heads,
            head_dim,
            stride,
            batch_stride: tokens * stride,
            position_offset: (seed % 50) as usize,
            base: 10_000.0,
        };
        let n = batch * tokens * stride;
        let x = rand(seed, n, 1.0);
        let mut y = x.clone();
        BE.rope_forward(&shape, SliceMut::whole(&mut y)).unwrap();
        let half = head_dim / 2;
        for bi in 0..batch {
            for t in 0..tokens {
                for h in 0..heads {
                    for d in 0..half {
                        let o = bi * tokens * stride + t * stride + h * head_dim;
                        let theta = (shape.position_offset + t) as f64
                            * 10_000f64.powf(-2.0 * d as f64 / head_dim as f64);
                        let (x1, x2) = (x[o + d], x[o + d + half]);
                        let want1 = x1 * theta.cos() - x2 * theta.sin();
                        let want2 = x2 * theta.cos() + x1 * theta.sin();
                        if (y[o + d] - want1).abs() > 1e-12
                            || (y[o + d + half] - want2).abs() > 1e-12
                        {
                            return TestResult::error("rope forward");
                        }
                    }
                }
            }
        }
        // Untouched padding between tokens.
        for bi in 0..batch * tokens {
            for j in width..stride {
                if y[bi * stride + j] != x[bi * stride + j] {
                    return TestResult::error("rope wrote outside the heads");
                }
            }
        }
        // The backward is the transpose of the rotation: ⟨R x, r⟩ = ⟨x, Rᵀ r⟩.
        let r = rand(seed.wrapping_add(1), n, 1.0);
        let mut g = r.clone();
        BE.rope_backward(&shape, SliceMut::whole(&mut g)).unwrap();
        let inputs = vec![x.clone()];
        let loss = |inp: &[Buf]| {
            let mut y = inp[0].clone();
            BE.rope_forward(&shape, SliceMut::whole(&mut y)).unwrap();
            dot(&y, &r)
        };
        // Padding elements pass gradients through unchanged (identity), as the forward does.
        check_grad("rope", &inputs, 0, &g, &loss);
        TestResult::passed()
    }
    qc(30, prop);
}

// ---- attention --------------------------------------------------------------------

fn naive_attention(
    s: &AttentionShape,
    mask: &AttentionMask,
    q: &[f64],
    k: &[f64],
    v: &[f64],
) -> Vec<f64> {
    let (d, width) = (s.head_dim, s.heads * s.head_dim);
    let mut out = vec![0.0; s.batch * s.q_len * width];
    for b in 0..s.batch {
        for h in 0..s.heads {
            for i in 0..s.q_len {
                let qo = b * s.q_batch_stride + i * s.q_stride + h * d;
                let allowed: Vec<usize> = (0..s.kv_len).filter(|&j| mask.allows(i, j)).collect();
                if allowed.is_empty() {
                    continue;
                }
                let scores: Vec<f64> = allowed
                    .iter()
                    .map(|&j| {
                        let ko = b * s.kv_batch_stride + j * s.k_stride + h * d;
                        (0..d).map(|x| q[qo + x] * k[ko + x]).sum::<f64>() * f64::from(s.scale)
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = scores.iter().map(|x| (x - m).exp()).sum();
                for (&j, sc) in allowed.iter().zip(&scores) {
                    let p = (sc - m).exp() / z;
                    let vo = b * s.kv_batch_stride + j * s.v_stride + h * d;
                    for x in 0..d {
                        out[(b * s.q_len + i) * width + h * d + x] += p * v[vo + x];
                    }
                }
            }
        }
    }
    out
}

fn mask_for(
    kind: u64,
    q_len: usize,
    kv_len: usize,
    seed: u64,
) -> Option<(AttentionMask, usize, usize)> {
    // Returns the mask and the (q_len, kv_len) it is defined for.
    match kind % 5 {
        0 => Some((AttentionMask::Full, q_len, kv_len)),
        1 => Some((AttentionMask::causal(), q_len, q_len)),
        2 => {
            let block = 1 + (seed as usize / 7) % 4;
            let l = block * (1 + q_len / block.max(1)).min(8);
            Some((AttentionMask::bd3_training(l, block).ok()?, 2 * l, 2 * l))
        }
        3 => {
            // A KV-cache call: queries are one block at `start`, keys from `key_offset`.
            let block = 1 + (seed as usize / 5) % 5;
            let start = block * ((seed as usize / 11) % 4);
            let window = if seed & 1 == 1 {
                Some(block + (seed as usize / 13) % 9)
            } else {
                None
            };
            let key_offset = window.map_or(0, |w| (start + block).saturating_sub(w));
            let mask = AttentionMask::BlockCausal {
                block_size: block,
                query_offset: start,
                key_offset,
                window,
            };
            Some((mask, block, start + block - key_offset))
        }
        _ => {
            let window = Some(1 + (seed as usize / 3) % 6);
            Some((
                AttentionMask::Causal {
                    query_offset: 0,
                    key_offset: 0,
                    window,
                },
                q_len,
                q_len,
            ))
        }
    }
}

#[test]
fn attention_matches_the_dense_reference_and_its_gradients() {
    fn prop(a: u8, b: u8, c: u8, seed: u64) -> TestResult {
        let Some((mask, q_len, kv_len)) = mask_for(seed, dims(a, 1, 13), dims(b, 1, 15), seed)
        else {
            return TestResult::discard();
        };
        let (batch, heads, head_dim) = (
            1 + (seed as usize / 17) % 2,
            dims(c, 1, 3),
            1 + (seed as usize / 19) % 6,
        );
        let width = heads * head_dim;
        let fused = seed & 2 == 0; // q, k, v in one buffer with stride 3·width
        let (q_stride, k_stride) = if fused {
            (3 * width, 3 * width)
        } else {
            (width, width + 2)
        };
        let s = AttentionShape {
            batch,
            heads,
            head_dim,
            q_len,
            kv_len,
            q_stride,
            k_stride,
            v_stride: k_stride,
            q_batch_stride: q_len * q_stride,
            kv_batch_stride: kv_len * k_stride + if fused { 0 } else { 3 * k_stride },
            scale: 1.0 / (head_dim as f32).sqrt(),
        };
        if fused && q_len != kv_len {
            return TestResult::discard();
        }
        let nq = batch * s.q_batch_stride + 8;
        let nk = batch * s.kv_batch_stride + 8;
        let inputs = vec![
            rand(seed, nq, 1.5),
            rand(seed.wrapping_add(1), nk, 1.5),
            rand(seed.wrapping_add(2), nk, 1.0),
        ];
        let (qo, ko, vo) = if fused {
            (0, width, 2 * width)
        } else {
            (0, 0, 0)
        };
        let run = |inp: &[Buf]| -> (Buf, Buf) {
            let (qb, kb, vb) = if fused {
                (&inp[0], &inp[0], &inp[0])
            } else {
                (&inp[0], &inp[1], &inp[2])
            };
            let mut out = buf(vec![f64::NAN; batch * q_len * width]); // poisoned
            let mut lse = buf(vec![f64::NAN; batch * heads * q_len]);
            BE.attention_forward(
                &s,
                &mask,
                Slice::at(qb, qo),
                Slice::at(kb, ko),
                Slice::at(vb, vo),
                SliceMut::whole(&mut out),
                SliceMut::whole(&mut lse),
            )
            .unwrap();
            (out, lse)
        };
        let (out, lse) = run(&inputs);
        let (qb, kb, vb) = if fused {
            (&inputs[0], &inputs[0], &inputs[0])
        } else {
            (&inputs[0], &inputs[1], &inputs[2])
        };
        let want = naive_attention(&s, &mask, &qb[qo..], &kb[ko..], &vb[vo..]);
        for (i, (x, y)) in out.iter().zip(&want).enumerate() {
            if (x - y).abs().is_nan() || (x - y).abs() >= 1e-10 {
                return TestResult::error(format!("{mask:?} {s:?}: out[{i}] {x} vs {y}"));
            }
        }
        let r = rand(seed.wrapping_add(3), out.len(), 1.0);
        // The gradients land laid out like the inputs: a fused input's in one buffer like it,
        // separate inputs' one after another in one buffer (q | k | v).
        let at = if fused {
            QkvOffsets::fused(width)
        } else {
            QkvOffsets {
                q: 0,
                k: nq,
                v: nq + nk,
            }
        };
        let mut grads = buf(vec![0.0; if fused { nq } else { nq + 2 * nk }]);
        BE.attention_backward(
            &s,
            &mask,
            Slice::whole(&r),
            Slice::at(qb, qo),
            Slice::at(kb, ko),
            Slice::at(vb, vo),
            Slice::whole(&out),
            Slice::whole(&lse),
            SliceMut::whole(&mut grads),
            at,
        )
        .unwrap();
        let loss = |inp: &[Buf]| dot(&run(inp).0, &r);
        let g = if fused {
            [grads.to_vec(), vec![], vec![]]
        } else {
            [
                grads[..nq].to_vec(),
                grads[nq..nq + nk].to_vec(),
                grads[nq + nk..].to_vec(),
            ]
        };
        let tensors = if fused { 1 } else { 3 };
        for (i, gi) in g.iter().enumerate().take(tensors) {
            check_grad(
                &format!("attention {mask:?} input {i}"),
                &inputs,
                i,
                gi,
                &loss,
            );
        }
        TestResult::passed()
    }
    qc(80, prop);
}

#[test]
fn attention_query_without_keys_gets_zeros() {
    // A causal window of 1 with the key offset past the query: nothing visible.
    let mask = AttentionMask::Causal {
        query_offset: 0,
        key_offset: 3,
        window: None,
    };
    let s = AttentionShape {
        batch: 1,
        heads: 1,
        head_dim: 2,
        q_len: 2,
        kv_len: 2,
        q_stride: 2,
        k_stride: 2,
        v_stride: 2,
        q_batch_stride: 4,
        kv_batch_stride: 4,
        scale: 1.0,
    };
    let x = buf(vec![1.0; 4]);
    let (mut out, mut lse) = (buf(vec![f64::NAN; 4]), buf(vec![0.0; 2]));
    BE.attention_forward(
        &s,
        &mask,
        Slice::whole(&x),
        Slice::whole(&x),
        Slice::whole(&x),
        SliceMut::whole(&mut out),
        SliceMut::whole(&mut lse),
    )
    .unwrap();
    assert_eq!(out, vec![0.0; 4]);
}

// ---- activations, dropout, embedding, loss -----------------------------------------------

#[test]
fn activation_gradients() {
    fn prop(a: u8, _b: u8, _c: u8, seed: u64) -> TestResult {
        let n = dims(a, 1, 70);
        let inputs = vec![rand(seed, n, 4.0)];
        let r = rand(seed.wrapping_add(1), n, 1.0);
        type Fwd = fn(
            &F64,
            Slice<'_, Buf>,
            SliceMut<'_, Buf>,
            usize,
        ) -> Result<(), did_backend_cpu::CpuError>;
        type Bwd = fn(
            &F64,
            Slice<'_, Buf>,
            Slice<'_, Buf>,
            SliceMut<'_, Buf>,
            usize,
        ) -> Result<(), did_backend_cpu::CpuError>;
        type Op = (&'static str, Fwd, Bwd, fn(f64) -> f64);
        let ops: [Op; 2] = [
            (
                "gelu",
                |b, x, o, n| b.gelu_forward(x, o, n),
                |b, d, x, g, n| b.gelu_backward(d, x, g, n),
                |x| {
                    0.5 * x
                        * (1.0
                            + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3)))
                                .tanh())
                },
            ),
            (
                "silu",
                |b, x, o, n| b.silu_forward(x, o, n),
                |b, d, x, g, n| b.silu_backward(d, x, g, n),
                |x| x / (1.0 + (-x).exp()),
            ),
        ];
        for (name, fwd, bwd, formula) in ops {
            let mut out = buf(vec![f64::NAN; n]);
            fwd(&BE, Slice::whole(&inputs[0]), SliceMut::whole(&mut out), n).unwrap();
            for (o, &x) in out.iter().zip(inputs[0].iter()) {
                if (o - formula(x)).abs() > 1e-12 {
                    return TestResult::error(format!("{name} forward"));
                }
            }
            let loss = |inp: &[Buf]| {
                let mut out = buf(vec![0.0; n]);
                fwd(&BE, Slice::whole(&inp[0]), SliceMut::whole(&mut out), n).unwrap();
                dot(&out, &r)
            };
            let mut g = buf(vec![f64::NAN; n]); // written by the backward
            bwd(
                &BE,
                Slice::whole(&r),
                Slice::whole(&inputs[0]),
                SliceMut::whole(&mut g),
                n,
            )
            .unwrap();
            check_grad(name, &inputs, 0, &g, &loss);
        }
        TestResult::passed()
    }
    qc(30, prop);
}

#[test]
fn dropout_keeps_the_fraction_scales_and_is_its_own_backward() {
    let n = 100_000;
    let stream = RngStream::new(5, Purpose::Dropout, 3, 9);
    let mut x = buf(vec![1.0f64; n]);
    BE.dropout(SliceMut::whole(&mut x), n, 0.1, &stream)
        .unwrap();
    let kept = x.iter().filter(|&&v| v != 0.0).count();
    assert!((kept as f64 / n as f64 - 0.9).abs() < 0.005, "kept {kept}");
    let kept_scale = f64::from(1.0f32 / (1.0 - 0.1f32));
    assert!(x
        .iter()
        .all(|&v| v == 0.0 || (v - kept_scale).abs() < 1e-12));
    // The same stream drops the same elements (so the backward is the same call), f32 and f64 alike.
    let mut y = buf(vec![1.0f32; n]);
    CpuBackend::<f32>::new()
        .dropout(SliceMut::whole(&mut y), n, 0.1, &stream)
        .unwrap();
    assert!(x
        .iter()
        .zip(y.iter())
        .all(|(a, b)| (*a == 0.0) == (*b == 0.0)));
    let mut z = buf(vec![1.0f64; n]);
    BE.dropout(SliceMut::whole(&mut z), n, 0.1, &stream.at_step(10))
        .unwrap();
    assert_ne!(x, z, "another step drops other elements");
}

#[test]
fn embedding_gradients_and_bad_ids() {
    let (rows, vocab, ch) = (9, 5, 3);
    let ids: Vec<u32> = (0..rows as u32).map(|i| (i * 3) % vocab as u32).collect();
    let inputs = vec![rand(1, vocab * ch, 1.0)];
    let r = rand(2, rows * ch, 1.0);
    let loss = |inp: &[Buf]| {
        let mut out = buf(vec![0.0; rows * ch]);
        BE.embedding_forward(
            &ids,
            Slice::whole(&inp[0]),
            SliceMut::whole(&mut out),
            rows,
            ch,
        )
        .unwrap();
        dot(&out, &r)
    };
    let mut g = buf(vec![0.0; vocab * ch]);
    BE.embedding_backward(&ids, Slice::whole(&r), SliceMut::whole(&mut g), rows, ch)
        .unwrap();
    check_grad("embedding", &inputs, 0, &g, &loss);
    let bad = vec![0, 7];
    let mut out = buf(vec![0.0; 2 * ch]);
    let err = BE
        .embedding_forward(
            &bad,
            Slice::whole(&inputs[0]),
            SliceMut::whole(&mut out),
            2,
            ch,
        )
        .unwrap_err();
    assert!(err.to_string().contains("token id 7"), "{err}");
}

#[test]
fn cross_entropy_loss_and_gradient() {
    fn prop(a: u8, b: u8, _c: u8, seed: u64) -> TestResult {
        let (rows, vocab) = (dims(a, 1, 9), dims(b, 2, 40));
        let excluded = (seed & 1 == 1).then_some((seed as u32 / 3) % vocab as u32);
        let targets: Vec<u32> = (0..rows)
            .map(|i| {
                let mut t = ((seed as usize / 7 + i * 5) % vocab) as u32;
                if Some(t) == excluded {
                    t = (t + 1) % vocab as u32;
                }
                t
            })
            .collect();
        let weights = buf((0..rows)
            .map(|i| if i % 3 == 2 { 0.0 } else { 0.5 + i as f64 })
            .collect());
        let inputs = vec![rand(seed, rows * vocab, 3.0)];
        let loss = |inp: &[Buf]| {
            let mut l = inp[0].clone();
            let mut losses = buf(vec![0.0; rows]);
            BE.softmax_cross_entropy(
                SliceMut::whole(&mut l),
                &targets,
                Slice::whole(&weights),
                SliceMut::whole(&mut losses),
                RowMajor::dense(rows, vocab),
                excluded,
                1.0,
            )
            .unwrap();
            losses.iter().sum::<f64>()
        };
        // Reference loss.
        let mut want = 0.0;
        for r in 0..rows {
            let row = &inputs[0][r * vocab..(r + 1) * vocab];
            let z: f64 = row
                .iter()
                .enumerate()
                .filter(|(j, _)| Some(*j as u32) != excluded)
                .map(|(_, x)| x.exp())
                .sum();
            want += weights[r] * (z.ln() - row[targets[r] as usize]);
        }
        if (loss(&inputs) - want).abs() > 1e-10 * (1.0 + want.abs()) {
            return TestResult::error("cross-entropy loss");
        }
        let mut g = inputs[0].clone();
        let mut losses = buf(vec![0.0; rows]);
        BE.softmax_cross_entropy(
            SliceMut::whole(&mut g),
            &targets,
            Slice::whole(&weights),
            SliceMut::whole(&mut losses),
            RowMajor::dense(rows, vocab),
            excluded,
            1.0,
        )
        .unwrap();
        if let Some(e) = excluded {
            if (0..rows).any(|r| g[r * vocab + e as usize] != 0.0) {
                return TestResult::error("excluded class got a gradient");
            }
            // Finite differences do not see the excluded logit either.
        }
        check_grad("cross-entropy", &inputs, 0, &g, &loss);
        TestResult::passed()
    }
    qc(40, prop);
}

/// The head's logits with rows padded apart (`RowMajor`): the bias add, its gradient and the
/// cross-entropy give over padded rows exactly what they give over the same rows stored densely,
/// and leave the padding as it was.
#[test]
fn padded_rows_give_the_dense_results_and_keep_their_padding() {
    fn prop(a: u8, b: u8, pad: u8, seed: u64) -> TestResult {
        let (rows, cols) = (dims(a, 1, 9), dims(b, 2, 40));
        let stride = cols + pad as usize % 70;
        let shape = RowMajor::padded(rows, cols, stride);
        let dense = rand(seed, rows * cols, 3.0);
        let sentinel = -123.25;
        let mut padded = buf(vec![sentinel; shape.extent()]);
        for r in 0..rows {
            padded[r * stride..r * stride + cols].copy_from_slice(&dense[r * cols..(r + 1) * cols]);
        }
        let values = |m: &[f64]| -> Vec<f64> {
            (0..rows)
                .flat_map(|r| m[r * stride..r * stride + cols].to_vec())
                .collect()
        };
        let padding_kept = |m: &[f64]| {
            (0..rows.saturating_sub(1)).all(|r| {
                m[r * stride + cols..(r + 1) * stride]
                    .iter()
                    .all(|&x| x == sentinel)
            })
        };
        let bias = rand(seed ^ 1, cols, 1.0);
        let (mut want, mut got) = (dense.clone(), padded.clone());
        BE.bias_add(SliceMut::whole(&mut want), Slice::whole(&bias), rows, cols)
            .unwrap();
        BE.bias_add_rows(SliceMut::whole(&mut got), Slice::whole(&bias), shape)
            .unwrap();
        if values(&got) != *want || !padding_kept(&got) {
            return TestResult::error("bias_add over padded rows");
        }
        let (mut db_want, mut db_got) = (bias.clone(), bias.clone());
        BE.bias_backward(
            Slice::whole(&want),
            SliceMut::whole(&mut db_want),
            rows,
            cols,
        )
        .unwrap();
        BE.bias_backward_rows(Slice::whole(&got), SliceMut::whole(&mut db_got), shape)
            .unwrap();
        if db_got != db_want {
            return TestResult::error("bias_backward over padded rows");
        }
        let targets: Vec<u32> = (0..rows)
            .map(|r| (1 + (seed as usize % cols + r) % (cols - 1)) as u32)
            .collect();
        let weights = buf((0..rows).map(|r| (r % 3) as f64 * 0.5).collect());
        let mut losses = [buf(vec![0.0; rows]), buf(vec![0.0; rows])];
        for (logits, (losses, shape)) in [&mut want, &mut got]
            .into_iter()
            .zip(losses.iter_mut().zip([RowMajor::dense(rows, cols), shape]))
        {
            BE.softmax_cross_entropy(
                SliceMut::whole(logits),
                &targets,
                Slice::whole(&weights),
                SliceMut::whole(losses),
                shape,
                Some(0),
                0.5,
            )
            .unwrap();
        }
        if losses[0] != losses[1] || values(&got) != *want || !padding_kept(&got) {
            return TestResult::error("cross-entropy over padded rows");
        }
        TestResult::passed()
    }
    qc(60, prop);
}

// ---- optimiser ----------------------------------------------------------------------

#[test]
fn adamw_ema_norm_and_scale_match_their_formulas() {
    let n = 1000;
    let (p0, g, m0, v0) = (
        rand(1, n, 1.0),
        rand(2, n, 1.0),
        rand(3, n, 0.1),
        buf(rand(4, n, 0.1).iter().map(|x| x * x).collect()),
    );
    let hp = AdamW {
        lr: 1e-2,
        weight_decay: 0.1,
        step: 3,
        ..AdamW::default()
    };
    let (mut p, mut m, mut v) = (p0.clone(), m0.clone(), v0.clone());
    BE.adamw(
        &hp,
        SliceMut::whole(&mut p),
        Slice::whole(&g),
        SliceMut::whole(&mut m),
        SliceMut::whole(&mut v),
        n,
    )
    .unwrap();
    for i in 0..n {
        let (beta1, beta2) = (f64::from(hp.beta1), f64::from(hp.beta2));
        let mi = beta1 * m0[i] + (1.0 - beta1) * g[i];
        let vi = beta2 * v0[i] + (1.0 - beta2) * g[i] * g[i];
        let (b1, b2) = (1.0 - beta1.powi(3), 1.0 - beta2.powi(3));
        let lr = f64::from(1e-2f32);
        let want = p0[i] * (1.0 - lr * f64::from(0.1f32))
            - lr * (mi / b1) / ((vi / b2).sqrt() + f64::from(1e-8f32));
        assert!((p[i] - want).abs() < 1e-12, "adamw {i}: {} vs {want}", p[i]);
    }
    let mut e = p0.clone();
    BE.ema_update(SliceMut::whole(&mut e), Slice::whole(&g), n, 0.75)
        .unwrap();
    assert!((0..n).all(|i| (e[i] - (0.75 * p0[i] + 0.25 * g[i])).abs() < 1e-12));
    let ss = BE.sum_squares(Slice::whole(&g), n).unwrap();
    assert!((ss - g.iter().map(|x| x * x).sum::<f64>()).abs() < 1e-9);
    let mut s = g.clone();
    BE.scale(SliceMut::whole(&mut s), n, 0.5).unwrap();
    assert!((0..n).all(|i| s[i] == 0.5 * g[i]));
}

#[test]
fn copy_row_groups_moves_every_group_with_its_strides() {
    // Two groups of 2 rows × 2 columns: source rows 3 apart, groups 10 apart; destination
    // rows 2 apart, groups 5 apart (a KV-cache append for 2 sequences).
    let src = buf((0..24).map(f64::from).collect());
    let mut dst = buf(vec![-1.0; 11]);
    let layout = RowGroups {
        groups: 2,
        rows: 2,
        cols: 2,
        src_stride: 3,
        src_group_stride: 10,
        dst_stride: 2,
        dst_group_stride: 5,
    };
    assert_eq!((layout.src_extent(), layout.dst_extent()), (15, 9));
    BE.copy_row_groups(Slice::at(&src, 1), SliceMut::at(&mut dst, 1), &layout)
        .unwrap();
    assert_eq!(
        dst,
        vec![-1.0, 1.0, 2.0, 4.0, 5.0, -1.0, 11.0, 12.0, 14.0, 15.0, -1.0]
    );
}

#[test]
fn copy_rows_moves_strided_rows() {
    let src = buf((0..20).map(f64::from).collect());
    let mut dst = buf(vec![-1.0; 12]);
    BE.copy_rows(Slice::at(&src, 1), 5, SliceMut::at(&mut dst, 2), 4, 3, 2)
        .unwrap();
    assert_eq!(
        dst,
        vec![-1.0, -1.0, 1.0, 2.0, -1.0, -1.0, 6.0, 7.0, -1.0, -1.0, 11.0, 12.0]
    );
}
