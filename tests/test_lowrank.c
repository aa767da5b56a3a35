/*
 * Low-rank terms of projections, W = base + A B (masa_layer_set_lowrank),
 * and projections that are only A B.
 *
 * 1. layer: forward and backward (every gradient, SET and ADD) against the
 *    double reference, which composes W = sum c D + A B in double and gets
 *    dA = dW B^T, dB = A^T dW by the chain rule (not the library's thin
 *    products), under both weight policies. The cases straddle the rule
 *    that folds A B into a composed MASA weight (rows > d_in d_out /
 *    (d_in + d_out)) or runs (X A) B. Tolerance 1e-4 of each array's
 *    largest value, as test_layer.c.
 * 2. gradcheck: dA and dB against finite differences, of the library's own
 *    float forward (five-point stencil, tolerance 5e-4) and of the double
 *    reference forward at the library's parameters (1e-4), as
 *    test_gradcheck.c.
 * 3. decode: any chunk split gives forward's y, both policies, one and two
 *    threads.
 * 4. the cached weight follows set/remove and refresh; an older, smaller
 *    grads struct; and every error path.
 */
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "test_util.h"

#define RTOL 1e-4

typedef struct lcase {
    const char *name;
    tu_spec s;
    size_t batch, seq, pos;
} lcase;

static const lcase cases[] = {
    /* Q, K MASA + A B; 3 rows: thin for every projection */
    {"masa_lowrank_thin", {.d_model = 8, .n_heads = 2, .causal = 1, .rope = 1,
      .masa_mask = 0xF, .bias_mask = 0x5, .n_atoms = 2, .n_layers = 3,
      .layer_index = 1, .wrap = 1, .lowrank_mask = 0xF, .rank = 3}, 1, 3, 2},
    /* 2 x 9 rows: A B folded into every composed MASA weight */
    {"masa_lowrank_fold", {.d_model = 8, .n_heads = 2, .n_kv_heads = 1,
      .causal = 1, .rope = 1, .masa_mask = 0xF, .bias_mask = 0xF,
      .n_atoms = 3, .n_layers = 2, .layer_index = 0, .wrap = 0,
      .lowrank_mask = 0xF, .rank = 2}, 2, 9, 0},
    /* GQA 12 -> 4: K and V fold from 4 rows, Q and O (12 x 12) from 7 */
    {"gqa_mixed_rows5", {.d_model = 12, .n_heads = 3, .n_kv_heads = 1,
      .causal = 1, .rope = 1, .masa_mask = 0x7, .bias_mask = 0x2,
      .n_atoms = 2, .n_layers = 2, .layer_index = 1, .wrap = 1,
      .lowrank_mask = 0xB, .rank = 4}, 1, 5, 0},
    /* dense bases with terms; full rank (rank = min(d_in, d_out)) */
    {"dense_lowrank_full_rank", {.d_model = 8, .n_heads = 4, .n_kv_heads = 2,
      .rope = 1, .masa_mask = 0x0, .bias_mask = 0x9, .n_atoms = 1,
      .n_layers = 1, .wrap = 0, .lowrank_mask = 0xF, .rank = 8}, 2, 4, 1},
    /* the low-rank baseline: every projection only A B */
    {"lowrank_only", {.d_model = 8, .n_heads = 2, .causal = 1, .rope = 1,
      .bias_mask = 0x3, .n_atoms = 1, .n_layers = 1, .wrap = 1,
      .lowrank_mask = 0xF, .baseless_mask = 0xF, .rank = 2}, 2, 5, 0},
    /* a mix: Q only A B, K MASA + A B, V MASA, O dense + A B, rank 1 */
    {"mixed_rank1", {.d_model = 12, .n_heads = 4, .n_kv_heads = 2,
      .head_dim = 4, .causal = 1, .rope = 1, .masa_mask = 0x6,
      .bias_mask = 0xF, .n_atoms = 2, .n_layers = 3, .layer_index = 2,
      .wrap = 0, .lowrank_mask = 0xB, .baseless_mask = 0x1, .rank = 1}, 2, 6,
     3},
    /* many rows through every path, two row tiles of attention */
    {"wide_many_rows", {.d_model = 32, .n_heads = 4, .n_kv_heads = 2,
      .causal = 1, .rope = 1, .masa_mask = 0x5, .bias_mask = 0x6,
      .n_atoms = 2, .n_layers = 2, .layer_index = 1, .wrap = 1,
      .lowrank_mask = 0xF, .baseless_mask = 0x8, .rank = 5}, 2, 70, 0},
};
#define N_CASES (sizeof cases / sizeof cases[0])

static masa_context *ctx_with(size_t threads)
{
    masa_context_options o;
    masa_context_options_init(&o);
    o.n_threads = threads;
    masa_context *ctx = NULL;
    TU_OK(masa_context_create(&o, &ctx));
    return ctx;
}

static float *dup_f(const float *a, size_t n)
{
    float *d = tu_falloc(n);
    memcpy(d, a, n * sizeof(float));
    return d;
}

/* ---- 1. forward and backward against the reference ---- */

/* Every gradient buffer of a layer, prefilled (SET must ignore it, ADD add
 * to it). Index k of buf/pre/ref: see grads_make. */
typedef struct gset {
    masa_layer_grads g;
    float *buf[6][REF_NPROJ], *pre[6][REF_NPROJ];
    size_t len[6][REF_NPROJ];
} gset;

enum { G_ATOMS, G_COEF, G_W, G_B, G_A, G_BLR };
static const char *const gnames[6] = {"d_atoms", "d_coefficients",
                                      "d_weight", "d_bias", "d_lowrank_a",
                                      "d_lowrank_b"};

