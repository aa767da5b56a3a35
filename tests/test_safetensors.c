/*
 * safetensors reader and writer: byte-exact agreement with the Python
 * package's serializer on its own test vectors, round trips of every dtype,
 * float conversions against an independent decoder, every malformed-file
 * check, the writer's refusals, atomic replacement and allocation failures.
 */
#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "test_util.h"

static masa_context *ctx;
static char dir[256];

static void setup(void)
{
    ck_assert_int_eq(masa_context_create(NULL, &ctx), MASA_OK);
    snprintf(dir, sizeof dir, "%s/masa-st-XXXXXX",
             getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
    ck_assert_ptr_nonnull(mkdtemp(dir));
}

/* Number of entries in the test directory (temporary files left behind
 * would show here). */
static int dir_entries(void)
{
    DIR *d = opendir(dir);
    ck_assert_ptr_nonnull(d);
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL)
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, ".."))
            n++;
    closedir(d);
    return n;
}

static void teardown(void)
{
    DIR *d = opendir(dir);
    struct dirent *e;
    char p[512];
    while (d && (e = readdir(d)) != NULL) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
            continue;
        snprintf(p, sizeof p, "%s/%s", dir, e->d_name);
        if (rmdir(p) != 0)
            unlink(p);
    }
    if (d)
        closedir(d);
    rmdir(dir);
    masa_context_destroy(ctx);
}

static char *path_in(const char *name)
{
    static char p[512];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    return p;
}

static unsigned char *slurp(const char *path, size_t *n)
{
    FILE *f = fopen(path, "rb");
    ck_assert_ptr_nonnull(f);
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *buf = malloc((size_t)len + 1);
    ck_assert_int_eq(fread(buf, 1, (size_t)len, f), (size_t)len);
    fclose(f);
    *n = (size_t)len;
    return buf;
}

static void spit(const char *path, const void *data, size_t n)
{
    FILE *f = fopen(path, "wb");
    ck_assert_ptr_nonnull(f);
    ck_assert_int_eq(fwrite(data, 1, n, f), n);
    fclose(f);
}

/* A file image: 8-byte length, header text, then `data_bytes` bytes. */
static unsigned char *image(const char *header, size_t data_bytes, size_t *n)
{
    size_t h = strlen(header);
    *n = 8 + h + data_bytes;
    unsigned char *buf = calloc(*n + 1, 1);
    for (int i = 0; i < 8; i++)
        buf[i] = (unsigned char)((uint64_t)h >> (8 * i));
    memcpy(buf + 8, header, h);
    for (size_t i = 0; i < data_bytes; i++)
        buf[8 + h + i] = (unsigned char)i;
    return buf;
}

/* ---- agreement with the Python package ---- */

/* The package's own serialization test: {"attn.0": F32 [1, 2, 3] 0..5}. */
START_TEST(test_python_vector)
{
    static const unsigned char expected[] = {
        64, 0, 0, 0, 0, 0, 0, 0, 123, 34, 97, 116, 116, 110, 46, 48, 34, 58,
        123, 34, 100, 116, 121, 112, 101, 34, 58, 34, 70, 51, 50, 34, 44, 34,
        115, 104, 97, 112, 101, 34, 58, 91, 49, 44, 50, 44, 51, 93, 44, 34,
        100, 97, 116, 97, 95, 111, 102, 102, 115, 101, 116, 115, 34, 58, 91,
        48, 44, 50, 52, 93, 125, 125, 0, 0, 0, 0, 0, 0, 128, 63, 0, 0, 0, 64,
        0, 0, 64, 64, 0, 0, 128, 64, 0, 0, 160, 64};
    float v[6] = {0, 1, 2, 3, 4, 5};
    size_t shape[3] = {1, 2, 3};
    masa_safetensors_writer *w;
    TU_OK(masa_safetensors_writer_create(ctx, path_in("a.safetensors"), &w));
    TU_OK(masa_safetensors_writer_add(w, "attn.0", MASA_DTYPE_F32, 3, shape, v,
                                      sizeof v));
    ck_assert_int_eq(dir_entries(), 0); /* the spool is unlinked */
    TU_OK(masa_safetensors_writer_finish(w));
    masa_safetensors_writer_destroy(w);
    size_t n;
    unsigned char *got = slurp(path_in("a.safetensors"), &n);
    ck_assert_uint_eq(n, sizeof expected);
    ck_assert(memcmp(got, expected, n) == 0);
    free(got);
    ck_assert_int_eq(dir_entries(), 1);
}
END_TEST

