//! A model whose weight matrices are stored in bf16 or int8 (`MemoryOps::upload_weights`):
//! logits near the f32 model's, the sampler's invariants kept (cached = uncached, a sequence
//! alone = in a batch, to the bit), and ops that would read a stored matrix as floats refused.

use did_backend_cpu::{CpuBackend, CpuBuffer, CpuError};
use did_core::backend::prelude::*;
use did_core::backend::{Gemm, Slice, SliceMut, WeightFormat};
use did_core::denoiser::{DenoiseRequest, Denoiser, OutputPosition};
use did_core::model::{Architecture, DiffusionDenoiser, ModelConfig, Transformer};
use did_core::refine::{generate, GenerateConfig, StagePlan};

const VOCAB: usize = 97;
const LEN: usize = 32;

fn model() -> (Transformer, Vec<f32>) {
    let config = ModelConfig {
        vocab_size: VOCAB,
        mask_id: VOCAB as u32 - 1,
        layers: 2,
        hidden: 64,
        heads: 2,
        mlp_hidden: 160,
        cond_dim: 16,
        context: LEN,
        ..ModelConfig::preset("tiny", Architecture::Dit).unwrap()
    };
    let model = Transformer::new(config).unwrap();
    let host = model.table().random_values(7, 0.4);
    (model, host)
}

/// Logits of every position of two sequences (a whole-sequence call).
fn logits(be: &CpuBackend, model: &Transformer, params: &CpuBuffer<f32>) -> Vec<f32> {
    let tokens: Vec<u32> = (0..2 * LEN as u32)
        .map(|i| (i * 7 + 3) % (VOCAB as u32 - 1))
        .collect();
    let outputs: Vec<OutputPosition> = (0..2)
        .flat_map(|seq| (0..LEN as u32).map(move |pos| OutputPosition { seq, pos }))
        .collect();
    let request = DenoiseRequest {
        tokens: &tokens,
        batch: 2,
        seq_len: LEN,
        block_size: LEN,
        block: 0..LEN,
        outputs: &outputs,
    };
    let mut d = DiffusionDenoiser::new(be, model, params, true).unwrap();
    let mut out = vec![0.0; outputs.len() * VOCAB];
    d.logits(&request, &mut out).unwrap();
    out
}

/// bf16 weights carry 8 significant bits (relative rounding ≤ 2⁻⁹), int8 about 7 a row plus the
/// inputs' 7 (int8 also quantizes each input row): rounding errors of independent signs add in
/// quadrature over a dot product, so a logit moves by a small fraction of the logits' spread,
/// int8 by several times bf16's. The bounds are 3× what these weights show.
#[test]
fn stored_weights_give_logits_near_the_f32_ones() {
    let be = CpuBackend::new();
    let (model, host) = model();
    let f32_params = be.upload(&host).unwrap();
    let reference = logits(&be, &model, &f32_params);
    let mean = reference.iter().sum::<f32>() / reference.len() as f32;
    let spread =
        (reference.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / reference.len() as f32).sqrt();
    for (format, bound) in [(WeightFormat::Bf16, 0.02), (WeightFormat::Int8, 0.075)] {
        let params = be
            .upload_weights(&host, &model.weight_matrices(), format)
            .unwrap();
        let got = logits(&be, &model, &params);
        let rms = (got
            .iter()
            .zip(&reference)
            .map(|(a, b)| (a - b).powi(2))
            .sum::<f32>()
            / got.len() as f32)
            .sqrt();
        assert!(rms > 0.0, "{format}: the logits did not change at all");
        assert!(
            rms < bound * spread,
            "{format}: rms error {rms} against a spread of {spread}"
        );
    }
}

fn sample(
    be: &CpuBackend,
    model: &Transformer,
    params: &CpuBuffer<f32>,
    prompts: &[&[u32]],
    first_sample: u32,
    cached: bool,
) -> Vec<u32> {
    let plan: StagePlan = "4,L:0.25".parse().unwrap();
    let mut d = DiffusionDenoiser::new(be, model, params, cached).unwrap();
    let config = GenerateConfig {
        first_sample,
        ..GenerateConfig::new(plan.resolve(LEN).unwrap(), 5)
    };
    let g = generate(&mut d, &config, prompts).unwrap();
    g.batch.tokens
}

