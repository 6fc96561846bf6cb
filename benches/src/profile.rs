//! A [`Backend`] that forwards every call to another and times it, per op
//! name, with the matmul FLOPs counted: where a training step spends its time,
//! and the GFLOP/s its matmuls reach. On a GPU, [`Profiled::synchronized`]
//! waits for each op to finish, so its time is the op's and not its launch's.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use did_core::backend::{
    linear_forward_then_in_steps, AdamW, AttentionShape, Backend, DrawSpec, DropoutMask, Gemm,
    LinearThen, NormShape, OptimizerStep, QkvOffsets, RopeShape, RowGroups, RowMajor, Slice,
    SliceMut, UpdatedWeights,
};
use did_core::mask::AttentionMask;
use did_core::rng::RngStream;
use did_core::sample::categorical::SampledToken;
use did_core::sample::nucleus::Nucleus;

/// Time and calls of one op.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpTime {
    /// Calls.
    pub calls: u64,
    /// Wall time inside the op.
    pub time: Duration,
    /// FLOPs (matmul only).
    pub flops: u64,
}

/// The wrapper.
pub struct Profiled<B> {
    /// The backend doing the work.
    pub inner: B,
    times: RefCell<BTreeMap<&'static str, OpTime>>,
    synchronize: bool,
    /// Matmuls timed per shape (`matmul m×n×k NT`) instead of all together.
    gemm_shapes: Option<RefCell<BTreeMap<String, &'static str>>>,
}

impl<B: Backend> Profiled<B> {
    /// Wraps `inner`.
    pub fn new(inner: B) -> Self {
        Profiled {
            inner,
            times: RefCell::new(BTreeMap::new()),
            synchronize: false,
            gemm_shapes: None,
        }
    }

    /// Times each matmul shape apart (`matmul m×n×k`, `T` for a transposed operand), so the
    /// GEMMs that fall short of the GPU's rate show.
    pub fn by_gemm_shape(self) -> Self {
        Profiled {
            gemm_shapes: Some(RefCell::new(BTreeMap::new())),
            ..self
        }
    }

    /// The label of `spec`: `matmul`, or its shape (interned: a model has a few dozen).
    fn gemm_label(&self, spec: &Gemm) -> &'static str {
        self.shape_label("matmul", spec)
    }

    /// `what`, and the GEMM's shape where the profile keeps shapes.
    fn shape_label(&self, what: &'static str, spec: &Gemm) -> &'static str {
        let Some(shapes) = &self.gemm_shapes else {
            return what;
        };
        let t = |x: bool| if x { 'T' } else { 'N' };
        let label = format!(
            "{what} {}×{}×{} {}{}{}",
            spec.m,
            spec.n,
            spec.k,
            t(spec.trans_a),
            t(spec.trans_b),
            if spec.batch > 1 {
                format!(" ×{}", spec.batch)
            } else {
                String::new()
            }
        );
        let mut shapes = shapes.borrow_mut();
        let interned: &'static str = shapes
            .entry(label)
            .or_insert_with_key(|l| Box::leak(l.clone().into_boxed_str()));
        interned
    }

    /// Wraps an asynchronous `inner` (a GPU): every op is followed by a synchronize inside its
    /// timing. The sum is then slower than the unprofiled run by a launch round trip per op.
    pub fn synchronized(inner: B) -> Self {
        Profiled {
            synchronize: true,
            ..Self::new(inner)
        }
    }

    /// Times so far, by op.
    pub fn times(&self) -> BTreeMap<&'static str, OpTime> {
        self.times.borrow().clone()
    }

    /// Forgets the times.
    pub fn reset(&self) {
        self.times.borrow_mut().clear();
    }

    fn timed<R>(&self, name: &'static str, flops: u64, f: impl FnOnce() -> R) -> R {
        let start = Instant::now();
        let r = f();
        if self.synchronize {
            // An error here is the op's own, and shows at the next call.
            let _ = self.inner.synchronize();
        }
        let mut t = self.times.borrow_mut();
        let e = t.entry(name).or_default();
        e.calls += 1;
        e.time += start.elapsed();
        e.flops += flops;
        r
    }
}

