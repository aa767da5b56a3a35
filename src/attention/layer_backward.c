/* Layer backward: output projection, attention core, inverse RoPE, input
 * projections, and the parameter gradients with the SET/ADD rule of
 * masa_layer_grads. For a MASA projection G = X^T dY is formed once and
 * dc[l, s] = <D_s, G>, dD_s += c[l, s] G and W_l (for dx) all come from one
 * pass over the atoms (masa__atom_grads). */
#include <stddef.h>
#include <string.h>

#include "common/internal.h"

static const char *const names[4] = {"Q", "K", "V", "O"};

/* The struct of programs built before low-rank terms ends here. */
#define GRADS_SIZE_V1 offsetof(masa_layer_grads, d_lowrank_a)

/* Copies the caller's struct, of this library's size, a newer one's (unknown
 * fields zero) or the older one without the low-rank fields (they read as
 * NULL), into a full-size struct. */
static masa_status read_grads(const char *fn, const masa_layer_grads *in,
                              masa_layer_grads *out)
{
    memset(out, 0, sizeof *out);
    if (in->size != GRADS_SIZE_V1) {
        masa_status st = masa__check_struct_size(fn, in, in->size,
                                                 sizeof *out);
        if (st != MASA_OK)
            return st;
    }
    memcpy(out, in, in->size < sizeof *out ? in->size : sizeof *out);
    out->size = sizeof *out;
    return MASA_OK;
}

static masa_status check_grads(const char *fn, const masa_layer *layer,
                               const masa_layer_grads *g)
{
    if (g->mode != MASA_GRAD_SET && g->mode != MASA_GRAD_ADD)
        return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                          "%s: grads->mode %d is neither MASA_GRAD_SET nor "
                          "MASA_GRAD_ADD", fn, (int)g->mode);
    for (int p = 0; p < MASA_NUM_PROJECTIONS; p++) {
        const masa_proj_state *ps = &layer->proj[p];
        if (!ps->is_masa && (g->d_atoms[p] || g->d_coefficients[p]))
            return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                              "%s: d_atoms/d_coefficients given for %s, which "
                              "is not a MASA projection", fn, names[p]);
        if ((ps->is_masa || !ps->set) && g->d_weight[p])
            return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                              "%s: d_weight given for %s, which has no dense "
                              "weight", fn, names[p]);
        if (ps->rank == 0 && (g->d_lowrank_a[p] || g->d_lowrank_b[p]))
            return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                              "%s: d_lowrank_a/d_lowrank_b given for %s, "
                              "which has no low-rank term", fn, names[p]);
        if (!ps->bias && g->d_bias[p])
            return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                              "%s: d_bias given for %s, which has no bias", fn,
                              names[p]);
    }
    return MASA_OK;
}

/* Gradient buffers must not overlap each other or dx (one dictionary used
 * by two projections of a layer needs two buffers). */
/* The buffers backward reads (x, dy, reserve) or scratches (workspace). */
typedef struct read_buffers {
    const void *ptr[4];
    size_t len[4];
} read_buffers;

static masa_status check_grad_overlaps(const char *fn, const masa_layer *layer,
                                       const masa_layer_grads *g,
                                       const float *dx, size_t dx_bytes,
                                       const read_buffers *in)
{
    static const char *const in_names[4] = {"x", "dy", "the reserve",
                                            "the workspace"};
    const void *ptr[6 * MASA_NUM_PROJECTIONS + 1];
    size_t len[6 * MASA_NUM_PROJECTIONS + 1];
    const char *what[6 * MASA_NUM_PROJECTIONS + 1];
    size_t n = 0;
    for (int p = 0; p < MASA_NUM_PROJECTIONS; p++) {
        const masa_proj_state *ps = &layer->proj[p];
        size_t w = ps->d_in * ps->d_out * sizeof(float);
        if (g->d_atoms[p]) {
            ptr[n] = g->d_atoms[p];
            len[n] = w * ps->dict->n_atoms;
            what[n++] = "d_atoms";
        }
        if (g->d_coefficients[p]) {
            ptr[n] = g->d_coefficients[p];
            len[n] = ps->coef->n_layers * ps->coef->n_atoms * sizeof(float);
            what[n++] = "d_coefficients";
        }
        if (g->d_weight[p]) {
            ptr[n] = g->d_weight[p];
            len[n] = w;
            what[n++] = "d_weight";
        }
        if (g->d_bias[p]) {
            ptr[n] = g->d_bias[p];
            len[n] = ps->d_out * sizeof(float);
            what[n++] = "d_bias";
        }
        if (g->d_lowrank_a[p]) {
            ptr[n] = g->d_lowrank_a[p];
            len[n] = ps->d_in * ps->rank * sizeof(float);
            what[n++] = "d_lowrank_a";
        }
        if (g->d_lowrank_b[p]) {
            ptr[n] = g->d_lowrank_b[p];
            len[n] = ps->rank * ps->d_out * sizeof(float);
            what[n++] = "d_lowrank_b";
        }
    }
    if (dx) {
        ptr[n] = dx;
        len[n] = dx_bytes;
        what[n++] = "dx";
    }
    for (size_t i = 0; i < n; i++) {
        for (size_t j = i + 1; j < n; j++)
            if (masa__overlaps(ptr[i], len[i], ptr[j], len[j]))
                return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                                  "%s: gradient buffers overlap (%s and %s)",
                                  fn, what[i], what[j]);
        for (size_t j = 0; j < 4; j++)
            if (masa__overlaps(ptr[i], len[i], in->ptr[j], in->len[j]))
                return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                                  "%s: %s overlaps %s", fn, what[i],
                                  in_names[j]);
    }
    return MASA_OK;
}

