/* The Gram of a stack of matrices and eigenvalues of Gram blocks, shared by
 * Matrix PCA and the grouping planner. */
#ifndef MASA_COMPRESS_GRAM_H
#define MASA_COMPRESS_GRAM_H

#include "common/internal.h"

/* gram (n_mats x n_mats, row-major, both triangles) of matrices already
 * validated by masa__check_stack; checks finiteness. */
masa_status masa__gram(const char *fn, masa_context *ctx, size_t n_mats,
                       size_t n_cols, const float *const *mats, double *gram);

/* INVALID_ARGUMENT unless the lower triangle of the n x n block (row stride
 * ld) is finite. */
masa_status masa__check_gram(const char *fn, size_t n, const double *gram,
                             size_t ld);

/* Numerical rank: eigenvalues (descending) above MASA_PCA_RANK_RTOL times
 * the largest. */
size_t masa__gram_rank(size_t n, const double *eigenvalues);

#endif
