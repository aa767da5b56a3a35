/*
 * Softmax numerics (issue 12) against the double reference: layers whose
 * softmax saturates (logits of order 1e2, 1e4, 1e6), whose rows are peaked
 * (one key takes almost all the mass) or whose top keys are equal (a
 * repeated token at logits of 1e6), through forward, decode and backward;
 * and the documented errors for overflowing and out-of-range positions.
 *
 * Tolerance: every output array (y, the decode output, dx and each
 * parameter gradient) is checked against its own largest reference value:
 * max|got - ref| <= rtol * max|ref| + 1e-30, never against the layer's
 * largest gradient. rtol follows the conditioning of float32 logits: Q and
 * K are rounded to float, so a logit of size L carries an absolute error of
 * about eps L (eps = 6e-8) that no float32 computation avoids. The gradients
 * of Q's and K's parameters are made of the probabilities of the keys below
 * a row's top one and move relatively by that much (rtol_qk: 1e-3 at 1e2,
 * 5e-3 at 1e4, measured 9e-5 and 4.9e-4 with TU_VERBOSE=1; float32 torch
 * does the same); y, dx and V's and O's gradients follow the top keys and
 * stay near float rounding (rtol, measured 1.6e-5 at most). Random logits
 * of 1e6 would leave some rows' second key within 87 of the top (a
 * probability float32 still holds, but known only to about eps L = 6%): the
 * 1e6 layers here put each query's own key far ahead instead, so every other
 * key's probability is below float's smallest normal (1.2e-38) and the exact
 * Q/K gradients are below 1e-34 (0 on the repeated tokens): float32 holds
 * them as 0, the absolute 1e-30 allows nothing else. Before issue 12's fix
 * the Q/K gradients of the 1e6 layers were 1e3-1e4 there, dx was off by
 * 3-15% and V's gradient by 10% on the repeated tokens, and dx by 5e-4 of
 * its size at 1e4: these cases fail on the old library. The peaked rows'
 * Q/K gradients were 1.3-5 times less accurate than now, within this rtol:
 * that case guards the peaked path rather than telling the two apart.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "test_util.h"

typedef struct scase {
    const char *name;
    tu_spec s;
    size_t batch, seq;
    double logit;  /* logits of about this size: x scaled by its root */
    int k_like_q;  /* K's atoms, coefficients and bias near Q's: each
                      query's own key scores highest (peaked rows) */
    int repeat;    /* every token twice: the top two keys of a row equal */
    double rtol, rtol_qk; /* y, decode, dx, V, O; Q's and K's parameters */
} scase;

/* Q and K MASA (their atoms, coefficients and biases are checked), V and O
 * dense, biases on Q, K, V; causal (decode is checked too). */
#define SPEC(rope_, kv_)                                                     \
    {.d_model = 32, .n_heads = 4, .n_kv_heads = (kv_), .causal = 1,          \
     .rope = (rope_), .masa_mask = 0x3, .bias_mask = 0x7, .n_atoms = 2,      \
     .n_layers = 3, .layer_index = 1, .wrap = 1}

static const scase cases[] = {
    {"saturated_1e2", SPEC(1, 2), 2, 40, 1e2, 0, 0, 2e-4, 1e-3},
    {"saturated_1e4", SPEC(1, 2), 2, 40, 1e4, 0, 0, 5e-5, 5e-3},
    {"saturated_1e6", SPEC(1, 4), 2, 40, 1e6, 1, 0, 2e-5, 2e-5},
    {"peaked", SPEC(0, 4), 2, 40, 8.0, 1, 0, 2e-5, 2e-5},
    {"repeated_tokens_1e6", SPEC(0, 4), 1, 40, 1e6, 1, 1, 2e-5, 2e-5},
    /* one sequence of one head: backward splits its key tiles over the
     * threads, each adding into its own partial dK */
    {"one_head_1e2", {.d_model = 16, .n_heads = 1, .causal = 1, .rope = 1,
      .masa_mask = 0x3, .bias_mask = 0x7, .n_atoms = 2, .n_layers = 3,
      .layer_index = 2, .wrap = 1}, 1, 60, 1e2, 0, 0, 2e-4, 1e-3},
};
#define N_CASES (sizeof cases / sizeof cases[0])

static masa_context *ctx;

static void setup(void) { TU_OK(masa_context_create(NULL, &ctx)); }
static void teardown(void) { masa_context_destroy(ctx); }

#define CHECK(what, got, ref, n, rtol) \
    tu_assert_close_(__FILE__, __LINE__, (what), (got), (ref), (n), (rtol), 1e-30)

