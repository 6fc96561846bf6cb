//! The routes: `POST /v1/completions` (JSON, or server-sent events), `GET /v1/models`,
//! `GET /health`, `GET /metrics`. Answers follow OpenAI's shapes (docs/serving.md).

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::engine::{Busy, EngineHandle, Finished, Job, JobEvent};
use crate::metrics::Metrics;
use crate::request::{ApiError, Checked, CompletionRequest, Served};
use crate::text::{completion_text, CompletionText};

/// What every handler shares.
pub struct App {
    /// The engine's queue.
    pub engine: EngineHandle,
    /// The model and its defaults.
    pub served: Served,
    /// The metrics.
    pub metrics: Arc<Metrics>,
    /// Ids and seeds of requests that give none.
    pub counter: AtomicU64,
    /// Mixed into the seeds the server picks.
    pub seed_base: u64,
}

/// The router over `app`.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .with_state(app)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn models(State(app): State<Arc<App>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{"id": app.served.model_id, "object": "model", "created": 0, "owned_by": "did"}],
    }))
}

async fn health(State(app): State<Arc<App>>) -> Json<Value> {
    Json(json!({
        "status": "ok",
        "waiting": app.engine.waiting(),
        "running": app.metrics.running.get(),
    }))
}

async fn metrics(State(app): State<Arc<App>>) -> impl IntoResponse {
    app.metrics.queue_depth.set(app.engine.waiting() as i64);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.text(),
    )
}

fn error_response(e: &ApiError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST);
    let mut r = (status, Json(e.body())).into_response();
    if e.status == 429 {
        r.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    }
    r
}

