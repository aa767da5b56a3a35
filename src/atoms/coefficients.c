/* Coefficient tables: L x S scalars, owned or wrapping caller memory. */
#include <math.h>
#include <string.h>

#include "common/internal.h"

static masa_status coefficients_new(const char *fn, masa_context *ctx,
                                    size_t n_layers, size_t n_atoms,
                                    float *caller_data,
                                    masa_coefficients **out)
{
    if (!out)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT, "%s: out is NULL", fn);
    *out = NULL;
    if (!ctx)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT, "%s: ctx is NULL", fn);
    if (n_layers == 0 || n_atoms == 0)
        return masa__fail(MASA_ERROR_BAD_SHAPE,
                          "%s: n_layers and n_atoms must be nonzero "
                          "(got %zu, %zu)", fn, n_layers, n_atoms);
    size_t count, bytes;
    if (!masa__mul(n_layers, n_atoms, &count) ||
        !masa__mul(count, sizeof(float), &bytes))
        return masa__fail(MASA_ERROR_OVERFLOW,
                          "%s: %zu x %zu coefficients overflow size_t", fn,
                          n_layers, n_atoms);
    masa_coefficients *c = masa__alloc(ctx, sizeof *c);
    if (!c)
        return masa__fail(MASA_ERROR_OUT_OF_MEMORY,
                          "%s: cannot allocate the table", fn);
    *c = (masa_coefficients){ctx, n_layers, n_atoms, caller_data, false,
                             masa__next_tick()};
    if (!caller_data) {
        c->data = masa__calloc(ctx, count, sizeof(float));
        if (!c->data) {
            masa__free(ctx, c);
            return masa__fail(MASA_ERROR_OUT_OF_MEMORY,
                              "%s: cannot allocate %zu bytes", fn, bytes);
        }
        c->owned = true;
    }
    *out = c;
    return MASA_OK;
}

MASA_API masa_status masa_coefficients_create(masa_context *ctx,
                                              size_t n_layers, size_t n_atoms,
                                              masa_coefficients **out)
{
    return coefficients_new("masa_coefficients_create", ctx, n_layers,
                            n_atoms, NULL, out);
}

MASA_API masa_status masa_coefficients_wrap(masa_context *ctx, size_t n_layers,
                                            size_t n_atoms, float *data,
                                            masa_coefficients **out)
{
    if (!data) {
        if (out)
            *out = NULL;
        return masa__fail(MASA_ERROR_NULL_ARGUMENT,
                          "masa_coefficients_wrap: data is NULL");
    }
    return coefficients_new("masa_coefficients_wrap", ctx, n_layers, n_atoms,
                            data, out);
}

MASA_API void masa_coefficients_destroy(masa_coefficients *coef)
{
    if (!coef)
        return;
    masa_context *ctx = coef->ctx;
    if (coef->owned)
        masa__free(ctx, coef->data);
    masa__free(ctx, coef);
}

MASA_API masa_status masa_coefficients_shape(const masa_coefficients *coef,
                                             size_t *n_layers, size_t *n_atoms)
{
    if (!coef)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT,
                          "masa_coefficients_shape: coef is NULL");
    if (n_layers)
        *n_layers = coef->n_layers;
    if (n_atoms)
        *n_atoms = coef->n_atoms;
    return MASA_OK;
}

MASA_API float *masa_coefficients_data(masa_coefficients *coef)
{
    if (!coef) {
        masa__fail(MASA_ERROR_NULL_ARGUMENT,
                   "masa_coefficients_data: coef is NULL");
        return NULL;
    }
    return coef->data;
}

/* One-hot rows: layer l uses atom atom_of(l). */
static void init_one_hot(masa_coefficients *c, bool blocks)
{
    memset(c->data, 0, c->n_layers * c->n_atoms * sizeof(float));
    for (size_t l = 0; l < c->n_layers; l++) {
        size_t s = blocks ? l * c->n_atoms / c->n_layers : l % c->n_atoms;
        c->data[l * c->n_atoms + s] = 1.0f;
    }
    masa__bump(&c->generation);
}

MASA_API masa_status masa_coefficients_init_cyclic(masa_coefficients *coef)
{
    if (!coef)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT,
                          "masa_coefficients_init_cyclic: coef is NULL");
    init_one_hot(coef, false);
    return MASA_OK;
}

MASA_API masa_status masa_coefficients_init_blocks(masa_coefficients *coef)
{
    if (!coef)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT,
                          "masa_coefficients_init_blocks: coef is NULL");
    /* l * S cannot overflow: the table's L * S elements were allocated. */
    init_one_hot(coef, true);
    return MASA_OK;
}

MASA_API masa_status masa_coefficients_add_uniform(masa_coefficients *coef,
                                                   float bound, uint64_t seed)
{
    static const char fn[] = "masa_coefficients_add_uniform";
    if (!coef)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT, "%s: coef is NULL", fn);
    if (!isfinite(bound) || bound < 0.0f)
        return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                          "%s: bound must be finite and >= 0 (got %g)", fn,
                          (double)bound);
    masa__add_uniform(coef->data, coef->n_layers * coef->n_atoms, bound, seed);
    masa__bump(&coef->generation);
    return MASA_OK;
}

MASA_API masa_status masa_coefficients_touch(masa_coefficients *coef)
{
    if (!coef)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT,
                          "masa_coefficients_touch: coef is NULL");
    masa__bump(&coef->generation);
    return MASA_OK;
}
