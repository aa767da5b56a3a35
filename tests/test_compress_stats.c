/* Calibration statistics and the whitened low-rank residual against the
 * plain double reference (reference_compress.c), and allocation failures of
 * the compression calls through the allocator hook. */
#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <masa/masa.h>

#include "reference_compress.h"
#include "test_util.h"

/* ---------------------------------------------------------------- calib */

static void check_calib(size_t dim, size_t threads)
{
    masa_context *ctx = tu_context(threads);
    tu_rng r = {dim * 31 + threads};
    /* batches of uneven sizes, one larger than a conversion block */
    size_t batches[] = {1, 7, 0, 300, 45};
    size_t total = 0;
    for (size_t i = 0; i < 5; i++)
        total += batches[i];
    float *x = tu_falloc(total * dim);
    tu_fill(&r, x, total * dim, -2, 2);
    masa_calib *a = NULL, *b = NULL;
    TU_OK(masa_calib_create(ctx, dim, &a));
    TU_OK(masa_calib_create(ctx, dim, &b));
    size_t row = 0;
    for (size_t i = 0; i < 5; i++) {
        /* the first three batches into a, the rest into b, then merge */
        TU_OK(masa_calib_accumulate(i < 3 ? a : b, x + row * dim,
                                    batches[i]));
        row += batches[i];
    }
    uint64_t rows_a, rows_b;
    size_t d;
    TU_OK(masa_calib_shape(a, &d, &rows_a));
    TU_OK(masa_calib_shape(b, NULL, &rows_b));
    ck_assert_uint_eq(d, dim);
    ck_assert_uint_eq(rows_a, 8);
    ck_assert_uint_eq(rows_b, 345);
    TU_OK(masa_calib_merge(a, b));
    TU_OK(masa_calib_shape(a, NULL, &rows_a));
    ck_assert_uint_eq(rows_a, total);
    double *ref = tu_dalloc(dim * dim);
    ref_xtx(total, dim, x, ref);
    const double *c = masa_calib_data(a);
    TU_ASSERT_CLOSE_DD("X^T X", c, ref, dim * dim, 1e-13);
    for (size_t i = 0; i < dim; i++)
        for (size_t j = 0; j < dim; j++)
            ck_assert(c[i * dim + j] == c[j * dim + i]);
    /* a copy from the data (what loading a saved file does) */
    masa_calib *copy = NULL;
    TU_OK(masa_calib_create_from_data(ctx, dim, c, rows_a, &copy));
    ck_assert_mem_eq(masa_calib_data(copy), c, dim * dim * sizeof(double));
    uint64_t rows_copy;
    TU_OK(masa_calib_shape(copy, NULL, &rows_copy));
    ck_assert_uint_eq(rows_copy, total);
    masa_calib_destroy(copy);
    masa_calib_destroy(a);
    masa_calib_destroy(b);
    free(ref);
    free(x);
    masa_context_destroy(ctx);
}

START_TEST(calib_matches_reference)
{
    check_calib(5, 1);
    check_calib(5, 2);
    check_calib(600, 2); /* 256-row blocks: 300 rows take two */
}
END_TEST

