/*
 * libmasa: ReplaceMe, training-free depth pruning (included by masa/masa.h).
 *
 * Blocks i+1..i+n of a transformer are removed and replaced by one linear
 * map T, merged into block i's MLP down projection, so the pruned model has
 * no extra parameters. Per calibration token (row vectors of width d):
 *
 *     Y = block i's residual stream after its attention (before the MLP)
 *     M = block i's MLP output           (block i's output is Y + M)
 *     L = block i+n's output, the raw residual stream (before any final norm)
 *
 * and T (d x d) is chosen so that Y + M T approximates L:
 *
 * - least squares: T = (M^T M + alpha I)^(-1) M^T (L - Y), from statistics
 *   accumulated in float64 over row batches (masa_linear_estimator_*);
 * - cosine: T minimises 1 - mean_rows cos(Y + M T, L), by Adam from T = I
 *   (masa_cosine_estimator_*).
 *
 * Then masa_merge_linear_map() folds T into W_down. Everything here is
 * general: X (rows x d_in) stands for M, the target for L, the offset for Y.
 *
 * The conventions of masa.h apply: float32 row-major contiguous matrices,
 * masa_status results with masa_last_error(), nothing modified on failure,
 * destroy functions accept NULL, create functions set *out to NULL on
 * failure. Non-finite inputs (NaN, infinity) are refused with
 * MASA_ERROR_INVALID_ARGUMENT before anything is changed.
 *
 * Threads: functions that modify an estimator (accumulate, merge into it,
 * reset, step, fit, set_transform, destroy) need exclusive access to it;
 * functions that only read one (rows, stats, solve, loss, transform) may run
 * concurrently with each other. Products run on the context's threads.
 */
#ifndef MASA_REPLACEME_H
#define MASA_REPLACEME_H

#include "masa.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ======================================================================
 * Least squares: statistics accumulated in float64, ridge solve
 * ====================================================================== */

typedef struct masa_linear_estimator masa_linear_estimator;

/* An estimator of T (d_in x d_out) with X T ~ target - offset: it holds
 * X^T X (d_in x d_in) and X^T (target - offset) (d_in x d_out) in float64,
 * both zero, and a row count. d_in, d_out >= 1.
 * Errors: NULL_ARGUMENT, BAD_SHAPE (a size 0), OVERFLOW, OUT_OF_MEMORY. */
MASA_API masa_status masa_linear_estimator_create(masa_context *ctx,
                                                  size_t d_in, size_t d_out,
                                                  masa_linear_estimator **out);

MASA_API void masa_linear_estimator_destroy(masa_linear_estimator *est);

/* d_in and d_out (either output pointer may be NULL). */
MASA_API masa_status masa_linear_estimator_shape(
    const masa_linear_estimator *est, size_t *d_in, size_t *d_out);

/* Adds one batch of `rows` rows: x (rows x d_in), target (rows x d_out) and
 * offset (rows x d_out, or NULL for zero); for ReplaceMe x = M, target = L,
 * offset = Y. The rows are converted to float64 in blocks and multiplied by
 * BLIS's dgemm on the context's threads; the sums are exact float64 sums of
 * the float32 inputs' products up to float64 rounding. rows = 0 adds
 * nothing. The input arrays are only read.
 * Errors: NULL_ARGUMENT (est, or an array when rows > 0), INVALID_ARGUMENT
 * (a non-finite input value; nothing is added), OVERFLOW, OUT_OF_MEMORY. */
MASA_API masa_status masa_linear_estimator_accumulate(
    masa_linear_estimator *est, size_t rows, const float *x,
    const float *target, const float *offset);

/* dst += src (the statistics and the row count), e.g. to combine estimators
 * filled on different threads or machines. src may come from another
 * context; it is only read. Errors: NULL_ARGUMENT, BAD_SHAPE (d_in or d_out
 * differ), INVALID_ARGUMENT (dst == src), OVERFLOW (row count). */
MASA_API masa_status masa_linear_estimator_merge(
    masa_linear_estimator *dst, const masa_linear_estimator *src);

/* Zeroes the statistics and the row count. */
MASA_API masa_status masa_linear_estimator_reset(masa_linear_estimator *est);

/* Rows accumulated so far (merges included). */
MASA_API masa_status masa_linear_estimator_rows(
    const masa_linear_estimator *est, uint64_t *rows);

/* Copies the statistics: xtx (d_in x d_in, row-major, symmetric) and xtz
 * (d_in x d_out) = X^T (target - offset), float64. Either may be NULL
 * (skipped). Errors: NULL_ARGUMENT (est). */
