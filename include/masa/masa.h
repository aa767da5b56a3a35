/*
 * libmasa: Matrix Atom Sharing in Attention.
 *
 * This header is the reference documentation of the library.
 *
 * MASA builds each projection P in {Q, K, V, O} of an L-layer transformer from
 * S shared "atoms" (full matrices) and an L x S table of scalar coefficients:
 *
 *     W_l = sum_s c[l, s] * D_s
 *
 * The library offers opaque handles for dictionaries (the atoms), coefficient
 * tables and attention layers, and runs forward and backward on buffers the
 * caller owns.
 *
 * ------------------------------------------------------------------------
 * Conventions (apply to every function below)
 * ------------------------------------------------------------------------
 * - Numbers are float32. Every matrix is row-major and contiguous.
 * - A projection maps row vectors: Y = X W + b, with W of shape d_in x d_out
 *   (note: PyTorch's nn.Linear stores the transpose, d_out x d_in).
 * - Activations are [batch, seq, features], row-major: token t of sequence b
 *   starts at element (b * seq + t) * features.
 * - Every function that can fail returns a masa_status. On failure nothing the
 *   caller passed in has been modified (unless the function says otherwise)
 *   and masa_last_error() describes what went wrong. The library never aborts,
 *   prints or exits.
 * - Sizes are size_t. Buffer lengths are given in elements (floats) unless the
 *   parameter name ends in _bytes.
 * - Destroy functions accept NULL and do nothing.
 * - Functions that create an object set *out to NULL when they fail.
 * - Output pointers of *_shape functions may be NULL (that value is skipped).
 *
 * ------------------------------------------------------------------------
 * Threads
 * ------------------------------------------------------------------------
 * - Error messages are kept per thread.
 * - A context may be used from several threads at once. Its worker pool runs
 *   one call at a time; a call that finds the pool busy runs its work on the
 *   calling thread instead (correct, just not parallel).
 * - masa_layer_forward() and masa_layer_backward() only read the layer and
 *   its parameters: any number of threads may run them on the same layer at
 *   once, as long as each call has its own workspace, reserve and output
 *   buffers, and no thread modifies the parameters meanwhile.
 * - Everything that modifies an object (set_*, init_*, *_touch, refresh_weights,
 *   destroy) needs exclusive access to that object. Backward calls that write to the same
 *   gradient buffer (e.g. layers sharing a dictionary) must not run at once.
 *
 * ------------------------------------------------------------------------
 * Processes and fork()
 * ------------------------------------------------------------------------
 * - fork() waits until the libmasa calls running in other threads of the
 *   process have returned (a pthread_atfork handler; calls that start
 *   meanwhile wait for the fork), so the child never inherits a call half
 *   done or a lock held by one. A libmasa call itself (an allocator hook)
 *   must not fork.
 * - In the child, objects made before the fork are valid copies. A context
 *   made before the fork has no worker threads there (they stay in the
 *   parent): calls with it run on the calling thread (correct, single
 *   threaded), and masa_context_destroy() frees it without waiting for
 *   threads, so a child may destroy it and exit normally. Create a new
 *   context in the child to use several threads again.
 *
 * ------------------------------------------------------------------------
 * Parameters modified between forward and backward
 * ------------------------------------------------------------------------
 * Backward must see the parameters forward saw. A layer's parameters are
 * its projections' weights and biases and the atoms and coefficients of the
 * dictionaries and tables its MASA projections use. They count as modified
 * by every call that changes them through the library:
 *   masa_layer_set_masa(), _set_dense(), _set_bias(), _remove_bias(),
 *   _set_weight_policy(), _refresh_weights(), masa_dictionary_init_*(),
 *   masa_coefficients_init_*() and _add_uniform(),
 * and by the *_touch() functions (masa_layer_touch(),
 * masa_dictionary_touch(), masa_coefficients_touch()), with which a caller
 * declares writes the library cannot see: writes through
 * masa_layer_weight(), masa_layer_bias(), masa_dictionary_data(),
 * masa_coefficients_data() or the caller memory an object wraps. Writes
 * through raw pointers that are not declared are invisible: the library
 * computes with whatever the memory holds at each call.
 * A reserve records the identity of the layer that filled it (a number
 * never given to another layer, even one created at the same address) and
 * the version of its parameters; masa_layer_backward() refuses it with
 * MASA_ERROR_INVALID_ARGUMENT after any such modification, as
 * masa_layer_decode() refuses a non-empty KV cache filled before one.
 *
 * Outputs never overwrite parameters: y, dx, every gradient buffer, the
 * workspace, the reserve and the cache memory must not overlap any
 * parameter buffer of the layer (checked: MASA_ERROR_INVALID_ARGUMENT).
 *
 * ------------------------------------------------------------------------
 * BLIS kernels
 * ------------------------------------------------------------------------
 * Matrix products run on BLIS. BLIS picks its kernels once, when it
 * initialises, from its own CPU table; some BLIS releases do not know recent
 * CPUs and fall back to slow "generic" kernels. The first time a context is
 * created, if BLIS has not been initialised yet, BLIS_ARCH_TYPE is not set and
 * the CPU supports AVX-512 (F, DQ, BW, VL, with OS support), libmasa sets
 * BLIS_ARCH_TYPE to BLIS's skx index while BLIS initialises and then restores
 * the environment as it was. A user's own BLIS_ARCH_TYPE is never overridden.
 * Set the environment variable MASA_BLIS_ARCH=off to disable this.
 * masa_blis_arch() tells which kernels are in use.
 */
#ifndef MASA_MASA_H
#define MASA_MASA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* MASA_API marks every exported function. The library is built with
 * -fvisibility=hidden; nothing else leaves the shared object. */
#if defined(MASA_BUILDING_LIBRARY) && defined(__GNUC__)
#define MASA_API __attribute__((visibility("default")))
#else
#define MASA_API
#endif

/* ======================================================================
 * Version
 * ====================================================================== */

