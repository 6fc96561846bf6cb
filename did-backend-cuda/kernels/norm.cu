// LayerNorm (one block per row), RoPE, and the fused weighted softmax
// cross-entropy (one block per row). Reductions go through block_sum, a fixed
// order, so every result is deterministic.

// A block of one warp takes a row of up to 32 · ROW_PER_LANE columns into registers (lane l holds
// columns l, l + 32, …) with one round of loads, then works from there; the sums run in the same
// order as the strided loops below with 32 threads, so the results are the same bits. Wider rows,
// or more threads, take the strided loops.
#define ROW_PER_LANE 32
__device__ __forceinline__ bool row_in_registers(i64 cols) { return blockDim.x == 32 && cols <= 32 * ROW_PER_LANE; }
__device__ __forceinline__ void load_row(const store_t* r, i64 cols, float* v) {
    UNROLL
    for (int j = 0; j < ROW_PER_LANE; ++j) {
        const i64 c = threadIdx.x + 32 * j;
        v[j] = c < cols ? ld(r, c) : 0.0f;
    }
}

// A row's mean and rstd, from its registers (row_in_registers) or strided over the block from
// memory, in the same order either way; forward and backward compute them alike.
__device__ __forceinline__ void row_stats_in_registers(const float* xv, i64 cols, float eps, float* shared32, float* mu,
                                                       float* r) {
    float s = 0.0f;
    UNROLL
    for (int j = 0; j < ROW_PER_LANE; ++j) if (threadIdx.x + 32 * j < cols) s += xv[j];
    *mu = block_sum(s, shared32) / (float)cols;
    float v = 0.0f;
    UNROLL
    for (int j = 0; j < ROW_PER_LANE; ++j) if (threadIdx.x + 32 * j < cols) { float d = xv[j] - *mu; v += d * d; }
    *r = 1.0f / sqrtf(block_sum(v, shared32) / (float)cols + eps);
}
__device__ __forceinline__ void row_stats_strided(const store_t* xr, i64 cols, float eps, float* shared32, float* mu,
                                                  float* r) {
    float s = 0.0f;
    for (i64 c = threadIdx.x; c < cols; c += blockDim.x) s += ld(xr, c);
    *mu = block_sum(s, shared32) / (float)cols;
    float v = 0.0f;
    for (i64 c = threadIdx.x; c < cols; c += blockDim.x) { float d = ld(xr, c) - *mu; v += d * d; }
    *r = 1.0f / sqrtf(block_sum(v, shared32) / (float)cols + eps);
}

// Element c of a forward row: out = y, and with mod_out the modulation of the stored out.
__device__ __forceinline__ void store_normed(store_t* out, store_t* mod_out, const store_t* shift, const store_t* scale,
                                             i64 row, i64 c, i64 cols, i64 tokens, float y) {
    store_t stored = to_store(y);
    out[row * cols + c] = stored;
    if (mod_out) {
        i64 k = (row / tokens) * cols + c;
        st(mod_out, row * cols + c, ld(&stored, 0) * (1.0f + ld(scale, k)) + ld(shift, k));
    }
}

// With mod_out set, also the adaLN modulation of the stored output (the DiT's pre-norm, fused):
// mod_out = out·(1 + scale[s]) + shift[s] for sequence s = row / tokens, as modulate_forward
// computes it from `out`.
extern "C" __global__ void layernorm_forward(const store_t* x, const store_t* weight, const store_t* bias, store_t* out,
                                             store_t* mean, store_t* rstd, i64 rows, i64 cols, float eps,
                                             const store_t* shift, const store_t* scale, store_t* mod_out, i64 tokens) {
    __shared__ float shared32[32];
    i64 row = blockIdx.x;
    if (row >= rows) return;
    const store_t* xr = x + row * cols;
    if (row_in_registers(cols)) {
        float xv[ROW_PER_LANE], mu, r;
        load_row(xr, cols, xv);
        row_stats_in_registers(xv, cols, eps, shared32, &mu, &r);
        UNROLL
        for (int j = 0; j < ROW_PER_LANE; ++j) {
            const i64 c = threadIdx.x + 32 * j;
            if (c >= cols) break;
            float y = (xv[j] - mu) * r * ld(weight, c);
            if (bias) y += ld(bias, c);
            store_normed(out, mod_out, shift, scale, row, c, cols, tokens, y);
        }
        if (threadIdx.x == 0) { st(mean, row, mu); st(rstd, row, r); }
        return;
    }
    float mu, r;
    row_stats_strided(xr, cols, eps, shared32, &mu, &r);
    for (i64 c = threadIdx.x; c < cols; c += blockDim.x) {
        float y = (ld(xr, c) - mu) * r * ld(weight, c);
        if (bias) y += ld(bias, c);
        store_normed(out, mod_out, shift, scale, row, c, cols, tokens, y);
    }
    if (threadIdx.x == 0) { st(mean, row, mu); st(rstd, row, r); }
}

