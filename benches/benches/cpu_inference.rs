//! Criterion: a KV-cached draft call of the `small` model (random weights) at batch 1 after
//! 512 cached tokens, in each weight format. The page of figures (floors, refine calls, the
//! PyTorch anchor) is `scripts/cpu-inference-bench.sh`'s; this is the statistics of one call.

use criterion::{criterion_group, criterion_main, Criterion};
use did_backend_cpu::CpuBackend;
use did_benches::cpu_inference::{random_model, ModelCall};
use did_core::backend::prelude::*;
use did_core::backend::WeightFormat;

fn draft_calls(c: &mut Criterion) {
    let (model, host) = random_model("small", 1).expect("small");
    let be = CpuBackend::new();
    let mut group = c.benchmark_group("small draft call, batch 1, 512 cached");
    group.sample_size(20);
    for format in WeightFormat::ALL {
        let params = be
            .upload_weights(&host, &model.weight_matrices(), format)
            .expect("upload");
        let mut call = ModelCall::draft(&be, &model, &params, 1, 512, 1024).expect("draft");
        group.bench_function(format.name(), |b| b.iter(|| call.run().expect("call")));
    }
    group.finish();
}

criterion_group!(benches, draft_calls);
criterion_main!(benches);
