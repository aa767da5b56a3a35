/* Layer forward: projections (BLIS GEMMs on composed or dense weights),
 * RoPE, the attention core and the output projection. */
#include <stdint.h>
#include <string.h>

#include "common/internal.h"

bool masa__overlaps(const void *a, size_t a_bytes, const void *b,
                    size_t b_bytes)
{
    uintptr_t pa = (uintptr_t)a, pb = (uintptr_t)b;
    return pa < pb + b_bytes && pb < pa + a_bytes;
}

bool masa__float_aligned(const void *p)
{
    return (uintptr_t)p % _Alignof(float) == 0;
}

/* out[rows x d_out] = in[rows x d_in] W (+ bias), W = base + A B: one
 * product with a weight that holds A B (cached or folded, see
 * masa__lowrank_folds), else the base's product and then (X A) B. */
void masa__project(const masa_layer *layer, int p, const float *in,
                   size_t rows, float *out, float *weight_scratch,
                   float *lowrank_scratch)
{
    const masa_proj_state *ps = &layer->proj[p];
    masa_pool *pool = layer->ctx->pool;
    size_t nt = layer->ctx->n_threads;
    float beta = 0.0f;
    if (ps->bias) {
        for (size_t r = 0; r < rows; r++)
            memcpy(out + r * ps->d_out, ps->bias, ps->d_out * sizeof(float));
        beta = 1.0f;
    }
    if (ps->set) {
        const float *w = masa__projection_weight(layer, p, weight_scratch);
        if (masa__lowrank_folds(ps, rows)) /* w is weight_scratch */
            masa__add_lowrank(layer, p, weight_scratch);
        masa__gemm_pool(pool, nt, rows, ps->d_out, ps->d_in, 1.0f, in,
                        ps->d_in, 1, w, ps->d_out, 1, beta, out, ps->d_out,
                        1);
        beta = 1.0f;
    }
    if (ps->rank && !masa__lowrank_in_weight(ps, rows)) {
        size_t r = ps->rank;
        masa__gemm_pool(pool, nt, rows, r, ps->d_in, 1.0f, in, ps->d_in, 1,
                        ps->lowrank_a, r, 1, 0.0f, lowrank_scratch, r, 1);
        masa__gemm_pool(pool, nt, rows, ps->d_out, r, 1.0f, lowrank_scratch,
                        r, 1, ps->lowrank_b, ps->d_out, 1, beta, out,
                        ps->d_out, 1);
    }
}

MASA_API masa_status masa_layer_forward(const masa_layer *layer, size_t batch,
                                        size_t seq, size_t pos_offset,
                                        const float *x, float *y,
                                        void *workspace, size_t workspace_bytes,
                                        void *reserve, size_t reserve_bytes)
{
    static const char fn[] = "masa_layer_forward";
    if (!layer || !x || !y || !workspace)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT, "%s: %s is NULL", fn,
                          !layer ? "layer" : !x ? "x" : !y ? "y"
                                                           : "workspace");
    masa_status st = masa__check_ready(fn, layer);
    if (st != MASA_OK ||
        (st = masa__check_positions(fn, layer, pos_offset, seq)) != MASA_OK)
        return st;
    masa_workspace_layout wl;
    masa_reserve_layout rl;
    if ((st = masa__check_call_buffers(fn, layer, batch, seq, workspace,
                                       workspace_bytes, reserve, reserve_bytes,
                                       &wl, &rl)) != MASA_OK)
        return st;
    size_t bt = batch * seq;
    size_t act_bytes = bt * layer->d_model * sizeof(float);
    if (masa__overlaps(x, act_bytes, y, act_bytes))
        return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                          "%s: x and y overlap", fn);

    float *ws = workspace;
    float *base = reserve ? (float *)reserve : ws + wl.fwd_qkv;
    float *q = base + rl.q, *k = base + rl.k, *v = base + rl.v;
    float *attn = base + rl.attn, *softmax = base + rl.softmax;
    float *wscratch = ws + wl.weight, *lrscratch = ws + wl.lowrank;

    masa__project(layer, MASA_PROJ_Q, x, bt, q, wscratch, lrscratch);
    masa__project(layer, MASA_PROJ_K, x, bt, k, wscratch, lrscratch);
    masa__project(layer, MASA_PROJ_V, x, bt, v, wscratch, lrscratch);
    if (layer->rope) {
        masa__rope(q, batch, seq, layer->dq, layer->n_heads, layer->head_dim,
                   pos_offset, layer->rope_theta, +1);
        masa__rope(k, batch, seq, layer->dkv, layer->n_kv_heads,
                   layer->head_dim, pos_offset, layer->rope_theta, +1);
    }
    masa_attn_args args = {
        .layer = layer, .batch = batch, .seq = seq, .q = q, .k = k, .v = v,
        .attn = attn, .row_max = softmax, .row_log_sum = softmax + bt *
        layer->n_heads, .tiles = ws + wl.tiles,
        .tile_floats = wl.tile_floats,
    };
    masa__attention_forward(&args);
    if (reserve) {
        masa_reserve_stamp stamp = {MASA_RESERVE_MAGIC, layer, batch, seq,
                                    pos_offset};
        memcpy(reserve, &stamp, sizeof stamp);
    }
    masa__project(layer, MASA_PROJ_O, attn, bt, y, wscratch, lrscratch);
    return MASA_OK;
}
