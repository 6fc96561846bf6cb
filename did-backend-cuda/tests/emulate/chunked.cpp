// The chunked elementwise kernels (kernels.rs, CHUNKED), run by the CPU emulation in emu.h on
// 16-byte-aligned operands (the chunked loop) and on the same values one element further on
// (every pointer misaligned: the plain loop): the results must be equal bit for bit, in the
// storage precision this file is compiled for (STORAGE_BF16 or not). Per-sequence column sums
// in one launch are held to the same against one launch a sequence.
//
// Built twice (f32 and bf16 storage) and run by tests/emulated_kernels.rs.
#include <cstdio>
#include <random>

#include "emu.h"
#include "../../kernels/common.cuh"
#include "../../kernels/elementwise.cu"

static int failures = 0;

// An operand held twice: at a 16-byte boundary and one element past it.
struct Operand {
    std::vector<store_t> aligned, shifted;
    store_t* at(bool misaligned) { return misaligned ? shifted.data() + 1 : aligned.data(); }
};

int main() {
    std::mt19937 rng(5);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    const i64 seqs = 3, tokens = 4, channels = 40, n = seqs * tokens * channels;  // channels: a multiple of 8
    auto operand = [&](i64 len) {
        Operand o;
        o.aligned.resize(len);
        for (auto& x : o.aligned) x = to_store(normal(rng));
        o.shifted.assign(len + 1, to_store(0.0f));
        std::copy(o.aligned.begin(), o.aligned.end(), o.shifted.begin() + 1);
        return o;
    };
    // Runs `kernel(misaligned)` on fresh copies of the operands both ways and compares every
    // operand afterwards (whatever the kernel wrote).
    auto check = [&](const char* what, std::vector<Operand> ops, const std::function<void(std::vector<Operand>&, bool)>& kernel) {
        std::vector<Operand> a = ops, b = ops;
        emu::launch(EmuDim3{3, 1, 1}, 64, [&] { kernel(a, false); });
        emu::launch(EmuDim3{3, 1, 1}, 64, [&] { kernel(b, true); });
        for (size_t o = 0; o < a.size(); ++o) {
            for (size_t i = 0; i < a[o].aligned.size(); ++i) {
                if (std::memcmp(&a[o].aligned[i], &b[o].shifted[i + 1], sizeof(store_t)) != 0) {
                    std::printf("FAIL %s: operand %zu element %zu differs (%g chunked, %g plain)\n", what, o, i,
                                ld(a[o].aligned.data(), i), ld(b[o].shifted.data(), i + 1));
                    ++failures;
                    return;
                }
            }
        }
        std::printf("ok   %s\n", what);
    };
    const Operand x = operand(n), y = operand(n), z = operand(n), per_seq = operand(seqs * channels),
                  per_seq2 = operand(seqs * channels), bias = operand(channels);
    Operand second_moments = operand(n);  // ≥ 0, as AdamW keeps them
    for (auto* v : {&second_moments.aligned, &second_moments.shifted})
        for (auto& e : *v) e = to_store(ld(&e, 0) * ld(&e, 0));

    check("fill", {x}, [&](auto& o, bool m) { fill(o[0].at(m), n, 0.375f); });
    check("bias_add", {x, bias}, [&](auto& o, bool m) { bias_add(o[0].at(m), o[1].at(m), seqs * tokens, channels, channels); });
    check("modulate_forward", {x, per_seq, per_seq2, y}, [&](auto& o, bool m) {
        modulate_forward(o[0].at(m), o[1].at(m), o[2].at(m), o[3].at(m), tokens, channels, n);
    });
    check("modulate_backward_dx", {x, per_seq, y}, [&](auto& o, bool m) {
        modulate_backward_dx(o[0].at(m), o[1].at(m), o[2].at(m), tokens, channels, n);
    });
    check("gated_residual_forward, gated", {x, y, per_seq}, [&](auto& o, bool m) {
        gated_residual_forward(o[0].at(m), o[1].at(m), o[2].at(m), tokens, channels, n);
    });
    check("gated_residual_forward, ungated", {x, y}, [&](auto& o, bool m) {
        gated_residual_forward(o[0].at(m), o[1].at(m), nullptr, tokens, channels, n);
    });
    check("gated_residual_forward_into", {x, y, per_seq, z}, [&](auto& o, bool m) {
        gated_residual_forward_into(o[0].at(m), o[1].at(m), nullptr, o[2].at(m), o[3].at(m), tokens, channels, n, 0.0f, 0.0f, 0u, 0u, 0u, 0u);
    });
    check("gated_residual_forward_into with a bias", {x, y, bias, per_seq, z}, [&](auto& o, bool m) {
        gated_residual_forward_into(o[0].at(m), o[1].at(m), o[2].at(m), o[3].at(m), o[4].at(m), tokens, channels, n, 0.0f, 0.0f, 0u, 0u, 0u, 0u);
    });
    check("gated_residual_backward_dy", {x, per_seq, y}, [&](auto& o, bool m) {
        gated_residual_backward_dy(o[0].at(m), o[1].at(m), o[2].at(m), tokens, channels, n, 0.0f, 0.0f, 0u, 0u, 0u, 0u);
    });
    check("bias_gelu_forward", {x, bias, y}, [&](auto& o, bool m) {
        bias_gelu_forward(o[0].at(m), o[1].at(m), o[2].at(m), seqs * tokens, channels);
    });
    check("gelu_backward", {x, y, z}, [&](auto& o, bool m) { gelu_backward(o[0].at(m), o[1].at(m), o[2].at(m), n); });
    check("dropout", {x}, [&](auto& o, bool m) { dropout(o[0].at(m), n, 0.3f, 1.0f / 0.7f, 11u, 12u, 13u, 14u); });
    check("adamw", {x, y, z, second_moments}, [&](auto& o, bool m) {
        adamw(o[0].at(m), o[1].at(m), o[2].at(m), o[3].at(m), n, 1e-3f, 0.9f, 0.999f, 1e-8f, 0.01f, 0.1f, 0.01f);
    });
    check("ema_update", {x, y}, [&](auto& o, bool m) { ema_update(o[0].at(m), o[1].at(m), n, 0.99f); });
    check("scale", {x}, [&](auto& o, bool m) { scale(o[0].at(m), n, 0.3f); });
    // The flat kernels over a length that is not a multiple of the chunk (a whole parameter
    // vector): chunks, then the tail one element at a time, against the plain loop; elements
    // past the length untouched.
    {
        const i64 odd = n - 3;
        check("fill, odd length", {x}, [&](auto& o, bool m) { fill(o[0].at(m), odd, 0.375f); });
        check("gelu_backward, odd length", {x, y, z}, [&](auto& o, bool m) { gelu_backward(o[0].at(m), o[1].at(m), o[2].at(m), odd); });
        check("dropout, odd length", {x}, [&](auto& o, bool m) { dropout(o[0].at(m), odd, 0.3f, 1.0f / 0.7f, 11u, 12u, 13u, 14u); });
        check("adamw, odd length", {x, y, z, second_moments}, [&](auto& o, bool m) {
            adamw(o[0].at(m), o[1].at(m), o[2].at(m), o[3].at(m), odd, 1e-3f, 0.9f, 0.999f, 1e-8f, 0.01f, 0.1f, 0.01f);
        });
        check("ema_update, odd length", {x, y}, [&](auto& o, bool m) { ema_update(o[0].at(m), o[1].at(m), odd, 0.99f); });
        check("scale, odd length", {x}, [&](auto& o, bool m) { scale(o[0].at(m), odd, 0.3f); });
    }

    // Σ x² a chunk a load (another order than one element a load: equal to f64 rounding), over
    // the whole length and over one that leaves a tail.
    for (const i64 len : {n, n - 3}) {
        Operand xs = x;
        double sums[2];
        for (int m = 0; m < 2; ++m) {
            std::vector<double> partial(3);
            emu::launch(EmuDim3{3, 1, 1}, 64, [&] { sum_partial(xs.at(m == 1), len, 1, partial.data()); });
            sums[m] = partial[0] + partial[1] + partial[2];
        }
        double want = 0;
        for (i64 i = 0; i < len; ++i) want += (double)ld(x.aligned.data(), i) * ld(x.aligned.data(), i);
        const bool close = std::abs(sums[0] - sums[1]) <= 1e-12 * sums[1] && std::abs(sums[0] - want) <= 1e-12 * want;
        failures += !close;
        std::printf("%s sum_partial of squares over %lld, chunked and plain: %.17g, %.17g (f64 %.17g)\n", close ? "ok  " : "FAIL",
                    (long long)len, sums[0], sums[1], want);
    }

    // Per-sequence column sums, every sequence in one launch (grid z) against one launch each,
    // and both against the sums in f64: 3 sequences of 300 rows × 40 columns, chunks of 64 rows
    // (the last one short), blocks of 32 columns × 8 row slices as the backend launches them.
    {
        const i64 srows = 300, chunk_rows = 64, chunks = (srows + chunk_rows - 1) / chunk_rows;
        const Operand a = operand(seqs * srows * channels), b2 = operand(seqs * srows * channels);
        const unsigned col_blocks = (unsigned)((channels + 31) / 32);
        std::vector<float> partial(seqs * chunks * channels);
        auto grouped = per_seq.aligned, one_by_one = per_seq.aligned;
        emu::launch(EmuDim3{col_blocks, (unsigned)chunks, (unsigned)seqs}, 256, [&] {
            colsum_partial(a.aligned.data(), b2.aligned.data(), partial.data(), srows, channels, channels, chunk_rows);
        });
        emu::launch(EmuDim3{2, 1, 1}, 32, [&] { colsum_finish(partial.data(), chunks, grouped.data(), channels, seqs); });
        for (i64 g = 0; g < seqs; ++g) {
            std::vector<float> part(chunks * channels);
            emu::launch(EmuDim3{col_blocks, (unsigned)chunks, 1}, 256, [&] {
                colsum_partial(a.aligned.data() + g * srows * channels, b2.aligned.data() + g * srows * channels,
                               part.data(), srows, channels, channels, chunk_rows);
            });
            emu::launch(EmuDim3{2, 1, 1}, 32, [&] { colsum_finish(part.data(), chunks, one_by_one.data() + g * channels, channels, 1); });
        }
        const bool same = std::memcmp(grouped.data(), one_by_one.data(), grouped.size() * sizeof(store_t)) == 0;
        double worst = 0;
        for (i64 g = 0; g < seqs; ++g)
            for (i64 c = 0; c < channels; ++c) {
                double want = ld(per_seq.aligned.data(), g * channels + c), scale = 0;
                for (i64 r = 0; r < srows; ++r) {
                    const i64 i = (g * srows + r) * channels + c;
                    const double t = (double)ld(a.aligned.data(), i) * ld(b2.aligned.data(), i);
                    want += t;
                    scale += std::abs(t);
                }
                worst = std::max(worst, std::abs(ld(grouped.data(), g * channels + c) - want) / (1.0 + scale));
            }
#ifdef STORAGE_BF16
        const double tol = 1e-2;
#else
        const double tol = 1e-6;
#endif
        const bool ok = same && worst <= tol;
        failures += !ok;
        std::printf("%s column sums of %lld sequences in one launch: %s per-sequence launches, %.1e from f64 (tol %.0e)\n",
                    ok ? "ok  " : "FAIL", (long long)seqs, same ? "equal to" : "NOT equal to", worst, tol);
    }

    // Rows `stride` apart (the head's padded logits, did_core::backend::RowMajor): the bias add
    // and the column sum over padded rows equal them over the same rows stored densely, bit for
    // bit, and never touch (bias add) or read (column sum: NaN padding) what lies between rows.
    // Strides that keep the chunked loop (a multiple of 8) and that force the plain one; a row
    // length that is not a multiple of the chunk.
    {
        struct Case { i64 rows, cols, stride; };
        bool ok = true;
        for (const Case k : {Case{37, 40, 48}, Case{37, 40, 45}, Case{9, 37, 64}, Case{600, 40, 56}}) {
            const Operand dense = operand(k.rows * k.cols), b = operand(k.cols);
            std::vector<store_t> padded(k.rows * k.stride, to_store(__int_as_float(0x7fc00000)));
            for (i64 r = 0; r < k.rows; ++r)
                std::copy_n(dense.aligned.begin() + r * k.cols, k.cols, padded.begin() + r * k.stride);
            // Column sums first (they read the rows as they are), then the bias add.
            auto colsum = [&](const store_t* a, i64 stride) {
                const i64 chunk_rows = 64, chunks = (k.rows + chunk_rows - 1) / chunk_rows;
                std::vector<float> partial(chunks * k.cols);
                std::vector<store_t> out(k.cols, to_store(0.0f));
                emu::launch(EmuDim3{(unsigned)((k.cols + 31) / 32), (unsigned)chunks, 1}, 256,
                            [&] { colsum_partial(a, nullptr, partial.data(), k.rows, k.cols, stride, chunk_rows); });
                emu::launch(EmuDim3{2, 1, 1}, 32, [&] { colsum_finish(partial.data(), chunks, out.data(), k.cols, 1); });
                return out;
            };
            const auto sums_dense = colsum(dense.aligned.data(), k.cols), sums_padded = colsum(padded.data(), k.stride);
            const bool sums_same = std::memcmp(sums_dense.data(), sums_padded.data(), k.cols * sizeof(store_t)) == 0;
            std::vector<store_t> want = dense.aligned, got = padded;
            emu::launch(EmuDim3{3, 1, 1}, 64, [&] { bias_add(want.data(), b.aligned.data(), k.rows, k.cols, k.cols); });
            emu::launch(EmuDim3{3, 1, 1}, 64, [&] { bias_add(got.data(), b.aligned.data(), k.rows, k.cols, k.stride); });
            bool values_same = true, padding_kept = true;
            for (i64 r = 0; r < k.rows; ++r) {
                values_same &= std::memcmp(want.data() + r * k.cols, got.data() + r * k.stride, k.cols * sizeof(store_t)) == 0;
                for (i64 c = k.cols; c < k.stride; ++c)
                    padding_kept &= std::memcmp(&got[r * k.stride + c], &padded[r * k.stride + c], sizeof(store_t)) == 0;
            }
            if (!(sums_same && values_same && padding_kept)) {
                std::printf("FAIL padded rows %lld × %lld, stride %lld: column sums %s, bias add %s, padding %s\n",
                            (long long)k.rows, (long long)k.cols, (long long)k.stride, sums_same ? "equal" : "DIFFER",
                            values_same ? "equal" : "DIFFERS", padding_kept ? "kept" : "OVERWRITTEN");
                ok = false;
            }
        }
        failures += !ok;
        if (ok) std::printf("ok   bias_add and column sums over padded rows: the dense results, the padding untouched\n");
    }
    return failures ? 1 : 0;
}
