/* The sum of the cluster's mesh all-reduce (cluster/sync_tcp.py) in one call.
 *
 * n_parts partial outputs of n rows each; a row is dim/32 q8_0 blocks (34 bytes: the
 * f16 scale d, then 32 int8 q). Each value is decoded as (float)q * (float)d and the
 * parts are added in part (node) order: out = ((v_0 + v_1) + v_2) + ...
 * Every product and every sum is rounded to float on its own -- no fused multiply-add,
 * whatever the compiler flags -- so the bits are numpy's (cluster/wire.py's
 * sum_parts_into) on every CPU, and the nodes of a mixed x86/ARM cluster all hold the
 * same sum.
 *
 * Layout: part p, row r starts at x + p * ld_part + r * ld_row (bytes); out row r at
 * out + r * ldo (floats). Header-only: kernels/_kernels.pyx includes it, which keeps the
 * build's source list as it is; fp-contract is switched off for this code alone.
 */
#ifndef DL_WIRE_SUM_H
#define DL_WIRE_SUM_H

#include <stdint.h>
#include <string.h>

#include "dl_kernels.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#endif

static void dl_sum_parts_q8_0(const uint8_t *x, int64_t ld_part, int64_t ld_row,
                              int64_t n_parts, int64_t n, int64_t dim, float *out,
                              int64_t ldo) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
    const int64_t nb = dim / 32;
    for (int64_t r = 0; r < n; r++) {
        float *o = out + r * ldo;
        for (int64_t b = 0; b < nb; b++) {
            float acc[32];
            for (int64_t p = 0; p < n_parts; p++) {
                const uint8_t *block = x + p * ld_part + r * ld_row + b * 34;
                dl_f16 h;
                memcpy(&h, block, sizeof h);
                const float d = dl_f16_to_f32(h);
                const int8_t *q = (const int8_t *)(block + 2);
                if (p == 0) {
                    for (int j = 0; j < 32; j++) acc[j] = (float)q[j] * d;
                } else {
                    for (int j = 0; j < 32; j++) {
                        const float v = (float)q[j] * d;
                        acc[j] = acc[j] + v;
                    }
                }
            }
            memcpy(o + b * 32, acc, sizeof acc);
        }
    }
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

#endif /* DL_WIRE_SUM_H */
