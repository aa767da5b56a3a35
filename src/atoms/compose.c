/* Composition W_l = sum_s c[l, s] D_s and the atom gradients of backward,
 * each one pass over the atoms.
 *
 * Both are memory-bound (a multiply-add per float read). Composition sums
 * sixteen columns of W over all S atoms in registers and writes them once;
 * backward works on tiles small enough for G's and W's tile to stay in L1
 * while the S atom tiles stream past. Contiguous ranges of tiles are spread
 * over the context's pool: each atom element is read from memory once, by
 * one thread. */
#include <string.h>

#include "common/internal.h"

/* Floats per tile: G's and W's tiles stay in L1 (32 KiB) while S atom
 * tiles stream through. */
#define TILE 2048
/* Atoms per call of the backward tile kernel (their dots on the stack). */
#define GRAD_GROUP 64
/* Floats per pool task (a few tasks per thread balance a thread the OS
 * delays); smaller work runs on the calling thread, where waking the pool
 * (about 10 us) would cost more than it saves. */
#define TASK_FLOATS 65536

static size_t min_size(size_t a, size_t b)
{
    return a < b ? a : b;
}

/* Number of tasks for n floats: 1 for small n. */
static size_t task_count(size_t n, const masa_pool *pool)
{
    if (!pool)
        return 1;
    return (n + TASK_FLOATS - 1) / TASK_FLOATS;
}

/* The tile kernels are compiled three times, for AVX-512, for AVX2 with FMA
 * and for the baseline x86-64 (SSE2) the library is built for, and chosen
 * at run time: composition is memory-bound only when each float read costs
 * well under a cycle, which SSE2 does not reach (measured here: the SSE2
 * build of the loop below ran at half the speed of BLIS's AVX2 gemv). The
 * loops work on sixteen floats, one AVX-512 register. */
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define HAVE_AVX2_DISPATCH 1
#define ALWAYS_INLINE static inline __attribute__((always_inline))
#define TARGET_AVX2 __attribute__((target("avx2,fma")))
#define TARGET_AVX512                                                         \
    __attribute__((target("avx512f,avx2,fma,prefer-vector-width=512")))
#else
#define HAVE_AVX2_DISPATCH 0
#define ALWAYS_INLINE static inline
#endif

/* w[0..len) = sum_s c[s] d_s[0..len), atom s at d + s * stride. Sixteen
 * columns at a time are summed over every atom in registers and W is
 * written once. */
ALWAYS_INLINE void compose_body(const float *d, size_t stride, size_t S,
                                const float *c, float *w, size_t len)
{
    size_t j = 0;
    for (; j + 16 <= len; j += 16) {
        float acc[16];
        for (int k = 0; k < 16; k++)
            acc[k] = c[0] * d[j + k];
        for (size_t s = 1; s < S; s++) {
            const float *ds = d + s * stride + j;
            float cs = c[s];
            for (int k = 0; k < 16; k++)
                acc[k] += cs * ds[k];
        }
        for (int k = 0; k < 16; k++)
            w[j + k] = acc[k];
    }
    for (; j < len; j++) {
        float acc = c[0] * d[j];
        for (size_t s = 1; s < S; s++)
            acc += c[s] * d[s * stride + j];
        w[j] = acc;
    }
}

/* <a, b> over len floats, in sixteen lanes the compiler can vectorise (a
 * plain float sum would stay serial without -ffast-math). */
ALWAYS_INLINE float dot_body(const float *a, const float *b, size_t len)
{
    float lane[16] = {0};
    size_t j = 0;
    for (; j + 16 <= len; j += 16)
        for (int k = 0; k < 16; k++)
            lane[k] += a[j + k] * b[j + k];
    float sum = 0.0f;
    for (; j < len; j++)
        sum += a[j] * b[j];
    for (int k = 0; k < 16; k++)
        sum += lane[k];
    return sum;
}

/* One tile of the backward pass: dots[s] = <D_s, G>, dD_s (+)= c_s G and
 * (w not NULL) W = sum_s c_s D_s (w_first: starting from zero, else
 * added to W), reading each atom tile once while the
 * tiles of G and W stay in L1. */
ALWAYS_INLINE void grad_body(const float *d, size_t stride, size_t S,
                             const float *c, const float *g, float *dd,
                             bool add, float *w, bool w_first, float *dots,
                             size_t len)
{
    for (size_t s = 0; s < S; s++) {
        const float *ds = d + s * stride;
        float cs = c[s];
        if (dots)
            dots[s] = dot_body(ds, g, len);
        if (w && w_first && s == 0)
            for (size_t j = 0; j < len; j++)
                w[j] = cs * ds[j];
        else if (w)
            for (size_t j = 0; j < len; j++)
                w[j] += cs * ds[j];
        if (!dd)
            continue;
        float *dds = dd + s * stride;
        if (add)
            for (size_t j = 0; j < len; j++)
                dds[j] += cs * g[j];
        else
            for (size_t j = 0; j < len; j++)
                dds[j] = cs * g[j];
    }
}

