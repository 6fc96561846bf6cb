// Masked multi-head attention, forward and backward, with no L × L matrix in
// memory: one warp per (sequence, head, query) walks only the key ranges the
// mask allows (online softmax), and the backward recomputes probabilities from
// the saved log-sum-exp. dK and dV come from a second kernel with one warp per
// key, so nothing is accumulated with atomics and results are deterministic.
// Gradients are written (not accumulated) laid out like their inputs (dq like q, dk
// like k, dv like v: the shape's strides), so a fused qkv input gets one fused
// gradient and nobody zeroes it first.
// Lane j of a warp holds channels j, j + 32, … of the head (head_dim ≤ 256).
//
// The mask arrives as did_core::mask::AttentionMask flattened: kind 0 =
// Bd3Training {p0 = seq_len, p1 = block}, 1 = BlockCausal {p0 = block,
// p1 = query_offset, p2 = key_offset}, 2 = Full, 3 = Causal {p1 = query_offset,
// p2 = key_offset}; window < 0 means none.

#define MAX_PER_LANE 8

// A query row's keys: [a0, a1) ∪ [b0, b1). In i64 for the correctness-first kernels; in 32 bits
// (`Ranges32`, the host keeps lengths below 2³¹) for the flash kernels, where an i64 division is
// a subroutine call whose register convention costs spills inside their loops.
template <class T> struct KeyRanges { T a0, a1, b0, b1; };
typedef KeyRanges<i64> Ranges;
typedef KeyRanges<int> Ranges32;

template <class T> __device__ __forceinline__ T sat_sub(T a, T b) { return a > b ? a - b : 0; }

template <class T>
__device__ KeyRanges<T> key_ranges(int kind, T p0, T p1, T p2, T window, T q, T kv_len) {
    KeyRanges<T> r; r.a0 = 0; r.a1 = 0; r.b0 = 0; r.b1 = 0;
    if (kind == 0) {
        T l = p0, b = p1;
        if (q < l) {
            T blk = q / b;
            r.a0 = blk * b; r.a1 = min((blk + 1) * b, l);
            r.b0 = l; r.b1 = l + blk * b;
        } else {
            T blk = (q - l) / b;
            r.a0 = l; r.a1 = l + min((blk + 1) * b, l);
        }
    } else if (kind == 2) {
        r.a1 = kv_len;
    } else {
        T end = kind == 1 ? ((p1 + q) / p0 + 1) * p0 : p1 + q + 1;
        T start = window >= 0 ? sat_sub(end, window) : 0;
        r.a0 = sat_sub(start, p2); r.a1 = sat_sub(end, p2);
    }
    r.a0 = min(r.a0, kv_len); r.a1 = min(r.a1, kv_len);
    r.b0 = min(r.b0, kv_len); r.b1 = min(r.b1, kv_len);
    return r;
}

struct Shape {
    i64 batch, heads, head_dim, q_len, kv_len, q_stride, k_stride, v_stride, q_batch_stride, kv_batch_stride;
};

__device__ __forceinline__ float dot_lanes(const float* a, const store_t* b, int lane, i64 hd) {
    float s = 0.0f;
    for (int j = 0; j < MAX_PER_LANE; ++j) { i64 d = lane + 32 * j; if (d < hd) s += a[j] * ld(b, d); }
    return warp_sum(s);
}

extern "C" __global__ void attention_forward(Shape s, int kind, i64 p0, i64 p1, i64 p2, i64 window, float scale,
                                             const store_t* q, const store_t* k, const store_t* v, store_t* out, float* lse) {
    i64 gw = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (gw >= s.batch * s.heads * s.q_len) return;
    i64 qi = gw % s.q_len, h = (gw / s.q_len) % s.heads, b = gw / (s.q_len * s.heads);
    i64 hd = s.head_dim, width = s.heads * hd;
    const store_t* qp = q + b * s.q_batch_stride + qi * s.q_stride + h * hd;
    const store_t* kb = k + b * s.kv_batch_stride + h * hd;
    const store_t* vb = v + b * s.kv_batch_stride + h * hd;
    float qr[MAX_PER_LANE], acc[MAX_PER_LANE];
    for (int j = 0; j < MAX_PER_LANE; ++j) { i64 d = lane + 32 * j; qr[j] = d < hd ? ld(qp, d) : 0.0f; acc[j] = 0.0f; }
    const float neg_inf = -__int_as_float(0x7f800000);
    float m = neg_inf, l = 0.0f;
    Ranges r = key_ranges(kind, p0, p1, p2, window, qi, s.kv_len);
    for (int part = 0; part < 2; ++part) {
        i64 k0 = part ? r.b0 : r.a0, k1 = part ? r.b1 : r.a1;
        for (i64 key = k0; key < k1; ++key) {
            float sc = dot_lanes(qr, kb + key * s.k_stride, lane, hd) * scale;
            float m_new = fmaxf(m, sc);
            float corr = (m == neg_inf) ? 0.0f : expf(m - m_new);
            float p = expf(sc - m_new);
            l = l * corr + p;
            const store_t* vp = vb + key * s.v_stride;
            for (int j = 0; j < MAX_PER_LANE; ++j) { i64 d = lane + 32 * j; if (d < hd) acc[j] = acc[j] * corr + p * ld(vp, d); }
            m = m_new;
        }
    }
    i64 o = b * s.q_len * width + qi * width + h * hd;
    for (int j = 0; j < MAX_PER_LANE; ++j) { i64 d = lane + 32 * j; if (d < hd) st(out, o + d, l > 0.0f ? acc[j] / l : 0.0f); }
    if (lane == 0) lse[(b * s.heads + h) * s.q_len + qi] = l > 0.0f ? m + logf(l) : neg_inf;
}

