# C helpers both compiled receive loops use: the monotonic clock, timeouts for socket
# options, and the relaxed atomics behind their shared-memory counters.

from libc.stdint cimport uint64_t


cdef extern from "<sys/time.h>" nogil:
    cdef struct timeval:
        long tv_sec
        long tv_usec


cdef extern from "<time.h>" nogil:
    ctypedef int clockid_t
    cdef struct timespec:
        long tv_sec
        long tv_nsec
    int clock_gettime(clockid_t clock, timespec* now)
    clockid_t CLOCK_MONOTONIC


cdef extern from *:
    """
    #include <stdint.h>
    /* Relaxed atomics: every loop of a server adds to the same counters, and readers
       need each value whole, not an order between them. */
    static inline void fastsock_counter_add(uint64_t *counter, uint64_t amount) {
        __atomic_fetch_add(counter, amount, __ATOMIC_RELAXED);
    }
    static inline uint64_t fastsock_counter_load(const uint64_t *counter) {
        return __atomic_load_n(counter, __ATOMIC_RELAXED);
    }
    static inline uint64_t fastsock_counter_add_fetch(uint64_t *counter, uint64_t amount) {
        return __atomic_add_fetch(counter, amount, __ATOMIC_RELAXED);
    }
    static inline void fastsock_counter_store(uint64_t *counter, uint64_t value) {
        __atomic_store_n(counter, value, __ATOMIC_RELAXED);
    }
    """
    void fastsock_counter_add(uint64_t* counter, uint64_t amount) noexcept nogil
    uint64_t fastsock_counter_load(const uint64_t* counter) noexcept nogil
    uint64_t fastsock_counter_add_fetch(uint64_t* counter, uint64_t amount) noexcept nogil
    void fastsock_counter_store(uint64_t* counter, uint64_t value) noexcept nogil


cdef inline uint64_t monotonic_ns() noexcept nogil:
    cdef timespec now
    clock_gettime(CLOCK_MONOTONIC, &now)
    return <uint64_t>now.tv_sec * 1000000000 + <uint64_t>now.tv_nsec


cdef inline uint64_t seconds_to_ns(double seconds) noexcept nogil:
    return <uint64_t>(seconds * 1e9)


cdef inline timeval seconds_to_timeval(double seconds) noexcept nogil:
    cdef timeval interval
    interval.tv_sec = <long>seconds
    interval.tv_usec = <long>((seconds - interval.tv_sec) * 1e6)
    return interval
