/*
 * libFuzzer harness for the public API of libmasa.
 *
 * Each input is a little program: a context choice, then up to 32
 * operations (create/wrap dictionaries and coefficient tables, initialise
 * them, compose, set projections, biases, low-rank terms and the weight
 * policy, create
 * layers with fuzzed options and options-struct sizes, query sizes, run
 * forward and backward with fuzzed batch, seq, positions, buffer sizes,
 * alignment, overlap, gradient modes and gradient pointers, NULL arguments,
 * bad projection and layer indices...). The harness keeps its own model of
 * what it created, so it ALWAYS allocates every buffer as large as it tells
 * the library it is (plus a slack ASan treats as out of bounds, see own()):
 * the only way to crash, or to trip ASan/UBSan, is a library bug.
 *
 * Besides crashes, the harness aborts (reported by libFuzzer as a crash) when
 * the library breaks a documented rule it can check cheaply:
 *   - a failing call leaves an empty masa_last_error(), or a create function
 *     leaves *out non-NULL;
 *   - a failing forward/backward modified y, dx or a gradient buffer;
 *   - forward/backward fails although every argument is valid, or succeeds
 *     with a workspace or reserve smaller than the size the library asked for;
 *   - masa_layer_projection_shape() disagrees with the shapes in masa.h;
 *   - with "tame" data (all parameters and inputs finite and bounded), the
 *     output or dx is not finite, inference and training forward differ, or
 *     the result depends on the workspace's previous contents (filled with
 *     NaN bytes for one run and zero bytes for the other);
 *   - memory obtained through an allocator hook is not all returned once
 *     every object is destroyed.
 * Shapes stay small (d_model <= 32, seq <= 8, now and then 64..70 to cross a
 * query tile), so an execution takes about a millisecond under ASan.
 *
 * Size-prefixed structs (context and layer options, gradients) are given
 * sizes: the exact size, larger with a zero tail (accepted), larger with a
 * non-zero tail or smaller than the struct (MASA_ERROR_BAD_STRUCT_SIZE),
 * each in a buffer of exactly that size (at least the size field).
 *
 * Build: see tests/fuzz/meson.build (clang, -fsanitize=fuzzer,address,
 * undefined). Run: build-asan/tests/fuzz/fuzz_api -max_total_time=60
 * -dict=tests/fuzz/fuzz_api.dict NEW_DIR tests/fuzz/corpus
 * (scripts/hardening.sh does). Environment:
 * MASA_FUZZ_TRACE=1 prints what an input does (to study a finding),
 * MASA_FUZZ_STATS=1 prints at exit how many calls succeeded.
 * replay_main.c runs the same harness without libFuzzer (any compiler,
 * valgrind).
 */
#include <float.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <masa/masa.h>

#define FUZZ_NAME "fuzz_api"
#define FUZZ_LAST_STATUS MASA_ERROR_INTERNAL /* the core API */
#include "fuzz_input.h"

/* ---------------------------------------------------------------------- */
/* memory the harness owns; freed at the end of the input                 */

/* Every block gets SLACK bytes past its end, poisoned for ASan: libmasa's
 * (instrumented) code touching them is reported like any overflow, while
 * BLIS (not instrumented) may read them. BLIS 0.9's small-matrix ("sup")
 * kernels read up to a row or a vector past some operands; where a buffer
 * ends at an unmapped page that is a crash, found by
 * tests/hardening/test_guard_pages.c. The slack keeps that known problem
 * from ending fuzzing runs at random. */
#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define FUZZ_ASAN 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__)
#define FUZZ_ASAN 1
#endif
#ifdef FUZZ_ASAN
#include <sanitizer/asan_interface.h>
#define POISON(p, n) ASAN_POISON_MEMORY_REGION((p), (n))
#define UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION((p), (n))
#else
#define POISON(p, n) ((void)(p), (void)(n))
#define UNPOISON(p, n) ((void)(p), (void)(n))
#endif
enum { SLACK = 512, MAX_BLOCKS = 4096 };
static void *blocks[MAX_BLOCKS];
static size_t block_bytes[MAX_BLOCKS];
static size_t n_blocks;

static void *own(size_t bytes)
{
    if (n_blocks == MAX_BLOCKS)
        return NULL;
    if (bytes == 0)
        bytes = 1;
    unsigned char *p = calloc(1, bytes + SLACK);
    if (!p)
        abort();
    POISON(p + bytes, SLACK);
    block_bytes[n_blocks] = bytes;
    blocks[n_blocks++] = p;
    return p;
}

static void free_blocks(void)
{
    for (size_t i = 0; i < n_blocks; i++) {
        UNPOISON((unsigned char *)blocks[i] + block_bytes[i], SLACK);
        free(blocks[i]);
    }
    n_blocks = 0;
}

/* ---------------------------------------------------------------------- */
/* values                                                                 */

static const float special[] = {0.0f,     -0.0f,   1.0f,     -1.0f,
                                0.5f,     3.0f,    1e-3f,    1e-40f,
                                FLT_MIN,  1e30f,   -1e30f,   FLT_MAX,
                                -FLT_MAX, NAN,     INFINITY, -INFINITY};

