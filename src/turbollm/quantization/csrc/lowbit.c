// Low-bit weight x fp32 activation matmuls for x86 CPUs with AVX2 + FMA + F16C.
//
// Weights stay packed in memory and are widened to fp32 in registers, so a matmul reads
// ~0.56 (int4) or 1 (int8) byte per weight instead of 2 (bf16) or 4 (fp32); activations and
// accumulation are fp32, so results match dequantize-then-matmul to float rounding.
//
// int4: row o, 32-column chunk c -> 16 bytes; byte j holds column 32c+j in its low nibble and
// column 32c+j+16 in its high nibble (the GGUF Q4_0/Q4_1 block order). Per group g of G columns
// (G a multiple of 32; the last group may be shorter) an fp16 scale s and an fp16 offset f:
// zero form (AWQ/GPTQ/RTN): w = (q - f) * s;  min form (GGUF Q4_1): w = q * s + f.
// int8: row-major int8 [N, K]; w = q * scale (fp32) per group of G columns (G = K: per channel).
//
// Output rows are split over OpenMP threads (the same libgomp runtime torch uses).
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

// The avx512 and amx builds (native_build.py) take the AVX-512 BW + VNNI forms of the
// int16-activation dot products (lowbit_avx512.h), bit-identical to the AVX2 ones here.
#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define LOWBIT_AVX512 1
static void pair_order_i16(int16_t *xq, int64_t nchunks, int64_t span);  // lowbit_avx512.h
#endif

#define ROWS 4        // output rows computed together so that each x load feeds several rows
#define MAX_ROWS_TILED 64  // activation rows per gemm_a16 call (kernels.MAX_ROWS_A16 is 48)
#define MAX_GROUPS 1024

// 16 packed bytes -> the 32 weights of one chunk as four fp32 vectors (columns 0-7 ... 24-31)
static inline void unpack_q4(const uint8_t *p, __m256 out[4]) {
    __m128i v = _mm_loadu_si128((const __m128i *)p);
    __m128i mask = _mm_set1_epi8(0x0F);
    __m128i lo = _mm_and_si128(v, mask);
    __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
    out[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
    out[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
    out[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
    out[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
}

// n int4 group parameters from fp16 (s, f) to fp32: scales sc (times xd where given: the
// combined scale of a G = 32 block) and mins mn (w = q * sc + mn)
static inline void int4_params(const uint16_t *s, const uint16_t *f, int zero_form, int64_t n,
                               const float *xd, float *sc, float *mn) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 sv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + i)));
        const __m256 fv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(f + i)));
        _mm256_storeu_ps(sc + i, xd ? _mm256_mul_ps(sv, _mm256_loadu_ps(xd + i)) : sv);
        _mm256_storeu_ps(mn + i, zero_form ? _mm256_mul_ps(_mm256_xor_ps(fv, sign), sv) : fv);
    }
    for (; i < n; i++) {
        const float sv = _cvtsh_ss(s[i]), fv = _cvtsh_ss(f[i]);
        sc[i] = xd ? sv * xd[i] : sv;
        mn[i] = zero_form ? -fv * sv : fv;
    }
}

// fp32 scale and min of each group of row o
static inline void q4_row_params(const uint16_t *sh, const uint16_t *oh, int zero_form, int64_t o,
                                 int64_t ng, float *sc, float *mn) {
    int4_params(sh + o * ng, oh + o * ng, zero_form, ng, NULL, sc, mn);
}

static void q4_widen_row(const uint8_t *packed, const float *sc, const float *mn, float *dst,
                         int64_t o, int64_t K, int64_t G) {
    const int64_t nchunks = K / 32, cpg = G / 32;
    for (int64_t c = 0; c < nchunks; c++) {
        const int64_t g = c / cpg;
        __m256 s = _mm256_set1_ps(sc[g]), m = _mm256_set1_ps(mn[g]);
        __m256 w[4];
        unpack_q4(packed + (o * nchunks + c) * 16, w);
        for (int k = 0; k < 4; k++) _mm256_storeu_ps(dst + 32 * c + 8 * k, _mm256_fmadd_ps(w[k], s, m));
    }
}

static void q8_widen_row(const int8_t *q, const float *scales, float *dst, int64_t o, int64_t K,
                         int64_t G) {
    const int64_t ng = K / G;
    for (int64_t g = 0; g < ng; g++) {
        __m256 s = _mm256_set1_ps(scales[o * ng + g]);
        for (int64_t i = g * G; i < (g + 1) * G; i += 8) {
            __m128i v = _mm_loadl_epi64((const __m128i *)(q + o * K + i));
            _mm256_storeu_ps(dst + i, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), s));
        }
    }
}

// Several activation rows: widen ROWS weight rows once into an L1-resident fp32 buffer, then
// every activation row reuses it (the fused one-row kernel would redo the widening per row).
// Tiles of DOT_TILE activation rows: per 8 columns, DOT_TILE x loads and ROWS weight loads feed
// ROWS x DOT_TILE FMAs (12 accumulators + 3 x + 1 w = the 16 AVX2 registers); one activation
// row at a time, the loads outnumbered the FMAs. Each output keeps one accumulator over K in
// order, so its bits do not depend on the tiling.
#define DOT_TILE 3

static inline __attribute__((always_inline)) void dot_tile(const float *w, const float *x,
                                                           float *y, int64_t N, int64_t K,
                                                           const int MT) {
    __m256 acc[DOT_TILE][ROWS];
    for (int t = 0; t < MT; t++)
        for (int r = 0; r < ROWS; r++) acc[t][r] = _mm256_setzero_ps();
    for (int64_t i = 0; i < K; i += 8) {
        __m256 xv[DOT_TILE];
        for (int t = 0; t < MT; t++) xv[t] = _mm256_loadu_ps(x + t * K + i);
        for (int r = 0; r < ROWS; r++) {
            __m256 wv = _mm256_loadu_ps(w + r * K + i);
            for (int t = 0; t < MT; t++) acc[t][r] = _mm256_fmadd_ps(wv, xv[t], acc[t][r]);
        }
    }
    for (int t = 0; t < MT; t++)
        for (int r = 0; r < ROWS; r++) y[t * N + r] = hsum256(acc[t][r]);
}

