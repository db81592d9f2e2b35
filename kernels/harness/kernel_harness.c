/* kernel_harness: runs one C kernel on arrays from raw binary files, for tests that
 * cross-compile the kernels and run them under qemu-user (tests/test_kernels_arm.py).
 *
 * Every array file is raw little-endian data as numpy's tofile() writes it; the shapes
 * come from the command line and each file's size is checked against them. Outputs are
 * written whole, including the padding between rows (the caller pre-fills it and can
 * check it was left alone: output files are read first when they exist, else zeroed).
 *
 *   kernel_harness info
 *       prints "best NAME" and one "supported NAME" line per path this CPU runs
 *   kernel_harness gemm PATH TYPE K NR NC LDW LDX LDY W X Y
 *       Y[c*LDY + r] = dot(W row r, X row c) through the path's gemm member.
 *       TYPE: q4_0 q8_0 f16 f32. LDW, LDX in bytes, LDY in floats.
 *       W holds NR rows LDW bytes apart, X NC rows LDX bytes apart, Y NC*LDY floats.
 *   kernel_harness matmul PATH TYPE K NR NC LDW LDX LDY THREADS W X Y
 *       the same through dl_matmul (matmul.c) with THREADS threads
 *   kernel_harness quantize PATH N K LDX LDY THREADS X Y
 *       N rows of K floats (LDX floats apart) -> q8_0 rows LDY bytes apart, through
 *       dl_quantize_rows_q8_0 (or the path's member per row when matmul.c is absent)
 *   kernel_harness rmsnorm N DIM EPS X W OUT
 *   kernel_harness rope N N_HEADS HEAD_DIM X POS INV_FREQ OUT        (POS int64)
 *   kernel_harness softmax N M X OUT
 *   kernel_harness silu_mul N M GATE UP OUT
 *   kernel_harness attention N START_POS N_HEADS HEAD_DIM KV_GROUP Q_HEAD0 KV_HEAD0
 *                            N_LOCAL_KV SEQ_LEN THREADS Q K V OUT
 *       rows are contiguous for the ops (ld = row length).
 *   kernel_harness sum_parts_q8_0 N_PARTS N DIM X OUT
 *       the mesh all-reduce's sum (wire_sum.h): N_PARTS parts of N q8_0 rows of DIM
 *       values, contiguous in X; OUT = N x DIM floats, parts added in order
 *
 * PATH is a dl_isa name ("neon", "neon-dotprod", "armhf-neon", "scalar", ...) or "best".
 * The path used is printed as "path NAME". Exit status: 0 done, 2 usage or input error,
 * 3 PATH not supported on this CPU, 4 kernel not built into this harness.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dl_kernels.h"
#include "wire_sum.h"

enum { EXIT_USAGE = 2, EXIT_UNSUPPORTED = 3, EXIT_NOT_BUILT = 4 };

static void die(int status, const char *fmt, const char *arg) {
    fprintf(stderr, "kernel_harness: ");
    fprintf(stderr, fmt, arg);
    fputc('\n', stderr);
    exit(status);
}

static int64_t parse_i64(const char *s) {
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno != 0 || *end != '\0' || end == s) die(EXIT_USAGE, "not an integer: %s", s);
    return (int64_t)v;
}

/* The whole file, which must hold exactly `bytes` bytes. */
static void *read_exact(const char *path, int64_t bytes) {
    FILE *f = fopen(path, "rb");
    if (f == NULL) die(EXIT_USAGE, "cannot open %s", path);
    void *buf = malloc(bytes > 0 ? (size_t)bytes : 1);
    if (buf == NULL) die(EXIT_USAGE, "out of memory reading %s", path);
    size_t got = fread(buf, 1, (size_t)bytes, f);
    int extra = fgetc(f) != EOF;
    fclose(f);
    if ((int64_t)got != bytes || extra) {
        fprintf(stderr, "kernel_harness: %s: expected %lld bytes\n", path, (long long)bytes);
        exit(EXIT_USAGE);
    }
    return buf;
}

