/* Float64 BLIS and LAPACK calls of the compression code (see linalg.h). */
#include <limits.h>
#include <math.h>
#include <string.h>

/* BLIS's BLAS prototypes clash with LAPACK's (lsame_); only BLIS's own
 * API is used here. */
#define BLIS_DISABLE_BLAS_DEFS
#include <blis.h>
#include <lapacke.h>

#include "compress/linalg.h"

/* Below this many multiply-adds a product runs on the calling thread. */
#define POOL_MIN_FLOPS 8.0e6

static void rntm_single(rntm_t *rntm)
{
    bli_rntm_set_num_threads(1, rntm);
    /* the small-matrix kernels read past the end of small operands (see
     * masa__gemm); the conventional path reads only what it is given */
    bli_rntm_disable_l3_sup(rntm);
}

/* One single-threaded product on a block [i0, i1) of columns (or rows). */
typedef void (*range_fn)(const void *args, size_t i0, size_t i1);

typedef struct range_job {
    range_fn fn;
    const void *args;
    size_t n, n_tasks;
    bool triangular; /* blocks of equal area of a lower triangle */
} range_job;

static size_t range_edge(const range_job *j, size_t t)
{
    if (t >= j->n_tasks)
        return j->n;
    double f = (double)t / (double)j->n_tasks;
    if (j->triangular)
        f = sqrt(f); /* rows [0, i) hold i^2 / 2 of the triangle */
    size_t e = ((size_t)(f * (double)j->n) + 4) & ~(size_t)7;
    return e < j->n ? e : j->n;
}

static void range_task(void *arg, size_t task, size_t thread)
{
    (void)thread;
    const range_job *j = arg;
    size_t i0 = range_edge(j, task), i1 = range_edge(j, task + 1);
    if (i0 < i1)
        j->fn(j->args, i0, i1);
}

/* fn over [0, n) in blocks on ctx's pool, or at once on this thread. */
static void run_ranges(const masa_context *ctx, size_t n, double flops,
                       bool triangular, range_fn fn, const void *args)
{
    size_t threads = ctx && ctx->pool ? ctx->n_threads : 1;
    if (threads <= 1 || flops < POOL_MIN_FLOPS || n < 16) {
        fn(args, 0, n);
        return;
    }
    size_t tasks = threads < n / 8 ? threads : n / 8;
    range_job j = {fn, args, n, tasks, triangular};
    masa__pool_run(ctx->pool, tasks, range_task, &j);
}

typedef struct dgemm_args {
    size_t m, k;
    double alpha, beta;
    const double *a, *b;
    double *c;
    size_t rsa, csa, rsb, csb, rsc, csc;
} dgemm_args;

static void dgemm_cols(const void *args, size_t c0, size_t c1)
{
    const dgemm_args *g = args;
    rntm_t rntm = BLIS_RNTM_INITIALIZER;
    rntm_single(&rntm);
    double alpha = g->alpha, beta = g->beta;
    bli_dgemm_ex(BLIS_NO_TRANSPOSE, BLIS_NO_TRANSPOSE, (dim_t)g->m,
                 (dim_t)(c1 - c0), (dim_t)g->k, &alpha, (double *)g->a,
                 (inc_t)g->rsa, (inc_t)g->csa, (double *)g->b + c0 * g->csb,
                 (inc_t)g->rsb, (inc_t)g->csb, &beta, g->c + c0 * g->csc,
                 (inc_t)g->rsc, (inc_t)g->csc, NULL, &rntm);
}

void masa__dgemm(const masa_context *ctx, size_t m, size_t n, size_t k,
                 double alpha, const double *a, size_t rsa, size_t csa,
                 const double *b, size_t rsb, size_t csb, double beta,
                 double *c, size_t rsc, size_t csc)
{
    dgemm_args g = {m, k, alpha, beta, a, b, c, rsa, csa, rsb, csb, rsc, csc};
    run_ranges(ctx, n, (double)m * (double)n * (double)k, false, dgemm_cols,
               &g);
}

