/* One pass over L matrices of N floats each, seen as the rows of an L x N
 * "stacked" matrix that is never formed: column blocks of it are converted
 * to double (exact) and handed to a callback, split across the context's
 * pool. The Gram (G += B B^T) and the atoms (D = M B) are such passes. */
#ifndef MASA_COMPRESS_STACK_H
#define MASA_COMPRESS_STACK_H

#include "common/internal.h"

/* block: n_mats x n_cols doubles, row-major with row stride n_cols, holding
 * columns [col0, col0 + n_cols) of the stacked matrix. thread < the
 * context's thread count (per-thread scratch may be indexed by it). */
typedef void (*masa_stack_fn)(void *arg, size_t thread, size_t col0,
                              size_t n_cols, const double *block);

/* Columns per block for n_mats matrices (a block of about 512 KiB). */
size_t masa__stack_block_cols(size_t n_mats);

/* Runs fn over every column block of the stacked matrix. With check_finite,
 * a non-finite element makes it return INVALID_ARGUMENT naming the first
 * matrix that has one (fn may have seen blocks by then). */
masa_status masa__stack_pass(const char *fn_name, masa_context *ctx,
                             size_t n_mats, size_t n_cols,
                             const float *const *mats, bool check_finite,
                             masa_stack_fn fn, void *arg);

/* Validates the matrix arguments every public function over a stack shares:
 * ctx, mats and each mats[i] non-NULL, sizes nonzero, n_mats * rows * cols
 * without overflow. *n_cols = rows * cols. */
masa_status masa__check_stack(const char *fn_name, const masa_context *ctx,
                              size_t n_mats, size_t rows, size_t cols,
                              const float *const *mats, size_t *n_cols);

#endif
