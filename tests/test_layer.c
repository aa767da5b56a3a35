/*
 * Forward and backward of masa_layer against the double reference, over a
 * grid of configurations (MHA/GQA/MQA, causal or not, RoPE with offsets,
 * biases, dictionary sizes 1-3, odd sizes, seq 1, batch > 1, MASA and dense
 * projections mixed, library-owned and wrapped parameters), for both
 * gradient modes.
 *
 * Tolerance: max|got - ref| <= 1e-4 * max|ref| (+1e-6) per output array.
 * The library works in float32 (eps 6e-8); every value here is a sum of at
 * most ~100 products of order-one numbers plus an exp/softmax, so rounding
 * stays around 1e-6..1e-5 of the array's magnitude. A real bug (wrong index,
 * head mapping, sign, missing term, wrong RoPE pair) changes results at the
 * 1e-1..1 level. Scaling by the array maximum rather than per element keeps
 * entries that nearly cancel (sums over heads and tokens) from failing on
 * rounding of their much larger summands.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "test_util.h"

#define RTOL 1e-4

typedef struct lcase {
    const char *name;
    tu_spec s;
    size_t batch, seq, pos;
    int misalign; /* workspace/reserve only float-aligned (offset 4 bytes) */
} lcase;

static const lcase cases[] = {
    {"mha_dense_plain", {.d_model = 8, .n_heads = 2, .masa_mask = 0,
      .n_atoms = 1, .n_layers = 1, .wrap = 1}, 1, 4, 0, 0},
    {"mha_causal_rope_masa_bias", {.d_model = 8, .n_heads = 2, .causal = 1,
      .rope = 1, .masa_mask = 0xF, .bias_mask = 0xF, .n_atoms = 2,
      .n_layers = 3, .layer_index = 1, .wrap = 1}, 2, 5, 0, 0},
    {"gqa_mixed_rope_offset", {.d_model = 12, .n_heads = 4, .n_kv_heads = 2,
      .head_dim = 4, .causal = 1, .rope = 1, .rope_theta = 500.0f,
      .masa_mask = 0x5, .bias_mask = 0x9, .n_atoms = 3, .n_layers = 4,
      .layer_index = 3, .wrap = 0}, 2, 3, 7, 0},
    {"mqa_hd3_seq1", {.d_model = 12, .n_heads = 4, .n_kv_heads = 1,
      .head_dim = 3, .causal = 1, .masa_mask = 0xF, .bias_mask = 0x6,
      .n_atoms = 1, .n_layers = 2, .layer_index = 1, .wrap = 1}, 3, 1, 0, 0},
    {"gqa_noncausal_rope_scale", {.d_model = 12, .n_heads = 6,
      .n_kv_heads = 3, .rope = 1, .softmax_scale = 0.7f, .masa_mask = 0x7,
      .bias_mask = 0xF, .n_atoms = 3, .n_layers = 3, .layer_index = 0,
      .wrap = 0}, 1, 7, 3, 0},
    {"odd_dm5_one_head", {.d_model = 5, .n_heads = 1, .masa_mask = 0xF,
      .bias_mask = 0x8, .n_atoms = 2, .n_layers = 2, .layer_index = 1,
      .wrap = 1}, 2, 3, 0, 0},
    {"shared_dict_qkv", {.d_model = 8, .n_heads = 4, .causal = 1, .rope = 1,
      .masa_mask = 0xF, .n_atoms = 2, .n_layers = 4, .layer_index = 1,
      .wrap = 1, .share_dict = 1}, 2, 4, 1, 0},
    {"long_causal_misaligned", {.d_model = 16, .n_heads = 2, .n_kv_heads = 1,
      .head_dim = 8, .causal = 1, .rope = 1, .masa_mask = 0xA,
      .bias_mask = 0x5, .n_atoms = 2, .n_layers = 2, .layer_index = 0,
      .wrap = 0}, 1, 70, 0, 1},
    {"batch4_seq1_rope", {.d_model = 8, .n_heads = 2, .causal = 1, .rope = 1,
      .masa_mask = 0xF, .bias_mask = 0xF, .n_atoms = 2, .n_layers = 2,
      .layer_index = 0, .wrap = 0}, 4, 1, 11, 0},
    {"wide_gqa_three_tiles", {.d_model = 64, .n_heads = 8, .n_kv_heads = 2,
      .head_dim = 8, .causal = 1, .rope = 1, .masa_mask = 0x9,
      .bias_mask = 0x6, .n_atoms = 3, .n_layers = 5, .layer_index = 4,
      .wrap = 1}, 2, 129, 0, 0},
    {"rope_far_position", {.d_model = 8, .n_heads = 2, .causal = 1,
      .rope = 1, .masa_mask = 0x3, .bias_mask = 0x3, .n_atoms = 2,
      .n_layers = 2, .layer_index = 0, .wrap = 1}, 1, 5, 100003, 0},
    {"long_noncausal_dense", {.d_model = 8, .n_heads = 2, .masa_mask = 0,
      .bias_mask = 0x4, .n_atoms = 1, .n_layers = 1, .wrap = 0}, 2, 67, 0, 1},
};
#define N_CASES (sizeof cases / sizeof cases[0])

