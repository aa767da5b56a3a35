/*
 * libmasa: compressing pretrained weights into MASA form ("Matrix PCA"),
 * choosing layer groups under a parameter budget, calibration statistics and
 * the whitened low-rank residual.
 *
 * Included by masa/masa.h; the conventions listed at the top of masa.h
 * (row-major float32, status returns, masa_last_error(), nothing modified on
 * failure, sizes in elements) apply here too, with these additions:
 * - Gram matrices, eigenvalues, calibration matrices and reported energies
 *   are float64 (double): sums over millions of products lose too much in
 *   float32.
 * - Functions that take a context allocate their scratch through the
 *   context's allocator hook and run on the context's threads. Several
 *   threads may call them at once with one context, as long as their output
 *   buffers differ.
 * - Result structs begin with their size: set `size = sizeof(struct)` (the
 *   *_init macros do) before the call. The library fills the fields that fit
 *   in `size` bytes, so an older program's smaller struct is never overrun.
 *   A size below the first version's struct is refused (BAD_STRUCT_SIZE).
 * - Factorisations run on LAPACK (through LAPACKE), matrix products on BLIS.
 *
 * ------------------------------------------------------------------------
 * The math (one projection type, one group of L consecutive layers)
 * ------------------------------------------------------------------------
 *   G[i, j] = <W_i, W_j>_F              Gram, L x L, float64
 *   G = V diag(lambda) V^T             eigenvalues descending
 *   D_s = sum_l V[l, s] W_l / sqrt(lambda_s)   atoms, orthonormal under the
 *                                       Frobenius inner product
 *   c[l, s] = sqrt(lambda_s) V[l, s]    = <D_s, W_l>_F
 *   sum_l ||W_l - sum_s c[l, s] D_s||_F^2 = sum of the dropped eigenvalues
 * Eigenvectors are only defined up to sign: each column of V is flipped so
 * that its entry of largest magnitude is positive (ties: the first), which
 * makes the atoms reproducible.
 */
#ifndef MASA_COMPRESS_H
#define MASA_COMPRESS_H

#include "masa.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ======================================================================
 * Gram matrix and Matrix PCA
 * ====================================================================== */

/* Eigenvalues below MASA_PCA_RANK_RTOL * (largest eigenvalue) count as zero:
 * the numerical rank of a Gram is the number of eigenvalues above that.
 * (An atom divides by sqrt(lambda_s); with the Gram's rounding error of about
 * 1e-16 * lambda_max, smaller eigenvalues would give atoms whose
 * orthonormality is not even float32-accurate.) */
#define MASA_PCA_RANK_RTOL 1e-10

/* The Gram of n_mats matrices, each rows x cols floats:
 * gram[i * n_mats + j] = <W_i, W_j>_F = sum_k W_i[k] W_j[k], accumulated in
 * float64 (exact products, BLIS dsyrk over blocks converted to double).
 * mats[i] points at matrix i (row-major, contiguous; the matrices need not be
 * adjacent, e.g. tensors of a memory-mapped file). gram: n_mats * n_mats
 * doubles (gram_len is its capacity), both triangles written.
 * Errors: NULL_ARGUMENT (ctx, mats, any mats[i], gram), BAD_SHAPE (a zero
 * size), OVERFLOW, BUFFER_TOO_SMALL, INVALID_ARGUMENT (a non-finite element;
 * the message names the matrix), OUT_OF_MEMORY. */
MASA_API masa_status masa_gram(masa_context *ctx, size_t n_mats, size_t rows,
                               size_t cols, const float *const *mats,
                               double *gram, size_t gram_len);

/* All n eigenvalues of the symmetric n x n matrix `gram` (row stride
 * gram_ld >= n; only the lower triangle is read), descending, into
 * eigenvalues (n doubles; tiny negative values from rounding are reported as
 * they come). A consecutive group of layers [first, first + count) of a full
 * L x L Gram is gram + first * L + first with gram_ld = L. The error of
 * keeping S atoms for that group is the sum of eigenvalues S..count-1.
 * Errors: NULL_ARGUMENT, BAD_SHAPE (n == 0, gram_ld < n), INVALID_ARGUMENT
 * (non-finite entry), OUT_OF_MEMORY, INTERNAL (LAPACK did not converge). */
MASA_API masa_status masa_gram_eigenvalues(masa_context *ctx, size_t n,
                                           const double *gram, size_t gram_ld,
                                           double *eigenvalues);

