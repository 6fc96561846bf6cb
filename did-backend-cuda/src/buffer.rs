//! Device buffers of floats and of token ids, and the host-side conversions into their storage.

use cudarc::driver::{CudaSlice, DevicePtrMut, DeviceRepr, HostSlice};

use crate::counters::Event;
use crate::device::*;
use crate::CudaError;

/// A device buffer of `len` floats in the backend's [`Precision`], or in f32 when it came from
/// [`MemoryOps::zeros_f32`](did_core::backend::MemoryOps::zeros_f32).
#[derive(Debug)]
pub struct CudaBuffer {
    pub(crate) mem: CudaSlice<u8>,
    pub(crate) len: usize,
    /// Elements are f32 (an f32 backend's every buffer; a bf16 backend's `zeros_f32`).
    pub(crate) f32: bool,
}

impl CudaBuffer {
    /// Elements in the buffer.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether the buffer holds no element.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Token ids on the device, with a host copy so that ids are checked against
/// table sizes before a kernel reads them.
#[derive(Debug)]
pub struct CudaIds {
    pub(crate) dev: CudaSlice<u32>,
    pub(crate) host: Vec<u32>,
}

/// The CUDA backend's logits rows start a multiple of this many elements apart
/// (`MemoryOps::padded_row_stride`): 50,258 → 50,304.
///
/// ```
/// assert_eq!(50_258usize.next_multiple_of(did_backend_cuda::LOGITS_ROW_ALIGNMENT), 50_304);
/// ```
pub const LOGITS_ROW_ALIGNMENT: usize = 64;

/// Bytes per element of `buf`: f32 or bf16.
pub(crate) fn element_bytes(buf: &CudaBuffer) -> usize {
    if buf.f32 {
        4
    } else {
        2
    }
}

impl CudaBackend {
    /// A host-to-device copy, counted.
    pub(crate) fn upload_bytes<T: DeviceRepr, Src: HostSlice<T> + ?Sized, Dst: DevicePtrMut<T>>(
        &self,
        src: &Src,
        dst: &mut Dst,
    ) -> Result<(), CudaError> {
        self.counters.add(Event::Upload, 1);
        Ok(self.stream.memcpy_htod(src, dst)?)
    }

    pub(crate) fn to_bytes(&self, host: &[f32]) -> Vec<u8> {
        match self.precision {
            Precision::F32 => host.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Precision::Bf16 => host
                .iter()
                .flat_map(|&x| half::bf16::from_f32(x).to_bits().to_le_bytes())
                .collect(),
        }
    }
}
