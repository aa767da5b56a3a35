/* A fixed pool of worker threads owned by a context. One call runs at a
 * time: workers and the caller take task indices from a shared counter, so
 * uneven tasks balance themselves. A caller that finds the pool busy runs its
 * tasks alone instead of waiting (see "Threads" in masa.h).
 *
 * Idle threads poll for SPIN_NS before they sleep on a condition variable:
 * a layer makes a dozen calls of a few hundred microseconds each, and waking
 * a sleeping thread costs tens of microseconds (more in a virtual machine).
 * Polling stops after SPIN_NS, so a pool idle between calls costs no CPU.
 *
 * A call returns as soon as every task is done, without waiting for workers
 * that never woke up for it: on a loaded machine a woken worker can wait
 * milliseconds for a core, and waiting for all of them made every call cost
 * that much. A late worker cannot take a task of a call that has returned:
 * the counter it claims from carries the call's generation.
 *
 * In a child process made by fork() the workers do not exist: a pool made
 * before the fork runs everything on the calling thread (fork.c). */
#include <pthread.h>
#include <stdatomic.h>
#include <time.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#elif defined(__aarch64__)
#define cpu_relax() __asm__ __volatile__("yield")
#else
#define cpu_relax() ((void)0)
#endif

#include "common/internal.h"

struct masa_pool {
    size_t n_threads;        /* workers + the calling thread */
    uint64_t epoch;          /* masa__fork_epoch() at creation */
    pthread_t *workers;
    size_t n_started;
    pthread_mutex_t busy;    /* held by the call that owns the pool */
    pthread_mutex_t lock;    /* protects the fields below */
    pthread_cond_t wake, done;
    /* bumped for every call, under the lock; polled without it */
    _Atomic uint32_t generation;
    size_t sleeping;         /* workers waiting on `wake` */
    bool stop;
    /* the current call */
    masa_task_fn task;
    void *arg;
    size_t n_tasks;
    /* generation << 32 | next task index of the current call */
    _Atomic uint64_t next;
    atomic_size_t finished;  /* tasks of the current call completed */
};

#define SPIN_NS 100000 /* 0.1 ms */

static uint64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

/* Polls until a new call is published or SPIN_NS have passed. */
static void spin_for_call(masa_pool *pool, uint32_t seen)
{
    uint64_t start = now_ns();
    for (unsigned i = 1;; i++) {
        if (atomic_load_explicit(&pool->generation, memory_order_relaxed) !=
            seen)
            return;
        cpu_relax();
        if (i % 64 == 0 && now_ns() - start > SPIN_NS)
            return;
    }
}

/* Polls until the call's n_tasks are done or SPIN_NS have passed. */
static void spin_for_done(masa_pool *pool, size_t n_tasks)
{
    uint64_t start = now_ns();
    for (unsigned i = 1;; i++) {
        if (atomic_load(&pool->finished) >= n_tasks)
            return;
        cpu_relax();
        if (i % 64 == 0 && now_ns() - start > SPIN_NS)
            return;
    }
}

typedef struct worker_start {
    masa_pool *pool;
    size_t index;
} worker_start;

/* Runs tasks of call `gen` until none is left (or the call is over). */
static void run_tasks(masa_pool *pool, uint32_t gen, masa_task_fn task,
                      void *arg, size_t n_tasks, size_t thread)
{
    uint64_t cur = atomic_load(&pool->next);
    for (;;) {
        if ((uint32_t)(cur >> 32) != gen || (cur & 0xffffffffu) >= n_tasks)
            return;
        if (!atomic_compare_exchange_weak(&pool->next, &cur, cur + 1))
            continue; /* cur now holds the new value */
        task(arg, (size_t)(cur & 0xffffffffu), thread);
        if (atomic_fetch_add(&pool->finished, 1) + 1 == n_tasks) {
            /* under the lock, so the caller cannot miss the signal */
            pthread_mutex_lock(&pool->lock);
            pthread_cond_signal(&pool->done);
            pthread_mutex_unlock(&pool->lock);
        }
        cur = atomic_load(&pool->next);
    }
}

static void *worker_main(void *p)
{
    masa_pool *pool = ((worker_start *)p)->pool;
    size_t index = ((worker_start *)p)->index;
    uint32_t seen = 0;
    for (;;) {
        spin_for_call(pool, seen);
        /* the call's fields are read under the lock they were written in */
        pthread_mutex_lock(&pool->lock);
        while (!pool->stop && atomic_load(&pool->generation) == seen) {
            pool->sleeping++;
            pthread_cond_wait(&pool->wake, &pool->lock);
            pool->sleeping--;
        }
        if (pool->stop)
            break;
        seen = atomic_load(&pool->generation);
        masa_task_fn task = pool->task;
        void *arg = pool->arg;
        size_t n_tasks = pool->n_tasks;
        pthread_mutex_unlock(&pool->lock);
        run_tasks(pool, seen, task, arg, n_tasks, index);
    }
    pthread_mutex_unlock(&pool->lock);
    return NULL;
}

