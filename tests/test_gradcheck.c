/*
 * Finite-difference checks of gradients, with the scalar loss
 * L = sum(y * r) for a fixed random r (so dL/dy = r).
 *
 * 1. ref_self: the double reference's analytic backward against central
 *    differences of the double reference forward (h = 1e-5; truncation and
 *    rounding both ~1e-10, tolerance 1e-7). This is what makes the
 *    reference trustworthy for test_layer.c.
 * 2. lib_float_fd: the library's analytic gradients against differences of
 *    the library's OWN float forward (no reference involved). Float rounding
 *    of the loss (~1e-7 relative) divided by the step would swamp a small
 *    step, so this uses a five-point stencil (truncation O(h^4)) with a
 *    large, power-of-two step h = 2^-5 on a small, well-conditioned case; the
 *    remaining error measures <= 4e-5 of each array's largest gradient,
 *    hence tolerance 5e-4 (a real gradient bug is off by O(1)).
 * 3. lib_vs_ref_fd: the library's analytic gradients against central
 *    differences of the double reference forward evaluated at the library's
 *    parameters: precise (tolerance 1e-4 as in test_layer.c) and independent
 *    of the reference's analytic backward.
 * Every parameter kind is covered: x, atoms, coefficients (the whole table:
 * rows of other layers must get zero), dense weights and biases.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "test_util.h"

/* ---- 1. The reference checks itself ---- */

static double ref_loss(const ref_config *cfg, size_t B, size_t T, size_t pos,
                       const double *x, double *const W[4], double *const b[4],
                       const double *r)
{
    size_t n = B * T * cfg->d_model;
    double *y = tu_dalloc(n), L = 0.0;
    ref_forward(cfg, B, T, pos, x, (const double *const *)W,
                (const double *const *)b, y);
    for (size_t i = 0; i < n; i++)
        L += y[i] * r[i];
    free(y);
    return L;
}

static void assert_close_dd(const char *what, const double *got,
                            const double *ref, size_t n, double rtol)
{
    double maxref = 0.0, worst = 0.0;
    size_t wi = 0;
    for (size_t i = 0; i < n; i++)
        maxref = fmax(maxref, fabs(ref[i]));
    for (size_t i = 0; i < n; i++) {
        double e = fabs(got[i] - ref[i]);
        if (!(e <= worst)) {
            worst = e;
            wi = i;
        }
    }
    ck_assert_msg(worst <= rtol * maxref + 1e-12,
                  "%s: element %zu: analytic %.12g vs fd %.12g (max|fd| %.3g)",
                  what, wi, got[wi], ref[wi], maxref);
}

/* Central difference of ref_loss with respect to every entry of v. */
static void fd_double(const ref_config *cfg, size_t B, size_t T, size_t pos,
                      double *x, double *const W[4], double *const b[4],
                      const double *r, double *v, size_t n, double *out)
{
    const double h = 1e-5;
    for (size_t i = 0; i < n; i++) {
        double v0 = v[i];
        v[i] = v0 + h;
        double lp = ref_loss(cfg, B, T, pos, x, W, b, r);
        v[i] = v0 - h;
        double lm = ref_loss(cfg, B, T, pos, x, W, b, r);
        v[i] = v0;
        out[i] = (lp - lm) / (2 * h);
    }
}

