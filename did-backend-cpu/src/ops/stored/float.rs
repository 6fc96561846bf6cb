//! The products of f32 input rows with bf16 weight rows: each weight element is
//! widened to f32 in a register (bf16 is the top half of an f32) and multiplied into four input
//! rows with fused multiply-adds. bf16 halves the bytes a pass reads; the arithmetic is f32's.

use core::marker::PhantomData;

use super::Block;

/// An element of a stored row: widened to f32 one at a time (the portable kernel) or sixteen
/// at a time into vector registers (the x86 kernels), to the same values.
pub(super) trait Lane: Copy + Send + Sync {
    fn widen(self) -> f32;
    /// Lanes `[0, 16)` from `p`.
    ///
    /// # Safety
    /// AVX-512F/BW available; `p..p + 16` readable.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16_avx512(p: *const Self) -> x86::__m512;
    /// Lanes `[0, 8)` from `p`.
    ///
    /// # Safety
    /// AVX2 available; `p..p + 8` readable.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8_avx2(p: *const Self) -> x86::__m256;
}

#[cfg(target_arch = "x86_64")]
use core::arch::x86_64 as x86;

impl Lane for u16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits(u32::from(self) << 16)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16_avx512(p: *const u16) -> x86::__m512 {
        let h = x86::_mm256_loadu_si256(p.cast());
        x86::_mm512_castsi512_ps(x86::_mm512_slli_epi32::<16>(x86::_mm512_cvtepu16_epi32(h)))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8_avx2(p: *const u16) -> x86::__m256 {
        let h = x86::_mm_loadu_si128(p.cast());
        x86::_mm256_castsi256_ps(x86::_mm256_slli_epi32::<16>(x86::_mm256_cvtepu16_epi32(h)))
    }
}

const LANES: usize = 16;

/// The sixteen partial sums of a product, added pairwise in a fixed tree.
#[inline(always)]
fn sum_lanes(mut s: [f32; LANES]) -> f32 {
    let mut width = LANES / 2;
    while width > 0 {
        for l in 0..width {
            s[l] += s[l + width];
        }
        width /= 2;
    }
    s[0]
}

/// [`sum_lanes`] after its first level (lanes `l + 8` added into lanes `l`), in registers:
/// the same additions in the same order.
///
/// # Safety
/// AVX available.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn sum_lanes_avx(s8: x86::__m256) -> f32 {
    let s4 = x86::_mm_add_ps(
        x86::_mm256_castps256_ps128(s8),
        x86::_mm256_extractf128_ps::<1>(s8),
    );
    let s2 = x86::_mm_add_ps(s4, x86::_mm_movehl_ps(s4, s4));
    let s1 = x86::_mm_add_ss(s2, x86::_mm_shuffle_ps::<1>(s2, s2));
    x86::_mm_cvtss_f32(s1)
}

/// The last `k % 16` elements of a row, zero-padded to sixteen.
#[inline(always)]
fn padded_tail<E: Copy + Default>(row: &[E], at: usize) -> [E; LANES] {
    let mut t = [E::default(); LANES];
    t[..row.len() - at].copy_from_slice(&row[at..]);
    t
}

/// The `R × C` dot products of `R` input rows `x[r][k]` with `C` weight rows `w[c][k]`:
/// sixteen partial sums a product, fused multiply-adds in order of `k` (the last chunk
/// zero-padded), then [`sum_lanes`]. The portable version: what the x86 versions compute, lane
/// for lane.
#[inline(always)]
fn dots<W: Lane + Default, const R: usize, const C: usize>(
    x: &[&[f32]; R],
    w: &[&[W]; C],
) -> [[f32; C]; R] {
    let k = w[0].len();
    let full = k / LANES * LANES;
    let mut acc = [[[0.0f32; LANES]; C]; R];
    for at in (0..full).step_by(LANES) {
        for r in 0..R {
            for c in 0..C {
                for l in 0..LANES {
                    acc[r][c][l] = x[r][at + l].mul_add(w[c][at + l].widen(), acc[r][c][l]);
                }
            }
        }
    }
    if full < k {
        let wt: [[W; LANES]; C] = core::array::from_fn(|c| padded_tail(w[c], full));
        for r in 0..R {
            let xt = padded_tail(&x[r][..k], full);
            for c in 0..C {
                for l in 0..LANES {
                    acc[r][c][l] = xt[l].mul_add(wt[c][l].widen(), acc[r][c][l]);
                }
            }
        }
    }
    acc.map(|row| row.map(sum_lanes))
}

/// [`dots`] with AVX-512: one register a product.
///
/// # Safety
/// AVX-512F/BW and FMA available; every `x[r]` and `w[c]` at least `w[0].len()` long.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn dots_avx512<W: Lane + Default, const R: usize, const C: usize>(
    x: &[&[f32]; R],
    w: &[&[W]; C],
) -> [[f32; C]; R] {
    let k = w[0].len();
    let mut acc = [[x86::_mm512_setzero_ps(); C]; R];
    let full = k / LANES * LANES;
    let mut wv = [x86::_mm512_setzero_ps(); C];
    let mut at = 0;
    while at < full {
        for c in 0..C {
            wv[c] = W::load16_avx512(w[c].as_ptr().add(at));
        }
        for r in 0..R {
            let xv = x86::_mm512_loadu_ps(x[r].as_ptr().add(at));
            for c in 0..C {
                acc[r][c] = x86::_mm512_fmadd_ps(xv, wv[c], acc[r][c]);
            }
        }
        at += LANES;
    }
    if full < k {
        for c in 0..C {
            wv[c] = W::load16_avx512(padded_tail(w[c], full).as_ptr());
        }
        for r in 0..R {
            let xv = x86::_mm512_loadu_ps(padded_tail(&x[r][..k], full).as_ptr());
            for c in 0..C {
                acc[r][c] = x86::_mm512_fmadd_ps(xv, wv[c], acc[r][c]);
            }
        }
    }
    let mut out = [[0.0f32; C]; R];
    for r in 0..R {
        for c in 0..C {
            let a = acc[r][c];
            let (lo, hi) = (
                x86::_mm512_castps512_ps256(a),
                x86::_mm512_extractf32x8_ps::<1>(a),
            );
            out[r][c] = sum_lanes_avx(x86::_mm256_add_ps(lo, hi));
        }
    }
    out
}

