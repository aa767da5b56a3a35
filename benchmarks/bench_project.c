/*
 * bench_project: one attention projection (rows x d times d x d) at the
 * issue's layer shapes, rows = B*T in {128, 2048, 4096, 8192}, d in {512,
 * 1024}, MASA with L = 24 layers sharing S = 8 atoms. For each shape, in one
 * run, interleaved call by call (so load on the machine hits all variants
 * alike), medians of:
 *   forward           BLIS sgemm alone, two ways: with BLIS's own threads
 *                     (bli_sgemm_ex, the same thread count) and as one
 *                     single-threaded call per thread on blocks of rows or
 *                     columns (masa__gemm_pool, what the library runs)
 *                     / MASA on the fly (compose W_l on the pool, then the
 *                     GEMM) / MASA cached (the composed weight)
 *   forward+backward  BLIS alone: Y = X W, dX = dY W^T, dW = X^T dY
 *                     / MASA on the fly and cached: the same three GEMMs
 *                     (G = X^T dY in place of dW) plus, on the fly, one
 *                     pass over the atoms for W_l in forward and one in
 *                     backward that gives dc, dD and W_l together
 * and of composition alone: the pool-parallel pass (masa__compose) against
 * the former single-threaded BLIS gemv over the atoms.
 * Each MASA call uses the next layer's coefficient row (l = 0..23, cycling),
 * as a stack does. The rate is the dense GEMMs' flops over the time
 * (2 rows d^2 per GEMM; composition flops not counted); the percentages are
 * the better of BLIS's two times over MASA's: the share of BLIS's best rate
 * a projection reaches.
 *
 * Prints progress to stderr and a markdown section to stdout.
 *   bench_project [--quick] [--threads N]   (N = 0: all online CPUs)
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <blis.h>

#include "common/internal.h"
#include "masa/masa.h"

#define BENCH_NAME "bench_project"
#include "bench_common.h"

#define S_ATOMS 8
#define L_LAYERS 24

static float *falloc(size_t n)
{
    float *p = xalloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++)
        p[i] = (float)((i * 2654435761u) % 1000) * 1e-3f - 0.5f;
    return p;
}

/* BLIS's own sgemm: C = A op(B) with strides, default settings (its
 * small-matrix path on), `threads` threads. */
static void blis_sgemm(size_t m, size_t n, size_t k, const float *a,
                       size_t rsa, size_t csa, const float *b, size_t rsb,
                       size_t csb, float *c, size_t threads)
{
    rntm_t rntm = BLIS_RNTM_INITIALIZER;
    bli_rntm_set_num_threads((dim_t)threads, &rntm);
    float one = 1.0f, zero = 0.0f;
    bli_sgemm_ex(BLIS_NO_TRANSPOSE, BLIS_NO_TRANSPOSE, (dim_t)m, (dim_t)n,
                 (dim_t)k, &one, (float *)a, (inc_t)rsa, (inc_t)csa,
                 (float *)b, (inc_t)rsb, (inc_t)csb, &zero, c, (inc_t)n, 1,
                 NULL, &rntm);
}

enum { V_BLIS_F, V_BLISPOOL_F, V_FLY_F, V_CACHED_F, V_BLIS_FB,
       V_BLISPOOL_FB, V_FLY_FB, V_CACHED_FB, V_COMPOSE, V_GEMV, N_VARIANTS };

typedef struct bench {
    size_t rows, d, threads;
    masa_context *ctx;
    masa_dictionary *dict;
    masa_coefficients *coef;
    masa_layer *fly[L_LAYERS], *cached[L_LAYERS];
    float *x, *y, *dy, *dx, *w, *dw, *wscratch, *gscratch, *d_atoms, *d_coef;
    double *partials;
    size_t layer; /* next layer index */
} bench;

static masa_layer *make_layer(bench *b, size_t l, masa_weight_policy pol)
{
    masa_layer_options o;
    masa_layer_options_init(&o);
    o.d_model = b->d;
    o.n_heads = b->d / 64;
    masa_layer *layer = NULL;
    OK(masa_layer_create(b->ctx, &o, &layer));
    /* only Q is timed (masa__project does not need the others set) */
    OK(masa_layer_set_masa(layer, MASA_PROJ_Q, b->dict, b->coef, l));
    OK(masa_layer_set_weight_policy(layer, pol));
    return layer;
}

