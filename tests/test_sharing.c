/*
 * Atom sharing: what MASA adds over a plain attention layer.
 * - A one-hot coefficient row makes a MASA projection equal to a dense one
 *   whose weight is the selected atom (and its gradients line up).
 * - A 12-layer residual stack sharing 4 atoms per projection: atom and
 *   coefficient gradients accumulated with MASA_GRAD_ADD into one buffer
 *   equal the per-layer MASA_GRAD_SET results summed, and the reference.
 * - Layers hold pointers, not copies: editing atoms or coefficients in
 *   place changes the next forward.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "test_util.h"

static masa_context *new_ctx(void)
{
    masa_context *ctx = NULL;
    TU_OK(masa_context_create(NULL, &ctx));
    return ctx;
}

static masa_layer *new_layer(masa_context *ctx, const ref_config *cfg)
{
    masa_layer_options o;
    masa_layer_options_init(&o);
    o.d_model = cfg->d_model;
    o.n_heads = cfg->n_heads;
    o.n_kv_heads = cfg->n_kv_heads;
    o.head_dim = cfg->head_dim;
    o.causal = cfg->causal;
    o.rope = cfg->rope;
    o.rope_theta = (float)cfg->rope_theta;
    o.softmax_scale = (float)cfg->scale;
    masa_layer *l = NULL;
    TU_OK(masa_layer_create(ctx, &o, &l));
    return l;
}

/* The coefficient initialisers produce the documented one-hot tables. */
START_TEST(test_onehot_inits)
{
    masa_context *ctx = new_ctx();
    const size_t shapes[][2] = {{12, 4}, {7, 3}, {3, 3}, {2, 5}};
    for (size_t k = 0; k < 4; k++) {
        size_t L = shapes[k][0], S = shapes[k][1];
        masa_coefficients *c;
        TU_OK(masa_coefficients_create(ctx, L, S, &c));
        const float *d = masa_coefficients_data(c);
        TU_OK(masa_coefficients_init_cyclic(c));
        for (size_t l = 0; l < L; l++)
            for (size_t s = 0; s < S; s++)
                ck_assert_msg(d[l * S + s] == (s == l % S ? 1.0f : 0.0f),
                              "cyclic L=%zu S=%zu c[%zu,%zu]=%g", L, S, l, s, d[l * S + s]);
        TU_OK(masa_coefficients_init_blocks(c));
        for (size_t l = 0; l < L; l++)
            for (size_t s = 0; s < S; s++)
                ck_assert_msg(d[l * S + s] == (s == l * S / L ? 1.0f : 0.0f),
                              "blocks L=%zu S=%zu c[%zu,%zu]=%g", L, S, l, s, d[l * S + s]);
        masa_coefficients_destroy(c);
    }
    masa_context_destroy(ctx);
}
END_TEST