/* A float from the input: special values or raw bits. */
static float any_float(reader *r)
{
    if (chance(r, 70))
        return special[pick(r, sizeof special / sizeof special[0])];
    uint32_t bits = (uint32_t)u16(r) | ((uint32_t)u16(r) << 16);
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static uint64_t rng_state;
static float tame_value(void)
{
    rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((double)(rng_state >> 40) / 8388608.0 - 1.0); /* [-1,1) */
}

/* Fills a buffer: tame values, or (untame) specials from the input. */
static void fill(reader *r, float *a, size_t n, int *tame)
{
    if (chance(r, 85)) {
        for (size_t i = 0; i < n; i++)
            a[i] = tame_value();
    } else {
        *tame = 0;
        float v = any_float(r);
        size_t every = 1 + pick(r, 8);
        for (size_t i = 0; i < n; i++)
            a[i] = i % every == 0 ? v : tame_value();
    }
}

/* ---------------------------------------------------------------------- */
/* state of one input                                                     */

enum { MAX_DICTS = 6, MAX_COEFS = 6 };

typedef struct dict_slot {
    masa_dictionary *d;
    size_t n_atoms, rows, cols;
} dict_slot;

typedef struct coef_slot {
    masa_coefficients *c;
    size_t n_layers, n_atoms;
} coef_slot;

typedef struct proj_model {
    int set, is_masa, has_bias; /* set: a base (MASA or dense) */
    int dict, coef; /* slots (MASA) */
    size_t layer_index;
    size_t rank; /* low-rank term, 0 = none */
} proj_model;

typedef struct state {
    masa_context *ctx;
    int own_ctx, hooked;
    size_t n_threads;
    dict_slot dicts[MAX_DICTS];
    size_t n_dicts;
    coef_slot coefs[MAX_COEFS];
    size_t n_coefs;
    masa_layer *layer;
    size_t d_model, n_heads, n_kv, head_dim, dq, dkv;
    int rope;
    size_t din[4], dout[4];
    proj_model proj[4];
    int tame; /* every value finite and bounded so far */
} state;

static masa_context *shared_ctx[2];

/* MASA_FUZZ_STATS=1: at exit, how many calls of each kind succeeded. */
static unsigned long n_inputs, n_layers_made, n_fwd_ok, n_fwd_tame, n_bwd_ok,
    n_bwd_tame, n_bwd_refused;
static void print_stats(void)
{
    fprintf(stderr,
            "fuzz_api stats: %lu inputs, %lu layers, forward ok %lu (tame "
            "%lu), backward ok %lu (tame %lu), backward refused %lu\n",
            n_inputs, n_layers_made, n_fwd_ok, n_fwd_tame, n_bwd_ok,
            n_bwd_tame, n_bwd_refused);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    for (int i = 0; i < 2; i++) {
        masa_context_options o;
        masa_context_options_init(&o);
        o.n_threads = (size_t)i + 1;
        if (masa_context_create(&o, &shared_ctx[i]) != MASA_OK)
            FAIL("cannot create the shared contexts");
    }
    const char *t = getenv("MASA_FUZZ_TRACE");
    trace = t && strcmp(t, "1") == 0;
    t = getenv("MASA_FUZZ_STATS");
    if (t && strcmp(t, "1") == 0)
        atexit(print_stats);
    return 0;
}

/* Size to claim for an options struct of `full` bytes whose size field is
 * at offset 0; *tail_nonzero tells whether bytes past `full` are nonzero.
 * Returns the claimed size; the caller allocates max(claimed, full) bytes,
 * but at least sizeof(size_t) so the size field exists. */
static size_t struct_size(reader *r, size_t full, int *tail_nonzero,
                          int *valid)
{
    *tail_nonzero = 0;
    *valid = 1;
    switch (pick(r, 24)) {
    case 0:
        *valid = 0;
        return pick(r, 2 * sizeof(size_t)); /* not even two fields */
    case 1:
        return full + 8 * (1 + pick(r, 4)); /* zero tail */
    case 2:
        *tail_nonzero = 1;
        *valid = 0;
        return full + 1 + pick(r, 16);
    case 3: /* cut somewhere, maybe inside a field */
        *valid = 0;
        return 2 * sizeof(size_t) + pick(r, full - 2 * sizeof(size_t));
    default:
        return full;
    }
}

/* An options struct in a buffer of exactly the claimed size (or the size
 * field alone when smaller). */
static void *struct_buffer(const void *full_struct, size_t full, size_t claim,
                           int tail_nonzero)
{
    size_t bytes = claim < sizeof(size_t) ? sizeof(size_t) : claim;
    unsigned char *b = own(bytes);
    if (!b)
        return NULL;
    memcpy(b, full_struct, bytes < full ? bytes : full);
    if (tail_nonzero && claim > full)
        b[claim - 1] = 0x5A;
    memcpy(b, &claim, sizeof claim);
    return b;
}

/* ---------------------------------------------------------------------- */
/* context                                                                */

static void make_context(reader *r, state *s)
{
    /* Usually a shared context (starting threads is slow), most often the
     * 1-thread one: with 2 threads BLIS starts threads in every product. */
    unsigned which = pick(r, 8);
    if (which < 6) {
        int k = which == 5;
        s->ctx = shared_ctx[k];
        s->n_threads = (size_t)k + 1;
        TRACE("context: shared, %zu threads\n", s->n_threads);
        return;
    }
    masa_context_options o;
    masa_context_options_init(&o);
    o.n_threads = pick(r, 4); /* 0 = online CPUs */
    if (which == 7 || chance(r, 30)) {
        o.malloc_fn = hook_malloc;
        o.free_fn = hook_free;
        o.alloc_user = &hook;
        hook.fail_at = chance(r, 50) ? (long)pick(r, 40) : -1;
        s->hooked = 1;
    }
    if (chance(r, 5)) { /* only one hook: rejected */
        o.free_fn = NULL;
        s->hooked = 0;
    }
    if (chance(r, 5))
        o.n_threads = 1025 + pick(r, 4); /* above the limit */
    int tail_nonzero, valid;
    size_t claim = struct_size(r, sizeof o, &tail_nonzero, &valid);
    const masa_context_options *arg =
        chance(r, 10) ? NULL : struct_buffer(&o, sizeof o, claim, tail_nonzero);
    masa_context *ctx = (masa_context *)(uintptr_t)1; /* must become NULL */
    masa_status st = CALL(masa_context_create(arg, &ctx));
    if (st != MASA_OK) {
        REQUIRE(ctx == NULL, "failed masa_context_create left *out set");
        if (arg && valid && o.n_threads <= 1024 &&
            (o.malloc_fn == NULL) == (o.free_fn == NULL))
            REQUIRE(st == MASA_ERROR_OUT_OF_MEMORY && s->hooked,
                    "valid context options rejected: %s",
                    masa_status_string(st));
        s->ctx = shared_ctx[0];
        s->n_threads = 1;
        s->hooked = 0;
        return;
    }
    REQUIRE(valid || !arg, "invalid context options (size %zu) accepted",
            claim);
    s->ctx = ctx;
    s->own_ctx = 1;
    s->n_threads = masa_context_threads(ctx);
    TRACE("context: own, %zu threads, hooked %d (fail at %ld)\n",
          s->n_threads, s->hooked, hook.fail_at);
    REQUIRE(s->n_threads >= 1, "context with %zu threads", s->n_threads);
    if (arg && ((const masa_context_options *)arg)->size >= sizeof o &&
        o.n_threads)
        REQUIRE(s->n_threads == o.n_threads, "asked %zu threads, got %zu",
                o.n_threads, s->n_threads);
}

/* ---------------------------------------------------------------------- */
/* dictionaries and coefficient tables                                    */

/* Shape close to what a projection of the current layer needs. */
static void dict_shape(reader *r, state *s, size_t *rows, size_t *cols)
{
    if (s->layer && chance(r, 80)) {
        int p = (int)pick(r, 4);
        *rows = s->din[p];
        *cols = s->dout[p];
        if (chance(r, 10))
            *rows += 1;
    } else {
        *rows = pick(r, 33);
        *cols = pick(r, 33);
    }
}

static void op_dict_create(reader *r, state *s)
{
    size_t n_atoms = pick(r, 5), rows, cols;
    dict_shape(r, s, &rows, &cols);
    masa_context *ctx = chance(r, 3) ? NULL : s->ctx;
    int wrap = chance(r, 40), huge = 0;
    if (chance(r, 4)) { /* sizes that overflow: nothing is allocated */
        n_atoms = (size_t)1 << (u8(r) % 64);
        rows = SIZE_MAX / 3;
        wrap = 0;
        huge = 1;
    }
    if (s->n_dicts == MAX_DICTS)
        return;
    float *atoms = NULL;
    size_t count = n_atoms * rows * cols;
    if (wrap && !chance(r, 5)) {
        atoms = own(count * sizeof(float));
        if (!atoms)
            return;
        fill(r, atoms, count, &s->tame);
    }
    masa_dictionary *d = (masa_dictionary *)(uintptr_t)1;
    masa_status st =
        wrap ? CALL(masa_dictionary_wrap(ctx, n_atoms, rows, cols, atoms, &d))
             : CALL(masa_dictionary_create(ctx, n_atoms, rows, cols, &d));
    if (st != MASA_OK) {
        REQUIRE(d == NULL, "failed dictionary create left *out set");
        int valid = ctx && n_atoms && rows && cols && (!wrap || atoms) &&
                    !huge;
        REQUIRE(!valid || (s->hooked && st == MASA_ERROR_OUT_OF_MEMORY),
                "valid dictionary %zu x %zu x %zu rejected", n_atoms, rows,
                cols);
        return;
    }
    REQUIRE(!huge, "dictionary of %zu x %zu x %zu accepted", n_atoms, rows,
            cols);
    size_t a, b, c;
    CALL(masa_dictionary_shape(d, &a, &b, &c));
    REQUIRE(a == n_atoms && b == rows && c == cols, "dictionary shape");
    REQUIRE(masa_dictionary_data(d) && (!wrap || masa_dictionary_data(d) ==
                                                     atoms),
            "dictionary data");
    s->dicts[s->n_dicts++] = (dict_slot){d, n_atoms, rows, cols};
}

static void op_coef_create(reader *r, state *s)
{
    size_t n_layers = pick(r, 5), n_atoms = pick(r, 5);
    masa_context *ctx = chance(r, 3) ? NULL : s->ctx;
    int wrap = chance(r, 40);
    if (chance(r, 4)) {
        n_layers = SIZE_MAX / (1 + pick(r, 3));
        n_atoms = 2 + pick(r, 3);
        wrap = 0;
    }
    if (s->n_coefs == MAX_COEFS)
        return;
    float *data = NULL;
    if (wrap && !chance(r, 5)) {
        data = own(n_layers * n_atoms * sizeof(float));
        if (!data)
            return;
        fill(r, data, n_layers * n_atoms, &s->tame);
    }
    masa_coefficients *c = (masa_coefficients *)(uintptr_t)1;
    masa_status st =
        wrap ? CALL(masa_coefficients_wrap(ctx, n_layers, n_atoms, data, &c))
             : CALL(masa_coefficients_create(ctx, n_layers, n_atoms, &c));
    if (st != MASA_OK) {
        REQUIRE(c == NULL, "failed coefficients create left *out set");
        int valid = ctx && n_layers && n_atoms && n_layers < 8 &&
                    (!wrap || data);
        REQUIRE(!valid || (s->hooked && st == MASA_ERROR_OUT_OF_MEMORY),
                "valid table %zu x %zu rejected", n_layers, n_atoms);
        return;
    }
    size_t a, b;
    CALL(masa_coefficients_shape(c, &a, NULL));
    CALL(masa_coefficients_shape(c, NULL, &b));
    REQUIRE(a == n_layers && b == n_atoms && n_layers < 8, "table shape");
    s->coefs[s->n_coefs++] = (coef_slot){c, n_layers, n_atoms};
}

static void op_init(reader *r, state *s)
{
    switch (pick(r, 5)) {
    case 0: {
        masa_dictionary *d =
            s->n_dicts && !chance(r, 5) ? s->dicts[pick(r, s->n_dicts)].d : NULL;
        float bound = chance(r, 60) ? (float)pick(r, 3) * 0.5f : any_float(r);
        masa_status st =
            CALL(masa_dictionary_init_uniform(d, bound, u64(r)));
        REQUIRE((st == MASA_OK) ==
                    (d && isfinite(bound) && bound >= 0.0f),
                "init_uniform(bound %g) -> %s", (double)bound,
                masa_status_string(st));
        if (st == MASA_OK && bound > 1.0f)
            s->tame = 0;
        break;
    }
    case 1:
    case 2: {
        masa_coefficients *c =
            s->n_coefs && !chance(r, 5) ? s->coefs[pick(r, s->n_coefs)].c : NULL;
        masa_status st = pick(r, 2) ? CALL(masa_coefficients_init_cyclic(c))
                                    : CALL(masa_coefficients_init_blocks(c));
        REQUIRE((st == MASA_OK) == (c != NULL), "one-hot init");
        break;
    }
    case 3: {
        masa_coefficients *c =
            s->n_coefs && !chance(r, 5) ? s->coefs[pick(r, s->n_coefs)].c : NULL;
        float bound = chance(r, 60) ? 0.25f * (float)pick(r, 4) : any_float(r);
        masa_status st =
            CALL(masa_coefficients_add_uniform(c, bound, u64(r)));
        REQUIRE((st == MASA_OK) == (c && isfinite(bound) && bound >= 0.0f),
                "add_uniform(bound %g)", (double)bound);
        if (st == MASA_OK && bound > 1.0f)
            s->tame = 0;
        break;
    }
    case 4: { /* raw values into a table or dictionary */
        if (s->n_coefs && chance(r, 50)) {
            coef_slot *c = &s->coefs[pick(r, s->n_coefs)];
            fill(r, masa_coefficients_data(c->c), c->n_layers * c->n_atoms,
                 &s->tame);
        } else if (s->n_dicts) {
            dict_slot *d = &s->dicts[pick(r, s->n_dicts)];
            fill(r, masa_dictionary_data(d->d), d->n_atoms * d->rows * d->cols,
                 &s->tame);
        }
        break;
    }
    }
}

static void op_compose(reader *r, state *s)
{
    if (!s->n_dicts || !s->n_coefs)
        return;
    dict_slot *d = &s->dicts[pick(r, s->n_dicts)];
    coef_slot *c = &s->coefs[pick(r, s->n_coefs)];
    size_t layer = pick(r, c->n_layers + 2);
    size_t need = d->rows * d->cols;
    size_t len = need;
    switch (pick(r, 4)) {
    case 0:
        len = need ? need - 1 : 0;
        break;
    case 1:
        len = need + pick(r, 4);
        break;
    }
    float *w = own(len * sizeof(float));
    if (!w)
        return;
    for (size_t i = 0; i < len; i++)
        w[i] = 7.0f;
    masa_status st = CALL(masa_compose(chance(r, 3) ? NULL : d->d, c->c, layer,
                                       chance(r, 3) ? NULL : w, len));
    if (st != MASA_OK) {
        for (size_t i = 0; i < len; i++)
            REQUIRE(w[i] == 7.0f, "failed masa_compose wrote w");
    } else {
        REQUIRE(len >= need && c->n_atoms == d->n_atoms &&
                    layer < c->n_layers,
                "masa_compose accepted a bad call");
    }
}

/* ---------------------------------------------------------------------- */
/* layers                                                                 */

static void forget_layer(state *s)
{
    masa_layer_destroy(s->layer);
    s->layer = NULL;
    memset(s->proj, 0, sizeof s->proj);
}

static void op_layer_create(reader *r, state *s)
{
    masa_layer_options o;
    masa_layer_options_init(&o);
    o.d_model = pick(r, 33);
    o.n_heads = pick(r, 9);
    o.n_kv_heads = pick(r, 5);
    o.head_dim = chance(r, 60) ? 0 : pick(r, 17);
    o.causal = (int)pick(r, 3) - (int)pick(r, 2); /* any nonzero = on */
    o.rope = chance(r, 40) ? 1 + (int)pick(r, 3) : 0;
    static const float thetas[] = {10000.0f, 2.0f, 1.5f, 1.0f, 0.5f, 1e30f,
                                   500000.0f};
    o.rope_theta = chance(r, 80) ? thetas[pick(r, 7)] : any_float(r);
    static const float scales[] = {0.0f, 0.125f, 1.0f, 10.0f};
    int tame_scale = chance(r, 80);
    o.softmax_scale = tame_scale ? scales[pick(r, 4)] : any_float(r);
    if (chance(r, 3)) { /* overflowing shapes */
        o.d_model = SIZE_MAX / 2 + pick(r, 3);
        o.n_heads = 1 + pick(r, 2);
        o.head_dim = 1 + pick(r, 8);
    }
    int tail_nonzero, valid;
    size_t claim = struct_size(r, sizeof o, &tail_nonzero, &valid);
    const masa_layer_options *arg =
        chance(r, 4) ? NULL : struct_buffer(&o, sizeof o, claim, tail_nonzero);
    masa_context *ctx = chance(r, 3) ? NULL : s->ctx;

    masa_layer *l = (masa_layer *)(uintptr_t)1;
    masa_status st = CALL(masa_layer_create(ctx, arg, &l));
    if (st != MASA_OK) {
        REQUIRE(l == NULL, "failed masa_layer_create left *out set");
        return;
    }
    REQUIRE(arg && ctx && valid && o.d_model <= 32,
            "layer created from a bad call (d_model %zu)", o.d_model);
    if (s->layer)
        forget_layer(s);
    s->layer = l;
    n_layers_made++;
    TRACE("layer: d_model %zu heads %zu kv %zu head_dim %zu causal %d rope %d "
          "theta %g scale %g\n", o.d_model, o.n_heads, o.n_kv_heads,
          o.head_dim, o.causal, o.rope, (double)o.rope_theta,
          (double)o.softmax_scale);
    /* Resolve the options as masa.h says and check the shapes. */
    s->d_model = o.d_model;
    s->rope = o.rope != 0;
    s->n_heads = o.n_heads;
    s->n_kv = o.n_kv_heads ? o.n_kv_heads : o.n_heads;
    s->head_dim = o.head_dim ? o.head_dim : o.d_model / o.n_heads;
    REQUIRE(o.d_model && o.n_heads && s->n_heads % s->n_kv == 0 &&
                (o.head_dim || o.d_model % o.n_heads == 0) &&
                (!o.rope || s->head_dim % 2 == 0),
            "layer created from invalid options");
    s->dq = s->n_heads * s->head_dim;
    s->dkv = s->n_kv * s->head_dim;
    const size_t din[4] = {s->d_model, s->d_model, s->d_model, s->dq};
    const size_t dout[4] = {s->dq, s->dkv, s->dkv, s->d_model};
    for (int p = 0; p < 4; p++) {
        s->din[p] = din[p];
        s->dout[p] = dout[p];
        size_t a = 0, b = 0;
        CALL(masa_layer_projection_shape(l, p, &a, &b));
        REQUIRE(a == din[p] && b == dout[p],
                "projection %d: %zu x %zu, masa.h says %zu x %zu", p, a, b,
                din[p], dout[p]);
        REQUIRE(masa_layer_weight(l, p) == NULL && masa_layer_bias(l, p) == NULL,
                "new layer has a weight or bias");
    }
    if (!tame_scale)
        s->tame = 0;
}

/* A projection index, now and then out of range. */
static masa_projection which_of(reader *r)
{
    static const int bad[] = {-1, 4, 100, -100000};
    if (chance(r, 6))
        return (masa_projection)bad[pick(r, 4)];
    return (masa_projection)pick(r, 4);
}

static int valid_which(masa_projection w)
{
    return (int)w >= 0 && (int)w < 4;
}

/* forced >= 0: make projection `forced` a valid MASA projection (creating a
 * fitting dictionary and table when needed); else a fuzzed call. */
static void op_set_masa(reader *r, state *s, int forced)
{
    if (!s->layer)
        return;
    int make_fit = forced >= 0;
    masa_projection w = make_fit ? (masa_projection)forced : which_of(r);
    int di = -1, ci = -1;
    if (make_fit && valid_which(w)) {
        /* find or create a fitting dictionary and table */
        for (size_t i = 0; i < s->n_dicts; i++)
            if (s->dicts[i].rows == s->din[w] && s->dicts[i].cols == s->dout[w])
                di = (int)i;
        if (di < 0 && s->n_dicts < MAX_DICTS) {
            masa_dictionary *d;
            size_t n = 1 + pick(r, 4);
            if (CALL(masa_dictionary_create(s->ctx, n, s->din[w], s->dout[w],
                                            &d)) != MASA_OK)
                return;
            CALL(masa_dictionary_init_uniform(d, 0.0f, u64(r)));
            di = (int)s->n_dicts;
            s->dicts[s->n_dicts++] = (dict_slot){d, n, s->din[w], s->dout[w]};
        }
        if (di < 0)
            return;
        for (size_t i = 0; i < s->n_coefs; i++)
            if (s->coefs[i].n_atoms == s->dicts[di].n_atoms)
                ci = (int)i;
        if (ci < 0 && s->n_coefs < MAX_COEFS) {
            masa_coefficients *c;
            size_t nl = 1 + pick(r, 4);
            if (CALL(masa_coefficients_create(s->ctx, nl, s->dicts[di].n_atoms,
                                              &c)) != MASA_OK)
                return;
            CALL(masa_coefficients_init_cyclic(c));
            CALL(masa_coefficients_add_uniform(c, 0.25f, u64(r)));
            ci = (int)s->n_coefs;
            s->coefs[s->n_coefs++] =
                (coef_slot){c, nl, s->dicts[di].n_atoms};
        }
        if (ci < 0)
            return;
    } else {
        if (s->n_dicts && !chance(r, 5))
            di = (int)pick(r, s->n_dicts);
        if (s->n_coefs && !chance(r, 5))
            ci = (int)pick(r, s->n_coefs);
    }
    size_t li = ci >= 0 ? pick(r, s->coefs[ci].n_layers + (make_fit ? 0 : 2))
                        : 0;
    masa_status st = CALL(masa_layer_set_masa(
        chance(r, 3) && !make_fit ? NULL : s->layer, w, di >= 0 ? s->dicts[di].d : NULL,
        ci >= 0 ? s->coefs[ci].c : NULL, li));
    int valid = valid_which(w) && di >= 0 && ci >= 0 &&
                s->dicts[di].rows == s->din[w] &&
                s->dicts[di].cols == s->dout[w] &&
                s->coefs[ci].n_atoms == s->dicts[di].n_atoms &&
                li < s->coefs[ci].n_layers;
    if (st != MASA_OK) {
        /* under MASA_WEIGHTS_CACHED set_masa allocates the composed W */
        REQUIRE(!valid || st == MASA_ERROR_NULL_ARGUMENT ||
                    (s->hooked && st == MASA_ERROR_OUT_OF_MEMORY),
                "valid set_masa rejected");
        return;
    }
    REQUIRE(valid, "bad set_masa accepted");
    proj_model *pm = &s->proj[w];
    pm->set = 1;
    pm->is_masa = 1;
    pm->dict = di;
    pm->coef = ci;
    pm->layer_index = li;
    REQUIRE(masa_layer_weight(s->layer, w) == NULL,
            "MASA projection has a dense weight");
}

static void op_set_dense(reader *r, state *s, int forced)
{
    if (!s->layer)
        return;
    int make_fit = forced >= 0;
    masa_projection w = make_fit ? (masa_projection)forced : which_of(r);
    float *weight = NULL;
    if (valid_which(w) && chance(r, 50)) {
        weight = own(s->din[w] * s->dout[w] * sizeof(float));
        if (!weight)
            return;
        fill(r, weight, s->din[w] * s->dout[w], &s->tame);
    }
    masa_status st =
        CALL(masa_layer_set_dense(chance(r, 3) && !make_fit ? NULL : s->layer,
                                  w, weight));
    if (st != MASA_OK) {
        REQUIRE(!valid_which(w) || st == MASA_ERROR_NULL_ARGUMENT ||
                    (s->hooked && st == MASA_ERROR_OUT_OF_MEMORY),
                "valid set_dense rejected");
        return;
    }
    REQUIRE(valid_which(w), "set_dense with bad projection accepted");
    float *got = masa_layer_weight(s->layer, w);
    REQUIRE(got && (!weight || got == weight), "dense weight pointer");
    if (!weight) { /* library-owned, zeroed: give it values */
        for (size_t i = 0; i < s->din[w] * s->dout[w]; i++)
            REQUIRE(got[i] == 0.0f, "owned weight not zeroed");
        fill(r, got, s->din[w] * s->dout[w], &s->tame);
    }
    proj_model *pm = &s->proj[w];
    pm->set = 1;
    pm->is_masa = 0;
}

static void op_bias(reader *r, state *s)
{
    if (!s->layer)
        return;
    masa_projection w = which_of(r);
    masa_layer *l = chance(r, 3) ? NULL : s->layer;
    if (chance(r, 30)) {
        masa_status st = CALL(masa_layer_remove_bias(l, w));
        REQUIRE((st == MASA_OK) == (l && valid_which(w)), "remove_bias");
        if (st == MASA_OK) {
            s->proj[w].has_bias = 0;
            REQUIRE(masa_layer_bias(l, w) == NULL, "bias after removal");
        }
        return;
    }
    float *b = NULL;
    if (valid_which(w) && chance(r, 50)) {
        b = own(s->dout[w] * sizeof(float));
        if (!b)
            return;
        fill(r, b, s->dout[w], &s->tame);
    }
    masa_status st = CALL(masa_layer_set_bias(l, w, b));
    if (st != MASA_OK) {
        REQUIRE(!l || !valid_which(w) ||
                    (s->hooked && st == MASA_ERROR_OUT_OF_MEMORY),
                "valid set_bias rejected");
        return;
    }
    REQUIRE(l && valid_which(w), "bad set_bias accepted");
    float *got = masa_layer_bias(l, w);
    REQUIRE(got && (!b || got == b), "bias pointer");
    if (!b)
        fill(r, got, s->dout[w], &s->tame);
    s->proj[w].has_bias = 1;
}

/* A low-rank term A B: set (rank 0..min(d_in, d_out) + 1, factors owned or
 * caller memory) or removed; the accessor must agree. */
static void op_lowrank(reader *r, state *s, int forced)
{
    if (!s->layer)
        return;
    int make_fit = forced >= 0;
    masa_projection w = make_fit ? (masa_projection)forced : which_of(r);
    masa_layer *l = chance(r, 3) && !make_fit ? NULL : s->layer;
    if (!make_fit && chance(r, 25)) {
        masa_status st = CALL(masa_layer_remove_lowrank(l, w));
        REQUIRE((st == MASA_OK) == (l && valid_which(w)), "remove_lowrank");
        if (st == MASA_OK)
            s->proj[w].rank = 0;
        return;
    }
    size_t most = 0;
    if (valid_which(w))
        most = s->din[w] < s->dout[w] ? s->din[w] : s->dout[w];
    size_t rank = make_fit ? 1 + pick(r, most) : pick(r, most + 2);
    float *a = NULL, *b = NULL;
    if (valid_which(w) && rank && rank <= most && chance(r, 50)) {
        a = own(s->din[w] * rank * sizeof(float));
        b = own(rank * s->dout[w] * sizeof(float));
        if (!a || !b)
            return;
        fill(r, a, s->din[w] * rank, &s->tame);
        fill(r, b, rank * s->dout[w], &s->tame);
    }
    masa_status st = CALL(masa_layer_set_lowrank(l, w, rank, a, b));
    int valid = l && valid_which(w) && rank >= 1 && rank <= most;
    if (st != MASA_OK) {
        REQUIRE(!valid || (s->hooked && st == MASA_ERROR_OUT_OF_MEMORY),
                "valid set_lowrank rejected");
        return;
    }
    REQUIRE(valid, "bad set_lowrank accepted (rank %zu of %zu)", rank, most);
    size_t got_rank = 0;
    float *ga = NULL, *gb = NULL;
    REQUIRE(CALL(masa_layer_lowrank(l, w, &got_rank, &ga, &gb)) == MASA_OK &&
                got_rank == rank && ga && gb && (!a || (ga == a && gb == b)),
            "lowrank accessor");
    if (!a) { /* library-owned, zeroed: give them values */
        for (size_t i = 0; i < s->din[w] * rank; i++)
            REQUIRE(ga[i] == 0.0f, "owned A not zeroed");
        for (size_t i = 0; i < rank * s->dout[w]; i++)
            REQUIRE(gb[i] == 0.0f, "owned B not zeroed");
        fill(r, ga, s->din[w] * rank, &s->tame);
        fill(r, gb, rank * s->dout[w], &s->tame);
    }
    s->proj[w].rank = rank;
    /* a cached MASA weight was composed with the factors as they were */
    if (!a && chance(r, 80))
        REQUIRE(CALL(masa_layer_refresh_weights(l)) == MASA_OK, "refresh");
}

/* Weight policy: 0 and 1 are valid, 2 and 3 not; now and then a refresh.
 * Forward and backward then read cached weights, which the checks below
 * (calls compared with each other) treat as any other weights. */
static void op_policy(reader *r, state *s)
{
    if (!s->layer)
        return;
    masa_layer *l = chance(r, 3) ? NULL : s->layer;
    if (chance(r, 30)) {
        masa_status st = CALL(masa_layer_refresh_weights(l));
        REQUIRE((st == MASA_OK) == (l != NULL), "refresh_weights");
        return;
    }
    unsigned v = u8(r) % 4;
    masa_status st =
        CALL(masa_layer_set_weight_policy(l, (masa_weight_policy)v));
    if (!l || v > 1) {
        REQUIRE(st == (!l ? MASA_ERROR_NULL_ARGUMENT
                          : MASA_ERROR_INVALID_ARGUMENT),
                "set_weight_policy(%p, %u)", (void *)l, v);
        return;
    }
    REQUIRE(st == MASA_OK || (s->hooked && st == MASA_ERROR_OUT_OF_MEMORY),
            "valid set_weight_policy rejected");
    masa_weight_policy got;
    REQUIRE(CALL(masa_layer_weight_policy(l, &got)) == MASA_OK,
            "weight_policy");
    REQUIRE(st != MASA_OK || got == (masa_weight_policy)v,
            "policy read back");
}

/* masa_*_default(ptr, size) into a buffer of exactly `size` bytes: the
 * first size bytes get the defaults (what the _init macro gives a full
 * struct), bytes past the library's struct are zeroed, the size field is
 * `size`; nothing happens for NULL or size < sizeof(size_t). */
static void op_struct_defaults(reader *r)
{
    masa_context_options co;
    masa_layer_options lo;
    masa_layer_grads go;
    masa_context_options_init(&co);
    masa_layer_options_init(&lo);
    masa_layer_grads_init(&go);
    const void *full[3] = {&co, &lo, &go};
    const size_t known[3] = {sizeof co, sizeof lo, sizeof go};
    int kind = (int)pick(r, 3);
    size_t size;
    switch (pick(r, 5)) {
    case 0:
        size = pick(r, sizeof(size_t)); /* too small: untouched */
        break;
    case 1:
        size = known[kind] - 1 - pick(r, known[kind] - sizeof(size_t));
        break;
    case 2:
        size = known[kind] + pick(r, 64);
        break;
    default:
        size = known[kind];
        break;
    }
    unsigned char *b = own(size);
    if (!b)
        return;
    memset(b, 0xAB, size ? size : 1);
    void *arg = chance(r, 5) ? NULL : b;
    if (kind == 0)
        masa_context_options_default(arg, size);
    else if (kind == 1)
        masa_layer_options_default(arg, size);
    else
        masa_layer_grads_default(arg, size);
    const unsigned char *want = full[kind];
    for (size_t i = 0; i < size; i++) {
        unsigned char expect;
        if (!arg || size < sizeof(size_t))
            expect = 0xAB;
        else if (i < sizeof(size_t))
            expect = ((const unsigned char *)&size)[i];
        else if (i < known[kind])
            expect = want[i];
        else
            expect = 0;
        REQUIRE(b[i] == expect, "struct %d defaults, size %zu: byte %zu is "
                                "0x%02x, want 0x%02x", kind, size, i, b[i],
                expect);
    }
}

static void op_queries(reader *r, state *s)
{
    masa_projection w = which_of(r);
    size_t a, b;
    masa_status st = CALL(masa_layer_projection_shape(
        chance(r, 20) ? NULL : s->layer, w, chance(r, 20) ? NULL : &a,
        chance(r, 20) ? NULL : &b));
    if (!s->layer || !valid_which(w))
        REQUIRE(st != MASA_OK, "projection_shape accepted a bad call");
    if (!valid_which(w)) {
        REQUIRE(masa_layer_weight(s->layer, w) == NULL, "weight of bad index");
        REQUIRE(masa_layer_bias(s->layer, w) == NULL, "bias of bad index");
    }
    REQUIRE(masa_status_string((masa_status)(int)u16(r)) != NULL,
            "status string");
    REQUIRE(masa_last_error() != NULL, "last error NULL");
    REQUIRE(masa_version_number() == MASA_VERSION_NUMBER, "version number");
    REQUIRE(strcmp(masa_version_string(), MASA_VERSION_STRING) == 0,
            "version string");
    REQUIRE(masa_context_threads(NULL) == 0, "threads of NULL");
    REQUIRE(masa_context_threads(s->ctx) == s->n_threads, "threads");
    masa_layer_destroy(NULL);
    masa_dictionary_destroy(NULL);
    masa_coefficients_destroy(NULL);
    masa_context_destroy(NULL);
    op_struct_defaults(r);
    REQUIRE(masa_dictionary_data(NULL) == NULL, "data of NULL");
    REQUIRE(masa_coefficients_data(NULL) == NULL, "data of NULL");
    if (s->layer) { /* huge batch and seq: overflow or a size, never a crash */
        size_t batch = chance(r, 50) ? SIZE_MAX >> pick(r, 64) : pick(r, 9);
        size_t seq = chance(r, 50) ? SIZE_MAX >> pick(r, 64) : pick(r, 9);
        size_t bytes;
        CALL(masa_layer_workspace_size(s->layer, batch, seq, &bytes));
        CALL(masa_layer_reserve_size(s->layer, batch, seq, &bytes));
        REQUIRE(CALL(masa_layer_workspace_size(s->layer, 1, 1, NULL)) ==
                    MASA_ERROR_NULL_ARGUMENT,
                "workspace_size(NULL)");
    }
}

/* ---------------------------------------------------------------------- */
/* forward and backward                                                   */

static int layer_ready(const state *s)
{
    for (int p = 0; p < 4; p++)
        if (!s->proj[p].set && !s->proj[p].rank)
            return 0;
    return 1;
}

static int all_finite(const float *a, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!isfinite(a[i]))
            return 0;
    return 1;
}