#define MASA_VERSION_MAJOR 0
#define MASA_VERSION_MINOR 2
#define MASA_VERSION_PATCH 0
/* MAJOR * 10000 + MINOR * 100 + PATCH */
#define MASA_VERSION_NUMBER \
    (MASA_VERSION_MAJOR * 10000 + MASA_VERSION_MINOR * 100 + MASA_VERSION_PATCH)
#define MASA_VERSION_STRING "0.2.0"

/* Version of the library actually loaded (compare with MASA_VERSION_NUMBER). */
MASA_API unsigned masa_version_number(void);
/* "MAJOR.MINOR.PATCH" of the library actually loaded; static storage. */
MASA_API const char *masa_version_string(void);

/* ======================================================================
 * Errors
 * ====================================================================== */

typedef enum masa_status {
    MASA_OK = 0,
    MASA_ERROR_NULL_ARGUMENT = 1,    /* a required pointer was NULL */
    MASA_ERROR_INVALID_ARGUMENT = 2, /* a value out of its domain (flag, scale, ...) */
    MASA_ERROR_BAD_SHAPE = 3,        /* zero or inconsistent sizes */
    MASA_ERROR_OUT_OF_RANGE = 4,     /* an index (layer, projection) out of range */
    MASA_ERROR_BUFFER_TOO_SMALL = 5, /* a caller buffer is smaller than required */
    MASA_ERROR_OVERFLOW = 6,         /* a size computation overflows size_t */
    MASA_ERROR_OUT_OF_MEMORY = 7,    /* an allocation failed */
    MASA_ERROR_BAD_STRUCT_SIZE = 8,  /* an options struct has an unknown size */
    MASA_ERROR_NOT_READY = 9,        /* a layer lacks a projection it needs */
    MASA_ERROR_THREAD = 10,          /* a thread could not be created */
    MASA_ERROR_INTERNAL = 11,        /* a bug in libmasa; please report it */
    MASA_ERROR_IO = 12,              /* a file could not be opened, read or written */
    MASA_ERROR_BAD_FORMAT = 13,      /* a file's contents are malformed */
    MASA_ERROR_NOT_FOUND = 14        /* no tensor or entry of that name */
} masa_status;

/* A short constant description of a status ("invalid argument"); never NULL.
 * Unknown values give "unknown status". */
MASA_API const char *masa_status_string(masa_status status);

/* The message of the last failure on the calling thread, e.g.
 * "masa_layer_create: n_heads (6) is not a multiple of n_kv_heads (4)".
 * Empty string when no call has failed on this thread; successful calls do
 * not clear it. The pointer stays valid
 * until the next libmasa call on the same thread. Never NULL. */
MASA_API const char *masa_last_error(void);

/* ======================================================================
 * Context: threads, allocator, BLIS settings
 * ====================================================================== */

typedef struct masa_context masa_context;

/* Allocator hook. malloc_fn returns memory aligned for any type (as malloc)
 * or NULL; free_fn accepts NULL. Both receive alloc_user. */
typedef void *(*masa_malloc_fn)(size_t size, void *user);
typedef void (*masa_free_fn)(void *ptr, void *user);

/* Options for masa_context_create(). Initialise with
 * masa_context_options_init() and then change fields: the size field lets
 * newer libraries accept structs from older programs. A size smaller than
 * any version's struct is refused (MASA_ERROR_BAD_STRUCT_SIZE); a struct
 * larger than the library knows is accepted only if the unknown tail is all
 * zero bytes (a newer program that left the new fields at their defaults). */
typedef struct masa_context_options {
    size_t size;           /* sizeof(masa_context_options), set by _init */
    size_t n_threads;      /* threads for the library's work; 0 = online
                              CPUs; at most 1024 (else INVALID_ARGUMENT) */
    masa_malloc_fn malloc_fn; /* NULL = malloc (both or neither must be set) */
    masa_free_fn free_fn;     /* NULL = free */
    void *alloc_user;         /* passed to malloc_fn / free_fn */
} masa_context_options;

/* Writes the defaults into the first `size` bytes of *options and sets
 * options->size = size (sizeof the caller's struct, so an older program's
 * smaller struct is never overrun by a newer library). Does nothing when
 * options is NULL or size < sizeof(size_t). C programs use the macro. */
MASA_API void masa_context_options_default(masa_context_options *options,
                                           size_t size);
#define masa_context_options_init(options) \
    masa_context_options_default((options), sizeof *(options))

/* Creates a context. options may be NULL for the defaults. The context owns a
 * pool of n_threads - 1 worker threads (the calling thread is the n-th).
 * After a call, idle workers poll for new work for 0.1 ms, then sleep until
 * the next call (so a context between calls costs no CPU).
 * *out is set to NULL on failure. */
MASA_API masa_status masa_context_create(const masa_context_options *options,
                                         masa_context **out);

/* Destroys the context. Every dictionary, coefficient table and layer created
 * from it must be destroyed first. */
MASA_API void masa_context_destroy(masa_context *ctx);

/* Number of threads the context uses (>= 1). */
MASA_API size_t masa_context_threads(const masa_context *ctx);

/* Name of the BLIS kernel set in use ("skx", "zen3", "haswell", "generic",
 * ...); static storage, never NULL. Initialises BLIS if needed (see "BLIS
 * kernels" at the top of this file). */
MASA_API const char *masa_blis_arch(void);

/* ======================================================================
 * Dictionaries: S atoms of shape rows x cols
 * ====================================================================== */

typedef struct masa_dictionary masa_dictionary;

/* Layout of the atom storage: n_atoms * rows * cols floats, atom s first,
 * each atom row-major: element (s, i, j) is at s * rows * cols + i * cols + j.
 */

/* A dictionary whose storage the library owns, zero-initialised. */
MASA_API masa_status masa_dictionary_create(masa_context *ctx, size_t n_atoms,
                                            size_t rows, size_t cols,
                                            masa_dictionary **out);

/* A dictionary over caller memory (zero-copy): atoms must hold
 * n_atoms * rows * cols floats and stay valid until the dictionary is
 * destroyed. The library reads it during forward and backward and writes it
 * only in masa_dictionary_init_*(). */