/* What masa_matrix_pca() reports. */
typedef struct masa_pca_result {
    size_t size;            /* sizeof(masa_pca_result), set by _init */
    size_t rank;            /* numerical rank of the Gram (see RTOL above) */
    double total_energy;    /* sum_l ||W_l||_F^2 = trace of the Gram */
    double captured_energy; /* sum of the kept eigenvalues */
    double residual_energy; /* sum of the dropped eigenvalues (each clamped
                               at >= 0): the squared reconstruction error */
} masa_pca_result;

MASA_API void masa_pca_result_default(masa_pca_result *result, size_t size);
#define masa_pca_result_init(result) \
    masa_pca_result_default((result), sizeof *(result))

/* Matrix PCA of one group: n_atoms atoms and the n_mats x n_atoms
 * coefficients of the matrices mats[0..n_mats) (each rows x cols, see
 * masa_gram), as in "The math" above.
 * gram: the group's Gram if the caller has it (row stride gram_ld >= n_mats,
 *   lower triangle read; e.g. a sub-block of a whole-model Gram), or NULL to
 *   compute it here.
 * atoms: n_atoms * rows * cols floats (atoms_len is the capacity), written in
 *   the dictionary layout (atom s at s * rows * cols, row-major).
 * coefs: n_mats * n_atoms floats, c[l, s] at l * n_atoms + s (the
 *   coefficient-table layout).
 * eigenvalues: NULL, or n_mats doubles (all eigenvalues, descending).
 * result: NULL, or a size-prefixed struct (see above).
 * Each matrix is read twice (Gram, atoms), once more when gram is given (the
 * finiteness check comes before anything is written).
 * Errors: NULL_ARGUMENT, BAD_SHAPE (zero sizes, gram_ld < n_mats),
 * INVALID_ARGUMENT (n_atoms > n_mats; n_atoms above the numerical rank, with
 * the rank in the message; a non-finite element), BUFFER_TOO_SMALL,
 * OVERFLOW, BAD_STRUCT_SIZE, OUT_OF_MEMORY, INTERNAL (LAPACK). On failure
 * atoms, coefs, eigenvalues and result are unchanged. */
MASA_API masa_status masa_matrix_pca(masa_context *ctx, size_t n_mats,
                                     size_t rows, size_t cols,
                                     const float *const *mats,
                                     const double *gram, size_t gram_ld,
                                     size_t n_atoms, float *atoms,
                                     size_t atoms_len, float *coefs,
                                     size_t coefs_len, double *eigenvalues,
                                     masa_pca_result *result);

/* masa_matrix_pca() into a new library-owned dictionary (n_atoms atoms of
 * rows x cols) and coefficient table (n_mats x n_atoms), ready for
 * masa_layer_set_masa() (layer l of the group is row l of the table). The
 * caller destroys both. On failure *dict and *coef are NULL. */
MASA_API masa_status masa_matrix_pca_create(masa_context *ctx, size_t n_mats,
                                            size_t rows, size_t cols,
                                            const float *const *mats,
                                            const double *gram,
                                            size_t gram_ld, size_t n_atoms,
                                            masa_dictionary **dict,
                                            masa_coefficients **coef,
                                            masa_pca_result *result);

/* ======================================================================
 * Grouping: consecutive layer groups and atoms per group under a budget
 * ======================================================================
 * L layers of one projection type (matrices rows x cols, N = rows * cols)
 * are split into consecutive groups g = [start_g, start_(g+1)) of L_g
 * layers, each with its own dictionary of S_g atoms (1 <= S_g <= L_g).
 * Parameters: sum_g S_g * (N + L_g) (atoms plus coefficients). The error of a
 * plan is the sum over groups of the group's dropped eigenvalues (exact:
 * the eigenvalues of the group's Gram sub-block, clamped at >= 0), i.e.
 * sum_l ||W_l - W^_l||_F^2. A plan minimises the error with parameters <=
 * budget; among plans of equal error, the one with fewer parameters.
 * The whole-model Gram (masa_gram() of all L layers) is the input; the
 * planner solves one eigenproblem per consecutive segment (L(L+1)/2 of at
 * most L x L) and a dynamic program over the segments whose states are the
 * Pareto fronts of (parameters, error): exact, no heuristics. L is at most
 * 256 (INVALID_ARGUMENT above); 80 layers take about a second.
 * Note: for equal atom counts one group is never worse than several (its
 * best rank-T subspace beats any union of smaller ones), so with
 * N >> L^2 groups only pay off where the coefficients they save buy an
 * atom; the planner says so exactly rather than by rule of thumb.
 */

