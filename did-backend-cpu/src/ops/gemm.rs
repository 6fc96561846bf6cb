//! The one strided-batched GEMM every matmul goes through (the cuBLAS call shape).

use did_core::backend::Gemm;

use crate::{CpuError, CpuFloat};

/// `C[i] = alpha·op(A[i])·op(B[i]) + beta·C[i]` for every batch entry `i`
/// (see [`Gemm`]); the slices start at each operand's offset.
pub fn gemm<T: CpuFloat>(g: &Gemm, a: &[T], b: &[T], c: &mut [T]) -> Result<(), CpuError> {
    if g.batch > 1
        && g.stride_c < g.m.saturating_sub(1) * g.ldc + g.n
        && g.m * g.n > 0
        && g.stride_c != 0
    {
        return Err(CpuError::Shape(format!(
            "matmul: output matrices overlap (stride_c {} for {}×{} with ldc {})",
            g.stride_c, g.m, g.n, g.ldc
        )));
    }
    if few_rows_linear(g) {
        for i in 0..g.batch {
            few_rows(
                g,
                &a[i * g.stride_a..],
                &b[i * g.stride_b..],
                &mut c[i * g.stride_c..],
            );
        }
        return Ok(());
    }
    let (rsa, csa) = if g.trans_a {
        (1, g.lda as isize)
    } else {
        (g.lda as isize, 1)
    };
    let (rsb, csb) = if g.trans_b {
        (1, g.ldb as isize)
    } else {
        (g.ldb as isize, 1)
    };
    let (alpha, beta) = (T::of_f32(g.alpha), T::of_f32(g.beta));
    for i in 0..g.batch {
        if g.m == 0 || g.n == 0 {
            break;
        }
        let c_ptr = c[i * g.stride_c..].as_mut_ptr();
        if g.k == 0 {
            for r in 0..g.m {
                for x in &mut c[i * g.stride_c + r * g.ldc..][..g.n] {
                    *x = if g.beta == 0.0 { T::zero() } else { *x * beta };
                }
            }
            continue;
        }
        // SAFETY: `Gemm::extents` (checked by the caller) bounds every element
        // addressed here inside `a`, `b`, `c`; `c` is a distinct `&mut`.
        unsafe {
            T::gemm_raw(
                g.m,
                g.k,
                g.n,
                alpha,
                a[i * g.stride_a..].as_ptr(),
                rsa,
                csa,
                b[i * g.stride_b..].as_ptr(),
                rsb,
                csb,
                beta,
                c_ptr,
                g.ldc as isize,
                1,
            );
        }
    }
    Ok(())
}

/// A linear layer over a few rows (a block of 4 tokens while drafting): the
/// weight is read once, as dot products, instead of being packed by the
/// general kernel for every call. Memory-bound, so this is what sets the
/// speed of small-batch sampling.
fn few_rows_linear(g: &Gemm) -> bool {
    !g.trans_a && g.trans_b && g.m <= 8 && g.k >= 64 && g.n >= 256
}

fn few_rows<T: CpuFloat>(g: &Gemm, a: &[T], b: &[T], c: &mut [T]) {
    use rayon::prelude::*;
    const COLS: usize = 64;
    let (alpha, beta) = (T::of_f32(g.alpha), T::of_f32(g.beta));
    let results: Vec<Vec<T>> = (0..g.n.div_ceil(COLS))
        .into_par_iter()
        .map(|chunk| {
            let cols = chunk * COLS..((chunk + 1) * COLS).min(g.n);
            let mut out = Vec::with_capacity(g.m * cols.len());
            for i in 0..g.m {
                let row = &a[i * g.lda..i * g.lda + g.k];
                for j in cols.clone() {
                    out.push(dot(row, &b[j * g.ldb..j * g.ldb + g.k]));
                }
            }
            out
        })
        .collect();
    for (chunk, vals) in results.into_iter().enumerate() {
        let start = chunk * COLS;
        let width = vals.len() / g.m;
        for i in 0..g.m {
            for (jj, &v) in vals[i * width..(i + 1) * width].iter().enumerate() {
                let dst = &mut c[i * g.ldc + start + jj];
                *dst = if g.beta == 0.0 {
                    alpha * v
                } else {
                    alpha * v + beta * *dst
                };
            }
        }
    }
}

/// A dot product with 16 independent partial sums (vectorises).
fn dot<T: CpuFloat>(x: &[T], y: &[T]) -> T {
    let mut acc = [T::zero(); 16];
    let (xc, yc) = (x.chunks_exact(16), y.chunks_exact(16));
    let (xr, yr) = (xc.remainder(), yc.remainder());
    for (a, b) in xc.zip(yc) {
        for l in 0..16 {
            acc[l] += a[l] * b[l];
        }
    }
    let mut s = T::zero();
    for (a, b) in xr.iter().zip(yr) {
        s += *a * *b;
    }
    acc.iter().fold(s, |t, &v| t + v)
}