MASA_API masa_status masa_dictionary_wrap(masa_context *ctx, size_t n_atoms,
                                          size_t rows, size_t cols,
                                          float *atoms, masa_dictionary **out);

MASA_API void masa_dictionary_destroy(masa_dictionary *dict);

/* Any output pointer may be NULL. */
MASA_API masa_status masa_dictionary_shape(const masa_dictionary *dict,
                                           size_t *n_atoms, size_t *rows,
                                           size_t *cols);

/* The atom storage (owned or wrapped), in the layout above. */
MASA_API float *masa_dictionary_data(masa_dictionary *dict);

/* Fills every atom with independent uniform values in [-bound, bound] from a
 * seeded generator: the same seed gives the same atoms on every platform.
 * bound = 0 selects 1/sqrt(rows), the scale of a linear layer's default
 * initialisation with fan-in rows. bound must be finite and >= 0. */
MASA_API masa_status masa_dictionary_init_uniform(masa_dictionary *dict,
                                                  float bound, uint64_t seed);

/* Declares that the atoms were written outside the library (through
 * masa_dictionary_data() or the wrapped memory): reserves and KV caches
 * filled before by layers using this dictionary are refused afterwards (see
 * "Parameters modified between forward and backward"). Modifies the
 * dictionary (exclusive access, see "Threads").
 * Errors: NULL_ARGUMENT. */
MASA_API masa_status masa_dictionary_touch(masa_dictionary *dict);

/* ======================================================================
 * Coefficient tables: L x S
 * ====================================================================== */

typedef struct masa_coefficients masa_coefficients;

/* Layout: n_layers * n_atoms floats, row-major: c[l, s] at l * n_atoms + s. */

/* A table the library owns, zero-initialised. */
MASA_API masa_status masa_coefficients_create(masa_context *ctx,
                                              size_t n_layers, size_t n_atoms,
                                              masa_coefficients **out);

/* A table over caller memory (zero-copy), n_layers * n_atoms floats, valid
 * until the table is destroyed. */
MASA_API masa_status masa_coefficients_wrap(masa_context *ctx, size_t n_layers,
                                            size_t n_atoms, float *data,
                                            masa_coefficients **out);

MASA_API void masa_coefficients_destroy(masa_coefficients *coef);

/* Any output pointer may be NULL. */
MASA_API masa_status masa_coefficients_shape(const masa_coefficients *coef,
                                             size_t *n_layers,
                                             size_t *n_atoms);

MASA_API float *masa_coefficients_data(masa_coefficients *coef);

/* c[l, s] = 1 if s == l mod S else 0: layer l starts as atom l mod S
 * (the "repeat-all-over" sharing pattern). */
MASA_API masa_status masa_coefficients_init_cyclic(masa_coefficients *coef);

/* c[l, s] = 1 if s == floor(l * S / L) else 0: consecutive blocks of layers
 * share one atom (the "sequential" sharing pattern). */
MASA_API masa_status masa_coefficients_init_blocks(masa_coefficients *coef);

/* Adds independent uniform noise in [-bound, bound] from a seeded generator
 * to every coefficient (call after zeroing or a one-hot init). bound must be
 * finite and >= 0. */
MASA_API masa_status masa_coefficients_add_uniform(masa_coefficients *coef,
                                                   float bound, uint64_t seed);

/* Declares that the coefficients were written outside the library, as
 * masa_dictionary_touch() does for atoms. Errors: NULL_ARGUMENT. */
MASA_API masa_status masa_coefficients_touch(masa_coefficients *coef);

/* ======================================================================
 * Composition
 * ====================================================================== */

/* Writes W_l = sum_s c[layer, s] * D_s into w (rows * cols floats,
 * row-major). The table's n_atoms must equal the dictionary's.
 * w_len is the capacity of w in floats. One pass over the atoms, split
 * across the threads of the dictionary's context (see "Threads").
 * Errors: NULL_ARGUMENT, BAD_SHAPE, OUT_OF_RANGE, BUFFER_TOO_SMALL,
 * INVALID_ARGUMENT (w overlapping the atoms or the coefficients). */
MASA_API masa_status masa_compose(const masa_dictionary *dict,
                                  const masa_coefficients *coef, size_t layer,
                                  float *w, size_t w_len);

/* ======================================================================
 * Attention layers
 * ====================================================================== */

typedef struct masa_layer masa_layer;

/* The four projections of an attention layer. With dq = n_heads * head_dim and
 * dkv = n_kv_heads * head_dim, their weights are (d_in x d_out):
 *   Q: d_model x dq,  K: d_model x dkv,  V: d_model x dkv,  O: dq x d_model
 * and their biases have d_out elements. */
typedef enum masa_projection {
    MASA_PROJ_Q = 0,
    MASA_PROJ_K = 1,
    MASA_PROJ_V = 2,
    MASA_PROJ_O = 3
} masa_projection;
#define MASA_NUM_PROJECTIONS 4

/* The largest RoPE position a token may have (see "Positions" below). */
#define MASA_MAX_POSITION ((size_t)4294967295u)

/* Options for masa_layer_create(); initialise with masa_layer_options_init()
 * (same size rule as masa_context_options). */
typedef struct masa_layer_options {
    size_t size;        /* sizeof(masa_layer_options), set by _init */
    size_t d_model;     /* model width (required) */
    size_t n_heads;     /* query heads (required) */
    size_t n_kv_heads;  /* key/value heads; 0 = n_heads; must divide n_heads */
    size_t head_dim;    /* 0 = d_model / n_heads (must divide exactly) */
    int causal;         /* nonzero: token t attends to keys 0..t only */
    int rope;           /* nonzero: rotary position embedding on Q and K */
    float rope_theta;   /* RoPE base, finite and > 1; default 10000 */
    float softmax_scale; /* finite, >= 0; 0 = 1/sqrt(head_dim) */
} masa_layer_options;

/* Defaults into the first `size` bytes, as masa_context_options_default. */
MASA_API void masa_layer_options_default(masa_layer_options *options,
                                         size_t size);
