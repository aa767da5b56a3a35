/* The whitened low-rank residual: A, B minimising ||X (E - A B)||_F with
 * C = X^T X = R R^T (SVD-LLM's step; see compress.h). */
#include <math.h>
#include <string.h>

#include "compress/linalg.h"

MASA_API void masa_residual_result_default(masa_residual_result *result,
                                           size_t size)
{
    masa_residual_result full = {.size = sizeof full};
    masa__struct_defaults(result, size, &full, sizeof full);
}

/* Jitter multiples of mean(diag C) tried in turn after a failed Cholesky. */
static const double jitter_steps[] = {0.0, 1e-10, 1e-8, 1e-6, 1e-4, 1e-2};

/* R (n x n, lower) with R R^T = C + jitter I; false when even the largest
 * jitter fails. */
static bool whiten(size_t n, const double *c, double *r, double *jitter)
{
    double trace = 0.0;
    for (size_t i = 0; i < n; i++)
        trace += c[i * n + i];
    double mean_diag = trace / (double)n;
    for (size_t t = 0; t < sizeof jitter_steps / sizeof *jitter_steps; t++) {
        double add = jitter_steps[t] * mean_diag;
        if (t > 0 && !(add > 0.0))
            break; /* a zero or negative diagonal: no jitter scale */
        for (size_t i = 0; i < n; i++) {
            memcpy(r + i * n, c + i * n, (i + 1) * sizeof(double));
            r[i * n + i] += add;
        }
        if (masa__cholesky_lower(n, r, n)) {
            *jitter = add;
            return true;
        }
    }
    return false;
}

static double sum_squares(const double *x, size_t n)
{
    double s = 0.0;
    for (size_t i = 0; i < n; i++)
        s += x[i] * x[i];
    return s;
}

static masa_status check_args(const char *fn, masa_context *ctx, size_t d_in,
                              size_t d_out, const float *w,
                              const float *w_hat, const double *calib,
                              size_t rank, const float *a, size_t a_len,
                              const float *b, size_t b_len,
                              const masa_residual_result *result)
{
    if (!ctx || !w || !a || !b)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT,
                          "%s: ctx, w, a and b must not be NULL", fn);
    if (d_in == 0 || d_out == 0 || rank == 0)
        return masa__fail(MASA_ERROR_BAD_SHAPE,
                          "%s: d_in, d_out and rank must be nonzero (got %zu, "
                          "%zu, %zu)", fn, d_in, d_out, rank);
    size_t k = d_in < d_out ? d_in : d_out;
    if (rank > k)
        return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                          "%s: rank (%zu) exceeds min(d_in, d_out) = %zu", fn,
                          rank, k);
    size_t elems, square;
    if (!masa__mul3(d_in, d_out, sizeof(double), &elems) ||
        !masa__mul3(d_in, d_in, sizeof(double), &square))
        return masa__fail(MASA_ERROR_OVERFLOW,
                          "%s: a %zu x %zu matrix overflows size_t", fn, d_in,
                          d_out);
    if (a_len < d_in * rank || b_len < rank * d_out)
        return masa__fail(MASA_ERROR_BUFFER_TOO_SMALL,
                          "%s: a holds %zu floats (%zu needed), b %zu (%zu "
                          "needed)", fn, a_len, d_in * rank, b_len,
                          rank * d_out);
    if (result) {
        masa_status st = masa__check_result_size(
            fn, result->size, sizeof(masa_residual_result));
        if (st != MASA_OK)
            return st;
    }
    if (!masa__all_finite_f(w, d_in * d_out) ||
        (w_hat && !masa__all_finite_f(w_hat, d_in * d_out)))
        return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                          "%s: w or w_hat has a non-finite element", fn);
    if (calib && !masa__all_finite_d(calib, d_in * d_in))
        return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                          "%s: calib has a non-finite entry", fn);
    return MASA_OK;
}

