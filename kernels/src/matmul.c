/* The threaded drivers, and the small thread pool they run on.
 *
 * dl_matmul: y[c * ldy + r] = dot(W row r, X row c) for r in [0, nr), c in [0, nc).
 *   The rows are cut into chunks of whole DL_ROW_TILE multiples (every ISA's register
 *   tile divides it), about DL_CHUNKS_PER_THREAD per thread, and the threads take
 *   chunks in turn until none is left (dl_parallel). Inside a chunk a thread walks
 *   blocks of DL_ROW_BLOCK rows (their weights stay in L2) and, for each, tiles of
 *   DL_COL_TILE columns; the ISA's gemm does the register tiling inside a tile.
 *   A (row, column) result never depends on which thread computed it, or on the
 *   chunking: results are the same bits for any thread count.
 * dl_quantize_rows_q8_0: rows split into chunks the same way.
 * Small calls use fewer threads than asked: each thread gets at least
 * DL_MIN_WORK_PER_THREAD multiply-adds (values, for quantization), since waking a
 * thread costs microseconds; this never changes a result's bits.
 *
 * The pool (dl_parallel) instead of OpenMP: with OpenMP's static split and spinning
 * barriers, a second busy process on a 2-core machine made every parallel call wait
 * for a scheduler time slice (decode 10x slower than on one thread). Here the calling
 * thread works too and takes whatever chunks are left, so a worker that is not running
 * only costs its own share; waiting threads spin briefly, then yield, then sleep.
 * Threads are never pinned. Portable C11 + POSIX threads; elsewhere it runs on one
 * thread.
 */
#include "dl_kernels.h"

#define DL_ROW_TILE 4    /* rows: a chunk is a multiple of this */
#ifndef DL_ROW_BLOCK
#define DL_ROW_BLOCK 64  /* rows per cache block when there are many columns */
#endif
#ifndef DL_COL_TILE
#define DL_COL_TILE 64   /* columns per call into the ISA when there are many */
#endif
#define DL_FEW_COLS 1    /* up to this many columns (decode): one call per chunk */
/* Multiply-adds a thread must get before waking it is worth its few microseconds. */
#define DL_MIN_WORK_PER_THREAD 65536
/* Chunks per thread: more balance the load when a thread is slow (another process on
 * its core), fewer keep each thread's weight stream long. */
#define DL_CHUNKS_PER_THREAD 4

void dl_parallel(int n_threads, int64_t n_items, void (*fn)(void *arg, int64_t item),
                 void *arg);

/* ------------------------------------------------------------------ thread pool */

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <time.h>

#define DL_POOL_MAX_WORKERS 255
#ifndef DL_POOL_SPIN_NS
#define DL_POOL_SPIN_NS 20000    /* waiting: spin this long, ... */
#endif
#ifndef DL_POOL_YIELD_NS
#define DL_POOL_YIELD_NS 200000  /* ... then yield the CPU in turns until this, then sleep */
#endif

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__) || (defined(__arm__) && defined(__ARM_ARCH) && __ARM_ARCH >= 7)
    __asm__ __volatile__("yield" ::: "memory");
#endif
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* One job at a time. A job is published under a sequence lock (seq odd while its
 * fields are written; seq / 2 is its generation). Items are claimed with a CAS on
 * `claim`, which holds the generation in its high 32 bits and the next item in the
 * low 32, so a worker that read an old job can never claim an item of a newer one.
 * The caller returns only when `done` reaches the item count; a worker that claimed
 * an item always finishes it, so the job's arguments outlive every use. */
static struct {
    pthread_mutex_t lock;  /* worker creation and sleeping */
    pthread_cond_t wake;
    int n_workers;         /* started; worker i (1-based) joins jobs of > i threads */
    atomic_int busy;       /* a caller owns the pool */
    atomic_int sleepers;
    atomic_uint_fast64_t seq;
    /* the job; written only while seq is odd */
    void (*fn)(void *, int64_t);
    void *arg;
    int64_t n_items;
    int n_threads;
    atomic_uint_fast64_t claim;
    atomic_int_fast64_t done;
} pool = {.lock = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER};

