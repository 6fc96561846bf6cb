//! `did serve`: did-serve's server on the chosen backend, until Ctrl-C or SIGTERM.

use std::path::PathBuf;
use std::time::Duration;

use did_engine::sampling::SamplingSettings;
use did_serve::{ServeOptions, Server};

/// `did serve`'s flags.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// A diffusion (dit) checkpoint (default: the committed demo model, data/demo/dit.safetensors.gz).
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port; the address is printed).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// At most this many sequences running at once (and in one request: prompts × n).
    #[arg(long, default_value_t = 32)]
    pub max_batch: usize,
    /// At most this many requests waiting; more are answered 429 with Retry-After.
    #[arg(long, default_value_t = 256)]
    pub queue: usize,
    /// Seconds in-flight requests get to finish after Ctrl-C or SIGTERM.
    #[arg(long, default_value_t = 30.0)]
    pub drain: f64,
    /// Every sequence's length, prompt and completion (default: the model's context).
    #[arg(long)]
    pub length: Option<usize>,
    /// Default stage plan of requests that name none (`stages` field).
    #[arg(long, default_value = "4,L:0.25")]
    pub stages: String,
    /// Default update rule (`sampler` field): first-hitting, ddpm:T, threshold:τ, entropy:β, topk:k.
    #[arg(long, default_value = "first-hitting")]
    pub sampler: String,
    /// Default remasking (`remask` field): snapshot, snapshot-raw, snapshot-max, posthoc, random.
    #[arg(long, default_value = "snapshot")]
    pub remask: String,
    /// Default remask scope (`scope` field): global or block.
    #[arg(long, default_value = "global")]
    pub scope: String,
    /// Default nucleus (`top_p` field).
    #[arg(long, default_value_t = 0.9)]
    pub top_p: f64,
    /// Sample with the trained weights instead of the EMA weights.
    #[arg(long)]
    pub no_ema: bool,
    /// How the weight matrices are stored: f32, bf16 or int8 (CPU only); docs/cpu-inference.md.
    #[arg(long, default_value = "f32")]
    pub weights: String,
}

impl ServeArgs {
    /// The server's options.
    pub fn options(&self) -> Result<ServeOptions, String> {
        if !(self.drain.is_finite() && self.drain >= 0.0) {
            return Err(format!("--drain {}: give seconds, 0 or more", self.drain));
        }
        Ok(ServeOptions {
            host: self.host.clone(),
            port: self.port,
            max_batch: self.max_batch,
            queue: self.queue,
            drain: Duration::from_secs_f64(self.drain),
            settings: SamplingSettings {
                stages: self.stages.clone(),
                sampler: self.sampler.clone(),
                remask: self.remask.clone(),
                scope: self.scope.clone(),
                top_p: self.top_p,
                length: self.length,
                no_ema: self.no_ema,
                weights: self.weights.clone(),
                stop_at_eos: true,
                ..SamplingSettings::default()
            },
        })
    }

    /// The checkpoint to serve.
    pub fn checkpoint(&self) -> Result<PathBuf, String> {
        match &self.checkpoint {
            Some(p) => Ok(p.clone()),
            None => crate::demo::repo_data("demo/dit.safetensors.gz"),
        }
    }
}

/// Prints where the server listens, then serves until it is stopped.
pub fn serve(server: Server) -> Result<String, String> {
    let addr = server.addr;
    println!("did serve: listening on http://{addr} (POST /v1/completions, GET /v1/models, /health, /metrics); Ctrl-C stops");
    server.wait()?;
    Ok(format!("did serve: stopped ({addr})"))
}
