/*
 * Shared helpers of the libmasa tests: a deterministic RNG, buffers,
 * tolerance checks and a fixture that builds a layer from a compact spec and
 * mirrors its parameters in double for the reference.
 */
#ifndef MASA_TESTS_TEST_UTIL_H
#define MASA_TESTS_TEST_UTIL_H

#include <check.h>
#include <stddef.h>
#include <stdint.h>

#include <masa/masa.h>

#include "reference.h"

/* ---- RNG: splitmix64, so every run and platform sees the same data ---- */
typedef struct tu_rng {
    uint64_t s;
} tu_rng;

uint64_t tu_next(tu_rng *r);
double tu_unif(tu_rng *r, double lo, double hi);
void tu_fill(tu_rng *r, float *a, size_t n, float lo, float hi);

/* ---- Buffers (abort on allocation failure: a test environment fault) ---- */
float *tu_falloc(size_t n);        /* zeroed */
double *tu_dalloc(size_t n);       /* zeroed */
double *tu_to_double(const float *a, size_t n);
/* Workspace/reserve stand-in: filled with 0xFF bytes (NaN as float), so a
 * library that reads scratch it has not written produces NaN. */
void *tu_garbage(size_t bytes);
void tu_fill_garbage(void *p, size_t bytes);

/* ---- Tolerance checks ----
 * Pass when max_i |got_i - ref_i| <= rtol * max_i |ref_i| + atol.
 * On failure the Check assertion names the worst element. */
void tu_assert_close_(const char *file, int line, const char *what,
                      const float *got, const double *ref, size_t n,
                      double rtol, double atol);
#define TU_ASSERT_CLOSE(what, got, ref, n, rtol) \
    tu_assert_close_(__FILE__, __LINE__, (what), (got), (ref), (n), (rtol), 1e-6)

/* Float against float (e.g. one thread against two). */
void tu_assert_close_ff_(const char *file, int line, const char *what,
                         const float *got, const float *ref, size_t n,
                         double rtol);
#define TU_ASSERT_CLOSE_FF(what, got, ref, n, rtol) \
    tu_assert_close_ff_(__FILE__, __LINE__, (what), (got), (ref), (n), (rtol))

/* Double against double (float64 results such as Grams and energies):
 * max_i |got_i - ref_i| <= rtol * max_i |ref_i|. */
void tu_assert_close_dd_(const char *file, int line, const char *what,
                         const double *got, const double *ref, size_t n,
                         double rtol);
#define TU_ASSERT_CLOSE_DD(what, got, ref, n, rtol) \
    tu_assert_close_dd_(__FILE__, __LINE__, (what), (got), (ref), (n), (rtol))

/* A context with n_threads threads (fails the test if it cannot be made). */
masa_context *tu_context(size_t n_threads);

/* Status check that prints masa_last_error() on failure. */
#define TU_OK(call)                                                       \
    do {                                                                  \
        masa_status st_ = (call);                                         \
        ck_assert_msg(st_ == MASA_OK, "%s -> %d (%s): %s", #call, (int)st_, \
                      masa_status_string(st_), masa_last_error());        \
    } while (0)

/* ---- Layer fixture ---- */
typedef struct tu_spec {
    size_t d_model, n_heads, n_kv_heads, head_dim; /* 0 as in masa.h */
    int causal, rope;
    float rope_theta;    /* 0: keep the masa_layer_options_init() default */
    float softmax_scale; /* 0: library default 1/sqrt(head_dim) */
    unsigned masa_mask;  /* bit p: projection p is MASA, else dense */
    unsigned bias_mask;  /* bit p: projection p has a bias */
    size_t n_atoms, n_layers, layer_index;
    int wrap;       /* 1: parameters wrap caller memory; 0: library-owned */
    int share_dict; /* MASA Q/K/V share one dictionary and table (MHA) */
    /* Low-rank terms A B (masa_layer_set_lowrank), rank `rank` clamped to
     * min(d_in, d_out): bit p of lowrank_mask gives projection p one; bit p
     * of baseless_mask leaves its base unset (the term alone). */
    unsigned lowrank_mask, baseless_mask;
    size_t rank;
} tu_spec;

typedef struct tu_layer {
    tu_spec spec;
    ref_config cfg; /* resolved options for the reference */
    masa_layer *layer;
    masa_dictionary *dict[REF_NPROJ]; /* NULL for dense projections */
    masa_coefficients *coef[REF_NPROJ];
    size_t lidx[REF_NPROJ]; /* table row used by projection p */
    size_t din[REF_NPROJ], dout[REF_NPROJ];
    size_t rank[REF_NPROJ];           /* 0: no low-rank term */
    float *mem[24]; /* caller-owned parameter memory */
    size_t n_mem;
} tu_layer;

void tu_layer_init(tu_layer *t, masa_context *ctx, const tu_spec *s,
                   uint64_t seed);
void tu_layer_fini(tu_layer *t);

int tu_is_masa(const tu_layer *t, int p); /* MASA base */
int tu_has_base(const tu_layer *t, int p);  /* MASA or dense base */
int tu_has_bias(const tu_layer *t, int p);
size_t tu_atoms_len(const tu_layer *t, int p); /* n_atoms * din * dout */
size_t tu_coefs_len(const tu_layer *t, int p); /* n_layers * n_atoms */

/* Current parameters in double (MASA weights composed in double); b[p] is
 * NULL without a bias. Free with tu_free_params(). */
void tu_ref_params(const tu_layer *t, double *W[REF_NPROJ],
                   double *b[REF_NPROJ]);
void tu_free_params(double *W[REF_NPROJ], double *b[REF_NPROJ]);

/* Reference y (and, if dy != NULL, dx, dW[p], db[p]) for float inputs.
 * Outputs are allocated here; free with free() / tu_free_params(). */
typedef struct tu_ref_out {
    double *y, *dx;
    double *dW[REF_NPROJ], *db[REF_NPROJ];
    /* MASA projections: atom and coefficient-row gradients */
    double *d_atoms[REF_NPROJ], *dc[REF_NPROJ];
    /* Low-rank terms: gradients of A and B */
    double *d_lowrank_a[REF_NPROJ], *d_lowrank_b[REF_NPROJ];
} tu_ref_out;
void tu_reference(const tu_layer *t, size_t batch, size_t seq, size_t pos,
                  const float *x, const float *dy, tu_ref_out *out);
void tu_ref_out_free(tu_ref_out *out);

size_t tu_workspace_bytes(const tu_layer *t, size_t batch, size_t seq);
size_t tu_reserve_bytes(const tu_layer *t, size_t batch, size_t seq);

/* Check main: runs the suite, honouring CK_FORK; returns the exit status. */
int tu_run_suite(Suite *s);

#endif
