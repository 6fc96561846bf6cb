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
        self.elements(rows * channels).embedding_forward(
            ip,
            self.ptr(table, table_rows * channels, "embedding table")?,
            self.ptr_mut(out, rows * channels, "embedding out")?,
            rows as i64,
            channels as i64,
        )
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
        // Two channels a thread (the kernel's layout), 64 threads a block: an id's channels
        // spread over several blocks, so the long group (the mask token) is not one SM's work.
        let channel_blocks = grid_rows(channels.div_ceil(2 * EMBEDDING_THREADS as usize))?;
        self.grid((grid_rows(groups)?, channel_blocks, 1), EMBEDDING_THREADS)
            .embedding_backward(
                base,
                base + 4 * (groups as u64 + 1),
                base + 4 * (2 * groups as u64 + 1),
                dout,
                dtable,
                channels as i64,
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
        let logits = self.ptr_mut(logits, shape.extent(), "cross-entropy logits")?;
        let weights = self.ptr(weights, rows, "cross-entropy weights")?;
        let losses = self.ptr_mut(losses, rows, "cross-entropy losses")?;
        let excluded = excluded
            .filter(|&e| (e as usize) < vocab)
            .map_or(-1, i64::from);
        if rows == 0 || vocab == 0 {
            return Ok(());
        }
        self.grid((grid_rows(rows)?, 1, 1), THREADS)
            .softmax_cross_entropy(
                logits,
                tp,
                weights,
                losses,
                rows as i64,
                vocab as i64,
                shape.stride as i64,
                excluded,
                grad_scale,
            )
    }
}
