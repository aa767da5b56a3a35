/*
 * libFuzzer harness for ReplaceMe's C API (masa/replaceme.h).
 *
 * Each input is a little program: a context (shared, or its own with an
 * allocator hook that fails at a chosen allocation), then up to 24
 * operations on three least-squares and two cosine estimator slots and the
 * merge: create with fuzzed shapes (0, small, sizes whose products overflow)
 * and options (every field and the struct size), accumulate fuzzed batches
 * (rows 0..40, NaN, infinity, huge finite values, NULL arrays, row counts
 * whose byte size overflows), merge estimators (the same one, mismatched
 * shapes, NULL), solve with fuzzed alpha, query, reset, cosine loss, step,
 * fit and set_transform, and masa_merge_linear_map with fuzzed layouts,
 * shapes, overlapping buffers and non-finite maps.
 *
 * The harness keeps its own model of what it created and of the expected
 * statistics (float64 sums of the batches it sent), and aborts (a crash for
 * libFuzzer) when the library breaks a documented rule:
 *   - a status outside the enum, INTERNAL, or a failure without message;
 *   - a failing create that leaves *out set; a call that fails although
 *     every argument is valid (other than OUT_OF_MEMORY with the failing
 *     hook), or succeeds although one is invalid;
 *   - a failing call that changes what it must leave alone: the statistics
 *     and row count, the solve's output, T and the step count, w and bias;
 *   - statistics that differ from the harness's float64 sums (tolerance
 *     relative to the sum of the terms' magnitudes);
 *   - a successful solve, step or fit that leaves a non-finite T; a merge
 *     that differs from a float64 reference product;
 *   - memory from the allocator hook not all returned.
 * Shapes stay small (<= 12), so an execution takes well under a
 * millisecond. replay_main.c runs it without libFuzzer
 * (fuzz_replaceme_replay, any compiler, valgrind). MASA_FUZZ_TRACE=1
 * prints what an input does.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <masa/masa.h>

#define FUZZ_NAME "fuzz_replaceme"
#define FUZZ_LAST_STATUS MASA_ERROR_NOT_FOUND
#include "fuzz_input.h"

/* ---- harness memory, freed at the end of each input ---- */

enum { MAX_BLOCKS = 256 };
static void *blocks[MAX_BLOCKS];
static size_t n_blocks;

static void *own(size_t bytes)
{
    if (n_blocks == MAX_BLOCKS)
        abort(); /* the op count bounds the blocks; never reached */
    void *p = calloc(1, bytes ? bytes : 1);
    if (!p)
        abort();
    return blocks[n_blocks++] = p;
}

static void free_blocks(void)
{
    for (size_t i = 0; i < n_blocks; i++)
        free(blocks[i]);
    n_blocks = 0;
}

/* ---- values ---- */

static const float special[] = {NAN, INFINITY, -INFINITY, 1e30f, -FLT_MAX,
                                FLT_MIN, 0.0f, -0.0f};

/* Fills n floats: "tame" values in [-2, 2] on a grid of 1/16 (exact in
 * float64 products), now and then a special one, or all of them scaled by
 * 1e37. Returns 1 when every value is finite, and sets *tame when all are
 * in [-2, 2]. */
static int fill(reader *r, float *v, size_t n, int *tame)
{
    int finite = 1;
    *tame = 1;
    int specials = chance(r, 15);
    /* now and then every value huge but finite: products overflow float32 */
    float scale = chance(r, 5) ? 1e37f : 1.0f;
    if (scale != 1.0f && n)
        *tame = 0;
    for (size_t i = 0; i < n; i++) {
        if (specials && chance(r, 10)) {
            v[i] = special[pick(r, sizeof special / sizeof special[0])];
            if (!isfinite(v[i]))
                finite = 0;
            if (!(fabsf(v[i]) <= 2.0f))
                *tame = 0;
        } else {
            v[i] = scale * (((float)(int)pick(r, 65) - 32.0f) / 16.0f);
        }
    }
    return finite;
}

/* A batch of `rows` rows: x (rows x d_in), target z and, most of the time,
 * an offset y (rows x d_out; else NULL), filled by fill(). */