START_TEST(test_ref_self)
{
    ref_config cfg = {.d_model = 8, .n_heads = 4, .n_kv_heads = 2,
                      .head_dim = 4, .causal = 1, .rope = 1,
                      .rope_theta = 100.0, .scale = 0.6};
    size_t B = 2, T = 3, pos = 3, n = B * T * cfg.d_model;
    tu_rng rng = {1};
    double *x = tu_dalloc(n), *r = tu_dalloc(n), *W[4], *b[4], *dW[4], *db[4];
    for (size_t i = 0; i < n; i++) {
        x[i] = tu_unif(&rng, -1, 1);
        r[i] = tu_unif(&rng, -1, 1);
    }
    for (int p = 0; p < 4; p++) {
        size_t nw = ref_d_in(&cfg, p) * ref_d_out(&cfg, p), no = ref_d_out(&cfg, p);
        double a = 2.5 / sqrt((double)ref_d_in(&cfg, p));
        W[p] = tu_dalloc(nw);
        b[p] = tu_dalloc(no);
        dW[p] = tu_dalloc(nw);
        db[p] = tu_dalloc(no);
        for (size_t i = 0; i < nw; i++)
            W[p][i] = tu_unif(&rng, -a, a);
        for (size_t i = 0; i < no; i++)
            b[p][i] = tu_unif(&rng, -0.5, 0.5);
    }
    double *dx = tu_dalloc(n), *fd = tu_dalloc(4096); /* >= any array here */
    ref_backward(&cfg, B, T, pos, x, (const double *const *)W,
                 (const double *const *)b, r, dx, dW, db);

    fd_double(&cfg, B, T, pos, x, W, b, r, x, n, fd);
    assert_close_dd("ref dx", dx, fd, n, 1e-7);
    for (int p = 0; p < 4; p++) {
        size_t nw = ref_d_in(&cfg, p) * ref_d_out(&cfg, p), no = ref_d_out(&cfg, p);
        char name[32];
        fd_double(&cfg, B, T, pos, x, W, b, r, W[p], nw, fd);
        snprintf(name, sizeof name, "ref dW[%d]", p);
        assert_close_dd(name, dW[p], fd, nw, 1e-7);
        fd_double(&cfg, B, T, pos, x, W, b, r, b[p], no, fd);
        snprintf(name, sizeof name, "ref db[%d]", p);
        assert_close_dd(name, db[p], fd, no, 1e-7);
    }

    /* MASA chain rule: perturb atoms and coefficients of Q's weight. */
    size_t S = 2, R = ref_d_in(&cfg, 0), C = ref_d_out(&cfg, 0);
    double *atoms = tu_dalloc(S * R * C), c[2] = {0.7, -0.4};
    double *da = tu_dalloc(S * R * C), dc[2];
    for (size_t i = 0; i < S * R * C; i++)
        atoms[i] = tu_unif(&rng, -0.5, 0.5);
    ref_compose(S, R, C, atoms, c, W[0]);
    ref_backward(&cfg, B, T, pos, x, (const double *const *)W,
                 (const double *const *)b, r, NULL, dW, db);
    ref_masa_grads(S, R, C, atoms, c, dW[0], da, dc);
    const double h = 1e-5;
    for (size_t i = 0; i < S * R * C + S; i++) {
        double *v = i < S * R * C ? &atoms[i] : &c[i - S * R * C];
        double v0 = *v, l[2];
        for (int sgn = 0; sgn < 2; sgn++) {
            *v = v0 + (sgn ? -h : h);
            ref_compose(S, R, C, atoms, c, W[0]);
            l[sgn] = ref_loss(&cfg, B, T, pos, x, W, b, r);
        }
        *v = v0;
        double g = (l[0] - l[1]) / (2 * h);
        double an = i < S * R * C ? da[i] : dc[i - S * R * C];
        ck_assert_msg(fabs(g - an) <= 1e-7 * (1 + fabs(g)),
                      "ref masa grad %zu: analytic %.12g fd %.12g", i, an, g);
    }

    for (int p = 0; p < 4; p++) {
        free(W[p]);
        free(b[p]);
        free(dW[p]);
        free(db[p]);
    }
    free(atoms);
    free(da);
    free(x);
    free(r);
    free(dx);
    free(fd);
}
END_TEST

/* ---- Parameter slots of a library layer ---- */

typedef struct slot {
    char name[32];
    float *val;  /* live parameter (library-owned or wrapped) */
    float *grad; /* library's analytic gradient (SET) */
    size_t n;
} slot;

typedef struct gc {
    tu_layer t;
    masa_context *ctx;
    size_t B, T, pos, n;
    float *x, *r, *y;
    void *ws, *rs;
    size_t wsb, rsb;
    slot s[16];
    int ns;
    masa_layer_grads g;
    float *dx;
} gc;

