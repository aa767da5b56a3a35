/*
 * bench_decode: per-token decode time of a stack of L causal attention
 * layers (a residual add between layers), MASA (S atoms per projection
 * type) with both weight policies -- on the fly (the factored path at one
 * token) and cached (composed weights, read as dense ones) -- against
 * dense, after a prefill of `ctx` cached tokens. Widths: one where the four MASA dictionaries fit in
 * the 32 MiB last-level cache and the dense weights do not, and a larger
 * one. A second table times the two ways of a MASA projection at a few rows
 * (factored [c_1 X | ... | c_S X] R against composing W first) to check the
 * rule masa_layer_decode() uses to choose between them.
 *
 * Prints progress to stderr and a markdown section to stdout.
 *   bench_decode [--quick] [--threads N]   (N = 0: all online CPUs)
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/internal.h"
#include "masa/masa.h"

#define BENCH_NAME "bench_decode"
#include "bench_common.h"

#define S_ATOMS 8

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static float unif(void) { return unif_from(&rng_state); }

/* ---- one stack of L layers with their caches ---- */

typedef struct stack {
    size_t L, d;
    masa_layer **layer;
    masa_kv_cache **cache;
    void **cache_mem;
    float **dense_w;              /* dense: 4 * L weights */
    masa_dictionary *dict[4];     /* MASA */
    masa_coefficients *coef[4];
    void *ws;
    size_t ws_bytes;
} stack;

/* The three stacks of a width. */
enum { DENSE, MASA_FLY, MASA_CACHED, N_STACKS };
static const char *const stack_names[N_STACKS] = {"dense", "MASA on the fly",
                                                  "MASA cached"};

static void stack_init(stack *s, masa_context *ctx, size_t L, size_t d,
                       int kind, size_t max_seq, size_t max_new)
{
    int masa = kind != DENSE;
    memset(s, 0, sizeof *s);
    s->L = L;
    s->d = d;
    s->layer = calloc(L, sizeof *s->layer);
    s->cache = calloc(L, sizeof *s->cache);
    s->cache_mem = calloc(L, sizeof *s->cache_mem);
    s->dense_w = calloc(4 * L, sizeof *s->dense_w);
    float bound = 1.0f / sqrtf((float)d);
    if (masa)
        for (int p = 0; p < 4; p++) {
            OK(masa_dictionary_create(ctx, S_ATOMS, d, d, &s->dict[p]));
            OK(masa_dictionary_init_uniform(s->dict[p], bound,
                                            100 + (uint64_t)p));
            OK(masa_coefficients_create(ctx, L, S_ATOMS, &s->coef[p]));
            OK(masa_coefficients_init_cyclic(s->coef[p]));
            OK(masa_coefficients_add_uniform(s->coef[p], 0.3f,
                                             200 + (uint64_t)p));
        }
    masa_layer_options o;
    masa_layer_options_init(&o);
    o.d_model = d;
    o.n_heads = d / 64; /* head_dim 64 */
    o.causal = 1;
    o.rope = 1;
    for (size_t l = 0; l < L; l++) {
        OK(masa_layer_create(ctx, &o, &s->layer[l]));
        for (int p = 0; p < 4; p++) {
            if (masa) {
                OK(masa_layer_set_masa(s->layer[l], (masa_projection)p,
                                       s->dict[p], s->coef[p], l));
                if (kind == MASA_CACHED)
                    OK(masa_layer_set_weight_policy(s->layer[l],
                                                    MASA_WEIGHTS_CACHED));
            } else {
                float *w = xalloc(d * d * sizeof(float));
                for (size_t i = 0; i < d * d; i++)
                    w[i] = bound * unif();
                s->dense_w[4 * l + (size_t)p] = w;
                OK(masa_layer_set_dense(s->layer[l], (masa_projection)p, w));
            }
        }
        size_t bytes;
        OK(masa_kv_cache_size(s->layer[l], 1, max_seq, &bytes));
        s->cache_mem[l] = xalloc(bytes);
        OK(masa_kv_cache_create(s->layer[l], 1, max_seq, s->cache_mem[l],
                                bytes, &s->cache[l]));
    }
    OK(masa_layer_decode_workspace_size(s->layer[0], 1, max_new,
                                        &s->ws_bytes));
    s->ws = xalloc(s->ws_bytes);
}