/* An output buffer: the file's contents when it exists (sentinels set by the test),
 * else zeros. */
static void *output_buffer(const char *path, int64_t bytes) {
    FILE *f = fopen(path, "rb");
    if (f != NULL) {
        fclose(f);
        return read_exact(path, bytes);
    }
    void *buf = calloc(bytes > 0 ? (size_t)bytes : 1, 1);
    if (buf == NULL) die(EXIT_USAGE, "out of memory for %s", path);
    return buf;
}

static void write_all(const char *path, const void *buf, int64_t bytes) {
    FILE *f = fopen(path, "wb");
    if (f == NULL) die(EXIT_USAGE, "cannot create %s", path);
    if ((int64_t)fwrite(buf, 1, (size_t)bytes, f) != bytes || fclose(f) != 0)
        die(EXIT_USAGE, "cannot write %s", path);
}

static const dl_isa *choose_path(const char *name) {
    const dl_isa *isa;
    if (strcmp(name, "best") == 0) {
        isa = dl_isa_best();
        if (isa->name == NULL) die(EXIT_NOT_BUILT, "no kernel path built for %s", "this target");
    } else {
        isa = dl_isa_by_name(name);
        if (isa == NULL) die(EXIT_UNSUPPORTED, "path %s is not supported on this CPU", name);
    }
    printf("path %s\n", isa->name);
    return isa;
}

/* Weight type name -> dl_type, the gemm member, and the row bytes of k elements. */
static int weight_type(const char *name, int64_t k, int64_t *row_bytes) {
    if (strcmp(name, "q4_0") == 0) { *row_bytes = k / DL_QK * DL_Q4_0_BYTES; return DL_TYPE_Q4_0; }
    if (strcmp(name, "q8_0") == 0) { *row_bytes = k / DL_QK * DL_Q8_0_BYTES; return DL_TYPE_Q8_0; }
    if (strcmp(name, "f16") == 0) { *row_bytes = 2 * k; return DL_TYPE_F16; }
    if (strcmp(name, "f32") == 0) { *row_bytes = 4 * k; return DL_TYPE_F32; }
    die(EXIT_USAGE, "unknown weight type %s (q4_0 q8_0 f16 f32)", name);
    return -1;
}

static dl_gemm_fn gemm_member(const dl_isa *isa, int type) {
    switch (type) {
    case DL_TYPE_Q4_0: return isa->gemm_q4_0_q8_0;
    case DL_TYPE_Q8_0: return isa->gemm_q8_0_q8_0;
    case DL_TYPE_F16: return isa->gemm_f16_f32;
    default: return isa->gemm_f32_f32;
    }
}

/* bytes spanned by n rows of row_bytes, ld bytes apart */
static int64_t span(int64_t n, int64_t ld, int64_t row_bytes) {
    return n > 0 ? (n - 1) * ld + row_bytes : 0;
}

static int cmd_gemm(int argc, char **argv, int threaded) {
    int want = threaded ? 14 : 13;
    if (argc != want) die(EXIT_USAGE, "%s: wrong number of arguments", argv[1]);
    const dl_isa *isa = choose_path(argv[2]);
    int64_t k = parse_i64(argv[4]), nr = parse_i64(argv[5]), nc = parse_i64(argv[6]);
    int64_t ldw = parse_i64(argv[7]), ldx = parse_i64(argv[8]), ldy = parse_i64(argv[9]);
    int n_threads = threaded ? (int)parse_i64(argv[10]) : 1;
    char **files = argv + (threaded ? 11 : 10);
    int64_t w_row_bytes;
    int type = weight_type(argv[3], k, &w_row_bytes);
    int64_t x_row_bytes = (type == DL_TYPE_Q4_0 || type == DL_TYPE_Q8_0)
                              ? k / DL_QK * DL_Q8_0_BYTES : 4 * k;
    void *w = read_exact(files[0], span(nr, ldw, w_row_bytes));
    void *x = read_exact(files[1], span(nc, ldx, x_row_bytes));
    int64_t y_bytes = nc * ldy * (int64_t)sizeof(float);
    float *y = output_buffer(files[2], y_bytes);
    if (threaded) {
#ifdef DL_HARNESS_HAVE_MATMUL
        if (dl_matmul(isa, type, k, w, ldw, nr, x, ldx, nc, y, ldy, n_threads) != 0)
            die(EXIT_USAGE, "dl_matmul refused type %s", argv[3]);
#else
        (void)n_threads;
        die(EXIT_NOT_BUILT, "%s: matmul.c was not built into this harness", argv[1]);
#endif
    } else {
        gemm_member(isa, type)(k, w, ldw, nr, x, ldx, nc, y, ldy);
    }
    write_all(files[2], y, y_bytes);
    return 0;
}

