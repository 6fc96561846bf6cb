// Memory, bias, modulation, gated residuals, activations, dropout: one thread
// per element (grid-stride), forward and backward side by side. The hot ones (kernels.rs,
// CHUNKED) move 16-byte chunks where the pointers and extents allow (common.cuh, CHUNK_STRIDE):
// the chunked loop and the plain one compute the same values.

extern "C" __global__ void fill(store_t* dst, i64 n, float value) {
    const i64 bulk = chunked_prefix(n, aligned16(dst));
    float v[VEC];
    for (int k = 0; k < VEC; ++k) v[k] = value;
    CHUNK_STRIDE(i, bulk) st_chunk(dst, i, v);
    TAIL_STRIDE(i, bulk, n) st(dst, i, value);
}

// A bf16 backend's f32 buffers (zeros_f32: the attention's log-sum-exp).
extern "C" __global__ void fill_f32(float* dst, i64 n, float value) {
    GRID_STRIDE(i, n) dst[i] = value;
}

// did_core::backend::RowGroups: groups × rows × cols elements, each side with its own strides.
extern "C" __global__ void copy_row_groups(const store_t* src, i64 src_stride, i64 src_group_stride, store_t* dst,
                                           i64 dst_stride, i64 dst_group_stride, i64 groups, i64 rows, i64 cols) {
    GRID_STRIDE(i, groups * rows * cols) {
        i64 c = i % cols, r = (i / cols) % rows, g = i / (cols * rows);
        dst[g * dst_group_stride + r * dst_stride + c] = src[g * src_group_stride + r * src_stride + c];
    }
}

// x[r·stride + c] += bias[c] for c < cols (did_core::backend::RowMajor: the padding after each
// row is not touched). Where x, the bias and the stride keep every row on a 16-byte boundary,
// the longest multiple of VEC of each row (`body`) goes by chunks and the rest of it one element
// at a time — the head's logits have 50,258 columns, 2 past a multiple of 8, in rows 50,304
// apart; otherwise every element goes one at a time.
extern "C" __global__ void bias_add(store_t* x, const store_t* bias, i64 rows, i64 cols, i64 stride) {
    const i64 body = aligned16(x) && aligned16(bias) && stride % VEC == 0 ? cols - cols % VEC : 0;
    CHUNK_STRIDE(i, rows * body) {
        const i64 c = i % body, at = (i / body) * stride + c;
        float a[VEC], b[VEC];
        ld_chunk(x, at, a);
        ld_chunk(bias, c, b);
        for (int k = 0; k < VEC; ++k) a[k] = a[k] + b[k];
        st_chunk(x, at, a);
    }
    const i64 rest = cols - body;
    TAIL_STRIDE(j, 0, rows * rest) {
        const i64 c = body + j % rest;
        add_to(x, (j / rest) * stride + c, ld(bias, c));
    }
}