static void make_batch(reader *r, size_t rows, size_t d_in, size_t d_out, float **x,
                       float **z, float **y, int *finite, int *tame)
{
    int t1, t2, t3 = 1;
    *x = own(rows * d_in * sizeof(float));
    *z = own(rows * d_out * sizeof(float));
    *y = chance(r, 70) ? own(rows * d_out * sizeof(float)) : NULL;
    *finite = fill(r, *x, rows * d_in, &t1);
    *finite &= fill(r, *z, rows * d_out, &t2);
    if (*y)
        *finite &= fill(r, *y, rows * d_out, &t3);
    *tame = t1 && t2 && t3;
}

/* Sizes: mostly 1..12, sometimes 0, sometimes so large that a product of
 * two of them overflows size_t. */
static size_t dim(reader *r, int *huge)
{
    *huge = 0;
    unsigned k = pick(r, 20);
    if (k == 0)
        return 0;
    if (k == 1) {
        *huge = 1;
        return SIZE_MAX / 2 + pick(r, 3);
    }
    return 1 + pick(r, 12);
}

/* ---- state ---- */

typedef struct lin_slot {
    masa_linear_estimator *est;
    size_t d_in, d_out;
    uint64_t rows;
    double *xtx, *xtz, *mag_xtx, *mag_xtz; /* expected sums and |terms| */
} lin_slot;

typedef struct cos_slot {
    masa_cosine_estimator *est;
    size_t d_in, d_out, epochs, batch_rows;
    float learning_rate;
    uint64_t steps;
} cos_slot;

static masa_context *shared_ctx[2];

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    const char *t = getenv("MASA_FUZZ_TRACE");
    trace = t && strcmp(t, "1") == 0;
    for (int k = 0; k < 2; k++) {
        masa_context_options o;
        masa_context_options_init(&o);
        o.n_threads = (size_t)k + 1;
        if (masa_context_create(&o, &shared_ctx[k]) != MASA_OK)
            abort();
    }
    return 0;
}

static void lin_forget(lin_slot *s)
{
    masa_linear_estimator_destroy(s->est);
    free(s->xtx);
    free(s->xtz);
    free(s->mag_xtx);
    free(s->mag_xtz);
    memset(s, 0, sizeof *s);
}

/* The estimator's statistics must equal the harness's float64 sums. */
static void lin_compare(const lin_slot *s)
{
    size_t a = s->d_in * s->d_in, b = s->d_in * s->d_out;
    double *xtx = own(a * sizeof(double)), *xtz = own(b * sizeof(double));
    uint64_t rows = 0;
    REQUIRE(CALL(masa_linear_estimator_stats(s->est, xtx, xtz)) == MASA_OK, "stats");
    REQUIRE(CALL(masa_linear_estimator_rows(s->est, &rows)) == MASA_OK, "rows");
    REQUIRE(rows == s->rows, "rows %llu, expected %llu", (unsigned long long)rows,
            (unsigned long long)s->rows);
    for (size_t i = 0; i < a; i++)
        REQUIRE(fabs(xtx[i] - s->xtx[i]) <= 1e-12 * s->mag_xtx[i],
                "X^T X[%zu] = %.17g, expected %.17g", i, xtx[i], s->xtx[i]);
    for (size_t i = 0; i < b; i++)
        REQUIRE(fabs(xtz[i] - s->xtz[i]) <= 1e-12 * s->mag_xtz[i],
                "X^T Z[%zu] = %.17g, expected %.17g", i, xtz[i], s->xtz[i]);
}

