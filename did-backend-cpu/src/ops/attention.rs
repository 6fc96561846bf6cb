//! Masked multi-head attention, forward and backward, without an L × L
//! matrix in memory.
//!
//! Work is split over (sequence, head) on rayon. Inside one, queries go in
//! tiles of at most [`TILE`] rows; a tile visits only the key ranges its
//! queries may see (from [`AttentionMask::key_ranges`], so empty tiles of the
//! mask are never touched), computes the scores with one GEMM per range, and
//! applies the mask element-wise only when its queries do not all share the
//! same ranges (one "run" of the mask). The backward recomputes the
//! probabilities from the saved log-sum-exp, as flash attention does.

use core::ops::Range;

use did_core::backend::{AttentionShape, Gemm, QkvOffsets};
use did_core::mask::AttentionMask;
use rayon::prelude::*;

use crate::CpuFloat;

mod few_queries;

/// Most query rows per tile.
pub const TILE: usize = 64;
/// A run shorter than this is merged with its neighbours into one masked tile.
const MIN_RUN: usize = 8;

/// One tile of queries and the key columns it computes.
struct Tile {
    rows: Range<usize>,
    /// Disjoint ascending key ranges; the tile's score columns are their concatenation.
    segments: Vec<Range<usize>>,
    /// Every row sees exactly `segments`: no element-wise mask.
    uniform: bool,
}

impl Tile {
    fn columns(&self) -> usize {
        self.segments.iter().map(|r| r.len()).sum()
    }
}

fn clip(r: &Range<usize>, kv_len: usize) -> Range<usize> {
    r.start.min(kv_len)..r.end.min(kv_len)
}

/// The tiles of one (sequence, head): identical for every sequence and head.
fn tiles(mask: &AttentionMask, q_len: usize, kv_len: usize) -> Vec<Tile> {
    let mut out = Vec::new();
    let mut q0 = 0;
    while q0 < q_len {
        let run_end = mask.run_end(q0).min(q_len);
        let long_run = run_end - q0 >= MIN_RUN;
        let q1 = if long_run {
            run_end.min(q0 + TILE)
        } else {
            (q0 + TILE).min(q_len)
        };
        let uniform = run_end >= q1;
        // Union of each range slot over the rows, then merged where they touch.
        let mut slots: [Option<Range<usize>>; 2] = [None, None];
        for q in q0..q1 {
            for (slot, r) in slots.iter_mut().zip(mask.key_ranges(q).ranges.iter()) {
                let r = clip(r, kv_len);
                if r.is_empty() {
                    continue;
                }
                *slot = Some(match slot.take() {
                    Some(s) => s.start.min(r.start)..s.end.max(r.end),
                    None => r,
                });
            }
            if uniform {
                break; // the rows of a run share their ranges
            }
        }
        let mut segments: Vec<Range<usize>> = slots.into_iter().flatten().collect();
        segments.sort_by_key(|r| r.start);
        let mut merged: Vec<Range<usize>> = Vec::new();
        for r in segments {
            match merged.last_mut() {
                Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
                _ => merged.push(r),
            }
        }
        out.push(Tile {
            rows: q0..q1,
            segments: merged,
            uniform,
        });
        q0 = q1;
    }
    out
}

/// Where one (sequence, head)'s operands start.
#[derive(Clone, Copy)]
struct HeadBase {
    q: usize,
    k: usize,
    v: usize,
}

fn head_base(s: &AttentionShape, b: usize, h: usize) -> HeadBase {
    HeadBase {
        q: b * s.q_batch_stride + h * s.head_dim,
        k: b * s.kv_batch_stride + h * s.head_dim,
        v: b * s.kv_batch_stride + h * s.head_dim,
    }
}

/// `c[m×n] (row stride ldc) = alpha·a·b + beta·c`, through the backend's one GEMM helper.
#[allow(clippy::too_many_arguments)]
fn small_gemm<T: CpuFloat>(
    m: usize,
    k: usize,
    n: usize,
    alpha: T,
    a: &[T],
    (rsa, csa): (usize, usize),
    b: &[T],
    (rsb, csb): (usize, usize),
    beta: T,
    c: &mut [T],
    ldc: usize,
) {
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    // A (row stride, column stride) pair is a row-major matrix or a transposed one.
    let layout = |(rs, cs): (usize, usize)| if cs == 1 { (false, rs) } else { (true, cs) };
    let ((trans_a, lda), (trans_b, ldb)) = (layout((rsa, csa)), layout((rsb, csb)));
    let g = Gemm {
        trans_a,
        trans_b,
        m,
        n,
        k,
        lda,
        ldb,
        ldc,
        batch: 1,
        stride_a: 0,
        stride_b: 0,
        stride_c: 0,
        alpha: alpha.to_f32_lossy(),
        beta: beta.to_f32_lossy(),
    };
    let (na, nb, nc) = g.extents();
    assert!(
        a.len() >= na && b.len() >= nb && c.len() >= nc,
        "attention tile GEMM out of bounds"
    );
    // One output matrix: the helper's only error (overlapping outputs) cannot occur.
    let _ = super::gemm::gemm(&g, a, b, c);
}