// The backward recomputes each row's mean and rstd from x in f32, with the
// forward's reduction order (so in f32 mode they equal the saved ones bit for
// bit), instead of reading the saved statistics: in bf16 storage those are
// rounded to 8 bits, and x − mean cancels badly when a row's spread is small
// next to its mean. It leaves them in `stats` ([rows, 2], f32) for dweight.
extern "C" __global__ void layernorm_backward_dx(const store_t* dout, const store_t* x, const store_t* weight,
                                                 store_t* dx, float* stats, i64 rows, i64 cols, float eps) {
    __shared__ float shared32[32];
    i64 row = blockIdx.x;
    if (row >= rows) return;
    const store_t* xr = x + row * cols;
    const store_t* dr = dout + row * cols;
    if (row_in_registers(cols)) {
        float xv[ROW_PER_LANE], dn[ROW_PER_LANE], mu, r;
        load_row(xr, cols, xv);
        load_row(dr, cols, dn);
        row_stats_in_registers(xv, cols, eps, shared32, &mu, &r);
        float a = 0.0f, b = 0.0f;
        UNROLL
        for (int j = 0; j < ROW_PER_LANE; ++j) {
            const i64 c = threadIdx.x + 32 * j;
            if (c >= cols) break;
            dn[j] = dn[j] * ld(weight, c);  // dout · weight, kept for the last pass
            a += dn[j];
            b += dn[j] * ((xv[j] - mu) * r);
        }
        float mean_d = block_sum(a, shared32) / (float)cols;
        float mean_dx = block_sum(b, shared32) / (float)cols;
        UNROLL
        for (int j = 0; j < ROW_PER_LANE; ++j) {
            const i64 c = threadIdx.x + 32 * j;
            if (c >= cols) break;
            float xhat = (xv[j] - mu) * r;
            add_to(dx, row * cols + c, r * (dn[j] - mean_d - xhat * mean_dx));
        }
        if (threadIdx.x == 0) { stats[2 * row] = mu; stats[2 * row + 1] = r; }
        return;
    }
    float mu, r;
    row_stats_strided(xr, cols, eps, shared32, &mu, &r);
    float a = 0.0f, b = 0.0f;
    for (i64 c = threadIdx.x; c < cols; c += blockDim.x) {
        float xhat = (ld(xr, c) - mu) * r, dn = ld(dr, c) * ld(weight, c);
        a += dn;
        b += dn * xhat;
    }
    float mean_d = block_sum(a, shared32) / (float)cols;
    float mean_dx = block_sum(b, shared32) / (float)cols;
    for (i64 c = threadIdx.x; c < cols; c += blockDim.x) {
        float xhat = (ld(xr, c) - mu) * r;
        add_to(dx, row * cols + c, r * (ld(dr, c) * ld(weight, c) - mean_d - xhat * mean_dx));
    }
    if (threadIdx.x == 0) { stats[2 * row] = mu; stats[2 * row + 1] = r; }
}

// partial[chunk, c] = Σ over the chunk's rows of dout·x̂ (finished by colsum_finish).
extern "C" __global__ void layernorm_dweight_partial(const store_t* dout, const store_t* x, const float* stats,
                                                     float* partial, i64 rows, i64 cols, i64 rows_per_chunk) {
    i64 c = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    i64 chunk = blockIdx.y;
    if (c >= cols) return;
    i64 r0 = chunk * rows_per_chunk, r1 = min(rows, r0 + rows_per_chunk);
    float acc = 0.0f;
    for (i64 r = r0; r < r1; ++r) acc += ld(dout, r * cols + c) * (ld(x, r * cols + c) - stats[2 * r]) * stats[2 * r + 1];
    partial[chunk * cols + c] = acc;
}

