//! RoPE, rotate-half (GPT-NeoX) layout: channel `d < D/2` pairs with `d + D/2`
//! and rotates by `pos·base^(−2d/D)`. The backward is the inverse rotation.

use did_core::backend::RopeShape;
use rayon::prelude::*;

use crate::CpuFloat;

/// Rotates every head of every token in place (`inverse` rotates back).
pub fn rotate<T: CpuFloat>(s: &RopeShape, x: &mut [T], inverse: bool) {
    let half = s.head_dim / 2;
    if half == 0 || s.batch == 0 || s.tokens == 0 {
        return;
    }
    // cos/sin per (token, frequency), shared by batch and heads.
    // Angles in f64, so that far positions (long generations) lose no precision before the cast.
    let inv_freq: Vec<f64> = (0..half)
        .map(|d| f64::from(s.base).powf(-2.0 * d as f64 / s.head_dim as f64))
        .collect();
    let table: Vec<(T, T)> = (0..s.tokens)
        .flat_map(|t| {
            inv_freq
                .iter()
                .map(move |&f| (s.position_offset + t) as f64 * f)
        })
        .map(|a| {
            let (sin, cos) = a.sin_cos();
            (T::of_f64(cos), T::of_f64(if inverse { -sin } else { sin }))
        })
        .collect();
    let rotate_token = |t: usize, tok: &mut [T]| {
        let cs = &table[t * half..(t + 1) * half];
        for h in 0..s.heads {
            let head = &mut tok[h * s.head_dim..(h + 1) * s.head_dim];
            let (lo, hi) = head.split_at_mut(half);
            for d in 0..half {
                let (c, sn) = cs[d];
                let (a, b) = (lo[d], hi[d]);
                lo[d] = a * c - b * sn;
                hi[d] = b * c + a * sn;
            }
        }
    };
    let width = s.heads * s.head_dim;
    if s.batch_stride == s.tokens * s.stride {
        // Tokens evenly spaced (a fused qkv buffer too): one parallel pass.
        let n = s.extent();
        x[..n]
            .par_chunks_mut(s.stride)
            .enumerate()
            .for_each(|(i, tok)| rotate_token(i % s.tokens, &mut tok[..width]));
    } else {
        for b in 0..s.batch {
            for t in 0..s.tokens {
                let o = b * s.batch_stride + t * s.stride;
                rotate_token(t, &mut x[o..o + width]);
            }
        }
    }
}
