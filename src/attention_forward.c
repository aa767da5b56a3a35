/* Attention core, forward, in the flash style: one task per (sequence, head,
 * query tile) walks the key tiles it may see with an online softmax (running
 * row max m, sum l, and the unnormalised output rescaled when m grows), so
 * no T x T matrix is ever formed: scratch is one BQ x BK score tile per
 * thread. Causal tiles past the diagonal are skipped. The log-sum-exp of each
 * row is saved so backward can rebuild P. BLIS runs single-threaded inside
 * the pool's tasks. */
#include <math.h>
#include <string.h>

#include "attention_core.h"

static size_t min_size(size_t a, size_t b) { return a < b ? a : b; }

size_t masa__attention_tile_floats(size_t seq, size_t head_dim)
{
    size_t bq = min_size(MASA_FLASH_BQ, seq), bk = min_size(MASA_FLASH_BK, seq);
    /* backward: P and dP tiles, delta per row, and the partial dK, dV of a
     * key split (attention_backward.c); forward needs less */
    size_t tiles, partial, n = bq;
    if (!masa__mul3(2, bq, bk, &tiles) || !masa__mul3(2, seq, head_dim,
                                                      &partial) ||
        !masa__add(&n, tiles) || !masa__add(&n, partial))
        return SIZE_MAX;
    return n;
}

static size_t n_query_tiles(size_t seq)
{
    return (seq + MASA_FLASH_BQ - 1) / MASA_FLASH_BQ;
}

static void forward_task(void *p, size_t task, size_t thread)
{
    masa_attn_args *a = p;
    const masa_layer *L = a->layer;
    size_t T = a->seq, hd = L->head_dim, H = L->n_heads;
    size_t tiles = n_query_tiles(T);
    /* the longest causal tiles first, so the short ones fill the gaps */
    size_t tile = tiles - 1 - task / (a->batch * H);
    size_t h = task % H;
    size_t b = task / H % a->batch;
    size_t g = h / (H / L->n_kv_heads);

    size_t i0 = tile * MASA_FLASH_BQ;
    size_t m = min_size(T - i0, MASA_FLASH_BQ);
    size_t kend = L->causal ? i0 + m : T;

    const float *q = a->q + (b * T + i0) * L->dq + h * hd;
    const float *k = a->k + b * T * L->dkv + g * hd;
    const float *v = a->v + b * T * L->dkv + g * hd;
    float *out = a->attn + (b * T + i0) * L->dq + h * hd;
    float *lse = a->lse + (b * H + h) * T + i0;
    float *s = a->tiles + thread * a->tile_floats;
    /* row max and sum live in lse[] and the tail of the scratch */
    float *mx = lse;
    float *sum = s + min_size(MASA_FLASH_BQ, T) * min_size(MASA_FLASH_BK, T);

    for (size_t r = 0; r < m; r++) {
        memset(out + r * L->dq, 0, hd * sizeof(float));
        mx[r] = -INFINITY;
        sum[r] = 0.0f;
    }
    for (size_t j0 = 0; j0 < kend; j0 += MASA_FLASH_BK) {
        size_t n = min_size(kend - j0, MASA_FLASH_BK);
        masa_tile_mask mask = {L->causal && j0 + n - 1 > i0,
                               (ptrdiff_t)i0 - (ptrdiff_t)j0};
        /* S = scale Q_tile K_tile^T, m x n, row stride n */
        masa__gemm(m, n, hd, L->scale, q, L->dq, 1, k + j0 * L->dkv, 1,
                   L->dkv, 0.0f, s, n, 1, 1);
        for (size_t r = 0; r < m; r++) {
            size_t nv = masa__mask_row_len(mask, r, n);
            if (nv == 0)
                continue;
            float *row = s + r * n;
            float m_new = masa__row_max(row, nv, mx[r]);
            float part = masa__exp_shifted(row, nv, m_new);
            /* exp(-inf - -inf) is NaN: a row whose scores are all -inf or
             * NaN gives NaN, as an exact softmax would */
            float rescale = expf(mx[r] - m_new);
            sum[r] = sum[r] * rescale + part;
            mx[r] = m_new;
            if (rescale != 1.0f) {
                float *o = out + r * L->dq;
                for (size_t c = 0; c < hd; c++)
                    o[c] *= rescale;
            }
        }
        /* O += P V_tile */
        masa__attn_rows_product(m, n, hd, mask, 1.0f, s, n, v + j0 * L->dkv,
                                L->dkv, out, L->dq);
    }
    for (size_t r = 0; r < m; r++) {
        float inv = 1.0f / sum[r];
        float *o = out + r * L->dq;
        for (size_t c = 0; c < hd; c++)
            o[c] *= inv;
        lse[r] = mx[r] + logf(sum[r]);
    }
}

void masa__attention_forward(masa_attn_args *args)
{
    const masa_layer *L = args->layer;
    size_t n_tasks = args->batch * L->n_heads * n_query_tiles(args->seq);
    masa__pool_run(L->ctx->pool, n_tasks, forward_task, args);
}
