/*
 * Independent double-precision reference of the compression code: Gram,
 * a cyclic Jacobi eigensolver (not LAPACK's divide and conquer), Cholesky,
 * the X^T X sum. Plain loops, no BLIS and no LAPACK.
 */
#ifndef MASA_TESTS_REFERENCE_COMPRESS_H
#define MASA_TESTS_REFERENCE_COMPRESS_H

#include <stddef.h>

/* g (n x n) = <W_i, W_j> over n_cols elements per matrix. */
void ref_gram(size_t n, size_t n_cols, const float *const *mats, double *g);

/* Eigenvalues (descending) and eigenvectors of the symmetric n x n matrix a
 * (row stride lda; not modified): vectors column s of v (n x n row-major),
 * signed so the entry of largest magnitude is positive (as the library). */
void ref_eigen(size_t n, const double *a, size_t lda, double *w, double *v);

/* C = R R^T, R lower (n x n row-major). Returns 0 unless C is not positive
 * definite. */
int ref_cholesky(size_t n, const double *c, double *r);

/* c (dim x dim) = X^T X of x (rows x dim floats). */
void ref_xtx(size_t rows, size_t dim, const float *x, double *c);

#endif
