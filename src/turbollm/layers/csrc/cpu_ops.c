// Small fp32 elementwise ops of the decoder layer (RMSNorm, SiLU-and-mul, rotary embedding)
// for x86 CPUs with AVX2 + FMA. At decode sizes (a few rows of 576-4096 values) torch spends
// 10-40 us per op dispatching several aten kernels; one C call does each in 1-3 us.
#include <immintrin.h>
#include <math.h>
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "decode_abi.h"
#include "simd.h"

// out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w; dim % 8 == 0
void rms_norm_f32(const float *x, const float *w, float *out, int64_t rows, int64_t dim, float eps) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * dim;
        float *o = out + r * dim;
        __m256 ss = _mm256_setzero_ps();
        for (int64_t i = 0; i < dim; i += 8) {
            __m256 v = _mm256_loadu_ps(xr + i);
            ss = _mm256_fmadd_ps(v, v, ss);
        }
        __m256 inv = _mm256_set1_ps(1.0f / sqrtf(hsum256(ss) / (float)dim + eps));
        for (int64_t i = 0; i < dim; i += 8)
            _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_loadu_ps(w + i),
                                                  _mm256_mul_ps(_mm256_loadu_ps(xr + i), inv)));
    }
}

// The residual step of a decoder layer: h += r, then out = rms_norm(h) * w (one call, no
// temporary tensor); the same arithmetic as an add followed by rms_norm_f32
void add_rms_norm_f32(float *h, const float *r, const float *w, float *out, int64_t rows,
                      int64_t dim, float eps) {
    for (int64_t i = 0; i < rows * dim; i += 8)
        _mm256_storeu_ps(h + i, _mm256_add_ps(_mm256_loadu_ps(h + i), _mm256_loadu_ps(r + i)));
    rms_norm_f32(h, w, out, rows, dim, eps);
}

// out[r, i] = silu(gu[r, i]) * gu[r, inter + i]; inter % 8 == 0
void silu_mul_f32(const float *gu, float *out, int64_t rows, int64_t inter) {
    const __m256 one = _mm256_set1_ps(1.0f);
    for (int64_t r = 0; r < rows; r++) {
        const float *g = gu + r * 2 * inter, *u = g + inter;
        float *o = out + r * inter;
        for (int64_t i = 0; i < inter; i += 8) {
            __m256 gv = _mm256_loadu_ps(g + i);
            __m256 sig = _mm256_div_ps(one, _mm256_add_ps(one, exp256(_mm256_sub_ps(_mm256_setzero_ps(), gv))));
            _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_mul_ps(gv, sig), _mm256_loadu_ps(u + i)));
        }
    }
}

static inline float hmax256(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

// out[r] = the first index of the largest value of row r of x [R, V], or -1 when the row holds
// a NaN (the caller then asks torch, which ranks NaN highest). torch's argmax walks a 49K
// vocabulary one value at a time (~50 us); this takes a few.
void argmax_rows_f32(const float *x, int64_t R, int64_t V, int64_t *out) {
    for (int64_t r = 0; r < R; r++) {
        const float *xr = x + r * V;
        __m256 mx = _mm256_set1_ps(-INFINITY), nan = _mm256_setzero_ps();
        int64_t i = 0;
        for (; i + 8 <= V; i += 8) {
            const __m256 v = _mm256_loadu_ps(xr + i);
            mx = _mm256_max_ps(mx, v);
            nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        }
        float best = hmax256(mx);
        int has_nan = _mm256_movemask_ps(nan) != 0;
        for (; i < V; i++) {
            has_nan |= xr[i] != xr[i];
            if (xr[i] > best) best = xr[i];
        }
        out[r] = -1;
        if (has_nan) continue;
        const __m256 bv = _mm256_set1_ps(best);
        for (i = 0; i + 8 <= V; i += 8) {
            const int hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(xr + i), bv, _CMP_EQ_OQ));
            if (hit) break;
        }
        for (; i < V; i++)
            if (xr[i] == best) {
                out[r] = i;
                break;
            }
    }
}

