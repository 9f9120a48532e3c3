// Sparse GEMV for bitmask-compressed weights (the compressed-tensors sparse-bitmask layout, as
// quantization/sparse.py packs it): decode rows read only the kept values and one bit per
// weight, so a 50%-sparse bf16 weight costs 9 bits per weight instead of 16.
//
//   y[r, n] = sum_k x[r, k] W[n, k] for r < M, with W [N, K] stored as
//     values      kept values, row after row, in column order (fp32 or bf16), followed by at
//                 least 8 padding elements (the last 8-column load may read past the row's end)
//     mask        uint8 [N, K / 8]: bit b of byte j is column 8j + b (1 = kept); K % 8 == 0
//     row_offsets int64 [N]: index in `values` of each row's first kept value
//
// The next popcount(mask bits) values are loaded and spread to their columns, then multiplied
// with the activations: on AVX2 8 columns (one mask byte) at a time, through a permutation
// from a 256-entry table with the dropped lanes zeroed; with AVX-512 16 (fp32 expand-loads) or
// 32 (bf16: VBMI2 16-bit expand-loads) at a time. Rows split across OpenMP threads; M rows of
// activations share each expanded weight vector.
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

// PERM[m][i]: for lane i set in m, the index among m's set bits (its value's position in the
// packed run); lanes not in m point at 0 and are zeroed after the permutation.
static int32_t PERM[256][8];
static int perm_ready = 0;

static void init_perm(void) {
    for (int m = 0; m < 256; m++) {
        int k = 0;
        for (int i = 0; i < 8; i++)
            PERM[m][i] = (m >> i) & 1 ? k++ : 0;
    }
    perm_ready = 1;
}

// the 8 lanes of mask byte m as an all-ones / all-zeros float mask
static inline __m256 lane_mask(unsigned m) {
    const __m256i bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    __m256i v = _mm256_and_si256(_mm256_set1_epi32((int)m), bits);
    return _mm256_castsi256_ps(_mm256_cmpeq_epi32(v, bits));
}

static inline __m256 expand_f32(const float *p, unsigned m) {
#ifdef __AVX512VL__
    return _mm256_maskz_expandloadu_ps((__mmask8)m, p);
#else
    __m256 v = _mm256_permutevar8x32_ps(_mm256_loadu_ps(p),
                                        _mm256_loadu_si256((const __m256i *)PERM[m]));
    return _mm256_and_ps(v, lane_mask(m));
#endif
}

static inline __m256 expand_bf16(const uint16_t *p, unsigned m) {
    __m256 v = _mm256_permutevar8x32_ps(load8_bf16(p),
                                        _mm256_loadu_si256((const __m256i *)PERM[m]));
    return _mm256_and_ps(v, lane_mask(m));
}

#define MAX_ROWS 8  // activation rows per call (decode batches); more: the caller loops

