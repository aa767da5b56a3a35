/*
 * libFuzzer harness for the safetensors reader: each input is a whole file.
 *
 * The input is opened from memory (masa_safetensors_open_memory, the same
 * parser as masa_safetensors_open). The harness aborts (a crash for
 * libFuzzer) when the reader breaks a rule it promises:
 *   - a failed open leaves *out non-NULL or masa_last_error() empty;
 *   - an accepted file has a tensor whose bytes leave the input, tensors
 *     that do not tile the data section exactly, a byte length other than
 *     element count x dtype size, a name find() does not return, or
 *     metadata get() disagrees with the entry list;
 *   - converting a float tensor to float32 fails, or the two conversion
 *     paths (read_f32 into a buffer, f32 by the handle) differ bitwise.
 * Files with "masa.model" metadata also go through masa_model_open and
 * every accessor (groups must tile the layers, every pointer handed out
 * must cover its declared shape). Inputs whose last byte is 0x5a also go
 * through the writer (to a
 * temporary file) and back through the reader, which must see the same
 * names, dtypes, shapes, bytes and metadata (the writer's round trip; only
 * some inputs, since it writes and fsyncs a file).
 *
 * Build and run: see tests/fuzz/meson.build and scripts/hardening.sh.
 * fuzz_safetensors_replay runs the corpus without libFuzzer (valgrind).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <masa/masa.h>

static masa_context *ctx;

#define CHECK(cond)                                                       \
    do {                                                                  \
        if (!(cond)) {                                                    \
            fprintf(stderr, "fuzz_safetensors: %s:%d: %s (last error: %s)\n", \
                    __FILE__, __LINE__, #cond, masa_last_error());        \
            abort();                                                      \
        }                                                                 \
    } while (0)

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    masa_context_options o;
    masa_context_options_init(&o);
    o.n_threads = 1;
    if (masa_context_create(&o, &ctx) != MASA_OK)
        abort();
    return 0;
}

static void check_float_paths(masa_safetensors *st, size_t i, size_t count)
{
    float *buf = malloc((count ? count : 1) * sizeof *buf);
    CHECK(buf);
    CHECK(masa_safetensors_read_f32(st, i, buf, count) == MASA_OK);
    const float *f;
    size_t n;
    CHECK(masa_safetensors_f32(st, i, &f, &n) == MASA_OK);
    CHECK(n == count);
    CHECK(count == 0 || memcmp(f, buf, count * sizeof *buf) == 0);
    if (count)
        CHECK(masa_safetensors_read_f32(st, i, buf, count - 1) == MASA_ERROR_BAD_SHAPE);
    free(buf);
}

/* Writes everything st holds and reads it back. */
static void round_trip(masa_safetensors *st)
{
    char path[64];
    snprintf(path, sizeof path, "/tmp/fuzz_safetensors-%ld.st", (long)getpid());
    masa_safetensors_writer *w;
    CHECK(masa_safetensors_writer_create(ctx, path, &w) == MASA_OK);
    size_t nt = masa_safetensors_tensor_count(st);
    size_t nm = masa_safetensors_metadata_count(st);
    for (size_t i = 0; i < nt; i++) {
        const char *name;
        masa_dtype dt;
        size_t ndim, bytes;
        const size_t *shape;
        const void *data;
        CHECK(masa_safetensors_tensor(st, i, &name, &dt, &ndim, &shape, &data,
                                      &bytes) == MASA_OK);
        masa_status s = masa_safetensors_writer_add(w, name, dt, ndim, shape,
                                                    data, bytes);
        /* The writer refuses empty names, which the format allows. */
        CHECK(s == MASA_OK || (s == MASA_ERROR_INVALID_ARGUMENT && !name[0]));
        if (s != MASA_OK) {
            masa_safetensors_writer_destroy(w);
            return;
        }
    }
    for (size_t i = 0; i < nm; i++) {
        const char *k, *v;
        CHECK(masa_safetensors_metadata_entry(st, i, &k, &v) == MASA_OK);
        CHECK(masa_safetensors_writer_set_metadata(w, k, v) == MASA_OK);
    }
    CHECK(masa_safetensors_writer_finish(w) == MASA_OK);
    masa_safetensors_writer_destroy(w);
    masa_safetensors *back;
    CHECK(masa_safetensors_open(ctx, path, &back) == MASA_OK);
    unlink(path);
    CHECK(masa_safetensors_tensor_count(back) == nt);
    CHECK(masa_safetensors_metadata_count(back) == nm);
    for (size_t i = 0; i < nt; i++) {
        const char *name;
        masa_dtype dt, dt2;
        size_t ndim, ndim2, bytes, bytes2, j;
        const size_t *shape, *shape2;
        const void *data, *data2;
        CHECK(masa_safetensors_tensor(st, i, &name, &dt, &ndim, &shape, &data,
                                      &bytes) == MASA_OK);
        CHECK(masa_safetensors_find(back, name, &j) == MASA_OK);
        CHECK(masa_safetensors_tensor(back, j, NULL, &dt2, &ndim2, &shape2,
                                      &data2, &bytes2) == MASA_OK);
        CHECK(dt == dt2 && ndim == ndim2 && bytes == bytes2);
        CHECK(ndim == 0 || memcmp(shape, shape2, ndim * sizeof *shape) == 0);
        CHECK(bytes == 0 || memcmp(data, data2, bytes) == 0);
        /* wider dtypes first and a header padded to 8: every tensor of a
         * written file is aligned to its element size */
        CHECK((uintptr_t)data2 % masa_dtype_size(dt2) == 0);
    }
    for (size_t i = 0; i < nm; i++) {
        const char *k, *v, *v2;
        CHECK(masa_safetensors_metadata_entry(st, i, &k, &v) == MASA_OK);
        CHECK(masa_safetensors_metadata_get(back, k, &v2) == MASA_OK);
        CHECK(strcmp(v, v2) == 0);
    }
    masa_safetensors_close(back);
}