static void setup(bench *b, size_t rows, size_t d, size_t threads,
                  bool with_cache)
{
    memset(b, 0, sizeof *b);
    b->rows = rows;
    b->d = d;
    b->threads = threads;
    masa_context_options co;
    masa_context_options_init(&co);
    co.n_threads = threads;
    OK(masa_context_create(&co, &b->ctx));
    OK(masa_dictionary_create(b->ctx, S_ATOMS, d, d, &b->dict));
    OK(masa_dictionary_init_uniform(b->dict, 0.0f, 1));
    OK(masa_coefficients_create(b->ctx, L_LAYERS, S_ATOMS, &b->coef));
    OK(masa_coefficients_init_cyclic(b->coef));
    OK(masa_coefficients_add_uniform(b->coef, 0.3f, 2));
    for (size_t l = 0; l < L_LAYERS; l++) {
        b->fly[l] = make_layer(b, l, MASA_WEIGHTS_ON_THE_FLY);
        /* 24 composed weights (96 MiB at d 1024), as a cached stack holds
         * for one projection type */
        b->cached[l] = with_cache ? make_layer(b, l, MASA_WEIGHTS_CACHED)
                                  : NULL;
    }
    size_t act = rows * d, w = d * d;
    b->x = falloc(act);
    b->y = falloc(act);
    b->dy = falloc(act);
    b->dx = falloc(act);
    b->w = falloc(w);
    b->dw = falloc(w);
    b->wscratch = falloc(w);
    b->gscratch = falloc(w);
    b->d_atoms = falloc(S_ATOMS * w);
    b->d_coef = falloc(L_LAYERS * S_ATOMS);
    b->partials = malloc(MASA_ATOM_GRAD_PARTIALS * sizeof(double));
}

static void teardown(bench *b)
{
    for (size_t l = 0; l < L_LAYERS; l++) {
        masa_layer_destroy(b->fly[l]);
        masa_layer_destroy(b->cached[l]);
    }
    masa_coefficients_destroy(b->coef);
    masa_dictionary_destroy(b->dict);
    masa_context_destroy(b->ctx);
    float *bufs[] = {b->x, b->y, b->dy, b->dx, b->w, b->dw, b->wscratch,
                     b->gscratch, b->d_atoms, b->d_coef};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        free(bufs[i]);
    free(b->partials);
}

/* One MASA projection forward (+ backward) on layer l's Q. */
static void masa_proj(bench *b, masa_layer *layer, bool backward)
{
    /* no low-rank term: its scratch is never touched */
    masa__project(layer, MASA_PROJ_Q, b->x, b->rows, b->y, b->wscratch, NULL);
    if (!backward)
        return;
    masa_layer_grads g;
    masa_layer_grads_init(&g);
    g.d_atoms[MASA_PROJ_Q] = b->d_atoms;
    g.d_coefficients[MASA_PROJ_Q] = b->d_coef;
    masa__project_backward(layer, MASA_PROJ_Q, b->x, b->dy, b->rows, &g,
                           b->dx, 0.0f, b->wscratch, b->gscratch,
                           b->partials, NULL);
}

static void run_variant(bench *b, int v)
{
    size_t m = b->rows, d = b->d, l = b->layer;
    switch (v) {
    case V_BLIS_F:
    case V_BLIS_FB:
        blis_sgemm(m, d, d, b->x, d, 1, b->w, d, 1, b->y, b->threads);
        if (v == V_BLIS_FB) {
            blis_sgemm(m, d, d, b->dy, d, 1, b->w, 1, d, b->dx, b->threads);
            blis_sgemm(d, d, m, b->x, 1, d, b->dy, d, 1, b->dw, b->threads);
        }
        break;
    case V_BLISPOOL_F:
    case V_BLISPOOL_FB: /* the same products as blocks on the pool */
        masa__gemm_pool(b->ctx->pool, b->threads, m, d, d, 1.0f, b->x, d, 1,
                        b->w, d, 1, 0.0f, b->y, d, 1);
        if (v == V_BLISPOOL_FB) {
            masa__gemm_pool(b->ctx->pool, b->threads, m, d, d, 1.0f, b->dy,
                            d, 1, b->w, 1, d, 0.0f, b->dx, d, 1);
            masa__gemm_pool(b->ctx->pool, b->threads, d, d, m, 1.0f, b->x, 1,
                            d, b->dy, d, 1, 0.0f, b->dw, d, 1);
        }
        break;
    case V_FLY_F:
    case V_FLY_FB:
        masa_proj(b, b->fly[l], v == V_FLY_FB);
        break;
    case V_CACHED_F:
    case V_CACHED_FB:
        masa_proj(b, b->cached[l], v == V_CACHED_FB);
        break;
    case V_COMPOSE:
        masa__compose(b->dict, b->coef, l, b->wscratch, b->ctx->pool);
        break;
    case V_GEMV: /* the former composition: one BLIS gemv over the atoms */
        masa__gemv(d * d, S_ATOMS, 1.0f, b->dict->atoms, 1, d * d,
                   b->coef->data + l * S_ATOMS, 0.0f, b->wscratch, 1);
        break;
    }
}

