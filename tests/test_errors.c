/*
 * Error paths: each failing call returns the documented status, leaves a
 * non-empty masa_last_error(), and leaves what the caller passed unchanged
 * (outputs, layer state). Also status strings and version numbers.
 *
 * Where masa.h does not pin one status down, EXPECT2 accepts the two
 * readings (noted at each use).
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "test_util.h"

static void expect_(const char *file, int line, const char *call,
                    masa_status got, masa_status a, masa_status b)
{
    const char *msg = masa_last_error();
    ck_assert_msg(got == a || got == b,
                  "%s:%d %s -> %d (%s), expected %d (%s); message '%s'", file,
                  line, call, (int)got, masa_status_string(got), (int)a,
                  masa_status_string(a), msg ? msg : "(NULL)");
    ck_assert_msg(msg != NULL && msg[0] != '\0',
                  "%s:%d %s: masa_last_error() is empty after a failure", file,
                  line, call);
}
#define EXPECT(call, st) expect_(__FILE__, __LINE__, #call, (call), (st), (st))
#define EXPECT2(call, a, b) expect_(__FILE__, __LINE__, #call, (call), (a), (b))

static masa_context *new_ctx(void)
{
    masa_context *ctx = NULL;
    TU_OK(masa_context_create(NULL, &ctx));
    return ctx;
}

/* ---- Version and status strings ---- */

START_TEST(test_version)
{
    char buf[32];
    ck_assert_uint_eq(masa_version_number(), MASA_VERSION_NUMBER);
    ck_assert_uint_eq(MASA_VERSION_NUMBER, MASA_VERSION_MAJOR * 10000 +
                                               MASA_VERSION_MINOR * 100 +
                                               MASA_VERSION_PATCH);
    ck_assert_ptr_nonnull(masa_version_string());
    ck_assert_str_eq(masa_version_string(), MASA_VERSION_STRING);
    snprintf(buf, sizeof buf, "%d.%d.%d", MASA_VERSION_MAJOR, MASA_VERSION_MINOR,
             MASA_VERSION_PATCH);
    ck_assert_str_eq(MASA_VERSION_STRING, buf);
}
END_TEST

START_TEST(test_status_strings)
{
    const char *seen[MASA_ERROR_NOT_FOUND + 1];
    for (int s = MASA_OK; s <= MASA_ERROR_NOT_FOUND; s++) {
        const char *str = masa_status_string((masa_status)s);
        ck_assert_msg(str && str[0], "status %d: empty string", s);
        ck_assert_msg(strcmp(str, "unknown status") != 0, "status %d is unknown", s);
        for (int k = 0; k < s; k++)
            ck_assert_msg(strcmp(seen[k], str) != 0, "statuses %d and %d share '%s'",
                          k, s, str);
        seen[s] = str;
    }
    ck_assert_str_eq(masa_status_string((masa_status)(MASA_ERROR_NOT_FOUND + 1)), "unknown status");
    ck_assert_str_eq(masa_status_string((masa_status)999), "unknown status");
    ck_assert_str_eq(masa_status_string((masa_status)-1), "unknown status");
}
END_TEST

/* ---- Context ---- */

static void *my_malloc(size_t n, void *u) { (void)u; return malloc(n); }
static void my_free(void *p, void *u) { (void)u; free(p); }

START_TEST(test_context_errors)
{
    masa_context *ctx = (masa_context *)&ctx; /* non-NULL junk */
    masa_context_options o;
    EXPECT(masa_context_create(NULL, NULL), MASA_ERROR_NULL_ARGUMENT);

    masa_context_options_init(&o);
    o.size = 0;
    EXPECT(masa_context_create(&o, &ctx), MASA_ERROR_BAD_STRUCT_SIZE);
    ck_assert_ptr_null(ctx); /* documented: *out = NULL on failure */

    masa_context_options_init(&o);
    o.malloc_fn = my_malloc; /* both or neither */
    EXPECT(masa_context_create(&o, &ctx), MASA_ERROR_INVALID_ARGUMENT);
    o.malloc_fn = NULL;
    o.free_fn = my_free;
    EXPECT(masa_context_create(&o, &ctx), MASA_ERROR_INVALID_ARGUMENT);

    /* A newer program's larger struct: accepted iff the tail is zero. */
    struct {
        masa_context_options o;
        unsigned char tail[24];
    } big;
    memset(&big, 0, sizeof big);
    masa_context_options_init(&big.o);
    big.o.size = sizeof big;
    big.o.n_threads = 1;
    TU_OK(masa_context_create(&big.o, &ctx));
    masa_context_destroy(ctx);
    big.tail[sizeof big.tail - 1] = 1;
    EXPECT(masa_context_create(&big.o, &ctx), MASA_ERROR_BAD_STRUCT_SIZE);
}
END_TEST

/* ---- Dictionaries and coefficient tables ---- */

START_TEST(test_dictionary_errors)
{
    masa_context *ctx = new_ctx();
    masa_dictionary *d = NULL;
    float atoms[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    EXPECT(masa_dictionary_create(NULL, 1, 2, 2, &d), MASA_ERROR_NULL_ARGUMENT);
    EXPECT(masa_dictionary_create(ctx, 1, 2, 2, NULL), MASA_ERROR_NULL_ARGUMENT);
    EXPECT(masa_dictionary_create(ctx, 0, 2, 2, &d), MASA_ERROR_BAD_SHAPE);
    EXPECT(masa_dictionary_create(ctx, 1, 0, 2, &d), MASA_ERROR_BAD_SHAPE);
    EXPECT(masa_dictionary_create(ctx, 1, 2, 0, &d), MASA_ERROR_BAD_SHAPE);
    /* n_atoms * rows * cols overflows size_t ... */
    EXPECT(masa_dictionary_create(ctx, 4, SIZE_MAX / 2, 1, &d), MASA_ERROR_OVERFLOW);
    EXPECT(masa_dictionary_create(ctx, 3, 2, SIZE_MAX / 4, &d), MASA_ERROR_OVERFLOW);
    /* ... or only the byte count does. */
    EXPECT(masa_dictionary_create(ctx, 1, SIZE_MAX / 2, 1, &d), MASA_ERROR_OVERFLOW);
    EXPECT(masa_dictionary_wrap(ctx, 1, 2, 2, NULL, &d), MASA_ERROR_NULL_ARGUMENT);
    EXPECT(masa_dictionary_wrap(NULL, 1, 2, 2, atoms, &d), MASA_ERROR_NULL_ARGUMENT);
    EXPECT(masa_dictionary_wrap(ctx, 2, 2, 0, atoms, &d), MASA_ERROR_BAD_SHAPE);
    EXPECT(masa_dictionary_wrap(ctx, 4, SIZE_MAX / 2, 1, atoms, &d), MASA_ERROR_OVERFLOW);

    EXPECT(masa_dictionary_shape(NULL, NULL, NULL, NULL), MASA_ERROR_NULL_ARGUMENT);
    EXPECT(masa_dictionary_init_uniform(NULL, 1.0f, 1), MASA_ERROR_NULL_ARGUMENT);
    TU_OK(masa_dictionary_wrap(ctx, 2, 2, 2, atoms, &d));
    const float bad[] = {-1.0f, NAN, INFINITY, -1e-30f};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        EXPECT(masa_dictionary_init_uniform(d, bad[i], 1), MASA_ERROR_INVALID_ARGUMENT);
        for (int k = 0; k < 8; k++) /* unchanged on failure */
            ck_assert(atoms[k] == (float)(k + 1));
    }
    masa_dictionary_destroy(d);
    masa_context_destroy(ctx);
}
END_TEST

