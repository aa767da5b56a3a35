/* Softmax row kernels: row maximum and x <- exp(x - shift) with the row sum
 * (forward), and backward's row of P and dS = P (dP - delta).
 *
 * The AVX2 version evaluates exp with Cephes' degree-6 polynomial after the
 * range reduction x = n ln2 + r, |r| <= ln2/2, and builds 2^n in the exponent
 * bits. Measured on every float in [-87.3, 88.3] against e^x in double:
 * relative error at most 1.2e-7 (2 ulp); tests/test_exp.c checks 4e-7
 * against expf. Below ln(FLT_MIN) =
 * -87.337 (where e^x is no longer a normal float) the result is 0; above 88.37 it
 * is +inf; NaN stays NaN. Chosen at run time: the library is built for the
 * baseline x86-64, so AVX2 code is compiled for that function only and used
 * only when the CPU has AVX2 and FMA. */
#include <math.h>
#include <pthread.h>

#include "attention/attention_core.h"

float masa__exp_shifted_portable(float *x, size_t n, float shift)
{
    float sum = 0.0f;
    for (size_t i = 0; i < n; i++) {
        x[i] = expf(x[i] - shift);
        sum += x[i];
    }
    return sum;
}

float masa__softmax_grad_row_portable(float *p, float *dp, size_t n,
                                      float row_max, float log_sum,
                                      float delta, masa_big_p *big)
{
    float sum = 0.0f;
    big->n = 0;
    for (size_t j = 0; j < n; j++) {
        p[j] = expf((p[j] - row_max) - log_sum);
        dp[j] = p[j] * (dp[j] - delta);
        sum += dp[j];
        if (p[j] > MASA_BIG_P && big->n < MASA_BIG_MAX)
            big->j[big->n++] = j;
    }
    return sum;
}

float masa__row_max_portable(const float *x, size_t n, float init)
{
    float m = init;
    for (size_t i = 0; i < n; i++)
        if (x[i] > m) /* NaN is skipped: it propagates through exp instead */
            m = x[i];
    return m;
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#define AVX2 __attribute__((target("avx2,fma")))

AVX2 static inline __m256 exp8(__m256 x)
{
    const __m256 hi = _mm256_set1_ps(88.3762626647949f);
    const __m256 lo = _mm256_set1_ps(-87.33654475f); /* ln FLT_MIN */
    /* min/max return their second operand when one is NaN: x goes second
     * so a NaN survives the clamp */
    __m256 xc = _mm256_max_ps(lo, _mm256_min_ps(hi, x));
    __m256 n = _mm256_round_ps(
        _mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    /* r = x - n ln2, ln2 split in two so n * C1 is exact */
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    __m256 r2 = _mm256_mul_ps(r, r);
    p = _mm256_fmadd_ps(p, r2, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    /* below the normal range: 0; above it: inf (NaN compares false) */
    y = _mm256_andnot_ps(_mm256_cmp_ps(x, lo, _CMP_LT_OQ), y);
    y = _mm256_blendv_ps(y, _mm256_set1_ps(INFINITY),
                         _mm256_cmp_ps(x, hi, _CMP_GT_OQ));
    return y;
}

AVX2 static inline float hsum8(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v),
                          _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

AVX2 float masa__exp_shifted_avx2(float *x, size_t n, float shift)
{
    __m256 sh = _mm256_set1_ps(shift);
    __m256 acc = _mm256_setzero_ps();
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 y = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), sh));
        _mm256_storeu_ps(x + i, y);
        acc = _mm256_add_ps(acc, y);
    }
    if (i < n) {
        /* the tail through a masked load/store: never touches x[n..) */
        __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n - i)),
                                          idx);
        __m256 y = exp8(_mm256_sub_ps(_mm256_maskload_ps(x + i, mask), sh));
        y = _mm256_and_ps(y, _mm256_castsi256_ps(mask));
        _mm256_maskstore_ps(x + i, mask, y);
        acc = _mm256_add_ps(acc, y);
    }
    return hsum8(acc);
}

