//! `metrics.jsonl`: one JSON line per optimizer step, appended; on resume, cut back to the
//! checkpoint's step so that the log matches the state the run continues from.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::Error;

/// The open log of a run.
pub struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsLog {
    /// Opens `out/metrics.jsonl` for appending, first dropping lines of steps past `step` (run
    /// after the last checkpoint, before a crash) and a torn last line.
    pub fn resume_at(out: &Path, step: u32) -> Result<Self, Error> {
        let path = out.join("metrics.jsonl");
        trim_metrics(&path, step)?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| {
                Error::Training(format!(
                    "cannot write metrics.jsonl in {}: {e}",
                    out.display()
                ))
            })?;
        Ok(MetricsLog { path, file })
    }

    /// Appends one line (its `\n` included).
    pub fn append(&mut self, line: &str) -> Result<(), Error> {
        self.file
            .write_all(line.as_bytes())
            .map_err(|e| Error::Training(format!("cannot write {}: {e}", self.path.display())))
    }
}

/// Keeps the complete lines of `metrics.jsonl` whose step is at most `upto`.
fn trim_metrics(path: &Path, upto: u32) -> Result<(), Error> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(()); // none yet
    };
    let step_of = |line: &str| {
        serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|v| v["step"].as_u64())
    };
    let kept: String = text
        .split_inclusive('\n')
        .filter(|l| l.ends_with('\n') && step_of(l).is_some_and(|s| s <= u64::from(upto)))
        .collect();
    if kept.len() == text.len() {
        return Ok(());
    }
    let tmp = path.with_extension("jsonl.tmp");
    std::fs::write(&tmp, kept)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| Error::Training(format!("cannot rewrite {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resuming_drops_steps_past_the_checkpoint_and_a_torn_line() {
        let dir = std::env::temp_dir().join(format!("did-metrics-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("metrics.jsonl");
        std::fs::write(
            &path,
            "{\"step\":1}\n{\"step\":2}\n{\"step\":3}\n{\"step\":4,\"lo",
        )
        .unwrap();
        let mut log = MetricsLog::resume_at(&dir, 2).unwrap();
        log.append("{\"step\":3,\"again\":true}\n").unwrap();
        drop(log);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text,
            "{\"step\":1}\n{\"step\":2}\n{\"step\":3,\"again\":true}\n"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
