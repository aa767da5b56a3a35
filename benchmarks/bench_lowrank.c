/*
 * bench_lowrank: the two ways an on-the-fly MASA projection with a low-rank
 * term, Y = X (sum_s c_s D_s + A B), can run, at several row counts:
 *   thin  compose W_l, Y = X W_l, then T = X A and Y += T B
 *         (rank rows (d_in + d_out) multiply-adds for the term)
 *   fold  compose W_l, W_l += A B, then Y = X W_l
 *         (rank d_in d_out multiply-adds for the term, once)
 * and, for a projection that is A B alone, thin (X A) B against the dense
 * product X (A B) with A B formed first. Interleaved call by call, medians.
 * The library folds when rows > d_in d_out / (d_in + d_out) (= d / 2 for a
 * square projection); the "rule" column says which one it picks.
 *
 * Prints progress to stderr and a markdown section to stdout.
 *   bench_lowrank [--quick] [--threads N]   (N = 0: all online CPUs)
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/internal.h"
#include "masa/masa.h"

#define BENCH_NAME "bench_lowrank"
#include "bench_common.h"

#define S_ATOMS 8

static float *falloc(size_t n)
{
    float *p = xalloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++)
        p[i] = (float)((i * 2654435761u) % 1000) * 1e-3f - 0.5f;
    return p;
}

typedef struct case_ {
    size_t d, rank, rows;
} case_;

enum { V_THIN, V_FOLD, V_ONLY_THIN, V_ONLY_DENSE, N_V };

static void run_case(size_t threads, const case_ *c, int reps)
{
    masa_context_options co;
    masa_context_options_init(&co);
    co.n_threads = threads;
    masa_context *ctx = NULL;
    OK(masa_context_create(&co, &ctx));
    masa_dictionary *dict = NULL;
    masa_coefficients *coef = NULL;
    OK(masa_dictionary_create(ctx, S_ATOMS, c->d, c->d, &dict));
    OK(masa_dictionary_init_uniform(dict, 0.0f, 1));
    OK(masa_coefficients_create(ctx, 1, S_ATOMS, &coef));
    OK(masa_coefficients_add_uniform(coef, 0.5f, 2));
    masa_layer_options o;
    masa_layer_options_init(&o);
    o.d_model = c->d;
    o.n_heads = c->d / 64;
    masa_layer *masa = NULL, *only = NULL;
    OK(masa_layer_create(ctx, &o, &masa));
    OK(masa_layer_create(ctx, &o, &only));
    OK(masa_layer_set_masa(masa, MASA_PROJ_Q, dict, coef, 0));
    float *a = falloc(c->d * c->rank), *b = falloc(c->rank * c->d);
    OK(masa_layer_set_lowrank(masa, MASA_PROJ_Q, c->rank, a, b));
    OK(masa_layer_set_lowrank(only, MASA_PROJ_Q, c->rank, a, b));
    size_t act = c->rows * c->d;
    float *x = falloc(act), *y = falloc(act), *w = falloc(c->d * c->d);
    float *t = falloc(c->rows * c->rank);
    const masa_proj_state *ps = &masa->proj[MASA_PROJ_Q];
    masa_pool *pool = ctx->pool;
    size_t d = c->d, r = c->rank, m = c->rows;
    double times[N_V][64];
    for (int rep = 0; rep < reps; rep++)
        for (int v = 0; v < N_V; v++) {
            double t0 = now();
            switch (v) {
            case V_THIN:
                masa__compose(dict, coef, 0, w, pool);
                masa__gemm_pool(pool, threads, m, d, d, 1.0f, x, d, 1, w, d, 1,
                                0.0f, y, d, 1);
                masa__gemm_pool(pool, threads, m, r, d, 1.0f, x, d, 1, a, r, 1,
                                0.0f, t, r, 1);
                masa__gemm_pool(pool, threads, m, d, r, 1.0f, t, r, 1, b, d, 1,
                                1.0f, y, d, 1);
                break;
            case V_FOLD:
                masa__compose(dict, coef, 0, w, pool);
                masa__add_lowrank(masa, MASA_PROJ_Q, w);
                masa__gemm_pool(pool, threads, m, d, d, 1.0f, x, d, 1, w, d, 1,
                                0.0f, y, d, 1);
                break;
            case V_ONLY_THIN:
                masa__gemm_pool(pool, threads, m, r, d, 1.0f, x, d, 1, a, r, 1,
                                0.0f, t, r, 1);
                masa__gemm_pool(pool, threads, m, d, r, 1.0f, t, r, 1, b, d, 1,
                                0.0f, y, d, 1);
                break;
            case V_ONLY_DENSE:
                memset(w, 0, d * d * sizeof(float));
                masa__add_lowrank(only, MASA_PROJ_Q, w);
                masa__gemm_pool(pool, threads, m, d, d, 1.0f, x, d, 1, w, d, 1,
                                0.0f, y, d, 1);
                break;
            }
            times[v][rep] = now() - t0;
        }
    double med[N_V];
    for (int v = 0; v < N_V; v++)
        med[v] = median(times[v], (size_t)reps);
    printf("| %zu | %zu | %zu | %.3f | %.3f | %.2f | %s | %.3f | %.3f | %.2f |\n",
           d, r, m, med[V_THIN] * 1e3, med[V_FOLD] * 1e3,
           med[V_THIN] / med[V_FOLD],
           masa__lowrank_folds(ps, m) ? "fold" : "thin",
           med[V_ONLY_THIN] * 1e3, med[V_ONLY_DENSE] * 1e3,
           med[V_ONLY_DENSE] / med[V_ONLY_THIN]);
    fflush(stdout);
    free(a);
    free(b);
    free(x);
    free(y);
    free(w);
    free(t);
    masa_layer_destroy(masa);
    masa_layer_destroy(only);
    masa_coefficients_destroy(coef);
    masa_dictionary_destroy(dict);
    masa_context_destroy(ctx);
}

int main(int argc, char **argv)
{
    int quick = 0;
    size_t threads = 1;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--quick"))
            quick = 1;
        else if (!strcmp(argv[i], "--threads") && i + 1 < argc)
            threads = (size_t)strtoul(argv[++i], NULL, 10);
        else {
            fprintf(stderr, "usage: %s [--quick] [--threads N]\n", argv[0]);
            return 2;
        }
    }
    static const size_t ds[] = {576, 1024};
    static const size_t ranks[] = {32, 128};
    static const size_t rows[] = {1, 8, 64, 256, 512, 1024, 4096};
    int reps = quick ? 3 : 15;
    printf("## bench_lowrank (%zu thread%s, BLIS %s, S = %d atoms, ms, "
           "medians of %d)\n\n", threads, threads == 1 ? "" : "s",
           masa_blis_arch(), S_ATOMS, reps);
    printf("| d | rank | rows | MASA thin | MASA fold | thin/fold | rule "
           "| A B thin | A B dense | dense/thin |\n");
    printf("|---|---|---|---|---|---|---|---|---|---|\n");
    for (size_t i = 0; i < (quick ? 1 : 2); i++)
        for (size_t j = 0; j < 2; j++)
            for (size_t k = 0; k < sizeof rows / sizeof rows[0]; k++) {
                if (quick && rows[k] > 256)
                    continue;
                case_ c = {ds[i], ranks[j], rows[k]};
                fprintf(stderr, "%s: d %zu rank %zu rows %zu\n", BENCH_NAME,
                        c.d, c.rank, c.rows);
                run_case(threads, &c, reps);
            }
    return 0;
}
