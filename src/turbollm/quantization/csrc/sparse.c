// Sparse GEMV for bitmask-compressed weights (the compressed-tensors sparse-bitmask layout, as
// quantization/sparse.py packs it): decode rows read only the kept values and one bit per
// weight, so a 50%-sparse bf16 weight costs 9 bits per weight instead of 16, an int8 one 5
// instead of 8.
//
//   y[r, n] = sum_k x[r, k] W[n, k] for r < M, with W [N, K] stored as
//     values      kept values, row after row, in column order (fp32, bf16, or int8 with one
//                 fp32 scale per output row: the bitmask_gemv_i8* kernels), followed by at
//                 least 64 padding elements (a load may read past the row's end)
//     mask        uint8 [N, K / 8]: bit b of byte j is column 8j + b (1 = kept); K % 8 == 0
//     row_offsets int64 [N]: index in `values` of each row's first kept value
//
// The next popcount(mask bits) values are loaded and spread to their columns, then multiplied
// with the activations: on AVX2 8 columns (one mask byte) at a time, through a permutation
// from a 256-entry table with the dropped lanes zeroed; with AVX-512 16 (fp32 expand-loads) or
// 32 (bf16: VBMI2 16-bit expand-loads) at a time. int8 values have their own kernels (below:
// byte shuffles, and 64-column byte permutes with AVX-512 VBMI). Rows split across OpenMP
// threads; M rows of activations share each spread weight vector.
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

// PERM[m][i]: for lane i set in m, the index among m's set bits (its value's position in the
// packed run); lanes not in m point at 0 and are zeroed after the permutation.
// SHUF8[m]: the same spread for int8 values as a byte shuffle control (0x80 zeroes a lane), in
// bytes 0-7 for values in bytes 0-7 of a register and again in bytes 8-15 for values in 8-15.
static int32_t PERM[256][8];
static uint8_t SHUF8[256][16];
// FIX4[m]: for a mask byte with 4 set bits, the spread of 4 values at bytes 0-3 (in bytes 0-7)
// and at bytes 4-7 (in bytes 8-15): the fixed-offset int8 kernel's shuffle control
static uint8_t FIX4[256][16];
static int perm_ready = 0;

