/* Attention core, backward. One task per (sequence, key/value head): the
 * task owns that head's slice of dK and dV, so the query heads sharing it
 * (GQA) and all query tiles accumulate without races. P is rebuilt from the
 * saved log-sum-exp instead of being stored (memory stays linear in seq). */
#include <math.h>
#include <string.h>

#include "internal.h"

static void backward_head_tile(const masa_attn_args *a, size_t b, size_t h,
                               size_t i0, float *scratch)
{
    const masa_layer *L = a->layer;
    size_t T = a->seq, hd = L->head_dim;
    size_t g = h / (L->n_heads / L->n_kv_heads);
    size_t m = T - i0 < MASA_ATTN_TILE ? T - i0 : MASA_ATTN_TILE;
    size_t kend = L->causal ? i0 + m : T;

    const float *q = a->q + (b * T + i0) * L->dq + h * hd;
    const float *k = a->k + b * T * L->dkv + g * hd;
    const float *v = a->v + b * T * L->dkv + g * hd;
    const float *d_o = a->d_attn + (b * T + i0) * L->dq + h * hd;
    const float *lse = a->lse + (b * L->n_heads + h) * T + i0;
    float *dq = a->dq + (b * T + i0) * L->dq + h * hd;
    float *dk = a->dk + b * T * L->dkv + g * hd;
    float *dv = a->dv + b * T * L->dkv + g * hd;

    float *p = scratch;                              /* m x kend */
    float *dp = scratch + MASA_ATTN_TILE * T;        /* m x kend */

    /* P = exp(scale * Q K^T - lse), zero where masked */
    masa__gemm(m, kend, hd, L->scale, q, L->dq, 1, k, 1, L->dkv, 0.0f, p,
               kend, 1, 1);
    for (size_t r = 0; r < m; r++) {
        size_t valid = L->causal ? i0 + r + 1 : T;
        float *row = p + r * kend;
        for (size_t j = 0; j < valid; j++)
            row[j] = expf(row[j] - lse[r]);
        for (size_t j = valid; j < kend; j++)
            row[j] = 0.0f;
    }
    /* dP = dO V^T */
    masa__gemm(m, kend, hd, 1.0f, d_o, L->dq, 1, v, 1, L->dkv, 0.0f, dp, kend,
               1, 1);
    /* dS = P * (dP - delta), into dp; masked entries are set to 0, not
     * multiplied (dP there may hold a future token's NaN). */
    for (size_t r = 0; r < m; r++) {
        size_t valid = L->causal ? i0 + r + 1 : T;
        float *ds = dp + r * kend;
        const float *pr = p + r * kend;
        /* delta_r = sum_j P_rj dP_rj (= <dO_r, O_r>), from the same dP as
         * dS: a row whose P is one-hot then gets dS = 0 exactly. */
        float d = 0.0f;
        for (size_t j = 0; j < valid; j++)
            d += pr[j] * ds[j];
        for (size_t j = 0; j < valid; j++)
            ds[j] = pr[j] * (ds[j] - d);
        for (size_t j = valid; j < kend; j++)
            ds[j] = 0.0f;
    }
    /* Keys every row of the tile sees: [0, full); with causal masking the
     * diagonal block [i0, kend) is done by hand over visible pairs only, so
     * that a NaN in one token never reaches tokens that cannot see it. */
    size_t full = L->causal ? i0 : kend;
    if (full > 0) {
        /* dV += P^T dO ; dK += scale dS^T Q ; dQ = scale dS K */
        masa__gemm(full, hd, m, 1.0f, p, 1, kend, d_o, L->dq, 1, 1.0f, dv,
                   L->dkv, 1, 1);
        masa__gemm(full, hd, m, L->scale, dp, 1, kend, q, L->dq, 1, 1.0f, dk,
                   L->dkv, 1, 1);
        masa__gemm(m, hd, full, L->scale, dp, kend, 1, k, L->dkv, 1, 0.0f, dq,
                   L->dq, 1, 1);
    } else {
        for (size_t r = 0; r < m; r++)
            memset(dq + r * L->dq, 0, hd * sizeof(float));
    }
    if (!L->causal)
        return;
    for (size_t r = 0; r < m; r++) {
        const float *qr = q + r * L->dq, *dor = d_o + r * L->dq;
        float *dqr = dq + r * L->dq;
        for (size_t j = i0; j <= i0 + r; j++) {
            float pj = p[r * kend + j], dsj = L->scale * dp[r * kend + j];
            const float *kj = k + j * L->dkv;
            float *dvj = dv + j * L->dkv, *dkj = dk + j * L->dkv;
            for (size_t c = 0; c < hd; c++) {
                dvj[c] += pj * dor[c];
                dkj[c] += dsj * qr[c];
                dqr[c] += dsj * kj[c];
            }
        }
    }
}

static void backward_task(void *p, size_t task, size_t thread)
{
    masa_attn_args *a = p;
    const masa_layer *L = a->layer;
    size_t T = a->seq, hd = L->head_dim;
    size_t g = task % L->n_kv_heads;
    size_t b = task / L->n_kv_heads;
    float *scratch = a->tiles + thread * a->tile_floats;

    for (size_t t = 0; t < T; t++) {
        memset(a->dk + (b * T + t) * L->dkv + g * hd, 0, hd * sizeof(float));
        memset(a->dv + (b * T + t) * L->dkv + g * hd, 0, hd * sizeof(float));
    }
    size_t rep = L->n_heads / L->n_kv_heads;
    for (size_t h = g * rep; h < (g + 1) * rep; h++)
        for (size_t i0 = 0; i0 < T; i0 += MASA_ATTN_TILE)
            backward_head_tile(a, b, h, i0, scratch);
}

void masa__attention_backward(masa_attn_args *args)
{
    const masa_layer *L = args->layer;
    masa__pool_run(L->ctx->pool, args->batch * L->n_kv_heads, backward_task,
                   args);
}
