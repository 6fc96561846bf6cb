//! Weight matrices stored below f32 — bf16, or int8 with a scale per output row — and the
//! linear forward and embedding lookup that read them as stored. A draft call over a KV cache
//! is memory-bound: it streams every weight once to reveal a few tokens, so the bytes a weight
//! takes set its speed. `docs/cpu-inference.md` gives the formats' costs in bytes and in
//! quality, and the measurements.
//!
//! One driver ([`columns`]) computes a work item's output columns in blocks of four input rows
//! by four weight rows; a [`Block`] is the arithmetic of a format ([`float`]: f32 inputs times
//! widened bf16 weights; [`int8`]: integer dots of quantized inputs). Each is compiled for
//! AVX-512 (with VNNI for int8 where the CPU has it), for AVX2 + FMA, and portably, and picked
//! at run time ([`Isa`]). Every version of a format does the same arithmetic — the same fused
//! multiply-adds in the same order, or exact integer sums — so results depend neither on the
//! CPU nor on the thread count, nor on how many rows share the call (a sequence gets the same
//! logits alone and in a batch, to the bit).

pub mod float;
pub mod int8;

use core::marker::PhantomData;

use half::bf16;
use rayon::prelude::*;

use did_core::backend::{Gemm, Slice, SliceMut, WeightMatrix};

use crate::{view, view_mut, CpuBuffer, CpuError, CpuFloat};

use float::FloatBlock;
use int8::{Int8Block, QuantizedRows};

/// How a stored matrix keeps its values.
#[derive(Debug, Clone, PartialEq)]
pub enum StoredValues {
    /// bf16 bit patterns, row-major.
    Bf16(Vec<u16>),
    /// Symmetric int8 with one f32 scale a row: `w[r][c] = scale[r] · q[r][c]`.
    Int8 {
        /// `[rows, cols]` in `-127..=127`, then [`int8::STEP`] zeros (a kernel step may read
        /// past a row's end).
        q: Vec<i8>,
        /// `[rows]`: the row's largest magnitude over 127.
        scale: Vec<f32>,
        /// `[rows]`: the row's sum of `q`.
        sum: Vec<i32>,
    },
}

/// A `[rows, cols]` matrix (a linear layer's `[out, in]` weight, or an embedding table) in a
/// format below f32.
///
/// ```
/// use did_backend_cpu::ops::stored::StoredMatrix;
/// let w = [1.0f32, -0.5, 0.25, 254.0, 0.0, -128.0];
/// let m = StoredMatrix::int8(&w, 2, 3);
/// let mut row = [0.0; 3];
/// m.dequantize_row(1, &mut row);
/// assert_eq!(row, [254.0, 0.0, -128.0]); // multiples of the row's scale (254 / 127) round-trip
/// assert_eq!(m.bytes(), 6 + 2 * 4);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct StoredMatrix {
    /// Rows (a linear layer's outputs).
    pub rows: usize,
    /// Columns (its inputs).
    pub cols: usize,
    /// The values.
    pub values: StoredValues,
}

impl StoredMatrix {
    /// `w` (`[rows, cols]`, row-major) rounded to bf16, to nearest even.
    pub fn bf16(w: &[f32], rows: usize, cols: usize) -> Self {
        let values = w[..rows * cols]
            .iter()
            .map(|&x| bf16::from_f32(x).to_bits())
            .collect();
        StoredMatrix {
            rows,
            cols,
            values: StoredValues::Bf16(values),
        }
    }

    /// `w` (`[rows, cols]`, row-major) as symmetric int8 a row: `scale = max|w_row| / 127`,
    /// `q = round(w / scale)`; an all-zero row gets scale 0.
    pub fn int8(w: &[f32], rows: usize, cols: usize) -> Self {
        let mut q = Vec::with_capacity(rows * cols + int8::STEP);
        let (mut scale, mut sum) = (Vec::with_capacity(rows), Vec::with_capacity(rows));
        for r in 0..rows {
            let row = &w[r * cols..(r + 1) * cols];
            let (s, inv) = int8::symmetric_scale(row);
            let start = q.len();
            q.extend(row.iter().map(|&v| int8::quantize(v, inv)));
            scale.push(s);
            sum.push(q[start..].iter().map(|&v| i32::from(v)).sum());
        }
        q.resize(rows * cols + int8::STEP, 0);
        StoredMatrix {
            rows,
            cols,
            values: StoredValues::Int8 { q, scale, sum },
        }
    }

