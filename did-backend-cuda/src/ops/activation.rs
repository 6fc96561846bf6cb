//! [`ActivationOps`]: GELU, SiLU, dropout and the gated residual (`kernels/elementwise.cu`).

use did_core::backend::prelude::*;
use did_core::backend::{DropoutMask, Slice, SliceMut};
use did_core::rng::RngStream;

use crate::buffer::*;
use crate::device::*;
use crate::kernel::Kernel;
use crate::launch::*;
use crate::CudaError;

impl ActivationOps for CudaBackend {
    fn gated_residual_forward(
        &self,
        residual: SliceMut<'_, CudaBuffer>,
        y: Slice<'_, CudaBuffer>,
        gate: Option<Slice<'_, CudaBuffer>>,
        batch: usize,
        tokens: usize,
        channels: usize,
    ) -> Result<(), CudaError> {
        let n = batch * tokens * channels;
        let gp = self.gate_ptr(gate, batch, channels)?;
        self.elements(n).gated_residual_forward(
            self.ptr_mut(residual, n, "residual")?,
            self.ptr(y, n, "gated y")?,
            gp,
            tokens as i64,
            channels as i64,
            n as i64,
        )
    }
    fn gated_residual_backward(
        &self,
        dresidual: Slice<'_, CudaBuffer>,
        y: Slice<'_, CudaBuffer>,
        gate: Option<Slice<'_, CudaBuffer>>,
        dy: SliceMut<'_, CudaBuffer>,
        dgate: Option<SliceMut<'_, CudaBuffer>>,
        batch: usize,
        tokens: usize,
        channels: usize,
    ) -> Result<(), CudaError> {
        self.gated_residual_backward_with(
            dresidual, y, gate, dy, dgate, None, batch, tokens, channels,
        )
    }
    fn gelu_forward(
        &self,
        x: Slice<'_, CudaBuffer>,
        out: SliceMut<'_, CudaBuffer>,
        len: usize,
    ) -> Result<(), CudaError> {
        self.activation_forward(Kernel::GeluForward, x, out, len)
    }
    fn gelu_backward(
        &self,
        dout: Slice<'_, CudaBuffer>,
        x: Slice<'_, CudaBuffer>,
        dx: SliceMut<'_, CudaBuffer>,
        len: usize,
    ) -> Result<(), CudaError> {
        self.activation_backward(Kernel::GeluBackward, dout, x, dx, len)
    }
    fn silu_forward(
        &self,
        x: Slice<'_, CudaBuffer>,
        out: SliceMut<'_, CudaBuffer>,
        len: usize,
    ) -> Result<(), CudaError> {
        self.activation_forward(Kernel::SiluForward, x, out, len)
    }
    fn silu_backward(
        &self,
        dout: Slice<'_, CudaBuffer>,
        x: Slice<'_, CudaBuffer>,
        dx: SliceMut<'_, CudaBuffer>,
        len: usize,
    ) -> Result<(), CudaError> {
        self.activation_backward(Kernel::SiluBackward, dout, x, dx, len)
    }
    fn dropout(
        &self,
        x: SliceMut<'_, CudaBuffer>,
        len: usize,
        p: f32,
        stream: &RngStream,
    ) -> Result<(), CudaError> {
        let xp = self.ptr_mut(x, len, "dropout x")?;
        if p <= 0.0 {
            return Ok(());
        }
        let dropout = dropout_args(Some(DropoutMask { p, stream: *stream }), len)?;
        self.elements(len).dropout(xp, len as i64, dropout)
    }
}

impl CudaBackend {
    /// `dy = gate·dresidual` (then the dropout's backward on it, with a mask), and
    /// `dgate += Σ_t dresidual·y`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gated_residual_backward_with(
        &self,
        dresidual: Slice<'_, CudaBuffer>,
        y: Slice<'_, CudaBuffer>,
        gate: Option<Slice<'_, CudaBuffer>>,
        dy: SliceMut<'_, CudaBuffer>,
        dgate: Option<SliceMut<'_, CudaBuffer>>,
        dropout: Option<DropoutMask>,
        batch: usize,
        tokens: usize,
        channels: usize,
    ) -> Result<(), CudaError> {
        let n = batch * tokens * channels;
        let rp = self.ptr(dresidual, n, "dresidual")?;
        let yp = self.ptr(y, n, "gated y")?;
        let gp = self.gate_ptr(gate, batch, channels)?;
        let dyp = self.ptr_mut(dy, n, "gated dy")?;
        let dropout = dropout_args(dropout, n)?;
        self.elements(n).gated_residual_backward_dy(
            rp,
            gp,
            dyp,
            tokens as i64,
            channels as i64,
            n as i64,
            dropout,
        )?;
        if let Some(dgate) = dgate {
            let dgp = self.ptr_mut(dgate, batch * channels, "dgate")?;
            self.column_sums(rp, yp, dgp, batch, tokens, channels, channels)?;
        }
        Ok(())
    }

    /// `gated_residual_forward_into` (the kernel): `out = residual + gate·(y + bias)`, the bias
    /// (a null pointer: none) added into `y` first.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn residual_into(
        &self,
        residual: Slice<'_, CudaBuffer>,
        y: u64,
        bias: u64,
        dropout: Option<DropoutMask>,
        gate: Option<Slice<'_, CudaBuffer>>,
        out: SliceMut<'_, CudaBuffer>,
        batch: usize,
        tokens: usize,
        channels: usize,
    ) -> Result<(), CudaError> {
        let n = batch * tokens * channels;
        let gp = self.gate_ptr(gate, batch, channels)?;
        let residual = self.ptr(residual, n, "residual")?;
        let out = self.ptr_mut(out, n, "residual out")?;
        let dropout = dropout_args(dropout, n)?;
        self.elements(n).gated_residual_forward_into(
            residual,
            y,
            bias,
            gp,
            out,
            tokens as i64,
            channels as i64,
            n as i64,
            dropout,
        )
    }

    /// `out = f(x)` element-wise (GELU, SiLU).
    pub(crate) fn activation_forward(
        &self,
        kernel: Kernel,
        x: Slice<'_, CudaBuffer>,
        out: SliceMut<'_, CudaBuffer>,
        len: usize,
    ) -> Result<(), CudaError> {
        let x = self.ptr(x, len, kernel.name())?;
        let out = self.ptr_mut(out, len, kernel.name())?;
        self.elements(len).unary_forward(kernel, x, out, len as i64)
    }

    /// `dx += dout · f'(x)` element-wise.
    pub(crate) fn activation_backward(
        &self,
        kernel: Kernel,
        dout: Slice<'_, CudaBuffer>,
        x: Slice<'_, CudaBuffer>,
        dx: SliceMut<'_, CudaBuffer>,
        len: usize,
    ) -> Result<(), CudaError> {
        let dout = self.ptr(dout, len, kernel.name())?;
        let x = self.ptr(x, len, kernel.name())?;
        let dx = self.ptr_mut(dx, len, kernel.name())?;
        self.elements(len)
            .unary_backward(kernel, dout, x, dx, len as i64)
    }
}
