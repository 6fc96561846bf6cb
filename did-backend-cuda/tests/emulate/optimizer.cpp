// The optimizer update (elementwise.cu: optimizer_step, round_f32_into) under the CPU emulation
// in emu.h, in the storage precision this file is compiled for (STORAGE_BF16 or not):
//
// 1. the chunked loop (16-byte-aligned operands) and the plain one (every pointer one element
//    further on) give the same bits, with and without the EMA and the rounded copies;
// 2. every value is the f32 AdamW written out below — and, with f32 storage, bit for bit what
//    the kernels it replaces (scale, adamw, ema_update) leave; the rounded copies are the
//    masters rounded to storage;
// 3. why the masters are f32: with bf16 storage the replaced kernels lose an AdamW step of 3e-4
//    on a weight of 1 and every EMA update at decay 0.9999, and optimizer_step keeps both.
//
// Built twice and run by tests/emulated_kernels.rs.
#include <cstdio>
#include <random>

#include "emu.h"
#include "../../kernels/common.cuh"
#include "../../kernels/elementwise.cu"

static int failures = 0;

static void report(bool ok, const char* what) {
    failures += !ok;
    std::printf("%s %s\n", ok ? "ok  " : "FAIL", what);
}

// Every operand of one update, each held at a 16-byte boundary (`shift` 0) or one element past it.
struct Update {
    std::vector<float> master, m, v, ema;
    std::vector<store_t> grads, rounded, ema_rounded;
};

struct Hyper {
    float grad_scale, lr, beta1, beta2, eps, weight_decay, bc1, bc2, ema_decay;
};

template <class T>
static std::vector<T> shifted(const std::vector<T>& x, int shift) {
    std::vector<T> out(x.size() + shift + 4);
    std::copy(x.begin(), x.end(), out.begin() + shift);
    return out;
}

// Runs optimizer_step over `u` (operands placed at `shift`), with the EMA and the copies where asked.
static Update run(const Update& u, const Hyper& h, int shift, bool with_ema, bool with_rounded) {
    const i64 n = (i64)u.master.size();
    auto master = shifted(u.master, shift), m = shifted(u.m, shift), v = shifted(u.v, shift),
         ema = shifted(u.ema, shift);
    auto grads = shifted(u.grads, shift), rounded = shifted(u.rounded, shift), ema_rounded = shifted(u.ema_rounded, shift);
    emu::launch(EmuDim3{3, 1, 1}, 64, [&] {
        optimizer_step(master.data() + shift, with_rounded ? rounded.data() + shift : nullptr, grads.data() + shift,
                       m.data() + shift, v.data() + shift, with_ema ? ema.data() + shift : nullptr,
                       with_ema && with_rounded ? ema_rounded.data() + shift : nullptr, n, h.grad_scale, h.lr, h.beta1,
                       h.beta2, h.eps, h.weight_decay, h.bc1, h.bc2, h.ema_decay);
    });
    auto back = [&](const auto& x) { return std::vector(x.begin() + shift, x.begin() + shift + n); };
    return Update{back(master), back(m), back(v), back(ema), back(grads), back(rounded), back(ema_rounded)};
}

template <class T>
static bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

static bool same_update(const Update& a, const Update& b) {
    return same_bits(a.master, b.master) && same_bits(a.m, b.m) && same_bits(a.v, b.v) && same_bits(a.ema, b.ema) &&
           same_bits(a.rounded, b.rounded) && same_bits(a.ema_rounded, b.ema_rounded);
}