MASA_API masa_status masa_linear_estimator_stats(
    const masa_linear_estimator *est, double *xtx, double *xtz);

/* The ridge least-squares solution T = (X^T X + alpha I)^(-1) X^T Z into t
 * (d_in x d_out floats, row-major), by Cholesky factorisation of
 * X^T X + alpha I (LAPACK dpotrf, dpotrs) in float64; no inverse is formed.
 * alpha >= 0 and finite; alpha > 0 makes the system solvable when X has
 * rank < d_in (e.g. fewer rows than d_in, or linearly dependent columns).
 * The estimator is not modified (solve again with another alpha at will).
 * Errors: NULL_ARGUMENT; INVALID_ARGUMENT (alpha negative or not finite, no
 * rows accumulated, X^T X + alpha I not positive definite: the message names
 * the failing leading minor and suggests alpha > 0); OUT_OF_MEMORY. t is not
 * modified on failure. */
MASA_API masa_status masa_linear_estimator_solve(
    const masa_linear_estimator *est, double alpha, float *t);

/* ======================================================================
 * Cosine: Adam on 1 - mean cos(offset + X T, target), from T = I
 * ====================================================================== */

/* Options of the cosine estimator; initialise with masa_cosine_options_init()
 * (the size scheme of masa_context_options). The defaults are those of the
 * ReplaceMe reference: 10 epochs, learning rate 1e-4, 1024 rows per batch,
 * Adam's beta1 0.9, beta2 0.999, eps 1e-8, seed 0. */
typedef struct masa_cosine_options {
    size_t size;          /* sizeof(masa_cosine_options), set by _init */
    size_t epochs;        /* passes over the rows in masa_cosine_estimator_fit */
    size_t batch_rows;    /* rows per Adam step in _fit (the last batch of an
                             epoch may be smaller) */
    float learning_rate;  /* > 0 */
    float beta1, beta2;   /* in [0, 1) */
    float eps;            /* > 0 */
    uint64_t seed;        /* the order of rows in each epoch of _fit */
} masa_cosine_options;

/* Writes the defaults into the first `size` bytes of *options and sets
 * options->size = size. Does nothing when options is NULL or size <
 * sizeof(size_t). C programs use the macro. */
MASA_API void masa_cosine_options_default(masa_cosine_options *options,
                                          size_t size);
#define masa_cosine_options_init(options) \
    masa_cosine_options_default((options), sizeof *(options))

typedef struct masa_cosine_estimator masa_cosine_estimator;

/* A cosine estimator of T (d_in x d_out) starting at T = I (ones on the
 * diagonal, zeros elsewhere, also when d_in != d_out) with Adam's moments
 * at zero. options may be NULL for the defaults; they are copied.
 * Errors: NULL_ARGUMENT, BAD_SHAPE (a size 0), BAD_STRUCT_SIZE,
 * INVALID_ARGUMENT (an option out of its domain: epochs or batch_rows 0,
 * learning_rate or eps not > 0, beta outside [0, 1)), OVERFLOW,
 * OUT_OF_MEMORY. */
MASA_API masa_status masa_cosine_estimator_create(
    masa_context *ctx, size_t d_in, size_t d_out,
    const masa_cosine_options *options, masa_cosine_estimator **out);

MASA_API void masa_cosine_estimator_destroy(masa_cosine_estimator *est);

/* Copies the current T (d_in x d_out floats, row-major) into t. */
MASA_API masa_status masa_cosine_estimator_transform(
    const masa_cosine_estimator *est, float *t);

/* Sets T from t (d_in x d_out floats, copied) and restarts Adam (moments
 * zero, step count zero). Errors: NULL_ARGUMENT, INVALID_ARGUMENT (a
 * non-finite value; nothing changed). */
MASA_API masa_status masa_cosine_estimator_set_transform(
    masa_cosine_estimator *est, const float *t);

/* Adam steps taken since creation or the last set_transform. */
MASA_API masa_status masa_cosine_estimator_steps(
    const masa_cosine_estimator *est, uint64_t *steps);

/* The loss 1 - (1/rows) sum_r cos(p_r, target_r), p = offset + x T, for the
 * current T (offset NULL = zero). A row where p_r or target_r is zero
 * counts cos = 0. Errors: NULL_ARGUMENT, BAD_SHAPE (rows 0),
 * INVALID_ARGUMENT (non-finite input, or finite inputs so large that
 * offset + x T overflows float32 and the loss is not finite), OVERFLOW,
 * OUT_OF_MEMORY. */