#define masa_layer_options_init(options) \
    masa_layer_options_default((options), sizeof *(options))

/* Rotary position embedding, when enabled: for head dimension pairs
 * (i, i + head_dim/2), i < head_dim/2, of every query and key head at
 * position p (= pos_offset + t), with f_i = rope_theta^(-2i/head_dim):
 *   x'_i          = x_i cos(p f_i) - x_{i+h/2} sin(p f_i)
 *   x'_{i+h/2}    = x_{i+h/2} cos(p f_i) + x_i sin(p f_i)
 * (the "rotate half" layout of Llama-style checkpoints). head_dim must be even.
 *
 * Positions. The angles p f_i are formed in double precision (p f_i rounded
 * once, f_i rounded by pow) and reduced by the C library's cos and sin, so
 * their error grows in proportion to p. Measured by
 * benchmarks/rope_accuracy.py against angles computed exactly (mpmath, 60
 * digits), head_dim 16, rope_theta 1e4, 16 tokens ending at p: the largest
 * angle error is 5e-10 rad at p = 2^24, 1.4e-7 at 2^32 (a float's rounding
 * of 1), 2.4e-6 at 2^36, 5.8e-4 at 2^44, 0.15 at 2^52. The relative error
 * these angles alone cause in a layer's output is 8e-8 at 2^32, 1e-6 at
 * 2^36, 2.2e-4 at 2^44, 4.9e-2 at 2^52; libmasa's output (float rounding
 * included) stays at 4.2e-7 from p = 0 to 2^32. A RoPE layer therefore gives
 * a token at most the position MASA_MAX_POSITION = 2^32 - 1: forward,
 * backward and decode refuse a call whose last token's position
 * (pos_offset + seq - 1, or the cache length + n_new - 1) lies beyond it
 * with MASA_ERROR_OUT_OF_RANGE. Without RoPE positions change nothing and
 * any position is accepted. For every layer, pos_offset + seq beyond SIZE_MAX
 * is refused with MASA_ERROR_OVERFLOW.
 *
 * The layer computes, for x of shape [B, T, d_model]:
 *   Q = x Wq + bq, K = x Wk + bk, V = x Wv + bv  (RoPE applied to Q and K)
 *   head h uses key/value head h / (n_heads / n_kv_heads)
 *   A_h = softmax(scale * Q_h K_g^T [+ causal mask]) V_g
 *   y = concat_h(A_h) Wo + bo
 */

/* Creates a layer with no projections set. Every projection must be set with
 * masa_layer_set_masa() or masa_layer_set_dense(), or given a low-rank term
 * (masa_layer_set_lowrank()), before forward.
 * Errors: BAD_SHAPE (zero sizes, n_heads not a multiple of n_kv_heads,
 * head_dim 0 with d_model not a multiple of n_heads, odd head_dim with RoPE),
 * INVALID_ARGUMENT (rope_theta, softmax_scale), OVERFLOW, BAD_STRUCT_SIZE. */
MASA_API masa_status masa_layer_create(masa_context *ctx,
                                       const masa_layer_options *options,
                                       masa_layer **out);

/* Destroys the layer and the weights and biases it owns. Dictionaries and
 * coefficient tables it uses are not destroyed. */
MASA_API void masa_layer_destroy(masa_layer *layer);

/* Makes projection `which` a MASA projection: W = sum_s coef[layer_index, s]
 * * D_s. The dictionary's atoms must have the projection's shape, the table's
 * n_atoms must match the dictionary's and layer_index < the table's n_layers.
 * The layer keeps pointers to dict and coef (not copies): they must outlive
 * the layer (or be replaced first) and may be shared by many layers.
 * With the MASA_WEIGHTS_CACHED policy the projection's composed weight is
 * allocated (if it has none yet) and filled (with the projection's low-rank
 * term, if any, added); failing that, OUT_OF_MEMORY and the projection is
 * unchanged. */
MASA_API masa_status masa_layer_set_masa(masa_layer *layer,
                                         masa_projection which,
                                         masa_dictionary *dict,
                                         masa_coefficients *coef,
                                         size_t layer_index);

/* Makes projection `which` dense with weight d_in x d_out (freeing its
 * composed MASA weight, if any). weight NULL: the
 * layer allocates and owns a zero-initialised weight (see
 * masa_layer_weight()); otherwise the layer wraps caller memory, which must
 * stay valid while the layer uses it. */
MASA_API masa_status masa_layer_set_dense(masa_layer *layer,
                                          masa_projection which,
                                          float *weight);

/* Gives projection `which` a bias of d_out floats. bias NULL: the layer
 * allocates and owns a zero-initialised bias; otherwise it wraps caller
 * memory. */
MASA_API masa_status masa_layer_set_bias(masa_layer *layer,
                                         masa_projection which, float *bias);

/* Removes the bias of projection `which` (no-op without one). */
MASA_API masa_status masa_layer_remove_bias(masa_layer *layer,
                                            masa_projection which);

/* The dense weight of projection `which` (NULL if it is not dense or on
 * error). The pointer stays valid until the projection is set again or the
 * layer is destroyed. */
MASA_API float *masa_layer_weight(masa_layer *layer, masa_projection which);

/* The bias of projection `which` (NULL if it has none or on error); valid
 * until the bias is set again or removed, or the layer is destroyed. */
MASA_API float *masa_layer_bias(masa_layer *layer, masa_projection which);

/* Declares that the layer's dense weights or biases were written outside
 * the library (through masa_layer_weight(), masa_layer_bias() or wrapped
 * memory): reserves and KV caches the layer filled before are refused
 * afterwards (see "Parameters modified between forward and backward").
 * Modifies the layer (exclusive access, see "Threads").
 * Errors: NULL_ARGUMENT. */
MASA_API masa_status masa_layer_touch(masa_layer *layer);

/* Shape (d_in x d_out) of projection `which`'s weight. */
MASA_API masa_status masa_layer_projection_shape(const masa_layer *layer,
                                                 masa_projection which,
                                                 size_t *d_in, size_t *d_out);