typedef struct syrk_args {
    size_t k;
    const double *a;
    size_t rsa, csa;
    double *c;
    size_t ldc;
} syrk_args;

/* Rows [i0, i1) of the lower triangle: the rectangle left of the diagonal
 * block by dgemm, the diagonal block by dsyrk. */
static void syrk_rows(const void *args, size_t i0, size_t i1)
{
    const syrk_args *s = args;
    rntm_t rntm = BLIS_RNTM_INITIALIZER;
    rntm_single(&rntm);
    double one = 1.0;
    const double *a_rows = s->a + i0 * s->rsa;
    double *c_rows = s->c + i0 * s->ldc;
    if (i0 > 0)
        bli_dgemm_ex(BLIS_NO_TRANSPOSE, BLIS_NO_TRANSPOSE, (dim_t)(i1 - i0),
                     (dim_t)i0, (dim_t)s->k, &one, (double *)a_rows,
                     (inc_t)s->rsa, (inc_t)s->csa, (double *)s->a,
                     (inc_t)s->csa, (inc_t)s->rsa, &one, c_rows,
                     (inc_t)s->ldc, 1, NULL, &rntm);
    bli_dsyrk_ex(BLIS_LOWER, BLIS_NO_TRANSPOSE, (dim_t)(i1 - i0), (dim_t)s->k,
                 &one, (double *)a_rows, (inc_t)s->rsa, (inc_t)s->csa, &one,
                 c_rows + i0, (inc_t)s->ldc, 1, NULL, &rntm);
}

void masa__dsyrk_lower(const masa_context *ctx, size_t n, size_t k,
                       const double *a, size_t rsa, size_t csa, double *c,
                       size_t ldc)
{
    syrk_args s = {k, a, rsa, csa, c, ldc};
    run_ranges(ctx, n, (double)n * (double)n * (double)k / 2, true,
               syrk_rows, &s);
}

typedef struct tri_args {
    size_t m;
    const double *r;
    size_t ldr;
    double *b;
    size_t ldb;
    bool solve;
} tri_args;

static void tri_cols(const void *args, size_t c0, size_t c1)
{
    const tri_args *t = args;
    rntm_t rntm = BLIS_RNTM_INITIALIZER;
    rntm_single(&rntm);
    double one = 1.0;
    if (t->solve)
        bli_dtrsm_ex(BLIS_LEFT, BLIS_LOWER, BLIS_TRANSPOSE, BLIS_NONUNIT_DIAG,
                     (dim_t)t->m, (dim_t)(c1 - c0), &one, (double *)t->r,
                     (inc_t)t->ldr, 1, t->b + c0, (inc_t)t->ldb, 1, NULL,
                     &rntm);
    else
        bli_dtrmm_ex(BLIS_LEFT, BLIS_LOWER, BLIS_TRANSPOSE, BLIS_NONUNIT_DIAG,
                     (dim_t)t->m, (dim_t)(c1 - c0), &one, (double *)t->r,
                     (inc_t)t->ldr, 1, t->b + c0, (inc_t)t->ldb, 1, NULL,
                     &rntm);
}

void masa__dtrsm_lower_trans(const masa_context *ctx, size_t m, size_t n,
                             const double *r, size_t ldr, double *b,
                             size_t ldb)
{
    tri_args t = {m, r, ldr, b, ldb, true};
    run_ranges(ctx, n, (double)m * (double)m * (double)n / 2, false,
               tri_cols, &t);
}

void masa__dtrmm_lower_trans(const masa_context *ctx, size_t m, size_t n,
                             const double *r, size_t ldr, double *b,
                             size_t ldb)
{
    tri_args t = {m, r, ldr, b, ldb, false};
    run_ranges(ctx, n, (double)m * (double)m * (double)n / 2, false,
               tri_cols, &t);
}

