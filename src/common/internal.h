/* Internal declarations shared by the library's source files. */
#ifndef MASA_INTERNAL_H
#define MASA_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "masa/masa.h"

/* ---- errors (error.c) ---- */

/* Records a message for masa_last_error() and returns status. */
masa_status masa__fail(masa_status status, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
/* Clears the calling thread's message (start of every public call). */
void masa__clear_error(void);

/* ---- checked size arithmetic (alloc.c) ---- */

/* *out = a * b; false on overflow. */
bool masa__mul(size_t a, size_t b, size_t *out);
/* *out = a * b * c; false on overflow. */
bool masa__mul3(size_t a, size_t b, size_t c, size_t *out);
/* *acc += a; false on overflow. */
bool masa__add(size_t *acc, size_t a);

/* ---- allocation through the context's hook (alloc.c) ---- */

void *masa__alloc(const masa_context *ctx, size_t bytes);
void *masa__calloc(const masa_context *ctx, size_t count, size_t elem);
void masa__free(const masa_context *ctx, void *ptr);

/* ---- worker pool (pool.c) ---- */

typedef struct masa_pool masa_pool;
/* task(arg, task_index, thread_index): thread_index < n_threads of the pool */
typedef void (*masa_task_fn)(void *arg, size_t task, size_t thread);

masa_status masa__pool_create(const masa_context *ctx, size_t n_threads,
                              masa_pool **out);
void masa__pool_destroy(const masa_context *ctx, masa_pool *pool);
/* Runs task(arg, i, thread) for i in [0, n_tasks). If the pool is busy with
 * another call, everything runs on the calling thread as thread 0. */
void masa__pool_run(masa_pool *pool, size_t n_tasks, masa_task_fn task,
                    void *arg);

/* ---- context (context.c) ---- */

struct masa_context {
    size_t n_threads;
    masa_malloc_fn malloc_fn;
    masa_free_fn free_fn;
    void *alloc_user;
    masa_pool *pool;
};

/* Copies the defaults `full` (known_size bytes) into the caller's struct of
 * `size` bytes: zero-fills it, copies what fits, sets the size field. */
void masa__struct_defaults(void *dst, size_t size, const void *full,
                           size_t known_size);

/* Validates a size-prefixed struct: size must be at least this library's
 * size, and bytes past known_size (a newer program's fields) must be zero. */
masa_status masa__check_struct_size(const char *fn, const void *opts,
                                    size_t given, size_t known_size);

/* ---- random numbers (random.c) ---- */

/* Uniform in [-bound, bound], deterministic per (seed, index). */
void masa__fill_uniform(float *dst, size_t n, float bound, uint64_t seed);
void masa__add_uniform(float *dst, size_t n, float bound, uint64_t seed);

/* ---- BLIS glue (blis_glue.c) ---- */

/* Initialises BLIS once (choosing kernels, see masa.h). */
void masa__blis_init(void);
/* Chooses a BLIS_ARCH_TYPE value for the given situation, or -1 for "leave
 * BLIS alone". Pure function, exposed for tests. */
int masa__blis_arch_choice(const char *user_arch_type, const char *masa_opt,
                           bool cpu_has_avx512);

/* C = alpha * op(A) op(B) + beta * C with explicit strides (row stride,
 * column stride) for each matrix; m x k times k x n. n_threads BLIS threads. */
void masa__gemm(size_t m, size_t n, size_t k, float alpha,
                const float *a, size_t rsa, size_t csa,
                const float *b, size_t rsb, size_t csb, float beta,
                float *c, size_t rsc, size_t csc, size_t n_threads);
/* masa__gemm split across the pool, one single-threaded BLIS call per
 * thread on a block of C's rows or columns: BLIS's own threads wait for
 * each other in spin barriers, which on a loaded machine (a thread
 * descheduled) made products several times slower (see decode_project.c).
 * Small products run on the calling thread. */
void masa__gemm_pool(masa_pool *pool, size_t n_threads, size_t m, size_t n,
                     size_t k, float alpha, const float *a, size_t rsa,
                     size_t csa, const float *b, size_t rsb, size_t csb,
                     float beta, float *c, size_t rsc, size_t csc);
/* y = alpha * A x + beta * y, A m x n with strides. */
void masa__gemv(size_t m, size_t n, float alpha, const float *a, size_t rsa,
                size_t csa, const float *x, float beta, float *y,
                size_t n_threads);

/* ---- dictionaries and coefficient tables ---- */

struct masa_dictionary {
    masa_context *ctx;
    size_t n_atoms, rows, cols;
    float *atoms;
    bool owned;
};

struct masa_coefficients {
    masa_context *ctx;
    size_t n_layers, n_atoms;
    float *data;
    bool owned;
};

/* Whether the CPU has AVX2 and FMA, checked once: the vector kernels of
 * composition and softmax are compiled for them and chosen at run time
 * (src/fast_exp.c). */
bool masa__cpu_has_avx2_fma(void);

/* W = sum_s c[layer, s] D_s, no argument checks. One pass over the atoms,
 * split across `pool` (NULL: on the calling thread). */
void masa__compose(const masa_dictionary *dict, const masa_coefficients *coef,
                   size_t layer, float *w, masa_pool *pool);

/* Doubles of scratch masa__atom_grads() may use for its per-task sums of
 * dc (a fixed size, so the workspace does not depend on the atom count).
 * The scratch is only float-aligned (workspaces are): accessed by memcpy. */
#define MASA_ATOM_GRAD_PARTIALS 2048

/* Given G = dW_l of a MASA projection (rows*cols floats), in one pass over
 * the atoms: dc[s] (+)= <D_s, G> when dc is not NULL, dD_s (+)= c[l, s] G
 * when d_atoms is not NULL (add false: overwrite), and W_l into w when w is
 * not NULL. partials: MASA_ATOM_GRAD_PARTIALS doubles of scratch. */
void masa__atom_grads(const masa_dictionary *dict,
                      const masa_coefficients *coef, size_t layer,
                      const float *g, float *dc, float *d_atoms, bool add,
                      float *w, void *partials, masa_pool *pool);

/* ---- layers ---- */

typedef struct masa_proj_state {
    bool set;               /* a base weight (MASA or dense) has been chosen */
    bool is_masa;
    masa_dictionary *dict;  /* MASA */
    masa_coefficients *coef;
    size_t layer_index;
    float *weight;          /* dense */
    bool weight_owned;
    float *bias;            /* NULL = no bias */
    bool bias_owned;
    size_t d_in, d_out;
    /* MASA under MASA_WEIGHTS_CACHED: W_l composed when the cache was last
     * filled (owned, d_in * d_out floats), low-rank term included; NULL
     * otherwise. */
    float *composed_cache;
    /* Low-rank term A B (rank 0: none): A d_in x rank, B rank x d_out. */
    size_t rank;
    float *lowrank_a, *lowrank_b;
    bool lowrank_a_owned, lowrank_b_owned;
} masa_proj_state;

struct masa_layer {
    masa_context *ctx;
    size_t d_model, n_heads, n_kv_heads, head_dim;
    size_t dq, dkv;         /* n_heads * head_dim, n_kv_heads * head_dim */
    bool causal, rope;
    float rope_theta, scale;
    masa_weight_policy policy;
    masa_proj_state proj[MASA_NUM_PROJECTIONS];
};

/* Byte offsets of the reserve's parts (all float arrays). */
typedef struct masa_reserve_layout {
    size_t q, k, v, attn, softmax, total; /* offsets in floats, total in floats */
} masa_reserve_layout;

/* The reserve starts with a stamp of the forward call that filled it, so
 * backward can refuse a reserve from another layer or shape. */
typedef struct masa_reserve_stamp {
    uint64_t magic;
    const void *layer;
    uint64_t batch, seq, pos_offset;
} masa_reserve_stamp;
#define MASA_RESERVE_MAGIC 0x6d61736172737631ull /* "masarsv1" */
/* Floats set aside for the stamp (keeps the arrays 64-byte aligned). */
#define MASA_RESERVE_STAMP_FLOATS 16

/* Layout of forward's and backward's workspace (offsets in floats). */
typedef struct masa_workspace_layout {
    size_t fwd_qkv;   /* Q, K, V, A when no reserve is given */
    size_t weight;    /* composed weight (largest projection) */
    size_t dweight;   /* dW for MASA projections (backward) */
    size_t partials;  /* MASA_ATOM_GRAD_PARTIALS doubles (backward), at
                         float alignment only */
    size_t grad_a;    /* dA, dQ, dK, dV (backward) */
    size_t lowrank;   /* X A and dY B^T of a low-rank term: 2 * rows * the
                         largest rank */
    size_t tiles;     /* per-thread attention tiles */
    size_t tile_floats; /* floats per thread */
    size_t total;     /* floats */
} masa_workspace_layout;

/* fn names the public function in error messages. */
masa_status masa__reserve_layout(const char *fn, const masa_layer *layer,
                                 size_t batch, size_t seq,
                                 masa_reserve_layout *out);
masa_status masa__workspace_layout(const char *fn, const masa_layer *layer,
                                   size_t batch, size_t seq,
                                   masa_workspace_layout *out);

/* Tokens at positions first .. first + count - 1: OVERFLOW when that passes
 * SIZE_MAX, OUT_OF_RANGE (RoPE layers) beyond MASA_MAX_POSITION. */
masa_status masa__check_positions(const char *fn, const masa_layer *layer,
                                  size_t first, size_t count);

/* Layouts for (batch, seq), then the workspace's and (when not NULL) the
 * reserve's size and alignment: the checks forward and backward share. */
masa_status masa__check_call_buffers(const char *fn, const masa_layer *layer,
                                     size_t batch, size_t seq,
                                     const void *workspace,
                                     size_t workspace_bytes,
                                     const void *reserve, size_t reserve_bytes,
                                     masa_workspace_layout *wl,
                                     masa_reserve_layout *rl);

/* Pointer to the base weight of a projection: the dense weight, the
 * composed cache (low-rank term included), or W_l composed into scratch
 * (without it). NULL for a projection without a base. */
const float *masa__projection_weight(const masa_layer *layer, int p,
                                     float *scratch);

/* W = sum_s c[l, s] D_s (+ A B) of MASA projection p into w. */
void masa__compose_projection(const masa_layer *layer, int p, float *w);

/* Whether a MASA projection under ON_THE_FLY adds its low-rank term to the
 * weight it composes for a call of `rows` rows (rank d_in d_out
 * multiply-adds once) rather than running (X A) B (rank rows (d_in + d_out)):
 * the one with fewer multiply-adds. */
bool masa__lowrank_folds(const masa_proj_state *ps, size_t rows);

/* Whether projection p's weight as used at `rows` rows already holds its
 * low-rank term (a composed cache, or folded); false without a term. */
bool masa__lowrank_in_weight(const masa_proj_state *ps, size_t rows);

/* w (d_in x d_out) += A B of projection p. */
void masa__add_lowrank(const masa_layer *layer, int p, float *w);

/* The largest rank of the layer's low-rank terms (0: none). */
size_t masa__max_rank(const masa_layer *layer);
/* Frees the factors the layer owns and forgets the term (rank 0). */
void masa__release_lowrank(const masa_layer *layer, masa_proj_state *ps);

/* ---- RoPE (rope.c) ---- */

/* Rotates n_heads heads of every token of x ([rows, row_stride]) in place.
 * direction +1 applies the rotation, -1 its inverse (for gradients). */
void masa__rope(float *x, size_t batch, size_t seq, size_t row_stride,
                size_t n_heads, size_t head_dim, size_t pos_offset,
                float theta, int direction);

/* ---- attention core ---- */

typedef struct masa_attn_args {
    const masa_layer *layer;
    size_t batch, seq;
    const float *q, *k, *v; /* [B*T, dq], [B*T, dkv], [B*T, dkv] */
    float *attn;            /* [B*T, dq] output */
    /* [B, H, T] each: maximum and log of the sum of exp(s - max) of each
     * row's scaled scores. Kept apart, not as the log-sum-exp max + log(sum):
     * rounded to float at the scores' magnitude (an ulp of 1e6 is 0.06) that
     * sum would scale backward's probabilities by up to 3%. */
    float *row_max, *row_log_sum;
    const float *d_attn;    /* backward: dA */
    float *dq, *dk, *dv;    /* backward outputs */
    float *tiles;           /* per-thread scratch */
    size_t tile_floats;
} masa_attn_args;

void masa__attention_forward(masa_attn_args *args);
void masa__attention_backward(masa_attn_args *args);
/* Floats of per-thread scratch the attention core needs; SIZE_MAX when that
 * overflows size_t. */
size_t masa__attention_tile_floats(size_t seq, size_t head_dim);

/* ---- layer forward/backward helpers (layer_forward.c) ---- */

bool masa__overlaps(const void *a, size_t a_bytes, const void *b,
                    size_t b_bytes);
bool masa__float_aligned(const void *p);
/* out[rows x d_out] = in[rows x d_in] W_p (+ bias_p). lowrank_scratch:
 * rows * rank floats for X A. */
void masa__project(const masa_layer *layer, int p, const float *in,
                   size_t rows, float *out, float *weight_scratch,
                   float *lowrank_scratch);

/* Backward of projection p (layer_backward.c), given its input X
 * (rows x d_in) and output gradient dY (rows x d_out): the parameter
 * gradients of g, and dx (+)= dY W_p^T when dx is not NULL (beta 0:
 * overwrite). Scratch: w_scratch and g_scratch d_in * d_out floats each,
 * partials MASA_ATOM_GRAD_PARTIALS doubles, lowrank_scratch 2 * rows * rank
 * floats. g is a full-size struct (older, smaller ones copied first). */
void masa__project_backward(const masa_layer *layer, int p, const float *in,
                            const float *dy, size_t rows,
                            const masa_layer_grads *g, float *dx, float beta,
                            float *w_scratch, float *g_scratch,
                            void *partials, float *lowrank_scratch);

/* MASA_ERROR_NOT_READY unless every projection has a base weight or a
 * low-rank term. */
masa_status masa__check_ready(const char *fn, const masa_layer *layer);

/* ---- incremental decoding (kv_cache.c, decode_project.c,
 *      decode_attention.c, layer_decode.c) ---- */

/* Keys and values of the tokens decoded so far, in caller memory: K then V,
 * each [batch, n_kv_heads, max_seq, head_dim] (RoPE already applied to K). */
struct masa_kv_cache {
    masa_context *ctx;
    size_t batch, max_seq, n_kv_heads, head_dim;
    size_t length;            /* positions filled, the same for every sequence */
    float *k, *v;
    size_t bytes;             /* of the caller memory (for overlap checks) */
    const masa_layer *owner;  /* layer whose keys fill it; NULL when empty */
};

/* MASA_ERROR_INVALID_ARGUMENT unless the layer can decode (causal). */
masa_status masa__check_decodable(const char *fn, const masa_layer *layer);

/* How a projection's product runs at decode (see decode_project.c for the
 * rule). */
typedef enum masa_proj_path {
    MASA_PATH_DENSE = 0,    /* the dense weight */
    MASA_PATH_FACTORED = 1, /* [c_1 X | ... | c_S X] times the stacked atoms */
    MASA_PATH_COMPOSE = 2,  /* W_l from masa__projection_weight(), then X W */
    MASA_PATH_NONE = 3      /* no base weight: only the low-rank term */
} masa_proj_path;

masa_proj_path masa__decode_proj_path(const masa_layer *layer, int p,
                                      size_t rows);
/* Floats of operand scratch projection p needs at `rows` rows (X' for the
 * factored path, W for composition, 0 for dense), plus X A of a low-rank
 * term applied as (X A) B. */
size_t masa__decode_proj_scratch(const masa_layer *layer, int p, size_t rows);

/* Floats of partial sums projection p needs at up to `rows` rows. */
size_t masa__decode_proj_partials(const masa_layer *layer, int p,
                                  size_t rows);

/* One product of a decode step: out[rows x d_out] = in W_p (+ bias). */
typedef struct masa_decode_proj {
    int p;
    const float *in;
    float *out;
    float *scratch;  /* masa__decode_proj_scratch() floats */
    float *partials; /* masa__decode_proj_partials() floats */
} masa_decode_proj;

/* Runs n projections (up to MASA_NUM_PROJECTIONS) of `rows` rows each, in
 * one pass over the pool when the products are small. */
void masa__decode_project(const masa_layer *layer, masa_decode_proj *projs,
                          size_t n, size_t rows);

/* Decode attention: new queries of `n_new` tokens per sequence against the
 * cache's first `length` positions (the new tokens' keys included). */
typedef struct masa_decode_attn_args {
    const masa_layer *layer;
    const masa_kv_cache *cache;
    size_t batch, n_new, length; /* length = keys visible to the last token */
    const float *q;              /* [batch * n_new, dq], RoPE applied */
    float *attn;                 /* [batch * n_new, dq] output */
    float *thread_scratch;       /* n_threads * thread_floats */
    size_t thread_floats;
    float *partials;             /* split results: partial_floats */
} masa_decode_attn_args;

typedef struct masa_decode_attn_sizes {
    size_t thread_floats;  /* per-thread scratch */
    size_t partial_floats; /* split partial results (all tasks) */
} masa_decode_attn_sizes;

/* Scratch sizes for `n_new` tokens per sequence; false on overflow. */
bool masa__decode_attn_sizes(const masa_layer *layer, size_t n_new,
                             masa_decode_attn_sizes *out);
void masa__decode_attention(masa_decode_attn_args *args);

#endif
