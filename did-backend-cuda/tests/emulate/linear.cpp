// The few-rows linear forward (kernels/linear.cu) under the CPU emulation of emu.h, against the
// product in f64 of the same stored inputs: every bound on m with m at and below it, widths
// with a short last block of columns, depths shorter than, equal to and past one pass of the
// block's threads, strided rows (the fused qkv input, a padded output), beta 0 over NaN (y must
// not be read) and beta 1. Columns of y outside [0, n) and rows past m must stay as they were,
// and a second launch must give the same bits.
//
// Built twice (f32 and bf16 storage) and run by tests/emulated_kernels.rs.
#include <cstdio>
#include <random>

#include "emu.h"
#include "../../kernels/common.cuh"
#include "../../kernels/linear.cu"

int main() {
    std::mt19937 rng(11);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    int failures = 0, cases = 0;
    struct Case { int bound, m; i64 n, k, lda, ldb, ldc; float beta; };
    const Case all[] = {
        {1, 1, 5, 64, 64, 64, 5, 0.0f},          // the head's one row, a short block of columns
        {2, 2, 9, 1024, 1024, 1024, 9, 1.0f},    // exactly one pass of 128 threads × VEC … in bf16
        {4, 3, 18, 776, 2312, 784, 20, 0.0f},    // m below its bound, strided rows
        {4, 4, 131, 768, 2304, 768, 131, 0.0f},  // the draft's block: a qkv-strided input, 768 deep
        {4, 4, 13, 3072, 3072, 3072, 16, 1.0f},  // the MLP's down projection's depth, accumulating
        {8, 5, 7, 136, 136, 136, 7, 0.0f},
        {8, 8, 33, 2048, 2056, 2048, 40, 0.0f},
    };
    const float nan = __int_as_float(0x7fc00000), sentinel = 3.25f;
    for (const Case& c : all) {
        ++cases;
        std::vector<store_t> x(c.m * c.lda), w(c.n * c.ldb);
        for (auto& v : x) v = to_store(normal(rng));
        for (auto& v : w) v = to_store(0.05f * normal(rng));
        // y: m rows of ldc, values where beta reads them, NaN where it must not, a sentinel
        // outside the n columns; one extra row past m that must stay the sentinel.
        std::vector<store_t> y0((c.m + 1) * c.ldc, to_store(sentinel));
        for (int r = 0; r < c.m; ++r)
            for (i64 j = 0; j < c.n; ++j) y0[r * c.ldc + j] = to_store(c.beta != 0.0f ? normal(rng) : nan);
        std::vector<store_t> y = y0, again = y0;
        const unsigned blocks = (unsigned)((c.n + FEW_COLS - 1) / FEW_COLS);
        auto run = [&](std::vector<store_t>& out) {
            emu::launch(EmuDim3{blocks, 1, 1}, FEW_THREADS, [&] {
                switch (c.bound) {
                    case 1: linear_few_rows_1(x.data(), c.lda, w.data(), c.ldb, out.data(), c.ldc, c.m, c.n, c.k, c.beta); break;
                    case 2: linear_few_rows_2(x.data(), c.lda, w.data(), c.ldb, out.data(), c.ldc, c.m, c.n, c.k, c.beta); break;
                    case 4: linear_few_rows_4(x.data(), c.lda, w.data(), c.ldb, out.data(), c.ldc, c.m, c.n, c.k, c.beta); break;
                    default: linear_few_rows_8(x.data(), c.lda, w.data(), c.ldb, out.data(), c.ldc, c.m, c.n, c.k, c.beta); break;
                }
            });
        };
        run(y);
        run(again);
        double worst = 0;
        bool kept = true;
        for (int r = 0; r <= c.m; ++r)
            for (i64 j = 0; j < c.ldc; ++j) {
                const float got = ld(y.data(), r * c.ldc + j);
                if (r == c.m || j >= c.n) {
                    kept &= std::memcmp(&y[r * c.ldc + j], &y0[r * c.ldc + j], sizeof(store_t)) == 0;
                    continue;
                }
                double want = c.beta != 0.0f ? c.beta * (double)ld(y0.data(), r * c.ldc + j) : 0.0, scale = std::abs(want);
                for (i64 q = 0; q < c.k; ++q) {
                    const double p = (double)ld(x.data(), r * c.lda + q) * ld(w.data(), j * c.ldb + q);
                    want += p;
                    scale += std::abs(p);
                }
                worst = std::max(worst, std::isfinite(got) ? std::abs(got - want) / (1e-3 + scale) : INFINITY);
            }
        const bool same = std::memcmp(y.data(), again.data(), y.size() * sizeof(store_t)) == 0;
#ifdef STORAGE_BF16
        const double tol = 4e-3;  // the output's bf16 rounding
#else
        const double tol = 1e-6;
#endif
        const bool ok = worst <= tol && kept && same;
        failures += !ok;
        std::printf("%s linear_few_rows_%d, m %d, %lld × %lld, beta %g: %.1e from f64 (tol %.0e), %s, %s\n", ok ? "ok  " : "FAIL",
                    c.bound, c.m, (long long)c.n, (long long)c.k, c.beta, worst, tol,
                    kept ? "outside untouched" : "OUTSIDE WRITTEN", same ? "same bits twice" : "NOT DETERMINISTIC");
    }
    std::printf("%d of %d cases\n", cases - failures, cases);
    return failures ? 1 : 0;
}