/* got - pre as the expected ADD result: pre + ref, in double. */
static double *plus(const float *pre, const double *ref, size_t n)
{
    double *e = tu_dalloc(n);
    for (size_t i = 0; i < n; i++)
        e[i] = (double)pre[i] + ref[i];
    return e;
}

/* Buffers for one backward call; pre holds the prefilled contents. */
typedef struct gbufs {
    masa_layer_grads g;
    float *pre_atoms[REF_NPROJ], *pre_coef[REF_NPROJ];
    float *pre_w[REF_NPROJ], *pre_b[REF_NPROJ];
} gbufs;

static float *dup_f(const float *a, size_t n)
{
    float *d = tu_falloc(n);
    memcpy(d, a, n * sizeof(float));
    return d;
}

static void gbufs_make(gbufs *gb, const tu_layer *t, masa_grad_mode mode,
                       tu_rng *rng)
{
    memset(gb, 0, sizeof *gb);
    masa_layer_grads_init(&gb->g);
    gb->g.mode = mode;
    for (int p = 0; p < REF_NPROJ; p++) {
        size_t nw = t->din[p] * t->dout[p];
        /* Prefill: SET must ignore it, ADD must add to it. */
        if (tu_is_masa(t, p)) {
            gb->g.d_atoms[p] = tu_falloc(tu_atoms_len(t, p));
            gb->g.d_coefficients[p] = tu_falloc(tu_coefs_len(t, p));
            tu_fill(rng, gb->g.d_atoms[p], tu_atoms_len(t, p), -1, 1);
            tu_fill(rng, gb->g.d_coefficients[p], tu_coefs_len(t, p), -1, 1);
            gb->pre_atoms[p] = dup_f(gb->g.d_atoms[p], tu_atoms_len(t, p));
            gb->pre_coef[p] = dup_f(gb->g.d_coefficients[p], tu_coefs_len(t, p));
        } else {
            gb->g.d_weight[p] = tu_falloc(nw);
            tu_fill(rng, gb->g.d_weight[p], nw, -1, 1);
            gb->pre_w[p] = dup_f(gb->g.d_weight[p], nw);
        }
        if (tu_has_bias(t, p)) {
            gb->g.d_bias[p] = tu_falloc(t->dout[p]);
            tu_fill(rng, gb->g.d_bias[p], t->dout[p], -1, 1);
            gb->pre_b[p] = dup_f(gb->g.d_bias[p], t->dout[p]);
        }
    }
}

static void gbufs_free(gbufs *gb)
{
    for (int p = 0; p < REF_NPROJ; p++) {
        free(gb->g.d_atoms[p]);
        free(gb->g.d_coefficients[p]);
        free(gb->g.d_weight[p]);
        free(gb->g.d_bias[p]);
        free(gb->pre_atoms[p]);
        free(gb->pre_coef[p]);
        free(gb->pre_w[p]);
        free(gb->pre_b[p]);
    }
}