/* Claim and run items of generation gen until none is left; returns items run. */
static int64_t run_items(uint64_t gen, void (*fn)(void *, int64_t), void *arg,
                         int64_t n_items) {
    int64_t ran = 0;
    uint64_t c = atomic_load(&pool.claim);
    for (;;) {
        if ((c >> 32) != (gen & 0xffffffffu) || (int64_t)(c & 0xffffffffu) >= n_items)
            return ran;
        if (!atomic_compare_exchange_weak(&pool.claim, &c, c + 1)) continue;
        fn(arg, (int64_t)(c & 0xffffffffu));
        atomic_fetch_add(&pool.done, 1);
        ran++;
        c = atomic_load(&pool.claim);
    }
}

/* Wait until pool.seq differs from seen: spin, then yield, then sleep (at once when
 * spin is 0: a worker the last job did not want is not likely wanted by the next). */
static uint64_t wait_for_job(uint64_t seen, int spin) {
    uint64_t s;
    if (spin) {
        const int64_t start = now_ns();
        for (unsigned i = 1;; i++) {
            if ((s = atomic_load(&pool.seq)) != seen) return s;
            cpu_relax();
            if (i % 64) continue;
            int64_t waited = now_ns() - start;
            if (waited >= DL_POOL_YIELD_NS) break;
            if (waited >= DL_POOL_SPIN_NS) sched_yield();
        }
    }
    pthread_mutex_lock(&pool.lock);
    atomic_fetch_add(&pool.sleepers, 1);
    while ((s = atomic_load(&pool.seq)) == seen) pthread_cond_wait(&pool.wake, &pool.lock);
    atomic_fetch_sub(&pool.sleepers, 1);
    pthread_mutex_unlock(&pool.lock);
    return s;
}

static void *worker_main(void *p) {
    const int index = (int)(intptr_t)p;
    uint64_t seen = atomic_load(&pool.seq) & ~(uint64_t)1;
    int wanted = 1;
    for (;;) {
        uint64_t s = wait_for_job(seen, wanted);
        if (s & 1) { /* being written: look again */
            cpu_relax();
            continue;
        }
        void (*fn)(void *, int64_t) = pool.fn;
        void *arg = pool.arg;
        int64_t n_items = pool.n_items;
        int n_threads = pool.n_threads;
        atomic_thread_fence(memory_order_acquire);
        seen = s;
        if (atomic_load(&pool.seq) != s) continue; /* torn read: a newer job */
        wanted = index < n_threads;
        if (wanted) run_items(s / 2, fn, arg, n_items);
    }
    return NULL;
}

/* After fork() only the forking thread exists: forget the workers. */
static void pool_after_fork_child(void) {
    pthread_mutex_init(&pool.lock, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pool.n_workers = 0;
    atomic_store(&pool.busy, 0);
    atomic_store(&pool.sleepers, 0);
}

static void pool_once(void) { pthread_atfork(NULL, NULL, pool_after_fork_child); }

/* Start workers up to n - 1; returns how many there are. */
static int ensure_workers(int n) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, pool_once);
    if (n - 1 > DL_POOL_MAX_WORKERS) n = DL_POOL_MAX_WORKERS + 1;
    if (pool.n_workers >= n - 1) return pool.n_workers;
    /* workers start with every signal blocked: signals go to the process's own
     * threads (Python handles them in its main thread) */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pthread_mutex_lock(&pool.lock);
    while (pool.n_workers < n - 1) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int rc = pthread_create(&t, &attr, worker_main, (void *)(intptr_t)(pool.n_workers + 1));
        pthread_attr_destroy(&attr);
        if (rc != 0) break;
        pool.n_workers++;
    }
    pthread_mutex_unlock(&pool.lock);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return pool.n_workers;
}

