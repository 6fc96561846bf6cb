//! [`LossOps`]: the embedding (`kernels/elementwise.cu`) and the softmax cross-entropy
//! (`kernels/norm.cu`).

use cudarc::driver::DevicePtr;
use did_core::backend::prelude::*;
use did_core::backend::{RowMajor, Slice, SliceMut};

use crate::buffer::*;
use crate::device::*;
use crate::launch::*;
use crate::{rows_by_id, CudaError};

impl LossOps for CudaBackend {
    fn embedding_forward(
        &self,
        ids: &CudaIds,
        table: Slice<'_, CudaBuffer>,
        out: SliceMut<'_, CudaBuffer>,
        rows: usize,
        channels: usize,
    ) -> Result<(), CudaError> {
        let ip = self.ids_ptr(ids, rows, "embedding ids")?;
        let table_rows = table.buf.len.saturating_sub(table.offset) / channels.max(1);
        check_ids(&ids.host[..rows], table_rows)?;
        let args = [
            Arg::Ptr(ip),
            Arg::Ptr(self.ptr(table, table_rows * channels, "embedding table")?),
            Arg::Ptr(self.ptr_mut(out, rows * channels, "embedding out")?),
            Arg::I64(rows as i64),
            Arg::I64(channels as i64),
        ];
        self.launch_elements("embedding_forward", rows * channels, &args)
    }
    fn embedding_backward(
        &self,
        ids: &CudaIds,
        dout: Slice<'_, CudaBuffer>,
        dtable: SliceMut<'_, CudaBuffer>,
        rows: usize,
        channels: usize,
    ) -> Result<(), CudaError> {
        self.ids_ptr(ids, rows, "embedding ids")?;
        let table_rows = dtable.buf.len.saturating_sub(dtable.offset) / channels.max(1);
        check_ids(&ids.host[..rows], table_rows)?;
        let dout = self.ptr(dout, rows * channels, "embedding dout")?;
        let dtable = self.ptr_mut(dtable, table_rows * channels, "embedding dtable")?;
        if rows == 0 || channels == 0 {
            return Ok(());
        }
        // The table's length is read off the buffer, which runs on past the embedding into the
        // other parameters (≈ 220 k rows for `small`): count over the ids that occur instead.
        let ids = &ids.host[..rows];
        let id_span = ids.iter().max().map_or(0, |&id| id as usize + 1);
        let grouped = rows_by_id::RowsById::new(ids, id_span);
        let groups = grouped.ids.len();
        let words = grouped.words();
        let mut dev = self.stream.alloc_zeros::<u32>(words.len())?;
        self.upload_bytes(&words, &mut dev)?;
        let (base, _sync) = dev.device_ptr(&self.stream);
        let args = [
            Arg::Ptr(base),
            Arg::Ptr(base + 4 * (groups as u64 + 1)),
            Arg::Ptr(base + 4 * (2 * groups as u64 + 1)),
            Arg::Ptr(dout),
            Arg::Ptr(dtable),
            Arg::I64(channels as i64),
        ];
        // Two channels a thread (the kernel's layout), 64 threads a block: an id's channels
        // spread over several blocks, so the long group (the mask token) is not one SM's work.
        let channel_blocks = grid_rows(channels.div_ceil(2 * EMBEDDING_THREADS as usize))?;
        self.launch(
            "embedding_backward",
            (grid_rows(groups)?, channel_blocks, 1),
            EMBEDDING_THREADS,
            &args,
        )
    }
    fn softmax_cross_entropy(
        &self,
        logits: SliceMut<'_, CudaBuffer>,
        targets: &CudaIds,
        weights: Slice<'_, CudaBuffer>,
        losses: SliceMut<'_, CudaBuffer>,
        shape: RowMajor,
        excluded: Option<u32>,
        grad_scale: f32,
    ) -> Result<(), CudaError> {
        let (rows, vocab) = (shape.rows, shape.cols);
        let tp = self.ids_ptr(targets, rows, "cross-entropy targets")?;
        check_ids(&targets.host[..rows], vocab)?;
        let args = [
            Arg::Ptr(self.ptr_mut(logits, shape.extent(), "cross-entropy logits")?),
            Arg::Ptr(tp),
            Arg::Ptr(self.ptr(weights, rows, "cross-entropy weights")?),
            Arg::Ptr(self.ptr_mut(losses, rows, "cross-entropy losses")?),
            Arg::I64(rows as i64),
            Arg::I64(vocab as i64),
            Arg::I64(shape.stride as i64),
            Arg::I64(
                excluded
                    .filter(|&e| (e as usize) < vocab)
                    .map_or(-1, i64::from),
            ),
            Arg::F32(grad_scale),
        ];
        if rows == 0 || vocab == 0 {
            return Ok(());
        }
        self.launch(
            "softmax_cross_entropy",
            (grid_rows(rows)?, 1, 1),
            THREADS,
            &args,
        )
    }
}
