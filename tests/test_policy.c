/*
 * The weight policy of MASA projections (masa_layer_set_weight_policy):
 * with MASA_WEIGHTS_CACHED and MASA_WEIGHTS_ON_THE_FLY, forward and backward
 * (outputs, dx, atom and coefficient gradients, both gradient modes, 1 and 2
 * threads) match the double reference, and each other; the cache is stale
 * exactly as masa.h documents (until masa_layer_refresh_weights() or a
 * projection set again); decoding with cached weights equals forward; an
 * invalid policy and allocation failures leave the layer as it was.
 *
 * Shapes include projections of 384 x 384 (147456 floats), large enough for
 * composition and the atom gradients to be split across the pool, and
 * products large enough to run as BLIS blocks on the pool.
 *
 * Tolerance: as tests/test_layer.c, max|got - ref| <= 1e-4 * max|ref|.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "test_util.h"

#define RTOL 1e-4

static masa_context *ctx_with(size_t threads)
{
    masa_context_options o;
    masa_context_options_init(&o);
    o.n_threads = threads;
    masa_context *ctx = NULL;
    TU_OK(masa_context_create(&o, &ctx));
    return ctx;
}

typedef struct pcase {
    const char *name;
    tu_spec s;
    size_t batch, seq, threads;
} pcase;

static const pcase cases[] = {
    {"mha_masa_bias_1thr", {.d_model = 8, .n_heads = 2, .causal = 1,
      .rope = 1, .masa_mask = 0xF, .bias_mask = 0xF, .n_atoms = 3,
      .n_layers = 3, .layer_index = 1, .wrap = 1}, 2, 5, 1},
    {"gqa_mixed_2thr", {.d_model = 12, .n_heads = 4, .n_kv_heads = 2,
      .head_dim = 4, .causal = 1, .rope = 1, .masa_mask = 0x5,
      .bias_mask = 0x9, .n_atoms = 3, .n_layers = 4, .layer_index = 3,
      .wrap = 0}, 2, 3, 2},
    {"shared_dict_2thr", {.d_model = 8, .n_heads = 4, .causal = 1,
      .rope = 1, .masa_mask = 0xF, .n_atoms = 2, .n_layers = 4,
      .layer_index = 1, .wrap = 1, .share_dict = 1}, 2, 4, 2},
    /* 384 x 384 atoms: the pool splits composition and atom gradients */
    {"wide_s8_2thr", {.d_model = 384, .n_heads = 4, .causal = 1,
      .masa_mask = 0xB, .bias_mask = 0x1, .n_atoms = 8, .n_layers = 4,
      .layer_index = 2, .wrap = 0}, 1, 3, 2},
    {"wide_s8_1thr", {.d_model = 384, .n_heads = 4, .causal = 1,
      .masa_mask = 0xB, .bias_mask = 0x1, .n_atoms = 8, .n_layers = 4,
      .layer_index = 2, .wrap = 0}, 1, 3, 1},
    /* products of >= 8e6 multiply-adds run as BLIS blocks on the pool:
     * 128 rows x 256 split by columns (and X^T dY, 256 x 256, by rows) */
    {"pool_gemm_columns_2thr", {.d_model = 256, .n_heads = 4, .causal = 1,
      .rope = 1, .masa_mask = 0x6, .bias_mask = 0x1, .n_atoms = 3,
      .n_layers = 2, .layer_index = 1, .wrap = 0}, 2, 64, 2},
    /* 512 rows x 128 split by rows */
    {"pool_gemm_rows_2thr", {.d_model = 128, .n_heads = 2, .causal = 1,
      .masa_mask = 0x9, .bias_mask = 0x8, .n_atoms = 2, .n_layers = 3,
      .layer_index = 2, .wrap = 1}, 2, 256, 2},
    /* 70 atoms: backward's tile kernel takes them in two groups */
    {"many_atoms_70", {.d_model = 8, .n_heads = 2, .causal = 1,
      .masa_mask = 0xF, .n_atoms = 70, .n_layers = 2, .layer_index = 1,
      .wrap = 0}, 1, 3, 2},
    /* more atoms than the scratch for dc's per-task sums holds */
    {"atoms_past_partials", {.d_model = 4, .n_heads = 1, .masa_mask = 0x1,
      .n_atoms = 2049, .n_layers = 1, .wrap = 1}, 2, 6, 2},
};
#define N_CASES (sizeof cases / sizeof cases[0])