// Rotate-half RoPE in place on x [T, heads, D] (rows of `stride` floats per token), with
// cos/sin [T, D/2]: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin); D % 16 == 0
void rope_f32(float *x, const float *cos, const float *sin, int64_t T, int64_t heads, int64_t D,
              int64_t stride) {
    const int64_t h2 = D / 2;
    for (int64_t t = 0; t < T; t++) {
        const float *c = cos + t * h2, *s = sin + t * h2;
        for (int64_t h = 0; h < heads; h++) {
            float *x1 = x + t * stride + h * D, *x2 = x1 + h2;
            for (int64_t i = 0; i < h2; i += 8) {
                __m256 a = _mm256_loadu_ps(x1 + i), b = _mm256_loadu_ps(x2 + i);
                __m256 cv = _mm256_loadu_ps(c + i), sv = _mm256_loadu_ps(s + i);
                _mm256_storeu_ps(x1 + i, _mm256_fmsub_ps(a, cv, _mm256_mul_ps(b, sv)));
                _mm256_storeu_ps(x2 + i, _mm256_fmadd_ps(b, cv, _mm256_mul_ps(a, sv)));
            }
        }
    }
}

// y[m, o] = x[m] . w[o] for fp32 x [M, K] and w [N, K] (K % 8 == 0), fp32 accumulation.
// Torch's GEMV for one or a few rows reads weights at ~8 GB/s on this class of CPU, and bf16
// has no fast path at all without bf16 instructions (torch widens the whole weight to fp32
// first); these read each weight once, widen it in registers, and use it for up to
// GEMM_TILE activation rows before loading the next 8 values.
// Blocks of GEMM_R weight rows are split across threads; a block (a few KB) stays in L1 while
// every tile of activation rows passes over it. GEMM_R x GEMM_TILE accumulators + GEMM_R weight
// vectors + one activation vector fill the 16 AVX2 registers.
// Each output is summed in the same order whatever M is (one 8-lane accumulator over K in
// order, then a horizontal sum), so a row's result does not depend on how many rows share the
// call: a request gets the same bits alone, in a batch or in a verification.
#define GEMM_R 3
#define GEMM_TILE 4

static inline __m256 load8_f32(const float *p) { return _mm256_loadu_ps(p); }
static inline __m256 load8_f16(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
// 8 fp8 e4m3 bytes (sign, 4 exponent bits biased by 7, 3 mantissa bits) as fp32, divided by
// 256: moved into fp16's layout (sign, 5 exponent bits biased by 15, 10 mantissa bits) below
// its top exponent bit, the bits read as the fp8 value times 2^-8, exactly, subnormals included.
// Sign-extending a byte to 16 bits and shifting it left by 7 puts exponent and mantissa there
// and the sign in bits 15 and 14; clearing bit 14 leaves that pattern. The two NaN codes (never
// written by quantize_fp8, which saturates) would read as finite values.
static inline __m256 load8_e4m3_div256(const uint8_t *p) {
    const __m128i b = _mm_cvtepi8_epi16(_mm_loadl_epi64((const __m128i *)p));
    return _mm256_cvtph_ps(_mm_and_si128(_mm_slli_epi16(b, 7), _mm_set1_epi16((short)0xBF80)));
}

// One body for every weight type: a macro, because gcc does not inline a load function passed
// by pointer, and the indirect call per 8 weights costs 4x. MT (activation rows of the tile) is
// a constant in each call site of the switch, so the accumulators stay in registers.
#define DEFINE_GEMM_F32_ACC(NAME, WTYPE, LOAD8)                                                          \
    static inline __attribute__((always_inline)) void NAME##_tile(                                     \
        const float *x, const WTYPE *w, float *y, int64_t N, int64_t K, const int MT) {               \
        __m256 acc[GEMM_TILE][GEMM_R];                                                                 \
        for (int t = 0; t < MT; t++)                                                                   \
            for (int r = 0; r < GEMM_R; r++) acc[t][r] = _mm256_setzero_ps();                          \
        for (int64_t i = 0; i < K; i += 8) {                                                           \
            __m256 wv[GEMM_R];                                                                         \
            for (int r = 0; r < GEMM_R; r++) wv[r] = LOAD8(w + r * K + i);                             \
            for (int t = 0; t < MT; t++) {                                                             \
                __m256 xv = _mm256_loadu_ps(x + t * K + i);                                            \
                for (int r = 0; r < GEMM_R; r++) acc[t][r] = _mm256_fmadd_ps(wv[r], xv, acc[t][r]);    \
            }                                                                                          \
        }                                                                                              \
        for (int t = 0; t < MT; t++)                                                                   \
            for (int r = 0; r < GEMM_R; r++) y[t * N + r] = hsum256(acc[t][r]);                        \
    }                                                                                                  \
    void NAME(const float *x, int64_t M, const WTYPE *w, float *y, int64_t N, int64_t K) {             \
        const int64_t nblocks = N / GEMM_R;                                                            \
        _Pragma("omp parallel for schedule(static)")                                                   \
        for (int64_t b = 0; b < nblocks; b++) {                                                        \
            const int64_t o0 = b * GEMM_R;                                                             \
            for (int64_t m = 0; m < M; m += GEMM_TILE) {                                               \
                const float *xm = x + m * K;                                                           \
                const WTYPE *wb = w + o0 * K;                                                          \
                float *ym = y + m * N + o0;                                                            \
                switch (M - m < GEMM_TILE ? (int)(M - m) : GEMM_TILE) {                                \
                case 1: NAME##_tile(xm, wb, ym, N, K, 1); break;                                       \
                case 2: NAME##_tile(xm, wb, ym, N, K, 2); break;                                       \
                case 3: NAME##_tile(xm, wb, ym, N, K, 3); break;                                       \
                default: NAME##_tile(xm, wb, ym, N, K, 4); break;                                      \
                }                                                                                      \
            }                                                                                          \
        }                                                                                              \
        for (int64_t o = nblocks * GEMM_R; o < N; o++) /* the last N % GEMM_R weight rows */          \
            for (int64_t m = 0; m < M; m++) {                                                          \
                __m256 acc = _mm256_setzero_ps();                                                      \
                for (int64_t i = 0; i < K; i += 8)                                                     \
                    acc = _mm256_fmadd_ps(LOAD8(w + o * K + i), _mm256_loadu_ps(x + m * K + i), acc);  \
                y[m * N + o] = hsum256(acc);                                                           \
            }                                                                                          \
    }

