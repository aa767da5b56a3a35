/*
 * Compressed-model files: the writer's naming scheme and checks, the reader
 * (masa_model_open) and masa_model_apply against layers built directly from
 * the same parameters (forward outputs must agree bitwise: the same
 * computation on the same numbers).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "test_util.h"

enum { L = 5, D = 16, H = 2, S0 = 2, S1 = 1, R = 3, B = 2, T = 4 };

static masa_context *ctx;
static char dir[256], path[300];
/* q: MASA, groups [0, 3) with S0 atoms and [3, 5) with S1, low-rank on
 * layers 1 and 4; k: dense, low-rank on layer 2; v: low-rank only (rank 2);
 * o: not in the file. */
static float atoms0[S0 * D * D], atoms1[S1 * D * D], coef0[3 * S0], coef1[2 * S1];
static float qa[L][D * R], qb[L][R * D];
static float kw[L][D * D], ka[D * R], kb[R * D];
static float va[L][D * 2], vb[L][2 * D];

static void setup(void)
{
    ck_assert_int_eq(masa_context_create(NULL, &ctx), MASA_OK);
    snprintf(dir, sizeof dir, "/tmp/masa-model-XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(dir));
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    tu_rng r = {7};
    tu_fill(&r, atoms0, sizeof atoms0 / 4, -1, 1);
    tu_fill(&r, atoms1, sizeof atoms1 / 4, -1, 1);
    tu_fill(&r, coef0, sizeof coef0 / 4, -1, 1);
    tu_fill(&r, coef1, sizeof coef1 / 4, -1, 1);
    tu_fill(&r, &qa[0][0], sizeof qa / 4, -0.3f, 0.3f);
    tu_fill(&r, &qb[0][0], sizeof qb / 4, -0.3f, 0.3f);
    tu_fill(&r, &kw[0][0], sizeof kw / 4, -0.3f, 0.3f);
    tu_fill(&r, ka, sizeof ka / 4, -0.3f, 0.3f);
    tu_fill(&r, kb, sizeof kb / 4, -0.3f, 0.3f);
    tu_fill(&r, &va[0][0], sizeof va / 4, -0.3f, 0.3f);
    tu_fill(&r, &vb[0][0], sizeof vb / 4, -0.3f, 0.3f);
}

static void teardown(void)
{
    unlink(path);
    rmdir(dir);
    masa_context_destroy(ctx);
}

/* Writes the model above; returns the status of the first failing call. */
static masa_status write_model(const char *where)
{
    masa_dictionary *d0, *d1;
    masa_coefficients *c0, *c1;
    TU_OK(masa_dictionary_wrap(ctx, S0, D, D, atoms0, &d0));
    TU_OK(masa_dictionary_wrap(ctx, S1, D, D, atoms1, &d1));
    TU_OK(masa_coefficients_wrap(ctx, 3, S0, coef0, &c0));
    TU_OK(masa_coefficients_wrap(ctx, 2, S1, coef1, &c1));
    masa_model_writer *w;
    masa_status s = masa_model_writer_create(ctx, where, L, &w);
    if (s == MASA_OK)
        s = masa_model_writer_add_group(w, MASA_PROJ_Q, 0, d0, c0);
    if (s == MASA_OK)
        s = masa_model_writer_add_group(w, MASA_PROJ_Q, 3, d1, c1);
    for (size_t l = 1; s == MASA_OK && l < L; l += 3)
        s = masa_model_writer_add_lowrank(w, MASA_PROJ_Q, l, D, D, R, qa[l], qb[l]);
    for (size_t l = 0; s == MASA_OK && l < L; l++)
        s = masa_model_writer_add_dense(w, MASA_PROJ_K, l, D, D, kw[l]);
    if (s == MASA_OK)
        s = masa_model_writer_add_lowrank(w, MASA_PROJ_K, 2, D, D, R, ka, kb);
    for (size_t l = 0; s == MASA_OK && l < L; l++)
        s = masa_model_writer_add_lowrank(w, MASA_PROJ_V, l, D, D, 2, va[l], vb[l]);
    float extra[3] = {1, 2, 3};
    size_t three = 3;
    if (s == MASA_OK)
        s = masa_model_writer_add_tensor(w, "model.norm.weight", MASA_DTYPE_F32,
                                         1, &three, extra, sizeof extra);
    if (s == MASA_OK)
        s = masa_model_writer_set_metadata(w, "source", "test");
    if (s == MASA_OK)
        s = masa_model_writer_finish(w);
    masa_model_writer_destroy(w);
    masa_dictionary_destroy(d0);
    masa_dictionary_destroy(d1);
    masa_coefficients_destroy(c0);
    masa_coefficients_destroy(c1);
    return s;
}

static masa_layer *new_layer(void)
{
    masa_layer_options o;
    masa_layer_options_init(&o);
    o.d_model = D;
    o.n_heads = H;
    o.causal = 1;
    masa_layer *layer;
    TU_OK(masa_layer_create(ctx, &o, &layer));
    return layer;
}

static void forward(masa_layer *layer, const float *x, float *y)
{
    size_t ws;
    TU_OK(masa_layer_workspace_size(layer, B, T, &ws));
    void *work = malloc(ws);
    TU_OK(masa_layer_forward(layer, B, T, 0, x, y, work, ws, NULL, 0));
    free(work);
}

START_TEST(test_round_trip_and_apply)
{
    TU_OK(write_model(path));
    masa_model *m;
    TU_OK(masa_model_open(ctx, path, &m));
    size_t n, d_in, d_out, groups, first, count, rank;
    masa_model_kind kind;
    TU_OK(masa_model_layers(m, &n));
    ck_assert_uint_eq(n, L);
    TU_OK(masa_model_projection(m, MASA_PROJ_Q, &kind, &d_in, &d_out, &groups));
    ck_assert(kind == MASA_MODEL_MASA && d_in == D && d_out == D && groups == 2);
    TU_OK(masa_model_projection(m, MASA_PROJ_K, &kind, NULL, NULL, &groups));
    ck_assert(kind == MASA_MODEL_DENSE && groups == 0);
    TU_OK(masa_model_projection(m, MASA_PROJ_V, &kind, NULL, NULL, NULL));
    ck_assert(kind == MASA_MODEL_LOWRANK);
    TU_OK(masa_model_projection(m, MASA_PROJ_O, &kind, &d_in, NULL, NULL));
    ck_assert(kind == MASA_MODEL_ABSENT && d_in == 0);

    masa_dictionary *dict;
    masa_coefficients *coef;
    TU_OK(masa_model_group(m, MASA_PROJ_Q, 1, &first, &count, &dict, &coef));
    ck_assert(first == 3 && count == 2);
    size_t sa, sr, sc;
    TU_OK(masa_dictionary_shape(dict, &sa, &sr, &sc));
    ck_assert(sa == S1 && sr == D && sc == D);
    ck_assert(memcmp(masa_dictionary_data(dict), atoms1, sizeof atoms1) == 0);
    ck_assert(memcmp(masa_coefficients_data(coef), coef1, sizeof coef1) == 0);
    float *a, *b, *w;
    TU_OK(masa_model_lowrank(m, MASA_PROJ_Q, 4, &rank, &a, &b));
    ck_assert(rank == R && memcmp(a, qa[4], sizeof qa[4]) == 0 &&
              memcmp(b, qb[4], sizeof qb[4]) == 0);
    TU_OK(masa_model_lowrank(m, MASA_PROJ_Q, 0, &rank, &a, &b));
    ck_assert(rank == 0 && a == NULL && b == NULL);
    TU_OK(masa_model_dense(m, MASA_PROJ_K, 3, &w));
    ck_assert(memcmp(w, kw[3], sizeof kw[3]) == 0);
    ck_assert_int_eq(masa_model_dense(m, MASA_PROJ_Q, 3, &w), MASA_ERROR_INVALID_ARGUMENT);
    ck_assert_int_eq(masa_model_group(m, MASA_PROJ_Q, 2, NULL, NULL, NULL, NULL),
                     MASA_ERROR_OUT_OF_RANGE);
    ck_assert_int_eq(masa_model_lowrank(m, MASA_PROJ_Q, L, &rank, NULL, NULL),
                     MASA_ERROR_OUT_OF_RANGE);
    const char *v;
    TU_OK(masa_safetensors_metadata_get(masa_model_file(m), "source", &v));
    ck_assert_str_eq(v, "test");

    /* Every layer: the model's layer against one built by hand. */
    masa_dictionary *hd0, *hd1;
    masa_coefficients *hc0, *hc1;
    TU_OK(masa_dictionary_wrap(ctx, S0, D, D, atoms0, &hd0));
    TU_OK(masa_dictionary_wrap(ctx, S1, D, D, atoms1, &hd1));
    TU_OK(masa_coefficients_wrap(ctx, 3, S0, coef0, &hc0));
    TU_OK(masa_coefficients_wrap(ctx, 2, S1, coef1, &hc1));
    float x[B * T * D], y1[B * T * D], y2[B * T * D], ow[D * D];
    tu_rng r = {3};
    tu_fill(&r, x, B * T * D, -1, 1);
    tu_fill(&r, ow, D * D, -0.3f, 0.3f);
    for (size_t l = 0; l < L; l++) {
        masa_layer *got = new_layer(), *want = new_layer();
        TU_OK(masa_layer_set_dense(got, MASA_PROJ_O, ow));
        TU_OK(masa_model_apply(m, l, got));
        if (l < 3)
            TU_OK(masa_layer_set_masa(want, MASA_PROJ_Q, hd0, hc0, l));
        else
            TU_OK(masa_layer_set_masa(want, MASA_PROJ_Q, hd1, hc1, l - 3));
        if (l == 1 || l == 4)
            TU_OK(masa_layer_set_lowrank(want, MASA_PROJ_Q, R, qa[l], qb[l]));
        TU_OK(masa_layer_set_dense(want, MASA_PROJ_K, kw[l]));
        if (l == 2)
            TU_OK(masa_layer_set_lowrank(want, MASA_PROJ_K, R, ka, kb));
        TU_OK(masa_layer_set_lowrank(want, MASA_PROJ_V, 2, va[l], vb[l]));
        TU_OK(masa_layer_set_dense(want, MASA_PROJ_O, ow));
        forward(got, x, y1);
        forward(want, x, y2);
        ck_assert_msg(memcmp(y1, y2, sizeof y1) == 0, "layer %zu differs", l);
        masa_layer_destroy(got);
        masa_layer_destroy(want);
    }
    masa_dictionary_destroy(hd0);
    masa_dictionary_destroy(hd1);
    masa_coefficients_destroy(hc0);
    masa_coefficients_destroy(hc1);

    /* apply refuses a layer of other shapes, changing nothing */
    masa_layer_options o;
    masa_layer_options_init(&o);
    o.d_model = 2 * D;
    o.n_heads = H;
    masa_layer *wide;
    TU_OK(masa_layer_create(ctx, &o, &wide));
    ck_assert_int_eq(masa_model_apply(m, 0, wide), MASA_ERROR_BAD_SHAPE);
    ck_assert(strstr(masa_last_error(), "projection q"));
    ck_assert_ptr_null(masa_layer_weight(wide, MASA_PROJ_K));
    masa_layer_destroy(wide);
    masa_layer *ok = new_layer();
    ck_assert_int_eq(masa_model_apply(m, L, ok), MASA_ERROR_OUT_OF_RANGE);
    ck_assert_int_eq(masa_model_apply(NULL, 0, ok), MASA_ERROR_NULL_ARGUMENT);
    masa_layer_destroy(ok);
    masa_model_close(m);
    masa_model_close(NULL);
}
END_TEST

START_TEST(test_writer_checks)
{
    masa_dictionary *d0;
    masa_coefficients *c0, *c_other;
    TU_OK(masa_dictionary_wrap(ctx, S0, D, D, atoms0, &d0));
    TU_OK(masa_coefficients_wrap(ctx, 3, S0, coef0, &c0));
    TU_OK(masa_coefficients_wrap(ctx, 2, S1, coef1, &c_other));
    masa_model_writer *w = (masa_model_writer *)1;
    ck_assert_int_eq(masa_model_writer_create(ctx, path, 0, &w), MASA_ERROR_BAD_SHAPE);
    ck_assert_ptr_null(w);
    TU_OK(masa_model_writer_create(ctx, path, L, &w));
    /* groups start at layer 0 and go in order */
    ck_assert_int_eq(masa_model_writer_add_group(w, MASA_PROJ_Q, 1, d0, c0),
                     MASA_ERROR_INVALID_ARGUMENT);
    ck_assert_int_eq(masa_model_writer_add_group(w, MASA_PROJ_Q, 0, d0, c_other),
                     MASA_ERROR_BAD_SHAPE);
    ck_assert_int_eq(masa_model_writer_add_group(w, (masa_projection)4, 0, d0, c0),
                     MASA_ERROR_OUT_OF_RANGE);
    TU_OK(masa_model_writer_add_group(w, MASA_PROJ_Q, 0, d0, c0));
    ck_assert_int_eq(masa_model_writer_add_group(w, MASA_PROJ_Q, 3, d0, c0),
                     MASA_ERROR_OUT_OF_RANGE); /* 3 + 3 > 5 layers */
    ck_assert_int_eq(masa_model_writer_add_dense(w, MASA_PROJ_Q, 4, D, D, kw[0]),
                     MASA_ERROR_INVALID_ARGUMENT);
    ck_assert_int_eq(masa_model_writer_add_lowrank(w, MASA_PROJ_Q, 0, D, 8, 2, qa[0], qb[0]),
                     MASA_ERROR_BAD_SHAPE); /* another shape */
    ck_assert_int_eq(masa_model_writer_add_lowrank(w, MASA_PROJ_Q, 0, D, D, 0, qa[0], qb[0]),
                     MASA_ERROR_BAD_SHAPE);
    ck_assert_int_eq(masa_model_writer_add_lowrank(w, MASA_PROJ_Q, 0, D, D, D + 1, qa[0], qb[0]),
                     MASA_ERROR_BAD_SHAPE);
    TU_OK(masa_model_writer_add_dense(w, MASA_PROJ_K, 0, D, D, kw[0]));
    ck_assert_int_eq(masa_model_writer_add_dense(w, MASA_PROJ_K, 0, D, D, kw[0]),
                     MASA_ERROR_INVALID_ARGUMENT);
    ck_assert_int_eq(masa_model_writer_add_group(w, MASA_PROJ_K, 0, d0, c0),
                     MASA_ERROR_INVALID_ARGUMENT);
    ck_assert_int_eq(masa_model_writer_add_tensor(w, "masa.q.x", MASA_DTYPE_F32, 0,
                                                  NULL, kw[0], 4),
                     MASA_ERROR_INVALID_ARGUMENT);
    ck_assert_int_eq(masa_model_writer_set_metadata(w, "masa.model", "{}"),
                     MASA_ERROR_INVALID_ARGUMENT);
    /* incomplete: q covers layers 0..2 only */
    ck_assert_int_eq(masa_model_writer_finish(w), MASA_ERROR_INVALID_ARGUMENT);
    ck_assert(strstr(masa_last_error(), "projection q: layer 3 has no MASA group"));
    ck_assert_int_eq(access(path, F_OK), -1); /* nothing written */
    masa_model_writer_destroy(w);
    masa_dictionary_destroy(d0);
    masa_coefficients_destroy(c0);
    masa_coefficients_destroy(c_other);
}
END_TEST

/* Writes a safetensors file with the given masa.model text and one tensor. */
static void write_raw(const char *model_json, const char *tensor, size_t rows)
{
    masa_safetensors_writer *w;
    TU_OK(masa_safetensors_writer_create(ctx, path, &w));
    if (model_json)
        TU_OK(masa_safetensors_writer_set_metadata(w, "masa.model", model_json));
    size_t shape[2] = {rows, 2};
    float data[8] = {0};
    if (tensor)
        TU_OK(masa_safetensors_writer_add(w, tensor, MASA_DTYPE_F32, 2, shape,
                                          data, rows * 2 * sizeof(float)));
    TU_OK(masa_safetensors_writer_finish(w));
    masa_safetensors_writer_destroy(w);
}

START_TEST(test_reader_checks)
{
    static const struct {
        const char *json, *tensor;
        size_t rows;
        const char *message;
    } cases[] = {
        {NULL, NULL, 0, "not a compressed model"},
        {"[", NULL, 0, "not valid JSON"},
        {"{\"format_version\":2,\"n_layers\":1,\"projections\":{}}", NULL, 0, "format_version 2"},
        {"{\"n_layers\":1,\"projections\":{}}", NULL, 0, "no format_version"},
        {"{\"format_version\":1,\"n_layers\":0,\"projections\":{}}", NULL, 0, "n_layers"},
        {"{\"format_version\":1,\"n_layers\":1,\"projections\":{\"x\":{}}}", NULL, 0, "other than q"},
        {"{\"format_version\":1,\"n_layers\":1,\"projections\":{\"q\":{\"kind\":\"fancy\"}}}", NULL, 0, "kind"},
        {"{\"format_version\":1,\"n_layers\":1,\"projections\":{\"q\":{\"kind\":\"dense\",\"d_in\":4,\"d_out\":2,\"ranks\":[0,0]}}}", NULL, 0, "ranks"},
        {"{\"format_version\":1,\"n_layers\":1,\"projections\":{\"q\":{\"kind\":\"dense\",\"d_in\":4,\"d_out\":2,\"ranks\":[3]}}}", NULL, 0, "rank"},
        {"{\"format_version\":1,\"n_layers\":1,\"projections\":{\"q\":{\"kind\":\"dense\",\"d_in\":4,\"d_out\":2,\"ranks\":[0]}}}", NULL, 0, "\"masa.q.layer0.weight\" is missing"},
        {"{\"format_version\":1,\"n_layers\":1,\"projections\":{\"q\":{\"kind\":\"dense\",\"d_in\":4,\"d_out\":2,\"ranks\":[0]}}}", "masa.q.layer0.weight", 3, "not F32 of the shape"},
        {"{\"format_version\":1,\"n_layers\":2,\"projections\":{\"q\":{\"kind\":\"masa\",\"d_in\":4,\"d_out\":2,\"groups\":[[0,1,1],[0,1,1]],\"ranks\":[0,0]}}}", NULL, 0, "tile"},
        {"{\"format_version\":1,\"n_layers\":2,\"projections\":{\"q\":{\"kind\":\"masa\",\"d_in\":4,\"d_out\":2,\"groups\":[[0,1,1]],\"ranks\":[0,0]}}}", NULL, 0, "cover every layer"},
        {"{\"format_version\":1,\"n_layers\":1,\"projections\":{\"q\":{\"kind\":\"lowrank\",\"d_in\":4,\"d_out\":2,\"ranks\":[0]}}}", NULL, 0, "rank 0"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        write_raw(cases[i].json, cases[i].tensor, cases[i].rows);
        masa_model *m = (masa_model *)1;
        masa_status s = masa_model_open(ctx, path, &m);
        ck_assert_msg(s == MASA_ERROR_BAD_FORMAT && m == NULL, "case %zu: %d", i, (int)s);
        ck_assert_msg(strstr(masa_last_error(), cases[i].message) &&
                          strstr(masa_last_error(), path),
                      "case %zu: \"%s\" lacks \"%s\"", i, masa_last_error(),
                      cases[i].message);
    }
    /* the valid dense one-layer model */
    write_raw("{\"format_version\":1,\"n_layers\":1,\"projections\":{\"q\":{\"kind\":\"dense\",\"d_in\":4,\"d_out\":2,\"ranks\":[0]}}}",
              "masa.q.layer0.weight", 4);
    masa_model *m;
    TU_OK(masa_model_open(ctx, path, &m));
    masa_model_close(m);
    ck_assert_int_eq(masa_model_open(ctx, NULL, &m), MASA_ERROR_NULL_ARGUMENT);
    ck_assert_int_eq(masa_model_open(ctx, "/nonexistent/x", &m), MASA_ERROR_IO);
}
END_TEST

START_TEST(test_calibration_entries)
{
    enum { DIM = 6 };
    masa_calib *c1, *c2;
    TU_OK(masa_calib_create(ctx, DIM, &c1));
    TU_OK(masa_calib_create(ctx, 3, &c2));
    float x[10 * DIM];
    tu_rng r = {11};
    tu_fill(&r, x, 10 * DIM, -1, 1);
    TU_OK(masa_calib_accumulate(c1, x, 10));
    TU_OK(masa_calib_accumulate(c2, x, 4 * DIM / 3));
    /* statistics alone: a model writer without projections */
    masa_model_writer *w;
    TU_OK(masa_model_writer_create(ctx, path, L, &w));
    TU_OK(masa_model_writer_add_calib(w, "layer0.qkv", c1));
    TU_OK(masa_model_writer_add_calib(w, "layer0.o", c2));
    ck_assert_int_eq(masa_model_writer_add_calib(w, "layer0.o", c2),
                     MASA_ERROR_INVALID_ARGUMENT);
    ck_assert(strstr(masa_last_error(), "added twice"));
    ck_assert_int_eq(masa_model_writer_add_calib(w, "", c2), MASA_ERROR_INVALID_ARGUMENT);
    ck_assert_int_eq(masa_model_writer_add_calib(w, "x", NULL), MASA_ERROR_NULL_ARGUMENT);
    TU_OK(masa_model_writer_finish(w));
    ck_assert_int_eq(masa_model_writer_add_calib(w, "late", c2),
                     MASA_ERROR_INVALID_ARGUMENT);
    masa_model_writer_destroy(w);

    masa_model *m;
    TU_OK(masa_model_open(ctx, path, &m));
    ck_assert_uint_eq(masa_model_calib_count(m), 2);
    const char *name;
    TU_OK(masa_model_calib_name(m, 1, &name));
    ck_assert_str_eq(name, "layer0.o");
    ck_assert_int_eq(masa_model_calib_name(m, 2, &name), MASA_ERROR_OUT_OF_RANGE);
    masa_calib *back;
    TU_OK(masa_model_calib(m, "layer0.qkv", &back));
    size_t dim;
    uint64_t rows;
    TU_OK(masa_calib_shape(back, &dim, &rows));
    ck_assert(dim == DIM && rows == 10);
    ck_assert(memcmp(masa_calib_data(back), masa_calib_data(c1),
                     DIM * DIM * sizeof(double)) == 0);
    masa_calib_destroy(back);
    ck_assert_int_eq(masa_model_calib(m, "nope", &back), MASA_ERROR_NOT_FOUND);
    ck_assert_ptr_null(back);
    masa_model_kind kind;
    TU_OK(masa_model_projection(m, MASA_PROJ_Q, &kind, NULL, NULL, NULL));
    ck_assert_int_eq(kind, MASA_MODEL_ABSENT);
    masa_model_close(m);

    /* a listed entry whose tensors are missing or of the wrong kind */
    write_raw("{\"format_version\":1,\"n_layers\":1,\"projections\":{},\"calibration\":[\"a\"]}",
              NULL, 0);
    ck_assert_int_eq(masa_model_open(ctx, path, &m), MASA_ERROR_BAD_FORMAT);
    ck_assert(strstr(masa_last_error(), "\"masa.calib.a.matrix\" is missing"));
    write_raw("{\"format_version\":1,\"n_layers\":1,\"projections\":{},\"calibration\":[\"a\"]}",
              "masa.calib.a.matrix", 2);
    ck_assert_int_eq(masa_model_open(ctx, path, &m), MASA_ERROR_BAD_FORMAT);
    ck_assert(strstr(masa_last_error(), "is not F64 [dim, dim]"));
    masa_calib_destroy(c1);
    masa_calib_destroy(c2);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("model");
    TCase *tc = tcase_create("core");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_round_trip_and_apply);
    tcase_add_test(tc, test_writer_checks);
    tcase_add_test(tc, test_reader_checks);
    tcase_add_test(tc, test_calibration_entries);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