START_TEST(test_coefficients_errors)
{
    masa_context *ctx = new_ctx();
    masa_coefficients *c = NULL;
    float data[6] = {1, 2, 3, 4, 5, 6};
    EXPECT(masa_coefficients_create(NULL, 2, 3, &c), MASA_ERROR_NULL_ARGUMENT);
    EXPECT(masa_coefficients_create(ctx, 2, 3, NULL), MASA_ERROR_NULL_ARGUMENT);
    EXPECT(masa_coefficients_create(ctx, 0, 3, &c), MASA_ERROR_BAD_SHAPE);
    EXPECT(masa_coefficients_create(ctx, 2, 0, &c), MASA_ERROR_BAD_SHAPE);
    EXPECT(masa_coefficients_create(ctx, SIZE_MAX / 2, 4, &c), MASA_ERROR_OVERFLOW);
    EXPECT(masa_coefficients_create(ctx, SIZE_MAX / 2, 1, &c), MASA_ERROR_OVERFLOW);
    EXPECT(masa_coefficients_wrap(ctx, 2, 3, NULL, &c), MASA_ERROR_NULL_ARGUMENT);
    EXPECT(masa_coefficients_wrap(ctx, 0, 3, data, &c), MASA_ERROR_BAD_SHAPE);
    EXPECT(masa_coefficients_shape(NULL, NULL, NULL), MASA_ERROR_NULL_ARGUMENT);
    EXPECT(masa_coefficients_init_cyclic(NULL), MASA_ERROR_NULL_ARGUMENT);
    EXPECT(masa_coefficients_init_blocks(NULL), MASA_ERROR_NULL_ARGUMENT);
    EXPECT(masa_coefficients_add_uniform(NULL, 0.1f, 1), MASA_ERROR_NULL_ARGUMENT);
    TU_OK(masa_coefficients_wrap(ctx, 2, 3, data, &c));
    const float bad[] = {-0.5f, NAN, INFINITY, -INFINITY};
    for (size_t i = 0; i < 4; i++) {
        EXPECT(masa_coefficients_add_uniform(c, bad[i], 1), MASA_ERROR_INVALID_ARGUMENT);
        for (int k = 0; k < 6; k++)
            ck_assert(data[k] == (float)(k + 1));
    }
    masa_coefficients_destroy(c);
    masa_context_destroy(ctx);
}
END_TEST

START_TEST(test_compose_errors)
{
    masa_context *ctx = new_ctx();
    masa_dictionary *d;
    masa_coefficients *c2, *c3;
    float w[12];
    TU_OK(masa_dictionary_create(ctx, 2, 3, 4, &d));
    TU_OK(masa_dictionary_init_uniform(d, 1.0f, 3));
    TU_OK(masa_coefficients_create(ctx, 5, 2, &c2));
    TU_OK(masa_coefficients_create(ctx, 5, 3, &c3));
    for (int i = 0; i < 12; i++)
        w[i] = -7.0f;
    EXPECT(masa_compose(NULL, c2, 0, w, 12), MASA_ERROR_NULL_ARGUMENT);
    EXPECT(masa_compose(d, NULL, 0, w, 12), MASA_ERROR_NULL_ARGUMENT);
    EXPECT(masa_compose(d, c2, 0, NULL, 12), MASA_ERROR_NULL_ARGUMENT);
    EXPECT(masa_compose(d, c3, 0, w, 12), MASA_ERROR_BAD_SHAPE); /* n_atoms 3 vs 2 */
    EXPECT(masa_compose(d, c2, 5, w, 12), MASA_ERROR_OUT_OF_RANGE);
    EXPECT(masa_compose(d, c2, SIZE_MAX, w, 12), MASA_ERROR_OUT_OF_RANGE);
    EXPECT(masa_compose(d, c2, 0, w, 11), MASA_ERROR_BUFFER_TOO_SMALL);
    for (int i = 0; i < 12; i++)
        ck_assert_msg(w[i] == -7.0f, "failed compose wrote w[%d]", i);
    TU_OK(masa_compose(d, c2, 4, w, 12));
    masa_dictionary_destroy(d);
    masa_coefficients_destroy(c2);
    masa_coefficients_destroy(c3);
    masa_context_destroy(ctx);
}
END_TEST

/* ---- Layer creation ---- */

static masa_layer_options opts(size_t dm, size_t nh, size_t nkv, size_t hd)
{
    masa_layer_options o;
    masa_layer_options_init(&o);
    o.d_model = dm;
    o.n_heads = nh;
    o.n_kv_heads = nkv;
    o.head_dim = hd;
    return o;
}

