/*
 * The softmax row kernels of src/fast_exp.c (compiled into this test) against
 * the C library's expf, for the AVX-512 and AVX2 versions (when the CPU has
 * them; skipped with a printed line otherwise) and the portable one.
 *
 * Tolerance: |got - expf(x)| <= 4e-7 * expf(x) + FLT_MIN, i.e. about 3 ulp.
 * The polynomial's own error is about 1 ulp plus the rounding of the range
 * reduction; FLT_MIN absorbs the documented flush to 0 below -87.3. A wrong
 * coefficient or exponent shows at 1e-3 or worse. Row sums of n positive
 * terms are compared with the double sum of the expf values at
 * (4e-7 + n FLT_EPSILON) relative: the element error plus the bound of a
 * float summation.
 */
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include <check.h>

#include "attention/attention_core.h"

typedef float (*exp_fn)(float *, size_t, float);
typedef float (*max_fn)(const float *, size_t, float);

static void check_exp(exp_fn f, const char *name)
{
    /* a dense grid over the range where e^x is a normal float and below */
    size_t n = 200003;
    float *x = malloc(n * sizeof(float));
    ck_assert_ptr_nonnull(x);
    for (size_t i = 0; i < n; i++)
        x[i] = -100.0f + 188.3f * (float)i / (float)(n - 1);
    float *y = malloc(n * sizeof(float));
    ck_assert_ptr_nonnull(y);
    for (size_t i = 0; i < n; i++)
        y[i] = x[i];
    f(y, n, 0.0f);
    for (size_t i = 0; i < n; i++) {
        double e = expf(x[i]);
        double err = fabs(y[i] - e);
        ck_assert_msg(err <= 4e-7 * e + FLT_MIN,
                      "%s(%.9g) = %.9g, expf %.9g", name, (double)x[i],
                      (double)y[i], e);
    }
    /* past the float range: inf */
    float big[2] = {89.0f, INFINITY};
    f(big, 2, 0.0f);
    ck_assert_msg(isinf(big[0]) && isinf(big[1]), "%s: e^89 is not inf",
                  name);
    free(x);
    free(y);
}

/* The shift, the returned sum, every tail length and special values. */
static void check_rows(exp_fn f, max_fn mx, const char *name)
{
    float row[1000] = {0}, want[1000] = {0};
    for (size_t n = 0; n <= 1000; n += n < 40 ? 1 : 97) {
        for (size_t i = 0; i < n; i++)
            row[i] = (float)(((i * 7919) % 1000) / 50.0) - 10.0f;
        float m = mx(row, n, -INFINITY);
        float m_ref = -INFINITY;
        for (size_t i = 0; i < n; i++)
            m_ref = row[i] > m_ref ? row[i] : m_ref;
        ck_assert_msg(m == m_ref, "%s: max of %zu = %g, want %g", name, n,
                      (double)m, (double)m_ref);
        double sum_ref = 0.0;
        for (size_t i = 0; i < n; i++) {
            want[i] = expf(row[i] - m);
            sum_ref += want[i];
        }
        if (n < 1000)
            row[n] = 12345.0f; /* must stay untouched */
        float sum = f(row, n, m);
        for (size_t i = 0; i < n; i++)
            ck_assert_msg(fabsf(row[i] - want[i]) <= 4e-7f * want[i] + FLT_MIN,
                          "%s: row %zu element %zu", name, n, i);
        ck_assert_msg(fabs(sum - sum_ref) <= (4e-7 + n * FLT_EPSILON) * sum_ref,
                      "%s: sum of %zu = %.9g, want %.9g", name, n,
                      (double)sum, sum_ref);
        if (n < 1000)
            ck_assert_msg(row[n] == 12345.0f, "%s: wrote past %zu", name, n);
    }
    /* NaN propagates through exp and is skipped by max; -inf gives 0 */
    float s[9] = {0, 1, NAN, -INFINITY, 2, 3, 4, 5, 6};
    ck_assert(mx(s, 9, -INFINITY) == 6.0f);
    ck_assert(mx(s, 3, -INFINITY) == 1.0f);
    float sum = f(s, 9, 6.0f);
    ck_assert(isnan(s[2]) && isnan(sum));
    ck_assert(s[3] == 0.0f && s[8] == 1.0f);
}

START_TEST(test_portable)
{
    check_exp(masa__exp_shifted_portable, "portable");
    check_rows(masa__exp_shifted_portable, masa__row_max_portable, "portable");
}
END_TEST

START_TEST(test_avx2)
{
#if defined(__x86_64__) && defined(__GNUC__)
    if (!masa__cpu_has_avx2_fma()) {
        printf("test_exp: AVX2 kernels skipped, this CPU has no AVX2+FMA\n");
        return;
    }
    check_exp(masa__exp_shifted_avx2, "avx2");
    check_rows(masa__exp_shifted_avx2, masa__row_max_avx2, "avx2");
#endif
}
END_TEST

START_TEST(test_avx512)
{
#if defined(__x86_64__) && defined(__GNUC__)
    if (!masa__cpu_has_avx512()) {
        printf("test_exp: AVX-512 kernels skipped, this CPU has no "
               "AVX-512\n");
        return;
    }
    check_exp(masa__exp_shifted_avx512, "avx512");
    check_rows(masa__exp_shifted_avx512, masa__row_max_avx512, "avx512");
#endif
}
END_TEST

START_TEST(test_dispatch)
{
    check_exp(masa__exp_shifted, "dispatch");
    check_rows(masa__exp_shifted, masa__row_max, "dispatch");
}
END_TEST

int main(void)
{
    Suite *s = suite_create("exp");
    TCase *tc = tcase_create("exp");
    tcase_add_test(tc, test_portable);
    tcase_add_test(tc, test_avx2);
    tcase_add_test(tc, test_avx512);
    tcase_add_test(tc, test_dispatch);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
