//! LayerNorm over the last dimension (statistics in the compute type, eps inside the root).

use did_core::backend::NormShape;
use ndarray::{ArrayView1, ArrayView2, ArrayViewMut1, ArrayViewMut2, Axis, Zip};

use super::column_sums;
use crate::CpuFloat;

/// `out = (x − μ)·rstd·w (+ b)`, saving `mean` and `rstd` per row.
pub fn forward<T: CpuFloat>(
    s: &NormShape,
    x: &[T],
    w: &[T],
    b: Option<&[T]>,
    out: &mut [T],
    mean: &mut [T],
    rstd: &mut [T],
) {
    if s.rows == 0 || s.cols == 0 {
        return;
    }
    let x = ArrayView2::from_shape((s.rows, s.cols), x).expect("shape checked by the caller");
    let mut out =
        ArrayViewMut2::from_shape((s.rows, s.cols), out).expect("shape checked by the caller");
    let n = T::from_usize(s.cols).unwrap_or_else(T::one);
    let eps = T::of_f32(s.eps);
    let rows = Zip::from(x.axis_iter(Axis(0)))
        .and(out.axis_iter_mut(Axis(0)))
        .and(mean)
        .and(rstd);
    let row = |x: ArrayView1<'_, T>, mut out: ArrayViewMut1<'_, T>, mean: &mut T, rstd: &mut T| {
        let mu = x.iter().copied().sum::<T>() / n;
        let var = x.iter().map(|&v| (v - mu) * (v - mu)).sum::<T>() / n;
        let r = T::one() / (var + eps).sqrt();
        for (c, (o, &v)) in out.iter_mut().zip(x.iter()).enumerate() {
            let y = (v - mu) * r * w[c];
            *o = match b {
                Some(b) => y + b[c],
                None => y,
            };
        }
        *mean = mu;
        *rstd = r;
    };
    if s.rows * s.cols < super::PARALLEL_MIN {
        rows.for_each(row);
    } else {
        rows.par_for_each(row);
    }
}

/// Accumulates `dx` and `dweight` (llm.c's `layernorm_backward`).
#[allow(clippy::too_many_arguments)]
pub fn backward<T: CpuFloat>(
    s: &NormShape,
    dout: &[T],
    x: &[T],
    w: &[T],
    mean: &[T],
    rstd: &[T],
    dx: &mut [T],
    dw: &mut [T],
) {
    let (rows, cols) = (s.rows, s.cols);
    if rows == 0 || cols == 0 {
        return;
    }
    let n = T::from_usize(cols).unwrap_or_else(T::one);
    let dout2 = ArrayView2::from_shape((rows, cols), dout).expect("shape checked by the caller");
    let x2 = ArrayView2::from_shape((rows, cols), x).expect("shape checked by the caller");
    let mut dx2 = ArrayViewMut2::from_shape((rows, cols), dx).expect("shape checked by the caller");
    Zip::from(dx2.axis_iter_mut(Axis(0)))
        .and(dout2.axis_iter(Axis(0)))
        .and(x2.axis_iter(Axis(0)))
        .and(mean)
        .and(rstd)
        .par_for_each(|mut dx, dout, x, &mu, &r| {
            // dnorm = dout·w; dx = r·(dnorm − mean(dnorm) − x̂·mean(dnorm·x̂))
            let mut mean_d = T::zero();
            let mut mean_dx = T::zero();
            for c in 0..cols {
                let xhat = (x[c] - mu) * r;
                let dn = dout[c] * w[c];
                mean_d += dn;
                mean_dx += dn * xhat;
            }
            mean_d = mean_d / n;
            mean_dx = mean_dx / n;
            for c in 0..cols {
                let xhat = (x[c] - mu) * r;
                dx[c] += r * (dout[c] * w[c] - mean_d - xhat * mean_dx);
            }
        });
    let sums = column_sums(rows, cols, |row, acc: &mut [T]| {
        let (mu, r) = (mean[row], rstd[row]);
        let (x, d) = (
            &x[row * cols..(row + 1) * cols],
            &dout[row * cols..(row + 1) * cols],
        );
        for c in 0..cols {
            acc[c] += d[c] * (x[c] - mu) * r;
        }
    });
    for (d, s) in dw.iter_mut().zip(sums) {
        *d += s;
    }
}