// Column sums in two deterministic passes: partial[chunk, c] = Σ over the
// chunk's rows of a[r, c]·b[r, c] (b = 1 when null), then out[c] += Σ_chunk partial.
// Rows are `stride` elements apart (≥ cols: the head's padded logits). Grid z runs over groups
// (the sequences of a batch, for per-sequence sums): group g reads rows·stride elements from
// g·rows·stride, writes its partials after g·chunks·cols, and adds into out[g·cols ..]; the
// sums are those of one call per group.
//
// A block of COLSUM_THREADS is 32 columns × 8 row slices: slice s sums the chunk's rows
// s, s + 8, … (eight loads in flight at a time), then slice 0 adds the eight slices in order.
// (One thread a column walking the chunk, with `cols` threads summing all the partials after,
// left most of the GPU idle: docs/perf/gpu.md, "Measurements behind the code's choices".)
#define COLSUM_SLICES 8
extern "C" __global__ void __launch_bounds__(32 * COLSUM_SLICES) colsum_partial(const store_t* a, const store_t* b, float* partial, i64 rows, i64 cols, i64 stride, i64 rows_per_chunk) {
    __shared__ float slices[COLSUM_SLICES][32];
    const int lane = threadIdx.x & 31, slice = threadIdx.x >> 5;
    const i64 c = (i64)blockIdx.x * 32 + lane;
    const i64 chunk = blockIdx.y, group = blockIdx.z;
    a += group * rows * stride;
    if (b) b += group * rows * stride;
    partial += group * gridDim.y * cols;
    const i64 r0 = chunk * rows_per_chunk, r1 = min(rows, r0 + rows_per_chunk);
    float acc = 0.0f;
    if (c < cols) {
        for (i64 r = r0 + slice; r < r1; r += 8 * COLSUM_SLICES) {
            float va[8], vb[8];
            UNROLL
            for (int k = 0; k < 8; ++k) {
                const i64 rk = r + k * COLSUM_SLICES;
                va[k] = rk < r1 ? ld(a, rk * stride + c) : 0.0f;
                vb[k] = rk < r1 && b ? ld(b, rk * stride + c) : 1.0f;
            }
            for (int k = 0; k < 8; ++k) {
                if (r + k * COLSUM_SLICES >= r1) break;
                acc += b ? va[k] * vb[k] : va[k];
            }
        }
    }
    slices[slice][lane] = acc;
    __syncthreads();
    if (slice == 0 && c < cols) {
        float sum = 0.0f;
        for (int k = 0; k < COLSUM_SLICES; ++k) sum += slices[k][lane];
        partial[chunk * cols + c] = sum;
    }
}

extern "C" __global__ void colsum_finish(const float* partial, i64 chunks, store_t* out, i64 cols, i64 groups) {
    GRID_STRIDE(i, groups * cols) {
        i64 g = i / cols, c = i % cols;
        float acc = 0.0f;
        for (i64 k = 0; k < chunks; ++k) acc += partial[(g * chunks + k) * cols + c];
        add_to(out, i, acc);
    }
}

// adaLN modulation: out = x·(1 + scale[b]) + shift[b].
extern "C" __global__ void modulate_forward(const store_t* x, const store_t* shift, const store_t* scale, store_t* out, i64 tokens, i64 channels, i64 n) {
    if (aligned16(x) && aligned16(shift) && aligned16(scale) && aligned16(out) && channels % VEC == 0) {
        CHUNK_STRIDE(i, n) {
            i64 j = (i / (tokens * channels)) * channels + i % channels;
            float a[VEC], sh[VEC], sc[VEC];
            ld_chunk(x, i, a);
            ld_chunk(shift, j, sh);
            ld_chunk(scale, j, sc);
            for (int k = 0; k < VEC; ++k) a[k] = a[k] * (1.0f + sc[k]) + sh[k];
            st_chunk(out, i, a);
        }
        return;
    }
    GRID_STRIDE(i, n) {
        i64 c = i % channels, b = i / (tokens * channels);
        i64 j = b * channels + c;
        st(out, i, ld(x, i) * (1.0f + ld(scale, j)) + ld(shift, j));
    }
}

extern "C" __global__ void modulate_backward_dx(const store_t* dout, const store_t* scale, store_t* dx, i64 tokens, i64 channels, i64 n) {
    if (aligned16(dout) && aligned16(scale) && aligned16(dx) && channels % VEC == 0) {
        CHUNK_STRIDE(i, n) {
            float d[VEC], sc[VEC], g[VEC];
            ld_chunk(dout, i, d);
            ld_chunk(scale, (i / (tokens * channels)) * channels + i % channels, sc);
            for (int k = 0; k < VEC; ++k) g[k] = d[k] * (1.0f + sc[k]);
            st_chunk(dx, i, g);
        }
        return;
    }
    GRID_STRIDE(i, n) {
        i64 c = i % channels, b = i / (tokens * channels);
        st(dx, i, ld(dout, i) * (1.0f + ld(scale, b * channels + c)));
    }
}

// The gate of the chunk at i (gate null: 1).
__device__ __forceinline__ void gate_chunk(const store_t* gate, i64 i, i64 tokens, i64 channels, float* g) {
    if (gate) {
        ld_chunk(gate, (i / (tokens * channels)) * channels + i % channels, g);
    } else {
        for (int k = 0; k < VEC; ++k) g[k] = 1.0f;
    }
}


