// The few-rows linear forward (kernels/linear.cu) under the CPU emulation of emu.h, against the
// product in f64 of the same stored inputs: every bound on m with m at and below it, widths
// with a short last block of columns, depths shorter than, equal to and past one pass of the
// block's threads, strided rows (the fused qkv input, a padded output), beta 0 over NaN (y must
// not be read) and beta 1. Columns of y outside [0, n) and rows past m must stay as they were,
// and a second launch must give the same bits.
//
// Then the fused epilogues against the two kernels each replaces (fused_cases).
//
// Built twice (f32 and bf16 storage) and run by tests/emulated_kernels.rs.
#include <cstdio>
#include <random>

#include "emu.h"
#include "../../kernels/common.cuh"
#include "../../kernels/elementwise.cu"
#include "../../kernels/linear.cu"

#define NO_DROPOUT 0.0f, 0.0f, 0u, 0u, 0u, 0u

// The fused epilogues (THEN_BIAS_GELU, THEN_GATED_RESIDUAL) against the plain kernel followed
// by the elementwise kernel each replaces (bias_gelu_forward, gated_residual_forward_into with
// and without a bias and a gate): y and out must be theirs bit for bit. Returns failures.
static int fused_cases(std::mt19937& rng, int& cases) {
    std::normal_distribution<float> normal(0.0f, 1.0f);
    int failures = 0;
    struct Fused { int bound, m; i64 n, k; int tokens; bool bias, gate; };
    const Fused all[] = {
        {1, 1, 9, 64, 1, true, true},       // the head's bound, a short last block of columns
        {4, 4, 36, 768, 4, true, true},     // a draft block (one sequence) through a 768-wide layer
        {4, 3, 20, 136, 3, false, false},   // below the bound; no bias (the DiT's out-projection), no gate
        {8, 8, 24, 3072, 4, true, true},    // two sequences, each its own gate, the MLP's depth
        {8, 6, 13, 256, 2, false, true},    // three sequences, no bias
    };
    auto launch_plain = [](int bound, unsigned blocks, const store_t* x, i64 k, const store_t* w, store_t* y, int m, i64 n) {
        emu::launch(EmuDim3{blocks, 1, 1}, FEW_THREADS, [&] {
            switch (bound) {
                case 1: linear_few_rows_1(x, k, w, k, y, n, m, n, k, 0.0f); break;
                case 2: linear_few_rows_2(x, k, w, k, y, n, m, n, k, 0.0f); break;
                case 4: linear_few_rows_4(x, k, w, k, y, n, m, n, k, 0.0f); break;
                default: linear_few_rows_8(x, k, w, k, y, n, m, n, k, 0.0f); break;
            }
        });
    };
    for (const Fused& c : all) {
        const unsigned blocks = (unsigned)((c.n + FEW_COLS - 1) / FEW_COLS);
        const i64 n = c.m * c.n;
        std::vector<store_t> x(c.m * c.k), w(c.n * c.k), bias(c.n), gate((c.m / c.tokens) * c.n), residual(n);
        for (auto& v : x) v = to_store(normal(rng));
        for (auto& v : w) v = to_store(0.05f * normal(rng));
        for (auto& v : bias) v = to_store(normal(rng));
        for (auto& v : gate) v = to_store(normal(rng));
        for (auto& v : residual) v = to_store(normal(rng));
        const store_t* bp = c.bias ? bias.data() : nullptr;
        const store_t* gp = c.gate ? gate.data() : nullptr;
        const float nan = __int_as_float(0x7fc00000);
        auto same = [](const std::vector<store_t>& a, const std::vector<store_t>& b) {
            return std::memcmp(a.data(), b.data(), a.size() * sizeof(store_t)) == 0;
        };

        // bias + GELU: y keeps the pre-activation, out its GELU.
        ++cases;
        std::vector<store_t> y_c(n, to_store(nan)), g_c(n, to_store(nan)), y_f(n, to_store(nan)), g_f(n, to_store(nan));
        launch_plain(c.bound, blocks, x.data(), c.k, w.data(), y_c.data(), c.m, c.n);
        emu::launch(EmuDim3{2, 1, 1}, 64, [&] { bias_gelu_forward(y_c.data(), bias.data(), g_c.data(), c.m, c.n); });
        emu::launch(EmuDim3{blocks, 1, 1}, FEW_THREADS, [&] {
            switch (c.bound) {
                case 1: linear_few_rows_1_bias_gelu(x.data(), c.k, w.data(), c.k, y_f.data(), c.m, c.n, c.k, bias.data(), g_f.data()); break;
                case 2: linear_few_rows_2_bias_gelu(x.data(), c.k, w.data(), c.k, y_f.data(), c.m, c.n, c.k, bias.data(), g_f.data()); break;
                case 4: linear_few_rows_4_bias_gelu(x.data(), c.k, w.data(), c.k, y_f.data(), c.m, c.n, c.k, bias.data(), g_f.data()); break;
                default: linear_few_rows_8_bias_gelu(x.data(), c.k, w.data(), c.k, y_f.data(), c.m, c.n, c.k, bias.data(), g_f.data()); break;
            }
        });
        bool ok = same(y_c, y_f) && same(g_c, g_f);
        failures += !ok;
        std::printf("%s linear_few_rows_%d_bias_gelu, m %d, %lld × %lld: %s\n", ok ? "ok  " : "FAIL", c.bound, c.m,
                    (long long)c.n, (long long)c.k, ok ? "y and out bit for bit the two kernels'" : "DIFFERS from the two kernels");

        // Gated residual: y keeps the (biased) branch output, out = residual + gate·y.
        ++cases;
        std::vector<store_t> r_c(n, to_store(nan)), o_c(n, to_store(nan)), r_f(n, to_store(nan)), o_f(n, to_store(nan));
        launch_plain(c.bound, blocks, x.data(), c.k, w.data(), r_c.data(), c.m, c.n);
        emu::launch(EmuDim3{2, 1, 1}, 64, [&] {
            gated_residual_forward_into(residual.data(), r_c.data(), bp, gp, o_c.data(), c.tokens, c.n, n, NO_DROPOUT);
        });
        emu::launch(EmuDim3{blocks, 1, 1}, FEW_THREADS, [&] {
            switch (c.bound) {
                case 1: linear_few_rows_1_gated_residual(x.data(), c.k, w.data(), c.k, r_f.data(), c.m, c.n, c.k, bp, gp, residual.data(), o_f.data(), c.tokens); break;
                case 2: linear_few_rows_2_gated_residual(x.data(), c.k, w.data(), c.k, r_f.data(), c.m, c.n, c.k, bp, gp, residual.data(), o_f.data(), c.tokens); break;
                case 4: linear_few_rows_4_gated_residual(x.data(), c.k, w.data(), c.k, r_f.data(), c.m, c.n, c.k, bp, gp, residual.data(), o_f.data(), c.tokens); break;
                default: linear_few_rows_8_gated_residual(x.data(), c.k, w.data(), c.k, r_f.data(), c.m, c.n, c.k, bp, gp, residual.data(), o_f.data(), c.tokens); break;
            }
        });
        ok = same(r_c, r_f) && same(o_c, o_f);
        failures += !ok;
        std::printf("%s linear_few_rows_%d_gated_residual, m %d, %lld × %lld, %d rows a gate, %s, %s: %s\n",
                    ok ? "ok  " : "FAIL", c.bound, c.m, (long long)c.n, (long long)c.k, c.tokens, c.bias ? "bias" : "no bias",
                    c.gate ? "gate" : "no gate", ok ? "y and out bit for bit the two kernels'" : "DIFFERS from the two kernels");
    }
    return failures;
}

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
    failures += fused_cases(rng, cases);
    std::printf("%d of %d cases\n", cases - failures, cases);
    return failures ? 1 : 0;
}
