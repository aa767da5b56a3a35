/* Attention core, forward, in the flash style: a query tile walks the key
 * tiles it may see with an online softmax (running row max m, sum l, and the
 * unnormalised output rescaled when m grows), so no T x T matrix is ever
 * formed: scratch is one BQ x BK score tile per thread plus the packed key
 * tiles (linear in seq). Causal tiles past the diagonal are skipped. Each
 * row's maximum m and log(l) are saved so backward can rebuild
 * P = exp((s - m) - log l).
 *
 * Parallel split on the library's pool: one task per (sequence, head) when
 * there are at least two per thread (its key tiles are packed once for all
 * its query tiles), else one per (sequence, head, query tile), longest
 * causal tiles first. The products run on BLIS's micro-kernel inside the
 * tasks (attention_tiles.c), never on BLIS threads. */
#include <math.h>
#include <string.h>

#include "attention/attention_core.h"

static size_t min_size(size_t a, size_t b) { return a < b ? a : b; }

/* Forward's per-thread scratch: Q^T packed, the key tiles packed (K as A,
 * V as B, one slot per key tile), the score tile, P packed, the row sums.
 * The scores come as S^T = K Q^T written transposed: packing K and V rows
 * reads memory contiguously, and the one strided pack (Q^T) serves every
 * key tile. */
typedef struct fwd_scratch {
    float *qtb, *ka, *s, *pp, *vb, *sum;
    size_t ka_tile, vb_tile; /* floats per key tile slot */
} fwd_scratch;

/* Carves the scratch from `at` (NULL: only counts); returns its floats. */
static size_t fwd_layout(const masa_ukr *u, size_t seq, size_t hd, float *at,
                         fwd_scratch *f)
{
    size_t bq = min_size(MASA_FLASH_BQ, seq), bk = min_size(MASA_FLASH_BK, seq);
    size_t key_tiles = (seq + MASA_FLASH_BK - 1) / MASA_FLASH_BK;
    f->ka_tile = masa__pack_a_floats(u, bk, hd);
    f->vb_tile = masa__pack_b_floats(u, bk, hd);
    size_t n[6] = {masa__pack_b_floats(u, hd, bq), key_tiles * f->ka_tile,
                   bq * bk, masa__pack_a_floats(u, bq, bk),
                   key_tiles * f->vb_tile, bq};
    float **dst[6] = {&f->qtb, &f->ka, &f->s, &f->pp, &f->vb, &f->sum};
    size_t total = 0;
    for (int i = 0; i < 6; i++) {
        total += n[i] + MASA_ATTN_ALIGN_SLACK;
        if (at)
            *dst[i] = masa__attn_carve(&at, n[i]);
    }
    return total;
}

size_t masa__attention_tile_floats(size_t seq, size_t head_dim)
{
    /* Tile sizes are bounded by MASA_FLASH_BQ/BK: only the linear terms in
     * seq and head_dim can overflow. */
    size_t big;
    if (!masa__mul3(4 * (MASA_FLASH_BQ + MASA_FLASH_BK + 64), seq, head_dim,
                    &big))
        return SIZE_MAX;
    masa_ukr u;
    masa__ukr_query(&u);
    fwd_scratch f;
    size_t fwd = fwd_layout(&u, seq, head_dim, NULL, &f);
    size_t bwd = masa__attention_backward_floats(&u, seq, head_dim);
    return fwd > bwd ? fwd : bwd;
}

static size_t n_query_tiles(size_t seq)
{
    return (seq + MASA_FLASH_BQ - 1) / MASA_FLASH_BQ;
}

/* Packs key tile t of key/value head g of sequence b into its slots. */
static void pack_key_tile(const masa_attn_args *a, const masa_ukr *u,
                          const fwd_scratch *f, size_t b, size_t g, size_t t)
{
    masa__pack_key_tile(a, u, b, g, t, f->ka + t * f->ka_tile, NULL,
                        f->vb + t * f->vb_tile, NULL);
}

/* Query tile `tile` of head h of sequence b. packed: the key tiles are in
 * their slots already; otherwise each is packed here. */
