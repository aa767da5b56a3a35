/*
 * The attention core's tile machinery (src/attention/attention_tiles.c and
 * the row kernels of fast_exp.c) on whatever micro-kernel BLIS picked, so
 * under BLIS_ARCH_TYPE=3 (haswell, 6 x 16, prefers rows) and =4
 * (sandybridge, 8 x 8, prefers columns) as well (tests/meson.build):
 *
 * - packing: the AVX-512 packer equals the portable one exactly, and both
 *   equal a plain index formula, for every width of BLIS's sgemm kernels,
 *   both storages of the source, partial panels;
 * - tile products: C = alpha A B + beta C in both orientations (C stored by
 *   rows and by columns), every edge of the register block and an inner
 *   size past KC, against a double reference;
 * - row scaling: AVX-512 and portable, every tail length, exact, nothing
 *   written past n (the softmax row kernels are in test_exp.c).
 *
 * Tolerances: packing is a copy (exact). A product of k float terms: |err|
 * <= 2 k eps sum_l |a_l b_l| per element (float summation bound), with the
 * beta term exact.
 *
 * The AVX-512 cases are skipped, with a line saying so, where the CPU has no
 * AVX-512.
 */
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <check.h>

#include "attention/attention_core.h"

static bool avx512_or_say(const char *what)
{
    if (masa__cpu_has_avx512())
        return true;
    printf("test_tiles: %s: skipped, this CPU has no AVX-512\n", what);
    return false;
}

static float *aligned(size_t n)
{
    void *p = NULL;
    ck_assert_int_eq(posix_memalign(&p, 64, (n + 16) * sizeof(float)), 0);
    return p;
}

static float value(size_t i) { return (float)((i * 7919) % 1013) - 500.0f; }

typedef void (*pack_fn)(size_t, size_t, size_t, const float *, size_t,
                        size_t, float *);

/* One packing case through `pack`, against the index formula. */
static void check_pack(pack_fn pack, const char *name, size_t w,
                       size_t outer, size_t k, size_t rs_outer,
                       size_t rs_inner)
{
    size_t span = (outer - 1) * rs_outer + (k - 1) * rs_inner + 1;
    size_t panels = (outer + w - 1) / w, size = panels * w * k;
    float *x = aligned(span), *dst = aligned(size + 16);
    for (size_t i = 0; i < span; i++)
        x[i] = value(i);
    for (size_t i = 0; i < size + 16; i++)
        dst[i] = NAN; /* every float of the panels must be written */
    pack(w, outer, k, x, rs_outer, rs_inner, dst);
    for (size_t p = 0; p < panels; p++)
        for (size_t l = 0; l < k; l++)
            for (size_t i = 0; i < w; i++) {
                size_t o = p * w + i;
                float want = o < outer ? x[o * rs_outer + l * rs_inner] : 0;
                float got = dst[p * w * k + l * w + i];
                ck_assert_msg(got == want,
                              "%s w %zu outer %zu k %zu strides %zu,%zu: "
                              "panel %zu slice %zu lane %zu = %g, want %g",
                              name, w, outer, k, rs_outer, rs_inner, p, l, i,
                              (double)got, (double)want);
            }
    for (size_t i = size; i < size + 16; i++)
        ck_assert_msg(isnan(dst[i]), "%s w %zu: wrote past the panels", name,
                      w);
    free(x);
    free(dst);
}

static void check_packer(pack_fn pack, const char *name)
{
    static const size_t widths[] = {6, 8, 12, 16, 32};
    static const size_t outers[] = {1, 5, 12, 17, 33, 64, 100};
    static const size_t ks[] = {1, 3, 16, 31, 64, 129};
    for (size_t a = 0; a < 5; a++)
        for (size_t b = 0; b < 7; b++)
            for (size_t c = 0; c < 6; c++) {
                size_t w = widths[a], o = outers[b], k = ks[c];
                check_pack(pack, name, w, o, k, k + 3, 1); /* lines */
                check_pack(pack, name, w, o, k, 1, o + 2); /* slices */
                check_pack(pack, name, w, o, k, 2, 2 * o + 1); /* neither */
            }
}

START_TEST(test_pack_portable)
{
    check_packer(masa__pack_portable, "portable");
}
END_TEST

START_TEST(test_pack_avx512)
{
    if (avx512_or_say("AVX-512 packing"))
        check_packer(masa__pack_avx512, "avx512");
}
END_TEST

/* C (m x n, by rows or by columns) = alpha A B + beta C through packing and
 * masa__tile_product, against double. */