/* K's parameters := Q's times (1 + 0.02 u), u uniform in [-1, 1]. */
static void k_like_q(tu_layer *t, tu_rng *rng)
{
    float *qa = masa_dictionary_data(t->dict[REF_Q]);
    float *ka = masa_dictionary_data(t->dict[REF_K]);
    float *qc = masa_coefficients_data(t->coef[REF_Q]);
    float *kc = masa_coefficients_data(t->coef[REF_K]);
    float *qb = masa_layer_bias(t->layer, MASA_PROJ_Q);
    float *kb = masa_layer_bias(t->layer, MASA_PROJ_K);
    ck_assert_uint_eq(tu_atoms_len(t, REF_Q), tu_atoms_len(t, REF_K));
    for (size_t i = 0; i < tu_atoms_len(t, REF_Q); i++)
        ka[i] = qa[i] * (float)(1.0 + tu_unif(rng, -0.02, 0.02));
    memcpy(kc, qc, tu_coefs_len(t, REF_Q) * sizeof(float));
    memcpy(kb, qb, t->dout[REF_Q] * sizeof(float));
}

static void check_case(const scase *c)
{
    tu_layer t;
    tu_rng rng = {0x5eed0 + (uint64_t)(c - cases)};
    if (getenv("TU_VERBOSE"))
        fprintf(stderr, "case %s\n", c->name);
    tu_layer_init(&t, ctx, &c->s, tu_next(&rng));
    if (c->k_like_q)
        k_like_q(&t, &rng);
    size_t B = c->batch, T = c->seq, d = t.cfg.d_model, n = B * T * d;
    float *x = tu_falloc(n), *dy = tu_falloc(n);
    float a = (float)sqrt(c->logit);
    tu_fill(&rng, x, n, -a, a);
    if (c->repeat)
        for (size_t b = 0; b < B; b++)
            for (size_t i = 1; i < T; i += 2)
                memcpy(x + (b * T + i) * d, x + (b * T + i - 1) * d,
                       d * sizeof(float));
    tu_fill(&rng, dy, n, -1.0f, 1.0f);
    tu_ref_out ref;
    tu_reference(&t, B, T, 0, x, dy, &ref);

    /* forward */
    size_t wsb = tu_workspace_bytes(&t, B, T), rsb = tu_reserve_bytes(&t, B, T);
    void *ws = tu_garbage(wsb), *rs = tu_garbage(rsb);
    float *y = tu_falloc(n), *dx = tu_falloc(n);
    TU_OK(masa_layer_forward(t.layer, B, T, 0, x, y, ws, wsb, rs, rsb));
    CHECK("y", y, ref.y, n, c->rtol);

    /* decode: half the sequence at once, then one token at a time */
    size_t cache_bytes, dwsb;
    masa_kv_cache *cache;
    TU_OK(masa_kv_cache_size(t.layer, B, T, &cache_bytes));
    void *mem = tu_garbage(cache_bytes);
    TU_OK(masa_kv_cache_create(t.layer, B, T, mem, cache_bytes, &cache));
    TU_OK(masa_layer_decode_workspace_size(t.layer, B, T / 2, &dwsb));
    void *dws = tu_garbage(dwsb);
    float *yd = tu_falloc(n), *xs = tu_falloc(B * (T / 2) * d),
          *ys = tu_falloc(B * (T / 2) * d);
    for (size_t i0 = 0; i0 < T;) {
        size_t k = i0 == 0 ? T / 2 : 1;
        for (size_t b = 0; b < B; b++)
            memcpy(xs + b * k * d, x + (b * T + i0) * d, k * d * sizeof(float));
        TU_OK(masa_layer_decode(t.layer, cache, B, k, xs, ys, dws, dwsb));
        for (size_t b = 0; b < B; b++)
            memcpy(yd + (b * T + i0) * d, ys + b * k * d, k * d * sizeof(float));
        i0 += k;
    }
    CHECK("decode", yd, ref.y, n, c->rtol);

    /* backward: every gradient against its own magnitude */
    masa_layer_grads g;
    masa_layer_grads_init(&g);
    for (int p = 0; p < REF_NPROJ; p++) {
        if (tu_is_masa(&t, p)) {
            g.d_atoms[p] = tu_falloc(tu_atoms_len(&t, p));
            g.d_coefficients[p] = tu_falloc(tu_coefs_len(&t, p));
        } else {
            g.d_weight[p] = tu_falloc(t.din[p] * t.dout[p]);
        }
        if (tu_has_bias(&t, p))
            g.d_bias[p] = tu_falloc(t.dout[p]);
    }
    TU_OK(masa_layer_backward(t.layer, B, T, 0, x, dy, dx, &g, ws, wsb, rs,
                              rsb));
    CHECK("dx", dx, ref.dx, n, c->rtol);
    static const char *const names[REF_NPROJ][4] = {
        {"Q atoms", "Q coefficients", "Q weight", "Q bias"},
        {"K atoms", "K coefficients", "K weight", "K bias"},
        {"V atoms", "V coefficients", "V weight", "V bias"},
        {"O atoms", "O coefficients", "O weight", "O bias"}};
    for (int p = 0; p < REF_NPROJ; p++) {
        double rtol = p == REF_Q || p == REF_K ? c->rtol_qk : c->rtol;
        if (tu_is_masa(&t, p)) {
            CHECK(names[p][0], g.d_atoms[p], ref.d_atoms[p],
                  tu_atoms_len(&t, p), rtol);
            CHECK(names[p][1], g.d_coefficients[p] + t.lidx[p] * t.spec.n_atoms,
                  ref.dc[p], t.spec.n_atoms, rtol);
        } else {
            CHECK(names[p][2], g.d_weight[p], ref.dW[p], t.din[p] * t.dout[p],
                  rtol);
        }
        /* Without RoPE K's bias adds one constant to a row's logits, which
         * changes nothing: its exact gradient is 0 and the reference's is
         * rounding of sums of order |dK|. Checked against Q's bias
         * gradient's magnitude instead. */
        if (p == REF_K && !c->s.rope) {
            double qmax = 0.0;
            for (size_t i = 0; i < t.dout[REF_Q]; i++)
                qmax = fmax(qmax, fabs(ref.db[REF_Q][i]));
            double *zero = tu_dalloc(t.dout[p]);
            tu_assert_close_(__FILE__, __LINE__, names[p][3], g.d_bias[p],
                             zero, t.dout[p], 0.0, rtol * qmax + 1e-30);
            free(zero);
        } else if (tu_has_bias(&t, p)) {
            CHECK(names[p][3], g.d_bias[p], ref.db[p], t.dout[p], rtol);
        }
        free(g.d_atoms[p]);
        free(g.d_coefficients[p]);
        free(g.d_weight[p]);
        free(g.d_bias[p]);
    }

    masa_kv_cache_destroy(cache);
    free(mem);
    free(dws);
    free(yd);
    free(xs);
    free(ys);
    free(ws);
    free(rs);
    free(y);
    free(dx);
    free(x);
    free(dy);
    tu_ref_out_free(&ref);
    tu_layer_fini(&t);
}