static bool fits_lapack_int(size_t n)
{
    return n <= (size_t)INT_MAX;
}

masa_status masa__syevd(const char *fn, const masa_context *ctx, bool vectors,
                        size_t n, double *a, size_t lda, double *w)
{
    if (!fits_lapack_int(n) || !fits_lapack_int(lda))
        return masa__fail(MASA_ERROR_OVERFLOW,
                          "%s: %zu x %zu exceeds LAPACK's int sizes", fn, n,
                          n);
    char jobz = vectors ? 'V' : 'N';
    /* Row-major lower triangle = column-major upper triangle. */
    double work_query;
    lapack_int iwork_query;
    lapack_int info = LAPACKE_dsyevd_work(LAPACK_COL_MAJOR, jobz, 'U',
                                          (lapack_int)n, a, (lapack_int)lda,
                                          w, &work_query, -1, &iwork_query,
                                          -1);
    if (info != 0)
        return masa__fail(MASA_ERROR_INTERNAL,
                          "%s: LAPACK dsyevd workspace query failed (%d)", fn,
                          (int)info);
    size_t lwork = (size_t)work_query, liwork = (size_t)iwork_query;
    size_t n2;
    if (!masa__mul(n, n, &n2))
        return masa__fail(MASA_ERROR_OVERFLOW, "%s: %zu^2 overflows", fn, n);
    double *work = masa__calloc(ctx, lwork + (vectors ? n2 : 0),
                                sizeof(double));
    lapack_int *iwork = masa__calloc(ctx, liwork, sizeof(lapack_int));
    if (!work || !iwork) {
        masa__free(ctx, work);
        masa__free(ctx, iwork);
        return masa__fail(MASA_ERROR_OUT_OF_MEMORY,
                          "%s: cannot allocate the eigensolver's workspace",
                          fn);
    }
    info = LAPACKE_dsyevd_work(LAPACK_COL_MAJOR, jobz, 'U', (lapack_int)n, a,
                               (lapack_int)lda, w, work, (lapack_int)lwork,
                               iwork, (lapack_int)liwork);
    if (info != 0) {
        masa__free(ctx, work);
        masa__free(ctx, iwork);
        return masa__fail(MASA_ERROR_INTERNAL,
                          "%s: LAPACK dsyevd failed (info %d)", fn,
                          (int)info);
    }
    /* LAPACK: ascending, eigenvector j in column-major column j, i.e.
     * row-major row j. Wanted: descending, in row-major columns. */
    for (size_t i = 0; i < n / 2; i++) {
        double t = w[i];
        w[i] = w[n - 1 - i];
        w[n - 1 - i] = t;
    }
    if (vectors) {
        double *v = work + lwork;
        for (size_t s = 0; s < n; s++) {
            const double *src = a + (n - 1 - s) * lda;
            size_t big = 0;
            for (size_t l = 1; l < n; l++)
                if (fabs(src[l]) > fabs(src[big]))
                    big = l;
            double sign = src[big] < 0 ? -1.0 : 1.0;
            for (size_t l = 0; l < n; l++)
                v[l * n + s] = sign * src[l];
        }
        for (size_t l = 0; l < n; l++)
            memcpy(a + l * lda, v + l * n, n * sizeof(double));
    }
    masa__free(ctx, work);
    masa__free(ctx, iwork);
    return MASA_OK;
}

bool masa__cholesky_lower(size_t n, double *c, size_t ldc)
{
    if (!fits_lapack_int(n) || !fits_lapack_int(ldc))
        return false;
    /* Column-major upper U (C = U^T U) is row-major lower R = U^T. */
    lapack_int info = LAPACKE_dpotrf_work(LAPACK_COL_MAJOR, 'U',
                                          (lapack_int)n, c, (lapack_int)ldc);
    if (info != 0)
        return false;
    for (size_t i = 0; i < n; i++)
        for (size_t j = i + 1; j < n; j++)
            c[i * ldc + j] = 0.0;
    return true;
}