// Inverted dropout's factor for element i (did_core::backend::Backend::dropout, the `dropout`
// kernel below): keep_scale where the top 24 bits of word i of the stream's row 0, as a
// fraction, are ≥ p, else 0. `b` is Philox block i / 4 of the stream.
__device__ __forceinline__ bool dropout_keeps(const u32x4& b, unsigned word, float p) {
    return (float)(b.v[word] >> 8) * (1.0f / 16777216.0f) >= p;
}
__device__ __forceinline__ u32x4 dropout_block(i64 i, unsigned key0, unsigned key1, unsigned step, unsigned tag) {
    return philox4x32_10((unsigned)i >> 2, 0u, step, tag, key0, key1);
}
// y as bias_add then dropout would store it: (y + bias) rounded, then · keep_scale rounded or 0.
// p = 0: no dropout.
#define DROPOUT_ARGS float p, float keep_scale, unsigned key0, unsigned key1, unsigned step, unsigned tag

// out = residual + gate[b]·y (gate null: 1); out may be residual itself. With a bias (not null)
// y += bias first, and with p > 0 inverted dropout after it: y is stored back as it then is (the
// backward reads the dropped y) and summed as stored, so the result is bias_add's, then
// dropout's, then this one's, bit for bit.
__device__ __forceinline__ void gated_residual(const store_t* residual, store_t* y, const store_t* bias,
                                               const store_t* gate, store_t* out, i64 tokens, i64 channels, i64 n,
                                               DROPOUT_ARGS) {
    const bool rewrite_y = bias || p > 0.0f;
    if (aligned16(residual) && aligned16(y) && aligned16(bias) && aligned16(gate) && aligned16(out) &&
        channels % VEC == 0) {
        CHUNK_STRIDE(i, n) {
            float r[VEC], yv[VEC], g[VEC];
            ld_chunk(residual, i, r);
            ld_chunk(y, i, yv);
            if (bias) {
                float b[VEC];
                ld_chunk(bias, i % channels, b);
                for (int k = 0; k < VEC; ++k) yv[k] = as_stored(yv[k] + b[k]);
            }
            if (p > 0.0f) {
                // A chunk starts at a multiple of 4: a Philox block serves four of its elements.
                for (int q = 0; q < VEC / 4; ++q) {
                    const u32x4 blk = dropout_block(i + 4 * q, key0, key1, step, tag);
                    for (int e = 0; e < 4; ++e)
                        yv[4 * q + e] = dropout_keeps(blk, e, p) ? as_stored(yv[4 * q + e] * keep_scale) : 0.0f;
                }
            }
            if (rewrite_y) st_chunk(y, i, yv);
            gate_chunk(gate, i, tokens, channels, g);
            for (int k = 0; k < VEC; ++k) r[k] = r[k] + g[k] * yv[k];
            st_chunk(out, i, r);
        }
        return;
    }
    GRID_STRIDE(i, n) {
        float g = 1.0f;
        if (gate) g = ld(gate, (i / (tokens * channels)) * channels + i % channels);
        float yv = ld(y, i);
        if (bias) yv = as_stored(yv + ld(bias, i % channels));
        if (p > 0.0f) {
            const u32x4 blk = dropout_block(i, key0, key1, step, tag);
            yv = dropout_keeps(blk, (unsigned)i & 3u, p) ? as_stored(yv * keep_scale) : 0.0f;
        }
        if (rewrite_y) st(y, i, yv);
        st(out, i, ld(residual, i) + g * yv);
    }
}

// residual += gate[b]·y, in place.
extern "C" __global__ void gated_residual_forward(store_t* residual, const store_t* y, const store_t* gate, i64 tokens,
                                                  i64 channels, i64 n) {
    gated_residual(residual, (store_t*)y, nullptr, gate, residual, tokens, channels, n, 0.0f, 0.0f, 0u, 0u, 0u, 0u);  // y is only read
}

// out = residual + gate·y: the in-place form on a copy, in one pass; with a bias (not null),
// y += bias first (a linear layer's bias and the residual it feeds), and with p > 0 the branch's
// dropout after it. y is written only then.
extern "C" __global__ void gated_residual_forward_into(const store_t* residual, store_t* y, const store_t* bias,
                                                       const store_t* gate, store_t* out, i64 tokens, i64 channels,
                                                       i64 n, DROPOUT_ARGS) {
    gated_residual(residual, y, bias, gate, out, tokens, channels, n, p, keep_scale, key0, key1, step, tag);
}

