// A CPU emulation of the CUDA features the kernels use, so their indexing, masking, reductions,
// online softmax and tensor-core fragment handling can be tested on a machine without a GPU.
//
// Every CUDA thread of a block is an OS thread; blocks run one after another, so `__shared__`
// (mapped to `static`) is one array per block. `__syncthreads` is a barrier over the block;
// warp shuffles, `mma.sync` and `ldmatrix` exchange values through per-warp scratch between two
// warp barriers. The mma and ldmatrix follow the fragment layouts of the PTX ISA (m16n8k16 with
// bf16 inputs and f32 accumulation; m8n8.x4 with and without .trans), written out independently
// of the kernels. `cp.async` copies land as late and the destination is clobbered as early as
// the hardware allows, so a missing wait or barrier shows as NaNs.
//
// This checks the kernels' logic, not the hardware: timing, memory coalescing, bank conflicts
// and the real tensor cores are for `scripts/gpu-check.sh` on a GPU.
#pragma once

#include <array>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#define DID_EMULATE 1
#define __global__
#define __device__
#define __forceinline__ inline
// Every `__shared__` array lives in one section, which `launch` fills with ones (a NaN in f32
// and bf16, −1 as an integer) before each block: shared memory starts as garbage on a GPU, so a
// kernel that reads what its block did not write sees it here too, instead of a static's zeros.
// (The section's variables are linked once, not as inline functions' weak copies: the build
// passes -fno-weak, so this header's own globals are `static`.) AddressSanitizer leaves
// variables in a named section unchecked, so a sanitized build keeps them plain statics, which
// it bounds-checks, and does without the poison.
#if defined(__SANITIZE_ADDRESS__)
#define __shared__ static
#else
#define __shared__ static __attribute__((section("emu_shared")))
#endif
extern "C" char __start_emu_shared[] __attribute__((weak));
extern "C" char __stop_emu_shared[] __attribute__((weak));
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

struct alignas(16) uint4 {
    unsigned x, y, z, w;
};

struct EmuDim3 {
    unsigned x = 0, y = 0, z = 0;
};
static thread_local EmuDim3 threadIdx, blockIdx;
static EmuDim3 blockDim, gridDim;

namespace emu {
static std::unique_ptr<std::barrier<>> block_barrier;
static std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
static std::vector<std::array<unsigned, 32 * 8>> scratch;  // per warp: 8 words per lane
struct PendingCopy {  // a cp.async not yet waited for
    void* dst;
    const void* src;
    int bytes;
};
static thread_local std::vector<PendingCopy> pending_copies;

inline int warp() { return threadIdx.x / 32; }
inline int lane() { return threadIdx.x & 31; }
inline void warp_sync() { warp_barriers[warp()]->arrive_and_wait(); }

/// Runs `kernel` over `grid` blocks of `threads` threads (a multiple of 32). The OS threads
/// stay for the whole grid and take the blocks one after another, a barrier between blocks.
inline void launch(EmuDim3 grid, unsigned threads, const std::function<void()>& kernel) {
    gridDim = EmuDim3{grid.x, grid.y, std::max(grid.z, 1u)};
    blockDim = EmuDim3{threads, 1, 1};
    const unsigned warps = threads / 32;
    block_barrier = std::make_unique<std::barrier<>>(threads);
    warp_barriers.clear();
    for (unsigned w = 0; w < warps; ++w) warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
    scratch.assign(warps, {});
    std::barrier<> between_blocks(threads);
    std::vector<std::thread> pool;
    for (unsigned t = 0; t < threads; ++t) {
        pool.emplace_back([&, t] {
            threadIdx = EmuDim3{t, 0, 0};
            for (unsigned bz = 0; bz < std::max(grid.z, 1u); ++bz) {
                for (unsigned by = 0; by < grid.y; ++by) {
                    for (unsigned bx = 0; bx < grid.x; ++bx) {
                        blockIdx = EmuDim3{bx, by, bz};
                        if (t == 0 && __start_emu_shared != nullptr)
                            std::memset(__start_emu_shared, 0xff, __stop_emu_shared - __start_emu_shared);
                        between_blocks.arrive_and_wait();
                        kernel();
                        if (!pending_copies.empty()) {
                            std::fprintf(stderr, "a thread ended its block with cp.async copies not waited for\n");
                            std::abort();
                        }
                        between_blocks.arrive_and_wait();
                    }
                }
            }
        });
    }
    for (auto& th : pool) th.join();
}
}  // namespace emu

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }

template <class T>
T __shfl_xor_sync(unsigned, T value, int offset) {
    static_assert(sizeof(T) <= 8, "two words per lane");
    auto& s = emu::scratch[emu::warp()];
    const int lane = emu::lane();
    std::memcpy(&s[lane * 8], &value, sizeof(T));
    emu::warp_sync();
    T got;
    std::memcpy(&got, &s[(lane ^ offset) * 8], sizeof(T));
    emu::warp_sync();
    return got;
}

template <class T>
T __shfl_sync(unsigned, T value, int src_lane) {
    static_assert(sizeof(T) <= 8, "two words per lane");
    auto& s = emu::scratch[emu::warp()];
    std::memcpy(&s[emu::lane() * 8], &value, sizeof(T));
    emu::warp_sync();
    T got;
    std::memcpy(&got, &s[(src_lane & 31) * 8], sizeof(T));
    emu::warp_sync();
    return got;
}

template <class T>
bool __all_sync(unsigned, T predicate) {
    auto& s = emu::scratch[emu::warp()];
    s[emu::lane() * 8] = predicate ? 1u : 0u;
    emu::warp_sync();
    bool all = true;
    for (int l = 0; l < 32; ++l) all = all && s[l * 8] != 0;
    emu::warp_sync();
    return all;
}