static void grads_make(gset *gs, const tu_layer *t, masa_grad_mode mode,
                       tu_rng *rng)
{
    memset(gs, 0, sizeof *gs);
    masa_layer_grads_init(&gs->g);
    gs->g.mode = mode;
    for (int p = 0; p < REF_NPROJ; p++) {
        if (tu_is_masa(t, p)) {
            gs->len[G_ATOMS][p] = tu_atoms_len(t, p);
            gs->len[G_COEF][p] = tu_coefs_len(t, p);
        } else if (tu_has_base(t, p)) {
            gs->len[G_W][p] = t->din[p] * t->dout[p];
        }
        if (tu_has_bias(t, p))
            gs->len[G_B][p] = t->dout[p];
        gs->len[G_A][p] = t->din[p] * t->rank[p];
        gs->len[G_BLR][p] = t->rank[p] * t->dout[p];
        for (int k = 0; k < 6; k++) {
            if (!gs->len[k][p])
                continue;
            gs->buf[k][p] = tu_falloc(gs->len[k][p]);
            tu_fill(rng, gs->buf[k][p], gs->len[k][p], -1, 1);
            gs->pre[k][p] = dup_f(gs->buf[k][p], gs->len[k][p]);
        }
        gs->g.d_atoms[p] = gs->buf[G_ATOMS][p];
        gs->g.d_coefficients[p] = gs->buf[G_COEF][p];
        gs->g.d_weight[p] = gs->buf[G_W][p];
        gs->g.d_bias[p] = gs->buf[G_B][p];
        gs->g.d_lowrank_a[p] = gs->buf[G_A][p];
        gs->g.d_lowrank_b[p] = gs->buf[G_BLR][p];
    }
}

static void grads_free(gset *gs)
{
    for (int k = 0; k < 6; k++)
        for (int p = 0; p < REF_NPROJ; p++) {
            free(gs->buf[k][p]);
            free(gs->pre[k][p]);
        }
}

static void check_one(const char *what, int p, masa_grad_mode mode,
                      const float *got, const float *pre, const double *ref,
                      size_t n)
{
    char name[96];
    snprintf(name, sizeof name, "%s[%d] (%s)", what, p,
             mode == MASA_GRAD_SET ? "SET" : "ADD");
    double *e = tu_dalloc(n);
    for (size_t i = 0; i < n; i++)
        e[i] = ref[i] + (mode == MASA_GRAD_ADD ? (double)pre[i] : 0.0);
    TU_ASSERT_CLOSE(name, got, e, n, RTOL);
    free(e);
}

static void check_grads(const tu_layer *t, const gset *gs,
                        const tu_ref_out *ref)
{
    masa_grad_mode mode = gs->g.mode;
    size_t S = t->spec.n_atoms;
    for (int p = 0; p < REF_NPROJ; p++) {
        const double *refs[6] = {ref->d_atoms[p], NULL, ref->dW[p],
                                 ref->db[p], ref->d_lowrank_a[p],
                                 ref->d_lowrank_b[p]};
        for (int k = 0; k < 6; k++) {
            if (!gs->len[k][p])
                continue;
            if (k == G_COEF) { /* row layer_index only */
                size_t off = t->lidx[p] * S;
                check_one(gnames[k], p, mode, gs->buf[k][p] + off,
                          gs->pre[k][p] + off, ref->dc[p], S);
                continue;
            }
            check_one(gnames[k], p, mode, gs->buf[k][p], gs->pre[k][p],
                      refs[k], gs->len[k][p]);
        }
    }
}

START_TEST(test_layer_case)
{
    const lcase *c = &cases[_i / 2];
    masa_weight_policy policy = _i % 2 ? MASA_WEIGHTS_CACHED
                                       : MASA_WEIGHTS_ON_THE_FLY;
    masa_context *ctx = ctx_with(1 + (size_t)(_i / 2 % 2));
    tu_layer t;
    tu_layer_init(&t, ctx, &c->s, 500 + (uint64_t)_i / 2);
    TU_OK(masa_layer_set_weight_policy(t.layer, policy));
    tu_rng rng = {900 + (uint64_t)_i};
    size_t B = c->batch, T = c->seq, n = B * T * t.cfg.d_model;
    float *x = tu_falloc(n), *dy = tu_falloc(n), *y = tu_falloc(n);
    float *dx = tu_falloc(n);
    tu_fill(&rng, x, n, -1, 1);
    tu_fill(&rng, dy, n, -1, 1);
    size_t wsb = tu_workspace_bytes(&t, B, T), rsb = tu_reserve_bytes(&t, B, T);
    void *ws = tu_garbage(wsb), *rs = tu_garbage(rsb);
    tu_ref_out ref;
    tu_reference(&t, B, T, c->pos, x, dy, &ref);

    TU_OK(masa_layer_forward(t.layer, B, T, c->pos, x, y, ws, wsb, NULL, 0));
    TU_ASSERT_CLOSE("y (inference)", y, ref.y, n, RTOL);
    tu_fill_garbage(ws, wsb);
    TU_OK(masa_layer_forward(t.layer, B, T, c->pos, x, y, ws, wsb, rs, rsb));
    TU_ASSERT_CLOSE("y (training)", y, ref.y, n, RTOL);

    masa_grad_mode modes[2] = {MASA_GRAD_SET, MASA_GRAD_ADD};
    for (int m = 0; m < 2; m++) {
        gset gs;
        grads_make(&gs, &t, modes[m], &rng);
        tu_fill(&rng, dx, n, 5, 6);
        tu_fill_garbage(ws, wsb);
        TU_OK(masa_layer_backward(t.layer, B, T, c->pos, x, dy, dx, &gs.g, ws,
                                  wsb, rs, rsb));
        TU_ASSERT_CLOSE("dx", dx, ref.dx, n, RTOL);
        check_grads(&t, &gs, &ref);
        grads_free(&gs);
    }
    /* the low-rank gradients alone (no dx: dY B^T for dA only) */
    for (int p = 0; p < REF_NPROJ; p++) {
        if (!t.rank[p])
            continue;
        masa_layer_grads g;
        masa_layer_grads_init(&g);
        g.mode = MASA_GRAD_SET;
        float *da = tu_falloc(t.din[p] * t.rank[p]);
        g.d_lowrank_a[p] = da;
        TU_OK(masa_layer_backward(t.layer, B, T, c->pos, x, dy, NULL, &g, ws,
                                  wsb, rs, rsb));
        TU_ASSERT_CLOSE("dA alone", da, ref.d_lowrank_a[p],
                        t.din[p] * t.rank[p], RTOL);
        free(da);
    }
    tu_ref_out_free(&ref);
    free(ws);
    free(rs);
    free(x);
    free(dy);
    free(y);
    free(dx);
    tu_layer_fini(&t);
    masa_context_destroy(ctx);
}
END_TEST

