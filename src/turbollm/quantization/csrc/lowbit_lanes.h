// Outputs in lanes: int4 / int8 weights times several int16 activation rows with 16 weight rows
// in the 16 int32 lanes of a register (AVX-512 BW + VNNI; included by lowbit.c in the avx512
// and amx builds). Exported as q4_gemm_lanes / q8_gemm_lanes, with q4_gemm_a16's and
// q8_gemm_a16's arguments.
//
// Why: the row kernels (gemm_a16) sum one output in a register of column lanes, so every
// (activation row, block) ends in a conversion, a lane extract and two scaled FMAs for AVX2's
// bit order: ~8 uops per 64 multiply-adds, of which 2 are integer. Here each block's dot of 16
// outputs is one int32 vector built by 16 vpdpwssd (a weight-pair vector times one broadcast
// activation pair), then one conversion and one FMA for all 16: ~2.3 uops per 64.
//
// The weights' own layout (a row's columns together) is unchanged: a 16-row panel is
// transposed once per call (128-bit loads, in-lane unpacks, shifts and masks) into a buffer of
// the pair vectors of every block, which all activation rows then read. Its cost is shared by
// the M rows, so this serves M >= a few (kernels.LANES_MIN_ROWS).
//
// Arithmetic (one order for every M and tiling): per output o and row m, the exact int32 dot
// of each block c, converted to fp32 (exact for int4: |15 * 32767 * 32| < 2^24), t = fma(dot,
// xd[m, c], t) over the blocks of a group, acc = fma(t, sc[o, g], acc), then acc = fma(mn[o, g],
// xg[m, g], acc) for int4. Not the row kernels' order: where one row's bits must not depend on
// its batch (speculative verification, batch-invariant steps), the caller keeps gemm_a16.

#define LANES 16
#define LANE_ROWS TILE  // activation rows per pass over a panel (8 x 3 accumulators + 2 in 32 zmm)

// The activations as dwords, in the order of the panel's pair vectors (lanes_panel_block):
// per 4 columns 4k..4k+3 (int8) or per byte group k (int4), the pairs are
//   int4 (byte j holds column j low, j + 16 high): (4k, 4k+2), (4k+16, 4k+18), (4k+1, 4k+3),
//        (4k+17, 4k+19), for k = 0..3 of a 32-column block;
//   int8: (4k, 4k+2), (4k+1, 4k+3), for k = 0..7.
static int32_t *lanes_pairs(const rows_i16 *r, int64_t M, int64_t K, int is_int4) {
    int32_t *xp = (int32_t *)aligned_alloc(64, M * K * sizeof(int16_t));
    for (int64_t m = 0; m < M; m++) {
        const int16_t *q = r->xq + m * K;
        int16_t *d = (int16_t *)(xp + m * K / 2);
        for (int64_t c = 0; c < K; c += 32, d += 32) {
            const int16_t *b = q + c;
            for (int k = 0; k < (is_int4 ? 4 : 8); k++) {
                const int at = 4 * k;
                int16_t *o = d + (is_int4 ? 8 : 4) * k;
                if (is_int4) {
                    const int16_t v[8] = {b[at], b[at + 2], b[at + 16], b[at + 18],
                                          b[at + 1], b[at + 3], b[at + 17], b[at + 19]};
                    memcpy(o, v, sizeof(v));
                } else {
                    const int16_t v[4] = {b[at], b[at + 2], b[at + 1], b[at + 3]};
                    memcpy(o, v, sizeof(v));
                }
            }
        }
    }
    return xp;
}

// 16 bytes at offset `at` of 16 rows as dword vectors: lane o of d[k] is dword k of row o.
// Register i holds rows i, 4 + i, 8 + i, 12 + i in its 128-bit lanes 0-3 (four loads), so a
// 4 x 4 dword transpose within each 128-bit lane across the four registers puts row 4l + i in
// element 4l + i.
static inline void lanes_dwords(const uint8_t *const *rows, int64_t at, __m512i d[4]) {
#define LD(o) _mm_loadu_si128((const __m128i *)(rows[o] + at))
#define QUAD(i) _mm512_inserti32x4(_mm512_inserti32x4(_mm512_inserti32x4( \
        _mm512_castsi128_si512(LD(i)), LD(4 + (i)), 1), LD(8 + (i)), 2), LD(12 + (i)), 3)
    const __m512i a = QUAD(0), b = QUAD(1), c = QUAD(2), e = QUAD(3);
