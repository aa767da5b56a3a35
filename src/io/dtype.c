/* safetensors dtypes: names, sizes, the format's order, float conversion. */
#include <string.h>

#include "io/io_internal.h"

static const struct {
    const char *name;
    size_t size;
    int rank; /* position in the safetensors package's Dtype enum */
} dtypes[] = {
    [MASA_DTYPE_F32] = {"F32", 4, 11},
    [MASA_DTYPE_F16] = {"F16", 2, 7},
    [MASA_DTYPE_BF16] = {"BF16", 2, 8},
    [MASA_DTYPE_F64] = {"F64", 8, 12},
    [MASA_DTYPE_BOOL] = {"BOOL", 1, 0},
    [MASA_DTYPE_U8] = {"U8", 1, 1},
    [MASA_DTYPE_I8] = {"I8", 1, 2},
    [MASA_DTYPE_I16] = {"I16", 2, 5},
    [MASA_DTYPE_U16] = {"U16", 2, 6},
    [MASA_DTYPE_I32] = {"I32", 4, 9},
    [MASA_DTYPE_U32] = {"U32", 4, 10},
    [MASA_DTYPE_I64] = {"I64", 8, 13},
    [MASA_DTYPE_U64] = {"U64", 8, 14},
    [MASA_DTYPE_F8_E5M2] = {"F8_E5M2", 1, 3},
    [MASA_DTYPE_F8_E4M3] = {"F8_E4M3", 1, 4},
};
#define N_DTYPES (sizeof dtypes / sizeof dtypes[0])

static bool known(masa_dtype d)
{
    return (unsigned)d < N_DTYPES;
}

MASA_API const char *masa_dtype_name(masa_dtype dtype)
{
    return known(dtype) ? dtypes[dtype].name : NULL;
}

MASA_API size_t masa_dtype_size(masa_dtype dtype)
{
    return known(dtype) ? dtypes[dtype].size : 0;
}

bool masa__dtype_from_name(const char *name, masa_dtype *out)
{
    for (size_t i = 0; i < N_DTYPES; i++) {
        if (strcmp(name, dtypes[i].name) == 0) {
            *out = (masa_dtype)i;
            return true;
        }
    }
    return false;
}

int masa__dtype_format_rank(masa_dtype dtype)
{
    return known(dtype) ? dtypes[dtype].rank : -1;
}

bool masa__dtype_is_float(masa_dtype dtype)
{
    return dtype == MASA_DTYPE_F32 || dtype == MASA_DTYPE_F16 ||
           dtype == MASA_DTYPE_BF16 || dtype == MASA_DTYPE_F64;
}

static float bits_to_float(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* binary16 -> binary32, exact (every half is a float): subnormal halves
 * are renormalised, inf and NaN keep their sign and payload. */
static float half_to_float(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t mant = h & 0x3ffu;
    if (exp == 0x1f)
        return bits_to_float(sign | 0x7f800000u | (mant << 13));
    if (exp == 0) {
        if (mant == 0)
            return bits_to_float(sign);
        /* value = mant * 2^-24: shift the leading one into the hidden bit */
        int e = -1;
        do {
            mant <<= 1;
            e++;
        } while (!(mant & 0x400u));
        mant &= 0x3ffu;
        return bits_to_float(sign | ((uint32_t)(127 - 15 - e) << 23) |
                             (mant << 13));
    }
    return bits_to_float(sign | ((exp + 127 - 15) << 23) | (mant << 13));
}

void masa__convert_to_f32(masa_dtype dtype, const void *src, size_t n,
                          float *dst)
{
    const unsigned char *p = src;
    switch (dtype) {
    case MASA_DTYPE_F32:
        memcpy(dst, src, n * sizeof(float));
        break;
    case MASA_DTYPE_F16:
        for (size_t i = 0; i < n; i++) {
            uint16_t h = (uint16_t)(p[2 * i] | (p[2 * i + 1] << 8));
            dst[i] = half_to_float(h);
        }
        break;
    case MASA_DTYPE_BF16:
        for (size_t i = 0; i < n; i++) {
            uint32_t u = (uint32_t)p[2 * i] << 16 | (uint32_t)p[2 * i + 1] << 24;
            dst[i] = bits_to_float(u);
        }
        break;
    case MASA_DTYPE_F64:
        for (size_t i = 0; i < n; i++) {
            double d;
            memcpy(&d, p + 8 * i, sizeof d);
            dst[i] = (float)d;
        }
        break;
    default:
        break;
    }
}
