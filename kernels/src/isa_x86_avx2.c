/* x86-64 AVX2 + FMA + F16C path (Haswell and later, Zen 1 and later).
 *
 * The same scheme as the AVX-512 path (isa_x86_avx512.c) on 256-bit registers:
 *   A group is 2 blocks. A weight group is unpacked into two ymm of unsigned bytes,
 *   lo = elements 0..15 of both blocks, hi = elements 16..31; the activations are
 *   repacked once per call into the same order (xgroup), with their scales and, for
 *   q4_0, the correction -8 * sum(x) that lets the nibbles stay unsigned (0..15).
 *   q4_0: vpmaddubsw(nibbles, x) for lo and hi, added in int16 (|sum| <= 4 * 15 * 128),
 *         vpmaddwd by ones to int32 (four lanes per block), plus the correction.
 *   q8_0: the sign trick (|w| times x with w's sign), each half widened separately.
 *   Then the int32 lanes are converted to float and accumulated with fma by d_w * d_x,
 *   in a register tile of ROWS x COLS (row, column) pairs.
 * k is walked in chunks of KC_GROUPS groups, added into y in a fixed order, so a
 * result has the same bits whatever the tiling, thread count or column count.
 * Decode (one column) reads one row at a time, a linear stream, and prefetches every
 * line of a group MV_PF_BYTES ahead (whole rows), as the AVX-512 path does.
 */
#include "dl_kernels.h"

#if defined(__x86_64__)
#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>
#include <string.h>

#define KC_GROUPS 128 /* groups (of 2 blocks) per k chunk: 8192 values */
#define TILE_ROWS 2   /* register tile: rows x columns (16 ymm registers) */
#define TILE_COLS 3
#ifndef MV_PF_BYTES
#define MV_PF_BYTES 4096 /* decode: prefetch distance, bytes (rounded up to whole rows) */
#endif

#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* One group of repacked q8_0 activations, 128 bytes. */
typedef struct {
    __m256i lo;   /* elements 0..15 of blocks 0 and 1, int8 */
    __m256i hi;   /* elements 16..31 of blocks 0 and 1, int8 */
    __m256i corr; /* q4_0 weights: int32 lanes 4j..4j+3: -8 * (block j's lane elements) */
    __m256 d;     /* lanes 4j..4j+3: block j's scale */
} xgroup;

static inline float f16_at(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, sizeof h);
    return _cvtsh_ss(h);
}

/* 16 bytes at p0 in the low half, 16 at p1 in the high half (zero when p1 is NULL) */
static inline __m256i load_halves(const uint8_t *p0, const uint8_t *p1) {
    __m128i a = _mm_loadu_si128((const __m128i *)p0);
    __m128i b = p1 ? _mm_loadu_si128((const __m128i *)p1) : _mm_setzero_si128();
    return _mm256_inserti128_si256(_mm256_castsi128_si256(a), b, 1);
}

/* [d0 x4, d1 x4] */
static inline __m256 scales(float d0, float d1) {
    return _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_set1_ps(d0)), _mm_set1_ps(d1), 1);
}

/* q8_0 group at p with nb (1 or 2) blocks */
ALWAYS_INLINE void load_q8_group(const uint8_t *p, int nb, __m256i *lo, __m256i *hi,
                                 __m256 *d) {
    const uint8_t *p1 = nb == 2 ? p + DL_Q8_0_BYTES : NULL;
    *lo = load_halves(p + 2, p1 ? p1 + 2 : NULL);
    *hi = load_halves(p + 18, p1 ? p1 + 18 : NULL);
    *d = scales(f16_at(p), p1 ? f16_at(p1) : 0.0f);
}

ALWAYS_INLINE void load_q4_group(const uint8_t *p, int nb, __m256i *lo, __m256i *hi,
                                 __m256 *d) {
    const uint8_t *p1 = nb == 2 ? p + DL_Q4_0_BYTES : NULL;
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    __m256i qs = load_halves(p + 2, p1 ? p1 + 2 : NULL);
    *lo = _mm256_and_si256(qs, m4);
    *hi = _mm256_and_si256(_mm256_srli_epi16(qs, 4), m4);
    *d = scales(f16_at(p), p1 ? f16_at(p1) : 0.0f);
}

