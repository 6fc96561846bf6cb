// Shared by every kernel source: the storage type and the Philox generator.
// NVRTC sees no system headers, so this file includes none.
//
// Storage is f32, or bf16 bits when STORAGE_BF16 is defined; arithmetic is
// always f32 (f64 where the CPU reference computes in f64).

typedef long long i64;

// Unrolls the next loop on the GPU (the emulation's C++ compiler knows no such pragma).
#ifdef DID_EMULATE
#define UNROLL
#else
#define UNROLL _Pragma("unroll")
#endif

#ifdef STORAGE_BF16
typedef unsigned short store_t;
__device__ __forceinline__ float ld(const store_t* p, i64 i) {
    return __uint_as_float(((unsigned)p[i]) << 16);
}
// Round to nearest even; NaN stays NaN.
__device__ __forceinline__ store_t to_store(float x) {
    unsigned u = __float_as_uint(x);
    if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu)) return (store_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (store_t)(u >> 16);
}
#else
typedef float store_t;
__device__ __forceinline__ float ld(const store_t* p, i64 i) { return p[i]; }
__device__ __forceinline__ store_t to_store(float x) { return x; }
#endif

__device__ __forceinline__ void st(store_t* p, i64 i, float x) { p[i] = to_store(x); }
__device__ __forceinline__ void add_to(store_t* p, i64 i, float x) { p[i] = to_store(ld(p, i) + x); }

// f(i, row[i]) for i = first, first + step, … below n, in that order, with the loads issued
// eight at a time before any is used: a loop of one load per iteration waits a memory latency
// per element (its SASS has a single LDG), and a loop that also stores (f may write the row)
// must assume the store could alias the next load. In f, `return` skips to the next element.
template <class F>
__device__ __forceinline__ void for_each_strided(const store_t* row, i64 first, i64 step, i64 n, F f) {
    for (i64 c0 = first; c0 < n; c0 += 8 * step) {
        float xs[8];
        UNROLL
        for (int j = 0; j < 8; ++j) {
            const i64 c = c0 + j * step;
            xs[j] = c < n ? ld(row, c) : 0.0f;
        }
        for (int j = 0; j < 8; ++j) {
            const i64 c = c0 + j * step;
            if (c >= n) break;
            f(c, xs[j]);
        }
    }
}

#define GRID_STRIDE(i, n) for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (i64)blockDim.x * gridDim.x)

// Chunks of VEC elements (16 bytes: 8 bf16 or 4 f32) for the elementwise kernels: one 16-byte
// load or store per operand instead of VEC narrow ones, and index arithmetic once a chunk. A
// kernel takes the chunked path when every pointer is 16-byte aligned and every extent it
// indexes by is a multiple of VEC (`chunked`), else its plain GRID_STRIDE loop; the two compute
// the same values in the same order. The backend sizes the grid of such kernels (kernels.rs,
// CHUNKED) for n / VEC threads.
#define VEC ((int)(16 / sizeof(store_t)))
#define CHUNK_STRIDE(i, n) for (i64 i = ((i64)blockIdx.x * blockDim.x + threadIdx.x) * VEC; i < (n); i += (i64)blockDim.x * gridDim.x * VEC)
// A flat kernel (one index over all its operands: fill, scale, the optimizer, sums) takes its
// first `bulk` elements by chunks and the rest one at a time, so a length that is not a multiple
// of VEC — a whole parameter vector: `small` has 169,627,218 — still streams by chunks:
// bulk = chunked_prefix(n, every pointer aligned), then CHUNK_STRIDE(i, bulk) and
// TAIL_STRIDE(i, bulk, n) (misaligned: bulk = 0 and the tail is the plain loop).
#define TAIL_STRIDE(i, from, n) for (i64 i = (from) + (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (i64)blockDim.x * gridDim.x)
__device__ __forceinline__ i64 chunked_prefix(i64 n, bool aligned) { return aligned ? n - n % VEC : 0; }
union Chunk { uint4 u; store_t s[16 / sizeof(store_t)]; };
__device__ __forceinline__ bool aligned16(const void* p) { return (((unsigned long long)p) & 15) == 0; }
// A 16-byte vector access at p. The GPU faults on one off a 16-byte boundary (a misaligned
// address error, which also poisons the context for every later call); the emulation's x86
// would not, so there it is checked.
__device__ __forceinline__ void check_vector_aligned(const void* p) {
#ifdef DID_EMULATE
    if (!aligned16(p)) {
        std::fprintf(stderr, "a 16-byte vector access at %p, off a 16-byte boundary\n", p);
        std::abort();
    }
#else
    (void)p;
#endif
}
__device__ __forceinline__ const uint4* as_vector(const void* p) { check_vector_aligned(p); return (const uint4*)p; }
__device__ __forceinline__ uint4* as_vector_mut(void* p) { check_vector_aligned(p); return (uint4*)p; }
__device__ __forceinline__ void ld_chunk(const store_t* p, i64 i, float* out) {
    Chunk c;
    c.u = *as_vector(p + i);
    for (int k = 0; k < VEC; ++k) out[k] = ld(c.s, k);
}
__device__ __forceinline__ void st_chunk(store_t* p, i64 i, const float* x) {
    Chunk c;
    for (int k = 0; k < VEC; ++k) c.s[k] = to_store(x[k]);
    *as_vector_mut(p + i) = c.u;
}
// The same VEC elements of an f32 buffer (a bf16 backend's zeros_f32 / upload_f32: master
// weights, moments), in 16-byte pieces: one for f32 storage, two for bf16.
union ChunkF32 { uint4 u; float f[4]; };
__device__ __forceinline__ void ld_chunk_f32(const float* p, i64 i, float* out) {
    for (int q = 0; q < VEC / 4; ++q) {
        ChunkF32 c;
        c.u = *as_vector(p + i + 4 * q);
        for (int k = 0; k < 4; ++k) out[4 * q + k] = c.f[k];
    }
}
__device__ __forceinline__ void st_chunk_f32(float* p, i64 i, const float* x) {
    for (int q = 0; q < VEC / 4; ++q) {
        ChunkF32 c;
        for (int k = 0; k < 4; ++k) c.f[k] = x[4 * q + k];
        *as_vector_mut(p + i + 4 * q) = c.u;
    }
}

