/* Helpers shared by the benchmark programs: a monotonic clock, exit on a
 * libmasa error or on out of memory (a benchmark has nothing to recover),
 * 64-byte aligned buffers, medians and a small deterministic generator.
 * Each program defines BENCH_NAME (its name, for messages) before including
 * this file. */
#ifndef MASA_BENCH_COMMON_H
#define MASA_BENCH_COMMON_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "masa/masa.h"

#ifndef BENCH_NAME
#error "define BENCH_NAME before including bench_common.h"
#endif

static inline double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static inline void die(const char *what, masa_status st)
{
    fprintf(stderr, BENCH_NAME ": %s: %s (%s)\n", what,
            masa_status_string(st), masa_last_error());
    exit(1);
}
#define OK(call)                                                            \
    do {                                                                    \
        masa_status st_ = (call);                                           \
        if (st_ != MASA_OK)                                                 \
            die(#call, st_);                                                \
    } while (0)

static inline void *xalloc(size_t bytes)
{
    void *p = aligned_alloc(64, (bytes + 63) & ~(size_t)63);
    if (!p) {
        fprintf(stderr, BENCH_NAME ": out of memory (%zu bytes)\n", bytes);
        exit(1);
    }
    return p;
}

static inline int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Median of n > 0 values; v is left as it was. */
static inline double median(const double *v, size_t n)
{
    double *tmp = xalloc(n * sizeof *tmp);
    memcpy(tmp, v, n * sizeof *v);
    qsort(tmp, n, sizeof *tmp, cmp_double);
    double m = n % 2 ? tmp[n / 2] : 0.5 * (tmp[n / 2 - 1] + tmp[n / 2]);
    free(tmp);
    return m;
}

/* U(-1, 1) from a 64-bit LCG: the same numbers on every run. */
static inline float unif_from(uint64_t *state)
{
    *state = *state * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((*state >> 40) * (1.0 / 16777216.0)) * 2.0f - 1.0f;
}

#endif