/* ----------------------------------------------------------------------
 * Low-rank terms
 * ----------------------------------------------------------------------
 * A projection may carry a low-rank term beside its base weight:
 *
 *     W = base + A B,   A: d_in x rank,  B: rank x d_out  (row-major)
 *
 * where the base is the MASA weight sum_s c[l, s] D_s (masa_layer_set_masa),
 * a dense weight (masa_layer_set_dense) or nothing. A projection whose base
 * was never set (neither set_masa nor set_dense was called on it since the
 * layer was created) and that has a low-rank term computes only
 * Y = (X A) B (+ bias): the low-rank baseline. Setting or changing the base
 * keeps the low-rank term; removing the low-rank term of a projection
 * without a base leaves it unset (forward then fails with NOT_READY).
 *
 * The term is applied as two thin products, (X A) B, which costs
 * rows * rank * (d_in + d_out) multiply-adds instead of the
 * rows * d_in * d_out of a full weight. Exceptions:
 *   - a MASA projection under MASA_WEIGHTS_CACHED keeps base + A B composed
 *     in its cache (see "Weight policy" below): one product, as dense;
 *   - a MASA projection under MASA_WEIGHTS_ON_THE_FLY composes its base
 *     into the workspace at every use anyway; when the call has more rows
 *     than d_in * d_out / (d_in + d_out), A B is added to that composed
 *     weight (rank * d_in * d_out multiply-adds, once) instead of running
 *     the thin products (rank * rows * (d_in + d_out)): whichever is fewer.
 * Dense and base-less projections always run the thin products. Incremental
 * decoding (few rows) runs them too, reading A and B instead of a d_in x
 * d_out matrix, unless a cache holds the composed weight.
 *
 * Gradients: dA = X^T (dY B^T), dB = (X A)^T dY, and dX gets dY B^T A^T
 * (see masa_layer_grads). The base's gradients do not change: dW of the
 * whole W is the same X^T dY.
 */

/* Gives projection `which` the low-rank term A B (replacing any it had).
 *   rank  1 <= rank <= min(d_in, d_out)
 *   a     d_in x rank floats, row-major; NULL: the layer allocates and owns
 *         a zero-initialised A; otherwise the layer wraps caller memory,
 *         which must stay valid while the layer uses it (as set_dense).
 *   b     rank x d_out floats, likewise.
 * a and b are chosen independently (e.g. a caller-filled A with an owned
 * zero B: the term starts at zero but gets gradients, as LoRA starts;
 * A = B = 0 gives zero gradients to both). masa_layer_lowrank() returns the
 * pointers, owned or wrapped. On a MASA projection under the CACHED policy
 * the composed weight is refilled (base + A B as they are now).
 * Workspace sizes (masa_layer_workspace_size,
 * masa_layer_decode_workspace_size) depend on the ranks: query them again
 * after this call.
 * Errors: NULL_ARGUMENT (layer); OUT_OF_RANGE (which); BAD_SHAPE (rank 0 or
 * above min(d_in, d_out)); OUT_OF_MEMORY (owned A or B: the projection is
 * unchanged). On error nothing is changed. */
MASA_API masa_status masa_layer_set_lowrank(masa_layer *layer,
                                            masa_projection which,
                                            size_t rank, float *a, float *b);

/* Removes the low-rank term of projection `which` (freeing the A and B the
 * layer owns; no-op without one). A cached MASA weight is recomposed
 * without it. Errors: NULL_ARGUMENT, OUT_OF_RANGE. */
MASA_API masa_status masa_layer_remove_lowrank(masa_layer *layer,
                                               masa_projection which);

/* The low-rank term of projection `which`: *rank (0 when it has none) and
 * pointers to A (d_in x rank) and B (rank x d_out), owned or wrapped, NULL
 * without a term. The pointers stay valid until the term is set again or
 * removed or the layer is destroyed; writing through them changes the
 * layer's parameters (a CACHED MASA projection then needs
 * masa_layer_refresh_weights()). Any output pointer may be NULL.
 * Errors: NULL_ARGUMENT (layer), OUT_OF_RANGE (which); the outputs are then
 * not written. */
MASA_API masa_status masa_layer_lowrank(masa_layer *layer,
                                        masa_projection which, size_t *rank,
                                        float **a, float **b);

/* ----------------------------------------------------------------------
 * Weight policy of MASA projections
 * ----------------------------------------------------------------------
 * Every forward, backward and decode call needs W_l = sum_s c[l, s] D_s of
 * each MASA projection. The policy chooses where it comes from:
 *
 *   MASA_WEIGHTS_ON_THE_FLY (the default)  W_l is composed into the call's
 *       workspace at every use: one pass over the S atoms, split across the
 *       context's threads. Memory stays at the S atoms; each use reads
 *       S * d_in * d_out floats more than a dense layer would. Changes to
 *       atoms and coefficients are seen by the next call.
 *   MASA_WEIGHTS_CACHED  the layer keeps W_l of each of its MASA projections
 *       composed (with the projection's low-rank term A B added, if any):
 *       calls read it as a dense layer reads its weight (the speed of a
 *       dense layer, the memory of one: d_in * d_out floats per MASA
 *       projection, so L layers sharing a dictionary hold L composed
 *       weights beside its S atoms).
 *
 * The cache: memory from the context's allocator, owned by the layer, freed
 * when the policy goes back to ON_THE_FLY, when the projection is made dense
 * and when the layer is destroyed. It is filled (composed from the atoms and
 * coefficients as they are at that moment) by
 *   - masa_layer_set_weight_policy(layer, MASA_WEIGHTS_CACHED), for every
 *     MASA projection of the layer;
 *   - masa_layer_set_masa() on a layer whose policy is CACHED, for that
 *     projection;
 *   - masa_layer_refresh_weights(), for every MASA projection of the layer;
 *   - masa_layer_set_lowrank() and masa_layer_remove_lowrank() on a MASA
 *     projection of a CACHED layer, for that projection.
 * Nothing else updates it. It is STALE as soon as the caller changes the
 * atoms, coefficients or low-rank factors it was composed from (writes
 * through masa_dictionary_data(), masa_coefficients_data(),
 * masa_layer_lowrank()'s pointers or wrapped memory, the
 * init_* functions, an optimiser step): until the next refresh, forward,
 * decode and the dx of backward keep using the old W_l. Backward's dc and
 * dD are computed from G = X^T dY, the current atoms and the current
 * coefficients, dA and dB from the current A and B (they never read the
 * cache). A training loop that updates the parameters after every step
 * calls masa_layer_refresh_weights() on
 * each layer after the update (one composition per step instead of one per
 * forward and one per backward).
 *
 * Threads: set_weight_policy and refresh_weights modify the layer: no
 * forward, backward or decode of the same layer may run meanwhile (see
 * "Threads" at the top). Forward, backward and decode only read the cache. */
