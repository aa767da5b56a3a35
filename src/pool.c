/* A fixed pool of worker threads owned by a context. One call runs at a
 * time: workers and the caller take task indices from a shared counter, so
 * uneven tasks balance themselves. A caller that finds the pool busy runs its
 * tasks alone instead of waiting (see "Threads" in masa.h). */
#include <pthread.h>
#include <stdatomic.h>

#include "internal.h"

struct masa_pool {
    size_t n_threads;        /* workers + the calling thread */
    pthread_t *workers;
    size_t n_started;
    pthread_mutex_t busy;    /* held by the call that owns the pool */
    pthread_mutex_t lock;    /* protects the fields below */
    pthread_cond_t wake, done;
    uint64_t generation;     /* bumped for every call */
    size_t n_active;         /* workers still in the current call */
    bool stop;
    /* the current call */
    masa_task_fn task;
    void *arg;
    size_t n_tasks;
    atomic_size_t next;
};

typedef struct worker_start {
    masa_pool *pool;
    size_t index;
} worker_start;

static void run_tasks(masa_pool *pool, size_t thread)
{
    for (;;) {
        size_t i = atomic_fetch_add(&pool->next, 1);
        if (i >= pool->n_tasks)
            break;
        pool->task(pool->arg, i, thread);
    }
}

static void *worker_main(void *p)
{
    masa_pool *pool = ((worker_start *)p)->pool;
    size_t index = ((worker_start *)p)->index;
    uint64_t seen = 0;
    pthread_mutex_lock(&pool->lock);
    for (;;) {
        while (!pool->stop && pool->generation == seen)
            pthread_cond_wait(&pool->wake, &pool->lock);
        if (pool->stop)
            break;
        seen = pool->generation;
        pthread_mutex_unlock(&pool->lock);
        run_tasks(pool, index);
        pthread_mutex_lock(&pool->lock);
        if (--pool->n_active == 0)
            pthread_cond_signal(&pool->done);
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
    *pool = (masa_pool){.n_threads = n_threads, .workers = workers};
    atomic_init(&pool->next, 0);
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
    if (pool->n_started == 0 || n_tasks == 1 ||
        pthread_mutex_trylock(&pool->busy) != 0) {
        run_inline(n_tasks, task, arg);
        return;
    }
    pthread_mutex_lock(&pool->lock);
    pool->task = task;
    pool->arg = arg;
    pool->n_tasks = n_tasks;
    atomic_store(&pool->next, 0);
    pool->n_active = pool->n_started;
    pool->generation++;
    pthread_cond_broadcast(&pool->wake);
    pthread_mutex_unlock(&pool->lock);

    run_tasks(pool, 0);

    pthread_mutex_lock(&pool->lock);
    while (pool->n_active > 0)
        pthread_cond_wait(&pool->done, &pool->lock);
    pthread_mutex_unlock(&pool->lock);
    pthread_mutex_unlock(&pool->busy);
}