START_TEST(calib_errors)
{
    masa_context *ctx = tu_context(1);
    masa_calib *c = (masa_calib *)1;
    ck_assert_int_eq(masa_calib_create(NULL, 3, &c), MASA_ERROR_NULL_ARGUMENT);
    ck_assert_ptr_null(c);
    ck_assert_int_eq(masa_calib_create(ctx, 3, NULL), MASA_ERROR_NULL_ARGUMENT);
    ck_assert_int_eq(masa_calib_create(ctx, 0, &c), MASA_ERROR_BAD_SHAPE);
    ck_assert_int_eq(masa_calib_create(ctx, SIZE_MAX / 2, &c),
                     MASA_ERROR_OVERFLOW);
    TU_OK(masa_calib_create(ctx, 3, &c));
    float x[6] = {1, 2, 3, 4, 5, 6};
    TU_OK(masa_calib_accumulate(c, x, 2));
    double before[9];
    memcpy(before, masa_calib_data(c), sizeof before);
    ck_assert_int_eq(masa_calib_accumulate(NULL, x, 2),
                     MASA_ERROR_NULL_ARGUMENT);
    ck_assert_int_eq(masa_calib_accumulate(c, NULL, 2),
                     MASA_ERROR_NULL_ARGUMENT);
    TU_OK(masa_calib_accumulate(c, NULL, 0)); /* no rows: nothing to read */
    ck_assert_int_eq(masa_calib_accumulate(c, x, SIZE_MAX / 2),
                     MASA_ERROR_OVERFLOW);
    x[4] = NAN;
    ck_assert_int_eq(masa_calib_accumulate(c, x, 2),
                     MASA_ERROR_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(masa_last_error(), "row 1"));
    x[4] = -INFINITY;
    ck_assert_int_eq(masa_calib_accumulate(c, x, 2),
                     MASA_ERROR_INVALID_ARGUMENT);
    ck_assert_mem_eq(masa_calib_data(c), before, sizeof before);
    uint64_t rows;
    TU_OK(masa_calib_shape(c, NULL, &rows));
    ck_assert_uint_eq(rows, 2);
    ck_assert_int_eq(masa_calib_shape(NULL, NULL, &rows),
                     MASA_ERROR_NULL_ARGUMENT);
    ck_assert_ptr_null(masa_calib_data(NULL));

    masa_calib *other = NULL;
    TU_OK(masa_calib_create(ctx, 4, &other));
    ck_assert_int_eq(masa_calib_merge(c, other), MASA_ERROR_BAD_SHAPE);
    ck_assert_int_eq(masa_calib_merge(c, c), MASA_ERROR_INVALID_ARGUMENT);
    ck_assert_int_eq(masa_calib_merge(NULL, c), MASA_ERROR_NULL_ARGUMENT);
    ck_assert_int_eq(masa_calib_merge(c, NULL), MASA_ERROR_NULL_ARGUMENT);
    masa_calib_destroy(other);

    /* create_from_data */
    double sym[4] = {2, 1, 1, 3}, asym[4] = {2, 1, 1.5, 3},
           bad[4] = {2, NAN, NAN, 3};
    other = (masa_calib *)1;
    ck_assert_int_eq(masa_calib_create_from_data(ctx, 2, NULL, 1, &other),
                     MASA_ERROR_NULL_ARGUMENT);
    ck_assert_ptr_null(other);
    ck_assert_int_eq(masa_calib_create_from_data(ctx, 2, asym, 1, &other),
                     MASA_ERROR_INVALID_ARGUMENT);
    ck_assert_int_eq(masa_calib_create_from_data(ctx, 2, bad, 1, &other),
                     MASA_ERROR_INVALID_ARGUMENT);
    ck_assert_int_eq(masa_calib_create_from_data(ctx, 0, sym, 1, &other),
                     MASA_ERROR_BAD_SHAPE);
    ck_assert_int_eq(masa_calib_create_from_data(NULL, 2, sym, 1, &other),
                     MASA_ERROR_NULL_ARGUMENT);
    /* merging row counts that overflow */
    TU_OK(masa_calib_create_from_data(ctx, 3, before, UINT64_MAX, &other));
    ck_assert_int_eq(masa_calib_merge(c, other), MASA_ERROR_OVERFLOW);
    ck_assert_int_eq(masa_calib_accumulate(other, x, 1), MASA_ERROR_OVERFLOW);
    masa_calib_destroy(other);
    masa_calib_destroy(c);
    masa_calib_destroy(NULL);
    masa_context_destroy(ctx);
}
END_TEST

/* ---------------------------------------------------------------- residual */

typedef struct residual_ref {
    double before, dropped;
    double *target; /* d_in x d_out: R^T (A B) should equal it */
} residual_ref;

/* With C = R R^T (R = I without C), M = R^T E: the error before is ||M||^2,
 * the squared singular values are the eigenvalues of M^T M (Jacobi), and
 * the best rank-r R^T A B is M V_r V_r^T. */
