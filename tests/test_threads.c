/*
 * Threads: a 2-thread context computes what a 1-thread context computes;
 * several pthreads may run forward/backward on one shared layer at once
 * (own workspace, reserve and outputs), which also exercises the "pool busy:
 * run on the calling thread" path; error messages are per thread.
 *
 * 1 vs 2 threads may split sums differently, so results are compared at
 * 1e-5 of the array maximum (float rounding, well below any real error).
 */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "test_util.h"

static const tu_spec spec = {
    .d_model = 32, .n_heads = 4, .n_kv_heads = 2, .head_dim = 8, .causal = 1,
    .rope = 1, .masa_mask = 0x7, .bias_mask = 0xF, .n_atoms = 3,
    .n_layers = 2, .layer_index = 1, .wrap = 0};
enum { B = 3, T = 70, DM = 32, N = B * T * DM }; /* T > one 64-row tile */

static masa_context *ctx_with(size_t threads)
{
    masa_context_options o;
    masa_context_options_init(&o);
    o.n_threads = threads;
    masa_context *ctx = NULL;
    TU_OK(masa_context_create(&o, &ctx));
    return ctx;
}

START_TEST(test_thread_count)
{
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    const size_t req[] = {1, 2, 3};
    for (size_t i = 0; i < 3; i++) {
        masa_context *c = ctx_with(req[i]);
        ck_assert_uint_eq(masa_context_threads(c), req[i]);
        masa_context_destroy(c);
    }
    masa_context *c = ctx_with(0); /* 0 = online CPUs */
    ck_assert_uint_eq(masa_context_threads(c), (size_t)(cpus > 0 ? cpus : 1));
    masa_context_destroy(c);
}
END_TEST

/* Outputs of one forward + backward (SET) on a tu_layer. */
typedef struct result {
    float y[N], dx[N];
    masa_layer_grads g;
} result;

static void grads_alloc(masa_layer_grads *g, const tu_layer *t)
{
    masa_layer_grads_init(g);
    g->mode = MASA_GRAD_SET;
    for (int p = 0; p < 4; p++) {
        if (tu_is_masa(t, p)) {
            g->d_atoms[p] = tu_falloc(tu_atoms_len(t, p));
            g->d_coefficients[p] = tu_falloc(tu_coefs_len(t, p));
        } else {
            g->d_weight[p] = tu_falloc(t->din[p] * t->dout[p]);
        }
        if (tu_has_bias(t, p))
            g->d_bias[p] = tu_falloc(t->dout[p]);
    }
}

static void grads_free(masa_layer_grads *g)
{
    for (int p = 0; p < 4; p++) {
        free(g->d_atoms[p]);
        free(g->d_coefficients[p]);
        free(g->d_weight[p]);
        free(g->d_bias[p]);
    }
}

/* Runs forward + backward; returns the first failing status. */
static masa_status run(const tu_layer *t, const float *x, const float *dy,
                       result *r, size_t wsb, size_t rsb)
{
    void *ws = tu_garbage(wsb), *rs = tu_garbage(rsb);
    masa_status st = masa_layer_forward(t->layer, B, T, 0, x, r->y, ws, wsb, rs, rsb);
    if (st == MASA_OK)
        st = masa_layer_backward(t->layer, B, T, 0, x, dy, r->dx, &r->g, ws,
                                 wsb, rs, rsb);
    free(ws);
    free(rs);
    return st;
}

/* Every output of a against b. */
static void compare(const tu_layer *t, const result *a, const result *b,
                    double rtol)
{
    TU_ASSERT_CLOSE_FF("y", a->y, b->y, N, rtol);
    TU_ASSERT_CLOSE_FF("dx", a->dx, b->dx, N, rtol);
    for (int p = 0; p < 4; p++) {
        if (tu_is_masa(t, p)) {
            TU_ASSERT_CLOSE_FF("d_atoms", a->g.d_atoms[p], b->g.d_atoms[p],
                               tu_atoms_len(t, p), rtol);
            size_t S = t->spec.n_atoms;
            TU_ASSERT_CLOSE_FF("d_coefficients", a->g.d_coefficients[p] + t->lidx[p] * S,
                               b->g.d_coefficients[p] + t->lidx[p] * S, S, rtol);
        } else {
            TU_ASSERT_CLOSE_FF("d_weight", a->g.d_weight[p], b->g.d_weight[p],
                               t->din[p] * t->dout[p], rtol);
        }
        if (tu_has_bias(t, p))
            TU_ASSERT_CLOSE_FF("d_bias", a->g.d_bias[p], b->g.d_bias[p],
                               t->dout[p], rtol);
    }
}

