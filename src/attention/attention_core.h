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

/* How a product C = A B runs on the micro-kernel, given how C is stored.
 * Stored as the kernel prefers: directly, A packed in MR-row panels and B in
 * NR-column panels. Stored the other way (the kernel would compute into a
 * temporary and copy it out with a scalar strided loop): as the transposed
 * product C^T = B^T A^T, which the kernel sees stored as it prefers, with A
 * packed in NR panels and B in MR panels. A panel of A of width w is laid
 * out exactly as a panel of A^T of width w, so the packers serve both. */
typedef struct masa_orient {
    size_t wa, wb; /* panel widths of A and of B */
    bool swap;     /* run as C^T = B^T A^T */
} masa_orient;

/* BLIS's single-precision gemm micro-kernel for this CPU and its blocking,
 * all as BLIS's context reports them at run time (skx: 32 x 12, prefers
 * column-stored C; haswell, zen3: 6 x 16, prefers rows; sandybridge: 8 x 8,
 * columns). c_rows / c_cols: the orientation of a product whose C is stored
 * by rows (column stride 1) / by columns (row stride 1). */
typedef struct masa_ukr {
    void (*fn)(void);
    void *cntx;
    size_t mr, nr, kc;
    bool prefers_cols;
    masa_orient c_rows, c_cols;
} masa_ukr;
void masa__ukr_query(masa_ukr *u);

/* Packed operands, k-major panels of width w (an orientation's wa or wb),
 * zero-padded: A (m x k) in w-row panels, B (k x n) in w-column panels.
 * masa__pack_floats: floats for either operand with `outer` rows (A) or
 * columns (B) in any orientation. */
size_t masa__pack_floats(const masa_ukr *u, size_t outer, size_t k);
void masa__pack_a(size_t w, size_t m, size_t k, const float *a, size_t rsa,
                  size_t csa, float *dst);
void masa__pack_b(size_t w, size_t k, size_t n, const float *b, size_t rsb,
                  size_t csb, float *dst);
/* The portable packer (panels of width w over `outer` lines of k floats,
 * line i at x + i rs_outer, element l at + l rs_inner) and the AVX-512 one,
 * callable when masa__cpu_has_avx512(); the tests compare them. */
void masa__pack_portable(size_t w, size_t outer, size_t k, const float *x,
                         size_t rs_outer, size_t rs_inner, float *dst);
void masa__pack_avx512(size_t w, size_t outer, size_t k, const float *x,
                       size_t rs_outer, size_t rs_inner, float *dst);

/* Key tile t (keys t BK ...) of key/value head g of sequence b: K and V
 * packed as A of a product with C stored by columns (ka, va: S^T = K Q^T,
 * dP^T = V dO^T) and as B of one with C stored by rows (vb, kb: O += P V,
 * dQ += dS K); NULL outputs are skipped. */
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

/* C[m x n] = alpha A B + beta C with A, B packed (m x k, k x n) as the
 * orientation o says, C with row stride ldc and column stride csc (o must be
 * the ukr's c_rows when csc is 1, its c_cols when ldc is 1). The inner index
 * is split in blocks of KC. With a mask, masked inner terms are never read: the triangle
 * the micro-kernel cannot take is added from the unpacked operands: a, the
 * row-major query x key tile (lda), and b, the rows of the other operand
 * indexed by the inner index (ldb). beta must be 1 with a mask. B may have
 * been packed with a longer inner length bp_k (a whole key tile of which
 * the causal range uses the first k keys): its panels are bp_k * wb apart. */
typedef struct masa_tile_product {
    masa_product_kind kind;
    masa_orient o;
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
/* Callable when masa__cpu_has_avx512() (internal.h). */
float masa__exp_shifted_avx512(float *x, size_t n, float shift);
float masa__row_max_avx512(const float *x, size_t n, float init);
float masa__softmax_grad_row_avx512(float *p, float *dp, size_t n,
                                    float row_max, float log_sum, float delta,
                                    masa_big_p *big);

/* x[i] *= a for i < n: the AVX-512 version when the CPU has it, else the
 * portable one (both exported for the tests). */
void masa__scale_row(float *x, size_t n, float a);
void masa__scale_row_portable(float *x, size_t n, float a);
void masa__scale_row_avx512(float *x, size_t n, float a);

#endif
