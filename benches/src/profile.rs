//! A [`Backend`] that forwards every call to another and times it, per op
//! name, with the matmul FLOPs counted: where a training step spends its time,
//! and the GFLOP/s its matmuls reach. On a GPU, [`Profiled::synchronized`]
//! waits for each op to finish, so its time is the op's and not its launch's.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use did_core::backend::prelude::*;
use did_core::backend::{
    linear_forward_then_in_steps, AdamW, AttentionShape, Gemm, LinearThen, NormShape,
    OptimizerStep, QkvOffsets, ResidualBranch, RopeShape, RowGroups, RowMajor, Slice, SliceMut,
    UpdatedWeights,
};
use did_core::mask::AttentionMask;
use did_core::rng::RngStream;
use did_core::sample::categorical::SampledToken;
use did_core::sample::nucleus::Nucleus;
use did_core::sample::DrawSpec;

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

type S<'a, B> = Slice<'a, <B as MemoryOps>::Buffer>;
type M<'a, B> = SliceMut<'a, <B as MemoryOps>::Buffer>;

/// Methods that forward to `inner` untimed: `fn name(&self, arg: T, …) -> R;`.
macro_rules! forward {
    ($(fn $name:ident(&self $(, $arg:ident: $ty:ty)* $(,)?) -> $ret:ty;)*) => {
        $(fn $name(&self $(, $arg: $ty)*) -> $ret {
            self.inner.$name($($arg),*)
        })*
    };
}

/// Methods that forward to `inner`, timed under a label with no FLOPs counted:
/// `fn name(&self, arg: T, …) -> R => "label";`.
macro_rules! timed_forward {
    ($(fn $name:ident(&self $(, $arg:ident: $ty:ty)* $(,)?) -> $ret:ty => $label:literal;)*) => {
        $(fn $name(&self $(, $arg: $ty)*) -> $ret {
            self.timed($label, 0, || self.inner.$name($($arg),*))
        })*
    };
}

type R<B, T = ()> = Result<T, <B as MemoryOps>::Error>;

