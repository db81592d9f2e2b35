/* dllama-node compute kernels: the C interface.
 *
 * Layout of the block types is GGML's (and distributed-llama's), so weights are used
 * straight from a memory-mapped model file:
 *   q4_0: 32 weights per 18-byte block: f16 scale d, 16 bytes of nibbles.
 *         element j (0..15) is the low nibble of qs[j], element j+16 the high nibble;
 *         value = (nibble - 8) * d.
 *   q8_0: 32 values per 34-byte block: f16 scale d, 32 int8; value = q * d.
 *
 * Kernels never allocate, validate or log: the Cython layer checks every shape and
 * stride before calling in, and releases the GIL around the call.
 * Every size, count and stride is int64_t.
 */
#ifndef DL_KERNELS_H
#define DL_KERNELS_H

#include <stdint.h>
#include <stddef.h>

#define DL_QK 32
#define DL_Q4_0_BYTES 18
#define DL_Q8_0_BYTES 34

typedef uint16_t dl_f16;

typedef struct {
    dl_f16 d;
    uint8_t qs[DL_QK / 2];
} dl_block_q4_0;

typedef struct {
    dl_f16 d;
    int8_t qs[DL_QK];
} dl_block_q8_0;

/* Weight types: GGML's type ids. */
enum dl_type {
    DL_TYPE_F32 = 0,
    DL_TYPE_F16 = 1,
    DL_TYPE_Q4_0 = 2,
    DL_TYPE_Q8_0 = 8,
};

/* One instruction-set path.
 *
 * gemm: for r in [0, nr), c in [0, nc):
 *     y[c * ldy + r] = dot(row r of W, row c of X)
 *   k    elements per row (a multiple of 32 for the block types)
 *   w    first weight row; ldw bytes from one weight row to the next
 *   x    first activation row; ldx bytes from one activation row to the next
 *        (q8_0 blocks for the q4_0/q8_0 weights, float32 for f16/f32 weights)
 *   y    float32 output; ldy floats from one output column (token) to the next
 * The ISA code chooses its own register tiling inside [0,nr) x [0,nc); the caller
 * (matmul.c) splits rows between threads. nc == 1 is the decode (matrix-vector) case.
 *
 * quantize_q8_0: k floats (a multiple of 32) -> k/32 q8_0 blocks, round to nearest,
 *   d = max|x| / 127 stored as f16, q = round(x / d) (0 when d == 0), as GGML does.
 */
typedef void (*dl_gemm_fn)(int64_t k, const void *w, int64_t ldw, int64_t nr,
                           const void *x, int64_t ldx, int64_t nc,
                           float *y, int64_t ldy);
typedef void (*dl_quantize_fn)(const float *x, void *y, int64_t k);

typedef struct dl_isa {
    const char *name;
    dl_gemm_fn gemm_q4_0_q8_0;
    dl_gemm_fn gemm_q8_0_q8_0;
    dl_gemm_fn gemm_f16_f32;
    dl_gemm_fn gemm_f32_f32;
    dl_quantize_fn quantize_q8_0;
} dl_isa;

/* Defined by the isa_*.c files; a path not built for this target has name NULL. */
extern const dl_isa dl_isa_scalar;
extern const dl_isa dl_isa_avx2;         /* x86-64: AVX2 + FMA + F16C */
extern const dl_isa dl_isa_avx512vnni;   /* x86-64: AVX-512 F/BW/VL + VNNI */
extern const dl_isa dl_isa_neon;         /* aarch64: armv8-a NEON */
extern const dl_isa dl_isa_neon_dotprod; /* aarch64: armv8.2-a dot product (SDOT) */
extern const dl_isa dl_isa_armhf_neon;   /* 32-bit ARM: NEON (armv7/armv8 AArch32) */

/* dispatch.c */
const dl_isa *dl_isa_best(void);                 /* best path this CPU supports */
const dl_isa *dl_isa_by_name(const char *name);  /* NULL if unknown or unsupported here */
int dl_isa_supported(const dl_isa *isa);         /* built for this target and CPU has it */
extern const dl_isa *const dl_isa_all[];         /* NULL-terminated, best last */

