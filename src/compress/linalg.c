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

static void rntm_for(rntm_t *rntm, size_t n_threads, double flops)
{
    /* BLIS 0.9.0 starts its threads on every call: not worth it for small
     * products (see masa__gemm). */
    if (flops < 8.0e6)
        n_threads = 1;
    bli_rntm_set_num_threads((dim_t)(n_threads ? n_threads : 1), rntm);
    /* the small-matrix kernels read past the end of small operands (see
     * masa__gemm); the conventional path reads only what it is given */
    bli_rntm_disable_l3_sup(rntm);
}

void masa__dgemm(size_t m, size_t n, size_t k, double alpha, const double *a,
                 size_t rsa, size_t csa, const double *b, size_t rsb,
                 size_t csb, double beta, double *c, size_t rsc, size_t csc,
                 size_t n_threads)
{
    rntm_t rntm = BLIS_RNTM_INITIALIZER;
    rntm_for(&rntm, n_threads, (double)m * (double)n * (double)k);
    bli_dgemm_ex(BLIS_NO_TRANSPOSE, BLIS_NO_TRANSPOSE, (dim_t)m, (dim_t)n,
                 (dim_t)k, &alpha, (double *)a, (inc_t)rsa, (inc_t)csa,
                 (double *)b, (inc_t)rsb, (inc_t)csb, &beta, c, (inc_t)rsc,
                 (inc_t)csc, NULL, &rntm);
}

void masa__dsyrk_lower(size_t n, size_t k, double alpha, const double *a,
                       size_t rsa, size_t csa, double beta, double *c,
                       size_t ldc, size_t n_threads)
{
    rntm_t rntm = BLIS_RNTM_INITIALIZER;
    rntm_for(&rntm, n_threads, (double)n * (double)n * (double)k / 2);
    bli_dsyrk_ex(BLIS_LOWER, BLIS_NO_TRANSPOSE, (dim_t)n, (dim_t)k, &alpha,
                 (double *)a, (inc_t)rsa, (inc_t)csa, &beta, c, (inc_t)ldc, 1, NULL,
                 &rntm);
}

void masa__dtrsm_lower_trans(size_t m, size_t n, const double *r, size_t ldr,
                             double *b, size_t ldb, size_t n_threads)
{
    rntm_t rntm = BLIS_RNTM_INITIALIZER;
    double one = 1.0;
    rntm_for(&rntm, n_threads, (double)m * (double)m * (double)n);
    bli_dtrsm_ex(BLIS_LEFT, BLIS_LOWER, BLIS_TRANSPOSE, BLIS_NONUNIT_DIAG,
                 (dim_t)m, (dim_t)n, &one, (double *)r, (inc_t)ldr, 1, b,
                 (inc_t)ldb, 1, NULL, &rntm);
}

void masa__dtrmm_lower_trans(size_t m, size_t n, const double *r, size_t ldr,
                             double *b, size_t ldb, size_t n_threads)
{
    rntm_t rntm = BLIS_RNTM_INITIALIZER;
    double one = 1.0;
    rntm_for(&rntm, n_threads, (double)m * (double)m * (double)n);
    bli_dtrmm_ex(BLIS_LEFT, BLIS_LOWER, BLIS_TRANSPOSE, BLIS_NONUNIT_DIAG,
                 (dim_t)m, (dim_t)n, &one, (double *)r, (inc_t)ldr, 1, b,
                 (inc_t)ldb, 1, NULL, &rntm);
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
