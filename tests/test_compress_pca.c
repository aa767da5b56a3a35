/* Gram, Matrix PCA and the grouping planner against the plain double
 * reference (reference_compress.c: Jacobi eigensolver, no LAPACK). */
#include <check.h>
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include <masa/masa.h>

#include "reference_compress.h"
#include "test_util.h"

/* L matrices of n_cols floats: mixtures of `base` random matrices with
 * decaying weights plus a little noise, so the spectrum spreads out. */
static float **make_mats(size_t L, size_t n_cols, size_t base, uint64_t seed)
{
    tu_rng r = {seed};
    float **m = calloc(L, sizeof *m);
    float *b = tu_falloc(base * n_cols);
    tu_fill(&r, b, base * n_cols, -1, 1);
    for (size_t l = 0; l < L; l++) {
        m[l] = tu_falloc(n_cols);
        tu_fill(&r, m[l], n_cols, -0.05f, 0.05f);
        for (size_t k = 0; k < base; k++) {
            double a = tu_unif(&r, -1, 1) / (double)(k + 1);
            for (size_t i = 0; i < n_cols; i++)
                m[l][i] += (float)(a * b[k * n_cols + i]);
        }
    }
    free(b);
    return m;
}

static void free_mats(float **m, size_t L)
{
    for (size_t l = 0; l < L; l++)
        free(m[l]);
    free(m);
}

/* ---------------------------------------------------------------- Gram */

static void check_gram(size_t L, size_t rows, size_t cols, size_t threads)
{
    masa_context *ctx = tu_context(threads);
    float **m = make_mats(L, rows * cols, 3, 11 + L);
    double *g = tu_dalloc(L * L), *ref = tu_dalloc(L * L);
    TU_OK(masa_gram(ctx, L, rows, cols, (const float *const *)m, g, L * L));
    ref_gram(L, rows * cols, (const float *const *)m, ref);
    TU_ASSERT_CLOSE_DD("gram", g, ref, L * L, 1e-13);
    for (size_t i = 0; i < L; i++)
        for (size_t j = 0; j < L; j++)
            ck_assert(g[i * L + j] == g[j * L + i]);
    free(g);
    free(ref);
    free_mats(m, L);
    masa_context_destroy(ctx);
}

START_TEST(gram_matches_reference)
{
    check_gram(5, 7, 9, 1);
    check_gram(5, 7, 9, 2);
    /* several column blocks (65536 / L columns each), a partial last one */
    check_gram(3, 150, 160, 2);
    check_gram(1, 3, 3, 1);
}
END_TEST

START_TEST(gram_errors)
{
    masa_context *ctx = tu_context(1);
    float **m = make_mats(3, 6, 2, 1);
    const float *const *cm = (const float *const *)m;
    double g[9];
    for (int i = 0; i < 9; i++)
        g[i] = -7;
    ck_assert_int_eq(masa_gram(NULL, 3, 2, 3, cm, g, 9),
                     MASA_ERROR_NULL_ARGUMENT);
    ck_assert_int_eq(masa_gram(ctx, 3, 2, 3, NULL, g, 9),
                     MASA_ERROR_NULL_ARGUMENT);
    ck_assert_int_eq(masa_gram(ctx, 3, 2, 3, cm, NULL, 9),
                     MASA_ERROR_NULL_ARGUMENT);
    const float *holes[3] = {m[0], NULL, m[2]};
    ck_assert_int_eq(masa_gram(ctx, 3, 2, 3, holes, g, 9),
                     MASA_ERROR_NULL_ARGUMENT);
    ck_assert_int_eq(masa_gram(ctx, 0, 2, 3, cm, g, 9), MASA_ERROR_BAD_SHAPE);
    ck_assert_int_eq(masa_gram(ctx, 3, 0, 3, cm, g, 9), MASA_ERROR_BAD_SHAPE);
    ck_assert_int_eq(masa_gram(ctx, 3, 2, 3, cm, g, 8),
                     MASA_ERROR_BUFFER_TOO_SMALL);
    ck_assert_int_eq(masa_gram(ctx, 3, SIZE_MAX / 2, 3, cm, g, 9),
                     MASA_ERROR_OVERFLOW);
    m[1][4] = NAN;
    ck_assert_int_eq(masa_gram(ctx, 3, 2, 3, cm, g, 9),
                     MASA_ERROR_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(masa_last_error(), "matrix 1"));
    m[1][4] = INFINITY;
    ck_assert_int_eq(masa_gram(ctx, 3, 2, 3, cm, g, 9),
                     MASA_ERROR_INVALID_ARGUMENT);
    for (int i = 0; i < 9; i++)
        ck_assert(g[i] == -7); /* untouched */
    free_mats(m, 3);
    masa_context_destroy(ctx);
}
END_TEST

