/* The small float32 kernels: rmsnorm, rope, softmax, silu_mul, attention.
 *
 * Plain C the compiler vectorises: reductions keep DL_LANES partial sums (so no
 * -ffast-math is needed) and exp is a polynomial (exp_f32) instead of libm's scalar
 * expf. The bodies are written once, as always-inline functions, and instantiated per
 * target: the baseline (SSE2 on x86-64, NEON on aarch64, scalar elsewhere) and, on
 * x86-64, AVX2+FMA and AVX-512. The instruction-set path chosen for the matmuls picks
 * the instantiation too (dl_ops_use_isa), so tests cover each. No intrinsics and no
 * Python: the ARM harness links this file as it is.
 *
 * Threads: attention runs on the pool in matmul.c (dl_parallel); the others are
 * memory-bound and run on the calling thread. A result never depends on the thread
 * count. Shapes are in dl_kernels.h; rows are `ld` floats apart.
 */
#include <math.h>
#include <string.h>

#include "dl_kernels.h"


#define ALWAYS_INLINE static inline __attribute__((always_inline))
#define DL_LANES 16        /* partial sums: one AVX-512 register, four NEON/SSE ones */
#define ATT_BLOCK 128      /* attention: cache rows per block of scores (online softmax) */
#define ATT_MAX_GROUP 8    /* attention: query heads sharing one pass over K and V */
#define ATT_MAX_OUT 4096   /* attention: floats of per-head output kept on the stack */
#define ATT_ROWS 4         /* attention (lanes): cache rows scored together */
#define ATT_DIMS 8         /* attention (lanes): dimensions of the V sums in registers */
#define ATT_PF_ROWS 16     /* attention: K rows prefetched ahead */

/* ATT_MAX_GROUP floats as one GNU C vector (any GCC or Clang target: AVX registers,
 * NEON pairs, or plain scalar code where there is no SIMD) */
typedef float lanes_f32 __attribute__((vector_size(4 * ATT_MAX_GROUP)));

#define lanes_zero() ((lanes_f32){0.0f})

/* sum of a[i] * b[i] for i in [0, m), DL_LANES partial sums added as a tree */
ALWAYS_INLINE float dot_f32(const float *a, const float *b, int64_t m) {
    float s[DL_LANES] = {0.0f};
    int64_t i = 0;
    for (; i + DL_LANES <= m; i += DL_LANES)
        for (int j = 0; j < DL_LANES; j++) s[j] += a[i + j] * b[i + j];
    for (int j = 0; i < m; i++, j++) s[j] += a[i] * b[i];
    for (int w = DL_LANES / 2; w > 0; w /= 2)
        for (int j = 0; j < w; j++) s[j] += s[j + w];
    return s[0];
}

/* exp(x) for float32, vectorisable: 2^n * p(r) with n = round(x / ln 2) and
 * r = x - n ln 2 in [-ln2/2, ln2/2], p Cephes' degree-6 expf polynomial (~1 ulp).
 * x is clamped to [-87.3, 88.3] (exp(-87.3) ~ 1.2e-38 stands in for smaller
 * results, exp(88.3) ~ 2.2e38 for larger); NaN stays NaN. */
ALWAYS_INLINE float exp_f32(float x) {
    const float round_magic = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    x = x < -87.3f ? -87.3f : x;
    x = x > 88.3f ? 88.3f : x;
    float t = x * 1.44269504088896341f + round_magic;
    float n = t - round_magic;
    int32_t ti, mi;
    memcpy(&ti, &t, sizeof ti);
    memcpy(&mi, &round_magic, sizeof mi);
    int32_t sbits = (ti - mi + 127) << 23; /* 2^n as float bits, n in [-126, 127] */
    float scale;
    memcpy(&scale, &sbits, sizeof scale);
    float r = x - n * 0.693359375f;  /* ln 2 in two parts: exact n * hi */
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    return p * scale;
}

/* ------------------------------------------------------------------ bodies */

ALWAYS_INLINE void rmsnorm_rows(const float *x, int64_t ldx, const float *w, float *out,
                                int64_t ldo, int64_t n, int64_t dim, float eps) {
    for (int64_t t = 0; t < n; t++) {
        const float *xt = x + t * ldx;
        float *ot = out + t * ldo;
        float ss = dot_f32(xt, xt, dim);
        float scale = 1.0f / sqrtf(ss / (float)dim + eps);
        for (int64_t i = 0; i < dim; i++) ot[i] = xt[i] * scale * w[i];
    }
}