// dy = gate[b]·dresidual, and with p > 0 the branch's dropout backward on it (the same mask as
// the forward's): what gated_residual_backward_dy then dropout store, bit for bit.
extern "C" __global__ void gated_residual_backward_dy(const store_t* dres, const store_t* gate, store_t* dy, i64 tokens,
                                                      i64 channels, i64 n, DROPOUT_ARGS) {
    if (aligned16(dres) && aligned16(gate) && aligned16(dy) && channels % VEC == 0) {
        CHUNK_STRIDE(i, n) {
            float d[VEC], g[VEC], a[VEC];
            ld_chunk(dres, i, d);
            gate_chunk(gate, i, tokens, channels, g);
            for (int k = 0; k < VEC; ++k) a[k] = g[k] * d[k];
            if (p > 0.0f) {
                for (int q = 0; q < VEC / 4; ++q) {
                    const u32x4 blk = dropout_block(i + 4 * q, key0, key1, step, tag);
                    for (int e = 0; e < 4; ++e)
                        a[4 * q + e] = dropout_keeps(blk, e, p) ? as_stored(as_stored(a[4 * q + e]) * keep_scale) : 0.0f;
                }
            }
            st_chunk(dy, i, a);
        }
        return;
    }
    GRID_STRIDE(i, n) {
        float g = 1.0f;
        if (gate) g = ld(gate, (i / (tokens * channels)) * channels + i % channels);
        float a = g * ld(dres, i);
        if (p > 0.0f) {
            const u32x4 blk = dropout_block(i, key0, key1, step, tag);
            a = dropout_keeps(blk, (unsigned)i & 3u, p) ? as_stored(as_stored(a) * keep_scale) : 0.0f;
        }
        st(dy, i, a);
    }
}


extern "C" __global__ void gelu_forward(const store_t* x, store_t* out, i64 n) {
    GRID_STRIDE(i, n) { float y, dy; gelu_parts(ld(x, i), &y, &dy); st(out, i, y); }
}

// bias_add then gelu_forward in one pass: x keeps the (stored) pre-activation for the backward.
extern "C" __global__ void bias_gelu_forward(store_t* x, const store_t* bias, store_t* out, i64 rows, i64 cols) {
    if (aligned16(x) && aligned16(bias) && aligned16(out) && cols % VEC == 0) {
        CHUNK_STRIDE(i, rows * cols) {
            float a[VEC], b[VEC], o[VEC];
            ld_chunk(x, i, a);
            ld_chunk(bias, i % cols, b);
            Chunk pre;
            for (int k = 0; k < VEC; ++k) pre.s[k] = to_store(a[k] + b[k]);
            *as_vector_mut(x + i) = pre.u;
            for (int k = 0; k < VEC; ++k) { float dy; gelu_parts(ld(pre.s, k), &o[k], &dy); }
            st_chunk(out, i, o);
        }
        return;
    }
    GRID_STRIDE(i, rows * cols) {
        store_t pre = to_store(ld(x, i) + ld(bias, i % cols));
        x[i] = pre;
        float y, dy;
        gelu_parts(ld(&pre, 0), &y, &dy);
        st(out, i, y);
    }
}

extern "C" __global__ void gelu_backward(const store_t* dout, const store_t* x, store_t* dx, i64 n) {
    const i64 bulk = chunked_prefix(n, aligned16(dout) && aligned16(x) && aligned16(dx));
    CHUNK_STRIDE(i, bulk) {
        float d[VEC], a[VEC], g[VEC];
        ld_chunk(dout, i, d);
        ld_chunk(x, i, a);
        for (int k = 0; k < VEC; ++k) { float y, dy; gelu_parts(a[k], &y, &dy); g[k] = d[k] * dy; }
        st_chunk(dx, i, g);
    }
    TAIL_STRIDE(i, bulk, n) { float y, dy; gelu_parts(ld(x, i), &y, &dy); st(dx, i, ld(dout, i) * dy); }
}

