/*
 * Independent double-precision reference of one MASA attention layer.
 *
 * Written from the formulas in masa.h and DESIGN.md with plain loops; it
 * shares no code with libmasa and does not use BLIS, so an error in the
 * library cannot hide behind the same error here.
 *
 * Layout conventions are those of masa.h: row-major, activations
 * [batch, seq, features], weights d_in x d_out, projection order Q, K, V, O.
 */
#ifndef MASA_TESTS_REFERENCE_H
#define MASA_TESTS_REFERENCE_H

#include <stddef.h>

#define REF_Q 0
#define REF_K 1
#define REF_V 2
#define REF_O 3
#define REF_NPROJ 4

/* All values resolved (no "0 = default"): the tests resolve defaults
 * themselves, following the header, so the reference checks them too. */
typedef struct ref_config {
    size_t d_model;
    size_t n_heads;
    size_t n_kv_heads;
    size_t head_dim;
    int causal;
    int rope;
    double rope_theta;
    double scale; /* softmax scale */
} ref_config;

size_t ref_d_in(const ref_config *cfg, int proj);
size_t ref_d_out(const ref_config *cfg, int proj);

/* y[B,T,d_model] = layer(x). W[p] is d_in x d_out; b[p] may be NULL. */
void ref_forward(const ref_config *cfg, size_t batch, size_t seq,
                 size_t pos_offset, const double *x,
                 const double *const W[REF_NPROJ],
                 const double *const b[REF_NPROJ], double *y);

/* Gradients of a loss with dL/dy = dy (all outputs overwritten):
 * dx [B,T,d_model] (may be NULL), dW[p] (d_in x d_out, entry may be NULL),
 * db[p] (d_out, entry may be NULL). */
void ref_backward(const ref_config *cfg, size_t batch, size_t seq,
                  size_t pos_offset, const double *x,
                  const double *const W[REF_NPROJ],
                  const double *const b[REF_NPROJ], const double *dy,
                  double *dx, double *const dW[REF_NPROJ],
                  double *const db[REF_NPROJ]);

/* W = sum_s c[s] D_s, atoms in dictionary layout (S x rows x cols). */
void ref_compose(size_t n_atoms, size_t rows, size_t cols,
                 const double *atoms, const double *c, double *W);

/* From the gradient dW of a composed weight: d_atoms[s] = c[s] dW (S x rows x
 * cols, overwritten) and dc[s] = <D_s, dW>_F (S values, overwritten).
 * Either output may be NULL. */
void ref_masa_grads(size_t n_atoms, size_t rows, size_t cols,
                    const double *atoms, const double *c, const double *dW,
                    double *d_atoms, double *dc);

/* Low-rank term of a projection weight, W = base + A B (A rows x rank,
 * B rank x cols): W += A B. */
void ref_lowrank_add(size_t rows, size_t cols, size_t rank, const double *A,
                     const double *B, double *W);

/* From the gradient dW of the whole weight: dA = dW B^T (rows x rank) and
 * dB = A^T dW (rank x cols), overwritten; either may be NULL. */
void ref_lowrank_grads(size_t rows, size_t cols, size_t rank,
                       const double *A, const double *B, const double *dW,
                       double *dA, double *dB);

#endif
