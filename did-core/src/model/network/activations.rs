//! The buffers of one training pass: what each layer's forward saves for its
//! backward (llm.c's activation set), the gradient scratch, and the memory
//! they take.

use alloc::vec::Vec;

use crate::backend::Backend;
use crate::model::network::config::{Architecture, ModelConfig, TIME_EMBEDDING_DIM};
use crate::model::training::batch::Pass;

/// What one block's forward keeps.
pub struct BlockActivations<B: Backend> {
    /// LayerNorm 1 output `[N, C]`, its mean and rstd `[N]`.
    pub ln1: B::Buffer,
    /// Mean of LayerNorm 1.
    pub mean1: B::Buffer,
    /// Rstd of LayerNorm 1.
    pub rstd1: B::Buffer,
    /// Modulated LayerNorm 1 output (DiT; GPT-2 reads `ln1`).
    pub h1: B::Buffer,
    /// Fused q, k, v `[N, 3C]`, q and k after RoPE.
    pub qkv: B::Buffer,
    /// Attention output before the projection `[N, C]`.
    pub att: B::Buffer,
    /// Log-sum-exp per (sequence, head, query).
    pub lse: B::Buffer,
    /// Attention branch after projection and dropout `[N, C]`.
    pub y1: B::Buffer,
    /// Residual after the attention branch `[N, C]`.
    pub x_mid: B::Buffer,
    /// LayerNorm 2 output.
    pub ln2: B::Buffer,
    /// Mean of LayerNorm 2.
    pub mean2: B::Buffer,
    /// Rstd of LayerNorm 2.
    pub rstd2: B::Buffer,
    /// Modulated LayerNorm 2 output (DiT).
    pub h2: B::Buffer,
    /// MLP pre-activation `[N, M]`.
    pub f1: B::Buffer,
    /// GELU output `[N, M]`.
    pub g: B::Buffer,
    /// MLP branch after projection and dropout `[N, C]`.
    pub y2: B::Buffer,
}

/// The conditioning path of the DiT: `c = SiLU(W₂·SiLU(W₀·e + b₀) + b₂)` and
/// the per-block modulation vectors `W_ada·c + b_ada` (one row: σ = 0 for every sequence).
pub struct CondActivations<B: Backend> {
    /// Sinusoidal embedding of σ = 0 `[256]`.
    pub time_embedding: B::Buffer,
    /// `W₀·e + b₀` `[cond]`.
    pub s1: B::Buffer,
    /// SiLU of `s1`.
    pub s1a: B::Buffer,
    /// `W₂·s1a + b₂`.
    pub s2: B::Buffer,
    /// `c = SiLU(s2)`.
    pub c: B::Buffer,
    /// Per block `[6C]`: shift, scale, gate (attention), shift, scale, gate (MLP).
    pub mods: B::Buffer,
    /// Final layer `[2C]`: shift, scale.
    pub final_mod: B::Buffer,
}

/// Gradient scratch, reused by every block.
pub struct GradScratch<B: Backend> {
    /// Gradient of the residual stream `[N, C]`.
    pub dres: B::Buffer,
    /// Gradient of a branch output `[N, C]`.
    pub dy: B::Buffer,
    /// Gradient of a modulated norm output `[N, C]`.
    pub dh: B::Buffer,
    /// Gradient of a norm output `[N, C]`.
    pub dln: B::Buffer,
    /// Gradient of the GELU output `[N, M]`.
    pub dg: B::Buffer,
    /// Gradient of the MLP pre-activation `[N, M]`.
    pub df1: B::Buffer,
    /// Gradient of the attention output `[N, C]`.
    pub datt: B::Buffer,
    /// Gradient of the fused q | k | v rows `[N, 3C]`.
    pub dqkv: B::Buffer,
    /// Gradient of the head input `[R, C]`.
    pub dhf: B::Buffer,
    /// Gradient of the head's input at the loss rows, gathered (`[R, C]`; chunked activations
    /// only, see [`Activations::loss_row_ids`]).
    pub dhead_in: B::Buffer,
    /// Gradient of the final norm output `[R, C]`.
    pub dlnf: B::Buffer,
    /// Gradient of the final residual rows `[R, C]`.
    pub dhx: B::Buffer,
    /// Gradients of the modulation vectors `[layers·6C + 2C]`.
    pub dmods: B::Buffer,
    /// Gradient of `c` and of the conditioning MLP's intermediates `[cond]` each.
    pub dc: B::Buffer,
    /// Gradient of `s2`.
    pub ds2: B::Buffer,
    /// Gradient of `s1a`.
    pub ds1a: B::Buffer,
    /// Gradient of `s1`.
    pub ds1: B::Buffer,
}

