/*
 * bench_layer: time of one causal attention layer (no RoPE, no bias),
 * forward (inference: no reserve) and forward+backward (training: forward
 * with reserve, then backward with dx and every parameter gradient), with
 * dense projections and with MASA projections (L = 24 layers, S = 8 atoms
 * per projection type, the layer's weights composed on the fly).
 * Only libmasa's public API is used.
 *
 * Both variants run the same weights: the dense layer's weights are
 * masa_compose() of the MASA layer's (atoms ~ U(-1, 1) / sqrt(d_in),
 * coefficients one-hot plus U(-0.1, 0.1)), so the two compute the same
 * function at the same scale, and the program checks that they agree.
 *
 * FLOP count (both variants count the same dense-equivalent FLOPs; MASA's
 * composition and its dc / dD work are not counted, so the GFLOP/s ratio is
 * the inverse of the time ratio). N = B T tokens, dq = H hd, dkv = KV hd:
 *   projections forward  P = 2 N (d dq + 2 d dkv + dq d)
 *   attention forward    A = 4 B H T^2 hd, halved when causal (Q K^T and P V)
 *   forward = P + A;  forward+backward = 3 P + 3.5 A
 * (backward: dX and dW per projection; attention backward recomputes the
 * scores and does four products of the forward's size: 2.5 A).
 *
 * Timing: the two variants alternate A B B A ... (the order flips every
 * repetition) so that load on a shared machine falls on both alike; each
 * time is a median over the repetitions, and the MASA / dense ratio is the
 * median of the ratios of adjacent pairs.
 *
 *   bench_layer [--threads N] [--reps N] [--budget SECONDS] [--quick]
 *               [--shape NAME] [--json]
 *   bench_layer --peak-memory [--proj masa|dense] [--threads N] [--quick]
 *
 * --threads  context threads (default 2; 0 = all online CPUs)
 * --reps     repetitions per variant and pass (default 7), fewer when one
 *            repetition of the pair takes longer than budget / reps
 * --budget   seconds per shape and pass (default 20), at least 3 reps
 * --quick    tiny shapes (a smoke run)
 * --shape    run only the shape of that name (see the list printed)
 * --json     one JSON object per line instead of a markdown table
 * --peak-memory  runs only forward+backward of the B=1 T=8192 shape once
 *            and reports the peak resident set (VmHWM, see rss_kib) against
 *            the bytes the run needs: inputs (x, dy), outputs (y, dx and the
 *            parameter gradients), parameters, reserve and workspace. Run it
 *            in a fresh process: the peak is the process's high-water mark.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#include <masa/masa.h>

#define BENCH_NAME "bench_layer"
#include "bench_common.h"

#define L_LAYERS 24
#define S_ATOMS 8
#define LAYER_INDEX 5 /* the stack layer the benchmarked layer is */
#define MAX_REPS 1000

typedef struct shape {
    size_t B, T, d, H, KV;
} shape;

static const shape full_shapes[] = {
    {4, 512, 512, 8, 8},
    {1, 2048, 1024, 16, 16},
    {1, 8192, 512, 8, 8},
    {1, 2048, 1024, 16, 4},
    {1, 512, 512, 8, 8}, /* 512 tokens: the composition amortised least */
    {8, 128, 128, 4, 4}, /* replicate.py's training layer: small products */
};
static const shape quick_shapes[] = {
    {2, 64, 64, 4, 4},
    {1, 96, 64, 4, 2}, /* GQA, T not a multiple of a power of two tile */
};
static const shape full_peak = {1, 8192, 512, 8, 8};
static const shape quick_peak = {1, 256, 64, 4, 4};

static float *xfloats(size_t n)
{
    float *p = xalloc(n * sizeof(float));
    memset(p, 0, n * sizeof(float));
    return p;
}

static uint64_t rng_state = 0x2545f4914f6cdd1dull;
static float unif(void) { return unif_from(&rng_state); }

static void shape_name(const shape *s, char *buf, size_t len)
{
    if (s->KV == s->H)
        snprintf(buf, len, "B%zu-T%zu-d%zu-H%zu", s->B, s->T, s->d, s->H);
    else
        snprintf(buf, len, "B%zu-T%zu-d%zu-H%zu-KV%zu", s->B, s->T, s->d,
                 s->H, s->KV);
}