static void stack_fini(stack *s)
{
    for (size_t l = 0; l < s->L; l++) {
        masa_kv_cache_destroy(s->cache[l]);
        free(s->cache_mem[l]);
        masa_layer_destroy(s->layer[l]);
        for (int p = 0; p < 4; p++)
            free(s->dense_w[4 * l + (size_t)p]);
    }
    for (int p = 0; p < 4; p++) {
        masa_dictionary_destroy(s->dict[p]);
        masa_coefficients_destroy(s->coef[p]);
    }
    free(s->layer);
    free(s->cache);
    free(s->cache_mem);
    free(s->dense_w);
    free(s->ws);
}

/* h ([n, d]) through every layer, h += layer(h); y is scratch. */
static void stack_step(stack *s, size_t n, float *h, float *y)
{
    for (size_t l = 0; l < s->L; l++) {
        OK(masa_layer_decode(s->layer[l], s->cache[l], 1, n, h, y, s->ws,
                             s->ws_bytes));
        for (size_t i = 0; i < n * s->d; i++)
            h[i] += y[i];
    }
}

static void stack_truncate(stack *s, size_t len)
{
    for (size_t l = 0; l < s->L; l++)
        OK(masa_kv_cache_truncate(s->cache[l], len));
}

/* Seconds per token: decode `tokens` tokens after a cache of `ctx`. */
static double time_tokens(stack *s, size_t ctx, size_t tokens, float *h,
                          float *y)
{
    stack_truncate(s, ctx);
    double t0 = now();
    for (size_t t = 0; t < tokens; t++) {
        /* each token starts from a bounded input, as after a norm layer */
        for (size_t i = 0; i < s->d; i++)
            h[i] = unif();
        stack_step(s, 1, h, y);
    }
    return (now() - t0) / (double)tokens;
}

typedef struct row {
    size_t d, threads;
    double ms[N_STACKS], prefill_ms[N_STACKS];
} row;

static row run_width(size_t d, size_t L, size_t ctx_len, size_t tokens,
                     size_t reps, size_t threads)
{
    masa_context_options co;
    masa_context_options_init(&co);
    co.n_threads = threads;
    masa_context *ctx = NULL;
    OK(masa_context_create(&co, &ctx));
    row r = {.d = d, .threads = masa_context_threads(ctx)};
    size_t max_seq = ctx_len + tokens;
    stack st[N_STACKS];
    float *h = xalloc(ctx_len * d * sizeof(float));
    float *y = xalloc(ctx_len * d * sizeof(float));
    double prefill[N_STACKS];
    for (int m = 0; m < N_STACKS; m++) {
        fprintf(stderr, "  d=%zu threads=%zu: building the %s stack\n", d,
                r.threads, stack_names[m]);
        stack_init(&st[m], ctx, L, d, m, max_seq, ctx_len);
        for (size_t i = 0; i < ctx_len * d; i++)
            h[i] = unif();
        double t0 = now();
        stack_step(&st[m], ctx_len, h, y); /* prefill */
        prefill[m] = now() - t0;
    }
    double *t[N_STACKS];
    for (int m = 0; m < N_STACKS; m++) {
        t[m] = calloc(reps, sizeof(double));
        time_tokens(&st[m], ctx_len, 1, h, y); /* warm-up */
    }
    /* interleaved, in forward and reversed order on alternate rounds, so
     * drifting load hits all stacks alike */
    for (size_t k = 0; k < reps; k++)
        for (int i = 0; i < N_STACKS; i++) {
            int m = k % 2 ? N_STACKS - 1 - i : i;
            t[m][k] = time_tokens(&st[m], ctx_len, tokens, h, y);
            fprintf(stderr, "  d=%zu %s rep %zu: %.3f ms/token\n", d,
                    stack_names[m], k, 1e3 * t[m][k]);
        }
    for (size_t i = 0; i < d; i++)
        if (!isfinite(h[i])) {
            fprintf(stderr, "bench_decode: non-finite output\n");
            exit(1);
        }
    for (int m = 0; m < N_STACKS; m++) {
        r.ms[m] = 1e3 * median(t[m], reps);
        r.prefill_ms[m] = 1e3 * prefill[m];
        free(t[m]);
        stack_fini(&st[m]);
    }
    free(h);
    free(y);
    masa_context_destroy(ctx);
    return r;
}

