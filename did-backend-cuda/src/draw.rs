//! Token drawing on the device: the host side of the `draw_tokens` kernel (kernels/sample.cu).
//!
//! The kernel computes what [`draw_token`](did_core::sample::draw_token) computes, one block
//! per logits row, and sends back 32 bytes a row instead of the row. It sums in another order
//! than the host, so each row comes with a certificate: the row is `certain` when no decision
//! of the host's draw (where the nucleus cuts, which Gumbel score wins) is within a margin of
//! flipping. [`CudaBackend`](crate::CudaBackend) redraws every uncertain row on the host, so the
//! tokens are the reference's, row for row; the confidences of certain rows agree with the
//! reference's to about 1e-12 relative (f64 sums in another order).

use did_core::sample::categorical::{Confidence, SampledToken};
use did_core::sample::DrawSpec;

/// Where [`DrawOps::draw_tokens`](did_core::backend::DrawOps::draw_tokens) draws.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrawLocation {
    /// Download every logits row and draw on the host with `draw_token`, rows spread over the
    /// host's cores (`DID_CUDA_DRAW=host`).
    Host,
    /// The `draw_tokens` kernel; uncertain rows are redrawn on the host (the default).
    Device,
}

/// Words per row of the kernel's `specs` argument.
pub const SPEC_WORDS: usize = 5;

/// A row's stream as the kernel reads it: key (two words), step, tag, stream row.
///
/// ```
/// use did_backend_cuda::draw::stream_words;
/// use did_core::sample::DrawSpec;
/// use did_core::rng::{Purpose, RngStream};
/// let spec = DrawSpec { stream: RngStream::new(7, Purpose::Categorical, 2, 3), row: 5 };
/// assert_eq!(stream_words(&spec), [7, 0, 3, (6 << 24) | 2, 5]);
/// ```
pub fn stream_words(spec: &DrawSpec) -> [u32; SPEC_WORDS] {
    let (key, step, tag) = spec.stream.counter_parts();
    [key[0], key[1], step, tag, spec.row]
}

/// The token the kernel drew for one row from its outputs (`ids[2r..2r + 2]`,
/// `confidence[3r..3r + 3]`), or `None` where the row is not certain and must be redrawn on
/// the host.
///
/// ```
/// use did_backend_cuda::draw::certified_token;
/// let t = certified_token([4, 1], [0.5, 0.4, 0.6]).unwrap();
/// assert_eq!((t.id, t.confidence.raw), (4, 0.4));
/// assert!(certified_token([4, 0], [0.5, 0.4, 0.6]).is_none());
/// ```
pub fn certified_token(ids: [u32; 2], confidence: [f64; 3]) -> Option<SampledToken> {
    (ids[1] == 1).then_some(SampledToken {
        id: ids[0],
        confidence: Confidence {
            nucleus: confidence[0],
            raw: confidence[1],
            max: confidence[2],
        },
    })
}
