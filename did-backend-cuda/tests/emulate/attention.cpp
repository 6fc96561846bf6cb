// The attention kernels of kernels/attention.cu (bf16 storage), forward and backward, run by the
// CPU emulation in emu.h and compared with a plain double-precision attention and its gradients
// written from the mask definitions (docs/bd3lm.md §2.2, §4.2), not from the kernels' key_ranges. The correctness-first kernel, already
// checked against did's CPU backend on GPUs, is run the same way: it passing shows the emulation
// is sound, so the flash kernel passing means something.
//
// Built and run by tests/emulated_kernels.rs; exit status 0 when every case agrees.
#include <cstdio>
#include <random>

#include "emu.h"
#define STORAGE_BF16
#include "../../kernels/common.cuh"
#include "../../kernels/attention.cu"

struct Case {
    const char* name;
    int kind;
    i64 p0, p1, p2, window;
    i64 batch, heads, q_len, kv_len;
    bool also_reference;  // run the correctness-first kernel too (its emulation is slow: a barrier per shuffle)
    i64 misalign = 0;     // elements before the first row: ≠ 0 mod 8 takes the flash kernels' scalar loads
};

static bool allowed(const Case& c, i64 q, i64 k) {
    switch (c.kind) {
        case 0: {  // BD3 training over x_t ⊕ x_0
            i64 L = c.p0, blk = c.p1;
            bool qc = q >= L, kc = k >= L;
            i64 qb = (q - (qc ? L : 0)) / blk, kb = (k - (kc ? L : 0)) / blk;
            return (qb == kb && qc == kc) || (!qc && kc && kb < qb) || (qc && kc && kb <= qb);
        }
        case 1: {  // block-causal at absolute positions, optional window ending at the block's end
            i64 qp = c.p1 + q, kp = c.p2 + k, end = (qp / c.p0 + 1) * c.p0;
            return kp < end && (c.window < 0 || kp >= end - c.window);
        }
        case 2:
            return true;
        default: {  // causal
            i64 qp = c.p1 + q, kp = c.p2 + k;
            return kp <= qp && (c.window < 0 || kp > qp - c.window);
        }
    }
}

static float bf(store_t x) { return ld(&x, 0); }

// The larger error, a NaN counting as infinite (std::max would drop it: NaN compares false).
static double worse(double a, double b) { return std::isnan(b) ? INFINITY : std::max(a, b); }

