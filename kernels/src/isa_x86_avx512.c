/* x86-64 AVX-512 (F/BW/VL) + VNNI path.
 *
 * Block-quantized gemm (q4_0 or q8_0 weights x q8_0 activations), the idea:
 *   A "group" is 4 blocks (128 values). One group of a weight row is unpacked into two
 *   zmm of unsigned bytes, lo = elements 0..15 of each of the 4 blocks and hi = elements
 *   16..31, with one word permute (vpermt2w) straight from GGML's 18- or 34-byte
 *   blocks; q4_0 nibbles stay unsigned (0..15), q8_0 bytes get +128 (xor 0x80).
 *   The activations are repacked once per call into the same lo/hi order (xgroup),
 *   with a correction -bias * sum(x) (bias 8 for q4_0, 128 for q8_0) and their scales.
 *   Then per (row, column) and group: two vpdpbusd starting from the correction give
 *   exact int32 sums, four lanes per block; they are converted to float and
 *   accumulated with fma by d_w * d_x. A register tile of ROWS x COLS pairs reuses each
 *   unpacked weight group across COLS columns and each activation group across ROWS rows.
 *   The k axis is walked in chunks of KC_GROUPS groups (the repacked activations live
 *   on the stack), the chunk sums added into y in a fixed order: a (row, column)
 *   result has the same bits whatever the tiling, thread count or column count.
 * A last group of 1..3 blocks (k = 32 * odd) is read with masked loads, which never
 * touch the bytes past the row.
 *
 * Decode (one column) is bound by memory, not arithmetic: its tile is one row, so the
 * weights are read as one linear stream (rows are usually contiguous), and every
 * cache line of a group is prefetched MV_PF_BYTES ahead (rounded up to whole rows, so
 * a column slice prefetches its own bytes). Measured over a TinyLlama decode step
 * (155 matrices, 582 MB in huge pages), one thread: 8 rows in flight (short streams,
 * 1152 bytes for k = 2048) 15-17 GB/s; one linear stream with the prefetch 26-28;
 * with each group's two loads kept in registers (load_q4_group) 30-33; two threads
 * 45-58 GB/s, what the memory gives here. A row's sums are the same as in the gemm
 * tiles, so decode and prompt agree bit for bit.
 */
#include "dl_kernels.h"

#if defined(__x86_64__)
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
#include <immintrin.h>
#include <string.h>

#ifndef KC_GROUPS
#define KC_GROUPS 64 /* groups (of 4 blocks) per k chunk: 8192 values */
#endif
#ifndef TILE_ROWS
#define TILE_ROWS 4  /* register tile: rows x columns */
#endif
#ifndef TILE_COLS
#define TILE_COLS 3
#endif
#define MAX_COLS 4   /* the widest tile that is instantiated */
#ifndef PF_BYTES
#define PF_BYTES 256 /* gemm tiles: software prefetch distance along a weight row, bytes */
#endif
#ifndef MV_PF_BYTES
#define MV_PF_BYTES 4096 /* decode: prefetch distance, bytes (rounded up to whole rows) */
#endif

#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* One group of repacked q8_0 activations, 256 bytes. */
typedef struct {
    __m512i lo;   /* elements 0..15 of blocks 0..3, int8 */
    __m512i hi;   /* elements 16..31 of blocks 0..3, int8 */
    __m512i corr; /* int32 lanes 4j..4j+3: -bias * (sum of block j's lane elements) */
    __m512 d;     /* lanes 4j..4j+3: block j's scale */
} xgroup;

/* vpermt2w indices (words of the two loads), see the layout notes at each use. */
static const uint16_t IDX_Q4_QS[32] = {1,  2,  3,  4,  5,  6,  7,  8,  10, 11, 12,
                                       13, 14, 15, 16, 17, 19, 20, 21, 22, 23, 24,
                                       25, 26, 56, 57, 58, 59, 60, 61, 62, 63};