/* In place: x[i] = exp(x[i] - max) / sum, for one row of m > 0 values. */
ALWAYS_INLINE void softmax_row(float *x, int64_t m) {
    float mx[DL_LANES], sum[DL_LANES] = {0.0f};
    for (int j = 0; j < DL_LANES; j++) mx[j] = x[0];
    int64_t i = 0;
    for (; i + DL_LANES <= m; i += DL_LANES)
        for (int j = 0; j < DL_LANES; j++) mx[j] = x[i + j] > mx[j] ? x[i + j] : mx[j];
    for (int j = 0; i < m; i++, j++) mx[j] = x[i] > mx[j] ? x[i] : mx[j];
    float mxs = mx[0];
    for (int j = 1; j < DL_LANES; j++) mxs = mx[j] > mxs ? mx[j] : mxs;
    i = 0;
    for (; i + DL_LANES <= m; i += DL_LANES)
        for (int j = 0; j < DL_LANES; j++) {
            float e = exp_f32(x[i + j] - mxs);
            x[i + j] = e;
            sum[j] += e;
        }
    for (int j = 0; i < m; i++, j++) {
        x[i] = exp_f32(x[i] - mxs);
        sum[j] += x[i];
    }
    for (int w = DL_LANES / 2; w > 0; w /= 2)
        for (int j = 0; j < w; j++) sum[j] += sum[j + w];
    float inv = 1.0f / sum[0];
    for (i = 0; i < m; i++) x[i] *= inv;
}

ALWAYS_INLINE void silu_mul_rows(float *gate, int64_t ldg, const float *up, int64_t ldu,
                                 int64_t n, int64_t m) {
    for (int64_t t = 0; t < n; t++) {
        float *g = gate + t * ldg;
        const float *u = up + t * ldu;
        for (int64_t i = 0; i < m; i++) g[i] = g[i] / (1.0f + exp_f32(-g[i])) * u[i];
    }
}

/* Attention for query heads q_h (h < n_q) that share one KV head, one token, over
 * cache rows [0, end): out_h = softmax(K q_h * scale) V. K and V are read once for
 * all n_q heads, in blocks of ATT_BLOCK rows; the softmax is the online one (a
 * running max and sum per head; what earlier blocks added is rescaled when the max
 * grows). Every head's arithmetic is its own: its result does not depend on n_q.
 *
 * attend_heads: a head at a time, dot products along head_dim (any kv_group).
 * attend_lanes: the heads side by side, a lane per head (GQA, kv_group >= 4): scores
 *   are FMAs of q transposed (qt[d], lanes = heads) by broadcast K values, ATT_ROWS
 *   rows at a time, and the V sums FMAs of the probabilities (lanes) by broadcast V
 *   values, ATT_DIMS dimensions at a time in registers: no horizontal sums at all. */
