// AMX bf16 tiles for products of several activation rows (batched decode, prefill chunks)
// with packed int4 / int8 weights: included by lowbit.c in the amx build only.
//
// The row kernels above cost nearly as much per activation row as for the first one (a batch
// of 8 decode rows ~4x one row); a tile multiply does 16 x 16 x 32 products in one
// instruction, so here the cost is the weight unpacking, paid once for any number of rows.
//
// Computed as y^T = W x^T, without rounding anything a row kernel keeps:
// - the A tiles hold the weights' integer codes q (exact in bf16: |q| <= 255), 16 weight rows
//   x 32 columns, unpacked once per block of AMX_NB rows;
// - each activation is split into two bf16 numbers, x = hi + lo (16 mantissa bits in all, as
//   fine as the int16 rows'), laid out pair-interleaved as the B operand wants, once per call;
// - per group of G columns the tiles sum q * (hi + lo) in fp32, and the group's scale (and,
//   int4, its min times the group's sum of x) is applied in fp32 vectors: w = q * s + m.
// So results differ from the row kernels only in summation order (~1e-6 relative).
#include <sys/syscall.h>
#include <unistd.h>

#define AMX_NB 32  // weight rows per block: two A tiles

// Linux hands out the AMX register state only to processes that ask (once per process).
static int amx_ready(void) {
    static int ok = -1;
    if (ok < 0) ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */,
                             18 /* XFEATURE_XTILEDATA */) == 0;
    return ok;
}

// Every tile 16 rows x 64 bytes: C0 C1 (the two weight row blocks), 2 and 3 unused, A0 A1 (the
// codes), B hi and B lo (the activations).
static void amx_config(void) {
    unsigned char cfg[64] __attribute__((aligned(64))) = {0};
    cfg[0] = 1;  // palette 1
    for (int t = 0; t < 8; t++) {
        ((uint16_t *)(cfg + 16))[t] = 64;  // bytes per row
        cfg[48 + t] = 16;                  // rows
    }
    _tile_loadconfig(cfg);
}

// x [M, K] fp32 -> B tiles of hi and lo: for 32-column block kb and 16-row block mb, 16 rows r
// of (x[m][32kb + 2r], x[m][32kb + 2r + 1]) for the 16 m of the block (rows past M are zero);
// the lo tiles follow the hi ones. xs[g][m] = sum of row m's group g (fp32), for the min term.
static uint16_t *amx_activations(const float *x, int64_t M, int64_t K, int64_t G, int64_t Mp,
                                 float **xs_out) {
    const int64_t nkb = K / 32, nmb = Mp / 16, ng = (K + G - 1) / G;
    uint16_t *xv = (uint16_t *)aligned_alloc(64, (size_t)(2 * K * Mp * 2));
    memset(xv, 0, (size_t)(2 * K * Mp * 2));
    float *xs = (float *)calloc((size_t)(ng * Mp), sizeof(float));
    const __m512i rows = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6,
                                                             5, 4, 3, 2, 1, 0),
                                            _mm512_set1_epi32(16));  // dwords per tile row
    for (int64_t m = 0; m < M; m++) {
        const int64_t mb = m / 16, mi = m % 16;
        for (int64_t kb = 0; kb < nkb; kb++) {
            const float *src = x + m * K + 32 * kb;
            const __m512 a = _mm512_loadu_ps(src), b = _mm512_loadu_ps(src + 16);
            const __m512bh hi = _mm512_cvtne2ps_pbh(b, a);
            // hi back to fp32: bf16 is fp32's top half
            const __m512i hw = (__m512i)hi;
            const __m512 a_hi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
                _mm512_castsi512_si256(hw)), 16));
            const __m512 b_hi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
                _mm512_extracti64x4_epi64(hw, 1)), 16));
            const __m512bh lo = _mm512_cvtne2ps_pbh(_mm512_sub_ps(b, b_hi), _mm512_sub_ps(a, a_hi));
            uint32_t *tile = (uint32_t *)(xv + (kb * nmb + mb) * 16 * 32);
            _mm512_i32scatter_epi32(tile + mi, rows, (__m512i)hi, 4);
            _mm512_i32scatter_epi32(tile + K * Mp / 2 + mi, rows, (__m512i)lo, 4);
            xs[(32 * kb / G) * Mp + m] += _mm512_reduce_add_ps(_mm512_add_ps(a, b));
        }
    }
    *xs_out = xs;
    return xv;
}

