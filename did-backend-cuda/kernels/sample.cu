// Token drawing on the device, one block per logits row: what
// did_core::sample::categorical::draw_token computes (SUBS softmax without [MASK], nucleus, f64
// Gumbel-max from the row's Philox stream, three confidences), so a sampler downloads 32 bytes
// a row instead of the whole vocabulary.
//
// The device sums in another order than the host and its exp / log may differ from libm by an
// ulp, so a row's draw is only as good as its margins. Each row comes with a certificate:
// `certain` is set when every decision the host would take on the same logits is at least a
// margin away from flipping (nucleus mass 1e-9 from p on both sides of the cut, the two best
// Gumbel scores 1e-12 apart, no two candidates across the cut closer than 1e-13 in logit); the
// backend redraws every other row on the host with draw_token, so tokens agree with the CPU
// reference row for row. Rows without a finite logit are always left to the host.
//
// Deterministic: the nucleus walk sums probabilities as 2^-60 fixed-point integers (integer
// atomics do not depend on order), every f64 sum goes through a fixed tree.

typedef unsigned long long u64;

#define DRAW_THREADS 512
// Radix digits of the rank key: five passes of 11 bits and one of 9 cover 64 bits; most rows
// stop after three.
#define DIGIT_BITS 11
#define BUCKETS (1 << DIGIT_BITS)
#define SEGMENTS 32
// The nucleus walk's fixed point: 2^60 · p, truncated; a row's total stays below 2^61.
#define FIXED_ONE 1152921504606846976.0
#define MASS_MARGIN 1e-9
#define SCORE_MARGIN 1e-12
#define LOGIT_MARGIN 1e-13

__device__ __forceinline__ bool finite_logit(float x) { return (__float_as_uint(x) & 0x7f800000u) != 0x7f800000u; }

// Larger key ranks first: by logit (so by probability) descending, then by id ascending, the
// host's total order. -0 counts as +0, as their probabilities are equal.
__device__ __forceinline__ u64 rank_key(float x, unsigned v) {
    unsigned u = x == 0.0f ? 0u : __float_as_uint(x);
    unsigned ordered = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return ((u64)ordered << 32) | (u64)(0xffffffffu - v);
}
__device__ __forceinline__ unsigned key_id(u64 key) { return 0xffffffffu - (unsigned)key; }

__device__ __forceinline__ u64 to_fixed(double p) { return (u64)(p * FIXED_ONE); }
__device__ __forceinline__ double from_fixed(u64 f) { return (double)f / FIXED_ONE; }

// *slot += v for a 64-bit fixed-point mass in shared memory, as two native 32-bit atomic adds: a
// 64-bit shared add is a compare-and-swap loop on sm_90 (ATOMS.CAST.SPIN.64 in the SASS), and
// in the radix select's first pass most of a row's 50,258 tokens fall in a few buckets. The add
// that wraps the low word carries into the high word, so the total is Σ v exactly, whatever the
// order (integers).
__device__ __forceinline__ void add_fixed(u64* slot, u64 v) {
    if (v == 0) return;
    unsigned* word = (unsigned*)slot;  // little-endian: word[0] is the low half
    const unsigned lo = (unsigned)v, old = atomicAdd(&word[0], lo);
    const unsigned hi = (unsigned)(v >> 32) + (old + lo < old ? 1u : 0u);
    if (hi) atomicAdd(&word[1], hi);
}

// did_core::rng::RngStream::uniform: the f64 in (0, 1) at (row, index).
__device__ __forceinline__ double stream_uniform(const unsigned* spec, unsigned index) {
    u32x4 b = philox4x32_10(index >> 1, spec[4], spec[2], spec[3], spec[0], spec[1]);
    unsigned half = (index & 1u) * 2u;
    u64 bits = ((u64)b.v[half + 1] << 32) | (u64)b.v[half];
    return ((double)(bits >> 12) + 0.5) * (1.0 / 4503599627370496.0);
}