START_TEST(gram_eigenvalues_match_reference)
{
    masa_context *ctx = tu_context(1);
    size_t L = 7;
    float **m = make_mats(L, 40, 4, 5);
    double *g = tu_dalloc(L * L), w[7], ref_w[7], v[49];
    TU_OK(masa_gram(ctx, L, 5, 8, (const float *const *)m, g, L * L));
    TU_OK(masa_gram_eigenvalues(ctx, L, g, L, w));
    ref_eigen(L, g, L, ref_w, v);
    TU_ASSERT_CLOSE_DD("eigenvalues", w, ref_w, L, 1e-12);
    /* a sub-block through the row stride: layers 2..5 */
    TU_OK(masa_gram_eigenvalues(ctx, 4, g + 2 * L + 2, L, w));
    ref_eigen(4, g + 2 * L + 2, L, ref_w, v);
    TU_ASSERT_CLOSE_DD("block eigenvalues", w, ref_w, 4, 1e-12);
    /* errors */
    ck_assert_int_eq(masa_gram_eigenvalues(NULL, L, g, L, w),
                     MASA_ERROR_NULL_ARGUMENT);
    ck_assert_int_eq(masa_gram_eigenvalues(ctx, L, NULL, L, w),
                     MASA_ERROR_NULL_ARGUMENT);
    ck_assert_int_eq(masa_gram_eigenvalues(ctx, L, g, L, NULL),
                     MASA_ERROR_NULL_ARGUMENT);
    ck_assert_int_eq(masa_gram_eigenvalues(ctx, 0, g, L, w),
                     MASA_ERROR_BAD_SHAPE);
    ck_assert_int_eq(masa_gram_eigenvalues(ctx, L, g, L - 1, w),
                     MASA_ERROR_BAD_SHAPE);
    g[3 * L + 1] = NAN;
    ck_assert_int_eq(masa_gram_eigenvalues(ctx, L, g, L, w),
                     MASA_ERROR_INVALID_ARGUMENT);
    free(g);
    free_mats(m, L);
    masa_context_destroy(ctx);
}
END_TEST

/* ---------------------------------------------------------------- PCA */

/* The reference solution: atoms and coefficients in double from the Jacobi
 * eigenvectors of the double Gram. */
static void ref_pca(size_t L, size_t n_cols, const float *const *m, size_t S,
                    double *atoms, double *coefs, double *w)
{
    double *g = tu_dalloc(L * L), *v = tu_dalloc(L * L);
    ref_gram(L, n_cols, m, g);
    ref_eigen(L, g, L, w, v);
    for (size_t s = 0; s < S; s++) {
        for (size_t i = 0; i < n_cols; i++) {
            double acc = 0;
            for (size_t l = 0; l < L; l++)
                acc += v[l * L + s] * (double)m[l][i];
            atoms[s * n_cols + i] = acc / sqrt(w[s]);
        }
        for (size_t l = 0; l < L; l++)
            coefs[l * S + s] = sqrt(w[s]) * v[l * L + s];
    }
    free(g);
    free(v);
}

