/* Seeded, platform-independent uniform numbers for the initialisers:
 * element i gets splitmix64(seed, i), so results do not depend on threads or
 * on the order of calls. */
#include "common/internal.h"

static uint64_t splitmix64(uint64_t x)
{
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

/* Uniform in [-1, 1) with 24 bits of resolution. */
static float uniform_pm1(uint64_t seed, size_t i)
{
    uint64_t r = splitmix64(seed ^ splitmix64((uint64_t)i));
    return (float)((double)(r >> 40) * (2.0 / 16777216.0) - 1.0);
}

void masa__fill_uniform(float *dst, size_t n, float bound, uint64_t seed)
{
    for (size_t i = 0; i < n; i++)
        dst[i] = bound * uniform_pm1(seed, i);
}

void masa__add_uniform(float *dst, size_t n, float bound, uint64_t seed)
{
    for (size_t i = 0; i < n; i++)
        dst[i] += bound * uniform_pm1(seed, i);
}