/* One-hot MASA layer == dense layer holding the selected atoms. */
START_TEST(test_onehot_equals_dense)
{
    ref_config cfg = {.d_model = 8, .n_heads = 2, .n_kv_heads = 1,
                      .head_dim = 4, .causal = 1, .rope = 1,
                      .rope_theta = 10000, .scale = 0.5};
    const size_t S = 3, L = 6, lidx = 3; /* blocks: layer 3 -> atom 1 */
    const size_t sel = lidx * S / L;
    masa_context *ctx = new_ctx();
    masa_layer *lm = new_layer(ctx, &cfg), *ld = new_layer(ctx, &cfg);
    tu_rng rng = {3};
    masa_dictionary *dict[4];
    masa_coefficients *coef;
    float *dense[4], *bias[4];
    size_t din[4], dout[4];
    TU_OK(masa_coefficients_create(ctx, L, S, &coef));
    TU_OK(masa_coefficients_init_blocks(coef));
    for (int p = 0; p < 4; p++) {
        din[p] = ref_d_in(&cfg, p);
        dout[p] = ref_d_out(&cfg, p);
        size_t rc = din[p] * dout[p];
        TU_OK(masa_dictionary_create(ctx, S, din[p], dout[p], &dict[p]));
        TU_OK(masa_dictionary_init_uniform(dict[p], 0.8f, 100 + (uint64_t)p));
        dense[p] = tu_falloc(rc);
        memcpy(dense[p], masa_dictionary_data(dict[p]) + sel * rc, rc * sizeof(float));
        bias[p] = tu_falloc(dout[p]);
        tu_fill(&rng, bias[p], dout[p], -0.3f, 0.3f);
        /* One coefficient table serves all four dictionaries. */
        TU_OK(masa_layer_set_masa(lm, (masa_projection)p, dict[p], coef, lidx));
        TU_OK(masa_layer_set_dense(ld, (masa_projection)p, dense[p]));
        TU_OK(masa_layer_set_bias(lm, (masa_projection)p, bias[p])); /* shared memory */
        TU_OK(masa_layer_set_bias(ld, (masa_projection)p, bias[p]));
    }
    size_t B = 2, T = 4, n = B * T * cfg.d_model;
    float *x = tu_falloc(n), *dy = tu_falloc(n);
    float *ym = tu_falloc(n), *yd = tu_falloc(n), *dxm = tu_falloc(n), *dxd = tu_falloc(n);
    tu_fill(&rng, x, n, -1, 1);
    tu_fill(&rng, dy, n, -1, 1);
    size_t wsb, rsb, wsb2, rsb2;
    TU_OK(masa_layer_workspace_size(lm, B, T, &wsb));
    TU_OK(masa_layer_reserve_size(lm, B, T, &rsb));
    TU_OK(masa_layer_workspace_size(ld, B, T, &wsb2));
    TU_OK(masa_layer_reserve_size(ld, B, T, &rsb2));
    wsb = wsb > wsb2 ? wsb : wsb2;
    rsb = rsb > rsb2 ? rsb : rsb2;
    void *ws = tu_garbage(wsb), *rsm = tu_garbage(rsb), *rsd = tu_garbage(rsb);
    TU_OK(masa_layer_forward(lm, B, T, 2, x, ym, ws, wsb, rsm, rsb));
    TU_OK(masa_layer_forward(ld, B, T, 2, x, yd, ws, wsb, rsd, rsb));
    /* Same math; only the order of float operations may differ. */
    TU_ASSERT_CLOSE_FF("y masa vs dense", ym, yd, n, 1e-6);

    masa_layer_grads gm, gd;
    masa_layer_grads_init(&gm);
    masa_layer_grads_init(&gd);
    gm.mode = gd.mode = MASA_GRAD_SET;
    for (int p = 0; p < 4; p++) {
        gm.d_atoms[p] = tu_falloc(S * din[p] * dout[p]);
        gm.d_coefficients[p] = tu_falloc(L * S);
        gd.d_weight[p] = tu_falloc(din[p] * dout[p]);
    }
    TU_OK(masa_layer_backward(lm, B, T, 2, x, dy, dxm, &gm, ws, wsb, rsm, rsb));
    TU_OK(masa_layer_backward(ld, B, T, 2, x, dy, dxd, &gd, ws, wsb, rsd, rsb));
    TU_ASSERT_CLOSE_FF("dx masa vs dense", dxm, dxd, n, 1e-6);
    for (int p = 0; p < 4; p++) {
        size_t rc = din[p] * dout[p];
        char name[64];
        for (size_t s = 0; s < S; s++) {
            const float *da = gm.d_atoms[p] + s * rc;
            if (s == sel) {
                snprintf(name, sizeof name, "d_atoms[%d] selected atom vs dW", p);
                TU_ASSERT_CLOSE_FF(name, da, gd.d_weight[p], rc, 1e-6);
            } else {
                for (size_t e = 0; e < rc; e++) /* c = 0 exactly */
                    ck_assert_msg(da[e] == 0.0f, "d_atoms[%d] atom %zu elem %zu = %g",
                                  p, s, e, da[e]);
            }
        }
        /* dc[l, s] = <D_s, dW> for every atom, selected or not. */
        double *ad = tu_to_double(masa_dictionary_data(dict[p]), S * rc);
        double *dW = tu_to_double(gd.d_weight[p], rc), dc[3];
        double unused_c[3] = {0, 0, 0}; /* dc does not depend on c */
        ref_masa_grads(S, din[p], dout[p], ad, unused_c, dW, NULL, dc);
        snprintf(name, sizeof name, "d_coefficients[%d]", p);
        TU_ASSERT_CLOSE(name, gm.d_coefficients[p] + lidx * S, dc, S, 1e-4);
        free(ad);
        free(dW);
    }

    for (int p = 0; p < 4; p++) {
        free(gm.d_atoms[p]);
        free(gm.d_coefficients[p]);
        free(gd.d_weight[p]);
    }
    masa_layer_destroy(lm);
    masa_layer_destroy(ld);
    for (int p = 0; p < 4; p++) {
        masa_dictionary_destroy(dict[p]);
        free(dense[p]);
        free(bias[p]);
    }
    masa_coefficients_destroy(coef);
    free(ws);
    free(rsm);
    free(rsd);
    free(x);
    free(dy);
    free(ym);
    free(yd);
    free(dxm);
    free(dxd);
    masa_context_destroy(ctx);
}
END_TEST

