/* Attention core, backward, in the flash style. For a query tile:
 * delta = rowsum(dO * O) once, then for each key tile it may see
 *   P  = exp((scale Q K^T - m) - log l)   (forward's row max m and sum l)
 *   dP = dO V^T,  dS = P * (dP - delta)
 *   dV += P^T dO,  dK += scale dS^T Q,  dQ += scale dS K
 * so memory stays linear in seq.
 *
 * Peaked rows. Where a key j takes much of a row's mass, dP_j - delta =
 * -dO . (O - V_j) is a small difference of two large numbers rounded apart
 * (the product dP_j and the dot product delta): taken as it is, dS_j is
 * rounding noise of the size of an ulp of dP (a gradient of exact size 1e-20
 * came back as 1e4 at logits of 1e6). So where P_j > 1/8 (at most 7 keys a
 * row), dS_j is taken as -P_j dO . (O - V_j), exactly 0 where O rounded to
 * V_j (also when equal keys, a repeated token, share the mass). Once all key
 * tiles are done, the row's dS is made to sum to 0 (as it does exactly, the
 * rows of P summing to 1) by moving the sum's rounding onto dS_j of the
 * row's largest P: a rank-one update of dQ's row and of dK's row j. Then
 * dS_j = -(the sum of the others), which are accurate: every gradient stays
 * accurate relative to its own size however peaked or saturated the row.
 *
 * Parallel split: normally one task per (sequence, key/value head), which
 * owns that slice of dK and dV, so the query heads sharing it (GQA) and all
 * query tiles accumulate without races. With fewer such pairs than threads,
 * each pair's (query head, query tile) tasks spread over all threads instead:
 * every thread adds its dK, dV into its own zeroed partial copy and the
 * copies are summed afterwards (dQ rows belong to one task either way). */
#include <string.h>

#include "attention/attention_core.h"

static size_t min_size(size_t a, size_t b) { return a < b ? a : b; }

static size_t n_query_tiles(size_t seq)
{
    return (seq + MASA_FLASH_BQ - 1) / MASA_FLASH_BQ;
}

/* Per-thread scratch: Q^T, dO^T, Q and dO packed as B, the P and dP tiles,
 * dS, P^T and dS^T packed, delta, and a region that holds either the key
 * tiles packed (one slot per key tile: K and V as A, K as B), when a task
 * owns a whole (sequence, key/value head), or one such slot followed by the
 * partial dK and dV of a key split. S and dP come as S^T = K Q^T and
 * dP^T = V dO^T written transposed (as in forward). */
typedef struct bwd_scratch {
    float *qtb, *dotb, *qb, *dob, *p, *dp, *dsa, *pta, *dsta, *delta;
    float *ds_sum;  /* per row: the sum of dS over the keys done */
    float *peak_p;  /* per row: the largest P so far */
    size_t *peak;   /* per row: its key, SIZE_MAX if none */
    float *slots, *dk, *dv;
    size_t a_tile, b_tile, slot; /* floats: K or V as A, K as B, a slot */
} bwd_scratch;

static size_t round16(size_t n) { return (n + 15) / 16 * 16; }

/* dO . (O - V), in double: O - V is exact where O is close to V */
static float diff_dot(const float *d_o, const float *o, const float *v,
                      size_t n)
{
    double acc = 0.0;
    for (size_t i = 0; i < n; i++)
        acc += (double)d_o[i] * ((double)o[i] - (double)v[i]);
    return (float)acc;
}