/* Repack groups [g0, g0 + ng) of one q8_0 activation row (n_blocks blocks in all). */
static void repack_x(const uint8_t *x, int64_t n_blocks, int64_t g0, int64_t ng,
                     xgroup *out) {
    const __m256i eight = _mm256_set1_epi8(8), ones = _mm256_set1_epi16(1);
    for (int64_t g = 0; g < ng; g++) {
        int64_t b0 = (g0 + g) * 2;
        int nb = n_blocks - b0 >= 2 ? 2 : 1;
        load_q8_group(x + b0 * DL_Q8_0_BYTES, nb, &out[g].lo, &out[g].hi, &out[g].d);
        __m256i s = _mm256_add_epi16(_mm256_maddubs_epi16(eight, out[g].lo),
                                     _mm256_maddubs_epi16(eight, out[g].hi));
        out[g].corr = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_madd_epi16(s, ones));
    }
}

/* int32 lanes of one (row, column) group product */
ALWAYS_INLINE __m256i dot_group(int q4, __m256i wl, __m256i wh, const xgroup *xc) {
    const __m256i ones = _mm256_set1_epi16(1);
    if (q4) {
        __m256i s = _mm256_add_epi16(_mm256_maddubs_epi16(wl, xc->lo),
                                     _mm256_maddubs_epi16(wh, xc->hi));
        return _mm256_add_epi32(_mm256_madd_epi16(s, ones), xc->corr);
    }
    /* q8_0: wl, wh hold the signed weights; |w| * (x with w's sign) */
    __m256i sl = _mm256_maddubs_epi16(_mm256_sign_epi8(wl, wl), _mm256_sign_epi8(xc->lo, wl));
    __m256i sh = _mm256_maddubs_epi16(_mm256_sign_epi8(wh, wh), _mm256_sign_epi8(xc->hi, wh));
    return _mm256_add_epi32(_mm256_madd_epi16(sl, ones), _mm256_madd_epi16(sh, ones));
}

#define TILE_STEP(R, C, ROW_PTR, NB)                                                    \
    do {                                                                                \
        __m256i wl[TILE_ROWS], wh[TILE_ROWS]; /* R <= TILE_ROWS; not a VLA */           \
        __m256 wd[TILE_ROWS];                                                           \
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {                           \
            _Pragma("GCC unroll 4") for (int l = 0; l < pf_lines; l++)                  \
                _mm_prefetch((const char *)ROW_PTR(r) + pf + 64 * l, _MM_HINT_T0);      \
            if (q4) load_q4_group(ROW_PTR(r), NB, &wl[r], &wh[r], &wd[r]);              \
            else load_q8_group(ROW_PTR(r), NB, &wl[r], &wh[r], &wd[r]);                 \
        }                                                                               \
        _Pragma("GCC unroll 8") for (int c = 0; c < C; c++) {                           \
            const xgroup *xc = xg + c * xcs;                                            \
            _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {                       \
                __m256i t = dot_group(q4, wl[r], wh[r], xc);                            \
                acc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t),                      \
                                            _mm256_mul_ps(wd[r], xc->d), acc[r][c]);    \
            }                                                                           \
        }                                                                               \
    } while (0)

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* A tile of R rows x C columns over ng groups; the last group has tail_nb blocks
 * (0: it is full). w: row 0 at the chunk's first group; x column c at x + c * xcs. */
ALWAYS_INLINE void tile_q(int q4, int R, int C, int64_t ng, int tail_nb, const uint8_t *w,
                          int64_t ldw, const xgroup *x, int64_t xcs, float *y, int64_t ldy,
                          int accumulate, int64_t pf, int pf_lines) {
    const int64_t gbytes = q4 ? 2 * DL_Q4_0_BYTES : 2 * DL_Q8_0_BYTES;
    __m256 acc[TILE_ROWS][TILE_COLS];
    _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)
        _Pragma("GCC unroll 8") for (int c = 0; c < C; c++) acc[r][c] = _mm256_setzero_ps();
    int64_t n_full = tail_nb ? ng - 1 : ng;
    const xgroup *xg = x;
    int64_t g = 0;
#define ROW_AT(r) (w + (r) * ldw + g * gbytes)
    for (; g < n_full; g++, xg++) TILE_STEP(R, C, ROW_AT, 2);
    if (tail_nb) TILE_STEP(R, C, ROW_AT, 1);
#undef ROW_AT
    _Pragma("GCC unroll 8") for (int c = 0; c < C; c++)
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {
            float s = hsum(acc[r][c]);
            float *yy = y + c * ldy + r;
            *yy = accumulate ? *yy + s : s;
        }
}

