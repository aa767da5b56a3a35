/* Shared test helpers; see test_util.h. */
#include "test_util.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- RNG ---- */

uint64_t tu_next(tu_rng *r)
{
    uint64_t z = (r->s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

double tu_unif(tu_rng *r, double lo, double hi)
{
    return lo + (hi - lo) * ((double)(tu_next(r) >> 11) * 0x1.0p-53);
}

void tu_fill(tu_rng *r, float *a, size_t n, float lo, float hi)
{
    for (size_t i = 0; i < n; i++)
        a[i] = (float)tu_unif(r, lo, hi);
}

/* ---- Buffers ---- */

float *tu_falloc(size_t n)
{
    float *p = calloc(n ? n : 1, sizeof(float));
    if (!p)
        abort();
    return p;
}

double *tu_dalloc(size_t n)
{
    double *p = calloc(n ? n : 1, sizeof(double));
    if (!p)
        abort();
    return p;
}

double *tu_to_double(const float *a, size_t n)
{
    double *d = tu_dalloc(n);
    for (size_t i = 0; i < n; i++)
        d[i] = a[i];
    return d;
}

void tu_fill_garbage(void *p, size_t bytes)
{
    if (p)
        memset(p, 0xFF, bytes);
}

void *tu_garbage(size_t bytes)
{
    void *p = malloc(bytes ? bytes : 1);
    if (!p)
        abort();
    tu_fill_garbage(p, bytes);
    return p;
}

/* ---- Tolerance checks ---- */

void tu_assert_close_(const char *file, int line, const char *what,
                      const float *got, const double *ref, size_t n,
                      double rtol, double atol)
{
    double maxref = 0.0, worst = -1.0;
    size_t wi = 0;
    for (size_t i = 0; i < n; i++)
        if (fabs(ref[i]) > maxref)
            maxref = fabs(ref[i]);
    for (size_t i = 0; i < n; i++) {
        double e = fabs((double)got[i] - ref[i]);
        if (!(e <= worst)) { /* also catches NaN */
            worst = e;
            wi = i;
            if (isnan(e))
                break;
        }
    }
    double tol = rtol * maxref + atol;
    if (getenv("TU_VERBOSE")) /* margins, for choosing tolerances */
        fprintf(stderr, "%s:%d %-40s max|err| %.3g = %.3g of max|ref| %.3g\n",
                file, line, what, worst, maxref > 0 ? worst / maxref : 0.0,
                maxref);
    ck_assert_msg(n == 0 || worst <= tol,
                  "%s:%d %s: element %zu of %zu: got %.9g expected %.9g "
                  "(|err| %.3g > tol %.3g; max|ref| %.3g)",
                  file, line, what, wi, n, n ? (double)got[wi] : 0.0,
                  n ? ref[wi] : 0.0, worst, tol, maxref);
}

void tu_assert_close_ff_(const char *file, int line, const char *what,
                         const float *got, const float *ref, size_t n,
                         double rtol)
{
    double *r = tu_to_double(ref, n);
    tu_assert_close_(file, line, what, got, r, n, rtol, 1e-7);
    free(r);
}

void tu_assert_close_dd_(const char *file, int line, const char *what,
                         const double *got, const double *ref, size_t n,
                         double rtol)
{
    double scale = 0, worst = 0;
    size_t at = 0;
    for (size_t i = 0; i < n; i++)
        scale = fmax(scale, fabs(ref[i]));
    for (size_t i = 0; i < n; i++)
        if (!(fabs(got[i] - ref[i]) <= worst)) {
            worst = fabs(got[i] - ref[i]);
            at = i;
        }
    ck_assert_msg(worst <= rtol * scale,
                  "%s:%d: %s: element %zu off by %g (got %.17g, want %.17g, "
                  "scale %g)", file, line, what, at, worst, got[at], ref[at],
                  scale);
}

masa_context *tu_context(size_t n_threads)
{
    masa_context_options o;
    masa_context_options_init(&o);
    o.n_threads = n_threads;
    masa_context *ctx = NULL;
    masa_status st = masa_context_create(&o, &ctx);
    ck_assert_msg(st == MASA_OK, "masa_context_create: %s", masa_last_error());
    return ctx;
}

/* ---- Layer fixture ---- */

int tu_has_base(const tu_layer *t, int p)
{
    return !((t->spec.baseless_mask >> p) & 1u);
}
int tu_is_masa(const tu_layer *t, int p)
{
    return tu_has_base(t, p) && ((t->spec.masa_mask >> p) & 1u);
}
int tu_has_bias(const tu_layer *t, int p) { return (t->spec.bias_mask >> p) & 1u; }

size_t tu_atoms_len(const tu_layer *t, int p)
{
    return t->spec.n_atoms * t->din[p] * t->dout[p];
}

size_t tu_coefs_len(const tu_layer *t, int p)
{
    (void)p;
    return t->spec.n_layers * t->spec.n_atoms;
}

static float *own(tu_layer *t, size_t n)
{
    ck_assert(t->n_mem < sizeof t->mem / sizeof t->mem[0]);
    return t->mem[t->n_mem++] = tu_falloc(n);
}

void tu_layer_init(tu_layer *t, masa_context *ctx, const tu_spec *s,
                   uint64_t seed)
{
    tu_rng rng = {seed};
    memset(t, 0, sizeof *t);
    t->spec = *s;

    masa_layer_options o;
    masa_layer_options_init(&o);
    o.d_model = s->d_model;
    o.n_heads = s->n_heads;
    o.n_kv_heads = s->n_kv_heads;
    o.head_dim = s->head_dim;
    o.causal = s->causal;
    o.rope = s->rope;
    if (s->rope_theta != 0.0f)
        o.rope_theta = s->rope_theta;
    o.softmax_scale = s->softmax_scale;
    TU_OK(masa_layer_create(ctx, &o, &t->layer));

    /* Defaults resolved as masa.h documents them. */
    t->cfg.d_model = s->d_model;
    t->cfg.n_heads = s->n_heads;
    t->cfg.n_kv_heads = s->n_kv_heads ? s->n_kv_heads : s->n_heads;
    t->cfg.head_dim = s->head_dim ? s->head_dim : s->d_model / s->n_heads;
    t->cfg.causal = s->causal;
    t->cfg.rope = s->rope;
    t->cfg.rope_theta = o.rope_theta;
    t->cfg.scale = s->softmax_scale != 0.0f
                       ? (double)s->softmax_scale
                       : 1.0 / sqrt((double)t->cfg.head_dim);

    masa_dictionary *shared_d = NULL;
    masa_coefficients *shared_c = NULL;
    for (int p = 0; p < REF_NPROJ; p++) {
        size_t din = t->din[p] = ref_d_in(&t->cfg, p);
        size_t dout = t->dout[p] = ref_d_out(&t->cfg, p);
        size_t din2, dout2;
        /* Weight scale ~2.5/sqrt(fan-in): attention logits of order one, so
         * the softmax is neither flat nor saturated. */
        float a = (float)(2.5 / sqrt((double)din));
        if (!tu_has_base(t, p)) {
            ck_assert_ptr_null(masa_layer_weight(t->layer, (masa_projection)p));
        } else if (tu_is_masa(t, p)) {
            size_t S = s->n_atoms, L = s->n_layers;
            t->lidx[p] = s->layer_index;
            if (s->share_dict && p != REF_O && shared_d) {
                t->dict[p] = shared_d;
                t->coef[p] = shared_c;
                t->lidx[p] = (s->layer_index + (size_t)p) % L;
            } else if (s->wrap) {
                float *atoms = own(t, S * din * dout);
                float *c = own(t, L * S);
                tu_fill(&rng, atoms, S * din * dout, -a, a);
                tu_fill(&rng, c, L * S, -1.0f, 1.0f);
                TU_OK(masa_dictionary_wrap(ctx, S, din, dout, atoms, &t->dict[p]));
                TU_OK(masa_coefficients_wrap(ctx, L, S, c, &t->coef[p]));
            } else {
                TU_OK(masa_dictionary_create(ctx, S, din, dout, &t->dict[p]));
                TU_OK(masa_dictionary_init_uniform(t->dict[p], a, tu_next(&rng)));
                TU_OK(masa_coefficients_create(ctx, L, S, &t->coef[p]));
                TU_OK(masa_coefficients_init_cyclic(t->coef[p]));
                TU_OK(masa_coefficients_add_uniform(t->coef[p], 0.5f, tu_next(&rng)));
            }
            if (s->share_dict && p != REF_O && !shared_d) {
                shared_d = t->dict[p];
                shared_c = t->coef[p];
            }
            TU_OK(masa_layer_set_masa(t->layer, (masa_projection)p, t->dict[p],
                                      t->coef[p], t->lidx[p]));
            ck_assert_ptr_null(masa_layer_weight(t->layer, (masa_projection)p));
        } else if (s->wrap) {
            float *w = own(t, din * dout);
            tu_fill(&rng, w, din * dout, -a, a);
            TU_OK(masa_layer_set_dense(t->layer, (masa_projection)p, w));
            ck_assert_ptr_eq(masa_layer_weight(t->layer, (masa_projection)p), w);
        } else {
            TU_OK(masa_layer_set_dense(t->layer, (masa_projection)p, NULL));
            float *w = masa_layer_weight(t->layer, (masa_projection)p);
            ck_assert_ptr_nonnull(w);
            for (size_t i = 0; i < din * dout; i++) /* documented: zeroed */
                ck_assert(w[i] == 0.0f);
            tu_fill(&rng, w, din * dout, -a, a);
        }
        if ((s->lowrank_mask >> p) & 1u) {
            size_t r = s->rank, r2 = 0;
            r = r < din ? r : din;
            r = r < dout ? r : dout;
            t->rank[p] = r;
            float *A = NULL, *B = NULL, *A2, *B2;
            if (s->wrap) {
                A = own(t, din * r);
                B = own(t, r * dout);
            }
            TU_OK(masa_layer_set_lowrank(t->layer, (masa_projection)p, r, A, B));
            TU_OK(masa_layer_lowrank(t->layer, (masa_projection)p, &r2, &A2, &B2));
            ck_assert_uint_eq(r2, r);
            if (s->wrap) {
                ck_assert_ptr_eq(A2, A);
                ck_assert_ptr_eq(B2, B);
            } else {
                for (size_t i = 0; i < din * r; i++) /* documented: zeroed */
                    ck_assert(A2[i] == 0.0f);
                for (size_t i = 0; i < r * dout; i++)
                    ck_assert(B2[i] == 0.0f);
            }
            /* A B of the order of a weight: ~ a * sqrt(r) / sqrt(3 r) */
            tu_fill(&rng, A2, din * r, -a, a);
            tu_fill(&rng, B2, r * dout, -(float)(1.0 / sqrt((double)r)),
                    (float)(1.0 / sqrt((double)r)));
            /* a CACHED layer composed A B when it was zero */
            TU_OK(masa_layer_refresh_weights(t->layer));
        }
        TU_OK(masa_layer_projection_shape(t->layer, (masa_projection)p, &din2, &dout2));
        ck_assert_uint_eq(din2, din);
        ck_assert_uint_eq(dout2, dout);
        if (tu_has_bias(t, p)) {
            float *b;
            if (s->wrap) {
                b = own(t, dout);
                TU_OK(masa_layer_set_bias(t->layer, (masa_projection)p, b));
            } else {
                TU_OK(masa_layer_set_bias(t->layer, (masa_projection)p, NULL));
                b = masa_layer_bias(t->layer, (masa_projection)p);
                ck_assert_ptr_nonnull(b);
                for (size_t i = 0; i < dout; i++)
                    ck_assert(b[i] == 0.0f);
            }
            ck_assert_ptr_eq(masa_layer_bias(t->layer, (masa_projection)p), b);
            tu_fill(&rng, b, dout, -0.5f, 0.5f);
        } else {
            ck_assert_ptr_null(masa_layer_bias(t->layer, (masa_projection)p));
        }
    }
}

void tu_layer_fini(tu_layer *t)
{
    masa_layer_destroy(t->layer);
    for (int p = 0; p < REF_NPROJ; p++) {
        int dup = 0;
        for (int q = 0; q < p; q++)
            dup |= t->dict[q] == t->dict[p];
        if (t->dict[p] && !dup) {
            masa_dictionary_destroy(t->dict[p]);
            masa_coefficients_destroy(t->coef[p]);
        }
    }
    for (size_t i = 0; i < t->n_mem; i++)
        free(t->mem[i]);
    memset(t, 0, sizeof *t);
}

void tu_ref_params(const tu_layer *t, double *W[REF_NPROJ],
                   double *b[REF_NPROJ])
{
    for (int p = 0; p < REF_NPROJ; p++) {
        size_t n = t->din[p] * t->dout[p];
        if (tu_is_masa(t, p)) {
            size_t S = t->spec.n_atoms;
            double *atoms = tu_to_double(masa_dictionary_data(t->dict[p]),
                                         tu_atoms_len(t, p));
            double *c = tu_to_double(masa_coefficients_data(t->coef[p]) +
                                         t->lidx[p] * S, S);
            W[p] = tu_dalloc(n);
            ref_compose(S, t->din[p], t->dout[p], atoms, c, W[p]);
            free(atoms);
            free(c);
        } else if (tu_has_base(t, p)) {
            W[p] = tu_to_double(masa_layer_weight(t->layer, (masa_projection)p), n);
        } else {
            W[p] = tu_dalloc(n);
        }
        if (t->rank[p]) {
            size_t r = 0;
            float *A, *B;
            TU_OK(masa_layer_lowrank(t->layer, (masa_projection)p, &r, &A, &B));
            double *Ad = tu_to_double(A, t->din[p] * r);
            double *Bd = tu_to_double(B, r * t->dout[p]);
            ref_lowrank_add(t->din[p], t->dout[p], r, Ad, Bd, W[p]);
            free(Ad);
            free(Bd);
        }
        b[p] = tu_has_bias(t, p)
                   ? tu_to_double(masa_layer_bias(t->layer, (masa_projection)p),
                                  t->dout[p])
                   : NULL;
    }
}

void tu_free_params(double *W[REF_NPROJ], double *b[REF_NPROJ])
{
    for (int p = 0; p < REF_NPROJ; p++) {
        free(W[p]);
        free(b[p]);
        W[p] = b[p] = NULL;
    }
}

void tu_reference(const tu_layer *t, size_t batch, size_t seq, size_t pos,
                  const float *x, const float *dy, tu_ref_out *out)
{
    size_t n = batch * seq * t->cfg.d_model;
    double *W[REF_NPROJ], *b[REF_NPROJ];
    memset(out, 0, sizeof *out);
    tu_ref_params(t, W, b);
    double *xd = tu_to_double(x, n);
    out->y = tu_dalloc(n);
    ref_forward(&t->cfg, batch, seq, pos, xd, (const double *const *)W,
                (const double *const *)b, out->y);
    if (dy) {
        double *dyd = tu_to_double(dy, n);
        out->dx = tu_dalloc(n);
        for (int p = 0; p < REF_NPROJ; p++) {
            out->dW[p] = tu_dalloc(t->din[p] * t->dout[p]);
            out->db[p] = b[p] ? tu_dalloc(t->dout[p]) : NULL;
        }
        ref_backward(&t->cfg, batch, seq, pos, xd, (const double *const *)W,
                     (const double *const *)b, dyd, out->dx, out->dW, out->db);
        for (int p = 0; p < REF_NPROJ; p++) {
            if (t->rank[p]) {
                size_t r = 0;
                float *A, *B;
                TU_OK(masa_layer_lowrank(t->layer, (masa_projection)p, &r, &A, &B));
                double *Ad = tu_to_double(A, t->din[p] * r);
                double *Bd = tu_to_double(B, r * t->dout[p]);
                out->d_lowrank_a[p] = tu_dalloc(t->din[p] * r);
                out->d_lowrank_b[p] = tu_dalloc(r * t->dout[p]);
                ref_lowrank_grads(t->din[p], t->dout[p], r, Ad, Bd, out->dW[p],
                                  out->d_lowrank_a[p], out->d_lowrank_b[p]);
                free(Ad);
                free(Bd);
            }
            if (!tu_is_masa(t, p))
                continue;
            size_t S = t->spec.n_atoms;
            double *atoms = tu_to_double(masa_dictionary_data(t->dict[p]),
                                         tu_atoms_len(t, p));
            double *c = tu_to_double(masa_coefficients_data(t->coef[p]) +
                                         t->lidx[p] * S, S);
            out->d_atoms[p] = tu_dalloc(tu_atoms_len(t, p));
            out->dc[p] = tu_dalloc(S);
            ref_masa_grads(S, t->din[p], t->dout[p], atoms, c, out->dW[p],
                           out->d_atoms[p], out->dc[p]);
            free(atoms);
            free(c);
        }
        free(dyd);
    }
    free(xd);
    tu_free_params(W, b);
}

void tu_ref_out_free(tu_ref_out *out)
{
    free(out->y);
    free(out->dx);
    for (int p = 0; p < REF_NPROJ; p++) {
        free(out->dW[p]);
        free(out->db[p]);
        free(out->d_atoms[p]);
        free(out->dc[p]);
        free(out->d_lowrank_a[p]);
        free(out->d_lowrank_b[p]);
    }
    memset(out, 0, sizeof *out);
}

size_t tu_workspace_bytes(const tu_layer *t, size_t batch, size_t seq)
{
    size_t bytes = 0;
    TU_OK(masa_layer_workspace_size(t->layer, batch, seq, &bytes));
    return bytes;
}

size_t tu_reserve_bytes(const tu_layer *t, size_t batch, size_t seq)
{
    size_t bytes = 0;
    TU_OK(masa_layer_reserve_size(t->layer, batch, seq, &bytes));
    return bytes;
}

int tu_run_suite(Suite *s)
{
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL); /* fork mode from CK_FORK */
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