// One output row's dot products with MT activation rows (MT a constant at each call site, so
// the accumulators stay in registers). The mask is read 64 columns (one uint64) at a time: the
// values of the word's 8 bytes start at independent offsets (popcounts of the word's lower
// bytes), so the 8 expand-loads do not wait on each other, and the running pointer moves once
// per 64 columns. (Moving it once per byte made every load wait on the previous popcount.) Two
// accumulators per row alternate by byte, so consecutive FMAs do not chain either.
#define BITMASK_ROW(NAME, T, EXPAND)                                                           \
    static inline __attribute__((always_inline)) void NAME##_row(                              \
        const float *x, const T *p, const uint8_t *mr, float *y, int64_t n, int64_t N,         \
        int64_t K, const int MT) {                                                             \
        const int64_t B = K / 8, W = B / 8;                                                    \
        __m256 a0[MAX_ROWS], a1[MAX_ROWS];                                                     \
        for (int r = 0; r < MT; r++) a0[r] = a1[r] = _mm256_setzero_ps();                      \
        for (int64_t w = 0; w < W; w++) {                                                      \
            uint64_t word;                                                                     \
            memcpy(&word, mr + 8 * w, 8);                                                      \
            if (!word) continue;                                                               \
            const float *xw = x + 64 * w;                                                      \
            for (int b = 0; b < 8; b += 2) {                                                   \
                const unsigned m0 = (unsigned)(word >> (8 * b)) & 0xFFu;                       \
                const unsigned m1 = (unsigned)(word >> (8 * b + 8)) & 0xFFu;                   \
                const uint64_t below0 = b ? word & ((1ULL << (8 * b)) - 1) : 0;                \
                const uint64_t below1 = word & ((1ULL << (8 * b + 8)) - 1);                    \
                const __m256 v0 = EXPAND(p + __builtin_popcountll(below0), m0);                \
                const __m256 v1 = EXPAND(p + __builtin_popcountll(below1), m1);                \
                for (int r = 0; r < MT; r++) {                                                 \
                    a0[r] = _mm256_fmadd_ps(v0, _mm256_loadu_ps(xw + r * K + 8 * b), a0[r]);   \
                    a1[r] = _mm256_fmadd_ps(v1, _mm256_loadu_ps(xw + r * K + 8 * b + 8), a1[r]); \
                }                                                                              \
            }                                                                                  \
            p += __builtin_popcountll(word);                                                   \
        }                                                                                      \
        for (int64_t j = W * 8; j < B; j++) { /* the last K % 64 columns, byte by byte */      \
            const unsigned m = mr[j];                                                          \
            if (!m) continue;                                                                  \
            const __m256 v = EXPAND(p, m);                                                     \
            p += __builtin_popcount(m);                                                        \
            for (int r = 0; r < MT; r++)                                                       \
                a0[r] = _mm256_fmadd_ps(v, _mm256_loadu_ps(x + r * K + 8 * j), a0[r]);         \
        }                                                                                      \
        for (int r = 0; r < MT; r++) y[r * N + n] = hsum256(_mm256_add_ps(a0[r], a1[r]));      \
    }

#ifdef __AVX512BW__
// AVX-512 (the avx512 and amx builds), fp32 values: 16 columns per expand-load instead of 8,
// each 16-bit quarter of the 64-column mask word spreading its values in one instruction. Four
// accumulators per row (one per quarter) keep the FMAs independent; the K % 64 tail takes the
// 8-column path. (bf16 values take bf16_row32 below.)
static inline __m512 expand16_f32(const float *p, unsigned m) {
    return _mm512_maskz_expandloadu_ps((__mmask16)m, p);
}

static inline float hsum512(__m512 v) {
    return hsum256(_mm256_add_ps(_mm512_castps512_ps256(v),
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))));
}

#define BITMASK_ROW16(NAME, T, EXPAND16, EXPAND)                                                \
    static inline __attribute__((always_inline)) void NAME##_row16(                            \
        const float *x, const T *p, const uint8_t *mr, float *y, int64_t n, int64_t N,         \
        int64_t K, const int MT) {                                                             \
        const int64_t B = K / 8, W = B / 8;                                                    \
        __m512 a[MAX_ROWS][4];                                                                 \
        for (int r = 0; r < MT; r++)                                                           \
            for (int q = 0; q < 4; q++) a[r][q] = _mm512_setzero_ps();                         \
        for (int64_t w = 0; w < W; w++) {                                                      \
            uint64_t word;                                                                     \
            memcpy(&word, mr + 8 * w, 8);                                                      \
            if (!word) continue;                                                               \
            const float *xw = x + 64 * w;                                                      \
            unsigned below = 0;                                                                \
            for (int q = 0; q < 4; q++) {                                                      \
                const unsigned m = (unsigned)(word >> (16 * q)) & 0xFFFFu;                     \
                const __m512 v = EXPAND16(p + below, m);                                       \
                below += (unsigned)__builtin_popcount(m);                                      \
                for (int r = 0; r < MT; r++)                                                   \
                    a[r][q] = _mm512_fmadd_ps(v, _mm512_loadu_ps(xw + r * K + 16 * q), a[r][q]); \
            }                                                                                  \
            p += below;                                                                        \
        }                                                                                      \
        __m256 t[MAX_ROWS];                                                                    \
        for (int r = 0; r < MT; r++) t[r] = _mm256_setzero_ps();                               \
        for (int64_t j = W * 8; j < B; j++) { /* the last K % 64 columns, byte by byte */      \
            const unsigned m = mr[j];                                                          \
            if (!m) continue;                                                                  \
            const __m256 v = EXPAND(p, m);                                                     \
            p += __builtin_popcount(m);                                                        \
            for (int r = 0; r < MT; r++)                                                       \
                t[r] = _mm256_fmadd_ps(v, _mm256_loadu_ps(x + r * K + 8 * j), t[r]);           \
        }                                                                                      \
        for (int r = 0; r < MT; r++)                                                           \
            y[r * N + n] = hsum512(_mm512_add_ps(_mm512_add_ps(a[r][0], a[r][1]),             \
                                                 _mm512_add_ps(a[r][2], a[r][3])))             \
                           + hsum256(t[r]);                                                    \
    }