static void check_pca(size_t L, size_t rows, size_t cols, size_t S,
                      size_t threads, int give_gram)
{
    masa_context *ctx = tu_context(threads);
    size_t N = rows * cols;
    float **m = make_mats(L, N, L, 100 + L * 7 + S);
    const float *const *cm = (const float *const *)m;
    float *atoms = tu_falloc(S * N), *coefs = tu_falloc(L * S);
    double *w = tu_dalloc(L), *ra = tu_dalloc(S * N), *rc = tu_dalloc(L * S);
    double *rw = tu_dalloc(L), *g = NULL;
    if (give_gram) {
        /* embedded in a larger matrix: row stride L + 3 */
        size_t ld = L + 3;
        g = tu_dalloc(ld * L);
        double *tight = tu_dalloc(L * L);
        ref_gram(L, N, cm, tight);
        for (size_t i = 0; i < L; i++)
            memcpy(g + i * ld, tight + i * L, L * sizeof *g);
        free(tight);
    }
    masa_pca_result res;
    masa_pca_result_init(&res);
    TU_OK(masa_matrix_pca(ctx, L, rows, cols, cm, g, g ? L + 3 : 0, S, atoms,
                          S * N, coefs, L * S, w, &res));
    ref_pca(L, N, cm, S, ra, rc, rw);

    TU_ASSERT_CLOSE_DD("eigenvalues", w, rw, L, 1e-12);
    TU_ASSERT_CLOSE("atoms", atoms, ra, S * N, 1e-5);
    TU_ASSERT_CLOSE("coefficients", coefs, rc, L * S, 1e-5);

    /* orthonormal atoms (inner products in double of the float atoms) */
    for (size_t s = 0; s < S; s++)
        for (size_t t = 0; t < S; t++) {
            double dot = 0;
            for (size_t i = 0; i < N; i++)
                dot += (double)atoms[s * N + i] * atoms[t * N + i];
            ck_assert_msg(fabs(dot - (s == t)) < 1e-5,
                          "<D_%zu, D_%zu> = %.9g", s, t, dot);
        }

    /* reported energies, and the reconstruction error they promise */
    double total = 0, kept = 0, dropped = 0, recon = 0;
    for (size_t l = 0; l < L; l++) {
        total += rw[l];
        if (l < S)
            kept += rw[l];
        else
            dropped += fmax(rw[l], 0);
        for (size_t i = 0; i < N; i++) {
            double x = m[l][i];
            for (size_t s = 0; s < S; s++)
                x -= (double)coefs[l * S + s] * atoms[s * N + i];
            recon += x * x;
        }
    }
    ck_assert_uint_eq(res.size, sizeof res);
    ck_assert_uint_eq(res.rank, L);
    ck_assert(fabs(res.total_energy - total) <= 1e-12 * total);
    ck_assert(fabs(res.captured_energy - kept) <= 1e-12 * total);
    ck_assert(fabs(res.residual_energy - dropped) <= 1e-12 * total);
    ck_assert_msg(fabs(recon - res.residual_energy) <= 1e-5 * total,
                  "reconstruction %.9g, dropped eigenvalues %.9g (total %g)",
                  recon, res.residual_energy, total);

    free(atoms);
    free(coefs);
    free(w);
    free(ra);
    free(rc);
    free(rw);
    free(g);
    free_mats(m, L);
    masa_context_destroy(ctx);
}

START_TEST(pca_matches_reference)
{
    check_pca(6, 10, 12, 3, 1, 0);
    check_pca(6, 10, 12, 3, 2, 0);
    check_pca(6, 10, 12, 6, 2, 0); /* every atom: reconstruction exact */
    check_pca(6, 10, 12, 1, 1, 1); /* the caller's Gram, with a row stride */
    check_pca(9, 130, 70, 4, 2, 0); /* several column blocks */
    check_pca(1, 4, 5, 1, 1, 0);
}
END_TEST

START_TEST(pca_create_gives_dictionary_and_table)
{
    masa_context *ctx = tu_context(2);
    size_t L = 5, rows = 6, cols = 7, S = 2, N = rows * cols;
    float **m = make_mats(L, N, 3, 77);
    const float *const *cm = (const float *const *)m;
    float *atoms = tu_falloc(S * N), *coefs = tu_falloc(L * S);
    TU_OK(masa_matrix_pca(ctx, L, rows, cols, cm, NULL, 0, S, atoms, S * N,
                          coefs, L * S, NULL, NULL));
    masa_dictionary *d = NULL;
    masa_coefficients *c = NULL;
    masa_pca_result res;
    masa_pca_result_init(&res);
    TU_OK(masa_matrix_pca_create(ctx, L, rows, cols, cm, NULL, 0, S, &d, &c,
                                 &res));
    size_t n_atoms, r, cc, n_layers;
    TU_OK(masa_dictionary_shape(d, &n_atoms, &r, &cc));
    TU_OK(masa_coefficients_shape(c, &n_layers, &n_atoms));
    ck_assert_uint_eq(r, rows);
    ck_assert_uint_eq(cc, cols);
    ck_assert_uint_eq(n_layers, L);
    ck_assert_uint_eq(n_atoms, S);
    ck_assert_mem_eq(masa_dictionary_data(d), atoms, S * N * sizeof(float));
    ck_assert_mem_eq(masa_coefficients_data(c), coefs, L * S * sizeof(float));
    /* composing layer l gives its reconstruction */
    float *wl = tu_falloc(N);
    TU_OK(masa_compose(d, c, 3, wl, N));
    double *ref = tu_dalloc(N);
    for (size_t i = 0; i < N; i++)
        for (size_t s = 0; s < S; s++)
            ref[i] += (double)coefs[3 * S + s] * atoms[s * N + i];
    TU_ASSERT_CLOSE("composed", wl, ref, N, 1e-6);
    masa_dictionary_destroy(d);
    masa_coefficients_destroy(c);
    /* failure leaves NULLs */
    d = (masa_dictionary *)1;
    c = (masa_coefficients *)1;
    ck_assert_int_eq(masa_matrix_pca_create(ctx, L, rows, cols, cm, NULL, 0,
                                            L + 1, &d, &c, NULL),
                     MASA_ERROR_INVALID_ARGUMENT);
    ck_assert_ptr_null(d);
    ck_assert_ptr_null(c);
    ck_assert_int_eq(masa_matrix_pca_create(ctx, L, rows, cols, cm, NULL, 0,
                                            S, NULL, &c, NULL),
                     MASA_ERROR_NULL_ARGUMENT);
    free(wl);
    free(ref);
    free(atoms);
    free(coefs);
    free_mats(m, L);
    masa_context_destroy(ctx);
}
END_TEST