/// Every buffer of a training pass for one `(batch, pass)` shape.
pub struct Activations<B: Backend> {
    /// Sequences.
    pub batch: usize,
    /// `L`.
    pub seq_len: usize,
    /// The pass these buffers are for.
    pub pass: Pass,
    /// Input ids `[N]`.
    pub ids: B::Ids,
    /// Position ids `[N]` (GPT-2).
    pub position_ids: Option<B::Ids>,
    /// Residual stream at each block's input, and after the last `[layers + 1][N, C]`.
    pub residual: Vec<B::Buffer>,
    /// Per block.
    pub blocks: Vec<BlockActivations<B>>,
    /// DiT conditioning.
    pub cond: Option<CondActivations<B>>,
    /// Residual rows that get logits `[R, C]`.
    pub hx: B::Buffer,
    /// Final LayerNorm output `[R, C]`.
    pub lnf: B::Buffer,
    /// Its mean `[R]`.
    pub mean_f: B::Buffer,
    /// Its rstd `[R]`.
    pub rstd_f: B::Buffer,
    /// Head input (modulated, DiT) `[R, C]`.
    pub hf: B::Buffer,
    /// Rows of logits held at once: every output row (`R`, from [`Activations::new`]), or a
    /// chunk of them ([`Activations::with_loss_rows`]), the head and the loss then running
    /// chunk by chunk inside the backward so the logits of the whole batch never exist.
    pub loss_rows: usize,
    /// Logits `[loss_rows, V]`, rows [`Activations::logits_stride`] apart, then their gradient.
    pub logits: B::Buffer,
    /// Elements between rows of `logits`: the backend's [`MemoryOps::padded_row_stride`](crate::backend::MemoryOps::padded_row_stride) for
    /// `V` (the head's GEMMs read rows of 50,258 bf16 slower than aligned ones).
    pub logits_stride: usize,
    /// The output rows that carry a loss weight, in order, when the loss runs in chunks and
    /// some rows carry none (a diffusion batch's unmasked positions, about half of them): the
    /// head and the cross-entropy then run over these rows only, their input gathered into
    /// `head_in` and their input gradient scattered back — the same loss and gradients, since a
    /// row of weight 0 adds nothing to either. `None`: every output row.
    pub loss_row_ids: Option<B::Ids>,
    /// Rows the loss runs over: `loss_row_ids`' length, or `R`.
    pub loss_row_count: usize,
    /// The head's input at the loss rows `[R, C]` (chunked activations only).
    pub head_in: B::Buffer,
    /// Loss weight per loss row (`[loss_row_count]`).
    pub weights: B::Buffer,
    /// Weighted loss per loss row (`[R]`, the first `loss_row_count` used).
    pub losses: B::Buffer,
    /// Targets of the loss rows, one buffer per chunk of `loss_rows`.
    pub targets: Vec<B::Ids>,
    /// Gradient scratch.
    pub grad: GradScratch<B>,
}

/// Bytes of a training configuration ([`memory_report`]: every buffer f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryReport {
    /// Parameters, as the model reads them.
    pub parameters: usize,
    /// Gradients (same size as the parameters).
    pub gradients: usize,
    /// AdamW moments and EMA weights in f32 (3 × 4 bytes a parameter), and below f32 storage
    /// the f32 master weights and the EMA's copy in the storage precision.
    pub optimizer: usize,
    /// Saved activations of the forward, logits included.
    pub activations: usize,
    /// The logits alone, `[min(R, loss_rows_for(V)), V]` (part of `activations`).
    pub logits: usize,
    /// Gradient scratch of the backward.
    pub gradient_scratch: usize,
}

impl MemoryReport {
    /// Everything.
    pub fn total(&self) -> usize {
        self.parameters + self.gradients + self.optimizer + self.activations + self.gradient_scratch
    }
}

