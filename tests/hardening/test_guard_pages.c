/*
 * Guard pages: every buffer the caller hands to libmasa (x, y, dy, dx,
 * workspace, reserve, dense weights, biases, wrapped atoms and coefficient
 * tables, every gradient buffer) is placed flush against an inaccessible
 * page, once ending right before it and once starting right after it, with
 * exactly the size masa.h asks for. Forward and backward then run over many
 * small shapes. Any read or write outside a buffer, by libmasa or by BLIS
 * on libmasa's behalf, is a SIGSEGV here.
 *
 * This catches what neither ASan nor valgrind can: BLIS is not instrumented
 * for ASan, and an over-read that lands inside another heap block is valid
 * memory to valgrind. A SIGSEGV handler prints the case that crashed.
 *
 * Found here: Debian BLIS 0.9.0's small-matrix "sup" path (zen3 and
 * haswell kernels) reads past its operands: one row past A in the
 * k-remainder loop when k % 8 != 0 and m % 3 == 1 (e.g. past the end of the
 * caller's dy in the output projection's input gradient), and whole vectors
 * of C past its last column when beta != 0 (a caller's 2 x 2 d_weight in ADD
 * mode). Reads only, but a buffer ending at an unmapped page crashed. libmasa
 * now disables the sup path in masa__gemm (src/blis_glue.c).
 */
#include <check.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <masa/masa.h>

/* ---- guarded buffers ---- */

typedef struct guarded {
    void *map;
    size_t map_bytes;
} guarded;

enum { MAX_GUARDED = 64 };
static guarded live[MAX_GUARDED];
static size_t n_live;
static int at_end; /* 1: buffers end at a guard page; 0: start after one */