START_TEST(test_softmax_case)
{
    check_case(&cases[_i]);
}
END_TEST

/* ---- positions ---- */

#define EXPECT(call, code)                                                   \
    do {                                                                     \
        masa_status st_ = (call);                                            \
        ck_assert_msg(st_ == (code), "%s -> %s, expected %s (%s)", #call,    \
                      masa_status_string(st_), masa_status_string(code),     \
                      masa_last_error());                                    \
        ck_assert_msg((code) == MASA_OK || masa_last_error()[0] != '\0',    \
                      "no message");                                         \
    } while (0)

/* Forward and backward at pos_offset: status of each; y, dx and the
 * reserve untouched on failure. */
static void forward_backward_at(const tu_layer *t, size_t T, size_t pos,
                                masa_status fwd, masa_status bwd)
{
    size_t d = t->cfg.d_model, n = T * d;
    size_t wsb = tu_workspace_bytes(t, 1, T), rsb = tu_reserve_bytes(t, 1, T);
    void *ws = tu_garbage(wsb), *rs = tu_garbage(rsb);
    float *x = tu_falloc(n), *y = tu_falloc(n), *dx = tu_falloc(n);
    tu_rng rng = {pos};
    tu_fill(&rng, x, n, -1.0f, 1.0f);
    tu_fill_garbage(y, n * sizeof(float));
    tu_fill_garbage(dx, n * sizeof(float));
    EXPECT(masa_layer_forward(t->layer, 1, T, pos, x, y, ws, wsb, rs, rsb),
           fwd);
    if (fwd != MASA_OK) {
        unsigned char *r = rs, *yb = (unsigned char *)y;
        for (size_t i = 0; i < rsb; i++)
            ck_assert_uint_eq(r[i], 0xFF);
        for (size_t i = 0; i < n * sizeof(float); i++)
            ck_assert_uint_eq(yb[i], 0xFF);
        /* backward at that position: the position is refused first */
    } else {
        for (size_t i = 0; i < n; i++)
            ck_assert(isfinite(y[i]));
    }
    EXPECT(masa_layer_backward(t->layer, 1, T, pos, x, x, dx, NULL, ws, wsb,
                               rs, rsb), bwd);
    if (bwd != MASA_OK) {
        unsigned char *db = (unsigned char *)dx;
        for (size_t i = 0; i < n * sizeof(float); i++)
            ck_assert_uint_eq(db[i], 0xFF);
    }
    free(ws);
    free(rs);
    free(x);
    free(y);
    free(dx);
}