/// Sets to −∞ the scores of `tile`'s rows that their own ranges exclude.
fn apply_mask<T: CpuFloat>(mask: &AttentionMask, tile: &Tile, kv_len: usize, scores: &mut [T]) {
    if tile.uniform {
        return;
    }
    let cols = tile.columns();
    for (i, q) in tile.rows.clone().enumerate() {
        let ranges = mask.key_ranges(q);
        let row = &mut scores[i * cols..(i + 1) * cols];
        let mut col = 0;
        for seg in &tile.segments {
            for k in seg.clone() {
                let allowed = ranges.ranges.iter().any(|r| clip(r, kv_len).contains(&k));
                if !allowed {
                    row[col] = T::neg_infinity();
                }
                col += 1;
            }
        }
    }
}

/// `scores[rows × cols] = scale · Q_tile · K_segmentsᵀ`.
fn tile_scores<T: CpuFloat>(
    s: &AttentionShape,
    tile: &Tile,
    base: HeadBase,
    q: &[T],
    k: &[T],
    scores: &mut [T],
) {
    let cols = tile.columns();
    let rows = tile.rows.len();
    let scale = T::of_f32(s.scale);
    let mut col = 0;
    for seg in &tile.segments {
        small_gemm(
            rows,
            s.head_dim,
            seg.len(),
            scale,
            &q[base.q + tile.rows.start * s.q_stride..],
            (s.q_stride, 1),
            &k[base.k + seg.start * s.k_stride..],
            (1, s.k_stride),
            T::zero(),
            &mut scores[col..],
            cols,
        );
        col += seg.len();
    }
}

/// Most queries a (sequence, head) may have for [`forward`] to take them key by key
/// ([`few_queries`]): a draft call's block of 4 over a long KV cache.
const FEW_QUERIES: usize = 8;

/// Softmax of each of the `rows` score rows (`cols` wide) in place; the row's log-sum-exp into
/// `lse[row]` (a row that sees no key gets zeros and keeps its `lse`).
fn softmax_rows<T: CpuFloat>(scores: &mut [T], rows: usize, cols: usize, lse: &mut [T]) {
    for i in 0..rows {
        let row = &mut scores[i * cols..(i + 1) * cols];
        let m = row.iter().copied().fold(T::neg_infinity(), T::max);
        if m == T::neg_infinity() {
            row.fill(T::zero());
            continue;
        }
        let mut sum = T::zero();
        for x in row.iter_mut() {
            *x = (*x - m).exp();
            sum += *x;
        }
        let inv = T::one() / sum;
        for x in row.iter_mut() {
            *x *= inv;
        }
        lse[i] = m + sum.ln();
    }
}

/// The forward: `out = softmax(scale·q·kᵀ + mask)·v`, `lse` per (sequence, head, query).
pub fn forward<T: CpuFloat>(
    s: &AttentionShape,
    mask: &AttentionMask,
    q: &[T],
    k: &[T],
    v: &[T],
    out: &mut [T],
    lse: &mut [T],
) {
    let d = s.head_dim;
    if s.batch == 0 || s.heads == 0 || s.q_len == 0 || d == 0 {
        return;
    }
    let tiles = tiles(mask, s.q_len, s.kv_len);
    if s.q_len <= FEW_QUERIES {
        return few_queries::forward(s, mask, &tiles, q, k, v, out, lse);
    }
    forward_by_tiles(s, mask, &tiles, q, k, v, out, lse);
}