typedef struct flops {
    double proj, attn, fwd, fwd_bwd;
} flops;

static flops count_flops(const shape *s)
{
    double N = (double)(s->B * s->T), d = (double)s->d;
    double hd = (double)(s->d / s->H);
    double dq = (double)s->H * hd, dkv = (double)s->KV * hd;
    flops f;
    f.proj = 2.0 * N * (d * dq + 2.0 * d * dkv + dq * d);
    f.attn = 4.0 * (double)s->B * (double)s->H * (double)s->T *
             (double)s->T * hd / 2.0; /* causal */
    f.fwd = f.proj + f.attn;
    f.fwd_bwd = 3.0 * f.proj + 3.5 * f.attn;
    return f;
}

/* ---- one layer variant with its buffers ---- */

typedef struct variant {
    int masa;
    masa_layer *layer;
    masa_dictionary *dict[MASA_NUM_PROJECTIONS];
    masa_coefficients *coef[MASA_NUM_PROJECTIONS];
    float *grad[2][MASA_NUM_PROJECTIONS]; /* dW or (dD, dc) */
    masa_layer_grads grads;
    size_t ws_bytes, rs_bytes, param_bytes, grad_bytes;
    void *ws, *rs;
} variant;

static masa_layer *make_layer(masa_context *ctx, const shape *s)
{
    masa_layer_options o;
    masa_layer_options_init(&o);
    o.d_model = s->d;
    o.n_heads = s->H;
    o.n_kv_heads = s->KV;
    o.causal = 1;
    o.rope = 0;
    masa_layer *layer;
    OK(masa_layer_create(ctx, &o, &layer));
    return layer;
}

/* Sizes the buffers and the gradients of a layer whose projections are set. */
static void finish_variant(variant *v, const shape *s)
{
    masa_layer_grads_init(&v->grads); /* ADD, as in a stack sharing atoms */
    v->grad_bytes = 0;
    for (int p = 0; p < MASA_NUM_PROJECTIONS; p++) {
        size_t rows, cols;
        OK(masa_layer_projection_shape(v->layer, p, &rows, &cols));
        if (v->masa) {
            v->grad[0][p] = xfloats(S_ATOMS * rows * cols);
            v->grad[1][p] = xfloats(L_LAYERS * S_ATOMS);
            v->grads.d_atoms[p] = v->grad[0][p];
            v->grads.d_coefficients[p] = v->grad[1][p];
            v->grad_bytes +=
                (S_ATOMS * rows * cols + L_LAYERS * S_ATOMS) * sizeof(float);
        } else {
            v->grad[0][p] = xfloats(rows * cols);
            v->grads.d_weight[p] = v->grad[0][p];
            v->grad_bytes += rows * cols * sizeof(float);
        }
    }
    v->param_bytes = v->grad_bytes;
    OK(masa_layer_workspace_size(v->layer, s->B, s->T, &v->ws_bytes));
    OK(masa_layer_reserve_size(v->layer, s->B, s->T, &v->rs_bytes));
    v->ws = xalloc(v->ws_bytes);
    v->rs = xalloc(v->rs_bytes);
}

static void make_masa(variant *v, masa_context *ctx, const shape *s)
{
    memset(v, 0, sizeof *v);
    v->masa = 1;
    v->layer = make_layer(ctx, s);
    OK(masa_layer_set_weight_policy(v->layer, MASA_WEIGHTS_ON_THE_FLY));
    for (int p = 0; p < MASA_NUM_PROJECTIONS; p++) {
        size_t rows, cols;
        OK(masa_layer_projection_shape(v->layer, p, &rows, &cols));
        OK(masa_dictionary_create(ctx, S_ATOMS, rows, cols, &v->dict[p]));
        OK(masa_dictionary_init_uniform(v->dict[p], 0.0f, 100 + p));
        OK(masa_coefficients_create(ctx, L_LAYERS, S_ATOMS, &v->coef[p]));
        OK(masa_coefficients_init_cyclic(v->coef[p]));
        OK(masa_coefficients_add_uniform(v->coef[p], 0.1f, 200 + p));
        OK(masa_layer_set_masa(v->layer, p, v->dict[p], v->coef[p],
                               LAYER_INDEX));
    }
    finish_variant(v, s);
}