#undef QUAD
#undef LD
    const __m512i t0 = _mm512_unpacklo_epi32(a, b), t1 = _mm512_unpackhi_epi32(a, b);
    const __m512i t2 = _mm512_unpacklo_epi32(c, e), t3 = _mm512_unpackhi_epi32(c, e);
    d[0] = _mm512_unpacklo_epi64(t0, t2);
    d[1] = _mm512_unpackhi_epi64(t0, t2);
    d[2] = _mm512_unpacklo_epi64(t1, t3);
    d[3] = _mm512_unpackhi_epi64(t1, t3);
}

// Block c of 16 weight rows (absent rows point at zeros) as 16 pair vectors: lane o of vector
// p holds the int16 pair of row o that activation pair p meets (order: lanes_pairs). A dword
// of weights splits into pairs by shifts and masks alone: int4 nibbles 0/4 (low nibbles of
// bytes 0, 2), 4/20, 8/24, 12/28; int8 bytes 0/2 and 1/3 sign-extended.
static inline void lanes_panel_block(const uint8_t *const *rows, int is_int4, int64_t c,
                                     __m512i *out) {
    __m512i d[4];
    if (is_int4) {
        const __m512i nib = _mm512_set1_epi32(0x000F000F);
        lanes_dwords(rows, 16 * c, d);
        for (int k = 0; k < 4; k++) {
            out[4 * k] = _mm512_and_si512(d[k], nib);
            out[4 * k + 1] = _mm512_and_si512(_mm512_srli_epi32(d[k], 4), nib);
            out[4 * k + 2] = _mm512_and_si512(_mm512_srli_epi32(d[k], 8), nib);
            out[4 * k + 3] = _mm512_and_si512(_mm512_srli_epi32(d[k], 12), nib);
        }
    } else {
        for (int half = 0; half < 2; half++) {
            lanes_dwords(rows, 32 * c + 16 * half, d);
            for (int k = 0; k < 4; k++) {
                out[8 * half + 2 * k] = _mm512_srai_epi16(_mm512_slli_epi16(d[k], 8), 8);
                out[8 * half + 2 * k + 1] = _mm512_srai_epi16(d[k], 8);
            }
        }
    }
}

// MT activation rows (pairs xp, row stride xs dwords) against one panel: y[j * N + o] for the
// panel's 16 outputs. sc, mn: [ng, 16] group scales and mins of the panel's rows.
static inline __attribute__((always_inline)) void lanes_rows(
    const __m512i *panel, const float *sc, const float *mn, int is_int4, int MT, int64_t nchunks,
    int64_t cpg, const int32_t *xp, int64_t xs, const float *xd, int64_t xds, const float *xg,
    int64_t xgs, float *y, int64_t N, __mmask16 live) {
    __m512 acc[LANE_ROWS], t[LANE_ROWS];
    __m512i d[LANE_ROWS];
    for (int j = 0; j < MT; j++) acc[j] = _mm512_setzero_ps();
    for (int64_t c0 = 0, g = 0; c0 < nchunks; c0 += cpg, g++) {
        const int64_t c1 = c0 + cpg < nchunks ? c0 + cpg : nchunks;
        for (int j = 0; j < MT; j++) t[j] = _mm512_setzero_ps();
        for (int64_t c = c0; c < c1; c++) {
            const __m512i *pc = panel + LANES * c;
            for (int j = 0; j < MT; j++) d[j] = _mm512_setzero_si512();
#pragma GCC unroll 16
            for (int p = 0; p < 16; p++) {
                const __m512i v = _mm512_load_si512((const void *)(pc + p));
                for (int j = 0; j < MT; j++)
                    d[j] = _mm512_dpwssd_epi32(d[j], v, _mm512_set1_epi32(xp[j * xs + 16 * c + p]));
            }
            for (int j = 0; j < MT; j++)
                t[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d[j]), _mm512_set1_ps(xd[j * xds + c]), t[j]);
        }
        const __m512 s = _mm512_load_ps(sc + LANES * g);
        for (int j = 0; j < MT; j++) acc[j] = _mm512_fmadd_ps(t[j], s, acc[j]);
        if (is_int4) {
            const __m512 f = _mm512_load_ps(mn + LANES * g);
            for (int j = 0; j < MT; j++) acc[j] = _mm512_fmadd_ps(f, _mm512_set1_ps(xg[j * xgs + g]), acc[j]);
        }
    }
    for (int j = 0; j < MT; j++) _mm512_mask_storeu_ps(y + j * N, live, acc[j]);
}

