//! The transformer over any [`Backend`]: the training forward and the
//! hand-written backward, block by block (llm.c style). Each block's forward
//! is `block_forward`; its backward, `block_backward`, undoes it line by line
//! in reverse.

use alloc::vec::Vec;

use crate::backend::{
    AttentionShape, Backend, DropoutMask, Gemm, LinearThen, MemoryOps, NormShape, QkvOffsets,
    ResidualBranch, RopeShape, RowGroups, RowMajor, Slice, SliceMut,
};
use crate::error::invalid;
use crate::mask::AttentionMask;
use crate::model::network::activations::{Activations, BlockActivations, CondActivations};
use crate::model::network::buckets::{BackwardStage, GradientBuckets};
use crate::model::network::config::{Architecture, ModelConfig, TIME_EMBEDDING_DIM};
use crate::model::network::params::{BlockOffsets, Layout, ParamTable};
use crate::model::training::batch::{Pass, TrainBatch};
use crate::model::ModelError;
use crate::rng::{Purpose, RngStream};

fn at<T: ?Sized>(buf: &T, offset: usize) -> Slice<'_, T> {
    Slice::at(buf, offset)
}
fn at_mut<T: ?Sized>(buf: &mut T, offset: usize) -> SliceMut<'_, T> {
    SliceMut::at(buf, offset)
}
fn whole<T: ?Sized>(buf: &T) -> Slice<'_, T> {
    Slice::whole(buf)
}
fn whole_mut<T: ?Sized>(buf: &mut T) -> SliceMut<'_, T> {
    SliceMut::whole(buf)
}

/// Dropout of a training pass: which random streams the residual branches use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DropoutStreams {
    /// The run's seed.
    pub seed: u64,
    /// The micro-step (optimizer step × accumulation + micro-batch).
    pub step: u32,
}

impl DropoutStreams {
    /// The mask of block `block`'s branch `branch` at probability `p`.
    pub fn mask(&self, p: f32, block: usize, branch: usize) -> DropoutMask {
        DropoutMask {
            p,
            stream: self.stream(block, branch),
        }
    }

    /// The stream of block `block`'s branch `branch` (0 attention, 1 MLP).
    pub fn stream(&self, block: usize, branch: usize) -> RngStream {
        RngStream::new(
            self.seed,
            Purpose::Dropout,
            (2 * block + branch) as u32,
            self.step,
        )
    }
}

/// Where a block's attention reads keys and values: its own qkv buffer, or a KV cache.
pub(crate) enum KeyValues<'a, B: Backend> {
    /// Keys and values of this pass's own tokens.
    OwnTokens,
    /// The pass's sequences in consecutive groups, each with its own cache and block: a
    /// group's keys and values are written to its cache and its queries attend over it. The
    /// linear layers run over every group's rows at once; RoPE and attention group by group.
    Caches(Vec<CachedGroup<'a, B>>),
}

/// One group of [`KeyValues::Caches`]: `batch` sequences whose block starts at
/// `position_offset`, with a cache of `[batch, capacity, 2C]` (a slot's keys, then its
/// values). This pass's keys and values are written at `write_slot` onwards, and attention
/// reads `kv_len` slots from `first_slot` under `mask`.
pub(crate) struct CachedGroup<'a, B: Backend> {
    pub kv: &'a mut B::Buffer,
    pub batch: usize,
    pub capacity: usize,
    pub write_slot: usize,
    pub first_slot: usize,
    pub kv_len: usize,
    pub position_offset: usize,
    pub mask: AttentionMask,
}

/// The geometry of a pass through the blocks.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
    /// Sequences.
    pub batch: usize,
    /// Tokens per sequence in this pass.
    pub tokens: usize,
    /// Stretches per sequence that each start at `position_offset` (2 for the BD3 stream).
    pub segments: usize,
    /// Position of each stretch's first token.
    pub position_offset: usize,
    /// Who sees whom.
    pub mask: AttentionMask,
}

impl Geometry {
    pub fn rows(&self) -> usize {
        self.batch * self.tokens
    }
}

/// The model: a configuration and where its tensors sit in a flat buffer.
/// The parameters themselves are passed to each call (training weights or EMA weights).
///
/// ```
/// use did_core::model::{Architecture, ModelConfig, Transformer};
/// let bad = ModelConfig { heads: 5, ..ModelConfig::preset("tiny", Architecture::Dit)? };
/// let err = Transformer::new(bad).unwrap_err();
/// assert!(err.to_string().contains("multiple of `heads`"));
/// # Ok::<(), did_core::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Transformer {
    config: ModelConfig,
    table: ParamTable,
    buckets: GradientBuckets,
}

impl Transformer {
    /// A model of `config` (validated).
    pub fn new(config: ModelConfig) -> Result<Self, crate::Error> {
        config.validate()?;
        let table = ParamTable::new(&config);
        Ok(Transformer {
            buckets: GradientBuckets::new(&table),
            table,
            config,
        })
    }

    /// Its configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Its tensors.
    pub fn table(&self) -> &ParamTable {
        &self.table
    }

    /// Its weight matrices that a backend may store below f32 ([`ParamTable::weight_matrices`]).
    pub fn weight_matrices(&self) -> Vec<crate::backend::WeightMatrix> {
        self.table.weight_matrices()
    }

    /// Which gradients are final at each stage of its backward.
    pub fn gradient_buckets(&self) -> &GradientBuckets {
        &self.buckets
    }

    fn layout(&self) -> &Layout {
        self.table.layout()
    }

    fn dit(&self) -> bool {
        self.config.architecture == Architecture::Dit
    }

