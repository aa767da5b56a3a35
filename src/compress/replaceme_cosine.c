/* ReplaceMe cosine estimator: Adam on 1 - mean cos(offset + X T, target)
 * from T = I, in PyTorch's formulation of Adam. */
#include <string.h>

#include "compress/replaceme_internal.h"

struct masa_cosine_estimator {
    masa_context *ctx;
    size_t d_in, d_out;
    masa_cosine_options opt;
    float *t, *m1, *m2; /* T and Adam's first and second moments */
    uint64_t steps;
};

static masa_cosine_options cosine_defaults(void)
{
    masa_cosine_options o;
    memset(&o, 0, sizeof o);
    o.size = sizeof o;
    o.epochs = 10;
    o.batch_rows = 1024;
    o.learning_rate = 1e-4f;
    o.beta1 = 0.9f;
    o.beta2 = 0.999f;
    o.eps = 1e-8f;
    o.seed = 0;
    return o;
}

MASA_API void masa_cosine_options_default(masa_cosine_options *options,
                                          size_t size)
{
    masa_cosine_options d = cosine_defaults();
    masa__struct_defaults(options, size, &d, sizeof d);
}

static masa_status check_options(const char *fn, const masa_cosine_options *o)
{
    masa_status st = masa__check_struct_size(fn, o, o->size, sizeof *o);
    if (st != MASA_OK)
        return st;
    if (o->epochs == 0 || o->batch_rows == 0)
        return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                          "%s: epochs (%zu) and batch_rows (%zu) must be >= 1",
                          fn, o->epochs, o->batch_rows);
    if (!(o->learning_rate > 0.0f) || !isfinite(o->learning_rate) ||
        !(o->eps > 0.0f) || !isfinite(o->eps))
        return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                          "%s: learning_rate (%g) and eps (%g) must be finite "
                          "and > 0", fn, o->learning_rate, o->eps);
    if (!(o->beta1 >= 0.0f && o->beta1 < 1.0f) ||
        !(o->beta2 >= 0.0f && o->beta2 < 1.0f))
        return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                          "%s: beta1 (%g) and beta2 (%g) must be in [0, 1)",
                          fn, o->beta1, o->beta2);
    return MASA_OK;
}

static void set_identity(float *t, size_t d_in, size_t d_out)
{
    memset(t, 0, d_in * d_out * sizeof(float));
    for (size_t i = 0; i < d_in && i < d_out; i++)
        t[i * d_out + i] = 1.0f;
}

MASA_API masa_status masa_cosine_estimator_create(
    masa_context *ctx, size_t d_in, size_t d_out,
    const masa_cosine_options *options, masa_cosine_estimator **out)
{
    static const char fn[] = "masa_cosine_estimator_create";
    masa__clear_error();
    if (out)
        *out = NULL;
    if (!ctx || !out)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT, "%s: %s is NULL", fn,
                          !ctx ? "ctx" : "out");
    masa_cosine_options opt = cosine_defaults();
    if (options) {
        masa_status st = check_options(fn, options);
        if (st != MASA_OK)
            return st;
        memcpy(&opt, options, sizeof opt);
        opt.size = sizeof opt;
    }
    if (d_in == 0 || d_out == 0)
        return masa__fail(MASA_ERROR_BAD_SHAPE,
                          "%s: d_in (%zu) and d_out (%zu) must be >= 1", fn,
                          d_in, d_out);
    size_t bytes;
    if (!masa__mul3(d_in, d_out, 3 * sizeof(float), &bytes))
        return masa__fail(MASA_ERROR_OVERFLOW, "%s: d_in (%zu) x d_out (%zu) "
                          "overflows", fn, d_in, d_out);
    masa__blis_init();
    masa_cosine_estimator *est = masa__calloc(ctx, 1, sizeof *est);
    float *mem = est ? masa__calloc(ctx, 1, bytes) : NULL;
    if (!mem) {
        masa__free(ctx, est);
        return masa__fail(MASA_ERROR_OUT_OF_MEMORY,
                          "%s: cannot allocate %zu bytes", fn, bytes);
    }
    est->ctx = ctx;
    est->d_in = d_in;
    est->d_out = d_out;
    est->opt = opt;
    est->t = mem;
    est->m1 = mem + d_in * d_out;
    est->m2 = mem + 2 * d_in * d_out;
    set_identity(est->t, d_in, d_out);
    *out = est;
    return MASA_OK;
}