#define DEFINE_TILE(Q4, R, C) DEFINE_TILE_(Q4, R, C)
#define DEFINE_TILE_(Q4, R, C)                                                            \
    static void tile_##Q4##_##R##x##C(int64_t ng, int tail_nb, const uint8_t *w,          \
                                      int64_t ldw, const xgroup *x, int64_t xcs,          \
                                      float *y, int64_t ldy, int accumulate) {            \
        tile_q(Q4, R, C, ng, tail_nb, w, ldw, x, xcs, y, ldy, accumulate, 0, 0);          \
    }
DEFINE_TILE(1, 2, 3)
DEFINE_TILE(1, 2, 2)
DEFINE_TILE(1, 2, 1)
DEFINE_TILE(1, 1, 3)
DEFINE_TILE(1, 1, 2)
DEFINE_TILE(1, 1, 1)
DEFINE_TILE(0, 2, 3)
DEFINE_TILE(0, 2, 2)
DEFINE_TILE(0, 2, 1)
DEFINE_TILE(0, 1, 3)
DEFINE_TILE(0, 1, 2)
DEFINE_TILE(0, 1, 1)

/* Decode: rows [0, nr) one at a time over the chunk's ng groups, prefetching every line
 * of a group pf bytes ahead. A group is 36 (q4_0) or 68 (q8_0) bytes: 1 or 2 lines. */
ALWAYS_INLINE void matvec_rows(int q4, int64_t nr, int64_t ng, int tail_nb,
                               const uint8_t *w, int64_t ldw, const xgroup *x, float *y,
                               int accumulate, int64_t pf) {
    for (int64_t r = 0; r < nr; r++)
        tile_q(q4, 1, 1, ng, tail_nb, w + r * ldw, ldw, x, 0, y + r, 0, accumulate, pf,
               q4 ? 1 : 2);
}
static void matvec_q4(int64_t nr, int64_t ng, int tail_nb, const uint8_t *w, int64_t ldw,
                      const xgroup *x, float *y, int accumulate, int64_t pf) {
    matvec_rows(1, nr, ng, tail_nb, w, ldw, x, y, accumulate, pf);
}
static void matvec_q8(int64_t nr, int64_t ng, int tail_nb, const uint8_t *w, int64_t ldw,
                      const xgroup *x, float *y, int accumulate, int64_t pf) {
    matvec_rows(0, nr, ng, tail_nb, w, ldw, x, y, accumulate, pf);
}

typedef void (*tile_fn)(int64_t, int, const uint8_t *, int64_t, const xgroup *, int64_t,
                        float *, int64_t, int);
/* [q4][full row tile?][columns - 1] */
static const tile_fn TILES[2][2][TILE_COLS] = {
    {{tile_0_1x1, tile_0_1x2, tile_0_1x3}, {tile_0_2x1, tile_0_2x2, tile_0_2x3}},
    {{tile_1_1x1, tile_1_1x2, tile_1_1x3}, {tile_1_2x1, tile_1_2x2, tile_1_2x3}},
};

static void gemm_q(int q4, int64_t k, const void *w, int64_t ldw, int64_t nr, const void *x,
                   int64_t ldx, int64_t nc, float *y, int64_t ldy) {
    xgroup xbuf[TILE_COLS * KC_GROUPS] __attribute__((aligned(32)));
    const int64_t n_blocks = k / DL_QK, n_groups = (n_blocks + 1) / 2;
    const int64_t gbytes = q4 ? 2 * DL_Q4_0_BYTES : 2 * DL_Q8_0_BYTES;
    const int tail_nb = (int)(n_blocks % 2);
    const uint8_t *wb = (const uint8_t *)w, *xb = (const uint8_t *)x;
    for (int64_t c0 = 0; c0 < nc; c0 += TILE_COLS) {
        int cols = nc - c0 < TILE_COLS ? (int)(nc - c0) : TILE_COLS;
        for (int64_t g0 = 0; g0 < n_groups; g0 += KC_GROUPS) {
            int64_t ng = n_groups - g0 < KC_GROUPS ? n_groups - g0 : KC_GROUPS;
            int chunk_tail = g0 + ng == n_groups ? tail_nb : 0;
            for (int c = 0; c < cols; c++)
                repack_x(xb + (c0 + c) * ldx, n_blocks, g0, ng, xbuf + c * KC_GROUPS);
            const uint8_t *wg = wb + g0 * gbytes;
            float *yc = y + c0 * ldy;
            if (nc == 1) { /* decode: one linear stream */
                int64_t pf = (MV_PF_BYTES + ldw - 1) / ldw * ldw;
                (q4 ? matvec_q4 : matvec_q8)(nr, ng, chunk_tail, wg, ldw, xbuf, yc, g0 > 0, pf);
                continue;
            }
            int64_t r = 0;
            tile_fn full = TILES[q4][1][cols - 1], one = TILES[q4][0][cols - 1];
            for (; r + TILE_ROWS <= nr; r += TILE_ROWS)
                full(ng, chunk_tail, wg + r * ldw, ldw, xbuf, KC_GROUPS, yc + r, ldy, g0 > 0);
            for (; r < nr; r++)
                one(ng, chunk_tail, wg + r * ldw, ldw, xbuf, KC_GROUPS, yc + r, ldy, g0 > 0);
        }
    }
}

