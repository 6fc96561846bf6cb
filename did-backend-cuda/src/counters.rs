//! What a [`CudaBackend`](crate::CudaBackend) asked of the GPU, counted: kernel launches,
//! cuBLAS calls, transfers, and where its tokens were drawn. A batch-1 draft is bound by
//! launches and synchronisations rather than by bytes or FLOPs, so these counts, divided by
//! the denoiser calls, say what a call costs before any timing does. `DID_CUDA_STATS=1`
//! prints them to stderr when the backend is dropped.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

/// One kind of event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Event {
    Kernel,
    Gemm,
    Upload,
    /// A device-to-host copy the host waits for.
    Download,
    /// A row drawn by the `draw_tokens` kernel and certified.
    DeviceDraw,
    /// A row the kernel left uncertain, redrawn on the host from its downloaded logits.
    HostRedraw,
    /// A row drawn on the host from the start (`DID_CUDA_DRAW=host`).
    HostDraw,
    /// A replay of a recorded graph.
    GraphLaunch,
    /// A pass that could not be recorded (it ran unrecorded).
    FailedRecording,
}

/// The running totals (atomics: the backend is shared behind `&self`).
#[derive(Debug, Default)]
pub(crate) struct Counters([AtomicU64; 9]);

impl Counters {
    pub(crate) fn add(&self, event: Event, n: u64) {
        self.0[event as usize].fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> Counts {
        let get = |e: Event| self.0[e as usize].load(Ordering::Relaxed);
        Counts {
            kernels: get(Event::Kernel),
            gemms: get(Event::Gemm),
            uploads: get(Event::Upload),
            downloads: get(Event::Download),
            device_draws: get(Event::DeviceDraw),
            host_redraws: get(Event::HostRedraw),
            host_draws: get(Event::HostDraw),
            graph_launches: get(Event::GraphLaunch),
            failed_recordings: get(Event::FailedRecording),
        }
    }
}

/// The totals since the backend was made ([`CudaBackend::counts`](crate::CudaBackend::counts)).
///
/// ```
/// use did_backend_cuda::counters::Counts;
/// let c = Counts { kernels: 1900, gemms: 480, device_draws: 10, host_redraws: 1, ..Counts::default() };
/// let per_call = c.per(10);
/// assert_eq!((per_call.kernels, per_call.gemms), (190, 48));
/// assert!(c.to_string().contains("11 rows drawn: 10 on the device, 1 redrawn on the host"));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    /// Launches of this crate's kernels.
    pub kernels: u64,
    /// cuBLAS GEMM calls.
    pub gemms: u64,
    /// Host-to-device copies.
    pub uploads: u64,
    /// Device-to-host copies the host waited for.
    pub downloads: u64,
    /// Token rows drawn and certified on the device.
    pub device_draws: u64,
    /// Rows the device left uncertain, redrawn on the host.
    pub host_redraws: u64,
    /// Rows drawn on the host from the start (`DID_CUDA_DRAW=host`).
    pub host_draws: u64,
    /// Replays of recorded graphs (`DID_CUDA_GRAPHS=on`); their kernels are not counted as launches.
    pub graph_launches: u64,
    /// Passes that could not be recorded, and ran unrecorded (`DID_CUDA_STATS=1` also prints why).
    pub failed_recordings: u64,
}

impl Counts {
    /// Each count divided by `calls` (rounded down): what one of `calls` calls asked for.
    pub fn per(&self, calls: u64) -> Counts {
        let d = |x: u64| x / calls.max(1);
        Counts {
            kernels: d(self.kernels),
            gemms: d(self.gemms),
            uploads: d(self.uploads),
            downloads: d(self.downloads),
            device_draws: d(self.device_draws),
            host_redraws: d(self.host_redraws),
            host_draws: d(self.host_draws),
            graph_launches: d(self.graph_launches),
            failed_recordings: d(self.failed_recordings),
        }
    }
}

impl fmt::Display for Counts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} kernel launches (recorded into graphs included), {} graph replays, {} failed recordings, {} cuBLAS calls, {} uploads, {} waited-for downloads; {} rows drawn: {} on the device, {} redrawn on the host, {} on the host",
            self.kernels,
            self.graph_launches,
            self.failed_recordings,
            self.gemms,
            self.uploads,
            self.downloads,
            self.device_draws + self.host_redraws + self.host_draws,
            self.device_draws,
            self.host_redraws,
            self.host_draws
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_event_lands_in_its_own_count() {
        let c = Counters::default();
        let events = [
            Event::Kernel,
            Event::Gemm,
            Event::Upload,
            Event::Download,
            Event::DeviceDraw,
            Event::HostRedraw,
            Event::HostDraw,
            Event::GraphLaunch,
            Event::FailedRecording,
        ];
        for (i, &e) in events.iter().enumerate() {
            c.add(e, 1 << i);
        }
        let s = c.snapshot();
        let got = [
            s.kernels,
            s.gemms,
            s.uploads,
            s.downloads,
            s.device_draws,
            s.host_redraws,
            s.host_draws,
            s.graph_launches,
            s.failed_recordings,
        ];
        assert_eq!(got, [1, 2, 4, 8, 16, 32, 64, 128, 256]);
    }
}