/* The package's empty files, without and with metadata. */
START_TEST(test_python_empty)
{
    static const unsigned char empty[] = {8, 0, 0, 0, 0, 0, 0, 0, '{', '}',
                                          ' ', ' ', ' ', ' ', ' ', ' '};
    static const char meta[] = "{\"__metadata__\":{\"framework\":\"pt\"}}     ";
    masa_safetensors_writer *w;
    TU_OK(masa_safetensors_writer_create(ctx, path_in("e"), &w));
    TU_OK(masa_safetensors_writer_finish(w));
    masa_safetensors_writer_destroy(w);
    size_t n;
    unsigned char *got = slurp(path_in("e"), &n);
    ck_assert_uint_eq(n, sizeof empty);
    ck_assert(memcmp(got, empty, n) == 0);
    free(got);

    TU_OK(masa_safetensors_writer_create(ctx, path_in("m"), &w));
    TU_OK(masa_safetensors_writer_set_metadata(w, "framework", "tf"));
    TU_OK(masa_safetensors_writer_set_metadata(w, "framework", "pt"));
    TU_OK(masa_safetensors_writer_finish(w));
    masa_safetensors_writer_destroy(w);
    got = slurp(path_in("m"), &n);
    ck_assert_uint_eq(n, 8 + 40);
    ck_assert_uint_eq(got[0], 40);
    ck_assert(memcmp(got + 8, meta, 40) == 0);
    free(got);

    masa_safetensors *st;
    TU_OK(masa_safetensors_open(ctx, path_in("m"), &st));
    ck_assert_uint_eq(masa_safetensors_tensor_count(st), 0);
    ck_assert_uint_eq(masa_safetensors_metadata_count(st), 1);
    const char *k, *v;
    TU_OK(masa_safetensors_metadata_entry(st, 0, &k, &v));
    ck_assert_str_eq(k, "framework");
    ck_assert_str_eq(v, "pt");
    TU_OK(masa_safetensors_metadata_get(st, "framework", &v));
    ck_assert_str_eq(v, "pt");
    ck_assert_int_eq(masa_safetensors_metadata_get(st, "x", &v),
                     MASA_ERROR_NOT_FOUND);
    ck_assert(strstr(masa_last_error(), "\"x\""));
    ck_assert_int_eq(masa_safetensors_metadata_entry(st, 1, &k, &v),
                     MASA_ERROR_OUT_OF_RANGE);
    masa_safetensors_close(st);
}
END_TEST

/* ---- round trips ---- */

