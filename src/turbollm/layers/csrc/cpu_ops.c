// Small fp32 elementwise ops of the decoder layer (RMSNorm, SiLU-and-mul, rotary embedding)
// for x86 CPUs with AVX2 + FMA. At decode sizes (a few rows of 576-4096 values) torch spends
// 10-40 us per op dispatching several aten kernels; one C call does each in 1-3 us.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

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

// One body for both weight types: a macro, because gcc does not inline a load function passed
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