void dl_parallel(int n_threads, int64_t n_items, void (*fn)(void *arg, int64_t item),
                 void *arg) {
    if (n_items <= 0) return;
    if (n_threads > n_items) n_threads = (int)n_items;
    if (n_items > 0xffffffffLL) n_threads = 1; /* claims count items in 32 bits */
    int expected = 0;
    if (n_threads <= 1 || !atomic_compare_exchange_strong(&pool.busy, &expected, 1)) {
        /* one thread, or another caller is using the pool: the same items, in order */
        for (int64_t i = 0; i < n_items; i++) fn(arg, i);
        return;
    }
    int workers = ensure_workers(n_threads);
    if (workers < n_threads - 1) n_threads = workers + 1;
    uint64_t s = atomic_load(&pool.seq);
    atomic_store(&pool.seq, s + 1); /* odd: writing */
    atomic_thread_fence(memory_order_release);
    pool.fn = fn;
    pool.arg = arg;
    pool.n_items = n_items;
    pool.n_threads = n_threads;
    uint64_t gen = (s + 2) / 2;
    atomic_store(&pool.done, 0);
    atomic_store(&pool.claim, (gen & 0xffffffffu) << 32);
    atomic_store(&pool.seq, s + 2);
    if (atomic_load(&pool.sleepers) > 0) {
        pthread_mutex_lock(&pool.lock);
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.lock);
    }
    run_items(gen, fn, arg, n_items);
    /* the rest is in the workers' hands: wait for it, yielding after a while (a worker
     * may share this CPU) */
    int64_t start = 0;
    for (unsigned i = 0; atomic_load(&pool.done) < n_items; i++) {
        cpu_relax();
        if ((i & 63) != 63) continue;
        int64_t t = now_ns();
        if (start == 0) start = t;
        if (t - start > DL_POOL_SPIN_NS) sched_yield();
    }
    atomic_store(&pool.busy, 0);
}

#else /* no POSIX threads: one thread */

void dl_parallel(int n_threads, int64_t n_items, void (*fn)(void *arg, int64_t item),
                 void *arg) {
    (void)n_threads;
    for (int64_t i = 0; i < n_items; i++) fn(arg, i);
}

#endif

/* ------------------------------------------------------------------ matmul */

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

/* Rows [r0, r1), all nc columns. */
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

/* Threads worth waking for `work` multiply-adds over `units` divisible units. */
static int useful_threads(int n_threads, int64_t work, int64_t units) {
    int64_t useful = work / DL_MIN_WORK_PER_THREAD;
    if (n_threads > useful) n_threads = useful > 1 ? (int)useful : 1;
    if (n_threads > units) n_threads = units > 1 ? (int)units : 1;
    return n_threads;
}

/* Chunk size in rows for nr rows and nt threads: a multiple of DL_ROW_TILE. */
static int64_t chunk_rows(int64_t nr, int nt) {
    int64_t n_chunks = (int64_t)nt * DL_CHUNKS_PER_THREAD;
    int64_t rows = (nr + n_chunks - 1) / n_chunks;
    rows = (rows + DL_ROW_TILE - 1) / DL_ROW_TILE * DL_ROW_TILE;
    return rows > 0 ? rows : DL_ROW_TILE;
}

typedef struct {
    dl_gemm_fn gemm;
    int64_t k, ldw, nr, ldx, nc, ldy, rows;
    const uint8_t *w, *x;
    float *y;
} matmul_job;

static void matmul_chunk(void *p, int64_t i) {
    const matmul_job *j = (const matmul_job *)p;
    int64_t r0 = i * j->rows, r1 = r0 + j->rows < j->nr ? r0 + j->rows : j->nr;
    gemm_rows(j->gemm, j->k, j->w, j->ldw, r0, r1, j->x, j->ldx, j->nc, j->y, j->ldy);
}

int dl_matmul(const dl_isa *isa, int type, int64_t k,
              const void *w, int64_t ldw, int64_t nr,
              const void *x, int64_t ldx, int64_t nc,
              float *y, int64_t ldy, int n_threads) {
    dl_gemm_fn gemm = gemm_for_type(isa, type);
    if (gemm == NULL) return -1;
    if (nr <= 0 || nc <= 0) return 0;
    n_threads = useful_threads(n_threads, nr * nc * (k > 0 ? k : 1),
                               (nr + DL_ROW_TILE - 1) / DL_ROW_TILE);
    matmul_job job = {gemm, k, ldw, nr, ldx, nc, ldy, nr, (const uint8_t *)w,
                      (const uint8_t *)x, y};
    if (n_threads <= 1) {
        matmul_chunk(&job, 0);
        return 0;
    }
    job.rows = chunk_rows(nr, n_threads);
    dl_parallel(n_threads, (nr + job.rows - 1) / job.rows, matmul_chunk, &job);
    return 0;
}