    /// Bytes the matrix occupies (what a pass over it reads).
    pub fn bytes(&self) -> usize {
        match &self.values {
            StoredValues::Bf16(v) => 2 * v.len(),
            StoredValues::Int8 { scale, .. } => self.rows * self.cols + 4 * scale.len(),
        }
    }

    /// Row `r` widened to f32 into `out[..cols]`.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let cols = self.cols;
        match &self.values {
            StoredValues::Bf16(v) => {
                for (o, &b) in out.iter_mut().zip(&v[r * cols..(r + 1) * cols]) {
                    *o = bf16::from_bits(b).to_f32();
                }
            }
            StoredValues::Int8 { q, scale, .. } => {
                for (o, &x) in out.iter_mut().zip(&q[r * cols..(r + 1) * cols]) {
                    *o = scale[r] * f32::from(x);
                }
            }
        }
    }
}

/// The instruction set the kernels run with, picked once at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// 512-bit vectors with VNNI's 8-bit dot products.
    Avx512Vnni,
    /// 512-bit vectors.
    Avx512,
    /// 256-bit vectors with FMA.
    Avx2,
    /// Whatever the build targets (`mul_add` may be a library call: slow, same results).
    Portable,
}

impl Isa {
    /// Every instruction set, best first.
    pub const ALL: [Isa; 4] = [Isa::Avx512Vnni, Isa::Avx512, Isa::Avx2, Isa::Portable];

    /// The best this CPU runs.
    pub fn detect() -> Isa {
        Isa::ALL
            .into_iter()
            .find(|isa| isa.available())
            .unwrap_or(Isa::Portable)
    }

    /// Whether this CPU runs `self`.
    pub fn available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            let avx512 = has!("avx512f") && has!("avx512bw") && has!("avx512dq") && has!("fma");
            match self {
                Isa::Avx512Vnni => avx512 && has!("avx512vnni"),
                Isa::Avx512 => avx512,
                Isa::Avx2 => has!("avx2") && has!("fma"),
                Isa::Portable => true,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Isa::Portable
        }
    }

    /// Its name in the bench's tables.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512Vnni => "avx512-vnni",
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
            Isa::Portable => "portable",
        }
    }
}

/// The outputs `[R, C]` for input rows `i..i + R` and weight rows `j..j + C`: a format's
/// arithmetic on one instruction set.
pub(crate) trait Block: Sync {
    /// # Safety
    /// The instruction set of the implementation is available; the rows exist.
    unsafe fn block<const R: usize, const C: usize>(&self, i: usize, j: usize) -> [[f32; C]; R];
}

/// Rows of input and of weight a block takes: sixteen accumulators stay in registers.
const ROWS_AT_ONCE: usize = 4;
const COLS_AT_ONCE: usize = 4;
/// Input rows whose blocks run before the next weight rows are taken (they stay in L2).
const ROW_PANEL: usize = 16;
/// Output columns a work item computes: 64 keep a 3,072-wide bf16 row panel (384 KiB) in L2 and
/// give the two cores of a small VM dozens of items to share.
const COLS_PER_ITEM: usize = 64;