// Philox4x32-10, as did_core::rng::philox4x32_10.
struct u32x4 { unsigned v[4]; };
__device__ __forceinline__ u32x4 philox4x32_10(unsigned c0, unsigned c1, unsigned c2, unsigned c3, unsigned k0, unsigned k1) {
    for (int round = 0; round < 10; ++round) {
        if (round > 0) { k0 += 0x9E3779B9u; k1 += 0xBB67AE85u; }
        unsigned long long p0 = (unsigned long long)0xD2511F53u * c0;
        unsigned long long p1 = (unsigned long long)0xCD9E8D57u * c2;
        unsigned hi0 = (unsigned)(p0 >> 32), lo0 = (unsigned)p0;
        unsigned hi1 = (unsigned)(p1 >> 32), lo1 = (unsigned)p1;
        unsigned n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
        c0 = n0; c1 = lo1; c2 = n2; c3 = lo0;
    }
    u32x4 r; r.v[0] = c0; r.v[1] = c1; r.v[2] = c2; r.v[3] = c3;
    return r;
}

// Block-wide sum of one float per thread (blockDim.x a multiple of 32, ≤ 1024),
// in a fixed order so results are deterministic. Every thread gets the sum.
__device__ __forceinline__ float warp_sum(float x) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}
__device__ __forceinline__ float warp_max(float x) {
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}
__device__ float block_sum(float x, float* shared32) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    x = warp_sum(x);
    __syncthreads();
    if (lane == 0) shared32[warp] = x;
    __syncthreads();
    float total = 0.0f;
    for (int w = 0; w < warps; ++w) total += shared32[w];
    return total;
}
__device__ float block_max(float x, float* shared32) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    x = warp_max(x);
    __syncthreads();
    if (lane == 0) shared32[warp] = x;
    __syncthreads();
    float m = -__int_as_float(0x7f800000);
    for (int w = 0; w < warps; ++w) m = fmaxf(m, shared32[w]);
    return m;
}

// The value as stored (rounded to bf16 in bf16 storage): a fused kernel that rounds where the
// kernels it replaces stored computes what they compute, bit for bit.
__device__ __forceinline__ float as_stored(float x) {
    store_t s = to_store(x);
    return ld(&s, 0);
}

// GELU, tanh form written as x·σ(2u) (as the CPU reference).
__device__ __forceinline__ void gelu_parts(float x, float* y, float* dy) {
    const float c = 0.7978845608028654f, a = 0.044715f;
    float u = c * (x + a * x * x * x);
    float s = 1.0f / (1.0f + expf(-2.0f * u));
    float th = 2.0f * s - 1.0f;
    float sech2 = 1.0f - th * th;
    *y = x * s;
    *dy = s + 0.5f * x * sech2 * c * (1.0f + 3.0f * a * x * x);
}
