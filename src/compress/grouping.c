/* Grouping planner: consecutive layer groups and atoms per group that
 * minimise the exact Matrix PCA error under a parameter budget (see
 * compress.h). The error of keeping S atoms for a segment of layers is the
 * sum of its Gram sub-block's dropped eigenvalues; a plan's parameters and
 * error are sums over its groups, so a dynamic program over the cut
 * positions is exact when each position keeps the Pareto front of
 * (parameters, error) of the plans covering the layers before it. */
#include <stdlib.h>
#include <string.h>

#include "compress/gram.h"
#include "compress/linalg.h"

/* Layers the planner accepts (compress.h): L^2 / 2 eigenproblems of up to
 * L x L and a table of about L^3 / 6 segment errors. */
#define MAX_PLAN_LAYERS 256

MASA_API void masa_group_plan_result_default(masa_group_plan_result *result,
                                             size_t size)
{
    masa_group_plan_result full = {.size = sizeof full};
    masa__struct_defaults(result, size, &full, sizeof full);
}

/* A plan covering layers [0, pos): its last group [prev_pos, pos) has
 * `atoms` atoms and extends label prev_idx of position prev_pos. */
typedef struct plan_label {
    size_t params;
    double err;
    uint32_t prev_pos, prev_idx, atoms;
} plan_label;

typedef struct front {
    plan_label *labels;
    size_t n, cap, pruned_n; /* pruned_n: size after the last pruning */
} front;

typedef struct planner {
    const char *fn;
    masa_context *ctx;
    size_t n_layers, n_cols, budget;
    const double *gram;
    /* errors: for segment [i, j) and S in 1..j-i at err[seg[i][j] + S-1];
     * seg[i * (L+1) + j] == SIZE_MAX for segments not considered */
    size_t *seg;
    double *err;
    front *fronts;
} planner;

static int label_order(const void *pa, const void *pb)
{
    const plan_label *a = pa, *b = pb;
    if (a->params != b->params)
        return a->params < b->params ? -1 : 1;
    return (a->err > b->err) - (a->err < b->err);
}

/* Sorts by parameters and keeps the labels whose error is below that of
 * every cheaper one. */
static void prune(front *f)
{
    if (f->n == 0)
        return;
    qsort(f->labels, f->n, sizeof *f->labels, label_order);
    size_t kept = 1;
    for (size_t i = 1; i < f->n; i++)
        if (f->labels[i].err < f->labels[kept - 1].err)
            f->labels[kept++] = f->labels[i];
    f->n = kept;
    f->pruned_n = kept;
}

static masa_status push(planner *p, front *f, plan_label label)
{
    if (f->n == f->cap) {
        /* dominated labels go first; grow only when the front itself is
         * that large */
        if (f->n > 2 * f->pruned_n + 64)
            prune(f);
        if (f->n == f->cap) {
            size_t cap = f->cap ? 2 * f->cap : 64;
            plan_label *grown = masa__calloc(p->ctx, cap, sizeof *grown);
            if (!grown)
                return masa__fail(MASA_ERROR_OUT_OF_MEMORY,
                                  "%s: cannot allocate %zu plan labels",
                                  p->fn, cap);
            if (f->n)
                memcpy(grown, f->labels, f->n * sizeof *grown);
            masa__free(p->ctx, f->labels);
            f->labels = grown;
            f->cap = cap;
        }
    }
    f->labels[f->n++] = label;
    return MASA_OK;
}

/* The dropped-eigenvalue sums of every segment marked in p->seg. */
static masa_status segment_errors(planner *p)
{
    size_t L = p->n_layers;
    double *a = masa__calloc(p->ctx, L * L + L, sizeof(double));
    if (!a)
        return masa__fail(MASA_ERROR_OUT_OF_MEMORY,
                          "%s: cannot allocate the eigenproblem", p->fn);
    double *w = a + L * L;
    masa_status st = MASA_OK;
    for (size_t i = 0; i < L && st == MASA_OK; i++)
        for (size_t j = i + 1; j <= L && st == MASA_OK; j++) {
            size_t off = p->seg[i * (L + 1) + j];
            if (off == SIZE_MAX)
                continue;
            size_t n = j - i;
            for (size_t r = 0; r < n; r++)
                memcpy(a + r * n, p->gram + (i + r) * L + i,
                       n * sizeof(double));
            st = masa__syevd(p->fn, p->ctx, false, n, a, n, w);
            /* err(S) = sum_{k >= S} max(w_k, 0), S = 1..n */
            double tail = 0.0;
            for (size_t s = n; st == MASA_OK && s >= 1; s--) {
                p->err[off + s - 1] = tail;
                tail += w[s - 1] > 0.0 ? w[s - 1] : 0.0;
            }
        }
    masa__free(p->ctx, a);
    return st;
}