static void gc_init(gc *c, const tu_spec *sp, size_t B, size_t T, size_t pos,
                    uint64_t seed)
{
    memset(c, 0, sizeof *c);
    TU_OK(masa_context_create(NULL, &c->ctx));
    tu_layer_init(&c->t, c->ctx, sp, seed);
    tu_rng rng = {seed + 1};
    c->B = B;
    c->T = T;
    c->pos = pos;
    c->n = B * T * c->t.cfg.d_model;
    c->x = tu_falloc(c->n);
    c->r = tu_falloc(c->n);
    c->y = tu_falloc(c->n);
    c->dx = tu_falloc(c->n);
    tu_fill(&rng, c->x, c->n, -1, 1);
    tu_fill(&rng, c->r, c->n, -1, 1);
    c->wsb = tu_workspace_bytes(&c->t, B, T);
    c->rsb = tu_reserve_bytes(&c->t, B, T);
    c->ws = tu_garbage(c->wsb);
    c->rs = tu_garbage(c->rsb);

    masa_layer_grads_init(&c->g);
    c->g.mode = MASA_GRAD_SET;
    c->s[c->ns++] = (slot){"x", c->x, c->dx, c->n};
    for (int p = 0; p < 4; p++) {
        slot *s = &c->s[c->ns++];
        if (tu_is_masa(&c->t, p)) {
            *s = (slot){"", masa_dictionary_data(c->t.dict[p]),
                        c->g.d_atoms[p] = tu_falloc(tu_atoms_len(&c->t, p)),
                        tu_atoms_len(&c->t, p)};
            snprintf(s->name, sizeof s->name, "atoms[%d]", p);
            s = &c->s[c->ns++];
            *s = (slot){"", masa_coefficients_data(c->t.coef[p]),
                        c->g.d_coefficients[p] = tu_falloc(tu_coefs_len(&c->t, p)),
                        tu_coefs_len(&c->t, p)};
            snprintf(s->name, sizeof s->name, "coefficients[%d]", p);
        } else {
            size_t nw = c->t.din[p] * c->t.dout[p];
            *s = (slot){"", masa_layer_weight(c->t.layer, (masa_projection)p),
                        c->g.d_weight[p] = tu_falloc(nw), nw};
            snprintf(s->name, sizeof s->name, "weight[%d]", p);
        }
        if (tu_has_bias(&c->t, p)) {
            s = &c->s[c->ns++];
            *s = (slot){"", masa_layer_bias(c->t.layer, (masa_projection)p),
                        c->g.d_bias[p] = tu_falloc(c->t.dout[p]), c->t.dout[p]};
            snprintf(s->name, sizeof s->name, "bias[%d]", p);
        }
    }
    /* Analytic gradients (dy = r). */
    TU_OK(masa_layer_forward(c->t.layer, B, T, pos, c->x, c->y, c->ws, c->wsb,
                             c->rs, c->rsb));
    TU_OK(masa_layer_backward(c->t.layer, B, T, pos, c->x, c->r, c->dx, &c->g,
                              c->ws, c->wsb, c->rs, c->rsb));
}

static void gc_fini(gc *c)
{
    for (int p = 0; p < 4; p++) {
        free(c->g.d_atoms[p]);
        free(c->g.d_coefficients[p]);
        free(c->g.d_weight[p]);
        free(c->g.d_bias[p]);
    }
    free(c->x);
    free(c->r);
    free(c->y);
    free(c->dx);
    free(c->ws);
    free(c->rs);
    tu_layer_fini(&c->t);
    masa_context_destroy(c->ctx);
}

/* Loss from the library's float forward, accumulated in double. */
static double lib_loss(gc *c)
{
    TU_OK(masa_layer_forward(c->t.layer, c->B, c->T, c->pos, c->x, c->y, c->ws,
                             c->wsb, NULL, 0));
    double L = 0.0;
    for (size_t i = 0; i < c->n; i++)
        L += (double)c->y[i] * c->r[i];
    return L;
}

