/* ReplaceMe least squares: X^T X and X^T (target - offset) accumulated in
 * float64 from float32 row batches (the solve: replaceme_solve.c, apart
 * because blis.h and lapacke.h declare LAPACK's lsame_ differently). */
#include <string.h>

#include <blis.h>

#include "compress/replaceme_internal.h"

/* Rows converted to float64 per dgemm: the k of each product. BLIS packs k
 * in panels of a few hundred, so a block of this many rows keeps the dgemm
 * near its full rate while the block buffer stays a few MB. */
#define ACC_BLOCK_ROWS 512

MASA_API masa_status masa_linear_estimator_create(masa_context *ctx,
                                                  size_t d_in, size_t d_out,
                                                  masa_linear_estimator **out)
{
    static const char fn[] = "masa_linear_estimator_create";
    masa__clear_error();
    if (out)
        *out = NULL;
    if (!ctx || !out)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT, "%s: %s is NULL", fn,
                          !ctx ? "ctx" : "out");
    if (d_in == 0 || d_out == 0)
        return masa__fail(MASA_ERROR_BAD_SHAPE,
                          "%s: d_in (%zu) and d_out (%zu) must be >= 1", fn,
                          d_in, d_out);
    size_t width = d_in, n_stats, n_block;
    if (!masa__add(&width, d_out) || !masa__mul3(d_in, width, sizeof(double),
                                                 &n_stats) ||
        !masa__mul3(ACC_BLOCK_ROWS, width, sizeof(double), &n_block))
        return masa__fail(MASA_ERROR_OVERFLOW, "%s: d_in (%zu) x d_out (%zu) "
                          "overflows", fn, d_in, d_out);
    masa__blis_init();
    masa_linear_estimator *est = masa__calloc(ctx, 1, sizeof *est);
    double *stats = est ? masa__calloc(ctx, 1, n_stats) : NULL;
    double *block = stats ? masa__alloc(ctx, n_block) : NULL;
    if (!block) {
        masa__free(ctx, stats);
        masa__free(ctx, est);
        return masa__fail(MASA_ERROR_OUT_OF_MEMORY,
                          "%s: cannot allocate %zu bytes of statistics", fn,
                          n_stats + n_block);
    }
    est->ctx = ctx;
    est->d_in = d_in;
    est->d_out = d_out;
    est->width = width;
    est->stats = stats;
    est->block = block;
    *out = est;
    return MASA_OK;
}

MASA_API void masa_linear_estimator_destroy(masa_linear_estimator *est)
{
    if (!est)
        return;
    masa__free(est->ctx, est->block);
    masa__free(est->ctx, est->stats);
    masa__free(est->ctx, est);
}

MASA_API masa_status masa_linear_estimator_shape(
    const masa_linear_estimator *est, size_t *d_in, size_t *d_out)
{
    masa__clear_error();
    if (!est)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT,
                          "masa_linear_estimator_shape: est is NULL");
    if (d_in)
        *d_in = est->d_in;
    if (d_out)
        *d_out = est->d_out;
    return MASA_OK;
}

/* stats[:, c0:c1] += block[:k, :d_in]^T block[:k, c0:c1] on one BLIS thread:
 * one pool task per block of columns (see masa__gemm_pool for why not
 * BLIS's own threads). */
typedef struct acc_job {
    masa_linear_estimator *est;
    size_t k, tasks;
} acc_job;

static void acc_task(void *arg, size_t task, size_t thread)
{
    (void)thread;
    const acc_job *j = arg;
    masa_linear_estimator *e = j->est;
    /* column edges on multiples of 16 (whole BLIS micro-tiles) */
    size_t units = (e->width + 15) / 16;
    size_t c0 = units * task / j->tasks * 16;
    size_t c1 = units * (task + 1) / j->tasks * 16;
    if (c1 > e->width)
        c1 = e->width;
    if (c0 >= c1)
        return;
    double one = 1.0;
    rntm_t rntm = BLIS_RNTM_INITIALIZER;
    bli_rntm_set_num_threads(1, &rntm);
    /* the small-matrix path reads past its operands (see blis_glue.c) */
    bli_rntm_disable_l3_sup(&rntm);
    bli_dgemm_ex(BLIS_TRANSPOSE, BLIS_NO_TRANSPOSE, (dim_t)e->d_in,
                 (dim_t)(c1 - c0), (dim_t)j->k, &one, e->block,
                 (inc_t)e->width, 1, e->block + c0, (inc_t)e->width, 1, &one,
                 e->stats + c0, (inc_t)e->width, 1, NULL, &rntm);
}