/// `out[i][j - cols.start]` for every input row `i` and the weight rows `cols`.
///
/// # Safety
/// `K`'s instruction set is available; `rows` input rows and the weight rows `cols` exist.
#[inline(always)]
unsafe fn columns<K: Block>(
    kernel: &K,
    rows: usize,
    cols: core::ops::Range<usize>,
    out: &mut [f32],
) {
    let width = cols.len();
    for panel in (0..rows).step_by(ROW_PANEL) {
        let panel_end = (panel + ROW_PANEL).min(rows);
        let mut j = cols.start;
        while j < cols.end {
            let take = if cols.end - j >= COLS_AT_ONCE {
                COLS_AT_ONCE
            } else {
                1
            };
            let mut i = panel;
            while i < panel_end {
                let r = (panel_end - i).min(ROWS_AT_ONCE);
                let mut put = |d: &[&[f32]]| {
                    for (dr, row) in d.iter().enumerate() {
                        out[(i + dr) * width + j - cols.start..][..row.len()].copy_from_slice(row);
                    }
                };
                macro_rules! run {
                    ($r:literal) => {
                        if take == COLS_AT_ONCE {
                            let d = kernel.block::<$r, COLS_AT_ONCE>(i, j);
                            put(&d.each_ref().map(|v| &v[..]));
                        } else {
                            let d = kernel.block::<$r, 1>(i, j);
                            put(&d.each_ref().map(|v| &v[..]));
                        }
                    };
                }
                match r {
                    1 => run!(1),
                    2 => run!(2),
                    3 => run!(3),
                    _ => run!(4),
                }
                i += r;
            }
            j += take;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vnni,fma")]
unsafe fn columns_avx512_vnni<K: Block>(
    k: &K,
    rows: usize,
    cols: core::ops::Range<usize>,
    out: &mut [f32],
) {
    columns(k, rows, cols, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,fma")]
unsafe fn columns_avx512<K: Block>(
    k: &K,
    rows: usize,
    cols: core::ops::Range<usize>,
    out: &mut [f32],
) {
    columns(k, rows, cols, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn columns_avx2<K: Block>(
    k: &K,
    rows: usize,
    cols: core::ops::Range<usize>,
    out: &mut [f32],
) {
    columns(k, rows, cols, out)
}

/// `y[rows, n]` (rows `ldy` apart, overwritten) from the blocks of `kernel`, `n` output
/// columns in parallel work items; `run` calls [`columns`] in the kernel's compiled version.
fn product<K: Block>(
    kernel: &K,
    rows: usize,
    n: usize,
    y: &mut [f32],
    ldy: usize,
    run: impl Fn(&K, core::ops::Range<usize>, &mut [f32]) + Sync,
) {
    let results: Vec<Vec<f32>> = (0..n.div_ceil(COLS_PER_ITEM))
        .into_par_iter()
        .map(|item| {
            let cols = item * COLS_PER_ITEM..((item + 1) * COLS_PER_ITEM).min(n);
            let mut out = vec![0.0f32; rows * cols.len()];
            run(kernel, cols, &mut out);
            out
        })
        .collect();
    for (item, vals) in results.into_iter().enumerate() {
        let start = item * COLS_PER_ITEM;
        let width = vals.len() / rows.max(1);
        for i in 0..rows {
            y[i * ldy + start..][..width].copy_from_slice(&vals[i * width..][..width]);
        }
    }
}

/// `y[rows, n] = x[rows, k] · Wᵀ` with `W` a stored `[n, k]` matrix, `x` rows `ldx` apart and
/// `y` rows `ldy` apart (overwritten), on `isa` (the portable version where this CPU lacks it).
///
/// # Panics
/// If `x` or `y` is shorter than the shapes say (the backend checks them first).
///
/// ```
/// use did_backend_cpu::ops::stored::{stored_product, Isa, StoredMatrix};
/// let w: Vec<f32> = (0..3 * 20).map(|i| (i % 7) as f32 - 3.0).collect(); // [3, 20]
/// let x: Vec<f32> = (0..2 * 20).map(|i| 0.5 * (i % 5) as f32).collect(); // [2, 20]
/// let mut y = vec![0.0; 2 * 3];
/// stored_product(&StoredMatrix::bf16(&w, 3, 20), &x, 20, 2, &mut y, 3, Isa::detect());
/// let exact: f32 = (0..20).map(|c| x[c] * w[c]).sum(); // small integers: bf16 is exact
/// assert_eq!(y[0], exact);
/// ```
pub fn stored_product(
    w: &StoredMatrix,
    x: &[f32],
    ldx: usize,
    rows: usize,
    y: &mut [f32],
    ldy: usize,
    isa: Isa,
) {
    let (n, k) = (w.rows, w.cols);
    assert!(
        rows == 0 || x.len() >= (rows - 1) * ldx + k,
        "stored product: x too short"
    );
    assert!(
        rows == 0 || y.len() >= (rows - 1) * ldy + n,
        "stored product: y too short"
    );
    let isa = if isa.available() { isa } else { Isa::Portable };
    // SAFETY (every `unsafe` below): the version run is one whose instruction set `isa`, now
    // checked available, names; the shapes were checked above and by `StoredMatrix`'s builders.
    match &w.values {
        StoredValues::Bf16(v) => {
            macro_rules! float {
                ($dots:ty, $run:ident) => {{
                    let kernel = FloatBlock::<u16, $dots> {
                        x,
                        ldx,
                        w: v,
                        k,
                        dots: PhantomData,
                    };
                    product(&kernel, rows, n, y, ldy, |k, c, o| unsafe {
                        $run(k, rows, c, o)
                    })
                }};
            }
            match isa {
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512Vnni | Isa::Avx512 => float!(float::Avx512Dots, columns_avx512),
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => float!(float::Avx2Dots, columns_avx2),
                _ => float!(float::PortableDots, columns),
            }
        }
        StoredValues::Int8 { q, scale, sum } => {
            let xq = QuantizedRows::new(x, ldx, rows, k, isa == Isa::Avx512Vnni);
            macro_rules! int8 {
                ($dots:ty, $run:ident) => {{
                    let kernel = Int8Block::<$dots> {
                        x: &xq,
                        w: q,
                        k,
                        w_scale: scale,
                        w_sum: sum,
                        dots: PhantomData,
                    };
                    product(&kernel, rows, n, y, ldy, |k, c, o| unsafe {
                        $run(k, rows, c, o)
                    })
                }};
            }
            match isa {
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512Vnni => int8!(int8::VnniInt, columns_avx512_vnni),
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 => int8!(int8::Avx512Int, columns_avx512),
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => int8!(int8::Avx2Int, columns_avx2),
                _ => int8!(int8::PortableInt, columns),
            }
        }
    }
}

/// The backend's matmul where `B` is a stored matrix: only a linear forward reads one
/// (`C = alpha · A · Wᵀ + beta · C`, `W` the whole matrix).
pub(crate) fn linear_forward<T: CpuFloat>(
    g: &Gemm,
    m: &WeightMatrix,
    w: &StoredMatrix,
    a: Slice<'_, CpuBuffer<T>>,
    c: SliceMut<'_, CpuBuffer<T>>,
) -> Result<(), CpuError> {
    let linear = !g.trans_a
        && g.trans_b
        && g.batch == 1
        && g.n == m.rows
        && g.k == m.cols
        && g.ldb == m.cols;
    if !linear {
        return Err(CpuError::Stored {
            what: "matmul B (other than a linear forward's whole weight)",
            format: match w.values {
                StoredValues::Bf16(_) => did_core::backend::WeightFormat::Bf16,
                StoredValues::Int8 { .. } => did_core::backend::WeightFormat::Int8,
            },
            offset: m.offset,
            rows: m.rows,
            cols: m.cols,
        });
    }
    let (na, _, nc) = g.extents();
    let (a, c) = (view(a, na, "matmul A")?, view_mut(c, nc, "matmul C")?);
    let (rows, k, n) = (g.m, g.k, g.n);
    if g.alpha == 1.0 && g.beta == 0.0 {
        if let (Some(x), Some(y)) = (T::as_f32(a), T::as_f32_mut(c)) {
            stored_product(w, x, g.lda, rows, y, g.ldc, Isa::detect());
            return Ok(());
        }
    }
    let x: Vec<f32> = (0..rows)
        .flat_map(|i| a[i * g.lda..i * g.lda + k].iter().map(|v| v.to_f32_lossy()))
        .collect();
    let mut y = vec![0.0f32; rows * n];
    stored_product(w, &x, k, rows, &mut y, n, Isa::detect());
    let (alpha, beta) = (T::of_f32(g.alpha), T::of_f32(g.beta));
    for i in 0..rows {
        for (o, &v) in c[i * g.ldc..i * g.ldc + n]
            .iter_mut()
            .zip(&y[i * n..(i + 1) * n])
        {
            *o = if g.beta == 0.0 {
                alpha * T::of_f32(v)
            } else {
                alpha * T::of_f32(v) + beta * *o
            };
        }
    }
    Ok(())
}

/// `out[i] = table[ids[i]]` from a stored `[vocab, channels]` table, widened.
pub(crate) fn embedding_forward<T: CpuFloat>(
    ids: &[u32],
    m: &WeightMatrix,
    table: &StoredMatrix,
    out: SliceMut<'_, CpuBuffer<T>>,
    rows: usize,
    channels: usize,
) -> Result<(), CpuError> {
    if channels != m.cols {
        return Err(CpuError::Shape(format!(
            "embedding: {channels} channels, but the stored table at {} is {}×{}",
            m.offset, m.rows, m.cols
        )));
    }
    let out = view_mut(out, rows * channels, "embedding out")?;
    let mut row = vec![0.0f32; channels];
    for (o, &id) in out.chunks_exact_mut(channels.max(1)).zip(ids) {
        table.dequantize_row(id as usize, &mut row);
        for (o, &v) in o.iter_mut().zip(&row) {
            *o = T::of_f32(v);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use quickcheck::{QuickCheck, TestResult};

    fn values(seed: u64, n: usize, scale: f32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                scale * ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
            })
            .collect()
    }

    fn both_formats(w: &[f32], n: usize, k: usize) -> [StoredMatrix; 2] {
        [StoredMatrix::bf16(w, n, k), StoredMatrix::int8(w, n, k)]
    }

    fn run(m: &StoredMatrix, x: &[f32], rows: usize, isa: Isa) -> Vec<f32> {
        let mut y = vec![f32::NAN; rows * m.rows];
        stored_product(m, x, m.cols, rows, &mut y, m.rows, isa);
        y
    }

    /// Every instruction set this CPU has gives the portable version's results, bit for bit,
    /// for shapes with ragged tails (k not a multiple of 16 or 64, columns not of 4 or 64).
    #[test]
    fn every_instruction_set_computes_the_portable_results() {
        fn prop(seed: u64, rows: u8, n: u8, k: u16) -> TestResult {
            let (rows, n, k) = (
                1 + rows as usize % 21,
                1 + n as usize % 140,
                1 + k as usize % 300,
            );
            let (w, x) = (
                values(seed, n * k, 2.0),
                values(seed.wrapping_add(1), rows * k, 3.0),
            );
            for m in both_formats(&w, n, k) {
                let want = run(&m, &x, rows, Isa::Portable);
                for isa in Isa::ALL.into_iter().filter(|i| i.available()) {
                    let got = run(&m, &x, rows, isa);
                    if got
                        .iter()
                        .zip(&want)
                        .any(|(a, b)| a.to_bits() != b.to_bits())
                    {
                        return TestResult::error(format!(
                            "{isa:?} differs on {rows}×{k}·[{n}×{k}]ᵀ"
                        ));
                    }
                }
            }
            TestResult::passed()
        }
        QuickCheck::new()
            .tests(40)
            .quickcheck(prop as fn(u64, u8, u8, u16) -> TestResult);
    }

    /// A row's outputs do not depend on the other rows of the call (a sequence gets the same
    /// logits alone as in a batch) nor on the thread count.
    #[test]
    fn a_row_gets_the_same_outputs_alone_in_a_batch_and_on_one_thread() {
        let (n, k, rows) = (200, 777, 11);
        let (w, x) = (values(3, n * k, 1.0), values(4, rows * k, 5.0));
        let one_thread = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        for m in both_formats(&w, n, k) {
            let batch = run(&m, &x, rows, Isa::detect());
            let single = one_thread.install(|| run(&m, &x, rows, Isa::detect()));
            assert_eq!(batch, single);
            for r in 0..rows {
                let alone = run(&m, &x[r * k..(r + 1) * k], 1, Isa::detect());
                assert_eq!(alone, batch[r * n..(r + 1) * n], "row {r}");
            }
        }
    }

    /// bf16: the f32 product of the rounded weights, to f32 rounding (`k` terms); int8: the
    /// exact product of the quantized inputs and weights, to three roundings; and both near the
    /// f32 weights' product, within what their rounding allows.
    #[test]
    fn stored_products_are_the_products_of_the_stored_values() {
        let (n, k, rows) = (64, 500, 5);
        let (w, x) = (values(5, n * k, 1.0), values(6, rows * k, 2.0));
        let exact = |w: &dyn Fn(usize, usize) -> f64, x: &dyn Fn(usize, usize) -> f64| {
            let mut y = vec![0.0f64; rows * n];
            for i in 0..rows {
                for j in 0..n {
                    y[i * n + j] = (0..k).map(|c| x(i, c) * w(j, c)).sum();
                }
            }
            y
        };
        let f32_product = exact(&|j, c| f64::from(w[j * k + c]), &|i, c| {
            f64::from(x[i * k + c])
        });
        let scale: f64 = f32_product.iter().map(|v| v.abs()).fold(0.0, f64::max);

        let bf16 = StoredMatrix::bf16(&w, n, k);
        let widened = |j: usize, c: usize| {
            let mut row = vec![0.0; k];
            bf16.dequantize_row(j, &mut row);
            f64::from(row[c])
        };
        let want = exact(&widened, &|i, c| f64::from(x[i * k + c]));
        let got = run(&bf16, &x, rows, Isa::detect());
        for ((g, w), f) in got.iter().zip(&want).zip(&f32_product) {
            assert!((f64::from(*g) - w).abs() <= 1e-6 * scale, "bf16 {g} vs {w}");
            // Weights within 2⁻⁹ relative: the product within ~2⁻⁹·Σ|x·w| (a loose bound).
            assert!(
                (f64::from(*g) - f).abs() <= 0.02 * scale,
                "bf16 {g} vs f32 {f}"
            );
        }

        let int8 = StoredMatrix::int8(&w, n, k);
        let xq = QuantizedRows::new(&x, k, rows, k, false);
        let StoredValues::Int8 { q, scale: ws, .. } = &int8.values else {
            unreachable!()
        };
        let want = exact(
            &|j, c| f64::from(ws[j]) * f64::from(q[j * k + c]),
            &|i, c| f64::from(xq.scale[i]) * f64::from(xq.q[i * xq.width + c]),
        );
        let got = run(&int8, &x, rows, Isa::detect());
        for ((g, w), f) in got.iter().zip(&want).zip(&f32_product) {
            assert!(
                (f64::from(*g) - w).abs() <= 4.0 * f64::from(f32::EPSILON) * w.abs().max(1e-30),
                "int8 {g} vs {w}"
            );
            assert!(
                (f64::from(*g) - f).abs() <= 0.03 * scale,
                "int8 {g} vs f32 {f}"
            );
        }
    }

    #[test]
    fn int8_rows_round_trip_their_scale_multiples_and_zero_rows_stay_zero() {
        let w = [0.0f32, 0.0, 0.0, 1.0, -0.5, 0.25];
        let m = StoredMatrix::int8(&w, 2, 3);
        let mut row = [1.0f32; 3];
        m.dequantize_row(0, &mut row);
        assert_eq!(row, [0.0; 3]);
        m.dequantize_row(1, &mut row);
        assert_eq!(row[0], 1.0);
        assert!((row[1] + 0.5).abs() < 1.0 / 127.0 && (row[2] - 0.25).abs() < 1.0 / 127.0);
        let y = run(&m, &[2.0, 0.0, 0.0], 1, Isa::detect());
        assert_eq!(y, [0.0, 2.0]);
    }
}