START_TEST(test_positions_rope)
{
    tu_spec s = {.d_model = 8, .n_heads = 2, .causal = 1, .rope = 1,
                 .masa_mask = 0x3, .n_atoms = 2, .n_layers = 2, .wrap = 1};
    tu_layer t;
    tu_layer_init(&t, ctx, &s, 3);
    size_t T = 5, last = MASA_MAX_POSITION - (T - 1);
    ck_assert_uint_eq(MASA_MAX_POSITION, 4294967295u);
    /* the last token exactly at the maximum: accepted (and accurate) */
    forward_backward_at(&t, T, last, MASA_OK, MASA_OK);
    /* one beyond: out of range, for forward and backward */
    forward_backward_at(&t, T, last + 1, MASA_ERROR_OUT_OF_RANGE,
                        MASA_ERROR_OUT_OF_RANGE);
    forward_backward_at(&t, T, SIZE_MAX / 2, MASA_ERROR_OUT_OF_RANGE,
                        MASA_ERROR_OUT_OF_RANGE);
    /* pos_offset + seq beyond SIZE_MAX: overflow (from just beyond) */
    forward_backward_at(&t, T, SIZE_MAX - T + 1, MASA_ERROR_OVERFLOW,
                        MASA_ERROR_OVERFLOW);
    forward_backward_at(&t, T, SIZE_MAX, MASA_ERROR_OVERFLOW,
                        MASA_ERROR_OVERFLOW);

    /* accurate at the maximum: y at the last allowed offset against the
     * reference there */
    size_t d = t.cfg.d_model, n = T * d;
    size_t wsb = tu_workspace_bytes(&t, 1, T);
    void *ws = tu_garbage(wsb);
    float *x = tu_falloc(n), *y = tu_falloc(n);
    tu_rng rng = {9};
    tu_fill(&rng, x, n, -1.0f, 1.0f);
    tu_ref_out ref;
    tu_reference(&t, 1, T, last, x, NULL, &ref);
    TU_OK(masa_layer_forward(t.layer, 1, T, last, x, y, ws, wsb, NULL, 0));
    CHECK("y at MASA_MAX_POSITION", y, ref.y, n, 1e-5);
    tu_ref_out_free(&ref);
    free(ws);
    free(x);
    free(y);
    tu_layer_fini(&t);
}
END_TEST

START_TEST(test_positions_without_rope)
{
    /* positions change nothing without RoPE: any position, but no overflow */
    tu_spec s = {.d_model = 8, .n_heads = 2, .causal = 1, .masa_mask = 0x1,
                 .n_atoms = 2, .n_layers = 2, .wrap = 1};
    tu_layer t;
    tu_layer_init(&t, ctx, &s, 4);
    size_t T = 3;
    forward_backward_at(&t, T, (size_t)MASA_MAX_POSITION + 1, MASA_OK,
                        MASA_OK);
    forward_backward_at(&t, T, SIZE_MAX - T, MASA_OK, MASA_OK);
    forward_backward_at(&t, T, SIZE_MAX - T + 1, MASA_ERROR_OVERFLOW,
                        MASA_ERROR_OVERFLOW);
    tu_layer_fini(&t);
}
END_TEST

START_TEST(test_positions_kv_cache)
{
    /* A RoPE layer's cache cannot hold positions beyond MASA_MAX_POSITION:
     * refused before any memory is touched (none is needed to find out). */
    tu_spec s = {.d_model = 4, .n_heads = 2, .causal = 1, .rope = 1,
                 .n_atoms = 1, .n_layers = 1, .wrap = 1};
    tu_layer t;
    tu_layer_init(&t, ctx, &s, 5);
    size_t bytes, max = (size_t)MASA_MAX_POSITION + 1;
    TU_OK(masa_kv_cache_size(t.layer, 1, max, &bytes));
    EXPECT(masa_kv_cache_size(t.layer, 1, max + 1, &bytes),
           MASA_ERROR_OUT_OF_RANGE);
    masa_kv_cache *c = (masa_kv_cache *)&bytes; /* must become NULL */
    float small[4];
    EXPECT(masa_kv_cache_create(t.layer, 1, max + 1, small, SIZE_MAX, &c),
           MASA_ERROR_OUT_OF_RANGE);
    ck_assert_ptr_null(c);
    tu_layer_fini(&t);

    /* without RoPE the same cache size is fine */
    s.rope = 0;
    tu_layer_init(&t, ctx, &s, 6);
    TU_OK(masa_kv_cache_size(t.layer, 1, max + 1, &bytes));
    tu_layer_fini(&t);
}
END_TEST

static Suite *softmax_suite(void)
{
    Suite *s = suite_create("softmax");
    TCase *tc = tcase_create("numerics");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 120);
    tcase_add_loop_test(tc, test_softmax_case, 0, (int)N_CASES);
    tcase_add_test(tc, test_positions_rope);
    tcase_add_test(tc, test_positions_without_rope);
    tcase_add_test(tc, test_positions_kv_cache);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) { return tu_run_suite(softmax_suite()); }