/// Element counts of every buffer, one place for both the allocation and the report.
pub(crate) struct Sizes {
    pub n: usize,
    pub rows_out: usize,
    pub lse: usize,
}

impl Sizes {
    pub fn of(config: &ModelConfig, batch: usize, seq_len: usize, pass: Pass) -> Self {
        let t = pass.tokens_per_sequence(seq_len);
        Sizes {
            n: batch * t,
            rows_out: batch * seq_len,
            lse: batch * config.heads * t,
        }
    }
}

/// Logit elements a training step holds at once ([`loss_rows_for`]): 64 Mi, 256 MiB in f32.
pub const LOSS_CHUNK_ELEMENTS: usize = 1 << 26;

/// Rows of logits a training step holds at once for a vocabulary of `vocab`: a multiple of 64
/// (at least 64) whose logits fit in [`LOSS_CHUNK_ELEMENTS`]. For GPT-2's 50,258 that is 1,280
/// rows (a GEMM still large enough to run at full speed) instead of `batch × L`.
///
/// ```
/// assert_eq!(did_core::model::loss_rows_for(50_258), 1_280);
/// assert_eq!(did_core::model::loss_rows_for(10_000_000), 64);
/// ```
pub fn loss_rows_for(vocab: usize) -> usize {
    (LOSS_CHUNK_ELEMENTS / vocab.max(1) / 64).max(1) * 64
}

impl<B: Backend> Activations<B> {
    /// Allocates every buffer for `batch` sequences of length `seq_len`, the logits of every
    /// output row included (the forward computes them all, for callers that read them).
    pub fn new(
        be: &B,
        config: &ModelConfig,
        batch: usize,
        seq_len: usize,
        pass: Pass,
    ) -> Result<Self, B::Error> {
        Self::with_loss_rows(be, config, batch, seq_len, pass, usize::MAX)
    }

    /// The trainer's activations for batches shaped like `batch`: the logits of
    /// [`loss_rows_for`] output rows at a time.
    pub fn for_training(
        be: &B,
        config: &ModelConfig,
        batch: &crate::model::TrainBatch,
    ) -> Result<Self, B::Error> {
        let loss_rows = loss_rows_for(config.vocab_size);
        Self::with_loss_rows(
            be,
            config,
            batch.batch,
            batch.seq_len,
            batch.pass,
            loss_rows,
        )
    }