int main() {
    std::mt19937 rng(11);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    const i64 n = 3 * 64 * 8 * 2 + 8;  // more than one grid-stride pass of 3 blocks × 64 threads × 8
    Update u;
    for (i64 i = 0; i < n; ++i) {
        u.master.push_back(0.05f * normal(rng));
        u.m.push_back(1e-3f * normal(rng));
        const float s = 1e-3f * normal(rng);
        u.v.push_back(s * s);
        u.ema.push_back(u.master.back() + 1e-3f * normal(rng));
        u.grads.push_back(to_store(normal(rng)));
        u.rounded.push_back(to_store(__int_as_float(0x7fc00000)));  // NaN until written
        u.ema_rounded.push_back(to_store(__int_as_float(0x7fc00000)));
    }
    const Hyper h{0.37f, 3e-4f, 0.9f, 0.999f, 1e-8f, 0.01f, 1.0f - 0.9f * 0.9f * 0.9f, 1.0f - 0.999f * 0.999f * 0.999f, 0.99f};

    // 1. Chunked and plain loops, and a length that leaves a tail after the chunks (a whole
    // parameter vector: `small` has 169,627,218, 2 past a multiple of 8).
    Update odd = u;
    for (auto* x : {&odd.master, &odd.m, &odd.v, &odd.ema}) x->resize(n - 3);
    for (auto* x : {&odd.grads, &odd.rounded, &odd.ema_rounded}) x->resize(n - 3);
    for (const bool with_ema : {true, false})
        for (const bool with_rounded : {true, false}) {
            const bool ok = same_update(run(u, h, 0, with_ema, with_rounded), run(u, h, 1, with_ema, with_rounded)) &&
                            same_update(run(odd, h, 0, with_ema, with_rounded), run(odd, h, 1, with_ema, with_rounded));
            char what[128];
            std::snprintf(what, sizeof what, "optimizer_step chunked = plain, whole chunks and a tail (EMA %s, rounded copies %s)",
                          with_ema ? "on" : "off", with_rounded ? "on" : "off");
            report(ok, what);
        }

    // 2. The values: AdamW in f32 on the scaled gradient, then the EMA of the new weights.
    {
        const Update got = run(u, h, 0, true, true);
        bool ok = true;
        for (i64 i = 0; i < n; ++i) {
            const float g = ld(u.grads.data(), i) * h.grad_scale;
            const float m = h.beta1 * u.m[i] + (1.0f - h.beta1) * g;
            const float v = h.beta2 * u.v[i] + (1.0f - h.beta2) * g * g;
            const float mhat = m / h.bc1, vhat = v / h.bc2;
            const float p = u.master[i] * (1.0f - h.lr * h.weight_decay) - h.lr * mhat / (std::sqrt(vhat) + h.eps);
            const float e = h.ema_decay * u.ema[i] + (1.0f - h.ema_decay) * p;
            const store_t pr = to_store(p), er = to_store(e);
            ok &= got.m[i] == m && got.v[i] == v && got.master[i] == p && got.ema[i] == e;
            ok &= std::memcmp(&got.rounded[i], &pr, sizeof pr) == 0 && std::memcmp(&got.ema_rounded[i], &er, sizeof er) == 0;
            if (!ok) {
                std::printf("FAIL element %lld: master %.9g (want %.9g), ema %.9g (want %.9g)\n", (long long)i,
                            got.master[i], p, got.ema[i], e);
                break;
            }
        }
        report(ok, "optimizer_step = f32 AdamW of the scaled gradient, the EMA, copies rounded from the masters");
#ifndef STORAGE_BF16
        // With f32 storage the replaced kernels run on the same buffers: the same bits.
        std::vector<float> params = u.master, grads = u.grads, m = u.m, v = u.v, ema = u.ema;
        emu::launch(EmuDim3{3, 1, 1}, 64, [&] { scale(grads.data(), n, h.grad_scale); });
        emu::launch(EmuDim3{3, 1, 1}, 64, [&] {
            adamw(params.data(), grads.data(), m.data(), v.data(), n, h.lr, h.beta1, h.beta2, h.eps, h.weight_decay, h.bc1, h.bc2);
        });
        emu::launch(EmuDim3{3, 1, 1}, 64, [&] { ema_update(ema.data(), params.data(), n, h.ema_decay); });
        report(same_bits(got.master, params) && same_bits(got.m, m) && same_bits(got.v, v) && same_bits(got.ema, ema),
               "optimizer_step = scale, adamw, ema_update bit for bit (f32 storage)");
#endif
        bool rounds = true;
        for (const i64 len : {n, n - 3}) {
            std::vector<store_t> copy(n, to_store(0.0f)), copy_plain = shifted(copy, 1);
            const std::vector<float> plain_src = shifted(got.master, 1);
            emu::launch(EmuDim3{3, 1, 1}, 64, [&] { round_f32_into(got.master.data(), copy.data(), len); });
            emu::launch(EmuDim3{3, 1, 1}, 64, [&] { round_f32_into(plain_src.data() + 1, copy_plain.data() + 1, len); });
            std::vector<store_t> want(got.rounded.begin(), got.rounded.begin() + len);
            want.resize(n, to_store(0.0f));
            rounds &= same_bits(copy, want) && same_bits(std::vector(copy_plain.begin() + 1, copy_plain.begin() + 1 + n), copy);
        }
        report(rounds, "round_f32_into (chunked with and without a tail, and plain) = the copy optimizer_step writes");
    }

#ifdef STORAGE_BF16
    // 3. What f32 masters keep. A LayerNorm weight of 1 under unit gradients moves by about lr a
    // step (AdamW's normalised step); an EMA at decay 0.9999 moves by 1e-4 of its gap a step.
    // Half a bf16 step at 1 is 2⁻⁹ ≈ 2e-3: the storage-precision kernels round both back.
    {
        const i64 k = 8, steps = 20;
        std::vector<store_t> p_old(k, to_store(1.0f)), g(k, to_store(1.0f)), m_old(k, to_store(0.0f)), v_old(k, to_store(0.0f)),
            e_old(k, to_store(1.0078125f));  // one bf16 step above 1
        Update w{std::vector<float>(k, 1.0f), std::vector<float>(k, 0.0f), std::vector<float>(k, 0.0f),
                 std::vector<float>(k, 1.0078125f), g, std::vector<store_t>(k), std::vector<store_t>(k)};
        for (int t = 1; t <= steps; ++t) {
            const float bc1 = 1.0f - std::pow(0.9f, (float)t), bc2 = 1.0f - std::pow(0.999f, (float)t);
            emu::launch(EmuDim3{1, 1, 1}, 32, [&] {
                adamw(p_old.data(), g.data(), m_old.data(), v_old.data(), k, 3e-4f, 0.9f, 0.999f, 1e-8f, 0.0f, bc1, bc2);
            });
            emu::launch(EmuDim3{1, 1, 1}, 32, [&] { ema_update(e_old.data(), p_old.data(), k, 0.9999f); });
            w = run(w, Hyper{1.0f, 3e-4f, 0.9f, 0.999f, 1e-8f, 0.0f, bc1, bc2, 0.9999f}, 0, true, true);
        }
        const float p_old_now = ld(p_old.data(), 0), e_old_now = ld(e_old.data(), 0);
        const float moved = 1.0f - w.master[0], ema_moved = 1.0078125f - w.ema[0];
        const bool old_stuck = p_old_now == 1.0f && e_old_now == 1.0078125f;
        const bool kept = std::abs(moved - steps * 3e-4f) < 0.05f * steps * 3e-4f && ema_moved > 0.9f * 20 * 1e-4f * 0.0078125f &&
                          ld(w.rounded.data(), 0) == ld(std::vector<store_t>{to_store(w.master[0])}.data(), 0);
        std::printf("     %lld steps of lr 3e-4 on a weight of 1: bf16 storage %.7g, f32 master %.7g (rounded %.7g); "
                    "EMA at 0.9999 from 1.0078125: bf16 %.9g, f32 %.9g\n",
                    (long long)steps, p_old_now, w.master[0], ld(w.rounded.data(), 0), e_old_now, w.ema[0]);
        report(old_stuck && kept, "f32 masters keep the AdamW steps and EMA updates that bf16 storage rounds away");
    }
#endif
    return failures ? 1 : 0;
}