static void ref_residual(size_t d_in, size_t d_out, const double *e,
                         const double *c, size_t rank, residual_ref *out)
{
    double *m = tu_dalloc(d_in * d_out), *r = tu_dalloc(d_in * d_in);
    if (c)
        ck_assert_int_eq(ref_cholesky(d_in, c, r), 0);
    for (size_t i = 0; i < d_in; i++)
        for (size_t j = 0; j < d_out; j++) {
            double s = 0;
            if (!c)
                s = e[i * d_out + j];
            else
                for (size_t k = i; k < d_in; k++) /* (R^T)_{ik} = R_{ki} */
                    s += r[k * d_in + i] * e[k * d_out + j];
            m[i * d_out + j] = s;
        }
    double *mtm = tu_dalloc(d_out * d_out), *w = tu_dalloc(d_out),
           *v = tu_dalloc(d_out * d_out);
    out->before = 0;
    for (size_t i = 0; i < d_in * d_out; i++)
        out->before += m[i] * m[i];
    for (size_t a = 0; a < d_out; a++)
        for (size_t b = 0; b < d_out; b++)
            for (size_t i = 0; i < d_in; i++)
                mtm[a * d_out + b] += m[i * d_out + a] * m[i * d_out + b];
    ref_eigen(d_out, mtm, d_out, w, v);
    size_t k = d_in < d_out ? d_in : d_out;
    out->dropped = 0;
    for (size_t i = rank; i < k; i++)
        out->dropped += fmax(w[i], 0);
    /* M V_r first, then (M V_r) V_r^T: O(d_in d_out rank) */
    double *mv = tu_dalloc(d_in * rank);
    for (size_t i = 0; i < d_in; i++)
        for (size_t q = 0; q < rank; q++)
            for (size_t t = 0; t < d_out; t++)
                mv[i * rank + q] += m[i * d_out + t] * v[t * d_out + q];
    out->target = tu_dalloc(d_in * d_out);
    for (size_t i = 0; i < d_in; i++)
        for (size_t j = 0; j < d_out; j++)
            for (size_t q = 0; q < rank; q++)
                out->target[i * d_out + j] +=
                    mv[i * rank + q] * v[j * d_out + q];
    free(mv);
    free(m);
    free(r);
    free(mtm);
    free(w);
    free(v);
}

static void check_residual(size_t d_in, size_t d_out, size_t rank,
                           size_t calib_rows, int use_w_hat)
{
    masa_context *ctx = tu_context(2);
    tu_rng rng = {d_in * 100 + d_out * 10 + rank};
    size_t ne = d_in * d_out;
    float *w = tu_falloc(ne), *w_hat = tu_falloc(ne);
    tu_fill(&rng, w, ne, -1, 1);
    tu_fill(&rng, w_hat, ne, -0.5f, 0.5f);
    double *e = tu_dalloc(ne);
    for (size_t i = 0; i < ne; i++)
        e[i] = (double)w[i] - (use_w_hat ? (double)w_hat[i] : 0.0);
    double *c = NULL;
    if (calib_rows) {
        /* correlated inputs: x = z L with a random mixing L */
        float *x = tu_falloc(calib_rows * d_in);
        tu_fill(&rng, x, calib_rows * d_in, -1, 1);
        for (size_t t = 0; t < calib_rows; t++)
            for (size_t i = 1; i < d_in; i++)
                x[t * d_in + i] += 0.7f * x[t * d_in + i - 1];
        c = tu_dalloc(d_in * d_in);
        ref_xtx(calib_rows, d_in, x, c);
        free(x);
    }
    float *a = tu_falloc(d_in * rank), *b = tu_falloc(rank * d_out);
    masa_residual_result res;
    masa_residual_result_init(&res);
    TU_OK(masa_residual_lowrank(ctx, d_in, d_out, w,
                                use_w_hat ? w_hat : NULL, c, rank, a,
                                d_in * rank, b, rank * d_out, &res));
    residual_ref ref;
    ref_residual(d_in, d_out, e, c, rank, &ref);
    ck_assert(res.jitter == 0);
    ck_assert_msg(fabs(res.error_before - ref.before) <= 1e-12 * ref.before,
                  "before %.15g ref %.15g", res.error_before, ref.before);
    ck_assert_msg(fabs(res.dropped - ref.dropped) <= 1e-10 * ref.before,
                  "dropped %.15g ref %.15g", res.dropped, ref.dropped);
    /* the identity: the error after is the sum of the dropped squared
     * singular values, up to the float32 rounding of A and B */
    ck_assert_msg(fabs(res.error_after - res.dropped) <= 1e-6 * ref.before,
                  "after %.15g dropped %.15g (before %g)", res.error_after,
                  res.dropped, res.error_before);
    /* R^T A B against the reference's best rank-r approximation */
    double *ab = tu_dalloc(ne), *rab = tu_dalloc(ne),
           *rr = tu_dalloc(d_in * d_in);
    for (size_t i = 0; i < d_in; i++)
        for (size_t q = 0; q < rank; q++)
            for (size_t j = 0; j < d_out; j++)
                ab[i * d_out + j] += (double)a[i * rank + q] * b[q * d_out + j];
    if (c)
        ck_assert_int_eq(ref_cholesky(d_in, c, rr), 0);
    else
        for (size_t i = 0; i < d_in; i++)
            rr[i * d_in + i] = 1.0;
    for (size_t i = 0; i < d_in; i++) /* (R^T)_{ik} = R_{ki}, k >= i */
        for (size_t k = i; k < d_in; k++)
            for (size_t j = 0; j < d_out; j++)
                rab[i * d_out + j] += rr[k * d_in + i] * ab[k * d_out + j];
    TU_ASSERT_CLOSE_DD("R^T A B", rab, ref.target, ne, 1e-5);
    free(ab);
    free(rab);
    free(rr);
    free(ref.target);
    free(a);
    free(b);
    free(c);
    free(e);
    free(w);
    free(w_hat);
    masa_context_destroy(ctx);
}

