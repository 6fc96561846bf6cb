//! Which GEMMs the few-rows linear kernel (`kernels/linear.cu`) takes instead of cuBLAS: a
//! linear layer's forward `y = x · Wᵀ` over at most [`MAX_ROWS`] rows — a batch-1 draft call's
//! block of 4 tokens through every layer, and the head over the rows being revealed.
//!
//! Such a call reads each weight once for 2·m FLOPs, so it is bound by reading `W`: the
//! kernel spreads the columns over the GPU ([`COLUMNS_PER_BLOCK`] a block of [`THREADS`]) and
//! reads `W` in 16-byte loads. Whether it beats cuBLAS's own small-m kernels is for a GPU to
//! say (`examples/profile_ops` times both); `DID_CUDA_FEW_ROWS=off` or
//! [`CudaBackend::set_few_rows_kernel`](crate::CudaBackend::set_few_rows_kernel) keeps cuBLAS.

use did_core::backend::Gemm;

use crate::kernel::Kernel;

/// The most rows the kernel takes.
pub const MAX_ROWS: usize = 8;
/// Columns of `y` a block computes (`FEW_COLS` in linear.cu).
pub const COLUMNS_PER_BLOCK: usize = 4;
/// Threads a block (`FEW_THREADS` in linear.cu).
pub const THREADS: u32 = 128;

/// The kernel for `g` — `linear_few_rows_{1,2,4,8}`, the smallest bound that holds `g.m` — or
/// `None` where cuBLAS keeps it: anything but a single `x · Wᵀ` with `alpha = 1` over 1 to
/// [`MAX_ROWS`] rows, a depth of at least one chunk, and `x` and `W` whose rows start on
/// 16-byte boundaries (`vec` elements a chunk: 8 in bf16, 4 in f32; `a_aligned`, `b_aligned`:
/// the operands' first elements are 16-byte aligned). Strides shorter than a row
/// (`lda` or `ldb` < k, `ldc` < n) go to cuBLAS, which refuses them as a GEMM with
/// overlapping rows should be refused, and so does a grid past CUDA's 2³¹ − 1 blocks.
///
/// ```
/// use did_backend_cuda::few_rows::kernel_for;
/// use did_backend_cuda::kernel::Kernel;
/// use did_core::backend::Gemm;
/// // A draft block's MLP up-projection in bf16, and the head over one revealed row.
/// assert_eq!(kernel_for(&Gemm::linear(4, 768, 3072), 8, true, true), Some(Kernel::LinearFewRows4));
/// assert_eq!(kernel_for(&Gemm::linear(1, 768, 50_258), 8, true, true), Some(Kernel::LinearFewRows1));
/// // A training GEMM, and a weight gradient, stay with cuBLAS.
/// assert_eq!(kernel_for(&Gemm::linear(16_384, 768, 3072), 8, true, true), None);
/// assert_eq!(kernel_for(&Gemm::linear_weight_grad(4, 768, 3072), 8, true, true), None);
/// ```
pub fn kernel_for(g: &Gemm, vec: usize, a_aligned: bool, b_aligned: bool) -> Option<Kernel> {
    let vec = vec.max(1);
    let shape_fits = !g.trans_a
        && g.trans_b
        && g.batch == 1
        && (1..=MAX_ROWS).contains(&g.m)
        && g.n >= 1
        && g.n.div_ceil(COLUMNS_PER_BLOCK) <= MAX_BLOCKS
        && g.k >= vec
        && g.lda >= g.k
        && g.ldb >= g.k
        && g.ldc >= g.n
        && g.alpha == 1.0
        && g.beta.is_finite();
    let aligned = a_aligned && b_aligned && g.k % vec == 0 && g.lda % vec == 0 && g.ldb % vec == 0;
    if !(shape_fits && aligned) {
        return None;
    }
    Some(match g.m {
        1 => Kernel::LinearFewRows1,
        2 => Kernel::LinearFewRows2,
        3 | 4 => Kernel::LinearFewRows4,
        _ => Kernel::LinearFewRows8,
    })
}

/// What the kernel does with `x · Wᵀ` before it stores it (`THEN_*` in linear.cu).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Then {
    /// Stores it ([`kernel_for`]'s kernels).
    Store,
    /// `bias_gelu_forward`'s pass: the biased pre-activation stays in `y`, its GELU goes out.
    BiasGelu,
    /// `(bias_)gated_residual_forward_into`'s pass: `out = residual + gate · (y + bias)`.
    GatedResidual,
}

/// The kernel for `g` followed by `then` in the same pass, under [`kernel_for`]'s rule; the
/// fused forms also need `y` dense (`ldc = n`) and no accumulation (`beta = 0`).
///
/// ```
/// use did_backend_cuda::few_rows::{fused_kernel_for, Then};
/// use did_backend_cuda::kernel::Kernel;
/// use did_core::backend::Gemm;
/// let up = Gemm::linear(4, 768, 3072);
/// assert_eq!(fused_kernel_for(&up, 8, true, true, Then::BiasGelu), Some(Kernel::LinearFewRows4BiasGelu));
/// assert_eq!(fused_kernel_for(&up, 8, true, true, Then::Store), Some(Kernel::LinearFewRows4));
/// assert_eq!(fused_kernel_for(&up.accumulate(), 8, true, true, Then::GatedResidual), None);
/// ```
pub fn fused_kernel_for(
    g: &Gemm,
    vec: usize,
    a_aligned: bool,
    b_aligned: bool,
    then: Then,
) -> Option<Kernel> {
    let plain = kernel_for(g, vec, a_aligned, b_aligned)?;
    if then == Then::Store {
        return Some(plain);
    }
    if g.ldc != g.n || g.beta != 0.0 {
        return None;
    }
    Some(match (g.m, then) {
        (1, Then::BiasGelu) => Kernel::LinearFewRows1BiasGelu,
        (2, Then::BiasGelu) => Kernel::LinearFewRows2BiasGelu,
        (3 | 4, Then::BiasGelu) => Kernel::LinearFewRows4BiasGelu,
        (_, Then::BiasGelu) => Kernel::LinearFewRows8BiasGelu,
        (1, _) => Kernel::LinearFewRows1GatedResidual,
        (2, _) => Kernel::LinearFewRows2GatedResidual,
        (3 | 4, _) => Kernel::LinearFewRows4GatedResidual,
        _ => Kernel::LinearFewRows8GatedResidual,
    })
}