/// The useful FLOPs of an attention forward: S = Q·Kᵀ and O = P·V, 2 · head_dim each per
/// (query, key) pair the mask allows, over heads and sequences — what FlashAttention's papers
/// count, so the TFLOP/s compare. Its backward is counted as 2.5 × that (five products to two:
/// dV, dP, dQ, dK and S again), whatever a kernel recomputes beyond.
fn attention_flops(s: &AttentionShape, mask: &AttentionMask) -> u64 {
    let keys = 0..s.kv_len;
    let pairs: usize = (0..s.q_len)
        .map(|q| mask.key_ranges(q).overlap(&keys))
        .sum();
    (4 * pairs * s.head_dim * s.heads * s.batch) as u64
}

type S<'a, B> = Slice<'a, <B as Backend>::Buffer>;
type M<'a, B> = SliceMut<'a, <B as Backend>::Buffer>;

impl<B: Backend> Backend for Profiled<B> {
    type Buffer = B::Buffer;
    type Ids = B::Ids;
    type Error = B::Error;

    fn name(&self) -> &str {
        self.inner.name()
    }
    fn zeros(&self, len: usize) -> Result<B::Buffer, B::Error> {
        self.timed("zeros", 0, || self.inner.zeros(len))
    }
    fn zeros_f32(&self, len: usize) -> Result<B::Buffer, B::Error> {
        self.timed("zeros", 0, || self.inner.zeros_f32(len))
    }
    fn upload(&self, host: &[f32]) -> Result<B::Buffer, B::Error> {
        self.timed("upload", 0, || self.inner.upload(host))
    }
    fn stores_below_f32(&self) -> bool {
        self.inner.stores_below_f32()
    }
    fn upload_f32(&self, host: &[f32]) -> Result<B::Buffer, B::Error> {
        self.timed("upload", 0, || self.inner.upload_f32(host))
    }
    fn round_into(&self, src: S<'_, B>, dst: M<'_, B>, len: usize) -> Result<(), B::Error> {
        self.timed("round_into", 0, || self.inner.round_into(src, dst, len))
    }
    fn download(&self, src: S<'_, B>, out: &mut [f32]) -> Result<(), B::Error> {
        self.timed("download", 0, || self.inner.download(src, out))
    }
    fn upload_ids(&self, host: &[u32]) -> Result<B::Ids, B::Error> {
        self.timed("upload_ids", 0, || self.inner.upload_ids(host))
    }
    fn fill(&self, dst: M<'_, B>, len: usize, value: f32) -> Result<(), B::Error> {
        self.timed("fill", 0, || self.inner.fill(dst, len, value))
    }
    fn copy(&self, src: S<'_, B>, dst: M<'_, B>, len: usize) -> Result<(), B::Error> {
        self.timed("copy", 0, || self.inner.copy(src, dst, len))
    }
    fn copy_rows(
        &self,
        src: S<'_, B>,
        ss: usize,
        dst: M<'_, B>,
        ds: usize,
        rows: usize,
        cols: usize,
    ) -> Result<(), B::Error> {
        self.timed("copy_rows", 0, || {
            self.inner.copy_rows(src, ss, dst, ds, rows, cols)
        })
    }
    fn copy_row_groups(
        &self,
        src: S<'_, B>,
        dst: M<'_, B>,
        layout: &RowGroups,
    ) -> Result<(), B::Error> {
        self.timed("copy_row_groups", 0, || {
            self.inner.copy_row_groups(src, dst, layout)
        })
    }
    fn synchronize(&self) -> Result<(), B::Error> {
        self.inner.synchronize()
    }
    fn matmul(&self, spec: &Gemm, a: S<'_, B>, b: S<'_, B>, c: M<'_, B>) -> Result<(), B::Error> {
        self.timed(self.gemm_label(spec), spec.flops() as u64, || {
            self.inner.matmul(spec, a, b, c)
        })
    }
    fn linear_forward_then(
        &self,
        x: S<'_, B>,
        w: S<'_, B>,
        y: M<'_, B>,
        rows: usize,
        d_in: usize,
        d_out: usize,
        then: LinearThen<'_, B::Buffer>,
    ) -> Result<(), B::Error> {
        // Over many rows (training, refining) no backend fuses them: the GEMM and the op are
        // timed apart, as before. Over a few (a draft call) the call is timed whole.
        if rows > 8 {
            return linear_forward_then_in_steps(self, x, w, y, rows, d_in, d_out, then);
        }
        let spec = Gemm::linear(rows, d_in, d_out);
        let what = match then {
            LinearThen::BiasGelu { .. } => "linear+bias_gelu",
            LinearThen::GatedResidual { .. } => "linear+gated_residual",
        };
        self.timed(self.shape_label(what, &spec), spec.flops() as u64, || {
            self.inner
                .linear_forward_then(x, w, y, rows, d_in, d_out, then)
        })
    }
    fn padded_row_stride(&self, cols: usize) -> usize {
        self.inner.padded_row_stride(cols)
    }
    fn bias_add_rows(&self, x: M<'_, B>, bias: S<'_, B>, shape: RowMajor) -> Result<(), B::Error> {
        self.timed("bias_add", 0, || self.inner.bias_add_rows(x, bias, shape))
    }
    fn bias_backward_rows(
        &self,
        dy: S<'_, B>,
        db: M<'_, B>,
        shape: RowMajor,
    ) -> Result<(), B::Error> {
        self.timed("bias_backward", 0, || {
            self.inner.bias_backward_rows(dy, db, shape)
        })
    }
    fn layernorm_forward(
        &self,
        s: &NormShape,
        x: S<'_, B>,
        w: S<'_, B>,
        b: Option<S<'_, B>>,
        o: M<'_, B>,
        m: M<'_, B>,
        r: M<'_, B>,
    ) -> Result<(), B::Error> {
        self.timed("layernorm_forward", 0, || {
            self.inner.layernorm_forward(s, x, w, b, o, m, r)
        })
    }
    fn layernorm_backward(
        &self,
        s: &NormShape,
        d: S<'_, B>,
        x: S<'_, B>,
        w: S<'_, B>,
        m: S<'_, B>,
        r: S<'_, B>,
        dx: M<'_, B>,
        dw: M<'_, B>,
    ) -> Result<(), B::Error> {
        self.timed("layernorm_backward", 0, || {
            self.inner.layernorm_backward(s, d, x, w, m, r, dx, dw)
        })
    }
    fn modulate_forward(
        &self,
        x: S<'_, B>,
        sh: S<'_, B>,
        sc: S<'_, B>,
        o: M<'_, B>,
        b: usize,
        t: usize,
        c: usize,
    ) -> Result<(), B::Error> {
        self.timed("modulate_forward", 0, || {
            self.inner.modulate_forward(x, sh, sc, o, b, t, c)
        })
    }
    fn modulate_backward(
        &self,
        d: S<'_, B>,
        x: S<'_, B>,
        sc: S<'_, B>,
        dx: M<'_, B>,
        dsc: M<'_, B>,
        b: usize,
        t: usize,
        c: usize,
    ) -> Result<(), B::Error> {
        self.timed("modulate_backward", 0, || {
            self.inner.modulate_backward(d, x, sc, dx, dsc, b, t, c)
        })
    }
    fn gated_residual_forward(
        &self,
        r: M<'_, B>,
        y: S<'_, B>,
        g: Option<S<'_, B>>,
        b: usize,
        t: usize,
        c: usize,
    ) -> Result<(), B::Error> {
        self.timed("gated_residual_forward", 0, || {
            self.inner.gated_residual_forward(r, y, g, b, t, c)
        })
    }
    fn gated_residual_backward(
        &self,
        dr: S<'_, B>,
        y: S<'_, B>,
        g: Option<S<'_, B>>,
        dy: M<'_, B>,
        dg: Option<M<'_, B>>,
        b: usize,
        t: usize,
        c: usize,
    ) -> Result<(), B::Error> {
        self.timed("gated_residual_backward", 0, || {
            self.inner
                .gated_residual_backward(dr, y, g, dy, dg, b, t, c)
        })
    }
    fn layernorm_modulate_forward(
        &self,
        s: &NormShape,
        x: S<'_, B>,
        w: S<'_, B>,
        b: Option<S<'_, B>>,
        sh: S<'_, B>,
        sc: S<'_, B>,
        t: usize,
        ln: M<'_, B>,
        m: M<'_, B>,
        r: M<'_, B>,
        o: M<'_, B>,
    ) -> Result<(), B::Error> {
        self.timed("layernorm_modulate_forward", 0, || {
            self.inner
                .layernorm_modulate_forward(s, x, w, b, sh, sc, t, ln, m, r, o)
        })
    }
    fn gated_residual_forward_into(
        &self,
        r: S<'_, B>,
        y: S<'_, B>,
        g: Option<S<'_, B>>,
        o: M<'_, B>,
        b: usize,
        t: usize,
        c: usize,
    ) -> Result<(), B::Error> {
        self.timed("gated_residual_forward_into", 0, || {
            self.inner.gated_residual_forward_into(r, y, g, o, b, t, c)
        })
    }
    fn bias_gated_residual_forward_into(
        &self,
        r: S<'_, B>,
        y: M<'_, B>,
        bias: S<'_, B>,
        g: Option<S<'_, B>>,
        o: M<'_, B>,
        b: usize,
        t: usize,
        c: usize,
    ) -> Result<(), B::Error> {
        self.timed("bias_gated_residual_forward_into", 0, || {
            self.inner
                .bias_gated_residual_forward_into(r, y, bias, g, o, b, t, c)
        })
    }
    fn bias_dropout_gated_residual_forward_into(
        &self,
        r: S<'_, B>,
        y: M<'_, B>,
        bias: Option<S<'_, B>>,
        d: DropoutMask,
        g: Option<S<'_, B>>,
        o: M<'_, B>,
        b: usize,
        t: usize,
        c: usize,
    ) -> Result<(), B::Error> {
        self.timed("bias_dropout_gated_residual_forward_into", 0, || {
            self.inner
                .bias_dropout_gated_residual_forward_into(r, y, bias, d, g, o, b, t, c)
        })
    }
    fn gated_residual_backward_dropout(
        &self,
        dr: S<'_, B>,
        y: S<'_, B>,
        g: Option<S<'_, B>>,
        dy: M<'_, B>,
        dg: Option<M<'_, B>>,
        d: DropoutMask,
        b: usize,
        t: usize,
        c: usize,
    ) -> Result<(), B::Error> {
        self.timed("gated_residual_backward_dropout", 0, || {
            self.inner
                .gated_residual_backward_dropout(dr, y, g, dy, dg, d, b, t, c)
        })
    }
    fn bias_gelu_forward(
        &self,
        x: M<'_, B>,
        b: S<'_, B>,
        o: M<'_, B>,
        rows: usize,
        cols: usize,
    ) -> Result<(), B::Error> {
        self.timed("bias_gelu_forward", 0, || {
            self.inner.bias_gelu_forward(x, b, o, rows, cols)
        })
    }
    fn rope_forward(&self, s: &RopeShape, x: M<'_, B>) -> Result<(), B::Error> {
        self.timed("rope_forward", 0, || self.inner.rope_forward(s, x))
    }
    fn rope_forward_and_copy(
        &self,
        s: &RopeShape,
        x: M<'_, B>,
        copy_from: usize,
        dst: M<'_, B>,
        layout: &RowGroups,
    ) -> Result<(), B::Error> {
        self.timed("rope_forward_and_copy", 0, || {
            self.inner
                .rope_forward_and_copy(s, x, copy_from, dst, layout)
        })
    }
    fn rope_backward(&self, s: &RopeShape, dx: M<'_, B>) -> Result<(), B::Error> {
        self.timed("rope_backward", 0, || self.inner.rope_backward(s, dx))
    }
    fn attention_forward(
        &self,
        s: &AttentionShape,
        mask: &AttentionMask,
        q: S<'_, B>,
        k: S<'_, B>,
        v: S<'_, B>,
        o: M<'_, B>,
        l: M<'_, B>,
    ) -> Result<(), B::Error> {
        self.timed("attention_forward", attention_flops(s, mask), || {
            self.inner.attention_forward(s, mask, q, k, v, o, l)
        })
    }
    fn attention_backward(
        &self,
        s: &AttentionShape,
        mask: &AttentionMask,
        d: S<'_, B>,
        q: S<'_, B>,
        k: S<'_, B>,
        v: S<'_, B>,
        o: S<'_, B>,
        l: S<'_, B>,
        grads: M<'_, B>,
        at: QkvOffsets,
    ) -> Result<(), B::Error> {
        self.timed(
            "attention_backward",
            5 * attention_flops(s, mask) / 2,
            || {
                self.inner
                    .attention_backward(s, mask, d, q, k, v, o, l, grads, at)
            },
        )
    }
    fn gelu_forward(&self, x: S<'_, B>, o: M<'_, B>, n: usize) -> Result<(), B::Error> {
        self.timed("gelu_forward", 0, || self.inner.gelu_forward(x, o, n))
    }
    fn gelu_backward(
        &self,
        d: S<'_, B>,
        x: S<'_, B>,
        dx: M<'_, B>,
        n: usize,
    ) -> Result<(), B::Error> {
        self.timed("gelu_backward", 0, || self.inner.gelu_backward(d, x, dx, n))
    }
    fn silu_forward(&self, x: S<'_, B>, o: M<'_, B>, n: usize) -> Result<(), B::Error> {
        self.timed("silu_forward", 0, || self.inner.silu_forward(x, o, n))
    }
    fn silu_backward(
        &self,
        d: S<'_, B>,
        x: S<'_, B>,
        dx: M<'_, B>,
        n: usize,
    ) -> Result<(), B::Error> {
        self.timed("silu_backward", 0, || self.inner.silu_backward(d, x, dx, n))
    }
    fn dropout(&self, x: M<'_, B>, n: usize, p: f32, stream: &RngStream) -> Result<(), B::Error> {
        self.timed("dropout", 0, || self.inner.dropout(x, n, p, stream))
    }
    fn embedding_forward(
        &self,
        ids: &B::Ids,
        t: S<'_, B>,
        o: M<'_, B>,
        r: usize,
        c: usize,
    ) -> Result<(), B::Error> {
        self.timed("embedding_forward", 0, || {
            self.inner.embedding_forward(ids, t, o, r, c)
        })
    }
    fn embedding_backward(
        &self,
        ids: &B::Ids,
        d: S<'_, B>,
        dt: M<'_, B>,
        r: usize,
        c: usize,
    ) -> Result<(), B::Error> {
        self.timed("embedding_backward", 0, || {
            self.inner.embedding_backward(ids, d, dt, r, c)
        })
    }
    fn softmax_cross_entropy(
        &self,
        l: M<'_, B>,
        t: &B::Ids,
        w: S<'_, B>,
        ls: M<'_, B>,
        shape: RowMajor,
        e: Option<u32>,
        g: f32,
    ) -> Result<(), B::Error> {
        self.timed("softmax_cross_entropy", 0, || {
            self.inner.softmax_cross_entropy(l, t, w, ls, shape, e, g)
        })
    }
    fn sum(&self, x: S<'_, B>, n: usize) -> Result<f64, B::Error> {
        self.timed("sum", 0, || self.inner.sum(x, n))
    }
    fn sum_squares(&self, x: S<'_, B>, n: usize) -> Result<f64, B::Error> {
        self.timed("sum_squares", 0, || self.inner.sum_squares(x, n))
    }
    fn scale(&self, x: M<'_, B>, n: usize, f: f32) -> Result<(), B::Error> {
        self.timed("scale", 0, || self.inner.scale(x, n, f))
    }
    fn adamw(
        &self,
        hp: &AdamW,
        p: M<'_, B>,
        g: S<'_, B>,
        m: M<'_, B>,
        v: M<'_, B>,
        n: usize,
    ) -> Result<(), B::Error> {
        self.timed("adamw", 0, || self.inner.adamw(hp, p, g, m, v, n))
    }
    fn ema_update(&self, e: M<'_, B>, p: S<'_, B>, n: usize, d: f32) -> Result<(), B::Error> {
        self.timed("ema_update", 0, || self.inner.ema_update(e, p, n, d))
    }
    fn optimizer_step(
        &self,
        step: &OptimizerStep,
        params: UpdatedWeights<'_, B::Buffer>,
        grads: M<'_, B>,
        m: M<'_, B>,
        v: M<'_, B>,
        ema: Option<UpdatedWeights<'_, B::Buffer>>,
        n: usize,
    ) -> Result<(), B::Error> {
        self.timed("optimizer_step", 0, || {
            self.inner.optimizer_step(step, params, grads, m, v, ema, n)
        })
    }
    fn draw_tokens(
        &self,
        logits: S<'_, B>,
        vocab: usize,
        mask_id: u32,
        nucleus: &Nucleus,
        draws: &[DrawSpec],
        out: &mut [SampledToken],
    ) -> Result<(), B::Error> {
        self.timed("draw_tokens", 0, || {
            self.inner
                .draw_tokens(logits, vocab, mask_id, nucleus, draws, out)
        })
    }
}