static void check_product(const masa_ukr *u, bool by_cols, size_t m,
                          size_t n, size_t k)
{
    masa_orient o = by_cols ? u->c_cols : u->c_rows;
    float *a = aligned(m * k), *b = aligned(k * n), *c = aligned(m * n);
    float *ap = aligned(masa__pack_floats(u, m, k));
    float *bp = aligned(masa__pack_floats(u, n, k));
    for (size_t i = 0; i < m * k; i++)
        a[i] = value(i) / 500.0f;
    for (size_t i = 0; i < k * n; i++)
        b[i] = value(3 * i + 1) / 500.0f;
    for (size_t i = 0; i < m * n; i++)
        c[i] = value(5 * i + 2) / 500.0f;
    size_t ldc = by_cols ? 1 : n, csc = by_cols ? m : 1;
    double *want = malloc(m * n * sizeof(double));
    double *bound = malloc(m * n * sizeof(double));
    ck_assert(want && bound);
    const double alpha = 0.75, beta = -0.5; /* exact in float */
    for (size_t i = 0; i < m; i++)
        for (size_t j = 0; j < n; j++) {
            double s = 0.0, mag = 0.0;
            for (size_t l = 0; l < k; l++) {
                s += (double)a[i * k + l] * b[l * n + j];
                mag += fabs((double)a[i * k + l] * b[l * n + j]);
            }
            want[i * n + j] = alpha * s + beta * c[i * ldc + j * csc];
            bound[i * n + j] = 2.0 * (double)(k + 2) * FLT_EPSILON *
                                   (alpha * mag + fabs(want[i * n + j])) +
                               FLT_MIN;
        }
    masa__pack_a(o.wa, m, k, a, k, 1, ap);
    masa__pack_b(o.wb, k, n, b, n, 1, bp);
    masa__tile_product(u, &(masa_tile_product){
        .kind = MASA_PRODUCT_ROWS, .o = o, .m = m, .n = n, .k = k,
        .alpha = (float)alpha, .beta = (float)beta, .ap = ap, .bp = bp,
        .c = c, .ldc = ldc, .csc = csc});
    for (size_t i = 0; i < m; i++)
        for (size_t j = 0; j < n; j++) {
            double got = c[i * ldc + j * csc];
            ck_assert_msg(fabs(got - want[i * n + j]) <= bound[i * n + j],
                          "C by %s, %zu x %zu x %zu: (%zu, %zu) = %.9g, want "
                          "%.9g", by_cols ? "columns" : "rows", m, n, k, i, j,
                          got, want[i * n + j]);
        }
    free(a);
    free(b);
    free(c);
    free(ap);
    free(bp);
    free(want);
    free(bound);
}

START_TEST(test_products)
{
    masa_ukr u;
    masa__ukr_query(&u);
    printf("test_tiles: BLIS micro-kernel %zu x %zu, KC %zu, prefers %s\n",
           u.mr, u.nr, u.kc, u.prefers_cols ? "columns" : "rows");
    ck_assert(u.c_rows.swap == u.prefers_cols);
    ck_assert(u.c_cols.swap == !u.prefers_cols);
    size_t big = u.mr > u.nr ? u.mr : u.nr;
    size_t dims[] = {1, u.mr - 1, u.mr, u.nr + 1, 2 * big + 3};
    size_t ks[] = {0, 1, 7, 64, u.kc + 5};
    for (int by_cols = 0; by_cols < 2; by_cols++)
        for (size_t i = 0; i < 5; i++)
            for (size_t j = 0; j < 5; j++)
                for (size_t l = 0; l < 5; l++)
                    if (dims[i] && dims[j])
                        check_product(&u, by_cols, dims[i], dims[j], ks[l]);
}
END_TEST

typedef void (*scale_fn)(float *, size_t, float);

/* x[i] *= 1.5 for every length up to 70: exact (one float product), and
 * nothing written past n. */
static void check_scale(scale_fn scale, const char *name)
{
    float x[80];
    for (size_t n = 0; n < 70; n++) {
        for (size_t i = 0; i < 80; i++)
            x[i] = value(i) / 100.0f;
        scale(x, n, 1.5f);
        for (size_t i = 0; i < 80; i++)
            ck_assert_msg(x[i] == (i < n ? value(i) / 100.0f * 1.5f
                                         : value(i) / 100.0f),
                          "%s: scale of %zu, element %zu", name, n, i);
    }
}

START_TEST(test_scale_portable)
{
    check_scale(masa__scale_row_portable, "portable");
    check_scale(masa__scale_row, "dispatch");
}
END_TEST

START_TEST(test_scale_avx512)
{
    if (avx512_or_say("AVX-512 row scaling"))
        check_scale(masa__scale_row_avx512, "avx512");
}
END_TEST

int main(void)
{
    Suite *s = suite_create("tiles");
    TCase *tc = tcase_create("tiles");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_pack_portable);
    tcase_add_test(tc, test_pack_avx512);
    tcase_add_test(tc, test_products);
    tcase_add_test(tc, test_scale_portable);
    tcase_add_test(tc, test_scale_avx512);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
