// A linear layer's forward over a few rows: y[m, n] = x[m, k] · W[n, k]ᵀ (+ beta · y), m ≤ 8.
//
// The draft's denoiser calls at batch 1 run every linear layer over the block's 4 rows and the
// head over the 1 row being revealed: each call reads every weight once and does 2·m FLOPs a
// weight, so it is bound by reading W (≈ 14 MB a layer of `small` in bf16, ≈ 3 µs at the copy
// ceiling). These kernels read W in 16-byte loads spread over the whole GPU, where cuBLAS's
// tiles for m ≤ 8 leave most of a tile's rows empty.
//
// A block of FEW_THREADS threads owns FEW_COLS consecutive columns of y. Its threads walk k in
// 16-byte chunks (thread t: chunks t, t + FEW_THREADS, …), each keeping M × FEW_COLS f32 sums of
// its chunks in order; a warp adds its lanes' sums by shuffles, then the first M × FEW_COLS
// threads add the warps' in order: the same sums in the same order on every run. x is read
// through the cache by every block (m·k elements, a few KB).
//
// Requires x and W 16-byte aligned, and k, lda, ldb multiples of VEC: the backend checks and
// leaves other shapes to cuBLAS. When beta is 0, y is not read (it may hold NaN).
#define FEW_THREADS 128
#define FEW_COLS 4

template <int M>
__device__ __forceinline__ void linear_few_rows(const store_t* x, i64 lda, const store_t* w, i64 ldb, store_t* y, i64 ldc,
                                                int m, i64 n, i64 k, float beta) {
    __shared__ float warp_sums[FEW_THREADS / 32][M * FEW_COLS];
    const i64 col0 = (i64)blockIdx.x * FEW_COLS;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float acc[M][FEW_COLS];
    UNROLL
    for (int r = 0; r < M; ++r)
        UNROLL
        for (int c = 0; c < FEW_COLS; ++c) acc[r][c] = 0.0f;
    for (i64 kc = (i64)threadIdx.x * VEC; kc < k; kc += (i64)FEW_THREADS * VEC) {
        // Every load of the chunk is issued before the first product.
        float wv[FEW_COLS][VEC], xv[M][VEC];
        UNROLL
        for (int c = 0; c < FEW_COLS; ++c) {
            if (col0 + c < n) {
                ld_chunk(w, (col0 + c) * ldb + kc, wv[c]);
            } else {
                for (int q = 0; q < VEC; ++q) wv[c][q] = 0.0f;
            }
        }
        UNROLL
        for (int r = 0; r < M; ++r) {
            if (r < m) {
                ld_chunk(x, r * lda + kc, xv[r]);
            } else {
                for (int q = 0; q < VEC; ++q) xv[r][q] = 0.0f;
            }
        }
        UNROLL
        for (int r = 0; r < M; ++r)
            UNROLL
            for (int c = 0; c < FEW_COLS; ++c)
                UNROLL
                for (int q = 0; q < VEC; ++q) acc[r][c] = fmaf(xv[r][q], wv[c][q], acc[r][c]);
    }
    UNROLL
    for (int r = 0; r < M; ++r)
        UNROLL
        for (int c = 0; c < FEW_COLS; ++c) {
            const float s = warp_sum(acc[r][c]);
            if (lane == 0) warp_sums[warp][r * FEW_COLS + c] = s;
        }
    __syncthreads();
    const int t = threadIdx.x;
    if (t < M * FEW_COLS) {
        const int r = t / FEW_COLS, c = t % FEW_COLS;
        const i64 col = col0 + c;
        if (r < m && col < n) {
            float s = 0.0f;
            for (int v = 0; v < FEW_THREADS / 32; ++v) s += warp_sums[v][t];
            if (beta != 0.0f) s += beta * ld(y, r * ldc + col);
            st(y, r * ldc + col, s);
        }
    }
}

// One kernel for each bound on m; the backend takes the smallest that holds m.
#define LINEAR_FEW_ROWS(M)                                                                                         \
    extern "C" __global__ void __launch_bounds__(FEW_THREADS) linear_few_rows_##M(                               \
        const store_t* x, i64 lda, const store_t* w, i64 ldb, store_t* y, i64 ldc, int m, i64 n, i64 k, float beta) { \
        linear_few_rows<M>(x, lda, w, ldb, y, ldc, m, n, k, beta);                                                \
    }
LINEAR_FEW_ROWS(1)
LINEAR_FEW_ROWS(2)
LINEAR_FEW_ROWS(4)
LINEAR_FEW_ROWS(8)
