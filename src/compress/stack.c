/* Column-block passes over a stack of matrices (see stack.h). */
#include <stdatomic.h>
#include <string.h>

#include "compress/linalg.h"
#include "compress/stack.h"

size_t masa__stack_block_cols(size_t n_mats)
{
    size_t cols = ((size_t)65536 / n_mats) & ~(size_t)7;
    return cols < 64 ? 64 : cols;
}

typedef struct stack_job {
    size_t n_mats, n_cols, block_cols, n_blocks, n_tasks;
    const float *const *mats;
    bool check_finite;
    masa_stack_fn fn;
    void *arg;
    double *scratch; /* per thread: n_mats * block_cols */
    atomic_size_t first_bad; /* lowest matrix index with a non-finite value */
} stack_job;

static void stack_task(void *arg, size_t task, size_t thread)
{
    stack_job *j = arg;
    size_t b0 = j->n_blocks * task / j->n_tasks;
    size_t b1 = j->n_blocks * (task + 1) / j->n_tasks;
    double *block = j->scratch + thread * j->n_mats * j->block_cols;
    for (size_t b = b0; b < b1; b++) {
        size_t col0 = b * j->block_cols;
        size_t n = j->n_cols - col0 < j->block_cols ? j->n_cols - col0
                                                    : j->block_cols;
        for (size_t l = 0; l < j->n_mats; l++) {
            const float *src = j->mats[l] + col0;
            double *dst = block + l * n;
            /* one pass: convert, and count non-finite values (every
             * exponent bit set) with integer operations that vectorise */
            uint32_t bad = 0;
            for (size_t i = 0; i < n; i++) {
                uint32_t bits;
                memcpy(&bits, src + i, sizeof bits);
                bad |= (uint32_t)((bits & 0x7f800000u) == 0x7f800000u);
                dst[i] = (double)src[i];
            }
            if (j->check_finite && bad) {
                size_t cur = atomic_load(&j->first_bad);
                while (l < cur &&
                       !atomic_compare_exchange_weak(&j->first_bad, &cur, l))
                    ;
            }
        }
        if (atomic_load(&j->first_bad) != SIZE_MAX)
            return; /* the result is thrown away anyway */
        j->fn(j->arg, thread, col0, n, block);
    }
}

masa_status masa__stack_pass(const char *fn_name, masa_context *ctx,
                             size_t n_mats, size_t n_cols,
                             const float *const *mats, bool check_finite,
                             masa_stack_fn fn, void *arg)
{
    stack_job j = {.n_mats = n_mats, .n_cols = n_cols, .mats = mats,
                   .check_finite = check_finite, .fn = fn, .arg = arg};
    atomic_init(&j.first_bad, SIZE_MAX);
    j.block_cols = masa__stack_block_cols(n_mats);
    j.n_blocks = (n_cols + j.block_cols - 1) / j.block_cols;
    size_t threads = ctx->n_threads ? ctx->n_threads : 1;
    /* a few tasks per thread so uneven progress balances */
    j.n_tasks = threads * 4 < j.n_blocks ? threads * 4 : j.n_blocks;
    size_t per_thread, total;
    if (!masa__mul(n_mats, j.block_cols, &per_thread) ||
        !masa__mul(per_thread, threads, &total))
        return masa__fail(MASA_ERROR_OVERFLOW, "%s: scratch size overflows",
                          fn_name);
    j.scratch = masa__calloc(ctx, total, sizeof(double));
    if (!j.scratch)
        return masa__fail(MASA_ERROR_OUT_OF_MEMORY,
                          "%s: cannot allocate %zu doubles of scratch",
                          fn_name, total);
    masa__pool_run(ctx->pool, j.n_tasks, stack_task, &j);
    masa__free(ctx, j.scratch);
    size_t bad = atomic_load(&j.first_bad);
    if (bad != SIZE_MAX)
        return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                          "%s: matrix %zu has a non-finite element", fn_name,
                          bad);
    return MASA_OK;
}

masa_status masa__check_stack(const char *fn_name, const masa_context *ctx,
                              size_t n_mats, size_t rows, size_t cols,
                              const float *const *mats, size_t *n_cols)
{
    if (!ctx)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT, "%s: ctx is NULL",
                          fn_name);
    if (!mats)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT, "%s: mats is NULL",
                          fn_name);
    if (n_mats == 0 || rows == 0 || cols == 0)
        return masa__fail(MASA_ERROR_BAD_SHAPE,
                          "%s: n_mats, rows and cols must be nonzero (got "
                          "%zu, %zu, %zu)", fn_name, n_mats, rows, cols);
    for (size_t i = 0; i < n_mats; i++)
        if (!mats[i])
            return masa__fail(MASA_ERROR_NULL_ARGUMENT,
                              "%s: mats[%zu] is NULL", fn_name, i);
    size_t total;
    if (!masa__mul3(n_mats, rows, cols, &total) ||
        !masa__mul(total, sizeof(double), &total))
        return masa__fail(MASA_ERROR_OVERFLOW,
                          "%s: %zu matrices of %zu x %zu overflow size_t",
                          fn_name, n_mats, rows, cols);
    *n_cols = rows * cols;
    return MASA_OK;
}