ALWAYS_INLINE void attend_heads(const float *q, int64_t q_stride, int n_q, const float *kh,
                                const float *vh, int64_t ldkv, int64_t end, int64_t head_dim,
                                float scale, float *out, int64_t out_stride) {
    float s[ATT_MAX_GROUP][ATT_BLOCK];
    float acc[n_q * head_dim]; /* n_q * head_dim <= ATT_MAX_OUT, or n_q == 1 */
    float mx[ATT_MAX_GROUP], sum[ATT_MAX_GROUP];
    for (int h = 0; h < n_q; h++) {
        mx[h] = -INFINITY;
        sum[h] = 0.0f;
    }
    memset(acc, 0, sizeof acc);
    for (int64_t b0 = 0; b0 < end; b0 += ATT_BLOCK) {
        int64_t nb = end - b0 < ATT_BLOCK ? end - b0 : ATT_BLOCK;
        for (int64_t j = 0; j < nb; j++) {
            const float *kj = kh + (b0 + j) * ldkv;
            for (int64_t d = 0; d < head_dim; d += 16) { /* as in attend_lanes */
                if (b0 + j + ATT_PF_ROWS < end) __builtin_prefetch(kj + ATT_PF_ROWS * ldkv + d);
                __builtin_prefetch(vh + (b0 + j) * ldkv + d);
            }
            for (int h = 0; h < n_q; h++)
                s[h][j] = dot_f32(q + h * q_stride, kj, head_dim) * scale;
        }
        for (int h = 0; h < n_q; h++) {
            float m = mx[h];
            for (int64_t j = 0; j < nb; j++) m = s[h][j] > m ? s[h][j] : m;
            float part[DL_LANES] = {0.0f};
            int64_t j = 0;
            for (; j + DL_LANES <= nb; j += DL_LANES)
                for (int l = 0; l < DL_LANES; l++) {
                    float e = exp_f32(s[h][j + l] - m);
                    s[h][j + l] = e;
                    part[l] += e;
                }
            for (int l = 0; j < nb; j++, l++) {
                s[h][j] = exp_f32(s[h][j] - m);
                part[l] += s[h][j];
            }
            for (int w = DL_LANES / 2; w > 0; w /= 2)
                for (int l = 0; l < w; l++) part[l] += part[l + w];
            if (m > mx[h] && b0 > 0) { /* rescale what earlier blocks added */
                float alpha = exp_f32(mx[h] - m);
                sum[h] *= alpha;
                float *a = acc + h * head_dim;
                for (int64_t d = 0; d < head_dim; d++) a[d] *= alpha;
            }
            mx[h] = m;
            sum[h] += part[0];
        }
        for (int64_t j = 0; j < nb; j++) {
            const float *vj = vh + (b0 + j) * ldkv;
            for (int h = 0; h < n_q; h++) {
                const float p = s[h][j];
                float *a = acc + h * head_dim;
                for (int64_t d = 0; d < head_dim; d++) a[d] += p * vj[d];
            }
        }
    }
    for (int h = 0; h < n_q; h++) {
        const float inv = 1.0f / sum[h];
        float *o = out + h * out_stride;
        const float *a = acc + h * head_dim;
        for (int64_t d = 0; d < head_dim; d++) o[d] = a[d] * inv;
    }
}