/// [`forward`] by GEMMs over tiles of queries.
#[allow(clippy::too_many_arguments)]
fn forward_by_tiles<T: CpuFloat>(
    s: &AttentionShape,
    mask: &AttentionMask,
    tiles: &[Tile],
    q: &[T],
    k: &[T],
    v: &[T],
    out: &mut [T],
    lse: &mut [T],
) {
    let (d, width) = (s.head_dim, s.heads * s.head_dim);
    // Each task produces its head's [q_len, d] output and [q_len] lse; scattered below.
    let results: Vec<(Vec<T>, Vec<T>)> = (0..s.batch * s.heads)
        .into_par_iter()
        .map(|bh| {
            let (b, h) = (bh / s.heads, bh % s.heads);
            let base = head_base(s, b, h);
            let mut o = vec![T::zero(); s.q_len * d];
            let mut l = vec![T::neg_infinity(); s.q_len];
            let mut scores = Vec::new();
            for tile in tiles {
                let (rows, cols) = (tile.rows.len(), tile.columns());
                if cols == 0 {
                    continue;
                }
                scores.clear();
                scores.resize(rows * cols, T::zero());
                tile_scores(s, tile, base, q, k, &mut scores);
                apply_mask(mask, tile, s.kv_len, &mut scores);
                softmax_rows(&mut scores, rows, cols, &mut l[tile.rows.start..]);
                let mut col = 0;
                for seg in &tile.segments {
                    small_gemm(
                        rows,
                        seg.len(),
                        d,
                        T::one(),
                        &scores[col..],
                        (cols, 1),
                        &v[base.v + seg.start * s.v_stride..],
                        (s.v_stride, 1),
                        T::one(),
                        &mut o[tile.rows.start * d..],
                        d,
                    );
                    col += seg.len();
                }
            }
            (o, l)
        })
        .collect();
    for (bh, (o, l)) in results.into_iter().enumerate() {
        let (b, h) = (bh / s.heads, bh % s.heads);
        for t in 0..s.q_len {
            out[(b * s.q_len + t) * width + h * d..][..d].copy_from_slice(&o[t * d..(t + 1) * d]);
        }
        lse[bh * s.q_len..(bh + 1) * s.q_len].copy_from_slice(&l);
    }
}