/* Runs the dynamic program; *best is a label of the cheapest plan with the
 * smallest error covering all layers (the budget was checked feasible). */
static masa_status solve(planner *p, const plan_label **best)
{
    size_t L = p->n_layers;
    masa_status st = push(p, &p->fronts[0],
                          (plan_label){0, 0.0, 0, 0, 0});
    for (size_t i = 0; i < L && st == MASA_OK; i++) {
        front *from = &p->fronts[i];
        prune(from);
        for (size_t j = i + 1; j <= L && st == MASA_OK; j++) {
            size_t off = p->seg[i * (L + 1) + j];
            if (off == SIZE_MAX)
                continue;
            size_t len = j - i;
            for (size_t s = 1; s <= len && st == MASA_OK; s++) {
                size_t cost = s * (p->n_cols + len); /* checked: no overflow */
                for (size_t k = 0; k < from->n && st == MASA_OK; k++) {
                    const plan_label *lb = &from->labels[k];
                    if (lb->params > p->budget ||
                        cost > p->budget - lb->params)
                        break; /* sorted by params: the rest cost more */
                    st = push(p, &p->fronts[j],
                              (plan_label){lb->params + cost,
                                           lb->err + p->err[off + s - 1],
                                           (uint32_t)i, (uint32_t)k,
                                           (uint32_t)s});
                }
            }
        }
    }
    if (st != MASA_OK)
        return st;
    front *last = &p->fronts[L];
    prune(last);
    if (last->n == 0)
        return masa__fail(MASA_ERROR_INTERNAL,
                          "%s: no plan within the budget", p->fn);
    *best = &last->labels[last->n - 1];
    return MASA_OK;
}

typedef struct plan_args {
    size_t n_layers, rows, cols, budget;
    const double *gram;
    size_t n_fixed;             /* 0: the planner chooses the cuts */
    const size_t *fixed_starts;
} plan_args;