/* ---- 2. finite differences of dA and dB (and of x) ---- */

typedef struct slot {
    char name[32];
    int p, which; /* which: 0 x, 1 A, 2 B */
    float *val, *grad;
    size_t n;
} slot;

typedef struct fdc {
    tu_layer t;
    masa_context *ctx;
    size_t B, T, pos, n;
    float *x, *r, *y, *dx;
    void *ws, *rs;
    size_t wsb, rsb;
    slot s[1 + 2 * REF_NPROJ];
    int ns;
    masa_layer_grads g;
} fdc;

static void fdc_init(fdc *c, const tu_spec *sp, size_t B, size_t T,
                     size_t pos, uint64_t seed)
{
    memset(c, 0, sizeof *c);
    c->ctx = ctx_with(1);
    tu_layer_init(&c->t, c->ctx, sp, seed);
    tu_rng rng = {seed + 1};
    c->B = B;
    c->T = T;
    c->pos = pos;
    c->n = B * T * c->t.cfg.d_model;
    c->x = tu_falloc(c->n);
    c->r = tu_falloc(c->n);
    c->y = tu_falloc(c->n);
    c->dx = tu_falloc(c->n);
    tu_fill(&rng, c->x, c->n, -1, 1);
    tu_fill(&rng, c->r, c->n, -1, 1);
    c->wsb = tu_workspace_bytes(&c->t, B, T);
    c->rsb = tu_reserve_bytes(&c->t, B, T);
    c->ws = tu_garbage(c->wsb);
    c->rs = tu_garbage(c->rsb);
    masa_layer_grads_init(&c->g);
    c->g.mode = MASA_GRAD_SET;
    c->s[c->ns++] = (slot){"x", 0, 0, c->x, c->dx, c->n};
    for (int p = 0; p < REF_NPROJ; p++) {
        if (!c->t.rank[p])
            continue;
        float *A, *Bm;
        size_t r;
        TU_OK(masa_layer_lowrank(c->t.layer, (masa_projection)p, &r, &A, &Bm));
        slot *s = &c->s[c->ns++];
        *s = (slot){"", p, 1, A,
                    c->g.d_lowrank_a[p] = tu_falloc(c->t.din[p] * r),
                    c->t.din[p] * r};
        snprintf(s->name, sizeof s->name, "A[%d]", p);
        s = &c->s[c->ns++];
        *s = (slot){"", p, 2, Bm,
                    c->g.d_lowrank_b[p] = tu_falloc(r * c->t.dout[p]),
                    r * c->t.dout[p]};
        snprintf(s->name, sizeof s->name, "B[%d]", p);
    }
    TU_OK(masa_layer_forward(c->t.layer, B, T, pos, c->x, c->y, c->ws, c->wsb,
                             c->rs, c->rsb));
    TU_OK(masa_layer_backward(c->t.layer, B, T, pos, c->x, c->r, c->dx, &c->g,
                              c->ws, c->wsb, c->rs, c->rsb));
}

static void fdc_fini(fdc *c)
{
    for (int p = 0; p < REF_NPROJ; p++) {
        free(c->g.d_lowrank_a[p]);
        free(c->g.d_lowrank_b[p]);
    }
    free(c->x);
    free(c->r);
    free(c->y);
    free(c->dx);
    free(c->ws);
    free(c->rs);
    tu_layer_fini(&c->t);
    masa_context_destroy(c->ctx);
}

static double lib_loss(fdc *c)
{
    TU_OK(masa_layer_refresh_weights(c->t.layer)); /* CACHED: new A, B */
    TU_OK(masa_layer_forward(c->t.layer, c->B, c->T, c->pos, c->x, c->y,
                             c->ws, c->wsb, NULL, 0));
    double L = 0.0;
    for (size_t i = 0; i < c->n; i++)
        L += (double)c->y[i] * c->r[i];
    return L;
}

/* The double reference's loss with the float parameters, except slot k's
 * values, which come from v (double). */
static double dbl_loss(fdc *c, int k, const double *v)
{
    double *W[REF_NPROJ], *b[REF_NPROJ];
    slot *s = &c->s[k];
    /* the float parameters in double, then slot k's values from v */
    tu_ref_params(&c->t, W, b);
    double *x = tu_to_double(c->x, c->n);
    if (s->which == 0) {
        memcpy(x, v, c->n * sizeof(double));
    } else {
        /* W += A' B' - A B with A' or B' the perturbed factor */
        int p = s->p;
        size_t r = c->t.rank[p], din = c->t.din[p], dout = c->t.dout[p];
        float *A, *Bm;
        TU_OK(masa_layer_lowrank(c->t.layer, (masa_projection)p, NULL, &A, &Bm));
        double *Ad = tu_to_double(A, din * r), *Bd = tu_to_double(Bm, r * dout);
        double *neg = tu_dalloc(din * r);
        for (size_t i = 0; i < din * r; i++)
            neg[i] = -Ad[i];
        ref_lowrank_add(din, dout, r, neg, Bd, W[p]);
        ref_lowrank_add(din, dout, r, s->which == 1 ? v : Ad,
                        s->which == 2 ? v : Bd, W[p]);
        free(Ad);
        free(Bd);
        free(neg);
    }
    double *rd = tu_to_double(c->r, c->n), *y = tu_dalloc(c->n), L = 0.0;
    ref_forward(&c->t.cfg, c->B, c->T, c->pos, x, (const double *const *)W,
                (const double *const *)b, y);
    for (size_t i = 0; i < c->n; i++)
        L += y[i] * rd[i];
    free(rd);
    free(y);
    free(x);
    tu_free_params(W, b);
    return L;
}

static const tu_spec fd_specs[] = {
    {.d_model = 8, .n_heads = 2, .n_kv_heads = 1, .causal = 1, .rope = 1,
     .masa_mask = 0x3, .bias_mask = 0xF, .n_atoms = 2, .n_layers = 2,
     .layer_index = 1, .wrap = 1, .lowrank_mask = 0xF, .baseless_mask = 0x4,
     .rank = 2},
    {.d_model = 6, .n_heads = 3, .n_kv_heads = 1, .rope = 1,
     .masa_mask = 0xF, .bias_mask = 0x1, .n_atoms = 3, .n_layers = 2,
     .layer_index = 0, .wrap = 0, .lowrank_mask = 0xD, .rank = 2},
};

