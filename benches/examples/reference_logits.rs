//! The logits the PyTorch baseline (`benches/pytorch/`) must reproduce: the
//! demo's diffusion checkpoint run by did's CPU backend on fixed inputs, in the
//! three ways the samplers call it — a global refine pass (full attention over
//! the whole sequence), a block-causal pass over a clean prefix and a noisy
//! block (no cache), and the same draft call through the KV cache.
//!
//! Run: `cargo run --release -p did-benches --example reference_logits -- [CKPT] [OUT]`
//! (defaults `data/demo/dit.safetensors.gz` and `target/reference-logits.safetensors`), then
//! `python3 benches/pytorch/check_against_did.py OUT CKPT`.

use did_core::backend::prelude::*;
use std::collections::HashMap;
use std::path::PathBuf;

use did_backend_cpu::CpuBackend;
use did_core::denoiser::{DenoiseRequest, Denoiser, OutputPosition};
use did_core::model::{DiffusionDenoiser, Inference, Transformer};
use safetensors::tensor::{Dtype, TensorView};

/// Every third position from `first` on is masked; the rest is a fixed pseudo-random text.
fn inputs(len: usize, vocab: u32, mask_id: u32) -> (Vec<u32>, Vec<u32>) {
    let mut state = 0x2545_f491_u64;
    let clean: Vec<u32> = (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) % u64::from(vocab - 1)) as u32
        })
        .collect();
    let noisy = clean
        .iter()
        .enumerate()
        .map(|(i, &t)| if i % 3 == 1 { mask_id } else { t })
        .collect();
    (clean, noisy)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let ckpt_path = PathBuf::from(
        args.next()
            .unwrap_or_else(|| "data/demo/dit.safetensors.gz".into()),
    );
    let out_path = PathBuf::from(
        args.next()
            .unwrap_or_else(|| "target/reference-logits.safetensors".into()),
    );
    let ckpt = did_engine::checkpoint::load(&ckpt_path)?;
    let config = ckpt.config;
    let (len, vocab) = (config.context.min(64), config.vocab_size);
    let (block, draft) = (4, 8..12);
    let (clean, noisy) = inputs(len, vocab as u32, config.mask_id);

    let be = CpuBackend::new();
    let model = Transformer::new(config)?;
    let params = be.upload(&ckpt.params)?;
    let err = |e: String| -> Box<dyn std::error::Error> { e.into() };

    // A global refine call: every position sees every other one.
    let mut inference = Inference::new(&be, &model, &params).map_err(|e| err(format!("{e:?}")))?;
    let refine = inference
        .logits_uncached(&noisy, 1, len)
        .map_err(|e| err(format!("{e:?}")))?;
    // A draft call without cache: the clean prefix, then the noisy block, block-causal.
    let mut window: Vec<u32> = clean[..draft.start].to_vec();
    window.extend_from_slice(&noisy[draft.clone()]);
    let uncached = inference
        .logits_uncached(&window, 1, block)
        .map_err(|e| err(format!("{e:?}")))?;
    let uncached = uncached[draft.start * vocab..].to_vec();
    // The same draft call through the KV cache.
    let mut denoiser =
        DiffusionDenoiser::new(&be, &model, &params, true).map_err(|e| err(format!("{e:?}")))?;
    denoiser
        .begin_stage(1, len, block)
        .map_err(|e| err(format!("{e:?}")))?;
    let outputs: Vec<OutputPosition> = draft
        .clone()
        .map(|p| OutputPosition {
            seq: 0,
            pos: p as u32,
        })
        .collect();
    let mut cached = vec![0.0f32; outputs.len() * vocab];
    let mut seq = window.clone();
    seq.resize(len, config.mask_id);
    denoiser
        .logits(
            &DenoiseRequest {
                tokens: &seq,
                batch: 1,
                seq_len: len,
                block_size: block,
                block: draft.clone(),
                outputs: &outputs,
            },
            &mut cached,
        )
        .map_err(|e| err(format!("{e:?}")))?;

    let ids = |t: &[u32]| t.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let floats = |t: &[f32]| t.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let data: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)> = vec![
        ("clean", Dtype::U32, vec![len], ids(&clean)),
        ("noisy", Dtype::U32, vec![len], ids(&noisy)),
        (
            "refine_logits",
            Dtype::F32,
            vec![len, vocab],
            floats(&refine),
        ),
        ("draft_tokens", Dtype::U32, vec![draft.end], ids(&window)),
        (
            "draft_logits",
            Dtype::F32,
            vec![draft.len(), vocab],
            floats(&uncached),
        ),
        (
            "draft_cached_logits",
            Dtype::F32,
            vec![draft.len(), vocab],
            floats(&cached),
        ),
    ];
    let views = data
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            Ok((*name, TensorView::new(*dtype, shape.clone(), bytes)?))
        })
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    let meta = HashMap::from([
        ("draft_start".to_string(), draft.start.to_string()),
        ("block_size".to_string(), block.to_string()),
        ("checkpoint".to_string(), ckpt_path.display().to_string()),
    ]);
    if let Some(dir) = out_path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(
        &out_path,
        safetensors::tensor::serialize(views, Some(meta))?,
    )?;
    println!("wrote {}", out_path.display());
    Ok(())
}
