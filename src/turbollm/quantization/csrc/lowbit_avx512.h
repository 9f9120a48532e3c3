// AVX-512 BW + VNNI forms of lowbit.c's int16-activation dot products: included by lowbit.c in
// the avx512 and amx builds (native_build.py) in place of its AVX2 tile_dots ... row_dots_*.
//
// The integer part works on two 32-column blocks c, c+1 at once in 512-bit registers, where
// AVX2 did one block in two 256-bit halves: a madd_epi16 and a vpdpwssd (int16 pairs summed
// into int32, the madd and the add fused) replace two madds and an add per block, and one
// vpmovzxbw widens both blocks' 32 packed int4 bytes (AVX2: one per block).
//
// Bit-identical to the AVX2 build. AVX2's 8 int32 lanes of a block hold, in lane i, columns
// 2i, 2i+1 (madd of columns 0-15) plus 16+2i, 17+2i (madd of columns 16-31); that split is
// kept: the first register of a pair holds columns 0-15 of c (int16 elements 0-15) and of c+1
// (16-31), the second columns 16-31 of both, so lanes 0-7 of the 16 int32 results are block c's
// AVX2 lanes and 8-15 block c+1's (integer sums, exact: |4 * 128 * 32767| < 2^24, so the int32
// -> fp32 conversion is exact too). The float part stays one block at a time in 256-bit
// registers, in AVX2's order: acc = fma(lanes of c, scale of c, acc), then the same for c+1,
// and hsum256 at the end. Only the order of the activations changes (pair_order_i16 below,
// once per call): the int4 bytes of c, c+1 widen into exactly that order by themselves.
//
// Pairs never straddle a group of several blocks (its scale is applied when the group ends):
// blocks pair from the start of each span (a group, or the whole row at G = 32), and a span
// with an odd block count ends in a lone block, which takes the AVX2 form on the activations'
// natural order.
//
// Where the time goes (per block and activation row, vector uops, from the compiled loops): the
// int4 widening is 1.5 per weight row (AVX2: 3); the integer dot 1 (AVX2: 3); the float part,
// kept 8 lanes wide for AVX2's bits, 2 (conversion 0.5, upper-half extract 0.5, fma 1) where
// AVX2 has 2. With 512-bit uops in flight port 1 takes no vector work, so the gain in issue
// cycles is smaller than the uop counts: llvm-mca (icelake-server model) gives 1.1-1.6x fewer
// cycles per block than the AVX2 loops, least for int8 (whose 16-byte halves are regrouped).

static inline __m512i load_i16x32(const int16_t *p) { return _mm512_loadu_si512((const void *)p); }

// The activations of one row, quantized in column order, reordered in place for pairs of
// blocks: in each span of `span` blocks (the last may be shorter), blocks c, c+1 (64 int16)
// become [c 0-15 | c+1 0-15 | c 16-31 | c+1 16-31]; a span's odd last block stays as it is.
static void pair_order_i16(int16_t *xq, int64_t nchunks, int64_t span) {
    for (int64_t c0 = 0; c0 < nchunks; c0 += span) {
        const int64_t c1 = c0 + span < nchunks ? c0 + span : nchunks;
        for (int64_t c = c0; c + 2 <= c1; c += 2) {
            const __m512i a = load_i16x32(xq + 32 * c), b = load_i16x32(xq + 32 * c + 32);
            // 128-bit lanes (8 columns each): a = c's 0-7, 8-15, 16-23, 24-31, b likewise
            _mm512_storeu_si512((void *)(xq + 32 * c), _mm512_shuffle_i64x2(a, b, 0x44));
            _mm512_storeu_si512((void *)(xq + 32 * c + 32), _mm512_shuffle_i64x2(a, b, 0xEE));
        }
    }
}

