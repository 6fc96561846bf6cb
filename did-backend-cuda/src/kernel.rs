//! Every kernel the backend launches, named by [`Kernel`], and the one place that says which
//! arguments each takes.
//!
//! A kernel's arguments reach it as untyped bytes: a launch that passes them in the wrong order
//! or with the wrong types faults (or worse, computes) on a GPU, and the CPU emulation, which
//! calls the kernels from C++, never sees the host's list. So each kernel's argument list is
//! written once, in the table below, with the names and Rust types the `.cu` source declares.
//! From it come the typed launcher the ops call (`Launch::fill(dst, n, value)`: the compiler
//! checks every call) and [`Kernel::params`], which a test checks against the `extern "C"`
//! signature in the source — names, order and types — on any machine.

use cudarc::driver::DeviceRepr;

use crate::kernels::SOURCES;
use crate::launch::{Arg, Args, Launch};
use crate::CudaError;

/// A kernel source file in `kernels/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// `elementwise.cu`: fills, copies, biases, activations, residuals, optimizers, embeddings.
    Elementwise,
    /// `linear.cu`: the few-rows linear kernels.
    Linear,
    /// `norm.cu`: LayerNorm, rotary embedding, the softmax cross-entropy.
    Norm,
    /// `attention.cu`: the reference and flash attention kernels.
    Attention,
    /// `sample.cu`: the token draw.
    Sample,
}

impl Source {
    /// Every source, in the order of [`SOURCES`].
    pub const ALL: [Source; 5] = [
        Source::Elementwise,
        Source::Linear,
        Source::Norm,
        Source::Attention,
        Source::Sample,
    ];

    /// The file's name, e.g. `norm.cu`.
    ///
    /// ```
    /// use did_backend_cuda::kernel::Source;
    /// assert_eq!(Source::Norm.file(), "norm.cu");
    /// ```
    pub fn file(self) -> &'static str {
        SOURCES[self as usize].0
    }

    /// The file's text.
    pub fn text(self) -> &'static str {
        SOURCES[self as usize].1
    }
}

/// One parameter of a kernel, as the `.cu` source declares it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Param {
    /// A device pointer (any `T*`), passed as its `u64` address.
    Ptr,
    /// `i64`.
    I64,
    /// `int`.
    I32,
    /// `unsigned`.
    U32,
    /// `float`.
    F32,
    /// `double`.
    F64,
    /// `Shape` (attention.cu), passed as [`AttentionShapeC`].
    Shape,
}

/// A value a launcher passes: the kernel parameters it fills, by name and type, and how.
pub(crate) trait KernelArg: Copy {
    /// `(name, type)` of each parameter filled; `None` for the name: the launcher's own.
    const PARAMS: &'static [(Option<&'static str>, Param)];
    /// Appends the arguments.
    fn push(self, args: &mut Args);
}

macro_rules! scalar_arg {
    ($($t:ty => $param:ident),* $(,)?) => {$(
        impl KernelArg for $t {
            const PARAMS: &'static [(Option<&'static str>, Param)] = &[(None, Param::$param)];
            fn push(self, args: &mut Args) {
                args.push(Arg::$param(self));
            }
        }
    )*};
}
// Device pointers are the only u64 arguments.
scalar_arg!(u64 => Ptr, i64 => I64, i32 => I32, u32 => U32, f32 => F32, f64 => F64);

/// The attention shape as the kernels read it (`struct Shape` in attention.cu).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct AttentionShapeC {
    pub(crate) batch: i64,
    pub(crate) heads: i64,
    pub(crate) head_dim: i64,
    pub(crate) q_len: i64,
    pub(crate) kv_len: i64,
    pub(crate) q_stride: i64,
    pub(crate) k_stride: i64,
    pub(crate) v_stride: i64,
    pub(crate) q_batch_stride: i64,
    pub(crate) kv_batch_stride: i64,
}
// SAFETY: plain old data with the layout of the kernel's struct.
unsafe impl DeviceRepr for AttentionShapeC {}

impl KernelArg for AttentionShapeC {
    const PARAMS: &'static [(Option<&'static str>, Param)] = &[(None, Param::Shape)];
    fn push(self, args: &mut Args) {
        args.push(Arg::Shape(self));
    }
}

/// An attention mask as the kernels take it: `int kind, i64 p0, i64 p1, i64 p2, i64 window`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MaskArgs {
    pub(crate) kind: i32,
    pub(crate) p0: i64,
    pub(crate) p1: i64,
    pub(crate) p2: i64,
    pub(crate) window: i64,
}

impl KernelArg for MaskArgs {
    const PARAMS: &'static [(Option<&'static str>, Param)] = &[
        (Some("kind"), Param::I32),
        (Some("p0"), Param::I64),
        (Some("p1"), Param::I64),
        (Some("p2"), Param::I64),
        (Some("window"), Param::I64),
    ];
    fn push(self, args: &mut Args) {
        args.push(Arg::I32(self.kind));
        for v in [self.p0, self.p1, self.p2, self.window] {
            args.push(Arg::I64(v));
        }
    }
}