START_TEST(test_round_trip_all_dtypes)
{
    static const masa_dtype all[] = {
        MASA_DTYPE_F32, MASA_DTYPE_F16, MASA_DTYPE_BF16, MASA_DTYPE_F64,
        MASA_DTYPE_BOOL, MASA_DTYPE_U8, MASA_DTYPE_I8, MASA_DTYPE_I16,
        MASA_DTYPE_U16, MASA_DTYPE_I32, MASA_DTYPE_U32, MASA_DTYPE_I64,
        MASA_DTYPE_U64, MASA_DTYPE_F8_E5M2, MASA_DTYPE_F8_E4M3};
    /* Expected file order: the package's dtype ranks, descending. */
    static const char *order[] = {"U64", "I64", "F64", "F32", "U32", "I32",
                                  "BF16", "F16", "U16", "I16", "F8_E4M3",
                                  "F8_E5M2", "I8", "U8", "BOOL"};
    enum { N = sizeof all / sizeof all[0] };
    unsigned char data[N][3 * 5 * 8];
    masa_safetensors_writer *w;
    TU_OK(masa_safetensors_writer_create(ctx, path_in("t"), &w));
    for (int i = 0; i < N; i++) {
        size_t shape[2] = {3, 5}, es = masa_dtype_size(all[i]);
        for (size_t b = 0; b < 15 * es; b++)
            data[i][b] = (unsigned char)(i * 31 + b * 7);
        TU_OK(masa_safetensors_writer_add(w, masa_dtype_name(all[i]), all[i], 2,
                                          shape, data[i], 15 * es));
    }
    size_t none = 0;
    TU_OK(masa_safetensors_writer_add(w, "scalar", MASA_DTYPE_F32, 0, NULL,
                                      data[0], 4));
    size_t zero_shape[2] = {4, 0};
    TU_OK(masa_safetensors_writer_add(w, "empty", MASA_DTYPE_F32, 2, zero_shape,
                                      NULL, none));
    TU_OK(masa_safetensors_writer_finish(w));
    masa_safetensors_writer_destroy(w);

    masa_safetensors *st;
    TU_OK(masa_safetensors_open(ctx, path_in("t"), &st));
    ck_assert_uint_eq(masa_safetensors_tensor_count(st), N + 2);
    for (int i = 0; i < N; i++) {
        size_t idx;
        TU_OK(masa_safetensors_find(st, masa_dtype_name(all[i]), &idx));
        const char *name;
        masa_dtype dt;
        size_t ndim, bytes;
        const size_t *shape;
        const void *p;
        TU_OK(masa_safetensors_tensor(st, idx, &name, &dt, &ndim, &shape, &p,
                                      &bytes));
        ck_assert_str_eq(name, masa_dtype_name(all[i]));
        ck_assert_int_eq(dt, all[i]);
        ck_assert_uint_eq(ndim, 2);
        ck_assert(shape[0] == 3 && shape[1] == 5);
        ck_assert_uint_eq(bytes, 15 * masa_dtype_size(all[i]));
        ck_assert(memcmp(p, data[i], bytes) == 0);
        /* every tensor aligned to its element size */
        ck_assert_uint_eq((uintptr_t)p % masa_dtype_size(all[i]), 0);
    }
    /* file order: F32 "F32" and "empty" and "scalar" share rank F32 */
    const char *expect[N + 2];
    int k = 0;
    for (int i = 0; i < N; i++) {
        expect[k++] = order[i];
        if (!strcmp(order[i], "F32")) {
            expect[k++] = "empty";
            expect[k++] = "scalar";
        }
    }
    for (size_t i = 0; i < N + 2; i++) {
        const char *name;
        TU_OK(masa_safetensors_tensor(st, i, &name, NULL, NULL, NULL, NULL, NULL));
        ck_assert_str_eq(name, expect[i]);
    }
    size_t idx, ndim, bytes;
    const size_t *shape;
    TU_OK(masa_safetensors_find(st, "scalar", &idx));
    TU_OK(masa_safetensors_tensor(st, idx, NULL, NULL, &ndim, &shape, NULL,
                                  &bytes));
    ck_assert(ndim == 0 && shape != NULL && bytes == 4);
    const float *f;
    size_t count;
    TU_OK(masa_safetensors_find(st, "empty", &idx));
    TU_OK(masa_safetensors_f32(st, idx, &f, &count));
    ck_assert_uint_eq(count, 0);
    TU_OK(masa_safetensors_read_f32(st, idx, NULL, 0));
    ck_assert_int_eq(masa_safetensors_find(st, "nope", &idx),
                     MASA_ERROR_NOT_FOUND);
    ck_assert(strstr(masa_last_error(), "nope") && strstr(masa_last_error(), dir));
    ck_assert_int_eq(masa_safetensors_tensor(st, N + 2, NULL, NULL, NULL, NULL,
                                             NULL, NULL),
                     MASA_ERROR_OUT_OF_RANGE);
    TU_OK(masa_safetensors_find(st, "I32", &idx));
    float dst[15];
    ck_assert_int_eq(masa_safetensors_read_f32(st, idx, dst, 15),
                     MASA_ERROR_INVALID_ARGUMENT);
    ck_assert_int_eq(masa_safetensors_f32(st, idx, &f, &count),
                     MASA_ERROR_INVALID_ARGUMENT);
    masa_safetensors_close(st);
}
END_TEST

/* ---- float conversions against an independent decoder ---- */

static double ref_half(unsigned h)
{
    int sign = h >> 15, exp = (h >> 10) & 31, mant = h & 1023;
    double v;
    if (exp == 31)
        v = mant ? NAN : INFINITY;
    else if (exp == 0)
        v = ldexp(mant, -24);
    else
        v = ldexp(1024 + mant, exp - 25);
    return sign ? -v : v;
}

static double ref_bf16(unsigned b)
{
    int sign = b >> 15, exp = (b >> 7) & 255, mant = b & 127;
    double v;
    if (exp == 255)
        v = mant ? NAN : INFINITY;
    else if (exp == 0)
        v = ldexp(mant, -133);
    else
        v = ldexp(128 + mant, exp - 134);
    return sign ? -v : v;
}