/* f16 <-> f32, portable (no intrinsics). */
float dl_f16_to_f32(dl_f16 h);
dl_f16 dl_f32_to_f16(float f);

/* matmul.c: the threaded driver.
 * y[c * ldy + r] = dot(W row r, X row c) for r < nr, c < nc, with n_threads threads.
 * type is a dl_type of W. Returns 0, or -1 for a type this driver does not know. */
int dl_matmul(const dl_isa *isa, int type, int64_t k,
              const void *w, int64_t ldw, int64_t nr,
              const void *x, int64_t ldx, int64_t nc,
              float *y, int64_t ldy, int n_threads);
/* Quantize n rows of k floats (ldx floats apart) into q8_0 rows (ldy bytes apart). */
void dl_quantize_rows_q8_0(const dl_isa *isa, const float *x, int64_t ldx,
                           void *y, int64_t ldy, int64_t n, int64_t k, int n_threads);

/* Several matmuls over the same input in one parallel call (wq/wk/wv, gate/up): one
 * dl_matmul_arg per matrix holds dl_matmul's arguments for it. Each result has the bits
 * dl_matmul gives it. Returns 0, -1 for an unknown type, -2 for more than DL_MULTI_MAX. */
typedef struct {
    int type;
    int64_t k;
    const void *w;
    int64_t ldw, nr;
    const void *x;
    int64_t ldx, nc;
    float *y;
    int64_t ldy;
} dl_matmul_arg;
#define DL_MULTI_MAX 16
int dl_matmul_multi(const dl_isa *isa, int n_mats, const dl_matmul_arg *mats, int n_threads);

/* The thread pool (matmul.c): fn(arg, i) for i in [0, n_items) on up to n_threads
 * threads, the caller included; workers start on first use, spin, yield, then sleep. */
void dl_parallel(int n_threads, int64_t n_items, void (*fn)(void *arg, int64_t item),
                 void *arg);

/* ops.c: pick the build of the small kernels that matches a matmul path (NULL: best). */
void dl_ops_use_isa(const dl_isa *isa);

/* ops.c: the small kernels, all float32, rows `ld` floats apart.
 * rmsnorm:   out[i] = x[i] / sqrt(mean(x^2) + eps) * w[i], per row of dim
 * rope:      per row (token t at pos[t]) and head h, for pair i < head_dim/2:
 *            (x[2i], x[2i+1]) rotated by angle pos * inv_freq[i]   (GGML "normal" rope)
 * softmax:   in place per row of m
 * silu_mul:  gate[i] = gate[i] / (1 + exp(-gate[i])) * up[i]
 * attention: q rows are tokens at positions start_pos .. start_pos + n - 1; token t
 *            attends to cache rows [0, start_pos + t] (causal). The n_heads query heads
 *            here are global heads q_head0 .. q_head0 + n_heads - 1 (a node may hold a slice);
 *            global query head g reads global KV head g / kv_group, which is local KV head
 *            g / kv_group - kv_head0 of the caches. Caches hold the local KV heads:
 *            (seq_len, n_local_kv_heads * head_dim), rows ldkv floats apart.
 *            Scores scaled by 1/sqrt(head_dim).
 *            scratch: unused (online softmax); may be NULL. */
void dl_rmsnorm_f32(const float *x, int64_t ldx, const float *w, float *out, int64_t ldo,
                    int64_t n, int64_t dim, float eps);
void dl_rope_f32(float *x, int64_t ldx, int64_t n, const int64_t *pos, int64_t n_heads,
                 int64_t head_dim, const float *inv_freq);
void dl_softmax_f32(float *x, int64_t ldx, int64_t n, int64_t m);
void dl_silu_mul_f32(float *gate, int64_t ldg, const float *up, int64_t ldu, int64_t n,
                     int64_t m);
void dl_attention_f32(const float *q, int64_t ldq, int64_t n, int64_t start_pos,
                      const float *k_cache, const float *v_cache, int64_t ldkv,
                      int64_t n_heads, int64_t head_dim, int64_t kv_group,
                      int64_t q_head0, int64_t kv_head0,
                      float *out, int64_t ldo, float *scratch, int n_threads);

#endif
