//! The exact KV cache of a block-causal draft: per layer, the keys (after RoPE, at absolute
//! positions) and values of committed tokens, sliding past the context length
//! (docs/bd3lm.md §4.2).

use alloc::vec::Vec;

use super::pass::next_cache_serial;
use crate::backend::{Backend, RowGroups, Slice, SliceMut};
use crate::model::ModelConfig;

/// Keys and values of committed tokens, per block: `[batch, capacity, 2C]`, a slot's keys then
/// its values — adjacent as in the fused qkv rows, so a pass appends both in one copy and a
/// slide moves both in one.
pub struct KvCache<B: Backend> {
    pub(super) kv: Vec<B::Buffer>,
    spare: B::Buffer,
    pub(super) batch: usize,
    pub(super) capacity: usize,
    /// Absolute position of slot 0.
    pub(super) base: usize,
    /// Tokens `[0, committed)` are final and cached (from `base` on).
    pub(super) committed: usize,
    /// This cache's buffers as they are now (new after a slide): recordings of passes over it
    /// hold its addresses.
    pub(super) serial: usize,
}

impl<B: Backend> KvCache<B> {
    /// Room for `capacity` positions of `batch` sequences.
    pub fn new(
        be: &B,
        config: &ModelConfig,
        batch: usize,
        capacity: usize,
    ) -> Result<Self, B::Error> {
        let len = batch * capacity * 2 * config.hidden;
        Ok(KvCache {
            kv: (0..config.layers)
                .map(|_| be.zeros(len))
                .collect::<Result<_, _>>()?,
            spare: be.zeros(len)?,
            batch,
            capacity,
            base: 0,
            committed: 0,
            serial: next_cache_serial(),
        })
    }

    /// Tokens committed so far.
    pub fn committed(&self) -> usize {
        self.committed
    }

    /// Forgets everything (a new stage).
    pub fn clear(&mut self) {
        self.base = 0;
        self.committed = 0;
    }

    /// Makes room for positions `[window_start, end)`, sliding the kept slots to the front if needed.
    pub(super) fn make_room(
        &mut self,
        be: &B,
        c: usize,
        window_start: usize,
        end: usize,
    ) -> Result<(), B::Error> {
        if end - self.base <= self.capacity {
            return Ok(());
        }
        let keep_from = window_start.max(self.base);
        let kept = self.committed.saturating_sub(keep_from);
        // Every sequence's kept slots (keys and values), as one row each.
        let slot = 2 * c;
        let slide = RowGroups {
            groups: self.batch,
            rows: 1,
            cols: kept * slot,
            src_stride: 0,
            src_group_stride: self.capacity * slot,
            dst_stride: 0,
            dst_group_stride: self.capacity * slot,
        };
        for buf in self.kv.iter_mut() {
            be.copy_row_groups(
                Slice::at(&*buf, (keep_from - self.base) * slot),
                SliceMut::whole(&mut self.spare),
                &slide,
            )?;
            core::mem::swap(buf, &mut self.spare);
        }
        self.base = keep_from;
        self.serial = next_cache_serial();
        Ok(())
    }
}
