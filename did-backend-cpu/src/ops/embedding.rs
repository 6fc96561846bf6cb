//! Embedding lookup and its scatter-add backward.

use rayon::prelude::*;

use crate::CpuFloat;

/// `out[i] = table[ids[i]]`.
pub fn forward<T: CpuFloat>(ids: &[u32], table: &[T], out: &mut [T], channels: usize) {
    if channels == 0 {
        return;
    }
    out.par_chunks_mut(channels)
        .zip(ids.par_iter())
        .for_each(|(o, &id)| {
            o.copy_from_slice(&table[id as usize * channels..(id as usize + 1) * channels]);
        });
}

/// `dtable[ids[i]] += dout[i]`, in row order (deterministic).
pub fn backward<T: CpuFloat>(ids: &[u32], dout: &[T], dtable: &mut [T], channels: usize) {
    for (i, &id) in ids.iter().enumerate() {
        let row = &mut dtable[id as usize * channels..(id as usize + 1) * channels];
        for (t, &d) in row.iter_mut().zip(&dout[i * channels..(i + 1) * channels]) {
            *t += d;
        }
    }
}
