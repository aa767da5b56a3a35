/* An outside program using an installed libmasa through pkg-config
 * (scripts/test-consumers.sh builds it from a scratch directory):
 *
 *     cc demo.c $(pkg-config --cflags --libs masa) -o demo && ./demo
 *
 * A causal 64-wide layer whose four projections are MASA (2 atoms shared by
 * 6 layers, this is layer 3) runs forward; the same layer with dense weights
 * composed here by plain loops (W = sum_s c[3, s] D_s) must give the same
 * output. Exit status 0 when it does. */
#include <stdio.h>
#include <stdlib.h>

#include <masa/masa.h>

enum { B = 2, T = 16, D = 64, HEADS = 4, ATOMS = 2, LAYERS = 6, ROW = 3 };

#define CHECK(call)                                                          \
    do {                                                                     \
        if ((call) != MASA_OK) {                                             \
            fprintf(stderr, "%s: %s\n", #call, masa_last_error());           \
            return 1;                                                        \
        }                                                                    \
    } while (0)

static int forward(masa_layer *layer, const float *x, float *y)
{
    size_t ws;
    CHECK(masa_layer_workspace_size(layer, B, T, &ws));
    void *work = malloc(ws ? ws : 1);
    if (!work)
        return 1;
    masa_status st = masa_layer_forward(layer, B, T, 0, x, y, work, ws, NULL, 0);
    free(work);
    CHECK(st);
    return 0;
}

int main(void)
{
    masa_context *ctx;
    masa_layer *shared, *dense;
    masa_dictionary *dict[4];
    masa_coefficients *coef[4];
    float *weight[4];
    masa_layer_options o;
    static float x[B * T * D], y_masa[B * T * D], y_dense[B * T * D];

    printf("libmasa %s\n", masa_version_string());
    CHECK(masa_context_create(NULL, &ctx));
    masa_layer_options_init(&o);
    o.d_model = D;
    o.n_heads = HEADS;
    o.causal = 1;
    CHECK(masa_layer_create(ctx, &o, &shared));
    CHECK(masa_layer_create(ctx, &o, &dense));
    for (int p = 0; p < 4; p++) {
        size_t rows, cols;
        CHECK(masa_layer_projection_shape(shared, p, &rows, &cols));
        CHECK(masa_dictionary_create(ctx, ATOMS, rows, cols, &dict[p]));
        CHECK(masa_dictionary_init_uniform(dict[p], 0.0f, 42 + p));
        CHECK(masa_coefficients_create(ctx, LAYERS, ATOMS, &coef[p]));
        CHECK(masa_coefficients_init_cyclic(coef[p]));
        CHECK(masa_coefficients_add_uniform(coef[p], 0.5f, 7 + p));
        CHECK(masa_layer_set_masa(shared, p, dict[p], coef[p], ROW));

        const float *atoms = masa_dictionary_data(dict[p]);
        const float *c = masa_coefficients_data(coef[p]) + ROW * ATOMS;
        weight[p] = calloc(rows * cols, sizeof(float));
        if (!weight[p])
            return 1;
        for (size_t s = 0; s < ATOMS; s++)
            for (size_t i = 0; i < rows * cols; i++)
                weight[p][i] += c[s] * atoms[s * rows * cols + i];
        CHECK(masa_layer_set_dense(dense, p, weight[p]));
    }
    for (size_t i = 0; i < B * T * D; i++)
        x[i] = (float)(i * 37 % 101) / 50.0f - 1.0f; /* in [-1, 1] */

    if (forward(shared, x, y_masa) || forward(dense, x, y_dense))
        return 1;
    float diff = 0.0f, scale = 0.0f;
    for (size_t i = 0; i < B * T * D; i++) {
        float d = y_masa[i] - y_dense[i], a = y_dense[i];
        diff = d > diff ? d : -d > diff ? -d : diff;
        scale = a > scale ? a : -a > scale ? -a : scale;
    }
    /* Composition order is the only difference: float32 rounding. */
    int ok = scale > 0.0f && diff <= 1e-5f * scale;
    printf("MASA forward vs composed dense weights: max difference %.2g of %.2g: %s\n",
           diff, scale, ok ? "ok" : "MISMATCH");

    masa_layer_destroy(shared);
    masa_layer_destroy(dense);
    for (int p = 0; p < 4; p++) {
        masa_dictionary_destroy(dict[p]);
        masa_coefficients_destroy(coef[p]);
        free(weight[p]);
    }
    masa_context_destroy(ctx);
    return ok ? 0 : 1;
}