// Blocks c, c+1 of a packed weight row widened to int16 in the pair order: lo = columns 0-15
// of c then of c+1, hi = columns 16-31 of c then of c+1.
static inline __attribute__((always_inline)) void unpack_pair(const uint8_t *row, int is_int4,
                                                              int64_t c, __m512i *lo, __m512i *hi) {
    if (is_int4) {
        // 32 bytes: c's 16 (low nibble column j, high j + 16), then c+1's
        const __m512i wide = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(row + 16 * c)));
        *lo = _mm512_and_si512(wide, _mm512_set1_epi16(0x0F));
        *hi = _mm512_srli_epi16(wide, 4);
    } else {
        // 64 bytes: c's columns 0-15, 16-31, then c+1's; the 16-byte halves are regrouped by
        // loads into one 256-bit register (an insert from memory: no shuffle-port uop)
        const uint8_t *p = row + 32 * c;
#define LD128(q) _mm_loadu_si128((const __m128i *)(q))
        *lo = _mm512_cvtepi8_epi16(_mm256_inserti128_si256(_mm256_castsi128_si256(LD128(p)), LD128(p + 32), 1));
        *hi = _mm512_cvtepi8_epi16(_mm256_inserti128_si256(_mm256_castsi128_si256(LD128(p + 16)), LD128(p + 48), 1));
#undef LD128
    }
}

// The pair's weights times activations xp (pair order) as 16 fp32 lanes: 0-7 block c's AVX2
// lanes, 8-15 block c+1's
static inline __m512 dot64_i16(__m512i lo, __m512i hi, const int16_t *xp) {
    const __m512i d = _mm512_madd_epi16(lo, load_i16x32(xp));
    return _mm512_cvtepi32_ps(_mm512_dpwssd_epi32(d, hi, load_i16x32(xp + 32)));
}

// acc = fma(block c's lanes, s[0], acc), then fma(block c+1's lanes, s[1], acc): AVX2's two
// steps in its order (an extract of the upper half; f64x4 needs only AVX512F, f32x8 wants DQ)
static inline __m256 fma_pair(__m512 d, const float *s, __m256 acc) {
    acc = _mm256_fmadd_ps(_mm512_castps512_ps256(d), _mm256_broadcast_ss(s), acc);
    const __m256 upper = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(d), 1));
    return _mm256_fmadd_ps(upper, _mm256_broadcast_ss(s + 1), acc);
}

// The AVX2 step for a span's lone last block (natural order): one block's 8 lanes
static inline __m256 dot32_at(__m256i lo, __m256i hi, const int16_t *xm) {
    return dot32_i16(lo, hi, load_i16(xm), load_i16(xm + 16));
}

// prefetch_ahead for both blocks of a pair (a pair may start at an odd block in odd-sized groups)
static inline __attribute__((always_inline)) void prefetch_pair(const uint8_t *w, int64_t w_stride,
                                                                int is_int4, int NR, int64_t c) {
    prefetch_ahead(w, w_stride, is_int4, NR, c);
    prefetch_ahead(w, w_stride, is_int4, NR, c + 1);
}

// acc[j] += the dots of blocks [c0, c1) of one weight row with MT activation rows, block c
// scaled by f[j * fstride + c]: pairs of blocks, then a lone last one
static inline __attribute__((always_inline)) void tile_span(
    const uint8_t *row, int is_int4, int MT, int64_t c0, int64_t c1, const int16_t *xq,
    int64_t K, const float *f, int64_t fstride, __m256 *acc) {
    int64_t c = c0;
    for (; c + 2 <= c1; c += 2) {
        __m512i lo, hi;
        unpack_pair(row, is_int4, c, &lo, &hi);
        for (int j = 0; j < MT; j++)
            acc[j] = fma_pair(dot64_i16(lo, hi, xq + j * K + 32 * c), f + j * fstride + c, acc[j]);
    }
    if (c < c1) {
        __m256i lo, hi;
        unpack_block(row, is_int4, c, &lo, &hi);
        for (int j = 0; j < MT; j++)
            acc[j] = _mm256_fmadd_ps(dot32_at(lo, hi, xq + j * K + 32 * c),
                                     _mm256_broadcast_ss(f + j * fstride + c), acc[j]);
    }
}

