/*
 * ReplaceMe (masa/replaceme.h): the least-squares statistics and ridge solve,
 * the cosine estimator (loss, Adam steps, fit) and the merge, against plain
 * double-precision loops written here from the header's formulas (no BLIS,
 * no LAPACK), plus every error path.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "test_util.h"

/* ---- double reference ---- */

/* xtx += X^T X, xtz += X^T (T - O) over rows (O may be NULL). */
static void ref_stats(size_t rows, size_t din, size_t dout, const float *x,
                      const float *t, const float *o, double *xtx,
                      double *xtz)
{
    for (size_t r = 0; r < rows; r++)
        for (size_t i = 0; i < din; i++) {
            double xi = x[r * din + i];
            for (size_t j = 0; j < din; j++)
                xtx[i * din + j] += xi * x[r * din + j];
            for (size_t j = 0; j < dout; j++)
                xtz[i * dout + j] += xi * ((double)t[r * dout + j] -
                                           (o ? (double)o[r * dout + j] : 0));
        }
}

/* Solves (A + alpha I) S = B by Gaussian elimination with partial pivoting
 * (independent of the library's Cholesky); A n x n, B n x m; S into b. */
static void ref_solve(size_t n, size_t m, const double *a_in, double alpha,
                      double *b)
{
    double *a = tu_dalloc(n * n);
    memcpy(a, a_in, n * n * sizeof *a);
    for (size_t i = 0; i < n; i++)
        a[i * n + i] += alpha;
    for (size_t c = 0; c < n; c++) {
        size_t piv = c;
        for (size_t r = c + 1; r < n; r++)
            if (fabs(a[r * n + c]) > fabs(a[piv * n + c]))
                piv = r;
        for (size_t k = 0; k < n; k++) {
            double tmp = a[c * n + k];
            a[c * n + k] = a[piv * n + k];
            a[piv * n + k] = tmp;
        }
        for (size_t k = 0; k < m; k++) {
            double tmp = b[c * m + k];
            b[c * m + k] = b[piv * m + k];
            b[piv * m + k] = tmp;
        }
        for (size_t r = 0; r < n; r++) {
            if (r == c)
                continue;
            double f = a[r * n + c] / a[c * n + c];
            for (size_t k = c; k < n; k++)
                a[r * n + k] -= f * a[c * n + k];
            for (size_t k = 0; k < m; k++)
                b[r * m + k] -= f * b[c * m + k];
        }
    }
    for (size_t r = 0; r < n; r++)
        for (size_t k = 0; k < m; k++)
            b[r * m + k] /= a[r * n + r];
    free(a);
}

/* Loss 1 - mean cos(O + X T, Y) and (grad != NULL) its gradient in T. */
static double ref_cosine(size_t rows, size_t din, size_t dout,
                         const float *x, const float *y, const float *o,
                         const double *t, double *grad)
{
    double *p = tu_dalloc(dout);
    double cos_sum = 0;
    if (grad)
        memset(grad, 0, din * dout * sizeof *grad);
    for (size_t r = 0; r < rows; r++) {
        double pp = 0, yy = 0, py = 0;
        for (size_t j = 0; j < dout; j++) {
            double v = o ? o[r * dout + j] : 0.0;
            for (size_t i = 0; i < din; i++)
                v += (double)x[r * din + i] * t[i * dout + j];
            p[j] = v;
            pp += v * v;
            yy += (double)y[r * dout + j] * y[r * dout + j];
            py += v * y[r * dout + j];
        }
        if (pp == 0 || yy == 0)
            continue;
        double c = py / sqrt(pp * yy);
        cos_sum += c;
        if (!grad)
            continue;
        for (size_t j = 0; j < dout; j++) {
            double gj = -(y[r * dout + j] / sqrt(pp * yy) - c * p[j] / pp) /
                        (double)rows;
            for (size_t i = 0; i < din; i++)
                grad[i * dout + j] += x[r * din + i] * gj;
        }
    }
    free(p);
    return 1.0 - cos_sum / (double)rows;
}

/* One Adam step (the header's formulas) in double. */
static void ref_adam(size_t n, double *t, double *m, double *v,
                     const double *g, int k, double lr, double b1, double b2,
                     double eps)
{
    for (size_t i = 0; i < n; i++) {
        m[i] = b1 * m[i] + (1 - b1) * g[i];
        v[i] = b2 * v[i] + (1 - b2) * g[i] * g[i];
        t[i] -= lr / (1 - pow(b1, k)) * m[i] /
                (sqrt(v[i]) / sqrt(1 - pow(b2, k)) + eps);
    }
}

static masa_context *make_ctx(size_t threads)
{
    masa_context_options o;
    masa_context_options_init(&o);
    o.n_threads = threads;
    masa_context *ctx = NULL;
    TU_OK(masa_context_create(&o, &ctx));
    return ctx;
}

static void assert_close_dd(const char *what, const double *got,
                            const double *ref, size_t n, double rtol)
{
    double scale = 0, worst = 0;
    size_t at = 0;
    for (size_t i = 0; i < n; i++)
        if (fabs(ref[i]) > scale)
            scale = fabs(ref[i]);
    for (size_t i = 0; i < n; i++)
        if (fabs(got[i] - ref[i]) > worst) {
            worst = fabs(got[i] - ref[i]);
            at = i;
        }
    ck_assert_msg(worst <= rtol * scale, "%s: |err| %g at %zu > %g * %g",
                  what, worst, at, rtol, scale);
}

