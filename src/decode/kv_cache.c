/* Key/value caches for incremental decoding: a handle over caller memory
 * holding the keys (RoPE applied) and values of the tokens seen so far. */
#include "common/internal.h"

masa_status masa__check_decodable(const char *fn, const masa_layer *layer)
{
    if (!layer->causal)
        return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                          "%s: the layer is not causal; incremental decoding "
                          "needs a causal layer (earlier outputs of a "
                          "non-causal layer change with every new token)",
                          fn);
    return MASA_OK;
}

/* Floats of one of K or V (batch * max_seq * n_kv_heads * head_dim), after
 * the checks masa_kv_cache_size() and masa_kv_cache_create() share. */
static masa_status half_floats(const char *fn, const masa_layer *layer,
                               size_t batch, size_t max_seq, size_t *floats)
{
    masa_status st = masa__check_decodable(fn, layer);
    if (st != MASA_OK)
        return st;
    if (batch == 0 || max_seq == 0)
        return masa__fail(MASA_ERROR_BAD_SHAPE,
                          "%s: batch and max_seq must be nonzero (got %zu, "
                          "%zu)", fn, batch, max_seq);
    size_t n, bytes;
    if (!masa__mul3(batch, max_seq, layer->dkv, &n) ||
        !masa__mul3(n, 2, sizeof(float), &bytes))
        return masa__fail(MASA_ERROR_OVERFLOW,
                          "%s: a cache of %zu x %zu positions overflows "
                          "size_t", fn, batch, max_seq);
    if ((st = masa__check_positions(fn, layer, 0, max_seq)) != MASA_OK)
        return st;
    *floats = n;
    return MASA_OK;
}

MASA_API masa_status masa_kv_cache_size(const masa_layer *layer,
                                        size_t batch, size_t max_seq,
                                        size_t *bytes)
{
    static const char fn[] = "masa_kv_cache_size";
    if (!layer || !bytes)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT, "%s: %s is NULL", fn,
                          !layer ? "layer" : "bytes");
    size_t n = 0;
    masa_status st = half_floats(fn, layer, batch, max_seq, &n);
    if (st != MASA_OK)
        return st;
    *bytes = 2 * n * sizeof(float);
    return MASA_OK;
}

MASA_API masa_status masa_kv_cache_create(const masa_layer *layer,
                                          size_t batch, size_t max_seq,
                                          void *memory, size_t memory_bytes,
                                          masa_kv_cache **out)
{
    static const char fn[] = "masa_kv_cache_create";
    if (!out)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT, "%s: out is NULL", fn);
    *out = NULL;
    if (!layer || !memory)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT, "%s: %s is NULL", fn,
                          !layer ? "layer" : "memory");
    size_t n = 0;
    masa_status st = half_floats(fn, layer, batch, max_seq, &n);
    if (st != MASA_OK)
        return st;
    if (memory_bytes < 2 * n * sizeof(float))
        return masa__fail(MASA_ERROR_BUFFER_TOO_SMALL,
                          "%s: memory has %zu bytes, the cache needs %zu", fn,
                          memory_bytes, 2 * n * sizeof(float));
    if (!masa__float_aligned(memory))
        return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                          "%s: memory must be aligned for float", fn);
    masa_kv_cache *c = masa__calloc(layer->ctx, 1, sizeof *c);
    if (!c)
        return masa__fail(MASA_ERROR_OUT_OF_MEMORY,
                          "%s: cannot allocate the cache handle", fn);
    *c = (masa_kv_cache){
        .ctx = layer->ctx, .batch = batch, .max_seq = max_seq,
        .n_kv_heads = layer->n_kv_heads, .head_dim = layer->head_dim,
        .k = memory, .v = (float *)memory + n, .bytes = 2 * n * sizeof(float),
    };
    *out = c;
    return MASA_OK;
}

MASA_API void masa_kv_cache_destroy(masa_kv_cache *cache)
{
    if (cache)
        masa__free(cache->ctx, cache);
}

MASA_API masa_status masa_kv_cache_truncate(masa_kv_cache *cache,
                                            size_t length)
{
    static const char fn[] = "masa_kv_cache_truncate";
    if (!cache)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT, "%s: cache is NULL", fn);
    if (length > cache->length)
        return masa__fail(MASA_ERROR_OUT_OF_RANGE,
                          "%s: length %zu is beyond the %zu positions the "
                          "cache holds", fn, length, cache->length);
    cache->length = length;
    if (length == 0)
        cache->owner = NULL;
    return MASA_OK;
}

MASA_API masa_status masa_kv_cache_reset(masa_kv_cache *cache)
{
    if (!cache)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT,
                          "masa_kv_cache_reset: cache is NULL");
    return masa_kv_cache_truncate(cache, 0);
}

MASA_API masa_status masa_kv_cache_length(const masa_kv_cache *cache,
                                          size_t *length)
{
    if (!cache || !length)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT,
                          "masa_kv_cache_length: %s is NULL",
                          !cache ? "cache" : "length");
    *length = cache->length;
    return MASA_OK;
}

MASA_API masa_status masa_kv_cache_shape(const masa_kv_cache *cache,
                                         size_t *batch, size_t *max_seq)
{
    if (!cache)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT,
                          "masa_kv_cache_shape: cache is NULL");
    if (batch)
        *batch = cache->batch;
    if (max_seq)
        *max_seq = cache->max_seq;
    return MASA_OK;
}