// dQ, and delta = rowsum(dO ∘ O) per (sequence, head, query) for the dK/dV kernel.
extern "C" __global__ void attention_backward_dq(Shape s, int kind, i64 p0, i64 p1, i64 p2, i64 window, float scale,
                                                 const store_t* dout, const store_t* q, const store_t* k, const store_t* v,
                                                 const store_t* out, const float* lse, store_t* dq, float* delta) {
    i64 gw = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (gw >= s.batch * s.heads * s.q_len) return;
    i64 qi = gw % s.q_len, h = (gw / s.q_len) % s.heads, b = gw / (s.q_len * s.heads);
    i64 hd = s.head_dim, width = s.heads * hd;
    i64 o = b * s.q_len * width + qi * width + h * hd;
    const store_t* qp = q + b * s.q_batch_stride + qi * s.q_stride + h * hd;
    const store_t* kb = k + b * s.kv_batch_stride + h * hd;
    const store_t* vb = v + b * s.kv_batch_stride + h * hd;
    float qr[MAX_PER_LANE], dor[MAX_PER_LANE], g[MAX_PER_LANE];
    float dd = 0.0f;
    for (int j = 0; j < MAX_PER_LANE; ++j) {
        i64 d = lane + 32 * j;
        qr[j] = d < hd ? ld(qp, d) : 0.0f;
        dor[j] = d < hd ? ld(dout, o + d) : 0.0f;
        dd += d < hd ? dor[j] * ld(out, o + d) : 0.0f;
        g[j] = 0.0f;
    }
    dd = warp_sum(dd);
    i64 li = (b * s.heads + h) * s.q_len + qi;
    if (lane == 0) delta[li] = dd;
    float lq = lse[li];
    const bool sees_none = lq == -__int_as_float(0x7f800000);  // no key: a zero gradient
    Ranges r = key_ranges(kind, p0, p1, p2, window, qi, s.kv_len);
    for (int part = 0; part < 2 && !sees_none; ++part) {
        i64 k0 = part ? r.b0 : r.a0, k1 = part ? r.b1 : r.a1;
        for (i64 key = k0; key < k1; ++key) {
            const store_t* kp = kb + key * s.k_stride;
            float p = expf(dot_lanes(qr, kp, lane, hd) * scale - lq);
            float dp = dot_lanes(dor, vb + key * s.v_stride, lane, hd);
            float ds = p * (dp - dd) * scale;
            for (int j = 0; j < MAX_PER_LANE; ++j) { i64 d = lane + 32 * j; if (d < hd) g[j] += ds * ld(kp, d); }
        }
    }
    const i64 oq = b * s.q_batch_stride + qi * s.q_stride + h * hd;  // dq is laid out like q
    for (int j = 0; j < MAX_PER_LANE; ++j) { i64 d = lane + 32 * j; if (d < hd) st(dq, oq + d, g[j]); }
}

// dK and dV: one warp per (sequence, head, key) over the queries that see it.
extern "C" __global__ void attention_backward_dkv(Shape s, int kind, i64 p0, i64 p1, i64 p2, i64 window, float scale,
                                                  const store_t* dout, const store_t* q, const store_t* k, const store_t* v,
                                                  const float* lse, const float* delta, store_t* dk, store_t* dv) {
    i64 gw = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (gw >= s.batch * s.heads * s.kv_len) return;
    i64 ki = gw % s.kv_len, h = (gw / s.kv_len) % s.heads, b = gw / (s.kv_len * s.heads);
    i64 hd = s.head_dim, width = s.heads * hd;
    const store_t* kp = k + b * s.kv_batch_stride + ki * s.k_stride + h * hd;
    const store_t* vp = v + b * s.kv_batch_stride + ki * s.v_stride + h * hd;
    float kr[MAX_PER_LANE], vr[MAX_PER_LANE], gk[MAX_PER_LANE], gv[MAX_PER_LANE];
    for (int j = 0; j < MAX_PER_LANE; ++j) {
        i64 d = lane + 32 * j;
        kr[j] = d < hd ? ld(kp, d) : 0.0f;
        vr[j] = d < hd ? ld(vp, d) : 0.0f;
        gk[j] = 0.0f; gv[j] = 0.0f;
    }
    for (i64 qi = 0; qi < s.q_len; ++qi) {
        Ranges r = key_ranges(kind, p0, p1, p2, window, qi, s.kv_len);
        bool seen = (ki >= r.a0 && ki < r.a1) || (ki >= r.b0 && ki < r.b1);
        if (!seen) continue;
        i64 li = (b * s.heads + h) * s.q_len + qi;
        const store_t* qp = q + b * s.q_batch_stride + qi * s.q_stride + h * hd;
        const store_t* dop = dout + b * s.q_len * width + qi * width + h * hd;
        float p = expf(dot_lanes(kr, qp, lane, hd) * scale - lse[li]);
        float dp = dot_lanes(vr, dop, lane, hd);
        float ds = p * (dp - delta[li]) * scale;
        for (int j = 0; j < MAX_PER_LANE; ++j) {
            i64 d = lane + 32 * j;
            if (d < hd) { gv[j] += p * ld(dop, d); gk[j] += ds * ld(qp, d); }
        }
    }
    const i64 ok = b * s.kv_batch_stride + ki * s.k_stride + h * hd, ov = b * s.kv_batch_stride + ki * s.v_stride + h * hd;
    for (int j = 0; j < MAX_PER_LANE; ++j) {
        i64 d = lane + 32 * j;
        if (d < hd) { st(dk, ok + d, gk[j]); st(dv, ov + d, gv[j]); }
    }
}

// ---- Flash attention (bf16 storage, head_dim 64) ------------------------------------------------
// One block of 4 warps per (sequence, head, 64 rows) — the forward's blocks have fewer where there
// are fewer queries (one warp for a draft's 4-token block, not one and three idle ones, which still
// loaded every tile and ran every product); each warp owns 16 rows and walks 64-wide
// tiles of the other side, visiting only tiles the mask's ranges reach (the BD3 training mask at
// block 4 leaves about three quarters of them empty); inside a visited tile the exact per-pair
// predicate applies, and only where some row of the warp does not see the whole tile. Every
// product is a 16×64 · 64×64 on tensor cores (mma.m16n8k16, bf16 in, f32 accumulate); softmax
// statistics stay in f32.
//
// Tiles are double-buffered: while a block computes on one tile, the next visited tile is on its
// way into the other buffer (cp.async, global → shared without passing through registers), so
// the memory latency of a tile hides behind the products of the one before, with one barrier a
// tile. Tiles sit row-major in shared memory; the B fragments of the products come from
// ldmatrix — plain for products with the tile's rows (S = Q·Kᵀ), transposed for products with
// the tile itself (O += P·V) — four 32-bit registers, two mmas' worth, per instruction.
//   forward:      S = Q·Kᵀ, online softmax, O += P·V; writes what attention_forward writes.
//   backward dq:  per query tile, S and dP = dO·Vᵀ, dS = P ∘ (dP − δ), dQ += dS·K; writes δ.
//   backward dkv: per key tile, Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ, dV += Pᵀ·dO, dK += dSᵀ·Q.
// As in the correctness-first kernels, nothing is accumulated with atomics.
#if defined(STORAGE_BF16) && (!defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800)
#define FLASH_TILE 64
#define FLASH_HD 64
#define FLASH_PAD (FLASH_HD + 8)  // row stride in shared memory (144 bytes): ldmatrix rows on distinct banks
#define FLASH_DKV_TILES 1024      // query tiles the dK/dV kernel sorts out before its loop (65,536 queries)

