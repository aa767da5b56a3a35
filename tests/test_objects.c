/*
 * Object behaviour outside forward/backward: option defaults, destroy(NULL),
 * owned vs wrapped storage, seeded initialisers, projection bookkeeping
 * (replace, remove bias), BLIS kernel reporting and the environment rule.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "test_util.h"

START_TEST(test_option_defaults)
{
    masa_context_options co;
    memset(&co, 0xAB, sizeof co);
    masa_context_options_init(&co);
    ck_assert_uint_eq(co.size, sizeof co);
    ck_assert_uint_eq(co.n_threads, 0);
    ck_assert(co.malloc_fn == NULL && co.free_fn == NULL);

    masa_layer_options lo;
    memset(&lo, 0xAB, sizeof lo);
    masa_layer_options_init(&lo);
    ck_assert_uint_eq(lo.size, sizeof lo);
    ck_assert(lo.rope_theta == 10000.0f); /* documented default */
    ck_assert(lo.softmax_scale == 0.0f);
    ck_assert_int_eq(lo.causal, 0);
    ck_assert_int_eq(lo.rope, 0);
    ck_assert_uint_eq(lo.n_kv_heads, 0);
    ck_assert_uint_eq(lo.head_dim, 0);

    masa_layer_grads g;
    memset(&g, 0xAB, sizeof g);
    masa_layer_grads_init(&g);
    ck_assert_uint_eq(g.size, sizeof g);
    ck_assert_int_eq(g.mode, MASA_GRAD_ADD);
    for (int p = 0; p < MASA_NUM_PROJECTIONS; p++)
        ck_assert(!g.d_atoms[p] && !g.d_coefficients[p] && !g.d_weight[p] && !g.d_bias[p]);
}
END_TEST

START_TEST(test_destroy_null)
{
    masa_layer_destroy(NULL);
    masa_dictionary_destroy(NULL);
    masa_coefficients_destroy(NULL);
    masa_context_destroy(NULL);
}
END_TEST

START_TEST(test_blis_and_environment)
{
    const char *before = getenv("BLIS_ARCH_TYPE");
    char saved[64] = "";
    if (before)
        snprintf(saved, sizeof saved, "%s", before);
    masa_context *ctx = NULL;
    TU_OK(masa_context_create(NULL, &ctx));
    ck_assert_uint_ge(masa_context_threads(ctx), 1);
    const char *arch = masa_blis_arch();
    ck_assert_ptr_nonnull(arch);
    ck_assert_msg(arch[0] != '\0', "empty BLIS arch name");
    /* libmasa may set BLIS_ARCH_TYPE while BLIS initialises, then must
     * restore the environment as it was. */
    const char *after = getenv("BLIS_ARCH_TYPE");
    if (before)
        ck_assert_str_eq(after ? after : "(unset)", saved);
    else
        ck_assert_msg(after == NULL, "BLIS_ARCH_TYPE left set to '%s'", after);
    masa_context_destroy(ctx);
}
END_TEST