/* ---- 12 layers, 4 atoms per projection, residual stream ---- */

#define NL 12
#define NS 4

typedef struct stack {
    ref_config cfg;
    masa_context *ctx;
    masa_dictionary *dict[4];
    masa_coefficients *coef[4];
    masa_layer *layer[NL];
    size_t din[4], dout[4], B, T, n, wsb, rsb;
    void *ws, *rs[NL];
    float *h[NL + 1]; /* residual stream: h[l+1] = h[l] + layer_l(h[l]) */
    float *r;         /* loss = sum(h[NL] * r) */
} stack;

static void stack_init(stack *st)
{
    memset(st, 0, sizeof *st);
    st->cfg = (ref_config){.d_model = 8, .n_heads = 2, .n_kv_heads = 1,
                           .head_dim = 4, .causal = 1, .rope = 1,
                           .rope_theta = 10000, .scale = 0.5};
    st->ctx = new_ctx();
    st->B = 2;
    st->T = 3;
    st->n = st->B * st->T * st->cfg.d_model;
    for (int p = 0; p < 4; p++) {
        st->din[p] = ref_d_in(&st->cfg, p);
        st->dout[p] = ref_d_out(&st->cfg, p);
        TU_OK(masa_dictionary_create(st->ctx, NS, st->din[p], st->dout[p], &st->dict[p]));
        TU_OK(masa_dictionary_init_uniform(st->dict[p], 0, 7 + (uint64_t)p));
        TU_OK(masa_coefficients_create(st->ctx, NL, NS, &st->coef[p]));
        TU_OK(masa_coefficients_init_cyclic(st->coef[p]));
        TU_OK(masa_coefficients_add_uniform(st->coef[p], 0.3f, 70 + (uint64_t)p));
    }
    for (size_t l = 0; l < NL; l++) {
        st->layer[l] = new_layer(st->ctx, &st->cfg);
        for (int p = 0; p < 4; p++)
            TU_OK(masa_layer_set_masa(st->layer[l], (masa_projection)p,
                                      st->dict[p], st->coef[p], l));
    }
    st->wsb = 0;
    TU_OK(masa_layer_workspace_size(st->layer[0], st->B, st->T, &st->wsb));
    TU_OK(masa_layer_reserve_size(st->layer[0], st->B, st->T, &st->rsb));
    st->ws = tu_garbage(st->wsb);
    tu_rng rng = {99};
    for (size_t l = 0; l <= NL; l++)
        st->h[l] = tu_falloc(st->n);
    st->r = tu_falloc(st->n);
    tu_fill(&rng, st->h[0], st->n, -1, 1);
    tu_fill(&rng, st->r, st->n, -1, 1);
    float *y = tu_falloc(st->n);
    for (size_t l = 0; l < NL; l++) {
        st->rs[l] = tu_garbage(st->rsb);
        TU_OK(masa_layer_forward(st->layer[l], st->B, st->T, 0, st->h[l], y,
                                 st->ws, st->wsb, st->rs[l], st->rsb));
        for (size_t i = 0; i < st->n; i++)
            st->h[l + 1][i] = st->h[l][i] + y[i];
    }
    free(y);
}

static void stack_fini(stack *st)
{
    for (size_t l = 0; l < NL; l++) {
        masa_layer_destroy(st->layer[l]);
        free(st->rs[l]);
    }
    for (int p = 0; p < 4; p++) {
        masa_dictionary_destroy(st->dict[p]);
        masa_coefficients_destroy(st->coef[p]);
    }
    for (size_t l = 0; l <= NL; l++)
        free(st->h[l]);
    free(st->r);
    free(st->ws);
    masa_context_destroy(st->ctx);
}

