//! `did train`: the run itself is did-engine's (`did_engine::training`); the CLI installs the
//! Ctrl-C handler the run polls, reads the fault-injection switch, and prints the summary.

use did_core::backend::Backend;
pub use did_engine::training::{Objective, TrainOptions};

/// `DID_FAULT_NAN_AT_STEP=N`: the fault-injection switch of the reliability tests (a NaN enters
/// the loss at optimizer step N; docs/reliability.md).
pub fn fault_nan_at_step() -> Result<Option<u32>, String> {
    match std::env::var("DID_FAULT_NAN_AT_STEP") {
        Err(_) => Ok(None),
        Ok(v) => v.trim().parse().map(Some).map_err(|_| {
            format!(
                "DID_FAULT_NAN_AT_STEP={v:?} is not a step number; unset it for normal training"
            )
        }),
    }
}

/// Runs training with Ctrl-C as its stop (a checkpoint after the current step); returns the
/// summary printed at the end.
pub fn train<B: Backend>(be: &B, opts: &TrainOptions) -> Result<String, String> {
    crate::interrupt::install();
    let opts = TrainOptions {
        stop: crate::interrupt::requested,
        ..opts.clone()
    };
    Ok(did_engine::training::train(be, &opts)?.to_string())
}