START_TEST(pca_errors_leave_outputs_alone)
{
    masa_context *ctx = tu_context(1);
    size_t L = 4, rows = 3, cols = 5, N = 15, S = 2;
    float **m = make_mats(L, N, 4, 9);
    const float *const *cm = (const float *const *)m;
    float atoms[4 * 15], coefs[16];
    double w[4];
    masa_pca_result res;
    for (size_t i = 0; i < 60; i++)
        atoms[i] = 42.0f;
    for (size_t i = 0; i < 16; i++)
        coefs[i] = 42.0f;
    w[0] = 42.0;
#define PCA(n, r_, c_, mats, gram, ld, s, alen, clen, result)                  \
    masa_matrix_pca(ctx, (n), (r_), (c_), (mats), (gram), (ld), (s), atoms,  \
                    (alen), coefs, (clen), w, (result))
    ck_assert_int_eq(masa_matrix_pca(NULL, L, rows, cols, cm, NULL, 0, S,
                                     atoms, 60, coefs, 16, w, NULL),
                     MASA_ERROR_NULL_ARGUMENT);
    ck_assert_int_eq(PCA(L, rows, cols, NULL, NULL, 0, S, 60, 16, NULL),
                     MASA_ERROR_NULL_ARGUMENT);
    ck_assert_int_eq(masa_matrix_pca(ctx, L, rows, cols, cm, NULL, 0, S, NULL,
                                     60, coefs, 16, w, NULL),
                     MASA_ERROR_NULL_ARGUMENT);
    ck_assert_int_eq(masa_matrix_pca(ctx, L, rows, cols, cm, NULL, 0, S,
                                     atoms, 60, NULL, 16, w, NULL),
                     MASA_ERROR_NULL_ARGUMENT);
    ck_assert_int_eq(PCA(L, rows, cols, cm, NULL, 0, 0, 60, 16, NULL),
                     MASA_ERROR_BAD_SHAPE);
    ck_assert_int_eq(PCA(0, rows, cols, cm, NULL, 0, S, 60, 16, NULL),
                     MASA_ERROR_BAD_SHAPE);
    ck_assert_int_eq(PCA(L, rows, cols, cm, NULL, 0, L + 1, 60, 16, NULL),
                     MASA_ERROR_INVALID_ARGUMENT);
    ck_assert_int_eq(PCA(L, rows, cols, cm, NULL, 0, S, 2 * N - 1, 16, NULL),
                     MASA_ERROR_BUFFER_TOO_SMALL);
    ck_assert_int_eq(PCA(L, rows, cols, cm, NULL, 0, S, 60, L * S - 1, NULL),
                     MASA_ERROR_BUFFER_TOO_SMALL);
    double g[16] = {0};
    ck_assert_int_eq(PCA(L, rows, cols, cm, g, L - 1, S, 60, 16, NULL),
                     MASA_ERROR_BAD_SHAPE);
    masa_pca_result_init(&res);
    res.size = sizeof(size_t);
    ck_assert_int_eq(PCA(L, rows, cols, cm, NULL, 0, S, 60, 16, &res),
                     MASA_ERROR_BAD_STRUCT_SIZE);
    ck_assert_int_eq(PCA(L, SIZE_MAX / 4, 3, cm, NULL, 0, S, 60, 16, NULL),
                     MASA_ERROR_OVERFLOW);

    /* a non-finite element, with and without a (finite) given Gram */
    ref_gram(L, N, cm, g);
    m[2][7] = NAN;
    ck_assert_int_eq(PCA(L, rows, cols, cm, NULL, 0, S, 60, 16, NULL),
                     MASA_ERROR_INVALID_ARGUMENT);
    ck_assert_int_eq(PCA(L, rows, cols, cm, g, L, S, 60, 16, NULL),
                     MASA_ERROR_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(masa_last_error(), "matrix 2"));
    m[2][7] = 0.5f;
    g[1 * 4 + 0] = INFINITY; /* a non-finite Gram */
    ck_assert_int_eq(PCA(L, rows, cols, cm, g, L, S, 60, 16, NULL),
                     MASA_ERROR_INVALID_ARGUMENT);

    /* more atoms than the numerical rank: matrix 3 = 2 x matrix 1 and
     * matrix 2 = matrix 0 (exact in float), so the rank is 2 */
    for (size_t i = 0; i < N; i++) {
        m[3][i] = 2.0f * m[1][i];
        m[2][i] = m[0][i];
    }
    ck_assert_int_eq(PCA(L, rows, cols, cm, NULL, 0, 3, 60, 16, NULL),
                     MASA_ERROR_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(masa_last_error(), "rank (2)"));
    for (size_t i = 0; i < 60; i++)
        ck_assert(atoms[i] == 42.0f);
    for (size_t i = 0; i < 16; i++)
        ck_assert(coefs[i] == 42.0f);
    ck_assert(w[0] == 42.0);
    /* up to the rank is fine, and the rank is reported */
    masa_pca_result_init(&res);
    TU_OK(PCA(L, rows, cols, cm, NULL, 0, 2, 60, 16, &res));
    ck_assert_uint_eq(res.rank, 2);
    ck_assert(res.residual_energy <= 1e-9 * res.total_energy);
    /* all-zero matrices have rank 0 */
    for (size_t l = 0; l < L; l++)
        memset(m[l], 0, N * sizeof(float));
    ck_assert_int_eq(PCA(L, rows, cols, cm, NULL, 0, 1, 60, 16, NULL),
                     MASA_ERROR_INVALID_ARGUMENT);
#undef PCA
    free_mats(m, L);
    masa_context_destroy(ctx);
}
END_TEST

