//! Recording a sequence of ops once and replaying it (CUDA graphs).
//!
//! Every method is provided, so a backend that cannot record writes `impl RecordingOps for X {}`.

use super::MemoryOps;

/// A backend's recording of a sequence of its ops (on CUDA, a graph), replayed by
/// [`RecordingOps::replay_recording`]: a batch-1 draft call is ≈ 150 launches of a few µs of work
/// each, which one recorded launch replaces.
///
/// ```
/// use did_core::backend::RecordingId;
/// assert_ne!(RecordingId(1), RecordingId(2));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RecordingId(pub u64);

/// Recording ops once and replaying them. Provided: no recording.
///
/// ```
/// use did_core::backend::RecordingOps;
/// fn replays<B: RecordingOps>(be: &B) -> bool {
///     be.can_record() // false unless the backend overrides it
/// }
/// ```
pub trait RecordingOps: MemoryOps {
    /// Whether this backend can record a sequence of ops and replay it
    /// ([`RecordingOps::begin_recording`]). Provided: no.
    fn can_record(&self) -> bool {
        false
    }
    /// Starts recording: until [`RecordingOps::end_recording`], ops are recorded, not run. Only
    /// called where [`RecordingOps::can_record`]; the ops recorded must read and write the same
    /// buffers, at the same addresses, each time the recording is replayed.
    fn begin_recording(&self) -> Result<(), Self::Error> {
        Ok(())
    }
    /// Ends recording: the recording, not yet run, or `None` where nothing usable was recorded
    /// (the recorded ops' outputs are then undefined: run them again without recording).
    fn end_recording(&self) -> Result<Option<RecordingId>, Self::Error> {
        Ok(None)
    }
    /// Runs a recording again, over what its buffers hold now.
    fn replay_recording(&self, id: RecordingId) -> Result<(), Self::Error> {
        let _ = id;
        Ok(())
    }
    /// Frees a recording.
    fn forget_recording(&self, id: RecordingId) {
        let _ = id;
    }
    /// Told that a pass could not be recorded — `why` is the error of [`RecordingOps::begin_recording`],
    /// [`RecordingOps::end_recording`] or an op while recording, `None` where the recording ended
    /// with nothing usable. The pass then runs unrecorded and its caller records no more, so
    /// nothing fails; this is where a backend keeps the reason to report it. Provided: ignored.
    fn recording_failed(&self, why: Option<&Self::Error>) {
        let _ = why;
    }
}
