/*
 * The tiled (flash) attention core against the double reference: sequence
 * lengths around the tile sizes (1, below a tile, not a multiple of either
 * tile), causal and not, MHA/GQA/MQA, 1 and 2 threads, and the key split of
 * backward (fewer (sequence, key/value head) pairs than threads). Sequence
 * lengths are derived from the block sizes the library was built with, so
 * the same cases reach several tiles, a partial last tile and the diagonal
 * tiles both here (default blocks) and in the builds with tiny blocks
 * (tests/meson.build). A large softmax scale makes the rows peaked, so the
 * running maximum of the online softmax changes from tile to tile.
 *
 * Tolerance as in test_layer.c: max|got - ref| <= 1e-4 * max|ref| (+1e-6).
 * Each output is a sum of at most a few hundred float products plus an
 * exp/softmax; a wrong tile offset, mask or rescale shows at the 1e-1 level.
 *
 * Biases go on Q, V and O only: softmax ignores a shift common to a row's
 * scores, so K's bias has a gradient of exactly 0 that float sums over
 * hundreds of tokens only approximate (a few 1e-6 absolute).
 *
 * NaN isolation: a NaN in token t may reach only what depends on token t:
 * forward outputs of tokens >= t, and (NaN in dy) dx of tokens <= t.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "attention/attention_core.h" /* MASA_FLASH_BQ, MASA_FLASH_BK of this build */
#include "test_util.h"

#define RTOL 1e-4
#define BQ MASA_FLASH_BQ
#define BK MASA_FLASH_BK
#define MINB (BQ < BK ? BQ : BK)

typedef struct fcase {
    const char *name;
    tu_spec s;
    size_t batch, seq;
    size_t threads; /* 0: run with 1 and with 2 threads */
} fcase;

static const fcase cases[] = {
    {"seq1_causal", {.d_model = 8, .n_heads = 2, .causal = 1, .n_atoms = 1,
      .n_layers = 1}, 2, 1, 0},
    {"below_tile_noncausal", {.d_model = 8, .n_heads = 2, .n_atoms = 1,
      .n_layers = 1, .bias_mask = 0xD}, 2, MINB - 1, 0},
    {"uneven_causal_gqa", {.d_model = 16, .n_heads = 4, .n_kv_heads = 2,
      .causal = 1, .rope = 1, .n_atoms = 1, .n_layers = 1}, 2, 2 * BQ + 3, 0},
    {"uneven_noncausal", {.d_model = 8, .n_heads = 2, .n_atoms = 1,
      .n_layers = 1}, 1, BQ + BK + 1, 0},
    {"peaked_causal", {.d_model = 8, .n_heads = 2, .causal = 1,
      .softmax_scale = 6.0f, .n_atoms = 1, .n_layers = 1}, 1, 2 * BK + 1, 0},
    {"peaked_noncausal_masa", {.d_model = 8, .n_heads = 2,
      .softmax_scale = 6.0f, .masa_mask = 0xF, .n_atoms = 2, .n_layers = 2,
      .layer_index = 1}, 2, 2 * BK + 3, 0},
    /* one pair (batch 1, one key/value head): backward splits keys */
    {"split_causal_mqa", {.d_model = 12, .n_heads = 3, .n_kv_heads = 1,
      .causal = 1, .rope = 1, .n_atoms = 1, .n_layers = 1}, 1, 2 * BQ + 5, 0},
    {"split_noncausal", {.d_model = 8, .n_heads = 1, .n_atoms = 1,
      .n_layers = 1, .bias_mask = 0x5}, 1, BQ + BK / 2 + 1, 0},
    {"split_seq1", {.d_model = 8, .n_heads = 2, .n_kv_heads = 1,
      .causal = 1, .n_atoms = 1, .n_layers = 1}, 1, 1, 0},
    /* head_dim past one micro-kernel panel (16 or 12 columns wide) */
    {"wide_heads_causal", {.d_model = 80, .n_heads = 2, .causal = 1,
      .rope = 1, .n_atoms = 1, .n_layers = 1}, 2, BQ + 9, 0},
    {"wide_heads_split_noncausal", {.d_model = 96, .n_heads = 2,
      .n_kv_heads = 1, .n_atoms = 1, .n_layers = 1, .bias_mask = 0x5}, 1,
      BK + 5, 0},
    /* two pairs on three threads */
    {"split_three_threads_gqa", {.d_model = 16, .n_heads = 4,
      .n_kv_heads = 2, .causal = 1, .n_atoms = 1, .n_layers = 1}, 1,
      BQ + 7, 3},
};
#define N_CASES (sizeof cases / sizeof cases[0])

static masa_context *context_with(size_t threads)
{
    masa_context_options co;
    masa_context_options_init(&co);
    co.n_threads = threads;
    masa_context *ctx = NULL;
    TU_OK(masa_context_create(&co, &ctx));
    return ctx;
}

/* Forward (inference and training) and backward (dx, parameter gradients)
 * of case c against the reference. */