START_TEST(pca_result_struct_sizes)
{
    /* a newer program's larger struct (zero tail) is filled as far as this
     * library knows it; a struct below the first version's size is refused */
    masa_context *ctx = tu_context(1);
    size_t L = 3, N = 8;
    float **m = make_mats(L, N, 3, 3);
    float atoms[24], coefs[9];
    struct {
        masa_pca_result r;
        double guard;
    } big;
    memset(&big, 0, sizeof big);
    big.r.size = sizeof big;
    TU_OK(masa_matrix_pca(ctx, L, 2, 4, (const float *const *)m, NULL, 0, 2,
                          atoms, 24, coefs, 9, NULL, &big.r));
    ck_assert_uint_eq(big.r.size, sizeof big);
    ck_assert(big.r.total_energy > 0 && big.r.captured_energy > 0);
    ck_assert(big.guard == 0);
    big.r.size = offsetof(masa_pca_result, captured_energy);
    ck_assert_int_eq(masa_matrix_pca(ctx, L, 2, 4, (const float *const *)m,
                                     NULL, 0, 2, atoms, 24, coefs, 9, NULL,
                                     &big.r),
                     MASA_ERROR_BAD_STRUCT_SIZE);
    free_mats(m, L);
    masa_context_destroy(ctx);
}
END_TEST

/* ---------------------------------------------------------------- planner */

typedef struct plan {
    size_t n_groups, starts[16], atoms[16], params;
    double err;
} plan;

/* error of keeping S atoms for layers [i, j): reference eigenvalues */
static double seg_err(const double *g, size_t L, size_t i, size_t j, size_t S)
{
    size_t n = j - i;
    double w[64], v[64 * 64];
    ck_assert_uint_le(n, 64);
    ref_eigen(n, g + i * L + i, L, w, v);
    double e = 0;
    for (size_t k = S; k < n; k++)
        e += fmax(w[k], 0);
    return e;
}

/* Brute force over every cut set (or the fixed one) and every S per group:
 * the smallest error within the budget, then the fewest parameters. */
static void brute_rec(const double *g, size_t L, size_t N, size_t budget,
                      size_t pos, plan *cur, plan *best, unsigned cut_mask,
                      int fixed)
{
    if (pos == L) {
        if (cur->params <= budget &&
            (best->n_groups == 0 || cur->err < best->err - 1e-12 * best->err ||
             (fabs(cur->err - best->err) <= 1e-12 * best->err &&
              cur->params < best->params)))
            *best = *cur;
        return;
    }
    for (size_t j = pos + 1; j <= L; j++) {
        if (fixed) {
            /* the next cut after pos (bit j set) or the end */
            size_t next = pos + 1;
            while (next < L && !(cut_mask >> next & 1))
                next++;
            if (j != next)
                continue;
        }
        for (size_t S = 1; S <= j - pos; S++) {
            plan save = *cur;
            cur->starts[cur->n_groups] = pos;
            cur->atoms[cur->n_groups] = S;
            cur->n_groups++;
            cur->params += S * (N + (j - pos));
            cur->err += seg_err(g, L, pos, j, S);
            brute_rec(g, L, N, budget, j, cur, best, cut_mask, fixed);
            *cur = save;
        }
    }
}