START_TEST(residual_matches_reference)
{
    check_residual(12, 9, 3, 40, 1);
    check_residual(9, 12, 4, 40, 0);
    check_residual(10, 10, 10, 30, 1); /* full rank: nothing dropped */
    check_residual(12, 9, 3, 0, 1);    /* no calibration: plain SVD */
    check_residual(1, 5, 1, 0, 0);
    check_residual(70, 50, 8, 200, 1);
    /* large enough that the triangular products and the check's product
     * run in column blocks on the pool */
    check_residual(320, 300, 160, 400, 1);
}
END_TEST

START_TEST(residual_jitter_and_singular)
{
    masa_context *ctx = tu_context(1);
    size_t d_in = 8, d_out = 6, rank = 2;
    tu_rng rng = {5};
    float w[48], a[16], b[12];
    tu_fill(&rng, w, 48, -1, 1);
    /* 3 calibration rows for 8 features: C is singular, a jitter helps */
    float x[24];
    tu_fill(&rng, x, 24, -1, 1);
    double c[64];
    ref_xtx(3, d_in, x, c);
    masa_residual_result res;
    masa_residual_result_init(&res);
    TU_OK(masa_residual_lowrank(ctx, d_in, d_out, w, NULL, c, rank, a, 16, b,
                                12, &res));
    double mean = 0;
    for (size_t i = 0; i < d_in; i++)
        mean += c[i * d_in + i] / (double)d_in;
    ck_assert(res.jitter > 0 && res.jitter <= 1e-2 * mean);
    ck_assert(fabs(res.error_after - res.dropped) <=
              1e-5 * res.error_before);
    /* C = 0 and C = -I: no jitter makes them positive definite */
    float a0[16], b0[12];
    for (int i = 0; i < 16; i++)
        a[i] = a0[i] = 42.0f;
    for (int i = 0; i < 12; i++)
        b[i] = b0[i] = 42.0f;
    memset(c, 0, sizeof c);
    ck_assert_int_eq(masa_residual_lowrank(ctx, d_in, d_out, w, NULL, c, rank,
                                           a, 16, b, 12, NULL),
                     MASA_ERROR_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(masa_last_error(), "positive definite"));
    for (size_t i = 0; i < d_in; i++)
        c[i * d_in + i] = -1;
    ck_assert_int_eq(masa_residual_lowrank(ctx, d_in, d_out, w, NULL, c, rank,
                                           a, 16, b, 12, NULL),
                     MASA_ERROR_INVALID_ARGUMENT);
    /* strongly indefinite: one large negative eigenvalue */
    for (size_t i = 0; i < d_in; i++)
        c[i * d_in + i] = 1;
    c[0] = -100;
    ck_assert_int_eq(masa_residual_lowrank(ctx, d_in, d_out, w, NULL, c, rank,
                                           a, 16, b, 12, NULL),
                     MASA_ERROR_INVALID_ARGUMENT);
    ck_assert_mem_eq(a, a0, sizeof a);
    ck_assert_mem_eq(b, b0, sizeof b);
    masa_context_destroy(ctx);
}
END_TEST

