/* Attention of a decode step: the new tokens' queries against the key/value
 * cache (which already holds the new tokens' keys).
 *
 * Work unit: one sequence, one key/value head and a tile of new tokens; its
 * rows are (token, query head of the group), so the heads sharing a key/value
 * head (GQA, MQA) read each key and value once. A unit walks its keys in
 * blocks with an online softmax (running max m, sum l and output acc per
 * row), so scratch does not grow with the cache length.
 *
 * Flash-decoding: when there are fewer units than twice the threads (one
 * token of a short batch), each unit's key range is split and the splits run
 * on different threads; their (m, l, acc) are combined afterwards:
 *   M = max_s m_s,  out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s.
 *
 * A row only touches keys it may see (causal), so a NaN in a later token
 * never reaches an earlier one, as in the forward pass. Units with many rows
 * (prefill) use BLIS; a few rows use plain loops, because BLIS packs its
 * operands on every call and at 1-8 rows that costs several times the
 * product itself (measured: 12.5 us against 2.2 us for 1 x 512 x 64). */
#include <math.h>
#include <string.h>

#include "common/internal.h"

#define TILE_ROWS 64        /* rows per unit */
#define KEY_BLOCK 256       /* keys per online-softmax step */
#define GEMM_MIN_ROWS 16    /* fewer rows: loops */
#define MIN_SPLIT_KEYS 64   /* a split below this costs more than it saves */
#define POOL_MIN_MACS 131072.0 /* less work runs on the calling thread: waking
                                  the pool costs about 10 us */

typedef struct unit_shape {
    size_t group;    /* query heads per key/value head */
    size_t tok_tile; /* new tokens per unit */
    size_t n_tiles;  /* units per (sequence, key/value head) */
    size_t rows_max; /* rows of the largest unit */
} unit_shape;

static unit_shape shape_of(const masa_layer *L, size_t n_new)
{
    unit_shape u;
    u.group = L->n_heads / L->n_kv_heads;
    u.tok_tile = u.group >= TILE_ROWS ? 1 : TILE_ROWS / u.group;
    u.n_tiles = (n_new + u.tok_tile - 1) / u.tok_tile;
    u.rows_max = (n_new < u.tok_tile ? n_new : u.tok_tile) * u.group;
    return u;
}

/* Per thread: q tile, scores, acc (rows x head_dim each but scores: rows x
 * KEY_BLOCK), m and l. */
bool masa__decode_attn_sizes(const masa_layer *layer, size_t n_new,
                             masa_decode_attn_sizes *out)
{
    unit_shape u = shape_of(layer, n_new);
    size_t hd = layer->head_dim, per_row = 2 * hd + KEY_BLOCK + 2;
    size_t thread, partial;
    /* Splits happen only with fewer than 2T units, so there are fewer than
     * 2T + units < 4T split tasks. */
    if (!masa__mul(u.rows_max, per_row, &thread) ||
        !masa__mul3(4 * layer->ctx->n_threads, u.rows_max, hd + 2, &partial))
        return false;
    out->thread_floats = (thread + 15) & ~(size_t)15; /* 64-byte multiples */
    out->partial_floats = partial;
    return true;
}

static float dot(const float *a, const float *b, size_t n)
{
    float acc[8] = {0};
    size_t c = 0;
    for (; c + 8 <= n; c += 8)
        for (size_t u = 0; u < 8; u++)
            acc[u] += a[c + u] * b[c + u];
    float t = 0.0f;
    for (; c < n; c++)
        t += a[c] * b[c];
    for (size_t u = 0; u < 8; u++)
        t += acc[u];
    return t;
}

static void axpy(float *y, float a, const float *x, size_t n)
{
    for (size_t c = 0; c < n; c++)
        y[c] += a * x[c];
}

typedef struct decode_job {
    const masa_decode_attn_args *a;
    unit_shape u;
    size_t n_split;
} decode_job;

/* Where a unit's rows live. */
typedef struct unit {
    size_t b, g, i0, rows, base;
    const float *k, *v;
} unit;

static unit unit_at(const decode_job *job, size_t index)
{
    const masa_decode_attn_args *a = job->a;
    const masa_layer *L = a->layer;
    size_t tile = index % job->u.n_tiles;
    size_t bg = index / job->u.n_tiles;
    unit t;
    t.b = bg / L->n_kv_heads;
    t.g = bg % L->n_kv_heads;
    t.i0 = tile * job->u.tok_tile;
    size_t i1 = t.i0 + job->u.tok_tile;
    if (i1 > a->n_new)
        i1 = a->n_new;
    t.rows = (i1 - t.i0) * job->u.group;
    t.base = a->length - a->n_new;
    size_t off = bg * a->cache->max_seq * L->head_dim;
    t.k = a->cache->k + off;
    t.v = a->cache->v + off;
    return t;
}

