/* Tile products of the attention core on BLIS's own micro-kernel.
 *
 * The tiles are small (at most BQ x BK, inner size head_dim or a tile side),
 * so a BLIS call per product spends much of its time on setup, partitioning
 * and fetching pack buffers. Here the operands are packed once into the
 * micro-kernel's layout (A in MR-row panels, B in NR-column panels, each
 * stored k-major) and reused: Q and dO of a query tile serve every key tile.
 * The micro-kernel is the one BLIS picked for this CPU (bli_gks), so the
 * inner loop is BLIS's.
 *
 * Causal tiles: multiplying a masked probability 0 by a future token's value
 * would still turn a NaN or an inf there into a NaN here, so masked entries
 * are never read. Each MR panel runs the micro-kernel over the inner range
 * all its rows see (packed panels are k-major, so a k range is a pointer
 * offset) and adds the remaining triangle of at most MR - 1 terms a row by
 * hand. */
#include <stdint.h>
#include <string.h>

#include <blis.h>

#include "attention/attention_core.h"

static size_t clamp(ptrdiff_t v, size_t hi)
{
    return v < 0 ? 0 : (size_t)v > hi ? hi : (size_t)v;
}

size_t masa__mask_row_len(masa_tile_mask mask, size_t r, size_t n)
{
    return mask.masked ? clamp((ptrdiff_t)r + mask.diag + 1, n) : n;
}

size_t masa__mask_col_start(masa_tile_mask mask, size_t j, size_t m)
{
    return mask.masked ? clamp((ptrdiff_t)j - mask.diag, m) : 0;
}

void masa__ukr_query(masa_ukr *u)
{
    masa__blis_init();
    cntx_t *cntx = bli_gks_query_cntx();
    u->cntx = cntx;
    u->fn = (void (*)(void))bli_cntx_get_l3_nat_ukr_dt(BLIS_FLOAT,
                                                        BLIS_GEMM_UKR, cntx);
    u->mr = (size_t)bli_cntx_get_blksz_def_dt(BLIS_FLOAT, BLIS_MR, cntx);
    u->nr = (size_t)bli_cntx_get_blksz_def_dt(BLIS_FLOAT, BLIS_NR, cntx);
}

static size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

float *masa__attn_carve(float **at, size_t n)
{
    uintptr_t p = ((uintptr_t)*at + 63) & ~(uintptr_t)63;
    *at = (float *)p + n;
    return (float *)p;
}

size_t masa__pack_a_floats(const masa_ukr *u, size_t m, size_t k)
{
    return round_up(m, u->mr) * k;
}

size_t masa__pack_b_floats(const masa_ukr *u, size_t k, size_t n)
{
    return k * round_up(n, u->nr);
}

/* One MR-row panel of A (k columns) from row-major rows: reads each row
 * contiguously; MR is a constant here so the interleave unrolls. */
static inline void pack_a_rows(size_t mr, size_t rows, size_t k,
                               const float *a, size_t rsa, float *dst)
{
    if (rows < mr)
        memset(dst, 0, mr * k * sizeof(float));
    for (size_t i = 0; i < rows; i++) {
        const float *src = a + i * rsa;
        for (size_t l = 0; l < k; l++)
            dst[l * mr + i] = src[l];
    }
}

void masa__pack_a(const masa_ukr *u, size_t m, size_t k, const float *a,
                  size_t rsa, size_t csa, float *dst)
{
    size_t mr = u->mr;
    for (size_t r0 = 0; r0 < m; r0 += mr, dst += mr * k) {
        size_t rows = m - r0 < mr ? m - r0 : mr;
        const float *src = a + r0 * rsa;
        if (csa == 1) {
            if (mr == 6) /* BLIS's AVX2 kernels (haswell, zen*) */
                pack_a_rows(6, rows, k, src, rsa, dst);
            else
                pack_a_rows(mr, rows, k, src, rsa, dst);
            continue;
        }
        if (rsa == 1 && mr == 6 && rows == 6) {
            for (size_t l = 0; l < k; l++)
                for (size_t i = 0; i < 6; i++)
                    dst[l * 6 + i] = src[l * csa + i];
            continue;
        }
        for (size_t l = 0; l < k; l++) {
            float *d = dst + l * mr;
            if (rsa == 1)
                memcpy(d, src + l * csa, rows * sizeof(float));
            else
                for (size_t i = 0; i < rows; i++)
                    d[i] = src[i * rsa + l * csa];
            for (size_t i = rows; i < mr; i++)
                d[i] = 0.0f;
        }
    }
}

/* One NR-column panel of B (k rows); NR is a constant here so the copies
 * vectorise. */