MASA_API masa_status masa_residual_lowrank(masa_context *ctx, size_t d_in,
                                           size_t d_out, const float *w,
                                           const float *w_hat,
                                           const double *calib, size_t rank,
                                           float *a, size_t a_len, float *b,
                                           size_t b_len,
                                           masa_residual_result *result)
{
    static const char fn[] = "masa_residual_lowrank";
    masa_status st = check_args(fn, ctx, d_in, d_out, w, w_hat, calib, rank,
                                a, a_len, b, b_len, result);
    if (st != MASA_OK)
        return st;
    size_t k = d_in < d_out ? d_in : d_out;
    size_t ne = d_in * d_out;
    /* e: E; m: R^T E, then the residual after; r: R; u: U (d_in x k);
     * vt: V^T (k x d_out); s: singular values; af, bf: the float factors */
    size_t count = 2 * ne + (calib ? d_in * d_in : 0);
    size_t extra[] = {d_in * k, k * d_out, k};
    for (size_t i = 0; i < 3; i++)
        if (!masa__add(&count, extra[i]))
            return masa__fail(MASA_ERROR_OVERFLOW, "%s: scratch overflows",
                              fn);
    double *mem = masa__calloc(ctx, count, sizeof(double));
    float *af = masa__calloc(ctx, d_in * rank + rank * d_out, sizeof(float));
    if (!mem || !af) {
        masa__free(ctx, mem);
        masa__free(ctx, af);
        return masa__fail(MASA_ERROR_OUT_OF_MEMORY,
                          "%s: cannot allocate %zu doubles of scratch", fn,
                          count);
    }
    float *bf = af + d_in * rank;
    double *e = mem, *m = e + ne, *u = m + ne, *vt = u + d_in * k;
    double *s = vt + k * d_out, *r = calib ? s + k : NULL;
    masa__blis_init();

    for (size_t i = 0; i < ne; i++)
        e[i] = (double)w[i] - (w_hat ? (double)w_hat[i] : 0.0);
    double jitter = 0.0;
    if (calib && !whiten(d_in, calib, r, &jitter)) {
        st = masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                        "%s: calib is not positive definite, even with "
                        "%g x mean(diag) added to its diagonal", fn,
                        jitter_steps[sizeof jitter_steps /
                                     sizeof *jitter_steps - 1]);
        goto done;
    }
    memcpy(m, e, ne * sizeof(double));
    if (calib)
        masa__dtrmm_lower_trans(ctx, d_in, d_out, r, d_in, m, d_out);
    double before = sum_squares(m, ne);
    st = masa__gesdd(fn, ctx, d_in, d_out, m, s, u, vt);
    if (st != MASA_OK)
        goto done;
    double dropped = 0.0;
    for (size_t i = rank; i < k; i++)
        dropped += s[i] * s[i];

    /* A = R^-T U_r Sigma_r^(1/2) (in u's first r columns, stride k),
     * B = Sigma_r^(1/2) V_r^T (vt's first r rows) */
    for (size_t i = 0; i < d_in; i++)
        for (size_t j = 0; j < rank; j++)
            u[i * k + j] *= sqrt(s[j]);
    if (calib)
        masa__dtrsm_lower_trans(ctx, d_in, rank, r, d_in, u, k);
    for (size_t j = 0; j < rank; j++)
        for (size_t c = 0; c < d_out; c++)
            vt[j * d_out + c] *= sqrt(s[j]);
    for (size_t i = 0; i < d_in; i++)
        for (size_t j = 0; j < rank; j++)
            af[i * rank + j] = (float)u[i * k + j];
    for (size_t i = 0; i < rank * d_out; i++)
        bf[i] = (float)vt[i];
    if (!masa__all_finite_f(af, d_in * rank + rank * d_out)) {
        st = masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                        "%s: the factors overflow float32 (calib nearly "
                        "singular?)", fn);
        goto done;
    }

    /* the error after, from the float factors actually returned:
     * ||R^T (E - A B)||^2 */
    for (size_t i = 0; i < d_in; i++)
        for (size_t j = 0; j < rank; j++)
            u[i * k + j] = (double)af[i * rank + j];
    for (size_t i = 0; i < rank * d_out; i++)
        vt[i] = (double)bf[i];
    memcpy(m, e, ne * sizeof(double));
    masa__dgemm(ctx, d_in, d_out, rank, -1.0, u, k, 1, vt, d_out, 1, 1.0, m,
                d_out, 1);
    if (calib)
        masa__dtrmm_lower_trans(ctx, d_in, d_out, r, d_in, m, d_out);
    double after = sum_squares(m, ne);

    memcpy(a, af, d_in * rank * sizeof(float));
    memcpy(b, bf, rank * d_out * sizeof(float));
    if (result) {
        masa_residual_result full = {sizeof full, before, after, dropped,
                                     jitter};
        masa__write_result(result, &full, sizeof full);
    }
done:
    masa__free(ctx, mem);
    masa__free(ctx, af);
    return st;
}
