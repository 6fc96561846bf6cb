//! Optimiser arithmetic: the gradient norm, scaling, AdamW, EMA.

use did_core::backend::AdamW;
use rayon::prelude::*;

use crate::CpuFloat;

const CHUNK: usize = 1 << 14;

/// `Σ x²` in f64, in fixed chunks summed in order (thread-count independent).
pub fn sum_squares<T: CpuFloat>(x: &[T]) -> f64 {
    let partials: Vec<f64> = x
        .par_chunks(CHUNK)
        .map(|c| c.iter().map(|&v| v.to_f64_exact() * v.to_f64_exact()).sum())
        .collect();
    partials.into_iter().sum()
}

/// `Σ x` in f64, in fixed chunks summed in order.
pub fn sum<T: CpuFloat>(x: &[T]) -> f64 {
    let partials: Vec<f64> = x
        .par_chunks(CHUNK)
        .map(|c| c.iter().map(|&v| v.to_f64_exact()).sum())
        .collect();
    partials.into_iter().sum()
}

/// `x *= factor`.
pub fn scale<T: CpuFloat>(x: &mut [T], factor: T) {
    x.par_chunks_mut(CHUNK)
        .for_each(|c| c.iter_mut().for_each(|v| *v *= factor));
}

/// One AdamW step (PyTorch's formulation: decoupled decay, bias-corrected moments).
pub fn adamw<T: CpuFloat>(hp: &AdamW, params: &mut [T], grads: &[T], m: &mut [T], v: &mut [T]) {
    let step = hp.step.max(1) as i32;
    let (b1, b2) = (T::of_f32(hp.beta1), T::of_f32(hp.beta2));
    let bc1 = T::one() - b1.powi(step);
    let bc2 = T::one() - b2.powi(step);
    let (lr, eps, wd) = (
        T::of_f32(hp.lr),
        T::of_f32(hp.eps),
        T::of_f32(hp.weight_decay),
    );
    params
        .par_chunks_mut(CHUNK)
        .zip(grads.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .for_each(|(((p, g), m), v)| {
            for i in 0..p.len() {
                m[i] = b1 * m[i] + (T::one() - b1) * g[i];
                v[i] = b2 * v[i] + (T::one() - b2) * g[i] * g[i];
                let mhat = m[i] / bc1;
                let vhat = v[i] / bc2;
                p[i] = p[i] * (T::one() - lr * wd) - lr * mhat / (vhat.sqrt() + eps);
            }
        });
}

/// `ema = decay·ema + (1 − decay)·params`.
pub fn ema_update<T: CpuFloat>(ema: &mut [T], params: &[T], decay: T) {
    ema.par_chunks_mut(CHUNK)
        .zip(params.par_chunks(CHUNK))
        .for_each(|(e, p)| {
            for (e, &p) in e.iter_mut().zip(p) {
                *e = decay * *e + (T::one() - decay) * p;
            }
        });
}