static void run_case(const fcase *c, size_t threads, uint64_t seed)
{
    masa_context *ctx = context_with(threads);
    tu_layer t;
    tu_layer_init(&t, ctx, &c->s, seed);
    tu_rng rng = {seed + 1};
    size_t B = c->batch, T = c->seq, n = B * T * t.cfg.d_model;
    float *x = tu_falloc(n), *dy = tu_falloc(n), *y = tu_falloc(n);
    float *dx = tu_falloc(n);
    tu_fill(&rng, x, n, -1, 1);
    tu_fill(&rng, dy, n, -1, 1);
    size_t wsb = tu_workspace_bytes(&t, B, T), rsb = tu_reserve_bytes(&t, B, T);
    void *ws = tu_garbage(wsb), *rs = tu_garbage(rsb);

    tu_ref_out ref;
    tu_reference(&t, B, T, 0, x, dy, &ref);
    TU_OK(masa_layer_forward(t.layer, B, T, 0, x, y, ws, wsb, NULL, 0));
    TU_ASSERT_CLOSE("y (inference)", y, ref.y, n, RTOL);
    tu_fill_garbage(ws, wsb);
    TU_OK(masa_layer_forward(t.layer, B, T, 0, x, y, ws, wsb, rs, rsb));
    TU_ASSERT_CLOSE("y (training)", y, ref.y, n, RTOL);

    masa_layer_grads g;
    masa_layer_grads_init(&g);
    g.mode = MASA_GRAD_SET;
    float *dw[REF_NPROJ] = {0}, *db[REF_NPROJ] = {0}, *da[REF_NPROJ] = {0};
    for (int p = 0; p < REF_NPROJ; p++) {
        if (tu_is_masa(&t, p))
            g.d_atoms[p] = da[p] = tu_falloc(tu_atoms_len(&t, p));
        else
            g.d_weight[p] = dw[p] = tu_falloc(t.din[p] * t.dout[p]);
        if (tu_has_bias(&t, p))
            g.d_bias[p] = db[p] = tu_falloc(t.dout[p]);
    }
    tu_fill_garbage(ws, wsb);
    TU_OK(masa_layer_backward(t.layer, B, T, 0, x, dy, dx, &g, ws, wsb, rs,
                              rsb));
    TU_ASSERT_CLOSE("dx", dx, ref.dx, n, RTOL);
    for (int p = 0; p < REF_NPROJ; p++) {
        if (da[p])
            TU_ASSERT_CLOSE("d_atoms", da[p], ref.d_atoms[p],
                            tu_atoms_len(&t, p), RTOL);
        if (dw[p])
            TU_ASSERT_CLOSE("d_weight", dw[p], ref.dW[p],
                            t.din[p] * t.dout[p], RTOL);
        if (db[p])
            TU_ASSERT_CLOSE("d_bias", db[p], ref.db[p], t.dout[p], RTOL);
        free(dw[p]);
        free(db[p]);
        free(da[p]);
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

START_TEST(test_case)
{
    const fcase *c = &cases[_i / 2];
    size_t threads = c->threads ? c->threads : 1 + (size_t)(_i % 2);
    if (c->threads && _i % 2)
        return; /* a fixed thread count runs once */
    run_case(c, threads, 300 + (uint64_t)_i);
}
END_TEST

/* Rows first_nan..last_nan of a (T rows of width d) hold a NaN; the other
 * rows none. */
static void check_rows(const char *what, const float *a, size_t T, size_t d,
                       size_t first_nan, size_t last_nan)
{
    for (size_t r = 0; r < T; r++) {
        int want_nan = r >= first_nan && r <= last_nan;
        size_t n_nan = 0;
        for (size_t c = 0; c < d; c++)
            n_nan += isnan(a[r * d + c]) != 0;
        if (want_nan)
            ck_assert_msg(n_nan > 0, "%s: row %zu has no NaN", what, r);
        else
            ck_assert_msg(n_nan == 0, "%s: row %zu has %zu NaN", what, r,
                          n_nan);
    }
}

/* A NaN in x at token `bad` of a causal layer reaches y of tokens >= bad
 * only; a NaN in dy at `bad` reaches dx of tokens <= bad only. `bad` lies
 * inside a tile, so the diagonal tiles' masked products are what keeps the
 * NaN out (a product over masked entries would spread it: 0 * NaN = NaN). */
START_TEST(test_nan_isolation)
{
    size_t threads = 1 + (size_t)_i;
    masa_context *ctx = context_with(threads);
    tu_spec s = {.d_model = 8, .n_heads = 2, .n_kv_heads = 1, .causal = 1,
                 .rope = 1, .n_atoms = 1, .n_layers = 1};
    tu_layer t;
    tu_layer_init(&t, ctx, &s, 41);
    tu_rng rng = {42};
    size_t T = 2 * BQ + 3, d = 8, n = T * d, bad = BQ + 5;
    float *x = tu_falloc(n), *dy = tu_falloc(n), *y = tu_falloc(n);
    float *dx = tu_falloc(n);
    tu_fill(&rng, x, n, -1, 1);
    tu_fill(&rng, dy, n, -1, 1);
    size_t wsb = tu_workspace_bytes(&t, 1, T), rsb = tu_reserve_bytes(&t, 1, T);
    void *ws = tu_garbage(wsb), *rs = tu_garbage(rsb);

    x[bad * d + 3] = NAN;
    TU_OK(masa_layer_forward(t.layer, 1, T, 0, x, y, ws, wsb, NULL, 0));
    check_rows("y", y, T, d, bad, T - 1);

    x[bad * d + 3] = 0.5f;
    dy[bad * d + 1] = NAN;
    TU_OK(masa_layer_forward(t.layer, 1, T, 0, x, y, ws, wsb, rs, rsb));
    TU_OK(masa_layer_backward(t.layer, 1, T, 0, x, dy, dx, NULL, ws, wsb, rs,
                              rsb));
    check_rows("dx", dx, T, d, 0, bad);

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

int main(void)
{
    Suite *s = suite_create("flash");
    TCase *tc = tcase_create("flash");
    tcase_set_timeout(tc, 60);
    tcase_add_loop_test(tc, test_case, 0, (int)(2 * N_CASES));
    tcase_add_loop_test(tc, test_nan_isolation, 0, 2);
    suite_add_tcase(s, tc);
    return tu_run_suite(s);
}