/* Results of one forward + backward. */
typedef struct run_out {
    float *y, *dx;
    float *d_atoms[REF_NPROJ], *dc[REF_NPROJ], *dw[REF_NPROJ], *db[REF_NPROJ];
} run_out;

static void run_free(run_out *r)
{
    free(r->y);
    free(r->dx);
    for (int p = 0; p < REF_NPROJ; p++) {
        free(r->d_atoms[p]);
        free(r->dc[p]);
        free(r->dw[p]);
        free(r->db[p]);
    }
    memset(r, 0, sizeof *r);
}

/* Forward + backward with gradient mode `mode`; ADD buffers start at
 * `pre` (1.0), SET buffers at NaN-free garbage the call must overwrite. */
static void run_layer(const tu_layer *t, size_t B, size_t T, const float *x,
                      const float *dy, masa_grad_mode mode, run_out *r)
{
    size_t n = B * T * t->cfg.d_model;
    size_t wsb = tu_workspace_bytes(t, B, T), rsb = tu_reserve_bytes(t, B, T);
    void *ws = tu_garbage(wsb), *rs = tu_garbage(rsb);
    memset(r, 0, sizeof *r);
    r->y = tu_falloc(n);
    r->dx = tu_falloc(n);
    masa_layer_grads g;
    masa_layer_grads_init(&g);
    g.mode = mode;
    for (int p = 0; p < REF_NPROJ; p++) {
        float **slot[4] = {&r->d_atoms[p], &r->dc[p], &r->dw[p], &r->db[p]};
        size_t len[4] = {tu_is_masa(t, p) ? tu_atoms_len(t, p) : 0,
                         tu_is_masa(t, p) ? tu_coefs_len(t, p) : 0,
                         tu_is_masa(t, p) ? 0 : t->din[p] * t->dout[p],
                         tu_has_bias(t, p) ? t->dout[p] : 0};
        for (int k = 0; k < 4; k++) {
            if (!len[k])
                continue;
            *slot[k] = tu_falloc(len[k]);
            for (size_t i = 0; i < len[k]; i++)
                (*slot[k])[i] = 1.0f;
        }
        g.d_atoms[p] = r->d_atoms[p];
        g.d_coefficients[p] = r->dc[p];
        g.d_weight[p] = r->dw[p];
        g.d_bias[p] = r->db[p];
    }
    TU_OK(masa_layer_forward(t->layer, B, T, 0, x, r->y, ws, wsb, rs, rsb));
    TU_OK(masa_layer_backward(t->layer, B, T, 0, x, dy, r->dx, &g, ws, wsb,
                              rs, rsb));
    (void)n;
    free(ws);
    free(rs);
}

/* ref + 1 for ADD (buffers started at 1), ref for SET */
static double *expect(const double *ref, size_t n, masa_grad_mode mode)
{
    double *e = tu_dalloc(n);
    for (size_t i = 0; i < n; i++)
        e[i] = ref[i] + (mode == MASA_GRAD_ADD ? 1.0 : 0.0);
    return e;
}

static void check_against_ref(const tu_layer *t, const run_out *r,
                              const tu_ref_out *ref, size_t n,
                              masa_grad_mode mode, const char *what)
{
    char name[128];
    snprintf(name, sizeof name, "%s y", what);
    TU_ASSERT_CLOSE(name, r->y, ref->y, n, RTOL);
    snprintf(name, sizeof name, "%s dx", what);
    TU_ASSERT_CLOSE(name, r->dx, ref->dx, n, RTOL);
    for (int p = 0; p < REF_NPROJ; p++) {
        if (tu_is_masa(t, p)) {
            size_t na = tu_atoms_len(t, p), S = t->spec.n_atoms;
            double *e = expect(ref->d_atoms[p], na, mode);
            snprintf(name, sizeof name, "%s d_atoms[%d]", what, p);
            TU_ASSERT_CLOSE(name, r->d_atoms[p], e, na, RTOL);
            free(e);
            e = expect(ref->dc[p], S, mode);
            snprintf(name, sizeof name, "%s dc[%d]", what, p);
            TU_ASSERT_CLOSE(name, r->dc[p] + t->lidx[p] * S, e, S, RTOL);
            free(e);
            /* other rows of the table are untouched */
            for (size_t i = 0; i < tu_coefs_len(t, p); i++)
                if (i / S != t->lidx[p])
                    ck_assert_float_eq(r->dc[p][i], 1.0f);
        } else {
            size_t nw = t->din[p] * t->dout[p];
            double *e = expect(ref->dW[p], nw, mode);
            snprintf(name, sizeof name, "%s dW[%d]", what, p);
            TU_ASSERT_CLOSE(name, r->dw[p], e, nw, RTOL);
            free(e);
        }
        if (tu_has_bias(t, p)) {
            double *e = expect(ref->db[p], t->dout[p], mode);
            snprintf(name, sizeof name, "%s db[%d]", what, p);
            TU_ASSERT_CLOSE(name, r->db[p], e, t->dout[p], RTOL);
            free(e);
        }
    }
}