#ifndef DID_EMULATE
// D = A·B + D for one 16×8 tile, K = 16 (PTX ISA, "Matrix fragments for mma.m16n8k16"):
// with g = lane / 4 and t = lane % 4, a = {A[g][2t..], A[g+8][2t..], A[g][2t+8..], A[g+8][2t+8..]},
// b = {B[2t..][g], B[2t+8..][g]}, c = {C[g][2t], C[g][2t+1], C[g+8][2t], C[g+8][2t+1]}; each
// 32-bit register of a and b holds two bf16, the lower index in the lower half.
__device__ __forceinline__ void mma_bf16_16816(float* c, const unsigned* a, const unsigned* b) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// 2^x in one MUFU.EX2 (ex2.approx.ftz.f32: approximate — P is rounded to bf16, 2⁻⁸, right
// after — and results below 2⁻¹²⁶ flushed to 0); the emulation has its own, coarse on purpose.
__device__ __forceinline__ float ex2_approx(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// Two f32 rounded to bf16 (nearest even) in one register, the lower index in the lower half:
// one cvt (F2FP) where to_store's rounding in integer arithmetic takes about six instructions a
// value. For P and dS, which only feed mmas; a NaN comes out as the canonical one.
__device__ __forceinline__ unsigned pack2_rounded(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ unsigned shared_address(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }

// Four 8×8 bf16 matrices from shared memory, lanes 8i … 8i + 7 giving the rows of matrix i:
// register i of lane l gets row l / 4, elements 2·(l % 4) and 2·(l % 4) + 1 of matrix i (PTX
// ISA, ldmatrix); `_trans` gets the same of its transpose.
__device__ __forceinline__ void load_matrix_x4(unsigned* r, const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_address(row))
                 : "memory");
}
__device__ __forceinline__ void load_matrix_x4_trans(unsigned* r, const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_address(row))
                 : "memory");
}

// Global → shared copies that bypass registers (cp.async): issued now, complete by wait_copies().
__device__ __forceinline__ void copy_async_16(void* dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(shared_address(dst)), "l"(src) : "memory");
}
__device__ __forceinline__ void copy_async_4(void* dst, const void* src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(shared_address(dst)), "l"(src) : "memory");
}
__device__ __forceinline__ void wait_copies() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }
#endif

__device__ __forceinline__ unsigned pack2(store_t lo, store_t hi) { return (unsigned)lo | ((unsigned)hi << 16); }
#ifdef DID_EMULATE
__device__ __forceinline__ unsigned pack2_rounded(float lo, float hi) { return pack2(to_store(lo), to_store(hi)); }
#endif

// Row `row`'s key ranges in 32 bits; none for rows past the end.
__device__ __forceinline__ Ranges32 row_ranges(const Shape& s, int kind, i64 p0, i64 p1, i64 p2, i64 window, i64 row) {
    Ranges32 r; r.a0 = 0; r.a1 = 0; r.b0 = 0; r.b1 = 0;
    if (row < s.q_len) r = key_ranges<int>(kind, (int)p0, (int)p1, (int)p2, (int)window, (int)row, (int)s.kv_len);
    return r;
}

// Bitwise, not short-circuit: a select per score, no branch.
__device__ __forceinline__ bool in_ranges(const Ranges32& r, int key) {
    return ((key >= r.a0) & (key < r.a1)) | ((key >= r.b0) & (key < r.b1));
}

// A warp's 16 rows (from row0, of `rows`) × 64 columns of a row-major matrix in global memory
// as the A fragments of the four 16-wide slices of the head; rows past the end are zeros.
__device__ __forceinline__ void load_rows_as_a(unsigned (*a)[4], const store_t* base, i64 stride, i64 row0, i64 rows,
                                               int g, int t) {
    for (int kk = 0; kk < 4; ++kk) {
        for (int r = 0; r < 4; ++r) {
            i64 row = row0 + g + 8 * (r & 1);
            const store_t* p = base + row * stride + kk * 16 + 2 * t + 8 * (r >> 1);
            a[kk][r] = row < rows ? pack2(p[0], p[1]) : 0u;
        }
    }
}

// Starts moving rows row0 … row0 + 63 of a row-major [*, 64] matrix in global memory (zeros
// past `rows`) into a shared tile; the caller waits (wait_copies) and syncs before reading it.
// Eight threads take a row's 128 bytes, 16 each, with cp.async where rows are 16-byte aligned
// (the fused qkv rows are); otherwise with plain loads, issued four at a time before any store
// (a loop that stores each value as it arrives waits a memory latency per value: the compiler
// cannot tell the store from the next load's address).
__device__ __forceinline__ void start_tile_load(store_t* tile, const store_t* base, i64 stride, i64 row0, i64 rows) {
    const int chunks = FLASH_TILE * FLASH_HD / 8;
    const uint4 zero = {0u, 0u, 0u, 0u};
    if ((((unsigned long long)base) & 15) == 0 && (stride & 7) == 0) {
        for (int i = threadIdx.x; i < chunks; i += blockDim.x) {
            const int r = i >> 3, c = (i & 7) * 8;
            store_t* dst = tile + r * FLASH_PAD + c;
            if (row0 + r < rows) copy_async_16(dst, base + (row0 + r) * stride + c);
            else *as_vector_mut(dst) = zero;
        }
        return;
    }
    for (int first = threadIdx.x; first < chunks; first += 4 * blockDim.x) {
        uint4 u[4];
UNROLL
        for (int j = 0; j < 4; ++j) {
            const int i = first + j * blockDim.x, r = i >> 3, c = (i & 7) * 8;
            u[j] = zero;
            if (i < chunks && row0 + r < rows) {
                const store_t* p = base + (row0 + r) * stride + c;
                u[j].x = pack2(p[0], p[1]); u[j].y = pack2(p[2], p[3]);
                u[j].z = pack2(p[4], p[5]); u[j].w = pack2(p[6], p[7]);
            }
        }
UNROLL
        for (int j = 0; j < 4; ++j) {
            const int i = first + j * blockDim.x;
            if (i < chunks) *as_vector_mut(tile + (i >> 3) * FLASH_PAD + (i & 7) * 8) = u[j];
        }
    }
}