MASA_API void masa_cosine_estimator_destroy(masa_cosine_estimator *est)
{
    if (!est)
        return;
    masa__free(est->ctx, est->t); /* t, m1, m2: one allocation */
    masa__free(est->ctx, est);
}

MASA_API masa_status masa_cosine_estimator_transform(
    const masa_cosine_estimator *est, float *t)
{
    masa__clear_error();
    if (!est || !t)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT,
                          "masa_cosine_estimator_transform: %s is NULL",
                          !est ? "est" : "t");
    memcpy(t, est->t, est->d_in * est->d_out * sizeof(float));
    return MASA_OK;
}

MASA_API masa_status masa_cosine_estimator_set_transform(
    masa_cosine_estimator *est, const float *t)
{
    static const char fn[] = "masa_cosine_estimator_set_transform";
    masa__clear_error();
    if (!est || !t)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT, "%s: %s is NULL", fn,
                          !est ? "est" : "t");
    size_t n = est->d_in * est->d_out;
    if (!masa__replaceme_finite(t, n))
        return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                          "%s: t holds a NaN or infinity", fn);
    memcpy(est->t, t, n * sizeof(float));
    memset(est->m1, 0, 2 * n * sizeof(float)); /* m1 and m2 */
    est->steps = 0;
    return MASA_OK;
}

MASA_API masa_status masa_cosine_estimator_steps(
    const masa_cosine_estimator *est, uint64_t *steps)
{
    masa__clear_error();
    if (!est || !steps)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT,
                          "masa_cosine_estimator_steps: %s is NULL",
                          !est ? "est" : "steps");
    *steps = est->steps;
    return MASA_OK;
}

/* Scratch of one batch: p (rows x d_out, becomes G in place) and the
 * gradient (d_in x d_out). */
typedef struct batch_scratch {
    float *p, *grad;
    size_t rows; /* capacity */
} batch_scratch;

static masa_status scratch_alloc(const char *fn, const masa_cosine_estimator *e,
                                 size_t rows, bool with_grad,
                                 batch_scratch *s)
{
    size_t np, ng = 0;
    if (!masa__mul3(rows, e->d_out, sizeof(float), &np))
        return masa__fail(MASA_ERROR_OVERFLOW, "%s: rows (%zu) overflows", fn,
                          rows);
    if (with_grad)
        ng = e->d_in * e->d_out * sizeof(float);
    s->rows = rows;
    s->p = masa__alloc(e->ctx, np);
    s->grad = s->p && with_grad ? masa__alloc(e->ctx, ng) : NULL;
    if (!s->p || (with_grad && !s->grad)) {
        masa__free(e->ctx, s->p);
        return masa__fail(MASA_ERROR_OUT_OF_MEMORY,
                          "%s: cannot allocate %zu bytes of scratch", fn,
                          np + ng);
    }
    return MASA_OK;
}

static void scratch_free(const masa_cosine_estimator *e, batch_scratch *s)
{
    masa__free(e->ctx, s->grad);
    masa__free(e->ctx, s->p);
}

/* The loss of a batch for the current T; with s->grad, also its gradient
 * with respect to T. Inputs already checked. */
static double batch_loss(const masa_cosine_estimator *e, size_t rows,
                         const float *x, const float *target,
                         const float *offset, batch_scratch *s)
{
    size_t d_in = e->d_in, d_out = e->d_out;
    masa_context *ctx = e->ctx;
    float *p = s->p;
    float beta = 0.0f;
    if (offset) {
        memcpy(p, offset, rows * d_out * sizeof(float));
        beta = 1.0f;
    }
    /* p = offset + x T */
    masa__gemm_pool(ctx->pool, ctx->n_threads, rows, d_out, d_in, 1.0f, x,
                    d_in, 1, e->t, d_out, 1, beta, p, d_out, 1);
    double cos_sum = 0.0;
    for (size_t r = 0; r < rows; r++) {
        float *pr = p + r * d_out;
        const float *tr = target + r * d_out;
        double pp = 0.0, tt = 0.0, pt = 0.0;
        for (size_t c = 0; c < d_out; c++) {
            pp += (double)pr[c] * pr[c];
            tt += (double)tr[c] * tr[c];
            pt += (double)pr[c] * tr[c];
        }
        if (pp == 0.0 || tt == 0.0) {
            memset(pr, 0, d_out * sizeof(float)); /* cos 0, no gradient */
            continue;
        }
        double np = sqrt(pp), nt = sqrt(tt), cos = pt / (np * nt);
        cos_sum += cos;
        /* G_r = d(-cos_r / rows) / dp_r */
        double a = -1.0 / ((double)rows * np * nt);
        double b = cos / ((double)rows * pp);
        for (size_t c = 0; c < d_out; c++)
            pr[c] = (float)(a * tr[c] + b * pr[c]);
    }
    if (s->grad) /* grad = x^T G */
        masa__gemm_pool(ctx->pool, ctx->n_threads, d_in, d_out, rows, 1.0f,
                        x, 1, d_in, p, d_out, 1, 0.0f, s->grad, d_out, 1);
    return 1.0 - cos_sum / (double)rows;
}

