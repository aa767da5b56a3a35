/* Attention core, forward: for each (sequence, head, query tile) the scores
 * against the keys it may see, an exact softmax over each row, and P V.
 * Scratch is one tile x seq block per thread, so memory grows linearly with
 * seq. The log-sum-exp of each row is saved so backward can rebuild P. */
#include <math.h>
#include <string.h>

#include "internal.h"

size_t masa__attention_tile_floats(size_t seq, size_t head_dim)
{
    (void)head_dim;
    size_t n;
    /* scores and their gradient (backward) */
    if (!masa__mul3(2, MASA_ATTN_TILE, seq, &n))
        return SIZE_MAX;
    return n;
}

/* Softmax of row s[0..n_valid) in place; s[n_valid..n) set to 0. Returns the
 * log-sum-exp. */
static float softmax_row(float *s, size_t n_valid, size_t n)
{
    float max = -INFINITY;
    for (size_t j = 0; j < n_valid; j++)
        if (s[j] > max)
            max = s[j];
    if (!isfinite(max)) {
        /* NaN or infinite scores: let them propagate rather than invent. */
        for (size_t j = 0; j < n; j++)
            s[j] = j < n_valid ? NAN : 0.0f;
        return NAN;
    }
    float sum = 0.0f;
    for (size_t j = 0; j < n_valid; j++) {
        s[j] = expf(s[j] - max);
        sum += s[j];
    }
    float inv = 1.0f / sum;
    for (size_t j = 0; j < n_valid; j++)
        s[j] *= inv;
    for (size_t j = n_valid; j < n; j++)
        s[j] = 0.0f;
    return max + logf(sum);
}

static size_t n_query_tiles(size_t seq)
{
    return (seq + MASA_ATTN_TILE - 1) / MASA_ATTN_TILE;
}

static void forward_task(void *p, size_t task, size_t thread)
{
    masa_attn_args *a = p;
    const masa_layer *L = a->layer;
    size_t T = a->seq, hd = L->head_dim;
    size_t tiles = n_query_tiles(T);
    size_t tile = task % tiles;
    size_t h = (task / tiles) % L->n_heads;
    size_t b = task / tiles / L->n_heads;
    size_t g = h / (L->n_heads / L->n_kv_heads);

    size_t i0 = tile * MASA_ATTN_TILE;
    size_t m = T - i0 < MASA_ATTN_TILE ? T - i0 : MASA_ATTN_TILE;
    size_t kend = L->causal ? i0 + m : T;

    const float *q = a->q + (b * T + i0) * L->dq + h * hd;
    const float *k = a->k + b * T * L->dkv + g * hd;
    const float *v = a->v + b * T * L->dkv + g * hd;
    float *out = a->attn + (b * T + i0) * L->dq + h * hd;
    float *lse = a->lse + (b * L->n_heads + h) * T + i0;
    float *s = a->tiles + thread * a->tile_floats;

    /* S = scale * Q_tile K^T, m x kend, row stride kend */
    masa__gemm(m, kend, hd, L->scale, q, L->dq, 1, k, 1, L->dkv, 0.0f, s,
               kend, 1, 1);
    for (size_t r = 0; r < m; r++) {
        size_t valid = L->causal ? i0 + r + 1 : T;
        lse[r] = softmax_row(s + r * kend, valid, kend);
    }
    if (!L->causal) {
        /* A_tile = P V */
        masa__gemm(m, hd, kend, 1.0f, s, kend, 1, v, L->dkv, 1, 0.0f, out,
                   L->dq, 1, 1);
        return;
    }
    /* Causal: keys before the tile are seen by every row (one GEMM); in the
     * diagonal block row r sees keys i0..i0+r only. Multiplying a masked
     * P = 0 by a future value would turn a NaN there into a NaN here, so the
     * diagonal block only touches the keys each row may see. */
    if (i0 > 0)
        masa__gemm(m, hd, i0, 1.0f, s, kend, 1, v, L->dkv, 1, 0.0f, out,
                   L->dq, 1, 1);
    else
        for (size_t r = 0; r < m; r++)
            memset(out + r * L->dq, 0, hd * sizeof(float));
    for (size_t r = 0; r < m; r++) {
        float *o = out + r * L->dq;
        for (size_t j = i0; j <= i0 + r; j++) {
            float pj = s[r * kend + j];
            const float *vj = v + j * L->dkv;
            for (size_t c = 0; c < hd; c++)
                o[c] += pj * vj[c];
        }
    }
}

void masa__attention_forward(masa_attn_args *args)
{
    const masa_layer *L = args->layer;
    size_t n_tasks = args->batch * L->n_heads * n_query_tiles(args->seq);
    masa__pool_run(L->ctx->pool, n_tasks, forward_task, args);
}