ALWAYS_INLINE void attend_lanes(const float *q, int64_t q_stride, int n_q, const float *kh,
                                const float *vh, int64_t ldkv, int64_t end, int64_t head_dim,
                                float scale, float *out, int64_t out_stride) {
    lanes_f32 qt[head_dim];  /* q transposed: qt[d][h] (zero lanes past n_q) */
    lanes_f32 acc[head_dim]; /* the V sums, acc[d][h] */
    lanes_f32 st[ATT_BLOCK]; /* scores, then probabilities, of a block: st[j][h] */
    float mx[ATT_MAX_GROUP], sum[ATT_MAX_GROUP];
    for (int64_t d = 0; d < head_dim; d++) {
        acc[d] = lanes_zero();
        for (int l = 0; l < ATT_MAX_GROUP; l++) qt[d][l] = l < n_q ? q[l * q_stride + d] : 0.0f;
    }
    for (int l = 0; l < ATT_MAX_GROUP; l++) {
        mx[l] = -INFINITY;
        sum[l] = 0.0f;
    }
    for (int64_t b0 = 0; b0 < end; b0 += ATT_BLOCK) {
        int64_t nb = end - b0 < ATT_BLOCK ? end - b0 : ATT_BLOCK;
        int64_t j = 0;
        for (; j + ATT_ROWS <= nb; j += ATT_ROWS) {
            const float *kj = kh + (b0 + j) * ldkv;
            /* the caches are read a head's slice of each row (strided): fetch K rows
             * ahead, and this block's V rows for the sums after the scores */
            for (int r = 0; r < ATT_ROWS; r++)
                for (int64_t d = 0; d < head_dim; d += 16) {
                    if (b0 + j + r + ATT_PF_ROWS < end)
                        __builtin_prefetch(kj + (r + ATT_PF_ROWS) * ldkv + d);
                    __builtin_prefetch(vh + (b0 + j + r) * ldkv + d);
                }
            lanes_f32 a0[ATT_ROWS], a1[ATT_ROWS];
            _Pragma("GCC unroll 8") for (int r = 0; r < ATT_ROWS; r++) {
                a0[r] = lanes_zero();
                a1[r] = lanes_zero();
            }
            int64_t d = 0;
            for (; d + 2 <= head_dim; d += 2)
                _Pragma("GCC unroll 8") for (int r = 0; r < ATT_ROWS; r++) {
                    a0[r] += qt[d] * kj[r * ldkv + d];
                    a1[r] += qt[d + 1] * kj[r * ldkv + d + 1];
                }
            if (d < head_dim)
                _Pragma("GCC unroll 8") for (int r = 0; r < ATT_ROWS; r++)
                    a0[r] += qt[d] * kj[r * ldkv + d];
            _Pragma("GCC unroll 8") for (int r = 0; r < ATT_ROWS; r++)
                st[j + r] = (a0[r] + a1[r]) * scale;
        }
        for (; j < nb; j++) { /* the same sums, a row at a time */
            const float *kj = kh + (b0 + j) * ldkv;
            lanes_f32 a0 = lanes_zero(), a1 = lanes_zero();
            int64_t d = 0;
            for (; d + 2 <= head_dim; d += 2) {
                a0 += qt[d] * kj[d];
                a1 += qt[d + 1] * kj[d + 1];
            }
            if (d < head_dim) a0 += qt[d] * kj[d];
            st[j] = (a0 + a1) * scale;
        }
        /* online softmax, lane by lane */
        float m[ATT_MAX_GROUP], alpha[ATT_MAX_GROUP], part[ATT_MAX_GROUP];
        for (int l = 0; l < ATT_MAX_GROUP; l++) m[l] = mx[l];
        for (j = 0; j < nb; j++)
            for (int l = 0; l < ATT_MAX_GROUP; l++) m[l] = st[j][l] > m[l] ? st[j][l] : m[l];
        for (int l = 0; l < ATT_MAX_GROUP; l++) part[l] = 0.0f;
        for (j = 0; j < nb; j++)
            for (int l = 0; l < ATT_MAX_GROUP; l++) {
                float e = exp_f32(st[j][l] - m[l]);
                st[j][l] = e;
                part[l] += e;
            }
        int rescale = 0;
        for (int l = 0; l < ATT_MAX_GROUP; l++) {
            alpha[l] = b0 > 0 && m[l] > mx[l] ? exp_f32(mx[l] - m[l]) : 1.0f;
            rescale |= alpha[l] != 1.0f;
            sum[l] = sum[l] * alpha[l] + part[l];
            mx[l] = m[l];
        }
        if (rescale) {
            lanes_f32 av;
            for (int l = 0; l < ATT_MAX_GROUP; l++) av[l] = alpha[l];
            for (int64_t d = 0; d < head_dim; d++) acc[d] *= av;
        }
        /* acc[d] += st[j] * v_j[d], ATT_DIMS dimensions held in registers */
        int64_t d = 0;
        for (; d + ATT_DIMS <= head_dim; d += ATT_DIMS) {
            lanes_f32 o[ATT_DIMS];
            _Pragma("GCC unroll 8") for (int e = 0; e < ATT_DIMS; e++) o[e] = acc[d + e];
            for (j = 0; j < nb; j++) {
                const float *vj = vh + (b0 + j) * ldkv + d;
                _Pragma("GCC unroll 8") for (int e = 0; e < ATT_DIMS; e++) o[e] += st[j] * vj[e];
            }
            _Pragma("GCC unroll 8") for (int e = 0; e < ATT_DIMS; e++) acc[d + e] = o[e];
        }
        for (; d < head_dim; d++)
            for (j = 0; j < nb; j++) acc[d] += st[j] * vh[(b0 + j) * ldkv + d];
    }
    for (int h = 0; h < n_q; h++) {
        const float inv = 1.0f / sum[h];
        float *o = out + h * out_stride;
        for (int64_t d = 0; d < head_dim; d++) o[d] = acc[d][h] * inv;
    }
}

/* ------------------------------------------------------------------ instantiations */

typedef struct {
    void (*rmsnorm)(const float *, int64_t, const float *, float *, int64_t, int64_t, int64_t,
                    float);
    void (*softmax)(float *, int64_t, int64_t, int64_t);
    void (*silu_mul)(float *, int64_t, const float *, int64_t, int64_t, int64_t);
    void (*attend)(const float *, int64_t, int, int, const float *, const float *, int64_t,
                   int64_t, int64_t, float, float *, int64_t);
} ops_table;