typedef struct masa_group_plan_result {
    size_t size;           /* sizeof(masa_group_plan_result), set by _init */
    size_t n_groups;       /* groups in the plan */
    size_t params;         /* sum_g S_g * (N + L_g) */
    double error;          /* sum of the dropped eigenvalues of every group */
    double total_energy;   /* trace of the Gram: error / total_energy is the
                              relative squared error */
} masa_group_plan_result;

MASA_API void masa_group_plan_result_default(masa_group_plan_result *result,
                                             size_t size);
#define masa_group_plan_result_init(result) \
    masa_group_plan_result_default((result), sizeof *(result))

/* Chooses the cuts and each group's atom count. gram: n_layers x n_layers
 * (row-major, lower triangle read). rows, cols: the shape of one layer's
 * matrix. budget: the most parameters allowed.
 * group_starts, group_atoms: capacity entries each (capacity >= n_layers is
 * always enough); group g starts at layer group_starts[g] (group_starts[0]
 * = 0) and has group_atoms[g] atoms; result->n_groups tells how many.
 * Errors: NULL_ARGUMENT (result is required), BAD_SHAPE, BAD_STRUCT_SIZE,
 * OVERFLOW, INVALID_ARGUMENT (budget below the cheapest plan, one group with
 * one atom: N + n_layers; the message gives that minimum; non-finite gram),
 * BUFFER_TOO_SMALL (capacity below the chosen plan's group count; nothing
 * written), OUT_OF_MEMORY, INTERNAL (LAPACK). */
MASA_API masa_status masa_group_plan(masa_context *ctx, size_t n_layers,
                                     const double *gram, size_t rows,
                                     size_t cols, size_t budget,
                                     size_t *group_starts,
                                     size_t *group_atoms, size_t capacity,
                                     masa_group_plan_result *result);

/* The same for cuts the caller chose (e.g. where the logit-lens KL drift
 * between consecutive layers is largest): group_starts (n_groups entries,
 * group_starts[0] == 0, strictly increasing, all < n_layers) is input; the
 * atoms per group that minimise the error under the budget go to
 * group_atoms (n_groups entries).
 * Errors: as masa_group_plan(), and INVALID_ARGUMENT for bad starts or a
 * budget below sum_g (N + L_g) (one atom per group). */
MASA_API masa_status masa_group_plan_fixed(masa_context *ctx, size_t n_layers,
                                           const double *gram, size_t rows,
                                           size_t cols, size_t budget,
                                           size_t n_groups,
                                           const size_t *group_starts,
                                           size_t *group_atoms,
                                           masa_group_plan_result *result);

/* ======================================================================
 * Calibration statistics: C = X^T X of a projection's input rows
 * ======================================================================
 * A handle accumulating C = sum over rows x of x^T x (dim x dim, float64)
 * and the number of rows seen, from float32 row batches (e.g. a framework's
 * forward hooks during calibration). Handles of the same dim merge (e.g.
 * partial statistics of several threads or processes).
 * Threads: accumulate, merge (destination) and destroy need exclusive access
 * to the handle; any number of threads may read a handle (data, shape,
 * merge source) while nobody modifies it. Different handles are independent.
 */

typedef struct masa_calib masa_calib;

/* A handle for rows of dim features, C = 0, rows = 0. The dim x dim doubles
 * are allocated through ctx's allocator. Errors: NULL_ARGUMENT, BAD_SHAPE
 * (dim == 0), OVERFLOW, OUT_OF_MEMORY. */
MASA_API masa_status masa_calib_create(masa_context *ctx, size_t dim,
                                       masa_calib **out);

/* A handle holding a copy of saved statistics: matrix (dim x dim doubles,
 * row-major; must be symmetric and finite) and the row count behind it.
 * Errors: as masa_calib_create, INVALID_ARGUMENT (non-finite or asymmetric
 * matrix: entries differing by more than 1e-12 of the largest). */
MASA_API masa_status masa_calib_create_from_data(masa_context *ctx, size_t dim,
                                                 const double *matrix,
                                                 uint64_t n_rows,
                                                 masa_calib **out);

MASA_API void masa_calib_destroy(masa_calib *calib);

/* C += X^T X for x of n_rows x dim floats (row-major), rows += n_rows. The
 * rows are converted to double in blocks and the product runs on BLIS
 * (dsyrk), on the context's threads. n_rows == 0 is allowed (no-op).
 * Errors: NULL_ARGUMENT, INVALID_ARGUMENT (a non-finite element; nothing
 * added), OVERFLOW, OUT_OF_MEMORY. */
