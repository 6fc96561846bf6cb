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

// What the kernel does with a sum after the product, in the same pass (the output rows dense,
// y's row stride n): THEN_STORE stores it; THEN_BIAS_GELU is bias_gelu_forward's, y keeping the
// stored pre-activation and out its GELU; THEN_GATED_RESIDUAL is (bias_)gated_residual_forward_into's,
// y keeping the (biased) branch output and out = residual + gate[row / tokens]·y. Each rounds
// where the separate kernels store, so the results are theirs bit for bit, and a draft call
// launches one kernel a layer's projection instead of two.
#define THEN_STORE 0
#define THEN_BIAS_GELU 1
#define THEN_GATED_RESIDUAL 2

template <int M, int THEN>
__device__ __forceinline__ void linear_few_rows(const store_t* x, i64 lda, const store_t* w, i64 ldb, store_t* y, i64 ldc,
                                                int m, i64 n, i64 k, float beta, const store_t* bias, store_t* out,
                                                const store_t* gate, const store_t* residual, i64 tokens) {
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
            if (THEN == THEN_STORE) {
                st(y, r * ldc + col, s);
            } else if (THEN == THEN_BIAS_GELU) {
                const store_t pre = to_store(as_stored(s) + ld(bias, col));
                y[r * ldc + col] = pre;
                float g, dg;
                gelu_parts(ld(&pre, 0), &g, &dg);
                st(out, r * n + col, g);
            } else {
                float yv = as_stored(s);
                if (bias) yv = as_stored(yv + ld(bias, col));
                st(y, r * ldc + col, yv);
                const float g = gate ? ld(gate, (r / tokens) * n + col) : 1.0f;
                st(out, r * n + col, ld(residual, r * n + col) + g * yv);
            }
        }
    }
}

// One kernel for each bound on m; the backend takes the smallest that holds m.
#define LINEAR_FEW_ROWS(M)                                                                                         \
    extern "C" __global__ void __launch_bounds__(FEW_THREADS) linear_few_rows_##M(                               \
        const store_t* x, i64 lda, const store_t* w, i64 ldb, store_t* y, i64 ldc, int m, i64 n, i64 k, float beta) { \
        linear_few_rows<M, THEN_STORE>(x, lda, w, ldb, y, ldc, m, n, k, beta, nullptr, nullptr, nullptr, nullptr, 1); \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(FEW_THREADS) linear_few_rows_##M##_bias_gelu(                   \
        const store_t* x, i64 lda, const store_t* w, i64 ldb, store_t* y, int m, i64 n, i64 k, const store_t* bias,   \
        store_t* out) {                                                                                            \
        linear_few_rows<M, THEN_BIAS_GELU>(x, lda, w, ldb, y, n, m, n, k, 0.0f, bias, out, nullptr, nullptr, 1);  \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(FEW_THREADS) linear_few_rows_##M##_gated_residual(              \
        const store_t* x, i64 lda, const store_t* w, i64 ldb, store_t* y, int m, i64 n, i64 k, const store_t* bias,   \
        const store_t* gate, const store_t* residual, store_t* out, i64 tokens) {                                  \
        linear_few_rows<M, THEN_GATED_RESIDUAL>(x, lda, w, ldb, y, n, m, n, k, 0.0f, bias, out, gate, residual,   \
                                                tokens);                                                           \
    }
LINEAR_FEW_ROWS(1)
LINEAR_FEW_ROWS(2)
LINEAR_FEW_ROWS(4)
LINEAR_FEW_ROWS(8)