typedef enum masa_weight_policy {
    MASA_WEIGHTS_ON_THE_FLY = 0, /* compose W_l at every use (default) */
    MASA_WEIGHTS_CACHED = 1      /* keep W_l composed in the layer */
} masa_weight_policy;

/* Sets the layer's weight policy (see above). CACHED allocates and fills
 * the cache of every MASA projection; set again when already CACHED, it
 * refills them (as masa_layer_refresh_weights()). ON_THE_FLY frees them.
 * Dense and base-less projections are not affected (their low-rank terms
 * run as thin products). Projections set later follow the policy.
 * Errors: NULL_ARGUMENT; INVALID_ARGUMENT (policy not one of the values
 * above); OUT_OF_MEMORY (a cache could not be allocated: the layer keeps
 * its previous policy and caches, nothing is freed or composed). */
MASA_API masa_status masa_layer_set_weight_policy(masa_layer *layer,
                                                  masa_weight_policy policy);

/* The layer's current weight policy into *policy.
 * Errors: NULL_ARGUMENT (layer or policy). */
MASA_API masa_status masa_layer_weight_policy(const masa_layer *layer,
                                              masa_weight_policy *policy);

/* Recomposes the cached W_l of every MASA projection from the current atoms
 * and coefficients, after the caller changed them. Does not allocate and
 * cannot fail on a valid layer; with the ON_THE_FLY policy it does nothing.
 * Errors: NULL_ARGUMENT. */
MASA_API masa_status masa_layer_refresh_weights(masa_layer *layer);

/* Bytes of workspace (scratch, any contents, not kept between calls) that
 * forward and backward need for `batch` sequences of `seq` tokens. It depends
 * on the layer's shapes, the ranks of its low-rank terms and its context's
 * thread count only. forward and backward accept any workspace at least
 * this large. */
MASA_API masa_status masa_layer_workspace_size(const masa_layer *layer,
                                               size_t batch, size_t seq,
                                               size_t *bytes);

/* Bytes of reserve: what forward saves for backward (the projected and
 * rotated Q, K, V, the attention output and each softmax row's maximum and
 * log-sum, after a small stamp naming the forward call). */
MASA_API masa_status masa_layer_reserve_size(const masa_layer *layer,
                                             size_t batch, size_t seq,
                                             size_t *bytes);

/* Forward pass.
 *   x          [batch, seq, d_model], read
 *   y          [batch, seq, d_model], overwritten (must not overlap x)
 *   pos_offset position of token 0 for RoPE. RoPE is relative, so with no
 *              cached keys a common offset does not change y; it is kept for
 *              positions that continue a sequence (and checked by backward).
 *   workspace  at least masa_layer_workspace_size() bytes, aligned for float
 *   reserve    NULL for inference; for training at least
 *              masa_layer_reserve_size() bytes, aligned for float, handed
 *              unchanged to masa_layer_backward().
 * Pass the buffer sizes so the library can check them.
 * Errors: MASA_ERROR_NOT_READY (a projection not set), BAD_SHAPE or OVERFLOW
 * (batch, seq), OVERFLOW (pos_offset + seq beyond SIZE_MAX), OUT_OF_RANGE
 * (with RoPE, pos_offset + seq - 1 > MASA_MAX_POSITION), BUFFER_TOO_SMALL
 * (workspace, reserve), INVALID_ARGUMENT (y overlapping x; y, the
 * workspace or the reserve overlapping a parameter buffer of the layer;
 * workspace or reserve not aligned for float). */
MASA_API masa_status masa_layer_forward(const masa_layer *layer, size_t batch,
                                        size_t seq, size_t pos_offset,
                                        const float *x, float *y,
                                        void *workspace, size_t workspace_bytes,
                                        void *reserve, size_t reserve_bytes);

/* How backward writes parameter gradients. */
typedef enum masa_grad_mode {
    MASA_GRAD_SET = 0, /* overwrite: g = this call's gradient */
    MASA_GRAD_ADD = 1  /* accumulate: g += this call's gradient */
} masa_grad_mode;

/* Where backward writes gradients; initialise with masa_layer_grads_init(),
 * which sets size, mode = MASA_GRAD_ADD and every pointer to NULL. A NULL
 * pointer means "not wanted" and that gradient is skipped.
 *
 * For projection p:
 *   d_atoms[p]         MASA: n_atoms * rows * cols floats, same layout as the
 *                      dictionary. Every atom of the dictionary is written
 *                      (SET) or added to (ADD): dD_s (+)= c[l, s] dW_l.
 *   d_coefficients[p]  MASA: n_layers * n_atoms floats, same layout as the
 *                      table. Only row layer_index is written or added to:
 *                      dc[l, s] (+)= <D_s, dW_l>_F; other rows are untouched.
 *   d_weight[p]        dense: d_in * d_out floats, dW = X^T dY.
 *   d_bias[p]          d_out floats, column sums of dY (projection must have
 *                      a bias).
 *   d_lowrank_a[p]     low-rank term: d_in * rank floats (A's layout),
 *                      dA = X^T (dY B^T).
 *   d_lowrank_b[p]     low-rank term: rank * d_out floats (B's layout),
 *                      dB = (X A)^T dY.
 * Gradients that do not apply to a projection (d_atoms of a dense one, ...)
 * must be NULL.
 *
 * Shared atoms: layers that share a dictionary each contribute to its atom
 * gradient. Use MASA_GRAD_ADD with one zeroed buffer for all layers (the
 * usual case), or MASA_GRAD_SET with one buffer per layer and sum them. */