// The integer codes of weight rows [o0, o0 + nr) as bf16, row stride K
static void amx_codes_q4(const uint8_t *packed, int64_t o0, int64_t nr, int64_t K,
                         uint16_t *dst) {
    const int64_t nchunks = K / 32;
    const __m128i mask = _mm_set1_epi8(0x0F);
    // bf16 of 0..15 (vpermw reads the low 16 words)
    const __m512i table = _mm512_set_epi16(
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0x4170, 0x4160, 0x4150, 0x4140, 0x4130, 0x4120, 0x4110, 0x4100,
        0x40E0, 0x40C0, 0x40A0, 0x4080, 0x4040, 0x4000, 0x3F80, 0x0000);
    for (int64_t i = 0; i < nr; i++) {
        const int64_t o = o0 + i;
        uint16_t *row = dst + i * K;
        for (int64_t c = 0; c < nchunks; c++) {
            const __m128i v = _mm_loadu_si128((const __m128i *)(packed + (o * nchunks + c) * 16));
            const __m256i nib = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), mask),
                                                 _mm_and_si128(v, mask));
            _mm512_storeu_si512(row + 32 * c,
                                _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(nib), table));
        }
    }
}

static void amx_codes_q8(const int8_t *q, int64_t o0, int64_t nr, int64_t K, uint16_t *dst) {
    for (int64_t i = 0; i < nr; i++) {
        const int64_t o = o0 + i;
        uint16_t *row = dst + i * K;
        for (int64_t k = 0; k < K; k += 32) {
            const __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                _mm_loadu_si128((const __m128i *)(q + o * K + k))));
            const __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                _mm_loadu_si128((const __m128i *)(q + o * K + k + 16))));
            _mm512_storeu_si512(row + k, (__m512i)_mm512_cvtne2ps_pbh(w1, w0));  // exact
        }
    }
}

typedef struct {
    int is_int4;
    const void *w;
    const void *sh;  // int4: fp16 scales [N, ng]; int8: fp32 scales [N, ng]
    const uint16_t *oh;  // int4: fp16 offsets [N, ng]
    int zero_form;
} amx_weight;

// Scales and mins (w = q * s + m; int8: no mins) of weight rows [o0, o0 + nr) in fp32,
// row-major: sc[r * ng + g]
static void amx_params(const amx_weight *W, int64_t o0, int64_t nr, int64_t ng, float *sc,
                       float *mn) {
    for (int64_t r = 0; r < nr; r++) {
        const int64_t o = o0 + r;
        float *s = sc + r * ng, *m = mn + r * ng;
        if (!W->is_int4) {
            memcpy(s, (const float *)W->sh + o * ng, sizeof(float) * ng);
            continue;
        }
        const uint16_t *sh = (const uint16_t *)W->sh + o * ng, *oh = W->oh + o * ng;
        for (int64_t g = 0; g < ng; g += 16) {
            const __mmask16 k = ng - g >= 16 ? 0xFFFF : (__mmask16)((1u << (ng - g)) - 1);
            const __m512 sv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, sh + g));
            const __m512 fv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, oh + g));
            _mm512_mask_storeu_ps(s + g, k, sv);
            _mm512_mask_storeu_ps(m + g, k, W->zero_form ? _mm512_mul_ps(_mm512_sub_ps(
                _mm512_setzero_ps(), fv), sv) : fv);
        }
    }
}

