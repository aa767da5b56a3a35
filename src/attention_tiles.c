/* Products of a causal tile that skip its masked half. Multiplying a masked
 * probability 0 by a future token's value would still turn a NaN or an inf
 * there into a NaN here, so masked entries are never read: the part of the
 * tile every row (or column) sees goes to one BLIS product, the rest in
 * strips of STRIP rows, each a BLIS product over what all its rows see plus a
 * small triangle done by hand. */
#include "attention_core.h"

#define STRIP 16

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

static void axpy(size_t n, float a, const float *x, float *y)
{
    for (size_t i = 0; i < n; i++)
        y[i] += a * x[i];
}

void masa__attn_rows_product(size_t m, size_t n, size_t hd,
                             masa_tile_mask mask, float alpha, const float *a,
                             size_t lda, const float *b, size_t ldb, float *c,
                             size_t ldc)
{
    /* rows that see the whole tile: a suffix */
    size_t full = mask.masked ? clamp((ptrdiff_t)n - 1 - mask.diag, m) : 0;
    if (full < m)
        masa__gemm(m - full, hd, n, alpha, a + full * lda, lda, 1, b, ldb, 1,
                   1.0f, c + full * ldc, ldc, 1, 1);
    for (size_t r0 = 0; r0 < full; r0 += STRIP) {
        size_t r1 = r0 + STRIP < full ? r0 + STRIP : full;
        size_t k0 = masa__mask_row_len(mask, r0, n);
        if (k0 > 0)
            masa__gemm(r1 - r0, hd, k0, alpha, a + r0 * lda, lda, 1, b, ldb,
                       1, 1.0f, c + r0 * ldc, ldc, 1, 1);
        for (size_t r = r0; r < r1; r++) {
            size_t k1 = masa__mask_row_len(mask, r, n);
            for (size_t j = k0; j < k1; j++)
                axpy(hd, alpha * a[r * lda + j], b + j * ldb, c + r * ldc);
        }
    }
}

void masa__attn_cols_product(size_t m, size_t n, size_t hd,
                             masa_tile_mask mask, float alpha, const float *a,
                             size_t lda, const float *b, size_t ldb, float *c,
                             size_t ldc)
{
    /* columns every row sees: a prefix */
    size_t all = mask.masked ? clamp(mask.diag + 1, n) : n;
    if (all > 0)
        masa__gemm(all, hd, m, alpha, a, 1, lda, b, ldb, 1, 1.0f, c, ldc, 1,
                   1);
    for (size_t j0 = all; j0 < n; j0 += STRIP) {
        size_t j1 = j0 + STRIP < n ? j0 + STRIP : n;
        size_t r_lo = masa__mask_col_start(mask, j1 - 1, m);
        if (r_lo < m)
            masa__gemm(j1 - j0, hd, m - r_lo, alpha, a + r_lo * lda + j0, 1,
                       lda, b + r_lo * ldb, ldb, 1, 1.0f, c + j0 * ldc, ldc,
                       1, 1);
        for (size_t j = j0; j < j1; j++) {
            size_t r_first = masa__mask_col_start(mask, j, m);
            for (size_t r = r_first; r < r_lo; r++)
                axpy(hd, alpha * a[r * lda + j], b + r * ldb, c + j * ldc);
        }
    }
}