static void init_perm(void) {
    for (int m = 0; m < 256; m++) {
        int k = 0;
        memset(SHUF8[m], 0x80, 16);
        for (int i = 0; i < 8; i++) {
            PERM[m][i] = (m >> i) & 1 ? k : 0;
            if ((m >> i) & 1) {
                SHUF8[m][i] = FIX4[m][i] = (uint8_t)k;
                SHUF8[m][8 + i] = (uint8_t)(8 + k);
                FIX4[m][8 + i] = (uint8_t)(4 + k++);
            } else {
                FIX4[m][i] = FIX4[m][8 + i] = 0x80;
            }
        }
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

// int8 values, unscaled (the row's scale is applied once, after its dot products)
static inline __m256 expand_i8(const int8_t *p, unsigned m) {
    const __m128i v = _mm_shuffle_epi8(_mm_loadl_epi64((const __m128i *)p),
                                       _mm_loadu_si128((const __m128i *)SHUF8[m]));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
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

// ROW(x, p, mr, y, n, N, K, MT) for M rows, with the common row counts as constants
#define ROWS_SWITCH(ROW, M, ...)                                                               \
    switch (M) {                                                                               \
    case 1: ROW(__VA_ARGS__, 1); break;                                                        \
    case 2: ROW(__VA_ARGS__, 2); break;                                                        \
    case 3: ROW(__VA_ARGS__, 3); break;                                                        \
    case 4: ROW(__VA_ARGS__, 4); break;                                                        \
    default: ROW(__VA_ARGS__, (int)M); break;                                                  \
    }

#define BITMASK_GEMV(NAME, T, EXPAND, EXPAND16)                                                \
    BITMASK_ROW(NAME, T, EXPAND)                                                               \
    BITMASK_ROW16(NAME, T, EXPAND16, EXPAND)                                                   \
    void NAME(const float *x, int64_t M, const T *values, const uint8_t *mask,               \
              const int64_t *row_offsets, float *y, int64_t N, int64_t K) {                  \
        if (!perm_ready) init_perm();                                                        \
        const int64_t B = K / 8;                                                             \
        _Pragma("omp parallel for schedule(static)")                                         \
        for (int64_t n = 0; n < N; n++)                                                      \
            ROWS_SWITCH(ROW_FN(NAME), M, x, values + row_offsets[n], mask + n * B, y, n, N, K) \
    }

BITMASK_GEMV(bitmask_gemv_f32, float, expand_f32, expand16_f32)

// int8 values (per-channel int8 weights, pruned: quantization/sparse_method.py): 5 bits per weight
// at 50% where the dense int8 weight reads 8. y[r, n] = scales[n] * (x[r] . q[n]). Without
// AVX-512 VBMI (the avx2 build) the dot is in fp32 from values widened exactly, 8 columns at a
// time as for fp32 values; VBMI builds take vbmi_gemv below.
#ifndef __AVX512VBMI__
BITMASK_ROW(bitmask_i8, int8_t, expand_i8)
void bitmask_gemv_i8(const float *x, int64_t M, const int8_t *values, const uint8_t *mask,
                     const int64_t *row_offsets, const float *scales, float *y, int64_t N,
                     int64_t K) {
    if (!perm_ready) init_perm();
    const int64_t B = K / 8;
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        ROWS_SWITCH(bitmask_i8_row, M, x, values + row_offsets[n], mask + n * B, y, n, N, K)
        for (int64_t r = 0; r < M; r++) y[r * N + n] *= scales[n];
    }
}
#endif

// int8 values with exactly 4 kept per mask byte (2:4 and 4:8 patterns; sparse.py fills a byte
// with fewer, e.g. where int8 rounding zeroed a kept weight, with explicit zeros). The 16 columns
// of mask bytes m0, m1 then have their 8 values at a fixed offset: one 8-byte load and one byte
// shuffle spread them, with no popcount, and no load waits on another. (Measured on a Zen 4
// EPYC, bundled model 2:4, whole-model decode: 1.14x dense int8 through a popcount-offset
// kernel like the one above, 1.29x through this one, before the VBMI kernels below.)
static inline __m128i spread16_fixed4(const int8_t *p, unsigned m0, unsigned m1) {
    const __m128i c = _mm_blend_epi32(_mm_loadu_si128((const __m128i *)FIX4[m0]),
                                      _mm_loadu_si128((const __m128i *)FIX4[m1]), 0xC);
    return _mm_shuffle_epi8(_mm_loadl_epi64((const __m128i *)p), c);
}

// The 16-column steps of 64 columns feed four accumulators per row: one FMA chain per step
// would leave the loop waiting on FMA latency at every step.
#ifdef __AVX512BW__
typedef __m512 acc16;
static inline acc16 fixed4_w16(const int8_t *p, unsigned m0, unsigned m1) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(spread16_fixed4(p, m0, m1)));
}
static inline acc16 fma16(acc16 w, const float *x, acc16 a) {
    return _mm512_fmadd_ps(w, _mm512_loadu_ps(x), a);
}
static inline float hsum16(acc16 a) { return hsum512(a); }
#define ZERO16 _mm512_setzero_ps()
#define ADD16 _mm512_add_ps
#else
typedef struct { __m256 lo, hi; } acc16;
static inline acc16 fixed4_w16(const int8_t *p, unsigned m0, unsigned m1) {
    const __m128i v = spread16_fixed4(p, m0, m1);
    return (acc16){_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)),
                   _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(v, v)))};
}
static inline acc16 fma16(acc16 w, const float *x, acc16 a) {
    return (acc16){_mm256_fmadd_ps(w.lo, _mm256_loadu_ps(x), a.lo),
                   _mm256_fmadd_ps(w.hi, _mm256_loadu_ps(x + 8), a.hi)};
}
static inline float hsum16(acc16 a) { return hsum256(_mm256_add_ps(a.lo, a.hi)); }
static inline acc16 add16(acc16 a, acc16 b) {
    return (acc16){_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)};
}
#define ZERO16 ((acc16){_mm256_setzero_ps(), _mm256_setzero_ps()})
#define ADD16 add16
#endif