/// The most blocks a grid's x dimension holds (CUDA: 2³¹ − 1).
const MAX_BLOCKS: usize = i32::MAX as usize;

/// Blocks a launch of the kernel for `n` columns takes.
pub fn blocks(n: usize) -> u32 {
    n.div_ceil(COLUMNS_PER_BLOCK).min(MAX_BLOCKS) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use quickcheck::quickcheck;

    quickcheck! {
        /// The kernel is chosen only for what it computes, and its bound holds m. Each stride
        /// may fall up to 8 short of its row (the kernel would read overlapping rows).
        fn only_few_row_forwards_aligned_to_a_chunk(
            m: u8, n: u16, k: u16, pads: (u8, u8, u8), aligned: bool, trans: bool
        ) -> bool {
            let (m, n, k) = (m as usize % 12, n as usize, k as usize);
            let stride = |len: usize, pad: u8| (len + pad as usize % 24).saturating_sub(8);
            let g = Gemm {
                lda: stride(k, pads.0),
                ldb: stride(k, pads.1),
                ldc: stride(n, pads.2),
                trans_a: trans,
                ..Gemm::linear(m, k, n)
            };
            let strides_hold_rows = g.lda >= k && g.ldb >= k && g.ldc >= n;
            match kernel_for(&g, 8, aligned, true) {
                None => trans || !aligned || m == 0 || m > MAX_ROWS || n == 0 || k < 8
                    || k % 8 != 0 || g.lda % 8 != 0 || g.ldb % 8 != 0 || !strides_hold_rows,
                Some(name) => {
                    let bound: usize = name.name().trim_start_matches("linear_few_rows_").parse().unwrap_or(0);
                    !trans && aligned && (1..=MAX_ROWS).contains(&m) && bound >= m && bound < 2 * m.max(1)
                        && k % 8 == 0 && g.lda % 8 == 0 && g.ldb % 8 == 0 && strides_hold_rows
                        && blocks(n) as usize * COLUMNS_PER_BLOCK >= n
                }
            }
        }
    }

    quickcheck! {
        /// A fused kernel is the plain kernel's bound with its epilogue, over dense outputs.
        fn fused_kernels_share_the_plain_rule(m: u8, n: u16, k: u16, ldc_pad: u8, beta: bool) -> bool {
            let (m, n, k) = (m as usize % 12, n as usize, 8 * (k as usize % 300));
            let g = Gemm {
                ldc: n + ldc_pad as usize % 3,
                beta: if beta { 1.0 } else { 0.0 },
                ..Gemm::linear(m, k, n)
            };
            let plain = kernel_for(&g, 8, true, true);
            [Then::BiasGelu, Then::GatedResidual].iter().all(|&then| {
                match fused_kernel_for(&g, 8, true, true, then) {
                    None => plain.is_none() || g.ldc != g.n || beta,
                    Some(name) => {
                        let suffix = if then == Then::BiasGelu { "_bias_gelu" } else { "_gated_residual" };
                        plain.map(|p| format!("{}{suffix}", p.name())) == Some(name.name().to_string())
                            && g.ldc == g.n && !beta
                    }
                }
            }) && fused_kernel_for(&g, 8, true, true, Then::Store) == plain
        }
    }

    #[test]
    fn scaled_batched_or_accumulating_products() {
        let g = Gemm::linear(4, 768, 768);
        assert!(kernel_for(&Gemm { alpha: 0.5, ..g }, 8, true, true).is_none());
        assert!(kernel_for(&Gemm { batch: 2, ..g }, 8, true, true).is_none());
        assert!(kernel_for(
            &Gemm {
                beta: f32::NAN,
                ..g
            },
            8,
            true,
            true
        )
        .is_none());
        assert_eq!(
            kernel_for(&g.accumulate(), 8, true, true),
            Some(Kernel::LinearFewRows4)
        );
        assert!(kernel_for(&g, 8, true, false).is_none());
        assert!(kernel_for(&Gemm { ldb: 770, ..g }, 8, true, true).is_none());
    }

    #[test]
    fn grids_past_cudas_limit_stay_with_cublas() {
        let widest = 4 * MAX_BLOCKS;
        let g = Gemm::linear(1, 8, widest);
        assert_eq!(kernel_for(&g, 8, true, true), Some(Kernel::LinearFewRows1));
        assert_eq!(blocks(widest), i32::MAX as u32);
        assert!(kernel_for(&Gemm::linear(1, 8, widest + 1), 8, true, true).is_none());
    }
}