static void dot_rows(const float *w, int rows, const float *x, int64_t M, float *y, int64_t o0,
                     int64_t N, int64_t K) {
    if (rows == ROWS) {
        for (int64_t m = 0; m < M; m += DOT_TILE) {
            const float *xm = x + m * K;
            float *ym = y + m * N + o0;
            switch (M - m < DOT_TILE ? (int)(M - m) : DOT_TILE) {
            case 1: dot_tile(w, xm, ym, N, K, 1); break;
            case 2: dot_tile(w, xm, ym, N, K, 2); break;
            default: dot_tile(w, xm, ym, N, K, 3); break;
            }
        }
        return;
    }
    for (int64_t m = 0; m < M; m++) {  // the last N % ROWS weight rows
        const float *xm = x + m * K;
        __m256 acc[ROWS];
        for (int r = 0; r < ROWS; r++) acc[r] = _mm256_setzero_ps();
        for (int64_t i = 0; i < K; i += 8) {
            __m256 xv = _mm256_loadu_ps(xm + i);
            for (int r = 0; r < rows; r++)
                acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(w + r * K + i), xv, acc[r]);
        }
        for (int r = 0; r < rows; r++) y[m * N + o0 + r] = hsum256(acc[r]);
    }
}

// y[m, o] = sum_c scale[o, g(c)] * (q[o, c] . x[m, c]) + sum_g min[o, g] * xsum[m, g]
static void q4_gemv(const float *x, const uint8_t *packed, const uint16_t *sh, const uint16_t *oh,
                    int zero_form, float *y, int64_t N, int64_t K, int64_t G) {
    const int64_t ng = (K + G - 1) / G, nchunks = K / 32, cpg = G / 32;
    float xsum[MAX_GROUPS];
    for (int64_t g = 0; g < ng; g++) {
        float s = 0.f;
        for (int64_t i = g * G; i < (g + 1) * G && i < K; i++) s += x[i];
        xsum[g] = s;
    }
    const int64_t nblocks = (N + ROWS - 1) / ROWS;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < nblocks; b++) {
        const int64_t o0 = b * ROWS;
        const int rows = (int)(N - o0 < ROWS ? N - o0 : ROWS);
        float sc[ROWS][MAX_GROUPS], mn[ROWS][MAX_GROUPS];
        __m256 acc[ROWS];
        for (int r = 0; r < rows; r++) {
            q4_row_params(sh, oh, zero_form, o0 + r, ng, sc[r], mn[r]);
            acc[r] = _mm256_setzero_ps();
        }
        for (int64_t c = 0; c < nchunks; c++) {
            __m256 x0 = _mm256_loadu_ps(x + 32 * c), x1 = _mm256_loadu_ps(x + 32 * c + 8);
            __m256 x2 = _mm256_loadu_ps(x + 32 * c + 16), x3 = _mm256_loadu_ps(x + 32 * c + 24);
            const int64_t g = c / cpg;
            for (int r = 0; r < rows; r++) {
                __m256 w[4];
                unpack_q4(packed + ((o0 + r) * nchunks + c) * 16, w);
                __m256 t = _mm256_mul_ps(w[0], x0);
                t = _mm256_fmadd_ps(w[1], x1, t);
                t = _mm256_fmadd_ps(w[2], x2, t);
                t = _mm256_fmadd_ps(w[3], x3, t);
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(sc[r][g]), t, acc[r]);
            }
        }
        for (int r = 0; r < rows; r++) {
            float s = hsum256(acc[r]);
            for (int64_t g = 0; g < ng; g++) s += mn[r][g] * xsum[g];
            y[o0 + r] = s;
        }
    }
}

// y = x W^T for x: [M, K] fp32, W int4 as described at the top; K % 32 == 0, K / G <= MAX_GROUPS
void q4_gemm(const float *x, int64_t M, const uint8_t *packed, const uint16_t *sh,
             const uint16_t *oh, int64_t zero_form, float *y, int64_t N, int64_t K, int64_t G) {
    if (M == 1) {
        q4_gemv(x, packed, sh, oh, (int)zero_form, y, N, K, G);
        return;
    }
    const int64_t ng = (K + G - 1) / G, nblocks = (N + ROWS - 1) / ROWS;
#pragma omp parallel
    {
        float *buf = (float *)aligned_alloc(64, sizeof(float) * ROWS * K);
        float sc[MAX_GROUPS], mn[MAX_GROUPS];
#pragma omp for schedule(static)
        for (int64_t b = 0; b < nblocks; b++) {
            const int64_t o0 = b * ROWS;
            const int rows = (int)(N - o0 < ROWS ? N - o0 : ROWS);
            for (int r = 0; r < rows; r++) {
                q4_row_params(sh, oh, (int)zero_form, o0 + r, ng, sc, mn);
                q4_widen_row(packed, sc, mn, buf + r * K, o0 + r, K, G);
            }
            dot_rows(buf, rows, x, M, y, o0, N, K);
        }
        free(buf);
    }
}

// y = x W^T for x: [M, K] fp32, W int8 with fp32 scales per group of G columns; G % 16 == 0
void q8_gemm(const float *x, int64_t M, const int8_t *q, const float *scales, float *y,
             int64_t N, int64_t K, int64_t G) {
    const int64_t ng = K / G, nblocks = (N + ROWS - 1) / ROWS;
    if (M > 1) {
#pragma omp parallel
        {
            float *buf = (float *)aligned_alloc(64, sizeof(float) * ROWS * K);
#pragma omp for schedule(static)
            for (int64_t b = 0; b < nblocks; b++) {
                const int64_t o0 = b * ROWS;
                const int rows = (int)(N - o0 < ROWS ? N - o0 : ROWS);
                for (int r = 0; r < rows; r++) q8_widen_row(q, scales, buf + r * K, o0 + r, K, G);
                dot_rows(buf, rows, x, M, y, o0, N, K);
            }
            free(buf);
        }
        return;
    }
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < nblocks; b++) {
        const int64_t o0 = b * ROWS;
        const int rows = (int)(N - o0 < ROWS ? N - o0 : ROWS);
        __m256 acc[ROWS];
        for (int r = 0; r < ROWS; r++) acc[r] = _mm256_setzero_ps();
        for (int64_t g = 0; g < ng; g++) {
            __m256 t[ROWS];
            for (int r = 0; r < ROWS; r++) t[r] = _mm256_setzero_ps();
            for (int64_t i = g * G; i < (g + 1) * G; i += 16) {
                __m256 xa = _mm256_loadu_ps(x + i), xb = _mm256_loadu_ps(x + i + 8);
                for (int r = 0; r < rows; r++) {
                    __m128i v = _mm_loadu_si128((const __m128i *)(q + (o0 + r) * K + i));
                    __m256 wa = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
                    __m256 wb = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8)));
                    t[r] = _mm256_fmadd_ps(wa, xa, t[r]);
                    t[r] = _mm256_fmadd_ps(wb, xb, t[r]);
                }
            }
            for (int r = 0; r < rows; r++)
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(scales[(o0 + r) * ng + g]), t[r], acc[r]);
        }
        for (int r = 0; r < rows; r++) y[o0 + r] = hsum256(acc[r]);
    }
}