/* Carves the scratch from `at` (NULL: only counts); returns its floats. */
static size_t bwd_layout(const masa_ukr *u, size_t seq, size_t hd, float *at,
                         bwd_scratch *s)
{
    size_t bq = min_size(MASA_FLASH_BQ, seq), bk = min_size(MASA_FLASH_BK, seq);
    size_t b_hq = masa__pack_b_floats(u, hd, bq);
    size_t b_qh = masa__pack_b_floats(u, bq, hd);
    size_t key_tiles = (seq + MASA_FLASH_BK - 1) / MASA_FLASH_BK;
    /* slot parts stay 64-byte aligned: packed B is read with aligned loads */
    s->a_tile = round16(masa__pack_a_floats(u, bk, hd));
    s->b_tile = round16(masa__pack_b_floats(u, bk, hd));
    s->slot = 2 * s->a_tile + s->b_tile;
    size_t all = key_tiles * s->slot, split = s->slot + 2 * seq * hd;
    float *peak = NULL;
    size_t n[14] = {b_hq, b_hq, b_qh, b_qh, bq * bk, bq * bk,
                    masa__pack_a_floats(u, bq, bk),
                    masa__pack_a_floats(u, bk, bq),
                    masa__pack_a_floats(u, bk, bq), bq, bq, bq,
                    bq * (sizeof(size_t) / sizeof(float)),
                    all > split ? all : split};
    float **dst[14] = {&s->qtb, &s->dotb, &s->qb, &s->dob, &s->p, &s->dp,
                       &s->dsa, &s->pta, &s->dsta, &s->delta, &s->ds_sum,
                       &s->peak_p, &peak, &s->slots};
    size_t total = 0;
    for (int i = 0; i < 14; i++) {
        total += n[i] + MASA_ATTN_ALIGN_SLACK;
        if (at)
            *dst[i] = masa__attn_carve(&at, n[i]);
    }
    if (at) {
        s->peak = (size_t *)(void *)peak; /* 64-byte aligned block */
        s->dk = s->slots + s->slot;
        s->dv = s->dk + seq * hd;
    }
    return total;
}

size_t masa__attention_backward_floats(const masa_ukr *u, size_t seq,
                                       size_t head_dim)
{
    bwd_scratch s;
    return bwd_layout(u, seq, head_dim, NULL, &s);
}

static bwd_scratch scratch_of(const masa_attn_args *a, const masa_ukr *u,
                              size_t thread)
{
    bwd_scratch s;
    bwd_layout(u, a->seq, a->layer->head_dim,
               a->tiles + thread * a->tile_floats, &s);
    return s;
}

/* Packs key tile t of key/value head g of sequence b into slot `slot`. */
static void pack_key_tile(const masa_attn_args *a, const masa_ukr *u,
                          const bwd_scratch *s, size_t b, size_t g, size_t t,
                          size_t slot)
{
    float *at = s->slots + slot * s->slot;
    masa__pack_key_tile(a, u, b, g, t, at, at + s->a_tile, NULL,
                        at + 2 * s->a_tile);
}

/* Query tile `tile` of head h of sequence b; dK, dV rows of key 0 at dk, dv
 * with row stride ld. packed: key tile t is in slot t already; otherwise
 * each is packed here into slot 0. */
