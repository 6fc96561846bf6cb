//! adaLN: the modulation `x·(1 + scale) + shift` and the gated residual
//! `residual += gate·y`, with per-sequence vectors shared by its tokens.

use rayon::prelude::*;

use super::column_sums;
use crate::CpuFloat;

/// `out[b, t, c] = x·(1 + scale[b, c]) + shift[b, c]`.
pub fn forward<T: CpuFloat>(
    x: &[T],
    shift: &[T],
    scale: &[T],
    out: &mut [T],
    tokens: usize,
    channels: usize,
) {
    if channels == 0 || tokens == 0 {
        return;
    }
    let row = |(row, (o, x)): (usize, (&mut [T], &[T]))| {
        let b = row / tokens;
        let (sh, sc) = (
            &shift[b * channels..][..channels],
            &scale[b * channels..][..channels],
        );
        for c in 0..channels {
            o[c] = x[c] * (T::one() + sc[c]) + sh[c];
        }
    };
    if out.len() < super::PARALLEL_MIN {
        out.chunks_mut(channels)
            .zip(x.chunks(channels))
            .enumerate()
            .for_each(row);
    } else {
        out.par_chunks_mut(channels)
            .zip(x.par_chunks(channels))
            .enumerate()
            .for_each(row);
    }
}

/// `dx = dout·(1 + scale)` (written), `dscale[b] += Σ_t dout·x` (accumulated).
#[allow(clippy::too_many_arguments)]
pub fn backward<T: CpuFloat>(
    dout: &[T],
    x: &[T],
    scale: &[T],
    dx: &mut [T],
    dscale: &mut [T],
    tokens: usize,
    channels: usize,
) {
    if channels == 0 || tokens == 0 {
        return;
    }
    dx.par_chunks_mut(channels)
        .zip(dout.par_chunks(channels))
        .enumerate()
        .for_each(|(row, (dx, d))| {
            let sc = &scale[(row / tokens) * channels..][..channels];
            for c in 0..channels {
                dx[c] = d[c] * (T::one() + sc[c]);
            }
        });
    let batch = dout.len() / (tokens * channels);
    for b in 0..batch {
        let base = b * tokens * channels;
        let sums = column_sums(tokens, channels, |t, acc: &mut [T]| {
            let o = base + t * channels;
            for c in 0..channels {
                acc[c] += dout[o + c] * x[o + c];
            }
        });
        for (d, s) in dscale[b * channels..][..channels].iter_mut().zip(sums) {
            *d += s;
        }
    }
}

/// `residual[b, t, c] += gate[b, c]·y[b, t, c]` (gate 1 when absent).
pub fn gated_residual_forward<T: CpuFloat>(
    residual: &mut [T],
    y: &[T],
    gate: Option<&[T]>,
    tokens: usize,
    channels: usize,
) {
    if channels == 0 || tokens == 0 {
        return;
    }
    let row = |(row, (r, y)): (usize, (&mut [T], &[T]))| match gate {
        Some(g) => {
            let g = &g[(row / tokens) * channels..][..channels];
            for c in 0..channels {
                r[c] += g[c] * y[c];
            }
        }
        None => {
            for c in 0..channels {
                r[c] += y[c];
            }
        }
    };
    if residual.len() < super::PARALLEL_MIN {
        residual
            .chunks_mut(channels)
            .zip(y.chunks(channels))
            .enumerate()
            .for_each(row);
    } else {
        residual
            .par_chunks_mut(channels)
            .zip(y.par_chunks(channels))
            .enumerate()
            .for_each(row);
    }
}

/// `dy = gate·dresidual` (written), `dgate[b] += Σ_t dresidual·y` (accumulated).
pub fn gated_residual_backward<T: CpuFloat>(
    dres: &[T],
    y: &[T],
    gate: Option<&[T]>,
    dy: &mut [T],
    dgate: Option<&mut [T]>,
    tokens: usize,
    channels: usize,
) {
    if channels == 0 || tokens == 0 {
        return;
    }
    dy.par_chunks_mut(channels)
        .zip(dres.par_chunks(channels))
        .enumerate()
        .for_each(|(row, (dy, d))| match gate {
            Some(g) => {
                let g = &g[(row / tokens) * channels..][..channels];
                for c in 0..channels {
                    dy[c] = g[c] * d[c];
                }
            }
            None => dy.copy_from_slice(d),
        });
    if let Some(dgate) = dgate {
        let batch = dres.len() / (tokens * channels);
        for b in 0..batch {
            let base = b * tokens * channels;
            let sums = column_sums(tokens, channels, |t, acc: &mut [T]| {
                let o = base + t * channels;
                for c in 0..channels {
                    acc[c] += dres[o + c] * y[o + c];
                }
            });
            for (d, s) in dgate[b * channels..][..channels].iter_mut().zip(sums) {
                *d += s;
            }
        }
    }
}