/* ---- least squares ---- */

/* Statistics over batches of many sizes (1 row, more than a block,
 * exactly a block) match the double sums, with 1 and 2 threads. */
START_TEST(test_stats_many_batches)
{
    const size_t din = 37, dout = 29;
    const size_t sizes[] = {1, 700, 3, 512, 1, 1030, 64};
    size_t total = 0;
    for (size_t b = 0; b < sizeof sizes / sizeof *sizes; b++)
        total += sizes[b];
    tu_rng rng = {11};
    float *x = tu_falloc(total * din), *t = tu_falloc(total * dout),
          *o = tu_falloc(total * dout);
    tu_fill(&rng, x, total * din, -2, 2);
    tu_fill(&rng, t, total * dout, -3, 3);
    tu_fill(&rng, o, total * dout, -1, 1);
    double *rx = tu_dalloc(din * din), *rz = tu_dalloc(din * dout);
    ref_stats(total, din, dout, x, t, o, rx, rz);
    for (size_t threads = 1; threads <= 2; threads++) {
        masa_context *ctx = make_ctx(threads);
        masa_linear_estimator *est;
        TU_OK(masa_linear_estimator_create(ctx, din, dout, &est));
        size_t r0 = 0;
        for (size_t b = 0; b < sizeof sizes / sizeof *sizes; b++) {
            TU_OK(masa_linear_estimator_accumulate(
                est, sizes[b], x + r0 * din, t + r0 * dout, o + r0 * dout));
            r0 += sizes[b];
        }
        TU_OK(masa_linear_estimator_accumulate(est, 0, NULL, NULL, NULL));
        uint64_t rows;
        TU_OK(masa_linear_estimator_rows(est, &rows));
        ck_assert_uint_eq(rows, total);
        double *gx = tu_dalloc(din * din), *gz = tu_dalloc(din * dout);
        TU_OK(masa_linear_estimator_stats(est, gx, gz));
        assert_close_dd("X^T X", gx, rx, din * din, 1e-13);
        assert_close_dd("X^T Z", gz, rz, din * dout, 1e-13);
        TU_OK(masa_linear_estimator_stats(est, NULL, NULL));
        size_t a = 0, b = 0;
        TU_OK(masa_linear_estimator_shape(est, &a, &b));
        ck_assert(a == din && b == dout);
        TU_OK(masa_linear_estimator_reset(est));
        TU_OK(masa_linear_estimator_rows(est, &rows));
        ck_assert_uint_eq(rows, 0);
        TU_OK(masa_linear_estimator_stats(est, gx, gz));
        for (size_t i = 0; i < din * din; i++)
            ck_assert(gx[i] == 0.0);
        free(gx);
        free(gz);
        masa_linear_estimator_destroy(est);
        masa_context_destroy(ctx);
    }
    free(rx);
    free(rz);
    free(x);
    free(t);
    free(o);
}
END_TEST

/* Ridge solution against elimination in double; no offset; alpha 0 and
 * alpha > 0. */
START_TEST(test_solve_ridge)
{
    const size_t din = 24, dout = 17, rows = 300;
    tu_rng rng = {5};
    float *x = tu_falloc(rows * din), *t = tu_falloc(rows * dout);
    tu_fill(&rng, x, rows * din, -1, 1);
    tu_fill(&rng, t, rows * dout, -1, 1);
    double *rx = tu_dalloc(din * din), *rz = tu_dalloc(din * dout);
    ref_stats(rows, din, dout, x, t, NULL, rx, rz);
    masa_context *ctx = make_ctx(2);
    masa_linear_estimator *est;
    TU_OK(masa_linear_estimator_create(ctx, din, dout, &est));
    TU_OK(masa_linear_estimator_accumulate(est, rows, x, t, NULL));
    const double alphas[] = {0.0, 0.5, 40.0};
    for (size_t k = 0; k < 3; k++) {
        double *ref = tu_dalloc(din * dout);
        memcpy(ref, rz, din * dout * sizeof *ref);
        ref_solve(din, dout, rx, alphas[k], ref);
        float *got = tu_falloc(din * dout);
        TU_OK(masa_linear_estimator_solve(est, alphas[k], got));
        TU_ASSERT_CLOSE("ridge T", got, ref, din * dout, 1e-5);
        free(got);
        free(ref);
    }
    masa_linear_estimator_destroy(est);
    masa_context_destroy(ctx);
    free(rx);
    free(rz);
    free(x);
    free(t);
}
END_TEST

/* Fewer rows than d_in: alpha 0 is refused (t untouched, the message says
 * why), alpha > 0 solves and matches the reference. */
START_TEST(test_solve_rank_deficient)
{
    const size_t din = 20, dout = 6, rows = 8;
    tu_rng rng = {9};
    float *x = tu_falloc(rows * din), *t = tu_falloc(rows * dout);
    tu_fill(&rng, x, rows * din, -1, 1);
    tu_fill(&rng, t, rows * dout, -1, 1);
    masa_context *ctx = make_ctx(1);
    masa_linear_estimator *est;
    TU_OK(masa_linear_estimator_create(ctx, din, dout, &est));
    TU_OK(masa_linear_estimator_accumulate(est, rows, x, t, NULL));
    float *got = tu_falloc(din * dout);
    for (size_t i = 0; i < din * dout; i++)
        got[i] = 7.0f;
    ck_assert_int_eq(masa_linear_estimator_solve(est, 0.0, got),
                     MASA_ERROR_INVALID_ARGUMENT);
    ck_assert_msg(strstr(masa_last_error(), "positive definite"), "%s",
                  masa_last_error());
    for (size_t i = 0; i < din * dout; i++)
        ck_assert(got[i] == 7.0f);
    double *rx = tu_dalloc(din * din), *rz = tu_dalloc(din * dout);
    ref_stats(rows, din, dout, x, t, NULL, rx, rz);
    ref_solve(din, dout, rx, 1e-2, rz);
    TU_OK(masa_linear_estimator_solve(est, 1e-2, got));
    TU_ASSERT_CLOSE("rank-deficient ridge T", got, rz, din * dout, 1e-5);
    free(rx);
    free(rz);
    free(got);
    masa_linear_estimator_destroy(est);
    masa_context_destroy(ctx);
    free(x);
    free(t);
}
END_TEST

