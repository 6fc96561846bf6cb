//! Benchmarks live in `benches/`; see docs/perf/.