static int cmd_quantize(int argc, char **argv) {
    if (argc != 10) die(EXIT_USAGE, "%s: wrong number of arguments", argv[1]);
    const dl_isa *isa = choose_path(argv[2]);
    int64_t n = parse_i64(argv[3]), k = parse_i64(argv[4]);
    int64_t ldx = parse_i64(argv[5]), ldy = parse_i64(argv[6]);
    int n_threads = (int)parse_i64(argv[7]);
    float *x = read_exact(argv[8], span(n, 4 * ldx, 4 * k));
    int64_t y_bytes = span(n, ldy, k / DL_QK * DL_Q8_0_BYTES);
    uint8_t *y = output_buffer(argv[9], y_bytes);
#ifdef DL_HARNESS_HAVE_MATMUL
    dl_quantize_rows_q8_0(isa, x, ldx, y, ldy, n, k, n_threads);
#else
    (void)n_threads;
    for (int64_t i = 0; i < n; i++) isa->quantize_q8_0(x + i * ldx, y + i * ldy, k);
#endif
    write_all(argv[9], y, y_bytes);
    return 0;
}

#ifdef DL_HARNESS_HAVE_OPS
static int cmd_ops(int argc, char **argv) {
    const char *op = argv[1];
    if (strcmp(op, "rmsnorm") == 0 && argc == 8) {
        int64_t n = parse_i64(argv[2]), dim = parse_i64(argv[3]);
        float eps = strtof(argv[4], NULL);
        float *x = read_exact(argv[5], 4 * n * dim);
        float *w = read_exact(argv[6], 4 * dim);
        float *out = output_buffer(argv[7], 4 * n * dim);
        dl_rmsnorm_f32(x, dim, w, out, dim, n, dim, eps);
        write_all(argv[7], out, 4 * n * dim);
    } else if (strcmp(op, "rope") == 0 && argc == 9) {
        int64_t n = parse_i64(argv[2]), n_heads = parse_i64(argv[3]);
        int64_t head_dim = parse_i64(argv[4]), width = n_heads * head_dim;
        float *x = read_exact(argv[5], 4 * n * width);
        int64_t *pos = read_exact(argv[6], 8 * n);
        float *inv_freq = read_exact(argv[7], 4 * (head_dim / 2));
        dl_rope_f32(x, width, n, pos, n_heads, head_dim, inv_freq);
        write_all(argv[8], x, 4 * n * width);
    } else if (strcmp(op, "softmax") == 0 && argc == 6) {
        int64_t n = parse_i64(argv[2]), m = parse_i64(argv[3]);
        float *x = read_exact(argv[4], 4 * n * m);
        dl_softmax_f32(x, m, n, m);
        write_all(argv[5], x, 4 * n * m);
    } else if (strcmp(op, "silu_mul") == 0 && argc == 7) {
        int64_t n = parse_i64(argv[2]), m = parse_i64(argv[3]);
        float *gate = read_exact(argv[4], 4 * n * m);
        float *up = read_exact(argv[5], 4 * n * m);
        dl_silu_mul_f32(gate, m, up, m, n, m);
        write_all(argv[6], gate, 4 * n * m);
    } else if (strcmp(op, "attention") == 0 && argc == 16) {
        int64_t n = parse_i64(argv[2]), start_pos = parse_i64(argv[3]);
        int64_t n_heads = parse_i64(argv[4]), head_dim = parse_i64(argv[5]);
        int64_t kv_group = parse_i64(argv[6]), q_head0 = parse_i64(argv[7]);
        int64_t kv_head0 = parse_i64(argv[8]), n_local_kv = parse_i64(argv[9]);
        int64_t seq_len = parse_i64(argv[10]);
        int n_threads = (int)parse_i64(argv[11]);
        int64_t q_width = n_heads * head_dim, kv_width = n_local_kv * head_dim;
        float *q = read_exact(argv[12], 4 * n * q_width);
        float *k_cache = read_exact(argv[13], 4 * seq_len * kv_width);
        float *v_cache = read_exact(argv[14], 4 * seq_len * kv_width);
        float *out = output_buffer(argv[15], 4 * n * q_width);
        float *scratch = calloc((size_t)(n_threads * (start_pos + n)), sizeof(float));
        if (scratch == NULL) die(EXIT_USAGE, "out of memory for %s", "scratch");
        dl_attention_f32(q, q_width, n, start_pos, k_cache, v_cache, kv_width, n_heads,
                         head_dim, kv_group, q_head0, kv_head0, out, q_width, scratch,
                         n_threads);
        write_all(argv[15], out, 4 * n * q_width);
    } else {
        die(EXIT_USAGE, "%s: unknown op or wrong number of arguments", op);
    }
    return 0;
}
#endif