/* _i: spec _i / 2, policy _i % 2; 3 rows (thin) or 2 x 5 (folded) */
START_TEST(test_float_fd)
{
    fdc c;
    size_t T = _i / 2 ? 5 : 3, B = _i / 2 ? 2 : 1;
    const tu_spec *sp = &fd_specs[_i / 2];
    fdc_init(&c, sp, B, T, 1, 40 + (uint64_t)_i);
    if (_i % 2) { /* redo the analytic gradients under CACHED */
        TU_OK(masa_layer_set_weight_policy(c.t.layer, MASA_WEIGHTS_CACHED));
        TU_OK(masa_layer_forward(c.t.layer, B, T, 1, c.x, c.y, c.ws, c.wsb,
                                 c.rs, c.rsb));
        TU_OK(masa_layer_backward(c.t.layer, B, T, 1, c.x, c.r, c.dx, &c.g,
                                  c.ws, c.wsb, c.rs, c.rsb));
    }
    const float h = 0x1p-5f;
    for (int k = 0; k < c.ns; k++) {
        slot *s = &c.s[k];
        double *fd = tu_dalloc(s->n);
        for (size_t i = 0; i < s->n; i++) {
            float v0 = s->val[i];
            double L[4];
            const float steps[4] = {2 * h, h, -h, -2 * h};
            for (int j = 0; j < 4; j++) {
                s->val[i] = v0 + steps[j];
                L[j] = lib_loss(&c);
            }
            s->val[i] = v0;
            fd[i] = (-L[0] + 8 * L[1] - 8 * L[2] + L[3]) / (12.0 * h);
        }
        char name[64];
        snprintf(name, sizeof name, "float-fd %s", s->name);
        tu_assert_close_(__FILE__, __LINE__, name, s->grad, fd, s->n, 5e-4,
                         1e-6);
        free(fd);
    }
    fdc_fini(&c);
}
END_TEST

START_TEST(test_ref_fd)
{
    fdc c;
    fdc_init(&c, &fd_specs[_i], 2, 4, 3, 60 + (uint64_t)_i);
    const double h = 1e-5;
    for (int k = 0; k < c.ns; k++) {
        slot *s = &c.s[k];
        double *v = tu_to_double(s->val, s->n), *fd = tu_dalloc(s->n);
        for (size_t i = 0; i < s->n; i++) {
            double v0 = v[i];
            v[i] = v0 + h;
            double lp = dbl_loss(&c, k, v);
            v[i] = v0 - h;
            double lm = dbl_loss(&c, k, v);
            v[i] = v0;
            fd[i] = (lp - lm) / (2 * h);
        }
        char name[64];
        snprintf(name, sizeof name, "ref-fd %s", s->name);
        TU_ASSERT_CLOSE(name, s->grad, fd, s->n, 1e-4);
        free(v);
        free(fd);
    }
    fdc_fini(&c);
}
END_TEST

/* ---- 3. decode in chunks equals forward ---- */

#define MAX_CHUNKS 6
typedef struct dcase {
    tu_spec s;
    size_t batch, threads;
    size_t chunks[MAX_CHUNKS];
} dcase;

static const dcase dcases[] = {
    {{.d_model = 8, .n_heads = 2, .causal = 1, .rope = 1, .masa_mask = 0xF,
      .bias_mask = 0x9, .n_atoms = 2, .n_layers = 2, .layer_index = 1,
      .wrap = 1, .lowrank_mask = 0xF, .rank = 3}, 2, 1, {3, 1, 1, 2}},
    {{.d_model = 12, .n_heads = 4, .n_kv_heads = 2, .head_dim = 4,
      .causal = 1, .rope = 1, .masa_mask = 0x6, .bias_mask = 0xF,
      .n_atoms = 3, .n_layers = 3, .layer_index = 0, .wrap = 0,
      .lowrank_mask = 0xB, .baseless_mask = 0x1, .rank = 2}, 1, 2,
     {1, 1, 4, 1, 1}},
    {{.d_model = 8, .n_heads = 2, .causal = 1, .rope = 1, .bias_mask = 0x2,
      .n_atoms = 1, .n_layers = 1, .wrap = 1, .lowrank_mask = 0xF,
      .baseless_mask = 0xF, .rank = 2}, 2, 2, {2, 1, 1}},
    /* d 192, one row: the split paths (inner blocks, partial sums of x A)
     * and 20 rows split by rows */
    {{.d_model = 192, .n_heads = 4, .causal = 1, .rope = 1, .masa_mask = 0x5,
      .bias_mask = 0x3, .n_atoms = 4, .n_layers = 2, .layer_index = 1,
      .wrap = 0, .lowrank_mask = 0xF, .baseless_mask = 0x8, .rank = 96}, 1,
     2, {20, 1, 3, 1}},
};
#define N_DCASES (sizeof dcases / sizeof dcases[0])