static void op_lin_create(reader *r, masa_context *ctx, lin_slot *s)
{
    lin_forget(s);
    int h1, h2;
    size_t d_in = dim(r, &h1), d_out = dim(r, &h2);
    int null_out = chance(r, 3), null_ctx = chance(r, 3);
    masa_linear_estimator *e = (masa_linear_estimator *)(uintptr_t)1;
    masa_status st = CALL(masa_linear_estimator_create(null_ctx ? NULL : ctx, d_in, d_out,
                                                       null_out ? NULL : &e));
    if (null_out || null_ctx) {
        REQUIRE(st == MASA_ERROR_NULL_ARGUMENT, "NULL accepted");
        REQUIRE(null_out || e == NULL, "failed create left *out set");
        return;
    }
    if (st != MASA_OK) {
        REQUIRE(e == NULL, "failed create left *out set");
        REQUIRE(d_in == 0 || d_out == 0 || h1 || h2 || st == MASA_ERROR_OUT_OF_MEMORY,
                "valid linear estimator shape %zu x %zu refused", d_in, d_out);
        return;
    }
    REQUIRE(d_in && d_out && !h1 && !h2, "shape %zu x %zu accepted", d_in, d_out);
    size_t sd_in = 0, sd_out = 0;
    REQUIRE(CALL(masa_linear_estimator_shape(e, &sd_in, &sd_out)) == MASA_OK &&
                sd_in == d_in && sd_out == d_out, "shape query");
    s->est = e;
    s->d_in = d_in;
    s->d_out = d_out;
    s->xtx = calloc(d_in * d_in, sizeof(double));
    s->mag_xtx = calloc(d_in * d_in, sizeof(double));
    s->xtz = calloc(d_in * d_out, sizeof(double));
    s->mag_xtz = calloc(d_in * d_out, sizeof(double));
    if (!s->xtx || !s->mag_xtx || !s->xtz || !s->mag_xtz)
        abort();
}

static void op_lin_accumulate(reader *r, lin_slot *s)
{
    if (!s->est) {
        REQUIRE(CALL(masa_linear_estimator_accumulate(NULL, 1, special, special, NULL)) ==
                    MASA_ERROR_NULL_ARGUMENT, "NULL est accepted");
        return;
    }
    size_t d_in = s->d_in, d_out = s->d_out;
    if (chance(r, 5)) { /* rows x width x 4 bytes overflows: refused before reading */
        size_t rows = SIZE_MAX / (4 * (d_in < d_out ? d_in : d_out)) + 1 + pick(r, 3);
        float *one = own(sizeof(float));
        masa_status st = CALL(masa_linear_estimator_accumulate(s->est, rows, one, one, NULL));
        REQUIRE(st == MASA_ERROR_OVERFLOW, "rows %zu not refused (%s)", rows,
                masa_status_string(st));
        lin_compare(s);
        return;
    }
    size_t rows = pick(r, 41);
    float *x, *z, *y;
    int finite, tame;
    make_batch(r, rows, d_in, d_out, &x, &z, &y, &finite, &tame);
    int null_x = rows && chance(r, 4), null_z = rows && chance(r, 4);
    masa_status st = CALL(masa_linear_estimator_accumulate(
        s->est, rows, null_x ? NULL : x, null_z ? NULL : z, y));
    if (null_x || null_z) {
        REQUIRE(st == MASA_ERROR_NULL_ARGUMENT, "NULL array accepted");
    } else if (!finite) {
        REQUIRE(st == MASA_ERROR_INVALID_ARGUMENT, "non-finite batch: %s",
                masa_status_string(st));
    } else {
        REQUIRE(st == MASA_OK, "valid batch refused");
        s->rows += rows;
        for (size_t k = 0; k < rows; k++) {
            const float *xr = x + k * d_in, *zr = z + k * d_out;
            const float *yr = y ? y + k * d_out : NULL;
            for (size_t i = 0; i < d_in; i++) {
                for (size_t j = 0; j < d_in; j++) {
                    double v = (double)xr[i] * xr[j];
                    s->xtx[i * d_in + j] += v;
                    s->mag_xtx[i * d_in + j] += fabs(v);
                }
                for (size_t j = 0; j < d_out; j++) {
                    double v = (double)xr[i] * ((double)zr[j] - (yr ? (double)yr[j] : 0.0));
                    s->xtz[i * d_out + j] += v;
                    s->mag_xtz[i * d_out + j] += fabs(v);
                }
            }
        }
    }
    lin_compare(s);
}