static const uint16_t IDX_Q4_D[32] = {0, 0, 0, 0, 9, 9, 9, 9, 18, 18, 18, 18, 27, 27, 27, 27};
static const uint16_t IDX_Q8_LO[32] = {1,  2,  3,  4,  5,  6,  7,  8,  18, 19, 20,
                                       21, 22, 23, 24, 25, 35, 36, 37, 38, 39, 40,
                                       41, 42, 52, 53, 54, 55, 56, 57, 58, 59};
static const uint16_t IDX_Q8_HI[32] = {5,  6,  7,  8,  9,  10, 11, 12, 22, 23, 24,
                                       25, 26, 27, 28, 29, 39, 40, 41, 42, 43, 44,
                                       45, 46, 56, 57, 58, 59, 60, 61, 62, 63};
static const uint16_t IDX_Q8_D[32] = {0,  0,  0,  0,  17, 17, 17, 17,
                                      34, 34, 34, 34, 51, 51, 51, 51};

static inline __m512i load_idx(const uint16_t *idx) { return _mm512_loadu_si512(idx); }

/* Mask of the words of a 64-byte load at byte offset `off` of a group that holds
 * `valid_words` words (nb blocks); all ones for a full group. */
static inline __mmask32 tail_mask(int valid_words, int off) {
    int n = valid_words - off / 2;
    if (n >= 32) return 0xffffffffu;
    if (n <= 0) return 0;
    return (__mmask32)((1u << n) - 1);
}

/* q8_0 group at p (nb blocks, 4 = full): lo, hi bytes and the 16 scales as f16.
 * Word w of the group is bytes 2w, 2w+1. Block j: d at word 17j, elements 0..15 at
 * words 17j+1..17j+8, 16..31 at 17j+9..17j+16. lo/d come from the loads at bytes 0 and
 * 64 (words 0..63), hi from the loads at bytes 8 and 72 (words 4..67). */
ALWAYS_INLINE void load_q8_group(const uint8_t *p, int nb, __m512i *lo, __m512i *hi,
                                 __m256i *d) {
    __m512i p0, p1, q0, q1;
    if (nb == 4) {
        p0 = _mm512_loadu_si512(p);
        p1 = _mm512_loadu_si512(p + 64);
        q0 = _mm512_loadu_si512(p + 8);
        q1 = _mm512_loadu_si512(p + 72);
        __asm__("" : "+v"(p0), "+v"(p1), "+v"(q0), "+v"(q1)); /* see load_q4_group */
    } else {
        int words = 17 * nb;
        p0 = _mm512_maskz_loadu_epi16(tail_mask(words, 0), p);
        p1 = _mm512_maskz_loadu_epi16(tail_mask(words, 64), p + 64);
        q0 = _mm512_maskz_loadu_epi16(tail_mask(words, 8), p + 8);
        q1 = _mm512_maskz_loadu_epi16(tail_mask(words, 72), p + 72);
    }
    *lo = _mm512_permutex2var_epi16(p0, load_idx(IDX_Q8_LO), p1);
    *hi = _mm512_permutex2var_epi16(q0, load_idx(IDX_Q8_HI), q1);
    *d = _mm512_castsi512_si256(_mm512_permutex2var_epi16(p0, load_idx(IDX_Q8_D), p1));
}

/* q4_0 group at p: block j has d at word 9j and its 16 nibble bytes at words
 * 9j+1..9j+8; the loads at bytes 0 and 8 cover words 0..35. */
ALWAYS_INLINE void load_q4_group(const uint8_t *p, int nb, __m512i *lo, __m512i *hi,
                                 __m256i *d) {
    __m512i a, b;
    if (nb == 4) {
        a = _mm512_loadu_si512(p);
        b = _mm512_loadu_si512(p + 8);
        /* Keep a and b in registers: left alone, GCC reloads them as memory operands of
         * the permutes (4 line-crossing loads a group instead of 2), which halves decode
         * speed from memory on Zen 5 (16 -> 30 GB/s a thread). */
        __asm__("" : "+v"(a), "+v"(b));
    } else {
        a = _mm512_maskz_loadu_epi16(tail_mask(9 * nb, 0), p);
        b = _mm512_maskz_loadu_epi16(tail_mask(9 * nb, 8), p + 8);
    }
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    __m512i qs = _mm512_permutex2var_epi16(a, load_idx(IDX_Q4_QS), b);
    *lo = _mm512_and_si512(qs, m4);
    *hi = _mm512_and_si512(_mm512_srli_epi16(qs, 4), m4);
    /* the scales are words 0, 9, 18, 27: all in a */
    *d = _mm512_castsi512_si256(_mm512_permutexvar_epi16(load_idx(IDX_Q4_D), a));
}

