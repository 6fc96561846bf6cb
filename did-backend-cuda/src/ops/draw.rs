//! [`DrawOps`]: tokens drawn on the device (`kernels/sample.cu`) or on the host from downloaded
//! logits; either way those of `draw_token`.

use cudarc::driver::DevicePtr;
use did_core::backend::prelude::*;
use did_core::backend::Slice;
use did_core::sample::categorical::{draw_token, DrawScratch, SampledToken};
use did_core::sample::nucleus::{Nucleus, NucleusRule};
use did_core::sample::DrawSpec;

use crate::buffer::*;
use crate::counters::Event;
use crate::device::*;
use crate::launch::*;
use crate::{draw, CudaError, DrawLocation};

impl DrawOps for CudaBackend {
    /// [`DrawLocation::Host`]: one download of every row, then the reference draw on the host,
    /// rows spread over its cores.
    /// [`DrawLocation::Device`]: the `draw_tokens` kernel, then the reference draw on the host
    /// for the rows it could not certify (see [`draw`]). The same tokens as the CPU backend
    /// either way.
    fn draw_tokens(
        &self,
        logits: Slice<'_, CudaBuffer>,
        vocab: usize,
        mask_id: u32,
        nucleus: &Nucleus,
        draws: &[DrawSpec],
        out: &mut [SampledToken],
    ) -> Result<(), CudaError> {
        let rows = draws.len().min(out.len());
        let logits_ptr = self.ptr(logits, rows * vocab, "draw logits")?;
        if rows == 0 || vocab == 0 {
            return Ok(());
        }
        if self.draw_location() == DrawLocation::Host {
            self.counters.add(Event::HostDraw, rows as u64);
            let mut host = vec![0.0f32; rows * vocab];
            self.download(logits, &mut host)?;
            let draw_rows = |logits: &[f32], draws: &[DrawSpec], out: &mut [SampledToken]| {
                let mut scratch = DrawScratch::default();
                for ((row, spec), slot) in logits.chunks_exact(vocab).zip(draws).zip(out) {
                    *slot = draw_token(row, mask_id, nucleus, &spec.stream, spec.row, &mut scratch);
                }
            };
            // Each row is its own stream: spread over the host's cores, the tokens are the same.
            // The first share is drawn on this thread (at batch 1 that is all of it).
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
            let per_thread = rows.div_ceil(threads.min(rows));
            let mut shares = host
                .chunks(per_thread * vocab)
                .zip(draws.chunks(per_thread))
                .zip(out[..rows].chunks_mut(per_thread));
            let first = shares.next();
            std::thread::scope(|scope| {
                for ((logits, draws), out) in shares {
                    scope.spawn(move || draw_rows(logits, draws, out));
                }
                if let Some(((logits, draws), out)) = first {
                    draw_rows(logits, draws, out);
                }
            });
            return Ok(());
        }
        let words: Vec<u32> = draws[..rows].iter().flat_map(draw::stream_words).collect();
        let mut specs = self.stream.alloc_zeros::<u32>(words.len())?;
        self.upload_bytes(&words, &mut specs)?;
        let ids = self.stream.alloc_zeros::<u32>(2 * rows)?;
        let confidence = self.stream.alloc_zeros::<f64>(3 * rows)?;
        {
            let (specs_ptr, _s) = specs.device_ptr(&self.stream);
            let (ids_ptr, _i) = ids.device_ptr(&self.stream);
            let (confidence_ptr, _c) = confidence.device_ptr(&self.stream);
            self.grid((grid_rows(rows)?, 1, 1), DRAW_THREADS)
                .draw_tokens(
                    logits_ptr,
                    vocab as i64,
                    i64::from(mask_id),
                    specs_ptr,
                    nucleus.p(),
                    i32::from(nucleus.rule() == NucleusRule::SmallestCover),
                    ids_ptr,
                    confidence_ptr,
                )?;
        }
        self.counters.add(Event::Download, 2);
        let ids = self.stream.clone_dtoh(&ids)?;
        let confidence = self.stream.clone_dtoh(&confidence)?;
        self.stream.synchronize()?;
        let (mut row, mut scratch) = (vec![0.0f32; vocab], DrawScratch::default());
        for (r, (spec, slot)) in draws.iter().zip(out.iter_mut()).take(rows).enumerate() {
            let certified = draw::certified_token(
                [ids[2 * r], ids[2 * r + 1]],
                [
                    confidence[3 * r],
                    confidence[3 * r + 1],
                    confidence[3 * r + 2],
                ],
            );
            self.counters.add(
                if certified.is_some() {
                    Event::DeviceDraw
                } else {
                    Event::HostRedraw
                },
                1,
            );
            *slot = match certified {
                Some(token) => token,
                None => {
                    self.download(Slice::at(logits.buf, logits.offset + r * vocab), &mut row)?;
                    draw_token(&row, mask_id, nucleus, &spec.stream, spec.row, &mut scratch)
                }
            };
        }
        Ok(())
    }
}