// ---- one activation row as int16 ----
// With x ~ xd[c] * xq as int16 per 32 columns, a 32-column block of W . x is an integer dot
// product: AVX2's madd_epi16 does 16 multiply-adds per instruction on weights widened only to
// 16 bits, where widening them to fp32 costs ~17 instructions per block. Rounding x to 16 bits
// (relative step 1/32767 of the block's largest value) is far below fp32 GEMV noise in effect
// (int8, as llama.cpp rounds activations, measurably changed greedy answers of the 135M model).

// xq[k] = round(x[k] / xd[c]), xd[c] = max |x| over block c / 32767, xs[c] = xd[c] * sum(xq in c)
static void quantize_row_i16(const float *x, int64_t K, int16_t *xq, float *xd, float *xs) {
    for (int64_t c = 0; c < K / 32; c++) {
        const float *xc = x + 32 * c;
        __m256 mx = _mm256_setzero_ps();
        const __m256 sign = _mm256_set1_ps(-0.0f);
        for (int j = 0; j < 32; j += 8) mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, _mm256_loadu_ps(xc + j)));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const float amax = _mm_cvtss_f32(m4), d = amax / 32767.0f;
        const float id = amax > 0 ? 32767.0f / amax : 0.0f;
        __m256i sum = _mm256_setzero_si256();
        for (int j = 0; j < 32; j += 16) {
            __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xc + j), _mm256_set1_ps(id)));
            __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xc + j + 8), _mm256_set1_ps(id)));
            sum = _mm256_add_epi32(sum, _mm256_add_epi32(a, b));
            // packs interleaves 128-bit lanes: [a0-3 b0-3 | a4-7 b4-7] -> column order
            __m256i p = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8);
            _mm256_storeu_si256((__m256i *)(xq + 32 * c + j), p);
        }
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
        xd[c] = d;
        xs[c] = d * (float)_mm_cvtsi128_si32(s4);
    }
}

// 16 packed bytes of an int4 block widened to int16: lo = columns 0-15 (low nibbles),
// hi = columns 16-31 (high nibbles; a byte widened to 16 bits shifted right by 4 is exact)
static inline void unpack_u4(const uint8_t *p, __m256i *lo, __m256i *hi) {
    const __m256i wide = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)p));
    *lo = _mm256_and_si256(wide, _mm256_set1_epi16(0x0F));
    *hi = _mm256_srli_epi16(wide, 4);
}

// 32 int8 weights widened to int16 (columns 0-15, 16-31)
static inline void unpack_i8(const int8_t *p, __m256i *lo, __m256i *hi) {
    *lo = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p));
    *hi = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(p + 16)));
}

// int16 weights (lo: columns 0-15, hi: 16-31) times int16 xq over 32 columns, as 8 fp32 lanes
// (madd sums adjacent int16 products in int32: exact for 4- and 8-bit weights)
static inline __m256 dot32_i16(__m256i lo, __m256i hi, __m256i x0, __m256i x1) {
    return _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_madd_epi16(lo, x0), _mm256_madd_epi16(hi, x1)));
}

static inline __m256i load_i16(const int16_t *p) { return _mm256_loadu_si256((const __m256i *)p); }

// n rounded up to a multiple of 8: the stride of the per-block (xd, xs) and per-group (xg)
// activation arrays, whose padding is zero, so whole-vector passes need no scalar tail
static inline int64_t pad8(int64_t n) { return (n + 7) & ~(int64_t)7; }

// Per-group fp32 scales and, for int4, mins of weight row o: ngp = pad8(ng) values each. Past
// ng they are the next rows' values where reading ngp values from the row's start stays inside
// the arrays (in_bounds), else zeros; either way finite, and read only as factors of zero
// padding (min_term) or not at all.
static void group_params(const void *sh, const uint16_t *oh, int zero_form, int is_int4, int64_t o,
                         int64_t ng, int64_t ngp, int in_bounds, float *sc, float *mn) {
    if (!is_int4) {
        memcpy(sc, (const float *)sh + o * ng, ng * sizeof(float));
        memset(sc + ng, 0, (ngp - ng) * sizeof(float));
        return;
    }
    const int64_t n = in_bounds ? ngp : ng;
    int4_params((const uint16_t *)sh + o * ng, oh + o * ng, zero_form, n, NULL, sc, mn);
    memset(sc + n, 0, (ngp - n) * sizeof(float));
    memset(mn + n, 0, (ngp - n) * sizeof(float));
}

// sum_g mn[g] * xg[g] over n8 = pad8(n) values in eight lanes (one order at any row count).
// xg's padding is zero, so whatever finite values mn holds past its n add exact zeros (a tail
// loop per output cost more than the dots).
static inline float min_term(const float *mn, const float *xg, int64_t n8) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t g = 0; g < n8; g += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(mn + g), _mm256_loadu_ps(xg + g), acc);
    return hsum256(acc);
}

// A few activation rows (decode, batches, speculative verification), each rounded to
// int16 as above. Weight rows are split over threads and each is read once per tile of up to
// TILE activation rows: every weight block is widened to 16 bits once and used by each row of
// the tile. (One activation row, and two rows of int4 G = 32 weights, take the gemv_*
// functions below instead.)
//
// Every output value is summed in one order whatever the row count M, so one decode row and
// the same row in a speculative verification of several give bit-identical results (greedy
// speculation must reproduce plain decoding):
// - G = 32 (GGUF Q4_0/Q4_1/Q8_0): acc = fma(block dot, sc[c] * xd[c], acc) over the blocks;
// - groups of several blocks (RTN/AWQ/GPTQ int4, per-channel int8): t = fma(block dot, xd[c],
//   t) over a group's blocks, then acc = fma(t, sc[g], acc): the group scale is applied once
//   per group, where a combined scale per block had to be worked out for every weight row;
// then hsum(acc) plus the min term, sum_g mn[g] * xg[g].
#define TILE 8