/* Dense weights: composed from `from` (same values), or U(-1, 1)/sqrt(d_in)
 * when from is NULL. */
static void make_dense(variant *v, masa_context *ctx, const shape *s,
                       const variant *from)
{
    memset(v, 0, sizeof *v);
    v->layer = make_layer(ctx, s);
    for (int p = 0; p < MASA_NUM_PROJECTIONS; p++) {
        size_t rows, cols;
        OK(masa_layer_projection_shape(v->layer, p, &rows, &cols));
        OK(masa_layer_set_dense(v->layer, p, NULL));
        float *w = masa_layer_weight(v->layer, p);
        if (!w)
            die("masa_layer_weight", MASA_ERROR_INTERNAL);
        if (from) {
            OK(masa_compose(from->dict[p], from->coef[p], LAYER_INDEX, w,
                            rows * cols));
        } else {
            float bound = 1.0f / sqrtf((float)rows);
            for (size_t i = 0; i < rows * cols; i++)
                w[i] = bound * unif();
        }
    }
    finish_variant(v, s);
}

static void free_variant(variant *v)
{
    masa_layer_destroy(v->layer);
    for (int p = 0; p < MASA_NUM_PROJECTIONS; p++) {
        masa_dictionary_destroy(v->dict[p]);
        masa_coefficients_destroy(v->coef[p]);
        free(v->grad[0][p]);
        free(v->grad[1][p]);
    }
    free(v->ws);
    free(v->rs);
}

typedef struct io {
    float *x, *y, *dy, *dx;
} io;

static void run_fwd(const variant *v, const shape *s, io *b)
{
    OK(masa_layer_forward(v->layer, s->B, s->T, 0, b->x, b->y, v->ws,
                          v->ws_bytes, NULL, 0));
}

static void run_fwd_bwd(const variant *v, const shape *s, io *b)
{
    OK(masa_layer_forward(v->layer, s->B, s->T, 0, b->x, b->y, v->ws,
                          v->ws_bytes, v->rs, v->rs_bytes));
    OK(masa_layer_backward(v->layer, s->B, s->T, 0, b->x, b->dy, b->dx,
                           &v->grads, v->ws, v->ws_bytes, v->rs,
                           v->rs_bytes));
}

typedef void (*pass_fn)(const variant *, const shape *, io *);

static double time_once(pass_fn fn, const variant *v, const shape *s, io *b)
{
    double t0 = now();
    fn(v, s, b);
    return now() - t0;
}

typedef struct result {
    double dense_s, masa_s, ratio, dense_min, masa_min;
    size_t reps;
} result;

/* A B B A ...: repetition r runs dense then MASA when r is even, MASA then
 * dense when odd. */
static result time_pass(pass_fn fn, const variant *dense, const variant *masa,
                        const shape *s, io *b, size_t reps, double budget)
{
    double td[MAX_REPS], tm[MAX_REPS], tr[MAX_REPS];
    /* warm-up (first-touch of buffers, BLIS packing memory) */
    double w = time_once(fn, dense, s, b) + time_once(fn, masa, s, b);
    size_t fit = (size_t)(budget / (w > 1e-9 ? w : 1e-9));
    if (fit < reps)
        reps = fit < 3 ? 3 : fit;
    if (reps > MAX_REPS)
        reps = MAX_REPS;
    for (size_t r = 0; r < reps; r++) {
        if (r % 2 == 0) {
            td[r] = time_once(fn, dense, s, b);
            tm[r] = time_once(fn, masa, s, b);
        } else {
            tm[r] = time_once(fn, masa, s, b);
            td[r] = time_once(fn, dense, s, b);
        }
        tr[r] = tm[r] / td[r];
    }
    result res;
    res.dense_s = median(td, reps);
    res.masa_s = median(tm, reps);
    res.ratio = median(tr, reps);
    res.dense_min = td[0];
    res.masa_min = tm[0];
    for (size_t r = 1; r < reps; r++) {
        if (td[r] < res.dense_min)
            res.dense_min = td[r];
        if (tm[r] < res.masa_min)
            res.masa_min = tm[r];
    }
    res.reps = reps;
    return res;
}