// Starts key tile `tile`'s keys into `ks` and values into `vs` (start_tile_load for both).
__device__ __forceinline__ void start_key_tile_load(store_t* ks, store_t* vs, const store_t* kb, const store_t* vb,
                                                    const Shape& s, int tile) {
    start_tile_load(ks, kb, s.k_stride, tile * FLASH_TILE, s.kv_len);
    start_tile_load(vs, vb, s.v_stride, tile * FLASH_TILE, s.kv_len);
}

// c[n] = A · rowsᵀ for the warp's 16 rows against 8·N rows of a tile (N 16×8 outputs): the
// tile's rows are the columns of B, so B's fragments are plain ldmatrix rows — matrices
// (rows n·8 …, columns 32j, 32j + 8, 32j + 16, 32j + 24) give the b of k-slices 2j and 2j + 1.
template <int N>
__device__ __forceinline__ void product_with_rows(float (*c)[4], const unsigned (*a)[4], const store_t* rows, int lane) {
    const int m = lane >> 3;
    for (int n = 0; n < N; ++n) {
        for (int e = 0; e < 4; ++e) c[n][e] = 0.0f;
        const store_t* row = rows + (n * 8 + (lane & 7)) * FLASH_PAD + (m >> 1) * 16 + (m & 1) * 8;
        for (int j = 0; j < 2; ++j) {
            unsigned b[4];
            load_matrix_x4(b, row + j * 32);
            mma_bf16_16816(c[n], a[2 * j], b);
            mma_bf16_16816(c[n], a[2 * j + 1], b + 2);
        }
    }
}

// acc += X · rows, X the 16 × 16·J f32 accumulators of a product_with_rows<2·J> (rounded to
// bf16) and `rows` the 16·J tile rows it was taken against: an accumulator's layout is the A
// layout of the next product, 16 columns at a time. B = the rows themselves (k = the row), so its
// fragments are transposed ldmatrix rows — matrices (rows 16j, 16j + 8 × columns 16e, 16e + 8)
// give the b of column groups 2e and 2e + 1.
template <int J>
__device__ __forceinline__ void accumulate_times_rows(float (*acc)[4], const float (*x)[4], const store_t* rows,
                                                      int lane) {
    const int m = lane >> 3;
    for (int j = 0; j < J; ++j) {
        unsigned a[4] = {pack2_rounded(x[2 * j][0], x[2 * j][1]), pack2_rounded(x[2 * j][2], x[2 * j][3]),
                         pack2_rounded(x[2 * j + 1][0], x[2 * j + 1][1]),
                         pack2_rounded(x[2 * j + 1][2], x[2 * j + 1][3])};
        const store_t* row = rows + (j * 16 + (m & 1) * 8 + (lane & 7)) * FLASH_PAD + (m >> 1) * 8;
        for (int e = 0; e < 4; ++e) {
            unsigned b[4];
            load_matrix_x4_trans(b, row + e * 16);
            mma_bf16_16816(acc[2 * e], a, b);
            mma_bf16_16816(acc[2 * e + 1], a, b + 2);
        }
    }
}

// Whether a row sees any key of [k0, k0 + 64).
__device__ __forceinline__ bool reaches_tile(const Ranges32& r, int k0) {
    const int k1 = k0 + FLASH_TILE;
    return (r.a0 < k1 && r.a1 > k0 && r.a1 > r.a0) || (r.b0 < k1 && r.b1 > k0 && r.b1 > r.b0);
}

// Whether keys [k0, k0 + 64) all lie in one of a row's ranges (and exist): then no score of the
// tile needs the mask test.
__device__ __forceinline__ bool sees_whole_tile(const Ranges32& r, int k0, int kv_len) {
    const int k1 = k0 + FLASH_TILE;
    return k1 <= kv_len && ((r.a0 <= k0 && r.a1 >= k1) || (r.b0 <= k0 && r.b1 >= k1));
}

// Scores of the warp's tile that its rows' masks hide become −∞ (then 2^−∞ = 0 in the softmax and
// in P): keys k0 + 8n + 2t + (e % 2) against row g + 8·(e / 2)'s ranges. Called only on tiles that
// some row of the warp sees in part, so the common whole tile has no test per score.
template <int N>
__device__ __forceinline__ void hide_unseen_scores(float (*sc)[4], const Ranges32* rr, int k0, int t) {
    const float neg_inf = -__int_as_float(0x7f800000);
    for (int n = 0; n < N; ++n) {
        for (int e = 0; e < 4; ++e) {
            if (!in_ranges(rr[e >> 1], k0 + n * 8 + 2 * t + (e & 1))) sc[n][e] = neg_inf;
        }
    }
}

// The softmax in base 2: e^(x·scale − λ) = 2^(x·scale·log₂e − λ·log₂e), so a probability is one
// FFMA and one EX2 from a raw score. A log-sum-exp λ of −∞ (a row that sees no key) becomes +∞,
// so its probabilities are 2^−∞ = 0 without a test per score.
#define LOG2E 1.4426950408889634f
__device__ __forceinline__ float lse_in_base_2(float lse) {
    return lse == -__int_as_float(0x7f800000) ? __int_as_float(0x7f800000) : lse * LOG2E;
}

// Whether no row of the warp needs the mask on key tile [k0, k0 + 64): each of this thread's two
// rows (q0 + g, q0 + g + 8) sees the whole tile or lies past the queries — padding rows (12 of a
// draft's 16) are never written, so their scores need no mask, and counting them as partial
// would send every tile of a draft down the masked path. The same for the whole warp.
__device__ __forceinline__ bool warp_sees_whole_tile(const Ranges32* rr, i64 q0, int g, const Shape& s, int k0) {
    const bool whole = (q0 + g >= s.q_len || sees_whole_tile(rr[0], k0, (int)s.kv_len)) &&
                       (q0 + g + 8 >= s.q_len || sees_whole_tile(rr[1], k0, (int)s.kv_len));
    return __all_sync(0xffffffffu, whole);
}