static masa_status plan(const char *fn, masa_context *ctx,
                        const plan_args *in, size_t *group_starts,
                        size_t *group_atoms, size_t capacity,
                        masa_group_plan_result *result)
{
    size_t L = in->n_layers;
    if (!ctx || !in->gram || !group_atoms || !result ||
        (!in->n_fixed && !group_starts) || (in->n_fixed && !in->fixed_starts))
        return masa__fail(MASA_ERROR_NULL_ARGUMENT,
                          "%s: ctx, gram, the group arrays and result must "
                          "not be NULL", fn);
    if (L == 0 || in->rows == 0 || in->cols == 0)
        return masa__fail(MASA_ERROR_BAD_SHAPE,
                          "%s: n_layers, rows and cols must be nonzero", fn);
    if (L > MAX_PLAN_LAYERS)
        return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                          "%s: n_layers (%zu) above the planner's limit %d",
                          fn, L, MAX_PLAN_LAYERS);
    masa_status st = masa__check_result_size(fn, result->size,
                                             sizeof(masa_group_plan_result));
    if (st != MASA_OK)
        return st;
    size_t n_cols, most, n_groups = in->n_fixed;
    (void)most;
    /* the most parameters any plan has: L atoms of N + L each */
    size_t per_atom = 0;
    if (!masa__mul(in->rows, in->cols, &n_cols) ||
        (per_atom = n_cols, !masa__add(&per_atom, L)) ||
        !masa__mul(L, per_atom, &most))
        return masa__fail(MASA_ERROR_OVERFLOW,
                          "%s: parameter counts overflow size_t", fn);
    if (n_groups) {
        if (n_groups > L || in->fixed_starts[0] != 0)
            return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                              "%s: group_starts must begin with 0 and hold "
                              "at most n_layers (%zu) groups", fn, L);
        for (size_t g = 1; g < n_groups; g++)
            if (in->fixed_starts[g] <= in->fixed_starts[g - 1] ||
                in->fixed_starts[g] >= L)
                return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                                  "%s: group_starts[%zu] = %zu is not above "
                                  "the previous start and below n_layers",
                                  fn, g, in->fixed_starts[g]);
    }
    /* the cheapest plan: one atom per group */
    size_t groups_min = n_groups ? n_groups : 1;
    size_t cheapest = groups_min * n_cols + L;
    if (in->budget < cheapest)
        return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                          "%s: budget %zu is below the cheapest plan (%zu "
                          "parameters: one atom per group)", fn, in->budget,
                          cheapest);
    st = masa__check_gram(fn, L, in->gram, L);
    if (st != MASA_OK)
        return st;

    planner p = {fn, ctx, L, n_cols, in->budget, in->gram, NULL, NULL, NULL};
    size_t n_seg = (L + 1) * (L + 1);
    p.seg = masa__alloc(ctx, n_seg * sizeof(size_t));
    p.fronts = masa__calloc(ctx, L + 1, sizeof(front));
    size_t err_count = 0;
    if (p.seg && p.fronts) {
        for (size_t i = 0; i < n_seg; i++)
            p.seg[i] = SIZE_MAX;
        for (size_t i = 0; i < L; i++)
            for (size_t j = i + 1; j <= L; j++) {
                bool allowed = true;
                if (n_groups) {
                    /* only [start_g, start_(g+1)) */
                    allowed = false;
                    for (size_t g = 0; g < n_groups; g++) {
                        size_t end = g + 1 < n_groups ? in->fixed_starts[g + 1]
                                                      : L;
                        if (in->fixed_starts[g] == i && end == j)
                            allowed = true;
                    }
                }
                if (allowed) {
                    p.seg[i * (L + 1) + j] = err_count;
                    err_count += j - i;
                }
            }
        p.err = masa__calloc(ctx, err_count, sizeof(double));
    }
    const plan_label *best = NULL;
    if (!p.seg || !p.fronts || !p.err)
        st = masa__fail(MASA_ERROR_OUT_OF_MEMORY,
                        "%s: cannot allocate the planner's tables", fn);
    if (st == MASA_OK)
        st = segment_errors(&p);
    if (st == MASA_OK)
        st = solve(&p, &best);
    /* walk back to the root label (position 0, no atoms) */
    size_t count = 0;
    if (st == MASA_OK) {
        for (const plan_label *lb = best; lb->atoms != 0;
             lb = &p.fronts[lb->prev_pos].labels[lb->prev_idx])
            count++;
        size_t room = n_groups ? n_groups : capacity;
        if (count > room)
            st = masa__fail(MASA_ERROR_BUFFER_TOO_SMALL,
                            "%s: the plan has %zu groups, the arrays hold "
                            "%zu", fn, count, room);
    }
    if (st == MASA_OK) {
        size_t g = count;
        for (const plan_label *lb = best; lb->atoms != 0;
             lb = &p.fronts[lb->prev_pos].labels[lb->prev_idx]) {
            g--;
            if (!n_groups)
                group_starts[g] = lb->prev_pos;
            group_atoms[g] = lb->atoms;
        }
        double trace = 0.0;
        for (size_t i = 0; i < L; i++)
            trace += in->gram[i * L + i];
        masa_group_plan_result full = {sizeof full, count, best->params,
                                       best->err, trace};
        masa__write_result(result, &full, sizeof full);
    }
    for (size_t i = 0; p.fronts && i <= L; i++)
        masa__free(ctx, p.fronts[i].labels);
    masa__free(ctx, p.fronts);
    masa__free(ctx, p.seg);
    masa__free(ctx, p.err);
    return st;
}

MASA_API masa_status masa_group_plan(masa_context *ctx, size_t n_layers,
                                     const double *gram, size_t rows,
                                     size_t cols, size_t budget,
                                     size_t *group_starts,
                                     size_t *group_atoms, size_t capacity,
                                     masa_group_plan_result *result)
{
    plan_args in = {n_layers, rows, cols, budget, gram, 0, NULL};
    return plan("masa_group_plan", ctx, &in, group_starts, group_atoms,
                capacity, result);
}

MASA_API masa_status masa_group_plan_fixed(masa_context *ctx, size_t n_layers,
                                           const double *gram, size_t rows,
                                           size_t cols, size_t budget,
                                           size_t n_groups,
                                           const size_t *group_starts,
                                           size_t *group_atoms,
                                           masa_group_plan_result *result)
{
    static const char fn[] = "masa_group_plan_fixed";
    if (n_groups == 0)
        return masa__fail(MASA_ERROR_BAD_SHAPE, "%s: n_groups is 0", fn);
    plan_args in = {n_layers, rows, cols, budget, gram, n_groups,
                    group_starts};
    return plan(fn, ctx, &in, NULL, group_atoms, n_groups, result);
}
