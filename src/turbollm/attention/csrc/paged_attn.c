// Paged attention for a few query rows per sequence (decode steps), for x86 CPUs with
// AVX2 + FMA + F16C. It reads K/V where they lie in the block cache, so nothing is gathered or
// padded, and each (query row, head) pair does its whole softmax as one work item.
//
// Cache layout per layer: [num_blocks, block_size, num_kv_heads, head_dim], fp32, bf16, fp16,
// fp8 e4m3fn, or int8 with one fp16 scale per (slot, KV head) ([num_blocks, block_size,
// num_kv_heads]).
// Query row r belongs to sequence seq[r] (its block table is tables[seq[r]]) and sees the
// first ctx[r] tokens of it (minus the ones outside a sliding window). Math is fp32.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

enum { KV_F32 = 0, KV_BF16 = 1, KV_F16 = 2, KV_I8 = 3, KV_F8 = 4 };

// 8 fp8 e4m3fn bytes widened to fp32 (exactly). Exponent field e > 0: the 7 low bits shifted
// into place plus the bias difference (127 - 7) << 23; e = 0 (subnormal): mantissa * 2^-9.
static inline __m256 load8_fp8(const uint8_t *p) {
    const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
    const __m256i em = _mm256_and_si256(v, _mm256_set1_epi32(0x7F));
    const __m256 sign = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_and_si256(v, _mm256_set1_epi32(0x80)), 24));
    const __m256 normal = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_slli_epi32(em, 20), _mm256_set1_epi32(120 << 23)));
    const __m256 sub = _mm256_mul_ps(_mm256_cvtepi32_ps(em), _mm256_set1_ps(1.0f / 512.0f));
    const __m256 is_sub = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(8), em));
    return _mm256_or_ps(_mm256_blendv_ps(normal, sub, is_sub), sign);
}

// Inlined into a copy of the attention per cache dtype (attend_item), so the dtype test is
// resolved at compile time rather than on every load.
static inline __attribute__((always_inline)) __m256 load8(const void *base, int64_t i, int dtype) {
    if (dtype == KV_F32) return _mm256_loadu_ps((const float *)base + i);
    if (dtype == KV_I8)  // the row's scale is applied by the caller
        return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)base + i))));
    if (dtype == KV_F16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)base + i)));
    if (dtype == KV_F8) return load8_fp8((const uint8_t *)base + i);
    return load8_bf16((const uint16_t *)base + i);
}

// The 8 horizontal sums of a[0..7], as one vector.
static inline __m256 hsum8x8(const __m256 a[8]) {
    __m256 s01 = _mm256_hadd_ps(a[0], a[1]), s23 = _mm256_hadd_ps(a[2], a[3]);
    __m256 s45 = _mm256_hadd_ps(a[4], a[5]), s67 = _mm256_hadd_ps(a[6], a[7]);
    __m256 lo = _mm256_hadd_ps(s01, s23), hi = _mm256_hadd_ps(s45, s67);
    return _mm256_add_ps(_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31));
}

// Walks the cache slots of positions t0, t0 + 1, ... of one sequence. Stepping through the
// block table avoids a division per position (pos / BS), which cost more than the math.
typedef struct {
    const int64_t *table;
    int64_t BS, block, offset;
} slot_iter;

static inline slot_iter slots_from(const int64_t *table, int64_t BS, int64_t t0) {
    slot_iter it = {table, BS, t0 / BS, t0 % BS};
    return it;
}

static inline int64_t next_slot(slot_iter *it) {
    const int64_t slot = it->table[it->block] * it->BS + it->offset;
    if (++it->offset == it->BS) {
        it->offset = 0;
        it->block++;
    }
    return slot;
}

static inline const char *slot_row(const void *cache, int64_t slot, int64_t KVH, int64_t kh,
                                   int64_t D, int64_t esz) {
    return (const char *)cache + ((slot * KVH + kh) * D) * esz;
}

// The K/V rows PREFETCH_TOKENS positions ahead are requested while a row is used: a context's
// blocks may lie anywhere in the cache, where the hardware prefetcher does not follow (with
// scattered blocks and an fp16 cache, attention took 1.3-1.5x longer without it).
#define PREFETCH_TOKENS 16

// Where the prefetch walk of positions [t0, t0 + n) starts: PREFETCH_TOKENS positions ahead
static inline slot_iter prefetch_start(const int64_t *table, int64_t BS, int64_t t0, int64_t n,
                                       int64_t *pos) {
    *pos = t0 + (PREFETCH_TOKENS < n ? PREFETCH_TOKENS : n);
    return slots_from(table, BS, *pos);
}

