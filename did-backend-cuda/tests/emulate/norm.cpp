// LayerNorm forward and backward and the softmax cross-entropy (kernels/norm.cu) under the CPU
// emulation of emu.h, against their formulas in f64; LayerNorm along both of its ways through a
// row: in one warp's registers (blocks of 32 threads, up to 1,024 columns) and the strided loops
// (wider rows, or more threads). Built in both storage precisions by tests/emulated_kernels.rs.
#include <cstdio>
#include <random>

#include "emu.h"
#include "../../kernels/common.cuh"
#include "../../kernels/norm.cu"

int main() {
    std::mt19937 rng(9);
    std::normal_distribution<float> normal(0.0f, 1.0f);
#ifdef STORAGE_BF16
    const double tol = 2e-2;
#else
    const double tol = 2e-5;
#endif
    struct Case { const char* name; unsigned threads; i64 cols; };
    const Case cases[] = {
        {"one warp, 768 columns in registers", 32, 768},
        {"one warp, 40 columns in registers", 32, 40},
        {"one warp, 1,024 columns in registers", 32, 1024},
        {"one warp, 1,100 columns strided", 32, 1100},
        {"four warps, 768 columns strided", 128, 768},
    };
    int failures = 0;
    for (const Case& k : cases) {
        const i64 rows = 5, cols = k.cols, n = rows * cols;
        std::vector<store_t> x(n), w(cols), b(cols), dout(n), out(n), mean(rows), rstd(rows), dx(n, to_store(0.5f));
        std::vector<float> stats(2 * rows);
        for (i64 i = 0; i < n; ++i) x[i] = to_store(3.0f + 2.0f * normal(rng));  // an offset mean, as residual streams have
        for (auto& v : w) v = to_store(1.0f + 0.3f * normal(rng));
        for (auto& v : b) v = to_store(0.3f * normal(rng));
        for (auto& v : dout) v = to_store(normal(rng));
        emu::launch(EmuDim3{(unsigned)rows, 1, 1}, k.threads, [&] {
            layernorm_forward(x.data(), w.data(), b.data(), out.data(), mean.data(), rstd.data(), rows, cols, 1e-5f,
                              nullptr, nullptr, nullptr, 1);
        });
        emu::launch(EmuDim3{(unsigned)rows, 1, 1}, k.threads, [&] {
            layernorm_backward_dx(dout.data(), x.data(), w.data(), dx.data(), stats.data(), rows, cols, 1e-5f);
        });
        double worst_out = 0, worst_dx = 0, worst_stat = 0;
        for (i64 r = 0; r < rows; ++r) {
            double mu = 0, var = 0;
            for (i64 c = 0; c < cols; ++c) mu += ld(x.data(), r * cols + c);
            mu /= cols;
            for (i64 c = 0; c < cols; ++c) { double d = ld(x.data(), r * cols + c) - mu; var += d * d; }
            const double rs = 1.0 / std::sqrt(var / cols + 1e-5);
            worst_stat = std::max({worst_stat, std::abs(stats[2 * r] - mu) / (1 + std::abs(mu)),
                                   std::abs(stats[2 * r + 1] - rs) / rs, std::abs(ld(mean.data(), r) - mu) / (1 + std::abs(mu)),
                                   std::abs(ld(rstd.data(), r) - rs) / rs});
            double mean_d = 0, mean_dx = 0;
            for (i64 c = 0; c < cols; ++c) {
                const double xhat = (ld(x.data(), r * cols + c) - mu) * rs, dn = ld(dout.data(), r * cols + c) * ld(w.data(), c);
                mean_d += dn / cols;
                mean_dx += dn * xhat / cols;
                const double want = xhat * ld(w.data(), c) + ld(b.data(), c);
                worst_out = std::max(worst_out, std::abs(ld(out.data(), r * cols + c) - want) / (0.1 + std::abs(want)));
            }
            for (i64 c = 0; c < cols; ++c) {
                const double xhat = (ld(x.data(), r * cols + c) - mu) * rs, dn = ld(dout.data(), r * cols + c) * ld(w.data(), c);
                const double want = 0.5 + rs * (dn - mean_d - xhat * mean_dx);
                worst_dx = std::max(worst_dx, std::abs(ld(dx.data(), r * cols + c) - want) / (0.1 + std::abs(want)));
            }
        }
        const bool ok = worst_out <= tol && worst_dx <= tol && worst_stat <= tol;
        failures += !ok;
        std::printf("%s layernorm, %s: out %.1e, dx %.1e, statistics %.1e (tol %.0e)\n", ok ? "ok  " : "FAIL", k.name,
                    worst_out, worst_dx, worst_stat, tol);
    }

    // The weighted softmax cross-entropy (same file) against its formulas in f64: a 50,258-wide
    // row (the passes wrap many times), an excluded class, and a row of weight 0.
    {
        const i64 rows = 3, vocab = 50258, excluded = 50257;
        std::vector<store_t> logits(rows * vocab), weights = {to_store(0.5f), to_store(0.0f), to_store(2.0f)}, losses(rows);
        std::vector<unsigned> targets = {17, 3, 50000};
        for (auto& v : logits) v = to_store(2.0f * normal(rng));
        const std::vector<store_t> input = logits;
        emu::launch(EmuDim3{(unsigned)rows, 1, 1}, 256, [&] {
            softmax_cross_entropy(logits.data(), targets.data(), weights.data(), losses.data(), rows, vocab, vocab, excluded, 0.25f);
        });
        double worst = 0;
        for (i64 r = 0; r < rows; ++r) {
            const double w = ld(weights.data(), r);
            double m = -INFINITY, z = 0;
            for (i64 c = 0; c < vocab; ++c) if (c != excluded) m = std::max(m, (double)ld(input.data(), r * vocab + c));
            for (i64 c = 0; c < vocab; ++c) if (c != excluded) z += std::exp(ld(input.data(), r * vocab + c) - m);
            const double loss = w == 0 ? 0 : w * (m + std::log(z) - ld(input.data(), r * vocab + targets[r]));
            worst = std::max(worst, std::abs(ld(losses.data(), r) - loss) / (1 + std::abs(loss)));
            for (i64 c = 0; c < vocab; ++c) {
                const double p = c == excluded ? 0 : std::exp(ld(input.data(), r * vocab + c) - m) / z;
                const double grad = w == 0 ? 0 : 0.25 * w * (p - (c == (i64)targets[r] ? 1 : 0));
                worst = std::max(worst, std::abs(ld(logits.data(), r * vocab + c) - grad) / (1e-3 + std::abs(grad)) * 1e-3);
            }
        }
        const bool ok = worst <= tol;
        failures += !ok;
        std::printf("%s softmax_cross_entropy, 50,258 classes: %.1e (tol %.0e)\n", ok ? "ok  " : "FAIL", worst, tol);

        // The same rows 50,304 apart (the head's padded logits): the same losses and gradients
        // bit for bit, the NaN padding neither read nor overwritten.
        const i64 stride = 50304;
        const store_t nan = to_store(__int_as_float(0x7fc00000));
        std::vector<store_t> padded(rows * stride, nan), padded_losses(rows);
        for (i64 r = 0; r < rows; ++r) std::copy_n(input.begin() + r * vocab, vocab, padded.begin() + r * stride);
        emu::launch(EmuDim3{(unsigned)rows, 1, 1}, 256, [&] {
            softmax_cross_entropy(padded.data(), targets.data(), weights.data(), padded_losses.data(), rows, vocab, stride, excluded, 0.25f);
        });
        bool same = std::memcmp(losses.data(), padded_losses.data(), rows * sizeof(store_t)) == 0, kept = true;
        for (i64 r = 0; r < rows; ++r) {
            same &= std::memcmp(logits.data() + r * vocab, padded.data() + r * stride, vocab * sizeof(store_t)) == 0;
            for (i64 c = vocab; c < stride; ++c) kept &= std::memcmp(&padded[r * stride + c], &nan, sizeof(store_t)) == 0;
        }
        failures += !(same && kept);
        std::printf("%s softmax_cross_entropy over rows 50,304 apart: %s, padding %s\n", same && kept ? "ok  " : "FAIL",
                    same ? "equal to the dense rows" : "DIFFERS from the dense rows", kept ? "untouched" : "OVERWRITTEN");
    }
    return failures ? 1 : 0;
}
