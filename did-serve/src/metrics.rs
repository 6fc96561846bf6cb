//! What `GET /metrics` reports, in Prometheus's text format: the queue, the running sequences,
//! the model calls (how many sequences each served, how long each took) and tokens (their rates
//! give NFE/s and tokens/s), and request latency by outcome.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

/// The server's metrics, registered in one registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Jobs waiting for a batch.
    pub queue_depth: IntGauge,
    /// Sequences being generated.
    pub running: IntGauge,
    /// Sequences whose generation started.
    pub started: IntCounter,
    /// Sequences per model call.
    pub batch_sequences: Histogram,
    /// Seconds per model call.
    pub batch_seconds: Histogram,
    /// Model calls (NFE) run, a merged call counted once.
    pub model_calls: IntCounter,
    /// Tokens drawn for requests (prompts excluded).
    pub generated_tokens: IntCounter,
    /// Jobs whose client left before they finished.
    pub cancelled: IntCounter,
    /// Requests by HTTP status.
    pub requests: IntCounterVec,
    /// Seconds from a request's arrival to its last byte, by HTTP status.
    pub request_seconds: HistogramVec,
}

impl Metrics {
    /// Every metric, registered.
    pub fn new() -> Self {
        let registry = Registry::new();
        let seconds = vec![
            0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0,
        ];
        let queue_depth = IntGauge::new("did_queue_depth", "jobs waiting for a batch")
            .unwrap_or_else(|_| unreachable_metric());
        let running = IntGauge::new("did_running_sequences", "sequences being generated")
            .unwrap_or_else(|_| unreachable_metric());
        let started = IntCounter::new(
            "did_started_sequences_total",
            "sequences whose generation started",
        )
        .unwrap_or_else(|_| unreachable_metric());
        let batch_sequences = Histogram::with_opts(
            HistogramOpts::new("did_batch_sequences", "sequences per model call")
                .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0]),
        )
        .unwrap_or_else(|_| unreachable_metric());
        let batch_seconds = Histogram::with_opts(
            HistogramOpts::new("did_batch_seconds", "seconds per model call")
                .buckets(seconds.clone()),
        )
        .unwrap_or_else(|_| unreachable_metric());
        let model_calls = IntCounter::new(
            "did_model_calls_total",
            "model calls (NFE), a merged call once",
        )
        .unwrap_or_else(|_| unreachable_metric());
        let generated_tokens =
            IntCounter::new("did_generated_tokens_total", "tokens drawn for requests")
                .unwrap_or_else(|_| unreachable_metric());
        let cancelled = IntCounter::new(
            "did_cancelled_total",
            "jobs whose client left before they finished",
        )
        .unwrap_or_else(|_| unreachable_metric());
        let requests = IntCounterVec::new(
            Opts::new("did_requests_total", "requests by HTTP status"),
            &["status"],
        )
        .unwrap_or_else(|_| unreachable_metric());
        let request_seconds = HistogramVec::new(
            HistogramOpts::new(
                "did_request_seconds",
                "seconds from arrival to the last byte",
            )
            .buckets(seconds),
            &["status"],
        )
        .unwrap_or_else(|_| unreachable_metric());
        let m = Metrics {
            registry,
            queue_depth,
            running,
            started,
            batch_sequences,
            batch_seconds,
            model_calls,
            generated_tokens,
            cancelled,
            requests,
            request_seconds,
        };
        let all: [Box<dyn prometheus::core::Collector>; 10] = [
            Box::new(m.queue_depth.clone()),
            Box::new(m.running.clone()),
            Box::new(m.started.clone()),
            Box::new(m.batch_sequences.clone()),
            Box::new(m.batch_seconds.clone()),
            Box::new(m.model_calls.clone()),
            Box::new(m.generated_tokens.clone()),
            Box::new(m.cancelled.clone()),
            Box::new(m.requests.clone()),
            Box::new(m.request_seconds.clone()),
        ];
        for c in all {
            // Names are fixed and distinct: registering cannot fail.
            let _ = m.registry.register(c);
        }
        m
    }

    /// Records a finished request.
    pub fn request_done(&self, status: u16, seconds: f64) {
        let status = status.to_string();
        self.requests.with_label_values(&[&status]).inc();
        self.request_seconds
            .with_label_values(&[&status])
            .observe(seconds);
    }

    /// The Prometheus text of every metric.
    pub fn text(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The metric definitions above are constants that prometheus accepts; reaching this is a bug
/// in this file, caught by its test.
fn unreachable_metric<T>() -> T {
    panic!("a metric definition in did-serve/src/metrics.rs is invalid")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_exported() {
        let m = Metrics::new();
        m.request_done(200, 0.3);
        m.batch_sequences.observe(4.0);
        let text = m.text();
        for name in [
            "did_queue_depth",
            "did_running_sequences",
            "did_started_sequences_total",
            "did_batch_sequences",
            "did_batch_seconds",
            "did_model_calls_total",
            "did_generated_tokens_total",
            "did_cancelled_total",
            "did_requests_total{status=\"200\"} 1",
            "did_request_seconds_bucket",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
    }
}
