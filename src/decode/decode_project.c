/* Projections of a decode step (a few rows per call).
 *
 * A MASA projection y = x W_l with W_l = sum_s c_s D_s can run two ways:
 *   factored: y = sum_s c_s (x D_s) = [c_1 x | ... | c_S x] R, one product
 *             with the atoms viewed as R, an (S d_in) x d_out matrix (rows
 *             (s, i); the dictionary layout already is R). It reads the atoms
 *             once and never writes W_l, but does S times the multiply-adds.
 *   compose:  W_l = sum_s c_s D_s first (reads the atoms, writes W_l), then
 *             x W_l (reads W_l again).
 * masa__decode_proj_path() picks the one that moves fewer bytes, counting a
 * multiply-add as one byte (BLIS does about 25e9 multiply-adds/s per core
 * here against 15-45 GB/s of cache or memory bandwidth). One row is a BLIS
 * gemv, which reads its matrix once; more rows are a gemm, which also packs
 * its matrix (reads it, writes a packed copy, reads that). So with
 * 2 <= S < about d_out atoms the factored path wins for a single row (batch
 * 1, one token) and composition wins from two rows up (measured by benchmarks/bench_decode.c,
 * second table); with S = 1 the factored path is a scaled x D_1 and wins up
 * to about 2 d_out rows.
 *
 * The products run on the context's pool, one pass for Q, K and V together,
 * never on BLIS's own threads: BLIS does not thread gemv, and its threads
 * wait for each other in spin barriers, which on a loaded machine (a thread
 * descheduled) made a 512-token prefill 7x slower with 2 threads than with
 * one (measured here). A product of few rows is split along its inner
 * dimension, each thread reading a contiguous block of the weight, and the
 * blocks' partial sums are added afterwards; a product of many rows is split
 * by rows. Work too small to repay waking the pool (about 10 us) runs on the
 * calling thread.
 *
 * A low-rank term A B runs as (x A) B: it reads A and B, rank (d_in + d_out)
 * floats, instead of adding to a d_in x d_out weight (few rows: thin
 * products always move fewer bytes). x A runs in the same pass as the base
 * products, then (x A) B adds to their outputs in a second pass. A cached
 * MASA weight already holds A B and is read alone. */
#include <string.h>

#include "common/internal.h"

/* Products of at least this many rows are split by rows (no partial
 * sums); fewer rows split the inner dimension. */
#define ROW_SPLIT_MIN_ROWS 16
/* Below this much work in one call, everything runs on the calling thread. */
#define POOL_MIN_MACS 131072.0
/* Products below this are not split (a block per thread). */
#define SPLIT_MIN_MACS 262144.0

/* Bytes moved plus multiply-adds of each path at r rows, with f bytes per
 * float and g = 1 for a gemv (r = 1), 3 for a packing gemm:
 *   factored(r) = f (g S K N + 2 r S K + r N) + r S K N
 *   compose(r)  = f (S K N + K N + g K N + r K + r N) + (S + r) K N
 * (X' is written and read; W_l is written once and read by the product). */
static double path_cost(const masa_proj_state *ps, double r, bool factored)
{
    double S = (double)ps->dict->n_atoms, K = (double)ps->d_in;
    double N = (double)ps->d_out, f = sizeof(float), g = r > 1 ? 3 : 1;
    if (factored)
        return f * (g * S * K * N + 2 * r * S * K + r * N) + r * S * K * N;
    return f * (S * K * N + K * N + g * K * N + r * K + r * N) +
           (S + r) * K * N;
}

/* The factored path is the cheaper one for rows 1..factored_max_rows(). From
 * r = 2 on, factored - compose grows linearly in r, so the crossover is
 *   r* = K N (S + 4 f - 2 f S) / (K N (S - 1) + f K (2 S - 1)). */
static size_t factored_max_rows(const masa_proj_state *ps)
{
    if (path_cost(ps, 1, true) > path_cost(ps, 1, false))
        return 0;
    double S = (double)ps->dict->n_atoms, K = (double)ps->d_in;
    double N = (double)ps->d_out, f = sizeof(float);
    double r = K * N * (S + 4 * f - 2 * f * S) /
               (K * N * (S - 1) + f * K * (2 * S - 1));
    if (!(r >= 2))
        return 1;
    return r < 1e15 ? (size_t)r : (size_t)1e15;
}

masa_proj_path masa__decode_proj_path(const masa_layer *layer, int p,
                                      size_t rows)
{
    const masa_proj_state *ps = &layer->proj[p];
    if (!ps->set)
        return MASA_PATH_NONE;
    if (!ps->is_masa)
        return MASA_PATH_DENSE;
    /* A composed cache (MASA_WEIGHTS_CACHED) reads only d_in x d_out
     * floats, fewer than either path; masa__projection_weight() returns it. */
    if (ps->composed_cache)
        return MASA_PATH_COMPOSE;
    return rows <= factored_max_rows(ps) ? MASA_PATH_FACTORED
                                         : MASA_PATH_COMPOSE;
}