typedef struct {
    int16_t *xq;  // [M, K] (AVX-512 builds: blocks reordered in pairs, see pair_order_i16)
    float *xd;    // [M, ncs]: K / 32 block scales, then zeros up to ncs = pad8(K / 32)
    float *xs;    // [M, ncs]: xd * (sum of the block's xq)
    float *xg;    // [M, ngs]: xs summed per group of G / 32 blocks, then zeros up to ngs =
                  // pad8(groups) (xs itself when G = 32)
    int64_t ncs, ngs;
} rows_i16;

// pairs: AVX-512 builds reorder each row for their paired-block dots (see lowbit_avx512.h);
// 0 keeps column order (lowbit_lanes.h lays the rows out its own way)
static rows_i16 quantize_rows_i16(const float *x, int64_t M, int64_t K, int64_t G, int pairs) {
    const int64_t nchunks = K / 32, cpg = G / 32;
    rows_i16 r;
    r.ncs = pad8(nchunks);
    r.ngs = cpg == 1 ? r.ncs : pad8((K + G - 1) / G);
    r.xq = (int16_t *)aligned_alloc(64, M * K * sizeof(int16_t));
    r.xd = (float *)calloc(M * (2 * r.ncs + (cpg == 1 ? 0 : r.ngs)), sizeof(float));
    r.xs = r.xd + M * r.ncs;
    r.xg = cpg == 1 ? r.xs : r.xs + M * r.ncs;
    for (int64_t m = 0; m < M; m++) {
        quantize_row_i16(x + m * K, K, r.xq + m * K, r.xd + m * r.ncs, r.xs + m * r.ncs);
#ifdef LOWBIT_AVX512
        // pairs of blocks within each group (the whole row at G = 32), as the dots read them
        if (pairs) pair_order_i16(r.xq + m * K, nchunks, cpg == 1 ? nchunks : cpg);
#endif
        for (int64_t c = 0; cpg > 1 && c < nchunks; c++) r.xg[m * r.ngs + c / cpg] += r.xs[m * r.ncs + c];
    }
    return r;
}

static void free_rows(rows_i16 r) {
    free(r.xq);
    free(r.xd);
}

// 32 weights of block c of a packed row widened to int16 (columns 0-15, 16-31)
static inline __attribute__((always_inline)) void unpack_block(const uint8_t *row, int is_int4,
                                                               int64_t c, __m256i *lo, __m256i *hi) {
    if (is_int4) unpack_u4(row + 16 * c, lo, hi);
    else unpack_i8((const int8_t *)row + 32 * c, lo, hi);
}

// The row-walking dot products (row_dots*) request the lines PREFETCH_ROWS rows ahead as the
// walk goes: the hardware prefetcher alone left a decode step waiting on DRAM (four rows walked
// without it were ~8% slower than one row at a time; with it, 1.2x faster).
#define PREFETCH_ROWS 8
static inline __attribute__((always_inline)) void prefetch_ahead(const uint8_t *w, int64_t w_stride,
                                                                 int is_int4, int NR, int64_t c) {
    if (__builtin_expect((c & (is_int4 ? 3 : 1)) == 0, 0))  // a 64-byte line: 4 int4 / 2 int8 blocks
        for (int r = 0; r < NR; r++)
            _mm_prefetch((const char *)w + (r + PREFETCH_ROWS) * w_stride + (is_int4 ? 16 : 32) * c, _MM_HINT_T0);
}

#ifdef LOWBIT_AVX512
#include "lowbit_avx512.h"  // the same six dot-product functions with 512-bit integer steps
#else
// MT activation rows of the tile against one weight row of G = 32 blocks: every weight block
// is widened to 16 bits once and used by each of the MT rows. bs[j * bstride + c] is the
// combined scale of block c for tile row j. MT is a constant after inlining, so the MT
// accumulators stay in registers.
static inline __attribute__((always_inline)) void tile_dots(
    const uint8_t *row, int is_int4, int MT, int64_t nchunks, const int16_t *xq, int64_t K,
    const float *bs, int64_t bstride, float *out) {
    __m256 acc[TILE];
    for (int j = 0; j < MT; j++) acc[j] = _mm256_setzero_ps();
    for (int64_t c = 0; c < nchunks; c++) {
        __m256i lo, hi;
        unpack_block(row, is_int4, c, &lo, &hi);
        for (int j = 0; j < MT; j++) {
            const int16_t *xm = xq + j * K + 32 * c;
            acc[j] = _mm256_fmadd_ps(dot32_i16(lo, hi, load_i16(xm), load_i16(xm + 16)),
                                     _mm256_broadcast_ss(bs + j * bstride + c), acc[j]);
        }
    }
    for (int j = 0; j < MT; j++) out[j] = hsum256(acc[j]);
}

// The same for a weight row with groups of cpg blocks: xd[j * xdstride + c] is the activation
// scale of block c for tile row j, sc[g] the row's group scales.
static inline __attribute__((always_inline)) void tile_dots_grouped(
    const uint8_t *row, int is_int4, int MT, int64_t nchunks, int64_t cpg, const int16_t *xq,
    int64_t K, const float *xd, int64_t xdstride, const float *sc, float *out) {
    __m256 acc[TILE], t[TILE];
    for (int j = 0; j < MT; j++) acc[j] = _mm256_setzero_ps();
    for (int64_t c0 = 0, g = 0; c0 < nchunks; c0 += cpg, g++) {
        const int64_t c1 = c0 + cpg < nchunks ? c0 + cpg : nchunks;
        for (int j = 0; j < MT; j++) t[j] = _mm256_setzero_ps();
        for (int64_t c = c0; c < c1; c++) {
            __m256i lo, hi;
            unpack_block(row, is_int4, c, &lo, &hi);
            for (int j = 0; j < MT; j++) {
                const int16_t *xm = xq + j * K + 32 * c;
                t[j] = _mm256_fmadd_ps(dot32_i16(lo, hi, load_i16(xm), load_i16(xm + 16)),
                                       _mm256_broadcast_ss(xd + j * xdstride + c), t[j]);
            }
        }
        const __m256 s = _mm256_broadcast_ss(sc + g);
        for (int j = 0; j < MT; j++) acc[j] = _mm256_fmadd_ps(t[j], s, acc[j]);
    }
    for (int j = 0; j < MT; j++) out[j] = hsum256(acc[j]);
}