/// [`dots`] with AVX2: two registers (lanes 0–7, 8–15) a product.
///
/// # Safety
/// AVX2 and FMA available; every `x[r]` and `w[c]` at least `w[0].len()` long.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn dots_avx2<W: Lane + Default, const R: usize, const C: usize>(
    x: &[&[f32]; R],
    w: &[&[W]; C],
) -> [[f32; C]; R] {
    let k = w[0].len();
    let zero = x86::_mm256_setzero_ps();
    let (mut lo, mut hi) = ([[zero; C]; R], [[zero; C]; R]);
    let (mut wl, mut wh) = ([zero; C], [zero; C]);
    let full = k / LANES * LANES;
    let mut at = 0;
    while at < full {
        for c in 0..C {
            wl[c] = W::load8_avx2(w[c].as_ptr().add(at));
            wh[c] = W::load8_avx2(w[c].as_ptr().add(at + 8));
        }
        for r in 0..R {
            let p = x[r].as_ptr().add(at);
            let (xl, xh) = (x86::_mm256_loadu_ps(p), x86::_mm256_loadu_ps(p.add(8)));
            for c in 0..C {
                lo[r][c] = x86::_mm256_fmadd_ps(xl, wl[c], lo[r][c]);
                hi[r][c] = x86::_mm256_fmadd_ps(xh, wh[c], hi[r][c]);
            }
        }
        at += LANES;
    }
    if full < k {
        for c in 0..C {
            let t = padded_tail(w[c], full);
            wl[c] = W::load8_avx2(t.as_ptr());
            wh[c] = W::load8_avx2(t.as_ptr().add(8));
        }
        for r in 0..R {
            let t = padded_tail(&x[r][..k], full);
            let (xl, xh) = (
                x86::_mm256_loadu_ps(t.as_ptr()),
                x86::_mm256_loadu_ps(t.as_ptr().add(8)),
            );
            for c in 0..C {
                lo[r][c] = x86::_mm256_fmadd_ps(xl, wl[c], lo[r][c]);
                hi[r][c] = x86::_mm256_fmadd_ps(xh, wh[c], hi[r][c]);
            }
        }
    }
    let mut out = [[0.0f32; C]; R];
    for r in 0..R {
        for c in 0..C {
            out[r][c] = sum_lanes_avx(x86::_mm256_add_ps(lo[r][c], hi[r][c]));
        }
    }
    out
}

/// One of the three versions of [`dots`].
pub(super) trait Dots: Sync {
    /// # Safety
    /// The version's instruction set is available; every `x[r]` at least `w.len()` long.
    unsafe fn dots<W: Lane + Default, const R: usize, const C: usize>(
        x: &[&[f32]; R],
        w: &[&[W]; C],
    ) -> [[f32; C]; R];
}

pub(super) struct PortableDots;
impl Dots for PortableDots {
    #[inline(always)]
    unsafe fn dots<W: Lane + Default, const R: usize, const C: usize>(
        x: &[&[f32]; R],
        w: &[&[W]; C],
    ) -> [[f32; C]; R] {
        dots(x, w)
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) struct Avx512Dots;
#[cfg(target_arch = "x86_64")]
impl Dots for Avx512Dots {
    #[inline(always)]
    unsafe fn dots<W: Lane + Default, const R: usize, const C: usize>(
        x: &[&[f32]; R],
        w: &[&[W]; C],
    ) -> [[f32; C]; R] {
        dots_avx512(x, w)
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) struct Avx2Dots;
#[cfg(target_arch = "x86_64")]
impl Dots for Avx2Dots {
    #[inline(always)]
    unsafe fn dots<W: Lane + Default, const R: usize, const C: usize>(
        x: &[&[f32]; R],
        w: &[&[W]; C],
    ) -> [[f32; C]; R] {
        dots_avx2(x, w)
    }
}

/// A block of outputs of f32 inputs times weight rows of `W`, with the dots of `D`.
pub(super) struct FloatBlock<'a, W, D> {
    /// `[rows, ≥ k]`, rows `ldx` apart.
    pub x: &'a [f32],
    pub ldx: usize,
    /// `[n, k]`.
    pub w: &'a [W],
    pub k: usize,
    pub dots: PhantomData<D>,
}

impl<W: Lane + Default, D: Dots> Block for FloatBlock<'_, W, D> {
    #[inline(always)]
    unsafe fn block<const R: usize, const C: usize>(&self, i: usize, j: usize) -> [[f32; C]; R] {
        let k = self.k;
        let xs: [&[f32]; R] = core::array::from_fn(|d| &self.x[(i + d) * self.ldx..][..k]);
        let ws: [&[W]; C] = core::array::from_fn(|d| &self.w[(j + d) * k..][..k]);
        D::dots(&xs, &ws)
    }
}