typedef struct masa_layer_grads {
    size_t size;             /* sizeof(masa_layer_grads), set by _init */
    int mode;                /* a masa_grad_mode: SET or ADD, for every
                                parameter gradient (int: fixed layout) */
    float *d_atoms[MASA_NUM_PROJECTIONS];
    float *d_coefficients[MASA_NUM_PROJECTIONS];
    float *d_weight[MASA_NUM_PROJECTIONS];
    float *d_bias[MASA_NUM_PROJECTIONS];
    /* Added after 0.1 (low-rank terms). A struct of an older program ends
     * before these fields (its size says so); it is accepted and means NULL
     * here. */
    float *d_lowrank_a[MASA_NUM_PROJECTIONS];
    float *d_lowrank_b[MASA_NUM_PROJECTIONS];
} masa_layer_grads;

/* Defaults into the first `size` bytes, as masa_context_options_default. */
MASA_API void masa_layer_grads_default(masa_layer_grads *grads, size_t size);
#define masa_layer_grads_init(grads) \
    masa_layer_grads_default((grads), sizeof *(grads))

/* Backward pass.
 *   x, batch, seq, pos_offset  exactly as given to the forward call that
 *                              filled `reserve`
 *   reserve    as filled by that forward call, read only
 *   dy         [batch, seq, d_model], gradient of the loss w.r.t. y, read
 *   dx         [batch, seq, d_model], overwritten (always SET), or NULL
 *   grads      where parameter gradients go (NULL: none)
 *   workspace  at least masa_layer_workspace_size() bytes
 * Gradient buffers must not overlap each other, dx or the inputs (checked:
 * MASA_ERROR_INVALID_ARGUMENT); a dictionary used by two projections of one
 * layer therefore needs two d_atoms buffers (or two calls with ADD).
 * Outputs and the workspace must not overlap a parameter buffer of the
 * layer (MASA_ERROR_INVALID_ARGUMENT).
 * A reserve that was filled by another layer (also one destroyed since,
 * whatever its address), with another batch, seq or pos_offset, or before
 * the layer's parameters were modified (see "Parameters modified between
 * forward and backward"), is refused with MASA_ERROR_INVALID_ARGUMENT;
 * positions as in masa_layer_forward() (OVERFLOW, OUT_OF_RANGE).
 * Accuracy: every gradient is accurate relative to its own size also where
 * the softmax saturates or one key takes almost all of a row's mass (the
 * probabilities are rebuilt from each row's maximum and sum, kept apart, and
 * each row's dS sums to 0 as it does exactly); what remains is the
 * conditioning of float32 logits, about 6e-8 times their size
 * (benchmarks/softmax_accuracy.py measures it against float64). */
MASA_API masa_status masa_layer_backward(const masa_layer *layer, size_t batch,
                                         size_t seq, size_t pos_offset,
                                         const float *x, const float *dy,
                                         float *dx,
                                         const masa_layer_grads *grads,
                                         void *workspace,
                                         size_t workspace_bytes,
                                         const void *reserve,
                                         size_t reserve_bytes);


/* ======================================================================
 * Incremental decoding with a key/value cache (inference only)
 * ======================================================================
 *
 * A generation loop feeds a causal layer a few tokens at a time. The cache
 * keeps the keys (RoPE applied) and values of every token seen so far, so
 * each call projects only the new tokens and attends over the cache:
 *
 *     masa_kv_cache_size(layer, batch, max_seq, &bytes);
 *     memory = aligned_alloc(64, bytes);             (caller-owned)
 *     masa_kv_cache_create(layer, batch, max_seq, memory, bytes, &cache);
 *     masa_layer_decode_workspace_size(layer, batch, n, &ws_bytes);
 *     masa_layer_decode(layer, cache, batch, n, prompt, y, ws, ws_bytes);
 *     for each new token:
 *         masa_layer_decode(layer, cache, batch, 1, x, y, ws, ws_bytes);
 *
 * Decoding a sequence in any split into chunks (a prefill chunk, then one
 * token per call, ...) gives the y that masa_layer_forward() gives for the
 * whole sequence with pos_offset 0, up to float rounding (the order of the
 * sums differs). Each layer of a stack needs its own cache.
 *
 * Only causal layers decode: in a non-causal layer earlier outputs depend on
 * later tokens, so appending tokens cannot leave them unchanged. Every
 * function below refuses a non-causal layer with
 * MASA_ERROR_INVALID_ARGUMENT. There is no backward through the cache.
 *
 * All sequences of a batch hold the same number of positions (each call
 * appends n_new tokens to every sequence); sequences of different lengths
 * need separate caches (or the caller's own padding).
 *
 * Threads: a decode call modifies its cache and only reads the layer, so
 * several threads may decode with one layer at once, each with its own
 * cache, workspace and buffers (see "Threads" at the top). Functions that
 * modify a cache need exclusive access to it.
 */

typedef struct masa_kv_cache masa_kv_cache;

/* Layout of the cache memory (documented so a framework can inspect it):
 * keys, then values, each batch * n_kv_heads * max_seq * head_dim floats,
 * [batch, n_kv_heads, max_seq, head_dim] row-major. Keys carry their RoPE
 * rotation. Only positions below masa_kv_cache_length() hold data. */

/* Bytes of cache memory for `batch` sequences of up to `max_seq` tokens:
 * 2 * batch * n_kv_heads * max_seq * head_dim * sizeof(float).
 * Errors: NULL_ARGUMENT, INVALID_ARGUMENT (non-causal layer), BAD_SHAPE
 * (batch or max_seq 0), OUT_OF_RANGE (RoPE layer and max_seq - 1 >
 * MASA_MAX_POSITION), OVERFLOW. */
