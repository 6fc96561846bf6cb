//! [`RecordingOps`]: a pass captured once as a CUDA graph and replayed.

use did_core::backend::prelude::*;
use did_core::backend::RecordingId;

use crate::counters::Event;
use crate::device::*;
use crate::CudaError;

/// An instantiated CUDA graph. cudarc's graph holds raw handles (not `Send`); the driver asks
/// that calls on one graph be serialised, which the backend's mutex does.
pub(crate) struct Graph(cudarc::driver::CudaGraph);

// SAFETY: a Graph is only touched with the backend's `recordings` lock held, one thread at a
// time, as the driver's graph thread-safety rules require.
unsafe impl Send for Graph {}

impl RecordingOps for CudaBackend {
    fn can_record(&self) -> bool {
        self.precision == Precision::Bf16
            && self.few_rows_kernel()
            && self.graphs.load(std::sync::atomic::Ordering::Relaxed)
    }
    fn begin_recording(&self) -> Result<(), CudaError> {
        self.stream.begin_capture(
            cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
        )?;
        Ok(())
    }
    fn end_recording(&self) -> Result<Option<RecordingId>, CudaError> {
        // cudarc keeps an error raised where it could not return one (a free that failed inside
        // a broken capture) and returns it from the next call's context check — which, left
        // there, would be `end_capture`'s, before it ends the capture: the stream would stay in
        // capture mode and every later launch fail. Take it first, end the capture regardless,
        // and drop what was recorded if anything failed.
        let pending = self.stream.context().check_err();
        let ended = self
            .stream
            .end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0));
        pending?;
        let Some(graph) = ended? else {
            return Ok(None);
        };
        let id = self
            .next_recording
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.recordings
            .lock()
            .map_err(|_| CudaError::Shape("the recordings' lock was poisoned".into()))?
            .insert(id, Graph(graph));
        Ok(Some(RecordingId(id)))
    }
    fn replay_recording(&self, id: RecordingId) -> Result<(), CudaError> {
        let recordings = self
            .recordings
            .lock()
            .map_err(|_| CudaError::Shape("the recordings' lock was poisoned".into()))?;
        let graph = recordings
            .get(&id.0)
            .ok_or_else(|| CudaError::Shape(format!("no recording {}", id.0)))?;
        graph.0.launch()?;
        self.counters.add(Event::GraphLaunch, 1);
        Ok(())
    }
    fn recording_failed(&self, why: Option<&CudaError>) {
        self.counters.add(Event::FailedRecording, 1);
        if let Ok(mut first) = self.first_failed_recording.lock() {
            first.get_or_insert_with(|| match why {
                Some(e) => e.to_string(),
                None => "the capture ended without a graph".into(),
            });
        }
    }
    fn forget_recording(&self, id: RecordingId) {
        if let Ok(mut recordings) = self.recordings.lock() {
            recordings.remove(&id.0);
        }
    }
}
