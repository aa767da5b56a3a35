/*
 * Incremental decoding with a key/value cache: decoding a sequence in
 * chunks (a prefill chunk, then tokens) gives the y of masa_layer_forward()
 * on the whole sequence (causal, pos_offset 0) and of the double reference,
 * over MHA/GQA/MQA, MASA (factored and composed paths) and dense
 * projections, biases, RoPE, batch > 1, 1 and 2 threads (with the
 * flash-decoding split), many heads per key/value head, and prefill chunks
 * large enough for the BLIS paths. Then the cache handle (reset, truncate,
 * ownership), NaN isolation and every error path.
 *
 * Tolerance: as tests/test_layer.c, max|got - ref| <= 1e-4 * max|ref|. The
 * decode path sums in another order than forward (online softmax over key
 * blocks, split partial sums), which moves results by float rounding only
 * (~1e-6 of the magnitude); a wrong position, mask or head changes them at
 * the 1e-1 level.
 *
 * Workspaces and cache memory start as NaN bytes (tu_garbage), so reading
 * anything the library has not written shows up as NaN.
 */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "test_util.h"

#define RTOL 1e-4
#define MAX_CHUNKS 8

typedef struct dcase {
    const char *name;
    tu_spec s;
    size_t batch, threads;
    size_t chunks[MAX_CHUNKS]; /* new tokens per call, 0-terminated */
} dcase;