extern "C" __global__ void silu_forward(const store_t* x, store_t* out, i64 n) {
    GRID_STRIDE(i, n) { float v = ld(x, i); st(out, i, v / (1.0f + expf(-v))); }
}

extern "C" __global__ void silu_backward(const store_t* dout, const store_t* x, store_t* dx, i64 n) {
    GRID_STRIDE(i, n) {
        float v = ld(x, i), s = 1.0f / (1.0f + expf(-v));
        st(dx, i, ld(dout, i) * s * (1.0f + v * (1.0f - s)));
    }
}

// Inverted dropout: element i is kept iff the top 24 bits of word i of the
// stream's row 0, as a fraction, are ≥ p (did_core::rng::RngStream::uniform_f32).
extern "C" __global__ void dropout(store_t* x, i64 n, float p, float keep_scale, unsigned key0, unsigned key1, unsigned step, unsigned tag) {
    const i64 bulk = chunked_prefix(n, aligned16(x));
    // A chunk starts at a multiple of 4: each Philox block serves four of its elements.
    CHUNK_STRIDE(i, bulk) {
        float a[VEC];
        ld_chunk(x, i, a);
        for (int q = 0; q < VEC / 4; ++q) {
            const u32x4 b = dropout_block(i + 4 * q, key0, key1, step, tag);
            for (int e = 0; e < 4; ++e) a[4 * q + e] = dropout_keeps(b, e, p) ? a[4 * q + e] * keep_scale : 0.0f;
        }
        st_chunk(x, i, a);
    }
    TAIL_STRIDE(i, bulk, n) {
        const u32x4 b = dropout_block(i, key0, key1, step, tag);
        st(x, i, dropout_keeps(b, (unsigned)i & 3u, p) ? ld(x, i) * keep_scale : 0.0f);
    }
}

extern "C" __global__ void scale(store_t* x, i64 n, float factor) {
    const i64 bulk = chunked_prefix(n, aligned16(x));
    CHUNK_STRIDE(i, bulk) {
        float a[VEC];
        ld_chunk(x, i, a);
        for (int k = 0; k < VEC; ++k) a[k] = a[k] * factor;
        st_chunk(x, i, a);
    }
    TAIL_STRIDE(i, bulk, n) st(x, i, ld(x, i) * factor);
}

// One AdamW update of one element (`adamw` and `optimizer_step`): moments updated in place, the
// new weight returned.
struct AdamWArgs {
    float lr, beta1, beta2, eps, weight_decay, bc1, bc2;
};
__device__ __forceinline__ float adamw_element(const AdamWArgs& a, float p, float g, float* m, float* v) {
    float mi = a.beta1 * *m + (1.0f - a.beta1) * g;
    float vi = a.beta2 * *v + (1.0f - a.beta2) * g * g;
    *m = mi;
    *v = vi;
    float mhat = mi / a.bc1, vhat = vi / a.bc2;
    return p * (1.0f - a.lr * a.weight_decay) - a.lr * mhat / (sqrtf(vhat) + a.eps);
}

// AdamW with the bias corrections computed on the host (as the CPU reference).
extern "C" __global__ void adamw(store_t* params, const store_t* grads, store_t* m, store_t* v, i64 n,
                                 float lr, float beta1, float beta2, float eps, float weight_decay, float bc1, float bc2) {
    const AdamWArgs a{lr, beta1, beta2, eps, weight_decay, bc1, bc2};
    const i64 bulk = chunked_prefix(n, aligned16(params) && aligned16(grads) && aligned16(m) && aligned16(v));
    CHUNK_STRIDE(i, bulk) {
        float g[VEC], mc[VEC], vc[VEC], pc[VEC];
        ld_chunk(grads, i, g);
        ld_chunk(m, i, mc);
        ld_chunk(v, i, vc);
        ld_chunk(params, i, pc);
        for (int k = 0; k < VEC; ++k) pc[k] = adamw_element(a, pc[k], g[k], &mc[k], &vc[k]);
        st_chunk(m, i, mc);
        st_chunk(v, i, vc);
        st_chunk(params, i, pc);
    }
    TAIL_STRIDE(i, bulk, n) {
        float mi = ld(m, i), vi = ld(v, i);
        const float p = adamw_element(a, ld(params, i), ld(grads, i), &mi, &vi);
        st(m, i, mi);
        st(v, i, vi);
        st(params, i, p);
    }
}