// Requests the cache row of the position `ahead` holds (if it is below `end`) and steps it.
static inline void prefetch_next(slot_iter *ahead, int64_t *pos, int64_t end, const void *cache,
                                 int64_t KVH, int64_t kh, int64_t D, int64_t esz) {
    if (*pos >= end) return;
    const char *row = slot_row(cache, next_slot(ahead), KVH, kh, D, esz);
    for (int64_t b = 0; b < D * esz; b += 64) _mm_prefetch(row + b, _MM_HINT_T0);
    (*pos)++;
}

// fp16 scale of a cache row (int8 caches); 1 otherwise
static inline float slot_scale(const uint16_t *scales, int64_t slot, int64_t KVH, int64_t kh) {
    return scales == NULL ? 1.0f : _cvtsh_ss(scales[slot * KVH + kh]);
}

// scores[g * n + t] = q_g . k_{t0 + t} * scale for the G query heads g that share this KV
// head, t < n. 8 tokens at a time, so that one transposed reduction replaces 8 horizontal sums;
// the 8 K rows are read from memory once and from L1 for the other heads of the group.
#define ALWAYS_INLINE static inline __attribute__((always_inline))

ALWAYS_INLINE void qk_scores(const float *q, int64_t G, const void *k_cache, const uint16_t *k_scales,
                      int dtype, const int64_t *table, int64_t t0, int64_t n, int64_t BS,
                      int64_t KVH, int64_t kh, int64_t D, int64_t esz, float scale, float *scores) {
    const __m256 sc = _mm256_set1_ps(scale);
    slot_iter it = slots_from(table, BS, t0);
    int64_t ahead_pos;
    slot_iter ahead = prefetch_start(table, BS, t0, n, &ahead_pos);
    int64_t t = 0;
    for (; t + 8 <= n; t += 8) {
        const char *rows[8];
        float rs[8];
        for (int i = 0; i < 8; i++) {
            prefetch_next(&ahead, &ahead_pos, t0 + n, k_cache, KVH, kh, D, esz);
            const int64_t slot = next_slot(&it);
            rows[i] = slot_row(k_cache, slot, KVH, kh, D, esz);
            rs[i] = slot_scale(k_scales, slot, KVH, kh);
        }
        for (int64_t g = 0; g < G; g++) {
            const float *qg = q + g * D;
            __m256 acc[8];
            for (int i = 0; i < 8; i++) acc[i] = _mm256_setzero_ps();
            for (int64_t d = 0; d < D; d += 8) {
                __m256 qv = _mm256_loadu_ps(qg + d);
                for (int i = 0; i < 8; i++) acc[i] = _mm256_fmadd_ps(qv, load8(rows[i], d, dtype), acc[i]);
            }
            __m256 s8 = _mm256_mul_ps(hsum8x8(acc), sc);
            if (k_scales != NULL) s8 = _mm256_mul_ps(s8, _mm256_loadu_ps(rs));
            _mm256_storeu_ps(scores + g * n + t, s8);
        }
    }
    for (; t < n; t++) {
        const int64_t slot = next_slot(&it);
        const char *row = slot_row(k_cache, slot, KVH, kh, D, esz);
        const float rs = slot_scale(k_scales, slot, KVH, kh);
        for (int64_t g = 0; g < G; g++) {
            __m256 acc = _mm256_setzero_ps();
            for (int64_t d = 0; d < D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * D + d), load8(row, d, dtype), acc);
            scores[g * n + t] = hsum256(acc) * scale * rs;
        }
    }
}

// scores[0..n) -> exp(scores - max) in place; returns 1 / their sum and sets *lse to
// log(sum(exp(scores))) (to merge the parts of a split context).
static float softmax_unnormalized(float *sg, int64_t n, float *lse) {
    float mx = -INFINITY;
    for (int64_t t = 0; t < n; t++) mx = sg[t] > mx ? sg[t] : mx;
    __m256 m = _mm256_set1_ps(mx), sum = _mm256_setzero_ps();
    int64_t t = 0;
    for (; t + 8 <= n; t += 8) {
        __m256 p = exp256(_mm256_sub_ps(_mm256_loadu_ps(sg + t), m));
        _mm256_storeu_ps(sg + t, p);
        sum = _mm256_add_ps(sum, p);
    }
    float s = hsum256(sum);
    for (; t < n; t++) {
        sg[t] = expf(sg[t] - mx);
        s += sg[t];
    }
    *lse = mx + logf(s);
    return 1.0f / s;
}