// RoPE, rotate-half: one thread per (token, head, pair) and chunk of `per` sequences. The angle,
// in f64 and rounded once as the CPU reference's table, costs a pow, a cos and a sin — hundreds of
// instructions against a few for the rotation — so a thread computes it once and rotates the pair
// in each sequence of its chunk. The backend picks `per` to keep enough threads (1 for a draft's
// few tokens).
//
// With `copy` ≠ null the kernel also copies columns [copy_col0, copy_col0 + copy_cols) of every
// row (copy_col0 ≥ 0), as rotated, to copy + b·copy_batch_stride + t·copy_stride — a KV-cached
// pass's append of its rotated keys and its values to the cache, in the same launch: the
// rotating threads store the pairs that fall in those columns twice, and threads past the
// rotation's copy the columns it does not reach (those from heads·head_dim on).
#define ROPE_ROUND 4  // 72 registers; eight took 127–152
extern "C" __global__ void rope(store_t* x, i64 batch, i64 tokens, i64 heads, i64 head_dim, i64 stride, i64 batch_stride,
                                i64 position_offset, double base, int inverse, i64 per, store_t* copy, i64 copy_col0,
                                i64 copy_cols, i64 copy_stride, i64 copy_batch_stride) {
    i64 half = head_dim / 2, chunks = (batch + per - 1) / per;
    const i64 rotations = chunks * tokens * heads * half;
    const i64 plain0 = max(copy_col0, heads * head_dim), copy_end = copy_col0 + copy_cols;
    const i64 plain = copy && copy_end > plain0 ? copy_end - plain0 : 0;  // columns copied as they are
    GRID_STRIDE(i, rotations + batch * tokens * plain) {
        if (i >= rotations) {
            const i64 j = i - rotations, col = plain0 + j % plain, t = (j / plain) % tokens, b = j / (plain * tokens);
            const float value = ld(x, b * batch_stride + t * stride + col);
            st(copy, b * copy_batch_stride + t * copy_stride + col - copy_col0, value);
            continue;
        }
        i64 d = i % half, h = (i / half) % heads, t = (i / (half * heads)) % tokens, chunk = i / (half * heads * tokens);
        double inv_freq = pow(base, -2.0 * (double)d / (double)head_dim);
        double angle = (double)(position_offset + t) * inv_freq;
        float c = (float)cos(angle), s = (float)sin(angle);
        if (inverse) s = -s;
        // ROPE_ROUND sequences' pairs loaded before any is stored: the stores may alias the next
        // loads, so a load-then-store loop would wait a memory latency per sequence (16 of them
        // a thread in the 2L training pass).
        const i64 b_end = min(batch, (chunk + 1) * per);
        const store_t* at = x + t * stride + h * head_dim + d;
        for (i64 b0 = chunk * per; b0 < b_end; b0 += ROPE_ROUND) {
            float lo[ROPE_ROUND], hi[ROPE_ROUND];
            UNROLL
            for (int j = 0; j < ROPE_ROUND; ++j) {
                const store_t* pj = at + (b0 + j) * batch_stride;
                lo[j] = b0 + j < b_end ? ld(pj, 0) : 0.0f;
                hi[j] = b0 + j < b_end ? ld(pj, half) : 0.0f;
            }
            for (int j = 0; j < ROPE_ROUND && b0 + j < b_end; ++j) {
                const i64 b = b0 + j, o = b * batch_stride + t * stride + h * head_dim;
                const float new_lo = lo[j] * c - hi[j] * s, new_hi = hi[j] * c + lo[j] * s;
                st(x, o + d, new_lo);
                st(x, o + half + d, new_hi);
                if (copy) {
                    const i64 col = h * head_dim + d, to = b * copy_batch_stride + t * copy_stride - copy_col0;
                    if (col >= copy_col0 && col < copy_end) st(copy, to + col, new_lo);
                    if (col + half >= copy_col0 && col + half < copy_end) st(copy, to + col + half, new_hi);
                }
            }
        }
    }
}

// For each row with weight ≠ 0: loss = w·(−log softmax[target]) and the row
// becomes grad_scale·w·(softmax − onehot); the excluded class (−1: none) is
// outside the softmax. Rows with weight 0 get loss 0 and gradient 0. Rows are `stride` elements
// apart (the head's padded logits); the padding is neither read nor written.
extern "C" __global__ void softmax_cross_entropy(store_t* logits, const unsigned* targets, const store_t* weights, store_t* losses,
                                                 i64 rows, i64 vocab, i64 stride, i64 excluded, float grad_scale) {
    __shared__ float shared32[32];
    i64 row = blockIdx.x;
    if (row >= rows) return;
    store_t* l = logits + row * stride;
    float w = ld(weights, row);
    if (w == 0.0f) {
        for (i64 c = threadIdx.x; c < vocab; c += blockDim.x) st(l, c, 0.0f);
        if (threadIdx.x == 0) st(losses, row, 0.0f);
        return;
    }
    // Every pass visits a thread's logits in increasing order, eight loads at a time
    // (for_each_strided: the last pass stores over the row it reads).
    const float neg_inf = -__int_as_float(0x7f800000);
    const i64 step = blockDim.x;
    float m = neg_inf;
    for_each_strided(l, threadIdx.x, step, vocab, [&](const i64 c, const float x) {
        if (c != excluded) m = fmaxf(m, x);
    });
    m = block_max(m, shared32);
    float s = 0.0f;
    for_each_strided(l, threadIdx.x, step, vocab, [&](const i64 c, const float x) {
        if (c != excluded) s += expf(x - m);
    });
    float sum = block_sum(s, shared32);
    i64 target = targets[row];
    float e_target = (target == excluded) ? 0.0f : expf(ld(l, target) - m);
    if (threadIdx.x == 0) st(losses, row, w * (logf(sum) - logf(e_target)));
    __syncthreads();
    float g = grad_scale * w / sum;
    for_each_strided(l, threadIdx.x, step, vocab, [&](const i64 c, const float x) {
        float p = (c == excluded) ? 0.0f : expf(x - m);
        float grad = p * g;
        if (c == target) grad -= grad_scale * w;
        st(l, c, grad);
    });
}
