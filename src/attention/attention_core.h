/* Internals of the attention core (attention_*.c, fast_exp.c). */
#ifndef MASA_ATTENTION_CORE_H
#define MASA_ATTENTION_CORE_H

#include <stdbool.h>
#include <stddef.h>

#include "common/internal.h"

/* Query rows and keys per tile. Per thread, forward keeps a BQ x BK score
 * tile and backward two (P and dP) plus three packed copies (dS, P^T,
 * dS^T): 128 x 128 floats is 64 KiB each, and a key tile's packed K and V
 * (head_dim 64) 32 KiB each, so the working set of a tile pair stays within
 * a 512 KiB L2. On the 2-core Zen 3 machine, 64 x 128, 128 x 64, 192 x 128
 * and 128 x 256 measured within noise of 128 x 128 (B=4, T=512, H=8).
 * Overridable at build time; the tests also build the library with tiny
 * blocks to reach the multi-tile paths at small seq. */
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

/* ---- tile products on BLIS's micro-kernel (attention_tiles.c) ---- */

/* BLIS's single-precision gemm micro-kernel for this CPU and its register
 * block MR x NR. */
typedef struct masa_ukr {
    void (*fn)(void);
    void *cntx;
    size_t mr, nr;
} masa_ukr;
void masa__ukr_query(masa_ukr *u);

/* Packed operands: A (m x k) in MR-row panels, B (k x n) in NR-column
 * panels, zero-padded; sizes in floats. */
size_t masa__pack_a_floats(const masa_ukr *u, size_t m, size_t k);
size_t masa__pack_b_floats(const masa_ukr *u, size_t k, size_t n);
void masa__pack_a(const masa_ukr *u, size_t m, size_t k, const float *a,
                  size_t rsa, size_t csa, float *dst);
void masa__pack_b(const masa_ukr *u, size_t k, size_t n, const float *b,
                  size_t rsb, size_t csb, float *dst);

/* Key tile t (keys t BK ...) of key/value head g of sequence b: K and V
 * packed as A (ka, va) and as B (kb, vb); NULL outputs are skipped. */
void masa__pack_key_tile(const masa_attn_args *a, const masa_ukr *u,
                         size_t b, size_t g, size_t t, float *ka, float *va,
                         float *vb, float *kb);

typedef enum masa_product_kind {
    /* C rows are query rows, the inner index runs over keys: row r of C
     * uses keys [0, masa__mask_row_len(r)) (O += P V, dQ += dS K) */
    MASA_PRODUCT_ROWS,
    /* C rows are keys, the inner index runs over query rows: row j of C
     * uses queries [masa__mask_col_start(j), k) (dV += P^T dO, ...) */
    MASA_PRODUCT_COLS
} masa_product_kind;

/* C[m x n] = alpha A B + beta C with A, B packed (m x k, k x n), C with
 * row stride ldc and column stride csc. With a mask, masked inner terms are never read: the triangle
 * the micro-kernel cannot take is added from the unpacked operands: a, the
 * row-major query x key tile (lda), and b, the rows of the other operand
 * indexed by the inner index (ldb). beta must be 1 with a mask. B may have
 * been packed with a longer inner length bp_k (a whole key tile of which
 * the causal range uses the first k keys): its panels are bp_k * NR apart. */
typedef struct masa_tile_product {
    masa_product_kind kind;
    masa_tile_mask mask;
    size_t m, n, k;
    float alpha, beta;
    const float *ap, *bp;
    size_t bp_k; /* inner length B was packed with (>= k), 0: k */
    float *c;
    size_t ldc, csc; /* csc 0: 1 */
    const float *a, *b;
    size_t lda, ldb;
} masa_tile_product;
void masa__tile_product(const masa_ukr *u, const masa_tile_product *p);

/* Per-thread scratch of the attention core, carved from one float array:
 * next 64-byte aligned block of n floats (packed B panels are read with
 * aligned loads); each block costs at most ALIGN_SLACK extra floats. */
#define MASA_ATTN_ALIGN_SLACK 16
float *masa__attn_carve(float **at, size_t n);

/* Floats of backward's per-thread scratch (attention_backward.c). */
size_t masa__attention_backward_floats(const masa_ukr *u, size_t seq,
                                       size_t head_dim);

/* ---- softmax row kernels (fast_exp.c) ---- */

/* x[i] = exp(x[i] - shift) for i < n; returns the sum of the results. */
float masa__exp_shifted(float *x, size_t n, float shift);
/* max(init, x[0..n)), NaN entries skipped. */
float masa__row_max(const float *x, size_t n, float init);
/* The entries of a softmax row with p > MASA_BIG_P, in order: a row whose p
 * sum to 1 has fewer than MASA_BIG_MAX (any beyond are dropped). */
#define MASA_BIG_P 0.125f
#define MASA_BIG_MAX 8
typedef struct masa_big_p {
    size_t n, j[MASA_BIG_MAX];
} masa_big_p;

/* Backward's softmax row: p[j] <- exp((p[j] - row_max) - log_sum) (scores
 * in, probabilities out) and dp[j] <- p[j] (dp[j] - delta) (dP in, dS out)
 * for j < n; returns the sum of the dS and in *big the entries with p above
 * MASA_BIG_P. */
float masa__softmax_grad_row(float *p, float *dp, size_t n, float row_max,
                             float log_sum, float delta, masa_big_p *big);
/* The plain versions (expf), used where AVX2+FMA are missing. */
float masa__exp_shifted_portable(float *x, size_t n, float shift);
float masa__row_max_portable(const float *x, size_t n, float init);
float masa__softmax_grad_row_portable(float *p, float *dp, size_t n,
                                      float row_max, float log_sum,
                                      float delta, masa_big_p *big);
/* Callable when masa__cpu_has_avx2_fma() (internal.h). */
float masa__exp_shifted_avx2(float *x, size_t n, float shift);
float masa__row_max_avx2(const float *x, size_t n, float init);
float masa__softmax_grad_row_avx2(float *p, float *dp, size_t n,
                                  float row_max, float log_sum, float delta,
                                  masa_big_p *big);

#endif