START_TEST(test_dictionary_storage)
{
    masa_context *ctx = NULL;
    TU_OK(masa_context_create(NULL, &ctx));
    masa_dictionary *d, *w;
    size_t S = 0, R = 0, C = 0;
    TU_OK(masa_dictionary_create(ctx, 3, 16, 5, &d));
    TU_OK(masa_dictionary_shape(d, &S, &R, &C));
    ck_assert(S == 3 && R == 16 && C == 5);
    TU_OK(masa_dictionary_shape(d, NULL, NULL, &C)); /* outputs optional */
    float *a = masa_dictionary_data(d);
    ck_assert_ptr_nonnull(a);
    for (size_t i = 0; i < 240; i++)
        ck_assert(a[i] == 0.0f); /* zero-initialised */

    /* bound 0 = 1/sqrt(rows) = 0.25; seeded, so reproducible. */
    TU_OK(masa_dictionary_init_uniform(d, 0.0f, 42));
    float copy[240];
    memcpy(copy, a, sizeof copy);
    double maxabs = 0, mean = 0;
    for (size_t i = 0; i < 240; i++) {
        maxabs = fmax(maxabs, fabs(a[i]));
        mean += a[i] / 240.0;
    }
    ck_assert_msg(maxabs <= 0.25 && maxabs > 0.2, "max |atom| %g for bound 1/4", maxabs);
    ck_assert_msg(fabs(mean) < 0.05, "mean %g of U(-1/4, 1/4)", mean);
    TU_OK(masa_dictionary_init_uniform(d, 0.0f, 42));
    ck_assert(memcmp(copy, a, sizeof copy) == 0);
    TU_OK(masa_dictionary_init_uniform(d, 0.0f, 43));
    ck_assert(memcmp(copy, a, sizeof copy) != 0);
    TU_OK(masa_dictionary_init_uniform(d, 2.0f, 1));
    maxabs = 0;
    for (size_t i = 0; i < 240; i++)
        maxabs = fmax(maxabs, fabs(a[i]));
    ck_assert(maxabs <= 2.0 && maxabs > 1.5);

    /* Wrapped storage is the caller's memory, written only by init_*. */
    float mine[2 * 3 * 4];
    for (int i = 0; i < 24; i++)
        mine[i] = (float)i;
    TU_OK(masa_dictionary_wrap(ctx, 2, 3, 4, mine, &w));
    ck_assert_ptr_eq(masa_dictionary_data(w), mine);
    ck_assert(mine[23] == 23.0f);
    TU_OK(masa_dictionary_init_uniform(w, 0.5f, 42));
    ck_assert(mine[23] != 23.0f && fabsf(mine[23]) <= 0.5f);
    masa_dictionary_destroy(w);
    masa_dictionary_destroy(d);
    masa_context_destroy(ctx);
}
END_TEST

START_TEST(test_coefficient_storage)
{
    masa_context *ctx = NULL;
    TU_OK(masa_context_create(NULL, &ctx));
    masa_coefficients *c;
    size_t L = 0, S = 0;
    TU_OK(masa_coefficients_create(ctx, 5, 2, &c));
    TU_OK(masa_coefficients_shape(c, &L, &S));
    ck_assert(L == 5 && S == 2);
    TU_OK(masa_coefficients_shape(c, NULL, NULL));
    float *d = masa_coefficients_data(c);
    for (int i = 0; i < 10; i++)
        ck_assert(d[i] == 0.0f);
    TU_OK(masa_coefficients_init_cyclic(c));
    TU_OK(masa_coefficients_add_uniform(c, 0.1f, 9));
    float first[10];
    memcpy(first, d, sizeof first);
    for (int l = 0; l < 5; l++)
        for (int s = 0; s < 2; s++) {
            float base = (s == l % 2) ? 1.0f : 0.0f;
            ck_assert(fabsf(d[l * 2 + s] - base) <= 0.1f);
        }
    TU_OK(masa_coefficients_init_cyclic(c)); /* re-init overwrites */
    TU_OK(masa_coefficients_add_uniform(c, 0.1f, 9));
    ck_assert(memcmp(first, d, sizeof first) == 0);
    TU_OK(masa_coefficients_add_uniform(c, 0.0f, 9)); /* bound 0: no change */
    ck_assert(memcmp(first, d, sizeof first) == 0);
    masa_coefficients_destroy(c);

    float mine[6] = {1, 2, 3, 4, 5, 6};
    TU_OK(masa_coefficients_wrap(ctx, 3, 2, mine, &c));
    ck_assert_ptr_eq(masa_coefficients_data(c), mine);
    masa_coefficients_destroy(c);
    ck_assert(mine[5] == 6.0f); /* destroying a wrapper leaves the data */
    masa_context_destroy(ctx);
}
END_TEST