// ex2.approx.ftz.f32, coarse on purpose: 2^x with the two lowest mantissa bits cleared (a
// relative error up to 2⁻²¹) and results below the smallest normal flushed to 0, so a kernel
// passing here does not lean on an exact exponential.
inline float ex2_approx(float x) {
    float y = std::exp2(x);
    if (y < 1.17549435e-38f) return 0.0f;
    unsigned u;
    std::memcpy(&u, &y, 4);
    if ((u & 0x7f800000u) != 0x7f800000u) u &= ~3u;  // infinities and NaNs as they are
    std::memcpy(&y, &u, 4);
    return y;
}

// Shared-memory integer atomics (the kernels add 32-bit integers only, so the order does not matter).
inline unsigned atomicAdd(unsigned* address, unsigned value) {
    return std::atomic_ref<unsigned>(*address).fetch_add(value);
}

// cp.async (sm_80+): the copy is deferred to the thread's wait, the latest moment the hardware
// may complete it, and the destination is poisoned (all ones: a bf16 NaN) when the copy is
// issued, the earliest moment it may change: a kernel that reads a tile before waiting for it,
// or overwrites a tile another thread still reads, sees NaNs here as it would see garbage there.
inline void copy_async(void* dst, const void* src, int bytes) {
    std::memset(dst, 0xff, bytes);
    emu::pending_copies.push_back({dst, src, bytes});
}
inline void copy_async_16(void* dst, const void* src) { copy_async(dst, src, 16); }
inline void copy_async_4(void* dst, const void* src) { copy_async(dst, src, 4); }
inline void wait_copies() {
    for (const auto& c : emu::pending_copies) std::memcpy(c.dst, c.src, c.bytes);
    emu::pending_copies.clear();
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16, per the PTX ISA: lanes 8i … 8i + 7 give the
// addresses of the eight 16-byte rows of matrix i; register i of lane l receives row l / 4,
// elements 2·(l % 4) and 2·(l % 4) + 1 of matrix i, or with .trans of its transpose (elements
// [2·(l % 4)][l / 4] and [2·(l % 4) + 1][l / 4]), the lower index in the lower half.
inline void load_matrix_x4_impl(unsigned* r, const void* row, bool trans) {
    auto& s = emu::scratch[emu::warp()];
    const int lane = emu::lane();
    std::memcpy(&s[lane * 8], &row, sizeof(row));
    emu::warp_sync();
    auto row_of = [&](int owner) {
        const unsigned short* p;
        std::memcpy(&p, &s[owner * 8], sizeof(p));
        return p;
    };
    const int g = lane / 4, t = lane % 4;
    unsigned got[4];
    for (int i = 0; i < 4; ++i) {
        unsigned lo, hi;
        if (trans) {
            lo = row_of(8 * i + 2 * t)[g];
            hi = row_of(8 * i + 2 * t + 1)[g];
        } else {
            lo = row_of(8 * i + g)[2 * t];
            hi = row_of(8 * i + g)[2 * t + 1];
        }
        got[i] = lo | (hi << 16);
    }
    emu::warp_sync();
    for (int i = 0; i < 4; ++i) r[i] = got[i];
}
inline void load_matrix_x4(unsigned* r, const void* row) { load_matrix_x4_impl(r, row, false); }
inline void load_matrix_x4_trans(unsigned* r, const void* row) { load_matrix_x4_impl(r, row, true); }

inline float __int_as_float(int x) { float f; std::memcpy(&f, &x, 4); return f; }
inline float __uint_as_float(unsigned x) { float f; std::memcpy(&f, &x, 4); return f; }
inline unsigned __float_as_uint(float x) { unsigned u; std::memcpy(&u, &x, 4); return u; }
using std::max;
using std::min;

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32, D = A·B + C, per the PTX ISA's fragment
// tables: groupID = lane / 4, threadID_in_group = lane % 4.
//   A (16×16): register r holds A[groupID + 8·(r % 2)][2·tig + 8·(r / 2) + {0, 1}]
//   B (16×8):  register r holds B[2·tig + 8·r + {0, 1}][groupID]
//   C (16×8):  element e is C[groupID + 8·(e / 2)][2·tig + e % 2]
// with the lower-indexed bf16 of a pair in the lower 16 bits.
inline void mma_bf16_16816(float* c, const unsigned* a, const unsigned* b) {
    auto& s = emu::scratch[emu::warp()];
    const int lane = emu::lane();
    for (int r = 0; r < 4; ++r) s[lane * 8 + r] = a[r];
    for (int r = 0; r < 2; ++r) s[lane * 8 + 4 + r] = b[r];
    emu::warp_sync();
    auto half = [](unsigned word, int hi) { return __uint_as_float(((word >> (16 * hi)) & 0xffffu) << 16); };
    auto A = [&](int row, int col) {
        int owner = (row % 8) * 4 + (col % 8) / 2, reg = (row >= 8) + 2 * (col >= 8);
        return half(s[owner * 8 + reg], col & 1);
    };
    auto B = [&](int k, int n) {
        int owner = n * 4 + (k % 8) / 2, reg = k >= 8;
        return half(s[owner * 8 + 4 + reg], k & 1);
    };
    const int g = lane / 4, t = lane % 4;
    float d[4];
    for (int e = 0; e < 4; ++e) {
        int row = g + 8 * (e / 2), col = 2 * t + e % 2;
        float sum = c[e];
        for (int k = 0; k < 16; ++k) sum += A(row, k) * B(k, col);
        d[e] = sum;
    }
    emu::warp_sync();
    for (int e = 0; e < 4; ++e) c[e] = d[e];
}
