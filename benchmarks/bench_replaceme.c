/*
 * ReplaceMe's least-squares accumulation against BLIS's own dgemm.
 *
 * masa_linear_estimator_accumulate() adds X^T X and X^T (L - Y) in float64
 * from float32 batches: per batch it converts rows to float64 in blocks and
 * runs dgemm on them. Its rate is compared with one plain bli_dgemm_ex call
 * doing the same products (C (d x 2d) += X^T [X | Z], k = all rows) on data
 * already in float64, with the same thread count: the ratio is the share of
 * BLIS's dgemm rate the estimator keeps (target >= 50%).
 *
 *   bench_replaceme [--quick] [--threads N]   (N = 0: all online CPUs)
 *
 * Shapes: d = 576 (SmolLM2-135M) and 1024, calibration batches of 2048 rows
 * (4 sequences x 512 tokens), 12,288 rows in all (the table's calibration).
 * Prints median times and GFLOP/s (flops = 2 d (2d) rows for both).
 */
#define BENCH_NAME "bench_replaceme"
#include <blis.h>
#include <stdbool.h>

#include "bench_common.h"

static double dgemm_seconds(size_t d, size_t rows, const double *xz, double *c,
                            size_t threads)
{
    rntm_t rntm = BLIS_RNTM_INITIALIZER;
    bli_rntm_set_num_threads((dim_t)threads, &rntm);
    bli_rntm_disable_l3_sup(&rntm);
    double one = 1.0;
    size_t w = 2 * d;
    double t0 = now();
    bli_dgemm_ex(BLIS_TRANSPOSE, BLIS_NO_TRANSPOSE, (dim_t)d, (dim_t)w,
                 (dim_t)rows, &one, (double *)xz, (inc_t)w, 1, (double *)xz,
                 (inc_t)w, 1, &one, c, (inc_t)w, 1, NULL, &rntm);
    return now() - t0;
}

int main(int argc, char **argv)
{
    bool quick = false;
    size_t threads = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--quick") == 0)
            quick = true;
        else if (strcmp(argv[i], "--threads") == 0 && i + 1 < argc)
            threads = (size_t)strtoul(argv[++i], NULL, 10);
        else {
            fprintf(stderr, "usage: bench_replaceme [--quick] [--threads N]\n");
            return 2;
        }
    }
    masa_context_options o;
    masa_context_options_init(&o);
    o.n_threads = threads;
    masa_context *ctx;
    OK(masa_context_create(&o, &ctx));
    threads = masa_context_threads(ctx);
    const size_t dims[] = {576, 1024};
    size_t n_dims = quick ? 1 : 2;
    size_t rows = quick ? 4096 : 12288, batch = 2048;
    size_t reps = quick ? 3 : 7;
    printf("# bench_replaceme: BLIS kernels %s, %zu threads, %zu rows in "
           "batches of %zu, median of %zu\n", masa_blis_arch(), threads, rows,
           batch, reps);
    printf("| d | accumulate ms | accumulate GFLOP/s | dgemm ms | dgemm "
           "GFLOP/s | share of dgemm |\n|---:|---:|---:|---:|---:|---:|\n");
    for (size_t k = 0; k < n_dims; k++) {
        size_t d = dims[k], w = 2 * d;
        float *m = xalloc(rows * d * sizeof *m), *l = xalloc(rows * d * sizeof *l),
              *y = xalloc(rows * d * sizeof *y);
        double *xz = xalloc(rows * w * sizeof *xz), *c = xalloc(d * w * sizeof *c);
        uint64_t s = 1 + k;
        for (size_t i = 0; i < rows * d; i++) {
            m[i] = unif_from(&s);
            l[i] = unif_from(&s);
            y[i] = unif_from(&s);
        }
        for (size_t r = 0; r < rows; r++)
            for (size_t j = 0; j < d; j++) {
                xz[r * w + j] = m[r * d + j];
                xz[r * w + d + j] = (double)l[r * d + j] - y[r * d + j];
            }
        memset(c, 0, d * w * sizeof *c);
        masa_linear_estimator *est;
        OK(masa_linear_estimator_create(ctx, d, d, &est));
        double ta[16], tg[16];
        for (size_t rep = 0; rep <= reps; rep++) { /* rep 0: warm-up */
            OK(masa_linear_estimator_reset(est));
            double t0 = now();
            for (size_t r0 = 0; r0 < rows; r0 += batch) {
                size_t n = rows - r0 < batch ? rows - r0 : batch;
                OK(masa_linear_estimator_accumulate(est, n, m + r0 * d,
                                                    l + r0 * d, y + r0 * d));
            }
            double t_acc = now() - t0;
            double t_gemm = dgemm_seconds(d, rows, xz, c, threads);
            if (rep > 0) {
                ta[rep - 1] = t_acc;
                tg[rep - 1] = t_gemm;
            }
        }
        double flops = 2.0 * (double)d * (double)w * (double)rows;
        double a = median(ta, reps), g = median(tg, reps);
        printf("| %zu | %.1f | %.1f | %.1f | %.1f | %.0f%% |\n", d, 1e3 * a,
               flops / a * 1e-9, 1e3 * g, flops / g * 1e-9, 100.0 * g / a);
        masa_linear_estimator_destroy(est);
        free(m);
        free(l);
        free(y);
        free(xz);
        free(c);
    }
    masa_context_destroy(ctx);
    return 0;
}
