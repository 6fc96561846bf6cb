//! Criterion benches of did-core's hot host-side math.
//!
//! Run: `cargo bench -p did-benches --bench core`. Results and the machine
//! they were measured on are kept in docs/perf/core.md.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use did_core::mask::AttentionMask;
use did_core::refine::select_lowest;
use did_core::rng::{Purpose, RngStream};
use did_core::sample::categorical::DrawScratch;
use did_core::sample::{draw_token, Nucleus};
use did_core::{GPT2_MASK, GPT2_VOCAB_WITH_MASK};
use std::hint::black_box;

/// Remask selection: the lowest 25 % of L confidences, global scope.
fn remask_selection(c: &mut Criterion) {
    let mut g = c.benchmark_group("remask_select_lowest_0.25");
    for &l in &[1024usize, 4096, 16384, 65536] {
        let stream = RngStream::new(1, Purpose::Init, 0, 0);
        let scores: Vec<f64> = (0..l as u32).map(|i| stream.uniform(0, i)).collect();
        let mut eligible = vec![true; l];
        eligible[0] = false;
        g.throughput(Throughput::Elements(l as u64));
        g.bench_with_input(BenchmarkId::from_parameter(l), &l, |b, _| {
            b.iter(|| select_lowest(black_box(&scores), black_box(&eligible), 0.25, None))
        });
    }
    g.finish();
}

/// Logits shaped like a trained LM's: a Zipf-like head over a long tail.
fn lm_like_logits(seed: u64) -> Vec<f32> {
    let s = RngStream::new(seed, Purpose::Init, 1, 0);
    (0..GPT2_VOCAB_WITH_MASK as u32)
        .map(|v| {
            let rank = (s.u32(0, v) % GPT2_VOCAB_WITH_MASK as u32) as f32 + 1.0;
            -1.1 * rank.ln() + 4.0 * (s.uniform(1, v) as f32 - 0.5)
        })
        .collect()
}

/// One draw over GPT-2's vocabulary: SUBS softmax, nucleus 0.9, f64 Gumbel-max.
fn nucleus_categorical(c: &mut Criterion) {
    let mut g = c.benchmark_group("draw_token_vocab_50258");
    g.throughput(Throughput::Elements(GPT2_VOCAB_WITH_MASK as u64));
    for (name, logits) in [
        ("lm_like", lm_like_logits(3)),
        (
            "flat",
            (0..GPT2_VOCAB_WITH_MASK)
                .map(|v| (v % 7) as f32 * 1e-3)
                .collect(),
        ),
    ] {
        let nucleus = Nucleus::default();
        let mut scratch = DrawScratch::default();
        let mut step = 0u32;
        g.bench_function(name, |b| {
            b.iter(|| {
                step = step.wrapping_add(1);
                let stream = RngStream::new(9, Purpose::Categorical, 0, step);
                draw_token(
                    black_box(&logits),
                    GPT2_MASK,
                    &nucleus,
                    &stream,
                    0,
                    &mut scratch,
                )
            })
        });
    }
    g.finish();
}

/// Classifying every 64×64 tile of the L = 1024, B = 4 BD3 training mask (2L × 2L).
fn tile_classification(c: &mut Criterion) {
    let mask = AttentionMask::Bd3Training {
        seq_len: 1024,
        block_size: 4,
    };
    let tile = 64;
    let n = 2048 / tile;
    let mut g = c.benchmark_group("bd3_training_mask_L1024_B4");
    g.throughput(Throughput::Elements((n * n) as u64));
    g.bench_function("classify_all_64x64_tiles", |b| {
        b.iter(|| {
            let mut counts = [0usize; 3];
            for i in 0..n {
                for j in 0..n {
                    let kind =
                        mask.classify_tile(i * tile..(i + 1) * tile, j * tile..(j + 1) * tile);
                    counts[kind as usize] += 1;
                }
            }
            black_box(counts)
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    remask_selection,
    nucleus_categorical,
    tile_classification
);
criterion_main!(benches);