// This thread's query rows (g and g + 8 of its warp's 16) and their key ranges, and the hull of
// the whole block's ranges ({lowest a start, highest a end, lowest b start, highest b end}): key
// tiles outside it are empty for every row of the block. Contains a __syncthreads.
__device__ __forceinline__ void query_ranges(const Shape& s, int kind, i64 p0, i64 p1, i64 p2, i64 window, i64 q0, int g,
                                             Ranges32* rr, int* hull_out) {
    __shared__ int hull[4][4];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int i = 0; i < 2; ++i) rr[i] = row_ranges(s, kind, p0, p1, p2, window, q0 + g + 8 * i);
    int lo_a = 0x7fffffff, hi_a = 0, lo_b = 0x7fffffff, hi_b = 0;
    for (int i = 0; i < 2; ++i) {
        if (rr[i].a1 > rr[i].a0) { lo_a = min(lo_a, rr[i].a0); hi_a = max(hi_a, rr[i].a1); }
        if (rr[i].b1 > rr[i].b0) { lo_b = min(lo_b, rr[i].b0); hi_b = max(hi_b, rr[i].b1); }
    }
    for (int o = 16; o > 0; o >>= 1) {
        lo_a = min(lo_a, __shfl_xor_sync(0xffffffffu, lo_a, o));
        hi_a = max(hi_a, __shfl_xor_sync(0xffffffffu, hi_a, o));
        lo_b = min(lo_b, __shfl_xor_sync(0xffffffffu, lo_b, o));
        hi_b = max(hi_b, __shfl_xor_sync(0xffffffffu, hi_b, o));
    }
    if (lane == 0) { hull[warp][0] = lo_a; hull[warp][1] = hi_a; hull[warp][2] = lo_b; hull[warp][3] = hi_b; }
    __syncthreads();
    for (int w = 0; w < (int)(blockDim.x >> 5); ++w) {
        lo_a = min(lo_a, hull[w][0]); hi_a = max(hi_a, hull[w][1]);
        lo_b = min(lo_b, hull[w][2]); hi_b = max(hi_b, hull[w][3]);
    }
    hull_out[0] = lo_a; hull_out[1] = hi_a; hull_out[2] = lo_b; hull_out[3] = hi_b;
}

// The flash kernels' grid is (sequences × heads, row tiles): blocks start in the order of their
// linear index, so every (sequence, head) starts its y-th tile together, and the tiles are taken
// longest first — the GPU's last blocks are short ones, instead of the last (sequence, head)'s
// longest tile starting at the end and running alone. Under a causal mask a query tile's work
// grows with its index and a key tile's shrinks; under the BD3 training mask the same holds
// within each half of x_t ⊕ x_0 (the dK/dV kernel's x_t key tiles, seen by their own block
// only, come first and are short). So the query kernels take their tiles from the last, the
// dK/dV kernel from the first; a full mask gives every tile the same work.
__device__ __forceinline__ i64 query_block_longest_first() { return (i64)(gridDim.y - 1 - blockIdx.y); }

// The first key tile of [tile, end) that meets the block's hull (`end` when none does): the
// same for every thread of the block.
__device__ __forceinline__ int next_tile_in_hull(const int* hull, int tile, int end) {
    for (; tile < end; ++tile) {
        const int k0 = tile * FLASH_TILE, k1 = k0 + FLASH_TILE;
        if ((k0 < hull[1] && k1 > hull[0]) || (k0 < hull[3] && k1 > hull[2])) break;
    }
    return tile;
}