static void backward_tile(const masa_attn_args *a, const masa_ukr *u,
                          size_t b, size_t h, size_t tile,
                          const bwd_scratch *s, float *dk, float *dv,
                          size_t ld, bool packed)
{
    const masa_layer *L = a->layer;
    size_t T = a->seq, hd = L->head_dim;
    size_t g = h / (L->n_heads / L->n_kv_heads);
    size_t i0 = tile * MASA_FLASH_BQ;
    size_t m = min_size(T - i0, MASA_FLASH_BQ);
    size_t kend = L->causal ? i0 + m : T;

    size_t row0 = (b * T + i0) * L->dq + h * hd;
    const float *q = a->q + row0, *d_o = a->d_attn + row0, *o = a->attn + row0;
    const float *k = a->k + b * T * L->dkv + g * hd;
    const float *v = a->v + b * T * L->dkv + g * hd;
    size_t stats = (b * L->n_heads + h) * T + i0;
    const float *row_max = a->row_max + stats;
    const float *log_sum = a->row_log_sum + stats;
    float *dq = a->dq + row0;

    for (size_t r = 0; r < m; r++) {
        const float *dor = d_o + r * L->dq, *orow = o + r * L->dq;
        float d = 0.0f;
        for (size_t c = 0; c < hd; c++)
            d += dor[c] * orow[c];
        s->delta[r] = d;
        s->ds_sum[r] = 0.0f;
        s->peak[r] = SIZE_MAX;
        memset(dq + r * L->dq, 0, hd * sizeof(float));
    }
    /* Q and dO serve every key tile */
    masa__pack_b(u, hd, m, q, 1, L->dq, s->qtb);
    masa__pack_b(u, hd, m, d_o, 1, L->dq, s->dotb);
    masa__pack_b(u, m, hd, q, L->dq, 1, s->qb);
    masa__pack_b(u, m, hd, d_o, L->dq, 1, s->dob);
    for (size_t j0 = 0; j0 < kend; j0 += MASA_FLASH_BK) {
        size_t n = min_size(kend - j0, MASA_FLASH_BK);
        masa_tile_mask mask = {L->causal && j0 + n - 1 > i0,
                               (ptrdiff_t)i0 - (ptrdiff_t)j0};
        const float *kt = k + j0 * L->dkv;
        size_t t = j0 / MASA_FLASH_BK, slot = packed ? t : 0;
        if (!packed)
            pack_key_tile(a, u, s, b, g, t, 0);
        const float *ka = s->slots + slot * s->slot, *va = ka + s->a_tile;
        const float *kb = ka + 2 * s->a_tile;
        /* S = scale Q K^T and dP = dO V^T, m x n, row stride n (masked
         * entries computed, unused) */
        masa__tile_product(u, &(masa_tile_product){
            .kind = MASA_PRODUCT_ROWS, .m = n, .n = m, .k = hd,
            .alpha = L->scale, .beta = 0.0f, .ap = ka, .bp = s->qtb,
            .c = s->p, .ldc = 1, .csc = n});
        masa__tile_product(u, &(masa_tile_product){
            .kind = MASA_PRODUCT_ROWS, .m = n, .n = m, .k = hd,
            .alpha = 1.0f, .beta = 0.0f, .ap = va, .bp = s->dotb,
            .c = s->dp, .ldc = 1, .csc = n});
        for (size_t r = 0; r < m; r++) {
            size_t nv = masa__mask_row_len(mask, r, n);
            float *pr = s->p + r * n, *ds = s->dp + r * n;
            masa_big_p big;
            float sum = masa__softmax_grad_row(pr, ds, nv, row_max[r],
                                               log_sum[r], s->delta[r], &big);
            for (size_t i = 0; i < big.n; i++) {
                size_t j = big.j[i];
                float exact = -pr[j] * diff_dot(d_o + r * L->dq,
                                                o + r * L->dq,
                                                v + (j0 + j) * L->dkv, hd);
                sum += exact - ds[j];
                ds[j] = exact;
                if (s->peak[r] == SIZE_MAX || pr[j] > s->peak_p[r]) {
                    s->peak[r] = j0 + j;
                    s->peak_p[r] = pr[j];
                }
            }
            s->ds_sum[r] += sum;
        }
        masa__pack_a(u, n, m, s->p, 1, n, s->pta);
        masa__pack_a(u, n, m, s->dp, 1, n, s->dsta);
        masa__pack_a(u, m, n, s->dp, n, 1, s->dsa);
        /* dV += P^T dO ; dK += scale dS^T Q ; dQ += scale dS K */
        masa__tile_product(u, &(masa_tile_product){
            .kind = MASA_PRODUCT_COLS, .mask = mask, .m = n, .n = hd, .k = m,
            .alpha = 1.0f, .beta = 1.0f, .ap = s->pta, .bp = s->dob,
            .c = dv + j0 * ld, .ldc = ld, .a = s->p, .lda = n, .b = d_o,
            .ldb = L->dq});
        masa__tile_product(u, &(masa_tile_product){
            .kind = MASA_PRODUCT_COLS, .mask = mask, .m = n, .n = hd, .k = m,
            .alpha = L->scale, .beta = 1.0f, .ap = s->dsta, .bp = s->qb,
            .c = dk + j0 * ld, .ldc = ld, .a = s->dp, .lda = n, .b = q,
            .ldb = L->dq});
        masa__tile_product(u, &(masa_tile_product){
            .kind = MASA_PRODUCT_ROWS, .mask = mask, .m = m, .n = hd, .k = n,
            .alpha = L->scale, .beta = 1.0f, .ap = s->dsa, .bp = kb,
            .bp_k = min_size(T - j0, MASA_FLASH_BK),
            .c = dq, .ldc = L->dq, .a = s->dp, .lda = n, .b = kt,
            .ldb = L->dkv});
    }
    /* the peak's dS_j -= the row's sum of dS */
    for (size_t r = 0; r < m; r++) {
        if (s->peak[r] == SIZE_MAX || s->ds_sum[r] == 0.0f)
            continue;
        float c = -L->scale * s->ds_sum[r];
        const float *kj = k + s->peak[r] * L->dkv, *qr = q + r * L->dq;
        float *dqr = dq + r * L->dq, *dkj = dk + s->peak[r] * ld;
        for (size_t i = 0; i < hd; i++) {
            dqr[i] += c * kj[i];
            dkj[i] += c * qr[i];
        }
    }
}