/* A file that passed the reader and claims to be a compressed model goes
 * through masa_model_open (via a temporary file: the model reader opens
 * paths) and every accessor. */
static void check_model(const uint8_t *data, size_t size)
{
    char path[64];
    snprintf(path, sizeof path, "/tmp/fuzz_safetensors-model-%ld.st", (long)getpid());
    FILE *f = fopen(path, "wb");
    CHECK(f && fwrite(data, 1, size, f) == size && fclose(f) == 0);
    masa_model *m = (masa_model *)(uintptr_t)1;
    masa_status s = masa_model_open(ctx, path, &m);
    unlink(path);
    if (s != MASA_OK) {
        CHECK(m == NULL && masa_last_error()[0] != '\0');
        CHECK(s == MASA_ERROR_BAD_FORMAT || s == MASA_ERROR_OUT_OF_MEMORY);
        return;
    }
    size_t L;
    CHECK(masa_model_layers(m, &L) == MASA_OK && L > 0);
    for (int p = 0; p < MASA_NUM_PROJECTIONS; p++) {
        masa_model_kind kind;
        size_t d_in, d_out, n_groups, next = 0;
        CHECK(masa_model_projection(m, (masa_projection)p, &kind, &d_in, &d_out,
                                    &n_groups) == MASA_OK);
        for (size_t g = 0; g < n_groups; g++) {
            size_t first, count, na, rows, cols;
            masa_dictionary *dict;
            masa_coefficients *coef;
            CHECK(masa_model_group(m, (masa_projection)p, g, &first, &count, &dict,
                                   &coef) == MASA_OK);
            CHECK(first == next && count > 0);
            next += count;
            CHECK(masa_dictionary_shape(dict, &na, &rows, &cols) == MASA_OK);
            CHECK(rows == d_in && cols == d_out);
            /* touch the last atom element and coefficient: in bounds */
            volatile float last = masa_dictionary_data(dict)[na * rows * cols - 1];
            last = masa_coefficients_data(coef)[count * na - 1];
            (void)last;
        }
        CHECK(kind != MASA_MODEL_MASA || next == L);
        for (size_t l = 0; l < L; l++) {
            size_t rank;
            float *a, *b, *w;
            CHECK(masa_model_lowrank(m, (masa_projection)p, l, &rank, &a, &b) == MASA_OK);
            if (rank) {
                volatile float touch = a[d_in * rank - 1] + b[rank * d_out - 1];
                (void)touch;
            }
            if (kind == MASA_MODEL_DENSE) {
                CHECK(masa_model_dense(m, (masa_projection)p, l, &w) == MASA_OK);
                volatile float touch = w[d_in * d_out - 1];
                (void)touch;
            }
        }
    }
    for (size_t i = 0; i < masa_model_calib_count(m); i++) {
        const char *name;
        masa_calib *c;
        CHECK(masa_model_calib_name(m, i, &name) == MASA_OK);
        s = masa_model_calib(m, name, &c);
        CHECK(s == MASA_OK || s == MASA_ERROR_INVALID_ARGUMENT);
        masa_calib_destroy(c);
    }
    masa_model_close(m);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    masa_safetensors *st = (masa_safetensors *)(uintptr_t)1;
    masa_status s = masa_safetensors_open_memory(ctx, data, size, &st);
    if (s != MASA_OK) {
        CHECK(st == NULL);
        CHECK(masa_last_error()[0] != '\0');
        CHECK(s == MASA_ERROR_BAD_FORMAT || s == MASA_ERROR_OUT_OF_MEMORY);
        return 0;
    }
    CHECK(size >= 8);
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--)
        n = n << 8 | data[i];
    const uint8_t *section = data + 8 + n;
    size_t nt = masa_safetensors_tensor_count(st), covered = 0;
    for (size_t i = 0; i < nt; i++) {
        const char *name;
        masa_dtype dt;
        size_t ndim, bytes, j;
        const size_t *shape;
        const void *p;
        CHECK(masa_safetensors_tensor(st, i, &name, &dt, &ndim, &shape, &p,
                                      &bytes) == MASA_OK);
        const uint8_t *b = p;
        CHECK(b == section + covered); /* ascending, no holes */
        CHECK(b >= data && b + bytes <= data + size);
        covered += bytes;
        size_t count = 1;
        for (size_t d = 0; d < ndim; d++)
            count *= shape[d]; /* cannot overflow: the reader checked */
        CHECK(masa_dtype_size(dt) != 0 && count * masa_dtype_size(dt) == bytes);
        CHECK(masa_safetensors_find(st, name, &j) == MASA_OK && j == i);
        if (dt == MASA_DTYPE_F32 || dt == MASA_DTYPE_F16 ||
            dt == MASA_DTYPE_BF16 || dt == MASA_DTYPE_F64)
            check_float_paths(st, i, count);
        else
            CHECK(masa_safetensors_read_f32(st, i, NULL, count) ==
                  MASA_ERROR_INVALID_ARGUMENT);
    }
    CHECK(section + covered == data + size);
    CHECK(masa_safetensors_tensor(st, nt, NULL, NULL, NULL, NULL, NULL, NULL) ==
          MASA_ERROR_OUT_OF_RANGE);
    size_t nm = masa_safetensors_metadata_count(st);
    for (size_t i = 0; i < nm; i++) {
        const char *k, *v, *v2;
        CHECK(masa_safetensors_metadata_entry(st, i, &k, &v) == MASA_OK);
        CHECK(masa_safetensors_metadata_get(st, k, &v2) == MASA_OK && v == v2);
    }
    if (data[size - 1] == 0x5a)
        round_trip(st);
    const char *model_json;
    if (masa_safetensors_metadata_get(st, "masa.model", &model_json) == MASA_OK)
        check_model(data, size);
    masa_safetensors_close(st);
    return 0;
}