static void fill(float *p, size_t n, float scale)
{
    for (size_t i = 0; i < n; i++)
        p[i] = scale * unif();
}

static double max_rel_diff(const float *a, const float *b, size_t n)
{
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        double e = fabs((double)a[i] - (double)b[i]);
        if (e > num)
            num = e;
        if (fabs((double)b[i]) > den)
            den = fabs((double)b[i]);
    }
    return den > 0 ? num / den : num;
}

static masa_context *make_context(size_t threads)
{
    masa_context_options co;
    masa_context_options_init(&co);
    co.n_threads = threads;
    masa_context *ctx;
    OK(masa_context_create(&co, &ctx));
    return ctx;
}

/* Peak resident set in KiB: VmHWM of /proc/self/status, the high-water
 * mark of this program's own memory. getrusage's ru_maxrss (the fallback)
 * is no good in a freshly exec'd child on Linux: it keeps the parent's peak
 * across execve (a Python parent's 16 MiB shows up as the child's). */
static long rss_kib(void)
{
    FILE *f = fopen("/proc/self/status", "r");
    if (f) {
        char line[256];
        long kib = -1;
        while (fgets(line, sizeof line, f))
            if (sscanf(line, "VmHWM: %ld kB", &kib) == 1)
                break;
        fclose(f);
        if (kib >= 0)
            return kib;
    }
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_maxrss; /* KiB on Linux */
}

static int peak_memory(size_t threads, int quick, int masa, int json)
{
    long base_kib = rss_kib();
    const shape *s = quick ? &quick_peak : &full_peak;
    masa_context *ctx = make_context(threads);
    const char *arch = masa_blis_arch();
    size_t n = s->B * s->T * s->d;
    io b = {xfloats(n), xfloats(n), xfloats(n), xfloats(n)};
    fill(b.x, n, 1.0f);
    fill(b.dy, n, 0.01f);
    variant v;
    if (masa)
        make_masa(&v, ctx, s);
    else
        make_dense(&v, ctx, s, NULL);
    long before_kib = rss_kib();
    double t0 = now();
    run_fwd_bwd(&v, s, &b);
    double secs = now() - t0;
    double peak = 1024.0 * (double)rss_kib();
    double inputs = 2.0 * (double)n * sizeof(float);
    double outputs = 2.0 * (double)n * sizeof(float) + (double)v.grad_bytes;
    double params = (double)v.param_bytes;
    double base = inputs + outputs + params + (double)v.rs_bytes;
    double accounted = base + (double)v.ws_bytes;
    char name[64];
    shape_name(s, name, sizeof name);
    const char *proj = masa ? "masa" : "dense";
    if (json) {
        printf("{\"bench\":\"layer\",\"kind\":\"peak_memory\",\"impl\":"
               "\"libmasa\",\"proj\":\"%s\",\"shape\":\"%s\",\"threads\":%zu,"
               "\"blis_arch\":\"%s\",\"seconds\":%.4f,\"peak_rss_bytes\":%.0f,"
               "\"start_rss_bytes\":%.0f,\"setup_rss_bytes\":%.0f,"
               "\"inputs_bytes\":%.0f,\"outputs_bytes\":%.0f,"
               "\"parameters_bytes\":%.0f,\"reserve_bytes\":%zu,"
               "\"workspace_bytes\":%zu,\"accounted_bytes\":%.0f,"
               "\"ratio\":%.4f,\"ratio_without_workspace\":%.4f}\n",
               proj, name, masa_context_threads(ctx), arch, secs, peak,
               1024.0 * (double)base_kib, 1024.0 * (double)before_kib, inputs,
               outputs, params, v.rs_bytes, v.ws_bytes, accounted,
               peak / accounted, peak / base);
    } else {
        double mib = 1024.0 * 1024.0;
        printf("peak memory, %s, %s projections, forward+backward once "
               "(%.2f s), %zu threads, BLIS %s\n", name, proj, secs,
               masa_context_threads(ctx), arch);
        printf("  peak RSS %.1f MiB (process start %.1f MiB)\n", peak / mib,
               (double)base_kib / 1024.0);
        printf("  inputs %.1f + outputs %.1f + parameters %.1f + reserve "
               "%.1f + workspace %.1f = %.1f MiB\n", inputs / mib,
               outputs / mib, params / mib, (double)v.rs_bytes / mib,
               (double)v.ws_bytes / mib, accounted / mib);
        printf("  peak / accounted = %.3f; peak / (inputs + outputs + "
               "parameters + reserve) = %.3f\n", peak / accounted,
               peak / base);
    }
    free_variant(&v);
    free(b.x);
    free(b.y);
    free(b.dy);
    free(b.dx);
    masa_context_destroy(ctx);
    return 0;
}