static void op_lin_merge(reader *r, lin_slot *lin)
{
    lin_slot *dst = &lin[pick(r, 3)], *src = &lin[pick(r, 3)];
    masa_linear_estimator *de = chance(r, 5) ? NULL : dst->est;
    masa_linear_estimator *se = chance(r, 5) ? NULL : src->est;
    masa_status st = CALL(masa_linear_estimator_merge(de, se));
    if (!de || !se) {
        REQUIRE(st == MASA_ERROR_NULL_ARGUMENT, "merge with NULL: %s", masa_status_string(st));
    } else if (de == se) {
        REQUIRE(st == MASA_ERROR_INVALID_ARGUMENT, "merge into itself: %s",
                masa_status_string(st));
    } else if (dst->d_in != src->d_in || dst->d_out != src->d_out) {
        REQUIRE(st == MASA_ERROR_BAD_SHAPE, "mismatched merge: %s", masa_status_string(st));
    } else {
        REQUIRE(st == MASA_OK, "valid merge refused");
        dst->rows += src->rows;
        for (size_t i = 0; i < dst->d_in * dst->d_in; i++) {
            dst->xtx[i] += src->xtx[i];
            dst->mag_xtx[i] += src->mag_xtx[i];
        }
        for (size_t i = 0; i < dst->d_in * dst->d_out; i++) {
            dst->xtz[i] += src->xtz[i];
            dst->mag_xtz[i] += src->mag_xtz[i];
        }
    }
    if (dst->est)
        lin_compare(dst);
    if (src->est)
        lin_compare(src);
}

static void op_lin_solve(reader *r, lin_slot *s)
{
    static const double alphas[] = {0.0, 1e-3, 1.0, 1e6, -1.0, -0.0, NAN, INFINITY};
    double alpha = alphas[pick(r, 8)];
    if (!s->est) {
        float t;
        REQUIRE(CALL(masa_linear_estimator_solve(NULL, alpha, &t)) == MASA_ERROR_NULL_ARGUMENT,
                "NULL est accepted");
        return;
    }
    size_t n = s->d_in * s->d_out;
    float *t = own(n * sizeof(float)), *before = own(n * sizeof(float));
    for (size_t i = 0; i < n; i++)
        t[i] = before[i] = 12345.0f + (float)i;
    int null_t = chance(r, 4);
    masa_status st = CALL(masa_linear_estimator_solve(s->est, alpha, null_t ? NULL : t));
    if (null_t) {
        REQUIRE(st == MASA_ERROR_NULL_ARGUMENT, "NULL t accepted");
    } else if (!(alpha >= 0.0) || !isfinite(alpha) || s->rows == 0) {
        REQUIRE(st == MASA_ERROR_INVALID_ARGUMENT, "bad alpha or no rows: %s",
                masa_status_string(st));
    } else if (st == MASA_OK) {
        for (size_t i = 0; i < n; i++)
            REQUIRE(isfinite(t[i]), "solve gave a non-finite T");
    } else {
        /* rank-deficient systems (alpha 0) and out-of-memory may fail */
        REQUIRE(st == MASA_ERROR_INVALID_ARGUMENT || st == MASA_ERROR_OUT_OF_MEMORY,
                "solve: %s", masa_status_string(st));
    }
    if (st != MASA_OK)
        REQUIRE(memcmp(t, before, n * sizeof(float)) == 0, "failed solve wrote t");
}

static void op_lin_query(reader *r, lin_slot *s)
{
    if (!s->est) {
        uint64_t rows;
        REQUIRE(CALL(masa_linear_estimator_rows(NULL, &rows)) == MASA_ERROR_NULL_ARGUMENT, "rows");
        REQUIRE(CALL(masa_linear_estimator_stats(NULL, NULL, NULL)) == MASA_ERROR_NULL_ARGUMENT,
                "stats");
        REQUIRE(CALL(masa_linear_estimator_reset(NULL)) == MASA_ERROR_NULL_ARGUMENT, "reset");
        REQUIRE(CALL(masa_linear_estimator_shape(NULL, NULL, NULL)) == MASA_ERROR_NULL_ARGUMENT,
                "shape");
        return;
    }
    REQUIRE(CALL(masa_linear_estimator_rows(s->est, NULL)) == MASA_ERROR_NULL_ARGUMENT, "rows");
    REQUIRE(CALL(masa_linear_estimator_stats(s->est, NULL, NULL)) == MASA_OK, "stats");
    if (chance(r, 30)) {
        REQUIRE(CALL(masa_linear_estimator_reset(s->est)) == MASA_OK, "reset");
        s->rows = 0;
        memset(s->xtx, 0, s->d_in * s->d_in * sizeof(double));
        memset(s->mag_xtx, 0, s->d_in * s->d_in * sizeof(double));
        memset(s->xtz, 0, s->d_in * s->d_out * sizeof(double));
        memset(s->mag_xtz, 0, s->d_in * s->d_out * sizeof(double));
    }
    lin_compare(s);
}