static void gemm_q4_0_q8_0(int64_t k, const void *w, int64_t ldw, int64_t nr,
                           const void *x, int64_t ldx, int64_t nc, float *y, int64_t ldy) {
    gemm_q(1, k, w, ldw, nr, x, ldx, nc, y, ldy);
}

static void gemm_q8_0_q8_0(int64_t k, const void *w, int64_t ldw, int64_t nr,
                           const void *x, int64_t ldx, int64_t nc, float *y, int64_t ldy) {
    gemm_q(0, k, w, ldw, nr, x, ldx, nc, y, ldy);
}

/* ---------------------------------------------------------------- float weights */

#define FT_ROWS 4
#define FT_COLS 2

/* 8 weights of a row from element i; n < 8 reads only n of them (zeros after) */
ALWAYS_INLINE __m256 load_w8(int f16, const uint8_t *p, int64_t i, int n) {
    if (n == 8) {
        if (f16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 2 * i)));
        return _mm256_loadu_ps((const float *)p + i);
    }
    uint8_t tmp[32] __attribute__((aligned(32))) = {0};
    memcpy(tmp, p + (f16 ? 2 : 4) * i, (size_t)n * (f16 ? 2 : 4));
    if (f16) return _mm256_cvtph_ps(_mm_load_si128((const __m128i *)tmp));
    return _mm256_load_ps((const float *)tmp);
}

ALWAYS_INLINE void tile_f(int f16, int R, int C, int64_t k, const uint8_t *w, int64_t ldw,
                          const uint8_t *x, int64_t ldx, float *y, int64_t ldy) {
    __m256 acc[FT_ROWS][FT_COLS];
    _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)
        _Pragma("GCC unroll 8") for (int c = 0; c < C; c++) acc[r][c] = _mm256_setzero_ps();
#define FSTEP(N)                                                                          \
    do {                                                                                  \
        __m256 wv[FT_ROWS];                                                               \
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)                               \
            wv[r] = load_w8(f16, w + r * ldw, i, N);                                      \
        _Pragma("GCC unroll 8") for (int c = 0; c < C; c++) {                             \
            __m256 xv = load_w8(0, x + c * ldx, i, N);                                    \
            _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)                           \
                acc[r][c] = _mm256_fmadd_ps(wv[r], xv, acc[r][c]);                        \
        }                                                                                 \
    } while (0)
    int64_t i = 0;
    for (; i + 8 <= k; i += 8) FSTEP(8);
    if (i < k) FSTEP((int)(k - i));
#undef FSTEP
    _Pragma("GCC unroll 8") for (int c = 0; c < C; c++)
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)
            y[c * ldy + r] = hsum(acc[r][c]);
}

#define DEFINE_FTILE(F16, R, C)                                                          \
    static void ftile_##F16##_##R##x##C(int64_t k, const uint8_t *w, int64_t ldw,        \
                                        const uint8_t *x, int64_t ldx, float *y,         \
                                        int64_t ldy) {                                   \
        tile_f(F16, R, C, k, w, ldw, x, ldx, y, ldy);                                    \
    }
DEFINE_FTILE(1, 4, 2)
DEFINE_FTILE(1, 1, 2)
DEFINE_FTILE(1, 4, 1)
DEFINE_FTILE(1, 1, 1)
DEFINE_FTILE(0, 4, 2)
DEFINE_FTILE(0, 1, 2)
DEFINE_FTILE(0, 4, 1)
DEFINE_FTILE(0, 1, 1)

typedef void (*ftile_fn)(int64_t, const uint8_t *, int64_t, const uint8_t *, int64_t, float *,
                         int64_t);