/* Repack groups [g0, g0 + ng) of one q8_0 activation row (n_blocks blocks in all). */
static void repack_x(const uint8_t *x, int64_t n_blocks, int64_t g0, int64_t ng, int bias,
                     xgroup *out) {
    const __m512i vbias = _mm512_set1_epi8((char)bias);
    for (int64_t g = 0; g < ng; g++) {
        int64_t b0 = (g0 + g) * 4;
        int nb = n_blocks - b0 >= 4 ? 4 : (int)(n_blocks - b0);
        __m512i lo, hi;
        __m256i d;
        load_q8_group(x + b0 * DL_Q8_0_BYTES, nb, &lo, &hi, &d);
        __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), vbias, lo);
        s = _mm512_dpbusd_epi32(s, vbias, hi);
        out[g].lo = lo;
        out[g].hi = hi;
        out[g].corr = _mm512_sub_epi32(_mm512_setzero_si512(), s);
        out[g].d = _mm512_cvtph_ps(d);
    }
}

ALWAYS_INLINE void load_w_group(int q4, const uint8_t *p, int nb, __m512i *lo, __m512i *hi,
                                __m512 *d) {
    __m256i dh;
    if (q4) {
        load_q4_group(p, nb, lo, hi, &dh);
    } else {
        load_q8_group(p, nb, lo, hi, &dh);
        const __m512i flip = _mm512_set1_epi8((char)0x80);
        *lo = _mm512_xor_si512(*lo, flip);
        *hi = _mm512_xor_si512(*hi, flip);
    }
    *d = _mm512_cvtph_ps(dh);
}

/* acc[r][c] += the products of weight group (lo, hi, d) of row r and x group c */
#define TILE_STEP(R, C, ROW_PTR, NB)                                                    \
    do {                                                                                \
        __m512i wl[TILE_ROWS], wh[TILE_ROWS]; /* R <= TILE_ROWS; a fixed size, not a VLA */ \
        __m512 wd[TILE_ROWS];                                                           \
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {                           \
            if (pf_lines)                                                               \
                _Pragma("GCC unroll 4") for (int l = 0; l < pf_lines; l++)              \
                    _mm_prefetch((const char *)ROW_PTR(r) + pf + 64 * l, _MM_HINT_T0);  \
            load_w_group(q4, ROW_PTR(r), NB, &wl[r], &wh[r], &wd[r]);                   \
        }                                                                               \
        _Pragma("GCC unroll 8") for (int c = 0; c < C; c++) {                           \
            const xgroup *xc = xg + c * xcs;                                            \
            _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {                       \
                __m512i t = _mm512_dpbusd_epi32(xc->corr, wl[r], xc->lo);               \
                t = _mm512_dpbusd_epi32(t, wh[r], xc->hi);                              \
                acc[r][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t),                      \
                                            _mm512_mul_ps(wd[r], xc->d), acc[r][c]);    \
            }                                                                           \
        }                                                                               \
    } while (0)

/* A tile of R rows x C columns over ng groups; the last group has tail_nb blocks.
 * w: row 0 at the chunk's first group; x: repacked, column c at x + c * xcs.
 * Each step prefetches pf_lines cache lines pf bytes ahead of each row's group. */
ALWAYS_INLINE void tile_q(int q4, int R, int C, int64_t ng, int tail_nb, const uint8_t *w,
                          int64_t ldw, const xgroup *x, int64_t xcs, float *y, int64_t ldy,
                          int accumulate, int64_t pf, int pf_lines) {
    const int64_t gbytes = q4 ? 4 * DL_Q4_0_BYTES : 4 * DL_Q8_0_BYTES;
    __m512 acc[TILE_ROWS][MAX_COLS];
    _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)
        _Pragma("GCC unroll 8") for (int c = 0; c < C; c++) acc[r][c] = _mm512_setzero_ps();
    int64_t n_full = tail_nb ? ng - 1 : ng;
    const xgroup *xg = x;
    int64_t g = 0;
