/* ARM NEON paths.
 *
 *   dl_isa_neon          "neon"          aarch64 armv8-a (every 64-bit Pi: Cortex-A53/A72/A76)
 *   dl_isa_neon_dotprod  "neon-dotprod"  aarch64 armv8.2-a SDOT (Cortex-A76 and later: Pi 5)
 *   dl_isa_armhf_neon    "armhf-neon"    32-bit ARM with NEON (armhf userland on any Pi 2+)
 *
 * One register-tiled driver serves all three; what differs between them is the int8 dot
 * product of one 32-element block (widening multiplies, or SDOT), a few helpers that
 * only exist on one architecture, and the tile shapes (aarch64 has 32 vector registers,
 * AArch32 16). The two aarch64 paths share the float gemms and the quantizer.
 *
 * Block gemms (q4_0 or q8_0 weights times q8_0 activations) follow GGML: per block pair
 * an exact integer dot product, then acc += float(sumi) * (d_w * d_x) in float32.
 *
 * The armhf baseline (armv7-a, VFPv3-D16) has no NEON: the ARM part of this file is
 * compiled for NEON by the pragma below, and is only reached through dl_isa_armhf_neon,
 * which dispatch.c offers only when the kernel reports HWCAP_NEON. AArch32 NEON flushes
 * denormals to zero; the code below stays exact where that matters (f16 conversion,
 * quantization) and says how.
 */
#include <string.h>

#include "dl_kernels.h"

#if defined(__aarch64__) || defined(__arm__)

#if defined(__arm__)
#pragma GCC push_options
#pragma GCC target("fpu=neon")
#endif
#include <arm_neon.h>

#define DL_INLINE static inline __attribute__((always_inline))

/* Output tiles held in registers, rows x columns: prompt batches (nc > 1) and the
 * decode matrix-vector product (nc == 1, memory-bound: several rows share each x load). */
#if defined(__aarch64__)
enum { Q_MR = 4, Q_NR = 2, Q_DECODE_MR = 4, F_MR = 4, F_NR = 4, F_DECODE_MR = 4 };
#else
enum { Q_MR = 2, Q_NR = 2, Q_DECODE_MR = 2, F_MR = 2, F_NR = 2, F_DECODE_MR = 4 };
#endif
enum { TILE_MAX = 4 };

/* ---- helpers that differ between aarch64 and AArch32 ------------------------------ */

#if defined(__aarch64__)

DL_INLINE float hsum_f32(float32x4_t v) { return vaddvq_f32(v); }

DL_INLINE float32x4_t fmadd_f32(float32x4_t acc, float32x4_t a, float32x4_t b) {
    return vfmaq_f32(acc, a, b);
}

DL_INLINE float32x4_t fmadd_n_f32(float32x4_t acc, float32x4_t a, float s) {
    return vfmaq_n_f32(acc, a, s);
}

/* f16 -> f32 in hardware (FCVT): exact for every value, subnormals included. */
DL_INLINE float f16_to_f32(const void *p) {
    __fp16 h;
    memcpy(&h, p, sizeof h);
    return (float)h;
}

DL_INLINE float32x4_t load4_f16(const void *p) {
    return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16((const uint16_t *)p)));
}

#else /* __arm__ */

DL_INLINE float hsum_f32(float32x4_t v) {
    float32x2_t s = vpadd_f32(vget_low_f32(v), vget_high_f32(v));
    return vget_lane_f32(s, 0) + vget_lane_f32(s, 1);
}

/* VFPv4 (fused) is not implied by NEON: multiply, then add. */
DL_INLINE float32x4_t fmadd_f32(float32x4_t acc, float32x4_t a, float32x4_t b) {
    return vmlaq_f32(acc, a, b);
}

DL_INLINE float32x4_t fmadd_n_f32(float32x4_t acc, float32x4_t a, float s) {
    return vmlaq_n_f32(acc, a, s);
}

