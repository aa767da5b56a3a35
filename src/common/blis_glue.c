/* Everything that talks to BLIS: one-time initialisation with the choice of
 * kernels, and thin wrappers over BLIS's typed expert API so each call
 * carries its own thread count (rntm_t) and no global BLIS state is changed.
 * Callers validate all arguments first: BLIS aborts on bad ones. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <blis.h>

#include "common/internal.h"

int masa__blis_arch_choice(const char *user_arch_type, const char *masa_opt,
                           bool cpu_has_avx512)
{
    if (user_arch_type != NULL)
        return -1; /* the user chose; never override */
    if (masa_opt != NULL && (strcmp(masa_opt, "off") == 0 ||
                             strcmp(masa_opt, "0") == 0 ||
                             strcmp(masa_opt, "no") == 0))
        return -1;
#if defined(BLIS_FAMILY_X86_64) && defined(BLIS_CONFIG_SKX)
    /* BLIS 0.9.0 classifies CPUs by vendor and family, so AVX-512 CPUs it
     * does not know (e.g. AMD family 0x1A) get the generic kernels, 5x
     * slower than skx. On CPUs it does know, skx is its own choice or a
     * better one than its AVX2 kernels. */
    if (cpu_has_avx512)
        return (int)BLIS_ARCH_SKX;
#else
    (void)cpu_has_avx512;
#endif
    return -1;
}

static bool cpu_has_avx512(void)
{
#if defined(__x86_64__) && defined(__GNUC__)
    /* GCC's checks include the OS saving the AVX-512 state (XCR0). */
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") &&
           __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl");
#else
    return false;
#endif
}

static void blis_init_once(void)
{
    int arch = masa__blis_arch_choice(getenv("BLIS_ARCH_TYPE"),
                                      getenv("MASA_BLIS_ARCH"),
                                      cpu_has_avx512());
    if (arch < 0) {
        bli_init();
        return;
    }
    /* BLIS reads BLIS_ARCH_TYPE (a number) once, while it initialises; put it
     * there for that moment only and leave the environment as it was. If a
     * host already initialised BLIS, this has no effect and masa_blis_arch()
     * reports the kernels BLIS chose. */
    char value[16];
    snprintf(value, sizeof value, "%d", arch);
    setenv("BLIS_ARCH_TYPE", value, 0);
    bli_init();
    unsetenv("BLIS_ARCH_TYPE");
}

void masa__blis_init(void)
{
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, blis_init_once);
}

MASA_API const char *masa_blis_arch(void)
{
    masa__call_enter();
    masa__blis_init();
    const char *name = bli_arch_string(bli_arch_query_id());
    masa__call_exit();
    return name ? name : "unknown";
}

static void rntm_threads(rntm_t *rntm, size_t n_threads)
{
    bli_rntm_set_num_threads((dim_t)(n_threads ? n_threads : 1), rntm);
}

void masa__gemm(size_t m, size_t n, size_t k, float alpha,
                const float *a, size_t rsa, size_t csa,
                const float *b, size_t rsb, size_t csb, float beta,
                float *c, size_t rsc, size_t csc, size_t n_threads)
{
    rntm_t rntm = BLIS_RNTM_INITIALIZER;
    /* BLIS 0.9.0 (pthreads) starts its threads on every call: below about
     * 16 MFLOP that costs more than it saves (measured: 64x512x64 took up to
     * 17 ms with 2 threads against 37 us with one). */
    if ((double)m * (double)n * (double)k < 8.0e6)
        n_threads = 1;
    rntm_threads(&rntm, n_threads);
    /* BLIS 0.9.0's small-matrix ("sup") kernels read up to a row past A and
     * a vector past a small C (found by tests/hardening/test_guard_pages.c):
     * a crash when the caller's buffer ends at a page boundary. The
     * conventional path reads only what it is given. */
    bli_rntm_disable_l3_sup(&rntm);
    bli_sgemm_ex(BLIS_NO_TRANSPOSE, BLIS_NO_TRANSPOSE, (dim_t)m, (dim_t)n,
                 (dim_t)k, &alpha, (float *)a, (inc_t)rsa, (inc_t)csa,
                 (float *)b, (inc_t)rsb, (inc_t)csb, &beta, c, (inc_t)rsc,
                 (inc_t)csc, NULL, &rntm);
}