/* A buffer of `claim` bytes, aligned or (misaligned) one byte off. */
static void *byte_buffer(size_t claim, int misaligned, unsigned char fillc)
{
    unsigned char *b = own(claim + 1);
    if (!b)
        return NULL;
    memset(b, fillc, claim + 1);
    return b + (misaligned ? 1 : 0);
}

/* Size to claim for a buffer the library needs `need` bytes of. */
static size_t claim_bytes(reader *r, size_t need, int *short_claim)
{
    *short_claim = 0;
    switch (pick(r, 10)) {
    case 0:
        *short_claim = need > 0;
        return need ? need - 1 - pick(r, need < 8 ? need : 8) % need : 0;
    case 1:
        return need + 1 + pick(r, 64);
    default:
        return need;
    }
}

/* A position for `seq` tokens: mostly small, now and then at the edges
 * masa.h documents (the last token at MASA_MAX_POSITION or one beyond,
 * pos_offset + seq at SIZE_MAX or one beyond, 2^53 where doubles stop
 * counting), or any 64-bit value (tests/fuzz/fuzz_api.dict holds them). */
static size_t position(reader *r, size_t seq)
{
    if (chance(r, 80))
        return pick(r, 100);
    size_t v = pick(r, 100);
    if (v < 50)
        return SIZE_MAX - v;
    const size_t edge[] = {MASA_MAX_POSITION - seq + 1,
                           MASA_MAX_POSITION - seq + 2,
                           MASA_MAX_POSITION,
                           (size_t)MASA_MAX_POSITION + 1,
                           SIZE_MAX - seq,
                           SIZE_MAX - seq + 1,
                           (size_t)1 << 53,
                           ((size_t)1 << 53) + 1,
                           (size_t)1 << 63};
    size_t n_edge = sizeof edge / sizeof edge[0];
    return v - 50 < n_edge ? edge[v - 50] : (size_t)u64(r);
}