/* ---- cosine ---- */

static void cos_snapshot(const cos_slot *s, float *t)
{
    REQUIRE(CALL(masa_cosine_estimator_transform(s->est, t)) == MASA_OK, "transform");
}

static void cos_check_steps(const cos_slot *s)
{
    uint64_t steps = 0;
    REQUIRE(CALL(masa_cosine_estimator_steps(s->est, &steps)) == MASA_OK, "steps");
    REQUIRE(steps == s->steps, "steps %llu, expected %llu", (unsigned long long)steps,
            (unsigned long long)s->steps);
}

static void op_cos_create(reader *r, masa_context *ctx, cos_slot *s)
{
    masa_cosine_estimator_destroy(s->est);
    memset(s, 0, sizeof *s);
    int h1, h2;
    size_t d_in = dim(r, &h1), d_out = dim(r, &h2);
    masa_cosine_options o;
    masa_cosine_options_init(&o);
    int valid = 1;
    o.epochs = pick(r, 4);           /* 0 is invalid */
    o.batch_rows = pick(r, 12);      /* 0 is invalid */
    valid &= o.epochs > 0 && o.batch_rows > 0;
    static const float lrs[] = {1e-3f, 1e-2f, 0.5f, 0.0f, -1e-3f, NAN, INFINITY, 1e30f};
    static const float betas[] = {0.9f, 0.0f, 0.999f, 1.0f, -0.1f, NAN};
    static const float epss[] = {1e-8f, 1.0f, 0.0f, -1e-8f, NAN, INFINITY};
    o.learning_rate = lrs[pick(r, 8)];
    o.beta1 = betas[pick(r, 6)];
    o.beta2 = betas[pick(r, 6)];
    o.eps = epss[pick(r, 6)];
    o.seed = (uint64_t)u8(r) << 56 | u8(r);
    valid &= o.learning_rate > 0.0f && isfinite(o.learning_rate);
    valid &= o.beta1 >= 0.0f && o.beta1 < 1.0f && o.beta2 >= 0.0f && o.beta2 < 1.0f;
    valid &= o.eps > 0.0f && isfinite(o.eps);
    /* the struct's size: exact, larger with a zero or non-zero tail, smaller */
    size_t claim = sizeof o;
    int tail = 0;
    switch (pick(r, 10)) {
    case 0:
        claim = sizeof o + 8;
        break;
    case 1:
        claim = sizeof o + 1 + pick(r, 8);
        tail = 1;
        valid = 0;
        break;
    case 2:
        claim = sizeof(size_t) + pick(r, sizeof o - sizeof(size_t));
        valid = 0;
        break;
    }
    /* a buffer of exactly the claimed size (at least the size field) */
    unsigned char *buf = own(claim);
    memcpy(buf, &o, claim < sizeof o ? claim : sizeof o);
    memcpy(buf, &claim, sizeof claim);
    if (tail)
        buf[claim - 1] = 0x5A;
    const masa_cosine_options *arg = chance(r, 10) ? NULL : (const void *)buf;
    if (!arg) {
        valid = 1;
        o.epochs = 10;
        o.batch_rows = 1024;
    }
    masa_cosine_estimator *e = (masa_cosine_estimator *)(uintptr_t)1;
    masa_status st = CALL(masa_cosine_estimator_create(ctx, d_in, d_out, arg, &e));
    if (st != MASA_OK) {
        REQUIRE(e == NULL, "failed create left *out set");
        REQUIRE(!valid || d_in == 0 || d_out == 0 || h1 || h2 ||
                    st == MASA_ERROR_OUT_OF_MEMORY,
                "valid cosine estimator refused");
        return;
    }
    REQUIRE(valid && d_in && d_out && !h1 && !h2, "invalid cosine estimator accepted");
    s->est = e;
    s->d_in = d_in;
    s->d_out = d_out;
    s->epochs = o.epochs;
    s->batch_rows = o.batch_rows;
    s->learning_rate = arg ? o.learning_rate : 1e-4f;
    /* starts at I */
    float *t = own(d_in * d_out * sizeof(float));
    cos_snapshot(s, t);
    for (size_t i = 0; i < d_in; i++)
        for (size_t j = 0; j < d_out; j++)
            REQUIRE(t[i * d_out + j] == (i == j ? 1.0f : 0.0f), "T does not start at I");
}

