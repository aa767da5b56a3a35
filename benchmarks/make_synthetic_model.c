/*
 * Writes a synthetic model's attention weights as safetensors, with
 * libmasa's writer, for benchmarks/compress_large.sh:
 *
 *   make_synthetic_model OUT LAYERS D_MODEL [KV_DIM]
 *
 * Tensors model.layers.{l}.self_attn.{q,k,v,o}_proj.weight, float32,
 * nn.Linear layout [d_out, d_in] (k and v: [KV_DIM, D_MODEL], default
 * KV_DIM = D_MODEL). Each weight is a random mix of 4 matrices shared by
 * all layers of its projection plus independent noise of the same size, so
 * the layers are correlated (Matrix PCA has something to find) yet of full
 * rank. Deterministic (a fixed xorshift seed). One tensor at a time is in
 * memory (the writer spools each to disk at once).
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include <masa/masa.h>

#define N_SHARED 4

static uint64_t state = 0x9e3779b97f4a7c15ull;

/* uniform in [-1, 1) */
static float uniform(void)
{
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return (float)((double)(state >> 11) * (2.0 / 9007199254740992.0) - 1.0);
}

static int fail(const char *what)
{
    fprintf(stderr, "make_synthetic_model: %s: %s\n", what, masa_last_error());
    return 1;
}

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: make_synthetic_model OUT LAYERS D_MODEL [KV_DIM]\n");
        return 2;
    }
    size_t L = strtoull(argv[2], NULL, 10), d = strtoull(argv[3], NULL, 10);
    size_t dkv = argc > 4 ? strtoull(argv[4], NULL, 10) : d;
    if (!L || !d || !dkv) {
        fprintf(stderr, "make_synthetic_model: LAYERS, D_MODEL and KV_DIM must be positive\n");
        return 2;
    }
    masa_context *ctx;
    masa_safetensors_writer *w;
    if (masa_context_create(NULL, &ctx) != MASA_OK)
        return fail("context");
    if (masa_safetensors_writer_create(ctx, argv[1], &w) != MASA_OK)
        return fail(argv[1]);
    const char letters[] = "qkvo";
    size_t n_max = d * d > dkv * d ? d * d : dkv * d;
    float *shared = malloc(N_SHARED * n_max * sizeof(float));
    float *buf = malloc(n_max * sizeof(float));
    if (!shared || !buf) {
        fprintf(stderr, "make_synthetic_model: out of memory\n");
        return 1;
    }
    for (int p = 0; p < 4; p++) {
        size_t rows = (p == 1 || p == 2) ? dkv : d, n = rows * d;
        for (size_t i = 0; i < N_SHARED * n; i++)
            shared[i] = uniform();
        for (size_t l = 0; l < L; l++) {
            float mix[N_SHARED];
            for (int k = 0; k < N_SHARED; k++)
                mix[k] = uniform();
            for (size_t i = 0; i < n; i++) {
                float v = uniform();
                for (int k = 0; k < N_SHARED; k++)
                    v += mix[k] * shared[k * n + i];
                buf[i] = v * 0.02f;
            }
            char name[128];
            size_t shape[2] = {rows, d};
            snprintf(name, sizeof name, "model.layers.%zu.self_attn.%c_proj.weight",
                     l, letters[p]);
            if (masa_safetensors_writer_add(w, name, MASA_DTYPE_F32, 2, shape, buf,
                                            n * sizeof(float)) != MASA_OK)
                return fail(name);
        }
        fprintf(stderr, "make_synthetic_model: %c done\n", letters[p]);
    }
    if (masa_safetensors_writer_finish(w) != MASA_OK)
        return fail("finish");
    masa_safetensors_writer_destroy(w);
    masa_context_destroy(ctx);
    free(shared);
    free(buf);
    return 0;
}