// One activation row (batch-1 decode) against NR weight rows: the NR accumulator chains are
// independent, where one row alone waits on each block's fma, and each xq load feeds every row.
// Each output is summed in the same order as in tile_dots, so the bits match the tiled path.
static inline __attribute__((always_inline)) void row_dots(
    const uint8_t *w, int64_t w_stride, int is_int4, int NR, int64_t nchunks, const int16_t *xq,
    const float *bs, float *out) {
    __m256 acc[ROWS];
    for (int r = 0; r < NR; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t c = 0; c < nchunks; c++) {
        const __m256i x0 = load_i16(xq + 32 * c), x1 = load_i16(xq + 32 * c + 16);
        prefetch_ahead(w, w_stride, is_int4, NR, c);
        for (int r = 0; r < NR; r++) {
            __m256i lo, hi;
            unpack_block(w + r * w_stride, is_int4, c, &lo, &hi);
            acc[r] = _mm256_fmadd_ps(dot32_i16(lo, hi, x0, x1), _mm256_broadcast_ss(bs + r * nchunks + c), acc[r]);
        }
    }
    for (int r = 0; r < NR; r++) out[r] = hsum256(acc[r]);
}

// The same for two activation rows (xq rows K apart; bs of the second row bs_stride on): 2 x NR
// chains, each weight block widened once for both. A separate function, not a row count
// parameter of row_dots: with arrays for two rows in it, gcc stored row_dots' one-row
// accumulators to the stack on every block.
static inline __attribute__((always_inline)) void row_dots_pair(
    const uint8_t *w, int64_t w_stride, int is_int4, int NR, int64_t nchunks, const int16_t *xq,
    int64_t K, const float *bs, int64_t bs_stride, float *out) {
    __m256 acc[2 * ROWS];  // [j * ROWS + r]
    for (int i = 0; i < 2 * ROWS; i++) acc[i] = _mm256_setzero_ps();
    for (int64_t c = 0; c < nchunks; c++) {
        prefetch_ahead(w, w_stride, is_int4, NR, c);
        for (int r = 0; r < NR; r++) {
            __m256i lo, hi;
            unpack_block(w + r * w_stride, is_int4, c, &lo, &hi);
            for (int j = 0; j < 2; j++) {
                const int16_t *xm = xq + j * K + 32 * c;
                acc[j * ROWS + r] = _mm256_fmadd_ps(dot32_i16(lo, hi, load_i16(xm), load_i16(xm + 16)),
                    _mm256_broadcast_ss(bs + j * bs_stride + r * nchunks + c), acc[j * ROWS + r]);
            }
        }
    }
    for (int j = 0; j < 2; j++)
        for (int r = 0; r < NR; r++) out[j * ROWS + r] = hsum256(acc[j * ROWS + r]);
}

// The same for weight rows with groups of cpg blocks (as tile_dots_grouped): one xd broadcast
// per block feeds every row, and sc[r * sc_stride + g] is applied once per group.
static inline __attribute__((always_inline)) void row_dots_grouped(
    const uint8_t *w, int64_t w_stride, int is_int4, int NR, int64_t nchunks, int64_t cpg,
    const int16_t *xq, const float *xd, const float *sc, int64_t sc_stride, float *out) {
    __m256 acc[ROWS], t[ROWS];
    for (int r = 0; r < NR; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t c0 = 0, g = 0; c0 < nchunks; c0 += cpg, g++) {
        const int64_t c1 = c0 + cpg < nchunks ? c0 + cpg : nchunks;
        for (int r = 0; r < NR; r++) t[r] = _mm256_setzero_ps();
        for (int64_t c = c0; c < c1; c++) {
            const __m256i x0 = load_i16(xq + 32 * c), x1 = load_i16(xq + 32 * c + 16);
            const __m256 xdv = _mm256_broadcast_ss(xd + c);
            prefetch_ahead(w, w_stride, is_int4, NR, c);
            for (int r = 0; r < NR; r++) {
                __m256i lo, hi;
                unpack_block(w + r * w_stride, is_int4, c, &lo, &hi);
                t[r] = _mm256_fmadd_ps(dot32_i16(lo, hi, x0, x1), xdv, t[r]);
            }
        }
        for (int r = 0; r < NR; r++) acc[r] = _mm256_fmadd_ps(t[r], _mm256_broadcast_ss(sc + r * sc_stride + g), acc[r]);
    }
    for (int r = 0; r < NR; r++) out[r] = hsum256(acc[r]);
}

// The same for two activation rows (xq rows K apart, xd rows xd_stride apart) against NR <= 2
// int4 weight rows: 4 t chains, where the tiled path's one weight row had 2 and waited on each
// FMA's latency. Separate arrays per activation row (gcc kept a 2 x 2 array on the stack).
static inline __attribute__((always_inline)) void row_dots_grouped_pair(
    const uint8_t *w, int64_t w_stride, int NR, int64_t nchunks, int64_t cpg, const int16_t *xq,
    int64_t K, const float *xd, int64_t xd_stride, const float *sc, int64_t sc_stride,
    float *out) {
    __m256 acc0[2], acc1[2];
    for (int r = 0; r < NR; r++) acc0[r] = acc1[r] = _mm256_setzero_ps();
    for (int64_t c0 = 0, g = 0; c0 < nchunks; c0 += cpg, g++) {
        const int64_t c1 = c0 + cpg < nchunks ? c0 + cpg : nchunks;
        __m256 t0[2], t1[2];
        for (int r = 0; r < NR; r++) t0[r] = t1[r] = _mm256_setzero_ps();
        for (int64_t c = c0; c < c1; c++) {
            const __m256 xd0 = _mm256_broadcast_ss(xd + c), xd1 = _mm256_broadcast_ss(xd + xd_stride + c);
            prefetch_ahead(w, w_stride, 1, NR, c);
            for (int r = 0; r < NR; r++) {
                __m256i lo, hi;
                unpack_u4(w + r * w_stride + 16 * c, &lo, &hi);
                t0[r] = _mm256_fmadd_ps(dot32_i16(lo, hi, load_i16(xq + 32 * c), load_i16(xq + 32 * c + 16)), xd0, t0[r]);
                t1[r] = _mm256_fmadd_ps(dot32_i16(lo, hi, load_i16(xq + K + 32 * c), load_i16(xq + K + 32 * c + 16)), xd1, t1[r]);
            }
        }
        for (int r = 0; r < NR; r++) {
            const __m256 s = _mm256_broadcast_ss(sc + r * sc_stride + g);
            acc0[r] = _mm256_fmadd_ps(t0[r], s, acc0[r]);
            acc1[r] = _mm256_fmadd_ps(t1[r], s, acc1[r]);
        }
    }
    for (int r = 0; r < NR; r++) {
        out[r] = hsum256(acc0[r]);
        out[2 + r] = hsum256(acc1[r]);
    }
}