static void forward_tile(const masa_attn_args *a, const masa_ukr *u,
                         const fwd_scratch *fs, size_t b, size_t h,
                         size_t tile, bool packed)
{
    const masa_layer *L = a->layer;
    size_t T = a->seq, hd = L->head_dim, H = L->n_heads;
    size_t g = h / (H / L->n_kv_heads);
    const fwd_scratch f = *fs;

    size_t i0 = tile * MASA_FLASH_BQ;
    size_t m = min_size(T - i0, MASA_FLASH_BQ);
    size_t kend = L->causal ? i0 + m : T;

    const float *q = a->q + (b * T + i0) * L->dq + h * hd;
    const float *v = a->v + b * T * L->dkv + g * hd;
    float *out = a->attn + (b * T + i0) * L->dq + h * hd;
    float *mx = a->row_max + (b * H + h) * T + i0;
    float *log_sum = a->row_log_sum + (b * H + h) * T + i0;
    float *s = f.s, *sum = f.sum;

    for (size_t r = 0; r < m; r++) {
        memset(out + r * L->dq, 0, hd * sizeof(float));
        mx[r] = -INFINITY;
        sum[r] = 0.0f;
    }
    masa__pack_b(u, hd, m, q, 1, L->dq, f.qtb);
    for (size_t j0 = 0; j0 < kend; j0 += MASA_FLASH_BK) {
        size_t n = min_size(kend - j0, MASA_FLASH_BK);
        masa_tile_mask mask = {L->causal && j0 + n - 1 > i0,
                               (ptrdiff_t)i0 - (ptrdiff_t)j0};
        size_t t = j0 / MASA_FLASH_BK;
        const float *vt = v + j0 * L->dkv;
        float *ka = f.ka + t * f.ka_tile, *vb = f.vb + t * f.vb_tile;
        if (!packed)
            pack_key_tile(a, u, &f, b, g, t);
        /* S = scale Q_tile K_tile^T, m x n, row stride n, as S^T = K Q^T
         * (masked entries are computed but never used) */
        masa__tile_product(u, &(masa_tile_product){
            .kind = MASA_PRODUCT_ROWS, .m = n, .n = m, .k = hd,
            .alpha = L->scale, .beta = 0.0f, .ap = ka, .bp = f.qtb, .c = s,
            .ldc = 1, .csc = n});
        for (size_t r = 0; r < m; r++) {
            size_t nv = masa__mask_row_len(mask, r, n);
            if (nv == 0)
                continue;
            float *row = s + r * n;
            float m_new = masa__row_max(row, nv, mx[r]);
            float part = masa__exp_shifted(row, nv, m_new);
            /* exp(-inf - -inf) is NaN: a row whose scores are all -inf or
             * NaN gives NaN, as an exact softmax would */
            float rescale = expf(mx[r] - m_new);
            sum[r] = sum[r] * rescale + part;
            mx[r] = m_new;
            if (rescale != 1.0f) {
                float *o = out + r * L->dq;
                for (size_t c = 0; c < hd; c++)
                    o[c] *= rescale;
            }
        }
        /* O += P V_tile */
        masa__pack_a(u, m, n, s, n, 1, f.pp);
        masa__tile_product(u, &(masa_tile_product){
            .kind = MASA_PRODUCT_ROWS, .mask = mask, .m = m, .n = hd, .k = n,
            .alpha = 1.0f, .beta = 1.0f, .ap = f.pp, .bp = vb,
            .bp_k = min_size(T - j0, MASA_FLASH_BK), .c = out, .ldc = L->dq,
            .a = s, .lda = n, .b = vt, .ldb = L->dkv});
    }
    for (size_t r = 0; r < m; r++) {
        float inv = 1.0f / sum[r];
        float *o = out + r * L->dq;
        for (size_t c = 0; c < hd; c++)
            o[c] *= inv;
        log_sum[r] = logf(sum[r]);
    }
}

/* One task per (sequence, head, query tile), packing key tiles as they
 * come: for few heads, so every thread has work. */
static void tile_task(void *p, size_t task, size_t thread)
{
    masa_attn_args *a = p;
    size_t H = a->layer->n_heads, tiles = n_query_tiles(a->seq);
    masa_ukr u;
    masa__ukr_query(&u);
    fwd_scratch f;
    fwd_layout(&u, a->seq, a->layer->head_dim,
               a->tiles + thread * a->tile_floats, &f);
    /* the longest causal tiles first, so the short ones fill the gaps */
    forward_tile(a, &u, &f, task / H % a->batch, task % H,
                 tiles - 1 - task / (a->batch * H), false);
}

/* One task per (sequence, head): its key tiles are packed once and serve
 * every query tile. */
static void head_task(void *p, size_t task, size_t thread)
{
    masa_attn_args *a = p;
    const masa_layer *L = a->layer;
    size_t H = L->n_heads, b = task / H, h = task % H;
    masa_ukr u;
    masa__ukr_query(&u);
    fwd_scratch f;
    fwd_layout(&u, a->seq, L->head_dim, a->tiles + thread * a->tile_floats,
               &f);
    size_t g = h / (H / L->n_kv_heads);
    for (size_t t = 0; t * MASA_FLASH_BK < a->seq; t++)
        pack_key_tile(a, &u, &f, b, g, t);
    for (size_t tile = 0; tile < n_query_tiles(a->seq); tile++)
        forward_tile(a, &u, &f, b, h, tile, true);
}

void masa__attention_forward(masa_attn_args *args)
{
    const masa_layer *L = args->layer;
    size_t heads = args->batch * L->n_heads, nt = L->ctx->n_threads;
    /* whole heads balance well from two per thread (equal work each) */
    if (heads >= 2 * nt || nt == 1)
        masa__pool_run(L->ctx->pool, heads, head_task, args);
    else
        masa__pool_run(L->ctx->pool, heads * n_query_tiles(args->seq),
                       tile_task, args);
}