// tile_dots (see lowbit.c): MT activation rows against one G = 32 weight row
static inline __attribute__((always_inline)) void tile_dots(
    const uint8_t *row, int is_int4, int MT, int64_t nchunks, const int16_t *xq, int64_t K,
    const float *bs, int64_t bstride, float *out) {
    __m256 acc[TILE];
    for (int j = 0; j < MT; j++) acc[j] = _mm256_setzero_ps();
    tile_span(row, is_int4, MT, 0, nchunks, xq, K, bs, bstride, acc);
    for (int j = 0; j < MT; j++) out[j] = hsum256(acc[j]);
}

// tile_dots_grouped: groups of cpg blocks, each its own span of pairs
static inline __attribute__((always_inline)) void tile_dots_grouped(
    const uint8_t *row, int is_int4, int MT, int64_t nchunks, int64_t cpg, const int16_t *xq,
    int64_t K, const float *xd, int64_t xdstride, const float *sc, float *out) {
    __m256 acc[TILE], t[TILE];
    for (int j = 0; j < MT; j++) acc[j] = _mm256_setzero_ps();
    for (int64_t c0 = 0, g = 0; c0 < nchunks; c0 += cpg, g++) {
        const int64_t c1 = c0 + cpg < nchunks ? c0 + cpg : nchunks;
        for (int j = 0; j < MT; j++) t[j] = _mm256_setzero_ps();
        tile_span(row, is_int4, MT, c0, c1, xq, K, xd, xdstride, t);
        const __m256 s = _mm256_broadcast_ss(sc + g);
        for (int j = 0; j < MT; j++) acc[j] = _mm256_fmadd_ps(t[j], s, acc[j]);
    }
    for (int j = 0; j < MT; j++) out[j] = hsum256(acc[j]);
}

// row_dots: one activation row against NR G = 32 weight rows
static inline __attribute__((always_inline)) void row_dots(
    const uint8_t *w, int64_t w_stride, int is_int4, int NR, int64_t nchunks, const int16_t *xq,
    const float *bs, float *out) {
    __m256 acc[ROWS];
    for (int r = 0; r < NR; r++) acc[r] = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c + 2 <= nchunks; c += 2) {
        prefetch_pair(w, w_stride, is_int4, NR, c);
        for (int r = 0; r < NR; r++) {
            __m512i lo, hi;
            unpack_pair(w + r * w_stride, is_int4, c, &lo, &hi);
            acc[r] = fma_pair(dot64_i16(lo, hi, xq + 32 * c), bs + r * nchunks + c, acc[r]);
        }
    }
    if (c < nchunks)
        for (int r = 0; r < NR; r++) {
            __m256i lo, hi;
            unpack_block(w + r * w_stride, is_int4, c, &lo, &hi);
            acc[r] = _mm256_fmadd_ps(dot32_at(lo, hi, xq + 32 * c), _mm256_broadcast_ss(bs + r * nchunks + c), acc[r]);
        }
    for (int r = 0; r < NR; r++) out[r] = hsum256(acc[r]);
}

