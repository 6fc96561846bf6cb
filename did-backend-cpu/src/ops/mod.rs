//! The ops, one module per family, forward and backward side by side. Each
//! works on plain slices that the [`crate::CpuBackend`] has bounds-checked.

pub mod activation;
pub mod attention;
pub mod bias;
pub mod cross_entropy;
pub mod draw;
pub mod embedding;
pub mod gemm;
pub mod layernorm;
pub mod modulate;
pub mod optim;
pub mod rope;
pub mod stored;

use rayon::prelude::*;

use crate::CpuFloat;

/// Elements below which a row-wise op runs on the calling thread: handing a draft call's few
/// rows to the pool costs more than computing them (each row's result is the same either way).
pub(crate) const PARALLEL_MIN: usize = 1 << 15;

/// Rows per work item of the row-parallel ops and of the fixed-order reductions.
pub(crate) const ROW_CHUNK: usize = 16;

/// Column sums that do not depend on the thread count: `f(row, acc)` adds
/// row `row`'s contribution to `acc[cols]`; rows are summed in fixed chunks,
/// then the chunks in order. Returns the total.
pub(crate) fn column_sums<T: CpuFloat>(
    rows: usize,
    cols: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) -> Vec<T> {
    let chunks = rows.div_ceil(ROW_CHUNK);
    let partials: Vec<Vec<T>> = (0..chunks)
        .into_par_iter()
        .map(|c| {
            let mut acc = vec![T::zero(); cols];
            for r in c * ROW_CHUNK..((c + 1) * ROW_CHUNK).min(rows) {
                f(r, &mut acc);
            }
            acc
        })
        .collect();
    let mut total = vec![T::zero(); cols];
    for p in partials {
        for (t, x) in total.iter_mut().zip(p) {
            *t += x;
        }
    }
    total
}