DEFINE_GEMM_F32_ACC(bf16_gemm_f32, uint16_t, load8_bf16)
DEFINE_GEMM_F32_ACC(f32_gemm_f32, float, load8_f32)
DEFINE_GEMM_F32_ACC(f16_gemm_f32, uint16_t, load8_f16)
DEFINE_GEMM_F32_ACC(e4m3_gemm_f32, uint8_t, load8_e4m3_div256)  // y / 256: see load8_e4m3_div256

// y = x W^T for fp8 e4m3 weights with one fp32 scale per output row (w = q * scales[o]), in the
// argument order of the int8 kernels (LIN_Q8; G is unused) so that decode_layers can call it
void e4m3_gemm_scaled_f32(const float *x, int64_t M, const uint8_t *w, const float *scales,
                          float *y, int64_t N, int64_t K, int64_t G) {
    (void)G;
    e4m3_gemm_f32(x, M, w, y, N, K);
    const __m256 k256 = _mm256_set1_ps(256.0f);
    for (int64_t m = 0; m < M; m++) {
        float *ym = y + m * N;
        int64_t o = 0;
        for (; o + 8 <= N; o += 8)
            _mm256_storeu_ps(ym + o, _mm256_mul_ps(_mm256_loadu_ps(ym + o),
                                                   _mm256_mul_ps(_mm256_loadu_ps(scales + o), k256)));
        for (; o < N; o++) ym[o] *= scales[o] * 256.0f;
    }
}

