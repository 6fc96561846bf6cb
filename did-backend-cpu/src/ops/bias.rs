//! Bias: `y += b` per row, and its backward `db += Σ_rows dy`.

use rayon::prelude::*;

use super::{column_sums, ROW_CHUNK};
use crate::CpuFloat;

/// `x[r, c] += bias[c]` for the first `cols` elements of each row, rows `stride` apart (the
/// last row may end at `cols`).
pub fn bias_add<T: CpuFloat>(x: &mut [T], bias: &[T], cols: usize, stride: usize) {
    if cols == 0 {
        return;
    }
    let stride = stride.max(cols);
    let add = |rows: &mut [T]| {
        for row in rows.chunks_mut(stride) {
            for (y, &b) in row[..cols].iter_mut().zip(bias) {
                *y += b;
            }
        }
    };
    if x.len() < super::PARALLEL_MIN {
        add(x);
    } else {
        x.par_chunks_mut(stride * ROW_CHUNK).for_each(add);
    }
}

/// `dbias[c] += Σ_r dy[r, c]` over `rows` rows `stride` apart, summed in a fixed order.
pub fn bias_backward<T: CpuFloat>(
    dy: &[T],
    dbias: &mut [T],
    rows: usize,
    cols: usize,
    stride: usize,
) {
    if cols == 0 {
        return;
    }
    let stride = stride.max(cols);
    let sums = column_sums(rows, cols, |r, acc: &mut [T]| {
        for (a, &d) in acc.iter_mut().zip(&dy[r * stride..r * stride + cols]) {
            *a += d;
        }
    });
    for (d, s) in dbias.iter_mut().zip(sums) {
        *d += s;
    }
}