START_TEST(residual_errors)
{
    masa_context *ctx = tu_context(1);
    float w[12] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}, a[12], b[9];
    double c[16] = {1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1};
    masa_residual_result res;
    masa_residual_result_init(&res);
    /* d_in 4, d_out 3: rank at most 3 */
#define RES(ctx_, w_, wh, c_, rank_, a_, alen, b_, blen, r_)                   \
    masa_residual_lowrank((ctx_), 4, 3, (w_), (wh), (c_), (rank_), (a_),     \
                          (alen), (b_), (blen), (r_))
    ck_assert_int_eq(RES(NULL, w, NULL, c, 2, a, 8, b, 6, NULL),
                     MASA_ERROR_NULL_ARGUMENT);
    ck_assert_int_eq(RES(ctx, NULL, NULL, c, 2, a, 8, b, 6, NULL),
                     MASA_ERROR_NULL_ARGUMENT);
    ck_assert_int_eq(RES(ctx, w, NULL, c, 2, NULL, 8, b, 6, NULL),
                     MASA_ERROR_NULL_ARGUMENT);
    ck_assert_int_eq(RES(ctx, w, NULL, c, 2, a, 8, NULL, 6, NULL),
                     MASA_ERROR_NULL_ARGUMENT);
    ck_assert_int_eq(RES(ctx, w, NULL, c, 0, a, 8, b, 6, NULL),
                     MASA_ERROR_BAD_SHAPE);
    ck_assert_int_eq(masa_residual_lowrank(ctx, 0, 3, w, NULL, c, 1, a, 8, b,
                                           6, NULL),
                     MASA_ERROR_BAD_SHAPE);
    ck_assert_int_eq(RES(ctx, w, NULL, c, 4, a, 12, b, 9, NULL),
                     MASA_ERROR_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(masa_last_error(), "min(d_in, d_out)"));
    ck_assert_int_eq(RES(ctx, w, NULL, c, 2, a, 7, b, 6, NULL),
                     MASA_ERROR_BUFFER_TOO_SMALL);
    ck_assert_int_eq(RES(ctx, w, NULL, c, 2, a, 8, b, 5, NULL),
                     MASA_ERROR_BUFFER_TOO_SMALL);
    ck_assert_int_eq(masa_residual_lowrank(ctx, SIZE_MAX / 2, 3, w, NULL, c,
                                           1, a, 8, b, 6, NULL),
                     MASA_ERROR_OVERFLOW);
    masa_residual_result small = res;
    small.size = 8;
    ck_assert_int_eq(RES(ctx, w, NULL, c, 2, a, 8, b, 6, &small),
                     MASA_ERROR_BAD_STRUCT_SIZE);
    float wh[12] = {0};
    wh[5] = NAN;
    ck_assert_int_eq(RES(ctx, w, wh, c, 2, a, 8, b, 6, NULL),
                     MASA_ERROR_INVALID_ARGUMENT);
    w[0] = INFINITY;
    ck_assert_int_eq(RES(ctx, w, NULL, c, 2, a, 8, b, 6, NULL),
                     MASA_ERROR_INVALID_ARGUMENT);
    w[0] = 1;
    c[5] = NAN;
    ck_assert_int_eq(RES(ctx, w, NULL, c, 2, a, 8, b, 6, NULL),
                     MASA_ERROR_INVALID_ARGUMENT);
    c[5] = 1;
    TU_OK(RES(ctx, w, NULL, c, 3, a, 12, b, 9, &res));
    /* full rank with C = I: nothing left */
    ck_assert(res.error_after <= 1e-10 * res.error_before);
#undef RES
    masa_context_destroy(ctx);
}
END_TEST

/* ------------------------------------------------- allocation failures */

typedef struct alloc_state {
    long count, fail_at, live;
} alloc_state;

static void *hook_malloc(size_t size, void *user)
{
    alloc_state *s = user;
    if (s->count++ == s->fail_at)
        return NULL;
    void *p = malloc(size);
    if (p)
        s->live++;
    return p;
}

static void hook_free(void *p, void *user)
{
    alloc_state *s = user;
    if (p)
        s->live--;
    free(p);
}

/* Every compression call, each allocation failed in turn: OUT_OF_MEMORY
 * with a message, nothing leaked, and the call succeeds once allowed. */
