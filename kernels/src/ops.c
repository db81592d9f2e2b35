/* The small float32 kernels: rmsnorm, rope, softmax, silu_mul, attention.
 *
 * Plain C the compiler can vectorise (reductions use eight partial sums, so no
 * -ffast-math is needed); no intrinsics and no Python, so the ARM harness links it
 * as it is. Shapes are in dl_kernels.h; rows are `ld` floats apart.
 */
#include <math.h>

#include "dl_kernels.h"

#ifdef _OPENMP
#include <omp.h>
#endif

/* sum of a[i] * b[i] for i in [0, m), eight partial sums */
static inline float dot_f32(const float *a, const float *b, int64_t m) {
    float s[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    int64_t i = 0;
    for (; i + 8 <= m; i += 8)
        for (int j = 0; j < 8; j++) s[j] += a[i + j] * b[i + j];
    for (; i < m; i++) s[0] += a[i] * b[i];
    return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

void dl_rmsnorm_f32(const float *x, int64_t ldx, const float *w, float *out, int64_t ldo,
                    int64_t n, int64_t dim, float eps) {
    for (int64_t t = 0; t < n; t++) {
        const float *xt = x + t * ldx;
        float *ot = out + t * ldo;
        float ss = dot_f32(xt, xt, dim);
        float scale = 1.0f / sqrtf(ss / (float)dim + eps);
        for (int64_t i = 0; i < dim; i++) ot[i] = xt[i] * scale * w[i];
    }
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

static void softmax_row(float *x, int64_t m) {
    float mx = x[0];
    for (int64_t i = 1; i < m; i++) mx = x[i] > mx ? x[i] : mx;
    float sum = 0.0f;
    for (int64_t i = 0; i < m; i++) {
        x[i] = expf(x[i] - mx);
        sum += x[i];
    }
    float inv = 1.0f / sum;
    for (int64_t i = 0; i < m; i++) x[i] *= inv;
}

void dl_softmax_f32(float *x, int64_t ldx, int64_t n, int64_t m) {
    if (m <= 0) return;
    for (int64_t t = 0; t < n; t++) softmax_row(x + t * ldx, m);
}

void dl_silu_mul_f32(float *gate, int64_t ldg, const float *up, int64_t ldu, int64_t n,
                     int64_t m) {
    for (int64_t t = 0; t < n; t++) {
        float *g = gate + t * ldg;
        const float *u = up + t * ldu;
        for (int64_t i = 0; i < m; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    }
}

/* One (token, head) pair: out_h = softmax(K q / sqrt(hd)) V over cache rows [0, end). */
static void attend_one(const float *qh, const float *kh, const float *vh, int64_t ldkv,
                       int64_t end, int64_t head_dim, float scale, float *oh, float *s) {
    for (int64_t j = 0; j < end; j++) s[j] = dot_f32(qh, kh + j * ldkv, head_dim) * scale;
    softmax_row(s, end);
    for (int64_t d = 0; d < head_dim; d++) oh[d] = 0.0f;
    for (int64_t j = 0; j < end; j++) {
        const float p = s[j];
        const float *vj = vh + j * ldkv;
        for (int64_t d = 0; d < head_dim; d++) oh[d] += p * vj[d];
    }
}

void dl_attention_f32(const float *q, int64_t ldq, int64_t n, int64_t start_pos,
                      const float *k_cache, const float *v_cache, int64_t ldkv,
                      int64_t n_heads, int64_t head_dim, int64_t kv_group,
                      int64_t q_head0, int64_t kv_head0,
                      float *out, int64_t ldo, float *scratch, int n_threads) {
    const float scale = 1.0f / sqrtf((float)head_dim);
    const int64_t n_items = n_heads * n; /* (head, token) pairs, head-major */
    if (n_items <= 0) return;
    /* a thread only pays for its wake-up with enough multiply-adds (2 per cached value) */
    int64_t useful = n_items * (start_pos + n) * head_dim * 2 / 65536;
    if (n_threads > useful) n_threads = useful > 1 ? (int)useful : 1;
    if (n_threads > n_items) n_threads = (int)n_items;
    if (n_threads < 1) n_threads = 1;
#ifdef _OPENMP
#pragma omp parallel num_threads(n_threads) if (n_threads > 1)
#endif
    {
        int t = 0, nt = 1;
#ifdef _OPENMP
        t = omp_get_thread_num();
        nt = omp_get_num_threads();
#endif
        float *s = scratch + (int64_t)t * (start_pos + n);
        int64_t i0 = n_items * t / nt, i1 = n_items * (t + 1) / nt;
        for (int64_t i = i0; i < i1; i++) {
            int64_t h = i / n, tok = i % n;
            int64_t kv = (q_head0 + h) / kv_group - kv_head0;
            attend_one(q + tok * ldq + h * head_dim, k_cache + kv * head_dim,
                       v_cache + kv * head_dim, ldkv, start_pos + tok + 1, head_dim, scale,
                       out + tok * ldo + h * head_dim, s);
        }
    }
}