/* Two estimators over halves, merged, equal one over everything. */
START_TEST(test_estimator_merge)
{
    const size_t din = 9, dout = 13, rows = 200;
    tu_rng rng = {3};
    float *x = tu_falloc(rows * din), *t = tu_falloc(rows * dout),
          *o = tu_falloc(rows * dout);
    tu_fill(&rng, x, rows * din, -1, 1);
    tu_fill(&rng, t, rows * dout, -1, 1);
    tu_fill(&rng, o, rows * dout, -1, 1);
    masa_context *c1 = make_ctx(1), *c2 = make_ctx(2);
    masa_linear_estimator *a, *b, *all, *other;
    TU_OK(masa_linear_estimator_create(c1, din, dout, &a));
    TU_OK(masa_linear_estimator_create(c2, din, dout, &b));
    TU_OK(masa_linear_estimator_create(c1, din, dout, &all));
    TU_OK(masa_linear_estimator_create(c1, din, dout + 1, &other));
    TU_OK(masa_linear_estimator_accumulate(a, 77, x, t, o));
    TU_OK(masa_linear_estimator_accumulate(b, rows - 77, x + 77 * din,
                                           t + 77 * dout, o + 77 * dout));
    TU_OK(masa_linear_estimator_accumulate(all, rows, x, t, o));
    TU_OK(masa_linear_estimator_merge(a, b));
    uint64_t n;
    TU_OK(masa_linear_estimator_rows(a, &n));
    ck_assert_uint_eq(n, rows);
    double *gx = tu_dalloc(din * din), *gz = tu_dalloc(din * dout);
    double *rx = tu_dalloc(din * din), *rz = tu_dalloc(din * dout);
    TU_OK(masa_linear_estimator_stats(a, gx, gz));
    TU_OK(masa_linear_estimator_stats(all, rx, rz));
    assert_close_dd("merged X^T X", gx, rx, din * din, 1e-14);
    assert_close_dd("merged X^T Z", gz, rz, din * dout, 1e-14);
    ck_assert_int_eq(masa_linear_estimator_merge(a, other),
                     MASA_ERROR_BAD_SHAPE);
    ck_assert_int_eq(masa_linear_estimator_merge(a, a),
                     MASA_ERROR_INVALID_ARGUMENT);
    ck_assert_int_eq(masa_linear_estimator_merge(NULL, a),
                     MASA_ERROR_NULL_ARGUMENT);
    /* the failed merges changed nothing */
    TU_OK(masa_linear_estimator_rows(a, &n));
    ck_assert_uint_eq(n, rows);
    free(gx);
    free(gz);
    free(rx);
    free(rz);
    masa_linear_estimator_destroy(a);
    masa_linear_estimator_destroy(b);
    masa_linear_estimator_destroy(all);
    masa_linear_estimator_destroy(other);
    masa_context_destroy(c1);
    masa_context_destroy(c2);
    free(x);
    free(t);
    free(o);
}
END_TEST

