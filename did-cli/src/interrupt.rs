//! Ctrl-C (SIGINT) as a request to stop at the next safe point: training saves a checkpoint
//! after its current step, sampling stops between two model calls and keeps the samples it
//! has written.

use std::sync::atomic::{AtomicBool, Ordering};

static REQUESTED: AtomicBool = AtomicBool::new(false);

/// Installs the handler. A process has one; installing it again (the demo trains twice) keeps
/// the first, which sets the same flag.
pub fn install() {
    let _ = ctrlc::set_handler(|| REQUESTED.store(true, Ordering::SeqCst));
}

/// Whether Ctrl-C was pressed since the process started.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}
