/* masa_layer_decode: one step of incremental decoding. Projects the new
 * tokens (decode_project.c), rotates Q and K to positions continuing the
 * cache, appends K and V to the cache, attends over it
 * (decode_attention.c) and projects the result. */
#include <string.h>

#include "common/internal.h"

/* Offsets (floats) of the decode workspace's parts. */
typedef struct decode_layout {
    size_t q, kn, vn, attn;  /* [rows, dq], [rows, dkv] x 2, [rows, dq] */
    size_t operand[4];       /* operand scratch of Q, K, V, O */
    size_t partial[4];       /* partial sums of Q, K, V, O */
    size_t attn_threads;     /* per-thread attention scratch */
    size_t attn_partials;    /* flash-decoding split results */
    masa_decode_attn_sizes attn_sizes;
    size_t total;
} decode_layout;

/* *start = round_up(*at, 16); *at = *start + n. false on overflow. */
static bool region(size_t *at, size_t n, size_t *start)
{
    size_t a = *at;
    if (!masa__add(&a, 15))
        return false;
    *start = a & ~(size_t)15;
    *at = *start;
    return masa__add(at, n);
}

/* Q's, K's and V's blocks (n[0..2] floats) side by side, and O's block
 * (n[3]) over them: O runs once Q, K and V are done. Sets the offsets of the
 * four blocks and advances *at past the larger of the two spans. */
static bool shared_regions(size_t *at, const size_t n[4], size_t off[4])
{
    size_t qkv = *at, o = *at;
    for (int p = 0; p < 3; p++)
        if (!region(&qkv, n[p], &off[p]))
            return false;
    if (!region(&o, n[3], &off[3]))
        return false;
    *at = qkv > o ? qkv : o;
    return true;
}

static masa_status decode_layout_of(const char *fn, const masa_layer *layer,
                                    size_t batch, size_t n_new,
                                    decode_layout *out)
{
    if (batch == 0 || n_new == 0)
        return masa__fail(MASA_ERROR_BAD_SHAPE,
                          "%s: batch and n_new must be nonzero (got %zu, "
                          "%zu)", fn, batch, n_new);
    size_t T = layer->ctx->n_threads, rows, nq, nkv, threads, bytes;
    size_t at = 0, scratch[4], partial[4];
    decode_layout d;
    memset(&d, 0, sizeof d);
    bool ok = masa__mul(batch, n_new, &rows) &&
              masa__mul(rows, layer->dq, &nq) &&
              masa__mul(rows, layer->dkv, &nkv);
    for (int p = 0; ok && p < MASA_NUM_PROJECTIONS; p++) {
        scratch[p] = masa__decode_proj_scratch(layer, p, rows);
        partial[p] = masa__decode_proj_partials(layer, p, rows);
        ok = scratch[p] != SIZE_MAX && partial[p] != SIZE_MAX;
    }
    ok = ok && region(&at, nq, &d.q) && region(&at, nkv, &d.kn) &&
         region(&at, nkv, &d.vn) && region(&at, nq, &d.attn) &&
         shared_regions(&at, scratch, d.operand) &&
         shared_regions(&at, partial, d.partial) &&
         masa__decode_attn_sizes(layer, n_new, &d.attn_sizes) &&
         masa__mul(d.attn_sizes.thread_floats, T, &threads) &&
         region(&at, threads, &d.attn_threads) &&
         region(&at, d.attn_sizes.partial_floats, &d.attn_partials) &&
         masa__mul(at, sizeof(float), &bytes);
    if (!ok)
        return masa__fail(MASA_ERROR_OVERFLOW,
                          "%s: workspace sizes for batch %zu and n_new %zu "
                          "overflow size_t", fn, batch, n_new);
    d.total = at;
    *out = d;
    return MASA_OK;
}

MASA_API masa_status masa_layer_decode_workspace_size(const masa_layer *layer,
                                                      size_t batch,
                                                      size_t n_new,
                                                      size_t *bytes)
{
    static const char fn[] = "masa_layer_decode_workspace_size";
    if (!layer || !bytes)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT, "%s: %s is NULL", fn,
                          !layer ? "layer" : "bytes");
    masa_status st;
    decode_layout d;
    if ((st = masa__check_decodable(fn, layer)) != MASA_OK ||
        (st = masa__check_ready(fn, layer)) != MASA_OK ||
        (st = decode_layout_of(fn, layer, batch, n_new, &d)) != MASA_OK)
        return st;
    *bytes = d.total * sizeof(float);
    return MASA_OK;
}

static masa_status check_cache(const char *fn, const masa_layer *layer,
                               const masa_kv_cache *cache, size_t batch,
                               size_t n_new)
{
    if (cache->n_kv_heads != layer->n_kv_heads ||
        cache->head_dim != layer->head_dim)
        return masa__fail(MASA_ERROR_BAD_SHAPE,
                          "%s: the cache was made for %zu key/value heads of "
                          "%zu, the layer has %zu of %zu", fn,
                          cache->n_kv_heads, cache->head_dim,
                          layer->n_kv_heads, layer->head_dim);
    if (cache->batch != batch)
        return masa__fail(MASA_ERROR_BAD_SHAPE,
                          "%s: the cache holds %zu sequences, batch is %zu",
                          fn, cache->batch, batch);
    if (cache->length > 0 && cache->owner != layer)
        return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                          "%s: the cache holds keys of another layer (reset "
                          "it before using it with this one)", fn);
    if (n_new > cache->max_seq - cache->length)
        return masa__fail(MASA_ERROR_OUT_OF_RANGE,
                          "%s: the cache is full: it holds %zu of %zu "
                          "positions, %zu more do not fit", fn, cache->length,
                          cache->max_seq, n_new);
    return MASA_OK;
}

