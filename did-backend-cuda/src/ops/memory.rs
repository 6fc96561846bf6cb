//! [`MemoryOps`]: allocation, transfers, fills and copies.

use did_core::backend::prelude::*;
use did_core::backend::{RowGroups, Slice, SliceMut, WeightFormat, WeightMatrix};

use crate::buffer::*;
use crate::counters::Event;
use crate::device::*;
use crate::CudaError;

impl MemoryOps for CudaBackend {
    type Buffer = CudaBuffer;
    type Ids = CudaIds;
    type Error = CudaError;
    fn name(&self) -> &str {
        &self.name
    }
    fn zeros(&self, len: usize) -> Result<CudaBuffer, CudaError> {
        // One element at least: the driver refuses empty allocations.
        let mem = self
            .stream
            .alloc_zeros::<u8>(len.max(1) * self.precision.bytes())?;
        Ok(CudaBuffer {
            mem,
            len,
            f32: self.precision == Precision::F32,
        })
    }
    fn zeros_f32(&self, len: usize) -> Result<CudaBuffer, CudaError> {
        let mem = self.stream.alloc_zeros::<u8>(len.max(1) * 4)?;
        Ok(CudaBuffer {
            mem,
            len,
            f32: true,
        })
    }
    fn upload(&self, host: &[f32]) -> Result<CudaBuffer, CudaError> {
        let mut buf = self.zeros(host.len())?;
        if !host.is_empty() {
            let bytes = self.to_bytes(host);
            let mut view = buf.mem.slice_mut(0..bytes.len());
            self.upload_bytes(&bytes, &mut view)?;
        }
        Ok(buf)
    }
    /// The weights as the backend stores every buffer: f32, or bf16 on a `Precision::Bf16`
    /// backend. int8 weights are the CPU backend's only (docs/cpu-inference.md).
    fn upload_weights(
        &self,
        host: &[f32],
        _matrices: &[WeightMatrix],
        format: WeightFormat,
    ) -> Result<CudaBuffer, CudaError> {
        match (format, self.precision) {
            (WeightFormat::F32, _) | (WeightFormat::Bf16, Precision::Bf16) => self.upload(host),
            (WeightFormat::Bf16, Precision::F32) => Err(CudaError::Shape(
                "bf16 weights on CUDA come with bf16 storage: use --precision bf16 (and --weights f32)".into(),
            )),
            (WeightFormat::Int8, _) => Err(CudaError::Shape(
                "int8 weights are stored by the CPU backend only; on CUDA use --precision bf16 for half the bytes".into(),
            )),
        }
    }
    fn stores_below_f32(&self) -> bool {
        self.precision == Precision::Bf16
    }
    fn upload_f32(&self, host: &[f32]) -> Result<CudaBuffer, CudaError> {
        let mut buf = self.zeros_f32(host.len())?;
        if !host.is_empty() {
            let bytes: Vec<u8> = host.iter().flat_map(|x| x.to_le_bytes()).collect();
            let mut view = buf.mem.slice_mut(0..bytes.len());
            self.upload_bytes(&bytes, &mut view)?;
        }
        Ok(buf)
    }
    fn round_into(
        &self,
        src: Slice<'_, CudaBuffer>,
        dst: SliceMut<'_, CudaBuffer>,
        len: usize,
    ) -> Result<(), CudaError> {
        let src = self.f32_ptr(src.buf, src.offset, len, "round_into source")?;
        let dst = self.ptr_mut(dst, len, "round_into destination")?;
        self.elements(len).round_f32_into(src, dst, len as i64)
    }
    fn download(&self, src: Slice<'_, CudaBuffer>, out: &mut [f32]) -> Result<(), CudaError> {
        self.device_ptr(src.buf, src.offset, out.len(), "download")?;
        if out.is_empty() {
            return Ok(());
        }
        let esize = element_bytes(src.buf);
        let start = src.offset * esize;
        let mut bytes = vec![0u8; out.len() * esize];
        self.counters.add(Event::Download, 1);
        self.stream
            .memcpy_dtoh(&src.buf.mem.slice(start..start + bytes.len()), &mut bytes)?;
        self.stream.synchronize()?;
        if src.buf.f32 {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        } else {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            }
        }
        Ok(())
    }
    fn upload_ids(&self, host: &[u32]) -> Result<CudaIds, CudaError> {
        let mut dev = self.stream.alloc_zeros::<u32>(host.len().max(1))?;
        if !host.is_empty() {
            let mut view = dev.slice_mut(0..host.len());
            self.upload_bytes(host, &mut view)?;
        }
        Ok(CudaIds {
            dev,
            host: host.to_vec(),
        })
    }
    fn upload_ids_into(&self, host: &[u32], ids: &mut CudaIds) -> Result<(), CudaError> {
        if host.len() > ids.dev.len() {
            *ids = self.upload_ids(host)?;
            return Ok(());
        }
        if !host.is_empty() {
            let mut view = ids.dev.slice_mut(0..host.len());
            self.upload_bytes(host, &mut view)?;
        }
        ids.host.clear();
        ids.host.extend_from_slice(host);
        Ok(())
    }
    fn fill(&self, dst: SliceMut<'_, CudaBuffer>, len: usize, value: f32) -> Result<(), CudaError> {
        // A bf16 backend's f32 buffers (zeros_f32) have their own kernel.
        let f32_in_bf16 = dst.buf.f32 && self.precision == Precision::Bf16;
        let p = self.device_ptr(dst.buf, dst.offset, len, "fill")?;
        if f32_in_bf16 {
            self.elements(len).fill_f32(p, len as i64, value)
        } else {
            self.elements(len).fill(p, len as i64, value)
        }
    }
    fn copy(
        &self,
        src: Slice<'_, CudaBuffer>,
        dst: SliceMut<'_, CudaBuffer>,
        len: usize,
    ) -> Result<(), CudaError> {
        self.copy_rows(src, len, dst, len, 1, len)
    }
    fn copy_rows(
        &self,
        src: Slice<'_, CudaBuffer>,
        src_stride: usize,
        dst: SliceMut<'_, CudaBuffer>,
        dst_stride: usize,
        rows: usize,
        cols: usize,
    ) -> Result<(), CudaError> {
        self.copy_row_groups(
            src,
            dst,
            &RowGroups::rows(rows, cols, src_stride, dst_stride),
        )
    }
    fn copy_row_groups(
        &self,
        src: Slice<'_, CudaBuffer>,
        dst: SliceMut<'_, CudaBuffer>,
        layout: &RowGroups,
    ) -> Result<(), CudaError> {
        let s = self.ptr(src, layout.src_extent(), "copy src")?;
        let d = self.ptr_mut(dst, layout.dst_extent(), "copy dst")?;
        self.elements(layout.elements()).copy_row_groups(
            s,
            layout.src_stride as i64,
            layout.src_group_stride as i64,
            d,
            layout.dst_stride as i64,
            layout.dst_group_stride as i64,
            layout.groups as i64,
            layout.rows as i64,
            layout.cols as i64,
        )
    }
    fn synchronize(&self) -> Result<(), CudaError> {
        self.stream.synchronize()?;
        Ok(())
    }
    /// Rows of 64 elements: 128 bytes in bf16, so cuBLAS's 16-byte vector loads apply to every
    /// row (the head's weight gradient runs about twice as fast: docs/perf/gpu.md, "Measurements
    /// behind the code's choices").
    fn padded_row_stride(&self, cols: usize) -> usize {
        cols.next_multiple_of(LOGITS_ROW_ALIGNMENT)
    }
}