START_TEST(test_conversions)
{
    enum { N = 65536 };
    uint16_t *h = malloc(N * 2);
    for (unsigned i = 0; i < N; i++)
        h[i] = (uint16_t)i;
    double d[5] = {1.0 / 3.0, -1e300, 1e-300, 3.5, -0.0};
    size_t shape1[1] = {N}, shape5[1] = {5};
    masa_safetensors_writer *w;
    TU_OK(masa_safetensors_writer_create(ctx, path_in("c"), &w));
    TU_OK(masa_safetensors_writer_add(w, "h", MASA_DTYPE_F16, 1, shape1, h, 2 * N));
    TU_OK(masa_safetensors_writer_add(w, "b", MASA_DTYPE_BF16, 1, shape1, h, 2 * N));
    TU_OK(masa_safetensors_writer_add(w, "d", MASA_DTYPE_F64, 1, shape5, d, sizeof d));
    TU_OK(masa_safetensors_writer_finish(w));
    masa_safetensors_writer_destroy(w);
    masa_safetensors *st;
    TU_OK(masa_safetensors_open(ctx, path_in("c"), &st));
    float *out = malloc(N * sizeof *out);
    size_t idx, count;
    const float *conv, *again;
    for (int kind = 0; kind < 2; kind++) {
        TU_OK(masa_safetensors_find(st, kind ? "b" : "h", &idx));
        TU_OK(masa_safetensors_read_f32(st, idx, out, N));
        TU_OK(masa_safetensors_f32(st, idx, &conv, &count));
        TU_OK(masa_safetensors_f32(st, idx, &again, &count));
        ck_assert_ptr_eq(conv, again); /* converted once */
        ck_assert_uint_eq(count, N);
        for (unsigned i = 0; i < N; i++) {
            double r = kind ? ref_bf16(i) : ref_half(i);
            if (isnan(r)) {
                ck_assert_msg(isnan(out[i]) && isnan(conv[i]), "%u", i);
            } else {
                ck_assert_msg((double)out[i] == r && (double)conv[i] == r &&
                                  !signbit(out[i]) == !signbit(r),
                              "%s %u: %g vs %g", kind ? "bf16" : "f16", i,
                              (double)out[i], r);
            }
        }
    }
    ck_assert_int_eq(masa_safetensors_read_f32(st, idx, out, N - 1),
                     MASA_ERROR_BAD_SHAPE);
    TU_OK(masa_safetensors_find(st, "d", &idx));
    TU_OK(masa_safetensors_read_f32(st, idx, out, 5));
    ck_assert(out[0] == (float)(1.0 / 3.0) && isinf(out[1]) && out[1] < 0 &&
              out[2] == 0.0f && out[3] == 3.5f && signbit(out[4]));
    masa_safetensors_close(st);
    free(out);
    free(h);
}
END_TEST

/* F32 in place when aligned, converted (copied) when the header leaves it
 * misaligned. */