START_TEST(test_layer_create_errors)
{
    masa_context *ctx = new_ctx();
    masa_layer *l = NULL;
    masa_layer_options o = opts(8, 2, 0, 0);
    EXPECT(masa_layer_create(NULL, &o, &l), MASA_ERROR_NULL_ARGUMENT);
    EXPECT(masa_layer_create(ctx, NULL, &l), MASA_ERROR_NULL_ARGUMENT);
    EXPECT(masa_layer_create(ctx, &o, NULL), MASA_ERROR_NULL_ARGUMENT);

    o = opts(0, 2, 0, 4);
    EXPECT(masa_layer_create(ctx, &o, &l), MASA_ERROR_BAD_SHAPE);
    o = opts(8, 0, 0, 4);
    EXPECT(masa_layer_create(ctx, &o, &l), MASA_ERROR_BAD_SHAPE);
    o = opts(12, 6, 4, 2); /* 6 heads, 4 kv heads */
    EXPECT(masa_layer_create(ctx, &o, &l), MASA_ERROR_BAD_SHAPE);
    o = opts(12, 2, 4, 2); /* more kv heads than heads */
    EXPECT(masa_layer_create(ctx, &o, &l), MASA_ERROR_BAD_SHAPE);
    o = opts(10, 4, 0, 0); /* head_dim = d_model / n_heads not exact */
    EXPECT(masa_layer_create(ctx, &o, &l), MASA_ERROR_BAD_SHAPE);
    o = opts(8, SIZE_MAX / 4, 1, 8); /* n_heads * head_dim overflows */
    EXPECT(masa_layer_create(ctx, &o, &l), MASA_ERROR_OVERFLOW);

    /* RoPE needs an even head_dim. masa.h does not say which status;
     * "inconsistent sizes" (BAD_SHAPE) or "value out of domain". */
    o = opts(12, 4, 0, 3);
    o.rope = 1;
    EXPECT2(masa_layer_create(ctx, &o, &l), MASA_ERROR_BAD_SHAPE,
            MASA_ERROR_INVALID_ARGUMENT);
    o.rope = 0; /* fine without RoPE */
    TU_OK(masa_layer_create(ctx, &o, &l));
    masa_layer_destroy(l);

    o = opts(8, 2, 0, 0);
    o.rope = 1;
    o.rope_theta = -1.0f;
    EXPECT(masa_layer_create(ctx, &o, &l), MASA_ERROR_INVALID_ARGUMENT);
    o.rope_theta = NAN;
    EXPECT(masa_layer_create(ctx, &o, &l), MASA_ERROR_INVALID_ARGUMENT);
    o.rope_theta = 1.0f; /* documented domain: finite and > 1 */
    EXPECT(masa_layer_create(ctx, &o, &l), MASA_ERROR_INVALID_ARGUMENT);
    o.rope_theta = INFINITY;
    EXPECT(masa_layer_create(ctx, &o, &l), MASA_ERROR_INVALID_ARGUMENT);
    o = opts(8, 2, 0, 0);
    o.softmax_scale = -0.5f; /* documented domain: finite, >= 0 */
    EXPECT(masa_layer_create(ctx, &o, &l), MASA_ERROR_INVALID_ARGUMENT);
    o.softmax_scale = NAN;
    EXPECT(masa_layer_create(ctx, &o, &l), MASA_ERROR_INVALID_ARGUMENT);
    o.softmax_scale = INFINITY;
    EXPECT(masa_layer_create(ctx, &o, &l), MASA_ERROR_INVALID_ARGUMENT);

    /* Struct size rule. */
    o = opts(8, 2, 0, 0);
    o.size = sizeof(size_t);
    EXPECT(masa_layer_create(ctx, &o, &l), MASA_ERROR_BAD_STRUCT_SIZE);
    struct {
        masa_layer_options o;
        unsigned char tail[16];
    } big;
    memset(&big, 0, sizeof big);
    big.o = opts(8, 2, 0, 0);
    big.o.size = sizeof big;
    TU_OK(masa_layer_create(ctx, &big.o, &l));
    masa_layer_destroy(l);
    big.tail[0] = 0x80;
    EXPECT(masa_layer_create(ctx, &big.o, &l), MASA_ERROR_BAD_STRUCT_SIZE);
    masa_context_destroy(ctx);
}
END_TEST

/* ---- A ready layer for the remaining tests: GQA, Q and K MASA, V and O
 * dense, bias on Q only. ---- */

typedef struct fx {
    masa_context *ctx;
    masa_layer *layer;
    masa_dictionary *dq, *dk, *dq3;
    masa_coefficients *c2, *c3;
    size_t B, T, n, wsb, rsb;
    float *x, *y, *dy, *dx;
    void *ws, *rs;
} fx;

static void fx_init(fx *f)
{
    memset(f, 0, sizeof *f);
    f->ctx = new_ctx();
    masa_layer_options o = opts(8, 4, 2, 2); /* Q 8x8, K/V 8x4, O 8x8 */
    o.causal = 1;
    o.rope = 1;
    TU_OK(masa_layer_create(f->ctx, &o, &f->layer));
    TU_OK(masa_dictionary_create(f->ctx, 2, 8, 8, &f->dq));
    TU_OK(masa_dictionary_create(f->ctx, 2, 8, 4, &f->dk));
    TU_OK(masa_dictionary_create(f->ctx, 3, 8, 8, &f->dq3));
    TU_OK(masa_dictionary_init_uniform(f->dq, 0, 1));
    TU_OK(masa_dictionary_init_uniform(f->dk, 0, 2));
    TU_OK(masa_coefficients_create(f->ctx, 3, 2, &f->c2));
    TU_OK(masa_coefficients_create(f->ctx, 3, 3, &f->c3));
    TU_OK(masa_coefficients_init_cyclic(f->c2));
    TU_OK(masa_layer_set_masa(f->layer, MASA_PROJ_Q, f->dq, f->c2, 1));
    TU_OK(masa_layer_set_masa(f->layer, MASA_PROJ_K, f->dk, f->c2, 2));
    TU_OK(masa_layer_set_dense(f->layer, MASA_PROJ_V, NULL));
    TU_OK(masa_layer_set_dense(f->layer, MASA_PROJ_O, NULL));
    TU_OK(masa_layer_set_bias(f->layer, MASA_PROJ_Q, NULL));
    tu_rng rng = {3};
    tu_fill(&rng, masa_layer_weight(f->layer, MASA_PROJ_V), 32, -0.5f, 0.5f);
    tu_fill(&rng, masa_layer_weight(f->layer, MASA_PROJ_O), 64, -0.5f, 0.5f);
    tu_fill(&rng, masa_layer_bias(f->layer, MASA_PROJ_Q), 8, -0.5f, 0.5f);
    f->B = 2;
    f->T = 3;
    f->n = f->B * f->T * 8;
    f->x = tu_falloc(f->n);
    f->y = tu_falloc(f->n);
    f->dy = tu_falloc(f->n);
    f->dx = tu_falloc(f->n);
    tu_fill(&rng, f->x, f->n, -1, 1);
    tu_fill(&rng, f->dy, f->n, -1, 1);
    TU_OK(masa_layer_workspace_size(f->layer, f->B, f->T, &f->wsb));
    TU_OK(masa_layer_reserve_size(f->layer, f->B, f->T, &f->rsb));
    ck_assert_uint_gt(f->rsb, 0);
    f->ws = tu_garbage(f->wsb);
    f->rs = tu_garbage(f->rsb);
    TU_OK(masa_layer_forward(f->layer, f->B, f->T, 0, f->x, f->y, f->ws, f->wsb,
                             f->rs, f->rsb));
}

static void fx_fini(fx *f)
{
    masa_layer_destroy(f->layer);
    masa_dictionary_destroy(f->dq);
    masa_dictionary_destroy(f->dk);
    masa_dictionary_destroy(f->dq3);
    masa_coefficients_destroy(f->c2);
    masa_coefficients_destroy(f->c3);
    free(f->x);
    free(f->y);
    free(f->dy);
    free(f->dx);
    free(f->ws);
    free(f->rs);
    masa_context_destroy(f->ctx);
}

/* y of the current layer equals the fixture's original y (layer unchanged). */
static void assert_layer_unchanged(fx *f)
{
    float *y2 = tu_falloc(f->n);
    TU_OK(masa_layer_forward(f->layer, f->B, f->T, 0, f->x, y2, f->ws, f->wsb,
                             NULL, 0));
    ck_assert_msg(memcmp(y2, f->y, f->n * sizeof(float)) == 0,
                  "a failed call changed the layer's output");
    free(y2);
}