__device__ double block_sum_f64(double x, double* shared32) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    __syncthreads();
    if (lane == 0) shared32[warp] = x;
    __syncthreads();
    double total = 0.0;
    for (int w = 0; w < warps; ++w) total += shared32[w];
    return total;
}

// Block-wide min (want_max = 0) or max of one u64 per thread.
__device__ u64 block_extreme_u64(u64 x, int want_max, u64* shared32) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (int o = 16; o > 0; o >>= 1) {
        u64 y = __shfl_xor_sync(0xffffffffu, x, o);
        x = want_max ? (y > x ? y : x) : (y < x ? y : x);
    }
    __syncthreads();
    if (lane == 0) shared32[warp] = x;
    __syncthreads();
    u64 r = shared32[0];
    for (int w = 1; w < warps; ++w) r = want_max ? (shared32[w] > r ? shared32[w] : r) : (shared32[w] < r ? shared32[w] : r);
    return r;
}

// The Gumbel race's leader: best score (the smaller id on a tie) and the runner-up's score.
struct Race { double best; unsigned id; double second; };
__device__ __forceinline__ bool ahead(double s, unsigned id, double t, unsigned jd) { return s > t || (s == t && id < jd); }
__device__ __forceinline__ Race merge_races(Race a, Race b) {
    Race r;
    if (ahead(a.best, a.id, b.best, b.id)) { r.best = a.best; r.id = a.id; r.second = fmax(a.second, b.best); }
    else { r.best = b.best; r.id = b.id; r.second = fmax(b.second, a.best); }
    return r;
}
__device__ Race block_race(Race x, double* shared_best, unsigned* shared_id, double* shared_second) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (int o = 16; o > 0; o >>= 1) {
        Race y;
        y.best = __shfl_xor_sync(0xffffffffu, x.best, o);
        y.id = __shfl_xor_sync(0xffffffffu, x.id, o);
        y.second = __shfl_xor_sync(0xffffffffu, x.second, o);
        x = merge_races(x, y);
    }
    __syncthreads();
    if (lane == 0) { shared_best[warp] = x.best; shared_id[warp] = x.id; shared_second[warp] = x.second; }
    __syncthreads();
    Race r; r.best = shared_best[0]; r.id = shared_id[0]; r.second = shared_second[0];
    for (int w = 1; w < warps; ++w) {
        Race y; y.best = shared_best[w]; y.id = shared_id[w]; y.second = shared_second[w];
        r = merge_races(r, y);
    }
    return r;
}

