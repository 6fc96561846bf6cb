//! Bias: `y += b` per row, and its backward `db += Σ_rows dy`.

use rayon::prelude::*;

use super::{column_sums, ROW_CHUNK};
use crate::CpuFloat;

/// `x[r, c] += bias[c]`.
pub fn bias_add<T: CpuFloat>(x: &mut [T], bias: &[T], cols: usize) {
    if cols == 0 {
        return;
    }
    x.par_chunks_mut(cols * ROW_CHUNK).for_each(|rows| {
        for row in rows.chunks_mut(cols) {
            for (y, &b) in row.iter_mut().zip(bias) {
                *y += b;
            }
        }
    });
}

/// `dbias[c] += Σ_r dy[r, c]`, summed in a fixed order.
pub fn bias_backward<T: CpuFloat>(dy: &[T], dbias: &mut [T], cols: usize) {
    if cols == 0 {
        return;
    }
    let rows = dy.len() / cols;
    let sums = column_sums(rows, cols, |r, acc: &mut [T]| {
        for (a, &d) in acc.iter_mut().zip(&dy[r * cols..(r + 1) * cols]) {
            *a += d;
        }
    });
    for (d, s) in dbias.iter_mut().zip(sums) {
        *d += s;
    }
}