START_TEST(test_estimator_errors)
{
    masa_context *ctx = make_ctx(1);
    masa_linear_estimator *est = (void *)1;
    ck_assert_int_eq(masa_linear_estimator_create(NULL, 2, 2, &est),
                     MASA_ERROR_NULL_ARGUMENT);
    ck_assert_ptr_null(est);
    ck_assert_int_eq(masa_linear_estimator_create(ctx, 2, 2, NULL),
                     MASA_ERROR_NULL_ARGUMENT);
    ck_assert_int_eq(masa_linear_estimator_create(ctx, 0, 2, &est),
                     MASA_ERROR_BAD_SHAPE);
    ck_assert_int_eq(masa_linear_estimator_create(ctx, 2, 0, &est),
                     MASA_ERROR_BAD_SHAPE);
    ck_assert_int_eq(masa_linear_estimator_create(ctx, SIZE_MAX / 2, 4, &est),
                     MASA_ERROR_OVERFLOW);
    TU_OK(masa_linear_estimator_create(ctx, 3, 2, &est));
    float x[6] = {1, 2, 3, 4, 5, 6}, t[4] = {1, 2, 3, 4};
    float bad[6] = {1, 2, NAN, 4, 5, 6}, inf[4] = {1, INFINITY, 3, 4};
    ck_assert_int_eq(masa_linear_estimator_accumulate(NULL, 2, x, t, NULL),
                     MASA_ERROR_NULL_ARGUMENT);
    ck_assert_int_eq(masa_linear_estimator_accumulate(est, 2, NULL, t, NULL),
                     MASA_ERROR_NULL_ARGUMENT);
    ck_assert_int_eq(masa_linear_estimator_accumulate(est, 2, x, NULL, NULL),
                     MASA_ERROR_NULL_ARGUMENT);
    ck_assert_int_eq(masa_linear_estimator_accumulate(est, 2, bad, t, NULL),
                     MASA_ERROR_INVALID_ARGUMENT);
    ck_assert_int_eq(masa_linear_estimator_accumulate(est, 2, x, inf, NULL),
                     MASA_ERROR_INVALID_ARGUMENT);
    ck_assert_int_eq(masa_linear_estimator_accumulate(est, 2, x, t, inf),
                     MASA_ERROR_INVALID_ARGUMENT);
    ck_assert_int_eq(
        masa_linear_estimator_accumulate(est, SIZE_MAX / 2, x, t, NULL),
        MASA_ERROR_OVERFLOW);
    uint64_t n = 9;
    TU_OK(masa_linear_estimator_rows(est, &n));
    ck_assert_uint_eq(n, 0); /* refused batches added nothing */
    float out[6] = {0};
    ck_assert_int_eq(masa_linear_estimator_solve(est, 1.0, out),
                     MASA_ERROR_INVALID_ARGUMENT); /* no rows */
    ck_assert_msg(strstr(masa_last_error(), "no rows"), "%s",
                  masa_last_error());
    TU_OK(masa_linear_estimator_accumulate(est, 2, x, t, NULL));
    ck_assert_int_eq(masa_linear_estimator_solve(est, -1.0, out),
                     MASA_ERROR_INVALID_ARGUMENT);
    ck_assert_int_eq(masa_linear_estimator_solve(est, NAN, out),
                     MASA_ERROR_INVALID_ARGUMENT);
    ck_assert_int_eq(masa_linear_estimator_solve(est, INFINITY, out),
                     MASA_ERROR_INVALID_ARGUMENT);
    ck_assert_int_eq(masa_linear_estimator_solve(est, 1.0, NULL),
                     MASA_ERROR_NULL_ARGUMENT);
    ck_assert_int_eq(masa_linear_estimator_solve(NULL, 1.0, out),
                     MASA_ERROR_NULL_ARGUMENT);
    ck_assert_int_eq(masa_linear_estimator_rows(est, NULL),
                     MASA_ERROR_NULL_ARGUMENT);
    ck_assert_int_eq(masa_linear_estimator_rows(NULL, &n),
                     MASA_ERROR_NULL_ARGUMENT);
    ck_assert_int_eq(masa_linear_estimator_stats(NULL, NULL, NULL),
                     MASA_ERROR_NULL_ARGUMENT);
    ck_assert_int_eq(masa_linear_estimator_shape(NULL, NULL, NULL),
                     MASA_ERROR_NULL_ARGUMENT);
    ck_assert_int_eq(masa_linear_estimator_reset(NULL),
                     MASA_ERROR_NULL_ARGUMENT);
    masa_linear_estimator_destroy(est);
    masa_linear_estimator_destroy(NULL);
    masa_context_destroy(ctx);
}
END_TEST

/* ---- cosine ---- */

typedef struct cos_data {
    size_t rows, din, dout;
    float *x, *y, *o;
} cos_data;

static cos_data cos_data_make(size_t rows, size_t din, size_t dout,
                              uint64_t seed)
{
    cos_data d = {rows, din, dout, tu_falloc(rows * din),
                  tu_falloc(rows * dout), tu_falloc(rows * dout)};
    tu_rng rng = {seed};
    tu_fill(&rng, d.x, rows * din, -1, 1);
    tu_fill(&rng, d.y, rows * dout, -1, 1);
    tu_fill(&rng, d.o, rows * dout, -1, 1);
    return d;
}

static void cos_data_free(cos_data *d)
{
    free(d->x);
    free(d->y);
    free(d->o);
}

static double *identity(size_t din, size_t dout)
{
    double *t = tu_dalloc(din * dout);
    for (size_t i = 0; i < din && i < dout; i++)
        t[i * dout + i] = 1;
    return t;
}

/* The reference gradient against central differences of the reference
 * loss (so the Adam comparison below rests on a checked gradient). */
START_TEST(test_cosine_reference_gradient)
{
    cos_data d = cos_data_make(15, 6, 5, 21);
    double *t = identity(6, 5), *g = tu_dalloc(30);
    ref_cosine(d.rows, 6, 5, d.x, d.y, d.o, t, g);
    for (size_t i = 0; i < 30; i++) {
        double keep = t[i], h = 1e-6;
        t[i] = keep + h;
        double lp = ref_cosine(d.rows, 6, 5, d.x, d.y, d.o, t, NULL);
        t[i] = keep - h;
        double lm = ref_cosine(d.rows, 6, 5, d.x, d.y, d.o, t, NULL);
        t[i] = keep;
        ck_assert_msg(fabs((lp - lm) / (2 * h) - g[i]) < 1e-7,
                      "d loss / dT[%zu]: %g vs %g", i, (lp - lm) / (2 * h),
                      g[i]);
    }
    free(t);
    free(g);
    cos_data_free(&d);
}
END_TEST

/* Loss, then Adam steps on distinct batches (with and without offset,
 * non-square T), against the reference. */