static double plan_error(const double *g, size_t L, size_t n_groups,
                         const size_t *starts, const size_t *atoms,
                         size_t N, size_t *params)
{
    double e = 0;
    *params = 0;
    for (size_t k = 0; k < n_groups; k++) {
        size_t end = k + 1 < n_groups ? starts[k + 1] : L;
        e += seg_err(g, L, starts[k], end, atoms[k]);
        *params += atoms[k] * (N + end - starts[k]);
    }
    return e;
}

static void check_plan(size_t L, size_t rows, size_t cols, uint64_t seed)
{
    masa_context *ctx = tu_context(1);
    size_t N = rows * cols;
    float **m = make_mats(L, N, 3, seed);
    double *g = tu_dalloc(L * L);
    TU_OK(masa_gram(ctx, L, rows, cols, (const float *const *)m, g, L * L));
    size_t lo = N + L, hi = L * (N + L);
    for (size_t budget = lo; budget <= hi + 3; budget += (hi - lo) / 23 + 1) {
        plan best = {0}, cur = {0};
        brute_rec(g, L, N, budget, 0, &cur, &best, 0, 0);
        ck_assert_uint_gt(best.n_groups, 0);
        size_t starts[16], atoms[16];
        masa_group_plan_result res;
        masa_group_plan_result_init(&res);
        TU_OK(masa_group_plan(ctx, L, g, rows, cols, budget, starts, atoms,
                              L, &res));
        size_t params;
        double err = plan_error(g, L, res.n_groups, starts, atoms, N,
                                &params);
        double tol = 1e-10 * res.total_energy;
        ck_assert_uint_eq(starts[0], 0);
        ck_assert_uint_le(res.params, budget);
        ck_assert_uint_eq(params, res.params);
        ck_assert_msg(fabs(err - res.error) <= tol, "reported %g, plan %g",
                      res.error, err);
        ck_assert_msg(fabs(res.error - best.err) <= tol,
                      "L %zu budget %zu: planner %.12g, brute force %.12g",
                      L, budget, res.error, best.err);
        if (fabs(res.error - best.err) <= 1e-12 * best.err)
            ck_assert_uint_le(res.params, best.params);

        /* fixed cuts: every other layer starts a group */
        size_t n_fixed = 0, fixed[16];
        unsigned mask = 0;
        for (size_t l = 0; l < L; l += 2) {
            fixed[n_fixed++] = l;
            mask |= 1u << l;
        }
        size_t cheapest = n_fixed * N + L;
        plan fbest = {0}, fcur = {0};
        brute_rec(g, L, N, budget, 0, &fcur, &fbest, mask, 1);
        masa_group_plan_result fres;
        masa_group_plan_result_init(&fres);
        masa_status st = masa_group_plan_fixed(ctx, L, g, rows, cols, budget,
                                               n_fixed, fixed, atoms, &fres);
        if (budget < cheapest) {
            ck_assert_int_eq(st, MASA_ERROR_INVALID_ARGUMENT);
            ck_assert_uint_eq(fbest.n_groups, 0);
            continue;
        }
        TU_OK(st);
        ck_assert_uint_eq(fres.n_groups, n_fixed);
        err = plan_error(g, L, n_fixed, fixed, atoms, N, &params);
        ck_assert_uint_eq(params, fres.params);
        ck_assert_uint_le(params, budget);
        ck_assert(fabs(err - fres.error) <= tol);
        ck_assert_msg(fabs(fres.error - fbest.err) <= tol,
                      "fixed: planner %.12g, brute force %.12g", fres.error,
                      fbest.err);
    }
    free(g);
    free_mats(m, L);
    masa_context_destroy(ctx);
}

START_TEST(plan_matches_brute_force)
{
    check_plan(5, 2, 3, 1);  /* coefficients weigh as much as atoms */
    check_plan(6, 3, 3, 2);
    check_plan(7, 4, 8, 3);
    check_plan(1, 2, 2, 4);
}
END_TEST

