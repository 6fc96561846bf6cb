//! The model calls of CPU sampling, set up once and run many times: a KV-cached draft call (a
//! block of 4 after a cached prefix, one token drawn a sequence) and a global refine call (every
//! position attended, one token drawn a sequence), for a model whose weight matrices are stored
//! in any [`WeightFormat`]. Shared by the criterion bench `cpu_inference` and the figures of
//! `examples/cpu_inference.rs` (docs/perf/cpu-inference.md).

use did_core::backend::{Backend, WeightFormat};
use did_core::denoiser::{DenoiseRequest, Denoiser, HostDrawScratch, OutputPosition};
use did_core::model::{Architecture, DiffusionDenoiser, ModelConfig, Transformer};
use did_core::rng::{Purpose, RngStream};
use did_core::sample::categorical::SampledToken;
use did_core::sample::nucleus::Nucleus;
use did_core::sample::{Confidence, DrawSpec};

/// The draft's block size (the paper's plan `4,L:0.25`).
pub const DRAFT_BLOCK: usize = 4;

/// A model with random weights (their values do not change a call's cost).
pub fn random_model(preset: &str, seed: u64) -> Result<(Transformer, Vec<f32>), String> {
    let config = ModelConfig::preset(preset, Architecture::Dit).map_err(|e| e.to_string())?;
    let model = Transformer::new(config).map_err(|e| e.to_string())?;
    let host = model.table().random_values(seed, 0.05);
    Ok((model, host))
}

/// Bytes one call reads from memory at least: every stored weight matrix but the embedding
/// (of which it reads only its tokens' rows), the f32 parameters outside them (norms, biases),
/// and the cached keys and values it attends over (`cached` positions a sequence, f32).
pub fn bytes_read(model: &Transformer, format: WeightFormat, batch: usize, cached: usize) -> usize {
    let c = model.config();
    let matrices = model.weight_matrices();
    let embed = model.table().layout().embed;
    let weights: usize = matrices
        .iter()
        .filter(|m| m.offset != embed)
        .map(|m| format.matrix_bytes(m.rows, m.cols))
        .sum();
    let in_matrices: usize = matrices.iter().map(|m| m.rows * m.cols).sum();
    let conditioning = c.layers * 6 * c.hidden * c.cond_dim + 2 * c.hidden * c.cond_dim;
    let other = 4 * (model.table().total() - in_matrices - conditioning);
    let kv = 4 * c.layers * batch * cached * 2 * c.hidden;
    weights + other + kv
}

/// One model call, ready to run again and again.
pub struct ModelCall<'a, B: Backend> {
    denoiser: DiffusionDenoiser<'a, B>,
    tokens: Vec<u32>,
    outputs: Vec<OutputPosition>,
    draws: Vec<DrawSpec>,
    scratch: HostDrawScratch,
    out: Vec<SampledToken>,
    batch: usize,
    seq_len: usize,
    block: core::ops::Range<usize>,
    block_size: usize,
    nucleus: Nucleus,
}

impl<'a, B: Backend> ModelCall<'a, B> {
    /// A draft call of `batch` sequences of `seq_len` at the block after `prefix` cached
    /// tokens (the cache is filled here, block by block, as sampling fills it).
    pub fn draft(
        be: &'a B,
        model: &'a Transformer,
        params: &'a B::Buffer,
        batch: usize,
        prefix: usize,
        seq_len: usize,
    ) -> Result<Self, String> {
        let block = prefix..prefix + DRAFT_BLOCK;
        let mut call = Self::new(be, model, params, batch, seq_len, block, DRAFT_BLOCK)?;
        call.run()?;
        Ok(call)
    }

    /// A global refine call over `seq_len` positions (one block of the whole sequence).
    pub fn refine(
        be: &'a B,
        model: &'a Transformer,
        params: &'a B::Buffer,
        batch: usize,
        seq_len: usize,
    ) -> Result<Self, String> {
        Self::new(be, model, params, batch, seq_len, 0..seq_len, seq_len)
    }

    fn new(
        be: &'a B,
        model: &'a Transformer,
        params: &'a B::Buffer,
        batch: usize,
        seq_len: usize,
        block: core::ops::Range<usize>,
        block_size: usize,
    ) -> Result<Self, String> {
        let c = model.config();
        let mut denoiser =
            DiffusionDenoiser::new(be, model, params, true).map_err(|e| e.to_string())?;
        denoiser
            .begin_stage(batch, seq_len, block_size)
            .map_err(|e| e.to_string())?;
        let tokens = (0..batch * seq_len)
            .map(|i| {
                if i % seq_len > block.start {
                    c.mask_id
                } else {
                    (i as u32 * 7919) % c.mask_id
                }
            })
            .collect();
        let outputs = (0..batch as u32)
            .map(|seq| OutputPosition {
                seq,
                pos: block.start as u32 + 1,
            })
            .collect();
        let draws = (0..batch as u32)
            .map(|s| DrawSpec {
                stream: RngStream::new(1, Purpose::Categorical, s, 0),
                row: 0,
            })
            .collect();
        Ok(ModelCall {
            denoiser,
            tokens,
            outputs,
            draws,
            scratch: HostDrawScratch::default(),
            out: vec![
                SampledToken {
                    id: 0,
                    confidence: Confidence::PINNED
                };
                batch
            ],
            batch,
            seq_len,
            block,
            block_size,
            nucleus: Nucleus::default(),
        })
    }

    /// One call: the pass and a token drawn a sequence (nucleus 0.9 over the vocabulary).
    pub fn run(&mut self) -> Result<(), String> {
        let request = DenoiseRequest {
            tokens: &self.tokens,
            batch: self.batch,
            seq_len: self.seq_len,
            block_size: self.block_size,
            block: self.block.clone(),
            outputs: &self.outputs,
        };
        let mask_id = self.denoiser.mask_id();
        self.denoiser
            .draw(
                &request,
                mask_id,
                &self.nucleus,
                &self.draws,
                &mut self.scratch,
                &mut self.out,
            )
            .map_err(|e| e.to_string())
    }
}
