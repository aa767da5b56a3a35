/* Allocation failures: through the context's allocator hook, fail the k-th
 * allocation for every k reachable in a full create / forward / backward /
 * destroy scenario. Each failing call must return MASA_ERROR_OUT_OF_MEMORY
 * with a message, leave its objects usable (the same call succeeds when
 * retried) and, at the end, nothing may leak and the results must equal those
 * of a run without failures. */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <masa/masa.h>

typedef struct alloc_state {
    long count;   /* allocations so far */
    long fail_at; /* index of the allocation to fail, -1 = none */
    long live;    /* allocated and not freed */
    int failures; /* failures injected */
} alloc_state;

static void *hook_malloc(size_t size, void *user)
{
    alloc_state *s = user;
    if (s->count++ == s->fail_at) {
        s->failures++;
        return NULL;
    }
    void *p = malloc(size);
    if (p)
        s->live++;
    return p;
}

static void hook_free(void *p, void *user)
{
    alloc_state *s = user;
    if (p)
        s->live--;
    free(p);
}

/* Runs call; on OOM checks the message, disables injection and retries. */
#define STEP(state, call)                                                    \
    do {                                                                     \
        masa_status st_ = (call);                                            \
        if (st_ == MASA_ERROR_OUT_OF_MEMORY) {                               \
            ck_assert_str_ne(masa_last_error(), "");                         \
            (state)->fail_at = -1;                                           \
            st_ = (call);                                                    \
        }                                                                    \
        ck_assert_msg(st_ == MASA_OK, "%s: %s", #call, masa_last_error());   \
    } while (0)

enum { B = 2, T = 5, D = 8, H = 2, S = 2, L = 3 };

/* The whole scenario; writes y and the Q atom gradient for comparison.
 * Returns the number of allocations made. */
static long scenario(alloc_state *s, float *y_out, float *d_atoms_out)
{
    masa_context_options co;
    masa_context_options_init(&co);
    co.n_threads = 2;
    co.malloc_fn = hook_malloc;
    co.free_fn = hook_free;
    co.alloc_user = s;
    masa_context *ctx = NULL;
    /* A failed create leaves nothing to destroy; retry it. */
    STEP(s, masa_context_create(&co, &ctx));

    masa_layer_options lo;
    masa_layer_options_init(&lo);
    lo.d_model = D;
    lo.n_heads = H;
    lo.causal = 1;
    lo.rope = 1;
    masa_layer *layer = NULL;
    STEP(s, masa_layer_create(ctx, &lo, &layer));
    masa_dictionary *dict = NULL;
    masa_coefficients *coef = NULL;
    STEP(s, masa_dictionary_create(ctx, S, D, D, &dict));
    STEP(s, masa_coefficients_create(ctx, L, S, &coef));
    ck_assert_int_eq(masa_dictionary_init_uniform(dict, 0.0f, 7), MASA_OK);
    ck_assert_int_eq(masa_coefficients_init_cyclic(coef), MASA_OK);
    ck_assert_int_eq(masa_coefficients_add_uniform(coef, 0.2f, 8), MASA_OK);
    STEP(s, masa_layer_set_masa(layer, MASA_PROJ_Q, dict, coef, 1));
    for (int p = MASA_PROJ_K; p <= MASA_PROJ_O; p++) {
        STEP(s, masa_layer_set_dense(layer, p, NULL));
        float *w = masa_layer_weight(layer, p);
        for (int i = 0; i < D * D; i++)
            w[i] = 0.1f * sinf((float)(i + 13 * p));
    }
    STEP(s, masa_layer_set_bias(layer, MASA_PROJ_V, NULL));
    masa_layer_bias(layer, MASA_PROJ_V)[1] = 0.5f;
    /* low-rank terms the layer owns, on a MASA and a dense projection,
     * composed into Q's cached weight */
    STEP(s, masa_layer_set_lowrank(layer, MASA_PROJ_Q, 2, NULL, NULL));
    STEP(s, masa_layer_set_lowrank(layer, MASA_PROJ_K, 3, NULL, NULL));
    for (int p = MASA_PROJ_Q; p <= MASA_PROJ_K; p++) {
        size_t r;
        float *a, *b;
        ck_assert_int_eq(masa_layer_lowrank(layer, p, &r, &a, &b), MASA_OK);
        for (size_t i = 0; i < D * r; i++) {
            a[i] = 0.2f * sinf((float)(i + 7 * p));
            b[i] = 0.2f * cosf((float)(i + 5 * p));
        }
    }
    STEP(s, masa_layer_set_weight_policy(layer, MASA_WEIGHTS_CACHED));

    size_t ws, rs;
    ck_assert_int_eq(masa_layer_workspace_size(layer, B, T, &ws), MASA_OK);
    ck_assert_int_eq(masa_layer_reserve_size(layer, B, T, &rs), MASA_OK);
    float *x = calloc(B * T * D, sizeof(float));
    float *dx = calloc(B * T * D, sizeof(float));
    void *work = malloc(ws), *reserve = malloc(rs);
    for (int i = 0; i < B * T * D; i++)
        x[i] = cosf(0.3f * (float)i);
    STEP(s, masa_layer_forward(layer, B, T, 0, x, y_out, work, ws, reserve,
                               rs));
    masa_layer_grads g;
    masa_layer_grads_init(&g);
    g.mode = MASA_GRAD_SET;
    g.d_atoms[MASA_PROJ_Q] = d_atoms_out;
    STEP(s, masa_layer_backward(layer, B, T, 0, x, y_out, dx, &g, work, ws,
                                reserve, rs));
    free(x);
    free(dx);
    free(work);
    free(reserve);
    masa_layer_destroy(layer);
    masa_dictionary_destroy(dict);
    masa_coefficients_destroy(coef);
    masa_context_destroy(ctx);
    return s->count;
}

START_TEST(fail_every_allocation)
{
    float y_ref[B * T * D], g_ref[S * D * D];
    alloc_state clean = {0, -1, 0, 0};
    long total = scenario(&clean, y_ref, g_ref);
    ck_assert_int_eq(clean.live, 0);
    ck_assert_int_gt(total, 5);

    for (long k = 0; k < total; k++) {
        float y[B * T * D], g[S * D * D];
        alloc_state s = {0, k, 0, 0};
        scenario(&s, y, g);
        ck_assert_msg(s.failures == 1, "allocation %ld was not reached", k);
        ck_assert_msg(s.live == 0, "failing allocation %ld leaked %ld blocks",
                      k, s.live);
        ck_assert_mem_eq(y, y_ref, sizeof y);
        ck_assert_mem_eq(g, g_ref, sizeof g);
    }
    fprintf(stderr, "alloc-failure: %ld allocation points failed one by one\n",
            total);
}
END_TEST

/* ReplaceMe (masa/replaceme.h): estimators, solve, cosine steps and fit,
 * merge; writes T of both estimators and the merged weight. */
enum { RM_ROWS = 40, RM_D = 6, RM_FF = 9 };
static long replaceme_scenario(alloc_state *s, float *t_ls, float *t_cos,
                               float *w)
{
    masa_context_options co;
    masa_context_options_init(&co);
    co.n_threads = 2;
    co.malloc_fn = hook_malloc;
    co.free_fn = hook_free;
    co.alloc_user = s;
    masa_context *ctx = NULL;
    STEP(s, masa_context_create(&co, &ctx));
    float x[RM_ROWS * RM_D], l[RM_ROWS * RM_D], y[RM_ROWS * RM_D];
    for (int i = 0; i < RM_ROWS * RM_D; i++) {
        x[i] = sinf(0.37f * (float)i);
        l[i] = cosf(0.11f * (float)i);
        y[i] = 0.3f * sinf(0.05f * (float)i + 1.0f);
    }
    masa_linear_estimator *est = NULL, *other = NULL;
    STEP(s, masa_linear_estimator_create(ctx, RM_D, RM_D, &est));
    STEP(s, masa_linear_estimator_create(ctx, RM_D, RM_D, &other));
    STEP(s, masa_linear_estimator_accumulate(est, RM_ROWS / 2, x, l, y));
    STEP(s, masa_linear_estimator_accumulate(
                other, RM_ROWS / 2, x + RM_ROWS / 2 * RM_D,
                l + RM_ROWS / 2 * RM_D, y + RM_ROWS / 2 * RM_D));
    STEP(s, masa_linear_estimator_merge(est, other));
    STEP(s, masa_linear_estimator_solve(est, 0.01, t_ls));
    masa_cosine_options o;
    masa_cosine_options_init(&o);
    o.epochs = 2;
    o.batch_rows = 16;
    o.learning_rate = 1e-2f;
    masa_cosine_estimator *cos_est = NULL;
    STEP(s, masa_cosine_estimator_create(ctx, RM_D, RM_D, &o, &cos_est));
    double loss;
    STEP(s, masa_cosine_estimator_loss(cos_est, RM_ROWS, x, l, y, &loss));
    STEP(s, masa_cosine_estimator_step(cos_est, RM_ROWS, x, l, y, NULL));
    STEP(s, masa_cosine_estimator_fit(cos_est, RM_ROWS, x, l, y, NULL));
    ck_assert_int_eq(masa_cosine_estimator_transform(cos_est, t_cos), MASA_OK);
    for (int i = 0; i < RM_FF * RM_D; i++)
        w[i] = sinf((float)i);
    STEP(s, masa_merge_linear_map(ctx, MASA_MERGE_NN_LINEAR, RM_FF, RM_D, w,
                                  NULL, t_ls));
    masa_cosine_estimator_destroy(cos_est);
    masa_linear_estimator_destroy(other);
    masa_linear_estimator_destroy(est);
    masa_context_destroy(ctx);
    return s->count;
}

START_TEST(replaceme_fail_every_allocation)
{
    float t_ref[RM_D * RM_D], c_ref[RM_D * RM_D], w_ref[RM_FF * RM_D];
    alloc_state clean = {0, -1, 0, 0};
    long total = replaceme_scenario(&clean, t_ref, c_ref, w_ref);
    ck_assert_int_eq(clean.live, 0);
    ck_assert_int_gt(total, 5);
    for (long k = 0; k < total; k++) {
        float t[RM_D * RM_D], c[RM_D * RM_D], w[RM_FF * RM_D];
        alloc_state s = {0, k, 0, 0};
        replaceme_scenario(&s, t, c, w);
        ck_assert_msg(s.failures == 1, "allocation %ld was not reached", k);
        ck_assert_msg(s.live == 0, "failing allocation %ld leaked %ld blocks",
                      k, s.live);
        ck_assert_mem_eq(t, t_ref, sizeof t);
        ck_assert_mem_eq(c, c_ref, sizeof c);
        ck_assert_mem_eq(w, w_ref, sizeof w);
    }
    fprintf(stderr, "alloc-failure: replaceme: %ld allocation points\n",
            total);
}
END_TEST

START_TEST(allocator_hooks_must_come_in_pairs)
{
    masa_context_options co;
    masa_context_options_init(&co);
    co.malloc_fn = hook_malloc;
    masa_context *ctx = (masa_context *)&co;
    ck_assert_int_eq(masa_context_create(&co, &ctx),
                     MASA_ERROR_INVALID_ARGUMENT);
    ck_assert_ptr_null(ctx);
    ck_assert_str_ne(masa_last_error(), "");
}
END_TEST

int main(void)
{
    Suite *suite = suite_create("alloc_failure");
    TCase *tc = tcase_create("alloc_failure");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, fail_every_allocation);
    tcase_add_test(tc, replaceme_fail_every_allocation);
    tcase_add_test(tc, allocator_hooks_must_come_in_pairs);
    suite_add_tcase(suite, tc);
    SRunner *sr = srunner_create(suite);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