/* Copies the new tokens' K and V ([rows, dkv]) to positions length.. of the
 * cache ([batch, n_kv_heads, max_seq, head_dim]). */
static void append(masa_kv_cache *c, const float *kn, const float *vn,
                   size_t batch, size_t n_new, size_t dkv)
{
    size_t hd = c->head_dim;
    for (size_t b = 0; b < batch; b++)
        for (size_t g = 0; g < c->n_kv_heads; g++) {
            size_t dst = ((b * c->n_kv_heads + g) * c->max_seq + c->length) *
                         hd;
            for (size_t t = 0; t < n_new; t++) {
                size_t src = (b * n_new + t) * dkv + g * hd;
                memcpy(c->k + dst + t * hd, kn + src, hd * sizeof(float));
                memcpy(c->v + dst + t * hd, vn + src, hd * sizeof(float));
            }
        }
}

MASA_API masa_status masa_layer_decode(const masa_layer *layer,
                                       masa_kv_cache *cache, size_t batch,
                                       size_t n_new, const float *x, float *y,
                                       void *workspace,
                                       size_t workspace_bytes)
{
    static const char fn[] = "masa_layer_decode";
    if (!layer || !cache || !x || !y || !workspace)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT, "%s: %s is NULL", fn,
                          !layer   ? "layer"
                          : !cache ? "cache"
                          : !x     ? "x"
                          : !y     ? "y"
                                   : "workspace");
    masa_status st;
    decode_layout d;
    if ((st = masa__check_decodable(fn, layer)) != MASA_OK ||
        (st = masa__check_ready(fn, layer)) != MASA_OK ||
        (st = decode_layout_of(fn, layer, batch, n_new, &d)) != MASA_OK ||
        (st = check_cache(fn, layer, cache, batch, n_new)) != MASA_OK ||
        (st = masa__check_positions(fn, layer, cache->length, n_new)) !=
            MASA_OK)
        return st;
    if (workspace_bytes < d.total * sizeof(float))
        return masa__fail(MASA_ERROR_BUFFER_TOO_SMALL,
                          "%s: workspace has %zu bytes, needs %zu", fn,
                          workspace_bytes, d.total * sizeof(float));
    if (!masa__float_aligned(workspace))
        return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                          "%s: workspace must be aligned for float", fn);
    size_t rows = batch * n_new;
    size_t act = rows * layer->d_model * sizeof(float);
    size_t wsb = d.total * sizeof(float);
    if (masa__overlaps(x, act, y, act) ||
        masa__overlaps(x, act, workspace, wsb) ||
        masa__overlaps(y, act, workspace, wsb) ||
        masa__overlaps(x, act, cache->k, cache->bytes) ||
        masa__overlaps(y, act, cache->k, cache->bytes) ||
        masa__overlaps(workspace, wsb, cache->k, cache->bytes))
        return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                          "%s: x, y, the workspace and the cache memory must "
                          "not overlap", fn);

    float *ws = workspace;
    float *q = ws + d.q, *kn = ws + d.kn, *vn = ws + d.vn;
    float *attn = ws + d.attn;
    masa_decode_proj qkv[3] = {
        {MASA_PROJ_Q, x, q, ws + d.operand[0], ws + d.partial[0]},
        {MASA_PROJ_K, x, kn, ws + d.operand[1], ws + d.partial[1]},
        {MASA_PROJ_V, x, vn, ws + d.operand[2], ws + d.partial[2]},
    };
    masa__decode_project(layer, qkv, 3, rows);
    if (layer->rope) {
        masa__rope(q, batch, n_new, layer->dq, layer->n_heads,
                   layer->head_dim, cache->length, layer->rope_theta, +1);
        masa__rope(kn, batch, n_new, layer->dkv, layer->n_kv_heads,
                   layer->head_dim, cache->length, layer->rope_theta, +1);
    }
    append(cache, kn, vn, batch, n_new, layer->dkv);
    masa_decode_attn_args args = {
        .layer = layer, .cache = cache, .batch = batch, .n_new = n_new,
        .length = cache->length + n_new, .q = q, .attn = attn,
        .thread_scratch = ws + d.attn_threads,
        .thread_floats = d.attn_sizes.thread_floats,
        .partials = ws + d.attn_partials,
    };
    masa__decode_attention(&args);
    masa_decode_proj o = {MASA_PROJ_O, attn, y, ws + d.operand[3],
                          ws + d.partial[3]};
    masa__decode_project(layer, &o, 1, rows);
    cache->length += n_new;
    cache->owner = layer;
    return MASA_OK;
}
