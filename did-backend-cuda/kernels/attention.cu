// Masked multi-head attention, forward and backward, with no L × L matrix in
// memory: one warp per (sequence, head, query) walks only the key ranges the
// mask allows (online softmax), and the backward recomputes probabilities from
// the saved log-sum-exp. dK and dV come from a second kernel with one warp per
// key, so nothing is accumulated with atomics and results are deterministic.
// Lane j of a warp holds channels j, j + 32, … of the head (head_dim ≤ 256).
//
// The mask arrives as did_core::mask::AttentionMask flattened: kind 0 =
// Bd3Training {p0 = seq_len, p1 = block}, 1 = BlockCausal {p0 = block,
// p1 = query_offset, p2 = key_offset}, 2 = Full, 3 = Causal {p1 = query_offset,
// p2 = key_offset}; window < 0 means none.

#define MAX_PER_LANE 8

struct Ranges { i64 a0, a1, b0, b1; };

__device__ __forceinline__ i64 sat_sub(i64 a, i64 b) { return a > b ? a - b : 0; }

__device__ Ranges key_ranges(int kind, i64 p0, i64 p1, i64 p2, i64 window, i64 q, i64 kv_len) {
    Ranges r; r.a0 = 0; r.a1 = 0; r.b0 = 0; r.b1 = 0;
    if (kind == 0) {
        i64 l = p0, b = p1;
        if (q < l) {
            i64 blk = q / b;
            r.a0 = blk * b; r.a1 = min((blk + 1) * b, l);
            r.b0 = l; r.b1 = l + blk * b;
        } else {
            i64 blk = (q - l) / b;
            r.a0 = l; r.a1 = l + min((blk + 1) * b, l);
        }
    } else if (kind == 2) {
        r.a1 = kv_len;
    } else {
        i64 end = kind == 1 ? ((p1 + q) / p0 + 1) * p0 : p1 + q + 1;
        i64 start = window >= 0 ? sat_sub(end, window) : 0;
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
                                             const store_t* q, const store_t* k, const store_t* v, store_t* out, store_t* lse) {
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
    if (lane == 0) st(lse, (b * s.heads + h) * s.q_len + qi, l > 0.0f ? m + logf(l) : neg_inf);
}

// dQ, and delta = rowsum(dO ∘ O) per (sequence, head, query) for the dK/dV kernel.
extern "C" __global__ void attention_backward_dq(Shape s, int kind, i64 p0, i64 p1, i64 p2, i64 window, float scale,
                                                 const store_t* dout, const store_t* q, const store_t* k, const store_t* v,
                                                 const store_t* out, const store_t* lse, store_t* dq, float* delta) {
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
    float lq = ld(lse, li);
    if (lq == -__int_as_float(0x7f800000)) return;  // sees no key: no gradient
    Ranges r = key_ranges(kind, p0, p1, p2, window, qi, s.kv_len);
    for (int part = 0; part < 2; ++part) {
        i64 k0 = part ? r.b0 : r.a0, k1 = part ? r.b1 : r.a1;
        for (i64 key = k0; key < k1; ++key) {
            const store_t* kp = kb + key * s.k_stride;
            float p = expf(dot_lanes(qr, kp, lane, hd) * scale - lq);
            float dp = dot_lanes(dor, vb + key * s.v_stride, lane, hd);
            float ds = p * (dp - dd) * scale;
            for (int j = 0; j < MAX_PER_LANE; ++j) { i64 d = lane + 32 * j; if (d < hd) g[j] += ds * ld(kp, d); }
        }
    }
    for (int j = 0; j < MAX_PER_LANE; ++j) { i64 d = lane + 32 * j; if (d < hd) add_to(dq, o + d, g[j]); }
}

// dK and dV: one warp per (sequence, head, key) over the queries that see it.
extern "C" __global__ void attention_backward_dkv(Shape s, int kind, i64 p0, i64 p1, i64 p2, i64 window, float scale,
                                                  const store_t* dout, const store_t* q, const store_t* k, const store_t* v,
                                                  const store_t* lse, const float* delta, store_t* dk, store_t* dv) {
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
        float p = expf(dot_lanes(kr, qp, lane, hd) * scale - ld(lse, li));
        float dp = dot_lanes(vr, dop, lane, hd);
        float ds = p * (dp - delta[li]) * scale;
        for (int j = 0; j < MAX_PER_LANE; ++j) {
            i64 d = lane + 32 * j;
            if (d < hd) { gv[j] += p * ld(dop, d); gk[j] += ds * ld(qp, d); }
        }
    }
    i64 o = b * s.kv_len * width + ki * width + h * hd;
    for (int j = 0; j < MAX_PER_LANE; ++j) {
        i64 d = lane + 32 * j;
        if (d < hd) { add_to(dk, o + d, gk[j]); add_to(dv, o + d, gv[j]); }
    }
}
