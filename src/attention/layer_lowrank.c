/* Low-rank terms of projections: W = base + A B with A d_in x rank and
 * B rank x d_out. Setting and removing them, and the helpers forward,
 * backward and decode share to decide whether A B is folded into a composed
 * weight or applied as the two thin products (X A) B. */
#include "common/internal.h"

static const char *const proj_names[4] = {"Q", "K", "V", "O"};

/* Measured by benchmarks/bench_lowrank.c (Zen 5, skx, one thread, d 576 and
 * 1024, ranks 32 and 128, on a loaded machine): fold / thin time 1.1-1.6 up
 * to 64 rows, within noise around d/2 rows, 0.6-0.85 at 1024-4096 rows. */
bool masa__lowrank_folds(const masa_proj_state *ps, size_t rows)
{
    if (ps->rank == 0 || !ps->set || !ps->is_masa || ps->composed_cache)
        return false;
    /* rank * d_in * d_out (fold) < rank * rows * (d_in + d_out) (thin):
     * rank cancels. d_in * d_out fits size_t (checked at layer creation);
     * the right side is compared in double to avoid overflow. */
    return (double)ps->d_in * (double)ps->d_out <
           (double)rows * ((double)ps->d_in + (double)ps->d_out);
}

bool masa__lowrank_in_weight(const masa_proj_state *ps, size_t rows)
{
    if (ps->rank == 0)
        return false;
    return (ps->is_masa && ps->composed_cache) ||
           masa__lowrank_folds(ps, rows);
}

void masa__add_lowrank(const masa_layer *layer, int p, float *w)
{
    const masa_proj_state *ps = &layer->proj[p];
    masa__gemm_pool(layer->ctx->pool, layer->ctx->n_threads, ps->d_in,
                    ps->d_out, ps->rank, 1.0f, ps->lowrank_a, ps->rank, 1,
                    ps->lowrank_b, ps->d_out, 1, 1.0f, w, ps->d_out, 1);
}

void masa__compose_projection(const masa_layer *layer, int p, float *w)
{
    const masa_proj_state *ps = &layer->proj[p];
    masa__compose(ps->dict, ps->coef, ps->layer_index, w, layer->ctx->pool);
    if (ps->rank)
        masa__add_lowrank(layer, p, w);
}

size_t masa__max_rank(const masa_layer *layer)
{
    size_t r = 0;
    for (int p = 0; p < MASA_NUM_PROJECTIONS; p++)
        if (layer->proj[p].rank > r)
            r = layer->proj[p].rank;
    return r;
}

void masa__release_lowrank(const masa_layer *layer, masa_proj_state *ps)
{
    if (ps->lowrank_a_owned)
        masa__free(layer->ctx, ps->lowrank_a);
    if (ps->lowrank_b_owned)
        masa__free(layer->ctx, ps->lowrank_b);
    ps->lowrank_a = ps->lowrank_b = NULL;
    ps->lowrank_a_owned = ps->lowrank_b_owned = false;
    ps->rank = 0;
}

static masa_status check_layer_proj(const char *fn, const masa_layer *layer,
                                    masa_projection which)
{
    if (!layer)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT, "%s: layer is NULL", fn);
    if ((unsigned)which >= MASA_NUM_PROJECTIONS)
        return masa__fail(MASA_ERROR_OUT_OF_RANGE,
                          "%s: projection %d is not one of Q, K, V, O", fn,
                          (int)which);
    return MASA_OK;
}

/* A cached MASA weight follows every change of the term. */
static void refill_cache(masa_layer *layer, int p)
{
    masa_proj_state *ps = &layer->proj[p];
    if (ps->is_masa && ps->composed_cache)
        masa__compose_projection(layer, p, ps->composed_cache);
}

MASA_API masa_status masa_layer_set_lowrank(masa_layer *layer,
                                            masa_projection which,
                                            size_t rank, float *a, float *b)
{
    static const char fn[] = "masa_layer_set_lowrank";
    masa_status st = check_layer_proj(fn, layer, which);
    if (st != MASA_OK)
        return st;
    masa_proj_state *ps = &layer->proj[which];
    size_t most = ps->d_in < ps->d_out ? ps->d_in : ps->d_out;
    if (rank == 0 || rank > most)
        return masa__fail(MASA_ERROR_BAD_SHAPE,
                          "%s: rank %zu of %s must be in 1..%zu (min(d_in "
                          "%zu, d_out %zu))", fn, rank, proj_names[which],
                          most, ps->d_in, ps->d_out);
    /* rank <= d_in and d_out, so both sizes are at most d_in * d_out, which
     * was checked for overflow when the layer was created */
    float *na = a, *nb = b;
    if (!na)
        na = masa__calloc(layer->ctx, ps->d_in * rank, sizeof(float));
    if (na && !nb)
        nb = masa__calloc(layer->ctx, rank * ps->d_out, sizeof(float));
    if (!na || !nb) {
        if (!a)
            masa__free(layer->ctx, na);
        return masa__fail(MASA_ERROR_OUT_OF_MEMORY,
                          "%s: cannot allocate the %s factor (%zu x %zu)", fn,
                          !na ? "A" : "B", !na ? ps->d_in : rank,
                          !na ? rank : ps->d_out);
    }
    masa__release_lowrank(layer, ps);
    ps->rank = rank;
    ps->lowrank_a = na;
    ps->lowrank_b = nb;
    ps->lowrank_a_owned = a == NULL;
    ps->lowrank_b_owned = b == NULL;
    refill_cache(layer, which);
    return MASA_OK;
}

MASA_API masa_status masa_layer_remove_lowrank(masa_layer *layer,
                                               masa_projection which)
{
    masa_status st = check_layer_proj("masa_layer_remove_lowrank", layer,
                                      which);
    if (st != MASA_OK)
        return st;
    if (layer->proj[which].rank == 0)
        return MASA_OK;
    masa__release_lowrank(layer, &layer->proj[which]);
    refill_cache(layer, which);
    return MASA_OK;
}

MASA_API masa_status masa_layer_lowrank(masa_layer *layer,
                                        masa_projection which, size_t *rank,
                                        float **a, float **b)
{
    masa_status st = check_layer_proj("masa_layer_lowrank", layer, which);
    if (st != MASA_OK)
        return st;
    const masa_proj_state *ps = &layer->proj[which];
    if (rank)
        *rank = ps->rank;
    if (a)
        *a = ps->lowrank_a;
    if (b)
        *b = ps->lowrank_b;
    return MASA_OK;
}
