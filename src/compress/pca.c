/* Matrix PCA of one group of layers: atoms D_s = sum_l V[l, s] W_l /
 * sqrt(lambda_s) and coefficients c[l, s] = sqrt(lambda_s) V[l, s] from the
 * eigen-decomposition of the group's Gram (see compress.h). */
#include <math.h>
#include <string.h>

#include "compress/gram.h"
#include "compress/linalg.h"
#include "compress/stack.h"

MASA_API void masa_pca_result_default(masa_pca_result *result, size_t size)
{
    if (!result || size < sizeof(size_t))
        return;
    masa_pca_result full = {.size = sizeof full};
    masa__struct_defaults(result, size, &full, sizeof full);
}

typedef struct atom_job {
    size_t n_mats, n_atoms, n_cols, block_cols;
    const double *mix;  /* n_atoms x n_mats: V[l, s] / sqrt(lambda_s) */
    double *scratch;    /* per thread: n_atoms x block_cols */
    float *atoms;
} atom_job;

static void atom_block(void *arg, size_t thread, size_t col0, size_t n_cols,
                       const double *block)
{
    atom_job *j = arg;
    double *out = j->scratch + thread * j->n_atoms * j->block_cols;
    /* already one of the pool's tasks: this thread only */
    masa__dgemm(NULL, j->n_atoms, n_cols, j->n_mats, 1.0, j->mix, j->n_mats,
                1, block, n_cols, 1, 0.0, out, n_cols, 1);
    for (size_t s = 0; s < j->n_atoms; s++) {
        float *dst = j->atoms + s * j->n_cols + col0;
        const double *src = out + s * n_cols;
        for (size_t i = 0; i < n_cols; i++)
            dst[i] = (float)src[i];
    }
}

/* Everything but the argument checks; atoms and coefs are written only on
 * success (atoms is written by the last pass, which cannot fail). */
static masa_status pca(const char *fn, masa_context *ctx, size_t n_mats,
                       size_t n_cols, const float *const *mats,
                       const double *gram, size_t gram_ld, size_t n_atoms,
                       float *atoms, float *coefs, double *eigenvalues,
                       masa_pca_result *result)
{
    size_t threads = ctx->n_threads ? ctx->n_threads : 1;
    size_t block_cols = masa__stack_block_cols(n_mats);
    size_t n2, v_count, scratch_count;
    if (!masa__mul(n_mats, n_mats, &n2) || !masa__mul(n2, 2, &v_count) ||
        !masa__add(&v_count, n_mats) ||
        !masa__mul3(threads, n_atoms, block_cols, &scratch_count))
        return masa__fail(MASA_ERROR_OVERFLOW, "%s: scratch overflows", fn);
    double *v = masa__calloc(ctx, v_count, sizeof(double));
    double *scratch = masa__calloc(ctx, scratch_count, sizeof(double));
    if (!v || !scratch) {
        masa__free(ctx, v);
        masa__free(ctx, scratch);
        return masa__fail(MASA_ERROR_OUT_OF_MEMORY,
                          "%s: cannot allocate the eigenproblem's storage",
                          fn);
    }
    double *mix = v + n2, *w = v + 2 * n2;
    masa_status st;
    if (gram) {
        for (size_t i = 0; i < n_mats; i++)
            memcpy(v + i * n_mats, gram + i * gram_ld,
                   n_mats * sizeof(double));
        /* the atom pass writes into atoms as it goes: check the input
         * before anything is written */
        st = masa__check_gram(fn, n_mats, gram, gram_ld);
        for (size_t l = 0; st == MASA_OK && l < n_mats; l++)
            if (!masa__all_finite_f(mats[l], n_cols))
                st = masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                                "%s: matrix %zu has a non-finite element", fn,
                                l);
    } else {
        st = masa__gram(fn, ctx, n_mats, n_cols, mats, v);
    }
    double trace = 0.0;
    for (size_t i = 0; st == MASA_OK && i < n_mats; i++)
        trace += v[i * n_mats + i];
    if (st == MASA_OK)
        st = masa__syevd(fn, ctx, true, n_mats, v, n_mats, w);
    size_t rank = st == MASA_OK ? masa__gram_rank(n_mats, w) : 0;
    if (st == MASA_OK && n_atoms > rank)
        st = masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                        "%s: n_atoms (%zu) exceeds the numerical rank (%zu) "
                        "of the %zu matrices: atoms beyond it would be noise",
                        fn, n_atoms, rank, n_mats);
    if (st != MASA_OK) {
        masa__free(ctx, v);
        masa__free(ctx, scratch);
        return st;
    }
    for (size_t s = 0; s < n_atoms; s++) {
        double inv = 1.0 / sqrt(w[s]);
        for (size_t l = 0; l < n_mats; l++)
            mix[s * n_mats + l] = v[l * n_mats + s] * inv;
    }
    atom_job j = {n_mats, n_atoms, n_cols, block_cols, mix, scratch, atoms};
    /* the input was checked above (Gram pass or explicit check) */
    st = masa__stack_pass(fn, ctx, n_mats, n_cols, mats, false, atom_block,
                          &j);
    if (st == MASA_OK) {
        for (size_t l = 0; l < n_mats; l++)
            for (size_t s = 0; s < n_atoms; s++)
                coefs[l * n_atoms + s] =
                    (float)(sqrt(w[s]) * v[l * n_mats + s]);
        double captured = 0.0, dropped = 0.0;
        for (size_t s = 0; s < n_mats; s++) {
            if (s < n_atoms)
                captured += w[s];
            else if (w[s] > 0.0)
                dropped += w[s];
        }
        if (eigenvalues)
            memcpy(eigenvalues, w, n_mats * sizeof(double));
        if (result) {
            masa_pca_result full = {sizeof full, rank, trace, captured,
                                    dropped};
            masa__write_result(result, &full, sizeof full);
        }
    }
    masa__free(ctx, v);
    masa__free(ctx, scratch);
    return st;
}