START_TEST(test_layer_set_errors)
{
    fx f;
    fx_init(&f);
    const masa_projection badp[] = {(masa_projection)4, (masa_projection)-1,
                                    (masa_projection)1000};
    for (int i = 0; i < 3; i++) {
        masa_projection p = badp[i];
        size_t a, b;
        EXPECT(masa_layer_set_masa(f.layer, p, f.dq, f.c2, 0), MASA_ERROR_OUT_OF_RANGE);
        EXPECT(masa_layer_set_dense(f.layer, p, NULL), MASA_ERROR_OUT_OF_RANGE);
        EXPECT(masa_layer_set_bias(f.layer, p, NULL), MASA_ERROR_OUT_OF_RANGE);
        EXPECT(masa_layer_remove_bias(f.layer, p), MASA_ERROR_OUT_OF_RANGE);
        EXPECT(masa_layer_projection_shape(f.layer, p, &a, &b), MASA_ERROR_OUT_OF_RANGE);
        ck_assert_ptr_null(masa_layer_weight(f.layer, p));
        ck_assert_ptr_null(masa_layer_bias(f.layer, p));
    }
    EXPECT(masa_layer_set_masa(NULL, MASA_PROJ_Q, f.dq, f.c2, 0), MASA_ERROR_NULL_ARGUMENT);
    EXPECT(masa_layer_set_masa(f.layer, MASA_PROJ_Q, NULL, f.c2, 0), MASA_ERROR_NULL_ARGUMENT);
    EXPECT(masa_layer_set_masa(f.layer, MASA_PROJ_Q, f.dq, NULL, 0), MASA_ERROR_NULL_ARGUMENT);
    EXPECT(masa_layer_set_dense(NULL, MASA_PROJ_Q, NULL), MASA_ERROR_NULL_ARGUMENT);
    EXPECT(masa_layer_set_bias(NULL, MASA_PROJ_Q, NULL), MASA_ERROR_NULL_ARGUMENT);
    EXPECT(masa_layer_remove_bias(NULL, MASA_PROJ_Q), MASA_ERROR_NULL_ARGUMENT);
    EXPECT(masa_layer_projection_shape(NULL, MASA_PROJ_Q, NULL, NULL),
           MASA_ERROR_NULL_ARGUMENT);
    ck_assert_ptr_null(masa_layer_weight(NULL, MASA_PROJ_V));
    ck_assert_ptr_null(masa_layer_bias(NULL, MASA_PROJ_Q));

    /* Atoms of the wrong shape: K's 8x4 atoms for Q (8x8) and vice versa. */
    EXPECT(masa_layer_set_masa(f.layer, MASA_PROJ_Q, f.dk, f.c2, 0), MASA_ERROR_BAD_SHAPE);
    EXPECT(masa_layer_set_masa(f.layer, MASA_PROJ_V, f.dq, f.c2, 0), MASA_ERROR_BAD_SHAPE);
    /* Table with 3 atoms for a 2-atom dictionary. */
    EXPECT(masa_layer_set_masa(f.layer, MASA_PROJ_Q, f.dq, f.c3, 0), MASA_ERROR_BAD_SHAPE);
    /* Layer index past the table. */
    EXPECT(masa_layer_set_masa(f.layer, MASA_PROJ_Q, f.dq, f.c2, 3), MASA_ERROR_OUT_OF_RANGE);
    EXPECT(masa_layer_set_masa(f.layer, MASA_PROJ_O, f.dq3, f.c2, 0), MASA_ERROR_BAD_SHAPE);

    /* None of that changed the layer. */
    ck_assert_ptr_nonnull(masa_layer_weight(f.layer, MASA_PROJ_V));
    ck_assert_ptr_null(masa_layer_weight(f.layer, MASA_PROJ_Q));
    ck_assert_ptr_nonnull(masa_layer_bias(f.layer, MASA_PROJ_Q));
    assert_layer_unchanged(&f);
    fx_fini(&f);
}
END_TEST

START_TEST(test_size_query_errors)
{
    fx f;
    fx_init(&f);
    size_t bytes = 12345;
    EXPECT(masa_layer_workspace_size(NULL, 1, 1, &bytes), MASA_ERROR_NULL_ARGUMENT);
    EXPECT(masa_layer_workspace_size(f.layer, 1, 1, NULL), MASA_ERROR_NULL_ARGUMENT);
    EXPECT(masa_layer_workspace_size(f.layer, 0, 1, &bytes), MASA_ERROR_BAD_SHAPE);
    EXPECT(masa_layer_workspace_size(f.layer, 1, 0, &bytes), MASA_ERROR_BAD_SHAPE);
    EXPECT(masa_layer_workspace_size(f.layer, SIZE_MAX / 2, 2, &bytes), MASA_ERROR_OVERFLOW);
    EXPECT(masa_layer_reserve_size(NULL, 1, 1, &bytes), MASA_ERROR_NULL_ARGUMENT);
    EXPECT(masa_layer_reserve_size(f.layer, 1, 1, NULL), MASA_ERROR_NULL_ARGUMENT);
    EXPECT(masa_layer_reserve_size(f.layer, 0, 1, &bytes), MASA_ERROR_BAD_SHAPE);
    EXPECT(masa_layer_reserve_size(f.layer, 1, 0, &bytes), MASA_ERROR_BAD_SHAPE);
    EXPECT(masa_layer_reserve_size(f.layer, 3, SIZE_MAX / 2, &bytes), MASA_ERROR_OVERFLOW);
    ck_assert_uint_eq(bytes, 12345); /* untouched on failure */
    fx_fini(&f);
}
END_TEST

