/* Calibration statistics: C = X^T X of float32 rows, accumulated in float64
 * (see compress.h). */
#include <math.h>
#include <string.h>

#include "compress/linalg.h"

struct masa_calib {
    masa_context *ctx;
    size_t dim;
    uint64_t n_rows;
    double *matrix;  /* dim x dim, both triangles */
};

/* Rows converted per dsyrk call: every call reads and writes all of C, so
 * at least 256 rows (for d = 4096 that is 512 flops per element of C moved,
 * compute-bound), more for small dims (a block of about 1 MiB). */
static size_t calib_block_rows(size_t dim)
{
    size_t rows = ((size_t)131072 / dim) & ~(size_t)7;
    return rows < 256 ? 256 : rows;
}

static masa_status calib_new(const char *fn, masa_context *ctx, size_t dim,
                             masa_calib **out)
{
    if (!out)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT, "%s: out is NULL", fn);
    *out = NULL;
    if (!ctx)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT, "%s: ctx is NULL", fn);
    if (dim == 0)
        return masa__fail(MASA_ERROR_BAD_SHAPE, "%s: dim is 0", fn);
    size_t count;
    if (!masa__mul3(dim, dim, sizeof(double), &count))
        return masa__fail(MASA_ERROR_OVERFLOW,
                          "%s: a %zu x %zu matrix overflows size_t", fn, dim,
                          dim);
    masa_calib *c = masa__calloc(ctx, 1, sizeof *c);
    if (!c)
        return masa__fail(MASA_ERROR_OUT_OF_MEMORY,
                          "%s: cannot allocate the handle", fn);
    c->ctx = ctx;
    c->dim = dim;
    c->matrix = masa__calloc(ctx, dim * dim, sizeof(double));
    if (!c->matrix) {
        masa_calib_destroy(c);
        return masa__fail(MASA_ERROR_OUT_OF_MEMORY,
                          "%s: cannot allocate %zu bytes", fn, count);
    }
    *out = c;
    return MASA_OK;
}

MASA_API masa_status masa_calib_create(masa_context *ctx, size_t dim,
                                       masa_calib **out)
{
    return calib_new("masa_calib_create", ctx, dim, out);
}

MASA_API masa_status masa_calib_create_from_data(masa_context *ctx, size_t dim,
                                                 const double *matrix,
                                                 uint64_t n_rows,
                                                 masa_calib **out)
{
    static const char fn[] = "masa_calib_create_from_data";
    if (out)
        *out = NULL;
    if (!matrix)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT, "%s: matrix is NULL", fn);
    if (out && ctx && dim != 0) {
        size_t count;
        if (!masa__mul(dim, dim, &count))
            return masa__fail(MASA_ERROR_OVERFLOW,
                              "%s: a %zu x %zu matrix overflows size_t", fn,
                              dim, dim);
        if (!masa__all_finite_d(matrix, count))
            return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                              "%s: the matrix has a non-finite entry", fn);
        double largest = 0.0;
        for (size_t i = 0; i < count; i++)
            largest = fmax(largest, fabs(matrix[i]));
        for (size_t i = 0; i < dim; i++)
            for (size_t j = 0; j < i; j++)
                if (fabs(matrix[i * dim + j] - matrix[j * dim + i]) >
                    1e-12 * largest)
                    return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                                      "%s: the matrix is not symmetric "
                                      "(entries %zu,%zu and %zu,%zu)", fn, i,
                                      j, j, i);
    }
    masa_status st = calib_new(fn, ctx, dim, out);
    if (st != MASA_OK)
        return st;
    memcpy((*out)->matrix, matrix, dim * dim * sizeof(double));
    (*out)->n_rows = n_rows;
    return MASA_OK;
}

MASA_API void masa_calib_destroy(masa_calib *calib)
{
    if (!calib)
        return;
    masa_context *ctx = calib->ctx;
    masa__free(ctx, calib->matrix);
    masa__free(ctx, calib);
}

static void mirror_lower(double *m, size_t dim)
{
    for (size_t i = 0; i < dim; i++)
        for (size_t j = 0; j < i; j++)
            m[j * dim + i] = m[i * dim + j];
}

MASA_API masa_status masa_calib_accumulate(masa_calib *calib, const float *x,
                                           size_t n_rows)
{
    static const char fn[] = "masa_calib_accumulate";
    if (!calib)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT, "%s: calib is NULL", fn);
    if (n_rows == 0)
        return MASA_OK;
    if (!x)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT, "%s: x is NULL", fn);
    size_t dim = calib->dim, count;
    if (!masa__mul(n_rows, dim, &count) ||
        calib->n_rows > UINT64_MAX - (uint64_t)n_rows)
        return masa__fail(MASA_ERROR_OVERFLOW,
                          "%s: %zu rows of %zu overflow", fn, n_rows, dim);
    /* all rows are checked before any is added: nothing half-done */
    if (!masa__all_finite_f(x, count)) {
        for (size_t r = 0; r < n_rows; r++)
            if (!masa__all_finite_f(x + r * dim, dim))
                return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                                  "%s: row %zu has a non-finite element", fn,
                                  r);
    }
    size_t block_rows = calib_block_rows(dim);
    if (block_rows > n_rows)
        block_rows = n_rows;
    double *block = masa__calloc(calib->ctx, block_rows, dim * sizeof(double));
    if (!block)
        return masa__fail(MASA_ERROR_OUT_OF_MEMORY,
                          "%s: cannot allocate %zu rows of %zu doubles", fn,
                          block_rows, dim);
    masa__blis_init();
    for (size_t r0 = 0; r0 < n_rows; r0 += block_rows) {
        size_t rows = n_rows - r0 < block_rows ? n_rows - r0 : block_rows;
        const float *src = x + r0 * dim;
        for (size_t i = 0; i < rows * dim; i++)
            block[i] = (double)src[i];
        /* C += B^T B: B^T is the block with its strides swapped */
        masa__dsyrk_lower(calib->ctx, dim, rows, block, 1, dim,
                          calib->matrix, dim);
    }
    masa__free(calib->ctx, block);
    mirror_lower(calib->matrix, dim);
    calib->n_rows += n_rows;
    return MASA_OK;
}

MASA_API masa_status masa_calib_merge(masa_calib *dst, const masa_calib *src)
{
    static const char fn[] = "masa_calib_merge";
    if (!dst || !src)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT,
                          "%s: dst and src must not be NULL", fn);
    if (dst == src)
        return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                          "%s: dst and src are the same handle", fn);
    if (dst->dim != src->dim)
        return masa__fail(MASA_ERROR_BAD_SHAPE,
                          "%s: dims differ (%zu and %zu)", fn, dst->dim,
                          src->dim);
    if (dst->n_rows > UINT64_MAX - src->n_rows)
        return masa__fail(MASA_ERROR_OVERFLOW, "%s: row counts overflow", fn);
    size_t count = dst->dim * dst->dim;
    for (size_t i = 0; i < count; i++)
        dst->matrix[i] += src->matrix[i];
    dst->n_rows += src->n_rows;
    return MASA_OK;
}

MASA_API masa_status masa_calib_shape(const masa_calib *calib, size_t *dim,
                                      uint64_t *n_rows)
{
    if (!calib)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT,
                          "masa_calib_shape: calib is NULL");
    if (dim)
        *dim = calib->dim;
    if (n_rows)
        *n_rows = calib->n_rows;
    return MASA_OK;
}

MASA_API const double *masa_calib_data(const masa_calib *calib)
{
    return calib ? calib->matrix : NULL;
}
