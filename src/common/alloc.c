/* Overflow-checked size arithmetic and allocation through the context's
 * allocator hook. */
#include <stdlib.h>
#include <string.h>

#include "common/internal.h"

bool masa__mul(size_t a, size_t b, size_t *out)
{
    return !__builtin_mul_overflow(a, b, out);
}

bool masa__mul3(size_t a, size_t b, size_t c, size_t *out)
{
    size_t ab;
    return masa__mul(a, b, &ab) && masa__mul(ab, c, out);
}

bool masa__add(size_t *acc, size_t a)
{
    return !__builtin_add_overflow(*acc, a, acc);
}

void *masa__alloc(const masa_context *ctx, size_t bytes)
{
    if (bytes == 0)
        bytes = 1;
    if (ctx && ctx->malloc_fn)
        return ctx->malloc_fn(bytes, ctx->alloc_user);
    return malloc(bytes);
}

void *masa__calloc(const masa_context *ctx, size_t count, size_t elem)
{
    size_t bytes;
    if (!masa__mul(count, elem, &bytes))
        return NULL;
    void *p = masa__alloc(ctx, bytes);
    if (p)
        memset(p, 0, bytes);
    return p;
}

void masa__free(const masa_context *ctx, void *ptr)
{
    if (!ptr)
        return;
    if (ctx && ctx->free_fn)
        ctx->free_fn(ptr, ctx->alloc_user);
    else
        free(ptr);
}