/* ---- the factored/compose rule at a few rows (one thread, internal) ---- */

typedef struct path_row {
    size_t rows;
    double factored_us, compose_us;
    const char *chosen;
} path_row;

static path_row time_paths(masa_context *ctx, masa_layer *layer,
                           masa_dictionary *dict, masa_coefficients *coef,
                           size_t d, size_t rows, size_t reps)
{
    size_t S = S_ATOMS, K = d, N = d;
    float *x = xalloc(rows * K * sizeof(float));
    float *xs = xalloc(rows * S * K * sizeof(float));
    float *w = xalloc(K * N * sizeof(float));
    float *out = xalloc(rows * N * sizeof(float));
    for (size_t i = 0; i < rows * K; i++)
        x[i] = unif();
    const float *c = coef->data; /* layer 0 */
    double *tf = calloc(reps, sizeof(double)), *tc = calloc(reps, sizeof(double));
    for (size_t k = 0; k < reps + 1; k++) {
        double t0 = now();
        for (size_t r = 0; r < rows; r++)
            for (size_t s = 0; s < S; s++)
                for (size_t i = 0; i < K; i++)
                    xs[(r * S + s) * K + i] = c[s] * x[r * K + i];
        if (rows == 1)
            masa__gemv(N, S * K, 1.0f, dict->atoms, 1, N, xs, 0.0f, out, 1);
        else
            masa__gemm(rows, N, S * K, 1.0f, xs, S * K, 1, dict->atoms, N, 1,
                       0.0f, out, N, 1, 1);
        double t1 = now();
        masa__compose(dict, coef, 0, w, NULL);
        if (rows == 1)
            masa__gemv(N, K, 1.0f, w, 1, N, x, 0.0f, out, 1);
        else
            masa__gemm(rows, N, K, 1.0f, x, K, 1, w, N, 1, 0.0f, out, N, 1, 1);
        double t2 = now();
        if (k > 0) { /* the first round warms up */
            tf[k - 1] = t1 - t0;
            tc[k - 1] = t2 - t1;
        }
    }
    path_row pr = {.rows = rows, .factored_us = 1e6 * median(tf, reps),
                   .compose_us = 1e6 * median(tc, reps)};
    pr.chosen = masa__decode_proj_path(layer, MASA_PROJ_Q, rows) ==
                        MASA_PATH_FACTORED
                    ? "factored"
                    : "compose";
    (void)ctx;
    free(tf);
    free(tc);
    free(x);
    free(xs);
    free(w);
    free(out);
    return pr;
}