/* Replacing a projection's kind and removing a bias. */
START_TEST(test_projection_bookkeeping)
{
    tu_spec s = {.d_model = 8, .n_heads = 4, .n_kv_heads = 2, .masa_mask = 0x1,
                 .bias_mask = 0xF, .n_atoms = 2, .n_layers = 2, .wrap = 0};
    masa_context *ctx = NULL;
    TU_OK(masa_context_create(NULL, &ctx));
    tu_layer t;
    tu_layer_init(&t, ctx, &s, 12);
    size_t din, dout;
    TU_OK(masa_layer_projection_shape(t.layer, MASA_PROJ_K, &din, &dout));
    ck_assert(din == 8 && dout == 4);
    TU_OK(masa_layer_projection_shape(t.layer, MASA_PROJ_O, &din, &dout));
    ck_assert(din == 8 && dout == 8);

    size_t B = 1, T = 4, n = B * T * 8;
    tu_rng rng = {13};
    float *x = tu_falloc(n), *y = tu_falloc(n);
    tu_fill(&rng, x, n, -1, 1);
    size_t wsb = tu_workspace_bytes(&t, B, T);
    void *ws = tu_garbage(wsb);

    /* Remove two biases (and once more: a no-op). */
    TU_OK(masa_layer_remove_bias(t.layer, MASA_PROJ_K));
    TU_OK(masa_layer_remove_bias(t.layer, MASA_PROJ_O));
    TU_OK(masa_layer_remove_bias(t.layer, MASA_PROJ_O));
    ck_assert_ptr_null(masa_layer_bias(t.layer, MASA_PROJ_K));
    t.spec.bias_mask = 0x5;
    tu_ref_out ref;
    tu_reference(&t, B, T, 0, x, NULL, &ref);
    TU_OK(masa_layer_forward(t.layer, B, T, 0, x, y, ws, wsb, NULL, 0));
    TU_ASSERT_CLOSE("y after remove_bias", y, ref.y, n, 1e-4);
    tu_ref_out_free(&ref);

    /* Q: MASA -> dense (owned, zero) -> MASA again. */
    TU_OK(masa_layer_set_dense(t.layer, MASA_PROJ_Q, NULL));
    float *wq = masa_layer_weight(t.layer, MASA_PROJ_Q);
    ck_assert_ptr_nonnull(wq);
    tu_fill(&rng, wq, 64, -0.5f, 0.5f);
    t.spec.masa_mask = 0;
    tu_reference(&t, B, T, 0, x, NULL, &ref);
    wsb = tu_workspace_bytes(&t, B, T);
    free(ws);
    ws = tu_garbage(wsb);
    TU_OK(masa_layer_forward(t.layer, B, T, 0, x, y, ws, wsb, NULL, 0));
    TU_ASSERT_CLOSE("y with Q made dense", y, ref.y, n, 1e-4);
    tu_ref_out_free(&ref);

    TU_OK(masa_layer_set_masa(t.layer, MASA_PROJ_Q, t.dict[0], t.coef[0], 1));
    ck_assert_ptr_null(masa_layer_weight(t.layer, MASA_PROJ_Q));
    t.spec.masa_mask = 0x1;
    t.lidx[0] = 1;
    tu_reference(&t, B, T, 0, x, NULL, &ref);
    wsb = tu_workspace_bytes(&t, B, T);
    free(ws);
    ws = tu_garbage(wsb);
    TU_OK(masa_layer_forward(t.layer, B, T, 0, x, y, ws, wsb, NULL, 0));
    TU_ASSERT_CLOSE("y with Q MASA again (row 1)", y, ref.y, n, 1e-4);
    tu_ref_out_free(&ref);

    free(ws);
    free(x);
    free(y);
    tu_layer_fini(&t);
    masa_context_destroy(ctx);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("objects");
    TCase *tc = tcase_create("objects");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_option_defaults);
    tcase_add_test(tc, test_destroy_null);
    tcase_add_test(tc, test_blis_and_environment);
    tcase_add_test(tc, test_dictionary_storage);
    tcase_add_test(tc, test_coefficient_storage);
    tcase_add_test(tc, test_projection_bookkeeping);
    suite_add_tcase(s, tc);
    return tu_run_suite(s);
}