/* `bytes` bytes flush against a PROT_NONE page, filled with `fill` bytes. */
static void *guard_alloc(size_t bytes, unsigned char fill)
{
    size_t pg = (size_t)sysconf(_SC_PAGESIZE);
    size_t data_pages = (bytes + pg - 1) / pg;
    if (data_pages == 0)
        data_pages = 1;
    size_t map_bytes = (data_pages + 1) * pg;
    unsigned char *m = mmap(NULL, map_bytes, PROT_READ | PROT_WRITE,
                            MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    ck_assert(m != MAP_FAILED);
    unsigned char *p;
    if (at_end) {
        ck_assert(mprotect(m + data_pages * pg, pg, PROT_NONE) == 0);
        p = m + data_pages * pg - bytes;
    } else {
        ck_assert(mprotect(m, pg, PROT_NONE) == 0);
        p = m + pg;
    }
    memset(p, fill, bytes);
    ck_assert(n_live < MAX_GUARDED);
    live[n_live++] = (guarded){m, map_bytes};
    return p;
}

static float *guard_floats(size_t n, float start)
{
    float *f = guard_alloc(n * sizeof(float), 0);
    for (size_t i = 0; i < n; i++)
        f[i] = start + 0.37f * (float)((i * 7919) % 13) / 13.0f - 0.15f;
    return f;
}

static void guard_free_all(void)
{
    for (size_t i = 0; i < n_live; i++)
        munmap(live[i].map, live[i].map_bytes);
    n_live = 0;
}

/* ---- the case being run, for the SIGSEGV handler ---- */

static char current[256];

static void on_segv(int sig)
{
    static const char msg[] = "\nguard pages: SIGSEGV (out-of-bounds access)"
                              " in case: ";
    ssize_t r = write(2, msg, sizeof msg - 1);
    r = write(2, current, strlen(current));
    r = write(2, "\n", 1);
    (void)r;
    signal(sig, SIG_DFL);
    raise(sig);
}

/* ---- one case ---- */

typedef struct shape {
    size_t d_model, n_heads, n_kv, batch, seq;
    int causal, rope;
    unsigned masa_mask, bias_mask;
    /* low-rank terms (rank_seed picks the rank), projections with only the
     * term, the cached weight policy */
    unsigned lowrank_mask, baseless_mask, rank_seed;
    int cached;
} shape;

static void run_case(masa_context *ctx, const shape *s, const char *phase)
{
    snprintf(current, sizeof current,
             "%s, buffers %s a guard page: d_model %zu heads %zu kv %zu "
             "batch %zu seq %zu causal %d rope %d masa 0x%x bias 0x%x "
             "lowrank 0x%x baseless 0x%x cached %d",
             phase, at_end ? "ending at" : "starting after", s->d_model,
             s->n_heads, s->n_kv, s->batch, s->seq, s->causal, s->rope,
             s->masa_mask, s->bias_mask, s->lowrank_mask, s->baseless_mask,
             s->cached);
    masa_layer_options o;
    masa_layer_options_init(&o);
    o.d_model = s->d_model;
    o.n_heads = s->n_heads;
    o.n_kv_heads = s->n_kv;
    o.causal = s->causal;
    o.rope = s->rope;
    masa_layer *layer = NULL;
    ck_assert_int_eq(masa_layer_create(ctx, &o, &layer), MASA_OK);

    enum { S = 2, L = 2 };
    masa_dictionary *dict[4] = {NULL};
    masa_coefficients *coef[4] = {NULL};
    size_t din[4], dout[4], rank[4] = {0};
    for (int p = 0; p < 4; p++) {
        ck_assert_int_eq(masa_layer_projection_shape(layer, p, &din[p],
                                                     &dout[p]),
                         MASA_OK);
        size_t n = din[p] * dout[p];
        if (s->lowrank_mask >> p & 1) {
            size_t most = din[p] < dout[p] ? din[p] : dout[p];
            rank[p] = 1 + (s->rank_seed + (unsigned)p) % most;
            ck_assert_int_eq(
                masa_layer_set_lowrank(layer, p, rank[p],
                                       guard_floats(din[p] * rank[p], 0.1f),
                                       guard_floats(rank[p] * dout[p], 0.2f)),
                MASA_OK);
        }
        if (rank[p] && (s->baseless_mask >> p & 1)) {
            /* only the low-rank term */
        } else if (s->masa_mask >> p & 1) {
            ck_assert_int_eq(masa_dictionary_wrap(ctx, S, din[p], dout[p],
                                                  guard_floats(S * n, 0.1f),
                                                  &dict[p]),
                             MASA_OK);
            ck_assert_int_eq(masa_coefficients_wrap(ctx, L, S,
                                                    guard_floats(L * S, 0.5f),
                                                    &coef[p]),
                             MASA_OK);
            ck_assert_int_eq(masa_layer_set_masa(layer, p, dict[p], coef[p],
                                                 1),
                             MASA_OK);
        } else {
            ck_assert_int_eq(masa_layer_set_dense(layer, p,
                                                  guard_floats(n, 0.0f)),
                             MASA_OK);
        }
        if (s->bias_mask >> p & 1)
            ck_assert_int_eq(masa_layer_set_bias(layer, p,
                                                 guard_floats(dout[p], 0.1f)),
                             MASA_OK);
    }

    if (s->cached)
        ck_assert_int_eq(masa_layer_set_weight_policy(layer,
                                                      MASA_WEIGHTS_CACHED),
                         MASA_OK);
    size_t bt = s->batch * s->seq, n_act = bt * s->d_model, ws, rs;
    ck_assert_int_eq(masa_layer_workspace_size(layer, s->batch, s->seq, &ws),
                     MASA_OK);
    ck_assert_int_eq(masa_layer_reserve_size(layer, s->batch, s->seq, &rs),
                     MASA_OK);
    void *work = guard_alloc(ws, 0xFF);
    void *reserve = guard_alloc(rs, 0xFF);
    float *x = guard_floats(n_act, 0.0f), *y = guard_floats(n_act, 9.0f);
    float *dy = guard_floats(n_act, 0.2f), *dx = guard_floats(n_act, 9.0f);

    ck_assert_int_eq(masa_layer_forward(layer, s->batch, s->seq, 5, x, y,
                                        work, ws, NULL, 0),
                     MASA_OK);
    ck_assert_int_eq(masa_layer_forward(layer, s->batch, s->seq, 5, x, y,
                                        work, ws, reserve, rs),
                     MASA_OK);

    masa_layer_grads g;
    masa_layer_grads_init(&g);
    g.mode = MASA_GRAD_ADD;
    for (int p = 0; p < 4; p++) {
        if (dict[p]) {
            g.d_atoms[p] = guard_floats(S * din[p] * dout[p], 0.0f);
            g.d_coefficients[p] = guard_floats(L * S, 0.0f);
        } else if (masa_layer_weight(layer, p)) {
            g.d_weight[p] = guard_floats(din[p] * dout[p], 0.0f);
        }
        if (s->bias_mask >> p & 1)
            g.d_bias[p] = guard_floats(dout[p], 0.0f);
        if (rank[p]) {
            g.d_lowrank_a[p] = guard_floats(din[p] * rank[p], 0.0f);
            g.d_lowrank_b[p] = guard_floats(rank[p] * dout[p], 0.0f);
        }
    }
    ck_assert_int_eq(masa_layer_backward(layer, s->batch, s->seq, 5, x, dy,
                                         dx, &g, work, ws, reserve, rs),
                     MASA_OK);
    g.mode = MASA_GRAD_SET;
    ck_assert_int_eq(masa_layer_backward(layer, s->batch, s->seq, 5, x, dy,
                                         dx, &g, work, ws, reserve, rs),
                     MASA_OK);
    if (s->causal) { /* decode: the same tokens through a key/value cache */
        size_t cb, dwb;
        masa_kv_cache *cache = NULL;
        ck_assert_int_eq(masa_kv_cache_size(layer, s->batch, s->seq, &cb),
                         MASA_OK);
        ck_assert_int_eq(masa_layer_decode_workspace_size(layer, s->batch,
                                                          s->seq, &dwb),
                         MASA_OK);
        void *mem = guard_alloc(cb, 0xFF), *dws = guard_alloc(dwb, 0xFF);
        ck_assert_int_eq(masa_kv_cache_create(layer, s->batch, s->seq, mem,
                                              cb, &cache),
                         MASA_OK);
        ck_assert_int_eq(masa_layer_decode(layer, cache, s->batch, s->seq, x,
                                           y, dws, dwb),
                         MASA_OK);
        masa_kv_cache_destroy(cache);
    }
    float w[64 * 64];
    for (int p = 0; p < 4; p++)
        if (dict[p])
            ck_assert_int_eq(masa_compose(dict[p], coef[p], 0, w, 64 * 64),
                             MASA_OK);

    masa_layer_destroy(layer);
    for (int p = 0; p < 4; p++) {
        masa_dictionary_destroy(dict[p]);
        masa_coefficients_destroy(coef[p]);
    }
    guard_free_all();
}

/* Shapes: widths around BLIS's register blocks, token counts 1..9, one or
 * several heads, grouped queries, every projection MASA or dense. */
static void run_all(size_t threads)
{
    masa_context_options co;
    masa_context_options_init(&co);
    co.n_threads = threads;
    masa_context *ctx = NULL;
    ck_assert_int_eq(masa_context_create(&co, &ctx), MASA_OK);
    static const size_t widths[] = {1, 2, 3, 4, 5, 7, 8, 9, 12, 16, 28, 33};
    static const size_t tokens[][2] = {{1, 1}, {1, 2}, {2, 1}, {1, 3},
                                       {2, 2}, {1, 5}, {3, 2}, {1, 7},
                                       {2, 4}, {3, 3}};
    unsigned variant = 0;
    for (int place = 0; place < 2; place++) {
        at_end = place == 0;
        for (size_t wi = 0; wi < sizeof widths / sizeof widths[0]; wi++)
            for (size_t ti = 0; ti < sizeof tokens / sizeof tokens[0]; ti++) {
                size_t d = widths[wi];
                variant++;
                shape s = {.d_model = d, .n_heads = 1, .n_kv = 0,
                           .batch = tokens[ti][0], .seq = tokens[ti][1],
                           .causal = (int)(variant & 1),
                           .masa_mask = variant % 16,
                           .bias_mask = (variant / 3) % 16,
                           .lowrank_mask = (variant / 5) % 16,
                           .baseless_mask = (variant / 7) % 16,
                           .rank_seed = variant / 2,
                           .cached = (int)(variant / 11 % 2)};
                if (d % 4 == 0 && (variant & 2)) {
                    s.n_heads = 4; /* grouped queries */
                    s.n_kv = 2;
                } else if (d % 2 == 0 && (variant & 4)) {
                    s.n_heads = 2;
                }
                s.rope = (d / s.n_heads) % 2 == 0 && (variant & 8);
                run_case(ctx, &s, threads > 1 ? "2 threads" : "1 thread");
            }
    }
    masa_context_destroy(ctx);
}

START_TEST(guard_pages_one_thread)
{
    run_all(1);
}
END_TEST

START_TEST(guard_pages_two_threads)
{
    run_all(2);
}
END_TEST

int main(void)
{
    signal(SIGSEGV, on_segv);
    signal(SIGBUS, on_segv);
    Suite *suite = suite_create("guard_pages");
    TCase *tc = tcase_create("guard_pages");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, guard_pages_one_thread);
    tcase_add_test(tc, guard_pages_two_threads);
    suite_add_tcase(suite, tc);
    SRunner *sr = srunner_create(suite);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
