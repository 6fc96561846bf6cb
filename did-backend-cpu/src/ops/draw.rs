//! Token draws, one logits row per rayon task: each row is `draw_token` on its own stream, so
//! the tokens do not depend on how rows are spread over threads.

use did_core::sample::categorical::{draw_token, DrawScratch, SampledToken};
use did_core::sample::nucleus::Nucleus;
use did_core::sample::DrawSpec;
use rayon::prelude::*;

use crate::CpuFloat;

/// Draws `out[r]` from row `r` of `logits` (`vocab` per row) with `draws[r]`.
pub fn draw_tokens<T: CpuFloat>(
    logits: &[T],
    vocab: usize,
    mask_id: u32,
    nucleus: &Nucleus,
    draws: &[DrawSpec],
    out: &mut [SampledToken],
) {
    out.par_iter_mut()
        .zip(draws.par_iter())
        .zip(logits.par_chunks(vocab.max(1)))
        .for_each_init(
            || (DrawScratch::default(), Vec::new()),
            |(scratch, row), ((slot, spec), values)| {
                row.clear();
                row.extend(values.iter().map(|x| x.to_f32_lossy()));
                *slot = draw_token(row, mask_id, nucleus, &spec.stream, spec.row, scratch);
            },
        );
}

#[cfg(test)]
mod tests {
    use super::*;
    use did_core::rng::{Purpose, RngStream};
    use did_core::sample::categorical::Confidence;

    #[test]
    fn parallel_rows_are_the_sequential_draws() {
        let (rows, vocab) = (37, 500);
        let s = RngStream::new(4, Purpose::Init, 0, 0);
        let logits: Vec<f32> = (0..rows * vocab)
            .map(|i| 6.0 * s.uniform_f32(0, i as u32) - 3.0)
            .collect();
        let draws: Vec<DrawSpec> = (0..rows as u32)
            .map(|r| DrawSpec {
                stream: RngStream::new(8, Purpose::Categorical, r % 5, 2),
                row: 3 * r,
            })
            .collect();
        let nucleus = Nucleus::default();
        let mut out = vec![
            SampledToken {
                id: u32::MAX,
                confidence: Confidence::PINNED
            };
            rows
        ];
        draw_tokens(&logits, vocab, 7, &nucleus, &draws, &mut out);
        let mut scratch = DrawScratch::default();
        for (r, (row, spec)) in logits.chunks(vocab).zip(&draws).enumerate() {
            let want = draw_token(row, 7, &nucleus, &spec.stream, spec.row, &mut scratch);
            assert_eq!(out[r], want, "row {r}");
        }
    }
}