/* One task per (sequence, key/value head). */
static void pair_task(void *p, size_t task, size_t thread)
{
    masa_attn_args *a = p;
    const masa_layer *L = a->layer;
    size_t T = a->seq, hd = L->head_dim;
    size_t g = task % L->n_kv_heads;
    size_t b = task / L->n_kv_heads;
    masa_ukr u;
    masa__ukr_query(&u);
    bwd_scratch s = scratch_of(a, &u, thread);
    float *dk = a->dk + b * T * L->dkv + g * hd;
    float *dv = a->dv + b * T * L->dkv + g * hd;

    for (size_t t = 0; t < T; t++) {
        memset(dk + t * L->dkv, 0, hd * sizeof(float));
        memset(dv + t * L->dkv, 0, hd * sizeof(float));
    }
    for (size_t t = 0; t * MASA_FLASH_BK < T; t++)
        pack_key_tile(a, &u, &s, b, g, t, t);
    size_t rep = L->n_heads / L->n_kv_heads, tiles = n_query_tiles(T);
    for (size_t h = g * rep; h < (g + 1) * rep; h++)
        for (size_t tile = 0; tile < tiles; tile++)
            backward_tile(a, &u, b, h, tile, &s, dk, dv, L->dkv, true);
}

/* Key split of one pair (b, g). */
typedef struct split_args {
    masa_attn_args *a;
    size_t b, g;
} split_args;

#define REDUCE_ROWS 64

static void split_task(void *p, size_t task, size_t thread)
{
    split_args *sa = p;
    const masa_layer *L = sa->a->layer;
    size_t rep = L->n_heads / L->n_kv_heads, tiles = n_query_tiles(sa->a->seq);
    masa_ukr u;
    masa__ukr_query(&u);
    bwd_scratch s = scratch_of(sa->a, &u, thread);
    /* the longest causal tiles first */
    backward_tile(sa->a, &u, sa->b, sa->g * rep + task % rep,
                  tiles - 1 - task / rep, &s, s.dk, s.dv, L->head_dim, false);
}

static void reduce_task(void *p, size_t task, size_t thread)
{
    (void)thread;
    split_args *sa = p;
    const masa_attn_args *a = sa->a;
    const masa_layer *L = a->layer;
    size_t T = a->seq, hd = L->head_dim;
    size_t t0 = task * REDUCE_ROWS, t1 = min_size(t0 + REDUCE_ROWS, T);
    masa_ukr u;
    masa__ukr_query(&u);
    bwd_scratch s0 = scratch_of(a, &u, 0);
    for (size_t t = t0; t < t1; t++) {
        float *dk = a->dk + (sa->b * T + t) * L->dkv + sa->g * hd;
        float *dv = a->dv + (sa->b * T + t) * L->dkv + sa->g * hd;
        memcpy(dk, s0.dk + t * hd, hd * sizeof(float));
        memcpy(dv, s0.dv + t * hd, hd * sizeof(float));
        for (size_t th = 1; th < L->ctx->n_threads; th++) {
            bwd_scratch s = scratch_of(a, &u, th);
            for (size_t c = 0; c < hd; c++) {
                dk[c] += s.dk[t * hd + c];
                dv[c] += s.dv[t * hd + c];
            }
        }
    }
}

void masa__attention_backward(masa_attn_args *args)
{
    const masa_layer *L = args->layer;
    size_t pairs = args->batch * L->n_kv_heads, nt = L->ctx->n_threads;
    if (pairs >= nt) {
        masa__pool_run(L->ctx->pool, pairs, pair_task, args);
        return;
    }
    size_t T = args->seq, hd = L->head_dim;
    size_t rep = L->n_heads / L->n_kv_heads;
    for (size_t pair = 0; pair < pairs; pair++) {
        split_args sa = {args, pair / L->n_kv_heads, pair % L->n_kv_heads};
        masa_ukr u;
        masa__ukr_query(&u);
        for (size_t th = 0; th < nt; th++) {
            bwd_scratch s = scratch_of(args, &u, th);
            memset(s.dk, 0, T * hd * sizeof(float));
            memset(s.dv, 0, T * hd * sizeof(float));
        }
        masa__pool_run(L->ctx->pool, rep * n_query_tiles(T), split_task, &sa);
        masa__pool_run(L->ctx->pool, (T + REDUCE_ROWS - 1) / REDUCE_ROWS,
                       reduce_task, &sa);
    }
}
