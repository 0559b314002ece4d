/* The atomics every compiled module shares, declared for Cython in fastsock/_native.pxd.
 *
 * Counters and flags live in shared memory that several threads and forked processes
 * update at once.  Their readers need each value whole, not an order between values, so
 * almost everything is relaxed: a plain locked add, no fence.  The exceptions are the
 * ring's release store, which publishes a state written just before it, and the datagram
 * loop's count of finished publishes (fastsock_counter_add_release). */
#ifndef FASTSOCK_ATOMIC_H
#define FASTSOCK_ATOMIC_H

#include <stdint.h>

/* 64-bit counters: bytes, messages, nanoseconds. */
static inline void fastsock_counter_add(uint64_t *counter, uint64_t amount) {
    __atomic_fetch_add(counter, amount, __ATOMIC_RELAXED);
}

static inline uint64_t fastsock_counter_add_fetch(uint64_t *counter, uint64_t amount) {
    return __atomic_add_fetch(counter, amount, __ATOMIC_RELAXED);
}

static inline uint64_t fastsock_counter_load(const uint64_t *counter) {
    return __atomic_load_n(counter, __ATOMIC_RELAXED);
}

/* A count that says the counters written before it are complete (release), and its read,
 * after which they are seen complete (acquire): the datagram loop's publishes_counted. */
static inline void fastsock_counter_add_release(uint64_t *counter, uint64_t amount) {
    __atomic_fetch_add(counter, amount, __ATOMIC_RELEASE);
}

static inline uint64_t fastsock_counter_load_acquire(const uint64_t *counter) {
    return __atomic_load_n(counter, __ATOMIC_ACQUIRE);
}

static inline void fastsock_counter_store(uint64_t *counter, uint64_t value) {
    __atomic_store_n(counter, value, __ATOMIC_RELAXED);
}

/* 32-bit words: futex sequence numbers (a futex is 32 bits), sleeper counts, flags. */
static inline void fastsock_word_add(uint32_t *word, uint32_t amount) {
    __atomic_fetch_add(word, amount, __ATOMIC_RELAXED);
}

static inline void fastsock_word_sub(uint32_t *word, uint32_t amount) {
    __atomic_fetch_sub(word, amount, __ATOMIC_RELAXED);
}

static inline uint32_t fastsock_word_load(const uint32_t *word) {
    return __atomic_load_n(word, __ATOMIC_RELAXED);
}

static inline void fastsock_word_store(uint32_t *word, uint32_t value) {
    __atomic_store_n(word, value, __ATOMIC_RELAXED);
}

/* Release: every write before it is visible to whoever then reads the word, even in a
 * process that never takes the lock the writer held (one that inherits it, EOWNERDEAD). */
static inline void fastsock_word_publish(uint32_t *word, uint32_t value) {
    __atomic_store_n(word, value, __ATOMIC_RELEASE);
}

#endif