/* Rank of the term run as (x A) B, 0 when there is none or a composed cache
 * holds it. */
static size_t thin_rank(const masa_proj_state *ps)
{
    return ps->is_masa && ps->composed_cache ? 0 : ps->rank;
}

/* The largest operand scratch any row count up to `rows` needs, so a
 * workspace sized for n_new tokens serves every smaller n_new. */
static size_t operand_floats(const masa_layer *layer, int p, size_t rows)
{
    const masa_proj_state *ps = &layer->proj[p];
    if (!ps->is_masa)
        return 0;
    size_t r_max = factored_max_rows(ps);
    size_t fr = rows < r_max ? rows : r_max, xs;
    if (!masa__mul3(fr, ps->dict->n_atoms, ps->d_in, &xs))
        return SIZE_MAX;
    /* d_in * d_out was checked when the layer was created */
    size_t w = rows > r_max ? ps->d_in * ps->d_out : 0;
    return xs > w ? xs : w;
}

/* Operand scratch, then x A (rows * rank floats) right after it: the
 * operand part of fewer rows is never larger, so the sum fits. Sized for
 * any rank, cached or not: the size does not depend on the policy. */
size_t masa__decode_proj_scratch(const masa_layer *layer, int p, size_t rows)
{
    size_t op = operand_floats(layer, p, rows), xa;
    if (op == SIZE_MAX || !masa__mul(rows, layer->proj[p].rank, &xa) ||
        !masa__add(&op, xa))
        return SIZE_MAX;
    return op;
}

/* The base product's partial sums (d_out per row and block), then those of
 * x A (rank per row and block), which runs in the same pass; (x A) B runs
 * later and reuses the first part. */
size_t masa__decode_proj_partials(const masa_layer *layer, int p,
                                  size_t rows)
{
    /* inner-dimension blocks only below ROW_SPLIT_MIN_ROWS rows */
    size_t r = rows < ROW_SPLIT_MIN_ROWS ? rows : ROW_SPLIT_MIN_ROWS - 1, n;
    size_t width = layer->proj[p].d_out;
    if (!masa__add(&width, layer->proj[p].rank) ||
        !masa__mul3(layer->ctx->n_threads - 1, r, width, &n))
        return SIZE_MAX;
    return n;
}

/* One product: out[rows x n] = a[rows x k] (row stride lda) b[k x n]
 * + beta out. */
typedef struct product {
    const float *a, *b;
    size_t k, n, lda;
    float beta;      /* 0 or 1 */
    size_t chunks;   /* blocks: of the inner dimension, or of the rows */
    bool by_rows;
    float *out, *partials;
} product;

typedef struct project_job {
    product prod[2 * MASA_NUM_PROJECTIONS]; /* base products and x A */
    size_t n_prod, rows;
} project_job;

/* Block `chunk` of a product (chunks <= k or rows: never empty). Rows
 * blocks write their own rows of out; inner blocks after the first write
 * partial sums. */
static void run_block(const product *pr, size_t rows, size_t chunk)
{
    if (pr->by_rows) {
        size_t r0 = rows * chunk / pr->chunks;
        size_t r1 = rows * (chunk + 1) / pr->chunks;
        masa__gemm(r1 - r0, pr->n, pr->k, 1.0f, pr->a + r0 * pr->lda,
                   pr->lda, 1, pr->b, pr->n, 1, pr->beta,
                   pr->out + r0 * pr->n, pr->n, 1, 1);
        return;
    }
    size_t k0 = pr->k * chunk / pr->chunks;
    size_t k1 = pr->k * (chunk + 1) / pr->chunks;
    float *out = chunk == 0 ? pr->out
                            : pr->partials + (chunk - 1) * rows * pr->n;
    float beta = chunk == 0 ? pr->beta : 0.0f;
    const float *a = pr->a + k0, *b = pr->b + k0 * pr->n;
    if (rows == 1)
        masa__gemv(pr->n, k1 - k0, 1.0f, b, 1, pr->n, a, beta, out, 1);
    else
        masa__gemm(rows, pr->n, k1 - k0, 1.0f, a, pr->lda, 1, b, pr->n, 1,
                   beta, out, pr->n, 1, 1);
}

static void block_task(void *arg, size_t task, size_t thread)
{
    (void)thread;
    project_job *job = arg;
    size_t i = 0;
    while (task >= job->prod[i].chunks)
        task -= job->prod[i++].chunks;
    run_block(&job->prod[i], job->rows, task);
}

/* X' = [c_1 X | ... | c_S X], rows x (S d_in). */
static void factored_input(const masa_proj_state *ps, const float *x,
                           size_t rows, float *xs)
{
    size_t S = ps->dict->n_atoms, K = ps->d_in;
    const float *c = ps->coef->data + ps->layer_index * ps->coef->n_atoms;
    for (size_t r = 0; r < rows; r++)
        for (size_t s = 0; s < S; s++) {
            float *dst = xs + (r * S + s) * K;
            const float *src = x + r * K;
            for (size_t i = 0; i < K; i++)
                dst[i] = c[s] * src[i];
        }
}