/* Adam's update of T from g (torch.optim.Adam's single-tensor form). The
 * new T is computed twice: a first pass only checks that every entry stays
 * finite (a huge learning rate could overflow float32), so a refused step
 * changes nothing. Returns false when refused. */
static bool adam_update(masa_cosine_estimator *e, const float *g)
{
    const masa_cosine_options *o = &e->opt;
    double k = (double)(e->steps + 1);
    float step_size = (float)(o->learning_rate / (1.0 - pow(o->beta1, k)));
    float bc2_sqrt = (float)sqrt(1.0 - pow(o->beta2, k));
    float b1 = o->beta1, b2 = o->beta2, eps = o->eps;
    size_t n = e->d_in * e->d_out;
    float acc = 0.0f; /* x - x is 0 for finite x, NaN otherwise */
    for (size_t i = 0; i < n; i++) {
        float m = e->m1[i] + (1.0f - b1) * (g[i] - e->m1[i]);
        float v = b2 * e->m2[i] + (1.0f - b2) * g[i] * g[i];
        float t = e->t[i] - step_size * m / (sqrtf(v) / bc2_sqrt + eps);
        acc += t - t;
    }
    if (acc != 0.0f)
        return false;
    for (size_t i = 0; i < n; i++) {
        float m = e->m1[i] + (1.0f - b1) * (g[i] - e->m1[i]);
        float v = b2 * e->m2[i] + (1.0f - b2) * g[i] * g[i];
        e->m1[i] = m;
        e->m2[i] = v;
        e->t[i] -= step_size * m / (sqrtf(v) / bc2_sqrt + eps);
    }
    e->steps++;
    return true;
}

/* One step on a batch whose loss and gradient batch_loss just computed:
 * refused (INVALID_ARGUMENT, nothing changed) when the loss or gradient
 * overflowed float32 or the update would. */
static masa_status checked_step(const char *fn, masa_cosine_estimator *e,
                                double loss, const batch_scratch *s)
{
    if (!isfinite(loss) ||
        !masa__replaceme_finite(s->grad, e->d_in * e->d_out))
        return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                          "%s: the batch's cosine or gradient is not finite "
                          "(x T overflows float32: scale the inputs down)", fn);
    if (!adam_update(e, s->grad))
        return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                          "%s: the step would make T non-finite (learning "
                          "rate %g too large)", fn, e->opt.learning_rate);
    return MASA_OK;
}

static masa_status check_batch(const char *fn, const masa_cosine_estimator *e,
                               size_t rows, const float *x,
                               const float *target, const float *offset)
{
    if (!e)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT, "%s: est is NULL", fn);
    if (rows == 0)
        return masa__fail(MASA_ERROR_BAD_SHAPE, "%s: rows is 0", fn);
    return masa__replaceme_check_rows(fn, rows, e->d_in, e->d_out, x, target,
                                      offset);
}

MASA_API masa_status masa_cosine_estimator_loss(
    const masa_cosine_estimator *est, size_t rows, const float *x,
    const float *target, const float *offset, double *loss)
{
    static const char fn[] = "masa_cosine_estimator_loss";
    masa__clear_error();
    masa_status st = check_batch(fn, est, rows, x, target, offset);
    if (st != MASA_OK)
        return st;
    if (!loss)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT, "%s: loss is NULL", fn);
    batch_scratch s;
    st = scratch_alloc(fn, est, rows, false, &s);
    if (st != MASA_OK)
        return st;
    double value = batch_loss(est, rows, x, target, offset, &s);
    scratch_free(est, &s);
    if (!isfinite(value))
        return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                          "%s: the cosine is not finite (x T overflows "
                          "float32: scale the inputs down)", fn);
    *loss = value;
    return MASA_OK;
}