/* What masa.h promises about positions: pos_offset + seq within size_t,
 * and with RoPE the last token at most at MASA_MAX_POSITION. */
static int position_ok(const state *s, size_t pos, size_t seq)
{
    if (seq > SIZE_MAX - pos)
        return 0;
    return !s->rope || seq == 0 || pos + seq - 1 <= MASA_MAX_POSITION;
}

static void op_run(reader *r, state *s)
{
    if (!s->layer)
        return;
    const masa_layer *layer = chance(r, 4) ? NULL : s->layer;
    size_t batch = pick(r, 4), seq = pick(r, 9);
    if (chance(r, 4))
        seq = 64 + pick(r, 7); /* two query tiles */
    size_t pos = position(r, seq);
    size_t bt = batch * seq, n_act = bt * s->d_model;
    size_t ws_need = 0, rs_need = 0;
    masa_status st1 = CALL(masa_layer_workspace_size(s->layer, batch, seq,
                                                     &ws_need));
    masa_status st2 = CALL(masa_layer_reserve_size(s->layer, batch, seq,
                                                   &rs_need));
    REQUIRE((st1 == MASA_OK) == (bt > 0) && (st2 == MASA_OK) == (bt > 0),
            "buffer sizes for batch %zu seq %zu", batch, seq);
    if (bt > 0)
        REQUIRE(ws_need >= sizeof(float) && rs_need >= sizeof(float),
                "zero-sized buffers");
    int ws_short, rs_short;
    size_t ws_claim = claim_bytes(r, ws_need, &ws_short);
    size_t rs_claim = claim_bytes(r, rs_need, &rs_short);
    int misaligned = chance(r, 4);
    int inference = chance(r, 20);
    void *ws = byte_buffer(ws_claim, misaligned && chance(r, 50), 0xFF);
    void *rs = inference ? NULL
                         : byte_buffer(rs_claim, misaligned && chance(r, 50),
                                       0xFF);
    int ws_mis = ws && ((uintptr_t)ws % sizeof(float)) != 0;
    int rs_mis = rs && ((uintptr_t)rs % sizeof(float)) != 0;
    if (!ws || (!inference && !rs))
        return;

    /* x and y, maybe overlapping */
    float *x = own((n_act ? n_act : 1) * sizeof(float) * 2);
    float *y = own((n_act ? n_act : 1) * sizeof(float));
    if (!x || !y)
        return;
    fill(r, x, n_act, &s->tame);
    int overlap = chance(r, 4) && n_act > 0;
    float *y_arg = y;
    if (overlap) /* y inside x's allocation (2 n_act floats), overlapping x */
        y_arg = x + pick(r, n_act);
    for (size_t i = 0; i < n_act; i++)
        y[i] = 123.0f;
    int null_x = chance(r, 3), null_y = chance(r, 3), null_ws = chance(r, 3);
    TRACE("run: batch %zu seq %zu pos %zu tame %d inference %d\n", batch, seq,
          pos, s->tame, inference);
    for (int p = 0; p < 4; p++)
        TRACE("  proj %d: set %d masa %d bias %d dict %d coef %d row %zu "
              "rank %zu\n", p, s->proj[p].set, s->proj[p].is_masa,
              s->proj[p].has_bias, s->proj[p].dict, s->proj[p].coef,
              s->proj[p].layer_index, s->proj[p].rank);
    const float *x_arg = null_x ? NULL : x;
    masa_status st = CALL(masa_layer_forward(
        layer, batch, seq, pos, x_arg, null_y ? NULL : y_arg,
        null_ws ? NULL : ws, ws_claim, rs, rs_claim));
    int valid = layer && !null_x && !null_y && !null_ws && layer_ready(s) &&
                bt > 0 && !ws_short && (inference || !rs_short) && !ws_mis &&
                !rs_mis && !overlap && position_ok(s, pos, seq);
    if (st != MASA_OK) {
        REQUIRE(!valid, "valid forward rejected: %s", masa_status_string(st));
        if (!overlap)
            for (size_t i = 0; i < n_act; i++)
                REQUIRE(y[i] == 123.0f, "failed forward wrote y");
        return;
    }
    REQUIRE(valid, "forward accepted a bad call (ready %d, bt %zu, ws short "
                   "%d, rs short %d, misaligned %d/%d, position %zu + %zu)",
            layer_ready(s), bt, ws_short, rs_short, ws_mis, rs_mis, pos, seq);
    n_fwd_ok++;
    if (s->tame) {
        n_fwd_tame++;
        REQUIRE(all_finite(y, n_act), "tame forward gave non-finite y");
        /* again with a zeroed workspace, training if that was inference and
         * the other way round (the reserve of a training run is kept) */
        memset(ws, 0, ws_claim);
        float *y2 = own(n_act * sizeof(float));
        void *rs2 = inference ? own(rs_need) : NULL;
        if (y2 && (!inference || rs2)) {
            REQUIRE(CALL(masa_layer_forward(s->layer, batch, seq, pos, x, y2,
                                            ws, ws_claim, rs2, rs_need)) ==
                        MASA_OK,
                    "second forward failed");
            REQUIRE(memcmp(y, y2, n_act * sizeof(float)) == 0,
                    "forward depends on workspace contents or on the reserve");
        }
    }
    if (inference || chance(r, 15))
        return;

    /* backward on the reserve the forward filled */
    float *dy = own(n_act * sizeof(float));
    int dx_mode = (int)pick(r, 6); /* 0: NULL, 1: dx is dy, else its own */
    int dx_alias = chance(r, 5);   /* a gradient buffer is dx */
    /* dx may stand in for a gradient buffer: large enough for any */
    size_t dx_floats = n_act + (dx_alias ? 40000 : 0);
    float *dx = own(dx_floats * sizeof(float));
    if (!dy || !dx)
        return;
    fill(r, dy, n_act, &s->tame);
    for (size_t i = 0; i < dx_floats; i++)
        dx[i] = 321.0f;

    masa_layer_grads g;
    masa_layer_grads_init(&g);
    int tail_nonzero, size_valid;
    size_t claim = struct_size(r, sizeof g, &tail_nonzero, &size_valid);
    /* exactly the size of the struct before the low-rank fields: an older
     * program's, accepted; the library does not see those fields */
    int old_struct = claim == offsetof(masa_layer_grads, d_lowrank_a);
    if (old_struct)
        size_valid = 1;
    int bad_grads = 0;
    g.mode = chance(r, 40) ? MASA_GRAD_SET : MASA_GRAD_ADD;
    if (chance(r, 5)) {
        g.mode = 2 + (int)pick(r, 3) - 5 * (int)pick(r, 2);
        bad_grads = 1;
    }
    enum { NG = 6 }; /* atoms, coefficients, weight, bias, lowrank a, b */
    size_t gsize[4][NG] = {{0}}; /* floats of each gradient buffer */
    for (int p = 0; p < 4; p++) {
        const proj_model *pm = &s->proj[p];
        size_t n_atoms_f = 0, n_coef_f = 0;
        if (pm->is_masa) {
            const dict_slot *d = &s->dicts[pm->dict];
            const coef_slot *c = &s->coefs[pm->coef];
            n_atoms_f = d->n_atoms * d->rows * d->cols;
            n_coef_f = c->n_layers * c->n_atoms;
        }
        size_t n_w = s->din[p] * s->dout[p], n_b = s->dout[p];
        int dense = pm->set && !pm->is_masa;
        /* wanted gradients; now and then one that does not apply */
        if (pm->is_masa && chance(r, 60))
            gsize[p][0] = n_atoms_f;
        if (pm->is_masa && chance(r, 60))
            gsize[p][1] = n_coef_f;
        if (dense && chance(r, 60))
            gsize[p][2] = n_w;
        if (pm->has_bias && chance(r, 60))
            gsize[p][3] = n_b;
        if (pm->rank && !old_struct && chance(r, 60))
            gsize[p][4] = s->din[p] * pm->rank;
        if (pm->rank && !old_struct && chance(r, 60))
            gsize[p][5] = pm->rank * s->dout[p];
        if (chance(r, 3)) {
            int k = (int)pick(r, old_struct ? 4 : NG);
            int applies = k == 0 || k == 1 ? pm->is_masa
                          : k == 2        ? dense
                          : k == 3        ? pm->has_bias
                                          : pm->rank > 0;
            if (!applies) {
                gsize[p][k] = 1 + pick(r, 8);
                bad_grads = 1;
            }
        }
    }
    float **slots[NG] = {g.d_atoms, g.d_coefficients, g.d_weight, g.d_bias,
                         g.d_lowrank_a, g.d_lowrank_b};
    for (int p = 0; p < 4; p++)
        for (int k = 0; k < NG; k++)
            if (gsize[p][k]) {
                float *b = own(gsize[p][k] * sizeof(float));
                if (!b)
                    return;
                slots[k][p] = b; /* zeroed by own() */
            }
    /* Now and then two gradients share one buffer (as large as the larger)
     * or a gradient buffer is dx: refused when dx is passed. */
    int alias_grads = 0, alias_dx = 0;
    if (chance(r, 8) || dx_alias) {
        int pa = -1, ka = -1, pb = -1, kb = -1;
        for (int p = 0; p < 4; p++)
            for (int k = 0; k < NG; k++)
                if (slots[k][p]) {
                    if (pa < 0) {
                        pa = p;
                        ka = k;
                    } else if (pb < 0) {
                        pb = p;
                        kb = k;
                    }
                }
        if (pa >= 0 && dx_alias) {
            slots[ka][pa] = dx;
            gsize[pa][ka] = dx_floats;
            alias_dx = 1;
        } else if (pb >= 0) {
            size_t n = gsize[pa][ka] > gsize[pb][kb] ? gsize[pa][ka]
                                                      : gsize[pb][kb];
            float *shared = own(n * sizeof(float));
            if (!shared)
                return;
            slots[ka][pa] = slots[kb][pb] = shared;
            gsize[pa][ka] = gsize[pb][kb] = n;
            alias_grads = 1;
        }
    }
    /* snapshot of the gradient buffers, to check a failed call */
    float *snap[4][NG] = {{NULL}};
    for (int p = 0; p < 4; p++)
        for (int k = 0; k < NG; k++)
            if (slots[k][p]) {
                snap[p][k] = own(gsize[p][k] * sizeof(float));
                if (!snap[p][k])
                    return;
                memcpy(snap[p][k], slots[k][p], gsize[p][k] * sizeof(float));
            }

    masa_layer_grads *garg = struct_buffer(&g, sizeof g, claim, tail_nonzero);
    if (!garg)
        return;
    int null_grads = chance(r, 10);
    float *dx_arg = dx_mode == 0 ? NULL : dx;
    float *dy_arg = dx_mode == 1 ? dx : dy; /* dx == dy: refused */
    int bs_short;
    size_t ws_claim_b = claim_bytes(r, ws_need, &bs_short);
    if (ws_claim_b > ws_claim) /* never claim more than was allocated */
        ws_claim_b = ws_claim;
    /* the reserve must come from a forward with the same batch, seq and
     * pos_offset (a zeroed buffer or another position is refused) */
    void *rs_arg = rs;
    size_t batch_b = batch, seq_b = seq, pos_b = pos;
    int stamp_ok = 1;
    switch (pick(r, 16)) {
    case 0:
        rs_arg = own(rs_claim);
        stamp_ok = 0;
        break;
    case 1:
        pos_b = pos + 1;
        stamp_ok = 0;
        break;
    case 2: /* fewer tokens: the reserve is large enough, but not theirs */
        if (seq > 1) {
            seq_b = seq - 1;
            stamp_ok = 0;
        }
        break;
    }
    int null_layer = chance(r, 4), null_x2 = chance(r, 4);
    int null_dy = chance(r, 4), null_ws2 = chance(r, 4), null_rs = chance(r, 4);
    masa_layer_grads *grads_arg = null_grads ? NULL : garg;
    st = CALL(masa_layer_backward(
        null_layer ? NULL : s->layer, batch_b, seq_b, pos_b,
        null_x2 ? NULL : x, null_dy ? NULL : dy_arg, dx_arg, grads_arg,
        null_ws2 ? NULL : ws, ws_claim_b, null_rs ? NULL : rs_arg, rs_claim));
    int grads_ok = null_grads ||
                   (!bad_grads && size_valid && !alias_grads &&
                    !(alias_dx && dx_arg));
    int bvalid = !null_layer && !null_x2 && !null_dy && !null_ws2 &&
                 !null_rs && grads_ok && dx_mode != 1 &&
                 ws_claim_b >= ws_need && stamp_ok &&
                 position_ok(s, pos_b, seq_b);
    if (st != MASA_OK) {
        if (dx_mode != 1 && !alias_dx)
            for (size_t i = 0; i < dx_floats; i++)
                REQUIRE(dx[i] == 321.0f, "failed backward wrote dx");
        for (int p = 0; p < 4; p++)
            for (int k = 0; k < NG; k++)
                if (snap[p][k])
                    REQUIRE(memcmp(snap[p][k], slots[k][p],
                                   gsize[p][k] * sizeof(float)) == 0,
                            "failed backward wrote gradient %d of %d", k, p);
        REQUIRE(!bvalid, "valid backward rejected: %s",
                masa_status_string(st));
        n_bwd_refused++;
        return;
    }
    REQUIRE(bvalid, "backward accepted a bad call (bad grads %d, size valid "
                    "%d, aliases %d/%d, dx mode %d, ws %zu < %zu, stamp %d)",
            bad_grads, size_valid, alias_grads, alias_dx, dx_mode, ws_claim_b,
            ws_need, stamp_ok);
    n_bwd_ok++;
    if (s->tame && dx_arg && !alias_dx) {
        n_bwd_tame++;
        REQUIRE(all_finite(dx, n_act), "tame backward gave non-finite dx");
    }
}