__device__ __forceinline__ float ema_element(float ema, float p, float decay) { return decay * ema + (1.0f - decay) * p; }

extern "C" __global__ void ema_update(store_t* ema, const store_t* params, i64 n, float decay) {
    const i64 bulk = chunked_prefix(n, aligned16(ema) && aligned16(params));
    CHUNK_STRIDE(i, bulk) {
        float e[VEC], pc[VEC];
        ld_chunk(ema, i, e);
        ld_chunk(params, i, pc);
        for (int k = 0; k < VEC; ++k) e[k] = ema_element(e[k], pc[k], decay);
        st_chunk(ema, i, e);
    }
    TAIL_STRIDE(i, bulk, n) st(ema, i, ema_element(ld(ema, i), ld(params, i), decay));
}

// f32 values (a master copy: zeros_f32 / upload_f32) into storage, rounded to nearest even.
extern "C" __global__ void round_f32_into(const float* src, store_t* dst, i64 n) {
    const i64 bulk = chunked_prefix(n, aligned16(src) && aligned16(dst));
    CHUNK_STRIDE(i, bulk) {
        float a[VEC];
        ld_chunk_f32(src, i, a);
        st_chunk(dst, i, a);
    }
    TAIL_STRIDE(i, bulk, n) st(dst, i, src[i]);
}

// did_core::backend::Backend::optimizer_step in one pass over the parameters: the gradient
// times grad_scale, AdamW on the f32 master with f32 moments, the EMA's f32 master (ema null:
// none this step), and the storage copies of both rewritten from their masters (null: storage
// is f32 and the master is what the model reads). Every value as scale, adamw, ema_update and
// round_f32_into leave it in f32 storage; in bf16 storage only the gradients and the copies
// are bf16, so no update is lost to rounding the weights, moments or EMA.
extern "C" __global__ void optimizer_step(float* master, store_t* rounded, const store_t* grads, float* m, float* v,
                                          float* ema, store_t* ema_rounded, i64 n, float grad_scale, float lr,
                                          float beta1, float beta2, float eps, float weight_decay, float bc1,
                                          float bc2, float ema_decay) {
    const AdamWArgs a{lr, beta1, beta2, eps, weight_decay, bc1, bc2};
    const i64 bulk = chunked_prefix(n, aligned16(master) && aligned16(rounded) && aligned16(grads) && aligned16(m) &&
                                           aligned16(v) && aligned16(ema) && aligned16(ema_rounded));
    CHUNK_STRIDE(i, bulk) {
        float g[VEC], mc[VEC], vc[VEC], pc[VEC];
        ld_chunk(grads, i, g);
        ld_chunk_f32(m, i, mc);
        ld_chunk_f32(v, i, vc);
        ld_chunk_f32(master, i, pc);
        for (int k = 0; k < VEC; ++k) pc[k] = adamw_element(a, pc[k], g[k] * grad_scale, &mc[k], &vc[k]);
        st_chunk_f32(m, i, mc);
        st_chunk_f32(v, i, vc);
        st_chunk_f32(master, i, pc);
        if (rounded) st_chunk(rounded, i, pc);
        if (ema) {
            float e[VEC];
            ld_chunk_f32(ema, i, e);
            for (int k = 0; k < VEC; ++k) e[k] = ema_element(e[k], pc[k], ema_decay);
            st_chunk_f32(ema, i, e);
            if (ema_rounded) st_chunk(ema_rounded, i, e);
        }
    }
    TAIL_STRIDE(i, bulk, n) {
        const float p = adamw_element(a, master[i], ld(grads, i) * grad_scale, &m[i], &v[i]);
        master[i] = p;
        if (rounded) st(rounded, i, p);
        if (ema) {
            const float e = ema_element(ema[i], p, ema_decay);
            ema[i] = e;
            if (ema_rounded) st(ema_rounded, i, e);
        }
    }
}