#define ROW_FN(NAME) NAME##_row16
#else
#define BITMASK_ROW16(NAME, T, EXPAND16, EXPAND)
#define ROW_FN(NAME) NAME##_row
#endif

#define BITMASK_GEMV(NAME, T, EXPAND, EXPAND16)                                                \
    BITMASK_ROW(NAME, T, EXPAND)                                                               \
    BITMASK_ROW16(NAME, T, EXPAND16, EXPAND)                                                   \
    void NAME(const float *x, int64_t M, const T *values, const uint8_t *mask,               \
              const int64_t *row_offsets, float *y, int64_t N, int64_t K) {                  \
        if (!perm_ready) init_perm();                                                        \
        const int64_t B = K / 8;                                                             \
        _Pragma("omp parallel for schedule(static)")                                         \
        for (int64_t n = 0; n < N; n++) {                                                    \
            const T *p = values + row_offsets[n];                                            \
            const uint8_t *mr = mask + n * B;                                                \
            switch (M) {                                                                     \
            case 1: ROW_FN(NAME)(x, p, mr, y, n, N, K, 1); break;                            \
            case 2: ROW_FN(NAME)(x, p, mr, y, n, N, K, 2); break;                            \
            case 3: ROW_FN(NAME)(x, p, mr, y, n, N, K, 3); break;                            \
            case 4: ROW_FN(NAME)(x, p, mr, y, n, N, K, 4); break;                            \
            default: ROW_FN(NAME)(x, p, mr, y, n, N, K, (int)M); break;                      \
            }                                                                                \
        }                                                                                    \
    }

BITMASK_GEMV(bitmask_gemv_f32, float, expand_f32, expand16_f32)

#ifdef __AVX512VBMI2__
// bf16 values with AVX-512 VBMI2 (the avx512 and amx builds): one 16-bit expand-load spreads a
// 32-column mask's values over 32 lanes, and each 32-bit lane then holds two neighbouring
// columns' bf16 values, which become fp32 without a widening shuffle: the even column by a
// 16-bit left shift, the odd one by clearing the low half. The activations are split to match
// once per call (pair_split): per 32 columns, the 16 even ones, then the 16 odd ones. Per 32
// columns that is one expand and two cheap integer operations, where the 16-column path spent
// a widening and a register expand per 16 (both on the shuffle port).
static void pair_split(const float *x, int64_t M, int64_t K, float *xs) {
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    for (int64_t m = 0; m < M; m++) {
        const float *src = x + m * K;
        float *dst = xs + m * K;
        int64_t k = 0;
        for (; k + 32 <= K; k += 32) {
            const __m512 a = _mm512_loadu_ps(src + k), b = _mm512_loadu_ps(src + k + 16);
            _mm512_storeu_ps(dst + k, _mm512_permutex2var_ps(a, even, b));
            _mm512_storeu_ps(dst + k + 16, _mm512_permutex2var_ps(a, odd, b));
        }
        memcpy(dst + k, src + k, (size_t)(K - k) * sizeof(float));  // the tail stays in order
    }
}

// acc[0], acc[1] += the 32 columns of mask m (values at p) times split activations xc
#define PAIR_FMA(v, xc, acc0, acc1)                                                            \
    do {                                                                                       \
        acc0 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)),                \
                               _mm512_loadu_ps(xc), acc0);                                     \
        acc1 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(v, hi16)),               \
                               _mm512_loadu_ps((xc) + 16), acc1);                              \
    } while (0)