START_TEST(test_cosine_steps)
{
    const size_t din = 16, dout = 11, rows = 90;
    cos_data d = cos_data_make(rows, din, dout, 4);
    for (int with_offset = 0; with_offset <= 1; with_offset++) {
        masa_context *ctx = make_ctx(2);
        masa_cosine_options opt;
        masa_cosine_options_init(&opt);
        opt.learning_rate = 1e-2f;
        masa_cosine_estimator *est;
        TU_OK(masa_cosine_estimator_create(ctx, din, dout, &opt, &est));
        const float *o = with_offset ? d.o : NULL;
        double *t = identity(din, dout), *m = tu_dalloc(din * dout),
               *v = tu_dalloc(din * dout), *g = tu_dalloc(din * dout);
        double loss;
        TU_OK(masa_cosine_estimator_loss(est, rows, d.x, d.y, o, &loss));
        double ref = ref_cosine(rows, din, dout, d.x, d.y, o, t, NULL);
        ck_assert_msg(fabs(loss - ref) < 1e-6, "loss %g vs %g", loss, ref);
        /* batches of 30 rows in turn, 6 steps */
        for (int k = 1; k <= 6; k++) {
            size_t r0 = (size_t)((k - 1) % 3) * 30;
            const float *ob = o ? o + r0 * dout : NULL;
            double before;
            TU_OK(masa_cosine_estimator_step(est, 30, d.x + r0 * din,
                                             d.y + r0 * dout, ob, &before));
            double rl = ref_cosine(30, din, dout, d.x + r0 * din,
                                   d.y + r0 * dout, ob, t, g);
            ck_assert_msg(fabs(before - rl) < 1e-5, "step %d loss %g vs %g",
                          k, before, rl);
            ref_adam(din * dout, t, m, v, g, k, 1e-2, 0.9, 0.999, 1e-8);
        }
        uint64_t steps;
        TU_OK(masa_cosine_estimator_steps(est, &steps));
        ck_assert_uint_eq(steps, 6);
        float *got = tu_falloc(din * dout);
        TU_OK(masa_cosine_estimator_transform(est, got));
        /* compare the change from I, relative to its own size */
        double *dref = identity(din, dout);
        float *dgot = tu_falloc(din * dout);
        for (size_t i = 0; i < din * dout; i++) {
            dgot[i] = got[i] - (float)dref[i];
            dref[i] = t[i] - dref[i];
        }
        TU_ASSERT_CLOSE("T - I after 6 Adam steps", dgot, dref, din * dout,
                        1e-3);
        free(dgot);
        free(dref);
        free(got);
        free(t);
        free(m);
        free(v);
        free(g);
        masa_cosine_estimator_destroy(est);
        masa_context_destroy(ctx);
    }
    cos_data_free(&d);
}
END_TEST

/* fit lowers the loss, is the same bit for bit for a seed, differs for
 * another seed, and with one batch per epoch equals plain steps. */
START_TEST(test_cosine_fit)
{
    const size_t din = 12, dout = 12, rows = 500;
    cos_data d = cos_data_make(rows, din, dout, 8);
    masa_context *ctx = make_ctx(2);
    masa_cosine_options opt;
    masa_cosine_options_init(&opt);
    ck_assert_uint_eq(opt.epochs, 10);
    ck_assert_uint_eq(opt.batch_rows, 1024);
    ck_assert(opt.learning_rate == 1e-4f && opt.beta1 == 0.9f &&
              opt.beta2 == 0.999f && opt.eps == 1e-8f && opt.seed == 0);
    opt.learning_rate = 3e-3f;
    opt.batch_rows = 64;
    opt.epochs = 8;
    opt.seed = 42;
    float *t1 = tu_falloc(din * dout), *t2 = tu_falloc(din * dout);
    double l0, l1, epoch_loss[8];
    masa_cosine_estimator *a, *b;
    TU_OK(masa_cosine_estimator_create(ctx, din, dout, &opt, &a));
    TU_OK(masa_cosine_estimator_loss(a, rows, d.x, d.y, d.o, &l0));
    TU_OK(masa_cosine_estimator_fit(a, rows, d.x, d.y, d.o, epoch_loss));
    TU_OK(masa_cosine_estimator_loss(a, rows, d.x, d.y, d.o, &l1));
    ck_assert_msg(l1 < l0 - 0.01, "loss %g -> %g", l0, l1);
    ck_assert_msg(epoch_loss[7] < epoch_loss[0], "epoch loss %g -> %g",
                  epoch_loss[0], epoch_loss[7]);
    uint64_t steps;
    TU_OK(masa_cosine_estimator_steps(a, &steps));
    ck_assert_uint_eq(steps, 8 * 8); /* ceil(500 / 64) batches per epoch */
    TU_OK(masa_cosine_estimator_transform(a, t1));

    TU_OK(masa_cosine_estimator_create(ctx, din, dout, &opt, &b));
    TU_OK(masa_cosine_estimator_fit(b, rows, d.x, d.y, d.o, NULL));
    TU_OK(masa_cosine_estimator_transform(b, t2));
    ck_assert(memcmp(t1, t2, din * dout * sizeof(float)) == 0);
    masa_cosine_estimator_destroy(b);

    opt.seed = 43;
    TU_OK(masa_cosine_estimator_create(ctx, din, dout, &opt, &b));
    TU_OK(masa_cosine_estimator_fit(b, rows, d.x, d.y, d.o, NULL));
    TU_OK(masa_cosine_estimator_transform(b, t2));
    ck_assert(memcmp(t1, t2, din * dout * sizeof(float)) != 0);
    masa_cosine_estimator_destroy(b);

    /* one batch per epoch: the order does not matter up to rounding */
    opt.batch_rows = rows;
    opt.epochs = 3;
    TU_OK(masa_cosine_estimator_create(ctx, din, dout, &opt, &b));
    TU_OK(masa_cosine_estimator_fit(b, rows, d.x, d.y, d.o, NULL));
    TU_OK(masa_cosine_estimator_transform(b, t2));
    /* restart a from I: set_transform resets Adam */
    float *eye = tu_falloc(din * dout);
    for (size_t i = 0; i < din; i++)
        eye[i * dout + i] = 1;
    masa_cosine_estimator_destroy(a);
    TU_OK(masa_cosine_estimator_create(ctx, din, dout, &opt, &a));
    TU_OK(masa_cosine_estimator_step(a, rows, d.x, d.y, d.o, NULL));
    TU_OK(masa_cosine_estimator_set_transform(a, eye));
    TU_OK(masa_cosine_estimator_steps(a, &steps));
    ck_assert_uint_eq(steps, 0);
    for (int k = 0; k < 3; k++)
        TU_OK(masa_cosine_estimator_step(a, rows, d.x, d.y, d.o, NULL));
    TU_OK(masa_cosine_estimator_transform(a, t1));
    TU_ASSERT_CLOSE_FF("fit with one batch per epoch vs steps", t2, t1,
                       din * dout, 1e-5);
    free(eye);
    masa_cosine_estimator_destroy(a);
    masa_cosine_estimator_destroy(b);
    masa_context_destroy(ctx);
    free(t1);
    free(t2);
    cos_data_free(&d);
}
END_TEST