START_TEST(plan_errors)
{
    masa_context *ctx = tu_context(1);
    size_t L = 4, rows = 2, cols = 3, N = 6;
    float **m = make_mats(L, N, 3, 8);
    double g[16];
    TU_OK(masa_gram(ctx, L, rows, cols, (const float *const *)m, g, 16));
    size_t starts[4] = {9, 9, 9, 9}, atoms[4] = {9, 9, 9, 9};
    masa_group_plan_result res;
    masa_group_plan_result_init(&res);
    size_t big = 100000;
    ck_assert_int_eq(masa_group_plan(NULL, L, g, rows, cols, big, starts,
                                     atoms, 4, &res),
                     MASA_ERROR_NULL_ARGUMENT);
    ck_assert_int_eq(masa_group_plan(ctx, L, NULL, rows, cols, big, starts,
                                     atoms, 4, &res),
                     MASA_ERROR_NULL_ARGUMENT);
    ck_assert_int_eq(masa_group_plan(ctx, L, g, rows, cols, big, NULL, atoms,
                                     4, &res),
                     MASA_ERROR_NULL_ARGUMENT);
    ck_assert_int_eq(masa_group_plan(ctx, L, g, rows, cols, big, starts,
                                     atoms, 4, NULL),
                     MASA_ERROR_NULL_ARGUMENT);
    ck_assert_int_eq(masa_group_plan(ctx, 0, g, rows, cols, big, starts,
                                     atoms, 4, &res),
                     MASA_ERROR_BAD_SHAPE);
    ck_assert_int_eq(masa_group_plan(ctx, L, g, rows, 0, big, starts, atoms,
                                     4, &res),
                     MASA_ERROR_BAD_SHAPE);
    /* beyond the planner's limit (nothing is read) */
    ck_assert_int_eq(masa_group_plan(ctx, 257, g, rows, cols, big, starts,
                                     atoms, 4, &res),
                     MASA_ERROR_INVALID_ARGUMENT);
    /* below one group with one atom */
    ck_assert_int_eq(masa_group_plan(ctx, L, g, rows, cols, N + L - 1,
                                     starts, atoms, 4, &res),
                     MASA_ERROR_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(masa_last_error(), "10 parameters"));
    ck_assert_int_eq(masa_group_plan(ctx, L, g, SIZE_MAX / 2, 3, big, starts,
                                     atoms, 4, &res),
                     MASA_ERROR_OVERFLOW);
    masa_group_plan_result small = res;
    small.size = 4;
    ck_assert_int_eq(masa_group_plan(ctx, L, g, rows, cols, big, starts,
                                     atoms, 4, &small),
                     MASA_ERROR_BAD_STRUCT_SIZE);
    /* a generous budget keeps every layer: the plan needs >= 1 group; with
     * capacity 0 nothing fits */
    ck_assert_int_eq(masa_group_plan(ctx, L, g, rows, cols, big, starts,
                                     atoms, 0, &res),
                     MASA_ERROR_BUFFER_TOO_SMALL);
    for (int i = 0; i < 4; i++)
        ck_assert(starts[i] == 9 && atoms[i] == 9);
    g[5] = NAN;
    ck_assert_int_eq(masa_group_plan(ctx, L, g, rows, cols, big, starts,
                                     atoms, 4, &res),
                     MASA_ERROR_INVALID_ARGUMENT);
    TU_OK(masa_gram(ctx, L, rows, cols, (const float *const *)m, g, 16));

    /* fixed cuts */
    size_t ok[2] = {0, 2}, not0[2] = {1, 2}, down[3] = {0, 2, 1},
           past[2] = {0, 4};
    ck_assert_int_eq(masa_group_plan_fixed(ctx, L, g, rows, cols, big, 0, ok,
                                           atoms, &res),
                     MASA_ERROR_BAD_SHAPE);
    ck_assert_int_eq(masa_group_plan_fixed(ctx, L, g, rows, cols, big, 2,
                                           NULL, atoms, &res),
                     MASA_ERROR_NULL_ARGUMENT);
    ck_assert_int_eq(masa_group_plan_fixed(ctx, L, g, rows, cols, big, 2,
                                           not0, atoms, &res),
                     MASA_ERROR_INVALID_ARGUMENT);
    ck_assert_int_eq(masa_group_plan_fixed(ctx, L, g, rows, cols, big, 3,
                                           down, atoms, &res),
                     MASA_ERROR_INVALID_ARGUMENT);
    ck_assert_int_eq(masa_group_plan_fixed(ctx, L, g, rows, cols, big, 2,
                                           past, atoms, &res),
                     MASA_ERROR_INVALID_ARGUMENT);
    ck_assert_int_eq(masa_group_plan_fixed(ctx, L, g, rows, cols, big, 5, ok,
                                           atoms, &res),
                     MASA_ERROR_INVALID_ARGUMENT);
    /* two groups need 2N + L */
    ck_assert_int_eq(masa_group_plan_fixed(ctx, L, g, rows, cols,
                                           2 * N + L - 1, 2, ok, atoms, &res),
                     MASA_ERROR_INVALID_ARGUMENT);
    TU_OK(masa_group_plan_fixed(ctx, L, g, rows, cols, 2 * N + L, 2, ok,
                                atoms, &res));
    ck_assert_uint_eq(atoms[0], 1);
    ck_assert_uint_eq(atoms[1], 1);
    free_mats(m, L);
    masa_context_destroy(ctx);
}
END_TEST

