/* Internals of the attention core (attention_*.c, fast_exp.c). */
#ifndef MASA_ATTENTION_CORE_H
#define MASA_ATTENTION_CORE_H

#include <stdbool.h>
#include <stddef.h>

#include "internal.h"

/* Query rows and keys per tile. Per thread, forward keeps a BQ x BK score
 * tile and backward two (P and dP): 128 x 128 floats is 64 KiB each, so with
 * the Q, K, V and dO slices of a tile (head_dim 64: 32 KiB each) everything
 * stays in a 512 KiB L2. Overridable at build time; the tests also build the
 * library with tiny blocks to reach the multi-tile paths at small seq. */
#ifndef MASA_FLASH_BQ
#define MASA_FLASH_BQ 128
#endif
#ifndef MASA_FLASH_BK
#define MASA_FLASH_BK 128
#endif

/* Causal mask of a (query tile, key tile) pair: row r of the tile may see
 * column j iff j <= r + diag (diag = first query - first key); masked = false
 * means every entry is visible. */
typedef struct masa_tile_mask {
    bool masked;
    ptrdiff_t diag;
} masa_tile_mask;

/* Visible columns of row r (0..n). */
size_t masa__mask_row_len(masa_tile_mask mask, size_t r, size_t n);
/* First row that sees column j (0..m). */
size_t masa__mask_col_start(masa_tile_mask mask, size_t j, size_t m);

/* C[m x hd] += alpha A[m x n] B[n x hd], row r of A restricted to its
 * visible columns. Masked entries of A and the rows of B they would meet are
 * never read, so a NaN there cannot reach C. */
void masa__attn_rows_product(size_t m, size_t n, size_t hd,
                             masa_tile_mask mask, float alpha, const float *a,
                             size_t lda, const float *b, size_t ldb, float *c,
                             size_t ldc);

/* C[n x hd] += alpha A[m x n]^T B[m x hd], column j of A restricted to the
 * rows that see it (same guarantee). */
void masa__attn_cols_product(size_t m, size_t n, size_t hd,
                             masa_tile_mask mask, float alpha, const float *a,
                             size_t lda, const float *b, size_t ldb, float *c,
                             size_t ldc);

/* ---- softmax row kernels (fast_exp.c) ---- */

/* x[i] = exp(x[i] - shift) for i < n; returns the sum of the results. */
float masa__exp_shifted(float *x, size_t n, float shift);
/* max(init, x[0..n)), NaN entries skipped. */
float masa__row_max(const float *x, size_t n, float init);
/* The plain versions (expf), used where AVX2+FMA are missing. */
float masa__exp_shifted_portable(float *x, size_t n, float shift);
float masa__row_max_portable(const float *x, size_t n, float init);
/* Whether the CPU runs the AVX2 versions (then also callable directly). */
bool masa__exp_has_avx2(void);
float masa__exp_shifted_avx2(float *x, size_t n, float shift);
float masa__row_max_avx2(const float *x, size_t n, float init);

#endif
