/* fork() safety. A child process has only the thread that called fork():
 * the worker threads of every context stay behind in the parent, and any
 * lock another thread held at that moment (the pool's, BLIS's) stays held
 * forever. Two rules follow (see "Processes and fork()" in masa.h):
 *
 * - fork() waits for the library calls running in other threads to return
 *   (a pthread_atfork prepare handler), and calls starting meanwhile wait
 *   for the fork to finish, so the child never sees a call half done.
 * - Every fork() in the child bumps a process epoch; a pool created under an
 *   older epoch has no workers in this process: it runs its tasks on the
 *   calling thread and its destruction joins nothing. */
#include <pthread.h>
#include <stdatomic.h>
#include <time.h>

#include "common/internal.h"

static pthread_mutex_t fork_lock = PTHREAD_MUTEX_INITIALIZER;
static atomic_bool forking;
static atomic_size_t active_calls; /* outermost guarded calls running */
static _Atomic uint64_t fork_epoch;
static _Thread_local unsigned call_depth;
static _Thread_local bool in_call_at_fork;

static void before_fork(void)
{
    pthread_mutex_lock(&fork_lock); /* held until the fork is done */
    atomic_store(&forking, true);
    /* a call of this very thread (a fork from an allocator hook) cannot be
     * waited for */
    in_call_at_fork = call_depth > 0;
    size_t own = in_call_at_fork ? 1 : 0;
    const struct timespec nap = {0, 20000};
    while (atomic_load(&active_calls) > own)
        nanosleep(&nap, NULL);
}

static void after_fork_parent(void)
{
    atomic_store(&forking, false);
    pthread_mutex_unlock(&fork_lock);
}

static void after_fork_child(void)
{
    atomic_fetch_add(&fork_epoch, 1);
    atomic_store(&active_calls, in_call_at_fork ? 1 : 0);
    atomic_store(&forking, false);
    pthread_mutex_unlock(&fork_lock); /* locked by this thread */
}

static void register_handlers(void)
{
    pthread_atfork(before_fork, after_fork_parent, after_fork_child);
}

void masa__fork_handlers_install(void)
{
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, register_handlers);
}

uint64_t masa__fork_epoch(void)
{
    return atomic_load_explicit(&fork_epoch, memory_order_relaxed);
}

void masa__call_enter(void)
{
    if (call_depth++ > 0)
        return;
    for (;;) {
        atomic_fetch_add(&active_calls, 1);
        if (!atomic_load(&forking))
            return;
        /* a fork is waiting for the running calls: step back, wait for it */
        atomic_fetch_sub(&active_calls, 1);
        pthread_mutex_lock(&fork_lock);
        pthread_mutex_unlock(&fork_lock);
    }
}

void masa__call_exit(void)
{
    if (--call_depth == 0)
        atomic_fetch_sub(&active_calls, 1);
}