MASA_API masa_status masa_linear_estimator_accumulate(
    masa_linear_estimator *est, size_t rows, const float *x,
    const float *target, const float *offset)
{
    static const char fn[] = "masa_linear_estimator_accumulate";
    masa__clear_error();
    if (!est)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT, "%s: est is NULL", fn);
    masa_status st = masa__replaceme_check_rows(fn, rows, est->d_in,
                                                est->d_out, x, target, offset);
    if (st != MASA_OK)
        return st;
    if (est->rows > UINT64_MAX - rows)
        return masa__fail(MASA_ERROR_OVERFLOW, "%s: row count overflows", fn);

    size_t d_in = est->d_in, d_out = est->d_out, w = est->width;
    masa_context *ctx = est->ctx;
    acc_job job = {est, 0, ctx->n_threads};
    /* at least 64 columns per task: thinner ones pack the shared operand
     * more often than they save */
    if (job.tasks > w / 64)
        job.tasks = w / 64 ? w / 64 : 1;
    for (size_t r0 = 0; r0 < rows; r0 += ACC_BLOCK_ROWS) {
        size_t k = rows - r0 < ACC_BLOCK_ROWS ? rows - r0 : ACC_BLOCK_ROWS;
        for (size_t r = 0; r < k; r++) {
            const float *xr = x + (r0 + r) * d_in;
            const float *tr = target + (r0 + r) * d_out;
            double *br = est->block + r * w;
            for (size_t c = 0; c < d_in; c++)
                br[c] = xr[c];
            if (offset) {
                const float *or = offset + (r0 + r) * d_out;
                for (size_t c = 0; c < d_out; c++)
                    br[d_in + c] = (double)tr[c] - (double)or[c];
            } else {
                for (size_t c = 0; c < d_out; c++)
                    br[d_in + c] = tr[c];
            }
        }
        job.k = k;
        if (job.tasks > 1)
            masa__pool_run(ctx->pool, job.tasks, acc_task, &job);
        else
            acc_task(&job, 0, 0);
    }
    est->rows += rows;
    return MASA_OK;
}

MASA_API masa_status masa_linear_estimator_merge(
    masa_linear_estimator *dst, const masa_linear_estimator *src)
{
    static const char fn[] = "masa_linear_estimator_merge";
    masa__clear_error();
    if (!dst || !src)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT, "%s: %s is NULL", fn,
                          !dst ? "dst" : "src");
    if (dst == src)
        return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                          "%s: dst and src are the same estimator", fn);
    if (dst->d_in != src->d_in || dst->d_out != src->d_out)
        return masa__fail(MASA_ERROR_BAD_SHAPE,
                          "%s: dst is %zu x %zu, src is %zu x %zu", fn,
                          dst->d_in, dst->d_out, src->d_in, src->d_out);
    if (dst->rows > UINT64_MAX - src->rows)
        return masa__fail(MASA_ERROR_OVERFLOW, "%s: row count overflows", fn);
    size_t n = dst->d_in * dst->width;
    for (size_t i = 0; i < n; i++)
        dst->stats[i] += src->stats[i];
    dst->rows += src->rows;
    return MASA_OK;
}

MASA_API masa_status masa_linear_estimator_reset(masa_linear_estimator *est)
{
    masa__clear_error();
    if (!est)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT,
                          "masa_linear_estimator_reset: est is NULL");
    memset(est->stats, 0, est->d_in * est->width * sizeof(double));
    est->rows = 0;
    return MASA_OK;
}

MASA_API masa_status masa_linear_estimator_rows(
    const masa_linear_estimator *est, uint64_t *rows)
{
    masa__clear_error();
    if (!est || !rows)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT,
                          "masa_linear_estimator_rows: %s is NULL",
                          !est ? "est" : "rows");
    *rows = est->rows;
    return MASA_OK;
}

MASA_API masa_status masa_linear_estimator_stats(
    const masa_linear_estimator *est, double *xtx, double *xtz)
{
    masa__clear_error();
    if (!est)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT,
                          "masa_linear_estimator_stats: est is NULL");
    for (size_t i = 0; i < est->d_in; i++) {
        const double *row = est->stats + i * est->width;
        if (xtx)
            memcpy(xtx + i * est->d_in, row, est->d_in * sizeof(double));
        if (xtz)
            memcpy(xtz + i * est->d_out, row + est->d_in,
                   est->d_out * sizeof(double));
    }
    return MASA_OK;
}
