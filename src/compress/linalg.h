/* Float64 linear algebra of the compression code: BLIS's typed expert API
 * (per-call thread count, as src/common/blis_glue.c does for float32) and
 * LAPACKE's *_work routines with their workspace from the context's
 * allocator (the plain LAPACKE routines call malloc themselves).
 * Callers validate all arguments first: BLIS aborts on bad ones. */
#ifndef MASA_COMPRESS_LINALG_H
#define MASA_COMPRESS_LINALG_H

#include "common/internal.h"

/* Products on the context's pool: each task runs a single-threaded BLIS
 * call on its own block of columns (or rows), as masa__gemm_pool does for
 * float32 (BLIS's own threads wait for each other in spin barriers, which
 * on a loaded machine cost more than the work); small products run on the
 * calling thread. */

/* C = alpha * A B + beta * C, A m x k, B k x n, each with (row, column)
 * strides: a transpose is the same matrix with its strides swapped. */
void masa__dgemm(const masa_context *ctx, size_t m, size_t n, size_t k,
                 double alpha, const double *a, size_t rsa, size_t csa,
                 const double *b, size_t rsb, size_t csb, double beta,
                 double *c, size_t rsc, size_t csc);

/* Lower triangle of C (n x n, row stride ldc) += A A^T, A n x k with
 * strides (rsa, csa). ctx NULL: on the calling thread. */
void masa__dsyrk_lower(const masa_context *ctx, size_t n, size_t k,
                       const double *a, size_t rsa, size_t csa, double *c,
                       size_t ldc);

/* B (m x n, row-major, row stride ldb) := R^-T B, R m x m lower triangular,
 * row-major with row stride ldr (a triangular solve, no inverse). */
void masa__dtrsm_lower_trans(const masa_context *ctx, size_t m, size_t n,
                             const double *r, size_t ldr, double *b,
                             size_t ldb);

/* B (m x n, row-major, row stride ldb) := R^T B, R as above. */
void masa__dtrmm_lower_trans(const masa_context *ctx, size_t m, size_t n,
                             const double *r, size_t ldr, double *b,
                             size_t ldb);

/* Eigen-decomposition of the symmetric n x n matrix a (row stride lda, lower
 * triangle read, overwritten): eigenvalues into w DESCENDING; with vectors,
 * a's column s (row-major: a[l * lda + s]) becomes the eigenvector of w[s],
 * signed so its entry of largest magnitude is positive. fn names the public
 * function in messages. */
masa_status masa__syevd(const char *fn, const masa_context *ctx, bool vectors,
                        size_t n, double *a, size_t lda, double *w);

/* Cholesky C = R R^T of the n x n row-major c (row stride ldc, lower
 * triangle read): R overwrites the lower triangle, the strict upper triangle
 * is zeroed. Returns false when C is not (numerically) positive definite. */
bool masa__cholesky_lower(size_t n, double *c, size_t ldc);

/* Thin SVD of the row-major m x n matrix a (overwritten): with k = min(m, n),
 * s (k, descending), u (m x k row-major) and vt (k x n row-major). */
masa_status masa__gesdd(const char *fn, const masa_context *ctx, size_t m,
                        size_t n, double *a, double *s, double *u,
                        double *vt);

/* Copies the library's view of a size-prefixed result struct into the
 * caller's (the first `size` bytes; size set). BAD_STRUCT_SIZE when the
 * caller's size is below min_size. */
masa_status masa__check_result_size(const char *fn, size_t size,
                                    size_t min_size);
void masa__write_result(void *dst, const void *full, size_t full_size);

/* True when all n values are finite (no NaN or infinity). */
bool masa__all_finite_f(const float *x, size_t n);
bool masa__all_finite_d(const double *x, size_t n);

#endif