#[test]
fn stored_weights_sample_the_same_tokens_cached_uncached_alone_and_batched() {
    let be = CpuBackend::new();
    let (model, host) = model();
    let prompts: [&[u32]; 3] = [&[1], &[2, 5], &[3]];
    for format in [WeightFormat::Bf16, WeightFormat::Int8] {
        let params = be
            .upload_weights(&host, &model.weight_matrices(), format)
            .unwrap();
        let batch = sample(&be, &model, &params, &prompts, 0, true);
        assert!(
            batch.iter().all(|&t| t != VOCAB as u32 - 1),
            "{format}: tokens left masked"
        );
        assert_eq!(
            batch,
            sample(&be, &model, &params, &prompts, 0, false),
            "{format}: cached vs uncached"
        );
        // Alone, a sequence draws the same tokens: its rows' products do not depend on the others.
        for (s, p) in prompts.iter().enumerate() {
            let alone = sample(&be, &model, &params, &[p], s as u32, true);
            assert_eq!(
                alone,
                batch[s * LEN..(s + 1) * LEN],
                "{format}: sequence {s} alone"
            );
        }
    }
}

#[test]
fn a_stored_matrix_downloads_widened_and_refuses_float_reads() {
    let be = CpuBackend::new();
    let (model, host) = model();
    let matrices = model.weight_matrices();
    let params = be
        .upload_weights(&host, &matrices, WeightFormat::Int8)
        .unwrap();
    assert_eq!(params.weight_format(), WeightFormat::Int8);
    let stored_bytes: usize = matrices
        .iter()
        .map(|m| WeightFormat::Int8.matrix_bytes(m.rows, m.cols))
        .sum();
    let float_count = host.len() - matrices.iter().map(|m| m.rows * m.cols).sum::<usize>();
    assert_eq!(params.bytes(), stored_bytes + 4 * float_count);

    let mut back = vec![0.0; host.len()];
    be.download(Slice::whole(&params), &mut back).unwrap();
    for m in &matrices {
        for r in 0..m.rows {
            let row = &host[m.offset + r * m.cols..][..m.cols];
            let max = row.iter().fold(0.0f32, |a, v| a.max(v.abs()));
            for (c, &v) in row.iter().enumerate() {
                let d = (back[m.offset + r * m.cols + c] - v).abs();
                assert!(d <= max / 127.0 * 0.5 + 1e-6, "matrix at {}: {d}", m.offset);
            }
        }
    }
    let outside = matrices.iter().fold(0..host.len(), |_, _| 0..host.len());
    for i in outside.filter(|i| !matrices.iter().any(|m| m.range().contains(i))) {
        assert_eq!(back[i], host[i]);
    }

    // A weight gradient's GEMM reads the matrix as floats: refused, naming the cause.
    let qkv = matrices[1];
    let dy = be.zeros(4 * qkv.rows).unwrap();
    let mut dx = be.zeros(4 * qkv.cols).unwrap();
    let err = be
        .matmul(
            &Gemm::linear_input_grad(4, qkv.cols, qkv.rows),
            Slice::whole(&dy),
            Slice::at(&params, qkv.offset),
            SliceMut::whole(&mut dx),
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            CpuError::Stored {
                format: WeightFormat::Int8,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("stored in int8"), "{err}");
    let mut copy = be.zeros(10).unwrap();
    assert!(be
        .copy(
            Slice::at(&params, qkv.offset + 3),
            SliceMut::whole(&mut copy),
            10
        )
        .is_err());
}

#[test]
fn f32_weights_are_a_plain_upload() {
    let be = CpuBackend::new();
    let (model, host) = model();
    let params = be
        .upload_weights(&host, &model.weight_matrices(), WeightFormat::F32)
        .unwrap();
    assert_eq!(params, be.upload(&host).unwrap());
    assert_eq!(params.bytes(), 4 * host.len());
}

#[test]
fn int8_refuses_rows_too_wide_to_sum_exactly() {
    use did_backend_cpu::ops::stored::int8::MAX_COLS;
    use did_core::backend::WeightMatrix;
    let cols = MAX_COLS + 1;
    let host = vec![0.01f32; cols];
    let wide = [WeightMatrix {
        offset: 0,
        rows: 1,
        cols,
    }];
    let be = CpuBackend::new();
    let err = be
        .upload_weights(&host, &wide, WeightFormat::Int8)
        .unwrap_err();
    assert!(err.to_string().contains("use bf16 or f32"), "{err}");
    assert!(be.upload_weights(&host, &wide, WeightFormat::Bf16).is_ok());
}
