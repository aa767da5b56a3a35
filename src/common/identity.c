/* Layer identities and parameter generations: values of one process-wide
 * counter that only grows, so no value is ever handed out twice (a layer
 * created where a destroyed one lived gets a new identity), and the newest
 * generation of any object is larger than every earlier one. */
#include <stdatomic.h>

#include "common/internal.h"

static _Atomic uint64_t ticks;

uint64_t masa__next_tick(void)
{
    return atomic_fetch_add(&ticks, 1) + 1; /* 0 is never handed out */
}

void masa__bump(_Atomic uint64_t *generation)
{
    atomic_store_explicit(generation, masa__next_tick(),
                          memory_order_relaxed);
}

uint64_t masa__generation(const _Atomic uint64_t *generation)
{
    return atomic_load_explicit(generation, memory_order_relaxed);
}
