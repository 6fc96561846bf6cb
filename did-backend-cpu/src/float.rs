//! The element types the CPU backend computes in: f32 (the product) and f64
//! (the oracle of the gradient checks).

use core::fmt::Debug;
use core::iter::Sum;
use core::ops::{AddAssign, MulAssign, SubAssign};

/// A float the CPU backend can run in.
pub trait CpuFloat:
    num_traits::Float
    + num_traits::FromPrimitive
    + AddAssign
    + SubAssign
    + MulAssign
    + Sum
    + Default
    + Debug
    + Send
    + Sync
    + 'static
{
    /// `"f32"` or `"f64"`.
    const NAME: &'static str;

    /// From f32 (upload).
    fn of_f32(x: f32) -> Self;
    /// From f64.
    fn of_f64(x: f64) -> Self;
    /// To f32 (download).
    fn to_f32_lossy(self) -> f32;
    /// To f64.
    fn to_f64_exact(self) -> f64;
    /// The slice itself where `Self` is f32 (the stored-weight kernels read and write f32 in
    /// place then), else none.
    fn as_f32(s: &[Self]) -> Option<&[f32]> {
        let _ = s;
        None
    }
    /// The slice itself where `Self` is f32, else none.
    fn as_f32_mut(s: &mut [Self]) -> Option<&mut [f32]> {
        let _ = s;
        None
    }

    /// One row-major GEMM with arbitrary strides (matrixmultiply's `sgemm`/`dgemm`).
    ///
    /// # Safety
    /// Every element addressed by `(m, k, n)` and the strides must lie inside
    /// the buffers behind `a`, `b`, `c`, and `c` must not overlap `a` or `b`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: *const Self,
        rsa: isize,
        csa: isize,
        b: *const Self,
        rsb: isize,
        csb: isize,
        beta: Self,
        c: *mut Self,
        rsc: isize,
        csc: isize,
    );
}

impl CpuFloat for f32 {
    const NAME: &'static str = "f32";
    fn of_f32(x: f32) -> Self {
        x
    }
    fn of_f64(x: f64) -> Self {
        x as f32
    }
    fn to_f32_lossy(self) -> f32 {
        self
    }
    fn to_f64_exact(self) -> f64 {
        f64::from(self)
    }
    fn as_f32(s: &[f32]) -> Option<&[f32]> {
        Some(s)
    }
    fn as_f32_mut(s: &mut [f32]) -> Option<&mut [f32]> {
        Some(s)
    }
    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: f32,
        a: *const f32,
        rsa: isize,
        csa: isize,
        b: *const f32,
        rsb: isize,
        csb: isize,
        beta: f32,
        c: *mut f32,
        rsc: isize,
        csc: isize,
    ) {
        // SAFETY: forwarded from the caller's contract.
        unsafe {
            matrixmultiply::sgemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc)
        }
    }
}

impl CpuFloat for f64 {
    const NAME: &'static str = "f64";
    fn of_f32(x: f32) -> Self {
        f64::from(x)
    }
    fn of_f64(x: f64) -> Self {
        x
    }
    fn to_f32_lossy(self) -> f32 {
        self as f32
    }
    fn to_f64_exact(self) -> f64 {
        self
    }
    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: f64,
        a: *const f64,
        rsa: isize,
        csa: isize,
        b: *const f64,
        rsb: isize,
        csb: isize,
        beta: f64,
        c: *mut f64,
        rsc: isize,
        csc: isize,
    ) {
        // SAFETY: forwarded from the caller's contract.
        unsafe {
            matrixmultiply::dgemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc)
        }
    }
}
