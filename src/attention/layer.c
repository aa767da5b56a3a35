/* Attention layers: options, projections (MASA or dense), biases and the
 * sizes of workspace and reserve. */
#include <math.h>
#include <string.h>

#include "common/internal.h"

static masa_layer_options layer_defaults(void)
{
    masa_layer_options o;
    memset(&o, 0, sizeof o);
    o.size = sizeof o;
    o.rope_theta = 10000.0f;
    return o;
}

MASA_API void masa_layer_options_default(masa_layer_options *options,
                                         size_t size)
{
    masa_layer_options d = layer_defaults();
    masa__struct_defaults(options, size, &d, sizeof d);
}

MASA_API void masa_layer_grads_default(masa_layer_grads *grads, size_t size)
{
    masa_layer_grads d;
    memset(&d, 0, sizeof d);
    d.size = sizeof d;
    d.mode = MASA_GRAD_ADD;
    masa__struct_defaults(grads, size, &d, sizeof d);
}

static masa_status check_options(const char *fn, masa_layer_options *o)
{
    if (o->d_model == 0 || o->n_heads == 0)
        return masa__fail(MASA_ERROR_BAD_SHAPE,
                          "%s: d_model and n_heads must be nonzero (got %zu, "
                          "%zu)", fn, o->d_model, o->n_heads);
    if (o->n_kv_heads == 0)
        o->n_kv_heads = o->n_heads;
    if (o->n_kv_heads > o->n_heads || o->n_heads % o->n_kv_heads != 0)
        return masa__fail(MASA_ERROR_BAD_SHAPE,
                          "%s: n_heads (%zu) is not a multiple of n_kv_heads "
                          "(%zu)", fn, o->n_heads, o->n_kv_heads);
    if (o->head_dim == 0) {
        if (o->d_model % o->n_heads != 0)
            return masa__fail(MASA_ERROR_BAD_SHAPE,
                              "%s: head_dim is 0 and d_model (%zu) is not a "
                              "multiple of n_heads (%zu)", fn, o->d_model,
                              o->n_heads);
        o->head_dim = o->d_model / o->n_heads;
    }
    size_t dq;
    if (!masa__mul(o->n_heads, o->head_dim, &dq) ||
        !masa__mul(dq, o->d_model, &dq) ||
        !masa__mul(dq, sizeof(float), &dq))
        return masa__fail(MASA_ERROR_OVERFLOW,
                          "%s: projection sizes overflow size_t", fn);
    if (o->rope) {
        if (o->head_dim % 2 != 0)
            return masa__fail(MASA_ERROR_BAD_SHAPE,
                              "%s: RoPE needs an even head_dim (got %zu)", fn,
                              o->head_dim);
        if (!isfinite(o->rope_theta) || o->rope_theta <= 1.0f)
            return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                              "%s: rope_theta must be finite and > 1 (got %g)",
                              fn, (double)o->rope_theta);
    }
    if (!isfinite(o->softmax_scale) || o->softmax_scale < 0.0f)
        return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                          "%s: softmax_scale must be finite and >= 0 (0 = "
                          "default; got %g)", fn, (double)o->softmax_scale);
    return MASA_OK;
}

MASA_API masa_status masa_layer_create(masa_context *ctx,
                                       const masa_layer_options *options,
                                       masa_layer **out)
{
    static const char fn[] = "masa_layer_create";
    if (!out)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT, "%s: out is NULL", fn);
    *out = NULL;
    if (!ctx || !options)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT, "%s: %s is NULL", fn,
                          !ctx ? "ctx" : "options");
    masa_layer_options o = layer_defaults();
    masa_status st = masa__check_struct_size(fn, options, options->size,
                                             sizeof o);
    if (st != MASA_OK)
        return st;
    memcpy(&o, options, sizeof o); /* size >= sizeof o, checked */
    o.size = sizeof o;
    st = check_options(fn, &o);
    if (st != MASA_OK)
        return st;

    masa_layer *layer = masa__calloc(ctx, 1, sizeof *layer);
    if (!layer)
        return masa__fail(MASA_ERROR_OUT_OF_MEMORY,
                          "%s: cannot allocate the layer", fn);
    layer->ctx = ctx;
    layer->d_model = o.d_model;
    layer->n_heads = o.n_heads;
    layer->n_kv_heads = o.n_kv_heads;
    layer->head_dim = o.head_dim;
    layer->dq = o.n_heads * o.head_dim;
    layer->dkv = o.n_kv_heads * o.head_dim;
    layer->causal = o.causal != 0;
    layer->rope = o.rope != 0;
    layer->rope_theta = o.rope_theta;
    layer->scale = o.softmax_scale > 0.0f
                       ? o.softmax_scale
                       : 1.0f / sqrtf((float)o.head_dim);
    size_t d_in[4] = {o.d_model, o.d_model, o.d_model, layer->dq};
    size_t d_out[4] = {layer->dq, layer->dkv, layer->dkv, o.d_model};
    for (int p = 0; p < MASA_NUM_PROJECTIONS; p++) {
        layer->proj[p].d_in = d_in[p];
        layer->proj[p].d_out = d_out[p];
    }
    *out = layer;
    return MASA_OK;
}