START_TEST(test_one_vs_two_threads)
{
    masa_context *c1 = ctx_with(1), *c2 = ctx_with(2);
    tu_layer t1, t2;
    /* Same seed: library-owned atoms from init_uniform are reproducible. */
    tu_layer_init(&t1, c1, &spec, 4242);
    tu_layer_init(&t2, c2, &spec, 4242);
    ck_assert(memcmp(masa_dictionary_data(t1.dict[0]), masa_dictionary_data(t2.dict[0]),
                     tu_atoms_len(&t1, 0) * sizeof(float)) == 0);
    tu_rng rng = {5};
    float *x = tu_falloc(N), *dy = tu_falloc(N);
    tu_fill(&rng, x, N, -1, 1);
    tu_fill(&rng, dy, N, -1, 1);
    result *r1 = calloc(1, sizeof *r1), *r2 = calloc(1, sizeof *r2);
    ck_assert(r1 && r2);
    grads_alloc(&r1->g, &t1);
    grads_alloc(&r2->g, &t2);
    /* Workspace may grow with the thread count (per-thread scratch). */
    TU_OK(run(&t1, x, dy, r1, tu_workspace_bytes(&t1, B, T), tu_reserve_bytes(&t1, B, T)));
    TU_OK(run(&t2, x, dy, r2, tu_workspace_bytes(&t2, B, T), tu_reserve_bytes(&t2, B, T)));
    compare(&t1, r2, r1, 1e-5);

    /* And both against the reference. */
    tu_ref_out ref;
    tu_reference(&t2, B, T, 0, x, dy, &ref);
    TU_ASSERT_CLOSE("y (2 threads)", r2->y, ref.y, N, 1e-4);
    TU_ASSERT_CLOSE("dx (2 threads)", r2->dx, ref.dx, N, 1e-4);
    TU_ASSERT_CLOSE("d_atoms[Q] (2 threads)", r2->g.d_atoms[0], ref.d_atoms[0],
                    tu_atoms_len(&t2, 0), 1e-4);
    TU_ASSERT_CLOSE("d_weight[O] (2 threads)", r2->g.d_weight[3], ref.dW[3],
                    t2.din[3] * t2.dout[3], 1e-4);
    tu_ref_out_free(&ref);

    grads_free(&r1->g);
    grads_free(&r2->g);
    free(r1);
    free(r2);
    free(x);
    free(dy);
    tu_layer_fini(&t1);
    tu_layer_fini(&t2);
    masa_context_destroy(c1);
    masa_context_destroy(c2);
}
END_TEST

/* ---- Many threads, one layer ---- */

#define NTHR 4
#define REPS 3

typedef struct job {
    const tu_layer *t;
    pthread_barrier_t *bar;
    const float *x, *dy;
    const result *expect;
    size_t wsb, rsb;
    double worst; /* largest relative error seen */
    masa_status st;
} job;

static double rel_err(const float *a, const float *b, size_t n)
{
    double m = 0, e = 0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)a[i] - b[i];
        m = fmax(m, fabs((double)b[i]));
        e = fmax(e, fabs(d));
        if (d != d)
            return INFINITY;
    }
    return e / (m > 0 ? m : 1);
}

/* No Check assertions off the main thread: record, assert after join. */
static void *worker(void *arg)
{
    job *j = arg;
    result *r = calloc(1, sizeof *r);
    if (!r) {
        j->st = MASA_ERROR_OUT_OF_MEMORY;
        return NULL;
    }
    grads_alloc(&r->g, j->t);
    pthread_barrier_wait(j->bar);
    for (int k = 0; k < REPS && j->st == MASA_OK; k++) {
        j->st = run(j->t, j->x, j->dy, r, j->wsb, j->rsb);
        j->worst = fmax(j->worst, rel_err(r->y, j->expect->y, N));
        j->worst = fmax(j->worst, rel_err(r->dx, j->expect->dx, N));
        j->worst = fmax(j->worst, rel_err(r->g.d_atoms[0], j->expect->g.d_atoms[0],
                                          tu_atoms_len(j->t, 0)));
        j->worst = fmax(j->worst, rel_err(r->g.d_weight[3], j->expect->g.d_weight[3],
                                          j->t->din[3] * j->t->dout[3]));
    }
    grads_free(&r->g);
    free(r);
    return NULL;
}