/* Compares one gradient array: SET -> ref, ADD -> pre + ref. */
static void check_grad(const char *what, int p, masa_grad_mode mode,
                       const float *got, const float *pre, const double *ref,
                       size_t n)
{
    char name[96];
    snprintf(name, sizeof name, "%s[%d] (%s)", what, p,
             mode == MASA_GRAD_SET ? "SET" : "ADD");
    if (mode == MASA_GRAD_SET) {
        TU_ASSERT_CLOSE(name, got, ref, n, RTOL);
    } else {
        double *e = plus(pre, ref, n);
        TU_ASSERT_CLOSE(name, got, e, n, RTOL);
        free(e);
    }
}

static void check_grads(const tu_layer *t, const gbufs *gb,
                        const tu_ref_out *ref)
{
    masa_grad_mode mode = gb->g.mode;
    size_t S = t->spec.n_atoms;
    for (int p = 0; p < REF_NPROJ; p++) {
        if (tu_is_masa(t, p)) {
            check_grad("d_atoms", p, mode, gb->g.d_atoms[p], gb->pre_atoms[p],
                       ref->d_atoms[p], tu_atoms_len(t, p));
            /* Only row layer_index of the table is touched. */
            for (size_t l = 0; l < t->spec.n_layers; l++) {
                const float *row = gb->g.d_coefficients[p] + l * S;
                const float *pre = gb->pre_coef[p] + l * S;
                if (l == t->lidx[p])
                    check_grad("d_coefficients", p, mode, row, pre, ref->dc[p], S);
                else
                    ck_assert_msg(memcmp(row, pre, S * sizeof(float)) == 0,
                                  "d_coefficients[%d] row %zu (not layer_index "
                                  "%zu) was modified", p, l, t->lidx[p]);
            }
        } else {
            check_grad("d_weight", p, mode, gb->g.d_weight[p], gb->pre_w[p],
                       ref->dW[p], t->din[p] * t->dout[p]);
        }
        if (tu_has_bias(t, p))
            check_grad("d_bias", p, mode, gb->g.d_bias[p], gb->pre_b[p],
                       ref->db[p], t->dout[p]);
    }
}

