// Paged attention for a few query rows per sequence (decode steps, verification steps, short
// chunks), for x86 CPUs with AVX2 + FMA + F16C. A row alone reads K/V where they lie in the
// block cache, nothing gathered or padded; the rows of one sequence share a work item that
// widens its K/V rows once (see row_source).
//
// Cache layout per layer: [num_blocks, block_size, num_kv_heads, head_dim], fp32, bf16, fp16,
// fp8 e4m3fn, or int8 with one fp16 scale per (slot, KV head) ([num_blocks, block_size,
// num_kv_heads]).
// Query row r belongs to sequence seq[r] (its block table is tables[seq[r]]) and sees the
// first ctx[r] tokens of it (minus the ones outside a sliding window). Math is fp32.
#include <immintrin.h>
#include <math.h>
#include <omp.h>
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

#define ALWAYS_INLINE static inline __attribute__((always_inline))

// Where a pass over positions [t0, t0 + n) of KV head kh reads its K or V rows: in place in
// the paged cache (an item of one query row), or from `wide`, the item's rows widened to fp32
// once, D floats apart with their int8 scales in `wide_rs` (an item of several query rows of
// one sequence, a verification step: widening every load on the fly, 3 ops per vector of a
// bf16 cache, was repeated for every row and cost as much as the FMAs it fed). Widening is
// exact in every cache dtype, so the bits are the same either way.
typedef struct {
    const void *cache;
    const uint16_t *scales;
    const int64_t *table;
    int64_t t0, n, BS, KVH, kh, D, esz;
    const float *wide, *wide_rs;
} row_source;

// A walk over a row_source's positions in order. In the cache it steps through the block
// table (a division per position cost more than the math) and, when asked, requests the rows
// PREFETCH_TOKENS positions ahead.
typedef struct {
    slot_iter it, ahead;
    int64_t t, ahead_pos;
} row_walk;

ALWAYS_INLINE row_walk walk_start(const row_source *src, int wide) {
    row_walk w;
    w.t = 0;
    if (!wide) {
        w.it = slots_from(src->table, src->BS, src->t0);
        w.ahead = prefetch_start(src->table, src->BS, src->t0, src->n, &w.ahead_pos);
    }
    return w;
}

// The next position's row, and its int8 scale in *rs (1 for other caches)
ALWAYS_INLINE const char *walk_next(row_walk *w, const row_source *src, int wide, int prefetch,
                                    float *rs) {
    const int64_t t = w->t++;
    if (wide) {
        *rs = src->wide_rs[t];
        return (const char *)(src->wide + t * src->D);
    }
    if (prefetch)
        prefetch_next(&w->ahead, &w->ahead_pos, src->t0 + src->n, src->cache, src->KVH, src->kh,
                      src->D, src->esz);
    const int64_t slot = next_slot(&w->it);
    *rs = slot_scale(src->scales, slot, src->KVH, src->kh);
    return slot_row(src->cache, slot, src->KVH, src->kh, src->D, src->esz);
}

// The item's rows widened to fp32 [n, D] with their scales, read in order with the rows
// ahead requested (qk_scores pads a last partial 8 with zero_row itself)
ALWAYS_INLINE void widen_rows(row_source *src, int dtype, float *buf, float *rs) {
    row_walk w = walk_start(src, 0);
    const int64_t D = src->D;
    for (int64_t t = 0; t < src->n; t++) {
        const char *row = walk_next(&w, src, 0, 1, &rs[t]);
        for (int64_t d = 0; d < D; d += 8) _mm256_storeu_ps(buf + t * D + d, load8(row, d, dtype));
    }
    src->wide = buf;
    src->wide_rs = rs;
}

#define MAX_HEAD_DIM 1024  // native.supports() holds head_dim to this
static const float zero_row[MAX_HEAD_DIM] __attribute__((aligned(32)));