/* A zero prediction row counts cos 0 and gives no gradient (no NaN). */
START_TEST(test_cosine_zero_rows)
{
    masa_context *ctx = make_ctx(1);
    masa_cosine_estimator *est;
    TU_OK(masa_cosine_estimator_create(ctx, 2, 2, NULL, &est));
    float x[4] = {0, 0, 1, 0}, y[4] = {1, 0, 1, 0};
    double loss;
    TU_OK(masa_cosine_estimator_loss(est, 2, x, y, NULL, &loss));
    ck_assert(fabs(loss - 0.5) < 1e-12); /* rows: cos 0 and cos 1 */
    TU_OK(masa_cosine_estimator_step(est, 2, x, y, NULL, NULL));
    float t[4];
    TU_OK(masa_cosine_estimator_transform(est, t));
    for (int i = 0; i < 4; i++)
        ck_assert(isfinite(t[i]));
    masa_cosine_estimator_destroy(est);
    masa_context_destroy(ctx);
}
END_TEST

START_TEST(test_cosine_errors)
{
    masa_context *ctx = make_ctx(1);
    masa_cosine_estimator *est = (void *)1;
    masa_cosine_options opt;
    ck_assert_int_eq(masa_cosine_estimator_create(NULL, 2, 2, NULL, &est),
                     MASA_ERROR_NULL_ARGUMENT);
    ck_assert_ptr_null(est);
    ck_assert_int_eq(masa_cosine_estimator_create(ctx, 2, 2, NULL, NULL),
                     MASA_ERROR_NULL_ARGUMENT);
    ck_assert_int_eq(masa_cosine_estimator_create(ctx, 0, 2, NULL, &est),
                     MASA_ERROR_BAD_SHAPE);
    ck_assert_int_eq(
        masa_cosine_estimator_create(ctx, SIZE_MAX / 4, 8, NULL, &est),
        MASA_ERROR_OVERFLOW);
    masa_cosine_options_init(&opt);
    opt.size = sizeof(size_t);
    ck_assert_int_eq(masa_cosine_estimator_create(ctx, 2, 2, &opt, &est),
                     MASA_ERROR_BAD_STRUCT_SIZE);
    for (int k = 0; k < 9; k++) {
        masa_cosine_options_init(&opt);
        switch (k) {
        case 0: opt.epochs = 0; break;
        case 1: opt.batch_rows = 0; break;
        case 2: opt.learning_rate = 0; break;
        case 3: opt.learning_rate = NAN; break;
        case 4: opt.eps = -1; break;
        case 5: opt.beta1 = 1; break;
        case 6: opt.beta2 = -0.1f; break;
        case 7: opt.beta1 = NAN; break;
        case 8: opt.eps = INFINITY; break;
        }
        ck_assert_msg(masa_cosine_estimator_create(ctx, 2, 2, &opt, &est) ==
                          MASA_ERROR_INVALID_ARGUMENT,
                      "option case %d accepted", k);
        ck_assert_ptr_null(est);
    }
    masa_cosine_options_default(NULL, sizeof opt); /* does nothing */
    masa_cosine_options_init(&opt);
    TU_OK(masa_cosine_estimator_create(ctx, 2, 2, &opt, &est));
    float x[4] = {1, 2, 3, 4}, y[4] = {1, 0, 0, 1}, nan4[4] = {1, NAN, 0, 0};
    float t[4], keep[4];
    double loss;
    TU_OK(masa_cosine_estimator_transform(est, keep));
    ck_assert(keep[0] == 1 && keep[1] == 0 && keep[2] == 0 && keep[3] == 1);
    ck_assert_int_eq(masa_cosine_estimator_loss(est, 0, x, y, NULL, &loss),
                     MASA_ERROR_BAD_SHAPE);
    ck_assert_int_eq(masa_cosine_estimator_loss(est, 2, x, y, NULL, NULL),
                     MASA_ERROR_NULL_ARGUMENT);
    ck_assert_int_eq(masa_cosine_estimator_loss(NULL, 2, x, y, NULL, &loss),
                     MASA_ERROR_NULL_ARGUMENT);
    ck_assert_int_eq(masa_cosine_estimator_step(est, 2, NULL, y, NULL, NULL),
                     MASA_ERROR_NULL_ARGUMENT);
    ck_assert_int_eq(masa_cosine_estimator_step(est, 2, x, nan4, NULL, NULL),
                     MASA_ERROR_INVALID_ARGUMENT);
    ck_assert_int_eq(masa_cosine_estimator_step(est, 2, x, y, nan4, NULL),
                     MASA_ERROR_INVALID_ARGUMENT);
    ck_assert_int_eq(masa_cosine_estimator_fit(est, 2, nan4, y, NULL, NULL),
                     MASA_ERROR_INVALID_ARGUMENT);
    ck_assert_int_eq(masa_cosine_estimator_fit(est, 0, x, y, NULL, NULL),
                     MASA_ERROR_BAD_SHAPE);
    ck_assert_int_eq(
        masa_cosine_estimator_fit(est, SIZE_MAX / 2, x, y, NULL, NULL),
        MASA_ERROR_OVERFLOW);
    ck_assert_int_eq(masa_cosine_estimator_set_transform(est, nan4),
                     MASA_ERROR_INVALID_ARGUMENT);
    ck_assert_int_eq(masa_cosine_estimator_set_transform(est, NULL),
                     MASA_ERROR_NULL_ARGUMENT);
    ck_assert_int_eq(masa_cosine_estimator_transform(est, NULL),
                     MASA_ERROR_NULL_ARGUMENT);
    ck_assert_int_eq(masa_cosine_estimator_steps(est, NULL),
                     MASA_ERROR_NULL_ARGUMENT);
    TU_OK(masa_cosine_estimator_transform(est, t));
    ck_assert(memcmp(t, keep, sizeof t) == 0); /* refused calls changed T */
    uint64_t steps = 5;
    TU_OK(masa_cosine_estimator_steps(est, &steps));
    ck_assert_uint_eq(steps, 0);
    masa_cosine_estimator_destroy(est);
    masa_cosine_estimator_destroy(NULL);
    masa_context_destroy(ctx);
}
END_TEST