/* Backward through the stack: g[0] for every layer, or g[l] per layer. */
static void stack_backward(stack *st, masa_layer_grads *g, int per_layer)
{
    float *gh = tu_falloc(st->n), *dx = tu_falloc(st->n);
    memcpy(gh, st->r, st->n * sizeof(float));
    for (size_t l = NL; l-- > 0;) {
        TU_OK(masa_layer_backward(st->layer[l], st->B, st->T, 0, st->h[l], gh,
                                  dx, per_layer ? &g[l] : &g[0], st->ws, st->wsb,
                                  st->rs[l], st->rsb));
        for (size_t i = 0; i < st->n; i++) /* residual: dh_l = dh_{l+1} + dx */
            gh[i] += dx[i];
    }
    free(gh);
    free(dx);
}

START_TEST(test_stack_accumulates)
{
    stack st;
    stack_init(&st);
    size_t na[4], nc = NL * NS;
    for (int p = 0; p < 4; p++)
        na[p] = NS * st.din[p] * st.dout[p];

    /* ADD into one zeroed buffer per dictionary (the usual training case). */
    masa_layer_grads add;
    masa_layer_grads_init(&add);
    ck_assert_int_eq(add.mode, MASA_GRAD_ADD);
    for (int p = 0; p < 4; p++) {
        add.d_atoms[p] = tu_falloc(na[p]);
        add.d_coefficients[p] = tu_falloc(nc);
    }
    stack_backward(&st, &add, 0);

    /* SET into one buffer per layer, summed here in double. */
    masa_layer_grads set[NL];
    for (size_t l = 0; l < NL; l++) {
        masa_layer_grads_init(&set[l]);
        set[l].mode = MASA_GRAD_SET;
        for (int p = 0; p < 4; p++) {
            set[l].d_atoms[p] = tu_falloc(na[p]);
            set[l].d_coefficients[p] = tu_falloc(nc);
        }
    }
    stack_backward(&st, set, 1);

    /* Reference: the same stack in double. */
    double *W[4], *b[4] = {NULL, NULL, NULL, NULL}, *dW[4], *db[4] = {NULL, NULL, NULL, NULL};
    double *atoms[4], *coefs[4], *ref_da[4], *ref_dc[4], *tmp_da[4];
    for (int p = 0; p < 4; p++) {
        atoms[p] = tu_to_double(masa_dictionary_data(st.dict[p]), na[p]);
        coefs[p] = tu_to_double(masa_coefficients_data(st.coef[p]), nc);
        W[p] = tu_dalloc(st.din[p] * st.dout[p]);
        dW[p] = tu_dalloc(st.din[p] * st.dout[p]);
        ref_da[p] = tu_dalloc(na[p]);
        ref_dc[p] = tu_dalloc(nc);
        tmp_da[p] = tu_dalloc(na[p]);
    }
    double *hd[NL + 1];
    hd[0] = tu_to_double(st.h[0], st.n);
    double *yd = tu_dalloc(st.n), *gh = tu_dalloc(st.n), *dxd = tu_dalloc(st.n);
    for (size_t l = 0; l < NL; l++) {
        for (int p = 0; p < 4; p++)
            ref_compose(NS, st.din[p], st.dout[p], atoms[p], coefs[p] + l * NS, W[p]);
        ref_forward(&st.cfg, st.B, st.T, 0, hd[l], (const double *const *)W,
                    (const double *const *)b, yd);
        hd[l + 1] = tu_dalloc(st.n);
        for (size_t i = 0; i < st.n; i++)
            hd[l + 1][i] = hd[l][i] + yd[i];
    }
    for (size_t i = 0; i < st.n; i++)
        gh[i] = st.r[i];
    for (size_t l = NL; l-- > 0;) {
        for (int p = 0; p < 4; p++)
            ref_compose(NS, st.din[p], st.dout[p], atoms[p], coefs[p] + l * NS, W[p]);
        ref_backward(&st.cfg, st.B, st.T, 0, hd[l], (const double *const *)W,
                     (const double *const *)b, gh, dxd, dW, db);
        for (int p = 0; p < 4; p++) {
            ref_masa_grads(NS, st.din[p], st.dout[p], atoms[p], coefs[p] + l * NS,
                           dW[p], tmp_da[p], ref_dc[p] + l * NS);
            for (size_t i = 0; i < na[p]; i++)
                ref_da[p][i] += tmp_da[p][i];
        }
        for (size_t i = 0; i < st.n; i++)
            gh[i] += dxd[i];
    }

    for (int p = 0; p < 4; p++) {
        char name[64];
        double *sum = tu_dalloc(na[p]), *sumc = tu_dalloc(nc);
        for (size_t l = 0; l < NL; l++) {
            for (size_t i = 0; i < na[p]; i++)
                sum[i] += set[l].d_atoms[p][i];
            /* SET touches only row l of the table, which started at zero. */
            for (size_t i = 0; i < nc; i++)
                sumc[i] += set[l].d_coefficients[p][i];
        }
        snprintf(name, sizeof name, "ADD vs sum of SET, d_atoms[%d]", p);
        TU_ASSERT_CLOSE(name, add.d_atoms[p], sum, na[p], 1e-5);
        snprintf(name, sizeof name, "ADD vs sum of SET, d_coefficients[%d]", p);
        TU_ASSERT_CLOSE(name, add.d_coefficients[p], sumc, nc, 1e-5);
        snprintf(name, sizeof name, "ADD vs reference, d_atoms[%d]", p);
        TU_ASSERT_CLOSE(name, add.d_atoms[p], ref_da[p], na[p], 1e-4);
        snprintf(name, sizeof name, "ADD vs reference, d_coefficients[%d]", p);
        TU_ASSERT_CLOSE(name, add.d_coefficients[p], ref_dc[p], nc, 1e-4);
        free(sum);
        free(sumc);
    }

    for (size_t l = 0; l <= NL; l++)
        free(hd[l]);
    free(yd);
    free(gh);
    free(dxd);
    for (int p = 0; p < 4; p++) {
        free(add.d_atoms[p]);
        free(add.d_coefficients[p]);
        for (size_t l = 0; l < NL; l++) {
            free(set[l].d_atoms[p]);
            free(set[l].d_coefficients[p]);
        }
        free(atoms[p]);
        free(coefs[p]);
        free(W[p]);
        free(dW[p]);
        free(ref_da[p]);
        free(ref_dc[p]);
        free(tmp_da[p]);
    }
    stack_fini(&st);
}
END_TEST