START_TEST(test_forward_errors)
{
    fx f;
    fx_init(&f);
    float *y = tu_falloc(f.n);
    for (size_t i = 0; i < f.n; i++)
        y[i] = 3.0f;
#define FWD(l, b, t, x, yy, ws, wsb, rs, rsb) \
    masa_layer_forward(l, b, t, 0, x, yy, ws, wsb, rs, rsb)
    EXPECT(FWD(NULL, f.B, f.T, f.x, y, f.ws, f.wsb, NULL, 0), MASA_ERROR_NULL_ARGUMENT);
    EXPECT(FWD(f.layer, f.B, f.T, NULL, y, f.ws, f.wsb, NULL, 0), MASA_ERROR_NULL_ARGUMENT);
    EXPECT(FWD(f.layer, f.B, f.T, f.x, NULL, f.ws, f.wsb, NULL, 0), MASA_ERROR_NULL_ARGUMENT);
    EXPECT(FWD(f.layer, f.B, f.T, f.x, y, NULL, f.wsb, NULL, 0), MASA_ERROR_NULL_ARGUMENT);
    EXPECT(FWD(f.layer, 0, f.T, f.x, y, f.ws, f.wsb, NULL, 0), MASA_ERROR_BAD_SHAPE);
    EXPECT(FWD(f.layer, f.B, 0, f.x, y, f.ws, f.wsb, NULL, 0), MASA_ERROR_BAD_SHAPE);
    EXPECT(FWD(f.layer, SIZE_MAX / 2, 4, f.x, y, f.ws, f.wsb, NULL, 0), MASA_ERROR_OVERFLOW);
    EXPECT(FWD(f.layer, f.B, f.T, f.x, y, f.ws, f.wsb - 1, NULL, 0),
           MASA_ERROR_BUFFER_TOO_SMALL);
    EXPECT(FWD(f.layer, f.B, f.T, f.x, y, f.ws, 0, NULL, 0), MASA_ERROR_BUFFER_TOO_SMALL);
    void *rs = tu_garbage(f.rsb);
    EXPECT(FWD(f.layer, f.B, f.T, f.x, y, f.ws, f.wsb, rs, f.rsb - 1),
           MASA_ERROR_BUFFER_TOO_SMALL);
    /* Shapes the buffers were sized for, but a longer sequence. */
    EXPECT(FWD(f.layer, f.B, f.T + 5, f.x, y, f.ws, f.wsb, NULL, 0),
           MASA_ERROR_BUFFER_TOO_SMALL);
    /* Requirements masa.h states without naming a status: y must not
     * overlap x, buffers aligned for float. INVALID_ARGUMENT is natural. */
    float *xy = tu_falloc(2 * f.n);
    memcpy(xy, f.x, f.n * sizeof(float));
    EXPECT(FWD(f.layer, f.B, f.T, xy, xy, f.ws, f.wsb, NULL, 0), MASA_ERROR_INVALID_ARGUMENT);
    EXPECT(FWD(f.layer, f.B, f.T, xy, xy + f.n - 1, f.ws, f.wsb, NULL, 0),
           MASA_ERROR_INVALID_ARGUMENT);
    free(xy);
    char *ws_odd = tu_garbage(f.wsb + 1);
    EXPECT(FWD(f.layer, f.B, f.T, f.x, y, ws_odd + 1, f.wsb, NULL, 0),
           MASA_ERROR_INVALID_ARGUMENT);
    free(ws_odd);
    for (size_t i = 0; i < f.n; i++)
        ck_assert_msg(y[i] == 3.0f, "failed forward wrote y[%zu]", i);
#undef FWD

    /* A layer without all four projections. */
    masa_layer_options o = opts(8, 4, 2, 2);
    masa_layer *l;
    TU_OK(masa_layer_create(f.ctx, &o, &l));
    void *big = tu_garbage(1 << 20);
    EXPECT(masa_layer_forward(l, 1, 1, 0, f.x, y, big, 1 << 20, NULL, 0),
           MASA_ERROR_NOT_READY);
    TU_OK(masa_layer_set_masa(l, MASA_PROJ_Q, f.dq, f.c2, 0));
    TU_OK(masa_layer_set_masa(l, MASA_PROJ_K, f.dk, f.c2, 0));
    TU_OK(masa_layer_set_dense(l, MASA_PROJ_V, NULL));
    EXPECT(masa_layer_forward(l, 1, 1, 0, f.x, y, big, 1 << 20, NULL, 0),
           MASA_ERROR_NOT_READY);
    EXPECT(masa_layer_backward(l, 1, 1, 0, f.x, f.dy, f.dx, NULL, big, 1 << 20,
                               rs, f.rsb), MASA_ERROR_NOT_READY);
    TU_OK(masa_layer_set_dense(l, MASA_PROJ_O, NULL)); /* now complete */
    TU_OK(masa_layer_forward(l, 1, 1, 0, f.x, y, big, 1 << 20, NULL, 0));
    masa_layer_destroy(l);
    free(big);
    free(rs);
    free(y);
    fx_fini(&f);
}
END_TEST

/* Gradient buffers prefilled with a marker, to see they stay untouched.
 * One array carved into the buffers, so one loop checks them all. */
enum { GM_TOTAL = 128 + 6 + 6 + 32 + 64 + 8 + 64 + 8 + 64 + 6 };
typedef struct gmark {
    masa_layer_grads g;
    float all[GM_TOTAL];
    float *dense_atoms, *spare_b, *spare_w, *spare_c; /* for wrong slots */
} gmark;

static void gmark_init(gmark *m)
{
    float *p = m->all;
    for (size_t i = 0; i < GM_TOTAL; i++)
        m->all[i] = 9.0f;
    masa_layer_grads_init(&m->g);
    m->g.mode = MASA_GRAD_SET;
    m->g.d_atoms[MASA_PROJ_Q] = p, p += 128;
    m->g.d_coefficients[MASA_PROJ_Q] = p, p += 6;
    m->g.d_coefficients[MASA_PROJ_K] = p, p += 6;
    m->g.d_weight[MASA_PROJ_V] = p, p += 32;
    m->g.d_weight[MASA_PROJ_O] = p, p += 64;
    m->g.d_bias[MASA_PROJ_Q] = p, p += 8;
    m->dense_atoms = p, p += 64;
    m->spare_b = p, p += 8;
    m->spare_w = p, p += 64;
    m->spare_c = p, p += 6;
    ck_assert(p == m->all + GM_TOTAL);
}

static void gmark_untouched(const gmark *m, const float *dx, size_t n)
{
    for (size_t i = 0; i < GM_TOTAL; i++)
        ck_assert_msg(m->all[i] == 9.0f, "failed backward wrote gradient float %zu", i);
    for (size_t i = 0; i < n; i++)
        ck_assert_msg(dx[i] == 9.0f, "failed backward wrote dx[%zu]", i);
}