/* Loss from the double reference at the library's current parameters. */
static double dbl_loss(gc *c, double *x, double *const vals[16])
{
    tu_layer *t = &c->t;
    double *W[4], *b[4];
    int k = 1;
    for (int p = 0; p < 4; p++) {
        if (tu_is_masa(t, p)) {
            size_t S = t->spec.n_atoms;
            W[p] = tu_dalloc(t->din[p] * t->dout[p]);
            ref_compose(S, t->din[p], t->dout[p], vals[k],
                        vals[k + 1] + t->lidx[p] * S, W[p]);
            k += 2;
        } else {
            W[p] = vals[k++];
        }
        b[p] = tu_has_bias(t, p) ? vals[k++] : NULL;
    }
    double *rd = tu_to_double(c->r, c->n);
    double L = ref_loss(&t->cfg, c->B, c->T, c->pos, x, W, b, rd);
    free(rd);
    for (int p = 0; p < 4; p++)
        if (tu_is_masa(t, p))
            free(W[p]);
    return L;
}

static const tu_spec small_spec = {
    .d_model = 8, .n_heads = 2, .n_kv_heads = 1, .causal = 1, .rope = 1,
    .masa_mask = 0x3, .bias_mask = 0xF, .n_atoms = 2, .n_layers = 2,
    .layer_index = 1, .wrap = 1};

START_TEST(test_lib_float_fd)
{
    gc c;
    gc_init(&c, &small_spec, 1, 3, 2, 21);
    const float h = 0x1p-5f;
    for (int k = 0; k < c.ns; k++) {
        slot *s = &c.s[k];
        double *fd = tu_dalloc(s->n);
        for (size_t i = 0; i < s->n; i++) {
            float v0 = s->val[i];
            double L[4];
            const float steps[4] = {2 * h, h, -h, -2 * h};
            for (int j = 0; j < 4; j++) {
                s->val[i] = v0 + steps[j];
                L[j] = lib_loss(&c);
            }
            s->val[i] = v0;
            fd[i] = (-L[0] + 8 * L[1] - 8 * L[2] + L[3]) / (12.0 * h);
        }
        char name[64];
        snprintf(name, sizeof name, "float-fd %s", s->name);
        tu_assert_close_(__FILE__, __LINE__, name, s->grad, fd, s->n, 5e-4, 1e-6);
        free(fd);
    }
    gc_fini(&c);
}
END_TEST

START_TEST(test_lib_vs_ref_fd)
{
    tu_spec sp = {.d_model = 12, .n_heads = 6, .n_kv_heads = 2, .rope = 1,
                  .rope_theta = 50.0f, .softmax_scale = 0.9f,
                  .masa_mask = 0xC, .bias_mask = 0x5, .n_atoms = 3,
                  .n_layers = 3, .layer_index = 2, .wrap = 0};
    gc c;
    gc_init(&c, &sp, 2, 4, 5, 31);
    double *vals[16];
    for (int k = 0; k < c.ns; k++)
        vals[k] = tu_to_double(c.s[k].val, c.s[k].n);
    const double h = 1e-5;
    for (int k = 0; k < c.ns; k++) {
        slot *s = &c.s[k];
        double *fd = tu_dalloc(s->n);
        for (size_t i = 0; i < s->n; i++) {
            double v0 = vals[k][i];
            vals[k][i] = v0 + h;
            double lp = dbl_loss(&c, vals[0], vals);
            vals[k][i] = v0 - h;
            double lm = dbl_loss(&c, vals[0], vals);
            vals[k][i] = v0;
            fd[i] = (lp - lm) / (2 * h);
        }
        char name[64];
        snprintf(name, sizeof name, "ref-fd %s", s->name);
        TU_ASSERT_CLOSE(name, s->grad, fd, s->n, 1e-4);
        free(fd);
    }
    for (int k = 0; k < c.ns; k++)
        free(vals[k]);
    gc_fini(&c);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("gradcheck");
    TCase *tc = tcase_create("fd");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_ref_self);
    tcase_add_test(tc, test_lib_float_fd);
    tcase_add_test(tc, test_lib_vs_ref_fd);
    suite_add_tcase(s, tc);
    return tu_run_suite(s);
}