/* Worker start arguments live in one array freed with the pool. */
typedef struct pool_block {
    masa_pool pool;
    worker_start starts[];
} pool_block;

static void stop_workers(masa_pool *pool)
{
    pthread_mutex_lock(&pool->lock);
    pool->stop = true;
    pthread_cond_broadcast(&pool->wake);
    pthread_mutex_unlock(&pool->lock);
    for (size_t i = 0; i < pool->n_started; i++)
        pthread_join(pool->workers[i], NULL);
}

masa_status masa__pool_create(const masa_context *ctx, size_t n_threads,
                              masa_pool **out)
{
    size_t n_workers = n_threads - 1;
    pool_block *block = masa__alloc(
        ctx, sizeof(pool_block) + n_workers * sizeof(worker_start));
    pthread_t *workers = masa__alloc(ctx, n_workers * sizeof(pthread_t));
    if (!block || !workers) {
        masa__free(ctx, block);
        masa__free(ctx, workers);
        return masa__fail(MASA_ERROR_OUT_OF_MEMORY,
                          "masa_context_create: cannot allocate the pool");
    }
    masa_pool *pool = &block->pool;
    *pool = (masa_pool){.n_threads = n_threads, .workers = workers,
                        .epoch = masa__fork_epoch()};
    atomic_init(&pool->next, 0);
    atomic_init(&pool->finished, 0);
    atomic_init(&pool->generation, 0);
    pthread_mutex_init(&pool->busy, NULL);
    pthread_mutex_init(&pool->lock, NULL);
    pthread_cond_init(&pool->wake, NULL);
    pthread_cond_init(&pool->done, NULL);
    for (size_t i = 0; i < n_workers; i++) {
        block->starts[i] = (worker_start){pool, i + 1};
        if (pthread_create(&workers[i], NULL, worker_main,
                           &block->starts[i]) != 0) {
            stop_workers(pool);
            pthread_mutex_destroy(&pool->busy);
            pthread_mutex_destroy(&pool->lock);
            pthread_cond_destroy(&pool->wake);
            pthread_cond_destroy(&pool->done);
            masa__free(ctx, workers);
            masa__free(ctx, block);
            return masa__fail(MASA_ERROR_THREAD,
                              "masa_context_create: cannot start worker "
                              "thread %zu of %zu", i + 1, n_workers);
        }
        pool->n_started++;
    }
    *out = pool;
    return MASA_OK;
}

void masa__pool_destroy(const masa_context *ctx, masa_pool *pool)
{
    if (!pool)
        return;
    if (pool->epoch != masa__fork_epoch()) {
        /* created before a fork(): the workers live in the parent, and the
         * locks may be in any state; only the memory is ours to free */
        masa__free(ctx, pool->workers);
        masa__free(ctx, (pool_block *)pool);
        return;
    }
    stop_workers(pool);
    pthread_mutex_destroy(&pool->busy);
    pthread_mutex_destroy(&pool->lock);
    pthread_cond_destroy(&pool->wake);
    pthread_cond_destroy(&pool->done);
    masa__free(ctx, pool->workers);
    masa__free(ctx, (pool_block *)pool);
}

static void run_inline(size_t n_tasks, masa_task_fn task, void *arg)
{
    for (size_t i = 0; i < n_tasks; i++)
        task(arg, i, 0);
}

void masa__pool_run(masa_pool *pool, size_t n_tasks, masa_task_fn task,
                    void *arg)
{
    if (n_tasks == 0)
        return;
    /* task indices share 32 bits with the generation */
    if (pool->n_started == 0 || n_tasks == 1 || n_tasks > 0xffffffffu ||
        pool->epoch != masa__fork_epoch() ||
        pthread_mutex_trylock(&pool->busy) != 0) {
        run_inline(n_tasks, task, arg);
        return;
    }
    pthread_mutex_lock(&pool->lock);
    pool->task = task;
    pool->arg = arg;
    pool->n_tasks = n_tasks;
    uint32_t gen = atomic_load(&pool->generation) + 1;
    atomic_store(&pool->finished, 0);
    atomic_store(&pool->next, (uint64_t)gen << 32);
    atomic_store(&pool->generation, gen); /* polling workers start now */
    if (pool->sleeping)
        pthread_cond_broadcast(&pool->wake);
    pthread_mutex_unlock(&pool->lock);

    run_tasks(pool, gen, task, arg, n_tasks, 0);

    spin_for_done(pool, n_tasks);
    pthread_mutex_lock(&pool->lock);
    while (atomic_load(&pool->finished) < n_tasks)
        pthread_cond_wait(&pool->done, &pool->lock);
    pthread_mutex_unlock(&pool->lock);
    pthread_mutex_unlock(&pool->busy);
}
