/*
 * The softmax row kernels of src/fast_exp.c (compiled into this test) against
 * the C library's expf, for both the AVX2 version (when the CPU has it) and
 * the portable one: forward's exp and row max, backward's row of P and dS.
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

typedef float (*grad_fn)(float *, float *, size_t, float, float, float,
                         masa_big_p *);

/* Backward's row: p = exp((s - m) - log l), dS = p (dP - delta), the sum of
 * dS and the entries with p > 1/8, against expf and double sums, for every
 * tail length; nothing past n is touched. */
static void check_grad_rows(grad_fn f, const char *name)
{
    enum { N = 300 };
    float s[N + 1], dp[N + 1], p_want[N];
    for (size_t n = 0; n <= N; n += n < 40 ? 1 : 37) {
        /* scores at 1e6 (an ulp is 0.06): a few near the max, the rest far */
        float m = 1.0e6f;
        double l = 0.0;
        for (size_t i = 0; i < n; i++) {
            s[i] = i % 5 == 1 ? m - (float)(i % 4) * 0.0625f
                              : m - 30.0f - (float)(i % 11);
            dp[i] = (float)((i * 37) % 19) - 9.0f;
            l += exp((double)s[i] - m);
        }
        float log_l = n ? (float)log(l) : 0.0f, delta = 0.5f;
        s[n] = dp[n] = 12345.0f; /* must stay untouched */
        double sum_ref = 0.0, abs_sum = 0.0;
        size_t big_ref[8], n_big_ref = 0;
        for (size_t i = 0; i < n; i++) {
            p_want[i] = expf((s[i] - m) - log_l);
            double ds = (double)p_want[i] * ((double)dp[i] - delta);
            sum_ref += ds;
            abs_sum += fabs(ds);
            if (p_want[i] > 0.125f && n_big_ref < 8)
                big_ref[n_big_ref++] = i;
        }
        float dp_in[N];
        for (size_t i = 0; i < n; i++)
            dp_in[i] = dp[i];
        masa_big_p big;
        float sum = f(s, dp, n, m, log_l, delta, &big);
        for (size_t i = 0; i < n; i++) {
            ck_assert_msg(fabsf(s[i] - p_want[i]) <= 4e-7f * p_want[i] + FLT_MIN,
                          "%s: row %zu p[%zu] = %g, want %g", name, n, i,
                          (double)s[i], (double)p_want[i]);
            float ds_want = s[i] * (dp_in[i] - delta);
            ck_assert_msg(dp[i] == ds_want, "%s: row %zu dS[%zu]", name, n, i);
        }
        ck_assert_msg(fabs(sum - sum_ref) <= (4e-7 + n * FLT_EPSILON) * abs_sum,
                      "%s: sum of %zu = %.9g, want %.9g", name, n,
                      (double)sum, sum_ref);
        ck_assert_uint_eq(big.n, n_big_ref);
        for (size_t i = 0; i < big.n; i++)
            ck_assert_uint_eq(big.j[i], big_ref[i]);
        ck_assert_msg(s[n] == 12345.0f && dp[n] == 12345.0f,
                      "%s: wrote past %zu", name, n);
    }
    /* equal top scores share the mass: both reported */
    float two[2] = {5.0f, 5.0f}, d2[2] = {1.0f, 1.0f};
    masa_big_p big;
    f(two, d2, 2, 5.0f, logf(2.0f), 1.0f, &big);
    ck_assert_uint_eq(big.n, 2);
    ck_assert(d2[0] == 0.0f && d2[1] == 0.0f);
    /* more than MASA_BIG_MAX above 1/8 (p not summing to 1): the first kept */
    float flat[12], d12[12] = {0};
    for (int i = 0; i < 12; i++)
        flat[i] = 0.0f;
    f(flat, d12, 12, 0.0f, 0.0f, 0.0f, &big); /* p = 1 each */
    ck_assert_uint_eq(big.n, MASA_BIG_MAX);
    for (size_t i = 0; i < MASA_BIG_MAX; i++)
        ck_assert_uint_eq(big.j[i], i);
}

START_TEST(test_portable)
{
    check_exp(masa__exp_shifted_portable, "portable");
    check_rows(masa__exp_shifted_portable, masa__row_max_portable, "portable");
    check_grad_rows(masa__softmax_grad_row_portable, "portable");
}
END_TEST

START_TEST(test_avx2)
{
#if defined(__x86_64__) && defined(__GNUC__)
    if (!masa__cpu_has_avx2_fma())
        return; /* nothing to test on this CPU */
    check_exp(masa__exp_shifted_avx2, "avx2");
    check_rows(masa__exp_shifted_avx2, masa__row_max_avx2, "avx2");
    check_grad_rows(masa__softmax_grad_row_avx2, "avx2");
#endif
}
END_TEST

START_TEST(test_dispatch)
{
    check_exp(masa__exp_shifted, "dispatch");
    check_rows(masa__exp_shifted, masa__row_max, "dispatch");
    check_grad_rows(masa__softmax_grad_row, "dispatch");
}
END_TEST

int main(void)
{
    Suite *s = suite_create("exp");
    TCase *tc = tcase_create("exp");
    tcase_add_test(tc, test_portable);
    tcase_add_test(tc, test_avx2);
    tcase_add_test(tc, test_dispatch);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
