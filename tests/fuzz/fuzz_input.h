/*
 * What the libFuzzer harnesses of libmasa's API share: reading the fuzzer's
 * bytes as a little program, reporting a broken rule as a crash, and an
 * allocator hook that fails on request.
 *
 * Before including, a harness defines FUZZ_NAME (its name, for messages) and
 * FUZZ_LAST_STATUS (the last status its calls may return: the core API stops
 * at MASA_ERROR_INTERNAL, the file and ReplaceMe functions go further).
 */
#ifndef MASA_FUZZ_INPUT_H
#define MASA_FUZZ_INPUT_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include <masa/masa.h>

/* The input, consumed from the front; zeros once it runs out. */
typedef struct reader {
    const uint8_t *p;
    size_t n;
} reader;

static inline unsigned u8(reader *r)
{
    if (r->n == 0)
        return 0;
    r->n--;
    return *r->p++;
}

static inline unsigned u16(reader *r)
{
    return u8(r) | (u8(r) << 8);
}

static inline uint64_t u64(reader *r)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v |= (uint64_t)u8(r) << (8 * i);
    return v;
}

/* 0 .. n-1 */
static inline size_t pick(reader *r, size_t n)
{
    return n ? (n <= 256 ? u8(r) % n : u16(r) % n) : 0;
}

static inline int chance(reader *r, unsigned percent)
{
    return u8(r) % 100 < percent;
}

/* A broken rule aborts: libFuzzer reports it as a crash, with the input. */
#define FAIL(...)                                                            \
    do {                                                                     \
        fprintf(stderr, FUZZ_NAME ": %s:%d: ", __FILE__, __LINE__);          \
        fprintf(stderr, __VA_ARGS__);                                        \
        fprintf(stderr, " (last error: \"%s\")\n", masa_last_error());      \
        abort();                                                             \
    } while (0)

#define REQUIRE(cond, ...)                                                   \
    do {                                                                     \
        if (!(cond))                                                         \
            FAIL(__VA_ARGS__);                                               \
    } while (0)

/* MASA_FUZZ_TRACE=1: print what each input does (to study a finding). */
static int trace;
#define TRACE(...)                                                           \
    do {                                                                     \
        if (trace)                                                           \
            fprintf(stderr, __VA_ARGS__);                                    \
    } while (0)

/* Every status must be a known one with a string; failures need a message. */
static inline masa_status checked(masa_status st, const char *what)
{
    REQUIRE((int)st >= MASA_OK && (int)st <= FUZZ_LAST_STATUS,
            "%s returned unknown status %d", what, (int)st);
    REQUIRE(st != MASA_ERROR_INTERNAL, "%s: internal error", what);
    REQUIRE(masa_status_string(st) != NULL, "status string NULL");
    TRACE("  %s -> %s %s\n", what, masa_status_string(st), masa_last_error());
    if (st != MASA_OK)
        REQUIRE(masa_last_error()[0] != '\0', "%s failed (%s) without message",
                what, masa_status_string(st));
    return st;
}
#define CALL(expr) checked((expr), #expr)

/* An allocator hook with failure injection (allocation number fail_at fails;
 * -1: none) and a size limit; live counts blocks not yet returned. Contexts
 * get it with alloc_user = &hook. */
typedef struct hook_state {
    long count, fail_at, live;
} hook_state;
static hook_state hook;

static inline void *hook_malloc(size_t size, void *user)
{
    hook_state *h = user;
    if (h != &hook)
        FAIL("allocator hook got user %p, want %p", user, (void *)&hook);
    if (h->count++ == h->fail_at || size > ((size_t)64 << 20))
        return NULL;
    void *p = malloc(size);
    if (p)
        h->live++;
    return p;
}

static inline void hook_free(void *p, void *user)
{
    hook_state *h = user;
    if (h != &hook)
        FAIL("allocator hook got user %p", user);
    if (p)
        h->live--;
    free(p);
}

#endif