/* The half-precision extension is optional next to NEON (Cortex-A8 lacks it): convert
 * with integer operations, and no call (a call would spill the accumulators).
 * Normal numbers rebias the exponent; subnormals are m * 2^-24 for an integer m < 1024;
 * infinities and NaN map exponent 31 to 255. */
DL_INLINE float f16_to_f32(const void *p) {
    dl_f16 h;
    memcpy(&h, p, sizeof h);
    uint32_t em = h & 0x7fffu;
    uint32_t bits;
    if (em < 0x0400u) {
        float small = (float)em * (1.0f / 16777216.0f);
        memcpy(&bits, &small, sizeof bits);
    } else {
        bits = (em << 13) + (em >= 0x7c00u ? 224u << 23 : 112u << 23);
    }
    bits |= (uint32_t)(h & 0x8000u) << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Four f16 -> four f32, exact for every value although NEON flushes denormals:
 * subnormal halves are m * 2^-24 with an integer m < 1024, a normal float32. */
DL_INLINE float32x4_t load4_f16(const void *p) {
    uint32x4_t h = vmovl_u16(vld1_u16((const uint16_t *)p));
    uint32x4_t sign = vshlq_n_u32(vandq_u32(h, vdupq_n_u32(0x8000u)), 16);
    uint32x4_t em = vandq_u32(h, vdupq_n_u32(0x7fffu));
    uint32x4_t rebias = vdupq_n_u32(112u << 23);
    uint32x4_t normal = vaddq_u32(vshlq_n_u32(em, 13), rebias);
    /* infinities and NaN: exponent 31 -> 255 */
    normal = vaddq_u32(normal, vandq_u32(vcgeq_u32(em, vdupq_n_u32(0x7c00u)), rebias));
    float32x4_t small = vmulq_f32(vcvtq_f32_u32(em), vdupq_n_f32(1.0f / 16777216.0f));
    uint32x4_t bits = vbslq_u32(vcltq_u32(em, vdupq_n_u32(0x0400u)),
                                vreinterpretq_u32_f32(small), normal);
    return vreinterpretq_f32_u32(vorrq_u32(bits, sign));
}

#endif

/* ---- int8 dot product of one 32-element block ---------------------------------------
 * w0/x0 hold elements 0..15, w1/x1 elements 16..31; the four lanes of the result add up
 * to the dot product. */
typedef int32x4_t (*block_dot_fn)(int8x16_t w0, int8x16_t w1, int8x16_t x0, int8x16_t x1);

/* q4_0 weights (-8..7) times int8: four products per int16 lane stay below 2^15. */
static inline int32x4_t block_dot_q4_widen(int8x16_t w0, int8x16_t w1, int8x16_t x0,
                                           int8x16_t x1) {
    int16x8_t p = vmull_s8(vget_low_s8(w0), vget_low_s8(x0));
    p = vmlal_s8(p, vget_high_s8(w0), vget_high_s8(x0));
    p = vmlal_s8(p, vget_low_s8(w1), vget_low_s8(x1));
    p = vmlal_s8(p, vget_high_s8(w1), vget_high_s8(x1));
    return vpaddlq_s16(p);
}

/* int8 times int8: one product per int16 lane (2 * 128 * 128 would not fit), then
 * pairwise-accumulate into int32. */
static inline int32x4_t block_dot_q8_widen(int8x16_t w0, int8x16_t w1, int8x16_t x0,
                                           int8x16_t x1) {
    int32x4_t s = vpaddlq_s16(vmull_s8(vget_low_s8(w0), vget_low_s8(x0)));
    s = vpadalq_s16(s, vmull_s8(vget_high_s8(w0), vget_high_s8(x0)));
    s = vpadalq_s16(s, vmull_s8(vget_low_s8(w1), vget_low_s8(x1)));
    s = vpadalq_s16(s, vmull_s8(vget_high_s8(w1), vget_high_s8(x1)));
    return s;
}

#if defined(__aarch64__)
/* GCC 12: target("+dotprod") alone does not let vdotq_s32 inline; the arch form does. */
#define DL_DOTPROD __attribute__((target("arch=armv8.2-a+dotprod")))

DL_DOTPROD static inline int32x4_t block_dot_sdot(int8x16_t w0, int8x16_t w1, int8x16_t x0,
                                                  int8x16_t x1) {
    return vdotq_s32(vdotq_s32(vdupq_n_s32(0), w0, x0), w1, x1);
}
#endif

/* ---- block gemm: q4_0 / q8_0 weights times q8_0 activations ------------------------ */

/* One weight block as two int8x16 (elements 0..15 and 16..31) and its scale. */
DL_INLINE void load_weight_block(const uint8_t *block, int w_is_q4, int8x16_t *lo,
                                 int8x16_t *hi, float *d) {
    *d = f16_to_f32(block);
    if (w_is_q4) {
        uint8x16_t qs = vld1q_u8(block + 2);
        int8x16_t eight = vdupq_n_s8(8);
        *lo = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(qs, vdupq_n_u8(0x0f))), eight);
        *hi = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(qs, 4)), eight);
    } else {
        *lo = vld1q_s8((const int8_t *)(block + 2));
        *hi = vld1q_s8((const int8_t *)(block + 18));
    }
}

