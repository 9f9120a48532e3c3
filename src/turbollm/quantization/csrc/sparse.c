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
// Each mask byte covers 8 columns: the next popcount(byte) values are loaded as one vector and
// spread to their columns (AVX-512 VL: one expand-load; AVX2: a permutation from a 256-entry
// table, then the dropped lanes zeroed), then multiplied with 8 activations. Rows split
// across OpenMP threads; M rows of activations share each expanded weight vector.
#include <immintrin.h>
#include <stdint.h>
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

#define BITMASK_GEMV(NAME, T, EXPAND)                                                          \
    BITMASK_ROW(NAME, T, EXPAND)                                                               \
    void NAME(const float *x, int64_t M, const T *values, const uint8_t *mask,               \
              const int64_t *row_offsets, float *y, int64_t N, int64_t K) {                  \
        if (!perm_ready) init_perm();                                                        \
        const int64_t B = K / 8;                                                             \
        _Pragma("omp parallel for schedule(static)")                                         \
        for (int64_t n = 0; n < N; n++) {                                                    \
            const T *p = values + row_offsets[n];                                            \
            const uint8_t *mr = mask + n * B;                                                \
            switch (M) {                                                                     \
            case 1: NAME##_row(x, p, mr, y, n, N, K, 1); break;                              \
            case 2: NAME##_row(x, p, mr, y, n, N, K, 2); break;                              \
            case 3: NAME##_row(x, p, mr, y, n, N, K, 3); break;                              \
            case 4: NAME##_row(x, p, mr, y, n, N, K, 4); break;                              \
            default: NAME##_row(x, p, mr, y, n, N, K, (int)M); break;                        \
            }                                                                                \
        }                                                                                    \
    }

BITMASK_GEMV(bitmask_gemv_f32, float, expand_f32)
BITMASK_GEMV(bitmask_gemv_bf16, uint16_t, expand_bf16)

// the most activation rows one call takes
int64_t bitmask_gemv_max_rows(void) { return MAX_ROWS; }