// One row per block of DRAW_THREADS threads. `specs` holds five words a row: the stream's key
// (two words), step and tag, and the stream row. Writes `ids[2r] = token, ids[2r + 1] =
// certain` and `confidence[3r..] = nucleus, raw, max`.
extern "C" __global__ void __launch_bounds__(DRAW_THREADS, 1) draw_tokens(
    const store_t* logits, i64 vocab, i64 mask_id, const unsigned* specs, double top_p, int smallest_cover,
    unsigned* ids, double* confidence) {
    __shared__ unsigned count[BUCKETS];
    __shared__ u64 mass[BUCKETS];
    __shared__ u64 segment_mass[SEGMENTS];
    __shared__ unsigned segment_count[SEGMENTS];
    __shared__ float shared_f[32];
    __shared__ double shared_d[32], shared_d2[32];
    __shared__ unsigned shared_u[32];
    __shared__ u64 shared_k[32];
    __shared__ int walk_digit;
    __shared__ unsigned walk_count;
    __shared__ u64 walk_before, found_key;

    const i64 r = blockIdx.x, tid = threadIdx.x, step = blockDim.x;
    const store_t* x = logits + r * vocab;
    const unsigned* spec = specs + 5 * r;

    // SUBS softmax: [MASK] and non-finite logits get probability 0.
    float m = -__int_as_float(0x7f800000);
    for_each_strided(x, tid, step, vocab, [&](const i64 v, const float xv) {
        if (v != mask_id && finite_logit(xv)) m = fmaxf(m, xv);
    });
    m = block_max(m, shared_f);
    if (!finite_logit(m)) {
        // The host's uniform fallback.
        if (tid == 0) { ids[2 * r] = 0; ids[2 * r + 1] = 0; }
        return;
    }
    const double max_logit = (double)m;
    double sum = 0.0;
    for_each_strided(x, tid, step, vocab, [&](const i64 v, const float xv) {
        if (v != mask_id && finite_logit(xv)) sum += exp((double)xv - max_logit);
    });
    const double inv = 1.0 / block_sum_f64(sum, shared_d);
    // The probability of v, or 0 for a token that takes no part.
#define PROB(v, xv) ((v) != mask_id && finite_logit(xv) ? exp((double)(xv) - max_logit) * inv : 0.0)
    // PROB(v, xv) > 0 with an f64 exp only where it could underflow: exp(d) ≥ 2^-1010 for
    // d > -700 and inv ≥ 1 / vocab > 2^-32, so their product is a positive (subnormal at worst)
    // double. The passes after the first radix pass test a token's part this way, so a row
    // takes two f64 exps a token (the sum and the first histogram) instead of four.
#define POSITIVE_PROB(v, xv) \
    ((v) != mask_id && finite_logit(xv) && ((double)(xv) - max_logit > -700.0 || PROB(v, xv) > 0.0))

    bool certain = true;
    u64 threshold = 0;  // kept: candidates whose key is ≥ threshold
    if (top_p < 1.0) {
        // Radix-select the crossing token: the first, in rank order, whose cumulative mass
        // (counting itself) exceeds p (reaches p for SmallestCover).
        u64 prefix = 0, before = 0;
        int low = 64;
        bool crossing = false;
        unsigned in_bucket = 0;
        while (low > 0) {
            const int width = low < DIGIT_BITS ? low : DIGIT_BITS, shift = low - width;
            const int buckets = 1 << width, per_segment = buckets / SEGMENTS;
            for (int b = tid; b < BUCKETS; b += step) { count[b] = 0; mass[b] = 0; }
            __syncthreads();
            for_each_strided(x, tid, step, vocab, [&](const i64 v, const float xv) {
                u64 key = rank_key(xv, (unsigned)v);
                if (low < 64 && (key >> low) != prefix) return;
                double p = PROB(v, xv);
                if (p > 0.0) {
                    int d = (int)((key >> shift) & (u64)(buckets - 1));
                    atomicAdd(&count[d], 1u);
                    add_fixed(&mass[d], to_fixed(p));
                }
            });
            __syncthreads();
            // Segment j holds the buckets [buckets − (j + 1)·per_segment, buckets − j·per_segment).
            if (tid < SEGMENTS) {
                u64 sm = 0;
                unsigned sc = 0;
                for (int b = buckets - (int)tid * per_segment - 1; b >= buckets - ((int)tid + 1) * per_segment; --b) {
                    sm += mass[b];
                    sc += count[b];
                }
                segment_mass[tid] = sm;
                segment_count[tid] = sc;
            }
            __syncthreads();
            if (tid == 0) {
                u64 cum = before;
                int digit = -1;
                unsigned n = 0;
                for (int j = 0; j < SEGMENTS && digit < 0; ++j) {
                    if (segment_count[j] == 0) continue;
                    double through = from_fixed(cum + segment_mass[j]);
                    if (!(smallest_cover ? through >= top_p : through > top_p)) { cum += segment_mass[j]; continue; }
                    for (int b = buckets - j * per_segment - 1; b >= buckets - (j + 1) * per_segment; --b) {
                        if (count[b] == 0) continue;
                        double t = from_fixed(cum + mass[b]);
                        if (smallest_cover ? t >= top_p : t > top_p) { digit = b; n = count[b]; break; }
                        cum += mass[b];
                    }
                }
                walk_digit = digit;
                walk_count = n;
                walk_before = cum;
            }
            __syncthreads();
            before = walk_before;
            if (walk_digit < 0) break;  // nothing crosses: every candidate is kept
            crossing = true;
            prefix = (prefix << width) | (u64)walk_digit;
            low = shift;
            in_bucket = walk_count;
            if (in_bucket == 1) break;
        }
        if (!crossing) {
            certain = top_p - from_fixed(before) > MASS_MARGIN;
        } else {
            // The crossing token's full key.
            u64 key_c = prefix;
            if (low > 0) {
                if (tid == 0) found_key = 0;
                __syncthreads();
                for_each_strided(x, tid, step, vocab, [&](const i64 v, const float xv) {
                    u64 key = rank_key(xv, (unsigned)v);
                    if ((key >> low) == prefix && POSITIVE_PROB(v, xv)) found_key = key;
                });
                __syncthreads();
                key_c = found_key;
            }
            const unsigned id_c = key_id(key_c);
            const float x_c = ld(x, id_c);
            const double p_c = PROB((i64)id_c, x_c);
            certain = top_p - from_fixed(before) > MASS_MARGIN && from_fixed(before + to_fixed(p_c)) - top_p > MASS_MARGIN;
            // The crossing token is dropped by BD3's rule, kept by SmallestCover's, and kept
            // when it is the top token (one is always kept).
            const bool keep_c = smallest_cover || before == 0;
            threshold = keep_c ? key_c : key_c + 1;
            // The host ranks by probability: two logits a hair apart may tie there, and a tie
            // across the cut goes by id. Such rows go to the host.
            u64 above = ~0ull, below = 0;
            for_each_strided(x, tid, step, vocab, [&](const i64 v, const float xv) {
                if (!POSITIVE_PROB(v, xv)) return;
                u64 key = rank_key(xv, (unsigned)v);
                if (key > key_c && key < above) above = key;
                if (key < key_c && key > below) below = key;
            });
            above = block_extreme_u64(above, 0, shared_k);
            below = block_extreme_u64(below, 1, shared_k);
            if (above != ~0ull) {
                float x_a = ld(x, key_id(above));
                if (x_a != x_c && (double)x_a - (double)x_c < LOGIT_MARGIN) certain = false;
            }
            if (below != 0) {
                float x_b = ld(x, key_id(below));
                if (x_b != x_c && (double)x_c - (double)x_b < LOGIT_MARGIN) certain = false;
            }
        }
    }

    // The Gumbel race over the kept tokens (scores p / −ln u need no renormalisation).
    Race race;
    race.best = -1.0;
    race.id = 0xffffffffu;
    race.second = -1.0;
    double kept = 0.0;
    for_each_strided(x, tid, step, vocab, [&](const i64 v, const float xv) {
        // The rank test first: under a nucleus most tokens fall below the cut and need no exp.
        if ((v) == mask_id || !finite_logit(xv) || rank_key(xv, (unsigned)v) < threshold) return;
        const double p = PROB(v, xv);
        if (!(p > 0.0)) return;
        kept += p;
        double score = p / -log(stream_uniform(spec, (unsigned)v));
        if (ahead(score, (unsigned)v, race.best, race.id)) {
            race.second = race.best;
            race.best = score;
            race.id = (unsigned)v;
        } else {
            race.second = fmax(race.second, score);
        }
    });
    kept = block_sum_f64(kept, shared_d);
    race = block_race(race, shared_d, shared_u, shared_d2);
    if (tid == 0) {
        if (race.id == 0xffffffffu || !(race.best > race.second * (1.0 + SCORE_MARGIN))) certain = false;
        const unsigned id = race.id == 0xffffffffu ? 0u : race.id;
        const double p = race.id == 0xffffffffu ? 0.0 : PROB((i64)id, ld(x, id));
        ids[2 * r] = id;
        ids[2 * r + 1] = certain ? 1u : 0u;
        confidence[3 * r] = p / kept;
        confidence[3 * r + 1] = p;
        confidence[3 * r + 2] = inv;
    }
#undef POSITIVE_PROB
#undef PROB
}
