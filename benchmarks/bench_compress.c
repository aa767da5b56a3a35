/* Times the compression core (include/masa/compress.h) on synthetic
 * weights: the Gram of L matrices, the atoms pass of Matrix PCA, the
 * grouping planner, accumulating calibration statistics and the whitened
 * low-rank residual of one layer. Prints medians of wall and CPU time (the
 * process's CPU time over all threads: on a shared machine the wall time
 * says more about the load than about the code).
 *
 *   bench_compress [--quick] [--layers L] [--dim d] [--rank r] [--threads n]
 */
#define BENCH_NAME "bench_compress"
#include "bench_common.h"

static double cpu_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

#define REPS 3

typedef struct timing {
    double wall[REPS], cpu[REPS];
} timing;

static void report(const char *what, const timing *t, double flops,
                   double bytes)
{
    double w = median(t->wall, REPS), c = median(t->cpu, REPS);
    printf("%-28s wall %8.3f s  cpu %8.3f s", what, w, c);
    if (flops > 0)
        printf("  %6.1f GFLOP/s (cpu)", flops / c / 1e9);
    if (bytes > 0)
        printf("  %6.2f GB/s read (cpu)", bytes / c / 1e9);
    printf("\n");
}

int main(int argc, char **argv)
{
    size_t L = 16, d = 1024, r = 64, threads = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--quick")) {
            L = 6;
            d = 256;
            r = 16;
        } else if (i + 1 < argc && !strcmp(argv[i], "--layers"))
            L = strtoul(argv[++i], NULL, 10);
        else if (i + 1 < argc && !strcmp(argv[i], "--dim"))
            d = strtoul(argv[++i], NULL, 10);
        else if (i + 1 < argc && !strcmp(argv[i], "--rank"))
            r = strtoul(argv[++i], NULL, 10);
        else if (i + 1 < argc && !strcmp(argv[i], "--threads"))
            threads = strtoul(argv[++i], NULL, 10);
        else {
            fprintf(stderr, "usage: %s [--quick] [--layers L] [--dim d] "
                            "[--rank r] [--threads n]\n", argv[0]);
            return 2;
        }
    }
    masa_context_options o;
    masa_context_options_init(&o);
    o.n_threads = threads;
    masa_context *ctx;
    OK(masa_context_create(&o, &ctx));
    size_t S = L / 3 ? L / 3 : 1, N = d * d, rows = 2 * d;
    printf("bench_compress: L %zu layers of %zu x %zu, S %zu, rank %zu, "
           "%zu threads, BLIS %s\n", L, d, d, S, r, masa_context_threads(ctx),
           masa_blis_arch());

    uint64_t seed = 1;
    float **mats = xalloc(L * sizeof *mats);
    float *base = xalloc(N * sizeof(float));
    for (size_t i = 0; i < N; i++)
        base[i] = unif_from(&seed);
    for (size_t l = 0; l < L; l++) {
        mats[l] = xalloc(N * sizeof(float));
        for (size_t i = 0; i < N; i++) /* shared part plus noise */
            mats[l][i] = 0.5f * base[i] + unif_from(&seed);
    }
    const float *const *cm = (const float *const *)mats;
    double *gram = xalloc(L * L * sizeof(double));
    float *atoms = xalloc(S * N * sizeof(float));
    float *coefs = xalloc(L * S * sizeof(float));
    float *x = xalloc(rows * d * sizeof(float));
    for (size_t i = 0; i < rows * d; i++)
        x[i] = unif_from(&seed);
    float *a = xalloc(d * r * sizeof(float)), *b = xalloc(r * d * sizeof(float));
    size_t *starts = xalloc(L * sizeof(size_t)), *natoms = xalloc(L * sizeof(size_t));

    timing tg, tp, tl, tc, tr;
    masa_pca_result pr;
    masa_group_plan_result gr;
    masa_residual_result rr;
    for (int k = 0; k < REPS; k++) {
        double w0 = now(), c0 = cpu_now();
        OK(masa_gram(ctx, L, d, d, cm, gram, L * L));
        tg.wall[k] = now() - w0;
        tg.cpu[k] = cpu_now() - c0;

        masa_pca_result_init(&pr);
        w0 = now();
        c0 = cpu_now();
        OK(masa_matrix_pca(ctx, L, d, d, cm, gram, L, S, atoms, S * N, coefs,
                           L * S, NULL, &pr));
        tp.wall[k] = now() - w0;
        tp.cpu[k] = cpu_now() - c0;

        masa_group_plan_result_init(&gr);
        w0 = now();
        c0 = cpu_now();
        OK(masa_group_plan(ctx, L, gram, d, d, S * (N + L), starts, natoms, L,
                           &gr));
        tl.wall[k] = now() - w0;
        tl.cpu[k] = cpu_now() - c0;

        masa_calib *cal;
        OK(masa_calib_create(ctx, d, &cal));
        w0 = now();
        c0 = cpu_now();
        OK(masa_calib_accumulate(cal, x, rows));
        tc.wall[k] = now() - w0;
        tc.cpu[k] = cpu_now() - c0;

        masa_residual_result_init(&rr);
        w0 = now();
        c0 = cpu_now();
        OK(masa_residual_lowrank(ctx, d, d, mats[0], NULL,
                                 masa_calib_data(cal), r, a, d * r, b, r * d,
                                 &rr));
        tr.wall[k] = now() - w0;
        tr.cpu[k] = cpu_now() - c0;
        masa_calib_destroy(cal);
    }
    double stack_bytes = (double)L * (double)N * sizeof(float);
    report("gram (dsyrk, float64)", &tg, (double)L * L * N, stack_bytes);
    report("matrix_pca (gram given)", &tp, 2.0 * S * L * N, 2 * stack_bytes);
    report("group_plan", &tl, 0, 0);
    report("calib_accumulate", &tc, (double)rows * d * d, 0);
    report("residual_lowrank (whitened)", &tr, 0, 0);
    printf("captured %.1f%% of the energy with %zu atoms; plan: %zu groups, "
           "error %.3g of %.3g; residual error %.4g -> %.4g (jitter %g)\n",
           100 * pr.captured_energy / pr.total_energy, S, gr.n_groups,
           gr.error, gr.total_energy, rr.error_before, rr.error_after,
           rr.jitter);
    for (size_t l = 0; l < L; l++)
        free(mats[l]);
    free(mats);
    free(base);
    free(gram);
    free(atoms);
    free(coefs);
    free(x);
    free(a);
    free(b);
    free(starts);
    free(natoms);
    masa_context_destroy(ctx);
    return 0;
}