#endif  // LOWBIT_AVX512

// Group scales and, for int4, mins of ROWS consecutive rows: their parameters lie contiguous
// in memory, so one vector pass over ROWS * ng values replaces ROWS per-row passes with short
// tails (those took a quarter of a decode GEMV's time at G = 32; at G = 96, where a 576-wide
// row has 6 groups, per-row passes left the one-row GEMV ~20% slower than G = 32). With xd4 (G = 32: xd repeated ROWS times) the scales come out
// combined with the activation's block scales (bs = sc * xd). Same values as group_params.
static void quad_params(const void *sh, const uint16_t *oh, int zero_form, int is_int4, int64_t o0,
                        int64_t ng, const float *xd4, float *sc, float *mn) {
    const int64_t n = ROWS * ng;
    if (is_int4) {
        int4_params((const uint16_t *)sh + o0 * ng, oh + o0 * ng, zero_form, n, xd4, sc, mn);
        return;
    }
    const float *s = (const float *)sh + o0 * ng;
    if (!xd4) {
        memcpy(sc, s, n * sizeof(float));
        return;
    }
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(sc + i, _mm256_mul_ps(_mm256_loadu_ps(s + i), _mm256_loadu_ps(xd4 + i)));
    for (; i < n; i++) sc[i] = s[i] * xd4[i];
}

// bs[c] = sc[c] * xd[c] over n8 = pad8(blocks) values (G = 32: one scale per block)
static inline void block_scales(const float *sc, const float *xd, int64_t n8, float *bs) {
    for (int64_t c = 0; c < n8; c += 8)
        _mm256_storeu_ps(bs + c, _mm256_mul_ps(_mm256_loadu_ps(sc + c), _mm256_loadu_ps(xd + c)));
}

// One activation row, G = 32 (GGUF Q4_0/Q4_1/Q8_0): the combined scales bs = sc * xd of four
// weight rows in one pass (quad_params with xd4), then row_dots
static void gemv_blocks(const rows_i16 *x, const uint8_t *w, const void *sh, const uint16_t *oh,
                        int zero_form, int is_int4, float *y, int64_t N, int64_t K) {
    const int64_t nchunks = K / 32, ncs = x->ncs, rn = ROWS * nchunks;
    const int64_t w_stride = is_int4 ? K / 2 : K;
#pragma omp parallel
    {
        // bs, xd4 (xd repeated ROWS times), mn: [ROWS, nchunks], bs and mn with 8 more (the
        // last rows of a matrix write ncs values from their start, and min_term reads as many)
        float *bs = (float *)calloc(3 * rn + 16, sizeof(float));
        float *xd4 = bs + rn + 8, *mn = xd4 + rn;
        for (int r = 0; r < ROWS; r++) memcpy(xd4 + r * nchunks, x->xd, nchunks * sizeof(float));
#pragma omp for schedule(static)
        for (int64_t o0 = 0; o0 < N; o0 += ROWS) {
            const int nr = (int)(N - o0 < ROWS ? N - o0 : ROWS);
            if (nr == ROWS) quad_params(sh, oh, zero_form, is_int4, o0, nchunks, xd4, bs, mn);
            else for (int r = 0; r < nr; r++) {  // the last N % ROWS rows, in order: each one's
                // padding is overwritten by the next row's values
                group_params(sh, oh, zero_form, is_int4, o0 + r, nchunks, ncs,
                             (N - o0 - r) * nchunks >= ncs, bs + r * nchunks, mn + r * nchunks);
                block_scales(bs + r * nchunks, x->xd, ncs, bs + r * nchunks);
            }
            float dots[ROWS];
            const uint8_t *rows = w + o0 * w_stride;
#define RD(NR) (is_int4 ? row_dots(rows, w_stride, 1, NR, nchunks, x->xq, bs, dots) \
                        : row_dots(rows, w_stride, 0, NR, nchunks, x->xq, bs, dots))
            switch (nr) {
                case 4: RD(4); break;
                case 3: RD(3); break;
                case 2: RD(2); break;
                default: RD(1); break;
            }
#undef RD
            for (int r = 0; r < nr; r++)
                y[o0 + r] = dots[r] + (is_int4 ? min_term(mn + r * nchunks, x->xs, ncs) : 0.f);
        }
        free(bs);
    }
}