static inline __attribute__((always_inline)) void bf16_row32(
    const float *xs, const uint16_t *p, const uint8_t *mr, float *y, int64_t n, int64_t N,
    int64_t K, const int MT) {
    const int64_t C = K / 32;
    const __m512i hi16 = _mm512_set1_epi32((int)0xFFFF0000u);
    __m512 a[MAX_ROWS][4];
    for (int r = 0; r < MT; r++)
        for (int q = 0; q < 4; q++) a[r][q] = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c + 2 <= C; c += 2) {  // 64 columns: two expands at independent offsets
        uint64_t word;
        memcpy(&word, mr + 4 * c, 8);
        if (!word) continue;
        const uint32_t m0 = (uint32_t)word, m1 = (uint32_t)(word >> 32);
        const __m512i v0 = _mm512_maskz_expandloadu_epi16(m0, p);
        const __m512i v1 = _mm512_maskz_expandloadu_epi16(m1, p + __builtin_popcount(m0));
        p += __builtin_popcountll(word);
        for (int r = 0; r < MT; r++) {
            const float *xc = xs + r * K + 32 * c;
            PAIR_FMA(v0, xc, a[r][0], a[r][1]);
            PAIR_FMA(v1, xc + 32, a[r][2], a[r][3]);
        }
    }
    if (c < C) {  // an odd last 32 columns
        uint32_t m;
        memcpy(&m, mr + 4 * c, 4);
        const __m512i v = _mm512_maskz_expandloadu_epi16(m, p);
        p += __builtin_popcount(m);
        for (int r = 0; r < MT; r++) PAIR_FMA(v, xs + r * K + 32 * c, a[r][0], a[r][1]);
    }
    __m256 t[MAX_ROWS];
    for (int r = 0; r < MT; r++) t[r] = _mm256_setzero_ps();
    for (int64_t j = 4 * C; j < K / 8; j++) {  // the last K % 32 columns, byte by byte
        const unsigned m = mr[j];
        if (!m) continue;
        const __m256 v = expand_bf16(p, m);
        p += __builtin_popcount(m);
        for (int r = 0; r < MT; r++)
            t[r] = _mm256_fmadd_ps(v, _mm256_loadu_ps(xs + r * K + 8 * j), t[r]);
    }
    for (int r = 0; r < MT; r++)
        y[r * N + n] = hsum512(_mm512_add_ps(_mm512_add_ps(a[r][0], a[r][1]),
                                             _mm512_add_ps(a[r][2], a[r][3]))) + hsum256(t[r]);
}
#undef PAIR_FMA

void bitmask_gemv_bf16(const float *x, int64_t M, const uint16_t *values, const uint8_t *mask,
                       const int64_t *row_offsets, float *y, int64_t N, int64_t K) {
    if (!perm_ready) init_perm();
    const int64_t B = K / 8;
    float *xs = (float *)malloc((size_t)(M * K) * sizeof(float));
    pair_split(x, M, K, xs);
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint16_t *p = values + row_offsets[n];
        const uint8_t *mr = mask + n * B;
        switch (M) {
        case 1: bf16_row32(xs, p, mr, y, n, N, K, 1); break;
        case 2: bf16_row32(xs, p, mr, y, n, N, K, 2); break;
        case 3: bf16_row32(xs, p, mr, y, n, N, K, 3); break;
        case 4: bf16_row32(xs, p, mr, y, n, N, K, 4); break;
        default: bf16_row32(xs, p, mr, y, n, N, K, (int)M); break;
        }
    }
    free(xs);
}
int64_t bitmask_gemv_bf16_columns(void) { return 32; }
#else
BITMASK_GEMV(bitmask_gemv_bf16, uint16_t, expand_bf16, none)
int64_t bitmask_gemv_bf16_columns(void) { return 8; }
#endif

// (bitmask_gemv_bf16_columns: the columns one expand of bf16 values covers. A 2:4 weight holds
// values in every mask byte, so on the 8-column path it costs a table permutation per byte.)

// the most activation rows one call takes
int64_t bitmask_gemv_max_rows(void) { return MAX_ROWS; }