impl<B: Backend> MemoryOps for Profiled<B> {
    type Buffer = B::Buffer;
    type Ids = B::Ids;
    type Error = B::Error;
    forward! {
        fn name(&self) -> &str;
        fn stores_below_f32(&self) -> bool;
        fn synchronize(&self) -> R<B>;
        fn padded_row_stride(&self, cols: usize) -> usize;
    }
    timed_forward! {
        fn zeros(&self, len: usize) -> R<B, B::Buffer> => "zeros";
        fn zeros_f32(&self, len: usize) -> R<B, B::Buffer> => "zeros";
        fn upload(&self, host: &[f32]) -> R<B, B::Buffer> => "upload";
        fn upload_f32(&self, host: &[f32]) -> R<B, B::Buffer> => "upload";
        fn upload_weights(&self, host: &[f32], matrices: &[did_core::backend::WeightMatrix], format: did_core::backend::WeightFormat) -> R<B, B::Buffer> => "upload";
        fn round_into(&self, src: S<'_, B>, dst: M<'_, B>, len: usize) -> R<B> => "round_into";
        fn download(&self, src: S<'_, B>, out: &mut [f32]) -> R<B> => "download";
        fn upload_ids(&self, host: &[u32]) -> R<B, B::Ids> => "upload_ids";
        fn fill(&self, dst: M<'_, B>, len: usize, value: f32) -> R<B> => "fill";
        fn copy(&self, src: S<'_, B>, dst: M<'_, B>, len: usize) -> R<B> => "copy";
        fn copy_rows(&self, src: S<'_, B>, ss: usize, dst: M<'_, B>, ds: usize, rows: usize, cols: usize) -> R<B> => "copy_rows";
        fn copy_row_groups(&self, src: S<'_, B>, dst: M<'_, B>, layout: &RowGroups) -> R<B> => "copy_row_groups";
    }
}

impl<B: Backend> RecordingOps for Profiled<B> {}

impl<B: Backend> LinearOps for Profiled<B> {
    fn matmul(&self, spec: &Gemm, a: S<'_, B>, b: S<'_, B>, c: M<'_, B>) -> R<B> {
        self.timed(self.gemm_label(spec), spec.flops() as u64, || {
            self.inner.matmul(spec, a, b, c)
        })
    }
    timed_forward! {
        fn bias_add_rows(&self, x: M<'_, B>, bias: S<'_, B>, shape: RowMajor) -> R<B> => "bias_add";
        fn bias_backward_rows(&self, dy: S<'_, B>, db: M<'_, B>, shape: RowMajor) -> R<B> => "bias_backward";
    }
}

impl<B: Backend> NormOps for Profiled<B> {
    timed_forward! {
        fn layernorm_forward(&self, s: &NormShape, x: S<'_, B>, w: S<'_, B>, b: Option<S<'_, B>>, o: M<'_, B>, m: M<'_, B>, r: M<'_, B>) -> R<B> => "layernorm_forward";
        fn layernorm_backward(&self, s: &NormShape, d: S<'_, B>, x: S<'_, B>, w: S<'_, B>, m: S<'_, B>, r: S<'_, B>, dx: M<'_, B>, dw: M<'_, B>) -> R<B> => "layernorm_backward";
        fn modulate_forward(&self, x: S<'_, B>, sh: S<'_, B>, sc: S<'_, B>, o: M<'_, B>, b: usize, t: usize, c: usize) -> R<B> => "modulate_forward";
        fn modulate_backward(&self, d: S<'_, B>, x: S<'_, B>, sc: S<'_, B>, dx: M<'_, B>, dsc: M<'_, B>, b: usize, t: usize, c: usize) -> R<B> => "modulate_backward";
    }
}

impl<B: Backend> AttentionOps for Profiled<B> {
    timed_forward! {
        fn rope_forward(&self, s: &RopeShape, x: M<'_, B>) -> R<B> => "rope_forward";
        fn rope_backward(&self, s: &RopeShape, dx: M<'_, B>) -> R<B> => "rope_backward";
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
    ) -> R<B> {
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
    ) -> R<B> {
        let flops = 5 * attention_flops(s, mask) / 2;
        self.timed("attention_backward", flops, || {
            self.inner
                .attention_backward(s, mask, d, q, k, v, o, l, grads, at)
        })
    }
}

impl<B: Backend> ActivationOps for Profiled<B> {
    timed_forward! {
        fn gated_residual_forward(&self, r: M<'_, B>, y: S<'_, B>, g: Option<S<'_, B>>, b: usize, t: usize, c: usize) -> R<B> => "gated_residual_forward";
        fn gated_residual_backward(&self, dr: S<'_, B>, y: S<'_, B>, g: Option<S<'_, B>>, dy: M<'_, B>, dg: Option<M<'_, B>>, b: usize, t: usize, c: usize) -> R<B> => "gated_residual_backward";
        fn gelu_forward(&self, x: S<'_, B>, o: M<'_, B>, n: usize) -> R<B> => "gelu_forward";
        fn gelu_backward(&self, d: S<'_, B>, x: S<'_, B>, dx: M<'_, B>, n: usize) -> R<B> => "gelu_backward";
        fn silu_forward(&self, x: S<'_, B>, o: M<'_, B>, n: usize) -> R<B> => "silu_forward";
        fn silu_backward(&self, d: S<'_, B>, x: S<'_, B>, dx: M<'_, B>, n: usize) -> R<B> => "silu_backward";
        fn dropout(&self, x: M<'_, B>, n: usize, p: f32, stream: &RngStream) -> R<B> => "dropout";
    }
}

impl<B: Backend> LossOps for Profiled<B> {
    timed_forward! {
        fn embedding_forward(&self, ids: &B::Ids, t: S<'_, B>, o: M<'_, B>, r: usize, c: usize) -> R<B> => "embedding_forward";
        fn embedding_backward(&self, ids: &B::Ids, d: S<'_, B>, dt: M<'_, B>, r: usize, c: usize) -> R<B> => "embedding_backward";
        fn softmax_cross_entropy(&self, l: M<'_, B>, t: &B::Ids, w: S<'_, B>, ls: M<'_, B>, shape: RowMajor, e: Option<u32>, g: f32) -> R<B> => "softmax_cross_entropy";
    }
}

impl<B: Backend> OptimizerOps for Profiled<B> {
    timed_forward! {
        fn sum(&self, x: S<'_, B>, n: usize) -> R<B, f64> => "sum";
        fn sum_squares(&self, x: S<'_, B>, n: usize) -> R<B, f64> => "sum_squares";
        fn scale(&self, x: M<'_, B>, n: usize, f: f32) -> R<B> => "scale";
        fn adamw(&self, hp: &AdamW, p: M<'_, B>, g: S<'_, B>, m: M<'_, B>, v: M<'_, B>, n: usize) -> R<B> => "adamw";
        fn ema_update(&self, e: M<'_, B>, p: S<'_, B>, n: usize, d: f32) -> R<B> => "ema_update";
        fn optimizer_step(&self, step: &OptimizerStep, params: UpdatedWeights<'_, B::Buffer>, grads: M<'_, B>, m: M<'_, B>, v: M<'_, B>, ema: Option<UpdatedWeights<'_, B::Buffer>>, n: usize) -> R<B> => "optimizer_step";
    }
}

impl<B: Backend> DrawOps for Profiled<B> {
    timed_forward! {
        fn draw_tokens(&self, logits: S<'_, B>, vocab: usize, mask_id: u32, nucleus: &Nucleus, draws: &[DrawSpec], out: &mut [SampledToken]) -> R<B> => "draw_tokens";
    }
}

impl<B: Backend> FusedOps for Profiled<B> {
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
    timed_forward! {
        fn layernorm_modulate_forward(&self, s: &NormShape, x: S<'_, B>, w: S<'_, B>, b: Option<S<'_, B>>, sh: S<'_, B>, sc: S<'_, B>, t: usize, ln: M<'_, B>, m: M<'_, B>, r: M<'_, B>, o: M<'_, B>) -> R<B> => "layernorm_modulate_forward";
        fn residual_forward_into(&self, r: S<'_, B>, y: M<'_, B>, branch: ResidualBranch<'_, B::Buffer>, o: M<'_, B>) -> R<B> => "residual_forward_into";
        fn residual_backward(&self, dr: S<'_, B>, y: S<'_, B>, branch: ResidualBranch<'_, B::Buffer>, dy: M<'_, B>, dg: Option<M<'_, B>>) -> R<B> => "residual_backward";
        fn bias_gelu_forward(&self, x: M<'_, B>, b: S<'_, B>, o: M<'_, B>, rows: usize, cols: usize) -> R<B> => "bias_gelu_forward";
        fn rope_forward_and_copy(&self, s: &RopeShape, x: M<'_, B>, copy_from: usize, dst: M<'_, B>, layout: &RowGroups) -> R<B> => "rope_forward_and_copy";
    }
}
