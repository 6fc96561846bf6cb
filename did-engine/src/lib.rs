//! What the `did` commands run on, as a library: the CLI (`did-cli`), the fuzz targets and the
//! benches use it, and so can an engine of your own.
//!
//! - [`checkpoint`]: safetensors checkpoints with the model and training state, written
//!   atomically and checked against their configuration when read;
//! - [`data`]: corpora (text, archives, JSON lines, parquet) into GPT-2 or byte token shards,
//!   and the shard reader;
//! - [`import`]: weights from elsewhere (GPT-2, BD3-LM and MDLM on the Hugging Face layout,
//!   PyTorch's pickle format);
//! - [`judge`]: the causal judge of generative perplexity (BD3-LM's protocol), and
//!   [`ngram_judge`], the independent n-gram one;
//! - [`collective`]: data-parallel ranks as threads of one process (tests);
//! - [`launch`]: where a process sits in a `torchrun` or SLURM launch, the TCP rendezvous, and
//!   the ranks' sums over TCP;
//! - [`training`]: the training run (windows, batches, metrics log, checkpoints, exact resume);
//! - [`model_config`], [`train_config`]: the TOML `[model]` table and run files;
//! - [`sampling`]: sampling settings, a checkpoint made ready to sample, and each stage's time;
//! - [`eval`]: BD3-LM's evaluation protocols (the NELBO bound, generative perplexity under both
//!   judges) and the entropy of samples;
//! - [`samples`]: the sample files `did sample --out` writes.

#![deny(missing_docs)]

pub mod checkpoint;
pub mod collective;
pub mod data;
pub mod eval;
pub mod import;
pub mod judge;
pub mod launch;
pub mod model_config;
pub mod ngram_judge;
pub mod samples;
pub mod sampling;
pub mod train_config;
pub mod training;

/// What went wrong in did-engine, by what it was doing. Every message names the file or input,
/// the cause and the fix; `Display` gives it as it was always written.
///
/// ```
/// let err = did_engine::model_config::from_toml("[model]\npreset = \"huge\"\n").unwrap_err();
/// assert!(matches!(err, did_engine::Error::Config(_)));
/// assert!(err.to_string().contains("huge"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A checkpoint that cannot be read or written, or that does not fit its configuration.
    #[error("{0}")]
    Checkpoint(String),
    /// A corpus that cannot be read or tokenised.
    #[error("{0}")]
    Corpus(String),
    /// Token shards that cannot be written or read back.
    #[error("{0}")]
    Shards(String),
    /// Weights from elsewhere (GPT-2, BD3-LM, MDLM, PyTorch files) that cannot be imported.
    #[error("{0}")]
    Import(String),
    /// A `[model]` table or a run file that is not valid.
    #[error("{0}")]
    Config(String),
    /// A judge's language model that cannot be read.
    #[error("{0}")]
    Judge(String),
    /// A sample file that cannot be read.
    #[error("{0}")]
    Samples(String),
    /// Sampling settings that do not fit the checkpoint, or a generation that failed.
    #[error("{0}")]
    Sampling(String),
    /// A generation stopped between two model calls because a stop was asked for (Ctrl-C).
    #[error("{0}")]
    Interrupted(String),
    /// An evaluation (NELBO, generative perplexity) that cannot run as asked.
    #[error("{0}")]
    Eval(String),
    /// A training run that cannot start or continue as asked.
    #[error("{0}")]
    Training(String),
    /// A data-parallel launch that cannot start: its variables, the rendezvous, a lost rank.
    #[error("{0}")]
    Launch(String),
}

/// For callers whose errors are still text (the CLI's commands): the message.
impl From<Error> for String {
    fn from(e: Error) -> String {
        e.to_string()
    }
}