void masa__gemv(size_t m, size_t n, float alpha, const float *a, size_t rsa,
                size_t csa, const float *x, float beta, float *y,
                size_t n_threads)
{
    rntm_t rntm = BLIS_RNTM_INITIALIZER;
    rntm_threads(&rntm, n_threads);
    bli_sgemv_ex(BLIS_NO_TRANSPOSE, BLIS_NO_CONJUGATE, (dim_t)m, (dim_t)n,
                 &alpha, (float *)a, (inc_t)rsa, (inc_t)csa, (float *)x, 1,
                 &beta, y, 1, NULL, &rntm);
}

/* A GEMM split into blocks of C's rows or columns, one single-threaded BLIS
 * call per pool task. */
typedef struct gemm_job {
    size_t m, n, k;
    float alpha, beta;
    const float *a, *b;
    float *c;
    size_t rsa, csa, rsb, csb, rsc, csc;
    size_t blocks, unit;
    bool by_rows;
} gemm_job;

static void gemm_task(void *arg, size_t task, size_t thread)
{
    (void)thread;
    const gemm_job *j = arg;
    size_t dim = j->by_rows ? j->m : j->n;
    size_t units = (dim + j->unit - 1) / j->unit;
    size_t i0 = units * task / j->blocks * j->unit;
    size_t i1 = units * (task + 1) / j->blocks * j->unit;
    if (i1 > dim)
        i1 = dim;
    if (i0 >= i1)
        return;
    if (j->by_rows)
        masa__gemm(i1 - i0, j->n, j->k, j->alpha, j->a + i0 * j->rsa, j->rsa,
                   j->csa, j->b, j->rsb, j->csb, j->beta, j->c + i0 * j->rsc,
                   j->rsc, j->csc, 1);
    else
        masa__gemm(j->m, i1 - i0, j->k, j->alpha, j->a, j->rsa, j->csa,
                   j->b + i0 * j->csb, j->rsb, j->csb, j->beta,
                   j->c + i0 * j->csc, j->rsc, j->csc, 1);
}

void masa__gemm_pool(masa_pool *pool, size_t n_threads, size_t m, size_t n,
                     size_t k, float alpha, const float *a, size_t rsa,
                     size_t csa, const float *b, size_t rsb, size_t csb,
                     float beta, float *c, size_t rsc, size_t csc)
{
    gemm_job j = {m, n, k, alpha, beta, a, b, c, rsa, csa, rsb, csb, rsc,
                  csc, .blocks = n_threads};
    /* each block packs its own copy of the operand it shares with the
     * others: split the dimension that makes the shared one the smaller
     * (rows share B, k x n; columns share A, m x k) */
    j.by_rows = n <= m;
    size_t dim = j.by_rows ? m : n;
    if (!pool || n_threads <= 1 || dim < 32 ||
        (double)m * (double)n * (double)k < 8.0e6) {
        masa__gemm(m, n, k, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc,
                   csc, 1);
        return;
    }
    /* Block edges on multiples of the micro-kernel's MR and NR (BLIS may
     * map C's rows to either, as it runs C or C^T to give the kernel the
     * storage it prefers), so no block adds a partial micro-tile; 16 where
     * that leaves fewer units than blocks. */
    masa__blis_init();
    cntx_t *cntx = bli_gks_query_cntx();
    size_t mr = (size_t)bli_cntx_get_blksz_def_dt(BLIS_FLOAT, BLIS_MR, cntx);
    size_t nr = (size_t)bli_cntx_get_blksz_def_dt(BLIS_FLOAT, BLIS_NR, cntx);
    size_t gcd = mr, rem = nr;
    while (rem) {
        size_t t = gcd % rem;
        gcd = rem;
        rem = t;
    }
    j.unit = mr / gcd * nr;
    if (dim / j.unit < j.blocks)
        j.unit = 16;
    if (j.blocks > dim / j.unit)
        j.blocks = dim / j.unit;
    masa__pool_run(pool, j.blocks, gemm_task, &j);
}
