/* Contexts: thread count, allocator hook and the worker pool. */
#include <string.h>
#include <unistd.h>

#include "common/internal.h"

masa_status masa__check_struct_size(const char *fn, const void *opts,
                                    size_t given, size_t known_size)
{
    /* Every struct is complete since version 0.1; later versions that grow
     * a struct will accept each older, smaller size explicitly. */
    if (given < known_size)
        return masa__fail(MASA_ERROR_BAD_STRUCT_SIZE,
                          "%s: struct size %zu is smaller than %zu (initialise "
                          "the struct with its _init function)", fn, given,
                          known_size);
    if (given > known_size) {
        /* A newer program's struct: accepted only if the fields this
         * library does not know are left at zero. */
        const unsigned char *tail = (const unsigned char *)opts + known_size;
        for (size_t i = 0; i < given - known_size; i++)
            if (tail[i] != 0)
                return masa__fail(MASA_ERROR_BAD_STRUCT_SIZE,
                                  "%s: options size %zu is larger than this "
                                  "library's %zu and the unknown fields are "
                                  "not zero", fn, given, known_size);
    }
    return MASA_OK;
}

void masa__struct_defaults(void *dst, size_t size, const void *full,
                           size_t known_size)
{
    if (!dst || size < sizeof(size_t))
        return;
    memset(dst, 0, size);
    memcpy(dst, full, size < known_size ? size : known_size);
    memcpy(dst, &size, sizeof size); /* every struct begins with its size */
}

static masa_context_options context_defaults(void)
{
    masa_context_options o;
    memset(&o, 0, sizeof o);
    o.size = sizeof o;
    return o;
}

MASA_API void masa_context_options_default(masa_context_options *options,
                                           size_t size)
{
    masa_context_options d = context_defaults();
    masa__struct_defaults(options, size, &d, sizeof d);
}

static size_t online_cpus(void)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (size_t)n : 1;
}

/* No machine has this many cores; a larger value is a caller's mistake. */
#define MASA_MAX_THREADS 1024

MASA_API masa_status masa_context_create(const masa_context_options *options,
                                         masa_context **out)
{
    static const char fn[] = "masa_context_create";
    if (!out)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT, "%s: out is NULL", fn);
    *out = NULL;

    masa_context_options opts = context_defaults();
    if (options) {
        masa_status st = masa__check_struct_size(fn, options, options->size,
                                                 sizeof opts);
        if (st != MASA_OK)
            return st;
        memcpy(&opts, options, sizeof opts); /* size >= sizeof opts, checked */
    }
    if ((opts.malloc_fn == NULL) != (opts.free_fn == NULL))
        return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                          "%s: malloc_fn and free_fn must be set together", fn);
    if (opts.n_threads > MASA_MAX_THREADS)
        return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                          "%s: n_threads %zu exceeds the limit %d", fn,
                          opts.n_threads, MASA_MAX_THREADS);

    masa__fork_handlers_install();
    masa__call_enter();
    masa__blis_init();

    masa_context tmp = {
        .n_threads = opts.n_threads ? opts.n_threads : online_cpus(),
        .malloc_fn = opts.malloc_fn,
        .free_fn = opts.free_fn,
        .alloc_user = opts.alloc_user,
    };
    masa_context *ctx = masa__alloc(&tmp, sizeof *ctx);
    masa_status st = MASA_OK;
    if (!ctx)
        st = masa__fail(MASA_ERROR_OUT_OF_MEMORY,
                        "%s: cannot allocate the context", fn);
    else {
        *ctx = tmp;
        st = masa__pool_create(ctx, ctx->n_threads, &ctx->pool);
        if (st != MASA_OK)
            masa__free(&tmp, ctx);
        else
            *out = ctx;
    }
    masa__call_exit();
    return st;
}

MASA_API void masa_context_destroy(masa_context *ctx)
{
    if (!ctx)
        return;
    masa__call_enter();
    masa__pool_destroy(ctx, ctx->pool);
    masa_context tmp = *ctx;
    masa__free(&tmp, ctx);
    masa__call_exit();
}

MASA_API size_t masa_context_threads(const masa_context *ctx)
{
    return ctx ? ctx->n_threads : 0;
}