/* Splits the job's products across the pool (or not), runs them and adds
 * the inner blocks' partial sums. */
static void run_job(const masa_layer *layer, project_job *job)
{
    size_t T = layer->ctx->n_threads, rows = job->rows, tasks = 0;
    double macs[2 * MASA_NUM_PROJECTIONS], total_macs = 0;
    for (size_t i = 0; i < job->n_prod; i++) {
        product *pr = &job->prod[i];
        macs[i] = (double)rows * (double)pr->k * (double)pr->n;
        pr->chunks = 1;
        total_macs += macs[i];
    }
    bool pool = T > 1 && total_macs >= POOL_MIN_MACS;
    for (size_t i = 0; i < job->n_prod; i++) {
        product *pr = &job->prod[i];
        if (pool && macs[i] >= SPLIT_MIN_MACS) {
            if (rows >= ROW_SPLIT_MIN_ROWS) {
                /* blocks of rows, a few per thread so a thread the OS
                 * delays leaves its share to the others */
                size_t want = 4 * T, most = rows / (ROW_SPLIT_MIN_ROWS / 2);
                pr->chunks = want < most ? want : most;
                pr->by_rows = true;
            } else {
                pr->chunks = T < pr->k ? T : pr->k;
            }
        }
        tasks += pr->chunks;
    }
    if (pool)
        masa__pool_run(layer->ctx->pool, tasks, block_task, job);
    else
        for (size_t t = 0; t < tasks; t++)
            block_task(job, t, 0);
    for (size_t i = 0; i < job->n_prod; i++) {
        const product *pr = &job->prod[i];
        size_t len = rows * pr->n;
        for (size_t c = 1; !pr->by_rows && c < pr->chunks; c++) {
            const float *part = pr->partials + (c - 1) * len;
            for (size_t j = 0; j < len; j++)
                pr->out[j] += part[j];
        }
    }
}

void masa__decode_project(const masa_layer *layer, masa_decode_proj *projs,
                          size_t n, size_t rows)
{
    size_t T = layer->ctx->n_threads;
    project_job job = {.rows = rows}, second = {.rows = rows};
    /* rows of the partial sums (inner-dimension blocks run below
     * ROW_SPLIT_MIN_ROWS rows only) */
    size_t split_rows = rows < ROW_SPLIT_MIN_ROWS ? rows
                                                  : ROW_SPLIT_MIN_ROWS - 1;
    for (size_t i = 0; i < n; i++) {
        int p = projs[i].p;
        const masa_proj_state *ps = &layer->proj[p];
        masa_proj_path path = masa__decode_proj_path(layer, p, rows);
        if (path != MASA_PATH_NONE) {
            product *pr = &job.prod[job.n_prod++];
            *pr = (product){.a = projs[i].in, .b = ps->weight, .k = ps->d_in,
                            .n = ps->d_out, .lda = ps->d_in,
                            .out = projs[i].out,
                            .partials = projs[i].partials};
            if (path == MASA_PATH_FACTORED) {
                factored_input(ps, projs[i].in, rows, projs[i].scratch);
                pr->a = projs[i].scratch;
                pr->b = ps->dict->atoms;
                pr->k = ps->d_in * ps->dict->n_atoms;
                pr->lda = pr->k;
            } else if (path == MASA_PATH_COMPOSE) {
                pr->b = masa__projection_weight(layer, p, projs[i].scratch);
            }
        }
        size_t r = thin_rank(ps);
        if (r == 0)
            continue;
        /* x A after the operand scratch, its partial sums after the base
         * product's (see masa__decode_proj_scratch and _partials) */
        float *xa = projs[i].scratch + operand_floats(layer, p, rows);
        job.prod[job.n_prod++] = (product){
            .a = projs[i].in, .b = ps->lowrank_a, .k = ps->d_in, .n = r,
            .lda = ps->d_in, .out = xa,
            .partials = projs[i].partials + (T - 1) * split_rows * ps->d_out};
        second.prod[second.n_prod++] = (product){
            .a = xa, .b = ps->lowrank_b, .k = r, .n = ps->d_out, .lda = r,
            .beta = path == MASA_PATH_NONE ? 0.0f : 1.0f,
            .out = projs[i].out, .partials = projs[i].partials};
    }
    run_job(layer, &job);
    if (second.n_prod)
        run_job(layer, &second);
    for (size_t i = 0; i < n; i++) {
        const masa_proj_state *ps = &layer->proj[projs[i].p];
        if (ps->bias)
            for (size_t r = 0; r < rows; r++)
                for (size_t j = 0; j < ps->d_out; j++)
                    projs[i].out[r * ps->d_out + j] += ps->bias[j];
    }
}