/// The backward: writes the gradients of q, k and v into `grads`, each laid out like its
/// input from its offset in `at`.
#[allow(clippy::too_many_arguments)]
pub fn backward<T: CpuFloat>(
    s: &AttentionShape,
    mask: &AttentionMask,
    dout: &[T],
    q: &[T],
    k: &[T],
    v: &[T],
    out: &[T],
    lse: &[T],
    grads: &mut [T],
    at: QkvOffsets,
) {
    let (d, width) = (s.head_dim, s.heads * s.head_dim);
    if s.batch == 0 || s.heads == 0 || s.q_len == 0 || d == 0 {
        return;
    }
    let tiles = tiles(mask, s.q_len, s.kv_len);
    let scale = T::of_f32(s.scale);
    type Grads<T> = (Vec<T>, Vec<T>, Vec<T>);
    let results: Vec<Grads<T>> = (0..s.batch * s.heads)
        .into_par_iter()
        .map(|bh| {
            let (b, h) = (bh / s.heads, bh % s.heads);
            let base = head_base(s, b, h);
            let obase = b * s.q_len * width + h * d;
            let mut gq = vec![T::zero(); s.q_len * d];
            let mut gk = vec![T::zero(); s.kv_len * d];
            let mut gv = vec![T::zero(); s.kv_len * d];
            let (mut p, mut dp) = (Vec::new(), Vec::new());
            for tile in &tiles {
                let (rows, cols) = (tile.rows.len(), tile.columns());
                if cols == 0 {
                    continue;
                }
                p.clear();
                p.resize(rows * cols, T::zero());
                dp.clear();
                dp.resize(rows * cols, T::zero());
                tile_scores(s, tile, base, q, k, &mut p);
                apply_mask(mask, tile, s.kv_len, &mut p);
                // dP = dO·Vᵀ
                let mut col = 0;
                for seg in &tile.segments {
                    small_gemm(
                        rows,
                        d,
                        seg.len(),
                        T::one(),
                        &dout[obase + tile.rows.start * width..],
                        (width, 1),
                        &v[base.v + seg.start * s.v_stride..],
                        (1, s.v_stride),
                        T::zero(),
                        &mut dp[col..],
                        cols,
                    );
                    col += seg.len();
                }
                // P = exp(S − lse); dS = P ∘ (dP − rowsum(dO ∘ O)) · scale
                for i in 0..rows {
                    let qi = tile.rows.start + i;
                    let l = lse[bh * s.q_len + qi];
                    let prow = &mut p[i * cols..(i + 1) * cols];
                    let dprow = &mut dp[i * cols..(i + 1) * cols];
                    if l == T::neg_infinity() {
                        prow.fill(T::zero());
                        dprow.fill(T::zero());
                        continue;
                    }
                    let orow = &out[obase + qi * width..][..d];
                    let drow = &dout[obase + qi * width..][..d];
                    let delta: T = orow.iter().zip(drow).map(|(&a, &b)| a * b).sum();
                    for (x, g) in prow.iter_mut().zip(dprow.iter_mut()) {
                        *x = (*x - l).exp();
                        *g = *x * (*g - delta) * scale;
                    }
                }
                let mut col = 0;
                for seg in &tile.segments {
                    let n = seg.len();
                    // dQ += dS·K
                    small_gemm(
                        rows,
                        n,
                        d,
                        T::one(),
                        &dp[col..],
                        (cols, 1),
                        &k[base.k + seg.start * s.k_stride..],
                        (s.k_stride, 1),
                        T::one(),
                        &mut gq[tile.rows.start * d..],
                        d,
                    );
                    // dK += dSᵀ·Q
                    small_gemm(
                        n,
                        rows,
                        d,
                        T::one(),
                        &dp[col..],
                        (1, cols),
                        &q[base.q + tile.rows.start * s.q_stride..],
                        (s.q_stride, 1),
                        T::one(),
                        &mut gk[seg.start * d..],
                        d,
                    );
                    // dV += Pᵀ·dO
                    small_gemm(
                        n,
                        rows,
                        d,
                        T::one(),
                        &p[col..],
                        (1, cols),
                        &dout[obase + tile.rows.start * width..],
                        (width, 1),
                        T::one(),
                        &mut gv[seg.start * d..],
                        d,
                    );
                    col += n;
                }
            }
            (gq, gk, gv)
        })
        .collect();
    // Each gradient laid out like its input, from its offset in `grads`.
    let put = |grads: &mut [T], start: usize, g: &[T]| grads[start..start + d].copy_from_slice(g);
    for (bh, (gq, gk, gv)) in results.into_iter().enumerate() {
        let base = head_base(s, bh / s.heads, bh % s.heads);
        for t in 0..s.q_len {
            put(
                grads,
                at.q + base.q + t * s.q_stride,
                &gq[t * d..(t + 1) * d],
            );
        }
        for t in 0..s.kv_len {
            put(
                grads,
                at.k + base.k + t * s.k_stride,
                &gk[t * d..(t + 1) * d],
            );
            put(
                grads,
                at.v + base.v + t * s.v_stride,
                &gv[t * d..(t + 1) * d],
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A draft call's few queries over a KV cache (a window, a block mask, padding between
    /// rows): key by key gives the tiled GEMMs' outputs and log-sum-exps, to rounding.
    #[test]
    fn few_queries_key_by_key_equal_the_tiled_forward() {
        let (batch, heads, d, q_len, kv_len, capacity) = (3, 5, 24, 4, 70, 80);
        let s = AttentionShape::over_cache(batch, heads, d, q_len, kv_len, capacity);
        let values = |n: usize, seed: u32| -> Vec<f32> {
            (0..n)
                .map(|i| {
                    (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 1000) as f32 / 500.0 - 1.0
                })
                .collect()
        };
        let (q, kv) = (
            values(batch * q_len * 3 * heads * d, 1),
            values(batch * capacity * 2 * heads * d, 2),
        );
        for mask in [
            AttentionMask::BlockCausal {
                block_size: 4,
                query_offset: 66,
                key_offset: 0,
                window: None,
            },
            AttentionMask::BlockCausal {
                block_size: 4,
                query_offset: 66,
                key_offset: 0,
                window: Some(32),
            },
            AttentionMask::Full,
        ] {
            let tiles = tiles(&mask, q_len, kv_len);
            let (mut out, mut lse) = (
                vec![0.0f32; batch * q_len * heads * d],
                vec![0.0f32; batch * heads * q_len],
            );
            let (mut want, mut want_lse) = (out.clone(), lse.clone());
            few_queries::forward(
                &s,
                &mask,
                &tiles,
                &q,
                &kv,
                &kv[heads * d..],
                &mut out,
                &mut lse,
            );
            forward_by_tiles(
                &s,
                &mask,
                &tiles,
                &q,
                &kv,
                &kv[heads * d..],
                &mut want,
                &mut want_lse,
            );
            for (a, b) in out.iter().zip(&want).chain(lse.iter().zip(&want_lse)) {
                assert!(
                    (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                    "{mask:?}: {a} vs {b}"
                );
            }
        }
    }
}
