/* Double-precision reference of the MASA attention layer (see reference.h).
 * Deliberately naive: every product is an explicit loop. */
#include "reference.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static void *xcalloc(size_t n, size_t sz)
{
    void *p = calloc(n ? n : 1, sz);
    if (!p)
        abort(); /* test helper: out of memory is fatal */
    return p;
}

size_t ref_d_in(const ref_config *cfg, int proj)
{
    return proj == REF_O ? cfg->n_heads * cfg->head_dim : cfg->d_model;
}

size_t ref_d_out(const ref_config *cfg, int proj)
{
    switch (proj) {
    case REF_Q: return cfg->n_heads * cfg->head_dim;
    case REF_K:
    case REF_V: return cfg->n_kv_heads * cfg->head_dim;
    default: return cfg->d_model;
    }
}

/* out[n x m] = in[n x k] W[k x m] + b */
static void linear(size_t n, size_t k, size_t m, const double *in,
                   const double *W, const double *b, double *out)
{
    for (size_t i = 0; i < n; i++)
        for (size_t j = 0; j < m; j++) {
            double acc = b ? b[j] : 0.0;
            for (size_t t = 0; t < k; t++)
                acc += in[i * k + t] * W[t * m + j];
            out[i * m + j] = acc;
        }
}

/* Rotates every head of every token of a [B*T, n_h*hd] tensor by the RoPE
 * angle of its position; sign = -1 applies the inverse (transpose) rotation,
 * which is what the gradient needs. */
static void rope_apply(const ref_config *cfg, size_t batch, size_t seq,
                       size_t pos_offset, size_t n_h, double *v, double sign)
{
    size_t hd = cfg->head_dim, half = hd / 2, w = n_h * hd;
    for (size_t bb = 0; bb < batch; bb++)
        for (size_t t = 0; t < seq; t++) {
            double p = (double)(pos_offset + t);
            for (size_t h = 0; h < n_h; h++) {
                double *r = v + (bb * seq + t) * w + h * hd;
                for (size_t i = 0; i < half; i++) {
                    double f = pow(cfg->rope_theta, -2.0 * (double)i / (double)hd);
                    double c = cos(p * f), s = sign * sin(p * f);
                    double a = r[i], b2 = r[i + half];
                    r[i] = a * c - b2 * s;
                    r[i + half] = b2 * c + a * s;
                }
            }
        }
}

/* Everything forward computes, kept for backward. */
typedef struct fwd_state {
    double *Q, *K, *V; /* after bias and RoPE */
    double *A;         /* concat of heads, [B*T, dq] */
} fwd_state;

/* Softmax row of query t of head h in sequence bb; returns into p[0..seq). */
static void attn_probs(const ref_config *cfg, size_t seq, const fwd_state *st,
                       size_t bb, size_t h, size_t t, double *p)
{
    size_t hd = cfg->head_dim, g = h / (cfg->n_heads / cfg->n_kv_heads);
    size_t dq = cfg->n_heads * hd, dkv = cfg->n_kv_heads * hd;
    size_t nkeys = cfg->causal ? t + 1 : seq;
    const double *q = st->Q + (bb * seq + t) * dq + h * hd;
    double m = -INFINITY, sum = 0.0;
    for (size_t j = 0; j < nkeys; j++) {
        const double *k = st->K + (bb * seq + j) * dkv + g * hd;
        double s = 0.0;
        for (size_t d = 0; d < hd; d++)
            s += q[d] * k[d];
        p[j] = cfg->scale * s;
        if (p[j] > m)
            m = p[j];
    }
    for (size_t j = 0; j < nkeys; j++) {
        p[j] = exp(p[j] - m);
        sum += p[j];
    }
    for (size_t j = 0; j < seq; j++)
        p[j] = j < nkeys ? p[j] / sum : 0.0;
}