static void op_cos_run(reader *r, cos_slot *s)
{
    unsigned what = pick(r, 3); /* loss, step, fit */
    if (!s->est) {
        double loss;
        REQUIRE(CALL(masa_cosine_estimator_loss(NULL, 1, special, special, NULL, &loss)) ==
                    MASA_ERROR_NULL_ARGUMENT, "NULL est");
        REQUIRE(CALL(masa_cosine_estimator_step(NULL, 1, special, special, NULL, NULL)) ==
                    MASA_ERROR_NULL_ARGUMENT, "NULL est");
        REQUIRE(CALL(masa_cosine_estimator_fit(NULL, 1, special, special, NULL, NULL)) ==
                    MASA_ERROR_NULL_ARGUMENT, "NULL est");
        return;
    }
    size_t d_in = s->d_in, d_out = s->d_out, n = d_in * d_out;
    size_t rows = pick(r, 41); /* 0 is a bad shape here */
    float *x, *z, *y;
    int finite, tame;
    make_batch(r, rows, d_in, d_out, &x, &z, &y, &finite, &tame);
    int null_x = rows && chance(r, 4);
    float *before = own(n * sizeof(float)), *after = own(n * sizeof(float));
    cos_snapshot(s, before);
    /* with tame inputs, a moderate T and learning rate nothing can overflow */
    float t_max = 0.0f;
    for (size_t i = 0; i < n; i++)
        t_max = fabsf(before[i]) > t_max ? fabsf(before[i]) : t_max;
    tame &= t_max < 1e20f && s->learning_rate <= 1.0f;
    double out = -7.0, *losses = own((s->epochs + 1) * sizeof(double));
    masa_status st;
    if (what == 0) {
        int null_loss = chance(r, 5);
        st = CALL(masa_cosine_estimator_loss(s->est, rows, null_x ? NULL : x, z, y,
                                             null_loss ? NULL : &out));
        if (!null_x && rows && finite && null_loss)
            REQUIRE(st == MASA_ERROR_NULL_ARGUMENT, "NULL loss accepted");
    } else if (what == 1) {
        st = CALL(masa_cosine_estimator_step(s->est, rows, null_x ? NULL : x, z, y, &out));
    } else {
        st = CALL(masa_cosine_estimator_fit(s->est, rows, null_x ? NULL : x, z, y, losses));
    }
    if (rows == 0)
        REQUIRE(st == MASA_ERROR_BAD_SHAPE, "rows 0: %s", masa_status_string(st));
    else if (null_x)
        REQUIRE(st == MASA_ERROR_NULL_ARGUMENT, "NULL x: %s", masa_status_string(st));
    else if (!finite)
        REQUIRE(st == MASA_ERROR_INVALID_ARGUMENT, "non-finite batch: %s",
                masa_status_string(st));
    else if (tame)
        REQUIRE(st == MASA_OK || st == MASA_ERROR_OUT_OF_MEMORY ||
                    (what == 0 && st == MASA_ERROR_NULL_ARGUMENT),
                "valid batch refused: %s", masa_status_string(st));
    cos_snapshot(s, after);
    if (st != MASA_OK) {
        REQUIRE(memcmp(before, after, n * sizeof(float)) == 0, "failed call changed T");
    } else {
        if (what == 1)
            s->steps += 1;
        else if (what == 2)
            s->steps += s->epochs * ((rows + s->batch_rows - 1) / s->batch_rows);
        for (size_t i = 0; i < n; i++)
            REQUIRE(isfinite(after[i]), "T[%zu] not finite after a successful call", i);
        if (what == 0)
            REQUIRE(out >= -1e-6 && out <= 2.0 + 1e-6, "loss %g outside [0, 2]", out);
        if (what == 0)
            REQUIRE(memcmp(before, after, n * sizeof(float)) == 0, "loss changed T");
    }
    cos_check_steps(s);
}