START_TEST(test_decode_case)
{
    const dcase *c = &dcases[_i / 2];
    masa_context *ctx = ctx_with(c->threads);
    tu_layer t;
    tu_layer_init(&t, ctx, &c->s, 700 + (uint64_t)_i / 2);
    if (_i % 2)
        TU_OK(masa_layer_set_weight_policy(t.layer, MASA_WEIGHTS_CACHED));
    tu_rng rng = {71 + (uint64_t)_i};
    size_t T = 0, max_new = 0, B = c->batch, d = t.cfg.d_model;
    for (int i = 0; i < MAX_CHUNKS && c->chunks[i]; i++) {
        T += c->chunks[i];
        if (c->chunks[i] > max_new)
            max_new = c->chunks[i];
    }
    size_t n = B * T * d;
    float *x = tu_falloc(n), *y = tu_falloc(n), *y_fwd = tu_falloc(n);
    tu_fill(&rng, x, n, -1, 1);
    size_t wsb = tu_workspace_bytes(&t, B, T);
    void *ws = tu_garbage(wsb);
    TU_OK(masa_layer_forward(t.layer, B, T, 0, x, y_fwd, ws, wsb, NULL, 0));
    tu_ref_out ref;
    tu_reference(&t, B, T, 0, x, NULL, &ref);
    TU_ASSERT_CLOSE("forward vs reference", y_fwd, ref.y, n, RTOL);

    size_t cb, dwb;
    TU_OK(masa_kv_cache_size(t.layer, B, T, &cb));
    TU_OK(masa_layer_decode_workspace_size(t.layer, B, max_new, &dwb));
    void *mem = tu_garbage(cb), *dws = tu_garbage(dwb);
    masa_kv_cache *cache = NULL;
    TU_OK(masa_kv_cache_create(t.layer, B, T, mem, cb, &cache));
    size_t at = 0;
    for (int i = 0; i < MAX_CHUNKS && c->chunks[i]; i++) {
        size_t k = c->chunks[i];
        float *xc = tu_falloc(B * k * d), *yc = tu_falloc(B * k * d);
        for (size_t b = 0; b < B; b++)
            memcpy(xc + b * k * d, x + (b * T + at) * d, k * d * sizeof(float));
        tu_fill_garbage(dws, dwb);
        TU_OK(masa_layer_decode(t.layer, cache, B, k, xc, yc, dws, dwb));
        for (size_t b = 0; b < B; b++)
            memcpy(y + (b * T + at) * d, yc + b * k * d, k * d * sizeof(float));
        at += k;
        free(xc);
        free(yc);
    }
    TU_ASSERT_CLOSE("decode vs reference", y, ref.y, n, RTOL);
    TU_ASSERT_CLOSE_FF("decode vs forward", y, y_fwd, n, RTOL);
    masa_kv_cache_destroy(cache);
    tu_ref_out_free(&ref);
    free(mem);
    free(dws);
    free(ws);
    free(x);
    free(y);
    free(y_fwd);
    tu_layer_fini(&t);
    masa_context_destroy(ctx);
}
END_TEST

/* ---- 4. state, compatibility and errors ---- */

static const tu_spec small = {.d_model = 8, .n_heads = 2, .causal = 1,
                              .rope = 1, .masa_mask = 0x3, .bias_mask = 0x1,
                              .n_atoms = 2, .n_layers = 2, .layer_index = 1,
                              .wrap = 1};

/* y of a forward call (inference) */
static void run_forward(const tu_layer *t, size_t B, size_t T, const float *x,
                        float *y)
{
    size_t wsb = tu_workspace_bytes(t, B, T);
    void *ws = tu_garbage(wsb);
    TU_OK(masa_layer_forward(t->layer, B, T, 0, x, y, ws, wsb, NULL, 0));
    free(ws);
}

static void check_vs_ref(const tu_layer *t, size_t B, size_t T,
                         const float *x, const char *what)
{
    size_t n = B * T * t->cfg.d_model;
    float *y = tu_falloc(n);
    run_forward(t, B, T, x, y);
    tu_ref_out ref;
    tu_reference(t, B, T, 0, x, NULL, &ref);
    TU_ASSERT_CLOSE(what, y, ref.y, n, RTOL);
    tu_ref_out_free(&ref);
    free(y);
}

/* The cached composed weight follows set_lowrank, remove_lowrank and
 * refresh; it is stale (documented) after writes through the pointers. */
START_TEST(test_cached_follows)
{
    masa_context *ctx = ctx_with(1);
    tu_layer t;
    tu_layer_init(&t, ctx, &small, 3);
    TU_OK(masa_layer_set_weight_policy(t.layer, MASA_WEIGHTS_CACHED));
    tu_rng rng = {4};
    size_t B = 1, T = 3, n = B * T * 8;
    float *x = tu_falloc(n), *y0 = tu_falloc(n), *y1 = tu_falloc(n);
    tu_fill(&rng, x, n, -1, 1);
    run_forward(&t, B, T, x, y0);

    float *A = tu_falloc(8 * 2), *Bm = tu_falloc(2 * 8);
    tu_fill(&rng, A, 16, -0.5f, 0.5f);
    tu_fill(&rng, Bm, 16, -0.5f, 0.5f);
    TU_OK(masa_layer_set_lowrank(t.layer, MASA_PROJ_Q, 2, A, Bm));
    t.rank[0] = 2;
    check_vs_ref(&t, B, T, x, "cached, after set_lowrank");

    /* a write through the wrapped memory: stale until refreshed */
    run_forward(&t, B, T, x, y1);
    A[3] += 1.0f;
    float *y2 = tu_falloc(n);
    run_forward(&t, B, T, x, y2);
    ck_assert_msg(memcmp(y1, y2, n * sizeof(float)) == 0,
                  "the cache changed without a refresh");
    TU_OK(masa_layer_refresh_weights(t.layer));
    check_vs_ref(&t, B, T, x, "cached, after refresh");

    TU_OK(masa_layer_remove_lowrank(t.layer, MASA_PROJ_Q));
    t.rank[0] = 0;
    size_t r = 9;
    float *pa = A, *pb = Bm;
    TU_OK(masa_layer_lowrank(t.layer, MASA_PROJ_Q, &r, &pa, &pb));
    ck_assert_uint_eq(r, 0);
    ck_assert_ptr_null(pa);
    ck_assert_ptr_null(pb);
    run_forward(&t, B, T, x, y1);
    TU_ASSERT_CLOSE_FF("cached, after remove_lowrank", y1, y0, n, 1e-6);
    TU_OK(masa_layer_remove_lowrank(t.layer, MASA_PROJ_Q)); /* no-op */

    /* set_masa on a projection with a term keeps it, composed in */
    TU_OK(masa_layer_set_lowrank(t.layer, MASA_PROJ_K, 2, A, Bm));
    t.rank[1] = 2;
    TU_OK(masa_layer_set_masa(t.layer, MASA_PROJ_K, t.dict[1], t.coef[1], 0));
    t.lidx[1] = 0;
    check_vs_ref(&t, B, T, x, "cached, set_masa keeps the term");
    /* going dense keeps it too (thin products) */
    TU_OK(masa_layer_set_dense(t.layer, MASA_PROJ_K, NULL));
    t.spec.masa_mask &= ~0x2u;
    tu_fill(&rng, masa_layer_weight(t.layer, MASA_PROJ_K), 8 * 8, -0.5f, 0.5f);
    check_vs_ref(&t, B, T, x, "dense keeps the term");
    TU_OK(masa_layer_set_weight_policy(t.layer, MASA_WEIGHTS_ON_THE_FLY));
    check_vs_ref(&t, B, T, x, "on the fly");

    free(A);
    free(Bm);
    free(x);
    free(y0);
    free(y1);
    free(y2);
    tu_layer_fini(&t);
    masa_context_destroy(ctx);
}
END_TEST

