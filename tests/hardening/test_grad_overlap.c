/*
 * masa_layer_backward() must refuse gradient buffers that overlap its inputs
 * (masa.h: "Gradient buffers must not overlap each other, dx or the inputs").
 * Before the check covered x, dy and the reserve, such a buffer was accepted
 * and overwritten while still being read: silently wrong results, and with
 * the reserve a destroyed stamp.
 */
#include <check.h>
#include <stdlib.h>
#include <string.h>

#include <masa/masa.h>

enum { D = 4, B = 1, T = 4, N = B * T * D };

typedef struct fx {
    masa_context *ctx;
    masa_layer *layer;
    float x[N], y[N], dy[N], dx[N];
    void *ws, *rs;
    size_t ws_bytes, rs_bytes;
} fx;

static void fx_init(fx *f)
{
    memset(f, 0, sizeof *f);
    ck_assert_int_eq(masa_context_create(NULL, &f->ctx), MASA_OK);
    masa_layer_options o;
    masa_layer_options_init(&o);
    o.d_model = D;
    o.n_heads = 1;
    ck_assert_int_eq(masa_layer_create(f->ctx, &o, &f->layer), MASA_OK);
    for (int p = 0; p < 4; p++) {
        ck_assert_int_eq(masa_layer_set_dense(f->layer, p, NULL), MASA_OK);
        float *w = masa_layer_weight(f->layer, p);
        for (int i = 0; i < D * D; i++)
            w[i] = 0.1f * (float)(i % 5) - 0.2f;
    }
    for (int i = 0; i < N; i++) {
        f->x[i] = 0.1f * (float)i;
        f->dy[i] = 0.05f * (float)i;
    }
    ck_assert_int_eq(masa_layer_workspace_size(f->layer, B, T, &f->ws_bytes),
                     MASA_OK);
    ck_assert_int_eq(masa_layer_reserve_size(f->layer, B, T, &f->rs_bytes),
                     MASA_OK);
    f->ws = malloc(f->ws_bytes);
    f->rs = malloc(f->rs_bytes);
    ck_assert(f->ws && f->rs);
    ck_assert_int_eq(masa_layer_forward(f->layer, B, T, 0, f->x, f->y, f->ws,
                                        f->ws_bytes, f->rs, f->rs_bytes),
                     MASA_OK);
}

static void fx_free(fx *f)
{
    free(f->ws);
    free(f->rs);
    masa_layer_destroy(f->layer);
    masa_context_destroy(f->ctx);
}

/* backward with d_weight[Q] (D x D = 16 floats, fits in each buffer) at
 * `where`; must be refused. */
static masa_status backward_with_grad_at(fx *f, float *where)
{
    masa_layer_grads g;
    masa_layer_grads_init(&g);
    g.d_weight[MASA_PROJ_Q] = where;
    return masa_layer_backward(f->layer, B, T, 0, f->x, f->dy, f->dx, &g,
                               f->ws, f->ws_bytes, f->rs, f->rs_bytes);
}

START_TEST(gradient_overlapping_x_is_refused)
{
    fx f;
    fx_init(&f);
    masa_status st = backward_with_grad_at(&f, f.x);
    fx_free(&f);
    ck_assert_msg(st == MASA_ERROR_INVALID_ARGUMENT,
                  "d_weight[Q] == x accepted (status %d)", (int)st);
}
END_TEST

START_TEST(gradient_overlapping_dy_is_refused)
{
    fx f;
    fx_init(&f);
    masa_status st = backward_with_grad_at(&f, f.dy);
    fx_free(&f);
    ck_assert_msg(st == MASA_ERROR_INVALID_ARGUMENT,
                  "d_weight[Q] == dy accepted (status %d)", (int)st);
}
END_TEST

START_TEST(gradient_overlapping_reserve_is_refused)
{
    fx f;
    fx_init(&f);
    masa_status st = backward_with_grad_at(&f, (float *)f.rs + 32);
    fx_free(&f);
    ck_assert_msg(st == MASA_ERROR_INVALID_ARGUMENT,
                  "d_weight[Q] inside the reserve accepted (status %d)",
                  (int)st);
}
END_TEST

int main(void)
{
    Suite *suite = suite_create("grad_overlap");
    TCase *tc = tcase_create("overlaps");
    tcase_add_test(tc, gradient_overlapping_x_is_refused);
    tcase_add_test(tc, gradient_overlapping_dy_is_refused);
    tcase_add_test(tc, gradient_overlapping_reserve_is_refused);
    suite_add_tcase(suite, tc);
    SRunner *sr = srunner_create(suite);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