/* Both policies, both modes: the reference, and each other. */
START_TEST(test_policies_match_reference)
{
    const pcase *c = &cases[_i];
    masa_context *ctx = ctx_with(c->threads);
    tu_layer t;
    tu_layer_init(&t, ctx, &c->s, 1000 + (uint64_t)_i);
    size_t n = c->batch * c->seq * c->s.d_model;
    tu_rng rng = {77 + (uint64_t)_i};
    float *x = tu_falloc(n), *dy = tu_falloc(n);
    tu_fill(&rng, x, n, -1, 1);
    tu_fill(&rng, dy, n, -1, 1);
    tu_ref_out ref;
    tu_reference(&t, c->batch, c->seq, 0, x, dy, &ref);

    masa_weight_policy pol = MASA_WEIGHTS_CACHED;
    TU_OK(masa_layer_weight_policy(t.layer, &pol));
    ck_assert_int_eq(pol, MASA_WEIGHTS_ON_THE_FLY); /* the default */
    for (int mode = MASA_GRAD_SET; mode <= MASA_GRAD_ADD; mode++) {
        run_out fly, cached;
        TU_OK(masa_layer_set_weight_policy(t.layer, MASA_WEIGHTS_ON_THE_FLY));
        run_layer(&t, c->batch, c->seq, x, dy, (masa_grad_mode)mode, &fly);
        TU_OK(masa_layer_set_weight_policy(t.layer, MASA_WEIGHTS_CACHED));
        TU_OK(masa_layer_weight_policy(t.layer, &pol));
        ck_assert_int_eq(pol, MASA_WEIGHTS_CACHED);
        run_layer(&t, c->batch, c->seq, x, dy, (masa_grad_mode)mode, &cached);
        check_against_ref(&t, &fly, &ref, n, (masa_grad_mode)mode, "on-the-fly");
        check_against_ref(&t, &cached, &ref, n, (masa_grad_mode)mode, "cached");
        TU_ASSERT_CLOSE_FF("cached vs on-the-fly y", cached.y, fly.y, n, RTOL);
        TU_ASSERT_CLOSE_FF("cached vs on-the-fly dx", cached.dx, fly.dx, n, RTOL);
        run_free(&fly);
        run_free(&cached);
    }
    tu_ref_out_free(&ref);
    free(x);
    free(dy);
    tu_layer_fini(&t);
    masa_context_destroy(ctx);
}
END_TEST

/* Forward output of the layer as it is now. */
static float *forward_y(const tu_layer *t, size_t B, size_t T, const float *x)
{
    size_t n = B * T * t->cfg.d_model, wsb = tu_workspace_bytes(t, B, T);
    void *ws = tu_garbage(wsb);
    float *y = tu_falloc(n);
    TU_OK(masa_layer_forward(t->layer, B, T, 0, x, y, ws, wsb, NULL, 0));
    free(ws);
    return y;
}

/* Changes every MASA projection's atoms and coefficient rows in place. */
static void perturb(tu_layer *t, tu_rng *rng)
{
    for (int p = 0; p < REF_NPROJ; p++) {
        if (!tu_is_masa(t, p))
            continue;
        float *a = masa_dictionary_data(t->dict[p]);
        for (size_t i = 0; i < tu_atoms_len(t, p); i++)
            a[i] *= (float)tu_unif(rng, 0.5, 1.5);
        float *cf = masa_coefficients_data(t->coef[p]);
        for (size_t i = 0; i < tu_coefs_len(t, p); i++)
            cf[i] += (float)tu_unif(rng, -0.5, 0.5);
    }
}