static void op_cos_set(reader *r, cos_slot *s)
{
    if (!s->est) {
        REQUIRE(CALL(masa_cosine_estimator_set_transform(NULL, special)) ==
                    MASA_ERROR_NULL_ARGUMENT, "NULL est");
        return;
    }
    size_t n = s->d_in * s->d_out;
    float *t = own(n * sizeof(float)), *before = own(n * sizeof(float));
    float *after = own(n * sizeof(float));
    int tame, finite = fill(r, t, n, &tame);
    cos_snapshot(s, before);
    int null_t = chance(r, 5);
    masa_status st = CALL(masa_cosine_estimator_set_transform(s->est, null_t ? NULL : t));
    cos_snapshot(s, after);
    if (null_t || !finite) {
        REQUIRE(st == (null_t ? MASA_ERROR_NULL_ARGUMENT : MASA_ERROR_INVALID_ARGUMENT),
                "set_transform: %s", masa_status_string(st));
        REQUIRE(memcmp(before, after, n * sizeof(float)) == 0, "failed set changed T");
    } else {
        REQUIRE(st == MASA_OK, "valid T refused");
        REQUIRE(memcmp(t, after, n * sizeof(float)) == 0, "T not set");
        s->steps = 0;
    }
    cos_check_steps(s);
}

/* ---- merge into a down projection ---- */