static void compose_base(const float *d, size_t stride, size_t S,
                         const float *c, float *w, size_t len)
{
    compose_body(d, stride, S, c, w, len);
}

static void grad_base(const float *d, size_t stride, size_t S,
                      const float *c, const float *g, float *dd, bool add,
                      float *w, bool w_first, float *dots, size_t len)
{
    grad_body(d, stride, S, c, g, dd, add, w, w_first, dots, len);
}

#if HAVE_AVX2_DISPATCH
TARGET_AVX2 static void compose_avx2(const float *d, size_t stride,
                                     size_t S, const float *c, float *w,
                                     size_t len)
{
    compose_body(d, stride, S, c, w, len);
}

TARGET_AVX2 static void grad_avx2(const float *d, size_t stride, size_t S,
                                  const float *c, const float *g, float *dd,
                                  bool add, float *w, bool w_first,
                                  float *dots, size_t len)
{
    grad_body(d, stride, S, c, g, dd, add, w, w_first, dots, len);
}

TARGET_AVX512 static void compose_avx512(const float *d, size_t stride,
                                         size_t S, const float *c, float *w,
                                         size_t len)
{
    compose_body(d, stride, S, c, w, len);
}

TARGET_AVX512 static void grad_avx512(const float *d, size_t stride,
                                      size_t S, const float *c,
                                      const float *g, float *dd, bool add,
                                      float *w, bool w_first, float *dots,
                                      size_t len)
{
    grad_body(d, stride, S, c, g, dd, add, w, w_first, dots, len);
}
#endif

typedef void (*compose_fn)(const float *, size_t, size_t, const float *,
                           float *, size_t);
typedef void (*grad_fn)(const float *, size_t, size_t, const float *,
                        const float *, float *, bool, float *, bool, float *,
                        size_t);

static compose_fn compose_kernel(void)
{
#if HAVE_AVX2_DISPATCH
    if (masa__cpu_has_avx512())
        return compose_avx512;
    if (masa__cpu_has_avx2_fma())
        return compose_avx2;
#endif
    return compose_base;
}

static grad_fn grad_kernel(void)
{
#if HAVE_AVX2_DISPATCH
    if (masa__cpu_has_avx512())
        return grad_avx512;
    if (masa__cpu_has_avx2_fma())
        return grad_avx2;
#endif
    return grad_base;
}

typedef struct compose_job {
    const float *atoms, *c;
    size_t n, S, n_tasks;
    float *w;
    /* backward only */
    const float *g;
    float *d_atoms;
    bool add;
    unsigned char *dc_sums; /* S doubles per task, or NULL */
} compose_job;

static void task_range(const compose_job *job, size_t task, size_t *i0,
                       size_t *i1)
{
    *i0 = job->n * task / job->n_tasks;
    *i1 = job->n * (task + 1) / job->n_tasks;
}

static void compose_task(void *arg, size_t task, size_t thread)
{
    (void)thread;
    const compose_job *job = arg;
    size_t i0, i1;
    task_range(job, task, &i0, &i1);
    compose_fn kernel = compose_kernel();
    for (size_t t = i0; t < i1; t += TILE)
        kernel(job->atoms + t, job->n, job->S, job->c, job->w + t,
               min_size(TILE, i1 - t));
}

void masa__compose(const masa_dictionary *dict, const masa_coefficients *coef,
                   size_t layer, float *w, masa_pool *pool)
{
    compose_job job = {
        .atoms = dict->atoms, .c = coef->data + layer * coef->n_atoms,
        .n = dict->rows * dict->cols, .S = dict->n_atoms, .w = w,
    };
    job.n_tasks = task_count(job.n, pool);
    if (job.n_tasks > 1)
        masa__pool_run(pool, job.n_tasks, compose_task, &job);
    else
        compose_task(&job, 0, 0);
}

/* sums[s] += v (sums only float-aligned) */
static void add_sum(unsigned char *sums, size_t s, float v)
{
    double x;
    memcpy(&x, sums + s * sizeof x, sizeof x);
    x += v;
    memcpy(sums + s * sizeof x, &x, sizeof x);
}

static double get_sum(const unsigned char *sums, size_t s)
{
    double x;
    memcpy(&x, sums + s * sizeof x, sizeof x);
    return x;
}

