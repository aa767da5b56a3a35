/*
 * Concurrency, as promised under "Threads" in masa.h:
 *   1. several threads run forward and backward on ONE shared layer (own
 *      workspace, reserve, outputs and gradient buffers) and must reproduce,
 *      bit for bit, what a single thread computes: the worker pool of the
 *      context is busy most of the time, so most calls take the "run on the
 *      calling thread" path, which must not change any result;
 *   2. two contexts, created and used from two threads at once, each with
 *      its own layer over shared (read-only) atoms;
 *   3. contexts created and destroyed from several threads at once (pool
 *      start-up and shutdown, BLIS's one-time initialisation);
 *   4. error messages are per thread.
 * Plain pthreads (no Check fork), so ThreadSanitizer sees one process; see
 * scripts/hardening.sh, which runs it in a -fsanitize=thread build.
 */
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <masa/masa.h>

static atomic_int failures;

#define CHECK(cond, ...)                                                     \
    do {                                                                     \
        if (!(cond)) {                                                       \
            fprintf(stderr, "%s:%d: CHECK(%s) failed: ", __FILE__, __LINE__, \
                    #cond);                                                  \
            fprintf(stderr, __VA_ARGS__);                                    \
            fputc('\n', stderr);                                             \
            atomic_fetch_add(&failures, 1);                                  \
        }                                                                    \
    } while (0)

#define OK(call)                                                             \
    do {                                                                     \
        masa_status st_ = (call);                                            \
        CHECK(st_ == MASA_OK, "%s -> %s: %s", #call,                         \
              masa_status_string(st_), masa_last_error());                   \
    } while (0)

/* d_model 32, 4 query heads over 2 key/value heads of 8, causal with RoPE;
 * Q, K, V MASA (3 atoms, 2 layers, row 1), O dense, biases on Q, V, O.
 * T = 70 spans two query tiles of the attention core. */
enum { D = 32, H = 4, KVH = 2, HD = 8, DQ = H * HD, DKV = KVH * HD };
enum { S = 3, NL = 2, LIDX = 1, B = 2, T = 70, N = B * T * D };
enum { N_WORKERS = 4, ITERS = 3 };

static const size_t din[4] = {D, D, D, DQ};
static const size_t dout[4] = {DQ, DKV, DKV, D};

/* Parameters in caller memory, shared read-only by every layer. */
static float atoms[3][S * D * DQ];
static float coefs[3][NL * S];
static float w_o[DQ * D];
static float biases[4][D];
static float x[N], dy[N];

static void make_data(void)
{
    for (int p = 0; p < 3; p++) {
        for (size_t i = 0; i < S * din[p] * dout[p]; i++)
            atoms[p][i] = 0.3f * sinf(0.37f * (float)i + (float)p);
        for (size_t i = 0; i < NL * S; i++)
            coefs[p][i] = 0.5f + 0.25f * (float)((i + p) % 3);
    }
    for (size_t i = 0; i < DQ * D; i++)
        w_o[i] = 0.2f * cosf(0.21f * (float)i);
    for (int p = 0; p < 4; p++)
        for (size_t i = 0; i < D; i++)
            biases[p][i] = 0.05f * sinf((float)(i * 3 + p));
    for (size_t i = 0; i < N; i++) {
        x[i] = sinf(0.11f * (float)i);
        dy[i] = 0.1f * cosf(0.07f * (float)i);
    }
}

typedef struct model {
    masa_context *ctx;
    masa_layer *layer;
    masa_dictionary *dict[3];
    masa_coefficients *coef[3];
} model;

static masa_context *context_with(size_t threads)
{
    masa_context_options o;
    masa_context_options_init(&o);
    o.n_threads = threads;
    masa_context *ctx = NULL;
    OK(masa_context_create(&o, &ctx));
    return ctx;
}

static void model_make(model *m, masa_context *ctx)
{
    memset(m, 0, sizeof *m);
    m->ctx = ctx;
    masa_layer_options lo;
    masa_layer_options_init(&lo);
    lo.d_model = D;
    lo.n_heads = H;
    lo.n_kv_heads = KVH;
    lo.causal = 1;
    lo.rope = 1;
    OK(masa_layer_create(ctx, &lo, &m->layer));
    for (int p = 0; p < 3; p++) {
        OK(masa_dictionary_wrap(ctx, S, din[p], dout[p], atoms[p],
                                &m->dict[p]));
        OK(masa_coefficients_wrap(ctx, NL, S, coefs[p], &m->coef[p]));
        OK(masa_layer_set_masa(m->layer, p, m->dict[p], m->coef[p], LIDX));
    }
    OK(masa_layer_set_dense(m->layer, MASA_PROJ_O, w_o));
    const int with_bias[3] = {MASA_PROJ_Q, MASA_PROJ_V, MASA_PROJ_O};
    for (int k = 0; k < 3; k++)
        OK(masa_layer_set_bias(m->layer, with_bias[k], biases[with_bias[k]]));
}

static void model_free(model *m)
{
    masa_layer_destroy(m->layer);
    for (int p = 0; p < 3; p++) {
        masa_dictionary_destroy(m->dict[p]);
        masa_coefficients_destroy(m->coef[p]);
    }
}

/* Everything one forward + backward produces. */
typedef struct result {
    float y[N], y_infer[N], dx[N];
    float d_atoms[3][S * D * DQ];
    float d_coef[3][NL * S];
    float d_wo[DQ * D];
    float d_bias[4][D];
} result;

/* One full step on layer: inference forward, training forward, backward
 * (SET). The workspace is filled with garbage first (NaN bytes). */
static void run_step(const masa_layer *layer, result *r)
{
    size_t ws_bytes = 0, rs_bytes = 0;
    OK(masa_layer_workspace_size(layer, B, T, &ws_bytes));
    OK(masa_layer_reserve_size(layer, B, T, &rs_bytes));
    void *ws = malloc(ws_bytes), *rs = malloc(rs_bytes);
    if (!ws || !rs) {
        CHECK(0, "out of memory");
        free(ws);
        free(rs);
        return;
    }
    memset(ws, 0xFF, ws_bytes);
    OK(masa_layer_forward(layer, B, T, 3, x, r->y_infer, ws, ws_bytes, NULL,
                          0));
    memset(ws, 0xFF, ws_bytes);
    OK(masa_layer_forward(layer, B, T, 3, x, r->y, ws, ws_bytes, rs,
                          rs_bytes));
    masa_layer_grads g;
    masa_layer_grads_init(&g);
    g.mode = MASA_GRAD_SET;
    for (int p = 0; p < 3; p++) {
        g.d_atoms[p] = r->d_atoms[p];
        g.d_coefficients[p] = r->d_coef[p];
    }
    g.d_weight[MASA_PROJ_O] = r->d_wo;
    g.d_bias[MASA_PROJ_Q] = r->d_bias[MASA_PROJ_Q];
    g.d_bias[MASA_PROJ_V] = r->d_bias[MASA_PROJ_V];
    g.d_bias[MASA_PROJ_O] = r->d_bias[MASA_PROJ_O];
    OK(masa_layer_backward(layer, B, T, 3, x, dy, r->dx, &g, ws, ws_bytes,
                           rs, rs_bytes));
    free(ws);
    free(rs);
}

static double max_rel_diff(const float *a, const float *b, size_t n)
{
    double mx = 0, d = 0;
    for (size_t i = 0; i < n; i++) {
        mx = fmax(mx, fabs((double)b[i]));
        d = fmax(d, fabs((double)a[i] - (double)b[i]));
    }
    return mx > 0 ? d / mx : d;
}

/* Bitwise comparison of two results (NaN-free by construction). */
static void compare(const char *who, const result *got, const result *ref)
{
#define CMP(field, n)                                                        \
    CHECK(memcmp(got->field, ref->field, (n) * sizeof(float)) == 0,          \
          "%s: %s differs from the single-threaded result (max rel %g)", who,\
          #field, max_rel_diff(got->field, ref->field, (n)))
    CMP(y, N);
    CMP(y_infer, N);
    CMP(dx, N);
    for (int p = 0; p < 3; p++) {
        CMP(d_atoms[p], S * din[p] * dout[p]);
        CMP(d_coef[p], NL * S);
    }
    CMP(d_wo, DQ * D);
    CMP(d_bias[MASA_PROJ_Q], DQ);
    CMP(d_bias[MASA_PROJ_V], DKV);
    CMP(d_bias[MASA_PROJ_O], D);
#undef CMP
}

static result reference;

/* ---- 1. one shared layer, many threads ---- */

typedef struct shared_arg {
    const masa_layer *layer;
    int id;
    pthread_barrier_t *start;
} shared_arg;

static void *shared_layer_worker(void *p)
{
    shared_arg *a = p;
    result *r = malloc(sizeof *r);
    if (!r) {
        CHECK(0, "out of memory");
        return NULL;
    }
    pthread_barrier_wait(a->start);
    for (int it = 0; it < ITERS; it++) {
        memset(r, 0, sizeof *r);
        run_step(a->layer, r);
        char who[64];
        snprintf(who, sizeof who, "shared layer, thread %d, iteration %d",
                 a->id, it);
        compare(who, r, &reference);
    }
    free(r);
    return NULL;
}

static void test_shared_layer(void)
{
    masa_context *ctx = context_with(2);
    model m;
    model_make(&m, ctx);
    run_step(m.layer, &reference); /* single-threaded, pool free */

    pthread_t th[N_WORKERS];
    shared_arg args[N_WORKERS];
    pthread_barrier_t start;
    pthread_barrier_init(&start, NULL, N_WORKERS);
    for (int i = 0; i < N_WORKERS; i++) {
        args[i] = (shared_arg){m.layer, i, &start};
        CHECK(pthread_create(&th[i], NULL, shared_layer_worker, &args[i]) == 0,
              "pthread_create");
    }
    for (int i = 0; i < N_WORKERS; i++)
        pthread_join(th[i], NULL);
    pthread_barrier_destroy(&start);

    /* the layer is unchanged and still gives the same result */
    result *r = malloc(sizeof *r);
    if (r) {
        memset(r, 0, sizeof *r); /* SET leaves other table rows untouched */
        run_step(m.layer, r);
        compare("shared layer, after the threads", r, &reference);
        free(r);
    }
    model_free(&m);
    masa_context_destroy(ctx);
}

/* ---- 2. two contexts from two threads ---- */

typedef struct ctx_arg {
    size_t n_threads;
    int id;
    pthread_barrier_t *start;
} ctx_arg;

static void *own_context_worker(void *p)
{
    ctx_arg *a = p;
    result *r = malloc(sizeof *r);
    if (!r) {
        CHECK(0, "out of memory");
        return NULL;
    }
    pthread_barrier_wait(a->start); /* create the contexts at the same time */
    masa_context *ctx = context_with(a->n_threads);
    if (ctx) {
        model m;
        model_make(&m, ctx);
        for (int it = 0; it < ITERS; it++) {
            memset(r, 0, sizeof *r);
            run_step(m.layer, r);
            char who[64];
            snprintf(who, sizeof who, "context %d, iteration %d", a->id, it);
            compare(who, r, &reference);
        }
        model_free(&m);
        masa_context_destroy(ctx);
    }
    free(r);
    return NULL;
}

static void test_two_contexts(void)
{
    pthread_t th[2];
    ctx_arg args[2];
    pthread_barrier_t start;
    pthread_barrier_init(&start, NULL, 2);
    for (int i = 0; i < 2; i++) {
        /* same thread count as the reference: same BLIS partitioning */
        args[i] = (ctx_arg){2, i, &start};
        CHECK(pthread_create(&th[i], NULL, own_context_worker, &args[i]) == 0,
              "pthread_create");
    }
    for (int i = 0; i < 2; i++)
        pthread_join(th[i], NULL);
    pthread_barrier_destroy(&start);
}

/* ---- 3. contexts created and destroyed concurrently ---- */

static void *churn_worker(void *p)
{
    pthread_barrier_t *start = p;
    pthread_barrier_wait(start);
    for (int i = 0; i < 8; i++) {
        masa_context *ctx = context_with((size_t)(i % 3) + 1);
        CHECK(masa_blis_arch()[0] != '\0', "empty BLIS arch");
        masa_context_destroy(ctx);
    }
    return NULL;
}

static void test_context_churn(void)
{
    pthread_t th[3];
    pthread_barrier_t start;
    pthread_barrier_init(&start, NULL, 3);
    for (int i = 0; i < 3; i++)
        CHECK(pthread_create(&th[i], NULL, churn_worker, &start) == 0,
              "pthread_create");
    for (int i = 0; i < 3; i++)
        pthread_join(th[i], NULL);
    pthread_barrier_destroy(&start);
}

/* ---- 4. per-thread error messages ---- */

typedef struct err_arg {
    int fail; /* this thread makes calls that fail */
    masa_context *ctx;
    pthread_barrier_t *step;
} err_arg;

static void *error_worker(void *p)
{
    err_arg *a = p;
    for (int i = 0; i < 50; i++) {
        pthread_barrier_wait(a->step);
        if (a->fail) {
            masa_layer_options lo;
            masa_layer_options_init(&lo);
            lo.d_model = 6;
            lo.n_heads = 4; /* 6 is not a multiple of 4 */
            masa_layer *l = NULL;
            CHECK(masa_layer_create(a->ctx, &lo, &l) ==
                      MASA_ERROR_BAD_SHAPE,
                  "expected a bad shape");
        } else {
            size_t n = 0;
            CHECK(masa_dictionary_shape(NULL, &n, NULL, NULL) ==
                      MASA_ERROR_NULL_ARGUMENT,
                  "expected a null argument");
        }
        pthread_barrier_wait(a->step); /* both threads have failed now */
        const char *msg = masa_last_error();
        const char *want =
            a->fail ? "masa_layer_create" : "masa_dictionary_shape";
        CHECK(strstr(msg, want) != NULL, "thread sees \"%s\", want %s", msg,
              want);
    }
    return NULL;
}

static void test_error_messages(void)
{
    pthread_t th[2];
    err_arg args[2];
    pthread_barrier_t step;
    pthread_barrier_init(&step, NULL, 2);
    masa_context *ctx = context_with(1);
    for (int i = 0; i < 2; i++) {
        args[i] = (err_arg){i, ctx, &step};
        CHECK(pthread_create(&th[i], NULL, error_worker, &args[i]) == 0,
              "pthread_create");
    }
    for (int i = 0; i < 2; i++)
        pthread_join(th[i], NULL);
    pthread_barrier_destroy(&step);
    masa_context_destroy(ctx);
}

int main(void)
{
    make_data();
    struct {
        const char *name;
        void (*fn)(void);
    } tests[] = {
        {"shared layer, 4 threads", test_shared_layer},
        {"two contexts, two threads", test_two_contexts},
        {"contexts created and destroyed concurrently", test_context_churn},
        {"per-thread error messages", test_error_messages},
    };
    int failed_tests = 0;
    for (size_t i = 0; i < sizeof tests / sizeof tests[0]; i++) {
        int before = atomic_load(&failures);
        tests[i].fn();
        int now = atomic_load(&failures);
        printf("%s: %s\n", now == before ? "PASS" : "FAIL", tests[i].name);
        failed_tests += now != before;
    }
    printf("concurrency: %d of %zu tests failed\n", failed_tests,
           sizeof tests / sizeof tests[0]);
    return failed_tests ? EXIT_FAILURE : EXIT_SUCCESS;
}