    /// Checks that a batch fits these activations and this model.
    fn check_batch<B: Backend>(
        &self,
        acts: &Activations<B>,
        batch: &TrainBatch,
    ) -> Result<(), crate::Error> {
        if batch.batch != acts.batch || batch.seq_len != acts.seq_len || batch.pass != acts.pass {
            return Err(invalid(
                "training batch",
                "the batch's shape or pass differs from the activations it was given",
            ));
        }
        if batch.seq_len > self.config.context {
            return Err(invalid(
                "sequence length",
                alloc::format!(
                    "{} exceeds the model's context of {}",
                    batch.seq_len,
                    self.config.context
                ),
            ));
        }
        if batch.pass == Pass::Causal && self.dit() || batch.pass != Pass::Causal && !self.dit() {
            return Err(invalid(
                "objective",
                "the DiT trains with diffusion passes and GPT-2 with the causal pass",
            ));
        }
        if let Some(&bad) = batch
            .inputs
            .iter()
            .chain(&batch.targets)
            .find(|&&t| t as usize >= self.config.vocab_size)
        {
            return Err(invalid(
                "token id",
                alloc::format!(
                    "{bad} is outside the model's vocabulary of {}",
                    self.config.vocab_size
                ),
            ));
        }
        Ok(())
    }

    // ---- conditioning (DiT) ------------------------------------------------

    /// `c = SiLU(W₂·SiLU(W₀·e + b₀) + b₂)`, then every block's and the final
    /// layer's modulation vectors. One row: σ = 0 for every sequence.
    pub(crate) fn cond_forward<B: Backend>(
        &self,
        be: &B,
        p: &B::Buffer,
        cond: &mut CondActivations<B>,
    ) -> Result<(), B::Error> {
        let Some([w0, b0, w2, b2]) = self.layout().sigma_map else {
            return Ok(());
        };
        let (k, c) = (self.config.cond_dim, self.config.hidden);
        be.matmul(
            &Gemm::linear(1, TIME_EMBEDDING_DIM, k),
            whole(&cond.time_embedding),
            at(p, w0),
            whole_mut(&mut cond.s1),
        )?;
        be.bias_add(whole_mut(&mut cond.s1), at(p, b0), 1, k)?;
        be.silu_forward(whole(&cond.s1), whole_mut(&mut cond.s1a), k)?;
        be.matmul(
            &Gemm::linear(1, k, k),
            whole(&cond.s1a),
            at(p, w2),
            whole_mut(&mut cond.s2),
        )?;
        be.bias_add(whole_mut(&mut cond.s2), at(p, b2), 1, k)?;
        be.silu_forward(whole(&cond.s2), whole_mut(&mut cond.c), k)?;
        for (l, blk) in self.layout().blocks.iter().enumerate() {
            if let Some((aw, ab)) = blk.ada {
                be.matmul(
                    &Gemm::linear(1, k, 6 * c),
                    whole(&cond.c),
                    at(p, aw),
                    at_mut(&mut cond.mods, l * 6 * c),
                )?;
                be.bias_add(at_mut(&mut cond.mods, l * 6 * c), at(p, ab), 1, 6 * c)?;
            }
        }
        if let Some((fw, fb)) = self.layout().final_ada {
            be.matmul(
                &Gemm::linear(1, k, 2 * c),
                whole(&cond.c),
                at(p, fw),
                whole_mut(&mut cond.final_mod),
            )?;
            be.bias_add(whole_mut(&mut cond.final_mod), at(p, fb), 1, 2 * c)?;
        }
        Ok(())
    }

    fn cond_backward<B: Backend>(
        &self,
        be: &B,
        p: &B::Buffer,
        g: &mut B::Buffer,
        cond: &CondActivations<B>,
        scratch: &mut crate::model::network::activations::GradScratch<B>,
    ) -> Result<(), B::Error> {
        let Some([w0, b0, w2, b2]) = self.layout().sigma_map else {
            return Ok(());
        };
        let (k, c, layers) = (self.config.cond_dim, self.config.hidden, self.config.layers);
        be.fill(whole_mut(&mut scratch.dc), k, 0.0)?;
        // d(mods) → d(ada weights), d(c)
        for (l, blk) in self.layout().blocks.iter().enumerate() {
            if let Some((aw, ab)) = blk.ada {
                let dm = at(&scratch.dmods, l * 6 * c);
                be.matmul(
                    &Gemm::linear_weight_grad(1, k, 6 * c),
                    dm,
                    whole(&cond.c),
                    at_mut(g, aw),
                )?;
                be.bias_backward(dm, at_mut(g, ab), 1, 6 * c)?;
                be.matmul(
                    &Gemm::linear_input_grad(1, k, 6 * c).accumulate(),
                    dm,
                    at(p, aw),
                    whole_mut(&mut scratch.dc),
                )?;
            }
        }
        if let Some((fw, fb)) = self.layout().final_ada {
            let dm = at(&scratch.dmods, layers * 6 * c);
            be.matmul(
                &Gemm::linear_weight_grad(1, k, 2 * c),
                dm,
                whole(&cond.c),
                at_mut(g, fw),
            )?;
            be.bias_backward(dm, at_mut(g, fb), 1, 2 * c)?;
            be.matmul(
                &Gemm::linear_input_grad(1, k, 2 * c).accumulate(),
                dm,
                at(p, fw),
                whole_mut(&mut scratch.dc),
            )?;
        }
        // c = SiLU(s2); s2 = W₂·s1a + b₂; s1a = SiLU(s1); s1 = W₀·e + b₀
        be.silu_backward(
            whole(&scratch.dc),
            whole(&cond.s2),
            whole_mut(&mut scratch.ds2),
            k,
        )?;
        be.matmul(
            &Gemm::linear_weight_grad(1, k, k),
            whole(&scratch.ds2),
            whole(&cond.s1a),
            at_mut(g, w2),
        )?;
        be.bias_backward(whole(&scratch.ds2), at_mut(g, b2), 1, k)?;
        be.matmul(
            &Gemm::linear_input_grad(1, k, k),
            whole(&scratch.ds2),
            at(p, w2),
            whole_mut(&mut scratch.ds1a),
        )?;
        be.silu_backward(
            whole(&scratch.ds1a),
            whole(&cond.s1),
            whole_mut(&mut scratch.ds1),
            k,
        )?;
        be.matmul(
            &Gemm::linear_weight_grad(1, TIME_EMBEDDING_DIM, k),
            whole(&scratch.ds1),
            whole(&cond.time_embedding),
            at_mut(g, w0),
        )?;
        be.bias_backward(whole(&scratch.ds1), at_mut(g, b0), 1, k)?;
        Ok(())
    }

    // ---- embeddings --------------------------------------------------------