/* Offset of row r's query (and output) in [batch * n_new, dq]. */
static size_t row_offset(const masa_decode_attn_args *a, const unit *t,
                         size_t group, size_t r)
{
    const masa_layer *L = a->layer;
    size_t i = t->i0 + r / group, h = t->g * group + r % group;
    return (t->b * a->n_new + i) * L->dq + h * L->head_dim;
}

/* One key block [k0, k1) of a unit: scores, online-softmax update, P V.
 * lim[r] is the end of row r's visible keys. */
static void key_block(const masa_layer *L, const unit *t, const float *qt,
                      const size_t *lim, size_t k0, size_t k1, float *s,
                      float *acc, float *m, float *l)
{
    size_t hd = L->head_dim, nk = k1 - k0, rows = t->rows;
    bool gemm = rows >= GEMM_MIN_ROWS;
    /* rows ascend in position, so row 0 sees the fewest keys */
    size_t common = lim[0] < k1 ? (lim[0] > k0 ? lim[0] - k0 : 0) : nk;
    if (gemm)
        masa__gemm(rows, nk, hd, 1.0f, qt, hd, 1, t->k + k0 * hd, 1, hd,
                   0.0f, s, nk, 1, 1);
    else
        for (size_t j = k0; j < k1; j++) {
            const float *kj = t->k + j * hd;
            for (size_t r = 0; r < rows; r++)
                if (j < lim[r])
                    s[r * nk + j - k0] = dot(qt + r * hd, kj, hd);
        }
    for (size_t r = 0; r < rows; r++) {
        float *sr = s + r * nk, *ar = acc + r * hd;
        size_t end = lim[r] < k1 ? lim[r] : k1;
        size_t vis = end > k0 ? end - k0 : 0;
        float bm = -INFINITY;
        for (size_t j = 0; j < vis; j++)
            if (sr[j] > bm)
                bm = sr[j];
        float m_new = bm > m[r] ? bm : m[r];
        if (m_new == -INFINITY) {
            /* nothing seen yet but -inf scores: they weigh 0 */
            for (size_t j = 0; j < vis; j++)
                sr[j] = 0.0f;
            continue;
        }
        float alpha = expf(m[r] - m_new), sum = 0.0f;
        for (size_t j = 0; j < vis; j++) {
            sr[j] = expf(sr[j] - m_new);
            sum += sr[j];
        }
        m[r] = m_new;
        l[r] = l[r] * alpha + sum;
        for (size_t c = 0; c < hd; c++)
            ar[c] *= alpha;
        if (!gemm)
            for (size_t j = 0; j < vis; j++)
                axpy(ar, sr[j], t->v + (k0 + j) * hd, hd);
    }
    if (!gemm)
        return;
    /* keys every row sees: one product; the rest row by row */
    if (common > 0)
        masa__gemm(rows, hd, common, 1.0f, s, nk, 1, t->v + k0 * hd, hd, 1,
                   1.0f, acc, hd, 1, 1);
    for (size_t r = 0; r < rows; r++) {
        size_t end = lim[r] < k1 ? lim[r] : k1;
        for (size_t j = k0 + common; j < end; j++)
            axpy(acc + r * hd, s[r * nk + j - k0], t->v + j * hd, hd);
    }
}