// Two activation rows of int4 G = 32 weights (a speculative step verifying one proposal, a
// batch of two): as gemv_blocks, with row_dots_pair's 8 accumulator chains, where the tiled
// path's one weight row at a time had 2 and waited on each FMA's latency. A function of its
// own: sharing gemv_blocks' loop, gcc kept the one-row accumulators on the stack.
static void gemv_blocks_pair(const rows_i16 *x, const uint8_t *w, const uint16_t *sh,
                             const uint16_t *oh, int zero_form, float *y, int64_t N, int64_t K) {
    const int64_t nchunks = K / 32, ncs = x->ncs, rn = ROWS * nchunks, stride = rn + 8;
    const int64_t w_stride = K / 2;
#pragma omp parallel
    {
        // bs [2, stride] (each activation row's combined scales of four weight rows), then the
        // weight rows' own sc and mn [stride], as in gemv_blocks
        float *bs = (float *)calloc(4 * stride, sizeof(float));
        float *sc = bs + 2 * stride, *mn = sc + stride;
#pragma omp for schedule(static)
        for (int64_t o0 = 0; o0 < N; o0 += ROWS) {
            const int nr = (int)(N - o0 < ROWS ? N - o0 : ROWS);
            if (nr == ROWS) quad_params(sh, oh, zero_form, 1, o0, nchunks, NULL, sc, mn);
            else for (int r = 0; r < nr; r++)
                group_params(sh, oh, zero_form, 1, o0 + r, nchunks, ncs,
                             (N - o0 - r) * nchunks >= ncs, sc + r * nchunks, mn + r * nchunks);
            for (int j = 0; j < 2; j++)
                for (int r = 0; r < nr; r++)
                    block_scales(sc + r * nchunks, x->xd + j * ncs, ncs, bs + j * stride + r * nchunks);
            float dots[2 * ROWS];
            const uint8_t *rows = w + o0 * w_stride;
#define RP(NR) row_dots_pair(rows, w_stride, 1, NR, nchunks, x->xq, K, bs, stride, dots)
            switch (nr) {
                case 4: RP(4); break;
                case 3: RP(3); break;
                case 2: RP(2); break;
                default: RP(1); break;
            }
#undef RP
            for (int j = 0; j < 2; j++)
                for (int r = 0; r < nr; r++)
                    y[j * N + o0 + r] = dots[j * ROWS + r] + min_term(mn + r * nchunks, x->xs + j * ncs, ncs);
        }
        free(bs);
    }
}

// Two activation rows of int4 weights with groups of several blocks: four weight rows' group
// scales in one pass, then two pairs of weight rows through row_dots_grouped_pair
static void gemv_groups_pair(const rows_i16 *x, const uint8_t *w, const uint16_t *sh,
                             const uint16_t *oh, int zero_form, float *y, int64_t N, int64_t K,
                             int64_t G) {
    const int64_t ng = (K + G - 1) / G, nchunks = K / 32, cpg = G / 32, ngp = x->ngs;
    const int64_t w_stride = K / 2, rn = ROWS * ng;
#pragma omp parallel
    {
        // sc, mn: [ROWS, ng], each with 8 more (as in gemv_groups)
        float *sc = (float *)calloc(2 * rn + 16, sizeof(float)), *mn = sc + rn + 8;
#pragma omp for schedule(static)
        for (int64_t o0 = 0; o0 < N; o0 += ROWS) {
            const int nr = (int)(N - o0 < ROWS ? N - o0 : ROWS);
            if (nr == ROWS) quad_params(sh, oh, zero_form, 1, o0, ng, NULL, sc, mn);
            else for (int r = 0; r < nr; r++)
                group_params(sh, oh, zero_form, 1, o0 + r, ng, ngp, (N - o0 - r) * ng >= ngp,
                             sc + r * ng, mn + r * ng);
            for (int p = 0; p < nr; p += 2) {
                float dots[4];  // [activation row * 2 + weight row of the pair]
                const uint8_t *rows = w + (o0 + p) * w_stride;
                if (nr - p >= 2)
                    row_dots_grouped_pair(rows, w_stride, 2, nchunks, cpg, x->xq, K, x->xd, x->ncs, sc + p * ng, ng, dots);
                else
                    row_dots_grouped_pair(rows, w_stride, 1, nchunks, cpg, x->xq, K, x->xd, x->ncs, sc + p * ng, ng, dots);
                for (int j = 0; j < 2; j++)
                    for (int r = 0; r < 2 && p + r < nr; r++)
                        y[j * N + o0 + p + r] = dots[j * 2 + r] + min_term(mn + (p + r) * ng, x->xg + j * ngp, ngp);
            }
        }
        free(sc);
    }
}

// One activation row, groups of several blocks: the group scales of four weight rows in one
// pass, then row_dots_grouped
static void gemv_groups(const rows_i16 *x, const uint8_t *w, const void *sh, const uint16_t *oh,
                        int zero_form, int is_int4, float *y, int64_t N, int64_t K, int64_t G) {
    const int64_t ng = (K + G - 1) / G, nchunks = K / 32, cpg = G / 32, ngp = x->ngs;
    const int64_t w_stride = is_int4 ? K / 2 : K, rn = ROWS * ng;
#pragma omp parallel
    {
        // sc, mn: [ROWS, ng], each with 8 more (as in gemv_blocks)
        float *sc = (float *)calloc(2 * rn + 16, sizeof(float)), *mn = sc + rn + 8;
#pragma omp for schedule(static)
        for (int64_t o0 = 0; o0 < N; o0 += ROWS) {
            const int nr = (int)(N - o0 < ROWS ? N - o0 : ROWS);
            if (nr == ROWS) quad_params(sh, oh, zero_form, is_int4, o0, ng, NULL, sc, mn);
            else for (int r = 0; r < nr; r++)
                group_params(sh, oh, zero_form, is_int4, o0 + r, ng, ngp, (N - o0 - r) * ng >= ngp,
                             sc + r * ng, mn + r * ng);
            float dots[ROWS];
            const uint8_t *rows = w + o0 * w_stride;
#define RG(NR) (is_int4 ? row_dots_grouped(rows, w_stride, 1, NR, nchunks, cpg, x->xq, x->xd, sc, ng, dots) \
                        : row_dots_grouped(rows, w_stride, 0, NR, nchunks, cpg, x->xq, x->xd, sc, ng, dots))
            switch (nr) {
                case 4: RG(4); break;
                case 3: RG(3); break;
                case 2: RG(2); break;
                default: RG(1); break;
            }
#undef RG
            for (int r = 0; r < nr; r++)
                y[o0 + r] = dots[r] + (is_int4 ? min_term(mn + r * ng, x->xg, ngp) : 0.f);
        }
        free(sc);
    }
}

// Rows of tile t when M rows are cut into ceil(M / TILE) tiles of near-equal size: 9 rows make
// tiles of 5 and 4, not 8 and a lone row whose single accumulator chain per weight row waits on
// every fma (all 120 int4 linears at 9 rows: 20.5 -> 19.2 ms).
static inline int tile_rows(int64_t M, int64_t t) {
    const int64_t n = (M + TILE - 1) / TILE, base = M / n;
    return (int)(base + (t < M % n ? 1 : 0));
}

