/* The ring's process-shared lock and sleeps (fastsock/_ring.pyx), declared for Cython in
 * fastsock/_native.pxd.
 *
 * The ring is one MAP_SHARED mapping that forked processes use at once, so its lock and its
 * wake-ups must work across processes, and survive a process killed at any instant while it
 * holds the lock or sleeps. */
#ifndef FASTSOCK_SYNC_H
#define FASTSOCK_SYNC_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

/* Robust where the platform has robust mutexes: a holder killed at any instant then hands
 * the lock on with EOWNERDEAD instead of wedging every process sharing the ring. */
static inline int fastsock_ring_mutex_init(pthread_mutex_t *mutex) {
    pthread_mutexattr_t attr;
    int rc = pthread_mutexattr_init(&attr);
    if (rc)
        return rc;
    rc = pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
#ifdef __linux__
    if (!rc)
        rc = pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
#endif
    if (!rc)
        rc = pthread_mutex_init(mutex, &attr);
    pthread_mutexattr_destroy(&attr);
    return rc;
}

#ifdef __linux__
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

static inline void fastsock_ring_mutex_consistent(pthread_mutex_t *mutex) {
    pthread_mutex_consistent(mutex);
}

/* Shared (not FUTEX_PRIVATE) futexes, so that sleepers in other processes are woken. */
static inline void fastsock_futex_wait(uint32_t *word, uint32_t seen, double seconds) {
    struct timespec timeout;
    if (seconds < 0)
        seconds = 0;
    /* Keeps the conversion to time_t defined; every caller loops until its deadline. */
    if (seconds > 86400)
        seconds = 86400;
    timeout.tv_sec = (time_t)seconds;
    timeout.tv_nsec = (long)((seconds - (double)timeout.tv_sec) * 1e9);
    syscall(SYS_futex, word, FUTEX_WAIT, seen, &timeout, NULL, 0);
}

static inline void fastsock_futex_wake(uint32_t *word, int count) {
    syscall(SYS_futex, word, FUTEX_WAKE, count, NULL, NULL, 0);
}

#else
/* A mutex that is not robust never reports EOWNERDEAD.  Without futexes, sleepers poll in
 * naps short enough to stay responsive instead of being woken. */
static inline void fastsock_ring_mutex_consistent(pthread_mutex_t *mutex) {
    (void)mutex;
}

static inline void fastsock_futex_wait(uint32_t *word, uint32_t seen, double seconds) {
    struct timespec nap = {0, 1000000};
    (void)word;
    (void)seen;
    if (seconds <= 0)
        return;
    if (seconds < 0.001)
        nap.tv_nsec = (long)(seconds * 1e9);
    nanosleep(&nap, NULL);
}

static inline void fastsock_futex_wake(uint32_t *word, int count) {
    (void)word;
    (void)count;
}
#endif

/* One read per stride: each read fault maps the kernel's fault-around window of pages
 * already in the shared mapping, writable, so later writes do not fault page by page. */
static inline void fastsock_map_pages(const char *start, size_t length, size_t stride) {
    size_t offset;
    for (offset = 0; offset < length; offset += stride)
        (void)*(const volatile char *)(start + offset);
}

#endif