static double max_abs_diff(const float *a, const float *b, size_t n)
{
    double m = 0;
    for (size_t i = 0; i < n; i++)
        m = fmax(m, fabs((double)a[i] - (double)b[i]));
    return m;
}

/* The cache keeps the weights composed when it was filled until a refresh;
 * the on-the-fly policy sees every change at once. */
START_TEST(test_stale_until_refresh)
{
    const tu_spec s = {.d_model = 16, .n_heads = 2, .causal = 1, .rope = 1,
                       .masa_mask = 0xF, .bias_mask = 0x3, .n_atoms = 3,
                       .n_layers = 2, .layer_index = 1, .wrap = 1};
    size_t B = 2, T = 6, n = B * T * s.d_model;
    masa_context *ctx = ctx_with(2);
    tu_layer t;
    tu_layer_init(&t, ctx, &s, 5);
    tu_rng rng = {9};
    float *x = tu_falloc(n);
    tu_fill(&rng, x, n, -1, 1);

    TU_OK(masa_layer_set_weight_policy(t.layer, MASA_WEIGHTS_CACHED));
    float *y_old = forward_y(&t, B, T, x);
    tu_ref_out ref_old;
    tu_reference(&t, B, T, 0, x, NULL, &ref_old);
    TU_ASSERT_CLOSE("cached y", y_old, ref_old.y, n, RTOL);

    perturb(&t, &rng);
    tu_ref_out ref_new;
    tu_reference(&t, B, T, 0, x, NULL, &ref_new);
    /* the change matters at the 1e-1 level, far above the tolerance */
    float *y_stale = forward_y(&t, B, T, x);
    ck_assert_msg(memcmp(y_stale, y_old, n * sizeof(float)) == 0,
                  "a stale cache must give exactly the old output");

    /* on the fly: the new parameters at once */
    TU_OK(masa_layer_set_weight_policy(t.layer, MASA_WEIGHTS_ON_THE_FLY));
    float *y_fly = forward_y(&t, B, T, x);
    TU_ASSERT_CLOSE("on-the-fly y after the change", y_fly, ref_new.y, n, RTOL);
    ck_assert(max_abs_diff(y_fly, y_old, n) > 1e-2);

    /* back to CACHED: filled from the current parameters */
    TU_OK(masa_layer_set_weight_policy(t.layer, MASA_WEIGHTS_CACHED));
    float *y_c2 = forward_y(&t, B, T, x);
    TU_ASSERT_CLOSE("re-cached y", y_c2, ref_new.y, n, RTOL);

    /* stale again after another change, fresh after refresh */
    perturb(&t, &rng);
    tu_ref_out ref_3;
    tu_reference(&t, B, T, 0, x, NULL, &ref_3);
    float *y_s2 = forward_y(&t, B, T, x);
    ck_assert(memcmp(y_s2, y_c2, n * sizeof(float)) == 0);
    TU_OK(masa_layer_refresh_weights(t.layer));
    float *y_r = forward_y(&t, B, T, x);
    TU_ASSERT_CLOSE("refreshed y", y_r, ref_3.y, n, RTOL);
    ck_assert(max_abs_diff(y_r, y_c2, n) > 1e-2);

    /* CACHED set again when already CACHED refills too */
    perturb(&t, &rng);
    tu_ref_out ref_4;
    tu_reference(&t, B, T, 0, x, NULL, &ref_4);
    TU_OK(masa_layer_set_weight_policy(t.layer, MASA_WEIGHTS_CACHED));
    float *y_4 = forward_y(&t, B, T, x);
    TU_ASSERT_CLOSE("cached again", y_4, ref_4.y, n, RTOL);

    /* refresh under ON_THE_FLY: allowed, nothing to do */
    TU_OK(masa_layer_set_weight_policy(t.layer, MASA_WEIGHTS_ON_THE_FLY));
    TU_OK(masa_layer_refresh_weights(t.layer));
    float *y_5 = forward_y(&t, B, T, x);
    TU_ASSERT_CLOSE("on the fly after refresh", y_5, ref_4.y, n, RTOL);

    float *ys[] = {y_old, y_stale, y_fly, y_c2, y_s2, y_r, y_4, y_5};
    for (size_t i = 0; i < sizeof ys / sizeof ys[0]; i++)
        free(ys[i]);
    tu_ref_out_free(&ref_old);
    tu_ref_out_free(&ref_new);
    tu_ref_out_free(&ref_3);
    tu_ref_out_free(&ref_4);
    free(x);
    tu_layer_fini(&t);
    masa_context_destroy(ctx);
}
END_TEST

