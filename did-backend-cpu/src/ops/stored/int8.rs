//! The products of int8 weight rows with input rows quantized to int8 as the call starts (one
//! symmetric scale a row, like the weights'): integer dot products, exact in i32 whatever the
//! order, then `scale_w · (scale_x · dot)` in f32. With AVX-512 VNNI one instruction does 64
//! multiply-adds (four times an f32 FMA's sixteen), which is what lets a draft call of four
//! rows keep up with the memory that streams its weights.

use super::Block;

#[cfg(target_arch = "x86_64")]
use core::arch::x86_64 as x86;

/// The widest row a dot product may have: `255 · 127 · k` stays below 2³¹ (VNNI multiplies
/// offset inputs, `q + 128`, by the weights).
pub const MAX_COLS: usize = 66_000;

/// Bytes a quantized row is padded to (a VNNI step); weight matrices keep that many zero bytes
/// after their last row so a step may read past a row's end (into inputs that are zero there).
pub(super) const STEP: usize = 64;

/// `x` rows (`[rows, ≥ k]`, `ldx` apart) quantized: `q = round(x / s)` with `s = max|x| / 127`
/// a row, each row padded with zeros to a multiple of [`STEP`]; `offset` holds `q + 128` for
/// the VNNI kernel (zeros in the padding, so that it adds nothing there either).
pub(super) struct QuantizedRows {
    pub q: Vec<i8>,
    pub offset: Vec<u8>,
    pub scale: Vec<f32>,
    /// Padded row length.
    pub width: usize,
}

impl QuantizedRows {
    pub fn new(x: &[f32], ldx: usize, rows: usize, k: usize, with_offset: bool) -> Self {
        let width = k.next_multiple_of(STEP);
        let mut q = vec![0i8; rows * width];
        let mut offset = if with_offset {
            vec![0u8; rows * width]
        } else {
            Vec::new()
        };
        let mut scale = Vec::with_capacity(rows);
        for i in 0..rows {
            let row = &x[i * ldx..i * ldx + k];
            let (s, inv) = symmetric_scale(row);
            scale.push(s);
            let out = &mut q[i * width..i * width + k];
            for (o, &v) in out.iter_mut().zip(row) {
                *o = quantize(v, inv);
            }
            if with_offset {
                for (o, &v) in offset[i * width..i * width + k].iter_mut().zip(out.iter()) {
                    *o = (i16::from(v) + 128) as u8;
                }
            }
        }
        QuantizedRows {
            q,
            offset,
            scale,
            width,
        }
    }
}

/// A row's symmetric int8 scale (its largest magnitude over 127) and that scale's inverse (0 for
/// a row of zeros).
pub(super) fn symmetric_scale(row: &[f32]) -> (f32, f32) {
    let max = row.iter().fold(0.0f32, |m, &v| m.max(v.abs()));
    let s = max / 127.0;
    (s, if s > 0.0 { 1.0 / s } else { 0.0 })
}

/// `v / s` rounded to the nearest integer (halves away from zero), in `-127..=127`.
pub(super) fn quantize(v: f32, inv: f32) -> i8 {
    (v * inv).round().clamp(-127.0, 127.0) as i8
}

/// The integer dot products of one version: `R` quantized input rows by `C` weight rows, each
/// slice [`STEP`]-padded (`x`) or followed by readable bytes (`w`), `steps` steps long.
pub(super) trait IntDots: Sync {
    /// Whether the version reads the offset inputs (`q + 128`).
    const OFFSET: bool;
    /// `ahead`: bytes from each weight row to the row a later block reads, fetched meanwhile
    /// (a hint: nothing is read there).
    ///
    /// # Safety
    /// The version's instruction set is available; every row readable for `steps · STEP` bytes.
    unsafe fn dots<const R: usize, const C: usize>(
        x: &[*const i8; R],
        w: &[*const i8; C],
        steps: usize,
        ahead: usize,
    ) -> [[i32; C]; R];
}

pub(super) struct PortableInt;
impl IntDots for PortableInt {
    const OFFSET: bool = false;
    #[inline(always)]
    unsafe fn dots<const R: usize, const C: usize>(
        x: &[*const i8; R],
        w: &[*const i8; C],
        steps: usize,
        ahead: usize,
    ) -> [[i32; C]; R] {
        let _ = ahead;
        let mut acc = [[0i32; C]; R];
        for l in 0..steps * STEP {
            for r in 0..R {
                let xv = i32::from(*x[r].add(l));
                for c in 0..C {
                    acc[r][c] += xv * i32::from(*w[c].add(l));
                }
            }
        }
        acc
    }
}