static void gemm_f(int f16, int64_t k, const void *w, int64_t ldw, int64_t nr, const void *x,
                   int64_t ldx, int64_t nc, float *y, int64_t ldy) {
    const uint8_t *wb = (const uint8_t *)w, *xb = (const uint8_t *)x;
    ftile_fn full = f16 ? ftile_1_4x2 : ftile_0_4x2, one = f16 ? ftile_1_1x2 : ftile_0_1x2;
    ftile_fn full1 = f16 ? ftile_1_4x1 : ftile_0_4x1, one1 = f16 ? ftile_1_1x1 : ftile_0_1x1;
    int64_t c = 0;
    for (; c + FT_COLS <= nc; c += FT_COLS) {
        int64_t r = 0;
        for (; r + FT_ROWS <= nr; r += FT_ROWS)
            full(k, wb + r * ldw, ldw, xb + c * ldx, ldx, y + c * ldy + r, ldy);
        for (; r < nr; r++) one(k, wb + r * ldw, ldw, xb + c * ldx, ldx, y + c * ldy + r, ldy);
    }
    for (; c < nc; c++) {
        int64_t r = 0;
        for (; r + FT_ROWS <= nr; r += FT_ROWS)
            full1(k, wb + r * ldw, ldw, xb + c * ldx, ldx, y + c * ldy + r, ldy);
        for (; r < nr; r++) one1(k, wb + r * ldw, ldw, xb + c * ldx, ldx, y + c * ldy + r, ldy);
    }
}

static void gemm_f16_f32(int64_t k, const void *w, int64_t ldw, int64_t nr, const void *x,
                         int64_t ldx, int64_t nc, float *y, int64_t ldy) {
    gemm_f(1, k, w, ldw, nr, x, ldx, nc, y, ldy);
}

static void gemm_f32_f32(int64_t k, const void *w, int64_t ldw, int64_t nr, const void *x,
                         int64_t ldx, int64_t nc, float *y, int64_t ldy) {
    gemm_f(0, k, w, ldw, nr, x, ldx, nc, y, ldy);
}

/* ---------------------------------------------------------------- quantize */

/* roundf for |v| < 2^23: truncate, then step away from zero when the dropped part is
 * at least one half (C's roundf; cvtps would round halves to even). */
static inline __m256i roundf_epi32(__m256 v) {
    const __m256 sign_bit = _mm256_set1_ps(-0.0f);
    __m256 t = _mm256_round_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    __m256 frac = _mm256_andnot_ps(sign_bit, _mm256_sub_ps(v, t));
    __m256 away = _mm256_cmp_ps(frac, _mm256_set1_ps(0.5f), _CMP_GE_OQ);
    __m256 one = _mm256_or_ps(_mm256_set1_ps(1.0f), _mm256_and_ps(v, sign_bit));
    return _mm256_cvttps_epi32(_mm256_add_ps(t, _mm256_and_ps(away, one)));
}

static void quantize_q8_0(const float *x, void *y, int64_t k) {
    const __m256 sign_bit = _mm256_set1_ps(-0.0f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    uint8_t *out = (uint8_t *)y;
    for (int64_t b = 0; b < k / DL_QK; b++) {
        const float *xb = x + b * DL_QK;
        __m256 v[4];
        __m256 m = _mm256_setzero_ps();
        for (int j = 0; j < 4; j++) {
            v[j] = _mm256_loadu_ps(xb + 8 * j);
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign_bit, v[j]));
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const float amax = _mm_cvtss_f32(m4);
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        const __m256 vid = _mm256_set1_ps(id);
        __m256i q[4];
        for (int j = 0; j < 4; j++) q[j] = roundf_epi32(_mm256_mul_ps(v[j], vid));
        /* int32 -> int8 with saturation; the packs interleave 128-bit lanes, undo it */
        __m256i q01 = _mm256_packs_epi32(q[0], q[1]), q23 = _mm256_packs_epi32(q[2], q[3]);
        __m256i q8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(q01, q23), order);
        uint8_t *ob = out + b * DL_Q8_0_BYTES;
        uint16_t dh = (uint16_t)_cvtss_sh(d, _MM_FROUND_TO_NEAREST_INT);
        memcpy(ob, &dh, sizeof dh);
        _mm256_storeu_si256((__m256i *)(ob + 2), q8);
    }
}

const dl_isa dl_isa_avx2 = {
    .name = "avx2",
    .gemm_q4_0_q8_0 = gemm_q4_0_q8_0,
    .gemm_q8_0_q8_0 = gemm_q8_0_q8_0,
    .gemm_f16_f32 = gemm_f16_f32,
    .gemm_f32_f32 = gemm_f32_f32,
    .quantize_q8_0 = quantize_q8_0,
};

#else
const dl_isa dl_isa_avx2 = {0};
#endif