static const dcase cases[] = {
    {"mha_dense_rope_tokens", {.d_model = 8, .n_heads = 2, .causal = 1,
      .rope = 1, .n_atoms = 1, .n_layers = 1, .wrap = 1}, 1, 1,
     {1, 1, 1, 1, 1, 1}},
    {"mha_masa_bias_batch2_2thr", {.d_model = 8, .n_heads = 2, .causal = 1,
      .rope = 1, .masa_mask = 0xF, .bias_mask = 0xF, .n_atoms = 3,
      .n_layers = 3, .layer_index = 1, .wrap = 1}, 2, 2, {3, 1, 1, 2}},
    {"gqa_mixed_theta", {.d_model = 12, .n_heads = 4, .n_kv_heads = 2,
      .head_dim = 4, .causal = 1, .rope = 1, .rope_theta = 500.0f,
      .masa_mask = 0x5, .bias_mask = 0x9, .n_atoms = 3, .n_layers = 4,
      .layer_index = 3, .wrap = 0}, 2, 1, {2, 1, 1, 1}},
    {"gqa_mixed_theta_2thr", {.d_model = 12, .n_heads = 4, .n_kv_heads = 2,
      .head_dim = 4, .causal = 1, .rope = 1, .rope_theta = 500.0f,
      .masa_mask = 0x5, .bias_mask = 0x9, .n_atoms = 3, .n_layers = 4,
      .layer_index = 3, .wrap = 0}, 2, 2, {2, 1, 1, 1}},
    {"mqa_no_rope_scale", {.d_model = 12, .n_heads = 4, .n_kv_heads = 1,
      .head_dim = 3, .causal = 1, .softmax_scale = 0.7f, .masa_mask = 0xF,
      .bias_mask = 0x6, .n_atoms = 2, .n_layers = 2, .layer_index = 1,
      .wrap = 1}, 3, 2, {1, 4, 1}},
    /* one sequence, one key/value head: from 512 cached keys on, a token's
     * attention is worth splitting across threads (4 splits of the key
     * range); the prefill rows (4 tokens x 16 heads = 64) use BLIS and cross
     * key blocks of 256 */
    {"mqa_split_long", {.d_model = 128, .n_heads = 16, .n_kv_heads = 1,
      .head_dim = 8, .causal = 1, .rope = 1, .masa_mask = 0x3,
      .bias_mask = 0x1, .n_atoms = 2, .n_layers = 2, .wrap = 0}, 1, 2,
     {520, 1, 1, 5, 1}},
    {"mqa_split_long_1thr", {.d_model = 128, .n_heads = 16, .n_kv_heads = 1,
      .head_dim = 8, .causal = 1, .rope = 1, .masa_mask = 0x3,
      .bias_mask = 0x1, .n_atoms = 2, .n_layers = 2, .wrap = 0}, 1, 1,
     {520, 1, 1, 5, 1}},
    /* MHA prefill over two row tiles (64 + 36 rows, BLIS), then tokens */
    {"mha_prefill_tiles", {.d_model = 16, .n_heads = 2, .head_dim = 8,
      .causal = 1, .rope = 1, .masa_mask = 0x9, .bias_mask = 0xF,
      .n_atoms = 2, .n_layers = 3, .layer_index = 2, .wrap = 1}, 2, 2,
     {100, 1, 2, 1}},
    /* 66 query heads per key/value head: units wider than a row tile */
    {"mqa_66_heads", {.d_model = 8, .n_heads = 66, .n_kv_heads = 1,
      .head_dim = 2, .causal = 1, .rope = 1, .masa_mask = 0x2,
      .n_atoms = 2, .n_layers = 1, .wrap = 1}, 1, 2, {3, 1, 1}},
    /* S = 8: one row runs factored, 2 and 40 rows compose W first; d 192:
     * the factored products (294912 multiply-adds) are split across
     * threads */
    {"masa_s8_paths", {.d_model = 192, .n_heads = 4, .causal = 1, .rope = 1,
      .masa_mask = 0xF, .bias_mask = 0x5, .n_atoms = 8, .n_layers = 8,
      .layer_index = 5, .wrap = 0}, 1, 2, {40, 1, 1, 2}},
    /* d 256: the 130-row prefill is split by rows across the pool, the
     * 4-row chunk along the inner dimension (partial sums), single tokens
     * too (gemv blocks) */
    {"dense_wide_prefill", {.d_model = 256, .n_heads = 4, .n_kv_heads = 2,
      .causal = 1, .rope = 1, .masa_mask = 0x0, .bias_mask = 0x8,
      .n_atoms = 1, .n_layers = 1, .wrap = 1}, 1, 2, {130, 1, 4, 1}},
    /* more atoms than output columns: composing W is cheaper even for one
     * row */
    {"masa_many_atoms_narrow", {.d_model = 4, .n_heads = 2, .n_kv_heads = 1,
      .causal = 1, .rope = 1, .masa_mask = 0xF, .bias_mask = 0x2,
      .n_atoms = 6, .n_layers = 2, .layer_index = 1, .wrap = 1}, 2, 2,
     {1, 1, 2, 1}},
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

static size_t chunk_total(const size_t *chunks, size_t *max_chunk)
{
    size_t total = 0, mx = 0;
    for (size_t i = 0; i < MAX_CHUNKS && chunks[i]; i++) {
        total += chunks[i];
        if (chunks[i] > mx)
            mx = chunks[i];
    }
    if (max_chunk)
        *max_chunk = mx;
    return total;
}

/* A cache over NaN-filled memory and a workspace sized for max_new tokens. */
typedef struct session {
    masa_kv_cache *cache;
    void *mem, *ws;
    size_t mem_bytes, ws_bytes;
} session;

static void session_open(session *s, const masa_layer *layer, size_t batch,
                         size_t max_seq, size_t max_new)
{
    TU_OK(masa_kv_cache_size(layer, batch, max_seq, &s->mem_bytes));
    s->mem = tu_garbage(s->mem_bytes);
    TU_OK(masa_kv_cache_create(layer, batch, max_seq, s->mem, s->mem_bytes,
                               &s->cache));
    TU_OK(masa_layer_decode_workspace_size(layer, batch, max_new,
                                           &s->ws_bytes));
    s->ws = tu_garbage(s->ws_bytes);
}

static void session_close(session *s)
{
    masa_kv_cache_destroy(s->cache);
    free(s->mem);
    free(s->ws);
}

/* Decodes x ([B, total, d]) in the given chunks into y ([B, total, d]). */
static void decode_chunks(const masa_layer *layer, session *s, size_t B,
                          size_t d, const size_t *chunks, const float *x,
                          float *y)
{
    size_t total = chunk_total(chunks, NULL), at = 0;
    for (size_t c = 0; c < MAX_CHUNKS && chunks[c]; c++) {
        size_t n = chunks[c], len = 0;
        float *xc = tu_falloc(B * n * d), *yc = tu_falloc(B * n * d);
        for (size_t b = 0; b < B; b++)
            memcpy(xc + b * n * d, x + (b * total + at) * d,
                   n * d * sizeof(float));
        tu_fill_garbage(s->ws, s->ws_bytes); /* no state in the workspace */
        TU_OK(masa_layer_decode(layer, s->cache, B, n, xc, yc, s->ws,
                                s->ws_bytes));
        at += n;
        TU_OK(masa_kv_cache_length(s->cache, &len));
        ck_assert_uint_eq(len, at);
        for (size_t b = 0; b < B; b++)
            memcpy(y + (b * total + at - n) * d, yc + b * n * d,
                   n * d * sizeof(float));
        free(xc);
        free(yc);
    }
}

START_TEST(test_case)
{
    const dcase *c = &cases[_i];
    masa_context *ctx = ctx_with(c->threads);
    tu_layer t;
    tu_layer_init(&t, ctx, &c->s, 3000 + (uint64_t)_i);
    tu_rng rng = {400 + (uint64_t)_i};
    size_t max_new, T = chunk_total(c->chunks, &max_new), B = c->batch;
    size_t d = t.cfg.d_model, n = B * T * d;
    float *x = tu_falloc(n), *y = tu_falloc(n), *y_fwd = tu_falloc(n);
    tu_fill(&rng, x, n, -1, 1);

    /* The whole sequence through forward, and the double reference. */
    size_t wsb = tu_workspace_bytes(&t, B, T);
    void *ws = tu_garbage(wsb);
    TU_OK(masa_layer_forward(t.layer, B, T, 0, x, y_fwd, ws, wsb, NULL, 0));
    tu_ref_out ref;
    tu_reference(&t, B, T, 0, x, NULL, &ref);

    /* max_seq one larger than needed: a cache need not be full. */
    session s;
    session_open(&s, t.layer, B, T + 1, max_new);
    decode_chunks(t.layer, &s, B, d, c->chunks, x, y);
    TU_ASSERT_CLOSE("decode vs reference", y, ref.y, n, RTOL);
    TU_ASSERT_CLOSE_FF("decode vs forward", y, y_fwd, n, RTOL);

    /* Reset and decode again one token at a time: same outputs. */
    size_t ones[MAX_CHUNKS] = {0};
    if (T <= MAX_CHUNKS) {
        for (size_t i = 0; i < T; i++)
            ones[i] = 1;
        float *y1 = tu_falloc(n);
        TU_OK(masa_kv_cache_reset(s.cache));
        decode_chunks(t.layer, &s, B, d, ones, x, y1);
        TU_ASSERT_CLOSE_FF("token by token vs chunks", y1, y, n, RTOL);
        free(y1);
    }

    session_close(&s);
    tu_ref_out_free(&ref);
    free(ws);
    free(x);
    free(y);
    free(y_fwd);
    tu_layer_fini(&t);
    masa_context_destroy(ctx);
}
END_TEST

/* One and two threads decode the same outputs, and two threads on the
 * split path agree with one thread without it. */
START_TEST(test_threads_agree)
{
    tu_spec sp = {.d_model = 128, .n_heads = 16, .n_kv_heads = 1,
                  .head_dim = 8, .causal = 1, .rope = 1, .masa_mask = 0x5,
                  .bias_mask = 0x3, .n_atoms = 4, .n_layers = 2,
                  .layer_index = 1, .wrap = 0};
    size_t B = 1, T = 600, d = 128, n = B * T * d;
    size_t chunks[MAX_CHUNKS] = {550, 1, 1, 1, 47};
    float *x = tu_falloc(n), *y[2] = {tu_falloc(n), tu_falloc(n)};
    tu_rng rng = {91};
    tu_fill(&rng, x, n, -1, 1);
    for (int k = 0; k < 2; k++) {
        masa_context *ctx = ctx_with((size_t)k + 1);
        tu_layer t;
        tu_layer_init(&t, ctx, &sp, 92); /* same seed: same parameters */
        session s;
        session_open(&s, t.layer, B, T, 550);
        decode_chunks(t.layer, &s, B, d, chunks, x, y[k]);
        session_close(&s);
        tu_layer_fini(&t);
        masa_context_destroy(ctx);
    }
    TU_ASSERT_CLOSE_FF("2 threads vs 1", y[1], y[0], n, 1e-5);
    free(x);
    free(y[0]);
    free(y[1]);
}
END_TEST

/* Truncating drops the last tokens; decoding them again reproduces them.
 * Decoding other tokens after a truncate matches forward on the edited
 * sequence. */
START_TEST(test_truncate_regenerate)
{
    tu_spec sp = {.d_model = 8, .n_heads = 2, .n_kv_heads = 1, .causal = 1,
                  .rope = 1, .masa_mask = 0xF, .n_atoms = 2, .n_layers = 1,
                  .wrap = 1};
    masa_context *ctx = ctx_with(2);
    tu_layer t;
    tu_layer_init(&t, ctx, &sp, 17);
    size_t B = 2, T = 6, d = 8, n = B * T * d, len = 0;
    float *x = tu_falloc(n), *y = tu_falloc(n), *y2 = tu_falloc(n);
    tu_rng rng = {18};
    tu_fill(&rng, x, n, -1, 1);
    session s;
    session_open(&s, t.layer, B, T, 4);
    size_t all[MAX_CHUNKS] = {4, 2};
    decode_chunks(t.layer, &s, B, d, all, x, y);

    /* back to 4 positions: the last two tokens again */
    TU_OK(masa_kv_cache_truncate(s.cache, 4));
    TU_OK(masa_kv_cache_length(s.cache, &len));
    ck_assert_uint_eq(len, 4);
    float xt[2 * 2 * 8], yt[2 * 2 * 8], expect[2 * 2 * 8];
    for (size_t b = 0; b < B; b++) {
        memcpy(xt + b * 2 * d, x + (b * T + 4) * d, 2 * d * sizeof(float));
        memcpy(expect + b * 2 * d, y + (b * T + 4) * d, 2 * d * sizeof(float));
    }
    TU_OK(masa_layer_decode(t.layer, s.cache, B, 2, xt, yt, s.ws, s.ws_bytes));
    TU_ASSERT_CLOSE_FF("regenerated tokens", yt, expect, 2 * 2 * d, RTOL);

    /* edit token 5 and compare with forward over the edited sequence */
    TU_OK(masa_kv_cache_truncate(s.cache, 5));
    for (size_t b = 0; b < B; b++)
        for (size_t i = 0; i < d; i++)
            x[(b * T + 5) * d + i] = 0.25f * (float)i - 0.5f;
    float xe[2 * 8], ye[2 * 8];
    for (size_t b = 0; b < B; b++)
        memcpy(xe + b * d, x + (b * T + 5) * d, d * sizeof(float));
    TU_OK(masa_layer_decode(t.layer, s.cache, B, 1, xe, ye, s.ws, s.ws_bytes));
    size_t wsb = tu_workspace_bytes(&t, B, T);
    void *ws = tu_garbage(wsb);
    TU_OK(masa_layer_forward(t.layer, B, T, 0, x, y2, ws, wsb, NULL, 0));
    for (size_t b = 0; b < B; b++)
        TU_ASSERT_CLOSE_FF("edited token", ye + b * d, y2 + (b * T + 5) * d,
                           d, RTOL);
    free(ws);
    session_close(&s);
    free(x);
    free(y);
    free(y2);
    tu_layer_fini(&t);
    masa_context_destroy(ctx);
}
END_TEST

/* A NaN in a new token reaches only that token and later ones, on the
 * loop path (tokens) and the BLIS path (a 64-row prefill tile). */
START_TEST(test_nan_isolation)
{
    tu_spec sp = {.d_model = 16, .n_heads = 2, .head_dim = 8, .causal = 1,
                  .rope = 1, .masa_mask = 0x3, .n_atoms = 2, .n_layers = 1,
                  .wrap = 1};
    masa_context *ctx = ctx_with(2);
    tu_layer t;
    tu_layer_init(&t, ctx, &sp, 23);
    size_t T = 80, d = 16, bad = 50;
    float *x = tu_falloc(T * d), *y = tu_falloc(T * d);
    float *y_fwd = tu_falloc(T * d);
    tu_rng rng = {24};
    tu_fill(&rng, x, T * d, -1, 1);
    x[bad * d + 3] = NAN;
    size_t wsb = tu_workspace_bytes(&t, 1, T);
    void *ws = tu_garbage(wsb);
    TU_OK(masa_layer_forward(t.layer, 1, T, 0, x, y_fwd, ws, wsb, NULL, 0));
    size_t plans[2][MAX_CHUNKS] = {{70, 10}, {40, 1, 1, 1, 1, 1, 1, 34}};
    for (int k = 0; k < 2; k++) {
        session s;
        session_open(&s, t.layer, 1, T, 70);
        decode_chunks(t.layer, &s, 1, d, plans[k], x, y);
        for (size_t i = 0; i < T * d; i++)
            ck_assert_msg(i < bad * d ? isfinite(y[i]) : isnan(y[i]),
                          "plan %d: y[token %zu][%zu] = %g", k, i / d, i % d,
                          (double)y[i]);
        TU_ASSERT_CLOSE_FF("clean tokens", y, y_fwd, bad * d, RTOL);
        session_close(&s);
    }
    free(ws);
    free(x);
    free(y);
    free(y_fwd);
    tu_layer_fini(&t);
    masa_context_destroy(ctx);
}
END_TEST

/* ---- errors ---- */

static void expect_(const char *file, int line, const char *call,
                    masa_status got, masa_status want)
{
    const char *msg = masa_last_error();
    ck_assert_msg(got == want, "%s:%d %s -> %d (%s), expected %d (%s): '%s'",
                  file, line, call, (int)got, masa_status_string(got),
                  (int)want, masa_status_string(want), msg);
    ck_assert_msg(msg[0] != '\0', "%s:%d %s: no message", file, line, call);
}
#define EXPECT(call, st) expect_(__FILE__, __LINE__, #call, (call), (st))

static masa_layer *plain_layer(masa_context *ctx, size_t d, size_t h,
                               size_t kv, int causal)
{
    masa_layer_options o;
    masa_layer_options_init(&o);
    o.d_model = d;
    o.n_heads = h;
    o.n_kv_heads = kv;
    o.causal = causal;
    o.rope = 1;
    masa_layer *l = NULL;
    TU_OK(masa_layer_create(ctx, &o, &l));
    return l;
}

static void set_all_dense(masa_layer *l)
{
    for (int p = 0; p < 4; p++)
        TU_OK(masa_layer_set_dense(l, (masa_projection)p, NULL));
}

START_TEST(test_cache_errors)
{
    masa_context *ctx = ctx_with(1);
    masa_layer *l = plain_layer(ctx, 8, 2, 1, 1);
    masa_layer *nc = plain_layer(ctx, 8, 2, 1, 0);
    size_t bytes = 0, len = 99, b = 0, ms = 0;
    masa_kv_cache *c = (masa_kv_cache *)&bytes; /* must become NULL */

    TU_OK(masa_kv_cache_size(l, 2, 5, &bytes));
    ck_assert_uint_eq(bytes, 2 * 2 * 1 * 5 * 4 * sizeof(float));
    EXPECT(masa_kv_cache_size(NULL, 2, 5, &bytes), MASA_ERROR_NULL_ARGUMENT);
    EXPECT(masa_kv_cache_size(l, 2, 5, NULL), MASA_ERROR_NULL_ARGUMENT);
    EXPECT(masa_kv_cache_size(nc, 2, 5, &bytes), MASA_ERROR_INVALID_ARGUMENT);
    EXPECT(masa_kv_cache_size(l, 0, 5, &bytes), MASA_ERROR_BAD_SHAPE);
    EXPECT(masa_kv_cache_size(l, 2, 0, &bytes), MASA_ERROR_BAD_SHAPE);
    EXPECT(masa_kv_cache_size(l, SIZE_MAX / 4, 5, &bytes), MASA_ERROR_OVERFLOW);
    EXPECT(masa_kv_cache_size(l, 1, SIZE_MAX / 16, &bytes), MASA_ERROR_OVERFLOW);

    size_t need = 2 * 2 * 1 * 5 * 4 * sizeof(float);
    float *mem = tu_falloc(need / sizeof(float) + 1);
    EXPECT(masa_kv_cache_create(l, 2, 5, mem, need, NULL),
           MASA_ERROR_NULL_ARGUMENT);
    EXPECT(masa_kv_cache_create(NULL, 2, 5, mem, need, &c),
           MASA_ERROR_NULL_ARGUMENT);
    ck_assert_ptr_null(c);
    EXPECT(masa_kv_cache_create(l, 2, 5, NULL, need, &c),
           MASA_ERROR_NULL_ARGUMENT);
    EXPECT(masa_kv_cache_create(nc, 2, 5, mem, need, &c),
           MASA_ERROR_INVALID_ARGUMENT);
    EXPECT(masa_kv_cache_create(l, 0, 5, mem, need, &c), MASA_ERROR_BAD_SHAPE);
    EXPECT(masa_kv_cache_create(l, 2, 5, mem, need - 1, &c),
           MASA_ERROR_BUFFER_TOO_SMALL);
    EXPECT(masa_kv_cache_create(l, 2, 5, (char *)mem + 1, need, &c),
           MASA_ERROR_INVALID_ARGUMENT);
    ck_assert_ptr_null(c);
    TU_OK(masa_kv_cache_create(l, 2, 5, mem, need, &c));
    ck_assert_ptr_nonnull(c);

    TU_OK(masa_kv_cache_length(c, &len));
    ck_assert_uint_eq(len, 0);
    TU_OK(masa_kv_cache_shape(c, &b, &ms));
    ck_assert_uint_eq(b, 2);
    ck_assert_uint_eq(ms, 5);
    TU_OK(masa_kv_cache_shape(c, NULL, NULL));
    EXPECT(masa_kv_cache_length(NULL, &len), MASA_ERROR_NULL_ARGUMENT);
    EXPECT(masa_kv_cache_length(c, NULL), MASA_ERROR_NULL_ARGUMENT);
    EXPECT(masa_kv_cache_shape(NULL, &b, &ms), MASA_ERROR_NULL_ARGUMENT);
    EXPECT(masa_kv_cache_reset(NULL), MASA_ERROR_NULL_ARGUMENT);
    EXPECT(masa_kv_cache_truncate(NULL, 0), MASA_ERROR_NULL_ARGUMENT);
    EXPECT(masa_kv_cache_truncate(c, 1), MASA_ERROR_OUT_OF_RANGE);
    TU_OK(masa_kv_cache_truncate(c, 0));
    TU_OK(masa_kv_cache_reset(c));
    masa_kv_cache_destroy(c);
    masa_kv_cache_destroy(NULL);
    free(mem);
    masa_layer_destroy(l);
    masa_layer_destroy(nc);
    masa_context_destroy(ctx);
}
END_TEST

/* Every refused decode leaves y, the cache length and the cache contents
 * as they were. */
START_TEST(test_decode_errors)
{
    masa_context *ctx = ctx_with(2);
    masa_layer *l = plain_layer(ctx, 8, 2, 1, 1);
    masa_layer *twin = plain_layer(ctx, 8, 2, 1, 1);     /* same shape */
    masa_layer *other = plain_layer(ctx, 8, 2, 2, 1);    /* 2 kv heads */
    masa_layer *nc = plain_layer(ctx, 8, 2, 1, 0);       /* not causal */
    masa_layer *unready = plain_layer(ctx, 8, 2, 1, 1);  /* no weights */
    set_all_dense(l);
    set_all_dense(twin);
    set_all_dense(other);
    set_all_dense(nc);
    tu_rng rng = {5};
    for (int p = 0; p < 4; p++) {
        size_t din, dout;
        TU_OK(masa_layer_projection_shape(l, (masa_projection)p, &din, &dout));
        tu_fill(&rng, masa_layer_weight(l, (masa_projection)p), din * dout,
                -1, 1);
        tu_fill(&rng, masa_layer_weight(twin, (masa_projection)p), din * dout,
                -1, 1);
    }
    size_t B = 2, max_seq = 3, ws_bytes = 0, len = 0;
    EXPECT(masa_layer_decode_workspace_size(NULL, B, 1, &ws_bytes),
           MASA_ERROR_NULL_ARGUMENT);
    EXPECT(masa_layer_decode_workspace_size(l, B, 1, NULL),
           MASA_ERROR_NULL_ARGUMENT);
    EXPECT(masa_layer_decode_workspace_size(nc, B, 1, &ws_bytes),
           MASA_ERROR_INVALID_ARGUMENT);
    EXPECT(masa_layer_decode_workspace_size(unready, B, 1, &ws_bytes),
           MASA_ERROR_NOT_READY);
    EXPECT(masa_layer_decode_workspace_size(l, 0, 1, &ws_bytes),
           MASA_ERROR_BAD_SHAPE);
    EXPECT(masa_layer_decode_workspace_size(l, B, 0, &ws_bytes),
           MASA_ERROR_BAD_SHAPE);
    EXPECT(masa_layer_decode_workspace_size(l, SIZE_MAX / 2, 4, &ws_bytes),
           MASA_ERROR_OVERFLOW);
    TU_OK(masa_layer_decode_workspace_size(l, B, 2, &ws_bytes));
    size_t ws1 = 0;
    TU_OK(masa_layer_decode_workspace_size(l, B, 1, &ws1));
    ck_assert_uint_le(ws1, ws_bytes);

    session s;
    session_open(&s, l, B, max_seq, 2);
    size_t nx = B * 2 * 8;
    float *x = tu_falloc(nx), *y = tu_falloc(nx), *y_copy = tu_falloc(nx);
    float *mem_copy = malloc(s.mem_bytes);
    ck_assert_ptr_nonnull(mem_copy);
    tu_fill(&rng, x, nx, -1, 1);
    /* two positions filled: one free */
    TU_OK(masa_layer_decode(l, s.cache, B, 2, x, y, s.ws, s.ws_bytes));
    tu_fill(&rng, y, nx, 7, 8);
    memcpy(y_copy, y, nx * sizeof(float));
    memcpy(mem_copy, s.mem, s.mem_bytes);

#define UNCHANGED()                                                        \
    do {                                                                   \
        TU_OK(masa_kv_cache_length(s.cache, &len));                        \
        ck_assert_uint_eq(len, 2);                                         \
        ck_assert(memcmp(y, y_copy, nx * sizeof(float)) == 0);             \
        ck_assert(memcmp(s.mem, mem_copy, s.mem_bytes) == 0);              \
    } while (0)

    EXPECT(masa_layer_decode(NULL, s.cache, B, 1, x, y, s.ws, s.ws_bytes),
           MASA_ERROR_NULL_ARGUMENT);
    EXPECT(masa_layer_decode(l, NULL, B, 1, x, y, s.ws, s.ws_bytes),
           MASA_ERROR_NULL_ARGUMENT);
    EXPECT(masa_layer_decode(l, s.cache, B, 1, NULL, y, s.ws, s.ws_bytes),
           MASA_ERROR_NULL_ARGUMENT);
    EXPECT(masa_layer_decode(l, s.cache, B, 1, x, NULL, s.ws, s.ws_bytes),
           MASA_ERROR_NULL_ARGUMENT);
    EXPECT(masa_layer_decode(l, s.cache, B, 1, x, y, NULL, s.ws_bytes),
           MASA_ERROR_NULL_ARGUMENT);
    UNCHANGED();
    /* cache full: 2 + 2 > 3 */
    EXPECT(masa_layer_decode(l, s.cache, B, 2, x, y, s.ws, s.ws_bytes),
           MASA_ERROR_OUT_OF_RANGE);
    EXPECT(masa_layer_decode(l, s.cache, B, SIZE_MAX, x, y, s.ws, s.ws_bytes),
           MASA_ERROR_OVERFLOW);
    EXPECT(masa_layer_decode(l, s.cache, B, 0, x, y, s.ws, s.ws_bytes),
           MASA_ERROR_BAD_SHAPE);
    EXPECT(masa_layer_decode(l, s.cache, 1, 1, x, y, s.ws, s.ws_bytes),
           MASA_ERROR_BAD_SHAPE); /* batch differs from the cache's */
    EXPECT(masa_layer_decode(other, s.cache, B, 1, x, y, s.ws, s.ws_bytes),
           MASA_ERROR_BAD_SHAPE); /* cache made for 1 kv head */
    EXPECT(masa_layer_decode(twin, s.cache, B, 1, x, y, s.ws, s.ws_bytes),
           MASA_ERROR_INVALID_ARGUMENT); /* keys of another layer */
    EXPECT(masa_layer_decode(nc, s.cache, B, 1, x, y, s.ws, s.ws_bytes),
           MASA_ERROR_INVALID_ARGUMENT);
    EXPECT(masa_layer_decode(unready, s.cache, B, 1, x, y, s.ws, s.ws_bytes),
           MASA_ERROR_NOT_READY);
    EXPECT(masa_layer_decode(l, s.cache, B, 1, x, y, s.ws, ws1 - 1),
           MASA_ERROR_BUFFER_TOO_SMALL);
    char *odd = malloc(ws1 + 8);
    ck_assert_ptr_nonnull(odd);
    EXPECT(masa_layer_decode(l, s.cache, B, 1, x, y, odd + 1, ws1),
           MASA_ERROR_INVALID_ARGUMENT);
    free(odd);
    /* overlaps: x with y, y with the cache, x with the workspace */
    EXPECT(masa_layer_decode(l, s.cache, B, 1, x, x + 4, s.ws, s.ws_bytes),
           MASA_ERROR_INVALID_ARGUMENT);
    EXPECT(masa_layer_decode(l, s.cache, B, 1, x, (float *)s.mem + 8, s.ws,
                             s.ws_bytes),
           MASA_ERROR_INVALID_ARGUMENT);
    float *ws_x = s.ws;
    EXPECT(masa_layer_decode(l, s.cache, B, 1, ws_x + 16, y, s.ws,
                             s.ws_bytes),
           MASA_ERROR_INVALID_ARGUMENT);
    /* y overlapping the workspace */
    EXPECT(masa_layer_decode(l, s.cache, B, 1, x, ws_x + 16, s.ws,
                             s.ws_bytes),
           MASA_ERROR_INVALID_ARGUMENT);
    UNCHANGED();

    /* the last free position still works; after a reset the twin may use
     * the cache */
    TU_OK(masa_layer_decode(l, s.cache, B, 1, x, y, s.ws, s.ws_bytes));
    TU_OK(masa_kv_cache_length(s.cache, &len));
    ck_assert_uint_eq(len, 3);
    EXPECT(masa_layer_decode(l, s.cache, B, 1, x, y, s.ws, s.ws_bytes),
           MASA_ERROR_OUT_OF_RANGE);
    TU_OK(masa_kv_cache_reset(s.cache));
    TU_OK(masa_layer_decode(twin, s.cache, B, 1, x, y, s.ws, s.ws_bytes));
    EXPECT(masa_layer_decode(l, s.cache, B, 1, x, y, s.ws, s.ws_bytes),
           MASA_ERROR_INVALID_ARGUMENT);
#undef UNCHANGED

    session_close(&s);
    free(x);
    free(y);
    free(y_copy);
    free(mem_copy);
    masa_layer_destroy(l);
    masa_layer_destroy(twin);
    masa_layer_destroy(other);
    masa_layer_destroy(nc);
    masa_layer_destroy(unready);
    masa_context_destroy(ctx);
}
END_TEST

/* A larger dictionary set after the size query needs a larger workspace:
 * the old one is refused, not overrun. */
START_TEST(test_workspace_follows_atoms)
{
    masa_context *ctx = ctx_with(1);
    masa_layer *l = plain_layer(ctx, 8, 2, 1, 1);
    set_all_dense(l);
    masa_dictionary *d2 = NULL, *d8 = NULL;
    masa_coefficients *c2 = NULL, *c8 = NULL;
    TU_OK(masa_dictionary_create(ctx, 2, 8, 8, &d2));
    TU_OK(masa_dictionary_create(ctx, 8, 8, 8, &d8));
    TU_OK(masa_coefficients_create(ctx, 1, 2, &c2));
    TU_OK(masa_coefficients_create(ctx, 1, 8, &c8));
    TU_OK(masa_layer_set_masa(l, MASA_PROJ_Q, d2, c2, 0));
    size_t small = 0, big = 0;
    TU_OK(masa_layer_decode_workspace_size(l, 1, 1, &small));
    TU_OK(masa_layer_set_masa(l, MASA_PROJ_Q, d8, c8, 0));
    TU_OK(masa_layer_decode_workspace_size(l, 1, 1, &big));
    ck_assert_uint_gt(big, small);
    session s;
    session_open(&s, l, 1, 2, 1);
    float x[8] = {0}, y[8];
    EXPECT(masa_layer_decode(l, s.cache, 1, 1, x, y, s.ws, small),
           MASA_ERROR_BUFFER_TOO_SMALL);
    TU_OK(masa_layer_decode(l, s.cache, 1, 1, x, y, s.ws, big));
    session_close(&s);
    masa_layer_destroy(l);
    masa_dictionary_destroy(d2);
    masa_dictionary_destroy(d8);
    masa_coefficients_destroy(c2);
    masa_coefficients_destroy(c8);
    masa_context_destroy(ctx);
}
END_TEST

/* Several threads decode with one layer at once, each with its own cache
 * and workspace (the pool is busy for all but one of them, which then run
 * inline): each gets what it gets alone. */
typedef struct worker {
    const masa_layer *layer;
    const float *x;
    float *y;
} worker;

enum { CW_T = 40, CW_D = 32 };
static const size_t cw_chunks[MAX_CHUNKS] = {20, 1, 1, 1, 17};

static void *decode_worker(void *p)
{
    worker *w = p;
    session s;
    session_open(&s, w->layer, 1, CW_T, 20);
    decode_chunks(w->layer, &s, 1, CW_D, cw_chunks, w->x, w->y);
    session_close(&s);
    return NULL;
}

START_TEST(test_concurrent_decoders)
{
    tu_spec sp = {.d_model = CW_D, .n_heads = 4, .n_kv_heads = 2,
                  .causal = 1, .rope = 1, .masa_mask = 0x3, .n_atoms = 2,
                  .n_layers = 1, .wrap = 1};
    masa_context *ctx = ctx_with(2);
    tu_layer t;
    tu_layer_init(&t, ctx, &sp, 61);
    enum { W = 3 };
    size_t n = CW_T * CW_D;
    float *x[W], *y[W], *alone = tu_falloc(n);
    worker w[W];
    pthread_t th[W];
    tu_rng rng = {62};
    for (int i = 0; i < W; i++) {
        x[i] = tu_falloc(n);
        y[i] = tu_falloc(n);
        tu_fill(&rng, x[i], n, -1, 1);
        w[i] = (worker){t.layer, x[i], y[i]};
    }
    for (int i = 0; i < W; i++)
        ck_assert_int_eq(pthread_create(&th[i], NULL, decode_worker, &w[i]), 0);
    for (int i = 0; i < W; i++)
        pthread_join(th[i], NULL);
    for (int i = 0; i < W; i++) {
        worker one = {t.layer, x[i], alone};
        decode_worker(&one);
        TU_ASSERT_CLOSE_FF("concurrent vs alone", y[i], alone, n, 1e-5);
        free(x[i]);
        free(y[i]);
    }
    free(alone);
    tu_layer_fini(&t);
    masa_context_destroy(ctx);
}
END_TEST

/* The cache handle comes from the context's allocator: its failure is
 * OUT_OF_MEMORY with *out NULL, and nothing leaks. */
static int fail_allocs;
static void *flaky_malloc(size_t n, void *u)
{
    (void)u;
    return fail_allocs ? NULL : malloc(n);
}
static void plain_free(void *p, void *u)
{
    (void)u;
    free(p);
}

START_TEST(test_cache_out_of_memory)
{
    masa_context_options o;
    masa_context_options_init(&o);
    o.n_threads = 1;
    o.malloc_fn = flaky_malloc;
    o.free_fn = plain_free;
    masa_context *ctx = NULL;
    fail_allocs = 0;
    TU_OK(masa_context_create(&o, &ctx));
    masa_layer *l = plain_layer(ctx, 8, 2, 1, 1);
    size_t bytes = 0;
    TU_OK(masa_kv_cache_size(l, 1, 4, &bytes));
    float *mem = tu_falloc(bytes / sizeof(float));
    masa_kv_cache *c = (masa_kv_cache *)&bytes;
    fail_allocs = 1;
    EXPECT(masa_kv_cache_create(l, 1, 4, mem, bytes, &c),
           MASA_ERROR_OUT_OF_MEMORY);
    ck_assert_ptr_null(c);
    fail_allocs = 0;
    TU_OK(masa_kv_cache_create(l, 1, 4, mem, bytes, &c));
    masa_kv_cache_destroy(c);
    free(mem);
    masa_layer_destroy(l);
    masa_context_destroy(ctx);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("decode");
    TCase *tc = tcase_create("decode");
    tcase_set_timeout(tc, 60);
    tcase_add_loop_test(tc, test_case, 0, (int)N_CASES);
    tcase_add_test(tc, test_threads_agree);
    tcase_add_test(tc, test_truncate_regenerate);
    tcase_add_test(tc, test_nan_isolation);
    tcase_add_test(tc, test_cache_errors);
    tcase_add_test(tc, test_decode_errors);
    tcase_add_test(tc, test_workspace_follows_atoms);
    tcase_add_test(tc, test_concurrent_decoders);
    tcase_add_test(tc, test_cache_out_of_memory);
    suite_add_tcase(s, tc);
    return tu_run_suite(s);
}