static void decode_task(void *arg, size_t task, size_t thread)
{
    const decode_job *job = arg;
    const masa_decode_attn_args *a = job->a;
    const masa_layer *L = a->layer;
    size_t hd = L->head_dim, group = job->u.group;
    size_t split = task % job->n_split;
    unit t = unit_at(job, task / job->n_split);

    float *qt = a->thread_scratch + thread * a->thread_floats;
    float *acc = qt + job->u.rows_max * hd;
    float *m = acc + job->u.rows_max * hd;
    float *l = m + job->u.rows_max;
    float *s = l + job->u.rows_max;
    size_t lim[TILE_ROWS];
    size_t lim_rows = t.rows < TILE_ROWS ? t.rows : TILE_ROWS;
    for (size_t r = 0; r < t.rows; r++) {
        const float *q = a->q + row_offset(a, &t, group, r);
        for (size_t c = 0; c < hd; c++)
            qt[r * hd + c] = L->scale * q[c];
        m[r] = -INFINITY;
        l[r] = 0.0f;
    }
    memset(acc, 0, t.rows * hd * sizeof(float));

    /* keys [ks, ke) of the unit's range [0, base + last token + 1) */
    size_t total = t.base + t.i0 + t.rows / group;
    size_t ks = total * split / job->n_split;
    size_t ke = total * (split + 1) / job->n_split;
    /* rows beyond TILE_ROWS only occur with one token per unit (group >
     * TILE_ROWS), where every row has the same limit */
    for (size_t r = 0; r < lim_rows; r++)
        lim[r] = t.base + t.i0 + r / group + 1;
    if (t.rows > TILE_ROWS) {
        /* one token, many heads: process in TILE_ROWS-row slices */
        for (size_t r0 = 0; r0 < t.rows; r0 += TILE_ROWS) {
            unit sub = t;
            sub.rows = t.rows - r0 < TILE_ROWS ? t.rows - r0 : TILE_ROWS;
            for (size_t k0 = ks; k0 < ke; k0 += KEY_BLOCK)
                key_block(L, &sub, qt + r0 * hd, lim,  k0,
                          ke - k0 < KEY_BLOCK ? ke : k0 + KEY_BLOCK, s,
                          acc + r0 * hd, m + r0, l + r0);
        }
    } else {
        for (size_t k0 = ks; k0 < ke; k0 += KEY_BLOCK)
            key_block(L, &t, qt, lim, k0,
                      ke - k0 < KEY_BLOCK ? ke : k0 + KEY_BLOCK, s, acc, m, l);
    }

    if (job->n_split == 1) {
        for (size_t r = 0; r < t.rows; r++) {
            float *o = a->attn + row_offset(a, &t, group, r);
            float inv = 1.0f / l[r];
            for (size_t c = 0; c < hd; c++)
                o[c] = acc[r * hd + c] * inv;
        }
        return;
    }
    float *part = a->partials + task * job->u.rows_max * (hd + 2);
    memcpy(part, m, t.rows * sizeof(float));
    memcpy(part + t.rows, l, t.rows * sizeof(float));
    memcpy(part + 2 * t.rows, acc, t.rows * hd * sizeof(float));
}

/* Combines the splits of one unit into the output. */
static void combine(const decode_job *job, size_t index)
{
    const masa_decode_attn_args *a = job->a;
    size_t hd = a->layer->head_dim, ns = job->n_split;
    unit t = unit_at(job, index);
    size_t stride = job->u.rows_max * (hd + 2);
    const float *first = a->partials + index * ns * stride;
    for (size_t r = 0; r < t.rows; r++) {
        float M = -INFINITY;
        for (size_t sp = 0; sp < ns; sp++) {
            float ms = first[sp * stride + r];
            if (ms > M)
                M = ms;
        }
        float *o = a->attn + row_offset(a, &t, job->u.group, r);
        float l = 0.0f;
        memset(o, 0, hd * sizeof(float));
        for (size_t sp = 0; sp < ns; sp++) {
            /* a split that saw no key of this row (m = -inf, l = 0,
             * acc = 0) adds nothing */
            const float *p = first + sp * stride;
            float w = expf(p[r] - M);
            l += w * p[t.rows + r];
            axpy(o, w, p + 2 * t.rows + r * hd, hd);
        }
        float inv = 1.0f / l;
        for (size_t c = 0; c < hd; c++)
            o[c] *= inv;
    }
}

void masa__decode_attention(masa_decode_attn_args *args)
{
    const masa_layer *L = args->layer;
    size_t T = L->ctx->n_threads;
    decode_job job = {.a = args, .u = shape_of(L, args->n_new), .n_split = 1};
    size_t units = args->batch * L->n_kv_heads * job.u.n_tiles;
    /* multiply-adds of Q K^T and P V (an upper bound under the mask) */
    double macs = 2.0 * (double)args->batch * (double)L->n_heads *
                  (double)args->n_new * (double)args->length *
                  (double)L->head_dim;
    if (T == 1 || macs < POOL_MIN_MACS) {
        for (size_t i = 0; i < units; i++)
            decode_task(&job, i, 0);
        return;
    }
    if (units < 2 * T) {
        size_t want = (2 * T + units - 1) / units;
        size_t cap = args->length / MIN_SPLIT_KEYS;
        job.n_split = want < cap ? want : cap;
        if (job.n_split < 1)
            job.n_split = 1;
    }
    masa__pool_run(L->ctx->pool, units * job.n_split, decode_task, &job);
    if (job.n_split > 1)
        for (size_t i = 0; i < units; i++)
            combine(&job, i);
}