async fn completions(State(app): State<Arc<App>>, body: Bytes) -> Response {
    let arrived = Instant::now();
    let n = app.counter.fetch_add(1, Ordering::Relaxed);
    let fresh_seed = splitmix(app.seed_base ^ n);
    let checked =
        CompletionRequest::from_json(&body).and_then(|r| r.check(&app.served, fresh_seed));
    let checked = match checked {
        Ok(c) => c,
        Err(e) => {
            app.metrics
                .request_done(e.status, arrived.elapsed().as_secs_f64());
            return error_response(&e);
        }
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let job = Job {
        config: checked.config.clone(),
        prompts: checked.prompts.clone(),
        ids: checked.ids.clone(),
        stream: checked.stream,
        events: tx,
    };
    if let Err(Busy) = app.engine.submit(job) {
        let e = ApiError {
            status: 429,
            message: "the server's queue is full (did serve --queue); retry after the Retry-After seconds".into(),
            kind: "rate_limit_error",
            param: None,
            code: Some("queue_full"),
        };
        app.metrics
            .request_done(429, arrived.elapsed().as_secs_f64());
        return error_response(&e);
    }
    app.metrics.queue_depth.set(app.engine.waiting() as i64);
    let reply = Reply {
        id: format!("cmpl-{n}"),
        created: unix_now(),
        model: app.served.model_id.clone(),
        checked,
    };
    if reply.checked.stream {
        stream_reply(app, reply, rx, arrived)
    } else {
        json_reply(app, reply, rx, arrived).await
    }
}

/// What a reply needs of its request.
struct Reply {
    id: String,
    created: u64,
    model: String,
    checked: Checked,
}

impl Reply {
    fn text(&self, app: &App, s: usize, tokens: &[u32]) -> CompletionText {
        let c = &self.checked;
        completion_text(
            &app.served.tokenizer,
            tokens,
            c.prompts[s].len(),
            c.max_tokens[s],
            &c.stop,
        )
    }

    /// Regenerated positions counted from the completion's start, inside what is returned.
    fn regenerated(&self, s: usize, f: &Finished, text: &CompletionText) -> Vec<usize> {
        let start = self.checked.prompts[s].len();
        f.regenerated
            .iter()
            .filter_map(|&p| p.checked_sub(start))
            .filter(|&p| p < text.tokens)
            .collect()
    }

    fn chunk(&self, choices: Vec<Value>) -> Value {
        json!({
            "id": self.id, "object": "text_completion", "created": self.created,
            "model": self.model, "choices": choices,
        })
    }
}

async fn json_reply(
    app: Arc<App>,
    reply: Reply,
    mut rx: mpsc::UnboundedReceiver<JobEvent>,
    arrived: Instant,
) -> Response {
    let done = loop {
        match rx.recv().await {
            Some(JobEvent::Done(done)) => break Ok(done),
            Some(JobEvent::Failed(e)) => break Err(e),
            Some(JobEvent::Draft(_)) => {}
            None => break Err("the engine stopped".into()),
        }
    };
    let done = match done {
        Ok(d) => d,
        Err(e) => {
            let e = server_error(e);
            app.metrics
                .request_done(500, arrived.elapsed().as_secs_f64());
            return error_response(&e);
        }
    };
    let mut choices = Vec::with_capacity(done.len());
    let (mut prompt_tokens, mut completion_tokens) = (0, 0);
    for (s, f) in done.iter().enumerate() {
        let text = reply.text(&app, s, &f.tokens);
        prompt_tokens += reply.checked.prompts[s].len() - 1;
        completion_tokens += text.tokens;
        choices.push(json!({
            "index": s, "text": text.text, "finish_reason": text.finish_reason, "logprobs": null,
            "nfe": f.nfe, "regenerated": reply.regenerated(s, f, &text),
        }));
    }
    let mut body = reply.chunk(choices);
    body["usage"] = json!({
        "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    });
    body["seed"] = json!(reply.checked.seed);
    app.metrics
        .request_done(200, arrived.elapsed().as_secs_f64());
    Json(body).into_response()
}

fn server_error(message: String) -> ApiError {
    ApiError {
        status: 500,
        message: format!("generation failed: {message}"),
        kind: "server_error",
        param: None,
        code: None,
    }
}

/// Server-sent events: the draft as each block completes, then the final text, then `[DONE]`.
/// With a refining plan the draft travels in each choice's `draft` field and the final text in
/// one last `text` (a client that joins the `text`s gets the refined completion); without
/// one, the draft is the completion and streams as `text`.
fn stream_reply(
    app: Arc<App>,
    reply: Reply,
    mut rx: mpsc::UnboundedReceiver<JobEvent>,
    arrived: Instant,
) -> Response {
    let (tx, events) = mpsc::unbounded_channel::<Result<Event, Infallible>>();
    tokio::spawn(async move {
        let sequences = reply.checked.prompts.len();
        let mut sent = vec![String::new(); sequences];
        let field = if reply.checked.refines {
            "draft"
        } else {
            "text"
        };
        let send = |v: Value| tx.send(Ok(Event::default().data(v.to_string()))).is_ok();
        let status = loop {
            match rx.recv().await {
                Some(JobEvent::Draft(so_far)) => {
                    let mut choices = Vec::new();
                    for (s, tokens) in so_far.iter().enumerate() {
                        let text = reply.text(&app, s, tokens);
                        let stable = text.text.trim_end_matches('\u{fffd}');
                        if let Some(delta) = stable.strip_prefix(sent[s].as_str()) {
                            if !delta.is_empty() {
                                let mut c = json!({"index": s, "text": "", "finish_reason": null, "logprobs": null});
                                c[field] = json!(delta);
                                choices.push(c);
                                sent[s] = stable.to_string();
                            }
                        }
                    }
                    if !choices.is_empty() && !send(reply.chunk(choices)) {
                        break 499; // the client left
                    }
                }
                Some(JobEvent::Done(done)) => {
                    let mut choices = Vec::new();
                    for (s, f) in done.iter().enumerate() {
                        let text = reply.text(&app, s, &f.tokens);
                        let out = if reply.checked.refines {
                            text.text.clone()
                        } else {
                            match text.text.strip_prefix(sent[s].as_str()) {
                                Some(rest) => rest.to_string(),
                                None => text.text.clone(),
                            }
                        };
                        choices.push(json!({
                            "index": s, "text": out, "finish_reason": text.finish_reason,
                            "logprobs": null, "nfe": f.nfe,
                            "regenerated": reply.regenerated(s, f, &text),
                        }));
                    }
                    let mut last = reply.chunk(choices);
                    last["seed"] = json!(reply.checked.seed);
                    let ok = send(last) && tx.send(Ok(Event::default().data("[DONE]"))).is_ok();
                    break if ok { 200 } else { 499 };
                }
                Some(JobEvent::Failed(e)) => {
                    let _ = send(server_error(e).body());
                    break 500;
                }
                None => {
                    let _ = send(server_error("the engine stopped".into()).body());
                    break 500;
                }
            }
        };
        app.metrics
            .request_done(status, arrived.elapsed().as_secs_f64());
    });
    Sse::new(UnboundedReceiverStream::new(events))
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// A seed from a counter (SplitMix64's finaliser).
fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