static inline __attribute__((always_inline)) void fixed4_row(
    const float *x, const int8_t *p, const uint8_t *mr, float *y, int64_t n, int64_t N,
    int64_t K, const float *scales, const int MT) {
    const int64_t C = K / 16;
    acc16 a[MAX_ROWS][4];
    for (int r = 0; r < MT; r++)
        for (int q = 0; q < 4; q++) a[r][q] = ZERO16;
    int64_t c = 0;
    for (; c + 4 <= C; c += 4)
        for (int q = 0; q < 4; q++) {
            const acc16 w = fixed4_w16(p + 8 * (c + q), mr[2 * (c + q)], mr[2 * (c + q) + 1]);
            for (int r = 0; r < MT; r++) a[r][q] = fma16(w, x + r * K + 16 * (c + q), a[r][q]);
        }
    for (; c < C; c++) {
        const acc16 w = fixed4_w16(p + 8 * c, mr[2 * c], mr[2 * c + 1]);
        for (int r = 0; r < MT; r++) a[r][0] = fma16(w, x + r * K + 16 * c, a[r][0]);
    }
    __m256 t[MAX_ROWS];
    for (int r = 0; r < MT; r++) t[r] = _mm256_setzero_ps();
    if (K % 16) {  // a last 8 columns
        const __m128i v = _mm_shuffle_epi8(_mm_loadl_epi64((const __m128i *)(p + 8 * C)),
                                           _mm_loadu_si128((const __m128i *)FIX4[mr[2 * C]]));
        const __m256 w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
        for (int r = 0; r < MT; r++) t[r] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + r * K + 16 * C), t[r]);
    }
    for (int r = 0; r < MT; r++)
        y[r * N + n] = (hsum16(ADD16(ADD16(a[r][0], a[r][1]), ADD16(a[r][2], a[r][3])))
                        + hsum256(t[r])) * scales[n];
}

void bitmask_gemv_i8_fixed4(const float *x, int64_t M, const int8_t *values, const uint8_t *mask,
                            const int64_t *row_offsets, const float *scales, float *y, int64_t N,
                            int64_t K) {
    if (!perm_ready) init_perm();
    const int64_t B = K / 8;
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++)
        ROWS_SWITCH(fixed4_row, M, x, values + row_offsets[n], mask + n * B, y, n, N, K, scales)
}

#ifdef __AVX512VBMI__
// int8 values with AVX-512 VBMI: 64 columns (one mask word) per step, spread by a zero-masked
// byte permute of the word's values whose control (each kept column's value index) is worked
// out in registers, with no table loads. The weights then meet activations rounded to int16 per
// 64 columns (scale = the block's max / 32767, as the dense int8 kernels round per 32: far below
// the weights' own rounding) in two 32-pair VNNI dot products. A step costs ~14 (2:4) or ~20
// (any mask) 512-bit instructions where widening to fp32 costs ~25: on a Zen 4 EPYC, one row of
// a 576 x 1536 2:4 weight in 0.7x the fixed-4 kernel's time.
//
// 2:4: column 4g + j takes value 2g + (kept columns of group g below j), a count looked up by a
// byte permute in PREFIX24 (indexed 16 j + the group's 4 mask bits, which a multishift copies
// out of the word). Any mask: each column's kept columns below it within its mask byte (a
// prefix sum by shifts), plus the values of the word's lower mask bytes (byte popcounts summed
// by one multiply).
static uint8_t PREFIX24[64] __attribute__((aligned(64)));
static int prefix24_ready = 0;

static void init_prefix24(void) {
    for (int j = 0; j < 4; j++)
        for (int m = 0; m < 16; m++)
            PREFIX24[16 * j + m] = (uint8_t)__builtin_popcount(m & ((1u << j) - 1));
    prefix24_ready = 1;
}

typedef struct { __m512i prefix, shifts, column_j, group_base, byte_of_column; } spread_consts;