static void release_weight(masa_layer *layer, masa_proj_state *ps)
{
    if (ps->weight_owned)
        masa__free(layer->ctx, ps->weight);
    ps->weight = NULL;
    ps->weight_owned = false;
}

static void release_cache(masa_layer *layer, masa_proj_state *ps)
{
    masa__free(layer->ctx, ps->composed_cache);
    ps->composed_cache = NULL;
}

static void release_bias(masa_layer *layer, masa_proj_state *ps)
{
    if (ps->bias_owned)
        masa__free(layer->ctx, ps->bias);
    ps->bias = NULL;
    ps->bias_owned = false;
}

MASA_API void masa_layer_destroy(masa_layer *layer)
{
    if (!layer)
        return;
    for (int p = 0; p < MASA_NUM_PROJECTIONS; p++) {
        release_weight(layer, &layer->proj[p]);
        release_bias(layer, &layer->proj[p]);
        release_cache(layer, &layer->proj[p]);
        masa__release_lowrank(layer, &layer->proj[p]);
    }
    masa__free(layer->ctx, layer);
}

static const char *const proj_names[4] = {"Q", "K", "V", "O"};

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

MASA_API masa_status masa_layer_set_masa(masa_layer *layer,
                                         masa_projection which,
                                         masa_dictionary *dict,
                                         masa_coefficients *coef,
                                         size_t layer_index)
{
    static const char fn[] = "masa_layer_set_masa";
    masa_status st = check_layer_proj(fn, layer, which);
    if (st != MASA_OK)
        return st;
    if (!dict || !coef)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT, "%s: %s is NULL", fn,
                          !dict ? "dict" : "coef");
    masa_proj_state *ps = &layer->proj[which];
    if (dict->rows != ps->d_in || dict->cols != ps->d_out)
        return masa__fail(MASA_ERROR_BAD_SHAPE,
                          "%s: %s needs %zu x %zu atoms, the dictionary has "
                          "%zu x %zu", fn, proj_names[which], ps->d_in,
                          ps->d_out, dict->rows, dict->cols);
    if (coef->n_atoms != dict->n_atoms)
        return masa__fail(MASA_ERROR_BAD_SHAPE,
                          "%s: the table has %zu atoms per layer, the "
                          "dictionary %zu", fn, coef->n_atoms, dict->n_atoms);
    if (layer_index >= coef->n_layers)
        return masa__fail(MASA_ERROR_OUT_OF_RANGE,
                          "%s: layer_index %zu is out of range (table has "
                          "%zu layers)", fn, layer_index, coef->n_layers);
    /* the cache is allocated before anything changes, so a failure leaves
     * the projection as it was */
    float *cache = ps->composed_cache;
    if (layer->policy == MASA_WEIGHTS_CACHED && !cache) {
        cache = masa__alloc(layer->ctx, ps->d_in * ps->d_out * sizeof(float));
        if (!cache)
            return masa__fail(MASA_ERROR_OUT_OF_MEMORY,
                              "%s: cannot allocate the composed %s weight "
                              "(%zu x %zu) of the cached weight policy", fn,
                              proj_names[which], ps->d_in, ps->d_out);
    }
    release_weight(layer, ps);
    ps->set = true;
    ps->is_masa = true;
    ps->dict = dict;
    ps->coef = coef;
    ps->layer_index = layer_index;
    ps->composed_cache = cache;
    if (cache)
        masa__compose_projection(layer, which, cache);
    return MASA_OK;
}

MASA_API masa_status masa_layer_set_dense(masa_layer *layer,
                                          masa_projection which, float *weight)
{
    static const char fn[] = "masa_layer_set_dense";
    masa_status st = check_layer_proj(fn, layer, which);
    if (st != MASA_OK)
        return st;
    masa_proj_state *ps = &layer->proj[which];
    float *w = weight;
    if (!w) {
        w = masa__calloc(layer->ctx, ps->d_in * ps->d_out, sizeof(float));
        if (!w)
            return masa__fail(MASA_ERROR_OUT_OF_MEMORY,
                              "%s: cannot allocate a %zu x %zu weight", fn,
                              ps->d_in, ps->d_out);
    }
    release_weight(layer, ps);
    release_cache(layer, ps);
    ps->set = true;
    ps->is_masa = false;
    ps->dict = NULL;
    ps->coef = NULL;
    ps->weight = w;
    ps->weight_owned = weight == NULL;
    return MASA_OK;
}