/* Finite inputs so large that x T overflows float32, and a learning rate
 * so large that the step would: refused, T and Adam's state unchanged (a
 * fit refused part-way restores them). */
START_TEST(test_cosine_overflow)
{
    masa_context *ctx = make_ctx(1);
    masa_cosine_options opt;
    masa_cosine_options_init(&opt);
    opt.learning_rate = 0.5f;
    opt.epochs = 3;
    opt.batch_rows = 1;
    masa_cosine_estimator *est;
    TU_OK(masa_cosine_estimator_create(ctx, 2, 2, &opt, &est));
    /* row 0 is harmless for T = I; once T's off-diagonal grows, x T of
     * row 1 (3e38 + 3e38 T_10) overflows */
    float x[4] = {1, 2, 3e38f, 3e38f}, y[4] = {1, 2, 3, 1};
    float t0[4], t1[4], t2[4];
    double loss;
    uint64_t steps;
    TU_OK(masa_cosine_estimator_step(est, 1, x, y, NULL, &loss));
    TU_OK(masa_cosine_estimator_step(est, 1, x + 2, y + 2, NULL, &loss));
    TU_OK(masa_cosine_estimator_transform(est, t0));
    ck_assert_int_eq(masa_cosine_estimator_loss(est, 1, x + 2, y + 2, NULL, &loss),
                     MASA_ERROR_INVALID_ARGUMENT);
    ck_assert_int_eq(masa_cosine_estimator_step(est, 1, x + 2, y + 2, NULL, NULL),
                     MASA_ERROR_INVALID_ARGUMENT);
    TU_OK(masa_cosine_estimator_transform(est, t1));
    ck_assert(memcmp(t0, t1, sizeof t0) == 0);
    TU_OK(masa_cosine_estimator_steps(est, &steps));
    ck_assert_uint_eq(steps, 2);
    /* a fit from I takes a step on each row; the second overflows */
    float eye[4] = {1, 0, 0, 1};
    TU_OK(masa_cosine_estimator_set_transform(est, eye));
    double epoch_loss[3];
    ck_assert_int_eq(masa_cosine_estimator_fit(est, 2, x, y, NULL, epoch_loss),
                     MASA_ERROR_INVALID_ARGUMENT);
    TU_OK(masa_cosine_estimator_transform(est, t2));
    ck_assert(memcmp(t2, eye, sizeof eye) == 0);
    TU_OK(masa_cosine_estimator_steps(est, &steps));
    ck_assert_uint_eq(steps, 0);
    masa_cosine_estimator_destroy(est);

    /* a learning rate that overflows T itself */
    opt.learning_rate = 3e38f;
    TU_OK(masa_cosine_estimator_create(ctx, 2, 2, &opt, &est));
    float tb[4] = {-3e38f, 0, 0, 1};
    TU_OK(masa_cosine_estimator_set_transform(est, tb));
    float xs[2] = {1, 0}, ys[2] = {0, 1};
    ck_assert_int_eq(masa_cosine_estimator_step(est, 1, xs, ys, NULL, NULL),
                     MASA_ERROR_INVALID_ARGUMENT);
    ck_assert(strstr(masa_last_error(), "learning rate") != NULL);
    TU_OK(masa_cosine_estimator_transform(est, t1));
    ck_assert(memcmp(t1, tb, sizeof tb) == 0);
    masa_cosine_estimator_destroy(est);
    masa_context_destroy(ctx);
}
END_TEST