int main(int argc, char **argv)
{
    int quick = 0;
    size_t threads = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--quick") == 0)
            quick = 1;
        else if (strcmp(argv[i], "--threads") == 0 && i + 1 < argc)
            threads = (size_t)strtoul(argv[++i], NULL, 10);
        else {
            fprintf(stderr, "usage: %s [--quick] [--threads N]\n", argv[0]);
            return 2;
        }
    }
    size_t L = quick ? 4 : 24, ctx_len = quick ? 64 : 512;
    size_t tokens = quick ? 2 : 8, reps = quick ? 3 : 7;
    size_t widths[2] = {quick ? 128 : 384, quick ? 256 : 1024};
    const char *arch = masa_blis_arch();

    row rows[4];
    size_t n_rows = 0;
    size_t thread_counts[2] = {1, threads};
    for (int w = 0; w < 2; w++)
        for (int k = 0; k < 2; k++) {
            fprintf(stderr, "bench_decode: d=%zu\n", widths[w]);
            rows[n_rows++] = run_width(widths[w], L, ctx_len, tokens, reps,
                                       thread_counts[k]);
        }

    /* the path rule at the first width */
    masa_context *ctx = NULL;
    OK(masa_context_create(NULL, &ctx));
    size_t d = widths[0];
    masa_dictionary *dict;
    masa_coefficients *coef;
    masa_layer *layer;
    OK(masa_dictionary_create(ctx, S_ATOMS, d, d, &dict));
    OK(masa_dictionary_init_uniform(dict, 0.0f, 7));
    OK(masa_coefficients_create(ctx, 1, S_ATOMS, &coef));
    OK(masa_coefficients_add_uniform(coef, 1.0f, 8));
    masa_layer_options o;
    masa_layer_options_init(&o);
    o.d_model = d;
    o.n_heads = d / 64;
    o.causal = 1;
    OK(masa_layer_create(ctx, &o, &layer));
    OK(masa_layer_set_masa(layer, MASA_PROJ_Q, dict, coef, 0));
    size_t path_rows[] = {1, 2, 3, 4, 8, 16};
    path_row pr[6];
    for (int i = 0; i < 6; i++) {
        fprintf(stderr, "bench_decode: paths at %zu rows\n", path_rows[i]);
        pr[i] = time_paths(ctx, layer, dict, coef, d, path_rows[i],
                           quick ? 3 : 15);
    }

    double mib = 1024.0 * 1024.0;
    printf("### Decode: per-token time of a %zu-layer stack, MASA vs dense\n\n",
           L);
    printf("One token per step (batch 1) after %zu cached tokens, through %zu "
           "causal RoPE attention layers (head_dim 64) with a residual add "
           "between; MASA: S = %d atoms per projection type shared by all "
           "layers. On the fly: the factored path (atoms read once per "
           "layer, W never formed); cached: MASA_WEIGHTS_CACHED, the "
           "composed weights read as dense ones (memory of dense). Median "
           "over %zu repetitions of %zu tokens, the three stacks interleaved, "
           "CLOCK_MONOTONIC. BLIS kernels: %s. Machine shared with other "
           "jobs: compare ratios within a row.\n\n",
           ctx_len, L, S_ATOMS, reps, tokens, arch);
    printf("| d_model | threads | MASA dictionaries (MiB) | dense weights (MiB) "
           "| dense ms/token | MASA on the fly ms/token | MASA cached "
           "ms/token | on the fly / dense | cached / dense | prefill %zu "
           "tokens dense / on the fly / cached (ms) |\n", ctx_len);
    printf("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for (size_t i = 0; i < n_rows; i++) {
        double dd = (double)rows[i].d;
        const double *ms = rows[i].ms, *pf = rows[i].prefill_ms;
        printf("| %zu | %zu | %.1f | %.1f | %.3f | %.3f | %.3f | %.2f | %.2f "
               "| %.0f / %.0f / %.0f |\n",
               rows[i].d, rows[i].threads, 4.0 * S_ATOMS * dd * dd * 4 / mib,
               4.0 * (double)L * dd * dd * 4 / mib, ms[DENSE], ms[MASA_FLY],
               ms[MASA_CACHED], ms[MASA_FLY] / ms[DENSE],
               ms[MASA_CACHED] / ms[DENSE], pf[DENSE], pf[MASA_FLY],
               pf[MASA_CACHED]);
    }
    printf("\nBytes of weights read per token: dense and cached 4 L d^2 "
           "floats, MASA on the fly (factored) 4 L S d^2 floats (S = %d "
           "times more, from a dictionary that is S/L of the dense size).\n\n",
           S_ATOMS);
    printf("MASA projection at d = %zu, S = %d, one thread: factored "
           "[c_1 X | ... | c_S X] R against composing W first (median us):\n\n",
           d, S_ATOMS);
    printf("| rows | factored (us) | compose + X W (us) | rule picks |\n");
    printf("|---:|---:|---:|---|\n");
    for (int i = 0; i < 6; i++)
        printf("| %zu | %.1f | %.1f | %s |\n", pr[i].rows, pr[i].factored_us,
               pr[i].compose_us, pr[i].chosen);
    printf("\n");
    masa_layer_destroy(layer);
    masa_dictionary_destroy(dict);
    masa_coefficients_destroy(coef);
    masa_context_destroy(ctx);
    return 0;
}
