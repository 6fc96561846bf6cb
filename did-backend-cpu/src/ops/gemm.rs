//! The one strided-batched GEMM every matmul goes through (the cuBLAS call shape).

use did_core::backend::Gemm;

use crate::{CpuError, CpuFloat};

/// `C[i] = alpha·op(A[i])·op(B[i]) + beta·C[i]` for every batch entry `i`
/// (see [`Gemm`]); the slices start at each operand's offset.
pub fn gemm<T: CpuFloat>(g: &Gemm, a: &[T], b: &[T], c: &mut [T]) -> Result<(), CpuError> {
    if g.batch > 1 && g.stride_c < g.m.saturating_sub(1) * g.ldc + g.n && g.m * g.n > 0 && g.stride_c != 0 {
        return Err(CpuError::Shape(format!("matmul: output matrices overlap (stride_c {} for {}×{} with ldc {})", g.stride_c, g.m, g.n, g.ldc)));
    }
    let (rsa, csa) = if g.trans_a { (1, g.lda as isize) } else { (g.lda as isize, 1) };
    let (rsb, csb) = if g.trans_b { (1, g.ldb as isize) } else { (g.ldb as isize, 1) };
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
        // SAFETY: `gemm_extents` (checked by the caller) bounds every element
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