START_TEST(test_backward_errors)
{
    fx f;
    fx_init(&f);
    gmark m;
    gmark_init(&m);
    for (size_t i = 0; i < f.n; i++)
        f.dx[i] = 9.0f;
#define BWD(l, x, dy, dx, g, ws, wsb, rs, rsb) \
    masa_layer_backward(l, f.B, f.T, 0, x, dy, dx, g, ws, wsb, rs, rsb)
    EXPECT(BWD(NULL, f.x, f.dy, f.dx, &m.g, f.ws, f.wsb, f.rs, f.rsb), MASA_ERROR_NULL_ARGUMENT);
    EXPECT(BWD(f.layer, NULL, f.dy, f.dx, &m.g, f.ws, f.wsb, f.rs, f.rsb), MASA_ERROR_NULL_ARGUMENT);
    EXPECT(BWD(f.layer, f.x, NULL, f.dx, &m.g, f.ws, f.wsb, f.rs, f.rsb), MASA_ERROR_NULL_ARGUMENT);
    EXPECT(BWD(f.layer, f.x, f.dy, f.dx, &m.g, NULL, f.wsb, f.rs, f.rsb), MASA_ERROR_NULL_ARGUMENT);
    EXPECT(BWD(f.layer, f.x, f.dy, f.dx, &m.g, f.ws, f.wsb, NULL, f.rsb), MASA_ERROR_NULL_ARGUMENT);
    EXPECT(BWD(f.layer, f.x, f.dy, f.dx, &m.g, f.ws, f.wsb - 1, f.rs, f.rsb),
           MASA_ERROR_BUFFER_TOO_SMALL);
    EXPECT(BWD(f.layer, f.x, f.dy, f.dx, &m.g, f.ws, f.wsb, f.rs, f.rsb - 1),
           MASA_ERROR_BUFFER_TOO_SMALL);
    EXPECT(masa_layer_backward(f.layer, 0, f.T, 0, f.x, f.dy, f.dx, &m.g, f.ws,
                               f.wsb, f.rs, f.rsb), MASA_ERROR_BAD_SHAPE);
    gmark_untouched(&m, f.dx, f.n);
    /* dx must not overlap x or dy (status not named in masa.h). */
    float *xcopy = tu_falloc(f.n), *dycopy = tu_falloc(f.n);
    memcpy(xcopy, f.x, f.n * sizeof(float));
    memcpy(dycopy, f.dy, f.n * sizeof(float));
    EXPECT(BWD(f.layer, xcopy, f.dy, xcopy, &m.g, f.ws, f.wsb, f.rs, f.rsb),
           MASA_ERROR_INVALID_ARGUMENT);
    EXPECT(BWD(f.layer, f.x, dycopy, dycopy, &m.g, f.ws, f.wsb, f.rs, f.rsb),
           MASA_ERROR_INVALID_ARGUMENT);
    ck_assert(memcmp(xcopy, f.x, f.n * sizeof(float)) == 0);
    ck_assert(memcmp(dycopy, f.dy, f.n * sizeof(float)) == 0);
    free(xcopy);
    free(dycopy);
    gmark_untouched(&m, f.dx, f.n);

    /* The grads struct follows the size rule too. */
    m.g.size = 0;
    EXPECT(BWD(f.layer, f.x, f.dy, f.dx, &m.g, f.ws, f.wsb, f.rs, f.rsb),
           MASA_ERROR_BAD_STRUCT_SIZE);
    m.g.size = sizeof m.g;
    m.g.mode = 2;
    EXPECT(BWD(f.layer, f.x, f.dy, f.dx, &m.g, f.ws, f.wsb, f.rs, f.rsb),
           MASA_ERROR_INVALID_ARGUMENT);
    m.g.mode = -1;
    EXPECT(BWD(f.layer, f.x, f.dy, f.dx, &m.g, f.ws, f.wsb, f.rs, f.rsb),
           MASA_ERROR_INVALID_ARGUMENT);
    m.g.mode = MASA_GRAD_ADD;
    gmark_untouched(&m, f.dx, f.n);

    /* Gradients that do not apply must be NULL. masa.h gives no status;
     * INVALID_ARGUMENT is the natural one. */
    struct {
        const char *what;
        float **slot;
        float *buf;
    } wrong[] = {
        {"d_atoms of dense V", &m.g.d_atoms[MASA_PROJ_V], m.dense_atoms},
        {"d_coefficients of dense O", &m.g.d_coefficients[MASA_PROJ_O], m.spare_c},
        {"d_weight of MASA Q", &m.g.d_weight[MASA_PROJ_Q], m.spare_w},
        {"d_bias of bias-less K", &m.g.d_bias[MASA_PROJ_K], m.spare_b},
        {"d_bias of bias-less O", &m.g.d_bias[MASA_PROJ_O], m.spare_b},
    };
    for (size_t i = 0; i < sizeof wrong / sizeof wrong[0]; i++) {
        *wrong[i].slot = wrong[i].buf;
        masa_status st = BWD(f.layer, f.x, f.dy, f.dx, &m.g, f.ws, f.wsb, f.rs, f.rsb);
        ck_assert_msg(st == MASA_ERROR_INVALID_ARGUMENT,
                      "%s: status %d (%s), expected INVALID_ARGUMENT", wrong[i].what,
                      (int)st, masa_status_string(st));
        ck_assert_msg(masa_last_error()[0] != '\0', "%s: empty message", wrong[i].what);
        *wrong[i].slot = NULL;
        gmark_untouched(&m, f.dx, f.n);
    }

    /* A larger grads struct with a zero tail is fine, a non-zero one not. */
    struct {
        masa_layer_grads g;
        unsigned char tail[16];
    } big;
    memset(&big, 0, sizeof big);
    big.g = m.g;
    big.g.size = sizeof big;
    big.tail[5] = 1;
    EXPECT(BWD(f.layer, f.x, f.dy, f.dx, &big.g, f.ws, f.wsb, f.rs, f.rsb),
           MASA_ERROR_BAD_STRUCT_SIZE);
    gmark_untouched(&m, f.dx, f.n);
    big.tail[5] = 0;
    TU_OK(BWD(f.layer, f.x, f.dy, f.dx, &big.g, f.ws, f.wsb, f.rs, f.rsb));
#undef BWD
    fx_fini(&f);
}
END_TEST

/* Backward refuses a reserve that the matching forward call did not fill
 * (documented: another layer, batch, seq or pos_offset). */