// ---- LoRA's low-rank term for decode-sized steps (layers/lora.py LinearLoRA.add_rows) ----
// For each row t whose slot s = slot[t] is >= 0: shrink u = A[s] x[t] (K shards x R values),
// then expand y[t, off_j + o] += B[s, :, off_j + o] . u[j R .. j R + R) for each shard j, whose
// output columns are spans[2j] .. spans[2j] + spans[2j + 1]. A [slots, K R, in] and B [slots,
// R, out] contiguous, fp32 or bf16 (FTYPE, widened by LOAD8); x rows contiguous ([T, in]); y
// rows `ystride` apart. in % 8 == 0.
// ranks [slots, K]: the real rank of each slot's shard (0: not targeted). The slot rank R is the
// largest adapter's, and smaller adapters are zero-padded up to it; only each shard's first
// ranks[s, j] factor rows are read, so a rank-8 adapter costs rank-8 work beside a rank-64 one
// (beside a rank-64 adapter a rank-1 one cost +71% a token before, +2-13% now: docs/lora.md).
// Both phases are split over the threads in one parallel region for all T rows: the shrink by
// (row, up to four A rows of one shard), the expand by output rows, each output row walking
// every row t with an adapter. (One region per row, as before, cost ~13000 regions a step at 64
// decode rows: more than the arithmetic.) The factors of the few adapters in a step stay in
// cache across rows.
static inline float bf16_to_f32(uint16_t v) {
    union { uint32_t u; float f; } c = {.u = (uint32_t)v << 16};
    return c.f;
}
static inline float f32_to_f32(float v) { return v; }

#define DEFINE_LORA_ROWS(NAME, FTYPE, LOAD8, TO_F32)                                                \
    void NAME(const float *x, int64_t T, int64_t in, const int64_t *slot, const FTYPE *A,          \
              const FTYPE *B, int64_t R, int64_t K, const int64_t *ranks, const int64_t *spans,     \
              float *y, int64_t ystride, int64_t out) {                                             \
        const int64_t KR = K * R, most = T * K * ((R + 3) / 4);                                    \
        /* the shrink's items (row t, first A row q, rows n <= 4 of one shard), real ranks only */ \
        int64_t small_items[3 * 256];                                                               \
        int64_t *items = most <= 256 ? small_items : (int64_t *)malloc(3 * most * sizeof(int64_t)); \
        int64_t nitems = 0;                                                                         \
        for (int64_t t = 0; t < T; t++) {                                                           \
            if (slot[t] < 0) continue;                                                              \
            for (int64_t j = 0; j < K; j++) {                                                       \
                const int64_t rk = ranks[slot[t] * K + j];                                          \
                for (int64_t b = 0; b < rk; b += 4, nitems++) {                                     \
                    items[3 * nitems] = t, items[3 * nitems + 1] = j * R + b;                       \
                    items[3 * nitems + 2] = rk - b < 4 ? rk - b : 4;                                \
                }                                                                                   \
            }                                                                                       \
        }                                                                                           \
        if (!nitems) { /* no row's adapter targets this projection */                              \
            if (items != small_items) free(items);                                                  \
            return;                                                                                 \
        }                                                                                           \
        float small[1024]; /* the shrunk rows (T K R values); on the heap past 1024 */              \
        float *u = T * KR <= 1024 ? small : (float *)malloc(T * KR * sizeof(float));                \
        _Pragma("omp parallel")                                                                     \
        {                                                                                           \
            /* four rows of A at a time: four FMA chains, each x load used four times */            \
            _Pragma("omp for schedule(static)")                                                     \
            for (int64_t it = 0; it < nitems; it++) {                                               \
                const int64_t t = items[3 * it], q = items[3 * it + 1], n = items[3 * it + 2];      \
                const float *xt = x + t * in;                                                       \
                const FTYPE *a0 = A + (slot[t] * KR + q) * in;                                      \
                float *ut = u + t * KR + q;                                                         \
                if (n < 4) { /* a shard's last rank % 4 rows, one at a time */                      \
                    for (int64_t r = 0; r < n; r++) {                                               \
                        __m256 acc = _mm256_setzero_ps();                                           \
                        for (int64_t k = 0; k < in; k += 8)                                         \
                            acc = _mm256_fmadd_ps(LOAD8(a0 + r * in + k), _mm256_loadu_ps(xt + k), acc); \
                        ut[r] = hsum256(acc);                                                       \
                    }                                                                               \
                    continue;                                                                       \
                }                                                                                   \
                const FTYPE *a1 = a0 + in, *a2 = a1 + in, *a3 = a2 + in;                            \
                __m256 c0 = _mm256_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;                         \
                for (int64_t k = 0; k < in; k += 8) {                                               \
                    const __m256 xv = _mm256_loadu_ps(xt + k);                                      \
                    c0 = _mm256_fmadd_ps(LOAD8(a0 + k), xv, c0);                                    \
                    c1 = _mm256_fmadd_ps(LOAD8(a1 + k), xv, c1);                                    \
                    c2 = _mm256_fmadd_ps(LOAD8(a2 + k), xv, c2);                                    \
                    c3 = _mm256_fmadd_ps(LOAD8(a3 + k), xv, c3);                                    \
                }                                                                                   \
                ut[0] = hsum256(c0), ut[1] = hsum256(c1), ut[2] = hsum256(c2);                      \
                ut[3] = hsum256(c3);                                                                \
            }                                                                                       \
            /* the expand: eight output columns of one shard at a time, every row's first rk */    \
            /* terms as broadcast FMAs over B's rows (a row of B [R, out] holds all columns' */    \
            /* factor r) */                                                                         \
            for (int64_t j = 0; j < K; j++) {                                                       \
                const int64_t o0 = spans[2 * j], n = spans[2 * j + 1];                              \
                _Pragma("omp for schedule(static) nowait")                                          \
                for (int64_t ob = 0; ob < (n + 7) / 8; ob++) {                                      \
                    const int64_t o = o0 + 8 * ob;                                                  \
                    for (int64_t t = 0; t < T; t++) {                                               \
                        const int64_t s = slot[t];                                                  \
                        if (s < 0) continue;                                                        \
                        const int64_t rk = ranks[s * K + j];                                        \
                        const FTYPE *b = B + s * R * out + o;                                       \
                        const float *uj = u + t * KR + j * R;                                       \
                        float *yt = y + t * ystride + o;                                            \
                        if (8 * ob + 8 > n) { /* the shard's last n % 8 columns */                  \
                            for (int64_t c = 0; c < n - 8 * ob; c++) {                              \
                                float sum = 0.0f;                                                   \
                                for (int64_t r = 0; r < rk; r++)                                    \
                                    sum += TO_F32(b[r * out + c]) * uj[r];                          \
                                yt[c] += sum;                                                       \
                            }                                                                       \
                            continue;                                                               \
                        }                                                                           \
                        if (!rk) continue;                                                          \
                        __m256 acc = _mm256_loadu_ps(yt), acc2 = _mm256_setzero_ps();               \
                        int64_t r = 0;                                                              \
                        for (; r + 2 <= rk; r += 2) {                                               \
                            acc = _mm256_fmadd_ps(LOAD8(b + r * out), _mm256_set1_ps(uj[r]), acc);  \
                            acc2 = _mm256_fmadd_ps(LOAD8(b + (r + 1) * out),                        \
                                                   _mm256_set1_ps(uj[r + 1]), acc2);                \
                        }                                                                           \
                        if (r < rk)                                                                 \
                            acc = _mm256_fmadd_ps(LOAD8(b + r * out), _mm256_set1_ps(uj[r]), acc);  \
                        _mm256_storeu_ps(yt, _mm256_add_ps(acc, acc2));                             \
                    }                                                                               \
                }                                                                                   \
            }                                                                                       \
        }                                                                                           \
        if (u != small) free(u);                                                                    \
        if (items != small_items) free(items);                                                      \
    }