#define FULL_ROW(r) (w + (r) * ldw + g * gbytes)
    for (; g < n_full; g++, xg++) TILE_STEP(R, C, FULL_ROW, 4);
    if (tail_nb) TILE_STEP(R, C, FULL_ROW, tail_nb);
#undef FULL_ROW
    _Pragma("GCC unroll 8") for (int c = 0; c < C; c++)
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {
            float s = _mm512_reduce_add_ps(acc[r][c]);
            float *yy = y + c * ldy + r;
            *yy = accumulate ? *yy + s : s;
        }
}

#define DEFINE_TILE(Q4, R, C) DEFINE_TILE_(Q4, R, C)
#define DEFINE_TILE_(Q4, R, C)                                                            \
    static void tile_##Q4##_##R##x##C(int64_t ng, int tail_nb, const uint8_t *w,          \
                                      int64_t ldw, const xgroup *x, int64_t xcs,          \
                                      float *y, int64_t ldy, int accumulate) {            \
        tile_q(Q4, R, C, ng, tail_nb, w, ldw, x, xcs, y, ldy, accumulate, PF_BYTES,       \
               PF_BYTES > 0);                                                             \
    }
DEFINE_TILE(1, TILE_ROWS, 4)
DEFINE_TILE(1, TILE_ROWS, 3)
DEFINE_TILE(1, TILE_ROWS, 2)
DEFINE_TILE(1, TILE_ROWS, 1)
DEFINE_TILE(1, 1, 4)
DEFINE_TILE(1, 1, 3)
DEFINE_TILE(1, 1, 2)
DEFINE_TILE(1, 1, 1)
DEFINE_TILE(0, TILE_ROWS, 4)
DEFINE_TILE(0, TILE_ROWS, 3)
DEFINE_TILE(0, TILE_ROWS, 2)
DEFINE_TILE(0, TILE_ROWS, 1)
DEFINE_TILE(0, 1, 4)
DEFINE_TILE(0, 1, 3)
DEFINE_TILE(0, 1, 2)
DEFINE_TILE(0, 1, 1)

/* Decode: rows [0, nr) one at a time, each over the chunk's ng groups, prefetching every
 * line of a group pf bytes ahead (a whole number of rows). */