// Σ x or Σ x² in f64: one partial per block (fixed grid), summed on the host in order.
#define SUM_THREADS 256  // the launch's block (the host's THREADS)
extern "C" __global__ void __launch_bounds__(SUM_THREADS) sum_partial(const store_t* x, i64 n, int squares, double* partial) {
    __shared__ double shared[SUM_THREADS];
    double acc = 0.0;
    // A chunk a load: over a whole parameter vector, a thread of this fixed grid makes
    // thousands of iterations, each waiting its load when it is one element.
    const i64 bulk = chunked_prefix(n, aligned16(x));
    CHUNK_STRIDE(i, bulk) {
        float a[VEC];
        ld_chunk(x, i, a);
        for (int k = 0; k < VEC; ++k) { double v = (double)a[k]; acc += squares ? v * v : v; }
    }
    TAIL_STRIDE(i, bulk, n) { double v = (double)ld(x, i); acc += squares ? v * v : v; }
    shared[threadIdx.x] = acc;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if ((int)threadIdx.x < s) shared[threadIdx.x] += shared[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) partial[blockIdx.x] = shared[0];
}

// Embedding rows: out[r, c] = table[ids[r], c] (ids checked on the host).
extern "C" __global__ void embedding_forward(const unsigned* ids, const store_t* table, store_t* out, i64 rows, i64 channels) {
    GRID_STRIDE(i, rows * channels) {
        i64 r = i / channels, c = i % channels;
        out[i] = table[(i64)ids[r] * channels + c];
    }
}

// dtable[ids[r], c] += dout[r, c], with the rows grouped by id on the host: group g is id
// group_ids[g] with rows group_rows[group_start[g] .. group_start[g + 1]], increasing. One block
// per (group, 2·blockDim.x channels), two channels a thread: each element adds its rows in the
// CPU's order, in f32, and is stored once (bit for bit the CPU in f32 mode; one bf16 rounding in
// bf16), with no atomics and every distinct id in parallel. The mask token owns about half the
// x_t rows, so one group is thousands of rows long: a lane loads one row index, shuffles hand
// them round, and each thread has EMBED_ROWS rows' loads in flight (and the next indices) — a
// loop with eight loads in flight was far slower on that one id (docs/perf/gpu.md, "Measurements
// behind the code's choices").
#define EMBED_ROWS 32
extern "C" __global__ void embedding_backward(const unsigned* group_start, const unsigned* group_ids,
                                              const unsigned* group_rows, const store_t* dout, store_t* dtable,
                                              i64 channels) {
    const i64 g = blockIdx.x, id = group_ids[g];
    const unsigned first = group_start[g], end = group_start[g + 1];
    const int lane = threadIdx.x & 31;
    const i64 c = ((i64)blockIdx.y * blockDim.x + threadIdx.x) * 2;
    const bool has0 = c < channels, has1 = c + 1 < channels;  // lanes past the end still shuffle
    float acc0 = has0 ? ld(dtable, id * channels + c) : 0.0f, acc1 = has1 ? ld(dtable, id * channels + c + 1) : 0.0f;
    unsigned next = first + lane < end ? group_rows[first + lane] : 0u;
    for (unsigned k = first; k < end; k += EMBED_ROWS) {
        const unsigned mine = next;
        next = k + EMBED_ROWS + lane < end ? group_rows[k + EMBED_ROWS + lane] : 0u;
        const int n = (int)min((unsigned)EMBED_ROWS, end - k);
        float v0[EMBED_ROWS], v1[EMBED_ROWS];
UNROLL
        for (int j = 0; j < EMBED_ROWS; ++j) {
            const i64 row = (i64)__shfl_sync(0xffffffffu, mine, j);
            v0[j] = j < n && has0 ? ld(dout, row * channels + c) : 0.0f;
            v1[j] = j < n && has1 ? ld(dout, row * channels + c + 1) : 0.0f;
        }
        for (int j = 0; j < n; ++j) { acc0 += v0[j]; acc1 += v1[j]; }
    }
    if (has0) st(dtable, id * channels + c, acc0);
    if (has1) st(dtable, id * channels + c + 1, acc1);
}
