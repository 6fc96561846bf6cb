//! `did serve` on loopback with a small random byte-level model: every response under
//! concurrent load equals the same request sent alone, streams carry the draft then the refined
//! text, errors have OpenAI's shape, a full queue answers 429, and a client that leaves is
//! dropped from the queue.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use did_backend_cpu::CpuBackend;
use did_core::model::{Architecture, ModelConfig, ParamTable};
use did_engine::checkpoint::{self, Checkpoint};
use did_serve::{ServeOptions, Server};
use serde_json::{json, Value};

const LEN: usize = 32;

/// A random byte-level DiT with a context of `LEN`, written once per test.
fn checkpoint(name: &str) -> PathBuf {
    let config = ModelConfig {
        vocab_size: 258,
        mask_id: 257,
        layers: 2,
        hidden: 64,
        heads: 2,
        mlp_hidden: 128,
        context: LEN,
        cond_dim: 16,
        dropout: 0.0,
        ..ModelConfig::preset("tiny", Architecture::Dit).unwrap()
    };
    let params = ParamTable::new(&config).random_values(3, 0.5);
    let dir = std::env::temp_dir().join(format!("did-serve-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("toy.safetensors");
    checkpoint::save(
        &path,
        &Checkpoint::imported(config, params, BTreeMap::new()),
    )
    .unwrap();
    path
}

fn start(name: &str, max_batch: usize, queue: usize) -> Server {
    let options = ServeOptions {
        port: 0,
        max_batch,
        queue,
        drain: Duration::from_secs(10),
        ..ServeOptions::default()
    };
    let path = checkpoint(name);
    let server = Server::start(&path, || Ok(CpuBackend::new()), &options).unwrap();
    // The server holds the weights: the file is not needed again.
    if let Some(dir) = path.parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
    server
}

/// One HTTP/1.1 exchange: the status, the headers and the body.
fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, rest) = raw.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    (
        status,
        head.to_string(),
        if chunked {
            unchunk(rest)
        } else {
            rest.to_string()
        },
    )
}

fn unchunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