/* ------------------------------------------------------------------ matmul_multi */


typedef struct {
    matmul_job jobs[DL_MULTI_MAX];
    int64_t first[DL_MULTI_MAX + 1]; /* matrix m's chunks are [first[m], first[m + 1]) */
    int n_mats;
} multi_job;

static void multi_chunk(void *p, int64_t i) {
    const multi_job *mj = (const multi_job *)p;
    int m = 0;
    while (i >= mj->first[m + 1]) m++;
    matmul_chunk((void *)&mj->jobs[m], i - mj->first[m]);
}

/* Several matmuls in one parallel call (matrices that share an input: Q, K, V; gate,
 * up): their rows are chunked alike and claimed from one list, so small matrices cost
 * no wake-up of their own. Each result has the bits dl_matmul gives it. Returns 0, -1
 * for a type no path knows, -2 for more than DL_MULTI_MAX matrices. */
int dl_matmul_multi(const dl_isa *isa, int n_mats, const dl_matmul_arg *mats, int n_threads) {
    if (n_mats > DL_MULTI_MAX) return -2;
    multi_job mj;
    int64_t work = 0, rows = 0;
    mj.n_mats = n_mats;
    for (int m = 0; m < n_mats; m++) {
        const dl_matmul_arg *a = &mats[m];
        dl_gemm_fn gemm = gemm_for_type(isa, a->type);
        if (gemm == NULL) return -1;
        int64_t nr = a->nc > 0 ? a->nr : 0; /* no columns: nothing to do */
        matmul_job job = {gemm, a->k, a->ldw, nr, a->ldx, a->nc, a->ldy, nr,
                          (const uint8_t *)a->w, (const uint8_t *)a->x, a->y};
        mj.jobs[m] = job;
        work += (nr > 0 ? nr : 0) * a->nc * (a->k > 0 ? a->k : 1);
        rows += nr > 0 ? nr : 0;
    }
    n_threads = useful_threads(n_threads, work, (rows + DL_ROW_TILE - 1) / DL_ROW_TILE);
    mj.first[0] = 0;
    for (int m = 0; m < n_mats; m++) {
        matmul_job *j = &mj.jobs[m];
        /* chunks of about the same rows in every matrix */
        j->rows = n_threads > 1 ? chunk_rows(rows, n_threads) : (j->nr > 0 ? j->nr : 1);
        mj.first[m + 1] = mj.first[m] + (j->nr > 0 ? (j->nr + j->rows - 1) / j->rows : 0);
    }
    dl_parallel(n_threads, mj.first[n_mats], multi_chunk, &mj);
    return 0;
}

/* ------------------------------------------------------------------ quantize */

typedef struct {
    dl_quantize_fn quantize;
    const float *x;
    uint8_t *y;
    int64_t ldx, ldy, n, k, rows;
} quantize_job;

static void quantize_chunk(void *p, int64_t c) {
    const quantize_job *j = (const quantize_job *)p;
    int64_t i0 = c * j->rows, i1 = i0 + j->rows < j->n ? i0 + j->rows : j->n;
    for (int64_t i = i0; i < i1; i++) j->quantize(j->x + i * j->ldx, j->y + i * j->ldy, j->k);
}

void dl_quantize_rows_q8_0(const dl_isa *isa, const float *x, int64_t ldx,
                           void *y, int64_t ldy, int64_t n, int64_t k, int n_threads) {
    if (n <= 0 || k <= 0) return;
    dl_quantize_fn quantize = isa->quantize_q8_0;
    if (quantize == NULL) quantize = dl_isa_scalar.quantize_q8_0;
    quantize_job job = {quantize, x, (uint8_t *)y, ldx, ldy, n, k, n};
    n_threads = useful_threads(n_threads, n * k, n);
    if (n_threads <= 1) {
        quantize_chunk(&job, 0);
        return;
    }
    job.rows = (n + n_threads - 1) / n_threads;
    dl_parallel(n_threads, (n + job.rows - 1) / job.rows, quantize_chunk, &job);
}