// s[j * s_stride + t] = (q_j . k_t) * scale * rs[t] for the item's queries j and positions
// t < n rounded up to 8 (the padding scores 0). 8 positions at a time with one transposed
// reduction (hsum8x8), the last few padded with a row of zeros, so every score is summed in
// one order wherever its position falls: a row alone and among others give the same bits.
// The 8 K rows are read from memory once and from L1 for the other queries.
ALWAYS_INLINE void qk_scores(const float *const *q, int64_t nq, const row_source *src, int wide,
                             int dtype, int scaled, float scale, float *s, int64_t s_stride) {
    const __m256 sc = _mm256_set1_ps(scale);
    const int64_t n = src->n, D = src->D;
    row_walk w = walk_start(src, wide);
    for (int64_t t = 0; t < n; t += 8) {
        const char *rows[8];
        float rs[8];
        for (int i = 0; i < 8; i++) {
            if (t + i < n) {
                rows[i] = walk_next(&w, src, wide, 1, &rs[i]);
            } else {
                rows[i] = (const char *)zero_row;
                rs[i] = 1.0f;
            }
        }
        // widened rows are fp32 whatever the cache holds
        const int rdt = wide ? KV_F32 : dtype;
        for (int64_t j = 0; j < nq; j++) {
            const float *qj = q[j];
            __m256 acc[8];
            for (int i = 0; i < 8; i++) acc[i] = _mm256_setzero_ps();
            for (int64_t d = 0; d < D; d += 8) {
                const __m256 qv = _mm256_loadu_ps(qj + d);
                for (int i = 0; i < 8; i++) acc[i] = _mm256_fmadd_ps(qv, load8(rows[i], d, rdt), acc[i]);
            }
            __m256 s8 = _mm256_mul_ps(hsum8x8(acc), sc);
            if (scaled) s8 = _mm256_mul_ps(s8, _mm256_loadu_ps(rs));
            _mm256_storeu_ps(s + j * s_stride + t, s8);
        }
    }
}