/// AVX-512 VNNI: `vpdpbusd` multiplies the offset inputs (unsigned) by the weights (signed),
/// 64 pairs an instruction; the offset's share, `128 · Σ w`, comes off at the end.
#[cfg(target_arch = "x86_64")]
pub(super) struct VnniInt;
#[cfg(target_arch = "x86_64")]
impl IntDots for VnniInt {
    const OFFSET: bool = true;
    #[inline(always)]
    unsafe fn dots<const R: usize, const C: usize>(
        x: &[*const i8; R],
        w: &[*const i8; C],
        steps: usize,
        ahead: usize,
    ) -> [[i32; C]; R] {
        let mut acc = [[x86::_mm512_setzero_si512(); C]; R];
        let mut wv = [x86::_mm512_setzero_si512(); C];
        for s in 0..steps {
            for c in 0..C {
                let at = w[c].add(s * STEP);
                x86::_mm_prefetch::<{ x86::_MM_HINT_T0 }>(at.wrapping_add(ahead));
                wv[c] = x86::_mm512_loadu_si512(at.cast());
            }
            for r in 0..R {
                let xv = x86::_mm512_loadu_si512(x[r].add(s * STEP).cast());
                for c in 0..C {
                    acc[r][c] = x86::_mm512_dpbusd_epi32(acc[r][c], xv, wv[c]);
                }
            }
        }
        sums_avx512(&acc)
    }
}

/// The lane sums of `R × C` accumulators (integers: any order gives the same), four of a row at
/// once by two interleaving adds.
///
/// # Safety
/// AVX-512F available.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn sums_avx512<const R: usize, const C: usize>(
    acc: &[[x86::__m512i; C]; R],
) -> [[i32; C]; R] {
    let mut out = [[0i32; C]; R];
    for r in 0..R {
        let mut c = 0;
        while c + 4 <= C {
            let [a, b, d, e] = [acc[r][c], acc[r][c + 1], acc[r][c + 2], acc[r][c + 3]];
            let ab = x86::_mm512_add_epi32(
                x86::_mm512_unpacklo_epi32(a, b),
                x86::_mm512_unpackhi_epi32(a, b),
            );
            let de = x86::_mm512_add_epi32(
                x86::_mm512_unpacklo_epi32(d, e),
                x86::_mm512_unpackhi_epi32(d, e),
            );
            // Each 128-bit lane now holds partial sums of a, b, d, e in that order.
            let lanes = x86::_mm512_add_epi32(
                x86::_mm512_unpacklo_epi64(ab, de),
                x86::_mm512_unpackhi_epi64(ab, de),
            );
            let half = x86::_mm256_add_epi32(
                x86::_mm512_castsi512_si256(lanes),
                x86::_mm512_extracti64x4_epi64::<1>(lanes),
            );
            let quarter = x86::_mm_add_epi32(
                x86::_mm256_castsi256_si128(half),
                x86::_mm256_extracti128_si256::<1>(half),
            );
            let mut four = [0i32; 4];
            x86::_mm_storeu_si128(four.as_mut_ptr().cast(), quarter);
            out[r][c..c + 4].copy_from_slice(&four);
            c += 4;
        }
        while c < C {
            out[r][c] = x86::_mm512_reduce_add_epi32(acc[r][c]);
            c += 1;
        }
    }
    out
}

/// AVX-512BW without VNNI: both sides widened to i16, `vpmaddwd` (32 pairs an instruction).
#[cfg(target_arch = "x86_64")]
pub(super) struct Avx512Int;
#[cfg(target_arch = "x86_64")]
impl IntDots for Avx512Int {
    const OFFSET: bool = false;
    #[inline(always)]
    unsafe fn dots<const R: usize, const C: usize>(
        x: &[*const i8; R],
        w: &[*const i8; C],
        steps: usize,
        ahead: usize,
    ) -> [[i32; C]; R] {
        let mut acc = [[x86::_mm512_setzero_si512(); C]; R];
        let mut wv = [x86::_mm512_setzero_si512(); C];
        for half in 0..steps * 2 {
            let at = half * 32;
            for c in 0..C {
                x86::_mm_prefetch::<{ x86::_MM_HINT_T0 }>(w[c].add(at).wrapping_add(ahead));
                wv[c] = x86::_mm512_cvtepi8_epi16(x86::_mm256_loadu_si256(w[c].add(at).cast()));
            }
            for r in 0..R {
                let xv = x86::_mm512_cvtepi8_epi16(x86::_mm256_loadu_si256(x[r].add(at).cast()));
                for c in 0..C {
                    acc[r][c] = x86::_mm512_add_epi32(acc[r][c], x86::_mm512_madd_epi16(xv, wv[c]));
                }
            }
        }
        sums_avx512(&acc)
    }
}

