// The fused kernels (layernorm_forward with modulation, bias_gelu_forward, the branch output with
// its bias, dropout and gated residual and its backward,
// gated_residual_forward_into with and without a bias), run by the CPU emulation in emu.h against the kernels they
// replace, in the storage precision this file is compiled for (STORAGE_BF16 or not): the
// results must be equal bit for bit, as the backend promises. RoPE with one angle for a chunk of
// sequences is held to the same against one sequence a thread.
//
// Built twice (f32 and bf16 storage) and run by tests/emulated_kernels.rs.
#include <cstdio>
#include <random>

#include "emu.h"
#include "../../kernels/common.cuh"
#include "../../kernels/elementwise.cu"
#include "../../kernels/norm.cu"

static int failures = 0;
#define NO_DROPOUT 0.0f, 0.0f, 0u, 0u, 0u, 0u

static void same(const char* what, const std::vector<store_t>& a, const std::vector<store_t>& b) {
    for (size_t i = 0; i < a.size(); ++i) {
        if (std::memcmp(&a[i], &b[i], sizeof(store_t)) != 0) {
            std::printf("FAIL %s: element %zu differs (%g vs %g)\n", what, i, ld(a.data(), i), ld(b.data(), i));
            ++failures;
            return;
        }
    }
    std::printf("ok   %s (%zu elements)\n", what, a.size());
}