fn complete(addr: SocketAddr, request: &Value) -> Value {
    let (status, _, body) = http(addr, "POST", "/v1/completions", &request.to_string());
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// The choices' texts and NFEs: what must not depend on the batch.
fn choices(response: &Value) -> Vec<(String, u64)> {
    response["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["text"].as_str().unwrap().to_string(),
                c["nfe"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn every_response_under_load_equals_the_request_alone() {
    let server = start("load", 16, 256);
    let addr = server.addr;
    let requests: Vec<Value> = (0..64)
        .map(|i| {
            let prompt: String = "the quick brown fox jumps".chars().take(i % 12).collect();
            let mut r = json!({"prompt": prompt, "seed": 1000 + i, "max_tokens": 20});
            if i % 5 == 0 {
                r["n"] = json!(2);
            }
            r
        })
        .collect();
    let together: Vec<Value> = std::thread::scope(|s| {
        let handles: Vec<_> = requests
            .iter()
            .map(|r| s.spawn(move || complete(addr, r)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let (_, _, metrics) = http(addr, "GET", "/metrics", "");
    let calls = metric(&metrics, "did_batch_sequences_count");
    let alone = metric(&metrics, "did_batch_sequences_bucket{le=\"1\"}");
    assert!(
        alone < calls,
        "64 concurrent requests: none of {calls} model calls served two sequences"
    );
    for (r, t) in requests.iter().zip(&together) {
        let alone = complete(addr, r);
        assert_eq!(choices(t), choices(&alone), "{r}");
        assert_eq!(t["usage"], alone["usage"]);
    }
    server.stop().unwrap();
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("{name} missing from\n{text}"))
}

/// The events of a streamed request, `[DONE]` last.
fn events(addr: SocketAddr, request: &Value) -> Vec<String> {
    let (status, head, body) = http(addr, "POST", "/v1/completions", &request.to_string());
    assert_eq!(status, 200, "{body}");
    assert!(head.contains("text/event-stream"), "{head}");
    body.split("\n\n")
        .filter_map(|e| e.trim().strip_prefix("data: ").map(str::to_string))
        .collect()
}

#[test]
fn a_stream_sends_the_draft_block_by_block_then_the_refined_text() {
    let server = start("stream", 8, 16);
    let addr = server.addr;
    let request = json!({"prompt": "ab", "seed": 5, "n": 2, "stages": "4,L:0.5"});
    let plain = complete(addr, &request);
    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    let events = events(addr, &streamed);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let (last, drafts) = chunks.split_last().unwrap();
    assert!(
        drafts.len() >= 2,
        "the draft came in {} events",
        drafts.len()
    );
    let mut draft = [String::new(), String::new()];
    for c in drafts {
        for choice in c["choices"].as_array().unwrap() {
            assert_eq!(
                choice["text"], "",
                "a refining plan streams the draft aside"
            );
            let i = choice["index"].as_u64().unwrap() as usize;
            draft[i].push_str(choice["draft"].as_str().unwrap());
        }
    }
    assert_eq!(choices(last), choices(&plain));
    for (c, d) in last["choices"].as_array().unwrap().iter().zip(&draft) {
        assert!(!c["regenerated"].as_array().unwrap().is_empty());
        assert!(!d.is_empty());
    }
    // A draft-only plan streams its text itself.
    let events = events_text(
        addr,
        &json!({"prompt": "ab", "seed": 5, "stages": "4", "stream": true}),
    );
    let alone = complete(addr, &json!({"prompt": "ab", "seed": 5, "stages": "4"}));
    assert_eq!(events, choices(&alone)[0].0);
    server.stop().unwrap();
}

/// The concatenated `text` of a streamed request's events.
fn events_text(addr: SocketAddr, request: &Value) -> String {
    let all = events(addr, request);
    all[..all.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .map(|c| c["choices"][0]["text"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn errors_are_openai_shaped_and_name_the_fix() {
    let server = start("errors", 4, 16);
    let addr = server.addr;
    let cases = [
        (
            r#"{"prompt": "a", "temprature": 1}"#,
            400,
            "unknown field `temprature`",
        ),
        (r#"{"model": "gpt-4"}"#, 404, "toy"),
        (r#"{"max_tokens": 500}"#, 400, "--length"),
        (r#"{"n": 5}"#, 400, "--max-batch"),
        (r#"{"stages": "5,L:0.25"}"#, 400, "stages"),
        ("not json", 400, "not a completions request"),
    ];
    for (body, status, says) in cases {
        let (got, _, text) = http(addr, "POST", "/v1/completions", body);
        assert_eq!(got, status, "{body}: {text}");
        let e: Value = serde_json::from_str(&text).unwrap();
        let message = e["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{body}: {message}");
        assert!(e["error"]["type"].is_string());
    }
    let (status, _, models) = http(addr, "GET", "/v1/models", "");
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&models).unwrap()["data"][0]["id"],
        "toy"
    );
    let (status, _, health) = http(addr, "GET", "/health", "");
    assert_eq!((status, health.contains("ok")), (200, true));
    server.stop().unwrap();
}

#[test]
fn a_full_queue_answers_429_with_retry_after_and_nothing_fails() {
    let server = start("queue", 1, 1);
    let addr = server.addr;
    let answers: Vec<(u16, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..48)
            .map(|i| {
                s.spawn(move || {
                    let body = json!({"seed": i, "stages": "1,L:0.5"}).to_string();
                    let (status, head, _) = http(addr, "POST", "/v1/completions", &body);
                    (status, head)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let refused: Vec<_> = answers.iter().filter(|(s, _)| *s == 429).collect();
    assert!(
        !refused.is_empty(),
        "48 requests at once never filled a queue of 1"
    );
    assert!(refused
        .iter()
        .all(|(_, h)| h.to_ascii_lowercase().contains("retry-after: 1")));
    assert!(answers.iter().all(|(s, _)| *s == 200 || *s == 429));
    let (_, _, health) = http(addr, "GET", "/health", "");
    assert!(health.contains("ok"));
    server.stop().unwrap();
}

#[test]
fn a_client_that_leaves_frees_its_place_in_the_queue() {
    let server = start("cancel", 1, 8);
    let addr = server.addr;
    // One slow request keeps the engine busy while three more arrive and leave at once.
    let slow = std::thread::spawn(move || {
        complete(
            addr,
            &json!({"seed": 1, "stages": "1,2:0.9,4:0.9,8:0.9,16:0.9,L:0.9"}),
        )
    });
    // Wait until it runs.
    while !http(addr, "GET", "/health", "").2.contains("\"running\":1") {
        assert!(
            !slow.is_finished(),
            "the slow request ended before it was seen running"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    for i in 0..3 {
        let mut s = TcpStream::connect(addr).unwrap();
        let body = json!({"seed": 10 + i}).to_string();
        write!(
            s,
            "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        s.shutdown(std::net::Shutdown::Both).unwrap();
    }
    slow.join().unwrap();
    complete(addr, &json!({"seed": 2}));
    // None of them was computed: a request whose client left is either never dispatched (hyper
    // saw the connection close first) or dropped by the engine when it next looks at its queue
    // (`did_cancelled_total`; engine.rs's tests pin that case down).
    let (_, _, metrics) = http(addr, "GET", "/metrics", "");
    assert_eq!(
        metric(&metrics, "did_started_sequences_total"),
        2.0,
        "{metrics}"
    );
    assert_eq!(metric(&metrics, "did_requests_total{status=\"200\"}"), 2.0);
    assert!(metric(&metrics, "did_cancelled_total") <= 3.0);
    assert_eq!(metric(&metrics, "did_queue_depth"), 0.0);
    server.stop().unwrap();
}

#[test]
fn a_client_that_leaves_mid_generation_stops_its_sequences() {
    let server = start("leave", 4, 8);
    let addr = server.addr;
    // About 2,500 model calls: the client leaves long before they are done.
    let slow = json!({"seed": 1, "stages": format!("1{},L:0.9", ",1:0.9".repeat(40))}).to_string();
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n{slow}",
        slow.len()
    )
    .unwrap();
    while !http(addr, "GET", "/health", "").2.contains("\"running\":1") {
        std::thread::sleep(Duration::from_millis(1));
    }
    drop(s);
    let left = std::time::Instant::now();
    while !http(addr, "GET", "/health", "").2.contains("\"running\":0") {
        assert!(
            left.elapsed() < Duration::from_secs(60),
            "the sequence of a client that left kept running"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let (_, _, metrics) = http(addr, "GET", "/metrics", "");
    assert_eq!(metric(&metrics, "did_cancelled_total"), 1.0, "{metrics}");
    assert!(!metrics.contains("did_requests_total{status=\"200\"}"));
    complete(addr, &json!({"seed": 2}));
    server.stop().unwrap();
}
