//! Benchmark helpers: a timing [`Backend`](did_core::backend::Backend)
//! wrapper, and the side-by-side baseline of the CPU training step written
//! with candle-core. The benches themselves live in `benches/`; results in docs/perf/.

pub mod candle_dit;
pub mod cpu_inference;
pub mod profile;