static int cmd_sum_parts(int argc, char **argv) {
    if (argc != 7) die(EXIT_USAGE, "%s: wrong number of arguments", argv[1]);
    int64_t n_parts = parse_i64(argv[2]), n = parse_i64(argv[3]), dim = parse_i64(argv[4]);
    if (dim % DL_QK != 0) die(EXIT_USAGE, "DIM %s is not whole q8_0 blocks", argv[4]);
    int64_t row = dim / DL_QK * DL_Q8_0_BYTES;
    uint8_t *x = read_exact(argv[5], n_parts * n * row);
    float *out = output_buffer(argv[6], 4 * n * dim);
    dl_sum_parts_q8_0(x, n * row, row, n_parts, n, dim, out, dim);
    write_all(argv[6], out, 4 * n * dim);
    return 0;
}

static int cmd_info(void) {
    const dl_isa *best = dl_isa_best();
    printf("best %s\n", best->name != NULL ? best->name : "(none)");
    for (int i = 0; dl_isa_all[i] != NULL; i++)
        if (dl_isa_supported(dl_isa_all[i])) printf("supported %s\n", dl_isa_all[i]->name);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) die(EXIT_USAGE, "usage: kernel_harness %s ...",
                      "info|gemm|matmul|quantize|sum_parts_q8_0|rmsnorm|rope|softmax|silu_mul|attention");
    const char *cmd = argv[1];
    if (strcmp(cmd, "info") == 0) return cmd_info();
    if (strcmp(cmd, "gemm") == 0) return cmd_gemm(argc, argv, 0);
    if (strcmp(cmd, "matmul") == 0) return cmd_gemm(argc, argv, 1);
    if (strcmp(cmd, "quantize") == 0) return cmd_quantize(argc, argv);
    if (strcmp(cmd, "sum_parts_q8_0") == 0) return cmd_sum_parts(argc, argv);
    if (strcmp(cmd, "rmsnorm") == 0 || strcmp(cmd, "rope") == 0 ||
        strcmp(cmd, "softmax") == 0 || strcmp(cmd, "silu_mul") == 0 ||
        strcmp(cmd, "attention") == 0) {
#ifdef DL_HARNESS_HAVE_OPS
        return cmd_ops(argc, argv);
#else
        die(EXIT_NOT_BUILT, "%s: ops.c was not built into this harness", cmd);
#endif
    }
    die(EXIT_USAGE, "unknown command %s", cmd);
    return EXIT_USAGE;
}