AVX2 float masa__softmax_grad_row_avx2(float *p, float *dp, size_t n,
                                       float row_max, float log_sum,
                                       float delta, masa_big_p *big)
{
    __m256 mx = _mm256_set1_ps(row_max), ls = _mm256_set1_ps(log_sum);
    __m256 dl = _mm256_set1_ps(delta), bigp = _mm256_set1_ps(MASA_BIG_P);
    __m256 acc = _mm256_setzero_ps();
    big->n = 0;
    for (size_t i = 0; i < n; i += 8) {
        /* the tail through masked loads/stores: never touches p[n..) */
        __m256i mask = _mm256_cmpgt_epi32(
            _mm256_set1_epi32(n - i < 8 ? (int)(n - i) : 8),
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        __m256 on = _mm256_castsi256_ps(mask);
        __m256 s = _mm256_maskload_ps(p + i, mask);
        __m256 e = _mm256_and_ps(
            exp8(_mm256_sub_ps(_mm256_sub_ps(s, mx), ls)), on);
        __m256 ds = _mm256_and_ps(
            _mm256_mul_ps(e, _mm256_sub_ps(_mm256_maskload_ps(dp + i, mask),
                                           dl)), on);
        _mm256_maskstore_ps(p + i, mask, e);
        _mm256_maskstore_ps(dp + i, mask, ds);
        acc = _mm256_add_ps(acc, ds);
        unsigned bits = (unsigned)_mm256_movemask_ps(
            _mm256_cmp_ps(e, bigp, _CMP_GT_OQ)); /* masked lanes hold 0 */
        for (; bits && big->n < MASA_BIG_MAX; bits &= bits - 1)
            big->j[big->n++] = i + (size_t)__builtin_ctz(bits);
    }
    return hsum8(acc);
}

AVX2 float masa__row_max_avx2(const float *x, size_t n, float init)
{
    __m256 m = _mm256_set1_ps(init);
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        m = _mm256_max_ps(_mm256_loadu_ps(x + i), m); /* NaN in x skipped */
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m),
                          _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    return masa__row_max_portable(x + i, n - i, _mm_cvtss_f32(h));
}

static int has_avx2;
static void detect(void)
{
    __builtin_cpu_init();
    has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

bool masa__cpu_has_avx2_fma(void)
{
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, detect);
    return has_avx2;
}

float masa__exp_shifted(float *x, size_t n, float shift)
{
    return masa__cpu_has_avx2_fma() ? masa__exp_shifted_avx2(x, n, shift)
                                : masa__exp_shifted_portable(x, n, shift);
}

float masa__row_max(const float *x, size_t n, float init)
{
    return masa__cpu_has_avx2_fma() ? masa__row_max_avx2(x, n, init)
                                : masa__row_max_portable(x, n, init);
}

float masa__softmax_grad_row(float *p, float *dp, size_t n, float row_max,
                             float log_sum, float delta, masa_big_p *big)
{
    return masa__cpu_has_avx2_fma()
               ? masa__softmax_grad_row_avx2(p, dp, n, row_max, log_sum,
                                             delta, big)
               : masa__softmax_grad_row_portable(p, dp, n, row_max, log_sum,
                                                 delta, big);
}
#else
bool masa__cpu_has_avx2_fma(void) { return false; }

float masa__exp_shifted(float *x, size_t n, float shift)
{
    return masa__exp_shifted_portable(x, n, shift);
}

float masa__row_max(const float *x, size_t n, float init)
{
    return masa__row_max_portable(x, n, init);
}

float masa__softmax_grad_row(float *p, float *dp, size_t n, float row_max,
                             float log_sum, float delta, masa_big_p *big)
{
    return masa__softmax_grad_row_portable(p, dp, n, row_max, log_sum, delta,
                                           big);
}
#endif