int main() {
    const i64 hd = 64;
    const Case cases[] = {
        {"BD3 training, L = 80 (tiles straddle x_t | x_0), block 4", 0, 80, 4, 0, -1, 2, 2, 160, 160, false},
        {"BD3 training, L = 128, block 4", 0, 128, 4, 0, -1, 1, 1, 256, 256, false},
        {"BD3 training, L = 64, block 16", 0, 64, 16, 0, -1, 1, 1, 128, 128, true},
        {"draft through a KV cache: block 4 at position 68", 1, 4, 68, 0, -1, 2, 2, 4, 72, true},
        {"block-causal window 40, keys from 20", 1, 8, 40, 20, 40, 1, 1, 24, 44, true},
        {"global refine (full), 100 tokens", 2, 0, 0, 0, -1, 1, 2, 100, 100, false},
        {"causal, window 16", 3, 0, 10, 0, 16, 1, 1, 40, 50, true},
        {"BD3 training, L = 72, block 8, rows not 16-byte aligned", 0, 72, 8, 0, -1, 1, 2, 144, 144, false, 3},
        {"draft through a KV cache: block 4 at position 1024 (17 key tiles)", 1, 4, 1024, 0, -1, 1, 2, 4, 1028, false},
        {"draft at position 300, window 256, keys from 40", 1, 4, 300, 40, 256, 2, 1, 4, 264, false},
        // Rows 0–7 see keys 60–99, rows 8–15 keys 68–107: the warp's first key tile holds nothing
        // for its second block, whose running maximum is still −∞ there.
        {"block-causal window 40, a warp's first key tile empty for half its rows", 1, 8, 92, 0, 40, 1, 1, 16, 108, true},
        // Keys from position 70: rows 0–69 see none (log-sum-exp −∞, output 0, no gradient).
        {"causal, keys from 70: the first 70 rows see no key", 3, 0, 0, 70, -1, 1, 1, 100, 60, true},
    };
    // The forward's key splits (flash-decoding): tiles a block, then attention_combine_splits.
    const int split_tiles[] = {1, 3};
    const int n_split = 2;
    std::mt19937 rng(7);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    int failures = 0;
    for (const Case& c : cases) {
        const i64 width = c.heads * hd, row = 3 * width;  // fused q | k | v rows, as the model stores them
        std::vector<store_t> qbuf(c.misalign + c.batch * c.q_len * row), kvbuf(c.misalign + c.batch * c.kv_len * row);
        for (auto& x : qbuf) x = to_store(normal(rng));
        for (auto& x : kvbuf) x = to_store(normal(rng));
        Shape s{c.batch, c.heads, hd, c.q_len, c.kv_len, row, row, row, c.q_len * row, c.kv_len * row};
        const float scale = 1.0f / std::sqrt((float)hd);
        const store_t *q = qbuf.data() + c.misalign, *k = kvbuf.data() + c.misalign + width,
                      *v = kvbuf.data() + c.misalign + 2 * width;
        const i64 rows = c.batch * c.q_len * c.heads;
        std::vector<store_t> out_ref(c.batch * c.q_len * width), out_flash(out_ref.size());
        std::vector<float> lse_ref(rows), lse_flash(rows);  // f32 in every storage precision

        if (c.also_reference) {
            emu::launch(EmuDim3{(unsigned)((rows + 3) / 4), 1, 1}, 128, [&] {
                attention_forward(s, c.kind, c.p0, c.p1, c.p2, c.window, scale, q, k, v, out_ref.data(), lse_ref.data());
            });
        }
        // As the backend launches it: warps of 16 query rows, up to four a block.
        const unsigned warps = (unsigned)std::min<i64>(4, (c.q_len + 15) / 16);
        const EmuDim3 grid{(unsigned)(c.batch * c.heads), (unsigned)((c.q_len + 16 * warps - 1) / (16 * warps)), 1};
        const int tiles = (int)((c.kv_len + 63) / 64);
        emu::launch(grid, 32 * warps, [&] {
            attention_forward_flash(s, c.kind, c.p0, c.p1, c.p2, c.window, scale, q, k, v, out_flash.data(),
                                    lse_flash.data(), tiles, nullptr, nullptr);
        });
        // The same forward with its key tiles split between blocks, joined by the combine kernel;
        // partials and outputs poisoned with NaN so an element nobody writes shows.
        std::vector<store_t> out_split[n_split];
        std::vector<float> lse_split[n_split];
        for (int sp = 0; sp < n_split; ++sp) {
            const int per = split_tiles[sp], splits = (tiles + per - 1) / per;
            out_split[sp].assign(out_ref.size(), to_store(NAN));
            lse_split[sp].assign(rows, NAN);
            std::vector<float> partial_out((size_t)splits * rows * hd, NAN), partial_lse((size_t)splits * rows, NAN);
            emu::launch(EmuDim3{grid.x, grid.y, (unsigned)splits}, 32 * warps, [&] {
                attention_forward_flash(s, c.kind, c.p0, c.p1, c.p2, c.window, scale, q, k, v, nullptr, nullptr, per,
                                        partial_out.data(), partial_lse.data());
            });
            emu::launch(EmuDim3{(unsigned)((rows + 3) / 4), 1, 1}, 128, [&] {
                attention_combine_splits(s, splits, partial_out.data(), partial_lse.data(), out_split[sp].data(),
                                         lse_split[sp].data());
            });
        }

        // The backward of each kernel, from its own output and log-sum-exp, into gradients that
        // hold 0.25 before (the kernels write them: the old content must go), laid out like their
        // inputs: dq in a copy of the q buffer's layout, dk and dv interleaved in one of the fused
        // k | v rows.
        std::vector<store_t> dout(out_ref.size());
        for (auto& x : dout) x = to_store(normal(rng));
        const i64 kv_grad_len = c.batch * c.kv_len * width;
        std::vector<store_t> gq[2], gkv[2];
        std::vector<float> delta(rows);
        for (int kern = c.also_reference ? 0 : 1; kern < 2; ++kern) {
            gq[kern].assign(qbuf.size(), to_store(0.25f));
            gkv[kern].assign(kvbuf.size(), to_store(0.25f));
            store_t* dq = gq[kern].data() + c.misalign;
            store_t* dk = gkv[kern].data() + c.misalign + width;
            store_t* dv = gkv[kern].data() + c.misalign + 2 * width;
            const store_t* o = kern ? out_flash.data() : out_ref.data();
            const float* l = kern ? lse_flash.data() : lse_ref.data();
            if (kern == 0) {
                emu::launch(EmuDim3{(unsigned)((rows + 3) / 4), 1, 1}, 128, [&] {
                    attention_backward_dq(s, c.kind, c.p0, c.p1, c.p2, c.window, scale, dout.data(), q, k, v, o, l,
                                          dq, delta.data());
                });
                emu::launch(EmuDim3{(unsigned)((c.batch * c.heads * c.kv_len + 3) / 4), 1, 1}, 128, [&] {
                    attention_backward_dkv(s, c.kind, c.p0, c.p1, c.p2, c.window, scale, dout.data(), q, k, v, l,
                                           delta.data(), dk, dv);
                });
            } else {
                emu::launch(EmuDim3{(unsigned)(c.batch * c.heads), (unsigned)((c.q_len + 63) / 64), 1}, 128, [&] {
                    attention_backward_flash_dq(s, c.kind, c.p0, c.p1, c.p2, c.window, scale, dout.data(), q, k, v, o,
                                                l, dq, delta.data());
                });
                emu::launch(EmuDim3{(unsigned)(c.batch * c.heads), (unsigned)((c.kv_len + 63) / 64), 1}, 128, [&] {
                    attention_backward_flash_dkv(s, c.kind, c.p0, c.p1, c.p2, c.window, scale, dout.data(), q, k, v,
                                                 l, delta.data(), dk, dv);
                });
            }
        }
        std::vector<double> want_dq(out_ref.size(), 0.0), want_dk(kv_grad_len, 0.0), want_dv(kv_grad_len, 0.0);

        // The plain attention and its gradients in f64 from the bf16 inputs.
        double worst[2][2] = {{0, 0}, {0, 0}};  // [kernel][out, lse]
        double worst_split[n_split][2] = {};     // [tiles a block][out, lse]
        for (i64 b = 0; b < c.batch; ++b)
            for (i64 h = 0; h < c.heads; ++h)
                for (i64 qi = 0; qi < c.q_len; ++qi) {
                    std::vector<double> p(c.kv_len, 0.0);
                    double m = -INFINITY;
                    const store_t* qr = q + b * s.q_batch_stride + qi * row + h * hd;
                    for (i64 ki = 0; ki < c.kv_len; ++ki) {
                        if (!allowed(c, qi, ki)) continue;
                        const store_t* kr = k + b * s.kv_batch_stride + ki * row + h * hd;
                        double dot = 0;
                        for (i64 d = 0; d < hd; ++d) dot += (double)bf(qr[d]) * bf(kr[d]);
                        p[ki] = dot * scale;
                        m = std::max(m, p[ki]);
                    }
                    double l = 0;
                    for (i64 ki = 0; ki < c.kv_len; ++ki) l += allowed(c, qi, ki) ? (p[ki] = std::exp(p[ki] - m)) : (p[ki] = 0);
                    const double lse = l > 0 ? m + std::log(l) : -INFINITY;
                    const i64 li = (b * c.heads + h) * c.q_len + qi;
                    const float* lses[2] = {lse_ref.data(), lse_flash.data()};
                    const store_t* outs[2] = {out_ref.data(), out_flash.data()};
                    for (int kern = 0; kern < 2; ++kern) {
                        double got = lses[kern][li];
                        double err = l > 0 ? std::abs(got - lse) / (1.0 + std::abs(lse)) : (std::isinf(got) ? 0.0 : 1.0);
                        worst[kern][1] = worse(worst[kern][1], err);
                    }
                    for (int sp = 0; sp < n_split; ++sp) {
                        double got = lse_split[sp][li];
                        double err = l > 0 ? std::abs(got - lse) / (1.0 + std::abs(lse)) : (std::isinf(got) && got < 0 ? 0.0 : 1.0);
                        worst_split[sp][1] = worse(worst_split[sp][1], err);
                    }
                    std::vector<double> o_want(hd);
                    for (i64 d = 0; d < hd; ++d) {
                        double want = 0;
                        for (i64 ki = 0; ki < c.kv_len; ++ki)
                            if (p[ki] > 0) want += p[ki] * bf(v[b * s.kv_batch_stride + ki * row + h * hd + d]);
                        want = l > 0 ? want / l : 0.0;
                        o_want[d] = want;
                        const i64 o = b * c.q_len * width + qi * width + h * hd + d;
                        for (int kern = 0; kern < 2; ++kern) {
                            double err = std::abs(bf(outs[kern][o]) - want) / (0.05 + std::abs(want));
                            worst[kern][0] = worse(worst[kern][0], err);
                        }
                        for (int sp = 0; sp < n_split; ++sp) {
                            double err = std::abs(bf(out_split[sp][o]) - want) / (0.05 + std::abs(want));
                            worst_split[sp][0] = worse(worst_split[sp][0], err);
                        }
                    }
                    // dS = P ∘ (dP − δ)·scale with δ = dO·O; dQ = dS·K, dK = dSᵀ·Q, dV = Pᵀ·dO.
                    if (l == 0) continue;
                    const i64 o = b * c.q_len * width + qi * width + h * hd;
                    double dd = 0;
                    for (i64 d = 0; d < hd; ++d) dd += bf(dout[o + d]) * o_want[d];
                    for (i64 ki = 0; ki < c.kv_len; ++ki) {
                        if (p[ki] == 0) continue;
                        const double pk = p[ki] / l;
                        const i64 kr = b * s.kv_batch_stride + ki * row + h * hd;
                        const i64 g = b * c.kv_len * width + ki * width + h * hd;
                        double dp = 0;
                        for (i64 d = 0; d < hd; ++d) dp += bf(dout[o + d]) * bf(v[kr + d]);
                        const double ds = pk * (dp - dd) * scale;
                        for (i64 d = 0; d < hd; ++d) {
                            want_dq[o + d] += ds * bf(k[kr + d]);
                            want_dk[g + d] += ds * bf(qr[d]);
                            want_dv[g + d] += pk * bf(dout[o + d]);
                        }
                    }
                }
        // Gradients: the largest error relative to the largest gradient of the tensor.
        double worst_grad[2][3] = {{0, 0, 0}, {0, 0, 0}};  // [kernel][dq, dk, dv]
        for (int kern = c.also_reference ? 0 : 1; kern < 2; ++kern) {
            // Where element i of a contiguous [batch, len, width] gradient sits in the strided one.
            const store_t* got[3] = {gq[kern].data() + c.misalign, gkv[kern].data() + c.misalign + width,
                                     gkv[kern].data() + c.misalign + 2 * width};
            const i64 lens[3] = {c.q_len, c.kv_len, c.kv_len};
            const std::vector<double>* want[3] = {&want_dq, &want_dk, &want_dv};
            for (int t = 0; t < 3; ++t) {
                double err = 0, big = 1e-30;
                for (size_t i = 0; i < want[t]->size(); ++i) {
                    const i64 token = (i64)i / width, col = (i64)i % width;
                    const i64 at = (token / lens[t]) * lens[t] * row + (token % lens[t]) * row + col;
                    err = worse(err, std::abs(bf(got[t][at]) - (*want[t])[i]));
                    big = std::max(big, std::abs((*want[t])[i]));
                }
                worst_grad[kern][t] = err / big;
            }
            // The other columns of the gradient rows (the k | v part of dq's rows, the q part of
            // dk's and dv's) are the caller's: untouched.
            for (size_t i = 0; i < qbuf.size(); ++i) {
                const i64 col = ((i64)i - c.misalign) % row;
                if (((i64)i < c.misalign || col >= width) && gq[kern][i] != to_store(0.25f)) worst_grad[kern][0] = INFINITY;
            }
            for (size_t i = 0; i < kvbuf.size(); ++i) {
                const i64 col = ((i64)i - c.misalign) % row;
                if (((i64)i < c.misalign || col < width) && gkv[kern][i] != to_store(0.25f)) worst_grad[kern][1] = INFINITY;
            }
        }
        // bf16 storage rounds the output (2⁻⁸ relative); the flash kernel also rounds P to bf16
        // before P·V. The log-sum-exp is kept in f32 (zeros_f32), so its tolerance is f32's.
        // Gradients also carry (flash) P and dS rounded to bf16.
        const double tol_out[2] = {1.5e-2, 3e-2}, tol_lse = 1e-5, tol_grad = 1e-2;
        const char* names[2][2] = {{"attention_forward      ", "attention_backward      "},
                                   {"attention_forward_flash", "attention_backward_flash"}};
        for (int sp = 0; sp < n_split; ++sp) {
            bool ok = worst_split[sp][0] <= tol_out[1] && worst_split[sp][1] <= tol_lse;
            failures += !ok;
            std::printf("%s attention_forward_flash split, %d tile(s) a block, %d block(s) | %s: out rel err %.2e (tol %.0e), "
                        "lse rel err %.2e (tol %.0e)\n",
                        ok ? "ok  " : "FAIL", split_tiles[sp], (int)((c.kv_len + 63) / 64 + split_tiles[sp] - 1) / split_tiles[sp],
                        c.name, worst_split[sp][0], tol_out[1], worst_split[sp][1], tol_lse);
        }
        for (int kern = c.also_reference ? 0 : 1; kern < 2; ++kern) {
            bool ok = worst[kern][0] <= tol_out[kern] && worst[kern][1] <= tol_lse;
            failures += !ok;
            std::printf("%s %s | %s: out rel err %.2e (tol %.0e), lse rel err %.2e (tol %.0e)\n", ok ? "ok  " : "FAIL",
                        names[kern][0], c.name, worst[kern][0], tol_out[kern], worst[kern][1], tol_lse);
            const double* gerr = worst_grad[kern];
            ok = gerr[0] <= tol_grad && gerr[1] <= tol_grad && gerr[2] <= tol_grad;
            failures += !ok;
            std::printf("%s %s | %s: dq %.2e, dk %.2e, dv %.2e (of the largest; tol %.0e)\n", ok ? "ok  " : "FAIL",
                        names[kern][1], c.name, gerr[0], gerr[1], gerr[2], tol_grad);
        }
    }
    return failures ? 1 : 0;
}