    /// `x = E[ids]` (+ learned positions for GPT-2).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn embed_forward<B: Backend>(
        &self,
        be: &B,
        p: &B::Buffer,
        ids: &B::Ids,
        position_ids: Option<&B::Ids>,
        rows: usize,
        x: &mut B::Buffer,
        scratch: &mut B::Buffer,
    ) -> Result<(), B::Error> {
        let c = self.config.hidden;
        be.embedding_forward(ids, at(p, self.layout().embed), whole_mut(x), rows, c)?;
        if let (Some(pos), Some(pids)) = (self.layout().positions, position_ids) {
            be.embedding_forward(pids, at(p, pos), whole_mut(scratch), rows, c)?;
            be.gated_residual_forward(whole_mut(x), whole(scratch), None, 1, rows, c)?;
        }
        Ok(())
    }

    // ---- one block -----------------------------------------------------------

    /// The forward of block `l` over `geo.rows()` tokens: `x_out = block(x_in)`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn block_forward<B: Backend>(
        &self,
        be: &B,
        p: &B::Buffer,
        l: usize,
        a: &mut BlockActivations<B>,
        mods: Option<&B::Buffer>,
        x_in: &B::Buffer,
        x_out: &mut B::Buffer,
        geo: &Geometry,
        kv: KeyValues<'_, B>,
        dropout: Option<DropoutStreams>,
    ) -> Result<(), B::Error> {
        let cfg = &self.config;
        let (c, m, n) = (cfg.hidden, cfg.mlp_hidden, geo.rows());
        let o: &BlockOffsets = &self.layout().blocks[l];
        let norm = NormShape {
            rows: n,
            cols: c,
            eps: cfg.norm_eps,
        };
        let mod_at = |i: usize| l * 6 * c + i * c; // shift, scale, gate × (attention, MLP)
                                                   // The branches' dropout masks (0 attention, 1 MLP) when the pass has dropout.
        let mask = |branch| {
            dropout
                .filter(|_| cfg.dropout > 0.0)
                .map(|d| d.mask(cfg.dropout, l, branch))
        };

        // ---- attention branch: x_mid = x_in + gate_msa · drop(W_out · attn(rope(W_qkv · mod(LN1(x_in)))))
        let h1 = pre_norm(
            be,
            &norm,
            whole(x_in),
            at(p, o.norm1.0),
            o.norm1.1.map(|b| at(p, b)),
            mods.map(|mv| (at(mv, mod_at(0)), at(mv, mod_at(1)))),
            &mut a.ln1,
            &mut a.mean1,
            &mut a.rstd1,
            &mut a.h1,
        )?;
        be.matmul(
            &Gemm::linear(n, c, 3 * c),
            whole(h1),
            at(p, o.qkv.0),
            whole_mut(&mut a.qkv),
        )?;
        if let Some(b) = o.qkv.1 {
            be.bias_add(whole_mut(&mut a.qkv), at(p, b), n, 3 * c)?;
        }
        // Queries and keys are adjacent in a fused qkv row: one rotation over both, as twice
        // the heads (one launch instead of two).
        let rope = |geo: &Geometry| {
            let mut rope = self.rope_shape(geo, 3 * c);
            rope.heads *= 2;
            rope
        };
        let dit = cfg.architecture == Architecture::Dit;
        match kv {
            KeyValues::OwnTokens => {
                if dit {
                    be.rope_forward(&rope(geo), at_mut(&mut a.qkv, 0))?;
                }
                let shape = self.fused_qkv_attention(geo);
                be.attention_forward(
                    &shape,
                    &geo.mask,
                    whole(&a.qkv),
                    at(&a.qkv, c),
                    at(&a.qkv, 2 * c),
                    whole_mut(&mut a.att),
                    whole_mut(&mut a.lse),
                )?;
            }
            KeyValues::Caches(groups) => {
                // Store each group's (rotated) keys and values, adjacent in the qkv rows and in
                // the cache's slots: one copy per group, in the same call as the rotation where
                // there is one; then attend over the group's window.
                let slot = 2 * c;
                let (heads, head_dim) = (cfg.heads, cfg.head_dim());
                let mut first_seq = 0;
                for g in groups {
                    let group_geo = Geometry {
                        batch: g.batch,
                        position_offset: g.position_offset,
                        mask: g.mask,
                        ..*geo
                    };
                    let qkv_at = first_seq * geo.tokens * 3 * c;
                    let append = RowGroups {
                        groups: g.batch,
                        rows: geo.tokens,
                        cols: slot,
                        src_stride: 3 * c,
                        src_group_stride: geo.tokens * 3 * c,
                        dst_stride: slot,
                        dst_group_stride: g.capacity * slot,
                    };
                    let dst = at_mut(&mut *g.kv, g.write_slot * slot);
                    if dit {
                        let rope = rope(&group_geo);
                        be.rope_forward_and_copy(
                            &rope,
                            at_mut(&mut a.qkv, qkv_at),
                            c,
                            dst,
                            &append,
                        )?;
                    } else {
                        be.copy_row_groups(at(&a.qkv, qkv_at + c), dst, &append)?;
                    }
                    let shape = AttentionShape::over_cache(
                        g.batch, heads, head_dim, geo.tokens, g.kv_len, g.capacity,
                    );
                    be.attention_forward(
                        &shape,
                        &g.mask,
                        at(&a.qkv, qkv_at),
                        at(g.kv, g.first_slot * slot),
                        at(g.kv, g.first_slot * slot + c),
                        at_mut(&mut a.att, first_seq * geo.tokens * c),
                        at_mut(&mut a.lse, first_seq * heads * geo.tokens),
                    )?;
                    first_seq += g.batch;
                }
            }
        }
        project_into_residual(
            be,
            whole(&a.att),
            at(p, o.attn_out.0),
            c,
            whole(x_in),
            &mut a.y1,
            o.attn_out.1.map(|b| at(p, b)),
            mask(0),
            mods.map(|mv| at(mv, mod_at(2))),
            &mut a.x_mid,
            n,
            c,
        )?;

        // ---- MLP branch: x_out = x_mid + gate_mlp · drop(W₂ · gelu(W₁ · mod(LN2(x_mid)) + b₁) + b₂)
        let h2 = pre_norm(
            be,
            &norm,
            whole(&a.x_mid),
            at(p, o.norm2.0),
            o.norm2.1.map(|b| at(p, b)),
            mods.map(|mv| (at(mv, mod_at(3)), at(mv, mod_at(4)))),
            &mut a.ln2,
            &mut a.mean2,
            &mut a.rstd2,
            &mut a.h2,
        )?;
        be.linear_forward_then(
            whole(h2),
            at(p, o.fc1.0),
            whole_mut(&mut a.f1),
            n,
            c,
            m,
            LinearThen::BiasGelu {
                bias: at(p, o.fc1.1),
                gelu: whole_mut(&mut a.g),
            },
        )?;
        project_into_residual(
            be,
            whole(&a.g),
            at(p, o.fc2.0),
            m,
            whole(&a.x_mid),
            &mut a.y2,
            Some(at(p, o.fc2.1)),
            mask(1),
            mods.map(|mv| at(mv, mod_at(5))),
            x_out,
            n,
            c,
        )
    }

    /// Attention over the pass's own fused qkv buffer `[N, 3C]` (q, then k, then v per token).
    fn fused_qkv_attention(&self, geo: &Geometry) -> AttentionShape {
        AttentionShape::fused_qkv(
            geo.batch,
            self.config.heads,
            self.config.head_dim(),
            geo.tokens,
        )
    }

    /// RoPE over q or k inside a buffer with token stride `stride`: each
    /// stretch of `geo.tokens / geo.segments` tokens starts at `position_offset`.
    fn rope_shape(&self, geo: &Geometry, stride: usize) -> RopeShape {
        let per = geo.tokens / geo.segments;
        RopeShape {
            batch: geo.batch * geo.segments,
            tokens: per,
            heads: self.config.heads,
            head_dim: self.config.head_dim(),
            stride,
            batch_stride: per * stride,
            position_offset: geo.position_offset,
            base: self.config.rope_base,
        }
    }

    /// The backward of block `l`: given `dres` = ∂loss/∂x_out, leaves ∂loss/∂x_in in
    /// `dres` and accumulates the block's parameter gradients into `g` and the
    /// modulation gradients into `dmods`.
    #[allow(clippy::too_many_arguments)]
    fn block_backward<B: Backend>(
        &self,
        be: &B,
        p: &B::Buffer,
        g: &mut B::Buffer,
        l: usize,
        a: &BlockActivations<B>,
        mods: Option<&B::Buffer>,
        x_in: &B::Buffer,
        geo: &Geometry,
        dropout: Option<DropoutStreams>,
        s: &mut crate::model::network::activations::GradScratch<B>,
    ) -> Result<(), B::Error> {
        let cfg = &self.config;
        let (c, m, n) = (cfg.hidden, cfg.mlp_hidden, geo.rows());
        let o: &BlockOffsets = &self.layout().blocks[l];
        let norm = NormShape {
            rows: n,
            cols: c,
            eps: cfg.norm_eps,
        };
        let mod_at = |i: usize| l * 6 * c + i * c;
        // The branches' dropout masks (0 attention, 1 MLP) when the pass has dropout.
        let mask = |branch| {
            dropout
                .filter(|_| cfg.dropout > 0.0)
                .map(|d| d.mask(cfg.dropout, l, branch))
        };
        let dit = mods.is_some();

        // ---- MLP branch, in reverse (the activation gradients below are written, not
        // accumulated: nothing to zero first)
        branch_from_residual_backward(
            be,
            whole(&s.dres),
            whole(&a.y2),
            mods.map(|mv| at(mv, mod_at(5))),
            &mut s.dy,
            dit.then(|| at_mut(&mut s.dmods, mod_at(5))),
            mask(1),
            n,
            c,
        )?;
        be.bias_backward(whole(&s.dy), at_mut(g, o.fc2.1), n, c)?;
        be.matmul(
            &Gemm::linear_weight_grad(n, m, c),
            whole(&s.dy),
            whole(&a.g),
            at_mut(g, o.fc2.0),
        )?;
        be.matmul(
            &Gemm::linear_input_grad(n, m, c),
            whole(&s.dy),
            at(p, o.fc2.0),
            whole_mut(&mut s.dg),
        )?;
        be.gelu_backward(whole(&s.dg), whole(&a.f1), whole_mut(&mut s.df1), n * m)?;
        be.bias_backward(whole(&s.df1), at_mut(g, o.fc1.1), n, m)?;
        let h2 = if dit { &a.h2 } else { &a.ln2 };
        be.matmul(
            &Gemm::linear_weight_grad(n, c, m),
            whole(&s.df1),
            whole(h2),
            at_mut(g, o.fc1.0),
        )?;
        let dln2 = if let Some(mv) = mods {
            be.matmul(
                &Gemm::linear_input_grad(n, c, m),
                whole(&s.df1),
                at(p, o.fc1.0),
                whole_mut(&mut s.dh),
            )?;
            be.modulate_backward(
                whole(&s.dh),
                whole(&a.ln2),
                at(mv, mod_at(4)),
                whole_mut(&mut s.dln),
                at_mut(&mut s.dmods, mod_at(4)),
                1,
                n,
                c,
            )?;
            be.bias_backward(whole(&s.dh), at_mut(&mut s.dmods, mod_at(3)), n, c)?;
            &s.dln
        } else {
            be.matmul(
                &Gemm::linear_input_grad(n, c, m),
                whole(&s.df1),
                at(p, o.fc1.0),
                whole_mut(&mut s.dln),
            )?;
            &s.dln
        };
        be.layernorm_backward(
            &norm,
            whole(dln2),
            whole(&a.x_mid),
            at(p, o.norm2.0),
            whole(&a.mean2),
            whole(&a.rstd2),
            whole_mut(&mut s.dres),
            at_mut(g, o.norm2.0),
        )?;
        if let Some(b) = o.norm2.1 {
            be.bias_backward(whole(dln2), at_mut(g, b), n, c)?;
        }

        // ---- attention branch, in reverse
        branch_from_residual_backward(
            be,
            whole(&s.dres),
            whole(&a.y1),
            mods.map(|mv| at(mv, mod_at(2))),
            &mut s.dy,
            dit.then(|| at_mut(&mut s.dmods, mod_at(2))),
            mask(0),
            n,
            c,
        )?;
        if let Some(b) = o.attn_out.1 {
            be.bias_backward(whole(&s.dy), at_mut(g, b), n, c)?;
        }
        be.matmul(
            &Gemm::linear_weight_grad(n, c, c),
            whole(&s.dy),
            whole(&a.att),
            at_mut(g, o.attn_out.0),
        )?;
        be.matmul(
            &Gemm::linear_input_grad(n, c, c),
            whole(&s.dy),
            at(p, o.attn_out.0),
            whole_mut(&mut s.datt),
        )?;
        // The gradient of the fused q | k | v rows, laid out like them: the fused weight
        // [3C, C] then takes its weight and input gradients in one GEMM each.
        let shape = self.fused_qkv_attention(geo);
        be.attention_backward(
            &shape,
            &geo.mask,
            whole(&s.datt),
            whole(&a.qkv),
            at(&a.qkv, c),
            at(&a.qkv, 2 * c),
            whole(&a.att),
            whole(&a.lse),
            whole_mut(&mut s.dqkv),
            QkvOffsets::fused(c),
        )?;
        if dit {
            // Queries and keys adjacent, as in the forward: one rotation of twice the heads.
            let mut rope = self.rope_shape(geo, 3 * c);
            rope.heads *= 2;
            be.rope_backward(&rope, whole_mut(&mut s.dqkv))?;
        }
        let h1 = if dit { &a.h1 } else { &a.ln1 };
        let dh1 = if dit { &mut s.dh } else { &mut s.dln };
        be.matmul(
            &Gemm::linear_weight_grad(n, c, 3 * c),
            whole(&s.dqkv),
            whole(h1),
            at_mut(g, o.qkv.0),
        )?;
        if let Some(b) = o.qkv.1 {
            be.bias_backward(whole(&s.dqkv), at_mut(g, b), n, 3 * c)?;
        }
        be.matmul(
            &Gemm::linear_input_grad(n, c, 3 * c),
            whole(&s.dqkv),
            at(p, o.qkv.0),
            whole_mut(dh1),
        )?;
        let dln1 = if let Some(mv) = mods {
            be.modulate_backward(
                whole(&s.dh),
                whole(&a.ln1),
                at(mv, mod_at(1)),
                whole_mut(&mut s.dln),
                at_mut(&mut s.dmods, mod_at(1)),
                1,
                n,
                c,
            )?;
            be.bias_backward(whole(&s.dh), at_mut(&mut s.dmods, mod_at(0)), n, c)?;
            &s.dln
        } else {
            &s.dln
        };
        be.layernorm_backward(
            &norm,
            whole(dln1),
            whole(x_in),
            at(p, o.norm1.0),
            whole(&a.mean1),
            whole(&a.rstd1),
            whole_mut(&mut s.dres),
            at_mut(g, o.norm1.0),
        )?;
        if let Some(b) = o.norm1.1 {
            be.bias_backward(whole(dln1), at_mut(g, b), n, c)?;
        }
        Ok(())
    }

    // ---- the training pass ---------------------------------------------------

    /// Uploads a batch's ids, targets and weights into `acts`.
    pub fn load_batch<B: Backend>(
        &self,
        be: &B,
        acts: &mut Activations<B>,
        batch: &TrainBatch,
    ) -> Result<(), ModelError<B::Error>> {
        self.check_batch(acts, batch)?;
        acts.ids = be.upload_ids(&batch.inputs).map_err(ModelError::Backend)?;
        // A chunked loss runs over the rows that carry a weight only (decision 55).
        let rows = batch.weights.len();
        let weighted: Vec<u32> = (0..rows as u32)
            .filter(|&i| batch.weights[i as usize] != 0.0)
            .collect();
        let (targets, weights) = if acts.loss_rows < rows && weighted.len() < rows {
            acts.loss_row_ids = Some(be.upload_ids(&weighted).map_err(ModelError::Backend)?);
            acts.loss_row_count = weighted.len();
            weighted
                .iter()
                .map(|&i| (batch.targets[i as usize], batch.weights[i as usize]))
                .unzip()
        } else {
            acts.loss_row_ids = None;
            acts.loss_row_count = rows;
            (batch.targets.clone(), batch.weights.clone())
        };
        acts.targets = targets
            .chunks(acts.loss_rows)
            .map(|t| be.upload_ids(t))
            .collect::<Result<_, _>>()
            .map_err(ModelError::Backend)?;
        acts.weights = be.upload(&weights).map_err(ModelError::Backend)?;
        if acts.position_ids.is_some() {
            let t = batch.pass.tokens_per_sequence(batch.seq_len);
            let per = t / batch.pass.position_segments();
            let pos: Vec<u32> = (0..batch.batch * t)
                .map(|i| ((i % t) % per) as u32)
                .collect();
            acts.position_ids = Some(be.upload_ids(&pos).map_err(ModelError::Backend)?);
        }
        Ok(())
    }

    fn geometry<B: Backend>(&self, acts: &Activations<B>) -> Result<Geometry, crate::Error> {
        Ok(Geometry {
            batch: acts.batch,
            tokens: acts.pass.tokens_per_sequence(acts.seq_len),
            segments: acts.pass.position_segments(),
            position_offset: 0,
            mask: acts.pass.mask(acts.seq_len)?,
        })
    }

    /// The forward of a loaded batch up to the logits of the output rows (`acts.logits`,
    /// `[batch·L, V]`) when `acts` holds them all ([`Activations::new`]); else up to the head's
    /// input, the head running chunk by chunk in [`Transformer::backward`] and
    /// [`Transformer::loss`]. `dropout` is `None` in evaluation.
    pub fn forward<B: Backend>(
        &self,
        be: &B,
        p: &B::Buffer,
        acts: &mut Activations<B>,
        dropout: Option<DropoutStreams>,
    ) -> Result<(), ModelError<B::Error>> {
        let geo = self.geometry(acts)?;
        self.forward_inner(be, p, acts, &geo, dropout)
            .map_err(ModelError::Backend)
    }

    fn forward_inner<B: Backend>(
        &self,
        be: &B,
        p: &B::Buffer,
        acts: &mut Activations<B>,
        geo: &Geometry,
        dropout: Option<DropoutStreams>,
    ) -> Result<(), B::Error> {
        let cfg = &self.config;
        let (c, n) = (cfg.hidden, geo.rows());
        if let Some(cond) = acts.cond.as_mut() {
            self.cond_forward(be, p, cond)?;
        }
        let (first, _) = acts.residual.split_at_mut(1);
        self.embed_forward(
            be,
            p,
            &acts.ids,
            acts.position_ids.as_ref(),
            n,
            &mut first[0],
            &mut acts.grad.dy,
        )?;
        for l in 0..cfg.layers {
            let (before, after) = acts.residual.split_at_mut(l + 1);
            let mods = acts.cond.as_ref().map(|cd| &cd.mods);
            self.block_forward(
                be,
                p,
                l,
                &mut acts.blocks[l],
                mods,
                &before[l],
                &mut after[0],
                geo,
                KeyValues::OwnTokens,
                dropout,
            )?;
        }
        // The rows that get logits: the x_t half of the BD3 stream, or every token.
        let rows = acts.batch * acts.seq_len;
        let last = &acts.residual[cfg.layers];
        be.copy_rows(
            whole(last),
            geo.tokens * c,
            whole_mut(&mut acts.hx),
            acts.seq_len * c,
            acts.batch,
            acts.seq_len * c,
        )?;
        let final_mod = acts.cond.as_ref().map(|cd| &cd.final_mod);
        self.final_norm_forward(
            be,
            p,
            rows,
            &acts.hx,
            &mut acts.lnf,
            &mut acts.mean_f,
            &mut acts.rstd_f,
            &mut acts.hf,
            final_mod,
        )?;
        if acts.loss_rows >= rows {
            let h = if final_mod.is_some() {
                &acts.hf
            } else {
                &acts.lnf
            };
            self.head_logits(be, p, h, 0, rows, &mut acts.logits, acts.logits_stride)?;
        }
        Ok(())
    }

    /// Final LayerNorm, modulation (DiT) and the output head over `rows` rows of `hx`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn head_forward<B: Backend>(
        &self,
        be: &B,
        p: &B::Buffer,
        rows: usize,
        hx: &B::Buffer,
        lnf: &mut B::Buffer,
        mean: &mut B::Buffer,
        rstd: &mut B::Buffer,
        hf: &mut B::Buffer,
        final_mod: Option<&B::Buffer>,
        logits: &mut B::Buffer,
    ) -> Result<(), B::Error> {
        self.final_norm_forward(be, p, rows, hx, lnf, mean, rstd, hf, final_mod)?;
        let h = if final_mod.is_some() { &*hf } else { &*lnf };
        self.head_logits(be, p, h, 0, rows, logits, self.config.vocab_size)
    }

    /// Final LayerNorm into `lnf`, then (DiT) the final modulation into `hf`: the head's input.
    #[allow(clippy::too_many_arguments)]
    fn final_norm_forward<B: Backend>(
        &self,
        be: &B,
        p: &B::Buffer,
        rows: usize,
        hx: &B::Buffer,
        lnf: &mut B::Buffer,
        mean: &mut B::Buffer,
        rstd: &mut B::Buffer,
        hf: &mut B::Buffer,
        final_mod: Option<&B::Buffer>,
    ) -> Result<(), B::Error> {
        let c = self.config.hidden;
        let lay = self.layout();
        let norm = NormShape {
            rows,
            cols: c,
            eps: self.config.norm_eps,
        };
        pre_norm(
            be,
            &norm,
            whole(hx),
            at(p, lay.final_norm.0),
            lay.final_norm.1.map(|b| at(p, b)),
            final_mod.map(|fm| (at(fm, 0), at(fm, c))),
            lnf,
            mean,
            rstd,
            hf,
        )?;
        Ok(())
    }

    /// The output head over rows `first..first + rows` of its input `h`, into `logits[0..rows]`
    /// with rows `stride` apart.
    #[allow(clippy::too_many_arguments)]
    fn head_logits<B: Backend>(
        &self,
        be: &B,
        p: &B::Buffer,
        h: &B::Buffer,
        first: usize,
        rows: usize,
        logits: &mut B::Buffer,
        stride: usize,
    ) -> Result<(), B::Error> {
        let (c, v) = (self.config.hidden, self.config.vocab_size);
        let lay = self.layout();
        be.matmul(
            &Gemm {
                ldc: stride,
                ..Gemm::linear(rows, c, v)
            },
            at(h, first * c),
            at(p, lay.head.0),
            whole_mut(logits),
        )?;
        if let Some(b) = lay.head.1 {
            be.bias_add_rows(
                whole_mut(logits),
                at(p, b),
                RowMajor::padded(rows, v, stride),
            )?;
        }
        Ok(())
    }

    /// The weighted cross-entropy of the output rows, chunk by chunk of `acts.loss_rows`
    /// (the head runs here per chunk unless the forward computed every row's logits), into
    /// `acts.losses`; `with_chunk_gradient` then gets each chunk's first row and the logits
    /// overwritten by their gradient. Returns the summed loss.
    fn loss_by_chunks<B: Backend>(
        &self,
        be: &B,
        p: &B::Buffer,
        acts: &mut Activations<B>,
        grad_scale: f32,
        mut with_chunk_gradient: impl FnMut(&mut Activations<B>, usize, usize) -> Result<(), B::Error>,
    ) -> Result<f64, B::Error> {
        let v = self.config.vocab_size;
        let rows = acts.loss_row_count;
        let excluded = self.dit().then_some(self.config.mask_id);
        let held = acts.loss_rows >= acts.batch * acts.seq_len;
        if let Some(ids) = &acts.loss_row_ids {
            let h = if acts.cond.is_some() {
                &acts.hf
            } else {
                &acts.lnf
            };
            let c = self.config.hidden;
            be.embedding_forward(ids, whole(h), whole_mut(&mut acts.head_in), rows, c)?;
        }
        for (chunk, first) in (0..rows).step_by(acts.loss_rows.max(1)).enumerate() {
            let r = acts.loss_rows.min(rows - first);
            if !held {
                let h = if acts.loss_row_ids.is_some() {
                    &acts.head_in
                } else if acts.cond.is_some() {
                    &acts.hf
                } else {
                    &acts.lnf
                };
                let stride = acts.logits_stride;
                self.head_logits(be, p, h, first, r, &mut acts.logits, stride)?;
            }
            be.softmax_cross_entropy(
                whole_mut(&mut acts.logits),
                &acts.targets[chunk],
                at(&acts.weights, first),
                at_mut(&mut acts.losses, first),
                RowMajor::padded(r, v, acts.logits_stride),
                excluded,
                grad_scale,
            )?;
            with_chunk_gradient(acts, first, r)?;
        }
        be.sum(whole(&acts.losses), rows)
    }

    /// The loss of the forward just run, and the gradients of every parameter
    /// accumulated into `g` (scaled by `grad_scale`: 1/accumulation steps).
    /// Returns the summed weighted loss (the NELBO estimate or the AR cross-entropy).
    pub fn backward<B: Backend>(
        &self,
        be: &B,
        p: &B::Buffer,
        g: &mut B::Buffer,
        acts: &mut Activations<B>,
        dropout: Option<DropoutStreams>,
        grad_scale: f32,
    ) -> Result<f64, ModelError<B::Error>> {
        self.backward_staged(be, p, g, acts, dropout, grad_scale, |_, _| Ok(()))
    }

    /// [`backward`](Self::backward), calling `ready` after each [`BackwardStage`]: from then
    /// on the stage's ranges of `g` ([`GradientBuckets::at`]) hold their final values, and
    /// `ready` may start summing them over the ranks while the backward goes on.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_staged<B, F>(
        &self,
        be: &B,
        p: &B::Buffer,
        g: &mut B::Buffer,
        acts: &mut Activations<B>,
        dropout: Option<DropoutStreams>,
        grad_scale: f32,
        mut ready: F,
    ) -> Result<f64, ModelError<B::Error>>
    where
        B: Backend,
        F: FnMut(&mut B::Buffer, BackwardStage) -> Result<(), ModelError<B::Error>>,
    {
        let geo = self.geometry(acts)?;
        let failed = ModelError::Backend;
        let loss = self
            .head_backward(be, p, g, acts, &geo, grad_scale)
            .map_err(failed)?;
        ready(g, BackwardStage::Head)?;
        for l in (0..self.config.layers).rev() {
            let mods = acts.cond.as_ref().map(|cd| &cd.mods);
            self.block_backward(
                be,
                p,
                g,
                l,
                &acts.blocks[l],
                mods,
                &acts.residual[l],
                &geo,
                dropout,
                &mut acts.grad,
            )
            .map_err(failed)?;
            ready(g, BackwardStage::Block(l))?;
        }
        self.inputs_backward(be, p, g, acts, &geo).map_err(failed)?;
        ready(g, BackwardStage::Inputs)?;
        Ok(loss)
    }

    /// The loss, the output head, the final modulation and norm, and the scatter of their
    /// gradient into the residual stream.
    fn head_backward<B: Backend>(
        &self,
        be: &B,
        p: &B::Buffer,
        g: &mut B::Buffer,
        acts: &mut Activations<B>,
        geo: &Geometry,
        grad_scale: f32,
    ) -> Result<f64, B::Error> {
        let cfg = &self.config;
        let (c, v, n) = (cfg.hidden, cfg.vocab_size, geo.rows());
        let rows = acts.batch * acts.seq_len;
        let lay = self.layout();
        let dit = self.dit();

        // ---- loss and head, chunk by chunk of the loss rows
        let loss = self.loss_by_chunks(be, p, acts, grad_scale, |acts, first, r| {
            // The head's input and its gradient: gathered at the loss rows, or every row.
            let gathered = acts.loss_row_ids.is_some();
            let h = if gathered {
                &acts.head_in
            } else if dit {
                &acts.hf
            } else {
                &acts.lnf
            };
            let dx = if gathered {
                &mut acts.grad.dhead_in
            } else {
                &mut acts.grad.dhf
            };
            let stride = acts.logits_stride;
            if let Some(b) = lay.head.1 {
                let shape = RowMajor::padded(r, v, stride);
                be.bias_backward_rows(whole(&acts.logits), at_mut(g, b), shape)?;
            }
            be.matmul(
                &Gemm {
                    lda: stride,
                    ..Gemm::linear_weight_grad(r, c, v)
                },
                whole(&acts.logits),
                at(h, first * c),
                at_mut(g, lay.head.0),
            )?;
            be.matmul(
                &Gemm {
                    lda: stride,
                    ..Gemm::linear_input_grad(r, c, v)
                },
                whole(&acts.logits),
                at(p, lay.head.0),
                at_mut(dx, first * c),
            )
        })?;
        if let Some(ids) = &acts.loss_row_ids {
            // Rows without a loss weight have no head gradient.
            let s = &mut acts.grad;
            be.fill(whole_mut(&mut s.dhf), rows * c, 0.0)?;
            let count = acts.loss_row_count;
            be.embedding_backward(ids, whole(&s.dhead_in), whole_mut(&mut s.dhf), count, c)?;
        }

        // ---- final modulation and norm
        let s = &mut acts.grad;
        if dit {
            be.fill(whole_mut(&mut s.dmods), cfg.layers * 6 * c + 2 * c, 0.0)?;
        }
        let dlnf = if let Some(cond) = acts.cond.as_ref() {
            let off = cfg.layers * 6 * c;
            be.modulate_backward(
                whole(&s.dhf),
                whole(&acts.lnf),
                at(&cond.final_mod, c),
                whole_mut(&mut s.dlnf),
                at_mut(&mut s.dmods, off + c),
                1,
                rows,
                c,
            )?;
            be.bias_backward(whole(&s.dhf), at_mut(&mut s.dmods, off), rows, c)?;
            &s.dlnf
        } else {
            &s.dhf
        };
        be.fill(whole_mut(&mut s.dhx), rows * c, 0.0)?;
        let norm = NormShape {
            rows,
            cols: c,
            eps: cfg.norm_eps,
        };
        be.layernorm_backward(
            &norm,
            whole(dlnf),
            whole(&acts.hx),
            at(p, lay.final_norm.0),
            whole(&acts.mean_f),
            whole(&acts.rstd_f),
            whole_mut(&mut s.dhx),
            at_mut(g, lay.final_norm.0),
        )?;
        if let Some(b) = lay.final_norm.1 {
            be.bias_backward(whole(dlnf), at_mut(g, b), rows, c)?;
        }
        // Scatter back into the residual stream (the x_0 half of the BD3 stream gets no gradient here).
        be.fill(whole_mut(&mut s.dres), n * c, 0.0)?;
        be.copy_rows(
            whole(&s.dhx),
            acts.seq_len * c,
            whole_mut(&mut s.dres),
            geo.tokens * c,
            acts.batch,
            acts.seq_len * c,
        )?;

        Ok(loss)
    }

    /// The embeddings and the conditioning (the adaLN projections of every block among it).
    fn inputs_backward<B: Backend>(
        &self,
        be: &B,
        p: &B::Buffer,
        g: &mut B::Buffer,
        acts: &mut Activations<B>,
        geo: &Geometry,
    ) -> Result<(), B::Error> {
        let cfg = &self.config;
        let (c, n) = (cfg.hidden, geo.rows());
        let lay = self.layout();
        let s = &mut acts.grad;
        be.embedding_backward(&acts.ids, whole(&s.dres), at_mut(g, lay.embed), n, c)?;
        if let (Some(pos), Some(pids)) = (lay.positions, acts.position_ids.as_ref()) {
            be.embedding_backward(pids, whole(&s.dres), at_mut(g, pos), n, c)?;
        }
        if let Some(cond) = acts.cond.as_ref() {
            self.cond_backward(be, p, g, cond, s)?;
        }
        Ok(())
    }

    /// The loss of a loaded batch without gradients (`dropout` is `None` in evaluation).
    pub fn loss<B: Backend>(
        &self,
        be: &B,
        p: &B::Buffer,
        acts: &mut Activations<B>,
        dropout: Option<DropoutStreams>,
    ) -> Result<f64, ModelError<B::Error>> {
        self.forward(be, p, acts, dropout)?;
        self.loss_by_chunks(be, p, acts, 0.0, |_, _, _| Ok(()))
            .map_err(ModelError::Backend)
    }
}