static inline void pack_b_panel(size_t nr, size_t cols, size_t k,
                                const float *b, size_t rsb, size_t csb,
                                float *dst)
{
    if (cols < nr)
        memset(dst, 0, k * nr * sizeof(float));
    if (csb == 1) {
        for (size_t l = 0; l < k; l++)
            for (size_t j = 0; j < cols; j++)
                dst[l * nr + j] = b[l * rsb + j];
        return;
    }
    /* columns of B are rows in memory (K^T, V^T): read them contiguously */
    for (size_t j = 0; j < cols; j++) {
        const float *col = b + j * csb;
        for (size_t l = 0; l < k; l++)
            dst[l * nr + j] = col[l * rsb];
    }
}

void masa__pack_b(const masa_ukr *u, size_t k, size_t n, const float *b,
                  size_t rsb, size_t csb, float *dst)
{
    size_t nr = u->nr;
    for (size_t c0 = 0; c0 < n; c0 += nr, dst += k * nr) {
        size_t cols = n - c0 < nr ? n - c0 : nr;
        if (nr == 16 && cols == 16) /* BLIS's AVX2 kernels */
            pack_b_panel(16, 16, k, b + c0 * csb, rsb, csb, dst);
        else
            pack_b_panel(nr, cols, k, b + c0 * csb, rsb, csb, dst);
    }
}

void masa__pack_key_tile(const masa_attn_args *a, const masa_ukr *u,
                         size_t b, size_t g, size_t t, float *ka, float *va,
                         float *vb, float *kb)
{
    const masa_layer *L = a->layer;
    size_t T = a->seq, hd = L->head_dim, j0 = t * MASA_FLASH_BK;
    size_t n = T - j0 < MASA_FLASH_BK ? T - j0 : MASA_FLASH_BK;
    const float *k = a->k + (b * T + j0) * L->dkv + g * hd;
    const float *v = a->v + (b * T + j0) * L->dkv + g * hd;
    if (ka)
        masa__pack_a(u, n, hd, k, L->dkv, 1, ka);
    if (va)
        masa__pack_a(u, n, hd, v, L->dkv, 1, va);
    if (vb)
        masa__pack_b(u, n, hd, v, L->dkv, 1, vb);
    if (kb)
        masa__pack_b(u, n, hd, k, L->dkv, 1, kb);
}

static void axpy(size_t n, float a, const float *x, float *y)
{
    for (size_t i = 0; i < n; i++)
        y[i] += a * x[i];
}

void masa__tile_product(const masa_ukr *u, const masa_tile_product *p)
{
    sgemm_ukr_ft ukr = (sgemm_ukr_ft)u->fn;
    size_t mr = u->mr, nr = u->nr, m = p->m, n = p->n, k = p->k;
    float alpha = p->alpha, beta = p->beta;
    size_t bk = p->bp_k ? p->bp_k : k; /* B's panel stride / NR */
    auxinfo_t aux;
    memset(&aux, 0, sizeof aux);
    for (size_t r0 = 0; r0 < m; r0 += mr) {
        size_t rows = m - r0 < mr ? m - r0 : mr;
        /* the inner range every row of the panel sees */
        size_t klo = 0, khi = k;
        if (p->kind == MASA_PRODUCT_ROWS)
            khi = masa__mask_row_len(p->mask, r0, k);
        else
            klo = masa__mask_col_start(p->mask, r0 + rows - 1, k);
        const float *ap = p->ap + r0 * k + klo * mr;
        float *c = p->c + r0 * p->ldc;
        size_t csc = p->csc ? p->csc : 1;
        for (size_t c0 = 0; c0 < n; c0 += nr) {
            size_t cols = n - c0 < nr ? n - c0 : nr;
            float *bp = (float *)p->bp + c0 * bk + klo * nr;
            bli_auxinfo_set_next_ab((void *)ap, bp, &aux);
            if (khi > klo || beta != 1.0f)
                ukr((dim_t)rows, (dim_t)cols, (dim_t)(khi - klo), &alpha,
                    (float *)ap, bp, &beta, c + c0 * csc, (inc_t)p->ldc,
                    (inc_t)csc, &aux,
                    (cntx_t *)u->cntx);
        }
        if (!p->mask.masked)
            continue;
        /* the triangle: row r of C meets inner indices [khi, its end) or
         * [its start, klo), from the unpacked operands */
        for (size_t r = r0; r < r0 + rows; r++) {
            float *cr = p->c + r * p->ldc;
            if (p->kind == MASA_PRODUCT_ROWS) {
                size_t end = masa__mask_row_len(p->mask, r, k);
                for (size_t j = khi; j < end; j++)
                    axpy(n, alpha * p->a[r * p->lda + j], p->b + j * p->ldb,
                         cr);
            } else {
                size_t start = masa__mask_col_start(p->mask, r, k);
                for (size_t i = start; i < klo; i++)
                    axpy(n, alpha * p->a[i * p->lda + r], p->b + i * p->ldb,
                         cr);
            }
        }
    }
}