static spread_consts spread_consts_make(void) {
    uint8_t sh[64], jp[64], gb[64], bc[64];
    for (int c = 0; c < 64; c++) {
        sh[c] = (uint8_t)(4 * (c / 4));   // bit offset of column c's group in the word
        jp[c] = (uint8_t)(16 * (c % 4));  // its place j in the group, as a PREFIX24 row
        gb[c] = (uint8_t)(2 * (c / 4));   // its group's first value
        bc[c] = (uint8_t)(c / 8);         // its mask byte
    }
    return (spread_consts){_mm512_load_si512(PREFIX24), _mm512_loadu_si512(sh),
                           _mm512_loadu_si512(jp), _mm512_loadu_si512(gb),
                           _mm512_loadu_si512(bc)};
}

static inline __m512i spread64_24(const int8_t *p, uint64_t word, const spread_consts *k) {
    const __m512i groups = _mm512_and_si512(
        _mm512_multishift_epi64_epi8(k->shifts, _mm512_set1_epi64((long long)word)),
        _mm512_set1_epi8(0x0F));
    const __m512i ctrl = _mm512_add_epi8(
        _mm512_permutexvar_epi8(_mm512_or_si512(groups, k->column_j), k->prefix), k->group_base);
    const __m512i v = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_maskz_permutexvar_epi8(_cvtu64_mask64(word), ctrl, v);
}

static inline __m512i spread64_any(const int8_t *p, uint64_t word, const spread_consts *k) {
    const __mmask64 kept = _cvtu64_mask64(word);
    __m512i s = _mm512_slli_epi64(_mm512_maskz_mov_epi8(kept, _mm512_set1_epi8(1)), 8);
    s = _mm512_add_epi8(s, _mm512_slli_epi64(s, 8));
    s = _mm512_add_epi8(s, _mm512_slli_epi64(s, 16));
    s = _mm512_add_epi8(s, _mm512_slli_epi64(s, 32));  // kept columns below, within the byte
    uint64_t c = word - ((word >> 1) & 0x5555555555555555ULL);
    c = (c & 0x3333333333333333ULL) + ((c >> 2) & 0x3333333333333333ULL);
    c = (c + (c >> 4)) & 0x0F0F0F0F0F0F0F0FULL;                   // popcount of each byte
    const uint64_t below = (c << 8) * 0x0101010101010101ULL;      // ... of the bytes below
    const __m512i base = _mm512_shuffle_epi8(_mm512_set1_epi64((long long)below), k->byte_of_column);
    return _mm512_maskz_permutexvar_epi8(kept, _mm512_add_epi8(s, base), _mm512_loadu_si512(p));
}

// xq[k] = round(x[k] / xd[b]), xd[b] = max |x| over the 64 columns of block b / 32767
static void quantize_i16_64(const float *x, int64_t K, int16_t *xq, float *xd) {
    for (int64_t b = 0; b < K / 64; b++) {
        const float *xb = x + 64 * b;
        __m512 mx = _mm512_setzero_ps();
        for (int j = 0; j < 64; j += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_loadu_ps(xb + j)));
        const float amax = _mm512_reduce_max_ps(mx);
        xd[b] = amax / 32767.0f;
        const __m512 id = _mm512_set1_ps(amax > 0 ? 32767.0f / amax : 0.0f);
        for (int j = 0; j < 64; j += 16)
            _mm256_storeu_si256((__m256i *)(xq + 64 * b + j), _mm512_cvtsepi32_epi16(
                _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xb + j), id))));
    }
}