MASA_API masa_status masa_layer_set_bias(masa_layer *layer,
                                         masa_projection which, float *bias)
{
    static const char fn[] = "masa_layer_set_bias";
    masa_status st = check_layer_proj(fn, layer, which);
    if (st != MASA_OK)
        return st;
    masa_proj_state *ps = &layer->proj[which];
    float *b = bias;
    if (!b) {
        b = masa__calloc(layer->ctx, ps->d_out, sizeof(float));
        if (!b)
            return masa__fail(MASA_ERROR_OUT_OF_MEMORY,
                              "%s: cannot allocate a bias of %zu", fn,
                              ps->d_out);
    }
    release_bias(layer, ps);
    ps->bias = b;
    ps->bias_owned = bias == NULL;
    return MASA_OK;
}

MASA_API masa_status masa_layer_remove_bias(masa_layer *layer,
                                            masa_projection which)
{
    masa_status st = check_layer_proj("masa_layer_remove_bias", layer, which);
    if (st != MASA_OK)
        return st;
    release_bias(layer, &layer->proj[which]);
    return MASA_OK;
}

MASA_API float *masa_layer_weight(masa_layer *layer, masa_projection which)
{
    if (check_layer_proj("masa_layer_weight", layer, which) != MASA_OK)
        return NULL;
    return layer->proj[which].weight;
}

MASA_API float *masa_layer_bias(masa_layer *layer, masa_projection which)
{
    if (check_layer_proj("masa_layer_bias", layer, which) != MASA_OK)
        return NULL;
    return layer->proj[which].bias;
}

MASA_API masa_status masa_layer_projection_shape(const masa_layer *layer,
                                                 masa_projection which,
                                                 size_t *d_in, size_t *d_out)
{
    masa_status st = check_layer_proj("masa_layer_projection_shape", layer,
                                      which);
    if (st != MASA_OK)
        return st;
    if (d_in)
        *d_in = layer->proj[which].d_in;
    if (d_out)
        *d_out = layer->proj[which].d_out;
    return MASA_OK;
}

masa_status masa__check_ready(const char *fn, const masa_layer *layer)
{
    for (int p = 0; p < MASA_NUM_PROJECTIONS; p++)
        if (!layer->proj[p].set && layer->proj[p].rank == 0)
            return masa__fail(MASA_ERROR_NOT_READY,
                              "%s: projection %s has no weight (call "
                              "masa_layer_set_masa, masa_layer_set_dense or "
                              "masa_layer_set_lowrank)",
                              fn, proj_names[p]);
    return MASA_OK;
}

const float *masa__projection_weight(const masa_layer *layer, int p,
                                     float *scratch)
{
    const masa_proj_state *ps = &layer->proj[p];
    if (!ps->is_masa)
        return ps->weight; /* NULL without a base */
    if (ps->composed_cache)
        return ps->composed_cache;
    masa__compose(ps->dict, ps->coef, ps->layer_index, scratch,
                  layer->ctx->pool);
    return scratch;
}

/* ---- weight policy ---- */

MASA_API masa_status masa_layer_set_weight_policy(masa_layer *layer,
                                                  masa_weight_policy policy)
{
    static const char fn[] = "masa_layer_set_weight_policy";
    if (!layer)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT, "%s: layer is NULL", fn);
    if (policy != MASA_WEIGHTS_ON_THE_FLY && policy != MASA_WEIGHTS_CACHED)
        return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                          "%s: policy %d is neither MASA_WEIGHTS_ON_THE_FLY "
                          "nor MASA_WEIGHTS_CACHED", fn, (int)policy);
    if (policy == MASA_WEIGHTS_ON_THE_FLY) {
        for (int p = 0; p < MASA_NUM_PROJECTIONS; p++)
            release_cache(layer, &layer->proj[p]);
        layer->policy = policy;
        return MASA_OK;
    }
    /* every missing cache is allocated before any is filled: on failure the
     * new ones are freed and the layer is as it was */
    float *fresh[MASA_NUM_PROJECTIONS] = {NULL};
    for (int p = 0; p < MASA_NUM_PROJECTIONS; p++) {
        masa_proj_state *ps = &layer->proj[p];
        if (!ps->is_masa || ps->composed_cache)
            continue;
        fresh[p] = masa__alloc(layer->ctx,
                               ps->d_in * ps->d_out * sizeof(float));
        if (!fresh[p]) {
            for (int q = 0; q < p; q++)
                masa__free(layer->ctx, fresh[q]);
            return masa__fail(MASA_ERROR_OUT_OF_MEMORY,
                              "%s: cannot allocate the composed %s weight "
                              "(%zu x %zu)", fn, proj_names[p], ps->d_in,
                              ps->d_out);
        }
    }
    for (int p = 0; p < MASA_NUM_PROJECTIONS; p++)
        if (fresh[p])
            layer->proj[p].composed_cache = fresh[p];
    layer->policy = policy;
    return masa_layer_refresh_weights(layer);
}