static void forward_state(const ref_config *cfg, size_t batch, size_t seq,
                          size_t pos_offset, const double *x,
                          const double *const W[REF_NPROJ],
                          const double *const b[REF_NPROJ], fwd_state *st)
{
    size_t n = batch * seq, dm = cfg->d_model, hd = cfg->head_dim;
    size_t dq = cfg->n_heads * hd, dkv = cfg->n_kv_heads * hd;
    size_t g_per = cfg->n_heads / cfg->n_kv_heads;
    st->Q = xcalloc(n * dq, sizeof(double));
    st->K = xcalloc(n * dkv, sizeof(double));
    st->V = xcalloc(n * dkv, sizeof(double));
    st->A = xcalloc(n * dq, sizeof(double));
    linear(n, dm, dq, x, W[REF_Q], b[REF_Q], st->Q);
    linear(n, dm, dkv, x, W[REF_K], b[REF_K], st->K);
    linear(n, dm, dkv, x, W[REF_V], b[REF_V], st->V);
    if (cfg->rope) {
        rope_apply(cfg, batch, seq, pos_offset, cfg->n_heads, st->Q, 1.0);
        rope_apply(cfg, batch, seq, pos_offset, cfg->n_kv_heads, st->K, 1.0);
    }
    double *p = xcalloc(seq, sizeof(double));
    for (size_t bb = 0; bb < batch; bb++)
        for (size_t h = 0; h < cfg->n_heads; h++) {
            size_t g = h / g_per;
            for (size_t t = 0; t < seq; t++) {
                attn_probs(cfg, seq, st, bb, h, t, p);
                double *a = st->A + (bb * seq + t) * dq + h * hd;
                for (size_t j = 0; j < seq; j++) {
                    const double *v = st->V + (bb * seq + j) * dkv + g * hd;
                    for (size_t d = 0; d < hd; d++)
                        a[d] += p[j] * v[d];
                }
            }
        }
    free(p);
}

static void free_state(fwd_state *st)
{
    free(st->Q);
    free(st->K);
    free(st->V);
    free(st->A);
}

void ref_forward(const ref_config *cfg, size_t batch, size_t seq,
                 size_t pos_offset, const double *x,
                 const double *const W[REF_NPROJ],
                 const double *const b[REF_NPROJ], double *y)
{
    fwd_state st;
    forward_state(cfg, batch, seq, pos_offset, x, W, b, &st);
    linear(batch * seq, cfg->n_heads * cfg->head_dim, cfg->d_model, st.A,
           W[REF_O], b[REF_O], y);
    free_state(&st);
}

/* dW[k x m] = in^T[k x n] dout[n x m]; db = column sums of dout;
 * din[n x k] += dout W^T. Any output may be NULL. */
static void linear_back(size_t n, size_t k, size_t m, const double *in,
                        const double *W, const double *dout, double *dW,
                        double *db, double *din)
{
    if (dW)
        for (size_t a = 0; a < k; a++)
            for (size_t c = 0; c < m; c++) {
                double acc = 0.0;
                for (size_t i = 0; i < n; i++)
                    acc += in[i * k + a] * dout[i * m + c];
                dW[a * m + c] = acc;
            }
    if (db)
        for (size_t c = 0; c < m; c++) {
            double acc = 0.0;
            for (size_t i = 0; i < n; i++)
                acc += dout[i * m + c];
            db[c] = acc;
        }
    if (din)
        for (size_t i = 0; i < n; i++)
            for (size_t a = 0; a < k; a++) {
                double acc = 0.0;
                for (size_t c = 0; c < m; c++)
                    acc += dout[i * m + c] * W[a * m + c];
                din[i * k + a] += acc;
            }
}