static masa_status check_pca_args(const char *fn, masa_context *ctx,
                                  size_t n_mats, size_t rows, size_t cols,
                                  const float *const *mats,
                                  const double *gram, size_t gram_ld,
                                  size_t n_atoms, masa_pca_result *result,
                                  size_t *n_cols)
{
    masa_status st = masa__check_stack(fn, ctx, n_mats, rows, cols, mats,
                                       n_cols);
    if (st != MASA_OK)
        return st;
    if (n_atoms == 0)
        return masa__fail(MASA_ERROR_BAD_SHAPE, "%s: n_atoms is 0", fn);
    if (n_atoms > n_mats)
        return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                          "%s: n_atoms (%zu) exceeds the number of matrices "
                          "(%zu)", fn, n_atoms, n_mats);
    if (gram && gram_ld < n_mats)
        return masa__fail(MASA_ERROR_BAD_SHAPE,
                          "%s: gram_ld (%zu) is below n_mats (%zu)", fn,
                          gram_ld, n_mats);
    size_t count;
    if (!masa__mul3(n_atoms, *n_cols, sizeof(float), &count))
        return masa__fail(MASA_ERROR_OVERFLOW, "%s: atoms overflow size_t",
                          fn);
    if (result)
        return masa__check_result_size(fn, result->size,
                                       sizeof(masa_pca_result));
    return MASA_OK;
}

MASA_API masa_status masa_matrix_pca(masa_context *ctx, size_t n_mats,
                                     size_t rows, size_t cols,
                                     const float *const *mats,
                                     const double *gram, size_t gram_ld,
                                     size_t n_atoms, float *atoms,
                                     size_t atoms_len, float *coefs,
                                     size_t coefs_len, double *eigenvalues,
                                     masa_pca_result *result)
{
    static const char fn[] = "masa_matrix_pca";
    size_t n_cols;
    masa_status st = check_pca_args(fn, ctx, n_mats, rows, cols, mats, gram,
                                    gram_ld, n_atoms, result, &n_cols);
    if (st != MASA_OK)
        return st;
    if (!atoms || !coefs)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT,
                          "%s: atoms and coefs must not be NULL", fn);
    if (atoms_len < n_atoms * n_cols || coefs_len < n_mats * n_atoms)
        return masa__fail(MASA_ERROR_BUFFER_TOO_SMALL,
                          "%s: atoms holds %zu floats (%zu needed), coefs "
                          "%zu (%zu needed)", fn, atoms_len,
                          n_atoms * n_cols, coefs_len, n_mats * n_atoms);
    masa__blis_init();
    return pca(fn, ctx, n_mats, n_cols, mats, gram, gram_ld, n_atoms, atoms,
               coefs, eigenvalues, result);
}

MASA_API masa_status masa_matrix_pca_create(masa_context *ctx, size_t n_mats,
                                            size_t rows, size_t cols,
                                            const float *const *mats,
                                            const double *gram,
                                            size_t gram_ld, size_t n_atoms,
                                            masa_dictionary **dict,
                                            masa_coefficients **coef,
                                            masa_pca_result *result)
{
    static const char fn[] = "masa_matrix_pca_create";
    if (dict)
        *dict = NULL;
    if (coef)
        *coef = NULL;
    if (!dict || !coef)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT,
                          "%s: dict and coef must not be NULL", fn);
    size_t n_cols;
    masa_status st = check_pca_args(fn, ctx, n_mats, rows, cols, mats, gram,
                                    gram_ld, n_atoms, result, &n_cols);
    if (st != MASA_OK)
        return st;
    masa_dictionary *d = NULL;
    masa_coefficients *c = NULL;
    st = masa_dictionary_create(ctx, n_atoms, rows, cols, &d);
    if (st == MASA_OK)
        st = masa_coefficients_create(ctx, n_mats, n_atoms, &c);
    if (st == MASA_OK) {
        masa__blis_init();
        st = pca(fn, ctx, n_mats, n_cols, mats, gram, gram_ld, n_atoms,
                 d->atoms, c->data, NULL, result);
    }
    if (st != MASA_OK) {
        masa_dictionary_destroy(d);
        masa_coefficients_destroy(c);
        return st;
    }
    *dict = d;
    *coef = c;
    return MASA_OK;
}