MASA_API masa_status masa_kv_cache_size(const masa_layer *layer,
                                        size_t batch, size_t max_seq,
                                        size_t *bytes);

/* Creates an empty cache (length 0) over caller memory for layers of
 * `layer`'s key/value shape (n_kv_heads, head_dim). memory: at least
 * masa_kv_cache_size() bytes, aligned for float (64 bytes is best), owned by
 * the caller, valid and not used for anything else until the cache is
 * destroyed; its contents on entry do not matter. The handle itself comes
 * from the layer's context allocator. *out is NULL on failure.
 * Errors: NULL_ARGUMENT, INVALID_ARGUMENT (non-causal layer, memory not
 * aligned for float), BAD_SHAPE, OUT_OF_RANGE (as masa_kv_cache_size()),
 * OVERFLOW, BUFFER_TOO_SMALL (memory_bytes), OUT_OF_MEMORY (the handle). */
MASA_API masa_status masa_kv_cache_create(const masa_layer *layer,
                                          size_t batch, size_t max_seq,
                                          void *memory, size_t memory_bytes,
                                          masa_kv_cache **out);

/* Destroys the handle (not the caller's memory). Accepts NULL. Destroy every
 * cache before the context its layer came from. */
MASA_API void masa_kv_cache_destroy(masa_kv_cache *cache);

/* Empties the cache (length 0) so it can start new sequences, with any layer
 * of the shape it was made for. The memory is not cleared. */
MASA_API masa_status masa_kv_cache_reset(masa_kv_cache *cache);

/* Keeps only the first `length` positions of every sequence (drops later
 * tokens, e.g. to regenerate them); length 0 is masa_kv_cache_reset().
 * Errors: NULL_ARGUMENT, OUT_OF_RANGE (length > the current length). */
MASA_API masa_status masa_kv_cache_truncate(masa_kv_cache *cache,
                                            size_t length);

/* Positions filled per sequence (the RoPE position the next token gets). */
MASA_API masa_status masa_kv_cache_length(const masa_kv_cache *cache,
                                          size_t *length);

/* batch and max_seq the cache was made for; either pointer may be NULL. */
MASA_API masa_status masa_kv_cache_shape(const masa_kv_cache *cache,
                                         size_t *batch, size_t *max_seq);

/* Bytes of workspace masa_layer_decode() needs for `n_new` tokens of each of
 * `batch` sequences. It depends on the layer's shapes, the number of atoms
 * of its MASA projections and the ranks of its low-rank terms (query again
 * after masa_layer_set_masa() with another dictionary or
 * masa_layer_set_lowrank()) and its context's thread count, not on the weight
 * policy or the cache length: one workspace serves a whole generation loop.
 * A workspace sized for n_new also serves every smaller n_new at the same
 * batch.
 * Errors: NULL_ARGUMENT, INVALID_ARGUMENT (non-causal layer), NOT_READY (a
 * projection not set), BAD_SHAPE (batch or n_new 0), OVERFLOW. */
MASA_API masa_status masa_layer_decode_workspace_size(const masa_layer *layer,
                                                      size_t batch,
                                                      size_t n_new,
                                                      size_t *bytes);

/* Appends n_new >= 1 tokens to every sequence of the cache and returns their
 * outputs.
 *   cache      made for this layer's key/value shape and `batch`; holding
 *              keys of this layer or empty (a cache filled by another layer
 *              must be reset first; so must a cache whose layer was
 *              destroyed). On success its length grows by n_new.
 *   x          [batch, n_new, d_model], read: the new tokens
 *   y          [batch, n_new, d_model], overwritten; must not overlap x, the
 *              workspace or the cache memory
 *   workspace  at least masa_layer_decode_workspace_size(batch, n_new)
 *              bytes, aligned for float, any contents
 * New token t of a sequence gets RoPE position length + t and attends to
 * every cached position and to new tokens 0..t (causal).
 * The cached keys and values were computed with the layer's parameters at
 * the time they were added: after any modification of the parameters (see
 * "Parameters modified between forward and backward") a non-empty cache is
 * refused (INVALID_ARGUMENT) until it is reset.
 * MASA projections with the MASA_WEIGHTS_CACHED policy read the
 * composed weight (low-rank term included), as a dense layer does; every
 * other projection applies its low-rank term, if any, as (x A) B, reading
 * the small factors instead of a d_in x d_out matrix. Otherwise, MASA
 * projections of a single row (batch 1, one token) multiply
 * [c_1 x | ... | c_S x] by the atoms stacked as an (S d_in) x d_out matrix,
 * reading the atoms once and never forming W_l; from two rows up (with
 * S >= 2) they compose W_l into the workspace first. The rule: whichever
 * moves fewer bytes, counting a multiply-add as one byte.
 * Errors: NULL_ARGUMENT; INVALID_ARGUMENT (non-causal layer, a cache filled
 * by another layer or before a modification of the parameters, overlapping
 * buffers, y, workspace or cache memory overlapping a parameter buffer,
 * workspace not aligned for float);
 * NOT_READY; BAD_SHAPE (n_new 0, batch differs from the cache's, cache made
 * for another n_kv_heads or head_dim); OUT_OF_RANGE (the cache is full:
 * length + n_new > max_seq; with RoPE, length + n_new - 1 >
 * MASA_MAX_POSITION); BUFFER_TOO_SMALL (workspace); OVERFLOW. On any
 * error neither the cache nor y has been modified. */
MASA_API masa_status masa_layer_decode(const masa_layer *layer,
                                       masa_kv_cache *cache, size_t batch,
                                       size_t n_new, const float *x, float *y,
                                       void *workspace,
                                       size_t workspace_bytes);

#ifdef __cplusplus
}
#endif

/* Compressing pretrained weights: Matrix PCA, grouping, calibration
 * statistics, the whitened low-rank residual. */
#include "compress.h"
/* ReplaceMe: training-free depth pruning (linear-map estimators, merge). */
#include "replaceme.h"

/* safetensors files and compressed models (include/masa/io.h) */
#include "io.h"

#endif /* MASA_MASA_H */