void ref_backward(const ref_config *cfg, size_t batch, size_t seq,
                  size_t pos_offset, const double *x,
                  const double *const W[REF_NPROJ],
                  const double *const b[REF_NPROJ], const double *dy,
                  double *dx, double *const dW[REF_NPROJ],
                  double *const db[REF_NPROJ])
{
    size_t n = batch * seq, dm = cfg->d_model, hd = cfg->head_dim;
    size_t dq = cfg->n_heads * hd, dkv = cfg->n_kv_heads * hd;
    size_t g_per = cfg->n_heads / cfg->n_kv_heads;
    fwd_state st;
    forward_state(cfg, batch, seq, pos_offset, x, W, b, &st);

    double *dA = xcalloc(n * dq, sizeof(double));
    double *dQ = xcalloc(n * dq, sizeof(double));
    double *dK = xcalloc(n * dkv, sizeof(double));
    double *dV = xcalloc(n * dkv, sizeof(double));
    double *p = xcalloc(seq, sizeof(double));
    double *dp = xcalloc(seq, sizeof(double));

    linear_back(n, dq, dm, st.A, W[REF_O], dy, dW[REF_O], db[REF_O], dA);

    /* Softmax backward: dS_tj = P_tj (dP_tj - sum_k P_tk dP_tk). */
    for (size_t bb = 0; bb < batch; bb++)
        for (size_t h = 0; h < cfg->n_heads; h++) {
            size_t g = h / g_per;
            for (size_t t = 0; t < seq; t++) {
                attn_probs(cfg, seq, &st, bb, h, t, p);
                const double *da = dA + (bb * seq + t) * dq + h * hd;
                const double *q = st.Q + (bb * seq + t) * dq + h * hd;
                double *dqv = dQ + (bb * seq + t) * dq + h * hd;
                double dot = 0.0;
                for (size_t j = 0; j < seq; j++) {
                    const double *v = st.V + (bb * seq + j) * dkv + g * hd;
                    double *dv = dV + (bb * seq + j) * dkv + g * hd;
                    dp[j] = 0.0;
                    for (size_t d = 0; d < hd; d++) {
                        dp[j] += da[d] * v[d];
                        dv[d] += p[j] * da[d];
                    }
                    dot += p[j] * dp[j];
                }
                for (size_t j = 0; j < seq; j++) {
                    double ds = cfg->scale * p[j] * (dp[j] - dot);
                    const double *k = st.K + (bb * seq + j) * dkv + g * hd;
                    double *dk = dK + (bb * seq + j) * dkv + g * hd;
                    for (size_t d = 0; d < hd; d++) {
                        dqv[d] += ds * k[d];
                        dk[d] += ds * q[d];
                    }
                }
            }
        }
    if (cfg->rope) { /* gradient through a rotation = inverse rotation */
        rope_apply(cfg, batch, seq, pos_offset, cfg->n_heads, dQ, -1.0);
        rope_apply(cfg, batch, seq, pos_offset, cfg->n_kv_heads, dK, -1.0);
    }
    if (dx)
        memset(dx, 0, n * dm * sizeof(double));
    linear_back(n, dm, dq, x, W[REF_Q], dQ, dW[REF_Q], db[REF_Q], dx);
    linear_back(n, dm, dkv, x, W[REF_K], dK, dW[REF_K], db[REF_K], dx);
    linear_back(n, dm, dkv, x, W[REF_V], dV, dW[REF_V], db[REF_V], dx);

    free(dA);
    free(dQ);
    free(dK);
    free(dV);
    free(p);
    free(dp);
    free_state(&st);
}

void ref_compose(size_t n_atoms, size_t rows, size_t cols,
                 const double *atoms, const double *c, double *W)
{
    size_t rc = rows * cols;
    for (size_t e = 0; e < rc; e++) {
        double acc = 0.0;
        for (size_t s = 0; s < n_atoms; s++)
            acc += c[s] * atoms[s * rc + e];
        W[e] = acc;
    }
}

void ref_masa_grads(size_t n_atoms, size_t rows, size_t cols,
                    const double *atoms, const double *c, const double *dW,
                    double *d_atoms, double *dc)
{
    size_t rc = rows * cols;
    for (size_t s = 0; s < n_atoms; s++) {
        double acc = 0.0;
        for (size_t e = 0; e < rc; e++) {
            if (d_atoms)
                d_atoms[s * rc + e] = c[s] * dW[e];
            acc += atoms[s * rc + e] * dW[e];
        }
        if (dc)
            dc[s] = acc;
    }
}

void ref_lowrank_add(size_t rows, size_t cols, size_t rank, const double *A,
                     const double *B, double *W)
{
    for (size_t i = 0; i < rows; i++)
        for (size_t j = 0; j < cols; j++) {
            double acc = 0.0;
            for (size_t k = 0; k < rank; k++)
                acc += A[i * rank + k] * B[k * cols + j];
            W[i * cols + j] += acc;
        }
}

void ref_lowrank_grads(size_t rows, size_t cols, size_t rank,
                       const double *A, const double *B, const double *dW,
                       double *dA, double *dB)
{
    if (dA)
        for (size_t i = 0; i < rows; i++)
            for (size_t k = 0; k < rank; k++) {
                double acc = 0.0;
                for (size_t j = 0; j < cols; j++)
                    acc += dW[i * cols + j] * B[k * cols + j];
                dA[i * rank + k] = acc;
            }
    if (dB)
        for (size_t k = 0; k < rank; k++)
            for (size_t j = 0; j < cols; j++) {
                double acc = 0.0;
                for (size_t i = 0; i < rows; i++)
                    acc += A[i * rank + k] * dW[i * cols + j];
                dB[k * cols + j] = acc;
            }
}