/* Workspace sizes depend on the ranks, not on the weight policy (documented
 * for decode: one workspace serves a whole generation loop). */
START_TEST(test_sizes_follow_rank_not_policy)
{
    masa_context *ctx = ctx_with(2);
    tu_spec s = small;
    s.causal = 1;
    tu_layer t;
    tu_layer_init(&t, ctx, &s, 21);
    size_t fwd0, dec0, fwd, dec, f, d;
    TU_OK(masa_layer_workspace_size(t.layer, 2, 7, &fwd0));
    TU_OK(masa_layer_decode_workspace_size(t.layer, 2, 3, &dec0));
    TU_OK(masa_layer_set_lowrank(t.layer, MASA_PROJ_Q, 5, NULL, NULL));
    TU_OK(masa_layer_workspace_size(t.layer, 2, 7, &fwd));
    TU_OK(masa_layer_decode_workspace_size(t.layer, 2, 3, &dec));
    ck_assert_uint_gt(fwd, fwd0);
    ck_assert_uint_gt(dec, dec0);
    /* the cached policy folds Q's term into its weight: same sizes */
    TU_OK(masa_layer_set_weight_policy(t.layer, MASA_WEIGHTS_CACHED));
    TU_OK(masa_layer_workspace_size(t.layer, 2, 7, &f));
    TU_OK(masa_layer_decode_workspace_size(t.layer, 2, 3, &d));
    ck_assert_uint_eq(f, fwd);
    ck_assert_uint_eq(d, dec);
    TU_OK(masa_layer_remove_lowrank(t.layer, MASA_PROJ_Q));
    TU_OK(masa_layer_workspace_size(t.layer, 2, 7, &f));
    TU_OK(masa_layer_decode_workspace_size(t.layer, 2, 3, &d));
    ck_assert_uint_eq(f, fwd0);
    ck_assert_uint_eq(d, dec0);
    tu_layer_fini(&t);
    masa_context_destroy(ctx);
}
END_TEST

/* A struct from a program built before the low-rank fields (its size ends
 * before d_lowrank_a) is read as such; sizes in between are refused. */
START_TEST(test_grads_struct_sizes)
{
    masa_context *ctx = ctx_with(1);
    tu_spec s = small;
    s.lowrank_mask = 0x1;
    s.rank = 2;
    tu_layer t;
    tu_layer_init(&t, ctx, &s, 8);
    tu_rng rng = {9};
    size_t B = 1, T = 3, n = B * T * 8;
    float *x = tu_falloc(n), *dy = tu_falloc(n), *y = tu_falloc(n);
    tu_fill(&rng, x, n, -1, 1);
    tu_fill(&rng, dy, n, -1, 1);
    size_t wsb = tu_workspace_bytes(&t, B, T), rsb = tu_reserve_bytes(&t, B, T);
    void *ws = tu_garbage(wsb), *rs = tu_garbage(rsb);
    TU_OK(masa_layer_forward(t.layer, B, T, 0, x, y, ws, wsb, rs, rsb));
    tu_ref_out ref;
    tu_reference(&t, B, T, 0, x, dy, &ref);

    /* the old struct, followed by bytes that must not be read */
    size_t old = offsetof(masa_layer_grads, d_lowrank_a);
    unsigned char *mem = malloc(sizeof(masa_layer_grads));
    ck_assert_ptr_nonnull(mem);
    memset(mem, 0xA5, sizeof(masa_layer_grads));
    masa_layer_grads_default((masa_layer_grads *)mem, old);
    masa_layer_grads g;
    memcpy(&g, mem, sizeof g);
    ck_assert_uint_eq(g.size, old);
    ck_assert_int_eq(g.mode, MASA_GRAD_ADD);
    ck_assert(mem[old] == 0xA5); /* _default wrote only `old` bytes */
    float *db = tu_falloc(8);
    g.mode = MASA_GRAD_SET;
    g.d_bias[0] = db;
    memcpy(mem, &g, old);
    TU_OK(masa_layer_backward(t.layer, B, T, 0, x, dy, NULL,
                              (masa_layer_grads *)mem, ws, wsb, rs, rsb));
    TU_ASSERT_CLOSE("d_bias through the old struct", db, ref.db[0], 8, RTOL);

    /* sizes that are no version's, and a newer struct with a set tail */
    masa_layer_grads_init(&g);
    g.size = old + sizeof(float *);
    ck_assert_int_eq(masa_layer_backward(t.layer, B, T, 0, x, dy, NULL, &g, ws,
                                         wsb, rs, rsb),
                     MASA_ERROR_BAD_STRUCT_SIZE);
    g.size = old - 1;
    ck_assert_int_eq(masa_layer_backward(t.layer, B, T, 0, x, dy, NULL, &g, ws,
                                         wsb, rs, rsb),
                     MASA_ERROR_BAD_STRUCT_SIZE);
    unsigned char big[sizeof(masa_layer_grads) + 8];
    memset(big, 0, sizeof big);
    masa_layer_grads_default((masa_layer_grads *)big, sizeof big);
    big[sizeof(masa_layer_grads) + 3] = 1;
    ck_assert_int_eq(masa_layer_backward(t.layer, B, T, 0, x, dy, NULL,
                                         (masa_layer_grads *)big, ws, wsb, rs,
                                         rsb),
                     MASA_ERROR_BAD_STRUCT_SIZE);
    big[sizeof(masa_layer_grads) + 3] = 0;
    TU_OK(masa_layer_backward(t.layer, B, T, 0, x, dy, NULL,
                              (masa_layer_grads *)big, ws, wsb, rs, rsb));

    free(mem);
    free(db);
    tu_ref_out_free(&ref);
    free(ws);
    free(rs);
    free(x);
    free(dy);
    free(y);
    tu_layer_fini(&t);
    masa_context_destroy(ctx);
}
END_TEST

