//! The forward of a few queries over many keys: a draft call's block of 4 over a long KV cache.
//! Its cost is reading the keys and values once; the GEMM path reads them head by head, a
//! head's 256 bytes at a time from rows kilobytes apart, and packs them first. Here a task
//! takes a group of adjacent heads of one sequence and walks the keys in order, so each key
//! row's slice for the group is one contiguous read, scores first, then the values.

use did_core::backend::AttentionShape;
use did_core::mask::AttentionMask;
use rayon::prelude::*;

use super::{apply_mask, softmax_rows, Tile};
use crate::ops::stored::Isa;
use crate::CpuFloat;

/// Key rows ahead of the one computed whose group slice is fetched meanwhile: a head group's
/// slice of a row is a kilobyte, rows several kilobytes apart, so the hardware's stream
/// prefetchers, which stop at page boundaries, do not see the next one coming.
const ROWS_AHEAD: usize = 6;

/// Asks for `len` elements from `at` of `data` (a hint; out-of-range parts are skipped).
#[inline(always)]
fn prefetch<T>(data: &[T], at: usize, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        let end = (at + len).min(data.len());
        let step = (64 / core::mem::size_of::<T>().max(1)).max(1);
        let mut i = at;
        while i < end {
            // SAFETY: a prefetch of an address inside `data` reads nothing and cannot fault.
            unsafe {
                core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(
                    data.as_ptr().add(i).cast(),
                )
            };
            i += step;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (data, at, len);
}

/// `Σ_l a[l]·b[l]` in sixteen partial sums added in a fixed order (it vectorises).
#[inline(always)]
fn dot<T: CpuFloat>(a: &[T], b: &[T]) -> T {
    let mut acc = [T::zero(); 16];
    let (ac, bc) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .fold(T::zero(), |t, (&x, &y)| t + x * y);
    for (x, y) in ac.zip(bc) {
        for l in 0..16 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().fold(tail, |t, &v| t + v)
}

/// One task's inputs: a sequence and a group of its heads.
struct Task<'a, T> {
    s: &'a AttentionShape,
    mask: &'a AttentionMask,
    tiles: &'a [Tile],
    q: &'a [T],
    k: &'a [T],
    v: &'a [T],
}

/// The task's heads' `[q_len, d]` outputs and `[q_len]` log-sum-exps, head after head.
#[inline(always)]
fn run<T: CpuFloat>(t: &Task<'_, T>, b: usize, heads: core::ops::Range<usize>) -> (Vec<T>, Vec<T>) {
    let (s, d, n) = (t.s, t.s.head_dim, t.s.q_len);
    let hs = heads.len();
    let mut o = vec![T::zero(); hs * n * d];
    let mut l = vec![T::neg_infinity(); hs * n];
    let mut scores = Vec::new();
    let group_at = heads.start * d;
    for tile in t.tiles {
        let (rows, cols) = (tile.rows.len(), tile.columns());
        if cols == 0 {
            continue;
        }
        // scores[h][row][col], the keys in the tile's order.
        scores.clear();
        scores.resize(hs * rows * cols, T::zero());
        let scale = T::of_f32(s.scale);
        let keys = tile.segments.iter().flat_map(|seg| seg.clone());
        for (col, key) in keys.enumerate() {
            let row_at = b * s.kv_batch_stride + key * s.k_stride;
            prefetch(t.k, row_at + ROWS_AHEAD * s.k_stride + group_at, hs * d);
            let key_row = &t.k[row_at..];
            for (hh, h) in heads.clone().enumerate() {
                let kh = &key_row[h * d..(h + 1) * d];
                for (i, qi) in tile.rows.clone().enumerate() {
                    let query = &t.q[b * s.q_batch_stride + qi * s.q_stride + h * d..][..d];
                    scores[(hh * rows + i) * cols + col] = scale * dot(query, kh);
                }
            }
        }
        for hh in 0..hs {
            let head_scores = &mut scores[hh * rows * cols..(hh + 1) * rows * cols];
            apply_mask(t.mask, tile, s.kv_len, head_scores);
            softmax_rows(head_scores, rows, cols, &mut l[hh * n + tile.rows.start..]);
        }
        let keys = tile.segments.iter().flat_map(|seg| seg.clone());
        for (col, key) in keys.enumerate() {
            let row_at = b * s.kv_batch_stride + key * s.v_stride;
            prefetch(t.v, row_at + ROWS_AHEAD * s.v_stride + group_at, hs * d);
            let value_row = &t.v[row_at..];
            for (hh, h) in heads.clone().enumerate() {
                let value = &value_row[h * d..(h + 1) * d];
                for i in 0..rows {
                    let p = scores[(hh * rows + i) * cols + col];
                    let o = &mut o[(hh * n + tile.rows.start + i) * d..][..d];
                    for (o, &x) in o.iter_mut().zip(value) {
                        *o += p * x;
                    }
                }
            }
        }
    }
    (o, l)
}

// The same arithmetic compiled for wider vectors (no multiply-add is fused: Rust does not
// contract `a * b + c`), so every version gives the same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq")]
fn run_avx512<T: CpuFloat>(
    t: &Task<'_, T>,
    b: usize,
    heads: core::ops::Range<usize>,
) -> (Vec<T>, Vec<T>) {
    run(t, b, heads)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn run_avx2<T: CpuFloat>(
    t: &Task<'_, T>,
    b: usize,
    heads: core::ops::Range<usize>,
) -> (Vec<T>, Vec<T>) {
    run(t, b, heads)
}

/// [`super::forward`] when every (sequence, head) has at most a few queries.
#[allow(clippy::too_many_arguments)]
pub(super) fn forward<T: CpuFloat>(
    s: &AttentionShape,
    mask: &AttentionMask,
    tiles: &[Tile],
    q: &[T],
    k: &[T],
    v: &[T],
    out: &mut [T],
    lse: &mut [T],
) {
    let (d, width, n) = (s.head_dim, s.heads * s.head_dim, s.q_len);
    // About two tasks a thread: a task's heads are one contiguous read of each key row. Each
    // head is computed alone, so the grouping does not change the results.
    let tasks_per_sequence = (2 * rayon::current_num_threads())
        .div_ceil(s.batch)
        .clamp(1, s.heads);
    let per_task = s.heads.div_ceil(tasks_per_sequence);
    let groups = s.heads.div_ceil(per_task);
    let heads_of = |g: usize| g * per_task..((g + 1) * per_task).min(s.heads);
    let task = Task {
        s,
        mask,
        tiles,
        q,
        k,
        v,
    };
    let isa = Isa::detect();
    let results: Vec<(Vec<T>, Vec<T>)> = (0..s.batch * groups)
        .into_par_iter()
        .map(|i| {
            let (b, heads) = (i / groups, heads_of(i % groups));
            match isa {
                // SAFETY: `Isa::detect` found the instruction set the version was compiled for.
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512Vnni | Isa::Avx512 => unsafe { run_avx512(&task, b, heads) },
                // SAFETY: as above.
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => unsafe { run_avx2(&task, b, heads) },
                _ => run(&task, b, heads),
            }
        })
        .collect();
    for (i, (o, l)) in results.into_iter().enumerate() {
        let b = i / groups;
        for (hh, h) in heads_of(i % groups).enumerate() {
            for t in 0..n {
                out[(b * n + t) * width + h * d..][..d]
                    .copy_from_slice(&o[(hh * n + t) * d..][..d]);
            }
            lse[(b * s.heads + h) * n..][..n].copy_from_slice(&l[hh * n..(hh + 1) * n]);
        }
    }
}
