/* The threaded drivers: rows of W split between OpenMP threads, then blocked for cache.
 *
 * dl_matmul: y[c * ldy + r] = dot(W row r, X row c) for r in [0, nr), c in [0, nc).
 *   Thread t of T gets one contiguous range of rows [r0, r1). Ranges are whole
 *   multiples of DL_ROW_TILE rows (every ISA's register tile divides it) except the
 *   last, and no thread gets an empty range when nr >= T. Inside its range a thread
 *   walks blocks of DL_ROW_BLOCK rows (their weights stay in L2) and, for each, tiles
 *   of DL_COL_TILE columns; the ISA's gemm does the register tiling inside a tile.
 * dl_quantize_rows_q8_0: rows split between threads the same way.
 * Small calls use fewer threads than asked: each thread gets at least
 * DL_MIN_WORK_PER_THREAD multiply-adds (values, for quantization), since waking a
 * thread costs microseconds; this never changes a result's bits.
 *
 * Portable C (no intrinsics, no Python); without -fopenmp it runs on one thread.
 */
#include "dl_kernels.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#define DL_ROW_TILE 4    /* rows: a thread's range is a multiple of this */
#ifndef DL_ROW_BLOCK
#define DL_ROW_BLOCK 64  /* rows per cache block when there are many columns */
#endif
#ifndef DL_COL_TILE
#define DL_COL_TILE 64   /* columns per call into the ISA when there are many */
#endif
#define DL_FEW_COLS 1    /* up to this many columns (decode): one call per thread */
/* Multiply-adds a thread must get before waking it is worth its few microseconds. */
#define DL_MIN_WORK_PER_THREAD 65536

/* Thread t's rows [*r0, *r1) of nr rows split between nt threads. */
static void split_rows(int64_t nr, int t, int nt, int64_t *r0, int64_t *r1) {
    int64_t granule = nr >= (int64_t)DL_ROW_TILE * nt ? DL_ROW_TILE : 1;
    int64_t units = (nr + granule - 1) / granule;
    int64_t u0 = units * t / nt, u1 = units * (t + 1) / nt;
    *r0 = u0 * granule < nr ? u0 * granule : nr;
    *r1 = u1 * granule < nr ? u1 * granule : nr;
}

/* The path's gemm for a weight type; the scalar one where the path has none (a path
 * may implement a subset); NULL for a type no path knows. */
static dl_gemm_fn gemm_for_type(const dl_isa *isa, int type) {
    dl_gemm_fn fn = NULL;
    for (int pass = 0; pass < 2 && fn == NULL; pass++, isa = &dl_isa_scalar) {
        switch (type) {
        case DL_TYPE_Q4_0: fn = isa->gemm_q4_0_q8_0; break;
        case DL_TYPE_Q8_0: fn = isa->gemm_q8_0_q8_0; break;
        case DL_TYPE_F16: fn = isa->gemm_f16_f32; break;
        case DL_TYPE_F32: fn = isa->gemm_f32_f32; break;
        default: return NULL;
        }
    }
    return fn;
}

/* One thread's share: rows [r0, r1), all nc columns. */
static void gemm_rows(dl_gemm_fn gemm, int64_t k, const uint8_t *w, int64_t ldw,
                      int64_t r0, int64_t r1, const uint8_t *x, int64_t ldx, int64_t nc,
                      float *y, int64_t ldy) {
    if (nc <= DL_FEW_COLS) {
        gemm(k, w + r0 * ldw, ldw, r1 - r0, x, ldx, nc, y + r0, ldy);
        return;
    }
    for (int64_t rb = r0; rb < r1; rb += DL_ROW_BLOCK) {
        int64_t nrb = r1 - rb < DL_ROW_BLOCK ? r1 - rb : DL_ROW_BLOCK;
        for (int64_t c0 = 0; c0 < nc; c0 += DL_COL_TILE) {
            int64_t ncb = nc - c0 < DL_COL_TILE ? nc - c0 : DL_COL_TILE;
            gemm(k, w + rb * ldw, ldw, nrb, x + c0 * ldx, ldx, ncb, y + c0 * ldy + rb, ldy);
        }
    }
}

int dl_matmul(const dl_isa *isa, int type, int64_t k,
              const void *w, int64_t ldw, int64_t nr,
              const void *x, int64_t ldx, int64_t nc,
              float *y, int64_t ldy, int n_threads) {
    dl_gemm_fn gemm = gemm_for_type(isa, type);
    if (gemm == NULL) return -1;
    if (nr <= 0 || nc <= 0) return 0;
    const uint8_t *wb = (const uint8_t *)w, *xb = (const uint8_t *)x;
    int64_t useful = nr * nc * (k > 0 ? k : 1) / DL_MIN_WORK_PER_THREAD;
    if (n_threads > useful) n_threads = useful > 1 ? (int)useful : 1;
    if (n_threads > nr) n_threads = (int)nr;
    if (n_threads <= 1) {
        gemm_rows(gemm, k, wb, ldw, 0, nr, xb, ldx, nc, y, ldy);
        return 0;
    }
#ifdef _OPENMP
#pragma omp parallel num_threads(n_threads)
#endif
    {
        int t = 0, nt = 1;
#ifdef _OPENMP
        t = omp_get_thread_num();
        nt = omp_get_num_threads();
#endif
        int64_t r0, r1;
        split_rows(nr, t, nt, &r0, &r1);
        if (r1 > r0) gemm_rows(gemm, k, wb, ldw, r0, r1, xb, ldx, nc, y, ldy);
    }
    return 0;
}

void dl_quantize_rows_q8_0(const dl_isa *isa, const float *x, int64_t ldx,
                           void *y, int64_t ldy, int64_t n, int64_t k, int n_threads) {
    if (n <= 0 || k <= 0) return;
    dl_quantize_fn quantize = isa->quantize_q8_0;
    if (quantize == NULL) quantize = dl_isa_scalar.quantize_q8_0;
    uint8_t *yb = (uint8_t *)y;
    int64_t useful = n * k / DL_MIN_WORK_PER_THREAD;
    if (n_threads > useful) n_threads = useful > 1 ? (int)useful : 1;
    if (n_threads > n) n_threads = (int)n;
    if (n_threads <= 1) {
        for (int64_t i = 0; i < n; i++) quantize(x + i * ldx, yb + i * ldy, k);
        return;
    }
#ifdef _OPENMP
#pragma omp parallel num_threads(n_threads)
#endif
    {
        int t = 0, nt = 1;
#ifdef _OPENMP
        t = omp_get_thread_num();
        nt = omp_get_num_threads();
#endif
        int64_t i0 = n * t / nt, i1 = n * (t + 1) / nt;
        for (int64_t i = i0; i < i1; i++) quantize(x + i * ldx, yb + i * ldy, k);
    }
}