#define EXPECT(call, status)                                                 \
    do {                                                                     \
        masa_status st_ = (call);                                            \
        ck_assert_msg(st_ == (status), "%s -> %d (%s), expected %d", #call,  \
                      (int)st_, masa_last_error(), (int)(status));           \
        ck_assert_str_ne(masa_last_error(), "");                             \
    } while (0)

START_TEST(test_errors)
{
    masa_context *ctx = ctx_with(1);
    tu_layer t;
    tu_layer_init(&t, ctx, &small, 11);
    masa_layer *l = t.layer;
    float buf[64] = {0};

    /* set_lowrank */
    EXPECT(masa_layer_set_lowrank(NULL, MASA_PROJ_Q, 1, NULL, NULL),
           MASA_ERROR_NULL_ARGUMENT);
    EXPECT(masa_layer_set_lowrank(l, (masa_projection)4, 1, NULL, NULL),
           MASA_ERROR_OUT_OF_RANGE);
    EXPECT(masa_layer_set_lowrank(l, (masa_projection)-1, 1, NULL, NULL),
           MASA_ERROR_OUT_OF_RANGE);
    EXPECT(masa_layer_set_lowrank(l, MASA_PROJ_Q, 0, buf, buf),
           MASA_ERROR_BAD_SHAPE);
    EXPECT(masa_layer_set_lowrank(l, MASA_PROJ_Q, 9, NULL, NULL),
           MASA_ERROR_BAD_SHAPE);
    EXPECT(masa_layer_set_lowrank(l, MASA_PROJ_Q, (size_t)-1, NULL, NULL),
           MASA_ERROR_BAD_SHAPE);
    size_t r = 7;
    TU_OK(masa_layer_lowrank(l, MASA_PROJ_Q, &r, NULL, NULL));
    ck_assert_uint_eq(r, 0); /* nothing changed */
    /* remove / accessor */
    EXPECT(masa_layer_remove_lowrank(NULL, MASA_PROJ_Q),
           MASA_ERROR_NULL_ARGUMENT);
    EXPECT(masa_layer_remove_lowrank(l, (masa_projection)4),
           MASA_ERROR_OUT_OF_RANGE);
    EXPECT(masa_layer_lowrank(NULL, MASA_PROJ_Q, &r, NULL, NULL),
           MASA_ERROR_NULL_ARGUMENT);
    r = 7;
    EXPECT(masa_layer_lowrank(l, (masa_projection)4, &r, NULL, NULL),
           MASA_ERROR_OUT_OF_RANGE);
    ck_assert_uint_eq(r, 7);
    TU_OK(masa_layer_lowrank(l, MASA_PROJ_Q, NULL, NULL, NULL));

    /* gradients for a projection without a term, d_weight for one without
     * a dense base */
    size_t B = 1, T = 2, n = B * T * 8;
    float x[16], dy[16], y[16], dx[16];
    tu_rng rng = {12};
    tu_fill(&rng, x, n, -1, 1);
    tu_fill(&rng, dy, n, -1, 1);
    size_t wsb = tu_workspace_bytes(&t, B, T), rsb = tu_reserve_bytes(&t, B, T);
    void *ws = tu_garbage(wsb), *rs = tu_garbage(rsb);
    TU_OK(masa_layer_forward(l, B, T, 0, x, y, ws, wsb, rs, rsb));
    masa_layer_grads g;
    masa_layer_grads_init(&g);
    g.d_lowrank_a[MASA_PROJ_V] = buf;
    EXPECT(masa_layer_backward(l, B, T, 0, x, dy, dx, &g, ws, wsb, rs, rsb),
           MASA_ERROR_INVALID_ARGUMENT);
    masa_layer_grads_init(&g);
    g.d_lowrank_b[MASA_PROJ_Q] = buf;
    EXPECT(masa_layer_backward(l, B, T, 0, x, dy, dx, &g, ws, wsb, rs, rsb),
           MASA_ERROR_INVALID_ARGUMENT);

    /* a larger rank needs a larger workspace: the old one is refused and y
     * left alone */
    float *A = tu_falloc(8 * 4), *Bm = tu_falloc(4 * 8);
    TU_OK(masa_layer_set_lowrank(l, MASA_PROJ_V, 4, A, Bm));
    size_t wsb2 = tu_workspace_bytes(&t, B, T);
    ck_assert_uint_gt(wsb2, wsb);
    memset(y, 0x7f, sizeof y);
    float y_copy[16];
    memcpy(y_copy, y, sizeof y);
    EXPECT(masa_layer_forward(l, B, T, 0, x, y, ws, wsb, NULL, 0),
           MASA_ERROR_BUFFER_TOO_SMALL);
    ck_assert(memcmp(y, y_copy, sizeof y) == 0);

    /* gradient buffers of the term must not overlap each other, dx or the
     * inputs */
    void *ws2 = tu_garbage(wsb2);
    TU_OK(masa_layer_forward(l, B, T, 0, x, y, ws2, wsb2, rs, rsb));
    float *ga = tu_falloc(64), *gb = tu_falloc(64);
    masa_layer_grads_init(&g);
    g.d_lowrank_a[MASA_PROJ_V] = ga;
    g.d_lowrank_b[MASA_PROJ_V] = ga + 16; /* A's gradient is 32 floats */
    EXPECT(masa_layer_backward(l, B, T, 0, x, dy, dx, &g, ws2, wsb2, rs, rsb),
           MASA_ERROR_INVALID_ARGUMENT);
    g.d_lowrank_b[MASA_PROJ_V] = gb;
    EXPECT(masa_layer_backward(l, B, T, 0, x, dy, gb + 8, &g, ws2, wsb2, rs,
                               rsb),
           MASA_ERROR_INVALID_ARGUMENT); /* dx over B's gradient */
    g.d_lowrank_b[MASA_PROJ_V] = x;
    EXPECT(masa_layer_backward(l, B, T, 0, x, dy, dx, &g, ws2, wsb2, rs, rsb),
           MASA_ERROR_INVALID_ARGUMENT);
    g.d_lowrank_b[MASA_PROJ_V] = (float *)ws2;
    EXPECT(masa_layer_backward(l, B, T, 0, x, dy, dx, &g, ws2, wsb2, rs, rsb),
           MASA_ERROR_INVALID_ARGUMENT);
    g.d_lowrank_a[MASA_PROJ_V] = NULL;
    g.d_lowrank_b[MASA_PROJ_V] = NULL;
    g.d_bias[MASA_PROJ_Q] = ga + 30; /* Q's bias: 8 floats */
    g.d_lowrank_a[MASA_PROJ_V] = ga;
    EXPECT(masa_layer_backward(l, B, T, 0, x, dy, dx, &g, ws2, wsb2, rs, rsb),
           MASA_ERROR_INVALID_ARGUMENT);
    g.d_bias[MASA_PROJ_Q] = ga + 32; /* just after: fine */
    TU_OK(masa_layer_backward(l, B, T, 0, x, dy, dx, &g, ws2, wsb2, rs, rsb));

    /* only A B, then the term removed: not ready */
    masa_layer_options o;
    masa_layer_options_init(&o);
    o.d_model = 8;
    o.n_heads = 2;
    o.causal = 1;
    masa_layer *l2 = NULL;
    TU_OK(masa_layer_create(ctx, &o, &l2));
    for (int p = 0; p < 4; p++)
        TU_OK(masa_layer_set_lowrank(l2, (masa_projection)p, 8, NULL, NULL));
    size_t wsb3;
    TU_OK(masa_layer_workspace_size(l2, B, T, &wsb3));
    void *ws3 = tu_garbage(wsb3);
    TU_OK(masa_layer_forward(l2, B, T, 0, x, y, ws3, wsb3, NULL, 0));
    for (size_t i = 0; i < n; i++) /* A = B = 0, no bias */
        ck_assert(y[i] == 0.0f);
    ck_assert_ptr_null(masa_layer_weight(l2, MASA_PROJ_K));
    masa_layer_grads_init(&g);
    g.d_weight[MASA_PROJ_K] = buf; /* no dense weight */
    void *rs3 = tu_garbage(rsb);
    TU_OK(masa_layer_forward(l2, B, T, 0, x, y, ws3, wsb3, rs3, rsb));
    EXPECT(masa_layer_backward(l2, B, T, 0, x, dy, dx, &g, ws3, wsb3, rs3, rsb),
           MASA_ERROR_INVALID_ARGUMENT);
    TU_OK(masa_layer_remove_lowrank(l2, MASA_PROJ_K));
    EXPECT(masa_layer_forward(l2, B, T, 0, x, y, ws3, wsb3, NULL, 0),
           MASA_ERROR_NOT_READY);
    size_t dummy;
    EXPECT(masa_layer_decode_workspace_size(l2, 1, 1, &dummy),
           MASA_ERROR_NOT_READY);
    TU_OK(masa_layer_set_lowrank(l2, MASA_PROJ_K, 1, NULL, NULL));
    TU_OK(masa_layer_forward(l2, B, T, 0, x, y, ws3, wsb3, NULL, 0));

    masa_layer_destroy(l2);
    free(ws3);
    free(rs3);
    free(A);
    free(Bm);
    free(ga);
    free(gb);
    free(ws);
    free(ws2);
    free(rs);
    tu_layer_fini(&t);
    masa_context_destroy(ctx);
}
END_TEST