/* A MASA projection forms G = X^T dY once; one pass over the atoms then
 * gives dc, dD and, when dx needs it and no composed cache holds it, W_l
 * (with A B added when masa__lowrank_folds says so, as forward does). A
 * low-rank term not held by that weight reaches dx as (dY B^T) A^T, whose
 * dY B^T dA needs too; dB needs X A, recomputed rather than kept in the
 * reserve (one thin product). */
void masa__project_backward(const masa_layer *layer, int p, const float *in,
                            const float *dy, size_t rows,
                            const masa_layer_grads *g, float *dx, float beta,
                            float *w_scratch, float *g_scratch,
                            void *partials, float *lowrank_scratch)
{
    const masa_proj_state *ps = &layer->proj[p];
    masa_pool *pool = layer->ctx->pool;
    size_t nt = layer->ctx->n_threads;
    bool add = g->mode == MASA_GRAD_ADD;

    if (g->d_bias[p]) {
        float *db = g->d_bias[p];
        if (!add)
            memset(db, 0, ps->d_out * sizeof(float));
        for (size_t r = 0; r < rows; r++)
            for (size_t c = 0; c < ps->d_out; c++)
                db[c] += dy[r * ps->d_out + c];
    }
    const float *w = ps->weight;
    bool folded = dx && masa__lowrank_folds(ps, rows);
    if (!ps->set) {
        w = NULL;
    } else if (!ps->is_masa) {
        if (g->d_weight[p]) /* dW (+)= X^T dY */
            masa__gemm_pool(pool, nt, ps->d_in, ps->d_out, rows, 1.0f, in, 1,
                            ps->d_in, dy, ps->d_out, 1, add ? 1.0f : 0.0f,
                            g->d_weight[p], ps->d_out, 1);
    } else {
        bool compose = dx && !ps->composed_cache;
        w = ps->composed_cache ? ps->composed_cache : w_scratch;
        if (g->d_atoms[p] || g->d_coefficients[p]) {
            masa__gemm_pool(pool, nt, ps->d_in, ps->d_out, rows, 1.0f, in, 1,
                            ps->d_in, dy, ps->d_out, 1, 0.0f, g_scratch,
                            ps->d_out, 1);
            float *dc = g->d_coefficients[p]
                            ? g->d_coefficients[p] +
                                  ps->layer_index * ps->coef->n_atoms
                            : NULL;
            masa__atom_grads(ps->dict, ps->coef, ps->layer_index, g_scratch,
                             dc, g->d_atoms[p], add,
                             compose ? w_scratch : NULL, partials, pool);
        } else if (compose) {
            masa__compose(ps->dict, ps->coef, ps->layer_index, w_scratch,
                          pool);
        }
        if (folded)
            masa__add_lowrank(layer, p, w_scratch);
    }

    size_t r = ps->rank;
    bool lr_dx = dx && r && !masa__lowrank_in_weight(ps, rows);
    /* without a term the scratch may be NULL: no offset taken from it */
    float *xa = lowrank_scratch, *dyb = r ? lowrank_scratch + rows * r : NULL;
    if (r && g->d_lowrank_b[p]) { /* dB (+)= (X A)^T dY */
        masa__gemm_pool(pool, nt, rows, r, ps->d_in, 1.0f, in, ps->d_in, 1,
                        ps->lowrank_a, r, 1, 0.0f, xa, r, 1);
        masa__gemm_pool(pool, nt, r, ps->d_out, rows, 1.0f, xa, 1, r, dy,
                        ps->d_out, 1, add ? 1.0f : 0.0f, g->d_lowrank_b[p],
                        ps->d_out, 1);
    }
    if (r && (g->d_lowrank_a[p] || lr_dx)) /* dY B^T */
        masa__gemm_pool(pool, nt, rows, r, ps->d_out, 1.0f, dy, ps->d_out, 1,
                        ps->lowrank_b, 1, ps->d_out, 0.0f, dyb, r, 1);
    if (r && g->d_lowrank_a[p]) /* dA (+)= X^T (dY B^T) */
        masa__gemm_pool(pool, nt, ps->d_in, r, rows, 1.0f, in, 1, ps->d_in,
                        dyb, r, 1, add ? 1.0f : 0.0f, g->d_lowrank_a[p], r,
                        1);
    if (dx && w) {
        masa__gemm_pool(pool, nt, rows, ps->d_in, ps->d_out, 1.0f, dy,
                        ps->d_out, 1, w, 1, ps->d_out, beta, dx, ps->d_in, 1);
        beta = 1.0f;
    }
    if (lr_dx) /* dx (+)= (dY B^T) A^T */
        masa__gemm_pool(pool, nt, rows, ps->d_in, r, 1.0f, dyb, r, 1,
                        ps->lowrank_a, 1, r, beta, dx, ps->d_in, 1);
}