START_TEST(plan_scales_to_real_depths)
{
    /* 32 layers (a 1B-class model), budget a third of the layers' size: the
     * Pareto fronts stay small enough to finish quickly */
    masa_context *ctx = tu_context(1);
    size_t L = 32, rows = 16, cols = 16, N = 256;
    float **m = make_mats(L, N, 8, 21);
    double *g = tu_dalloc(L * L);
    TU_OK(masa_gram(ctx, L, rows, cols, (const float *const *)m, g, L * L));
    size_t starts[32], atoms[32];
    masa_group_plan_result res;
    masa_group_plan_result_init(&res);
    TU_OK(masa_group_plan(ctx, L, g, rows, cols, L * N / 3, starts, atoms, L,
                          &res));
    size_t params;
    double err = plan_error(g, L, res.n_groups, starts, atoms, N, &params);
    ck_assert_uint_eq(params, res.params);
    ck_assert(params <= L * N / 3);
    ck_assert(fabs(err - res.error) <= 1e-10 * res.total_energy);
    /* no worse than the best single group at the same budget */
    size_t one_start = 0, one_atoms;
    masa_group_plan_result one;
    masa_group_plan_result_init(&one);
    TU_OK(masa_group_plan_fixed(ctx, L, g, rows, cols, L * N / 3, 1,
                                &one_start, &one_atoms, &one));
    ck_assert(res.error <= one.error * (1 + 1e-12));
    free(g);
    free_mats(m, L);
    masa_context_destroy(ctx);
}
END_TEST

/* ---------------------------------------------------------------- threads */

typedef struct pca_job {
    masa_context *ctx;
    size_t L, rows, cols, S;
    const float *const *mats;
    float *atoms, *coefs;
    masa_status st;
} pca_job;

static void *run_pca(void *arg)
{
    pca_job *j = arg;
    for (int rep = 0; rep < 3 && j->st == MASA_OK; rep++)
        j->st = masa_matrix_pca(j->ctx, j->L, j->rows, j->cols, j->mats, NULL,
                                0, j->S, j->atoms, j->S * j->rows * j->cols,
                                j->coefs, j->L * j->S, NULL, NULL);
    return NULL;
}

/* Several threads on one context (its pool serves one call at a time; the
 * others run on their own thread): the same results as one call alone. */
START_TEST(pca_concurrent_calls_on_one_context)
{
    masa_context *ctx = tu_context(2);
    size_t L = 5, rows = 40, cols = 30, S = 2, N = rows * cols;
    float **m = make_mats(L, N, 3, 61);
    const float *const *cm = (const float *const *)m;
    float *want_a = tu_falloc(S * N), *want_c = tu_falloc(L * S);
    TU_OK(masa_matrix_pca(ctx, L, rows, cols, cm, NULL, 0, S, want_a, S * N,
                          want_c, L * S, NULL, NULL));
    enum { T = 3 };
    pca_job jobs[T];
    pthread_t threads[T];
    for (int t = 0; t < T; t++) {
        jobs[t] = (pca_job){ctx, L, rows, cols, S, cm, tu_falloc(S * N),
                            tu_falloc(L * S), MASA_OK};
        ck_assert_int_eq(pthread_create(&threads[t], NULL, run_pca, &jobs[t]),
                         0);
    }
    for (int t = 0; t < T; t++) {
        pthread_join(threads[t], NULL);
        ck_assert_int_eq(jobs[t].st, MASA_OK);
        /* partial sums may add in another order: float rounding only */
        TU_ASSERT_CLOSE_FF("atoms", jobs[t].atoms, want_a, S * N, 1e-6);
        TU_ASSERT_CLOSE_FF("coefficients", jobs[t].coefs, want_c, L * S,
                           1e-6);
        free(jobs[t].atoms);
        free(jobs[t].coefs);
    }
    free(want_a);
    free(want_c);
    free_mats(m, L);
    masa_context_destroy(ctx);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("compress_pca");
    TCase *tc = tcase_create("gram");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, gram_matches_reference);
    tcase_add_test(tc, gram_errors);
    tcase_add_test(tc, gram_eigenvalues_match_reference);
    suite_add_tcase(s, tc);
    tc = tcase_create("pca");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, pca_matches_reference);
    tcase_add_test(tc, pca_create_gives_dictionary_and_table);
    tcase_add_test(tc, pca_errors_leave_outputs_alone);
    tcase_add_test(tc, pca_result_struct_sizes);
    tcase_add_test(tc, pca_concurrent_calls_on_one_context);
    suite_add_tcase(s, tc);
    tc = tcase_create("planner");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, plan_matches_brute_force);
    tcase_add_test(tc, plan_errors);
    tcase_add_test(tc, plan_scales_to_real_depths);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return tu_run_suite(suite());
}
