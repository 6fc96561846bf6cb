//! What the `did` commands run on, as a library: the CLI (`did-cli`), the fuzz targets and the
//! benches use it, and so can an engine of your own.
//!
//! - [`checkpoint`]: safetensors checkpoints with the model and training state, written
//!   atomically and checked against their configuration when read;
//! - [`data`]: corpora (text, archives, JSON lines, parquet) into GPT-2 or byte token shards,
//!   and the shard reader;
//! - [`import`]: weights from elsewhere (GPT-2, BD3-LM and MDLM on the Hugging Face layout,
//!   PyTorch's pickle format);
//! - [`ngram_judge`]: the independent n-gram judge of generative perplexity;
//! - [`model_config`], [`train_config`]: the TOML `[model]` table and run files;
//! - [`samples`]: the sample files `did sample --out` writes.

#![deny(missing_docs)]

pub mod checkpoint;
pub mod data;
pub mod import;
pub mod model_config;
pub mod ngram_judge;
pub mod samples;
pub mod train_config;