/* Zero-copy: in-place edits of atoms, coefficients, dense weights and
 * biases are seen by the next forward of every layer using them. */
START_TEST(test_live_parameters)
{
    tu_spec s = {.d_model = 8, .n_heads = 2, .causal = 1, .masa_mask = 0x5,
                 .bias_mask = 0x1, .n_atoms = 2, .n_layers = 2,
                 .layer_index = 1, .wrap = 1};
    masa_context *ctx = new_ctx();
    tu_layer t;
    tu_layer_init(&t, ctx, &s, 55);
    tu_rng rng = {56};
    size_t B = 1, T = 3, n = B * T * 8;
    float *x = tu_falloc(n), *y = tu_falloc(n);
    tu_fill(&rng, x, n, -1, 1);
    size_t wsb = tu_workspace_bytes(&t, B, T);
    void *ws = tu_garbage(wsb);
    for (int step = 0; step < 5; step++) {
        switch (step) {
        case 1: tu_fill(&rng, masa_dictionary_data(t.dict[0]), tu_atoms_len(&t, 0), -1, 1); break;
        case 2: tu_fill(&rng, masa_coefficients_data(t.coef[2]), tu_coefs_len(&t, 2), -1, 1); break;
        case 3: tu_fill(&rng, masa_layer_weight(t.layer, MASA_PROJ_K), 64, -0.5f, 0.5f); break;
        case 4: tu_fill(&rng, masa_layer_bias(t.layer, MASA_PROJ_Q), 8, -1, 1); break;
        default: break;
        }
        tu_ref_out ref;
        tu_reference(&t, B, T, 0, x, NULL, &ref);
        TU_OK(masa_layer_forward(t.layer, B, T, 0, x, y, ws, wsb, NULL, 0));
        char name[32];
        snprintf(name, sizeof name, "y after edit %d", step);
        TU_ASSERT_CLOSE(name, y, ref.y, n, 1e-4);
        tu_ref_out_free(&ref);
    }
    free(ws);
    free(x);
    free(y);
    tu_layer_fini(&t);
    masa_context_destroy(ctx);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("sharing");
    TCase *tc = tcase_create("sharing");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_onehot_inits);
    tcase_add_test(tc, test_onehot_equals_dense);
    tcase_add_test(tc, test_stack_accumulates);
    tcase_add_test(tc, test_live_parameters);
    suite_add_tcase(s, tc);
    return tu_run_suite(s);
}