MASA_API masa_status masa_layer_weight_policy(const masa_layer *layer,
                                              masa_weight_policy *policy)
{
    if (!layer || !policy)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT,
                          "masa_layer_weight_policy: %s is NULL",
                          !layer ? "layer" : "policy");
    *policy = layer->policy;
    return MASA_OK;
}

MASA_API masa_status masa_layer_refresh_weights(masa_layer *layer)
{
    if (!layer)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT,
                          "masa_layer_refresh_weights: layer is NULL");
    for (int p = 0; p < MASA_NUM_PROJECTIONS; p++) {
        masa_proj_state *ps = &layer->proj[p];
        if (ps->composed_cache)
            masa__compose_projection(layer, p, ps->composed_cache);
    }
    return MASA_OK;
}

/* ---- sizes ---- */

static masa_status tokens(const char *fn, size_t batch, size_t seq,
                          size_t *bt)
{
    if (batch == 0 || seq == 0)
        return masa__fail(MASA_ERROR_BAD_SHAPE,
                          "%s: batch and seq must be nonzero (got %zu, %zu)",
                          fn, batch, seq);
    if (!masa__mul(batch, seq, bt))
        return masa__fail(MASA_ERROR_OVERFLOW,
                          "%s: batch * seq overflows size_t", fn);
    return MASA_OK;
}

/* Every size below is bounded by a product checked for overflow in bytes. */
#define OVERFLOW_FAIL(fn)                                                    \
    masa__fail(MASA_ERROR_OVERFLOW,                                          \
               "%s: buffer sizes for this batch and seq overflow size_t", fn)

masa_status masa__reserve_layout(const char *fn, const masa_layer *layer,
                                 size_t batch, size_t seq,
                                 masa_reserve_layout *out)
{
    size_t bt, nq, nkv, nlse;
    masa_status st = tokens(fn, batch, seq, &bt);
    if (st != MASA_OK)
        return st;
    size_t nx;
    if (!masa__mul(bt, layer->dq, &nq) || !masa__mul(bt, layer->dkv, &nkv) ||
        !masa__mul(bt, layer->n_heads, &nlse) ||
        !masa__mul3(bt, layer->d_model, sizeof(float), &nx))
        return OVERFLOW_FAIL(fn);
    masa_reserve_layout r = {0};
    size_t at = MASA_RESERVE_STAMP_FLOATS;
    r.q = at;
    bool ok = masa__add(&at, nq);
    r.k = at;
    ok = ok && masa__add(&at, nkv);
    r.v = at;
    ok = ok && masa__add(&at, nkv);
    r.attn = at;
    ok = ok && masa__add(&at, nq);
    r.softmax = at; /* row maxima, then the logs of the row sums */
    ok = ok && masa__add(&at, nlse) && masa__add(&at, nlse);
    r.total = at;
    size_t bytes;
    if (!ok || !masa__mul(r.total, sizeof(float), &bytes))
        return OVERFLOW_FAIL(fn);
    *out = r;
    return MASA_OK;
}