int main() {
    std::mt19937 rng(11);
    std::normal_distribution<float> normal(0.0f, 1.5f);
    auto random = [&](size_t n) {
        std::vector<store_t> v(n);
        for (auto& x : v) x = to_store(normal(rng));
        return v;
    };
    const i64 seqs = 3, tokens = 5, cols = 40, rows = seqs * tokens, n = rows * cols, cols4 = 4 * cols, n4 = rows * cols4;
    const unsigned grid = 4, threads = 64;  // fewer threads than elements: the grid-stride loops wrap
    auto x = random(n), w = random(cols), b = random(cols), shift = random(seqs * cols), scale = random(seqs * cols);

    // LayerNorm + modulation: one launch against LayerNorm then modulate_forward, with the rows
    // in one warp's registers (32 threads) and strided (64).
    for (unsigned ln_threads : {64u, 32u}) {
        std::vector<store_t> ln_f(n), mean_f(rows), rstd_f(rows), h_f(n), ln_c(n), mean_c(rows), rstd_c(rows), h_c(n);
        emu::launch(EmuDim3{(unsigned)rows, 1, 1}, ln_threads, [&] {
            layernorm_forward(x.data(), w.data(), b.data(), ln_f.data(), mean_f.data(), rstd_f.data(), rows, cols, 1e-5f,
                              shift.data(), scale.data(), h_f.data(), tokens);
        });
        emu::launch(EmuDim3{(unsigned)rows, 1, 1}, ln_threads, [&] {
            layernorm_forward(x.data(), w.data(), b.data(), ln_c.data(), mean_c.data(), rstd_c.data(), rows, cols, 1e-5f,
                              nullptr, nullptr, nullptr, 1);
        });
        emu::launch(EmuDim3{grid, 1, 1}, threads, [&] {
            modulate_forward(ln_c.data(), shift.data(), scale.data(), h_c.data(), tokens, cols, n);
        });
        const bool warp = ln_threads == 32;
        same(warp ? "layernorm_forward + modulation, one warp: layernorm out" : "layernorm_forward + modulation: layernorm out", ln_f, ln_c);
        same(warp ? "layernorm_forward + modulation, one warp: mean" : "layernorm_forward + modulation: mean", mean_f, mean_c);
        same(warp ? "layernorm_forward + modulation, one warp: rstd" : "layernorm_forward + modulation: rstd", rstd_f, rstd_c);
        same(warp ? "layernorm_forward + modulation, one warp: modulated" : "layernorm_forward + modulation: modulated", h_f, h_c);
    }

    // bias + GELU against bias_add then gelu_forward.
    auto pre_f = random(n4), bias4 = random(cols4);
    auto pre_c = pre_f;
    std::vector<store_t> g_f(n4), g_c(n4);
    emu::launch(EmuDim3{grid, 1, 1}, threads, [&] { bias_gelu_forward(pre_f.data(), bias4.data(), g_f.data(), rows, cols4); });
    emu::launch(EmuDim3{grid, 1, 1}, threads, [&] { bias_add(pre_c.data(), bias4.data(), rows, cols4, cols4); });
    emu::launch(EmuDim3{grid, 1, 1}, threads, [&] { gelu_forward(pre_c.data(), g_c.data(), n4); });
    same("bias_gelu_forward: pre-activation", pre_f, pre_c);
    same("bias_gelu_forward: gelu", g_f, g_c);

    // Out-of-place gated residual against a copy and gated_residual_forward, gated and not.
    auto y = random(n);
    for (const store_t* gate : {(const store_t*)scale.data(), (const store_t*)nullptr}) {
        std::vector<store_t> out_f(n), out_c = x;
        emu::launch(EmuDim3{grid, 1, 1}, threads, [&] {
            gated_residual_forward_into(x.data(), y.data(), nullptr, gate, out_f.data(), tokens, cols, n, NO_DROPOUT);
        });
        emu::launch(EmuDim3{grid, 1, 1}, threads, [&] { gated_residual_forward(out_c.data(), y.data(), gate, tokens, cols, n); });
        same(gate ? "gated_residual_forward_into, gated" : "gated_residual_forward_into, ungated", out_f, out_c);
    }

    // Bias + out-of-place gated residual against bias_add then gated_residual_forward_into.
    const auto bias = random(cols);
    for (const store_t* gate : {(const store_t*)scale.data(), (const store_t*)nullptr}) {
        std::vector<store_t> out_f(n), out_c(n), y_f = y, y_c = y;
        emu::launch(EmuDim3{grid, 1, 1}, threads, [&] {
            gated_residual_forward_into(x.data(), y_f.data(), bias.data(), gate, out_f.data(), tokens, cols, n, NO_DROPOUT);
        });
        emu::launch(EmuDim3{grid, 1, 1}, threads, [&] { bias_add(y_c.data(), bias.data(), rows, cols, cols); });
        emu::launch(EmuDim3{grid, 1, 1}, threads, [&] {
            gated_residual_forward_into(x.data(), y_c.data(), nullptr, gate, out_c.data(), tokens, cols, n, NO_DROPOUT);
        });
        same(gate ? "bias_gated_residual_forward_into, gated: biased y" : "bias_gated_residual_forward_into, ungated: biased y", y_f, y_c);
        same(gate ? "bias_gated_residual_forward_into, gated: out" : "bias_gated_residual_forward_into, ungated: out", out_f, out_c);
    }

    // A training pass's branch output: bias (or none), dropout and the gated residual in one
    // launch against bias_add, dropout and gated_residual_forward_into; the backward's dy with
    // the dropout against gated_residual_backward_dy then dropout. Every operand 16-byte aligned
    // (the chunked loops) and one element off (the plain ones).
    {
        const float p = 0.3f, keep = 1.0f / 0.7f;
        const unsigned k0 = 11u, k1 = 12u, st = 13u, tag = 14u;
        // A copy of v one element further on (misaligned) or as it is.
        auto placed = [&](const std::vector<store_t>& v, bool off) {
            std::vector<store_t> o(v.size() + 1, to_store(0.0f));
            std::copy(v.begin(), v.end(), o.begin() + (off ? 1 : 0));
            return o;
        };
        auto view = [&](std::vector<store_t>& v, bool off) { return v.data() + (off ? 1 : 0); };
        auto back = [&](const std::vector<store_t>& v, bool off, size_t len) {
            return std::vector<store_t>(v.begin() + (off ? 1 : 0), v.begin() + (off ? 1 : 0) + len);
        };
        const auto dres = random(n);
        for (int off = 0; off < 2; ++off) {
            auto xs = placed(x, off), bs = placed(bias, off), gs = placed(scale, off);
            for (int with_bias = 0; with_bias < 2; ++with_bias) {
                for (int gated = 0; gated < 2; ++gated) {
                    const store_t* bp = with_bias ? view(bs, off) : nullptr;
                    const store_t* gp = gated ? view(gs, off) : nullptr;
                    auto y_f = placed(y, off), y_c = placed(y, off), out_f = placed(x, off), out_c = placed(x, off);
                    emu::launch(EmuDim3{grid, 1, 1}, threads, [&] {
                        gated_residual_forward_into(view(xs, off), view(y_f, off), bp, gp, view(out_f, off), tokens, cols, n,
                                                    p, keep, k0, k1, st, tag);
                    });
                    if (bp) emu::launch(EmuDim3{grid, 1, 1}, threads, [&] { bias_add(view(y_c, off), bp, rows, cols, cols); });
                    emu::launch(EmuDim3{grid, 1, 1}, threads, [&] { dropout(view(y_c, off), n, p, keep, k0, k1, st, tag); });
                    emu::launch(EmuDim3{grid, 1, 1}, threads, [&] {
                        gated_residual_forward_into(view(xs, off), view(y_c, off), nullptr, gp, view(out_c, off), tokens, cols,
                                                    n, NO_DROPOUT);
                    });
                    char what[160];
                    std::snprintf(what, sizeof what, "bias_dropout_gated_residual_forward_into, %s, %s, %s: dropped y",
                                  with_bias ? "biased" : "no bias", gated ? "gated" : "ungated", off ? "plain loop" : "chunked");
                    same(what, back(y_f, off, n), back(y_c, off, n));
                    std::snprintf(what, sizeof what, "bias_dropout_gated_residual_forward_into, %s, %s, %s: out",
                                  with_bias ? "biased" : "no bias", gated ? "gated" : "ungated", off ? "plain loop" : "chunked");
                    same(what, back(out_f, off, n), back(out_c, off, n));
                }
            }
            for (int gated = 0; gated < 2; ++gated) {
                const store_t* gp = gated ? view(gs, off) : nullptr;
                auto ds = placed(dres, off), dy_f = placed(y, off), dy_c = placed(y, off);
                emu::launch(EmuDim3{grid, 1, 1}, threads, [&] {
                    gated_residual_backward_dy(view(ds, off), gp, view(dy_f, off), tokens, cols, n, p, keep, k0, k1, st, tag);
                });
                emu::launch(EmuDim3{grid, 1, 1}, threads, [&] {
                    gated_residual_backward_dy(view(ds, off), gp, view(dy_c, off), tokens, cols, n, NO_DROPOUT);
                });
                emu::launch(EmuDim3{grid, 1, 1}, threads, [&] { dropout(view(dy_c, off), n, p, keep, k0, k1, st, tag); });
                char what[160];
                std::snprintf(what, sizeof what, "gated_residual_backward_dy with the dropout, %s, %s", gated ? "gated" : "ungated",
                              off ? "plain loop" : "chunked");
                same(what, back(dy_f, off, n), back(dy_c, off, n));
            }
        }
    }

    // RoPE over chunks of sequences (one angle a thread, rotated in each sequence of its chunk)
    // against one sequence a thread: the queries inside a fused [seqs, tokens, 3·width] row, at a
    // position offset, forward and inverse. Chunks of fewer sequences than one round of loads
    // (ROPE_ROUND, four), of whole rounds, whole rounds and one more, and 19 (the 2L training
    // pass has 16 a thread).
    const i64 heads = 2, head_dim = 8, width = heads * head_dim, stride = 3 * width, many = 19;
    const auto qkv = random(seqs * tokens * stride), qkv_many = random(many * tokens * stride);
    struct RopeCase { i64 seqs, per; };
    for (int inverse = 0; inverse < 2; ++inverse) {
        for (const RopeCase k : {RopeCase{seqs, 2}, RopeCase{seqs, 3}, RopeCase{many, 8}, RopeCase{many, 9}, RopeCase{many, 19}}) {
            auto chunked = k.seqs == seqs ? qkv : qkv_many, single = chunked;
            for (auto [x, per] : {std::pair{&chunked, k.per}, std::pair{&single, (i64)1}}) {
                emu::launch(EmuDim3{grid, 1, 1}, threads, [&] {
                    rope(x->data(), k.seqs, tokens, heads, head_dim, stride, tokens * stride, 7, 10000.0, inverse, per,
                         nullptr, 0, 0, 0, 0);
                });
            }
            char what[96];
            std::snprintf(what, sizeof what, "rope%s, %lld of %lld sequences a thread", inverse ? " inverse" : "",
                          (long long)k.per, (long long)k.seqs);
            same(what, chunked, single);
        }
    }
    // RoPE with the KV-cache append in the same launch against RoPE then copy_row_groups: queries
    // and keys rotated as twice the heads, columns [col0, col0 + cols) of each row copied into
    // slots of a cache (capacity 9, writing at slot 2). The draft's window (the keys and values:
    // rotated and plain columns), one starting inside a head, one wholly inside the rotation.
    const i64 capacity = 9, slot0 = 2;
    const i64 windows[3][2] = {{width, 2 * width}, {width + 3, 2 * width - 3}, {2, width - 4}};
    for (const auto& win : windows) {
        for (i64 per : {1, 2}) {
            const i64 col0 = win[0], ncols = win[1], slot = ncols;
            auto fused_x = qkv, plain_x = qkv;
            auto fused_cache = random(seqs * capacity * slot), plain_cache = fused_cache;
            emu::launch(EmuDim3{grid, 1, 1}, threads, [&] {
                rope(fused_x.data(), seqs, tokens, 2 * heads, head_dim, stride, tokens * stride, 7, 10000.0, 0, per,
                     fused_cache.data() + slot0 * slot, col0, ncols, slot, capacity * slot);
            });
            emu::launch(EmuDim3{grid, 1, 1}, threads, [&] {
                rope(plain_x.data(), seqs, tokens, 2 * heads, head_dim, stride, tokens * stride, 7, 10000.0, 0, per,
                     nullptr, 0, 0, 0, 0);
            });
            emu::launch(EmuDim3{grid, 1, 1}, threads, [&] {
                copy_row_groups(plain_x.data() + col0, stride, tokens * stride, plain_cache.data() + slot0 * slot, slot,
                                capacity * slot, seqs, tokens, ncols);
            });
            char what[160];
            std::snprintf(what, sizeof what, "rope with the copy of columns %lld..%lld, %lld sequence(s) a thread: rows",
                          (long long)col0, (long long)(col0 + ncols), (long long)per);
            same(what, fused_x, plain_x);
            std::snprintf(what, sizeof what, "rope with the copy of columns %lld..%lld, %lld sequence(s) a thread: cache",
                          (long long)col0, (long long)(col0 + ncols), (long long)per);
            same(what, fused_cache, plain_cache);
        }
    }
    return failures ? 1 : 0;
}
