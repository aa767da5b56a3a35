/* ReplaceMe's merge: the linear map T folded into a down projection. */
#include <string.h>

#include "compress/replaceme_internal.h"

MASA_API masa_status masa_merge_linear_map(masa_context *ctx, int layout,
                                           size_t d_ff, size_t d, float *w,
                                           float *bias, const float *t)
{
    static const char fn[] = "masa_merge_linear_map";
    masa__clear_error();
    if (!ctx || !w || !t)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT, "%s: %s is NULL", fn,
                          !ctx ? "ctx" : !w ? "w" : "t");
    if (layout != MASA_MERGE_ROW_VECTOR && layout != MASA_MERGE_NN_LINEAR)
        return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                          "%s: unknown layout %d", fn, layout);
    if (d_ff == 0 || d == 0)
        return masa__fail(MASA_ERROR_BAD_SHAPE,
                          "%s: d_ff (%zu) and d (%zu) must be >= 1", fn, d_ff,
                          d);
    size_t w_bytes, t_bytes, scratch_bytes;
    if (!masa__mul3(d_ff, d, sizeof(float), &w_bytes) ||
        !masa__mul3(d, d, sizeof(float), &t_bytes) ||
        !masa__mul3(d_ff + 1, d, sizeof(float), &scratch_bytes))
        return masa__fail(MASA_ERROR_OVERFLOW, "%s: d_ff (%zu) x d (%zu) "
                          "overflows", fn, d_ff, d);
    if (masa__overlaps(t, t_bytes, w, w_bytes) ||
        (bias && masa__overlaps(t, t_bytes, bias, d * sizeof(float))))
        return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                          "%s: t overlaps w or bias", fn);
    if (bias && masa__overlaps(w, w_bytes, bias, d * sizeof(float)))
        return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                          "%s: w and bias overlap", fn);
    if (!masa__replaceme_finite(t, d * d))
        return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                          "%s: t holds a NaN or infinity", fn);
    float *scratch = masa__alloc(ctx, scratch_bytes);
    if (!scratch)
        return masa__fail(MASA_ERROR_OUT_OF_MEMORY,
                          "%s: cannot allocate %zu bytes of scratch", fn,
                          scratch_bytes);
    masa__blis_init();
    if (layout == MASA_MERGE_ROW_VECTOR) /* (d_ff x d) T */
        masa__gemm_pool(ctx->pool, ctx->n_threads, d_ff, d, d, 1.0f, w, d, 1,
                        t, d, 1, 0.0f, scratch, d, 1);
    else /* T^T (d x d_ff) */
        masa__gemm_pool(ctx->pool, ctx->n_threads, d, d_ff, d, 1.0f, t, 1, d,
                        w, d_ff, 1, 0.0f, scratch, d_ff, 1);
    memcpy(w, scratch, w_bytes);
    if (bias) { /* bias T = T^T bias */
        float *nb = scratch + d_ff * d;
        masa__gemv(d, d, 1.0f, t, 1, d, bias, 0.0f, nb, 1);
        memcpy(bias, nb, d * sizeof(float));
    }
    masa__free(ctx, scratch);
    return MASA_OK;
}