START_TEST(test_f32_in_place_and_misaligned)
{
    size_t n;
    /* header of 9 bytes: the data section starts at byte 17 */
    unsigned char *img = image("{\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8, &n);
    float vals[2] = {1.5f, -2.25f};
    memcpy(img + n - 8, vals, 8);
    /* aligned copy of the same image at a 4-aligned data start is produced
     * by the writer; this one is misaligned if header length % 4 != 0 */
    size_t hlen = n - 16;
    masa_safetensors *st;
    TU_OK(masa_safetensors_open_memory(ctx, img, n, &st));
    const float *f;
    size_t count;
    TU_OK(masa_safetensors_f32(st, 0, &f, &count));
    ck_assert(count == 2 && f[0] == 1.5f && f[1] == -2.25f);
    if ((8 + hlen) % 4 != 0)
        ck_assert_ptr_ne(f, (const void *)(img + n - 8));
    masa_safetensors_close(st);
    free(img);

    size_t shape[1] = {2};
    masa_safetensors_writer *w;
    TU_OK(masa_safetensors_writer_create(ctx, path_in("al"), &w));
    TU_OK(masa_safetensors_writer_add(w, "x", MASA_DTYPE_F32, 1, shape, vals, 8));
    TU_OK(masa_safetensors_writer_finish(w));
    masa_safetensors_writer_destroy(w);
    TU_OK(masa_safetensors_open(ctx, path_in("al"), &st));
    const void *raw;
    TU_OK(masa_safetensors_tensor(st, 0, NULL, NULL, NULL, NULL, &raw, NULL));
    TU_OK(masa_safetensors_f32(st, 0, &f, &count));
    ck_assert_ptr_eq(f, raw); /* in place */
    masa_safetensors_close(st);
}
END_TEST

/* ---- malformed files ---- */

typedef struct bad_case {
    const char *header; /* NULL: raw bytes below */
    size_t data_bytes;
    const char *message; /* a piece of the expected message */
} bad_case;

#define T(off) "{\"t\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":" off "}}"

static const bad_case bad_cases[] = {
    {"[1,2]", 0, "begin with '{'"},
    {" {}", 0, "begin with '{'"},
    {"{", 0, "not valid JSON"},
    {"{}x", 0, "not valid JSON"},
    {"{\"a\":1,\"a\":1}", 0, "not valid JSON"},             /* duplicate key */
    {"{\"\xff\":1}", 0, "not valid JSON"},                   /* not UTF-8 */
    {"{\"a\\u0000b\":1}", 0, "not valid JSON"},              /* NUL in name */
    {"{\"t\":5}", 0, "not a JSON object"},
    {"{\"t\":{\"shape\":[2],\"data_offsets\":[0,8]}}", 8, "\"dtype\""},
    {"{\"t\":{\"dtype\":\"F33\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8, "unknown dtype"},
    {"{\"t\":{\"dtype\":\"F4\",\"shape\":[2],\"data_offsets\":[0,1]}}", 1, "unknown dtype"},
    {"{\"t\":{\"dtype\":\"F32\",\"data_offsets\":[0,8]}}", 8, "\"shape\""},
    {"{\"t\":{\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}}", 8, "shape[0]"},
    {"{\"t\":{\"dtype\":\"F32\",\"shape\":[2.0],\"data_offsets\":[0,8]}}", 8, "shape[0]"},
    {"{\"t\":{\"dtype\":\"F32\",\"shape\":[\"2\"],\"data_offsets\":[0,8]}}", 8, "shape[0]"},
    {"{\"t\":{\"dtype\":\"F32\",\"shape\":[2]}}", 8, "data_offsets"},
    {T("[0]"), 8, "data_offsets"},
    {T("[0,8,9]"), 8, "data_offsets"},
    {T("[-1,7]"), 8, "data_offsets"},
    {T("[8,0]"), 8, "end before"},
    {T("[0,12]"), 12, "span 12"},                             /* shape x size */
    {T("[4,12]"), 12, "leave a hole"},
    {T("[0,8]"), 9, "cover 8 bytes but the data section has 9"},
    {T("[0,8]"), 4, "cover 8 bytes but the data section has 4"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
     "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", 12, "overlap"},
    {"{\"t\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296],\"data_offsets\":[0,8]}}", 8, "overflows"},
    {"{\"t\":{\"dtype\":\"F64\",\"shape\":[4611686018427387904],\"data_offsets\":[0,8]}}", 8, "overflows"},
    {"{\"t\":{\"dtype\":\"F32\",\"shape\":[99999999999999999999],\"data_offsets\":[0,8]}}", 8, "not valid JSON"},
    {"{\"__metadata__\":{\"a\":1}}", 0, "not a string"},
    {"{\"__metadata__\":[\"a\"]}", 0, "\"__metadata__\" is not a JSON object"},
};

START_TEST(test_malformed)
{
    const bad_case *c = &bad_cases[_i];
    size_t n;
    unsigned char *img = image(c->header, c->data_bytes, &n);
    masa_safetensors *st = (masa_safetensors *)1;
    masa_status s = masa_safetensors_open_memory(ctx, img, n, &st);
    ck_assert_msg(s == MASA_ERROR_BAD_FORMAT, "case %d: %d %s", _i, (int)s,
                  masa_last_error());
    ck_assert_ptr_null(st);
    ck_assert_msg(strstr(masa_last_error(), c->message) &&
                      strstr(masa_last_error(), "<memory>"),
                  "case %d: message \"%s\" lacks \"%s\"", _i, masa_last_error(),
                  c->message);
    /* the same from a file: the message names it */
    spit(path_in("bad"), img, n);
    ck_assert_int_eq(masa_safetensors_open(ctx, path_in("bad"), &st),
                     MASA_ERROR_BAD_FORMAT);
    ck_assert(strstr(masa_last_error(), path_in("bad")));
    free(img);
}
END_TEST

START_TEST(test_malformed_framing)
{
    masa_safetensors *st;
    unsigned char b[16] = {0};
    for (size_t n = 0; n < 8; n++) {
        ck_assert_int_eq(masa_safetensors_open_memory(ctx, b, n, &st),
                         MASA_ERROR_BAD_FORMAT);
        ck_assert(strstr(masa_last_error(), "shorter than the 8-byte"));
    }
    /* zero-length header */
    ck_assert_int_eq(masa_safetensors_open_memory(ctx, b, 16, &st),
                     MASA_ERROR_BAD_FORMAT);
    /* length past the end */
    b[0] = 9;
    b[8] = '{';
    ck_assert_int_eq(masa_safetensors_open_memory(ctx, b, 16, &st),
                     MASA_ERROR_BAD_FORMAT);
    ck_assert(strstr(masa_last_error(), "runs past the end"));
    /* over the cap, and the largest u64 */
    uint64_t big = 100000001;
    memcpy(b, &big, 8);
    ck_assert_int_eq(masa_safetensors_open_memory(ctx, b, 16, &st),
                     MASA_ERROR_BAD_FORMAT);
    ck_assert(strstr(masa_last_error(), "exceeds the limit"));
    memset(b, 0xff, 8);
    ck_assert_int_eq(masa_safetensors_open_memory(ctx, b, 16, &st),
                     MASA_ERROR_BAD_FORMAT);
    /* empty file, a directory, a missing file */
    spit(path_in("zero"), b, 0);
    ck_assert_int_eq(masa_safetensors_open(ctx, path_in("zero"), &st),
                     MASA_ERROR_BAD_FORMAT);
    ck_assert_int_eq(masa_safetensors_open(ctx, dir, &st), MASA_ERROR_IO);
    ck_assert(strstr(masa_last_error(), "not a regular file"));
    ck_assert_int_eq(masa_safetensors_open(ctx, path_in("missing"), &st),
                     MASA_ERROR_IO);
    ck_assert(strstr(masa_last_error(), "No such file"));
    /* header padded with spaces and ignored unknown keys are fine */
    size_t n;
    unsigned char *img = image("{\"t\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8],\"x\":1}}   ", 8, &n);
    TU_OK(masa_safetensors_open_memory(ctx, img, n, &st));
    masa_safetensors_close(st);
    free(img);
    img = image("{\"__metadata__\":null}", 0, &n);
    TU_OK(masa_safetensors_open_memory(ctx, img, n, &st));
    ck_assert_uint_eq(masa_safetensors_metadata_count(st), 0);
    masa_safetensors_close(st);
    free(img);
}
END_TEST

/* ---- NULL arguments ---- */

START_TEST(test_null_arguments)
{
    masa_safetensors *st = (masa_safetensors *)1;
    masa_safetensors_writer *w = (masa_safetensors_writer *)1;
    ck_assert_int_eq(masa_safetensors_open(NULL, "x", &st), MASA_ERROR_NULL_ARGUMENT);
    ck_assert_ptr_null(st);
    ck_assert_int_eq(masa_safetensors_open(ctx, NULL, &st), MASA_ERROR_NULL_ARGUMENT);
    ck_assert_int_eq(masa_safetensors_open(ctx, "x", NULL), MASA_ERROR_NULL_ARGUMENT);
    ck_assert_int_eq(masa_safetensors_open_memory(ctx, NULL, 8, &st),
                     MASA_ERROR_NULL_ARGUMENT);
    ck_assert_int_eq(masa_safetensors_writer_create(ctx, NULL, &w),
                     MASA_ERROR_NULL_ARGUMENT);
    ck_assert_ptr_null(w);
    ck_assert_int_eq(masa_safetensors_writer_create(ctx, "", &w),
                     MASA_ERROR_INVALID_ARGUMENT);
    size_t idx;
    const char *v;
    const float *f;
    ck_assert_int_eq(masa_safetensors_find(NULL, "a", &idx), MASA_ERROR_NULL_ARGUMENT);
    ck_assert_int_eq(masa_safetensors_tensor(NULL, 0, NULL, NULL, NULL, NULL, NULL, NULL),
                     MASA_ERROR_NULL_ARGUMENT);
    ck_assert_int_eq(masa_safetensors_read_f32(NULL, 0, NULL, 0), MASA_ERROR_NULL_ARGUMENT);
    ck_assert_int_eq(masa_safetensors_f32(NULL, 0, &f, &idx), MASA_ERROR_NULL_ARGUMENT);
    ck_assert_int_eq(masa_safetensors_metadata_entry(NULL, 0, &v, &v),
                     MASA_ERROR_NULL_ARGUMENT);
    ck_assert_int_eq(masa_safetensors_metadata_get(NULL, "a", &v), MASA_ERROR_NULL_ARGUMENT);
    ck_assert_int_eq(masa_safetensors_writer_add(NULL, "a", MASA_DTYPE_F32, 0, NULL, &f, 4),
                     MASA_ERROR_NULL_ARGUMENT);
    ck_assert_int_eq(masa_safetensors_writer_set_metadata(NULL, "a", "b"),
                     MASA_ERROR_NULL_ARGUMENT);
    ck_assert_int_eq(masa_safetensors_writer_finish(NULL), MASA_ERROR_NULL_ARGUMENT);
    ck_assert_uint_eq(masa_safetensors_tensor_count(NULL), 0);
    ck_assert_uint_eq(masa_safetensors_metadata_count(NULL), 0);
    masa_safetensors_close(NULL);
    masa_safetensors_writer_destroy(NULL);
    ck_assert_ptr_null(masa_dtype_name((masa_dtype)99));
    ck_assert_uint_eq(masa_dtype_size((masa_dtype)-1), 0);
    ck_assert_str_eq(masa_dtype_name(MASA_DTYPE_BF16), "BF16");
    ck_assert_uint_eq(masa_dtype_size(MASA_DTYPE_F64), 8);
    ck_assert_str_eq(masa_status_string(MASA_ERROR_BAD_FORMAT), "malformed file");
}
END_TEST

/* ---- the writer's refusals and atomicity ---- */

START_TEST(test_writer_refusals)
{
    masa_safetensors_writer *w;
    float v[4] = {0};
    size_t shape[2] = {2, 2};
    TU_OK(masa_safetensors_writer_create(ctx, path_in("r"), &w));
    TU_OK(masa_safetensors_writer_add(w, "ok", MASA_DTYPE_F32, 2, shape, v, 16));
    ck_assert_int_eq(masa_safetensors_writer_add(w, "ok", MASA_DTYPE_F32, 2, shape, v, 16),
                     MASA_ERROR_INVALID_ARGUMENT);
    ck_assert(strstr(masa_last_error(), "added twice"));
    ck_assert_int_eq(masa_safetensors_writer_add(w, "", MASA_DTYPE_F32, 2, shape, v, 16),
                     MASA_ERROR_INVALID_ARGUMENT);
    ck_assert_int_eq(masa_safetensors_writer_add(w, "__metadata__", MASA_DTYPE_F32, 2,
                                                 shape, v, 16),
                     MASA_ERROR_INVALID_ARGUMENT);
    ck_assert_int_eq(masa_safetensors_writer_add(w, "bad\xc0\xaf", MASA_DTYPE_F32, 2,
                                                 shape, v, 16),
                     MASA_ERROR_INVALID_ARGUMENT);
    ck_assert_int_eq(masa_safetensors_writer_add(w, "x", (masa_dtype)77, 2, shape, v, 16),
                     MASA_ERROR_INVALID_ARGUMENT);
    ck_assert_int_eq(masa_safetensors_writer_add(w, "x", MASA_DTYPE_F32, 2, shape, v, 12),
                     MASA_ERROR_BAD_SHAPE);
    ck_assert(strstr(masa_last_error(), "16 bytes, 12 given"));
    ck_assert_int_eq(masa_safetensors_writer_add(w, "x", MASA_DTYPE_F32, 2, NULL, v, 16),
                     MASA_ERROR_NULL_ARGUMENT);
    ck_assert_int_eq(masa_safetensors_writer_add(w, "x", MASA_DTYPE_F32, 2, shape, NULL, 16),
                     MASA_ERROR_NULL_ARGUMENT);
    size_t huge[2] = {SIZE_MAX / 2, 3};
    ck_assert_int_eq(masa_safetensors_writer_add(w, "x", MASA_DTYPE_F32, 2, huge, v, 16),
                     MASA_ERROR_OVERFLOW);
    ck_assert_int_eq(masa_safetensors_writer_set_metadata(w, "k", "\xff"),
                     MASA_ERROR_INVALID_ARGUMENT);
    TU_OK(masa_safetensors_writer_finish(w));
    ck_assert_int_eq(masa_safetensors_writer_finish(w), MASA_ERROR_INVALID_ARGUMENT);
    ck_assert_int_eq(masa_safetensors_writer_add(w, "y", MASA_DTYPE_F32, 2, shape, v, 16),
                     MASA_ERROR_INVALID_ARGUMENT);
    masa_safetensors_writer_destroy(w);
    masa_safetensors *st;
    TU_OK(masa_safetensors_open(ctx, path_in("r"), &st));
    ck_assert_uint_eq(masa_safetensors_tensor_count(st), 1); /* refusals added nothing */
    masa_safetensors_close(st);
}
END_TEST

START_TEST(test_writer_atomic)
{
    float v[2] = {1, 2};
    size_t shape[1] = {2};
    masa_safetensors_writer *w;
    /* unwritable directory: fails at create */
    ck_assert_int_eq(masa_safetensors_writer_create(ctx, path_in("no/such/f"), &w),
                     MASA_ERROR_IO);
    ck_assert(strstr(masa_last_error(), "no/such/f"));
    /* destroyed without finish: nothing appears */
    TU_OK(masa_safetensors_writer_create(ctx, path_in("never"), &w));
    TU_OK(masa_safetensors_writer_add(w, "a", MASA_DTYPE_F32, 1, shape, v, 8));
    masa_safetensors_writer_destroy(w);
    ck_assert_int_eq(dir_entries(), 0);
    /* replacing an existing file */
    spit(path_in("old"), "junk", 4);
    TU_OK(masa_safetensors_writer_create(ctx, path_in("old"), &w));
    TU_OK(masa_safetensors_writer_add(w, "a", MASA_DTYPE_F32, 1, shape, v, 8));
    TU_OK(masa_safetensors_writer_finish(w));
    masa_safetensors_writer_destroy(w);
    masa_safetensors *st;
    TU_OK(masa_safetensors_open(ctx, path_in("old"), &st));
    masa_safetensors_close(st);
    ck_assert_int_eq(dir_entries(), 1);
    /* rename fails (the target is a non-empty directory): the directory
     * stays, no temporary file is left */
    ck_assert_int_eq(mkdir(path_in("d"), 0755), 0);
    spit(path_in("d/keep"), "k", 1);
    TU_OK(masa_safetensors_writer_create(ctx, path_in("d"), &w));
    TU_OK(masa_safetensors_writer_add(w, "a", MASA_DTYPE_F32, 1, shape, v, 8));
    ck_assert_int_eq(masa_safetensors_writer_finish(w), MASA_ERROR_IO);
    ck_assert(strstr(masa_last_error(), path_in("d")));
    masa_safetensors_writer_destroy(w);
    struct stat sb;
    ck_assert(stat(path_in("d/keep"), &sb) == 0);
    ck_assert_int_eq(dir_entries(), 2); /* "old" and "d" */
    unlink(path_in("d/keep"));
}
END_TEST

/* ---- allocation failures through the context's hook ---- */

static long alloc_budget, live;

static void *counting_malloc(size_t n, void *user)
{
    (void)user;
    if (alloc_budget == 0)
        return NULL;
    alloc_budget--;
    live++;
    return malloc(n);
}

static void counting_free(void *p, void *user)
{
    (void)user;
    if (p) {
        live--;
        free(p);
    }
}

START_TEST(test_alloc_failures)
{
    masa_context_options o;
    masa_context_options_init(&o);
    o.n_threads = 1;
    o.malloc_fn = counting_malloc;
    o.free_fn = counting_free;
    alloc_budget = -1;
    masa_context *hc;
    TU_OK(masa_context_create(&o, &hc));
    long base = live;
    float v[6] = {1, 2, 3, 4, 5, 6};
    size_t shape[2] = {2, 3};
    int writes_ok = 0, reads_ok = 0;
    for (long budget = 0; budget < 200 && !(writes_ok && reads_ok); budget++) {
        masa_safetensors_writer *w = NULL;
        alloc_budget = budget;
        masa_status s = masa_safetensors_writer_create(hc, path_in("af"), &w);
        if (s == MASA_OK)
            s = masa_safetensors_writer_add(w, "a", MASA_DTYPE_F32, 2, shape, v, 24);
        if (s == MASA_OK)
            s = masa_safetensors_writer_add(w, "b", MASA_DTYPE_F16, 1, shape, v, 4);
        if (s == MASA_OK)
            s = masa_safetensors_writer_set_metadata(w, "k", "v");
        if (s == MASA_OK)
            s = masa_safetensors_writer_finish(w);
        ck_assert(s == MASA_OK || s == MASA_ERROR_OUT_OF_MEMORY);
        masa_safetensors_writer_destroy(w);
        alloc_budget = -1;
        ck_assert_int_eq(live, base);
        if (s != MASA_OK)
            continue;
        writes_ok = 1;
        for (long rb = 0; rb < 200; rb++) {
            masa_safetensors *st = NULL;
            const float *f;
            size_t count;
            alloc_budget = rb;
            s = masa_safetensors_open(hc, path_in("af"), &st);
            if (s == MASA_OK)
                s = masa_safetensors_f32(st, 1, &f, &count);
            ck_assert(s == MASA_OK || s == MASA_ERROR_OUT_OF_MEMORY);
            masa_safetensors_close(st);
            alloc_budget = -1;
            ck_assert_int_eq(live, base);
            if (s == MASA_OK) {
                reads_ok = 1;
                break;
            }
        }
    }
    ck_assert(writes_ok && reads_ok);
    masa_context_destroy(hc);
    ck_assert_int_eq(live, 0);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("safetensors");
    TCase *tc = tcase_create("core");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_python_vector);
    tcase_add_test(tc, test_python_empty);
    tcase_add_test(tc, test_round_trip_all_dtypes);
    tcase_add_test(tc, test_conversions);
    tcase_add_test(tc, test_f32_in_place_and_misaligned);
    tcase_add_loop_test(tc, test_malformed, 0,
                        (int)(sizeof bad_cases / sizeof bad_cases[0]));
    tcase_add_test(tc, test_malformed_framing);
    tcase_add_test(tc, test_null_arguments);
    tcase_add_test(tc, test_writer_refusals);
    tcase_add_test(tc, test_writer_atomic);
    tcase_add_test(tc, test_alloc_failures);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