START_TEST(test_case)
{
    const lcase *c = &cases[_i];
    masa_context_options co;
    masa_context_options_init(&co);
    co.n_threads = 1 + (size_t)(_i % 2); /* threads themselves: test_threads */
    masa_context *ctx = NULL;
    TU_OK(masa_context_create(&co, &ctx));

    tu_layer t;
    tu_layer_init(&t, ctx, &c->s, 1000 + (uint64_t)_i);
    tu_rng rng = {77 + (uint64_t)_i};
    size_t B = c->batch, T = c->seq, n = B * T * t.cfg.d_model;
    float *x = tu_falloc(n), *dy = tu_falloc(n), *y = tu_falloc(n);
    float *y_inf = tu_falloc(n), *dx = tu_falloc(n);
    tu_fill(&rng, x, n, -1, 1);
    tu_fill(&rng, dy, n, -1, 1);
    float *x_copy = dup_f(x, n);

    size_t ws_bytes = tu_workspace_bytes(&t, B, T);
    size_t rs_bytes = tu_reserve_bytes(&t, B, T);
    size_t off = c->misalign ? sizeof(float) : 0;
    char *ws_mem = tu_garbage(ws_bytes + off), *rs_mem = tu_garbage(rs_bytes + off);
    void *ws = ws_mem + off, *rs = rs_mem + off;

    tu_ref_out ref;
    tu_reference(&t, B, T, c->pos, x, dy, &ref);

    /* Inference (no reserve) and training forward give the reference y. */
    TU_OK(masa_layer_forward(t.layer, B, T, c->pos, x, y_inf, ws, ws_bytes,
                             NULL, 0));
    TU_ASSERT_CLOSE("y (inference)", y_inf, ref.y, n, RTOL);
    tu_fill_garbage(ws, ws_bytes);
    TU_OK(masa_layer_forward(t.layer, B, T, c->pos, x, y, ws, ws_bytes, rs,
                             rs_bytes));
    TU_ASSERT_CLOSE("y (training)", y, ref.y, n, RTOL);
    ck_assert_msg(memcmp(x, x_copy, n * sizeof(float)) == 0, "forward modified x");
    void *rs_copy = malloc(rs_bytes);
    ck_assert_ptr_nonnull(rs_copy);
    memcpy(rs_copy, rs, rs_bytes);

    /* Backward twice from the same reserve: SET, then ADD. The workspace is
     * scrambled in between: it must not carry state. */
    masa_grad_mode modes[2] = {MASA_GRAD_SET, MASA_GRAD_ADD};
    for (int m = 0; m < 2; m++) {
        gbufs gb;
        gbufs_make(&gb, &t, modes[m], &rng);
        tu_fill(&rng, dx, n, 5, 6); /* dx is always overwritten */
        tu_fill_garbage(ws, ws_bytes);
        TU_OK(masa_layer_backward(t.layer, B, T, c->pos, x, dy, dx, &gb.g, ws,
                                  ws_bytes, rs, rs_bytes));
        TU_ASSERT_CLOSE("dx", dx, ref.dx, n, RTOL);
        check_grads(&t, &gb, &ref);
        gbufs_free(&gb);
    }
    ck_assert_msg(memcmp(rs, rs_copy, rs_bytes) == 0, "backward modified the reserve");
    ck_assert_msg(memcmp(x, x_copy, n * sizeof(float)) == 0, "backward modified x");

    /* Nothing wanted: dx and grads NULL is a valid (no-op) call. */
    TU_OK(masa_layer_backward(t.layer, B, T, c->pos, x, dy, NULL, NULL, ws,
                              ws_bytes, rs, rs_bytes));

    tu_ref_out_free(&ref);
    free(rs_copy);
    free(ws_mem);
    free(rs_mem);
    free(x);
    free(x_copy);
    free(dy);
    free(y);
    free(y_inf);
    free(dx);
    tu_layer_fini(&t);
    masa_context_destroy(ctx);
}
END_TEST