/* Projections set while the policy is CACHED follow it; a projection made
 * dense drops its cache, and made MASA again gets a fresh one. */
START_TEST(test_set_projection_follows_policy)
{
    const tu_spec s = {.d_model = 8, .n_heads = 2, .causal = 1,
                       .masa_mask = 0xF, .n_atoms = 2, .n_layers = 3,
                       .layer_index = 0, .wrap = 1};
    size_t B = 1, T = 4, n = B * T * s.d_model;
    masa_context *ctx = ctx_with(1);
    tu_layer t;
    tu_layer_init(&t, ctx, &s, 21);
    tu_rng rng = {3};
    float *x = tu_falloc(n);
    tu_fill(&rng, x, n, -1, 1);
    TU_OK(masa_layer_set_weight_policy(t.layer, MASA_WEIGHTS_CACHED));

    /* K made dense, then MASA with another table row, after the atoms
     * changed: the new cache reflects the parameters of that moment */
    float wk[64];
    tu_fill(&rng, wk, 64, -0.5f, 0.5f);
    TU_OK(masa_layer_set_dense(t.layer, MASA_PROJ_K, wk));
    perturb(&t, &rng);
    t.lidx[MASA_PROJ_K] = 2;
    TU_OK(masa_layer_set_masa(t.layer, MASA_PROJ_K, t.dict[MASA_PROJ_K],
                              t.coef[MASA_PROJ_K], 2));
    /* Q, V, O still hold the weights composed before perturb(): bring the
     * reference in line by refreshing, then K must already match */
    float *y_mixed = forward_y(&t, B, T, x);
    TU_OK(masa_layer_refresh_weights(t.layer));
    float *y = forward_y(&t, B, T, x);
    tu_ref_out ref;
    tu_reference(&t, B, T, 0, x, NULL, &ref);
    TU_ASSERT_CLOSE("after set_masa + refresh", y, ref.y, n, RTOL);
    ck_assert(max_abs_diff(y_mixed, y, n) > 1e-3);

    /* set_masa alone fills that projection's cache (here from another
     * table row) */
    TU_OK(masa_layer_set_masa(t.layer, MASA_PROJ_K, t.dict[MASA_PROJ_K],
                              t.coef[MASA_PROJ_K], 1));
    t.lidx[MASA_PROJ_K] = 1;
    float *y_k = forward_y(&t, B, T, x);
    tu_ref_out ref_k;
    tu_reference(&t, B, T, 0, x, NULL, &ref_k);
    TU_ASSERT_CLOSE("set_masa under CACHED", y_k, ref_k.y, n, RTOL);

    free(y_mixed);
    free(y);
    free(y_k);
    tu_ref_out_free(&ref);
    tu_ref_out_free(&ref_k);
    free(x);
    tu_layer_fini(&t);
    masa_context_destroy(ctx);
}
END_TEST

START_TEST(test_policy_errors)
{
    masa_context *ctx = ctx_with(1);
    const tu_spec s = {.d_model = 8, .n_heads = 2, .masa_mask = 0x3,
                       .n_atoms = 2, .n_layers = 1, .wrap = 1};
    tu_layer t;
    tu_layer_init(&t, ctx, &s, 2);
    masa_weight_policy pol;

    ck_assert_int_eq(masa_layer_set_weight_policy(NULL, MASA_WEIGHTS_CACHED),
                     MASA_ERROR_NULL_ARGUMENT);
    ck_assert_str_ne(masa_last_error(), "");
    ck_assert_int_eq(masa_layer_refresh_weights(NULL),
                     MASA_ERROR_NULL_ARGUMENT);
    ck_assert_int_eq(masa_layer_weight_policy(NULL, &pol),
                     MASA_ERROR_NULL_ARGUMENT);
    ck_assert_int_eq(masa_layer_weight_policy(t.layer, NULL),
                     MASA_ERROR_NULL_ARGUMENT);

    TU_OK(masa_layer_set_weight_policy(t.layer, MASA_WEIGHTS_CACHED));
    int bad[] = {2, -1, 1000};
    for (size_t i = 0; i < 3; i++) {
        ck_assert_int_eq(masa_layer_set_weight_policy(
                             t.layer, (masa_weight_policy)bad[i]),
                         MASA_ERROR_INVALID_ARGUMENT);
        ck_assert_ptr_nonnull(strstr(masa_last_error(), "policy"));
        TU_OK(masa_layer_weight_policy(t.layer, &pol));
        ck_assert_int_eq(pol, MASA_WEIGHTS_CACHED); /* unchanged */
    }
    /* a layer with no projections set accepts either policy */
    masa_layer *bare = NULL;
    masa_layer_options o;
    masa_layer_options_init(&o);
    o.d_model = 8;
    o.n_heads = 2;
    TU_OK(masa_layer_create(ctx, &o, &bare));
    TU_OK(masa_layer_set_weight_policy(bare, MASA_WEIGHTS_CACHED));
    TU_OK(masa_layer_refresh_weights(bare));
    masa_layer_destroy(bare);
    tu_layer_fini(&t);
    masa_context_destroy(ctx);
}
END_TEST