/* ---- merge ---- */

START_TEST(test_merge_layouts)
{
    const size_t dff = 23, d = 14;
    tu_rng rng = {17};
    float *w = tu_falloc(dff * d), *t = tu_falloc(d * d), *bias = tu_falloc(d);
    tu_fill(&rng, w, dff * d, -1, 1);
    tu_fill(&rng, t, d * d, -1, 1);
    tu_fill(&rng, bias, d, -1, 1);
    double *ref = tu_dalloc(dff * d), *rb = tu_dalloc(d);
    for (size_t i = 0; i < dff; i++) /* W T */
        for (size_t j = 0; j < d; j++)
            for (size_t k = 0; k < d; k++)
                ref[i * d + j] += (double)w[i * d + k] * t[k * d + j];
    for (size_t j = 0; j < d; j++)
        for (size_t k = 0; k < d; k++)
            rb[j] += (double)bias[k] * t[k * d + j];
    masa_context *ctx = make_ctx(2);
    float *w1 = tu_falloc(dff * d), *b1 = tu_falloc(d);
    memcpy(w1, w, dff * d * sizeof *w);
    memcpy(b1, bias, d * sizeof *b1);
    TU_OK(masa_merge_linear_map(ctx, MASA_MERGE_ROW_VECTOR, dff, d, w1, b1,
                                t));
    TU_ASSERT_CLOSE("row-vector merge", w1, ref, dff * d, 1e-5);
    TU_ASSERT_CLOSE("bias merge", b1, rb, d, 1e-5);

    /* nn.Linear: W^T stored; the result must be (W T)^T */
    float *wl = tu_falloc(d * dff);
    for (size_t i = 0; i < dff; i++)
        for (size_t j = 0; j < d; j++)
            wl[j * dff + i] = w[i * d + j];
    double *reft = tu_dalloc(d * dff);
    for (size_t i = 0; i < dff; i++)
        for (size_t j = 0; j < d; j++)
            reft[j * dff + i] = ref[i * d + j];
    TU_OK(masa_merge_linear_map(ctx, MASA_MERGE_NN_LINEAR, dff, d, wl, NULL,
                                t));
    TU_ASSERT_CLOSE("nn.Linear merge", wl, reft, dff * d, 1e-5);

    /* errors leave w and bias as they were */
    memcpy(w1, w, dff * d * sizeof *w);
    ck_assert_int_eq(masa_merge_linear_map(ctx, 2, dff, d, w1, NULL, t),
                     MASA_ERROR_INVALID_ARGUMENT);
    ck_assert_int_eq(masa_merge_linear_map(ctx, -1, dff, d, w1, NULL, t),
                     MASA_ERROR_INVALID_ARGUMENT);
    ck_assert_int_eq(masa_merge_linear_map(NULL, 0, dff, d, w1, NULL, t),
                     MASA_ERROR_NULL_ARGUMENT);
    ck_assert_int_eq(masa_merge_linear_map(ctx, 0, dff, d, NULL, NULL, t),
                     MASA_ERROR_NULL_ARGUMENT);
    ck_assert_int_eq(masa_merge_linear_map(ctx, 0, dff, d, w1, NULL, NULL),
                     MASA_ERROR_NULL_ARGUMENT);
    ck_assert_int_eq(masa_merge_linear_map(ctx, 0, 0, d, w1, NULL, t),
                     MASA_ERROR_BAD_SHAPE);
    ck_assert_int_eq(masa_merge_linear_map(ctx, 0, dff, 0, w1, NULL, t),
                     MASA_ERROR_BAD_SHAPE);
    ck_assert_int_eq(
        masa_merge_linear_map(ctx, 0, SIZE_MAX / 2, 4, w1, NULL, t),
        MASA_ERROR_OVERFLOW);
    ck_assert_int_eq(masa_merge_linear_map(ctx, 0, dff, d, w1, NULL, w1),
                     MASA_ERROR_INVALID_ARGUMENT); /* t overlaps w */
    ck_assert_int_eq(masa_merge_linear_map(ctx, 0, dff, d, w1, w1 + 3, t),
                     MASA_ERROR_INVALID_ARGUMENT); /* bias overlaps w */
    float *tn = tu_falloc(d * d);
    memcpy(tn, t, d * d * sizeof *t);
    tn[5] = NAN;
    ck_assert_int_eq(masa_merge_linear_map(ctx, 0, dff, d, w1, NULL, tn),
                     MASA_ERROR_INVALID_ARGUMENT);
    ck_assert(memcmp(w1, w, dff * d * sizeof *w) == 0);
    free(tn);
    free(reft);
    free(wl);
    free(w1);
    free(b1);
    free(ref);
    free(rb);
    free(w);
    free(t);
    free(bias);
    masa_context_destroy(ctx);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("replaceme");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_stats_many_batches);
    tcase_add_test(tc, test_solve_ridge);
    tcase_add_test(tc, test_solve_rank_deficient);
    tcase_add_test(tc, test_estimator_merge);
    tcase_add_test(tc, test_estimator_errors);
    tcase_add_test(tc, test_cosine_reference_gradient);
    tcase_add_test(tc, test_cosine_steps);
    tcase_add_test(tc, test_cosine_fit);
    tcase_add_test(tc, test_cosine_zero_rows);
    tcase_add_test(tc, test_cosine_errors);
    tcase_add_test(tc, test_cosine_overflow);
    tcase_add_test(tc, test_merge_layouts);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return tu_run_suite(suite());
}