DEFINE_LORA_ROWS(lora_rows_f32, float, load8_f32, f32_to_f32)
DEFINE_LORA_ROWS(lora_rows_bf16, uint16_t, load8_bf16, bf16_to_f32)

// ---- the decoder layers of a decode-shaped step, as one call ----
// models/native_decode.py runs ~11 C calls per layer; from Python each costs 1-5 us of call
// overhead plus the loop's own bookkeeping (~1 ms of a ~8 ms step of the 135M model). Here the
// same calls, in the same order on the same buffers, are made from C. The projections, the K/V
// write and the attention live in other libraries and arrive as function pointers with their
// bound arguments. The words' layout is csrc/decode_abi.h.
typedef void (*lowbit_fn)(const float *, int64_t, const void *, const void *, const void *, int64_t,
                          float *, int64_t, int64_t, int64_t);
typedef void (*q8_fn)(const float *, int64_t, const void *, const void *, float *, int64_t, int64_t,
                      int64_t);
typedef void (*dense_fn)(const float *, int64_t, const void *, float *, int64_t, int64_t);
typedef void (*sparse_fn)(const float *, int64_t, const void *, const void *, const void *,
                          float *, int64_t, int64_t);
typedef void (*sparse_q8_fn)(const float *, int64_t, const void *, const void *, const void *,
                             const void *, float *, int64_t, int64_t);