ALWAYS_INLINE void matvec_rows(int q4, int64_t nr, int64_t ng, int tail_nb,
                               const uint8_t *w, int64_t ldw, const xgroup *x, float *y,
                               int accumulate, int64_t pf) {
    const int lines = q4 ? (4 * DL_Q4_0_BYTES + 63) / 64 : (4 * DL_Q8_0_BYTES + 63) / 64;
    for (int64_t r = 0; r < nr; r++)
        tile_q(q4, 1, 1, ng, tail_nb, w + r * ldw, ldw, x, 0, y + r, 0, accumulate, pf, lines);
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
#define TILE_NAME(Q4, R, C) TILE_NAME_(Q4, R, C)
#define TILE_NAME_(Q4, R, C) tile_##Q4##_##R##x##C
#define TILE_ROW(Q4, R)                                                                   \
    { TILE_NAME(Q4, R, 1), TILE_NAME(Q4, R, 2), TILE_NAME(Q4, R, 3), TILE_NAME(Q4, R, 4) }
/* [q4][full row tile?][columns - 1] */
static const tile_fn TILES[2][2][MAX_COLS] = {
    {TILE_ROW(0, 1), TILE_ROW(0, TILE_ROWS)},
    {TILE_ROW(1, 1), TILE_ROW(1, TILE_ROWS)},
};

static void gemm_q(int q4, int64_t k, const void *w, int64_t ldw, int64_t nr, const void *x,
                   int64_t ldx, int64_t nc, float *y, int64_t ldy) {
    _Static_assert(TILE_COLS <= MAX_COLS, "TILE_COLS wider than the instantiated tiles");
    xgroup xbuf[TILE_COLS * KC_GROUPS] __attribute__((aligned(64))); /* 48 KB */
    const int64_t n_blocks = k / DL_QK, n_groups = (n_blocks + 3) / 4;
    const int64_t gbytes = q4 ? 4 * DL_Q4_0_BYTES : 4 * DL_Q8_0_BYTES;
    const int tail_nb = (int)(n_blocks % 4);
    const uint8_t *wb = (const uint8_t *)w, *xb = (const uint8_t *)x;
    for (int64_t c0 = 0; c0 < nc; c0 += TILE_COLS) {
        int cols = nc - c0 < TILE_COLS ? (int)(nc - c0) : TILE_COLS;
        for (int64_t g0 = 0; g0 < n_groups; g0 += KC_GROUPS) {
            int64_t ng = n_groups - g0 < KC_GROUPS ? n_groups - g0 : KC_GROUPS;
            int chunk_tail = g0 + ng == n_groups ? tail_nb : 0;
            for (int c = 0; c < cols; c++)
                repack_x(xb + (c0 + c) * ldx, n_blocks, g0, ng, q4 ? 8 : 128,
                         xbuf + c * KC_GROUPS);
            const uint8_t *wg = wb + g0 * gbytes;
            float *yc = y + c0 * ldy;
            int64_t r = 0;
            tile_fn full = TILES[q4][1][cols - 1], one = TILES[q4][0][cols - 1];
            if (nc == 1) { /* decode: one linear stream, nothing to reuse rows over */
                int64_t pf = (MV_PF_BYTES + ldw - 1) / ldw * ldw;
                (q4 ? matvec_q4 : matvec_q8)(nr, ng, chunk_tail, wg, ldw, xbuf, yc, g0 > 0, pf);
                continue;
            }
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

/* 16 weights of row p from element i: f16 or f32, masked for the row's tail */
ALWAYS_INLINE __m512 load_w16(int f16, const uint8_t *p, int64_t i, __mmask16 m) {
    if (f16) return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p + 2 * i));
    return _mm512_maskz_loadu_ps(m, p + 4 * i);
}

#define FT_ROWS 4
#define FT_COLS 4

ALWAYS_INLINE void tile_f(int f16, int R, int C, int64_t k, const uint8_t *w, int64_t ldw,
                          const uint8_t *x, int64_t ldx, float *y, int64_t ldy) {
    __m512 acc[FT_ROWS][FT_COLS];
    _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)
        _Pragma("GCC unroll 8") for (int c = 0; c < C; c++) acc[r][c] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i < k; i += 16) {
        __mmask16 m = k - i >= 16 ? 0xffff : (__mmask16)((1u << (k - i)) - 1);
        __m512 wv[FT_ROWS];
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)
            wv[r] = load_w16(f16, w + r * ldw, i, m);
        _Pragma("GCC unroll 8") for (int c = 0; c < C; c++) {
            __m512 xv = _mm512_maskz_loadu_ps(m, (const float *)(x + c * ldx) + i);
            _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)
                acc[r][c] = _mm512_fmadd_ps(wv[r], xv, acc[r][c]);
        }
    }
    _Pragma("GCC unroll 8") for (int c = 0; c < C; c++)
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)
            y[c * ldy + r] = _mm512_reduce_add_ps(acc[r][c]);
}

#define DEFINE_FTILE(F16, R, C)                                                          \
    static void ftile_##F16##_##R##x##C(int64_t k, const uint8_t *w, int64_t ldw,        \
                                        const uint8_t *x, int64_t ldx, float *y,         \
                                        int64_t ldy) {                                   \
        tile_f(F16, R, C, k, w, ldw, x, ldx, y, ldy);                                    \
    }
DEFINE_FTILE(1, 4, 4)
DEFINE_FTILE(1, 1, 4)
DEFINE_FTILE(1, 4, 1)
DEFINE_FTILE(1, 1, 1)
DEFINE_FTILE(0, 4, 4)
DEFINE_FTILE(0, 1, 4)
DEFINE_FTILE(0, 4, 1)
DEFINE_FTILE(0, 1, 1)

