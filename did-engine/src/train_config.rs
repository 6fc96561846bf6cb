//! The `[train]` table of a run file (`did train --config run.toml`): every
//! training flag as a TOML key. Flags given on the command line win over the
//! file, the file over the built-in defaults.
//!
//! ```toml
//! [model]
//! preset = "tiny"
//!
//! [train]
//! data = "data/prepared"
//! objective = "mix-scale"
//! blocks = "4:0.9,L:0.1"
//! batch = 16
//! steps = 5000
//! lr = 3e-4
//! out = "runs/tiny-mix"
//! ```

use crate::Error;
use std::path::PathBuf;

use serde::Deserialize;

/// The `[train]` table; every key optional, named as the flag (`checkpoint-every` → `checkpoint_every`).
#[derive(Debug, Default, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    /// `--data`.
    pub data: Option<PathBuf>,
    /// `--objective`.
    pub objective: Option<String>,
    /// `--block`.
    pub block: Option<usize>,
    /// `--blocks`.
    pub blocks: Option<String>,
    /// `--length`.
    pub length: Option<usize>,
    /// `--batch`.
    pub batch: Option<usize>,
    /// `--accumulate`.
    pub accumulate: Option<usize>,
    /// `--steps`.
    pub steps: Option<u32>,
    /// `--lr`.
    pub lr: Option<f32>,
    /// `--warmup`.
    pub warmup: Option<u32>,
    /// `--seed`.
    pub seed: Option<u64>,
    /// `--out`.
    pub out: Option<PathBuf>,
    /// `--checkpoint-every`.
    pub checkpoint_every: Option<u32>,
    /// `--keep`.
    pub keep: Option<usize>,
    /// `--valid-every`.
    pub valid_every: Option<u32>,
    /// `--valid-batches`.
    pub valid_batches: Option<usize>,
    /// `--init-from`.
    pub init_from: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RunFile {
    model: Option<toml::Table>,
    train: Option<TrainSection>,
}

/// A run file: its `[train]` table (empty if absent) and whether it has a `[model]` table.
///
/// ```
/// let (train, has_model) = did_engine::train_config::parse("[model]\npreset = \"tiny\"\n[train]\nbatch = 4\n")?;
/// assert_eq!(train.batch, Some(4));
/// assert!(has_model);
/// assert!(did_engine::train_config::parse("[train]\nbatch_size = 4\n").unwrap_err().to_string().contains("batch_size"));
/// # Ok::<(), String>(())
/// ```
pub fn parse(text: &str) -> Result<(TrainSection, bool), Error> {
    let file: RunFile =
        toml::from_str(text).map_err(|e| Error::Config(format!("run config: {}", e.message())))?;
    Ok((file.train.unwrap_or_default(), file.model.is_some()))
}