// y[m, o] = x[m] . W[o] for x: [M, K] fp32 (the Python side sends up to MAX_ROWS_A16 rows;
// more go through MAX_ROWS_TILED at a time: rows are independent, so each gets the same bits)
static void gemm_a16(const float *x, int64_t M, const uint8_t *w, const void *sh,
                     const uint16_t *oh, int zero_form, int is_int4, float *y, int64_t N,
                     int64_t K, int64_t G) {
    if (M > MAX_ROWS_TILED) {
        for (int64_t m = 0; m < M; m += MAX_ROWS_TILED)
            gemm_a16(x + m * K, M - m < MAX_ROWS_TILED ? M - m : MAX_ROWS_TILED, w, sh, oh,
                     zero_form, is_int4, y + m * N, N, K, G);
        return;
    }
    const int64_t ng = (K + G - 1) / G, nchunks = K / 32, cpg = G / 32;
    const int64_t w_stride = is_int4 ? K / 2 : K;
    rows_i16 r = quantize_rows_i16(x, M, K, G, 1);
    // two rows of int8 stay on the tiled path: twice int4's bytes per weight, its head (49152 x
    // 576, Q8_0) streams at memory speed there and was 5-15% slower in gemv_blocks_pair
    if (M == 1 || (M == 2 && is_int4)) {
        if (M == 1 && cpg > 1) gemv_groups(&r, w, sh, oh, zero_form, is_int4, y, N, K, G);
        else if (M == 1) gemv_blocks(&r, w, sh, oh, zero_form, is_int4, y, N, K);
        else if (cpg > 1) gemv_groups_pair(&r, w, (const uint16_t *)sh, oh, zero_form, y, N, K, G);
        else gemv_blocks_pair(&r, w, (const uint16_t *)sh, oh, zero_form, y, N, K);
        free_rows(r);
        return;
    }
    const int64_t ncs = r.ncs, ngp = r.ngs, ntiles = (M + TILE - 1) / TILE;
    int tiles[(MAX_ROWS_TILED + TILE - 1) / TILE];  // rows of each tile, worked out once
    for (int64_t t = 0; t < ntiles; t++) tiles[t] = tile_rows(M, t);
#pragma omp parallel
    {
        // sc, mn [ngp] (a weight row's groups), then bs [TILE, ncs] (G = 32: combined scales
        // sc[c] * xd[m, c] of the tile's rows)
        float *sc = (float *)calloc(2 * ngp + TILE * ncs, sizeof(float)), *mn = sc + ngp;
        float *bs = mn + ngp;
#pragma omp for schedule(static)
        for (int64_t o = 0; o < N; o++) {
            group_params(sh, oh, zero_form, is_int4, o, ng, ngp, (N - o) * ng >= ngp, sc, mn);
            const uint8_t *row = w + o * w_stride;
            for (int64_t t = 0, m0 = 0; t < ntiles; m0 += tiles[t++]) {
                const int mt = tiles[t];
                float dots[TILE];
                const int16_t *xq = r.xq + m0 * K;
                const float *xd = r.xd + m0 * ncs;
                if (cpg == 1)
                    for (int j = 0; j < mt; j++) block_scales(sc, xd + j * ncs, ncs, bs + j * ncs);
#define TD(MT) (cpg == 1 ? (is_int4 ? tile_dots(row, 1, MT, nchunks, xq, K, bs, ncs, dots) \
                                    : tile_dots(row, 0, MT, nchunks, xq, K, bs, ncs, dots)) \
                         : (is_int4 ? tile_dots_grouped(row, 1, MT, nchunks, cpg, xq, K, xd, ncs, sc, dots) \
                                    : tile_dots_grouped(row, 0, MT, nchunks, cpg, xq, K, xd, ncs, sc, dots)))
                switch (mt) {
                    case 8: TD(8); break;
                    case 7: TD(7); break;
                    case 6: TD(6); break;
                    case 5: TD(5); break;
                    case 4: TD(4); break;
                    case 3: TD(3); break;
                    case 2: TD(2); break;
                    default: TD(1); break;
                }
#undef TD
                for (int j = 0; j < mt; j++) {
                    const int64_t m = m0 + j;
                    y[m * N + o] = dots[j] + (is_int4 ? min_term(mn, r.xg + m * ngp, ngp) : 0.f);
                }
            }
        }
        free(sc);
    }
    free_rows(r);
}

void q4_gemm_a16(const float *x, int64_t M, const uint8_t *packed, const uint16_t *sh,
                 const uint16_t *oh, int64_t zero_form, float *y, int64_t N, int64_t K, int64_t G) {
    gemm_a16(x, M, packed, sh, oh, (int)zero_form, 1, y, N, K, G);
}

void q8_gemm_a16(const float *x, int64_t M, const int8_t *q, const float *scales, float *y,
                 int64_t N, int64_t K, int64_t G) {
    gemm_a16(x, M, (const uint8_t *)q, scales, NULL, 0, 0, y, N, K, G);
}

// fp32 weight rows [row0, row1) for the many-rows path (a dense GEMM then does the math)
void q4_dequant(const uint8_t *packed, const uint16_t *sh, const uint16_t *oh, int64_t zero_form,
                float *out, int64_t row0, int64_t row1, int64_t K, int64_t G) {
    const int64_t ng = (K + G - 1) / G;
#pragma omp parallel
    {
        float sc[MAX_GROUPS], mn[MAX_GROUPS];
#pragma omp for schedule(static)
        for (int64_t o = row0; o < row1; o++) {
            q4_row_params(sh, oh, (int)zero_form, o, ng, sc, mn);
            q4_widen_row(packed, sc, mn, out + (o - row0) * K, o, K, G);
        }
    }
}

void q8_dequant(const int8_t *q, const float *scales, float *out, int64_t row0, int64_t row1,
                int64_t K, int64_t G) {
#pragma omp parallel for schedule(static)
    for (int64_t o = row0; o < row1; o++) q8_widen_row(q, scales, out + (o - row0) * K, o, K, G);
}

#ifdef LOWBIT_AVX512
#include "lowbit_lanes.h"  // q4_gemm_lanes, q8_gemm_lanes: 16 outputs per register, several rows
#endif

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#include "lowbit_amx.h"  // q4_gemm_amx, q8_gemm_amx: bf16 tiles for several activation rows
#endif