START_TEST(test_reserve_mismatch)
{
    fx f;
    fx_init(&f); /* forward filled f.rs for (B=2, T=3, pos 0) */
    gmark m;
    gmark_init(&m);
    for (size_t i = 0; i < f.n; i++)
        f.dx[i] = 9.0f;
    /* Workspace ample for every shape below: only the reserve is wrong. */
    const size_t big_bytes = 1 << 20;
    void *big = tu_garbage(big_bytes);
#define BWD2(l, b, t, pos, rs) \
    masa_layer_backward(l, b, t, pos, f.x, f.dy, f.dx, &m.g, big, big_bytes, rs, f.rsb)
    EXPECT(BWD2(f.layer, f.B, f.T, 1, f.rs), MASA_ERROR_INVALID_ARGUMENT);
    EXPECT(BWD2(f.layer, 3, 2, 0, f.rs), MASA_ERROR_INVALID_ARGUMENT); /* same B*T */
    EXPECT(BWD2(f.layer, 1, 6, 0, f.rs), MASA_ERROR_INVALID_ARGUMENT);
    EXPECT(BWD2(f.layer, 1, 1, 0, f.rs), MASA_ERROR_INVALID_ARGUMENT);
    void *never = tu_garbage(f.rsb); /* never given to forward */
    EXPECT(BWD2(f.layer, f.B, f.T, 0, never), MASA_ERROR_INVALID_ARGUMENT);
    memset(never, 0, f.rsb);
    EXPECT(BWD2(f.layer, f.B, f.T, 0, never), MASA_ERROR_INVALID_ARGUMENT);
    free(never);

    /* A twin layer (same shapes and parameters) is still another layer. */
    masa_layer_options o = opts(8, 4, 2, 2);
    o.causal = 1;
    o.rope = 1;
    masa_layer *twin;
    TU_OK(masa_layer_create(f.ctx, &o, &twin));
    TU_OK(masa_layer_set_masa(twin, MASA_PROJ_Q, f.dq, f.c2, 1));
    TU_OK(masa_layer_set_masa(twin, MASA_PROJ_K, f.dk, f.c2, 2));
    TU_OK(masa_layer_set_dense(twin, MASA_PROJ_V, masa_layer_weight(f.layer, MASA_PROJ_V)));
    TU_OK(masa_layer_set_dense(twin, MASA_PROJ_O, masa_layer_weight(f.layer, MASA_PROJ_O)));
    TU_OK(masa_layer_set_bias(twin, MASA_PROJ_Q, masa_layer_bias(f.layer, MASA_PROJ_Q)));
    masa_status st = BWD2(twin, f.B, f.T, 0, f.rs);
    masa_layer_destroy(twin);
    ck_assert_msg(st == MASA_ERROR_INVALID_ARGUMENT,
                  "backward of layer B with layer A's reserve -> %d (%s)", (int)st,
                  masa_status_string(st));
    gmark_untouched(&m, f.dx, f.n);

    /* The matching call still works, and pos_offset is part of the match. */
    TU_OK(BWD2(f.layer, f.B, f.T, 0, f.rs));
    TU_OK(masa_layer_forward(f.layer, f.B, f.T, 7, f.x, f.y, f.ws, f.wsb, f.rs, f.rsb));
    EXPECT(BWD2(f.layer, f.B, f.T, 0, f.rs), MASA_ERROR_INVALID_ARGUMENT);
    TU_OK(BWD2(f.layer, f.B, f.T, 7, f.rs));
#undef BWD2
    free(big);
    fx_fini(&f);
}
END_TEST

/* Gradient buffers may not overlap each other or dx (documented, checked:
 * INVALID_ARGUMENT), e.g. one dictionary used twice needs two buffers. */
START_TEST(test_grad_overlap)
{
    fx f;
    fx_init(&f);
    /* Q and K both MASA on 8x8 atoms would share a buffer: use a layer
     * where Q and O share the 8x8 dictionary. */
    masa_layer *l;
    masa_layer_options o = opts(8, 4, 2, 2);
    TU_OK(masa_layer_create(f.ctx, &o, &l));
    TU_OK(masa_layer_set_masa(l, MASA_PROJ_Q, f.dq, f.c2, 0));
    TU_OK(masa_layer_set_masa(l, MASA_PROJ_K, f.dk, f.c2, 0));
    TU_OK(masa_layer_set_dense(l, MASA_PROJ_V, NULL));
    TU_OK(masa_layer_set_masa(l, MASA_PROJ_O, f.dq, f.c2, 1));
    TU_OK(masa_layer_set_bias(l, MASA_PROJ_O, NULL));
    size_t wsb, rsb;
    TU_OK(masa_layer_workspace_size(l, f.B, f.T, &wsb));
    TU_OK(masa_layer_reserve_size(l, f.B, f.T, &rsb));
    void *ws = tu_garbage(wsb), *rs = tu_garbage(rsb);
    TU_OK(masa_layer_forward(l, f.B, f.T, 0, f.x, f.y, ws, wsb, rs, rsb));

    float *buf = tu_falloc(1024), *dx = tu_falloc(f.n);
    for (size_t i = 0; i < 1024; i++)
        buf[i] = 9.0f;
    for (size_t i = 0; i < f.n; i++)
        dx[i] = 9.0f;
    masa_layer_grads g;
    struct {
        const char *what;
        float **a, **b;
        float *pa, *pb;
    } cases[] = {
        {"same d_atoms for Q and O", &g.d_atoms[MASA_PROJ_Q], &g.d_atoms[MASA_PROJ_O], buf, buf},
        {"d_atoms Q and O partly", &g.d_atoms[MASA_PROJ_Q], &g.d_atoms[MASA_PROJ_O], buf, buf + 127},
        {"same d_coefficients for Q and O", &g.d_coefficients[MASA_PROJ_Q],
         &g.d_coefficients[MASA_PROJ_O], buf, buf},
        {"d_bias[O] inside d_weight[V]", &g.d_weight[MASA_PROJ_V], &g.d_bias[MASA_PROJ_O],
         buf, buf + 10},
        {"d_weight[V] inside dx", &g.d_weight[MASA_PROJ_V], NULL, dx + 4, NULL},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        masa_layer_grads_init(&g);
        g.mode = MASA_GRAD_ADD;
        *cases[i].a = cases[i].pa;
        if (cases[i].b)
            *cases[i].b = cases[i].pb;
        masa_status st = masa_layer_backward(l, f.B, f.T, 0, f.x, f.dy, dx, &g,
                                             ws, wsb, rs, rsb);
        ck_assert_msg(st == MASA_ERROR_INVALID_ARGUMENT, "%s: status %d (%s)",
                      cases[i].what, (int)st, masa_status_string(st));
        ck_assert(masa_last_error()[0] != '\0');
    }
    for (size_t i = 0; i < 1024; i++)
        ck_assert_msg(buf[i] == 9.0f, "refused backward wrote gradient %zu", i);
    for (size_t i = 0; i < f.n; i++)
        ck_assert_msg(dx[i] == 9.0f, "refused backward wrote dx[%zu]", i);
    /* Separate buffers for the shared dictionary are fine. */
    masa_layer_grads_init(&g);
    g.d_atoms[MASA_PROJ_Q] = buf;
    g.d_atoms[MASA_PROJ_O] = buf + 128;
    TU_OK(masa_layer_backward(l, f.B, f.T, 0, f.x, f.dy, dx, &g, ws, wsb, rs, rsb));
    free(buf);
    free(dx);
    free(ws);
    free(rs);
    masa_layer_destroy(l);
    fx_fini(&f);
}
END_TEST

/* A size smaller than this version's struct cuts a field in half: no
 * program built against any libmasa (0.1.0 is the first ABI) can pass it,
 * so it must be rejected, not half-read. For masa_layer_grads it matters
 * most: accepting it while reading every pointer reads past the caller's
 * struct. */
/* Status of a create call; whatever was created is destroyed first, so a
 * failing check does not also leak (keeps valgrind logs to the point). */
static masa_status try_context(size_t size)
{
    masa_context_options co;
    masa_context_options_init(&co);
    co.size = size;
    masa_context *ctx = NULL;
    masa_status st = masa_context_create(&co, &ctx);
    if (st != MASA_OK)
        ck_assert_ptr_null(ctx);
    masa_context_destroy(ctx);
    return st;
}