// scores[0..n) -> exp(scores - max) in place; returns 1 / their sum and sets *lse to
// log(sum(exp(scores))) (to merge the parts of a split context).
static float softmax_unnormalized(float *sg, int64_t n, float *lse) {
    // the max in eight lanes (a max does not depend on the order it is taken in)
    __m256 m8 = _mm256_set1_ps(-INFINITY);
    int64_t t = 0;
    for (; t + 8 <= n; t += 8) m8 = _mm256_max_ps(m8, _mm256_loadu_ps(sg + t));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps(m8, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    float mx = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
    for (; t < n; t++) mx = sg[t] > mx ? sg[t] : mx;
    __m256 m = _mm256_set1_ps(mx), sum = _mm256_setzero_ps();
    t = 0;
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

// out[j][c .. c + 8 W) = inv[j] * sum_t p[j][t] rs[t] v_t[c ..] for QB queries and W vectors of
// 8 columns, positions t < n in order. Always inlined with constant QB and W, so the QB x W
// accumulators stay in registers (with run-time bounds gcc keeps them on the stack: 3x
// slower). In an item of several rows, a query's weights are zero outside its row's
// positions: those FMAs add exact zeros.
ALWAYS_INLINE void pv_block(const float *const *p, const float *inv, int QB, int W,
                            const row_source *src, int wide, int dtype, int64_t c,
                            float *const *out) {
    __m256 o[3][4];
    for (int g = 0; g < QB; g++)
        for (int j = 0; j < W; j++) o[g][j] = _mm256_setzero_ps();
    const int rdt = wide ? KV_F32 : dtype;
    row_walk w = walk_start(src, wide);
    for (int64_t t = 0; t < src->n; t++) {
        float rs;
        const char *row = walk_next(&w, src, wide, c == 0, &rs);
        // the weights first, then one V vector at a time: 3 x 4 accumulators, 3 weights and a
        // vector fit the 16 registers (all 4 vectors at once kept two accumulators on the stack)
        __m256 pt[3];
        for (int g = 0; g < QB; g++) pt[g] = _mm256_set1_ps(p[g][t] * rs);
        for (int j = 0; j < W; j++) {
            const __m256 v = load8(row, c + 8 * j, rdt);
            for (int g = 0; g < QB; g++) o[g][j] = _mm256_fmadd_ps(pt[g], v, o[g][j]);
        }
    }
    for (int g = 0; g < QB; g++) {
        const __m256 s = _mm256_set1_ps(inv[g]);
        for (int j = 0; j < W; j++) _mm256_storeu_ps(out[g] + c + 8 * j, _mm256_mul_ps(o[g][j], s));
    }
}

// pv_block over every query of the item: 3 queries x 32 columns at a time (a head_dim that is
// not a multiple of 32 ends with 8-column blocks), so each V row load serves 3 queries.
ALWAYS_INLINE void pv_sum(const float *const *p, const float *inv, int64_t nq,
                          const row_source *src, int wide, int dtype, float *const *out) {
    const int64_t D = src->D;
    for (int64_t c = 0; c < D;) {
        const int W = D - c >= 32 ? 4 : 1;
        for (int64_t j = 0; j < nq; j += 3) {
            const int64_t qb = nq - j < 3 ? nq - j : 3;
#define PV(QB, W) pv_block(p + j, inv + j, QB, W, src, wide, dtype, c, out + j)
            if (W == 4) {
                if (qb == 3) PV(3, 4);
                else if (qb == 2) PV(2, 4);
                else PV(1, 4);
            } else {
                if (qb == 3) PV(3, 1);
                else if (qb == 2) PV(2, 1);
                else PV(1, 1);
            }
#undef PV
        }
        c += 8 * W;
    }
}

// A context longer than SPLIT_TOKENS is attended in ceil(n / SPLIT_TOKENS) parts of equal
// length (up to rounding), merged by their log-sum-exps: a decode row has only KVH work items
// otherwise (3 for SmolLM2: one of two threads would do two). The split depends on the row's
// context alone, so a row gives the same bits whatever else is in the call.
#define SPLIT_TOKENS 256
// Query rows of one sequence (a verification step, a short chunk) attend in one work item,
// sharing its widened K/V rows: at most this many, fewer where the call would have too few
// items to keep the threads busy.
#define MAX_ITEM_ROWS 16

static int64_t forced_item_rows = 0;  // 0: chosen per call

// Rows per item from now on (0: back to the choice per call), so the tests can compare
// shared items with rows alone on any number of threads.
void paged_attn_force_item_rows(int64_t rows) {
    forced_item_rows = rows;
}

static inline int64_t num_parts(int64_t n) {
    return n > SPLIT_TOKENS ? (n + SPLIT_TOKENS - 1) / SPLIT_TOKENS : 1;
}

static inline int64_t visible_start(int64_t L, int64_t window) {
    return window > 0 && L > window ? L - window : 0;
}

typedef struct {
    int64_t t0, n, parts, len;  // visible context [t0, t0 + n), split into parts of len
    int64_t part_slot;          // its first (KV head, part) slot in the part buffers
} row_span;

// [*a, *b): the positions of part p of row span s
static inline void part_range(const row_span *s, int64_t p, int64_t *a, int64_t *b) {
    *a = s->t0 + p * s->len;
    *b = *a + s->len < s->t0 + s->n ? *a + s->len : s->t0 + s->n;
}

typedef struct {
    int64_t r0, nr, kh, p;  // rows r0 .. r0 + nr - 1 (one sequence), KV head, part
} attn_item;

// Work items with groups of up to max_rows consecutive rows of one sequence and one part
// count; writes them to items (when not NULL) and returns their number.
static int64_t make_items(const row_span *span, const int64_t *seq, int64_t R, int64_t KVH,
                          int64_t max_rows, attn_item *items) {
    int64_t count = 0;
    for (int64_t r0 = 0, nr; r0 < R; r0 += nr) {
        nr = 1;
        while (r0 + nr < R && nr < max_rows && seq[r0 + nr] == seq[r0]
               && span[r0 + nr].parts == span[r0].parts)
            nr++;
        for (int64_t kh = 0; kh < KVH; kh++)
            for (int64_t p = 0; p < span[r0].parts; p++, count++)
                if (items) {
                    attn_item it = {r0, nr, kh, p};
                    items[count] = it;
                }
    }
    return count;
}

// Per-thread buffers of attend_item, grown as needed and kept for the thread's life: freed
// and allocated again per call, a long context's buffers (over malloc's mmap threshold) were
// new pages to fault in every layer of every step.
typedef struct {
    float *kf, *vf, *rs_k, *rs_v, *s, *inv, *lse;
    const float **q, **p;
    float **out;
    int64_t rows_cap, q_cap, D;
} scratch;

static void scratch_fit(scratch *w, int64_t n8, int64_t nq, int64_t D) {
    if (n8 > w->rows_cap || D != w->D) {
        free(w->kf);
        w->D = D;
        w->rows_cap = n8 + 256;
        w->kf = (float *)malloc(w->rows_cap * (2 * D + 2) * sizeof(float));
        w->vf = w->kf + w->rows_cap * D;
        w->rs_k = w->vf + w->rows_cap * D;
        w->rs_v = w->rs_k + w->rows_cap;
        w->q_cap = 0;  // s depends on rows_cap
    }
    if (nq > w->q_cap) {
        free(w->s);
        free(w->q);
        w->q_cap = nq;
        w->s = (float *)malloc(nq * (w->rows_cap + 2) * sizeof(float));
        w->inv = w->s + nq * w->rows_cap;
        w->lse = w->inv + nq;
        w->q = (const float **)malloc(nq * 3 * sizeof(float *));
        w->p = w->q + nq;
        w->out = (float **)(w->p + nq);
    }
}

// One work item: rows r0.. of one sequence, the G query heads sharing KV head kh, part p.
// Each row's scores, softmax and output are computed as if it were alone: scores over the
// item's positions (the union of its rows' part ranges), the softmax over the row's own
// range, weights zeroed outside it. Outputs go to out (one part) or the part buffers.
ALWAYS_INLINE void attend_item(const attn_item *it, const row_span *span, const float *q,
                               int64_t q_stride, const void *k_cache, const void *v_cache,
                               const uint16_t *k_scales, const uint16_t *v_scales, int dtype,
                               const int64_t *table, int64_t BS, int64_t H, int64_t KVH,
                               int64_t D, float scale, float *out, float *part_out,
                               float *part_lse, scratch *w) {
    const int64_t G = H / KVH, nq = it->nr * G;
    int64_t A = INT64_MAX, B = 0;
    for (int64_t i = 0; i < it->nr; i++) {
        int64_t a, b;
        part_range(&span[it->r0 + i], it->p, &a, &b);
        A = a < A ? a : A;
        B = b > B ? b : B;
    }
    const int64_t n = B - A, n8 = (n + 7) & ~(int64_t)7;
    scratch_fit(w, n8, nq, D);
    const int64_t esz = dtype == KV_F32 ? 4 : dtype == KV_I8 || dtype == KV_F8 ? 1 : 2;
    row_source ks = {k_cache, k_scales, table, A, n, BS, KVH, it->kh, D, esz, NULL, NULL};
    row_source vs = {v_cache, v_scales, table, A, n, BS, KVH, it->kh, D, esz, NULL, NULL};
    const int wide = it->nr > 1;
    if (wide) {
        widen_rows(&ks, dtype, w->kf, w->rs_k);
        widen_rows(&vs, dtype, w->vf, w->rs_v);
    }
    const int64_t s_stride = w->rows_cap;
    for (int64_t i = 0; i < it->nr; i++)
        for (int64_t g = 0; g < G; g++) {
            const int64_t j = i * G + g, r = it->r0 + i, h = it->kh * G + g;
            const row_span *sp = &span[r];
            w->q[j] = q + r * q_stride + h * D;
            w->p[j] = w->s + j * s_stride;
            w->out[j] = sp->parts == 1 ? out + (r * H + h) * D
                      : part_out + ((sp->part_slot + it->kh * sp->parts + it->p) * G + g) * D;
        }
    if (wide) qk_scores(w->q, nq, &ks, 1, dtype, k_scales != NULL, scale, w->s, s_stride);
    else qk_scores(w->q, nq, &ks, 0, dtype, k_scales != NULL, scale, w->s, s_stride);
    for (int64_t i = 0; i < it->nr; i++) {
        const row_span *sp = &span[it->r0 + i];
        int64_t a, b;
        part_range(sp, it->p, &a, &b);
        for (int64_t g = 0; g < G; g++) {
            const int64_t j = i * G + g;
            float *sj = w->s + j * s_stride;
            w->inv[j] = softmax_unnormalized(sj + (a - A), b - a, &w->lse[j]);
            memset(sj, 0, (a - A) * sizeof(float));
            memset(sj + (b - A), 0, (n8 - (b - A)) * sizeof(float));
            if (sp->parts > 1)
                part_lse[(sp->part_slot + it->kh * sp->parts + it->p) * G + g] = w->lse[j];
        }
    }
    if (wide) pv_sum((const float *const *)w->p, w->inv, nq, &vs, 1, dtype, w->out);
    else pv_sum((const float *const *)w->p, w->inv, nq, &vs, 0, dtype, w->out);
}

// out[r, h, :] = softmax(q[r, h] . K^T * scale) V over row r's visible context; query row r
// starts q_stride floats after row r - 1 (its H x D values contiguous: a view into fused qkv).
// Work items are (rows of one sequence, KV head, part): the query heads that share a KV head,
// and the rows that share a sequence, go together, so its K/V rows are read and widened once
// per item.
void paged_attn_rows(const float *q, int64_t q_stride, const void *k_cache, const void *v_cache,
                     const uint16_t *k_scales, const uint16_t *v_scales, int64_t dtype,
                     const int64_t *tables, int64_t max_blocks, const int64_t *seq,
                     const int64_t *ctx, float *out, int64_t R, int64_t H, int64_t KVH,
                     int64_t D, int64_t BS, float scale, int64_t window) {
    const int64_t G = H / KVH;
    row_span *span = (row_span *)malloc(R * sizeof(row_span));
    int64_t slots = 0;
    for (int64_t r = 0; r < R; r++) {
        const int64_t t0 = visible_start(ctx[r], window), n = ctx[r] - t0, parts = num_parts(n);
        row_span s = {t0, n, parts, (n + parts - 1) / parts, slots};
        span[r] = s;
        if (parts > 1) slots += KVH * parts;
    }
    // the most rows per item that still leaves two items per thread (bits do not depend on it)
    int64_t max_rows = forced_item_rows ? forced_item_rows : MAX_ITEM_ROWS;
    while (!forced_item_rows && max_rows > 1
           && make_items(span, seq, R, KVH, max_rows, NULL) < 2 * omp_get_max_threads())
        max_rows /= 2;
    const int64_t nitems = make_items(span, seq, R, KVH, max_rows, NULL);
    attn_item *items = (attn_item *)malloc(nitems * sizeof(attn_item));
    make_items(span, seq, R, KVH, max_rows, items);
    // per (row, KV head, part) of split rows: G x D outputs normalized within the part, G lse
    float *part_out = slots ? (float *)malloc(slots * G * (D + 1) * sizeof(float)) : NULL;
    float *part_lse = part_out ? part_out + slots * G * D : NULL;
#pragma omp parallel
    {
        static __thread scratch w;
#pragma omp for schedule(dynamic, 1)
        for (int64_t j = 0; j < nitems; j++) {
            const int64_t *table = tables + seq[items[j].r0] * max_blocks;
#define ATTEND(DT) attend_item(&items[j], span, q, q_stride, k_cache, v_cache, k_scales, v_scales, \
                               DT, table, BS, H, KVH, D, scale, out, part_out, part_lse, &w)
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
        for (int64_t rk = 0; rk < R * KVH; rk++) {
            const row_span *sp = &span[rk / KVH];
            const int64_t r = rk / KVH, kh = rk % KVH, first = sp->part_slot + kh * sp->parts;
            if (sp->parts == 1) continue;
            for (int64_t g = 0; g < G; g++) {
                float mx = -INFINITY, wsum = 0.f;
                for (int64_t p = 0; p < sp->parts; p++) mx = fmaxf(mx, part_lse[(first + p) * G + g]);
                float *o = out + (r * H + kh * G + g) * D;
                for (int64_t d = 0; d < D; d++) o[d] = 0.f;
                for (int64_t p = 0; p < sp->parts; p++) {
                    const float wp = expf(part_lse[(first + p) * G + g] - mx);
                    const float *op = part_out + ((first + p) * G + g) * D;
                    wsum += wp;
                    for (int64_t d = 0; d < D; d++) o[d] += wp * op[d];
                }
                for (int64_t d = 0; d < D; d++) o[d] /= wsum;
            }
        }
    }
    free(items);
    free(part_out);
    free(span);
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
