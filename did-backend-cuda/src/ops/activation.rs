//! [`ActivationOps`]: GELU, SiLU, dropout and the gated residual (`kernels/elementwise.cu`).

use did_core::backend::prelude::*;
use did_core::backend::{DropoutMask, Slice, SliceMut};
use did_core::rng::RngStream;

use crate::buffer::*;
use crate::device::*;
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
        let args = [
            Arg::Ptr(self.ptr_mut(residual, n, "residual")?),
            Arg::Ptr(self.ptr(y, n, "gated y")?),
            Arg::Ptr(gp),
            Arg::I64(tokens as i64),
            Arg::I64(channels as i64),
            Arg::I64(n as i64),
        ];
        self.launch_elements("gated_residual_forward", n, &args)
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
        self.activation_forward("gelu_forward", x, out, len)
    }
    fn gelu_backward(
        &self,
        dout: Slice<'_, CudaBuffer>,
        x: Slice<'_, CudaBuffer>,
        dx: SliceMut<'_, CudaBuffer>,
        len: usize,
    ) -> Result<(), CudaError> {
        self.activation_backward("gelu_backward", dout, x, dx, len)
    }
    fn silu_forward(
        &self,
        x: Slice<'_, CudaBuffer>,
        out: SliceMut<'_, CudaBuffer>,
        len: usize,
    ) -> Result<(), CudaError> {
        self.activation_forward("silu_forward", x, out, len)
    }
    fn silu_backward(
        &self,
        dout: Slice<'_, CudaBuffer>,
        x: Slice<'_, CudaBuffer>,
        dx: SliceMut<'_, CudaBuffer>,
        len: usize,
    ) -> Result<(), CudaError> {
        self.activation_backward("silu_backward", dout, x, dx, len)
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
        let mut args = vec![Arg::Ptr(xp), Arg::I64(len as i64)];
        args.extend(dropout_args(Some(DropoutMask { p, stream: *stream }), len)?);
        self.launch_elements("dropout", len, &args)
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
        let mut args = vec![
            Arg::Ptr(rp),
            Arg::Ptr(gp),
            Arg::Ptr(dyp),
            Arg::I64(tokens as i64),
            Arg::I64(channels as i64),
            Arg::I64(n as i64),
        ];
        args.extend(dropout_args(dropout, n)?);
        self.launch_elements("gated_residual_backward_dy", n, &args)?;
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
        let mut args = vec![
            Arg::Ptr(self.ptr(residual, n, "residual")?),
            Arg::Ptr(y),
            Arg::Ptr(bias),
            Arg::Ptr(gp),
            Arg::Ptr(self.ptr_mut(out, n, "residual out")?),
            Arg::I64(tokens as i64),
            Arg::I64(channels as i64),
            Arg::I64(n as i64),
        ];
        args.extend(dropout_args(dropout, n)?);
        self.launch_elements("gated_residual_forward_into", n, &args)
    }

    /// `out = f(x)` element-wise (GELU, SiLU).
    pub(crate) fn activation_forward(
        &self,
        kernel: &'static str,
        x: Slice<'_, CudaBuffer>,
        out: SliceMut<'_, CudaBuffer>,
        len: usize,
    ) -> Result<(), CudaError> {
        let args = [
            Arg::Ptr(self.ptr(x, len, kernel)?),
            Arg::Ptr(self.ptr_mut(out, len, kernel)?),
            Arg::I64(len as i64),
        ];
        self.launch_elements(kernel, len, &args)
    }

    /// `dx += dout · f'(x)` element-wise.
    pub(crate) fn activation_backward(
        &self,
        kernel: &'static str,
        dout: Slice<'_, CudaBuffer>,
        x: Slice<'_, CudaBuffer>,
        dx: SliceMut<'_, CudaBuffer>,
        len: usize,
    ) -> Result<(), CudaError> {
        let args = [
            Arg::Ptr(self.ptr(dout, len, kernel)?),
            Arg::Ptr(self.ptr(x, len, kernel)?),
            Arg::Ptr(self.ptr_mut(dx, len, kernel)?),
            Arg::I64(len as i64),
        ];
        self.launch_elements(kernel, len, &args)
    }
}