#define DEFINE_OPS(NAME, TARGET)                                                          \
    TARGET static void rmsnorm_##NAME(const float *x, int64_t ldx, const float *w,        \
                                      float *out, int64_t ldo, int64_t n, int64_t dim,    \
                                      float eps) {                                        \
        rmsnorm_rows(x, ldx, w, out, ldo, n, dim, eps);                                   \
    }                                                                                     \
    TARGET static void softmax_##NAME(float *x, int64_t ldx, int64_t n, int64_t m) {      \
        for (int64_t t = 0; t < n; t++) softmax_row(x + t * ldx, m);                      \
    }                                                                                     \
    TARGET static void silu_mul_##NAME(float *gate, int64_t ldg, const float *up,         \
                                       int64_t ldu, int64_t n, int64_t m) {               \
        silu_mul_rows(gate, ldg, up, ldu, n, m);                                          \
    }                                                                                     \
    TARGET static void attend_##NAME(const float *q, int64_t q_stride, int n_q,           \
                                     int by_lanes, const float *kh, const float *vh,      \
                                     int64_t ldkv, int64_t end, int64_t head_dim,         \
                                     float scale, float *out, int64_t out_stride) {       \
        if (by_lanes)                                                                     \
            attend_lanes(q, q_stride, n_q, kh, vh, ldkv, end, head_dim, scale, out,       \
                         out_stride);                                                     \
        else                                                                              \
            attend_heads(q, q_stride, n_q, kh, vh, ldkv, end, head_dim, scale, out,       \
                         out_stride);                                                     \
    }                                                                                     \
    static const ops_table OPS_##NAME = {rmsnorm_##NAME, softmax_##NAME, silu_mul_##NAME, \
                                         attend_##NAME};