/// AVX2: both sides widened to i16, `vpmaddwd` (16 pairs an instruction).
#[cfg(target_arch = "x86_64")]
pub(super) struct Avx2Int;
#[cfg(target_arch = "x86_64")]
impl IntDots for Avx2Int {
    const OFFSET: bool = false;
    #[inline(always)]
    unsafe fn dots<const R: usize, const C: usize>(
        x: &[*const i8; R],
        w: &[*const i8; C],
        steps: usize,
        ahead: usize,
    ) -> [[i32; C]; R] {
        let _ = ahead;
        let mut acc = [[x86::_mm256_setzero_si256(); C]; R];
        let mut wv = [x86::_mm256_setzero_si256(); C];
        for quarter in 0..steps * 4 {
            let at = quarter * 16;
            for c in 0..C {
                wv[c] = x86::_mm256_cvtepi8_epi16(x86::_mm_loadu_si128(w[c].add(at).cast()));
            }
            for r in 0..R {
                let xv = x86::_mm256_cvtepi8_epi16(x86::_mm_loadu_si128(x[r].add(at).cast()));
                for c in 0..C {
                    acc[r][c] = x86::_mm256_add_epi32(acc[r][c], x86::_mm256_madd_epi16(xv, wv[c]));
                }
            }
        }
        let mut out = [[0i32; C]; R];
        for r in 0..R {
            for c in 0..C {
                let a = acc[r][c];
                let s4 = x86::_mm_add_epi32(
                    x86::_mm256_castsi256_si128(a),
                    x86::_mm256_extracti128_si256::<1>(a),
                );
                let s2 = x86::_mm_add_epi32(s4, x86::_mm_unpackhi_epi64(s4, s4));
                let s1 = x86::_mm_add_epi32(s2, x86::_mm_shuffle_epi32::<1>(s2));
                out[r][c] = x86::_mm_cvtsi128_si32(s1);
            }
        }
        out
    }
}

/// A block of outputs of quantized inputs times int8 weight rows, with the dots of `D`.
pub(super) struct Int8Block<'a, D> {
    pub x: &'a QuantizedRows,
    /// `[n, k]`, followed by [`STEP`] readable bytes.
    pub w: &'a [i8],
    pub k: usize,
    /// `[n]`.
    pub w_scale: &'a [f32],
    /// `[n]`: `Σ_c w[j][c]`, for the VNNI kernel's offset.
    pub w_sum: &'a [i32],
    pub dots: core::marker::PhantomData<D>,
}

impl<D: IntDots> Block for Int8Block<'_, D> {
    #[inline(always)]
    unsafe fn block<const R: usize, const C: usize>(&self, i: usize, j: usize) -> [[f32; C]; R] {
        let (x, k) = (self.x, self.k);
        let xs: [*const i8; R] = core::array::from_fn(|d| {
            if D::OFFSET {
                x.offset[(i + d) * x.width..].as_ptr().cast()
            } else {
                x.q[(i + d) * x.width..].as_ptr()
            }
        });
        let ws: [*const i8; C] = core::array::from_fn(|d| self.w[(j + d) * k..].as_ptr());
        // The next block of weight rows, fetched while this one computes.
        let dots = D::dots(&xs, &ws, x.width / STEP, 32768);
        let mut out = [[0.0f32; C]; R];
        for r in 0..R {
            for c in 0..C {
                let dot = if D::OFFSET {
                    dots[r][c] - 128 * self.w_sum[j + c]
                } else {
                    dots[r][c]
                };
                out[r][c] = self.w_scale[j + c] * (x.scale[i + r] * dot as f32);
            }
        }
        out
    }
}