    /// As [`Activations::new`], holding the logits of at most `loss_rows` output rows: when
    /// that is fewer than the batch has, the forward stops at the head's input and
    /// [`Transformer::backward`](super::Transformer::backward) and
    /// [`Transformer::loss`](super::Transformer::loss) run the head and the cross-entropy
    /// chunk by chunk. The trainer uses [`loss_rows_for`] rows ([`Activations::for_training`]).
    pub fn with_loss_rows(
        be: &B,
        config: &ModelConfig,
        batch: usize,
        seq_len: usize,
        pass: Pass,
        loss_rows: usize,
    ) -> Result<Self, B::Error> {
        let s = Sizes::of(config, batch, seq_len, pass);
        let loss_rows = loss_rows.clamp(1, s.rows_out.max(1));
        let (c, m, n, r) = (config.hidden, config.mlp_hidden, s.n, s.rows_out);
        let dit = config.architecture == Architecture::Dit;
        let logits_stride = be.padded_row_stride(config.vocab_size);
        let chunked = loss_rows < r;
        let z = |len: usize| be.zeros(len);
        let mut blocks = Vec::with_capacity(config.layers);
        for _ in 0..config.layers {
            blocks.push(BlockActivations {
                ln1: z(n * c)?,
                mean1: z(n)?,
                rstd1: z(n)?,
                h1: z(if dit { n * c } else { 0 })?,
                qkv: z(3 * n * c)?,
                att: z(n * c)?,
                lse: be.zeros_f32(s.lse)?,
                y1: z(n * c)?,
                x_mid: z(n * c)?,
                ln2: z(n * c)?,
                mean2: z(n)?,
                rstd2: z(n)?,
                h2: z(if dit { n * c } else { 0 })?,
                f1: z(n * m)?,
                g: z(n * m)?,
                y2: z(n * c)?,
            });
        }
        let residual = (0..=config.layers)
            .map(|_| z(n * c))
            .collect::<Result<Vec<_>, _>>()?;
        let cond = if dit {
            let k = config.cond_dim;
            Some(CondActivations {
                time_embedding: be.upload(&time_embedding(0.0))?,
                s1: z(k)?,
                s1a: z(k)?,
                s2: z(k)?,
                c: z(k)?,
                mods: z(config.layers * 6 * c)?,
                final_mod: z(2 * c)?,
            })
        } else {
            None
        };
        let k = if dit { config.cond_dim } else { 0 };
        let grad = GradScratch {
            dres: z(n * c)?,
            dy: z(n * c)?,
            dh: z(n * c)?,
            dln: z(n * c)?,
            dg: z(n * m)?,
            df1: z(n * m)?,
            datt: z(n * c)?,
            dqkv: z(n * 3 * c)?,
            dhf: z(r * c)?,
            dhead_in: z(if chunked { r * c } else { 0 })?,
            dlnf: z(r * c)?,
            dhx: z(r * c)?,
            dmods: z(if dit {
                config.layers * 6 * c + 2 * c
            } else {
                0
            })?,
            dc: z(k)?,
            ds2: z(k)?,
            ds1a: z(k)?,
            ds1: z(k)?,
        };
        Ok(Activations {
            batch,
            seq_len,
            pass,
            ids: be.upload_ids(&alloc::vec![0; n])?,
            position_ids: if dit {
                None
            } else {
                Some(be.upload_ids(&alloc::vec![0; n])?)
            },
            residual,
            blocks,
            cond,
            hx: z(r * c)?,
            lnf: z(r * c)?,
            mean_f: z(r)?,
            rstd_f: z(r)?,
            hf: z(if dit { r * c } else { 0 })?,
            loss_rows,
            logits: z(loss_rows.min(r) * logits_stride)?,
            logits_stride,
            loss_row_ids: None,
            loss_row_count: r,
            head_in: z(if chunked { r * c } else { 0 })?,
            weights: z(r)?,
            losses: z(r)?,
            targets: alloc::vec![0; r]
                .chunks(loss_rows)
                .map(|t| be.upload_ids(t))
                .collect::<Result<_, _>>()?,
            grad,
        })
    }
}

/// The memory a training step of `config` takes at `batch` × `seq_len` with `pass`, in bytes (f32).
///
/// ```
/// use did_core::model::{memory_report, Architecture, ModelConfig, Pass};
/// let small = ModelConfig::preset("small", Architecture::Dit)?;
/// let m = memory_report(&small, 8, 1024, Pass::Bd3 { block_size: 4 });
/// assert_eq!(m.parameters, 4 * 169_627_218);
/// assert!(m.activations > m.parameters);
/// # Ok::<(), did_core::Error>(())
/// ```
pub fn memory_report(
    config: &ModelConfig,
    batch: usize,
    seq_len: usize,
    pass: Pass,
) -> MemoryReport {
    let layout = StorageLayout {
        logits_stride: config.vocab_size,
        element_bytes: 4,
    };
    report_for(config, batch, seq_len, pass, layout)
}

/// How a backend stores a training step: the logits' row stride (elements) and the bytes of
/// a stored element. The optimizer's state is f32 whatever the storage (decision 58).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StorageLayout {
    /// Elements between two logits rows, at least the vocabulary
    /// ([`MemoryOps::padded_row_stride`](crate::backend::MemoryOps::padded_row_stride)).
    pub logits_stride: usize,
    /// Bytes of a stored element: 4 (f32) or 2 (bf16).
    pub element_bytes: usize,
}