/// A branch's output projection into the residual stream: `y = x·Wᵀ` (`[n, d_in]` →
/// `[n, c]`), then `out = residual + gate·drop(y + bias)` (`y` keeps what the backward reads).
/// Without dropout the projection and the residual are one [`FusedOps::linear_forward_then`](crate::backend::FusedOps::linear_forward_then).
#[allow(clippy::too_many_arguments)]
fn project_into_residual<B: Backend>(
    be: &B,
    x: Slice<'_, B::Buffer>,
    w: Slice<'_, B::Buffer>,
    d_in: usize,
    residual: Slice<'_, B::Buffer>,
    y: &mut B::Buffer,
    bias: Option<Slice<'_, B::Buffer>>,
    dropout: Option<DropoutMask>,
    gate: Option<Slice<'_, B::Buffer>>,
    out: &mut B::Buffer,
    n: usize,
    c: usize,
) -> Result<(), B::Error> {
    let Some(d) = dropout else {
        return be.linear_forward_then(
            x,
            w,
            whole_mut(y),
            n,
            d_in,
            c,
            LinearThen::GatedResidual {
                bias,
                gate,
                residual,
                out: whole_mut(out),
                tokens: n,
            },
        );
    };
    be.matmul(&Gemm::linear(n, d_in, c), x, w, whole_mut(y))?;
    let branch = ResidualBranch {
        bias,
        dropout: Some(d),
        gate,
        ..ResidualBranch::plain(1, n, c)
    };
    be.residual_forward_into(residual, whole_mut(y), branch, whole_mut(out))
}