MASA_API masa_status masa_calib_accumulate(masa_calib *calib, const float *x,
                                           size_t n_rows);

/* dst += src (matrices and row counts). Same dim required (BAD_SHAPE);
 * src == dst is refused (INVALID_ARGUMENT). */
MASA_API masa_status masa_calib_merge(masa_calib *dst, const masa_calib *src);

/* dim and rows seen; either output may be NULL. */
MASA_API masa_status masa_calib_shape(const masa_calib *calib, size_t *dim,
                                      uint64_t *n_rows);

/* The accumulated matrix: dim x dim doubles, row-major, both triangles
 * filled (symmetric). Read-only; valid until the next accumulate or merge
 * into this handle or its destruction. NULL when calib is NULL. */
MASA_API const double *masa_calib_data(const masa_calib *calib);

/* ======================================================================
 * Whitened low-rank residual (SVD-LLM's step on a layer's residual)
 * ======================================================================
 * For E = W - W_hat (d_in x d_out; W_hat the MASA reconstruction), and C
 * the calibration matrix of the projection's input (d_in x d_in), find
 * A (d_in x r), B (r x d_out) minimising ||X (E - A B)||_F^2, where
 * C = X^T X:
 *   C = R R^T (Cholesky, R lower; on failure jitter * I is added, jitter =
 *       t * mean(diag C) for t = 1e-10, 1e-8, 1e-6, 1e-4, 1e-2 in turn),
 *   R^T E = U Sigma V^T (LAPACK dgesdd), keep the top r,
 *   A = R^-T U_r Sigma_r^(1/2) (triangular solve, no inverse formed),
 *   B = Sigma_r^(1/2) V_r^T.
 * With C NULL (C = I): plain truncated SVD of E, A = U_r Sigma_r^(1/2).
 * All arithmetic is in double; A and B are rounded to float32 at the end.
 * Memory: scratch of 2 d_in d_out + d_in k + k d_out (+ d_in^2 with C)
 * doubles, k = min(d_in, d_out), plus LAPACK's SVD workspace (about 3 k^2
 * doubles): about 1 GiB for d_in = d_out = 4096. Time: the full thin SVD
 * dominates (O(d^3); a few CPU-seconds at d = 2048).
 */

typedef struct masa_residual_result {
    size_t size;          /* sizeof(masa_residual_result), set by _init */
    double error_before;  /* ||R^T E||_F^2 = tr(E^T C' E) (C' = C + jitter
                             I; plain ||E||_F^2 without C) */
    double error_after;   /* ||R^T (E - A B)||_F^2 with the float32 A and B
                             returned (computed, not inferred; equals the
                             sum of the dropped squared singular values up
                             to float32 rounding of A and B) */
    double dropped;       /* sum of the dropped squared singular values */
    double jitter;        /* added to C's diagonal (0 when none was needed) */
} masa_residual_result;

MASA_API void masa_residual_result_default(masa_residual_result *result,
                                           size_t size);
#define masa_residual_result_init(result) \
    masa_residual_result_default((result), sizeof *(result))

/* Rank-`rank` factors of the residual. w: d_in x d_out floats; w_hat: the
 * same shape or NULL (then E = w itself). calib: d_in x d_in doubles
 * (row-major, lower triangle read, e.g. masa_calib_data()) or NULL for the
 * unwhitened SVD. a: d_in * rank floats (a_len its capacity), row-major;
 * b: rank * d_out floats. result may be NULL.
 * Errors: NULL_ARGUMENT, BAD_SHAPE (zero sizes, rank 0), INVALID_ARGUMENT
 * (rank above min(d_in, d_out); non-finite w, w_hat or calib; calib not positive
 * definite even with the largest jitter), BUFFER_TOO_SMALL, OVERFLOW,
 * BAD_STRUCT_SIZE, OUT_OF_MEMORY, INTERNAL (LAPACK did not converge).
 * On failure a, b and result are unchanged. */
MASA_API masa_status masa_residual_lowrank(masa_context *ctx, size_t d_in,
                                           size_t d_out, const float *w,
                                           const float *w_hat,
                                           const double *calib, size_t rank,
                                           float *a, size_t a_len, float *b,
                                           size_t b_len,
                                           masa_residual_result *result);

#ifdef __cplusplus
}
#endif

#endif /* MASA_COMPRESS_H */