DEFINE_OPS(base, )
#if defined(__x86_64__) && defined(__GNUC__)
DEFINE_OPS(avx2, __attribute__((target("avx2,fma,f16c"))))
DEFINE_OPS(avx512, __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl"))))
#endif

static const ops_table *ops_active = NULL;

void dl_ops_use_isa(const dl_isa *isa) {
    if (isa == NULL) isa = dl_isa_best();
    const ops_table *t = &OPS_base;
#if defined(__x86_64__) && defined(__GNUC__)
    if (isa == &dl_isa_avx512vnni) t = &OPS_avx512;
    if (isa == &dl_isa_avx2) t = &OPS_avx2;
#endif
    ops_active = t;
}

static const ops_table *ops(void) {
    if (ops_active == NULL) dl_ops_use_isa(NULL);
    return ops_active;
}

/* ------------------------------------------------------------------ the kernels */

void dl_rmsnorm_f32(const float *x, int64_t ldx, const float *w, float *out, int64_t ldo,
                    int64_t n, int64_t dim, float eps) {
    ops()->rmsnorm(x, ldx, w, out, ldo, n, dim, eps);
}

void dl_rope_f32(float *x, int64_t ldx, int64_t n, const int64_t *pos, int64_t n_heads,
                 int64_t head_dim, const float *inv_freq) {
    for (int64_t t = 0; t < n; t++) {
        float *xt = x + t * ldx;
        for (int64_t i = 0; i < head_dim / 2; i++) {
            /* the angle in double: pos * inv_freq loses ~pos * 6e-8 rad in float */
            double angle = (double)pos[t] * (double)inv_freq[i];
            float c = (float)cos(angle), s = (float)sin(angle);
            for (int64_t h = 0; h < n_heads; h++) {
                float *p = xt + h * head_dim + 2 * i;
                float a = p[0], b = p[1];
                p[0] = a * c - b * s;
                p[1] = a * s + b * c;
            }
        }
    }
}

void dl_softmax_f32(float *x, int64_t ldx, int64_t n, int64_t m) {
    if (m <= 0) return;
    ops()->softmax(x, ldx, n, m);
}

void dl_silu_mul_f32(float *gate, int64_t ldg, const float *up, int64_t ldu, int64_t n,
                     int64_t m) {
    ops()->silu_mul(gate, ldg, up, ldu, n, m);
}

/* Attention work items: (token, piece), a piece being up to `per` consecutive local
 * query heads that read the same KV head. Global query head g reads global KV head
 * g / kv_group; the local heads [0, n_heads) are global q_head0 .. q_head0 + n_heads - 1,
 * so the KV heads they read form `runs` consecutive runs of heads. */
typedef struct {
    const ops_table *ops;
    const float *q, *k_cache, *v_cache;
    float *out;
    int64_t ldq, ldkv, ldo, n, start_pos, n_heads, head_dim, kv_group, q_head0, kv_head0;
    int64_t runs, per, pieces; /* pieces per token */
    int by_lanes;
    float scale;
} attention_job;

/* Local query heads [*h0, *h1) of run r (global KV head q_head0 / kv_group + r). */
static void run_heads(const attention_job *j, int64_t r, int64_t *h0, int64_t *h1) {
    int64_t kv = j->q_head0 / j->kv_group + r;
    int64_t g0 = kv * j->kv_group, g1 = g0 + j->kv_group;
    if (g0 < j->q_head0) g0 = j->q_head0;
    if (g1 > j->q_head0 + j->n_heads) g1 = j->q_head0 + j->n_heads;
    *h0 = g0 - j->q_head0;
    *h1 = g1 - j->q_head0;
}

static int64_t count_pieces(const attention_job *j, int64_t per) {
    int64_t total = 0;
    for (int64_t r = 0; r < j->runs; r++) {
        int64_t h0, h1;
        run_heads(j, r, &h0, &h1);
        total += (h1 - h0 + per - 1) / per;
    }
    return total;
}

static void attention_item(void *p, int64_t item) {
    const attention_job *j = (const attention_job *)p;
    int64_t tok = item / j->pieces, piece = item % j->pieces;
    for (int64_t r = 0; r < j->runs; r++) {
        int64_t h0, h1;
        run_heads(j, r, &h0, &h1);
        int64_t np = (h1 - h0 + j->per - 1) / j->per;
        if (piece >= np) {
            piece -= np;
            continue;
        }
        int64_t a = h0 + piece * j->per, b = a + j->per < h1 ? a + j->per : h1;
        int64_t kv = (j->q_head0 + a) / j->kv_group - j->kv_head0;
        j->ops->attend(j->q + tok * j->ldq + a * j->head_dim, j->head_dim, (int)(b - a),
                       j->by_lanes, j->k_cache + kv * j->head_dim, j->v_cache + kv * j->head_dim, j->ldkv,
                       j->start_pos + tok + 1, j->head_dim, j->scale,
                       j->out + tok * j->ldo + a * j->head_dim, j->head_dim);
        return;
    }
}

void dl_attention_f32(const float *q, int64_t ldq, int64_t n, int64_t start_pos,
                      const float *k_cache, const float *v_cache, int64_t ldkv,
                      int64_t n_heads, int64_t head_dim, int64_t kv_group,
                      int64_t q_head0, int64_t kv_head0,
                      float *out, int64_t ldo, float *scratch, int n_threads) {
    (void)scratch; /* the online softmax keeps its scores on the stack */
    if (n <= 0 || n_heads <= 0) return;
    attention_job j = {ops(), q, k_cache, v_cache, out, ldq, ldkv, ldo, n, start_pos,
                       n_heads, head_dim, kv_group, q_head0, kv_head0, 0, 1, 0, 0,
                       1.0f / sqrtf((float)head_dim)};
    /* scores a lane per head when several heads share a KV head (GQA); chosen by the
     * model's kv_group, never by the thread count, so results keep their bits */
    j.by_lanes = kv_group >= 4 && head_dim <= ATT_MAX_OUT / ATT_MAX_GROUP;
    j.runs = (q_head0 + n_heads - 1) / kv_group - q_head0 / kv_group + 1;
    /* heads per piece: as many as share a KV head (within the stack's limits), fewer
     * when that leaves threads idle */
    int64_t per = kv_group < ATT_MAX_GROUP ? kv_group : ATT_MAX_GROUP;
    while (per > 1 && per * head_dim > ATT_MAX_OUT) per--;
    /* a thread only pays for its wake-up with enough multiply-adds (2 per cached value) */
    int64_t useful = n * n_heads * (start_pos + n) * head_dim * 2 / 65536;
    if (n_threads > useful) n_threads = useful > 1 ? (int)useful : 1;
    while (per > 1 && n * count_pieces(&j, per) < n_threads) per = (per + 1) / 2;
    j.per = per;
    j.pieces = count_pieces(&j, per);
    dl_parallel(n_threads, n * j.pieces, attention_item, &j);
}
