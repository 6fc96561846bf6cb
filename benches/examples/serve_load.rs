//! A closed-loop load generator for `did serve` (scripts/serve-bench.sh runs it): at each
//! concurrency C, C clients send completions back to back for a while, each request with its
//! own seed and prompt; prints one JSON line per level: completions/s, tokens/s, latency
//! percentiles, failures and 429s.
//!
//!   cargo run --release -p did-benches --example serve_load -- ADDR SECONDS MAX_TOKENS C1 [C2 …]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const PROMPTS: [&str; 8] = [
    "The ",
    "It was ",
    "In the year ",
    "Mr. President, ",
    "She said that ",
    "We the people ",
    "Once upon a time ",
    "The Congress ",
];

/// One request's outcome: HTTP status, seconds, completion tokens.
type Outcome = (u16, f64, u64);

fn post(addr: &str, body: &str) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(600)))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .map_err(|e| e.to_string())?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).map_err(|e| e.to_string())?;
    let (head, rest) = raw.split_once("\r\n\r\n").ok_or("no header")?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or("no status")?;
    Ok((status, rest.to_string()))
}

fn completion_tokens(body: &str) -> u64 {
    let key = "\"completion_tokens\":";
    body.find(key)
        .map(|i| &body[i + key.len()..])
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|d| d.parse().ok())
        .unwrap_or(0)
}

fn level(addr: &str, clients: usize, seconds: f64, max_tokens: u64, next: &AtomicU64) -> String {
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let outcomes: Vec<Outcome> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|_| {
                s.spawn(|| {
                    let mut mine = Vec::new();
                    while Instant::now() < deadline {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let body = format!(
                            "{{\"prompt\": \"{}\", \"seed\": {i}, \"max_tokens\": {max_tokens}}}",
                            PROMPTS[i as usize % PROMPTS.len()]
                        );
                        let t0 = Instant::now();
                        let (status, tokens) = match post(addr, &body) {
                            Ok((status, body)) => (status, completion_tokens(&body)),
                            Err(_) => (0, 0),
                        };
                        mine.push((status, t0.elapsed().as_secs_f64(), tokens));
                        if status == 429 {
                            std::thread::sleep(Duration::from_secs(1));
                        }
                    }
                    mine
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    });
    let wall = started.elapsed().as_secs_f64();
    let ok: Vec<&Outcome> = outcomes.iter().filter(|o| o.0 == 200).collect();
    let mut latency: Vec<f64> = ok.iter().map(|o| o.1).collect();
    latency.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        if latency.is_empty() {
            f64::NAN
        } else {
            latency[((latency.len() as f64 * p).ceil() as usize).clamp(1, latency.len()) - 1]
        }
    };
    let tokens: u64 = ok.iter().map(|o| o.2).sum();
    format!(
        "{{\"concurrency\": {clients}, \"seconds\": {wall:.2}, \"completions\": {}, \"completions_per_s\": {:.3}, \"tokens_per_s\": {:.1}, \"p50_s\": {:.3}, \"p99_s\": {:.3}, \"failed\": {}, \"refused_429\": {}}}",
        ok.len(),
        ok.len() as f64 / wall,
        tokens as f64 / wall,
        pct(0.5),
        pct(0.99),
        outcomes.iter().filter(|o| o.0 != 200 && o.0 != 429).count(),
        outcomes.iter().filter(|o| o.0 == 429).count(),
    )
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: serve_load ADDR SECONDS MAX_TOKENS CONCURRENCY…";
    let (Some(addr), Some(seconds), Some(max_tokens)) = (
        args.first(),
        args.get(1).and_then(|s| s.parse::<f64>().ok()),
        args.get(2).and_then(|s| s.parse::<u64>().ok()),
    ) else {
        eprintln!("{usage}");
        std::process::exit(2);
    };
    let next = AtomicU64::new(0);
    for c in args[3..].iter().filter_map(|c| c.parse::<usize>().ok()) {
        println!("{}", level(addr, c, seconds, max_tokens, &next));
    }
}