masa_status masa__workspace_layout(const char *fn, const masa_layer *layer,
                                   size_t batch, size_t seq,
                                   masa_workspace_layout *out)
{
    masa_reserve_layout r = {0};
    masa_status st = masa__reserve_layout(fn, layer, batch, seq, &r);
    if (st != MASA_OK)
        return st;
    size_t bt = batch * seq;
    /* forward without reserve keeps Q, K, V, A and the softmax rows' maxima
     * and log-sums here; backward keeps dA, dQ, dK, dV: never both at once. */
    size_t grads = 2 * bt * layer->dq + 2 * bt * layer->dkv; /* <= r.total */
    size_t region = r.total > grads ? r.total : grads;
    size_t wmax = 0;
    for (int p = 0; p < MASA_NUM_PROJECTIONS; p++) {
        size_t n = layer->proj[p].d_in * layer->proj[p].d_out;
        if (n > wmax)
            wmax = n;
    }
    size_t tile = masa__attention_tile_floats(seq, layer->head_dim);
    size_t tiles, lowrank;
    masa_workspace_layout w;
    size_t at = 0;
    w.fwd_qkv = 0;
    w.grad_a = 0;
    bool ok = masa__add(&at, region);
    w.weight = at;
    ok = ok && masa__add(&at, wmax);
    w.dweight = at;
    ok = ok && masa__add(&at, wmax);
    w.partials = at; /* doubles, only float-aligned: read with memcpy */
    ok = ok && masa__add(&at, 2 * MASA_ATOM_GRAD_PARTIALS);
    w.lowrank = at;
    ok = ok && masa__mul3(2, bt, masa__max_rank(layer), &lowrank) &&
         masa__add(&at, lowrank);
    w.tiles = at;
    w.tile_floats = tile;
    ok = ok && masa__mul(tile, layer->ctx->n_threads, &tiles) &&
         masa__add(&at, tiles);
    w.total = at;
    size_t bytes;
    if (!ok || tile == SIZE_MAX || !masa__mul(w.total, sizeof(float), &bytes))
        return OVERFLOW_FAIL(fn);
    *out = w;
    return MASA_OK;
}

masa_status masa__check_positions(const char *fn, const masa_layer *layer,
                                  size_t first, size_t count)
{
    if (count > SIZE_MAX - first)
        return masa__fail(MASA_ERROR_OVERFLOW,
                          "%s: position %zu + %zu tokens overflows size_t", fn,
                          first, count);
    /* RoPE angles lose accuracy beyond it (masa.h, "Positions") */
    if (layer->rope && count > 0 && first + count - 1 > MASA_MAX_POSITION)
        return masa__fail(MASA_ERROR_OUT_OF_RANGE,
                          "%s: the last token's position %zu is beyond "
                          "MASA_MAX_POSITION (%zu), where RoPE angles are no "
                          "longer accurate", fn, first + count - 1,
                          (size_t)MASA_MAX_POSITION);
    return MASA_OK;
}

masa_status masa__check_call_buffers(const char *fn, const masa_layer *layer,
                                     size_t batch, size_t seq,
                                     const void *workspace,
                                     size_t workspace_bytes,
                                     const void *reserve, size_t reserve_bytes,
                                     masa_workspace_layout *wl,
                                     masa_reserve_layout *rl)
{
    masa_status st;
    if ((st = masa__workspace_layout(fn, layer, batch, seq, wl)) != MASA_OK ||
        (st = masa__reserve_layout(fn, layer, batch, seq, rl)) != MASA_OK)
        return st;
    if (workspace_bytes < wl->total * sizeof(float))
        return masa__fail(MASA_ERROR_BUFFER_TOO_SMALL,
                          "%s: workspace has %zu bytes, needs %zu", fn,
                          workspace_bytes, wl->total * sizeof(float));
    if (reserve && reserve_bytes < rl->total * sizeof(float))
        return masa__fail(MASA_ERROR_BUFFER_TOO_SMALL,
                          "%s: reserve has %zu bytes, needs %zu", fn,
                          reserve_bytes, rl->total * sizeof(float));
    if (!masa__float_aligned(workspace) ||
        (reserve && !masa__float_aligned(reserve)))
        return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                          "%s: workspace and reserve must be aligned for "
                          "float", fn);
    return MASA_OK;
}

MASA_API masa_status masa_layer_workspace_size(const masa_layer *layer,
                                               size_t batch, size_t seq,
                                               size_t *bytes)
{
    if (!layer || !bytes)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT,
                          "masa_layer_workspace_size: %s is NULL",
                          !layer ? "layer" : "bytes");
    masa_workspace_layout w;
    masa_status st = masa__workspace_layout("masa_layer_workspace_size",
                                            layer, batch, seq, &w);
    if (st != MASA_OK)
        return st;
    *bytes = w.total * sizeof(float);
    return MASA_OK;
}

MASA_API masa_status masa_layer_reserve_size(const masa_layer *layer,
                                             size_t batch, size_t seq,
                                             size_t *bytes)
{
    if (!layer || !bytes)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT,
                          "masa_layer_reserve_size: %s is NULL",
                          !layer ? "layer" : "bytes");
    masa_reserve_layout r = {0};
    masa_status st = masa__reserve_layout("masa_layer_reserve_size", layer,
                                          batch, seq, &r);
    if (st != MASA_OK)
        return st;
    *bytes = r.total * sizeof(float);
    return MASA_OK;
}