static void grad_task(void *arg, size_t task, size_t thread)
{
    (void)thread;
    const compose_job *job = arg;
    size_t i0, i1, S = job->S, n = job->n;
    task_range(job, task, &i0, &i1);
    unsigned char *sums =
        job->dc_sums ? job->dc_sums + task * S * sizeof(double) : NULL;
    if (sums)
        memset(sums, 0, S * sizeof(double));
    grad_fn kernel = grad_kernel();
    float dots[GRAD_GROUP];
    for (size_t t = i0; t < i1; t += TILE) {
        size_t len = min_size(TILE, i1 - t);
        /* atoms in groups whose tile dots fit the stack array */
        for (size_t s0 = 0; s0 < S; s0 += GRAD_GROUP) {
            size_t ns = min_size(GRAD_GROUP, S - s0);
            kernel(job->atoms + s0 * n + t, n, ns, job->c + s0, job->g + t,
                   job->d_atoms ? job->d_atoms + s0 * n + t : NULL, job->add,
                   job->w ? job->w + t : NULL, s0 == 0, sums ? dots : NULL,
                   len);
            for (size_t s = 0; sums && s < ns; s++)
                add_sum(sums, s0 + s, dots[s]);
        }
    }
}

void masa__atom_grads(const masa_dictionary *dict,
                      const masa_coefficients *coef, size_t layer,
                      const float *g, float *dc, float *d_atoms, bool add,
                      float *w, void *partials, masa_pool *pool)
{
    compose_job job = {
        .atoms = dict->atoms, .c = coef->data + layer * coef->n_atoms,
        .n = dict->rows * dict->cols, .S = dict->n_atoms, .w = w, .g = g,
        .d_atoms = d_atoms, .add = add,
        .dc_sums = dc ? (unsigned char *)partials : NULL,
    };
    job.n_tasks = task_count(job.n, pool);
    /* every task keeps S sums of dc in the fixed scratch */
    if (dc && job.n_tasks > MASA_ATOM_GRAD_PARTIALS / job.S)
        job.n_tasks = MASA_ATOM_GRAD_PARTIALS / job.S;
    if (job.n_tasks > 1)
        masa__pool_run(pool, job.n_tasks, grad_task, &job);
    else if (job.n_tasks == 1)
        grad_task(&job, 0, 0);
    else { /* more atoms than the scratch holds sums for: one atom at a time */
        job.n_tasks = 1;
        unsigned char one[sizeof(double)];
        compose_job a = job;
        a.S = 1;
        a.w = NULL;
        a.dc_sums = one;
        for (size_t s = 0; s < job.S; s++) {
            a.atoms = job.atoms + s * job.n;
            a.c = job.c + s;
            a.d_atoms = d_atoms ? d_atoms + s * job.n : NULL;
            grad_task(&a, 0, 0);
            float v = (float)get_sum(one, 0);
            dc[s] = add ? dc[s] + v : v;
        }
        if (w)
            compose_task(&job, 0, 0);
        return;
    }
    if (!dc)
        return;
    /* tasks' sums in task order: the same result for any thread count */
    for (size_t s = 0; s < job.S; s++) {
        double sum = 0.0;
        for (size_t t = 0; t < job.n_tasks; t++)
            sum += get_sum(job.dc_sums, t * job.S + s);
        dc[s] = add ? dc[s] + (float)sum : (float)sum;
    }
}

MASA_API masa_status masa_compose(const masa_dictionary *dict,
                                  const masa_coefficients *coef, size_t layer,
                                  float *w, size_t w_len)
{
    static const char fn[] = "masa_compose";
    if (!dict || !coef || !w)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT,
                          "%s: %s is NULL", fn,
                          !dict ? "dict" : !coef ? "coef" : "w");
    if (coef->n_atoms != dict->n_atoms)
        return masa__fail(MASA_ERROR_BAD_SHAPE,
                          "%s: the table has %zu atoms per layer, the "
                          "dictionary %zu", fn, coef->n_atoms, dict->n_atoms);
    if (layer >= coef->n_layers)
        return masa__fail(MASA_ERROR_OUT_OF_RANGE,
                          "%s: layer %zu is out of range (table has %zu "
                          "layers)", fn, layer, coef->n_layers);
    size_t need = dict->rows * dict->cols;
    if (w_len < need)
        return masa__fail(MASA_ERROR_BUFFER_TOO_SMALL,
                          "%s: w holds %zu floats, W_l needs %zu", fn, w_len,
                          need);
    if (masa__overlaps(w, need * sizeof(float), dict->atoms,
                       dict->n_atoms * need * sizeof(float)) ||
        masa__overlaps(w, need * sizeof(float), coef->data,
                       coef->n_layers * coef->n_atoms * sizeof(float)))
        return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                          "%s: w overlaps the atoms or the coefficients", fn);
    masa__call_enter();
    masa__compose(dict, coef, layer, w, dict->ctx->pool);
    masa__call_exit();
    return MASA_OK;
}