// With gridDim.z > 1 the key tiles are split between blocks (flash-decoding): block z visits tiles
// [z·tiles_per_split, (z + 1)·tiles_per_split) and leaves its rows' output, normalised over its
// own keys, and their log-sum-exp in `partial_out` / `partial_lse` (f32, split-major) for
// attention_combine_splits. A draft call has one query tile a (sequence, head): at batch 1 that is
// 12 blocks on a GPU of 132 SMs, each walking the whole KV cache a tile after another.
extern "C" __global__ void __launch_bounds__(128, 3) attention_forward_flash(Shape s, int kind, i64 p0, i64 p1, i64 p2, i64 window, float scale,
                                                   const store_t* q, const store_t* k, const store_t* v, store_t* out,
                                                   float* lse, int tiles_per_split, float* partial_out,
                                                   float* partial_lse) {
    __shared__ __align__(16) store_t ks[2][FLASH_TILE * FLASH_PAD];  // K tiles, row-major, double-buffered
    __shared__ __align__(16) store_t vs[2][FLASH_TILE * FLASH_PAD];  // V tiles
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const i64 h = blockIdx.x % s.heads, b = blockIdx.x / s.heads;
    const i64 q0 = (query_block_longest_first() * (blockDim.x >> 5) + warp) * 16;  // 1–4 warps of 16 rows
    const i64 width = s.heads * FLASH_HD;
    const float neg_inf = -__int_as_float(0x7f800000), scale2 = scale * LOG2E;
    const store_t* kb = k + b * s.kv_batch_stride + h * FLASH_HD;
    const store_t* vb = v + b * s.kv_batch_stride + h * FLASH_HD;

    Ranges32 rr[2];
    int hull[4];
    query_ranges(s, kind, p0, p1, p2, window, q0, g, rr, hull);
    unsigned qa[4][4];
    load_rows_as_a(qa, q + b * s.q_batch_stride + h * FLASH_HD, s.q_stride, q0, s.q_len, g, t);
    float acc[8][4];
    for (int d = 0; d < 8; ++d) for (int e = 0; e < 4; ++e) acc[d][e] = 0.0f;
    float m[2] = {neg_inf, neg_inf}, l[2] = {0.0f, 0.0f};

    const int tiles = (int)((s.kv_len + FLASH_TILE - 1) / FLASH_TILE);
    const int first = (int)blockIdx.z * tiles_per_split, end = min(tiles, first + tiles_per_split);
    int tile = next_tile_in_hull(hull, first, end);
    if (tile < end) start_key_tile_load(ks[0], vs[0], kb, vb, s, tile);
    for (int buf = 0; tile < end; buf ^= 1) {
        wait_copies();
        __syncthreads();  // this tile is in for every thread, and every thread is done with the other buffer
        const int k0 = tile * FLASH_TILE, next = next_tile_in_hull(hull, tile + 1, end);
        if (next < end) start_key_tile_load(ks[buf ^ 1], vs[buf ^ 1], kb, vb, s, next);

        float sc[8][4];
        product_with_rows<8>(sc, qa, ks[buf], lane);
        if (!warp_sees_whole_tile(rr, q0, g, s, k0)) hide_unseen_scores<8>(sc, rr, k0, t);
        // Online softmax per row (the four threads of a group share a row), in base 2 with the
        // scale folded into the exponent: a score costs a max, an FFMA, an EX2 and an add.
        float corr[2];
        for (int i = 0; i < 2; ++i) {
            float mx = neg_inf;
            for (int n = 0; n < 8; ++n) mx = fmaxf(mx, fmaxf(sc[n][2 * i], sc[n][2 * i + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float m_new = fmaxf(m[i], mx);
            // −∞ while the row has seen no key: subtracting 0 then leaves its scores at −∞ (2^−∞ = 0).
            const float base = m_new == neg_inf ? 0.0f : m_new * scale2;
            corr[i] = ex2_approx(m[i] * scale2 - base);  // 0 while m was −∞
            float sum = 0.0f;
            for (int n = 0; n < 8; ++n) {
                for (int e = 2 * i; e < 2 * i + 2; ++e) {
                    sc[n][e] = ex2_approx(fmaf(sc[n][e], scale2, -base));
                    sum += sc[n][e];
                }
            }
            l[i] = l[i] * corr[i] + sum;
            m[i] = m_new;
        }
        for (int d = 0; d < 8; ++d) {
            acc[d][0] *= corr[0]; acc[d][1] *= corr[0];
            acc[d][2] *= corr[1]; acc[d][3] *= corr[1];
        }
        accumulate_times_rows<4>(acc, sc, vs[buf], lane);
        tile = next;
    }
    for (int i = 0; i < 2; ++i) {
        l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
        l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
    }
    const i64 rows = s.batch * s.heads * s.q_len;
    for (int i = 0; i < 2; ++i) {
        i64 row = q0 + g + 8 * i;
        if (row >= s.q_len) continue;
        const i64 r = (b * s.heads + h) * s.q_len + row;  // the log-sum-exp's index
        const float row_lse = l[i] > 0.0f ? m[i] * scale + logf(l[i]) : neg_inf;  // m is a raw score
        if (partial_out) {  // one split of the keys: f32 partials, joined by attention_combine_splits
            const i64 pr = (i64)blockIdx.z * rows + r;
            for (int d = 0; d < 8; ++d) {
                for (int e = 2 * i; e < 2 * i + 2; ++e) {
                    partial_out[pr * FLASH_HD + d * 8 + 2 * t + (e & 1)] = l[i] > 0.0f ? acc[d][e] / l[i] : 0.0f;
                }
            }
            if (t == 0) partial_lse[pr] = row_lse;
            continue;
        }
        i64 o = b * s.q_len * width + row * width + h * FLASH_HD;
        for (int d = 0; d < 8; ++d) {
            for (int e = 2 * i; e < 2 * i + 2; ++e) {
                st(out, o + d * 8 + 2 * t + (e & 1), l[i] > 0.0f ? acc[d][e] / l[i] : 0.0f);
            }
        }
        if (t == 0) lse[r] = row_lse;
    }
}

// Joins the key splits of attention_forward_flash: split z left each row's output normalised over
// its keys, O_z, and their log-sum-exp λ_z (−∞ for a split that saw none); the row's output is
// Σ_z e^(λ_z − λ) O_z with λ = log Σ_z e^λ_z, its log-sum-exp λ. Written as the unsplit kernel
// writes them. One warp a (sequence, head, query) row, two channels a lane, splits in order.
extern "C" __global__ void attention_combine_splits(Shape s, int splits, const float* partial_out,
                                                    const float* partial_lse, store_t* out, float* lse) {
    const i64 rows = s.batch * s.heads * s.q_len;
    const i64 r = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (r >= rows) return;
    const float neg_inf = -__int_as_float(0x7f800000);
    float top = neg_inf;
    for (int z = 0; z < splits; ++z) top = fmaxf(top, partial_lse[z * rows + r]);
    float total = 0.0f, o0 = 0.0f, o1 = 0.0f;
    if (top != neg_inf) {
        for (int z = 0; z < splits; ++z) {
            const float w = expf(partial_lse[z * rows + r] - top);  // 0 for a split that saw no key
            const float* p = partial_out + (z * rows + r) * FLASH_HD + 2 * lane;
            total += w;
            o0 += w * p[0];
            o1 += w * p[1];
        }
    }
    const i64 qi = r % s.q_len, bh = r / s.q_len, h = bh % s.heads, b = bh / s.heads;
    const i64 o = b * s.q_len * s.heads * FLASH_HD + qi * s.heads * FLASH_HD + h * FLASH_HD + 2 * lane;
    st(out, o, total > 0.0f ? o0 / total : 0.0f);
    st(out, o + 1, total > 0.0f ? o1 / total : 0.0f);
    if (lane == 0) lse[r] = total > 0.0f ? top + logf(total) : neg_inf;
}

// dQ for a tile of 64 queries, and δ = rowsum(dO ∘ O) of its rows for the dK/dV kernel.
extern "C" __global__ void __launch_bounds__(128, 3) attention_backward_flash_dq(Shape s, int kind, i64 p0, i64 p1, i64 p2, i64 window,
                                                       float scale, const store_t* dout, const store_t* q,
                                                       const store_t* k, const store_t* v, const store_t* out,
                                                       const float* lse, store_t* dq, float* delta) {
    __shared__ __align__(16) store_t ks[2][FLASH_TILE * FLASH_PAD];  // K tiles, row-major, double-buffered
    __shared__ __align__(16) store_t vs[2][FLASH_TILE * FLASH_PAD];  // V tiles
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const i64 h = blockIdx.x % s.heads, b = blockIdx.x / s.heads;
    const i64 q0 = query_block_longest_first() * FLASH_TILE + warp * 16;
    const i64 width = s.heads * FLASH_HD;
    const float neg_inf = -__int_as_float(0x7f800000);
    const store_t* dob = dout + b * s.q_len * width + h * FLASH_HD;
    const store_t* ob = out + b * s.q_len * width + h * FLASH_HD;
    const store_t* kb = k + b * s.kv_batch_stride + h * FLASH_HD;
    const store_t* vb = v + b * s.kv_batch_stride + h * FLASH_HD;

    Ranges32 rr[2];
    int hull[4];
    query_ranges(s, kind, p0, p1, p2, window, q0, g, rr, hull);
    const int tiles = (int)((s.kv_len + FLASH_TILE - 1) / FLASH_TILE);
    int tile = next_tile_in_hull(hull, 0, tiles);
    if (tile < tiles) start_key_tile_load(ks[0], vs[0], kb, vb, s, tile);  // on its way while the rows below load
    unsigned qa[4][4], da[4][4];
    load_rows_as_a(qa, q + b * s.q_batch_stride + h * FLASH_HD, s.q_stride, q0, s.q_len, g, t);
    load_rows_as_a(da, dob, width, q0, s.q_len, g, t);
    // δ and the log-sum-exp (in base 2) of rows g and g + 8; the four threads of a group split the columns.
    const float scale2 = scale * LOG2E;
    float dl[2], lq[2];
    for (int i = 0; i < 2; ++i) {
        i64 row = q0 + g + 8 * i;
        float sum = 0.0f;
        for (int c = 2 * t; c < FLASH_HD && row < s.q_len; c += 8) {
            for (int e = 0; e < 2; ++e) sum += ld(dob, row * width + c + e) * ld(ob, row * width + c + e);
        }
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        dl[i] = sum;
        i64 li = (b * s.heads + h) * s.q_len + row;
        lq[i] = lse_in_base_2(row < s.q_len ? lse[li] : neg_inf);
        if (row < s.q_len && t == 0) delta[li] = sum;
    }
    float acc[8][4];
    for (int d = 0; d < 8; ++d) for (int e = 0; e < 4; ++e) acc[d][e] = 0.0f;

    for (int buf = 0; tile < tiles; buf ^= 1) {
        wait_copies();
        __syncthreads();  // this tile is in for every thread, and every thread is done with the other buffer
        const int k0 = tile * FLASH_TILE, next = next_tile_in_hull(hull, tile + 1, tiles);
        if (next < tiles) start_key_tile_load(ks[buf ^ 1], vs[buf ^ 1], kb, vb, s, next);
        const bool whole = warp_sees_whole_tile(rr, q0, g, s, k0);
        // 32 keys at a time: S and dP of half a tile are 32 registers fewer than of a whole one
        // (three blocks an SM with a 4-byte spill, against 104 bytes for whole tiles), and dQ
        // sums the same products in the same order.
        for (int half = 0; half < 2; ++half) {
            const store_t* krows = ks[buf] + half * 32 * FLASH_PAD;
            float sc[4][4], dp[4][4];
            product_with_rows<4>(sc, qa, krows, lane);
            product_with_rows<4>(dp, da, vs[buf] + half * 32 * FLASH_PAD, lane);
            // dS = P ∘ (dP − δ)·scale, P recomputed from the saved log-sum-exp (0 where masked).
            if (!whole) hide_unseen_scores<4>(sc, rr, k0 + half * 32, t);
            for (int n = 0; n < 4; ++n) {
                for (int e = 0; e < 4; ++e) {
                    const int i = e >> 1;
                    const float p = ex2_approx(fmaf(sc[n][e], scale2, -lq[i]));
                    sc[n][e] = p * (dp[n][e] - dl[i]) * scale;
                }
            }
            accumulate_times_rows<2>(acc, sc, krows, lane);
        }
        tile = next;
    }
    for (int i = 0; i < 2; ++i) {
        i64 row = q0 + g + 8 * i;
        if (row >= s.q_len) continue;
        const i64 o = b * s.q_batch_stride + row * s.q_stride + h * FLASH_HD;  // dq is laid out like q
        for (int d = 0; d < 8; ++d) {
            for (int e = 2 * i; e < 2 * i + 2; ++e) st(dq, o + d * 8 + 2 * t + (e & 1), acc[d][e]);
        }
    }
}

// What a query tile is to a key tile of the dK/dV kernel.
#define UNSEEN 0     // no row sees any of its keys: skipped
#define PARTLY 1     // some scores are masked: the per-pair test applies
#define WHOLLY 2     // every row sees every key: no mask test

// The rows, key ranges, log-sum-exp and δ of the query tile from q0 on, into buffer `buf` of the
// dK/dV kernel's shared arrays: tiles by cp.async, statistics by 4-byte cp.async, ranges computed.
struct QueryTileBuffers {
    store_t qs[2][FLASH_TILE * FLASH_PAD];   // Q, row-major
    store_t dos[2][FLASH_TILE * FLASH_PAD];  // dO, row-major
    float lses[2][FLASH_TILE], deltas[2][FLASH_TILE];
    int ranges[2][FLASH_TILE][4];
};

__device__ __forceinline__ void start_query_tile_load(QueryTileBuffers& sh, int buf, const Shape& s, int kind, i64 p0,
                                                      i64 p1, i64 p2, i64 window, const store_t* qb,
                                                      const store_t* dob, const float* lse_bh,
                                                      const float* delta_bh, i64 q0, bool partly) {
    const i64 width = s.heads * FLASH_HD;
    start_tile_load(sh.qs[buf], qb, s.q_stride, q0, s.q_len);
    start_tile_load(sh.dos[buf], dob, width, q0, s.q_len);
    for (int i = threadIdx.x; i < 2 * FLASH_TILE; i += blockDim.x) {
        const int r = i % FLASH_TILE;
        const i64 row = q0 + r;
        float* dst = i < FLASH_TILE ? &sh.lses[buf][r] : &sh.deltas[buf][r];
        if (row < s.q_len) copy_async_4(dst, i < FLASH_TILE ? lse_bh + row : delta_bh + row);
        else *dst = i < FLASH_TILE ? -__int_as_float(0x7f800000) : 0.0f;
    }
    if (!partly) return;
    for (int r = threadIdx.x; r < FLASH_TILE; r += blockDim.x) {
        const Ranges32 rg = row_ranges(s, kind, p0, p1, p2, window, q0 + r);
        sh.ranges[buf][r][0] = rg.a0; sh.ranges[buf][r][1] = rg.a1;
        sh.ranges[buf][r][2] = rg.b0; sh.ranges[buf][r][3] = rg.b1;
    }
}

// dK and dV for a tile of 64 keys, over the query tiles that see any of them.
extern "C" __global__ void __launch_bounds__(128, 3) attention_backward_flash_dkv(Shape s, int kind, i64 p0, i64 p1, i64 p2, i64 window,
                                                        float scale, const store_t* dout, const store_t* q,
                                                        const store_t* k, const store_t* v, const float* lse,
                                                        const float* delta, store_t* dk, store_t* dv) {
    __shared__ __align__(16) QueryTileBuffers sh;
    __shared__ unsigned char seen_by[FLASH_DKV_TILES];  // per query tile: UNSEEN, PARTLY or WHOLLY
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
    const i64 h = blockIdx.x % s.heads, b = blockIdx.x / s.heads;
    const int tile_k0 = (int)blockIdx.y * FLASH_TILE, k0 = tile_k0 + warp * 16;  // key tiles in order: see above
    const i64 width = s.heads * FLASH_HD;
    const float neg_inf = -__int_as_float(0x7f800000), scale2 = scale * LOG2E;
    const store_t* qb = q + b * s.q_batch_stride + h * FLASH_HD;
    const store_t* dob = dout + b * s.q_len * width + h * FLASH_HD;
    const float* lse_bh = lse + (b * s.heads + h) * s.q_len;
    const float* delta_bh = delta + (b * s.heads + h) * s.q_len;

    // How each query tile sees this key tile, all in one pass before the loop (a warp a query
    // tile, a lane two rows): the loop then skips the unseen without a barrier and leaves out the
    // mask test where every row sees every key. Query tiles past FLASH_DKV_TILES count as PARTLY
    // (a tile nobody sees then costs a visit, not a wrong gradient: its scores are all masked).
    const int tiles = (int)((s.q_len + FLASH_TILE - 1) / FLASH_TILE);
    for (int tile = warp; tile < tiles && tile < FLASH_DKV_TILES; tile += blockDim.x >> 5) {
        int any = 0, all = 1;
        for (int half = 0; half < 2; ++half) {
            const Ranges32 r = row_ranges(s, kind, p0, p1, p2, window, (i64)tile * FLASH_TILE + lane + 32 * half);
            if (reaches_tile(r, tile_k0)) any = 1;
            if (!sees_whole_tile(r, tile_k0, (int)s.kv_len)) all = 0;  // rows past the end see nothing
        }
        for (int o = 16; o > 0; o >>= 1) {
            any |= __shfl_xor_sync(0xffffffffu, any, o);
            all &= __shfl_xor_sync(0xffffffffu, all, o);
        }
        if (lane == 0) seen_by[tile] = (unsigned char)(all ? WHOLLY : any ? PARTLY : UNSEEN);
    }
    __syncthreads();
    auto how_seen = [&](int tile) { return tile < FLASH_DKV_TILES ? (int)seen_by[tile] : PARTLY; };
    auto next_seen = [&](int tile) {
        while (tile < tiles && how_seen(tile) == UNSEEN) ++tile;
        return tile;
    };
    int tile = next_seen(0);
    if (tile < tiles) {
        start_query_tile_load(sh, 0, s, kind, p0, p1, p2, window, qb, dob, lse_bh, delta_bh, tile * FLASH_TILE,
                              how_seen(tile) == PARTLY);
    }
    unsigned ka[4][4], va[4][4];
    load_rows_as_a(ka, k + b * s.kv_batch_stride + h * FLASH_HD, s.k_stride, k0, s.kv_len, g, t);
    load_rows_as_a(va, v + b * s.kv_batch_stride + h * FLASH_HD, s.v_stride, k0, s.kv_len, g, t);
    float dk_acc[8][4], dv_acc[8][4];
    for (int d = 0; d < 8; ++d) for (int e = 0; e < 4; ++e) { dk_acc[d][e] = 0.0f; dv_acc[d][e] = 0.0f; }

    for (int buf = 0; tile < tiles; buf ^= 1) {
        wait_copies();
        __syncthreads();  // this tile is in for every thread, and every thread is done with the other buffer
        const bool whole = how_seen(tile) == WHOLLY;
        const int next = next_seen(tile + 1);
        if (next < tiles) {
            start_query_tile_load(sh, buf ^ 1, s, kind, p0, p1, p2, window, qb, dob, lse_bh, delta_bh,
                                  next * FLASH_TILE, how_seen(next) == PARTLY);
        }
        // Sᵀ and dPᵀ (rows: this warp's keys, columns: the tile's queries), 32 queries at a time as
        // in the dQ kernel.
        const float* lses = sh.lses[buf];
        const float* deltas = sh.deltas[buf];
        for (int half = 0; half < 2; ++half) {
            const store_t* qrows = sh.qs[buf] + half * 32 * FLASH_PAD;
            const store_t* dorows = sh.dos[buf] + half * 32 * FLASH_PAD;
            float sc[4][4], dp[4][4];
            product_with_rows<4>(sc, ka, qrows, lane);
            product_with_rows<4>(dp, va, dorows, lane);
            if (!whole) {  // a query tile seen in part: Sᵀ's hidden scores become −∞
                for (int n = 0; n < 4; ++n) {
                    for (int e = 0; e < 4; ++e) {
                        const int* r = sh.ranges[buf][half * 32 + n * 8 + 2 * t + (e & 1)];
                        const Ranges32 rg = {r[0], r[1], r[2], r[3]};
                        if (!in_ranges(rg, k0 + g + 8 * (e >> 1))) sc[n][e] = neg_inf;
                    }
                }
            }
            for (int n = 0; n < 4; ++n) {
                for (int e = 0; e < 4; ++e) {
                    const int col = half * 32 + n * 8 + 2 * t + (e & 1);
                    const float p = ex2_approx(fmaf(sc[n][e], scale2, -lse_in_base_2(lses[col])));
                    sc[n][e] = p;
                    dp[n][e] = p * (dp[n][e] - deltas[col]) * scale;
                }
            }
            accumulate_times_rows<2>(dv_acc, sc, dorows, lane);
            accumulate_times_rows<2>(dk_acc, dp, qrows, lane);
        }
        tile = next;
    }
    for (int i = 0; i < 2; ++i) {
        i64 key = k0 + g + 8 * i;
        if (key >= s.kv_len) continue;
        const i64 ok = b * s.kv_batch_stride + key * s.k_stride + h * FLASH_HD;  // dk, dv laid out like k, v
        const i64 ov = b * s.kv_batch_stride + key * s.v_stride + h * FLASH_HD;
        for (int d = 0; d < 8; ++d) {
            for (int e = 2 * i; e < 2 * i + 2; ++e) {
                st(dk, ok + d * 8 + 2 * t + (e & 1), dk_acc[d][e]);
                st(dv, ov + d * 8 + 2 * t + (e & 1), dv_acc[d][e]);
            }
        }
    }
}
#endif