// row_dots_pair: two activation rows (K apart) against NR G = 32 weight rows
static inline __attribute__((always_inline)) void row_dots_pair(
    const uint8_t *w, int64_t w_stride, int is_int4, int NR, int64_t nchunks, const int16_t *xq,
    int64_t K, const float *bs, int64_t bs_stride, float *out) {
    __m256 acc[2 * ROWS];  // [j * ROWS + r]
    for (int i = 0; i < 2 * ROWS; i++) acc[i] = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c + 2 <= nchunks; c += 2) {
        prefetch_pair(w, w_stride, is_int4, NR, c);
        for (int r = 0; r < NR; r++) {
            __m512i lo, hi;
            unpack_pair(w + r * w_stride, is_int4, c, &lo, &hi);
            for (int j = 0; j < 2; j++)
                acc[j * ROWS + r] = fma_pair(dot64_i16(lo, hi, xq + j * K + 32 * c),
                                             bs + j * bs_stride + r * nchunks + c, acc[j * ROWS + r]);
        }
    }
    if (c < nchunks)
        for (int r = 0; r < NR; r++) {
            __m256i lo, hi;
            unpack_block(w + r * w_stride, is_int4, c, &lo, &hi);
            for (int j = 0; j < 2; j++)
                acc[j * ROWS + r] = _mm256_fmadd_ps(dot32_at(lo, hi, xq + j * K + 32 * c),
                    _mm256_broadcast_ss(bs + j * bs_stride + r * nchunks + c), acc[j * ROWS + r]);
        }
    for (int j = 0; j < 2; j++)
        for (int r = 0; r < NR; r++) out[j * ROWS + r] = hsum256(acc[j * ROWS + r]);
}

// row_dots_grouped: one activation row against NR weight rows with groups of cpg blocks
static inline __attribute__((always_inline)) void row_dots_grouped(
    const uint8_t *w, int64_t w_stride, int is_int4, int NR, int64_t nchunks, int64_t cpg,
    const int16_t *xq, const float *xd, const float *sc, int64_t sc_stride, float *out) {
    __m256 acc[ROWS], t[ROWS];
    for (int r = 0; r < NR; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t c0 = 0, g = 0; c0 < nchunks; c0 += cpg, g++) {
        const int64_t c1 = c0 + cpg < nchunks ? c0 + cpg : nchunks;
        for (int r = 0; r < NR; r++) t[r] = _mm256_setzero_ps();
        int64_t c = c0;
        for (; c + 2 <= c1; c += 2) {
            const __m512i x0 = load_i16x32(xq + 32 * c), x1 = load_i16x32(xq + 32 * c + 32);
            prefetch_pair(w, w_stride, is_int4, NR, c);
            for (int r = 0; r < NR; r++) {
                __m512i lo, hi;
                unpack_pair(w + r * w_stride, is_int4, c, &lo, &hi);
                const __m512i d = _mm512_dpwssd_epi32(_mm512_madd_epi16(lo, x0), hi, x1);
                t[r] = fma_pair(_mm512_cvtepi32_ps(d), xd + c, t[r]);
            }
        }
        if (c < c1) {
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

// row_dots_grouped_pair: two activation rows against NR <= 2 int4 weight rows with groups
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
        int64_t c = c0;
        for (; c + 2 <= c1; c += 2) {
            prefetch_pair(w, w_stride, 1, NR, c);
            for (int r = 0; r < NR; r++) {
                __m512i lo, hi;
                unpack_pair(w + r * w_stride, 1, c, &lo, &hi);
                t0[r] = fma_pair(dot64_i16(lo, hi, xq + 32 * c), xd + c, t0[r]);
                t1[r] = fma_pair(dot64_i16(lo, hi, xq + K + 32 * c), xd + xd_stride + c, t1[r]);
            }
        }
        if (c < c1) {
            const __m256 xd0 = _mm256_broadcast_ss(xd + c), xd1 = _mm256_broadcast_ss(xd + xd_stride + c);
            prefetch_ahead(w, w_stride, 1, NR, c);
            for (int r = 0; r < NR; r++) {
                __m256i lo, hi;
                unpack_u4(w + r * w_stride + 16 * c, &lo, &hi);
                t0[r] = _mm256_fmadd_ps(dot32_at(lo, hi, xq + 32 * c), xd0, t0[r]);
                t1[r] = _mm256_fmadd_ps(dot32_at(lo, hi, xq + K + 32 * c), xd1, t1[r]);
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