/// A dropout as the kernels take it (`DROPOUT_ARGS` in elementwise.cu): p (0: none), the keep
/// scale, and the stream's key, step and tag.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct DropoutArgs {
    pub(crate) p: f32,
    pub(crate) keep_scale: f32,
    pub(crate) key0: u32,
    pub(crate) key1: u32,
    pub(crate) step: u32,
    pub(crate) tag: u32,
}

impl KernelArg for DropoutArgs {
    const PARAMS: &'static [(Option<&'static str>, Param)] = &[
        (Some("p"), Param::F32),
        (Some("keep_scale"), Param::F32),
        (Some("key0"), Param::U32),
        (Some("key1"), Param::U32),
        (Some("step"), Param::U32),
        (Some("tag"), Param::U32),
    ];
    fn push(self, args: &mut Args) {
        args.push(Arg::F32(self.p));
        args.push(Arg::F32(self.keep_scale));
        for v in [self.key0, self.key1, self.step, self.tag] {
            args.push(Arg::U32(v));
        }
    }
}

/// The table: `fn launcher(arguments) for Kernel = "name" in Source | …;`. A launcher that
/// serves several kernels of one signature takes the kernel first (`kernel,`).
macro_rules! kernels {
    ($(fn $launcher:ident($($params:tt)*) for $($kernel:ident = $name:literal in $source:ident)|+;)*) => {
        /// A kernel of `kernels/*.cu`.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Kernel {
            $($(
                #[doc = concat!("`", $name, "` in ", stringify!($source), ".")]
                $kernel,
            )+)*
        }

        impl Kernel {
            /// Every kernel.
            pub const ALL: &'static [Kernel] = &[$($(Kernel::$kernel),+),*];

            /// Its name in the source (`extern "C"`).
            pub fn name(self) -> &'static str {
                match self { $($(Kernel::$kernel => $name,)+)* }
            }

            /// The source that defines it.
            pub fn source(self) -> Source {
                match self { $($(Kernel::$kernel => Source::$source,)+)* }
            }

            /// Its parameters as its launcher passes them: `(name, type)` each.
            pub fn params(self) -> Vec<(&'static str, Param)> {
                match self { $($(Kernel::$kernel)|+ => params!($($params)*),)* }
            }
        }

        impl Launch<'_> {
            $(launcher!(fn $launcher($($params)*) for $($kernel)|+);)*
        }
    };
}

macro_rules! params {
    (kernel, $($rest:tt)*) => { params!($($rest)*) };
    ($($arg:ident: $ty:ty),* $(,)?) => {{
        let mut out = Vec::new();
        $(for &(name, param) in <$ty as KernelArg>::PARAMS {
            out.push((name.unwrap_or(stringify!($arg)), param));
        })*
        out
    }};
}

macro_rules! launcher {
    (fn $launcher:ident(kernel, $($arg:ident: $ty:ty),* $(,)?) for $($kernel:ident)|+) => {
        #[allow(clippy::too_many_arguments)]
        pub(crate) fn $launcher(self, kernel: Kernel, $($arg: $ty),*) -> Result<(), CudaError> {
            if !matches!(kernel, $(Kernel::$kernel)|+) {
                return Err(CudaError::Shape(format!(
                    concat!("{:?} is not a kernel of ", stringify!($launcher)), kernel
                )));
            }
            let mut args = Args::default();
            $(KernelArg::push($arg, &mut args);)*
            self.run(kernel, args.as_slice())
        }
    };
    (fn $launcher:ident($($arg:ident: $ty:ty),* $(,)?) for $kernel:ident) => {
        #[allow(clippy::too_many_arguments)]
        pub(crate) fn $launcher(self, $($arg: $ty),*) -> Result<(), CudaError> {
            let mut args = Args::default();
            $(KernelArg::push($arg, &mut args);)*
            self.run(Kernel::$kernel, args.as_slice())
        }
    };
}