static void op_merge_map(reader *r, masa_context *ctx)
{
    int h1, h2;
    size_t d_ff = dim(r, &h1), d = dim(r, &h2);
    int layout = (int)pick(r, 5) - 1; /* -1, 2, 3 unknown */
    int valid = layout == MASA_MERGE_ROW_VECTOR || layout == MASA_MERGE_NN_LINEAR;
    if (h1 || h2) { /* products overflow: refused before any access */
        float *one = own(4 * sizeof(float));
        masa_status st = CALL(masa_merge_linear_map(ctx, layout, d_ff, d, one, NULL, one + 2));
        REQUIRE(st != MASA_OK, "overflowing merge accepted");
        return;
    }
    size_t nw = d_ff * d, nt = d * d;
    /* one buffer: w, then bias, then t, so overlaps can be made */
    float *buf = own((nw + d + nt) * sizeof(float));
    float *w = buf, *bias = buf + nw, *t = bias + d;
    int tw, tb, tt;
    fill(r, w, nw, &tw);
    fill(r, bias, d, &tb);
    int finite_t = fill(r, t, nt, &tt);
    int use_bias = chance(r, 50);
    unsigned overlap = pick(r, 12); /* 0: t starts inside w; 1: bias inside w */
    const float *targ = t;
    float *barg = use_bias ? bias : NULL;
    int overlapping = 0;
    if (overlap == 0 && d_ff * d > 1 && d) {
        targ = w + 1; /* t (d x d) overlaps w when nw > 1 */
        overlapping = 1;
    } else if (overlap == 1 && use_bias) {
        barg = w + (nw > d ? nw - d : 0) + (nw > 1);
        overlapping = barg < w + nw;
    }
    if (d == 0 || d_ff == 0)
        overlapping = 0;
    float *w_before = own((nw + d) * sizeof(float));
    memcpy(w_before, buf, (nw + d) * sizeof(float));
    int null_w = chance(r, 4), null_ctx = chance(r, 3);
    masa_status st = CALL(masa_merge_linear_map(null_ctx ? NULL : ctx, layout, d_ff, d,
                                                null_w ? NULL : w, barg, targ));
    int ok_args = valid && d && d_ff && !overlapping && finite_t && !null_w && !null_ctx;
    if (st != MASA_OK) {
        REQUIRE(memcmp(w_before, buf, (nw + d) * sizeof(float)) == 0,
                "failed merge changed w or bias");
        REQUIRE(!ok_args || st == MASA_ERROR_OUT_OF_MEMORY, "valid merge refused: %s",
                masa_status_string(st));
        return;
    }
    REQUIRE(ok_args, "invalid merge accepted");
    if (!tw || !tb || !tt)
        return;
    /* float64 reference: row-vector w (d_ff x d) <- w T; nn.Linear w (d x
     * d_ff) <- T^T w; bias <- bias T */
    for (size_t a = 0; a < d_ff; a++)
        for (size_t c = 0; c < d; c++) {
            double ref = 0.0, mag = 0.0;
            for (size_t k = 0; k < d; k++) {
                double v = layout == MASA_MERGE_ROW_VECTOR
                               ? (double)w_before[a * d + k] * t[k * d + c]
                               : (double)t[k * d + c] * w_before[k * d_ff + a];
                ref += v;
                mag += fabs(v);
            }
            float got = layout == MASA_MERGE_ROW_VECTOR ? w[a * d + c] : w[c * d_ff + a];
            REQUIRE(fabs(got - ref) <= 1e-5 * mag + 1e-30, "merged w differs: %g vs %g",
                    got, ref);
        }
    if (barg)
        for (size_t c = 0; c < d; c++) {
            double ref = 0.0, mag = 0.0;
            for (size_t k = 0; k < d; k++) {
                double v = (double)w_before[nw + k] * t[k * d + c];
                ref += v;
                mag += fabs(v);
            }
            REQUIRE(fabs(bias[c] - ref) <= 1e-5 * mag + 1e-30, "merged bias differs");
        }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    reader rd = {data, size}, *r = &rd;
    masa_context *ctx = shared_ctx[pick(r, 4) == 3];
    masa_context *own_ctx = NULL;
    if (chance(r, 20)) { /* its own context with a failing allocator */
        masa_context_options o;
        masa_context_options_init(&o);
        o.n_threads = 1;
        o.malloc_fn = hook_malloc;
        o.free_fn = hook_free;
        o.alloc_user = &hook;
        hook.count = 0;
        hook.live = 0;
        hook.fail_at = (long)pick(r, 24);
        long keep = hook.fail_at;
        hook.fail_at = -1;
        if (masa_context_create(&o, &own_ctx) != MASA_OK)
            abort();
        hook.count = 0;
        hook.fail_at = keep;
        ctx = own_ctx;
    }
    lin_slot lin[3];
    cos_slot cos[2];
    memset(lin, 0, sizeof lin);
    memset(cos, 0, sizeof cos);
    for (int op = 0; op < 24 && rd.n > 0; op++) {
        unsigned code = pick(r, 10);
        TRACE("op %d: %u\n", op, code);
        switch (code) {
        case 0: op_lin_create(r, ctx, &lin[pick(r, 3)]); break;
        case 1:
        case 2: op_lin_accumulate(r, &lin[pick(r, 3)]); break;
        case 3: op_lin_merge(r, lin); break;
        case 4: op_lin_solve(r, &lin[pick(r, 3)]); break;
        case 5: op_lin_query(r, &lin[pick(r, 3)]); break;
        case 6: op_cos_create(r, ctx, &cos[pick(r, 2)]); break;
        case 7: op_cos_run(r, &cos[pick(r, 2)]); break;
        case 8: op_cos_set(r, &cos[pick(r, 2)]); break;
        default: op_merge_map(r, ctx); break;
        }
        free_blocks();
    }
    for (int i = 0; i < 3; i++)
        lin_forget(&lin[i]);
    for (int i = 0; i < 2; i++)
        masa_cosine_estimator_destroy(cos[i].est);
    if (own_ctx) {
        masa_context_destroy(own_ctx);
        REQUIRE(hook.live == 0, "%ld blocks from the allocator hook leaked", hook.live);
    }
    free_blocks();
    return 0;
}