// out[g * D + c .. + 8 * W] = inv[g] * sum_t p[g * n + t] v_{t0 + t}[c ..] for GB heads and
// W vectors of 8 columns. Always inlined with constant GB and W, so the GB x W accumulators
// stay in registers (with run-time bounds gcc keeps them on the stack: 3x slower).
ALWAYS_INLINE void pv_block(const float *p, const float *inv, int GB, int W, const void *v_cache,
                            const uint16_t *v_scales, int dtype, const int64_t *table,
                            int64_t t0, int64_t n, int64_t BS, int64_t KVH, int64_t kh,
                            int64_t D, int64_t esz, int64_t c, float *out) {
    __m256 o[3][4];
    for (int g = 0; g < GB; g++)
        for (int j = 0; j < W; j++) o[g][j] = _mm256_setzero_ps();
    slot_iter it = slots_from(table, BS, t0);
    int64_t ahead_pos;
    slot_iter ahead = prefetch_start(table, BS, t0, n, &ahead_pos);
    for (int64_t t = 0; t < n; t++) {
        if (c == 0) prefetch_next(&ahead, &ahead_pos, t0 + n, v_cache, KVH, kh, D, esz);
        const int64_t slot = next_slot(&it);
        const char *row = slot_row(v_cache, slot, KVH, kh, D, esz);
        const float rs = slot_scale(v_scales, slot, KVH, kh);
        __m256 v[4];
        for (int j = 0; j < W; j++) v[j] = load8(row, c + 8 * j, dtype);
        for (int g = 0; g < GB; g++) {
            __m256 pt = _mm256_set1_ps(p[g * n + t] * rs);
            for (int j = 0; j < W; j++) o[g][j] = _mm256_fmadd_ps(pt, v[j], o[g][j]);
        }
    }
    for (int g = 0; g < GB; g++) {
        __m256 s = _mm256_set1_ps(inv[g]);
        for (int j = 0; j < W; j++) _mm256_storeu_ps(out + g * D + c + 8 * j, _mm256_mul_ps(o[g][j], s));
    }
}

// out[g * D + c] = inv[g] * sum_t p[g * n + t] v_{t0 + t}[c] for the G heads of the group:
// up to 3 heads x 32 columns at a time, so each V row is read from memory once per 32 columns
// and serves every head of the group.
ALWAYS_INLINE void pv_sum(const float *p, const float *inv, int64_t G, const void *v_cache,
                          const uint16_t *v_scales, int dtype, const int64_t *table, int64_t t0,
                          int64_t n, int64_t BS, int64_t KVH, int64_t kh, int64_t D,
                          int64_t esz, float *out) {
    // 32 columns at a time; a head_dim that is not a multiple of 32 ends with 8-column blocks
    for (int64_t c = 0; c < D;) {
        const int W = D - c >= 32 ? 4 : 1;
        for (int64_t g0 = 0; g0 < G; g0 += 3) {
            const int64_t gb = G - g0 < 3 ? G - g0 : 3;
#define PV(GB, W) pv_block(p + g0 * n, inv + g0, GB, W, v_cache, v_scales, dtype, table, t0, n, BS, \
                           KVH, kh, D, esz, c, out + g0 * D)
            if (W == 4) {
                if (gb == 3) PV(3, 4);
                else if (gb == 2) PV(2, 4);
                else PV(1, 4);
            } else {
                if (gb == 3) PV(3, 1);
                else if (gb == 2) PV(2, 1);
                else PV(1, 1);
            }
#undef PV
        }
        c += 8 * W;
    }
}

// One work item: the G query heads of row r that share KV head kh, over n cached tokens from
// t0. `scores` holds G * n floats; lse[g] receives each head's log-sum-exp.
ALWAYS_INLINE void attend_item(const float *q, int64_t G, const void *k_cache, const void *v_cache,
                               const uint16_t *k_scales, const uint16_t *v_scales, int dtype,
                               const int64_t *table, int64_t t0, int64_t n, int64_t BS,
                               int64_t KVH, int64_t kh, int64_t D, float scale, float *scores,
                               float *inv, float *lse, float *out) {
    const int64_t esz = dtype == KV_F32 ? 4 : dtype == KV_I8 || dtype == KV_F8 ? 1 : 2;
    qk_scores(q, G, k_cache, k_scales, dtype, table, t0, n, BS, KVH, kh, D, esz, scale, scores);
    for (int64_t g = 0; g < G; g++) inv[g] = softmax_unnormalized(scores + g * n, n, lse + g);
    pv_sum(scores, inv, G, v_cache, v_scales, dtype, table, t0, n, BS, KVH, kh, D, esz, out);
}