static masa_status try_layer(masa_context *ctx, size_t size)
{
    masa_layer_options o = opts(8, 2, 0, 0);
    o.size = size;
    masa_layer *l = NULL;
    masa_status st = masa_layer_create(ctx, &o, &l);
    masa_layer_destroy(l);
    return st;
}

START_TEST(test_truncated_context_options)
{
    EXPECT(try_context(sizeof(masa_context_options) - 1), MASA_ERROR_BAD_STRUCT_SIZE);
    EXPECT(try_context(offsetof(masa_context_options, alloc_user)),
           MASA_ERROR_BAD_STRUCT_SIZE);
}
END_TEST

START_TEST(test_truncated_layer_options)
{
    static masa_context *ctx; /* static: freed even if a check fails */
    ctx = new_ctx();
    masa_status a = try_layer(ctx, sizeof(masa_layer_options) - 1);
    masa_status b = try_layer(ctx, offsetof(masa_layer_options, softmax_scale));
    masa_context_destroy(ctx);
    ck_assert_msg(a == MASA_ERROR_BAD_STRUCT_SIZE && b == MASA_ERROR_BAD_STRUCT_SIZE,
                  "masa_layer_create with size sizeof-1 -> %d, with size "
                  "offsetof(softmax_scale) -> %d; expected %d", (int)a, (int)b,
                  (int)MASA_ERROR_BAD_STRUCT_SIZE);
}
END_TEST

START_TEST(test_truncated_grads)
{
    fx f;
    fx_init(&f);
    gmark m;
    gmark_init(&m);
    for (size_t i = 0; i < f.n; i++)
        f.dx[i] = 9.0f;
    /* Says "no d_bias fields"; d_bias[Q] is set behind it. */
    m.g.size = offsetof(masa_layer_grads, d_bias);
    masa_status st = masa_layer_backward(f.layer, f.B, f.T, 0, f.x, f.dy, f.dx,
                                         &m.g, f.ws, f.wsb, f.rs, f.rsb);
    int wrote_bias = m.g.d_bias[MASA_PROJ_Q][0] != 9.0f;
    fx_fini(&f);
    ck_assert_msg(st == MASA_ERROR_BAD_STRUCT_SIZE,
                  "grads.size = offsetof(d_bias) -> %d (%s)%s", (int)st,
                  masa_status_string(st),
                  wrote_bias ? "; and d_bias[Q], past the given size, was written" : "");
}
END_TEST

/* ---- Allocation failures: a hook that fails after k allocations ---- */

typedef struct budget {
    long left; /* allocations still allowed; < 0 = unlimited */
    long live; /* outstanding blocks */
} budget;

static void *b_malloc(size_t n, void *u)
{
    budget *b = u;
    if (b->left == 0)
        return NULL;
    if (b->left > 0)
        b->left--;
    void *p = malloc(n);
    if (p)
        b->live++;
    return p;
}

static void b_free(void *p, void *u)
{
    budget *b = u;
    if (p)
        b->live--;
    free(p);
}

/* Runs a fixed sequence of allocating calls; returns 1 if all succeeded.
 * Every failure must be OUT_OF_MEMORY with a message. */
static int alloc_sequence(budget *b)
{
    masa_context_options o;
    masa_context_options_init(&o);
    o.n_threads = 2;
    o.malloc_fn = b_malloc;
    o.free_fn = b_free;
    o.alloc_user = b;
    masa_context *ctx = NULL;
    masa_dictionary *d = NULL;
    masa_coefficients *c = NULL;
    masa_layer *l = NULL;
    int ok = 0;
    masa_status st;
#define STEP(call)                                                             \
    do {                                                                       \
        st = (call);                                                           \
        if (st != MASA_OK) {                                                   \
            ck_assert_msg(st == MASA_ERROR_OUT_OF_MEMORY, "%s -> %d (%s): %s", \
                          #call, (int)st, masa_status_string(st),              \
                          masa_last_error());                                  \
            ck_assert(masa_last_error()[0] != '\0');                           \
            goto out;                                                          \
        }                                                                      \
    } while (0)
    ctx = (masa_context *)&ok; /* junk: must become NULL on failure */
    st = masa_context_create(&o, &ctx);
    if (st != MASA_OK)
        ck_assert_ptr_null(ctx);
    STEP(st);
    STEP(masa_dictionary_create(ctx, 2, 8, 8, &d));
    STEP(masa_coefficients_create(ctx, 3, 2, &c));
    masa_layer_options lo = opts(8, 2, 0, 0);
    STEP(masa_layer_create(ctx, &lo, &l));
    STEP(masa_layer_set_masa(l, MASA_PROJ_Q, d, c, 1));
    STEP(masa_layer_set_dense(l, MASA_PROJ_K, NULL));
    STEP(masa_layer_set_dense(l, MASA_PROJ_V, NULL));
    STEP(masa_layer_set_masa(l, MASA_PROJ_O, d, c, 2));
    STEP(masa_layer_set_bias(l, MASA_PROJ_V, NULL));
    STEP(masa_layer_set_dense(l, MASA_PROJ_O, NULL)); /* replaces MASA O */
    ok = 1;
#undef STEP
out:
    masa_layer_destroy(l);
    masa_coefficients_destroy(c);
    masa_dictionary_destroy(d);
    masa_context_destroy(ctx);
    return ok;
}

START_TEST(test_out_of_memory)
{
    int done = 0;
    long k_done = -1;
    for (long k = 0; k < 200 && !done; k++) {
        k_done = k;
        budget b = {k, 0};
        done = alloc_sequence(&b);
        ck_assert_msg(b.live == 0, "budget %ld: %ld blocks leaked through the hook",
                      k, b.live);
    }
    ck_assert_msg(done, "sequence never completed within 200 allocations");
    if (getenv("TU_VERBOSE"))
        fprintf(stderr, "out-of-memory: %ld allocation points failed\n", k_done);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("errors");
    TCase *tc = tcase_create("errors");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_version);
    tcase_add_test(tc, test_status_strings);
    tcase_add_test(tc, test_context_errors);
    tcase_add_test(tc, test_dictionary_errors);
    tcase_add_test(tc, test_coefficients_errors);
    tcase_add_test(tc, test_compose_errors);
    tcase_add_test(tc, test_layer_create_errors);
    tcase_add_test(tc, test_layer_set_errors);
    tcase_add_test(tc, test_size_query_errors);
    tcase_add_test(tc, test_forward_errors);
    tcase_add_test(tc, test_backward_errors);
    tcase_add_test(tc, test_reserve_mismatch);
    tcase_add_test(tc, test_grad_overlap);
    tcase_add_test(tc, test_truncated_context_options);
    tcase_add_test(tc, test_truncated_layer_options);
    tcase_add_test(tc, test_truncated_grads);
    tcase_add_test(tc, test_out_of_memory);
    suite_add_tcase(s, tc);
    return tu_run_suite(s);
}