kernels! {
    fn fill(dst: u64, n: i64, value: f32) for Fill = "fill" in Elementwise;
    fn fill_f32(dst: u64, n: i64, value: f32) for FillF32 = "fill_f32" in Elementwise;
    fn copy_row_groups(src: u64, src_stride: i64, src_group_stride: i64, dst: u64, dst_stride: i64, dst_group_stride: i64, groups: i64, rows: i64, cols: i64)
        for CopyRowGroups = "copy_row_groups" in Elementwise;
    fn bias_add(x: u64, bias: u64, rows: i64, cols: i64, stride: i64) for BiasAdd = "bias_add" in Elementwise;
    fn colsum_partial(a: u64, b: u64, partial: u64, rows: i64, cols: i64, stride: i64, rows_per_chunk: i64)
        for ColsumPartial = "colsum_partial" in Elementwise;
    fn colsum_finish(partial: u64, chunks: i64, out: u64, cols: i64, groups: i64) for ColsumFinish = "colsum_finish" in Elementwise;
    fn modulate_forward(x: u64, shift: u64, scale: u64, out: u64, tokens: i64, channels: i64, n: i64)
        for ModulateForward = "modulate_forward" in Elementwise;
    fn modulate_backward_dx(dout: u64, scale: u64, dx: u64, tokens: i64, channels: i64, n: i64)
        for ModulateBackwardDx = "modulate_backward_dx" in Elementwise;
    fn gated_residual_forward(residual: u64, y: u64, gate: u64, tokens: i64, channels: i64, n: i64)
        for GatedResidualForward = "gated_residual_forward" in Elementwise;
    fn gated_residual_forward_into(residual: u64, y: u64, bias: u64, gate: u64, out: u64, tokens: i64, channels: i64, n: i64, dropout: DropoutArgs)
        for GatedResidualForwardInto = "gated_residual_forward_into" in Elementwise;
    fn gated_residual_backward_dy(dres: u64, gate: u64, dy: u64, tokens: i64, channels: i64, n: i64, dropout: DropoutArgs)
        for GatedResidualBackwardDy = "gated_residual_backward_dy" in Elementwise;
    fn unary_forward(kernel, x: u64, out: u64, n: i64)
        for GeluForward = "gelu_forward" in Elementwise | SiluForward = "silu_forward" in Elementwise;
    fn bias_gelu_forward(x: u64, bias: u64, out: u64, rows: i64, cols: i64) for BiasGeluForward = "bias_gelu_forward" in Elementwise;
    fn unary_backward(kernel, dout: u64, x: u64, dx: u64, n: i64)
        for GeluBackward = "gelu_backward" in Elementwise | SiluBackward = "silu_backward" in Elementwise;
    fn dropout(x: u64, n: i64, dropout: DropoutArgs) for Dropout = "dropout" in Elementwise;
    fn scale(x: u64, n: i64, factor: f32) for Scale = "scale" in Elementwise;
    fn adamw(params: u64, grads: u64, m: u64, v: u64, n: i64, lr: f32, beta1: f32, beta2: f32, eps: f32, weight_decay: f32, bc1: f32, bc2: f32)
        for Adamw = "adamw" in Elementwise;
    fn ema_update(ema: u64, params: u64, n: i64, decay: f32) for EmaUpdate = "ema_update" in Elementwise;
    fn round_f32_into(src: u64, dst: u64, n: i64) for RoundF32Into = "round_f32_into" in Elementwise;
    fn optimizer_step(master: u64, rounded: u64, grads: u64, m: u64, v: u64, ema: u64, ema_rounded: u64, n: i64, grad_scale: f32, lr: f32, beta1: f32, beta2: f32, eps: f32, weight_decay: f32, bc1: f32, bc2: f32, ema_decay: f32)
        for OptimizerStep = "optimizer_step" in Elementwise;
    fn sum_partial(x: u64, n: i64, squares: i32, partial: u64) for SumPartial = "sum_partial" in Elementwise;
    fn embedding_forward(ids: u64, table: u64, out: u64, rows: i64, channels: i64) for EmbeddingForward = "embedding_forward" in Elementwise;
    fn embedding_backward(group_start: u64, group_ids: u64, group_rows: u64, dout: u64, dtable: u64, channels: i64)
        for EmbeddingBackward = "embedding_backward" in Elementwise;
    fn linear_few_rows(kernel, x: u64, lda: i64, w: u64, ldb: i64, y: u64, ldc: i64, m: i32, n: i64, k: i64, beta: f32)
        for LinearFewRows1 = "linear_few_rows_1" in Linear | LinearFewRows2 = "linear_few_rows_2" in Linear
        | LinearFewRows4 = "linear_few_rows_4" in Linear | LinearFewRows8 = "linear_few_rows_8" in Linear;
    fn linear_few_rows_bias_gelu(kernel, x: u64, lda: i64, w: u64, ldb: i64, y: u64, m: i32, n: i64, k: i64, bias: u64, out: u64)
        for LinearFewRows1BiasGelu = "linear_few_rows_1_bias_gelu" in Linear
        | LinearFewRows2BiasGelu = "linear_few_rows_2_bias_gelu" in Linear
        | LinearFewRows4BiasGelu = "linear_few_rows_4_bias_gelu" in Linear
        | LinearFewRows8BiasGelu = "linear_few_rows_8_bias_gelu" in Linear;
    fn linear_few_rows_gated_residual(kernel, x: u64, lda: i64, w: u64, ldb: i64, y: u64, m: i32, n: i64, k: i64, bias: u64, gate: u64, residual: u64, out: u64, tokens: i64)
        for LinearFewRows1GatedResidual = "linear_few_rows_1_gated_residual" in Linear
        | LinearFewRows2GatedResidual = "linear_few_rows_2_gated_residual" in Linear
        | LinearFewRows4GatedResidual = "linear_few_rows_4_gated_residual" in Linear
        | LinearFewRows8GatedResidual = "linear_few_rows_8_gated_residual" in Linear;
    fn layernorm_forward(x: u64, weight: u64, bias: u64, out: u64, mean: u64, rstd: u64, rows: i64, cols: i64, eps: f32, shift: u64, scale: u64, mod_out: u64, tokens: i64)
        for LayernormForward = "layernorm_forward" in Norm;
    fn layernorm_backward_dx(dout: u64, x: u64, weight: u64, dx: u64, stats: u64, rows: i64, cols: i64, eps: f32)
        for LayernormBackwardDx = "layernorm_backward_dx" in Norm;
    fn layernorm_dweight_partial(dout: u64, x: u64, stats: u64, partial: u64, rows: i64, cols: i64, rows_per_chunk: i64)
        for LayernormDweightPartial = "layernorm_dweight_partial" in Norm;
    fn rope(x: u64, batch: i64, tokens: i64, heads: i64, head_dim: i64, stride: i64, batch_stride: i64, position_offset: i64, base: f64, inverse: i32, per: i64, copy: u64, copy_col0: i64, copy_cols: i64, copy_stride: i64, copy_batch_stride: i64)
        for Rope = "rope" in Norm;
    fn softmax_cross_entropy(logits: u64, targets: u64, weights: u64, losses: u64, rows: i64, vocab: i64, stride: i64, excluded: i64, grad_scale: f32)
        for SoftmaxCrossEntropy = "softmax_cross_entropy" in Norm;
    fn attention_forward(s: AttentionShapeC, mask: MaskArgs, scale: f32, q: u64, k: u64, v: u64, out: u64, lse: u64)
        for AttentionForward = "attention_forward" in Attention;
    fn attention_backward_dq(kernel, s: AttentionShapeC, mask: MaskArgs, scale: f32, dout: u64, q: u64, k: u64, v: u64, out: u64, lse: u64, dq: u64, delta: u64)
        for AttentionBackwardDq = "attention_backward_dq" in Attention
        | AttentionBackwardFlashDq = "attention_backward_flash_dq" in Attention;
    fn attention_backward_dkv(kernel, s: AttentionShapeC, mask: MaskArgs, scale: f32, dout: u64, q: u64, k: u64, v: u64, lse: u64, delta: u64, dk: u64, dv: u64)
        for AttentionBackwardDkv = "attention_backward_dkv" in Attention
        | AttentionBackwardFlashDkv = "attention_backward_flash_dkv" in Attention;
    fn attention_forward_flash(s: AttentionShapeC, mask: MaskArgs, scale: f32, q: u64, k: u64, v: u64, out: u64, lse: u64, tiles_per_split: i32, partial_out: u64, partial_lse: u64)
        for AttentionForwardFlash = "attention_forward_flash" in Attention;
    fn attention_combine_splits(s: AttentionShapeC, splits: i32, partial_out: u64, partial_lse: u64, out: u64, lse: u64)
        for AttentionCombineSplits = "attention_combine_splits" in Attention;
    fn draw_tokens(logits: u64, vocab: i64, mask_id: i64, specs: u64, top_p: f64, smallest_cover: i32, ids: u64, confidence: u64)
        for DrawTokens = "draw_tokens" in Sample;
}

impl Kernel {
    /// Whether its threads each take a 16-byte chunk of every operand (`CHUNK_STRIDE` in
    /// common.cuh) where pointers and extents allow: it is launched with `n / chunk` threads.
    pub fn chunked(self) -> bool {
        use Kernel::*;
        matches!(
            self,
            Fill | Scale
                | BiasAdd
                | ModulateForward
                | ModulateBackwardDx
                | GatedResidualForward
                | GatedResidualForwardInto
                | GatedResidualBackwardDy
                | BiasGeluForward
                | GeluBackward
                | Dropout
                | Adamw
                | EmaUpdate
                | RoundF32Into
                | OptimizerStep
        )
    }

    /// Whether it exists only in the bf16 module for compute capability 8.0 and later (its
    /// tensor-core instructions take bf16 operands).
    pub fn needs_bf16_sm80(self) -> bool {
        matches!(
            self,
            Kernel::AttentionForwardFlash
                | Kernel::AttentionCombineSplits
                | Kernel::AttentionBackwardFlashDq
                | Kernel::AttentionBackwardFlashDkv
        )
    }
}

#[cfg(test)]
mod signatures;