/* A whole ready layer in one go, so most inputs reach forward/backward. */
static void op_build(reader *r, state *s)
{
    if (!s->layer || chance(r, 20))
        op_layer_create(r, s);
    if (!s->layer)
        return;
    for (int p = 0; p < 4; p++) {
        if (s->proj[p].set && chance(r, 50))
            continue;
        if (chance(r, 50))
            op_set_masa(r, s, p);
        else
            op_set_dense(r, s, p);
    }
    /* now and then low-rank terms: on a base, or alone on an unset one */
    for (int p = 0; p < 4; p++)
        if (chance(r, 15))
            op_lowrank(r, s, p);
    /* fill whatever is still unset (and without a term) with dense weights */
    for (int p = 0; p < 4; p++)
        if (!s->proj[p].set && !s->proj[p].rank &&
            CALL(masa_layer_set_dense(s->layer, p, NULL)) == MASA_OK) {
            fill(r, masa_layer_weight(s->layer, p), s->din[p] * s->dout[p],
                 &s->tame);
            s->proj[p].set = 1;
            s->proj[p].is_masa = 0;
        }
}

/* ---------------------------------------------------------------------- */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    reader r = {data, size};
    n_inputs++;
    state s;
    memset(&s, 0, sizeof s);
    s.tame = 1;
    hook = (hook_state){0, -1, 0};
    rng_state = u64(&r);
    make_context(&r, &s);

    for (int op = 0; op < 32 && r.n > 0; op++) {
        switch (pick(&r, 15)) {
        case 0:
            op_dict_create(&r, &s);
            break;
        case 1:
            op_coef_create(&r, &s);
            break;
        case 2:
            op_init(&r, &s);
            break;
        case 3:
            op_compose(&r, &s);
            break;
        case 4:
            op_layer_create(&r, &s);
            break;
        case 5:
            op_set_masa(&r, &s, -1);
            break;
        case 6:
            op_set_dense(&r, &s, -1);
            break;
        case 7:
            op_bias(&r, &s);
            break;
        case 8:
            op_queries(&r, &s);
            break;
        case 9:
        case 10:
            op_build(&r, &s);
            break;
        case 11:
            op_policy(&r, &s);
            break;
        case 12:
            op_lowrank(&r, &s, -1);
            break;
        default:
            op_run(&r, &s);
            break;
        }
    }

    /* layers first, then what they point to, then the context */
    forget_layer(&s);
    for (size_t i = 0; i < s.n_dicts; i++)
        masa_dictionary_destroy(s.dicts[i].d);
    for (size_t i = 0; i < s.n_coefs; i++)
        masa_coefficients_destroy(s.coefs[i].c);
    if (s.own_ctx)
        masa_context_destroy(s.ctx);
    REQUIRE(hook.live == 0, "%ld blocks from the allocator hook leaked",
            hook.live);
    free_blocks();
    return 0;
}
