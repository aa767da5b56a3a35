/* ReplaceMe least squares: the ridge solve by Cholesky (LAPACK). */
#include <limits.h>
#include <string.h>

#include <lapacke.h>

#include "compress/replaceme_internal.h"

MASA_API masa_status masa_linear_estimator_solve(
    const masa_linear_estimator *est, double alpha, float *t)
{
    static const char fn[] = "masa_linear_estimator_solve";
    masa__clear_error();
    if (!est || !t)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT, "%s: %s is NULL", fn,
                          !est ? "est" : "t");
    if (!(alpha >= 0.0) || !isfinite(alpha))
        return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                          "%s: alpha (%g) must be finite and >= 0", fn, alpha);
    if (est->rows == 0)
        return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                          "%s: no rows accumulated", fn);
    size_t n = est->d_in, m = est->d_out;
    /* LAPACK's sizes are int */
    if (n > INT_MAX || m > INT_MAX || n * m > (size_t)INT_MAX)
        return masa__fail(MASA_ERROR_OVERFLOW,
                          "%s: %zu x %zu is too large for LAPACK", fn, n, m);
    masa_context *ctx = est->ctx;
    double *a = masa__alloc(ctx, n * n * sizeof(double));
    double *b = a ? masa__alloc(ctx, n * m * sizeof(double)) : NULL;
    if (!b) {
        masa__free(ctx, a);
        return masa__fail(MASA_ERROR_OUT_OF_MEMORY,
                          "%s: cannot allocate the %zu x %zu system", fn, n,
                          m);
    }
    /* A = X^T X + alpha I (symmetric: its row-major lower triangle is the
     * column-major upper one); B in column-major n x m, as dpotrs wants.
     * The _work routines allocate nothing behind the context's back. */
    for (size_t i = 0; i < n; i++) {
        const double *row = est->stats + i * est->width;
        memcpy(a + i * n, row, n * sizeof(double));
        a[i * n + i] += alpha;
        for (size_t j = 0; j < m; j++)
            b[j * n + i] = row[n + j];
    }

    masa_status st = MASA_OK;
    /* arguments are valid by construction, so LAPACKE never reaches its
     * printing error handler; info > 0 names a non-positive minor */
    lapack_int info = LAPACKE_dpotrf_work(LAPACK_COL_MAJOR, 'U',
                                          (lapack_int)n, a, (lapack_int)n);
    if (info > 0) {
        st = masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                        "%s: X^T X + alpha I (alpha %g) is not positive "
                        "definite (leading minor %d of %zu): X has rank < "
                        "d_in over the %llu rows; use alpha > 0", fn, alpha,
                        (int)info, n, (unsigned long long)est->rows);
        goto done;
    }
    if (info == 0)
        info = LAPACKE_dpotrs_work(LAPACK_COL_MAJOR, 'U', (lapack_int)n,
                                   (lapack_int)m, a, (lapack_int)n, b,
                                   (lapack_int)n);
    if (info != 0) {
        st = masa__fail(MASA_ERROR_INTERNAL, "%s: LAPACK returned %d", fn,
                        (int)info);
        goto done;
    }
    for (size_t i = 0; i < n * m; i++) {
        if (!isfinite(b[i]) || b[i] > 3.4e38 || b[i] < -3.4e38) {
            st = masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                            "%s: the solution does not fit float32 (the "
                            "system is nearly singular; use a larger alpha)",
                            fn);
            goto done;
        }
    }
    for (size_t i = 0; i < n; i++)
        for (size_t j = 0; j < m; j++)
            t[i * m + j] = (float)b[j * n + i];
done:
    masa__free(ctx, b);
    masa__free(ctx, a);
    return st;
}