masa_status masa__gesdd(const char *fn, const masa_context *ctx, size_t m,
                        size_t n, double *a, double *s, double *u,
                        double *vt)
{
    if (!fits_lapack_int(m) || !fits_lapack_int(n))
        return masa__fail(MASA_ERROR_OVERFLOW,
                          "%s: %zu x %zu exceeds LAPACK's int sizes", fn, m,
                          n);
    size_t k = m < n ? m : n;
    /* The row-major m x n matrix is the column-major n x m matrix A^T =
     * V S U^T: LAPACK's U (n x k, column-major, ld n) read row-major is our
     * V^T (k x n), and its V^T (k x m, column-major, ld k) read row-major is
     * our U (m x k). */
    double work_query;
    lapack_int info = LAPACKE_dgesdd_work(
        LAPACK_COL_MAJOR, 'S', (lapack_int)n, (lapack_int)m, a,
        (lapack_int)n, s, vt, (lapack_int)n, u, (lapack_int)k, &work_query,
        -1, NULL);
    if (info != 0)
        return masa__fail(MASA_ERROR_INTERNAL,
                          "%s: LAPACK dgesdd workspace query failed (%d)", fn,
                          (int)info);
    size_t lwork = (size_t)work_query;
    size_t liwork;
    if (!masa__mul(8, k, &liwork))
        return masa__fail(MASA_ERROR_OVERFLOW, "%s: workspace overflows", fn);
    double *work = masa__calloc(ctx, lwork, sizeof(double));
    lapack_int *iwork = masa__calloc(ctx, liwork, sizeof(lapack_int));
    if (!work || !iwork) {
        masa__free(ctx, work);
        masa__free(ctx, iwork);
        return masa__fail(MASA_ERROR_OUT_OF_MEMORY,
                          "%s: cannot allocate the SVD's workspace", fn);
    }
    info = LAPACKE_dgesdd_work(LAPACK_COL_MAJOR, 'S', (lapack_int)n,
                               (lapack_int)m, a, (lapack_int)n, s, vt,
                               (lapack_int)n, u, (lapack_int)k, work,
                               (lapack_int)lwork, iwork);
    masa__free(ctx, work);
    masa__free(ctx, iwork);
    if (info != 0)
        return masa__fail(MASA_ERROR_INTERNAL,
                          "%s: LAPACK dgesdd failed (info %d)", fn, (int)info);
    return MASA_OK;
}

masa_status masa__check_result_size(const char *fn, size_t size,
                                    size_t min_size)
{
    if (size < min_size)
        return masa__fail(MASA_ERROR_BAD_STRUCT_SIZE,
                          "%s: result size %zu is below %zu (set it with the "
                          "_init macro)", fn, size, min_size);
    return MASA_OK;
}

void masa__write_result(void *dst, const void *full, size_t full_size)
{
    size_t size;
    memcpy(&size, dst, sizeof size);
    /* a newer program's larger struct: its unknown tail is left alone */
    memcpy(dst, full, size < full_size ? size : full_size);
    memcpy(dst, &size, sizeof size);
}

/* Non-finite floats have every exponent bit set: count them with integer
 * operations, which the compiler vectorises (a float sum would not be,
 * without reassociation). */
bool masa__all_finite_f(const float *x, size_t n)
{
    uint32_t bad = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t bits;
        memcpy(&bits, x + i, sizeof bits);
        bad |= (uint32_t)((bits & 0x7f800000u) == 0x7f800000u);
    }
    return bad == 0;
}

bool masa__all_finite_d(const double *x, size_t n)
{
    uint64_t bad = 0;
    for (size_t i = 0; i < n; i++) {
        uint64_t bits;
        memcpy(&bits, x + i, sizeof bits);
        bad |= (uint64_t)((bits & 0x7ff0000000000000u) ==
                          0x7ff0000000000000u);
    }
    return bad == 0;
}