typedef void (*ftile_fn)(int64_t, const uint8_t *, int64_t, const uint8_t *, int64_t, float *,
                         int64_t);

static void gemm_f(int f16, int64_t k, const void *w, int64_t ldw, int64_t nr, const void *x,
                   int64_t ldx, int64_t nc, float *y, int64_t ldy) {
    const uint8_t *wb = (const uint8_t *)w, *xb = (const uint8_t *)x;
    ftile_fn t44 = f16 ? ftile_1_4x4 : ftile_0_4x4, t14 = f16 ? ftile_1_1x4 : ftile_0_1x4;
    ftile_fn t41 = f16 ? ftile_1_4x1 : ftile_0_4x1, t11 = f16 ? ftile_1_1x1 : ftile_0_1x1;
    int64_t c = 0;
    for (; c + FT_COLS <= nc; c += FT_COLS) {
        int64_t r = 0;
        for (; r + FT_ROWS <= nr; r += FT_ROWS)
            t44(k, wb + r * ldw, ldw, xb + c * ldx, ldx, y + c * ldy + r, ldy);
        for (; r < nr; r++) t14(k, wb + r * ldw, ldw, xb + c * ldx, ldx, y + c * ldy + r, ldy);
    }
    for (; c < nc; c++) {
        int64_t r = 0;
        for (; r + FT_ROWS <= nr; r += FT_ROWS)
            t41(k, wb + r * ldw, ldw, xb + c * ldx, ldx, y + c * ldy + r, ldy);
        for (; r < nr; r++) t11(k, wb + r * ldw, ldw, xb + c * ldx, ldx, y + c * ldy + r, ldy);
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
 * at least one half (C's roundf rounds halves away from zero; cvtps rounds to even). */
static inline __m512i roundf_epi32(__m512 v) {
    __m512 t = _mm512_roundscale_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    __m512 frac = _mm512_sub_ps(v, t);
    __mmask16 away = _mm512_cmp_ps_mask(_mm512_abs_ps(frac), _mm512_set1_ps(0.5f), _CMP_GE_OQ);
    /* +-1 with v's sign (integer ops: and/or on floats would need AVX-512 DQ) */
    __m512i sign = _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(INT32_MIN));
    __m512 one = _mm512_castsi512_ps(_mm512_or_si512(sign, _mm512_set1_epi32(0x3f800000)));
    return _mm512_cvttps_epi32(_mm512_mask_add_ps(t, away, t, one));
}

static void quantize_q8_0(const float *x, void *y, int64_t k) {
    uint8_t *out = (uint8_t *)y;
    for (int64_t b = 0; b < k / DL_QK; b++) {
        __m512 v0 = _mm512_loadu_ps(x + b * DL_QK), v1 = _mm512_loadu_ps(x + b * DL_QK + 16);
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        const __m512 vid = _mm512_set1_ps(id);
        uint8_t *ob = out + b * DL_Q8_0_BYTES;
        uint16_t dh = (uint16_t)_cvtss_sh(d, _MM_FROUND_TO_NEAREST_INT);
        memcpy(ob, &dh, sizeof dh);
        _mm_storeu_si128((__m128i *)(ob + 2),
                         _mm512_cvtsepi32_epi8(roundf_epi32(_mm512_mul_ps(v0, vid))));
        _mm_storeu_si128((__m128i *)(ob + 18),
                         _mm512_cvtsepi32_epi8(roundf_epi32(_mm512_mul_ps(v1, vid))));
    }
}

const dl_isa dl_isa_avx512vnni = {
    .name = "avx512vnni",
    .gemm_q4_0_q8_0 = gemm_q4_0_q8_0,
    .gemm_q8_0_q8_0 = gemm_q8_0_q8_0,
    .gemm_f16_f32 = gemm_f16_f32,
    .gemm_f32_f32 = gemm_f32_f32,
    .quantize_q8_0 = quantize_q8_0,
};

#else
const dl_isa dl_isa_avx512vnni = {0};
#endif