MASA_API masa_status masa_layer_backward(const masa_layer *layer, size_t batch,
                                         size_t seq, size_t pos_offset,
                                         const float *x, const float *dy,
                                         float *dx,
                                         const masa_layer_grads *grads,
                                         void *workspace,
                                         size_t workspace_bytes,
                                         const void *reserve,
                                         size_t reserve_bytes)
{
    static const char fn[] = "masa_layer_backward";
    if (!layer || !x || !dy || !workspace || !reserve)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT, "%s: %s is NULL", fn,
                          !layer ? "layer" : !x ? "x" : !dy ? "dy"
                          : !workspace ? "workspace" : "reserve");
    masa_status st = masa__check_ready(fn, layer);
    if (st != MASA_OK ||
        (st = masa__check_positions(fn, layer, pos_offset, seq)) != MASA_OK)
        return st;
    masa_layer_grads full;
    if (grads) {
        if ((st = read_grads(fn, grads, &full)) != MASA_OK)
            return st;
    } else {
        masa_layer_grads_init(&full);
    }
    grads = &full;
    if ((st = check_grads(fn, layer, grads)) != MASA_OK)
        return st;
    masa_workspace_layout wl;
    masa_reserve_layout rl;
    if ((st = masa__check_call_buffers(fn, layer, batch, seq, workspace,
                                       workspace_bytes, reserve, reserve_bytes,
                                       &wl, &rl)) != MASA_OK)
        return st;
    masa_reserve_stamp stamp;
    memcpy(&stamp, reserve, sizeof stamp);
    if (stamp.magic != MASA_RESERVE_MAGIC || stamp.layer != layer ||
        stamp.batch != batch || stamp.seq != seq ||
        stamp.pos_offset != pos_offset)
        return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                          "%s: the reserve was not filled by a forward call "
                          "of this layer with batch %zu, seq %zu, pos_offset "
                          "%zu", fn, batch, seq, pos_offset);
    size_t bt = batch * seq;
    size_t act_bytes = bt * layer->d_model * sizeof(float);
    read_buffers in = {{x, dy, reserve, workspace},
                       {act_bytes, act_bytes, reserve_bytes, workspace_bytes}};
    if ((st = check_grad_overlaps(fn, layer, grads, dx, act_bytes, &in)) !=
        MASA_OK)
        return st;

    const float *base = reserve;
    float *ws = workspace;
    float *d_attn = ws + wl.grad_a;
    float *dq = d_attn + bt * layer->dq;
    float *dk = dq + bt * layer->dq;
    float *dv = dk + bt * layer->dkv;
    float *wscratch = ws + wl.weight, *gscratch = ws + wl.dweight;
    void *partials = ws + wl.partials;
    float *lrscratch = ws + wl.lowrank;
    const float *attn = base + rl.attn;

    /* output projection */
    masa__project_backward(layer, MASA_PROJ_O, attn, dy, bt, grads, d_attn,
                           0.0f, wscratch, gscratch, partials, lrscratch);

    masa_attn_args args = {
        .layer = layer, .batch = batch, .seq = seq, .q = base + rl.q,
        .k = base + rl.k, .v = base + rl.v, .attn = (float *)attn,
        .row_max = (float *)(base + rl.softmax),
        .row_log_sum = (float *)(base + rl.softmax) + bt * layer->n_heads,
        .d_attn = d_attn, .dq = dq,
        .dk = dk, .dv = dv, .tiles = ws + wl.tiles,
        .tile_floats = wl.tile_floats,
    };
    masa__attention_backward(&args);
    if (layer->rope) {
        masa__rope(dq, batch, seq, layer->dq, layer->n_heads, layer->head_dim,
                   pos_offset, layer->rope_theta, -1);
        masa__rope(dk, batch, seq, layer->dkv, layer->n_kv_heads,
                   layer->head_dim, pos_offset, layer->rope_theta, -1);
    }

    const float *d_proj[3] = {dq, dk, dv};
    for (int p = MASA_PROJ_Q; p <= MASA_PROJ_V; p++)
        masa__project_backward(layer, p, x, d_proj[p], bt, grads, dx,
                               p == 0 ? 0.0f : 1.0f, wscratch, gscratch,
                               partials, lrscratch);
    return MASA_OK;
}