typedef void (*write_fn)(const float *, const float *, int64_t, void *, void *, void *, void *,
                         int64_t, const int64_t *, int64_t, int64_t, int64_t);
typedef void (*attn_fn)(const float *, int64_t, const void *, const void *, const void *,
                        const void *, int64_t, const int64_t *, int64_t, const int64_t *,
                        const int64_t *, float *, int64_t, int64_t, int64_t, int64_t, int64_t,
                        float, int64_t);
typedef void (*allreduce_fn)(int64_t *, float *, int64_t);

// A projection's LIN_WORDS words: y = x W^T for M rows
static void linear_call(const int64_t *l, const float *x, float *y) {
    const int64_t *a = l + LIN_ARGS;
    switch (l[LIN_KIND]) {
        case LIN_LOWBIT:  // M, packed, scales, offsets, zero_form, N, K, G
            ((lowbit_fn)l[LIN_FN])(x, a[0], (const void *)a[1], (const void *)a[2], (const void *)a[3], a[4], y, a[5], a[6], a[7]);
            break;
        case LIN_Q8:  // M, q, scales, N, K, G
            ((q8_fn)l[LIN_FN])(x, a[0], (const void *)a[1], (const void *)a[2], y, a[3], a[4], a[5]);
            break;
        case LIN_SPARSE:  // M, values, mask, row offsets, N, K (quantization/csrc/sparse.c)
            ((sparse_fn)l[LIN_FN])(x, a[0], (const void *)a[1], (const void *)a[2],
                                   (const void *)a[3], y, a[4], a[5]);
            break;
        case LIN_SPARSE_Q8:  // M, int8 values, mask, row offsets, scales, N, K (sparse.c)
            ((sparse_q8_fn)l[LIN_FN])(x, a[0], (const void *)a[1], (const void *)a[2],
                                      (const void *)a[3], (const void *)a[4], y, a[5], a[6]);
            break;
        default:  // M, weight, N, K
            ((dense_fn)l[LIN_FN])(x, a[0], (const void *)a[1], y, a[2], a[3]);
    }
}

// h[t] = embedding row ids[t], widened to fp32 (exact for bf16 and fp16)
static void embed_rows(float *h, const int64_t *ids, const void *table, int64_t kind, int64_t T,
                       int64_t hidden) {
    for (int64_t t = 0; t < T; t++) {
        float *o = h + t * hidden;
        const int64_t row = ids[t] * hidden;
        for (int64_t i = 0; i < hidden; i += 8) {
            __m256 v;
            if (kind == EMBED_BF16) v = load8_bf16((const uint16_t *)table + row + i);
            else if (kind == EMBED_F16) v = load8_f16((const uint16_t *)table + row + i);
            else v = _mm256_loadu_ps((const float *)table + row + i);
            _mm256_storeu_ps(o + i, v);
        }
    }
}

// A projection's LoRA term for the rows that have an adapter (desc: LORA_WORDS words, or 0)
static void lora_call(int64_t desc, const float *x, int64_t T, const int64_t *slots, float *y) {
    if (!desc || !slots) return;
    const int64_t *d = (const int64_t *)desc;
    if (d[LORA_KIND] == LORA_KIND_BF16)
        lora_rows_bf16(x, T, d[LORA_IN], slots, (const uint16_t *)d[LORA_A],
                       (const uint16_t *)d[LORA_B], d[LORA_RANK], d[LORA_SHARDS],
                       (const int64_t *)d[LORA_RANKS], (const int64_t *)d[LORA_SPANS], y,
                       d[LORA_OUT], d[LORA_OUT]);
    else
        lora_rows_f32(x, T, d[LORA_IN], slots, (const float *)d[LORA_A], (const float *)d[LORA_B],
                      d[LORA_RANK], d[LORA_SHARDS], (const int64_t *)d[LORA_RANKS],
                      (const int64_t *)d[LORA_SPANS], y, d[LORA_OUT], d[LORA_OUT]);
}

