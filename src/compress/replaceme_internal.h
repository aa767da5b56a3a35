/* Helpers shared by the ReplaceMe files (replaceme_lstsq.c,
 * replaceme_cosine.c, replaceme_merge.c). */
#ifndef MASA_REPLACEME_INTERNAL_H
#define MASA_REPLACEME_INTERNAL_H

#include <math.h>

#include "common/internal.h"

/* A least-squares estimator (replaceme_lstsq.c, replaceme_solve.c). */
struct masa_linear_estimator {
    masa_context *ctx;
    size_t d_in, d_out;
    size_t width;    /* d_in + d_out */
    double *stats;   /* d_in x width: [X^T X | X^T Z], row-major */
    double *block;   /* ACC_BLOCK_ROWS x width: [X | Z] of one block */
    uint64_t rows;
};

/* True when all n values are finite (NULL with n = 0 is fine). */
static inline bool masa__replaceme_finite(const float *v, size_t n)
{
    /* one accumulated test, not a branch per value: x - x is 0 for finite
     * x and NaN otherwise */
    float acc = 0.0f;
    for (size_t i = 0; i < n; i++)
        acc += v[i] - v[i];
    return acc == 0.0f;
}

/* Checks the float arrays of a batch of rows: x (rows x d_in), target and
 * offset (rows x d_out; offset may be NULL): NULL pointers, size overflow,
 * non-finite values. fn names the public function. */
static inline masa_status masa__replaceme_check_rows(
    const char *fn, size_t rows, size_t d_in, size_t d_out, const float *x,
    const float *target, const float *offset)
{
    if (rows == 0)
        return MASA_OK;
    if (!x || !target)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT, "%s: %s is NULL", fn,
                          !x ? "x" : "target");
    size_t nx, nz;
    if (!masa__mul(rows, d_in, &nx) || !masa__mul(rows, d_out, &nz) ||
        !masa__mul(nx, sizeof(float), &(size_t){0}) ||
        !masa__mul(nz, sizeof(float), &(size_t){0}))
        return masa__fail(MASA_ERROR_OVERFLOW,
                          "%s: rows (%zu) times the width overflows", fn,
                          rows);
    if (!masa__replaceme_finite(x, nx))
        return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                          "%s: x holds a NaN or infinity", fn);
    if (!masa__replaceme_finite(target, nz))
        return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                          "%s: target holds a NaN or infinity", fn);
    if (offset && !masa__replaceme_finite(offset, nz))
        return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                          "%s: offset holds a NaN or infinity", fn);
    return MASA_OK;
}

#endif