START_TEST(allocation_failures)
{
    alloc_state st = {0, -1, 0};
    masa_context_options o;
    masa_context_options_init(&o);
    o.n_threads = 2;
    o.malloc_fn = hook_malloc;
    o.free_fn = hook_free;
    o.alloc_user = &st;
    masa_context *ctx = NULL;
    TU_OK(masa_context_create(&o, &ctx));
    long base_live = st.live;

    enum { L = 4, R = 6, C = 5, N = 30 };
    tu_rng rng = {3};
    float m[L][N], atoms[2 * N], coefs[2 * L], x[10 * R], a[R * 2],
        b[2 * C];
    tu_fill(&rng, &m[0][0], L * N, -1, 1);
    tu_fill(&rng, x, 10 * R, -1, 1);
    const float *mats[L] = {m[0], m[1], m[2], m[3]};
    double g[L * L], w[L];
    for (int call = 0; call < 10; call++) {
        for (long k = 0;; k++) {
            st.count = 0;
            st.fail_at = k;
            masa_status s = MASA_OK;
            masa_calib *cal = NULL;
            masa_dictionary *d = NULL;
            masa_coefficients *cf = NULL;
            size_t starts[L], at[L];
            masa_group_plan_result pr;
            masa_group_plan_result_init(&pr);
            switch (call) {
            case 0:
                s = masa_gram(ctx, L, R, C, mats, g, L * L);
                break;
            case 1:
                s = masa_matrix_pca(ctx, L, R, C, mats, NULL, 0, 2, atoms,
                                    2 * N, coefs, 2 * L, w, NULL);
                break;
            case 2:
                s = masa_matrix_pca_create(ctx, L, R, C, mats, NULL, 0, 2,
                                           &d, &cf, NULL);
                break;
            case 3:
                s = masa_gram_eigenvalues(ctx, L, g, L, w);
                break;
            case 4:
                s = masa_group_plan(ctx, L, g, R, C, 3 * N, starts, at, L,
                                    &pr);
                break;
            case 5:
                s = masa_calib_create(ctx, R, &cal);
                if (s == MASA_OK)
                    s = masa_calib_accumulate(cal, x, 10);
                break;
            case 6: {
                double cm[R * R];
                ref_xtx(10, R, x, cm);
                s = masa_residual_lowrank(ctx, R, C, m[0], m[1], cm, 2, a,
                                          R * 2, b, 2 * C, NULL);
                break;
            }
            case 7:
                s = masa_residual_lowrank(ctx, R, C, m[0], NULL, NULL, 2, a,
                                          R * 2, b, 2 * C, NULL);
                break;
            case 8: {
                size_t fixed[2] = {0, 2};
                s = masa_group_plan_fixed(ctx, L, g, R, C, 4 * N, 2, fixed,
                                          at, &pr);
                break;
            }
            case 9: {
                double cm[R * R];
                ref_xtx(10, R, x, cm);
                s = masa_calib_create_from_data(ctx, R, cm, 10, &cal);
                break;
            }
            }
            masa_calib_destroy(cal);
            masa_dictionary_destroy(d);
            masa_coefficients_destroy(cf);
            ck_assert_msg(st.live == base_live, "call %d fail_at %ld: %ld "
                          "blocks leaked", call, k, st.live - base_live);
            if (st.count <= k) {
                /* no allocation was failed: the call must have worked */
                ck_assert_msg(s == MASA_OK, "call %d: %s", call,
                              masa_last_error());
                break;
            }
            ck_assert_msg(s == MASA_ERROR_OUT_OF_MEMORY,
                          "call %d fail_at %ld: status %d (%s)", call, k,
                          (int)s, masa_last_error());
            ck_assert_str_ne(masa_last_error(), "");
        }
    }
    st.fail_at = -1;
    masa_context_destroy(ctx);
    ck_assert_int_eq(st.live, 0);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("compress_stats");
    TCase *tc = tcase_create("calib");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, calib_matches_reference);
    tcase_add_test(tc, calib_errors);
    suite_add_tcase(s, tc);
    tc = tcase_create("residual");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, residual_matches_reference);
    tcase_add_test(tc, residual_jitter_and_singular);
    tcase_add_test(tc, residual_errors);
    suite_add_tcase(s, tc);
    tc = tcase_create("alloc");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, allocation_failures);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return tu_run_suite(suite());
}