// A context longer than SPLIT_TOKENS is attended in ceil(n / SPLIT_TOKENS) parts of equal
// length (up to rounding), each its own work item, merged by their log-sum-exps: a decode row
// has only KVH items otherwise (3 for SmolLM2: one of two threads would do two). The split
// depends on the row's context alone, so a row gives the same bits whatever else is in the call.
#define SPLIT_TOKENS 256

typedef struct {
    int64_t r, kh, t0, n;  // row, KV head, first position and token count of this part
    int64_t first, parts;  // the (row, KV head)'s first item and its number of parts
} attn_item;

static inline int64_t num_parts(int64_t n) {
    return n > SPLIT_TOKENS ? (n + SPLIT_TOKENS - 1) / SPLIT_TOKENS : 1;
}

static inline int64_t visible_start(int64_t L, int64_t window) {
    return window > 0 && L > window ? L - window : 0;
}

// out[r, h, :] = softmax(q[r, h] . K^T * scale) V over row r's visible context; query row r
// starts q_stride floats after row r - 1 (its H x D values contiguous: a view into fused qkv).
// Work items are (row, KV head, part): the query heads that share a KV head go together, so
// its K/V rows are read from memory once per item.
void paged_attn_rows(const float *q, int64_t q_stride, const void *k_cache, const void *v_cache,
                     const uint16_t *k_scales, const uint16_t *v_scales, int64_t dtype,
                     const int64_t *tables, int64_t max_blocks, const int64_t *seq,
                     const int64_t *ctx, float *out, int64_t R, int64_t H, int64_t KVH,
                     int64_t D, int64_t BS, float scale, int64_t window) {
    const int64_t G = H / KVH;
    int64_t nitems = 0;
    for (int64_t r = 0; r < R; r++) nitems += KVH * num_parts(ctx[r] - visible_start(ctx[r], window));
    attn_item *items = (attn_item *)malloc(nitems * sizeof(attn_item));
    int64_t i = 0;
    for (int64_t r = 0; r < R; r++) {
        const int64_t t0 = visible_start(ctx[r], window), n = ctx[r] - t0;
        const int64_t parts = num_parts(n), len = (n + parts - 1) / parts;
        for (int64_t kh = 0; kh < KVH; kh++) {
            const int64_t first = i;
            for (int64_t p = 0; p < parts; p++, i++) {
                const int64_t a = p * len, b = a + len > n ? n : a + len;
                attn_item it = {r, kh, t0 + a, b - a, first, parts};
                items[i] = it;
            }
        }
    }
    // per item: G x D outputs (normalized within the part) and G log-sum-exps
    float *part_out = nitems > R * KVH ? (float *)malloc(nitems * G * (D + 1) * sizeof(float)) : NULL;
    float *part_lse = part_out ? part_out + nitems * G * D : NULL;
#pragma omp parallel
    {
        float *scores = NULL, *inv = (float *)malloc(2 * G * sizeof(float)), *lse = inv + G;
        int64_t cap = 0;
#pragma omp for schedule(dynamic, 1)
        for (int64_t j = 0; j < nitems; j++) {
            const attn_item it = items[j];
            const int64_t *table = tables + seq[it.r] * max_blocks;
            if (G * it.n > cap) {
                free(scores);
                cap = G * it.n + 1024;
                scores = (float *)malloc(cap * sizeof(float));
            }
            const float *qi = q + it.r * q_stride + it.kh * G * D;
            float *oi = it.parts == 1 ? out + (it.r * H + it.kh * G) * D : part_out + j * G * D;
            float *li = it.parts == 1 ? lse : part_lse + j * G;
#define ATTEND(DT) attend_item(qi, G, k_cache, v_cache, k_scales, v_scales, DT, table, it.t0, it.n, \
                               BS, KVH, it.kh, D, scale, scores, inv, li, oi)
            switch (dtype) {
                case KV_F32: ATTEND(KV_F32); break;
                case KV_BF16: ATTEND(KV_BF16); break;
                case KV_F16: ATTEND(KV_F16); break;
                case KV_F8: ATTEND(KV_F8); break;
                default: ATTEND(KV_I8); break;
            }
#undef ATTEND
        }
        // merge the parts: out = sum_p w_p out_p / sum_p w_p, w_p = exp(lse_p - max lse)
#pragma omp for schedule(static)
        for (int64_t j = 0; j < nitems; j++) {
            const attn_item it = items[j];
            if (it.parts == 1 || j != it.first) continue;
            for (int64_t g = 0; g < G; g++) {
                float mx = -INFINITY, wsum = 0.f;
                for (int64_t p = 0; p < it.parts; p++) mx = fmaxf(mx, part_lse[(j + p) * G + g]);
                float *o = out + (it.r * H + it.kh * G + g) * D;
                for (int64_t d = 0; d < D; d++) o[d] = 0.f;
                for (int64_t p = 0; p < it.parts; p++) {
                    const float w = expf(part_lse[(j + p) * G + g] - mx);
                    const float *op = part_out + ((j + p) * G + g) * D;
                    wsum += w;
                    for (int64_t d = 0; d < D; d++) o[d] += w * op[d];
                }
                for (int64_t d = 0; d < D; d++) o[d] /= wsum;
            }
        }
        free(scores);
        free(inv);
    }
    free(items);
    free(part_out);
}

