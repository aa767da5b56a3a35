/* Dictionaries: S atoms of rows x cols, owned or wrapping caller memory. */
#include <math.h>

#include "common/internal.h"

static masa_status dictionary_new(const char *fn, masa_context *ctx,
                                  size_t n_atoms, size_t rows, size_t cols,
                                  float *caller_atoms, masa_dictionary **out)
{
    if (!out)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT, "%s: out is NULL", fn);
    *out = NULL;
    if (!ctx)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT, "%s: ctx is NULL", fn);
    if (n_atoms == 0 || rows == 0 || cols == 0)
        return masa__fail(MASA_ERROR_BAD_SHAPE,
                          "%s: n_atoms, rows and cols must be nonzero "
                          "(got %zu, %zu, %zu)", fn, n_atoms, rows, cols);
    size_t count, bytes;
    if (!masa__mul3(n_atoms, rows, cols, &count) ||
        !masa__mul(count, sizeof(float), &bytes))
        return masa__fail(MASA_ERROR_OVERFLOW,
                          "%s: %zu atoms of %zu x %zu floats overflow size_t",
                          fn, n_atoms, rows, cols);

    masa_dictionary *d = masa__alloc(ctx, sizeof *d);
    if (!d)
        return masa__fail(MASA_ERROR_OUT_OF_MEMORY,
                          "%s: cannot allocate the dictionary", fn);
    *d = (masa_dictionary){ctx, n_atoms, rows, cols, caller_atoms, false,
                           masa__next_tick()};
    if (!caller_atoms) {
        d->atoms = masa__calloc(ctx, count, sizeof(float));
        if (!d->atoms) {
            masa__free(ctx, d);
            return masa__fail(MASA_ERROR_OUT_OF_MEMORY,
                              "%s: cannot allocate %zu bytes of atoms", fn,
                              bytes);
        }
        d->owned = true;
    }
    *out = d;
    return MASA_OK;
}

MASA_API masa_status masa_dictionary_create(masa_context *ctx, size_t n_atoms,
                                            size_t rows, size_t cols,
                                            masa_dictionary **out)
{
    return dictionary_new("masa_dictionary_create", ctx, n_atoms, rows, cols,
                          NULL, out);
}

MASA_API masa_status masa_dictionary_wrap(masa_context *ctx, size_t n_atoms,
                                          size_t rows, size_t cols,
                                          float *atoms, masa_dictionary **out)
{
    if (!atoms) {
        if (out)
            *out = NULL;
        return masa__fail(MASA_ERROR_NULL_ARGUMENT,
                          "masa_dictionary_wrap: atoms is NULL");
    }
    return dictionary_new("masa_dictionary_wrap", ctx, n_atoms, rows, cols,
                          atoms, out);
}

MASA_API void masa_dictionary_destroy(masa_dictionary *dict)
{
    if (!dict)
        return;
    masa_context *ctx = dict->ctx;
    if (dict->owned)
        masa__free(ctx, dict->atoms);
    masa__free(ctx, dict);
}

MASA_API masa_status masa_dictionary_shape(const masa_dictionary *dict,
                                           size_t *n_atoms, size_t *rows,
                                           size_t *cols)
{
    if (!dict)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT,
                          "masa_dictionary_shape: dict is NULL");
    if (n_atoms)
        *n_atoms = dict->n_atoms;
    if (rows)
        *rows = dict->rows;
    if (cols)
        *cols = dict->cols;
    return MASA_OK;
}

MASA_API float *masa_dictionary_data(masa_dictionary *dict)
{
    if (!dict) {
        masa__fail(MASA_ERROR_NULL_ARGUMENT,
                   "masa_dictionary_data: dict is NULL");
        return NULL;
    }
    return dict->atoms;
}

MASA_API masa_status masa_dictionary_init_uniform(masa_dictionary *dict,
                                                  float bound, uint64_t seed)
{
    static const char fn[] = "masa_dictionary_init_uniform";
    if (!dict)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT, "%s: dict is NULL", fn);
    if (!isfinite(bound) || bound < 0.0f)
        return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                          "%s: bound must be finite and >= 0 (got %g)", fn,
                          (double)bound);
    if (bound == 0.0f)
        bound = 1.0f / sqrtf((float)dict->rows);
    masa__fill_uniform(dict->atoms, dict->n_atoms * dict->rows * dict->cols,
                       bound, seed);
    masa__bump(&dict->generation);
    return MASA_OK;
}

MASA_API masa_status masa_dictionary_touch(masa_dictionary *dict)
{
    if (!dict)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT,
                          "masa_dictionary_touch: dict is NULL");
    masa__bump(&dict->generation);
    return MASA_OK;
}
