/* Gram matrices G[i, j] = <W_i, W_j>_F in float64 and their eigenvalues. */
#include <string.h>

#include "compress/gram.h"
#include "compress/linalg.h"
#include "compress/stack.h"

typedef struct gram_job {
    size_t n_mats;
    double *partials; /* per thread: n_mats x n_mats, lower triangle */
} gram_job;

static void gram_block(void *arg, size_t thread, size_t col0, size_t n_cols,
                       const double *block)
{
    (void)col0;
    gram_job *j = arg;
    double *g = j->partials + thread * j->n_mats * j->n_mats;
    /* already one of the pool's tasks: this thread only */
    masa__dsyrk_lower(NULL, j->n_mats, n_cols, block, n_cols, 1, g,
                      j->n_mats);
}

masa_status masa__gram(const char *fn, masa_context *ctx, size_t n_mats,
                       size_t n_cols, const float *const *mats, double *gram)
{
    size_t threads = ctx->n_threads ? ctx->n_threads : 1;
    size_t n2, total;
    if (!masa__mul(n_mats, n_mats, &n2) || !masa__mul(n2, threads, &total))
        return masa__fail(MASA_ERROR_OVERFLOW, "%s: Gram size overflows",
                          fn);
    gram_job j = {n_mats, masa__calloc(ctx, total, sizeof(double))};
    if (!j.partials)
        return masa__fail(MASA_ERROR_OUT_OF_MEMORY,
                          "%s: cannot allocate %zu Gram partial sums", fn,
                          threads);
    masa_status st = masa__stack_pass(fn, ctx, n_mats, n_cols, mats, true,
                                      gram_block, &j);
    if (st == MASA_OK) {
        for (size_t i = 0; i < n_mats; i++)
            for (size_t k = 0; k <= i; k++) {
                double sum = 0.0;
                for (size_t t = 0; t < threads; t++)
                    sum += j.partials[t * n2 + i * n_mats + k];
                gram[i * n_mats + k] = sum;
                gram[k * n_mats + i] = sum;
            }
    }
    masa__free(ctx, j.partials);
    return st;
}

masa_status masa__check_gram(const char *fn, size_t n, const double *gram,
                             size_t ld)
{
    for (size_t i = 0; i < n; i++)
        if (!masa__all_finite_d(gram + i * ld, i + 1))
            return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                              "%s: gram row %zu has a non-finite entry", fn,
                              i);
    return MASA_OK;
}

size_t masa__gram_rank(size_t n, const double *eigenvalues)
{
    if (n == 0 || !(eigenvalues[0] > 0.0))
        return 0;
    double tol = MASA_PCA_RANK_RTOL * eigenvalues[0];
    size_t rank = 0;
    while (rank < n && eigenvalues[rank] > tol)
        rank++;
    return rank;
}

MASA_API masa_status masa_gram(masa_context *ctx, size_t n_mats, size_t rows,
                               size_t cols, const float *const *mats,
                               double *gram, size_t gram_len)
{
    static const char fn[] = "masa_gram";
    size_t n_cols, need;
    masa_status st = masa__check_stack(fn, ctx, n_mats, rows, cols, mats,
                                       &n_cols);
    if (st != MASA_OK)
        return st;
    if (!gram)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT, "%s: gram is NULL", fn);
    if (!masa__mul(n_mats, n_mats, &need))
        return masa__fail(MASA_ERROR_OVERFLOW, "%s: %zu^2 overflows", fn,
                          n_mats);
    if (gram_len < need)
        return masa__fail(MASA_ERROR_BUFFER_TOO_SMALL,
                          "%s: gram holds %zu doubles, %zu needed", fn,
                          gram_len, need);
    masa__blis_init();
    /* into scratch first: gram is untouched on failure */
    double *g = masa__calloc(ctx, need, sizeof(double));
    if (!g)
        return masa__fail(MASA_ERROR_OUT_OF_MEMORY,
                          "%s: cannot allocate the Gram", fn);
    st = masa__gram(fn, ctx, n_mats, n_cols, mats, g);
    if (st == MASA_OK)
        memcpy(gram, g, need * sizeof(double));
    masa__free(ctx, g);
    return st;
}

MASA_API masa_status masa_gram_eigenvalues(masa_context *ctx, size_t n,
                                           const double *gram, size_t gram_ld,
                                           double *eigenvalues)
{
    static const char fn[] = "masa_gram_eigenvalues";
    if (!ctx || !gram || !eigenvalues)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT,
                          "%s: ctx, gram and eigenvalues must not be NULL",
                          fn);
    if (n == 0 || gram_ld < n)
        return masa__fail(MASA_ERROR_BAD_SHAPE,
                          "%s: n (%zu) must be nonzero and gram_ld (%zu) at "
                          "least n", fn, n, gram_ld);
    size_t n2;
    if (!masa__mul(n, n, &n2))
        return masa__fail(MASA_ERROR_OVERFLOW, "%s: %zu^2 overflows", fn, n);
    masa_status st = masa__check_gram(fn, n, gram, gram_ld);
    if (st != MASA_OK)
        return st;
    size_t count = n2;
    if (!masa__add(&count, n))
        return masa__fail(MASA_ERROR_OVERFLOW, "%s: %zu^2 overflows", fn, n);
    double *a = masa__calloc(ctx, count, sizeof(double));
    if (!a)
        return masa__fail(MASA_ERROR_OUT_OF_MEMORY,
                          "%s: cannot allocate a copy of the Gram", fn);
    double *w = a + n2;
    for (size_t i = 0; i < n; i++)
        memcpy(a + i * n, gram + i * gram_ld, n * sizeof(double));
    st = masa__syevd(fn, ctx, false, n, a, n, w);
    if (st == MASA_OK)
        memcpy(eigenvalues, w, n * sizeof(double));
    masa__free(ctx, a);
    return st;
}