static inline __attribute__((always_inline)) void vbmi_row(
    const float *x, const int16_t *xq, const float *xd, const int8_t *p, const uint8_t *mr,
    float *y, int64_t n, int64_t N, int64_t K, const float *scales, const spread_consts *k,
    const int two_four, const int MT) {
    const int64_t W = K / 64;
    __m512 a[MAX_ROWS][2];
    for (int r = 0; r < MT; r++) a[r][0] = a[r][1] = _mm512_setzero_ps();
    for (int64_t w = 0; w < W; w++) {
        uint64_t word;
        memcpy(&word, mr + 8 * w, 8);
        if (!two_four && !word) continue;
        const __m512i wq = two_four ? spread64_24(p, word, k) : spread64_any(p, word, k);
        p += two_four ? 32 : __builtin_popcountll(word);
        const __m512i lo = _mm512_cvtepi8_epi16(_mm512_castsi512_si256(wq));
        const __m512i hi = _mm512_cvtepi8_epi16(_mm512_extracti64x4_epi64(wq, 1));
        for (int r = 0; r < MT; r++) {  // two accumulators per row, by word parity
            const int16_t *xr = xq + r * K + 64 * w;
            __m512i d = _mm512_dpwssd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(xr));
            d = _mm512_dpwssd_epi32(d, hi, _mm512_loadu_si512(xr + 32));
            a[r][w & 1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d),
                                          _mm512_set1_ps(xd[r * (K / 64) + w]), a[r][w & 1]);
        }
    }
    __m256 t[MAX_ROWS];
    for (int r = 0; r < MT; r++) t[r] = _mm256_setzero_ps();
    for (int64_t j = 8 * W; j < K / 8; j++) {  // the last K % 64 columns, byte by byte, in fp32
        const unsigned m = mr[j];
        const __m256 v = expand_i8(p, m);
        p += __builtin_popcount(m);
        for (int r = 0; r < MT; r++) t[r] = _mm256_fmadd_ps(v, _mm256_loadu_ps(x + r * K + 8 * j), t[r]);
    }
    for (int r = 0; r < MT; r++)
        y[r * N + n] = (hsum512(_mm512_add_ps(a[r][0], a[r][1])) + hsum256(t[r])) * scales[n];
}

static void vbmi_gemv(const float *x, int64_t M, const int8_t *values, const uint8_t *mask,
                      const int64_t *row_offsets, const float *scales, float *y, int64_t N,
                      int64_t K, int two_four) {
    if (!perm_ready) init_perm();
    if (!prefix24_ready) init_prefix24();
    const int64_t B = K / 8, nb = K / 64;
    int16_t *xq = (int16_t *)malloc((size_t)(M * K) * sizeof(int16_t));
    float *xd = (float *)malloc((size_t)(M * nb + 1) * sizeof(float));
    for (int64_t m = 0; m < M; m++) quantize_i16_64(x + m * K, K, xq + m * K, xd + m * nb);
    const spread_consts k = spread_consts_make();
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const int8_t *p = values + row_offsets[n];
        const uint8_t *mr = mask + n * B;
        if (two_four)
            ROWS_SWITCH(vbmi_row, M, x, xq, xd, p, mr, y, n, N, K, scales, &k, 1)
        else
            ROWS_SWITCH(vbmi_row, M, x, xq, xd, p, mr, y, n, N, K, scales, &k, 0)
    }
    free(xq);
    free(xd);
}

void bitmask_gemv_i8_24(const float *x, int64_t M, const int8_t *values, const uint8_t *mask,
                        const int64_t *row_offsets, const float *scales, float *y, int64_t N,
                        int64_t K) {
    vbmi_gemv(x, M, values, mask, row_offsets, scales, y, N, K, 1);
}

void bitmask_gemv_i8(const float *x, int64_t M, const int8_t *values, const uint8_t *mask,
                     const int64_t *row_offsets, const float *scales, float *y, int64_t N,
                     int64_t K) {
    vbmi_gemv(x, M, values, mask, row_offsets, scales, y, N, K, 0);
}
int64_t bitmask_gemv_i8_columns(void) { return 64; }
#else
// without VBMI (the avx2 build) 2:4 weights take the fixed-4 kernel: 2 per 4 columns is 4 per 8
int64_t bitmask_gemv_i8_columns(void) { return 8; }
void bitmask_gemv_i8_24(const float *x, int64_t M, const int8_t *values, const uint8_t *mask,
                        const int64_t *row_offsets, const float *scales, float *y, int64_t N,
                        int64_t K) {
    bitmask_gemv_i8_fixed4(x, M, values, mask, row_offsets, scales, y, N, K);
}
#endif

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
        ROWS_SWITCH(bf16_row32, M, xs, p, mr, y, n, N, K)
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