static void gemm_lanes(const float *x, int64_t M, const uint8_t *w, const void *sh,
                       const uint16_t *oh, int zero_form, int is_int4, float *y, int64_t N,
                       int64_t K, int64_t G) {
    const int64_t ng = (K + G - 1) / G, nchunks = K / 32, cpg = G / 32;
    const int64_t w_stride = is_int4 ? K / 2 : K, ntiles = (M + LANE_ROWS - 1) / LANE_ROWS;
    rows_i16 r = quantize_rows_i16(x, M, K, G, 0);  // xd, xg as gemm_a16 has them
    int32_t *xp = lanes_pairs(&r, M, K, is_int4);
#pragma omp parallel
    {
        __m512i *panel = (__m512i *)aligned_alloc(64, nchunks * LANES * sizeof(__m512i));
        uint8_t *zeros = (uint8_t *)calloc(w_stride, 1);  // the rows past N of the last panel
        float row_sc[MAX_GROUPS], row_mn[MAX_GROUPS];
        float *sc = (float *)aligned_alloc(64, 2 * ng * LANES * sizeof(float)), *mn = sc + ng * LANES;
#pragma omp for schedule(static)
        for (int64_t o0 = 0; o0 < N; o0 += LANES) {
            const int nl = (int)(N - o0 < LANES ? N - o0 : LANES);
            const __mmask16 live = (__mmask16)((1u << nl) - 1);
            const uint8_t *rows[LANES];
            for (int o = 0; o < LANES; o++) rows[o] = o < nl ? w + (o0 + o) * w_stride : zeros;
            const int64_t bb = is_int4 ? 16 : 32;  // bytes of a block
            for (int64_t c = 0; c < nchunks; c++) {
                // sixteen rows walked side by side outrun the hardware prefetcher: ask for
                // each row's line two lines ahead as a new line starts
                if ((c * bb) % 64 == 0 && (c + 128 / bb) < nchunks)
                    for (int o = 0; o < LANES; o++)
                        _mm_prefetch((const char *)rows[o] + (c * bb + 128), _MM_HINT_T0);
                lanes_panel_block(rows, is_int4, c, panel + LANES * c);
            }
            // group scales and mins [ng, 16]: each row's converted in one pass, then spread
            for (int o = 0; o < LANES; o++) {
                if (o < nl && is_int4)
                    int4_params((const uint16_t *)sh + (o0 + o) * ng, oh + (o0 + o) * ng, zero_form,
                                ng, NULL, row_sc, row_mn);
                for (int64_t g = 0; g < ng; g++) {
                    sc[g * LANES + o] = o >= nl ? 0.f : is_int4 ? row_sc[g] : ((const float *)sh)[(o0 + o) * ng + g];
                    mn[g * LANES + o] = o < nl && is_int4 ? row_mn[g] : 0.f;
                }
            }
            // the next panel's rows into L2 while this one computes (a decode batch is bound
            // by reading the weights; the panel walk alone leaves memory idle meanwhile)
            if (o0 + LANES < N) {
                const int64_t nn = N - o0 - LANES < LANES ? N - o0 - LANES : LANES;
                const char *next = (const char *)(w + (o0 + LANES) * w_stride);
                for (int64_t b = 0; b < nn * w_stride; b += 64) _mm_prefetch(next + b, _MM_HINT_T1);
            }
            for (int64_t t = 0, m0 = 0; t < ntiles; m0 += tile_rows(M, t++)) {
                const int mt = tile_rows(M, t);
                const int32_t *xpm = xp + m0 * K / 2;
                const float *xd = r.xd + m0 * r.ncs, *xg = r.xg + m0 * r.ngs;
                float *ym = y + m0 * N + o0;
#define LR(MT) (is_int4 ? lanes_rows(panel, sc, mn, 1, MT, nchunks, cpg, xpm, K / 2, xd, r.ncs, xg, r.ngs, ym, N, live) \
                        : lanes_rows(panel, sc, mn, 0, MT, nchunks, cpg, xpm, K / 2, xd, r.ncs, xg, r.ngs, ym, N, live))
                switch (mt) {
                    case 8: LR(8); break;
                    case 7: LR(7); break;
                    case 6: LR(6); break;
                    case 5: LR(5); break;
                    case 4: LR(4); break;
                    case 3: LR(3); break;
                    case 2: LR(2); break;
                    default: LR(1); break;
                }
#undef LR
            }
        }
        free(panel);
        free(zeros);
        free(sc);
    }
    free(xp);
    free_rows(r);
}

void q4_gemm_lanes(const float *x, int64_t M, const uint8_t *packed, const uint16_t *sh,
                   const uint16_t *oh, int64_t zero_form, float *y, int64_t N, int64_t K, int64_t G) {
    gemm_lanes(x, M, packed, sh, oh, (int)zero_form, 1, y, N, K, G);
}

void q8_gemm_lanes(const float *x, int64_t M, const int8_t *q, const float *scales, float *y,
                   int64_t N, int64_t K, int64_t G) {
    gemm_lanes(x, M, (const uint8_t *)q, scales, NULL, 0, 0, y, N, K, G);
}