/* The allocator fails: set_lowrank leaves the projection as it was. */
static int fail_after;
static void *flaky_malloc(size_t n, void *u)
{
    (void)u;
    return fail_after-- > 0 ? malloc(n) : NULL;
}
static void plain_free(void *p, void *u)
{
    (void)u;
    free(p);
}

START_TEST(test_out_of_memory)
{
    masa_context_options co;
    masa_context_options_init(&co);
    co.n_threads = 1;
    co.malloc_fn = flaky_malloc;
    co.free_fn = plain_free;
    fail_after = 1000;
    masa_context *ctx = NULL;
    TU_OK(masa_context_create(&co, &ctx));
    masa_layer_options o;
    masa_layer_options_init(&o);
    o.d_model = 8;
    o.n_heads = 2;
    masa_layer *l = NULL;
    TU_OK(masa_layer_create(ctx, &o, &l));
    float A[16], Bm[16];
    TU_OK(masa_layer_set_lowrank(l, MASA_PROJ_Q, 2, A, Bm));
    for (int k = 0; k < 2; k++) { /* A's allocation fails, then B's */
        fail_after = k;
        EXPECT(masa_layer_set_lowrank(l, MASA_PROJ_Q, 2, NULL, NULL),
               MASA_ERROR_OUT_OF_MEMORY);
        size_t r;
        float *pa, *pb;
        TU_OK(masa_layer_lowrank(l, MASA_PROJ_Q, &r, &pa, &pb));
        ck_assert_uint_eq(r, 2);
        ck_assert_ptr_eq(pa, A);
        ck_assert_ptr_eq(pb, Bm);
    }
    fail_after = 1000;
    masa_layer_destroy(l);
    masa_context_destroy(ctx);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("lowrank");
    TCase *tc = tcase_create("lowrank");
    tcase_set_timeout(tc, 120);
    tcase_add_loop_test(tc, test_layer_case, 0, 2 * (int)N_CASES);
    tcase_add_loop_test(tc, test_float_fd, 0, 4);
    tcase_add_loop_test(tc, test_ref_fd, 0, 2);
    tcase_add_loop_test(tc, test_decode_case, 0, 2 * (int)N_DCASES);
    tcase_add_test(tc, test_cached_follows);
    tcase_add_test(tc, test_sizes_follow_rank_not_policy);
    tcase_add_test(tc, test_grads_struct_sizes);
    tcase_add_test(tc, test_errors);
    tcase_add_test(tc, test_out_of_memory);
    suite_add_tcase(s, tc);
    return tu_run_suite(s);
}