MASA_API masa_status masa_cosine_estimator_step(
    masa_cosine_estimator *est, size_t rows, const float *x,
    const float *target, const float *offset, double *loss_before)
{
    static const char fn[] = "masa_cosine_estimator_step";
    masa__clear_error();
    masa_status st = check_batch(fn, est, rows, x, target, offset);
    if (st != MASA_OK)
        return st;
    batch_scratch s;
    st = scratch_alloc(fn, est, rows, true, &s);
    if (st != MASA_OK)
        return st;
    double loss = batch_loss(est, rows, x, target, offset, &s);
    st = checked_step(fn, est, loss, &s);
    scratch_free(est, &s);
    if (st == MASA_OK && loss_before)
        *loss_before = loss;
    return st;
}

static uint64_t splitmix64(uint64_t *s)
{
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Copies the rows order[0..n) of src (width floats each) to dst. */
static void gather(float *dst, const float *src, const size_t *order,
                   size_t n, size_t width)
{
    for (size_t i = 0; i < n; i++)
        memcpy(dst + i * width, src + order[i] * width,
               width * sizeof(float));
}

MASA_API masa_status masa_cosine_estimator_fit(
    masa_cosine_estimator *est, size_t rows, const float *x,
    const float *target, const float *offset, double *epoch_loss)
{
    static const char fn[] = "masa_cosine_estimator_fit";
    masa__clear_error();
    masa_status st = check_batch(fn, est, rows, x, target, offset);
    if (st != MASA_OK)
        return st;
    const masa_cosine_options *o = &est->opt;
    size_t batch = o->batch_rows < rows ? o->batch_rows : rows;
    size_t d_in = est->d_in, d_out = est->d_out;
    masa_context *ctx = est->ctx;

    /* the permutation, and the gathered batch: x, target, offset */
    /* ... and a copy of T and Adam's moments, restored if a step is
     * refused part-way (see checked_step) */
    size_t n_order, n_gather, n_saved = 3 * d_in * d_out * sizeof(float);
    if (!masa__mul(rows, sizeof(size_t), &n_order) ||
        !masa__mul3(batch, d_in + 2 * d_out, sizeof(float), &n_gather))
        return masa__fail(MASA_ERROR_OVERFLOW, "%s: rows (%zu) overflows", fn,
                          rows);
    batch_scratch s;
    st = scratch_alloc(fn, est, batch, true, &s);
    if (st != MASA_OK)
        return st;
    size_t *order = masa__alloc(ctx, n_order);
    float *xb = order ? masa__alloc(ctx, n_gather) : NULL;
    float *saved = xb ? masa__alloc(ctx, n_saved) : NULL;
    if (!saved) {
        masa__free(ctx, xb);
        masa__free(ctx, order);
        scratch_free(est, &s);
        return masa__fail(MASA_ERROR_OUT_OF_MEMORY,
                          "%s: cannot allocate %zu bytes", fn,
                          n_order + n_gather + n_saved);
    }
    memcpy(saved, est->t, n_saved); /* t, m1, m2: one allocation */
    uint64_t saved_steps = est->steps;
    float *tb = xb + batch * d_in, *ob = tb + batch * d_out;
    for (size_t i = 0; i < rows; i++)
        order[i] = i;
    uint64_t rng = o->seed;
    for (size_t epoch = 0; epoch < o->epochs; epoch++) {
        for (size_t i = rows - 1; i > 0; i--) {
            size_t j = (size_t)(splitmix64(&rng) % (uint64_t)(i + 1));
            size_t tmp = order[i];
            order[i] = order[j];
            order[j] = tmp;
        }
        double loss_sum = 0.0;
        size_t n_batches = 0;
        for (size_t b0 = 0; b0 < rows; b0 += batch) {
            size_t n = rows - b0 < batch ? rows - b0 : batch;
            gather(xb, x, order + b0, n, d_in);
            gather(tb, target, order + b0, n, d_out);
            if (offset)
                gather(ob, offset, order + b0, n, d_out);
            double loss = batch_loss(est, n, xb, tb, offset ? ob : NULL, &s);
            st = checked_step(fn, est, loss, &s);
            if (st != MASA_OK)
                goto done;
            loss_sum += loss;
            n_batches++;
        }
        if (epoch_loss)
            epoch_loss[epoch] = loss_sum / (double)n_batches;
    }
done:
    if (st != MASA_OK) {
        memcpy(est->t, saved, n_saved);
        est->steps = saved_steps;
    }
    masa__free(ctx, saved);
    masa__free(ctx, xb);
    masa__free(ctx, order);
    scratch_free(est, &s);
    return st;
}