/* y[c * ldy + r] for r in [0, mr), c in [0, nc): mr weight rows against nc activation
 * rows, over nb blocks. mr, nc <= TILE_MAX are constants at every call site, so the
 * accumulators live in registers. */
DL_INLINE void qgemm_tile(int64_t nb, const uint8_t *w, int64_t ldw, const uint8_t *x,
                          int64_t ldx, float *y, int64_t ldy, int mr, int nc,
                          int w_is_q4, block_dot_fn block_dot) {
    const int64_t w_block_bytes = w_is_q4 ? DL_Q4_0_BYTES : DL_Q8_0_BYTES;
    float32x4_t acc[TILE_MAX][TILE_MAX];
#pragma GCC unroll 4
    for (int r = 0; r < mr; r++)
#pragma GCC unroll 4
        for (int c = 0; c < nc; c++) acc[r][c] = vdupq_n_f32(0.0f);

    for (int64_t b = 0; b < nb; b++) {
        int8x16_t wlo[TILE_MAX], whi[TILE_MAX];
        float dw[TILE_MAX];
#pragma GCC unroll 4
        for (int r = 0; r < mr; r++)
            load_weight_block(w + r * ldw + b * w_block_bytes, w_is_q4, &wlo[r], &whi[r],
                              &dw[r]);
#pragma GCC unroll 4
        for (int c = 0; c < nc; c++) {
            const uint8_t *xb = x + c * ldx + b * DL_Q8_0_BYTES;
            float dx = f16_to_f32(xb);
            int8x16_t xlo = vld1q_s8((const int8_t *)(xb + 2));
            int8x16_t xhi = vld1q_s8((const int8_t *)(xb + 18));
#pragma GCC unroll 4
            for (int r = 0; r < mr; r++) {
                int32x4_t sumi = block_dot(wlo[r], whi[r], xlo, xhi);
                acc[r][c] = fmadd_n_f32(acc[r][c], vcvtq_f32_s32(sumi), dw[r] * dx);
            }
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < mr; r++)
#pragma GCC unroll 4
        for (int c = 0; c < nc; c++) y[c * ldy + r] = hsum_f32(acc[r][c]);
}

/* The whole [0, nr) x [0, nc) output in tiles; leftover rows and columns in thinner
 * tiles. */
DL_INLINE void qgemm(int64_t k, const void *w, int64_t ldw, int64_t nr, const void *x,
                     int64_t ldx, int64_t nc, float *y, int64_t ldy, int w_is_q4,
                     block_dot_fn block_dot) {
    const int64_t nb = k / DL_QK;
    const uint8_t *wb = (const uint8_t *)w;
    const uint8_t *xb = (const uint8_t *)x;
    int64_t r = 0;
    if (nc == 1) {
        for (; r + Q_DECODE_MR <= nr; r += Q_DECODE_MR)
            qgemm_tile(nb, wb + r * ldw, ldw, xb, ldx, y + r, ldy, Q_DECODE_MR, 1, w_is_q4,
                       block_dot);
        for (; r < nr; r++)
            qgemm_tile(nb, wb + r * ldw, ldw, xb, ldx, y + r, ldy, 1, 1, w_is_q4, block_dot);
        return;
    }
    for (; r + Q_MR <= nr; r += Q_MR) {
        int64_t c = 0;
        for (; c + Q_NR <= nc; c += Q_NR)
            qgemm_tile(nb, wb + r * ldw, ldw, xb + c * ldx, ldx, y + c * ldy + r, ldy, Q_MR,
                       Q_NR, w_is_q4, block_dot);
        for (; c < nc; c++)
            qgemm_tile(nb, wb + r * ldw, ldw, xb + c * ldx, ldx, y + c * ldy + r, ldy, Q_MR,
                       1, w_is_q4, block_dot);
    }
    for (; r < nr; r++) {
        int64_t c = 0;
        for (; c + Q_NR <= nc; c += Q_NR)
            qgemm_tile(nb, wb + r * ldw, ldw, xb + c * ldx, ldx, y + c * ldy + r, ldy, 1,
                       Q_NR, w_is_q4, block_dot);
        for (; c < nc; c++)
            qgemm_tile(nb, wb + r * ldw, ldw, xb + c * ldx, ldx, y + c * ldy + r, ldy, 1, 1,
                       w_is_q4, block_dot);
    }
}

/* ---- float gemm: f16 or f32 weights times f32 activations -------------------------- */

DL_INLINE float32x4_t load4_weights(const uint8_t *p, int w_is_f16) {
    return w_is_f16 ? load4_f16(p) : vld1q_f32((const float *)p);
}

DL_INLINE float load1_weight(const uint8_t *p, int w_is_f16) {
    if (w_is_f16) return f16_to_f32(p);
    float f;
    memcpy(&f, p, sizeof f);
    return f;
}

/* As qgemm_tile, for float weights; k need not be a multiple of 4 (a scalar tail). */
DL_INLINE void fgemm_tile(int64_t k, const uint8_t *w, int64_t ldw, const uint8_t *x,
                          int64_t ldx, float *y, int64_t ldy, int mr, int nc,
                          int w_is_f16) {
    const int64_t w_elem_bytes = w_is_f16 ? 2 : 4;
    const int64_t k4 = k - k % 4;
    float32x4_t acc[TILE_MAX][TILE_MAX];
#pragma GCC unroll 4
    for (int r = 0; r < mr; r++)
#pragma GCC unroll 4
        for (int c = 0; c < nc; c++) acc[r][c] = vdupq_n_f32(0.0f);

    for (int64_t i = 0; i < k4; i += 4) {
        float32x4_t wv[TILE_MAX];
#pragma GCC unroll 4
        for (int r = 0; r < mr; r++) wv[r] = load4_weights(w + r * ldw + i * w_elem_bytes,
                                                            w_is_f16);
#pragma GCC unroll 4
        for (int c = 0; c < nc; c++) {
            float32x4_t xv = vld1q_f32((const float *)(x + c * ldx) + i);
#pragma GCC unroll 4
            for (int r = 0; r < mr; r++) acc[r][c] = fmadd_f32(acc[r][c], wv[r], xv);
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < mr; r++)
#pragma GCC unroll 4
        for (int c = 0; c < nc; c++) {
            const float *xr = (const float *)(x + c * ldx);
            float tail = 0.0f;
            for (int64_t i = k4; i < k; i++)
                tail += load1_weight(w + r * ldw + i * w_elem_bytes, w_is_f16) * xr[i];
            y[c * ldy + r] = hsum_f32(acc[r][c]) + tail;
        }
}

DL_INLINE void fgemm(int64_t k, const void *w, int64_t ldw, int64_t nr, const void *x,
                     int64_t ldx, int64_t nc, float *y, int64_t ldy, int w_is_f16) {
    const uint8_t *wb = (const uint8_t *)w;
    const uint8_t *xb = (const uint8_t *)x;
    int64_t r = 0;
    if (nc == 1) {
        for (; r + F_DECODE_MR <= nr; r += F_DECODE_MR)
            fgemm_tile(k, wb + r * ldw, ldw, xb, ldx, y + r, ldy, F_DECODE_MR, 1, w_is_f16);
        for (; r < nr; r++)
            fgemm_tile(k, wb + r * ldw, ldw, xb, ldx, y + r, ldy, 1, 1, w_is_f16);
        return;
    }
    for (; r + F_MR <= nr; r += F_MR) {
        int64_t c = 0;
        for (; c + F_NR <= nc; c += F_NR)
            fgemm_tile(k, wb + r * ldw, ldw, xb + c * ldx, ldx, y + c * ldy + r, ldy, F_MR,
                       F_NR, w_is_f16);
        for (; c < nc; c++)
            fgemm_tile(k, wb + r * ldw, ldw, xb + c * ldx, ldx, y + c * ldy + r, ldy, F_MR, 1,
                       w_is_f16);
    }
    for (; r < nr; r++) {
        int64_t c = 0;
        for (; c + F_NR <= nc; c += F_NR)
            fgemm_tile(k, wb + r * ldw, ldw, xb + c * ldx, ldx, y + c * ldy + r, ldy, 1, F_NR,
                       w_is_f16);
        for (; c < nc; c++)
            fgemm_tile(k, wb + r * ldw, ldw, xb + c * ldx, ldx, y + c * ldy + r, ldy, 1, 1,
                       w_is_f16);
    }
}

/* ---- quantize_q8_0 ------------------------------------------------------------------
 * Bit-exact with model/quants.py (GGML's quantize_row_q8_0_ref): d = amax / 127 in
 * float32, id = 1 / d (0 when d == 0), q = roundf(x * id) (halves away from zero),
 * d stored as f16 rounded to nearest even. */

DL_INLINE float block_amax(const float *x) {
    float32x4_t m = vabsq_f32(vld1q_f32(x));
#pragma GCC unroll 8
    for (int i = 4; i < DL_QK; i += 4) m = vmaxq_f32(m, vabsq_f32(vld1q_f32(x + i)));
    float32x2_t h = vpmax_f32(vget_low_f32(m), vget_high_f32(m));
    h = vpmax_f32(h, h);
    return vget_lane_f32(h, 0);
}

/* roundf for |v| < 2^31: truncate, then step away from zero when the dropped fraction
 * is at least one half (v - trunc(v) is exact). */
DL_INLINE int32x4_t round_away_s32(float32x4_t v) {
#if defined(__aarch64__)
    return vcvtaq_s32_f32(v);
#else
    int32x4_t t = vcvtq_s32_f32(v);
    float32x4_t frac = vsubq_f32(v, vcvtq_f32_s32(t));
    /* comparison masks are -1 where true */
    t = vsubq_s32(t, vreinterpretq_s32_u32(vcgeq_f32(frac, vdupq_n_f32(0.5f))));
    t = vaddq_s32(t, vreinterpretq_s32_u32(vcleq_f32(frac, vdupq_n_f32(-0.5f))));
    return t;
#endif
}

DL_INLINE int8x8_t quantize8(const float *x, float id) {
    int32x4_t a = round_away_s32(vmulq_f32(vld1q_f32(x), vdupq_n_f32(id)));
    int32x4_t b = round_away_s32(vmulq_f32(vld1q_f32(x + 4), vdupq_n_f32(id)));
    return vqmovn_s16(vcombine_s16(vqmovn_s32(a), vqmovn_s32(b)));
}

/* The same block in scalar VFP arithmetic, which keeps denormals (AArch32 only). */
static void quantize_block_scalar(const float *x, uint8_t *out) {
    float amax = 0.0f;
    for (int i = 0; i < DL_QK; i++) {
        float a = x[i] < 0 ? -x[i] : x[i];
        if (a > amax) amax = a;
    }
    float d = amax / 127.0f;
    float id = d != 0.0f ? 1.0f / d : 0.0f;
    dl_f16 dh = dl_f32_to_f16(d);
    memcpy(out, &dh, sizeof dh);
    for (int i = 0; i < DL_QK; i++) {
        float v = x[i] * id;
        int32_t t = (int32_t)v;
        float frac = v - (float)t;
        if (frac >= 0.5f) t++;
        if (frac <= -0.5f) t--;
        out[2 + i] = (uint8_t)(int8_t)t;
    }
}

DL_INLINE void quantize_rows(const float *x, void *y, int64_t k, int flush_denormals) {
    uint8_t *out = (uint8_t *)y;
    for (int64_t b = 0; b < k / DL_QK; b++, x += DL_QK, out += DL_Q8_0_BYTES) {
        float amax = block_amax(x);
        /* With denormals flushed, a block whose largest value is tiny could differ from
         * the reference; above 2^-100 every flushed product would have rounded to 0. */
        if (flush_denormals && !(amax >= 0x1p-100f)) {
            quantize_block_scalar(x, out);
            continue;
        }
        float d = amax / 127.0f;
        float id = d != 0.0f ? 1.0f / d : 0.0f;
        dl_f16 dh = dl_f32_to_f16(d);
        memcpy(out, &dh, sizeof dh);
        vst1_s8((int8_t *)(out + 2), quantize8(x, id));
        vst1_s8((int8_t *)(out + 10), quantize8(x + 8, id));
        vst1_s8((int8_t *)(out + 18), quantize8(x + 16, id));
        vst1_s8((int8_t *)(out + 26), quantize8(x + 24, id));
    }
}

/* ---- the paths --------------------------------------------------------------------- */

#if defined(__aarch64__)

static void gemm_q4_0_q8_0_neon(int64_t k, const void *w, int64_t ldw, int64_t nr,
                                const void *x, int64_t ldx, int64_t nc, float *y,
                                int64_t ldy) {
    qgemm(k, w, ldw, nr, x, ldx, nc, y, ldy, 1, block_dot_q4_widen);
}

static void gemm_q8_0_q8_0_neon(int64_t k, const void *w, int64_t ldw, int64_t nr,
                                const void *x, int64_t ldx, int64_t nc, float *y,
                                int64_t ldy) {
    qgemm(k, w, ldw, nr, x, ldx, nc, y, ldy, 0, block_dot_q8_widen);
}

DL_DOTPROD static void gemm_q4_0_q8_0_dotprod(int64_t k, const void *w, int64_t ldw,
                                              int64_t nr, const void *x, int64_t ldx,
                                              int64_t nc, float *y, int64_t ldy) {
    qgemm(k, w, ldw, nr, x, ldx, nc, y, ldy, 1, block_dot_sdot);
}

DL_DOTPROD static void gemm_q8_0_q8_0_dotprod(int64_t k, const void *w, int64_t ldw,
                                              int64_t nr, const void *x, int64_t ldx,
                                              int64_t nc, float *y, int64_t ldy) {
    qgemm(k, w, ldw, nr, x, ldx, nc, y, ldy, 0, block_dot_sdot);
}

static void gemm_f16_f32_neon(int64_t k, const void *w, int64_t ldw, int64_t nr,
                              const void *x, int64_t ldx, int64_t nc, float *y,
                              int64_t ldy) {
    fgemm(k, w, ldw, nr, x, ldx, nc, y, ldy, 1);
}

static void gemm_f32_f32_neon(int64_t k, const void *w, int64_t ldw, int64_t nr,
                              const void *x, int64_t ldx, int64_t nc, float *y,
                              int64_t ldy) {
    fgemm(k, w, ldw, nr, x, ldx, nc, y, ldy, 0);
}

static void quantize_q8_0_neon(const float *x, void *y, int64_t k) {
    quantize_rows(x, y, k, 0);
}

const dl_isa dl_isa_neon = {
    .name = "neon",
    .gemm_q4_0_q8_0 = gemm_q4_0_q8_0_neon,
    .gemm_q8_0_q8_0 = gemm_q8_0_q8_0_neon,
    .gemm_f16_f32 = gemm_f16_f32_neon,
    .gemm_f32_f32 = gemm_f32_f32_neon,
    .quantize_q8_0 = quantize_q8_0_neon,
};

/* SDOT only changes the integer block products. */
const dl_isa dl_isa_neon_dotprod = {
    .name = "neon-dotprod",
    .gemm_q4_0_q8_0 = gemm_q4_0_q8_0_dotprod,
    .gemm_q8_0_q8_0 = gemm_q8_0_q8_0_dotprod,
    .gemm_f16_f32 = gemm_f16_f32_neon,
    .gemm_f32_f32 = gemm_f32_f32_neon,
    .quantize_q8_0 = quantize_q8_0_neon,
};

#else /* __arm__ */

static void gemm_q4_0_q8_0_armhf(int64_t k, const void *w, int64_t ldw, int64_t nr,
                                 const void *x, int64_t ldx, int64_t nc, float *y,
                                 int64_t ldy) {
    qgemm(k, w, ldw, nr, x, ldx, nc, y, ldy, 1, block_dot_q4_widen);
}

static void gemm_q8_0_q8_0_armhf(int64_t k, const void *w, int64_t ldw, int64_t nr,
                                 const void *x, int64_t ldx, int64_t nc, float *y,
                                 int64_t ldy) {
    qgemm(k, w, ldw, nr, x, ldx, nc, y, ldy, 0, block_dot_q8_widen);
}

static void gemm_f16_f32_armhf(int64_t k, const void *w, int64_t ldw, int64_t nr,
                               const void *x, int64_t ldx, int64_t nc, float *y,
                               int64_t ldy) {
    fgemm(k, w, ldw, nr, x, ldx, nc, y, ldy, 1);
}

static void gemm_f32_f32_armhf(int64_t k, const void *w, int64_t ldw, int64_t nr,
                               const void *x, int64_t ldx, int64_t nc, float *y,
                               int64_t ldy) {
    fgemm(k, w, ldw, nr, x, ldx, nc, y, ldy, 0);
}

static void quantize_q8_0_armhf(const float *x, void *y, int64_t k) {
    quantize_rows(x, y, k, 1);
}

const dl_isa dl_isa_armhf_neon = {
    .name = "armhf-neon",
    .gemm_q4_0_q8_0 = gemm_q4_0_q8_0_armhf,
    .gemm_q8_0_q8_0 = gemm_q8_0_q8_0_armhf,
    .gemm_f16_f32 = gemm_f16_f32_armhf,
    .gemm_f32_f32 = gemm_f32_f32_armhf,
    .quantize_q8_0 = quantize_q8_0_armhf,
};

#pragma GCC pop_options
#endif

#endif /* __aarch64__ || __arm__ */

/* Paths not built for this target: name NULL, dispatch never offers them. */
#if !defined(__aarch64__)
const dl_isa dl_isa_neon = {0};
const dl_isa dl_isa_neon_dotprod = {0};
#endif
#if !defined(__arm__)
const dl_isa dl_isa_armhf_neon = {0};
#endif