int main(int argc, char **argv)
{
    bool quick = false;
    size_t threads = 2;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--quick") == 0)
            quick = true;
        else if (strcmp(argv[i], "--threads") == 0 && i + 1 < argc)
            threads = (size_t)strtoul(argv[++i], NULL, 10);
        else {
            fprintf(stderr, "usage: bench_project [--quick] [--threads N]\n");
            return 2;
        }
    }
    static const size_t all_rows[] = {128, 2048, 4096, 8192};
    static const size_t all_d[] = {512, 1024};
    size_t n_rows = quick ? 2 : 4, n_d = quick ? 1 : 2;
    /* a run of every variant in a rotating order; rounds until each has
     * this much time (at least min_reps rounds) */
    double budget = quick ? 0.05 : 0.5;
    size_t min_reps = quick ? 3 : 5, max_reps = quick ? 5 : 41;

    masa_context *probe = NULL;
    masa_context_options co;
    masa_context_options_init(&co);
    co.n_threads = threads;
    OK(masa_context_create(&co, &probe));
    threads = masa_context_threads(probe);
    masa_context_destroy(probe);

    printf("## Projections vs BLIS sgemm (bench_project)\n\n");
    printf("One projection X (rows x d) times W (d x d), MASA L = %d, "
           "S = %d; %zu threads, BLIS kernels %s. Medians of interleaved "
           "calls; GFLOP/s counts the dense GEMMs only (2 rows d^2 each); "
           "percentages: the better BLIS time / MASA time.%s\n\n",
           L_LAYERS, S_ATOMS, threads, masa_blis_arch(),
           quick ? " Quick run (--quick): fewer shapes and repetitions." : "");
    printf("| rows | d | BLIS fwd GFLOP/s: own threads / pool blocks | "
           "MASA fwd on the fly | MASA fwd cached | BLIS fwd+bwd GFLOP/s: "
           "own threads / pool blocks | MASA fwd+bwd on the fly | MASA "
           "fwd+bwd cached | compose ms: pool pass / BLIS gemv |\n");
    printf("|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    fflush(stdout);

    for (size_t di = 0; di < n_d; di++) {
        for (size_t ri = 0; ri < n_rows; ri++) {
            size_t rows = all_rows[ri], d = all_d[di];
            bench b;
            setup(&b, rows, d, threads, true);
            fprintf(stderr, "bench_project: rows %zu d %zu\n", rows, d);
            double *t[N_VARIANTS], total[N_VARIANTS] = {0};
            for (int v = 0; v < N_VARIANTS; v++) {
                t[v] = calloc(max_reps, sizeof(double));
                run_variant(&b, v); /* warm-up */
            }
            size_t reps = 0;
            for (; reps < max_reps; reps++) {
                bool done = reps >= min_reps;
                for (int v = 0; v < N_VARIANTS; v++)
                    done = done && total[v] >= budget;
                if (done)
                    break;
                for (int k = 0; k < N_VARIANTS; k++) {
                    /* forward and reversed order on alternate rounds */
                    int v = reps % 2 ? N_VARIANTS - 1 - k : k;
                    double t0 = now();
                    run_variant(&b, v);
                    t[v][reps] = now() - t0;
                    total[v] += t[v][reps];
                }
                b.layer = (b.layer + 1) % L_LAYERS;
            }
            double med[N_VARIANTS];
            for (int v = 0; v < N_VARIANTS; v++) {
                med[v] = median(t[v], reps);
                free(t[v]);
            }
            double f1 = 2.0 * (double)rows * (double)d * (double)d;
            /* BLIS's best: its own threads or one thread per pool block */
            double best_f = med[V_BLIS_F] < med[V_BLISPOOL_F]
                                ? med[V_BLIS_F] : med[V_BLISPOOL_F];
            double best_fb = med[V_BLIS_FB] < med[V_BLISPOOL_FB]
                                 ? med[V_BLIS_FB] : med[V_BLISPOOL_FB];
            printf("| %zu | %zu | %.1f / %.1f | %.1f (%.0f%%) | %.1f (%.0f%%) "
                   "| %.1f / %.1f | %.1f (%.0f%%) | %.1f (%.0f%%) | "
                   "%.3f / %.3f |\n",
                   rows, d, f1 / med[V_BLIS_F] * 1e-9,
                   f1 / med[V_BLISPOOL_F] * 1e-9, f1 / med[V_FLY_F] * 1e-9,
                   100 * best_f / med[V_FLY_F], f1 / med[V_CACHED_F] * 1e-9,
                   100 * best_f / med[V_CACHED_F],
                   3 * f1 / med[V_BLIS_FB] * 1e-9,
                   3 * f1 / med[V_BLISPOOL_FB] * 1e-9,
                   3 * f1 / med[V_FLY_FB] * 1e-9,
                   100 * best_fb / med[V_FLY_FB],
                   3 * f1 / med[V_CACHED_FB] * 1e-9,
                   100 * best_fb / med[V_CACHED_FB], med[V_COMPOSE] * 1e3,
                   med[V_GEMV] * 1e3);
            fflush(stdout);
            teardown(&b);
        }
    }
    printf("\nCommand: `build/benchmarks/bench_project%s --threads %zu`\n",
           quick ? " --quick" : "", threads);
    return 0;
}
