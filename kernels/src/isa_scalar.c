/* The portable path: plain C for every dl_isa member, on every target.
 *
 * It is the semantics every SIMD path must reproduce:
 *   q4_0 x q8_0 and q8_0 x q8_0: per block, the int32 sum of products of the integer
 *     values, times d_w * d_x (both widened from f16); the blocks summed in float.
 *   f16 x f32: f16 weights widened with dl_f16_to_f32, products summed in float.
 *   quantize_q8_0: GGML's quantize_row_q8_0_ref (d = amax / 127, q = roundf(x / d)).
 * No intrinsics, no Python: the ARM harness links this file into a plain C program.
 */
#include <math.h>
#include <string.h>

#include "dl_kernels.h"

static inline float load_f16(const uint8_t *p) {
    dl_f16 h;
    memcpy(&h, p, sizeof h);
    return dl_f16_to_f32(h);
}

/* dot of one q4_0 weight row and one q8_0 activation row, k / 32 blocks */
static float dot_q4_0_q8_0(int64_t n_blocks, const uint8_t *w, const uint8_t *x) {
    float sum = 0.0f;
    for (int64_t b = 0; b < n_blocks; b++) {
        const uint8_t *wb = w + b * DL_Q4_0_BYTES;
        const uint8_t *xb = x + b * DL_Q8_0_BYTES;
        const uint8_t *wq = wb + 2;
        const int8_t *xq = (const int8_t *)(xb + 2);
        int32_t isum = 0;
        for (int j = 0; j < DL_QK / 2; j++) {
            isum += ((int32_t)(wq[j] & 0x0F) - 8) * xq[j];
            isum += ((int32_t)(wq[j] >> 4) - 8) * xq[j + DL_QK / 2];
        }
        sum += (float)isum * (load_f16(wb) * load_f16(xb));
    }
    return sum;
}

static float dot_q8_0_q8_0(int64_t n_blocks, const uint8_t *w, const uint8_t *x) {
    float sum = 0.0f;
    for (int64_t b = 0; b < n_blocks; b++) {
        const uint8_t *wb = w + b * DL_Q8_0_BYTES;
        const uint8_t *xb = x + b * DL_Q8_0_BYTES;
        const int8_t *wq = (const int8_t *)(wb + 2);
        const int8_t *xq = (const int8_t *)(xb + 2);
        int32_t isum = 0;
        for (int j = 0; j < DL_QK; j++) isum += (int32_t)wq[j] * xq[j];
        sum += (float)isum * (load_f16(wb) * load_f16(xb));
    }
    return sum;
}

static float dot_f16_f32(int64_t k, const uint8_t *w, const float *x) {
    /* four partial sums: shorter dependency chains, same result on every call */
    float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    int64_t i = 0;
    for (; i + 4 <= k; i += 4)
        for (int j = 0; j < 4; j++) s[j] += load_f16(w + 2 * (i + j)) * x[i + j];
    for (; i < k; i++) s[0] += load_f16(w + 2 * i) * x[i];
    return (s[0] + s[1]) + (s[2] + s[3]);
}

static float dot_f32_f32(int64_t k, const float *w, const float *x) {
    float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    int64_t i = 0;
    for (; i + 4 <= k; i += 4)
        for (int j = 0; j < 4; j++) s[j] += w[i + j] * x[i + j];
    for (; i < k; i++) s[0] += w[i] * x[i];
    return (s[0] + s[1]) + (s[2] + s[3]);
}

static void gemm_q4_0_q8_0(int64_t k, const void *w, int64_t ldw, int64_t nr,
                           const void *x, int64_t ldx, int64_t nc, float *y, int64_t ldy) {
    for (int64_t c = 0; c < nc; c++) {
        const uint8_t *xc = (const uint8_t *)x + c * ldx;
        for (int64_t r = 0; r < nr; r++)
            y[c * ldy + r] = dot_q4_0_q8_0(k / DL_QK, (const uint8_t *)w + r * ldw, xc);
    }
}

static void gemm_q8_0_q8_0(int64_t k, const void *w, int64_t ldw, int64_t nr,
                           const void *x, int64_t ldx, int64_t nc, float *y, int64_t ldy) {
    for (int64_t c = 0; c < nc; c++) {
        const uint8_t *xc = (const uint8_t *)x + c * ldx;
        for (int64_t r = 0; r < nr; r++)
            y[c * ldy + r] = dot_q8_0_q8_0(k / DL_QK, (const uint8_t *)w + r * ldw, xc);
    }
}

static void gemm_f16_f32(int64_t k, const void *w, int64_t ldw, int64_t nr,
                         const void *x, int64_t ldx, int64_t nc, float *y, int64_t ldy) {
    for (int64_t c = 0; c < nc; c++) {
        const float *xc = (const float *)((const uint8_t *)x + c * ldx);
        for (int64_t r = 0; r < nr; r++)
            y[c * ldy + r] = dot_f16_f32(k, (const uint8_t *)w + r * ldw, xc);
    }
}

static void gemm_f32_f32(int64_t k, const void *w, int64_t ldw, int64_t nr,
                         const void *x, int64_t ldx, int64_t nc, float *y, int64_t ldy) {
    for (int64_t c = 0; c < nc; c++) {
        const float *xc = (const float *)((const uint8_t *)x + c * ldx);
        for (int64_t r = 0; r < nr; r++)
            y[c * ldy + r] = dot_f32_f32(k, (const float *)((const uint8_t *)w + r * ldw), xc);
    }
}

static void quantize_q8_0(const float *x, void *y, int64_t k) {
    uint8_t *out = (uint8_t *)y;
    for (int64_t b = 0; b < k / DL_QK; b++) {
        const float *xb = x + b * DL_QK;
        float amax = 0.0f;
        for (int j = 0; j < DL_QK; j++) amax = fmaxf(amax, fabsf(xb[j]));
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        dl_f16 dh = dl_f32_to_f16(d);
        uint8_t *ob = out + b * DL_Q8_0_BYTES;
        memcpy(ob, &dh, sizeof dh);
        for (int j = 0; j < DL_QK; j++) ob[2 + j] = (uint8_t)(int8_t)roundf(xb[j] * id);
    }
}

const dl_isa dl_isa_scalar = {
    .name = "scalar",
    .gemm_q4_0_q8_0 = gemm_q4_0_q8_0,
    .gemm_q8_0_q8_0 = gemm_q8_0_q8_0,
    .gemm_f16_f32 = gemm_f16_f32,
    .gemm_f32_f32 = gemm_f32_f32,
    .quantize_q8_0 = quantize_q8_0,
};