// y [M, N] = x [M, K] W^T; K % 32 == 0, G % 32 == 0 (int4: the last group may be shorter)
static void amx_gemm(const float *x, int64_t M, amx_weight W, float *y, int64_t N, int64_t K,
                     int64_t G) {
    const int64_t Mp = (M + 15) / 16 * 16, nmb = Mp / 16, nkb = K / 32, kpg = G / 32;
    const int64_t ng = (K + G - 1) / G;
    const int64_t nblocks = (N + AMX_NB - 1) / AMX_NB;
    float *xs;
    uint16_t *xv = amx_activations(x, M, K, G, Mp, &xs);
    const uint16_t *xv_lo = xv + K * Mp;
#pragma omp parallel
    {
        uint16_t *wb = (uint16_t *)aligned_alloc(64, (size_t)(AMX_NB * K * 2));
        float *sc = (float *)malloc(sizeof(float) * 2 * AMX_NB * ng), *mn = sc + AMX_NB * ng;
        float c[16][16] __attribute__((aligned(64)));
        float acc[AMX_NB][16] __attribute__((aligned(64)));
        amx_config();
#pragma omp for schedule(static)
        for (int64_t b = 0; b < nblocks; b++) {
            const int64_t o0 = b * AMX_NB, nr = N - o0 < AMX_NB ? N - o0 : AMX_NB;
            if (W.is_int4) amx_codes_q4((const uint8_t *)W.w, o0, nr, K, wb);
            else amx_codes_q8((const int8_t *)W.w, o0, nr, K, wb);
            amx_params(&W, o0, nr, ng, sc, mn);
            if (nr < AMX_NB) {  // the last block's missing rows: zero codes, scales and mins
                memset(wb + nr * K, 0, (size_t)((AMX_NB - nr) * K * 2));
                memset(sc + nr * ng, 0, sizeof(float) * (AMX_NB - nr) * ng);
                memset(mn + nr * ng, 0, sizeof(float) * (AMX_NB - nr) * ng);
            }
            for (int64_t mb = 0; mb < nmb; mb++) {
                memset(acc, 0, sizeof(acc));
                for (int64_t g = 0; g < ng; g++) {
                    _tile_zero(0);
                    _tile_zero(1);
                    const int64_t kb_end = (g + 1) * kpg < nkb ? (g + 1) * kpg : nkb;
                    for (int64_t kb = g * kpg; kb < kb_end; kb++) {
                        const int64_t at = (kb * nmb + mb) * 16 * 32;
                        _tile_loadd(4, wb + 32 * kb, K * 2);
                        _tile_loadd(5, wb + 16 * K + 32 * kb, K * 2);
                        _tile_loadd(6, xv + at, 64);
                        _tile_loadd(7, xv_lo + at, 64);
                        _tile_dpbf16ps(0, 4, 6);
                        _tile_dpbf16ps(0, 4, 7);
                        _tile_dpbf16ps(1, 5, 6);
                        _tile_dpbf16ps(1, 5, 7);
                    }
                    const __m512 xsum = _mm512_loadu_ps(xs + g * Mp + 16 * mb);
                    for (int half = 0; half < 2; half++) {
                        if (half == 0) _tile_stored(0, c, 64);
                        else _tile_stored(1, c, 64);
                        const float *gs = sc + 16 * half * ng + g;
                        const float *gm = mn + 16 * half * ng + g;
                        for (int64_t i = 0; i < 16; i++) {  // rows past N: zero scale and min
                            float *a = acc[16 * half + i];
                            __m512 v = _mm512_fmadd_ps(_mm512_load_ps(c[i]),
                                                       _mm512_set1_ps(gs[i * ng]),
                                                       _mm512_load_ps(a));
                            if (W.is_int4)
                                v = _mm512_fmadd_ps(xsum, _mm512_set1_ps(gm[i * ng]), v);
                            _mm512_store_ps(a, v);
                        }
                    }
                }
                for (int64_t m = 0; m < 16 && 16 * mb + m < M; m++)
                    for (int64_t r = 0; r < AMX_NB && o0 + r < N; r++)
                        y[(16 * mb + m) * N + o0 + r] = acc[r][m];
            }
        }
        _tile_release();
        free(wb);
        free(sc);
    }
    free(xv);
    free(xs);
}

// The amx build's own kernels: the argument orders of q4_gemm / q8_gemm (so decode_layers
// calls them as LIN_LOWBIT / LIN_Q8). K % 32 == 0, G % 32 == 0 (kernels.py checks).
void q4_gemm_amx(const float *x, int64_t M, const uint8_t *packed, const uint16_t *sh,
                 const uint16_t *oh, int64_t zero_form, float *y, int64_t N, int64_t K,
                 int64_t G) {
    amx_weight W = {1, packed, sh, oh, (int)zero_form};
    amx_gemm(x, M, W, y, N, K, G);
}

void q8_gemm_amx(const float *x, int64_t M, const int8_t *q, const float *scales, float *y,
                 int64_t N, int64_t K, int64_t G) {
    amx_weight W = {0, q, scales, NULL, 0};
    amx_gemm(x, M, W, y, N, K, G);
}

// 1 when the AMX state could be enabled for this process (the kernels above need it)
int64_t lowbit_amx_ready(void) { return amx_ready(); }