/// The backward of [`project_into_residual`] down to the gradient of the projection's output
/// (`dy`, written), with the gate's gradient accumulated into `dgate`.
#[allow(clippy::too_many_arguments)]
fn branch_from_residual_backward<B: Backend>(
    be: &B,
    dresidual: Slice<'_, B::Buffer>,
    y: Slice<'_, B::Buffer>,
    gate: Option<Slice<'_, B::Buffer>>,
    dy: &mut B::Buffer,
    dgate: Option<SliceMut<'_, B::Buffer>>,
    dropout: Option<DropoutMask>,
    n: usize,
    c: usize,
) -> Result<(), B::Error> {
    let branch = ResidualBranch {
        dropout,
        gate,
        ..ResidualBranch::plain(1, n, c)
    };
    be.residual_backward(dresidual, y, branch, whole_mut(dy), dgate)
}

/// The adaLN `(shift, scale)` of one pre-norm.
type ShiftScale<'s, B> = (
    Slice<'s, <B as MemoryOps>::Buffer>,
    Slice<'s, <B as MemoryOps>::Buffer>,
);

/// LayerNorm of `x` into `ln` (with its `mean`, `rstd`), then, for the DiT, the adaLN
/// modulation `(shift, scale)` into `h`: returns the branch's input (`h` when modulated, else
/// `ln`). One backend call either way, so a backend can fuse the two.
#[allow(clippy::too_many_arguments)]
fn pre_norm<'a, B: Backend>(
    be: &B,
    norm: &NormShape,
    x: Slice<'_, B::Buffer>,
    weight: Slice<'_, B::Buffer>,
    bias: Option<Slice<'_, B::Buffer>>,
    modulation: Option<ShiftScale<'_, B>>,
    ln: &'a mut B::Buffer,
    mean: &mut B::Buffer,
    rstd: &mut B::Buffer,
    h: &'a mut B::Buffer,
) -> Result<&'a B::Buffer, B::Error> {
    match modulation {
        Some((shift, scale)) => {
            be.layernorm_modulate_forward(
                norm,
                x,
                weight,
                bias,
                shift,
                scale,
                norm.rows,
                whole_mut(ln),
                whole_mut(mean),
                whole_mut(rstd),
                whole_mut(h),
            )?;
            Ok(h)
        }
        None => {
            be.layernorm_forward(
                norm,
                x,
                weight,
                bias,
                whole_mut(ln),
                whole_mut(mean),
                whole_mut(rstd),
            )?;
            Ok(ln)
        }
    }
}