/* dx alone, and parameter gradients alone, match the full call. */
START_TEST(test_partial_grads)
{
    tu_spec s = {.d_model = 8, .n_heads = 2, .n_kv_heads = 1, .causal = 1,
                 .rope = 1, .masa_mask = 0x3, .bias_mask = 0x3, .n_atoms = 2,
                 .n_layers = 2, .layer_index = 1, .wrap = 1};
    masa_context *ctx = NULL;
    TU_OK(masa_context_create(NULL, &ctx));
    tu_layer t;
    tu_layer_init(&t, ctx, &s, 5);
    tu_rng rng = {6};
    size_t B = 2, T = 3, n = B * T * 8;
    float *x = tu_falloc(n), *dy = tu_falloc(n), *y = tu_falloc(n), *dx = tu_falloc(n);
    tu_fill(&rng, x, n, -1, 1);
    tu_fill(&rng, dy, n, -1, 1);
    size_t wsb = tu_workspace_bytes(&t, B, T), rsb = tu_reserve_bytes(&t, B, T);
    void *ws = tu_garbage(wsb), *rs = tu_garbage(rsb);
    tu_ref_out ref;
    tu_reference(&t, B, T, 0, x, dy, &ref);
    TU_OK(masa_layer_forward(t.layer, B, T, 0, x, y, ws, wsb, rs, rsb));

    TU_OK(masa_layer_backward(t.layer, B, T, 0, x, dy, dx, NULL, ws, wsb, rs, rsb));
    TU_ASSERT_CLOSE("dx only", dx, ref.dx, n, RTOL);

    /* One gradient (Q's coefficients) wanted, everything else NULL. */
    masa_layer_grads g;
    masa_layer_grads_init(&g);
    g.mode = MASA_GRAD_SET;
    float *dc = tu_falloc(tu_coefs_len(&t, 0));
    g.d_coefficients[0] = dc;
    TU_OK(masa_layer_backward(t.layer, B, T, 0, x, dy, NULL, &g, ws, wsb, rs, rsb));
    TU_ASSERT_CLOSE("dc[Q] only", dc + t.lidx[0] * 2, ref.dc[0], 2, RTOL);

    free(dc);
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

/* Without a causal mask, RoPE makes scores depend only on relative
 * positions, so a common pos_offset must not change y. */
START_TEST(test_rope_shift_invariance)
{
    tu_spec s = {.d_model = 8, .n_heads = 2, .rope = 1, .masa_mask = 0x1,
                 .n_atoms = 2, .n_layers = 1, .wrap = 1};
    masa_context *ctx = NULL;
    TU_OK(masa_context_create(NULL, &ctx));
    tu_layer t;
    tu_layer_init(&t, ctx, &s, 9);
    tu_rng rng = {10};
    size_t B = 1, T = 5, n = B * T * 8;
    float *x = tu_falloc(n), *y0 = tu_falloc(n), *y1 = tu_falloc(n);
    tu_fill(&rng, x, n, -1, 1);
    size_t wsb = tu_workspace_bytes(&t, B, T);
    void *ws = tu_garbage(wsb);
    TU_OK(masa_layer_forward(t.layer, B, T, 0, x, y0, ws, wsb, NULL, 0));
    TU_OK(masa_layer_forward(t.layer, B, T, 5, x, y1, ws, wsb, NULL, 0));
    TU_ASSERT_CLOSE_FF("y(pos 5) vs y(pos 0)", y1, y0, n, RTOL);
    free(ws);
    free(x);
    free(y0);
    free(y1);
    tu_layer_fini(&t);
    masa_context_destroy(ctx);
}
END_TEST

/* masa_compose against the reference composition. */
START_TEST(test_compose)
{
    masa_context *ctx = NULL;
    TU_OK(masa_context_create(NULL, &ctx));
    size_t S = 3, L = 4, R = 5, C = 7;
    tu_rng rng = {11};
    float *atoms = tu_falloc(S * R * C), *c = tu_falloc(L * S), *w = tu_falloc(R * C + 1);
    tu_fill(&rng, atoms, S * R * C, -1, 1);
    tu_fill(&rng, c, L * S, -1, 1);
    masa_dictionary *d;
    masa_coefficients *k;
    TU_OK(masa_dictionary_wrap(ctx, S, R, C, atoms, &d));
    TU_OK(masa_coefficients_wrap(ctx, L, S, c, &k));
    double *ad = tu_to_double(atoms, S * R * C), *wd = tu_dalloc(R * C);
    for (size_t l = 0; l < L; l++) {
        double *cd = tu_to_double(c + l * S, S);
        w[R * C] = 42.0f;
        TU_OK(masa_compose(d, k, l, w, R * C + 1));
        ref_compose(S, R, C, ad, cd, wd);
        TU_ASSERT_CLOSE("compose", w, wd, R * C, 1e-6);
        ck_assert_msg(w[R * C] == 42.0f, "compose wrote past rows*cols");
        free(cd);
    }
    free(ad);
    free(wd);
    masa_dictionary_destroy(d);
    masa_coefficients_destroy(k);
    free(atoms);
    free(c);
    free(w);
    masa_context_destroy(ctx);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("layer");
    TCase *tc = tcase_create("grid");
    tcase_set_timeout(tc, 60);
    tcase_add_loop_test(tc, test_case, 0, (int)N_CASES);
    tcase_add_test(tc, test_partial_grads);
    tcase_add_test(tc, test_rope_shift_invariance);
    tcase_add_test(tc, test_compose);
    suite_add_tcase(s, tc);
    return tu_run_suite(s);
}