/// [`memory_report`] for a backend that lays the step out as `layout` says: padded logits
/// rows (50,304 for `small`'s 50,258 on CUDA), and bf16 storage, where the model reads bf16
/// copies of the f32 master weights and EMA (the attention's log-sum-exp stays f32).
///
/// ```
/// use did_core::model::{memory_report, memory_report_on, Architecture, ModelConfig, Pass, StorageLayout};
/// let small = ModelConfig::preset("small", Architecture::Dit)?;
/// let pass = Pass::Bd3 { block_size: 4 };
/// let dense = memory_report(&small, 8, 1024, pass);
/// let f32_padded = StorageLayout { logits_stride: 50_304, element_bytes: 4 };
/// let padded = memory_report_on(&small, 8, 1024, pass, f32_padded);
/// assert!(padded.logits > dense.logits);
/// assert_eq!(padded.logits - dense.logits, padded.activations - dense.activations);
/// let f32_dense = StorageLayout { logits_stride: 50_258, element_bytes: 4 };
/// assert_eq!(memory_report_on(&small, 8, 1024, pass, f32_dense), dense);
/// let bf16 = memory_report_on(&small, 8, 1024, pass, StorageLayout { element_bytes: 2, ..f32_padded });
/// assert_eq!(bf16.parameters, 2 * 169_627_218);
/// assert_eq!(bf16.optimizer, (12 + 4 + 2) * 169_627_218); // m, v, EMA; master; EMA copy
/// assert!(bf16.total() < padded.total());
/// # Ok::<(), did_core::Error>(())
/// ```
pub fn memory_report_on(
    config: &ModelConfig,
    batch: usize,
    seq_len: usize,
    pass: Pass,
    layout: StorageLayout,
) -> MemoryReport {
    report_for(
        config,
        batch,
        seq_len,
        pass,
        StorageLayout {
            logits_stride: layout.logits_stride.max(config.vocab_size),
            element_bytes: layout.element_bytes,
        },
    )
}

fn report_for(
    config: &ModelConfig,
    batch: usize,
    seq_len: usize,
    pass: Pass,
    layout: StorageLayout,
) -> MemoryReport {
    let logits_stride = layout.logits_stride;
    let s = Sizes::of(config, batch, seq_len, pass);
    let (c, m, n, r, v) = (
        config.hidden,
        config.mlp_hidden,
        s.n,
        s.rows_out,
        config.vocab_size,
    );
    let dit = config.architecture == Architecture::Dit;
    let per_block = n * c * (if dit { 8 } else { 6 }) + 4 * n + 3 * n * c + s.lse + 2 * n * m;
    let cond = if dit {
        TIME_EMBEDDING_DIM + 4 * config.cond_dim + config.layers * 6 * c + 2 * c
    } else {
        0
    };
    let logits = r.min(loss_rows_for(v)) * logits_stride;
    // Chunked loss: the head's input and its gradient gathered at the loss rows.
    let gathered = if loss_rows_for(v) < r { r * c } else { 0 };
    let head = r * c * (if dit { 3 } else { 2 }) + 2 * r + logits + 2 * r + gathered;
    let activations = config.layers * per_block + (config.layers + 1) * n * c + cond + head;
    let scratch = 8 * n * c
        + 2 * n * m
        + 3 * r * c
        + gathered
        + if dit {
            config.layers * 6 * c + 2 * c + 4 * config.cond_dim
        } else {
            0
        };
    let p = config.parameter_count();
    let e = layout.element_bytes;
    // Below f32 the master weights and the EMA's are f32 beside the copies the model reads.
    let masters = if e < 4 { (4 + e) * p } else { 0 };
    let lse = config.layers * s.lse;
    MemoryReport {
        parameters: e * p,
        gradients: e * p,
        optimizer: 12 * p + masters,
        activations: e * (activations - lse) + 4 * lse,
        logits: e * logits,
        gradient_scratch: e * scratch,
    }
}

/// The sinusoidal embedding of the noise level σ (docs/bd3lm.md §3): 128 cosines then 128 sines
/// of `σ·10000^(−i/128)`. At σ = 0 it is 128 ones then 128 zeros.
///
/// ```
/// let e = did_core::model::time_embedding(0.0);
/// assert_eq!((e[0], e[127], e[128], e[255]), (1.0, 1.0, 0.0, 0.0));
/// ```
pub fn time_embedding(sigma: f64) -> Vec<f32> {
    let half = TIME_EMBEDDING_DIM / 2;
    let freq = |i: usize| libm::exp(-libm::log(10_000.0) * i as f64 / half as f64);
    let mut e: Vec<f32> = (0..half)
        .map(|i| libm::cos(sigma * freq(i)) as f32)
        .collect();
    e.extend((0..half).map(|i| libm::sin(sigma * freq(i)) as f32));
    e
}