/* ---- allocation failure ---- */

static long allocs_left; /* < 0: no limit */
static long outstanding;
static void *counting_malloc(size_t n, void *u)
{
    (void)u;
    if (allocs_left == 0)
        return NULL;
    if (allocs_left > 0)
        allocs_left--;
    void *p = malloc(n);
    if (p)
        outstanding++;
    return p;
}
static void counting_free(void *p, void *u)
{
    (void)u;
    if (p)
        outstanding--;
    free(p);
}

START_TEST(test_alloc_failure)
{
    allocs_left = -1;
    outstanding = 0;
    masa_context_options co;
    masa_context_options_init(&co);
    co.n_threads = 1;
    co.malloc_fn = counting_malloc;
    co.free_fn = counting_free;
    masa_context *ctx = NULL;
    TU_OK(masa_context_create(&co, &ctx));
    const tu_spec s = {.d_model = 8, .n_heads = 2, .causal = 1,
                       .masa_mask = 0xB, .n_atoms = 2, .n_layers = 2,
                       .layer_index = 1, .wrap = 1};
    size_t B = 1, T = 3, n = B * T * s.d_model;
    tu_layer t;
    tu_layer_init(&t, ctx, &s, 8);
    tu_rng rng = {4};
    float *x = tu_falloc(n);
    tu_fill(&rng, x, n, -1, 1);
    float *y0 = forward_y(&t, B, T, x);
    masa_weight_policy pol;

    /* three MASA projections: fail the first, second and third cache */
    for (long k = 0; k < 3; k++) {
        long before = outstanding;
        allocs_left = k;
        ck_assert_int_eq(masa_layer_set_weight_policy(t.layer,
                                                      MASA_WEIGHTS_CACHED),
                         MASA_ERROR_OUT_OF_MEMORY);
        allocs_left = -1;
        ck_assert_str_ne(masa_last_error(), "");
        ck_assert_int_eq(outstanding, before); /* partial caches freed */
        TU_OK(masa_layer_weight_policy(t.layer, &pol));
        ck_assert_int_eq(pol, MASA_WEIGHTS_ON_THE_FLY);
        /* still composing on the fly from the current atoms */
        perturb(&t, &rng);
        float *y = forward_y(&t, B, T, x);
        tu_ref_out ref;
        tu_reference(&t, B, T, 0, x, NULL, &ref);
        TU_ASSERT_CLOSE("after a failed set_weight_policy", y, ref.y, n, RTOL);
        free(y);
        tu_ref_out_free(&ref);
    }
    TU_OK(masa_layer_set_weight_policy(t.layer, MASA_WEIGHTS_CACHED));
    ck_assert_int_eq(outstanding > 0, 1);

    /* set_masa on the dense projection under CACHED: the cache allocation
     * fails, the projection stays dense with its weight */
    float *w = masa_layer_weight(t.layer, MASA_PROJ_V);
    ck_assert_ptr_nonnull(w);
    float *y_before = forward_y(&t, B, T, x);
    allocs_left = 0;
    ck_assert_int_eq(masa_layer_set_masa(t.layer, MASA_PROJ_V,
                                         t.dict[MASA_PROJ_Q],
                                         t.coef[MASA_PROJ_Q], 0),
                     MASA_ERROR_OUT_OF_MEMORY);
    allocs_left = -1;
    ck_assert_ptr_eq(masa_layer_weight(t.layer, MASA_PROJ_V), w);
    float *y_after = forward_y(&t, B, T, x);
    ck_assert(memcmp(y_before, y_after, n * sizeof(float)) == 0);

    /* ON_THE_FLY frees every cache: back to the allocations of before */
    long cached = outstanding;
    TU_OK(masa_layer_set_weight_policy(t.layer, MASA_WEIGHTS_ON_THE_FLY));
    ck_assert_int_eq(outstanding, cached - 3);

    free(y0);
    free(y_before);
    free(y_after);
    free(x);
    TU_OK(masa_layer_set_weight_policy(t.layer, MASA_WEIGHTS_CACHED));
    tu_layer_fini(&t); /* destroying a cached layer frees its caches */
    masa_context_destroy(ctx);
    ck_assert_int_eq(outstanding, 0);
}
END_TEST

