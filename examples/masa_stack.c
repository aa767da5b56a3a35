/* A 12-layer MASA-QKVO attention stack: every projection type (Q, K, V, O)
 * has one dictionary of S = 4 atoms shared by all layers. Runs forward
 * through the stack and backward through it, accumulating the shared atoms'
 * gradients, and prints parameter counts, the BLIS kernels in use and the
 * time per call. Layers are residual, h_{l+1} = h_l + attention_l(h_l), as in
 * a transformer (the MLPs and norms are left out). Only libmasa's public API is used.
 *
 *   masa_stack [batch] [seq] [d_model] [n_heads]       (defaults 4 128 256 8)
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <masa/masa.h>

#define N_LAYERS 12
#define N_ATOMS 4

#define CHECK(call)                                                          \
    do {                                                                     \
        masa_status st_ = (call);                                            \
        if (st_ != MASA_OK) {                                                \
            fprintf(stderr, "%s failed: %s (%s)\n", #call,                   \
                    masa_status_string(st_), masa_last_error());             \
            exit(1);                                                         \
        }                                                                    \
    } while (0)

static double seconds(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static void *xcalloc(size_t n, size_t size)
{
    void *p = calloc(n, size);
    if (!p) {
        fprintf(stderr, "out of memory\n");
        exit(1);
    }
    return p;
}

static size_t arg(int argc, char **argv, int i, size_t dflt)
{
    return argc > i ? (size_t)strtoul(argv[i], NULL, 10) : dflt;
}

int main(int argc, char **argv)
{
    size_t batch = arg(argc, argv, 1, 4), seq = arg(argc, argv, 2, 128);
    size_t d_model = arg(argc, argv, 3, 256), n_heads = arg(argc, argv, 4, 8);

    masa_context *ctx;
    CHECK(masa_context_create(NULL, &ctx));
    printf("libmasa %s, %zu threads, BLIS kernels: %s\n",
           masa_version_string(), masa_context_threads(ctx), masa_blis_arch());

    masa_layer_options opts;
    masa_layer_options_init(&opts);
    opts.d_model = d_model;
    opts.n_heads = n_heads;
    opts.causal = 1;
    opts.rope = 1;

    /* One dictionary and one coefficient table per projection type. */
    masa_dictionary *dict[MASA_NUM_PROJECTIONS];
    masa_coefficients *coef[MASA_NUM_PROJECTIONS];
    masa_layer *layers[N_LAYERS];
    for (int l = 0; l < N_LAYERS; l++)
        CHECK(masa_layer_create(ctx, &opts, &layers[l]));
    size_t masa_params = 0, dense_params = 0;
    for (int p = 0; p < MASA_NUM_PROJECTIONS; p++) {
        size_t rows, cols;
        CHECK(masa_layer_projection_shape(layers[0], p, &rows, &cols));
        CHECK(masa_dictionary_create(ctx, N_ATOMS, rows, cols, &dict[p]));
        CHECK(masa_dictionary_init_uniform(dict[p], 0.0f, 1000 + p));
        CHECK(masa_coefficients_create(ctx, N_LAYERS, N_ATOMS, &coef[p]));
        CHECK(masa_coefficients_init_cyclic(coef[p]));
        CHECK(masa_coefficients_add_uniform(coef[p], 0.1f, 2000 + p));
        masa_params += N_ATOMS * rows * cols + N_LAYERS * N_ATOMS;
        dense_params += N_LAYERS * rows * cols;
    }
    for (int l = 0; l < N_LAYERS; l++)
        for (int p = 0; p < MASA_NUM_PROJECTIONS; p++)
            CHECK(masa_layer_set_masa(layers[l], p, dict[p], coef[p], l));
    printf("attention parameters: dense %zu, MASA (S=%d of L=%d) %zu, "
           "saving %.1f%%\n", dense_params, N_ATOMS, N_LAYERS, masa_params,
           100.0 * (1.0 - (double)masa_params / (double)dense_params));

    /* Buffers: activations between layers, one workspace, one reserve per
     * layer (forward saves what backward needs). */
    size_t n_act = batch * seq * d_model, ws_bytes, rs_bytes;
    CHECK(masa_layer_workspace_size(layers[0], batch, seq, &ws_bytes));
    CHECK(masa_layer_reserve_size(layers[0], batch, seq, &rs_bytes));
    float *acts = xcalloc((N_LAYERS + 1) * n_act, sizeof(float));
    float *grad_a = xcalloc(n_act, sizeof(float));
    float *grad_b = xcalloc(n_act, sizeof(float));
    void *ws = xcalloc(ws_bytes, 1);
    void *reserve = xcalloc(N_LAYERS * rs_bytes, 1);
    for (size_t i = 0; i < n_act; i++)
        acts[i] = sinf(0.01f * (float)i);

    masa_layer_grads grads;
    masa_layer_grads_init(&grads); /* mode ADD: shared atoms accumulate */
    float *d_atoms[MASA_NUM_PROJECTIONS], *d_coef[MASA_NUM_PROJECTIONS];
    for (int p = 0; p < MASA_NUM_PROJECTIONS; p++) {
        size_t rows, cols;
        CHECK(masa_dictionary_shape(dict[p], NULL, &rows, &cols));
        d_atoms[p] = xcalloc(N_ATOMS * rows * cols, sizeof(float));
        d_coef[p] = xcalloc(N_LAYERS * N_ATOMS, sizeof(float));
        grads.d_atoms[p] = d_atoms[p];
        grads.d_coefficients[p] = d_coef[p];
    }

    const int reps = 3;
    double t_fwd = 1e30, t_bwd = 1e30;
    for (int rep = 0; rep < reps; rep++) {
        double t0 = seconds();
        for (int l = 0; l < N_LAYERS; l++) {
            float *h = acts + l * n_act, *next = acts + (l + 1) * n_act;
            CHECK(masa_layer_forward(layers[l], batch, seq, 0, h, next, ws,
                                     ws_bytes, (char *)reserve + l * rs_bytes,
                                     rs_bytes));
            for (size_t i = 0; i < n_act; i++) /* residual */
                next[i] += h[i];
        }
        double t1 = seconds();
        /* loss = 0.5 * |y|^2, so dL/dy = y */
        memcpy(grad_a, acts + N_LAYERS * n_act, n_act * sizeof(float));
        for (int l = N_LAYERS - 1; l >= 0; l--) {
            CHECK(masa_layer_backward(layers[l], batch, seq, 0,
                                      acts + l * n_act, grad_a, grad_b,
                                      &grads, ws, ws_bytes,
                                      (char *)reserve + l * rs_bytes,
                                      rs_bytes));
            for (size_t i = 0; i < n_act; i++) /* residual path */
                grad_b[i] += grad_a[i];
            float *t = grad_a;
            grad_a = grad_b;
            grad_b = t;
        }
        double t2 = seconds();
        if (t1 - t0 < t_fwd)
            t_fwd = t1 - t0;
        if (t2 - t1 < t_bwd)
            t_bwd = t2 - t1;
    }

    double out_norm = 0, dx_norm = 0, datom_norm = 0;
    for (size_t i = 0; i < n_act; i++) {
        out_norm += (double)acts[N_LAYERS * n_act + i] *
                    acts[N_LAYERS * n_act + i];
        dx_norm += (double)grad_a[i] * grad_a[i];
    }
    size_t rows, cols;
    CHECK(masa_dictionary_shape(dict[MASA_PROJ_Q], NULL, &rows, &cols));
    for (size_t i = 0; i < N_ATOMS * rows * cols; i++)
        datom_norm += (double)d_atoms[MASA_PROJ_Q][i] * d_atoms[MASA_PROJ_Q][i];
    printf("batch %zu, seq %zu, d_model %zu, heads %zu, causal, RoPE\n", batch,
           seq, d_model, n_heads);
    printf("stack forward:  %8.2f ms (%.2f ms per layer, best of %d)\n",
           1e3 * t_fwd, 1e3 * t_fwd / N_LAYERS, reps);
    printf("stack backward: %8.2f ms (%.2f ms per layer, best of %d)\n",
           1e3 * t_bwd, 1e3 * t_bwd / N_LAYERS, reps);
    printf("|y| = %.4g, |dx| = %.4g, |dL/dD_Q| (summed over %d layers, %d "
           "passes) = %.4g\n", sqrt(out_norm), sqrt(dx_norm), N_LAYERS, reps,
           sqrt(datom_norm));

    for (int l = 0; l < N_LAYERS; l++)
        masa_layer_destroy(layers[l]);
    for (int p = 0; p < MASA_NUM_PROJECTIONS; p++) {
        masa_dictionary_destroy(dict[p]);
        masa_coefficients_destroy(coef[p]);
        free(d_atoms[p]);
        free(d_coef[p]);
    }
    masa_context_destroy(ctx);
    free(acts);
    free(grad_a);
    free(grad_b);
    free(ws);
    free(reserve);
    return 0;
}