// Embeddings, then every decoder layer, then the final norm: x holds the normed hidden states.
void decode_layers(const int64_t *layers, int64_t n, const int64_t *s, float scale, float eps) {
    float *h = (float *)s[S_H], *x = (float *)s[S_X], *qkv = (float *)s[S_QKV];
    float *attn = (float *)s[S_ATTN], *o = (float *)s[S_O], *gu = (float *)s[S_GU];
    float *act = (float *)s[S_ACT];
    const int64_t T = s[S_T], hidden = s[S_HIDDEN], H = s[S_HEADS], KVH = s[S_KVH], D = s[S_D];
    const int64_t stride = s[S_STRIDE], h2 = D / 2;
    const float *k_new = qkv + s[S_QSIZE], *v_new = qkv + s[S_QKSIZE];
    const int64_t *lora = (const int64_t *)s[S_LORA_SLOTS];  // NULL: no row has an adapter
    // a tensor-parallel rank sums the row-parallel projections' partial outputs over the ranks
    const allreduce_fn all_reduce = (allreduce_fn)s[S_ALLREDUCE];
    int64_t *ar = (int64_t *)s[S_ALLREDUCE_CTX];
    if (s[S_EMBED_KIND] != EMBED_NONE)
        embed_rows(h, (const int64_t *)s[S_IDS], (const void *)s[S_EMBED], s[S_EMBED_KIND], T, hidden);
    rms_norm_f32(h, (const float *)s[S_NORM1], x, T, hidden, eps);
    // each row's cos / sin, gathered once for all layers
    float *cos = (float *)malloc(2 * T * h2 * sizeof(float)), *sin = cos + T * h2;
    const int64_t *pos = (const int64_t *)s[S_POS];
    for (int64_t t = 0; t < T; t++) {
        memcpy(cos + t * h2, (const float *)s[S_COS] + pos[t] * h2, h2 * sizeof(float));
        memcpy(sin + t * h2, (const float *)s[S_SIN] + pos[t] * h2, h2 * sizeof(float));
    }
    for (int64_t i = 0; i < n; i++) {
        const int64_t *l = layers + i * LAYER_WORDS;
        void *kc = (void *)l[L_K_CACHE], *vc = (void *)l[L_V_CACHE];
        void *ks = (void *)l[L_K_SCALES], *vs = (void *)l[L_V_SCALES];
        linear_call(l + L_QKV, x, qkv);
        lora_call(l[L_LORA_QKV], x, T, lora, qkv);
        rope_f32(qkv, cos, sin, T, H + KVH, D, stride);
        ((write_fn)s[S_WRITE])(k_new, v_new, stride, kc, vc, ks, vs, l[L_CACHE_DTYPE],
                               (const int64_t *)s[S_SLOTS], T, KVH, D);
        ((attn_fn)s[S_ATTEND])(qkv, stride, kc, vc, ks, vs, l[L_CACHE_DTYPE],
                               (const int64_t *)s[S_TABLES], s[S_MAXB], (const int64_t *)s[S_SEQ],
                               (const int64_t *)s[S_CTX], attn, T, H, KVH, D, s[S_BS], scale,
                               s[S_WINDOW]);
        linear_call(l + L_O, attn, o);
        lora_call(l[L_LORA_O], attn, T, lora, o);
        if (all_reduce) all_reduce(ar, o, T * hidden);
        add_rms_norm_f32(h, o, (const float *)l[L_NORM2], x, T, hidden, eps);
        linear_call(l + L_GATE_UP, x, gu);
        lora_call(l[L_LORA_GATE_UP], x, T, lora, gu);
        silu_mul_f32(gu, act, T, s[S_INTER]);
        linear_call(l + L_DOWN, act, o);
        lora_call(l[L_LORA_DOWN], act, T, lora, o);
        if (all_reduce) {
            all_reduce(ar, o, T * hidden);
            if (ar[AR_FAILED]) break;  // a rank is gone: the caller raises
        }
        // the residual add fused with the norm that follows
        add_rms_norm_f32(h, o, (const float *)l[L_NORM_NEXT], x, T, hidden, eps);
    }
    free(cos);
}

// decode_abi.h's values with their names, for Python (layers/native_ops.py decode_abi)
DEFINE_ABI_EXPORT(decode_abi, DECODE_ABI_VALUES)
