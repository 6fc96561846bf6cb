use did_backend_cpu::ops::stored::*;
use std::time::Instant;
fn main() {
    let c = 768;
    let v = 50258;
    let mut shapes = vec![];
    for _ in 0..12 {
        shapes.push((3 * c, c));
        shapes.push((c, c));
        shapes.push((4 * c, c));
        shapes.push((c, 4 * c));
    }
    shapes.push((v, c));
    let mut seed = 1u64;
    let mut rnd = || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    };
    let ws: Vec<Vec<f32>> = shapes
        .iter()
        .map(|&(n, k)| (0..n * k).map(|_| rnd()).collect())
        .collect();
    for (n, k) in [(768usize, 768usize), (3072, 768), (768, 3072)] {
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 7) % 17) as f32 - 8.0).collect();
        let m = StoredMatrix::int8(&w, n, k);
        let x = vec![1f32; 4 * k];
        let mut y = vec![0f32; 4 * n];
        for th in [1usize, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(th)
                .build()
                .unwrap();
            pool.install(|| {
                let t = Instant::now();
                for _ in 0..200 {
                    stored_product(&m, &x, k, 4, &mut y, n, Isa::Avx512Vnni);
                }
                let dt = t.elapsed().as_secs_f64() / 200.0;
                println!(
                    "hot int8 {n}x{k} rows4 threads {th}: {:.1} us = {:.1} GMAC/s {:.1} GB/s",
                    dt * 1e6,
                    (n * k * 4) as f64 / dt / 1e9,
                    (n * k) as f64 / dt / 1e9
                );
            });
        }
    }
    if std::env::var("HOT").is_ok() {
        return;
    }
    for fmt in ["bf16", "int8"] {
        let stored: Vec<StoredMatrix> = shapes
            .iter()
            .zip(&ws)
            .map(|(&(n, k), w)| {
                if fmt == "bf16" {
                    StoredMatrix::bf16(w, n, k)
                } else {
                    StoredMatrix::int8(w, n, k)
                }
            })
            .collect();
        let bytes: usize = stored.iter().map(|m| m.bytes()).sum();
        for isa in Isa::ALL
            .into_iter()
            .filter(|i| i.available() && *i != Isa::Portable)
        {
            for rows in [4usize, 32] {
                let x: Vec<f32> = (0..rows * 4 * c).map(|i| (i % 13) as f32 * 0.1).collect();
                let mut y = vec![0f32; rows * v];
                let mut best = f64::MAX;
                for _ in 0..5 {
                    let t = Instant::now();
                    for (i, &(n, k)) in shapes.iter().enumerate() {
                        stored_product(&stored[i], &x, k, rows, &mut y, n, isa);
                    }
                    best = best.min(t.elapsed().as_secs_f64());
                }
                let mut per = std::collections::BTreeMap::new();
                for (i, &(n, k)) in shapes.iter().enumerate() {
                    let t = Instant::now();
                    stored_product(&stored[i], &x, k, rows, &mut y, n, isa);
                    *per.entry((n, k)).or_insert(0.0) += t.elapsed().as_secs_f64();
                }
                for ((n, k), t) in &per {
                    let cnt = shapes.iter().filter(|s| **s == (*n, *k)).count();
                    let b = cnt as f64 * (*n * *k) as f64 * if fmt == "bf16" { 2.0 } else { 1.0 };
                    println!("   {n}x{k}: {:.2} ms {:.1} GB/s", t * 1e3, b / t / 1e9);
                }
                println!(
                    "{fmt} {isa:?} rows {rows}: {:.2} ms, {:.1} MB, {:.1} GB/s",
                    best * 1e3,
                    bytes as f64 / 1e6,
                    bytes as f64 / best / 1e9
                );
            }
        }
    }
}