MASA_API masa_status masa_cosine_estimator_loss(
    const masa_cosine_estimator *est, size_t rows, const float *x,
    const float *target, const float *offset, double *loss);

/* One Adam step on the loss above over exactly these rows (x rows x d_in,
 * target and offset rows x d_out, offset may be NULL), in PyTorch's
 * formulation (torch.optim.Adam without weight decay or amsgrad):
 *   g = dloss/dT = x^T G, G_r = -(1/rows) (t_r / (|p_r| |t_r|)
 *                                          - cos_r p_r / |p_r|^2)
 *   m = beta1 m + (1 - beta1) g,  v = beta2 v + (1 - beta2) g^2,  k += 1
 *   T -= (lr / (1 - beta1^k)) m / (sqrt(v) / sqrt(1 - beta2^k) + eps)
 * loss_before (may be NULL) receives the batch's loss before the step.
 * Products are float32 BLIS GEMMs; per-row norms and dots are float64.
 * Errors: as masa_cosine_estimator_loss, and INVALID_ARGUMENT when the
 * gradient is not finite in float32 or the step would make T non-finite
 * (a learning rate too large for the inputs); on error T, Adam's moments
 * and the step count are unchanged. */
MASA_API masa_status masa_cosine_estimator_step(
    masa_cosine_estimator *est, size_t rows, const float *x,
    const float *target, const float *offset, double *loss_before);

/* options.epochs passes of Adam steps over all `rows` rows, in batches of
 * options.batch_rows consecutive rows of a permutation drawn for each
 * epoch (the last batch of an epoch takes what is left). The permutation
 * is deterministic for options.seed: a state s = seed, and
 * next() { s += 0x9E3779B97F4A7C15; z = s; z = (z ^ (z >> 30)) *
 * 0xBF58476D1CE4E5B9; z = (z ^ (z >> 27)) * 0x94D049BB133111EB;
 * return z ^ (z >> 31); } (splitmix64, all uint64 arithmetic); the order
 * starts as 0..rows-1 and each epoch shuffles the previous epoch's order
 * in place: for i = rows-1 down to 1 { j = next() % (i + 1); swap(i, j) }.
 * With the same inputs, options and thread count the result is the same
 * bit for bit. epoch_loss (may be NULL; options.epochs doubles) receives
 * each epoch's mean batch loss before the steps (the mean of the
 * loss_before values of masa_cosine_estimator_step).
 * Errors: as masa_cosine_estimator_step. On any error T, Adam's moments
 * and the step count are as before the call (a step refused part-way
 * restores them from a copy taken at the start); epoch_loss may then hold
 * the losses of the epochs before the refused step. */
MASA_API masa_status masa_cosine_estimator_fit(
    masa_cosine_estimator *est, size_t rows, const float *x,
    const float *target, const float *offset, double *epoch_loss);

/* ======================================================================
 * Merge: W_down <- W_down T
 * ====================================================================== */

/* Storage of the down projection given to masa_merge_linear_map(). */
typedef enum masa_merge_layout {
    /* W (d_ff x d): the block's MLP output is h W (row vectors, masa.h's
     * convention). */
    MASA_MERGE_ROW_VECTOR = 0,
    /* W (d x d_ff), PyTorch nn.Linear's weight: the output is h W^T. */
    MASA_MERGE_NN_LINEAR = 1
} masa_merge_layout;

/* Folds T (d x d, row-major) into a down projection in place, so that the
 * new projection outputs (old output) T:
 *   MASA_MERGE_ROW_VECTOR: w (d_ff x d)  <- w T
 *   MASA_MERGE_NN_LINEAR:  w (d x d_ff)  <- T^T w
 * and bias (d floats, may be NULL) <- bias T. layout is a masa_merge_layout
 * value. Scratch of d_ff * d floats is allocated from the context. t must
 * not overlap w or bias.
 * Errors: NULL_ARGUMENT, INVALID_ARGUMENT (unknown layout, overlapping
 * buffers, non-finite T), BAD_SHAPE (a size 0), OVERFLOW, OUT_OF_MEMORY;
 * w and bias are unchanged on failure. */
MASA_API masa_status masa_merge_linear_map(masa_context *ctx, int layout,
                                           size_t d_ff, size_t d, float *w,
                                           float *bias, const float *t);

#ifdef __cplusplus
}
#endif

#endif /* MASA_REPLACEME_H */
