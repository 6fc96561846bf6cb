//! `did serve`: an HTTP server with OpenAI's completions API over did's draft → refine sampler.
//! Requests join and leave the running set between model calls, and every request gets the
//! tokens it would get alone, whatever runs beside it (docs/serving.md).
//!
//! - [`request`]: the request body, checked into the engine's work, and the API's errors;
//! - [`engine`]: the thread that owns the model, admits waiting requests and runs their calls;
//! - `cohort`: the requests admitted together, generated on a thread that asks the engine for
//!   each model call;
//! - `merge`: cohorts' calls that read no cached keys, run as one model call;
//! - [`http`]: the routes, JSON and server-sent events;
//! - [`text`]: a completion's text from its tokens;
//! - [`metrics`]: what `GET /metrics` reports.

mod cohort;
pub mod engine;
pub mod http;
mod merge;
pub mod metrics;
pub mod request;
pub mod text;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use did_core::backend::Backend;
use did_engine::sampling::{Prepared, SamplingSettings};
use tokio::sync::watch;

pub use engine::{EngineOptions, Finished, Job, JobEvent};
pub use request::{ApiError, Checked, CompletionRequest, Served};
pub use text::{completion_text, CompletionText};

/// How to serve.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Address to listen on.
    pub host: String,
    /// Port (0: any free one).
    pub port: u16,
    /// At most this many sequences running at once (and per request).
    pub max_batch: usize,
    /// At most this many requests waiting; more are answered 429.
    pub queue: usize,
    /// After Ctrl-C or SIGTERM, in-flight requests get this long to finish.
    pub drain: Duration,
    /// Defaults of every request; `length` is every sequence's length.
    pub settings: SamplingSettings,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            host: "127.0.0.1".into(),
            port: 8080,
            max_batch: 32,
            queue: 256,
            drain: Duration::from_secs(30),
            settings: SamplingSettings {
                stop_at_eos: true,
                ..SamplingSettings::default()
            },
        }
    }
}

/// A running server.
pub struct Server {
    /// Where it listens.
    pub addr: SocketAddr,
    stop: watch::Sender<bool>,
    thread: std::thread::JoinHandle<Result<(), String>>,
}

impl Server {
    /// Loads `checkpoint`, starts the engine on the backend `make` creates, and listens.
    pub fn start<B, F>(checkpoint: &Path, make: F, options: &ServeOptions) -> Result<Server, String>
    where
        B: Backend + 'static,
        F: FnOnce() -> Result<B, String> + Send + 'static,
    {
        if options.max_batch == 0 || options.queue == 0 {
            return Err("--max-batch and --queue must be at least 1".into());
        }
        let prepared = Prepared::load(checkpoint, &options.settings).map_err(|e| e.to_string())?;
        if prepared.causal {
            return Err(format!(
                "{} is a causal (gpt2) model; did serve serves diffusion models",
                checkpoint.display()
            ));
        }
        let model_id = model_id(checkpoint);
        let served = Served {
            model_id,
            tokenizer: prepared.tokenizer.clone(),
            len: prepared.len,
            defaults: options.settings.clone(),
            max_sequences: options.max_batch,
        };
        let metrics = Arc::new(metrics::Metrics::new());
        let engine_options = EngineOptions {
            max_batch: options.max_batch,
            queue: options.queue,
            weights: prepared.weight_format(),
        };
        let weights = prepared.weights().to_vec();
        let (engine, engine_thread) = engine::start(
            make,
            prepared.model,
            weights,
            engine_options,
            Arc::clone(&metrics),
        )?;
        let listener =
            std::net::TcpListener::bind((options.host.as_str(), options.port)).map_err(|e| {
                format!(
                    "cannot listen on {}:{}: {e}; choose another --port or --host",
                    options.host, options.port
                )
            })?;
        listener
            .set_nonblocking(true)
            .map_err(|e| format!("cannot listen: {e}"))?;
        let addr = listener
            .local_addr()
            .map_err(|e| format!("cannot listen: {e}"))?;
        let app = Arc::new(http::App {
            engine,
            served,
            metrics,
            counter: AtomicU64::new(0),
            seed_base: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64),
        });
        let (stop, stopped) = watch::channel(false);
        let drain = options.drain;
        let thread = std::thread::Builder::new()
            .name("did-serve".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| format!("cannot start the HTTP runtime: {e}"))?;
                let result = runtime.block_on(run(listener, app, stopped, drain));
                // The router held the engine's last handle: the engine finishes its batch and ends.
                let _ = engine_thread.join();
                result
            })
            .map_err(|e| format!("cannot start the server thread: {e}"))?;
        Ok(Server { addr, stop, thread })
    }

    /// Stops accepting, lets in-flight requests finish (within the drain time), and returns.
    pub fn stop(self) -> Result<(), String> {
        let _ = self.stop.send(true);
        self.wait()
    }

    /// Returns when the server has stopped: after Ctrl-C or SIGTERM and the drain.
    pub fn wait(self) -> Result<(), String> {
        self.thread
            .join()
            .map_err(|_| "the server thread panicked".to_string())?
    }
}

async fn run(
    listener: std::net::TcpListener,
    app: Arc<http::App>,
    mut stopped: watch::Receiver<bool>,
    drain: Duration,
) -> Result<(), String> {
    let listener =
        tokio::net::TcpListener::from_std(listener).map_err(|e| format!("cannot listen: {e}"))?;
    let (draining_tx, mut draining) = watch::channel(false);
    let shutdown = async move {
        tokio::select! {
            _ = stopped.wait_for(|s| *s) => {}
            _ = signal() => {}
        }
        let _ = draining_tx.send(true);
    };
    let serve = axum::serve(listener, http::router(app)).with_graceful_shutdown(shutdown);
    tokio::select! {
        r = serve => r.map_err(|e| format!("the server failed: {e}")),
        _ = async {
            let _ = draining.wait_for(|d| *d).await;
            tokio::time::sleep(drain).await;
        } => Err(format!(
            "in-flight requests did not finish within the drain time ({:.0} s); they were dropped",
            drain.as_secs_f64()
        )),
    }
}

/// Ctrl-C, or SIGTERM on Unix.
async fn signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

/// The id clients name: the checkpoint's file name without its extensions.
fn model_id(checkpoint: &Path) -> String {
    let name = checkpoint
        .file_name()
        .map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned());
    name.split('.').next().unwrap_or("model").to_string()
}