// fp32 -> bf16 with round-to-nearest-even (as torch converts); NaN stays NaN
static inline uint16_t bf16_from_f32(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// fp32 -> fp8 e4m3fn as QuantKV.write does it: clamped to +-448, rounded to nearest even (all
// steps below are exact in fp32 but the final rint); NaN stays NaN (0x7F).
static uint8_t fp8_from_f32(float x) {
    if (isnan(x)) return 0x7F;
    const uint8_t sign = signbit(x) ? 0x80 : 0;
    const float a = fminf(fabsf(x), 448.0f);
    if (a < 0.015625f)  // below the smallest normal 2^-6: steps of 2^-9 (8 steps make 2^-6)
        return sign | (uint8_t)nearbyintf(a * 512.0f);
    int e;
    frexpf(a, &e);  // a = f * 2^e, f in [0.5, 1)
    e -= 1;         // a in [2^e, 2^(e+1))
    float q = nearbyintf((ldexpf(a, -e) - 1.0f) * 8.0f);
    if (q == 8.0f) {
        q = 0.0f;
        e++;
    }
    return sign | (uint8_t)(((e + 7) << 3) | (int)q);
}

// Store one new row x [KVH * D] (fp32) at a cache slot, converted as torch would convert it:
// bf16/fp16/fp8 rounded to nearest even; int8 per (slot, head) with scale fp16(max|x| / 127)
// (at least 1e-8) and q = round-half-even(x / scale) clamped to +-127.
static void store_row(const float *x, void *cache, uint16_t *scales, int dtype, int64_t slot,
                      int64_t KVH, int64_t D) {
    const int64_t n = KVH * D;
    if (dtype == KV_F32) {
        memcpy((float *)cache + slot * n, x, n * sizeof(float));
    } else if (dtype == KV_BF16) {
        uint16_t *dst = (uint16_t *)cache + slot * n;
        for (int64_t i = 0; i < n; i++) dst[i] = bf16_from_f32(x[i]);
    } else if (dtype == KV_F16) {
        uint16_t *dst = (uint16_t *)cache + slot * n;
        for (int64_t i = 0; i < n; i++) dst[i] = _cvtss_sh(x[i], _MM_FROUND_TO_NEAREST_INT);
    } else if (dtype == KV_F8) {
        uint8_t *dst = (uint8_t *)cache + slot * n;
        for (int64_t i = 0; i < n; i++) dst[i] = fp8_from_f32(x[i]);
    } else {
        int8_t *dst = (int8_t *)cache + slot * n;
        for (int64_t h = 0; h < KVH; h++) {
            const float *xh = x + h * D;
            float amax = 0.f;
            for (int64_t i = 0; i < D; i++) amax = fmaxf(amax, fabsf(xh[i]));
            const uint16_t sh = _cvtss_sh(fmaxf(amax / 127.0f, 1e-8f), _MM_FROUND_TO_NEAREST_INT);
            const float s = _cvtsh_ss(sh);
            scales[slot * KVH + h] = sh;
            for (int64_t i = 0; i < D; i++)  // a zero scale (all-zero row) reads back 0 anyway
                dst[h * D + i] = s > 0 ? (int8_t)fminf(fmaxf(nearbyintf(xh[i] / s), -127.f), 127.f) : 0;
        }
    }
}

// k, v: T rows of KVH * D fp32 values, `stride` floats apart; row t goes to flat slot slots[t]
void write_kv_rows(const float *k, const float *v, int64_t stride, void *k_cache, void *v_cache,
                   uint16_t *k_scales, uint16_t *v_scales, int64_t dtype, const int64_t *slots,
                   int64_t T, int64_t KVH, int64_t D) {
    for (int64_t t = 0; t < T; t++) {
        store_row(k + t * stride, k_cache, k_scales, (int)dtype, slots[t], KVH, D);
        store_row(v + t * stride, v_cache, v_scales, (int)dtype, slots[t], KVH, D);
    }
}