START_TEST(test_concurrent_layer_use)
{
    masa_context *ctx = ctx_with(2);
    tu_layer t;
    tu_layer_init(&t, ctx, &spec, 777);
    size_t wsb = tu_workspace_bytes(&t, B, T), rsb = tu_reserve_bytes(&t, B, T);
    float *x[NTHR], *dy[NTHR];
    result *expect[NTHR];
    tu_rng rng = {8};
    for (int i = 0; i < NTHR; i++) { /* distinct inputs per thread */
        x[i] = tu_falloc(N);
        dy[i] = tu_falloc(N);
        tu_fill(&rng, x[i], N, -1, 1);
        tu_fill(&rng, dy[i], N, -1, 1);
        expect[i] = calloc(1, sizeof *expect[i]);
        ck_assert_ptr_nonnull(expect[i]);
        grads_alloc(&expect[i]->g, &t);
        TU_OK(run(&t, x[i], dy[i], expect[i], wsb, rsb));
    }
    /* The sequential results are right (so agreement below means right). */
    tu_ref_out ref;
    tu_reference(&t, B, T, 0, x[1], dy[1], &ref);
    TU_ASSERT_CLOSE("y thread 1 (sequential)", expect[1]->y, ref.y, N, 1e-4);
    tu_ref_out_free(&ref);

    pthread_barrier_t bar;
    pthread_barrier_init(&bar, NULL, NTHR);
    pthread_t th[NTHR];
    job jobs[NTHR];
    for (int i = 0; i < NTHR; i++) {
        jobs[i] = (job){&t, &bar, x[i], dy[i], expect[i], wsb, rsb, 0.0, MASA_OK};
        ck_assert_int_eq(pthread_create(&th[i], NULL, worker, &jobs[i]), 0);
    }
    for (int i = 0; i < NTHR; i++)
        pthread_join(th[i], NULL);
    pthread_barrier_destroy(&bar);
    for (int i = 0; i < NTHR; i++) {
        ck_assert_msg(jobs[i].st == MASA_OK, "thread %d: status %d", i, (int)jobs[i].st);
        ck_assert_msg(jobs[i].worst <= 1e-5, "thread %d: relative error %g vs "
                      "sequential result", i, jobs[i].worst);
    }
    for (int i = 0; i < NTHR; i++) {
        grads_free(&expect[i]->g);
        free(expect[i]);
        free(x[i]);
        free(dy[i]);
    }
    tu_layer_fini(&t);
    masa_context_destroy(ctx);
}
END_TEST

/* ---- Error messages are per thread ---- */

typedef struct msgjob {
    char before[256], after[256];
    masa_status st;
} msgjob;

static void *msg_worker(void *arg)
{
    msgjob *m = arg;
    snprintf(m->before, sizeof m->before, "%s", masa_last_error());
    m->st = masa_dictionary_create(NULL, 1, 1, 1, NULL); /* NULL_ARGUMENT */
    snprintf(m->after, sizeof m->after, "%s", masa_last_error());
    return NULL;
}

START_TEST(test_error_per_thread)
{
    masa_context *ctx = ctx_with(1);
    masa_dictionary *d = NULL;
    ck_assert_int_eq(masa_dictionary_create(ctx, 0, 2, 2, &d), MASA_ERROR_BAD_SHAPE);
    char mine[256];
    snprintf(mine, sizeof mine, "%s", masa_last_error());
    ck_assert_msg(mine[0] != '\0', "no message for BAD_SHAPE");

    msgjob m;
    memset(&m, 0, sizeof m);
    pthread_t th;
    ck_assert_int_eq(pthread_create(&th, NULL, msg_worker, &m), 0);
    pthread_join(th, NULL);
    ck_assert_msg(m.before[0] == '\0', "fresh thread sees message '%s'", m.before);
    ck_assert_int_eq(m.st, MASA_ERROR_NULL_ARGUMENT);
    ck_assert_msg(m.after[0] != '\0', "no message in worker thread");
    ck_assert_str_eq(masa_last_error(), mine); /* untouched by the worker */
    masa_context_destroy(ctx);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("threads");
    TCase *tc = tcase_create("threads");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_thread_count);
    tcase_add_test(tc, test_one_vs_two_threads);
    tcase_add_test(tc, test_concurrent_layer_use);
    tcase_add_test(tc, test_error_per_thread);
    suite_add_tcase(s, tc);
    return tu_run_suite(s);
}