static void usage(const char *argv0)
{
    fprintf(stderr,
            "usage: %s [--threads N] [--reps N] [--budget SECONDS] [--quick] "
            "[--shape NAME] [--json]\n"
            "       %s --peak-memory [--proj masa|dense] [--threads N] "
            "[--quick] [--json]\n"
            "shapes:", argv0, argv0);
    for (size_t i = 0; i < sizeof full_shapes / sizeof *full_shapes; i++) {
        char name[64];
        shape_name(&full_shapes[i], name, sizeof name);
        fprintf(stderr, " %s", name);
    }
    fprintf(stderr, "\n");
}

int main(int argc, char **argv)
{
    size_t threads = 2, reps = 7;
    double budget = 20.0;
    int quick = 0, json = 0, peak = 0, peak_masa = 1;
    const char *only = NULL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        int has = i + 1 < argc;
        if (strcmp(a, "--quick") == 0)
            quick = 1;
        else if (strcmp(a, "--json") == 0)
            json = 1;
        else if (strcmp(a, "--peak-memory") == 0)
            peak = 1;
        else if (strcmp(a, "--threads") == 0 && has)
            threads = (size_t)strtoul(argv[++i], NULL, 10);
        else if (strcmp(a, "--reps") == 0 && has)
            reps = (size_t)strtoul(argv[++i], NULL, 10);
        else if (strcmp(a, "--budget") == 0 && has)
            budget = strtod(argv[++i], NULL);
        else if (strcmp(a, "--shape") == 0 && has)
            only = argv[++i];
        else if (strcmp(a, "--proj") == 0 && has) {
            const char *p = argv[++i];
            if (strcmp(p, "masa") != 0 && strcmp(p, "dense") != 0) {
                usage(argv[0]);
                return 2;
            }
            peak_masa = strcmp(p, "masa") == 0;
        } else {
            usage(argv[0]);
            return strcmp(a, "--help") == 0 ? 0 : 2;
        }
    }
    if (reps < 1)
        reps = 1;
    if (reps > MAX_REPS)
        reps = MAX_REPS;
    if (peak)
        return peak_memory(threads, quick, peak_masa, json);

    masa_context *ctx = make_context(threads);
    const char *arch = masa_blis_arch();
    size_t nthreads = masa_context_threads(ctx);
    const shape *shapes = quick ? quick_shapes : full_shapes;
    size_t n_shapes = quick ? sizeof quick_shapes / sizeof *quick_shapes
                            : sizeof full_shapes / sizeof *full_shapes;
    if (json)
        printf("{\"bench\":\"layer\",\"kind\":\"info\",\"impl\":\"libmasa\","
               "\"version\":\"%s\",\"blis_arch\":\"%s\",\"threads\":%zu,"
               "\"layers\":%d,\"atoms\":%d,\"reps\":%zu,\"budget_s\":%.1f}\n",
               masa_version_string(), arch, nthreads, L_LAYERS, S_ATOMS, reps,
               budget);
    else {
        printf("### Attention layer: libmasa dense vs MASA (L=%d, S=%d, "
               "on the fly)\n\n", L_LAYERS, S_ATOMS);
        printf("libmasa %s, %zu threads, BLIS kernels %s, causal, no RoPE, "
               "no bias. Median ms; GFLOP/s from forward = P + A, "
               "forward+backward = 3P + 3.5A (see the source). MASA/dense: "
               "median of A B B A pair ratios.\n\n", masa_version_string(),
               nthreads, arch);
        printf("| shape | pass | dense ms | MASA ms | dense GFLOP/s | "
               "MASA GFLOP/s | MASA/dense | reps | check |\n");
        printf("|---|---|---:|---:|---:|---:|---:|---:|---:|\n");
    }
    fflush(stdout);

    int found = 0;
    for (size_t i = 0; i < n_shapes; i++) {
        const shape *s = &shapes[i];
        char name[64];
        shape_name(s, name, sizeof name);
        if (only && strcmp(only, name) != 0)
            continue;
        found = 1;
        fprintf(stderr, "bench_layer: %s\n", name);
        size_t n = s->B * s->T * s->d;
        io b = {xfloats(n), xfloats(n), xfloats(n), xfloats(n)};
        fill(b.x, n, 1.0f);
        fill(b.dy, n, 0.01f);
        variant masa, dense;
        make_masa(&masa, ctx, s);
        make_dense(&dense, ctx, s, &masa);

        /* same weights, so the same output (up to float rounding) */
        float *y_masa = xfloats(n);
        run_fwd(&masa, s, &b);
        memcpy(y_masa, b.y, n * sizeof(float));
        run_fwd(&dense, s, &b);
        double check = max_rel_diff(y_masa, b.y, n);
        free(y_masa);
        if (!(check < 1e-3)) {
            fprintf(stderr, "bench_layer: %s: dense and MASA outputs differ "
                    "(max relative difference %.3g)\n", name, check);
            return 1;
        }

        flops f = count_flops(s);
        struct {
            const char *name;
            pass_fn fn;
            double flop;
        } passes[2] = {{"fwd", run_fwd, f.fwd},
                       {"fwd+bwd", run_fwd_bwd, f.fwd_bwd}};
        for (int p = 0; p < 2; p++) {
            result r = time_pass(passes[p].fn, &dense, &masa, s, &b, reps,
                                 budget);
            double gd = passes[p].flop / r.dense_s * 1e-9;
            double gm = passes[p].flop / r.masa_s * 1e-9;
            if (json) {
                printf("{\"bench\":\"layer\",\"kind\":\"time\",\"impl\":"
                       "\"libmasa\",\"shape\":\"%s\",\"B\":%zu,\"T\":%zu,"
                       "\"d\":%zu,\"H\":%zu,\"KV\":%zu,\"causal\":true,"
                       "\"threads\":%zu,\"pass\":\"%s\",\"flop\":%.6g,"
                       "\"reps\":%zu,\"dense_ms\":%.4f,\"masa_ms\":%.4f,"
                       "\"dense_min_ms\":%.4f,\"masa_min_ms\":%.4f,"
                       "\"dense_gflops\":%.3f,\"masa_gflops\":%.3f,"
                       "\"masa_over_dense\":%.4f,\"check_rel_diff\":%.3g}\n",
                       name, s->B, s->T, s->d, s->H, s->KV, nthreads,
                       passes[p].name, passes[p].flop, r.reps,
                       1e3 * r.dense_s, 1e3 * r.masa_s, 1e3 * r.dense_min,
                       1e3 * r.masa_min, gd, gm, r.ratio, check);
            } else {
                printf("| %s | %s | %.2f | %.2f | %.1f | %.1f | %.3f | %zu "
                       "| %.1e |\n", name, passes[p].name, 1e3 * r.dense_s,
                       1e3 * r.masa_s, gd, gm, r.ratio, r.reps, check);
            }
            fflush(stdout);
        }
        free_variant(&masa);
        free_variant(&dense);
        free(b.x);
        free(b.y);
        free(b.dy);
        free(b.dx);
    }
    masa_context_destroy(ctx);
    if (!found) {
        fprintf(stderr, "bench_layer: no shape named %s\n", only);
        usage(argv[0]);
        return 2;
    }
    return 0;
}