/* ---- decoding reads the cache ---- */

START_TEST(test_decode_cached)
{
    /* S = 8 so that a single row would run factored without the cache */
    const tu_spec s = {.d_model = 64, .n_heads = 4, .n_kv_heads = 2,
                       .causal = 1, .rope = 1, .masa_mask = 0xF,
                       .bias_mask = 0x5, .n_atoms = 8, .n_layers = 3,
                       .layer_index = 2, .wrap = 0};
    size_t B = 1, T = 7, n = B * T * s.d_model, d = s.d_model;
    masa_context *ctx = ctx_with((size_t)_i + 1);
    tu_layer t;
    tu_layer_init(&t, ctx, &s, 31);
    tu_rng rng = {12};
    float *x = tu_falloc(n);
    tu_fill(&rng, x, n, -1, 1);
    TU_OK(masa_layer_set_weight_policy(t.layer, MASA_WEIGHTS_CACHED));
    /* stale on purpose: decode must read the cache exactly as forward does */
    perturb(&t, &rng);
    float *y_fwd = forward_y(&t, B, T, x);

    size_t mem_bytes, wsb;
    TU_OK(masa_kv_cache_size(t.layer, B, T, &mem_bytes));
    void *mem = tu_garbage(mem_bytes);
    masa_kv_cache *cache = NULL;
    TU_OK(masa_kv_cache_create(t.layer, B, T, mem, mem_bytes, &cache));
    TU_OK(masa_layer_decode_workspace_size(t.layer, B, 3, &wsb));
    void *ws = tu_garbage(wsb);
    float *y_dec = tu_falloc(n);
    size_t chunks[] = {3, 1, 1, 2}, at = 0;
    for (size_t i = 0; i < 4; i++) {
        TU_OK(masa_layer_decode(t.layer, cache, B, chunks[i], x + at * d,
                                y_dec + at * d, ws, wsb));
        at += chunks[i];
    }
    TU_ASSERT_CLOSE_FF("decode vs forward (cached)", y_dec, y_fwd, n, RTOL);

    /* after a refresh both match the reference of the current parameters */
    TU_OK(masa_layer_refresh_weights(t.layer));
    TU_OK(masa_kv_cache_reset(cache));
    at = 0;
    for (size_t i = 0; i < 4; i++) {
        TU_OK(masa_layer_decode(t.layer, cache, B, chunks[i], x + at * d,
                                y_dec + at * d, ws, wsb));
        at += chunks[i];
    }
    tu_ref_out ref;
    tu_reference(&t, B, T, 0, x, NULL, &ref);
    TU_ASSERT_CLOSE("decode after refresh", y_dec, ref.y, n, RTOL);
    ck_assert(max_abs_diff(y_dec, y_fwd, n) > 1e-3);

    tu_ref_out_free(&ref);
    masa_kv_cache_destroy(cache);
    free(mem);
    free(ws);
    free(y_dec);
    free(y_fwd);
    free(x);
    tu_layer_fini(&t);
    masa_context_destroy(ctx);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("policy");
    TCase *tc = tcase_create("policy");
    tcase_set_timeout(tc, 60);
    tcase_add_loop_test(tc, test_policies_match_reference, 0, (int)N_CASES);
    tcase_add_test(tc, test_stale_until_refresh);
    tcase_add_test(tc, test_set_projection_follows_policy);
    tcase_add_test(tc, test_policy_errors);
    tcase_add_test(tc, test_alloc_failure);
    tcase_add_loop_test(tc, test_decode_cached, 0, 2);
    suite_add_tcase(s, tc);
    return tu_run_suite(s);
}
