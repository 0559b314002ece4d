"""Bounded ring-buffer queue in shared memory; documented in _ring.pyi, laid out in _ring.pxd.

Locking rules that keep it deadlock-free: the ring's lock is never held while waiting for the
GIL or while running Python code (so no Python object is allocated under it, and a garbage
collector finaliser can never re-enter a locked ring), and threads holding the GIL only
try-lock it before releasing the GIL to block on it.
"""

import numbers
import operator
import queue

from cpython.buffer cimport PyBUF_FORMAT, PyBUF_ND, PyBUF_SIMPLE, PyBUF_STRIDES, PyBUF_WRITABLE
from cpython.buffer cimport PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.exc cimport PyErr_CheckSignals, PyErr_SetFromErrno
from cpython.mem cimport PyMem_Calloc, PyMem_Free
from libc.limits cimport INT_MAX
from libc.math cimport INFINITY
from libc.stdint cimport UINT64_MAX, int64_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset
from posix.mman cimport MAP_ANONYMOUS, MAP_FAILED, MAP_SHARED, PROT_READ, PROT_WRITE
from posix.mman cimport mmap, munmap
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

from fastsock._span cimport MessageSpan

from fastsock.constants import (
    GET_MANY_DEFAULT,
    RING_MAX_BYTES,
    RING_MAX_MESSAGES,
    RING_RESUME_FRACTION,
    RING_WAIT_SLICE,
)
from fastsock.errors import QueueClosed
from fastsock.stats import RingStats


cdef extern from "<errno.h>":
    enum:
        EOWNERDEAD

cdef extern from "<pthread.h>" nogil:
    int pthread_mutex_lock(pthread_mutex_t* mutex)
    int pthread_mutex_trylock(pthread_mutex_t* mutex)
    int pthread_mutex_unlock(pthread_mutex_t* mutex)

cdef extern from *:
    """
    #include <pthread.h>
    #include <stdint.h>
    #include <time.h>

    /* Robust where the platform has robust mutexes: a holder killed at any instant then
       hands the lock on with EOWNERDEAD instead of wedging every process sharing the ring. */
    static int fastsock_ring_mutex_init(pthread_mutex_t *mutex) {
        pthread_mutexattr_t attr;
        int rc = pthread_mutexattr_init(&attr);
        if (rc) return rc;
        rc = pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
    #ifdef __linux__
        if (!rc) rc = pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
    #endif
        if (!rc) rc = pthread_mutex_init(mutex, &attr);
        pthread_mutexattr_destroy(&attr);
        return rc;
    }

    #ifdef __linux__
    #include <linux/futex.h>
    #include <sys/syscall.h>
    #include <unistd.h>

    static void fastsock_ring_mutex_consistent(pthread_mutex_t *mutex) {
        pthread_mutex_consistent(mutex);
    }

    /* Shared (not FUTEX_PRIVATE) futexes, so that sleepers in other processes are woken. */
    static void fastsock_futex_wait(uint32_t *word, uint32_t seen, double seconds) {
        struct timespec timeout;
        if (seconds < 0) seconds = 0;
        /* Keeps the conversion to time_t defined; every caller loops until its deadline. */
        if (seconds > 86400) seconds = 86400;
        timeout.tv_sec = (time_t)seconds;
        timeout.tv_nsec = (long)((seconds - (double)timeout.tv_sec) * 1e9);
        syscall(SYS_futex, word, FUTEX_WAIT, seen, &timeout, NULL, 0);
    }

    static void fastsock_futex_wake(uint32_t *word, int count) {
        syscall(SYS_futex, word, FUTEX_WAKE, count, NULL, NULL, 0);
    }

    #else
    /* A mutex that is not robust never reports EOWNERDEAD.  Without futexes, sleepers poll
       in naps short enough to stay responsive instead of being woken. */
    static void fastsock_ring_mutex_consistent(pthread_mutex_t *mutex) {
        (void)mutex;
    }

    static void fastsock_futex_wait(uint32_t *word, uint32_t seen, double seconds) {
        struct timespec nap = {0, 1000000};
        (void)word;
        (void)seen;
        if (seconds <= 0) return;
        if (seconds < 0.001) nap.tv_nsec = (long)(seconds * 1e9);
        nanosleep(&nap, NULL);
    }

    static void fastsock_futex_wake(uint32_t *word, int count) {
        (void)word;
        (void)count;
    }
    #endif
    """
    int ring_mutex_init "fastsock_ring_mutex_init"(pthread_mutex_t* mutex) nogil
    void ring_mutex_consistent "fastsock_ring_mutex_consistent"(pthread_mutex_t* mutex) nogil
    void futex_wait "fastsock_futex_wait"(uint32_t* word, uint32_t seen, double seconds) nogil
    void futex_wake "fastsock_futex_wake"(uint32_t* word, int count) nogil

    enum:
        ATOMIC_RELAXED "__ATOMIC_RELAXED"
        ATOMIC_RELEASE "__ATOMIC_RELEASE"
    uint32_t load_u32 "__atomic_load_n"(const uint32_t* ptr, int order) nogil
    uint64_t load_u64 "__atomic_load_n"(const uint64_t* ptr, int order) nogil
    void store_u32 "__atomic_store_n"(uint32_t* ptr, uint32_t value, int order) nogil
    void add_u32 "__atomic_add_fetch"(uint32_t* ptr, uint32_t value, int order) nogil
    void sub_u32 "__atomic_sub_fetch"(uint32_t* ptr, uint32_t value, int order) nogil
    void add_u64 "__atomic_add_fetch"(uint64_t* ptr, uint64_t value, int order) nogil


cdef enum:
    # A copy this short takes less time than handing the GIL to another thread and back.
    NOGIL_COPY_BYTES = 256 * 1024

# The record length field is 32 bits wide.
cdef uint64_t MAX_BOUND = 0xFFFFFFFF
cdef uint64_t RECORD_ALIGN = 8
cdef double WAIT_SLICE = RING_WAIT_SLICE
cdef const char* BYTE_FORMAT = b"B"
cdef Py_ssize_t BYTE_ITEMSIZE = 1

Empty = queue.Empty
Full = queue.Full


cdef inline double monotonic() noexcept nogil:
    cdef timespec now
    clock_gettime(CLOCK_MONOTONIC, &now)
    return now.tv_sec + now.tv_nsec * 1e-9


cdef double deadline_for(bint block, object timeout) except? -1.0:
    if not block:
        return -INFINITY
    if timeout is None:
        return INFINITY
    cdef double seconds = timeout
    if not seconds >= 0.0:
        raise ValueError("'timeout' must be a non-negative number")
    return monotonic() + seconds


cdef inline uint64_t align(uint64_t n) noexcept nogil:
    return (n + RECORD_ALIGN - 1) & ~(RECORD_ALIGN - 1)


cdef inline uint64_t record_size(Py_ssize_t source_len, Py_ssize_t length) noexcept nogil:
    return align(sizeof(RecordHeader) + source_len + length)


cdef inline uint64_t advance(RingQueue ring, uint64_t offset, uint64_t n) noexcept nogil:
    offset += n
    return offset - ring.capacity if offset >= ring.capacity else offset


cdef uint64_t write_at(RingQueue ring, uint64_t offset, const void* data,
                       uint64_t n) noexcept nogil:
    cdef uint64_t room = ring.capacity - offset
    if n < room:
        memcpy(ring.records + offset, data, n)
        return offset + n
    memcpy(ring.records + offset, data, room)
    memcpy(ring.records, <const char*>data + room, n - room)
    return n - room


cdef uint64_t read_at(RingQueue ring, uint64_t offset, void* out, uint64_t n) noexcept nogil:
    cdef uint64_t room = ring.capacity - offset
    if n < room:
        memcpy(out, ring.records + offset, n)
        return offset + n
    memcpy(out, ring.records + offset, room)
    memcpy(<char*>out + room, ring.records, n - room)
    return n - room


cdef void recover(RingHeader* header) noexcept nogil:
    # A dead holder either never flipped header.current or flipped it after writing a whole
    # state, so the committed state needs no repair: only the mutex must be marked usable.
    ring_mutex_consistent(&header.lock)
    add_u64(&header.counters.producer_deaths, 1, ATOMIC_RELAXED)


cdef inline void lock_ring(RingHeader* header) noexcept nogil:
    if pthread_mutex_lock(&header.lock) == EOWNERDEAD:
        recover(header)


cdef inline void unlock_ring(RingHeader* header) noexcept nogil:
    pthread_mutex_unlock(&header.lock)


cdef inline void acquire(RingHeader* header) noexcept:
    cdef int rc = pthread_mutex_trylock(&header.lock)
    if rc == EOWNERDEAD:
        recover(header)
    elif rc != 0:
        with nogil:
            lock_ring(header)


cdef inline RingState* committed(RingHeader* header) noexcept nogil:
    return &header.state[header.current]


cdef inline void commit(RingHeader* header, const RingState* state) noexcept nogil:
    cdef uint32_t next_index = header.current ^ 1
    header.state[next_index] = state[0]
    store_u32(&header.current, next_index, ATOMIC_RELEASE)


cdef inline uint64_t queued_messages(const RingState* state) noexcept nogil:
    return state.put_messages - state.got_messages


cdef inline uint64_t queued_bytes(const RingState* state) noexcept nogil:
    return state.put_bytes - state.got_bytes


cdef Py_ssize_t check_bound(str name, object value) except -1:
    value = operator.index(value)
    if not 1 <= value <= MAX_BOUND:
        raise ValueError(f"{name} must be between 1 and {MAX_BOUND}, got {value}")
    return value


cdef int get_source(object source, Py_buffer* view) except -1:
    memset(view, 0, sizeof(Py_buffer))
    if source is not None:
        PyObject_GetBuffer(source, view, PyBUF_SIMPLE)
    return 0


cdef Py_ssize_t append_buffers(RingQueue ring, RingState* state, const Py_buffer* views,
                               Py_ssize_t n, uint32_t source_id) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        if not ring.fits(state, views[i].len):
            add_u64(&ring.header.counters.full_events, 1, ATOMIC_RELAXED)
            return i
        ring.append(state, <const char*>views[i].buf, views[i].len, source_id, NULL, 0)
    return n


cdef Py_ssize_t measure(RingQueue ring, const RingState* state, Py_ssize_t max_items,
                        uint64_t max_payload, uint64_t* span, uint64_t* payload) noexcept nogil:
    # How many records a get takes from the head: up to max_items, and up to max_payload
    # bytes of payload unless the first record alone exceeds it.
    cdef Py_ssize_t limit = <Py_ssize_t>min(<uint64_t>max_items, queued_messages(state))
    cdef Py_ssize_t count = 0
    cdef uint64_t offset = state.head
    cdef uint64_t size
    cdef RecordHeader record
    span[0] = 0
    payload[0] = 0
    while count < limit:
        read_at(ring, offset, &record, sizeof(record))
        if count and payload[0] + record.length > max_payload:
            break
        size = record_size(record.source_len, record.length)
        offset = advance(ring, offset, size)
        span[0] += size
        payload[0] += record.length
        count += 1
    return count


cdef void drain_records(RingQueue ring, RingState* state, char* out, uint64_t span,
                        Py_ssize_t count, uint64_t payload) noexcept nogil:
    state.head = read_at(ring, state.head, out, span)
    state.got_messages += count
    state.got_bytes += payload
    ring.release(state)


cdef void drain_payloads(RingQueue ring, RingState* state, Batch batch) noexcept nogil:
    cdef int64_t* offsets = <int64_t*>batch.block
    cdef uint32_t* source_ids = <uint32_t*>(offsets + batch.count + 1)
    cdef RecordHeader record
    cdef uint64_t offset = state.head
    cdef Py_ssize_t i
    offsets[0] = 0
    for i in range(batch.count):
        read_at(ring, offset, &record, sizeof(record))
        read_at(ring, advance(ring, offset, sizeof(record) + record.source_len),
                batch.payloads + offsets[i], record.length)
        offsets[i + 1] = offsets[i] + record.length
        source_ids[i] = record.source_id
        offset = advance(ring, offset, record_size(record.source_len, record.length))
    state.head = offset
    state.got_messages += batch.count
    state.got_bytes += batch.nbytes
    ring.release(state)


cdef list records_to_list(const char* records, Py_ssize_t count, bint with_source):
    cdef list result = []
    cdef const RecordHeader* record
    cdef const char* body
    cdef Py_ssize_t _
    for _ in range(count):
        record = <const RecordHeader*>records
        body = records + sizeof(RecordHeader)
        payload = PyBytes_FromStringAndSize(body + record.source_len, record.length)
        if with_source:
            source = (PyBytes_FromStringAndSize(body, record.source_len)
                      if record.source_len else None)
            result.append((record.source_id, source, payload))
        else:
            result.append(payload)
        records += record_size(record.source_len, record.length)
    return result


cdef int export(Py_buffer* view, int flags, object owner, void* data, Py_ssize_t* length,
                Py_ssize_t* itemsize, const char* format) except -1:
    # length and itemsize point into the exporting object: the buffer's shape and strides.
    if flags & PyBUF_WRITABLE:
        raise BufferError("a Batch and its arrays are read-only")
    view.buf = data
    view.obj = owner
    view.len = length[0] * itemsize[0]
    view.readonly = 1
    view.itemsize = itemsize[0]
    view.format = <char*>format if flags & PyBUF_FORMAT else NULL
    view.ndim = 1
    view.shape = length if flags & PyBUF_ND else NULL
    view.strides = itemsize if flags & PyBUF_STRIDES else NULL
    view.suboffsets = NULL
    view.internal = NULL
    return 0


cdef class _Column:
    """A read-only typed view of one of a Batch's arrays; keeps the Batch alive."""

    cdef Batch owner
    cdef char* data
    cdef Py_ssize_t length
    cdef Py_ssize_t itemsize
    cdef const char* format

    def __getbuffer__(self, Py_buffer* view, int flags):
        export(view, flags, self, self.data, &self.length, &self.itemsize, self.format)


cdef memoryview column(Batch owner, void* data, Py_ssize_t length, Py_ssize_t itemsize,
                       const char* format):
    cdef _Column view = _Column.__new__(_Column)
    view.owner = owner
    view.data = <char*>data
    view.length = length
    view.itemsize = itemsize
    view.format = format
    return memoryview(view)


cdef class Batch:
    def __init__(self):
        raise TypeError("Batch objects are made by RingQueue.get_batch()")

    def __dealloc__(self):
        free(self.block)

    def __len__(self):
        return self.count

    def __getitem__(self, Py_ssize_t index):
        cdef int64_t* offsets = <int64_t*>self.block
        if index < 0:
            index += self.count
        if not 0 <= index < self.count:
            raise IndexError("Batch index out of range")
        return PyBytes_FromStringAndSize(self.payloads + offsets[index],
                                         offsets[index + 1] - offsets[index])

    def __iter__(self):
        cdef Py_ssize_t i
        for i in range(self.count):
            yield self[i]

    def __getbuffer__(self, Py_buffer* view, int flags):
        export(view, flags, self, self.payloads, &self.nbytes, &BYTE_ITEMSIZE, BYTE_FORMAT)

    @property
    def offsets(self):
        return column(self, self.block, self.count + 1, sizeof(int64_t), b"q")

    @property
    def source_ids(self):
        return column(self, <int64_t*>self.block + self.count + 1, self.count,
                      sizeof(uint32_t), b"I")


cdef class RingQueue:
    def __cinit__(self, max_messages=RING_MAX_MESSAGES, max_bytes=RING_MAX_BYTES, *,
                  resume_fraction=RING_RESUME_FRACTION):
        self.max_messages = check_bound("max_messages", max_messages)
        self.max_bytes = check_bound("max_bytes", max_bytes)
        if not isinstance(resume_fraction, numbers.Real):
            raise TypeError(f"resume_fraction must be a number, got {resume_fraction!r}")
        cdef double fraction = resume_fraction
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"resume_fraction must be >= 0 and < 1, got {resume_fraction}")
        self.resume_messages = <uint64_t>(fraction * self.max_messages)
        self.resume_bytes = <uint64_t>(fraction * self.max_bytes)

        cdef uint64_t overhead = sizeof(RecordHeader) + MAX_SOURCE_LEN + RECORD_ALIGN - 1
        self.capacity = align(self.max_bytes + self.max_messages * overhead)
        cdef size_t header_size = (sizeof(RingHeader) + 63) & ~(<size_t>63)
        cdef void* mapping = mmap(NULL, header_size + self.capacity, PROT_READ | PROT_WRITE,
                                  MAP_SHARED | MAP_ANONYMOUS, -1, 0)
        if mapping == MAP_FAILED:
            PyErr_SetFromErrno(OSError)
        self.header = <RingHeader*>mapping
        self.mapping_size = header_size + self.capacity
        self.records = <char*>mapping + header_size
        cdef int rc = ring_mutex_init(&self.header.lock)
        if rc != 0:
            raise OSError(rc, "cannot initialise the ring's process-shared mutex")

    def __dealloc__(self):
        if self.header != NULL:
            munmap(self.header, self.mapping_size)

    # -- C-level producer API ------------------------------------------------------------

    cdef Py_ssize_t put_spans(self, const char* base, const MessageSpan* spans, Py_ssize_t n,
                              uint32_t source_id) noexcept nogil:
        cdef RingState state
        cdef Py_ssize_t published = 0
        lock_ring(self.header)
        if self.header.closed:
            unlock_ring(self.header)
            return -1
        state = committed(self.header)[0]
        while published < n:
            if not self.fits(&state, spans[published].length):
                add_u64(&self.header.counters.full_events, 1, ATOMIC_RELAXED)
                break
            self.append(&state, base + spans[published].offset, spans[published].length,
                        source_id, NULL, 0)
            published += 1
        self.publish(&state, published)
        return published

    cdef Py_ssize_t put_record(self, const char* data, Py_ssize_t n, uint32_t source_id,
                               const char* source, Py_ssize_t source_len) noexcept nogil:
        cdef RingState state
        lock_ring(self.header)
        if self.header.closed:
            unlock_ring(self.header)
            return -1
        state = committed(self.header)[0]
        if not self.fits(&state, n):
            add_u64(&self.header.counters.full_events, 1, ATOMIC_RELAXED)
            unlock_ring(self.header)
            return 0
        self.append(&state, data, n, source_id, source, source_len)
        self.publish(&state, 1)
        return 1

    cdef int wait_resume(self, double timeout) noexcept nogil:
        cdef double start = monotonic()
        cdef double now = start
        cdef uint32_t seen
        cdef int status
        lock_ring(self.header)
        while True:
            if self.header.closed:
                status = -1
                break
            if self.below_resume_mark(committed(self.header)):
                status = 1
                break
            if not now - start < timeout:
                status = 0
                break
            seen = self.header.space_seq
            add_u32(&self.header.resume_waiters, 1, ATOMIC_RELAXED)
            unlock_ring(self.header)
            futex_wait(&self.header.space_seq, seen, timeout - (now - start))
            sub_u32(&self.header.resume_waiters, 1, ATOMIC_RELAXED)
            lock_ring(self.header)
            now = monotonic()
        unlock_ring(self.header)
        add_u64(&self.header.counters.paused_ns, <uint64_t>((monotonic() - start) * 1e9),
                ATOMIC_RELAXED)
        return status

    cdef void count_dropped(self, Py_ssize_t messages, Py_ssize_t nbytes) noexcept nogil:
        add_u64(&self.header.counters.dropped_messages, messages, ATOMIC_RELAXED)
        add_u64(&self.header.counters.dropped_bytes, nbytes, ATOMIC_RELAXED)

    # -- Shared internals ----------------------------------------------------------------

    cdef bint fits(self, const RingState* state, Py_ssize_t length) noexcept nogil:
        return (queued_messages(state) < <uint64_t>self.max_messages
                and queued_bytes(state) + length <= <uint64_t>self.max_bytes)

    cdef bint below_resume_mark(self, const RingState* state) noexcept nogil:
        return (queued_messages(state) <= self.resume_messages
                and queued_bytes(state) <= self.resume_bytes)

    cdef void append(self, RingState* state, const char* data, Py_ssize_t length,
                     uint32_t source_id, const char* source, Py_ssize_t source_len) noexcept nogil:
        cdef RecordHeader record
        record.length = <uint32_t>length
        record.source_id = source_id
        record.source_len = <uint16_t>source_len
        cdef uint64_t offset = write_at(self, state.tail, &record, sizeof(record))
        if source_len:
            offset = write_at(self, offset, source, source_len)
        write_at(self, offset, data, length)
        state.tail = advance(self, state.tail, record_size(source_len, length))
        state.put_messages += 1
        state.put_bytes += length

    cdef void publish(self, const RingState* state, Py_ssize_t published) noexcept nogil:
        cdef bint wake = published > 0 and load_u32(&self.header.data_waiters, ATOMIC_RELAXED)
        commit(self.header, state)
        if wake:
            add_u32(&self.header.data_seq, 1, ATOMIC_RELAXED)
        unlock_ring(self.header)
        if wake:
            futex_wake(&self.header.data_seq, <int>min(published, INT_MAX))

    cdef void release(self, const RingState* state) noexcept nogil:
        cdef bint wake = (
            load_u32(&self.header.space_waiters, ATOMIC_RELAXED) != 0
            or (load_u32(&self.header.resume_waiters, ATOMIC_RELAXED) != 0
                and self.below_resume_mark(state))
        )
        commit(self.header, state)
        if wake:
            add_u32(&self.header.space_seq, 1, ATOMIC_RELAXED)
        unlock_ring(self.header)
        if wake:
            futex_wake(&self.header.space_seq, INT_MAX)

    # -- Python-side helpers -------------------------------------------------------------

    cdef int lock_for_data(self, double deadline) except -1:
        acquire(self.header)
        while queued_messages(committed(self.header)) == 0:
            if self.header.closed:
                unlock_ring(self.header)
                raise QueueClosed("the queue is closed and drained")
            if monotonic() >= deadline:
                unlock_ring(self.header)
                raise Empty
            self.sleep(&self.header.data_seq, &self.header.data_waiters, deadline)
        return 0

    cdef int lock_for_space(self, Py_ssize_t length, double deadline) except -1:
        cdef bint counted = False
        acquire(self.header)
        while True:
            if self.header.closed:
                unlock_ring(self.header)
                raise QueueClosed("the queue is closed")
            if self.fits(committed(self.header), length):
                return 0
            if not counted:
                add_u64(&self.header.counters.full_events, 1, ATOMIC_RELAXED)
                counted = True
            if monotonic() >= deadline:
                unlock_ring(self.header)
                raise Full
            self.sleep(&self.header.space_seq, &self.header.space_waiters, deadline)

    cdef int sleep(self, uint32_t* word, uint32_t* sleepers, double deadline) except -1:
        cdef uint32_t seen = word[0]
        cdef double seconds = min(deadline - monotonic(), WAIT_SLICE)
        add_u32(sleepers, 1, ATOMIC_RELAXED)
        unlock_ring(self.header)
        with nogil:
            futex_wait(word, seen, seconds)
        sub_u32(sleepers, 1, ATOMIC_RELAXED)
        PyErr_CheckSignals()
        acquire(self.header)
        return 0

    cdef void put_locked(self, const Py_buffer* payload, uint32_t source_id,
                         const Py_buffer* source) noexcept:
        cdef RingState state = committed(self.header)[0]
        if payload.len < NOGIL_COPY_BYTES:
            self.append(&state, <const char*>payload.buf, payload.len, source_id,
                        <const char*>source.buf, source.len)
            self.publish(&state, 1)
        else:
            with nogil:
                self.append(&state, <const char*>payload.buf, payload.len, source_id,
                            <const char*>source.buf, source.len)
                self.publish(&state, 1)

    cdef list take(self, Py_ssize_t max_items, bint with_source):
        cdef RingState state = committed(self.header)[0]
        cdef uint64_t span
        cdef uint64_t payload
        cdef Py_ssize_t count = measure(self, &state, max_items, UINT64_MAX, &span, &payload)
        cdef char* scratch = <char*>malloc(span)
        if scratch == NULL:
            unlock_ring(self.header)
            raise MemoryError
        if span < NOGIL_COPY_BYTES:
            drain_records(self, &state, scratch, span, count, payload)
        else:
            with nogil:
                drain_records(self, &state, scratch, span, count, payload)
        try:
            return records_to_list(scratch, count, with_source)
        finally:
            free(scratch)

    cdef int fill_batch(self, Batch batch, Py_ssize_t max_items, uint64_t max_payload) except -1:
        cdef RingState state = committed(self.header)[0]
        cdef uint64_t span
        cdef uint64_t payload
        cdef Py_ssize_t count = measure(self, &state, max_items, max_payload, &span, &payload)
        cdef size_t columns = (count + 1) * sizeof(int64_t) + count * sizeof(uint32_t)
        batch.block = <char*>malloc(columns + payload)
        if batch.block == NULL:
            unlock_ring(self.header)
            raise MemoryError
        batch.payloads = batch.block + columns
        batch.count = count
        batch.nbytes = payload
        if payload < NOGIL_COPY_BYTES:
            drain_payloads(self, &state, batch)
        else:
            with nogil:
                drain_payloads(self, &state, batch)
        return 0

    # -- Producer side -------------------------------------------------------------------

    cdef int check_message(self, Py_ssize_t length, Py_ssize_t source_len) except -1:
        if length > self.max_bytes:
            raise ValueError(f"message of {length} bytes exceeds max_bytes={self.max_bytes}")
        if source_len > MAX_SOURCE_LEN:
            raise ValueError(f"source of {source_len} bytes exceeds {MAX_SOURCE_LEN} bytes")
        return 0

    def put(self, data, bint block=True, timeout=None, *, uint32_t source_id=0, source=None):
        cdef double deadline = deadline_for(block, timeout)
        cdef Py_buffer payload
        cdef Py_buffer sender
        PyObject_GetBuffer(data, &payload, PyBUF_SIMPLE)
        try:
            get_source(source, &sender)
            self.check_message(payload.len, sender.len)
            self.lock_for_space(payload.len, deadline)
            self.put_locked(&payload, source_id, &sender)
        finally:
            PyBuffer_Release(&payload)
            PyBuffer_Release(&sender)

    def put_nowait(self, data, *, uint32_t source_id=0, source=None):
        self.put(data, False, source_id=source_id, source=source)

    def offer(self, data, *, uint32_t source_id=0, source=None):
        cdef Py_buffer payload
        cdef Py_buffer sender
        PyObject_GetBuffer(data, &payload, PyBUF_SIMPLE)
        try:
            get_source(source, &sender)
            self.check_message(payload.len, sender.len)
            acquire(self.header)
            if self.header.closed:
                unlock_ring(self.header)
                raise QueueClosed("the queue is closed")
            if not self.fits(committed(self.header), payload.len):
                add_u64(&self.header.counters.full_events, 1, ATOMIC_RELAXED)
                self.count_dropped(1, payload.len)
                unlock_ring(self.header)
                return False
            self.put_locked(&payload, source_id, &sender)
            return True
        finally:
            PyBuffer_Release(&payload)
            PyBuffer_Release(&sender)

    def put_many(self, items, *, uint32_t source_id=0):
        cdef list messages = list(items)
        cdef Py_ssize_t n = len(messages)
        cdef Py_ssize_t i
        cdef Py_ssize_t published
        cdef uint64_t total = 0
        cdef RingState state
        cdef Py_buffer* views = <Py_buffer*>PyMem_Calloc(n, sizeof(Py_buffer))
        if views == NULL:
            raise MemoryError
        try:
            for i in range(n):
                PyObject_GetBuffer(messages[i], &views[i], PyBUF_SIMPLE)
                self.check_message(views[i].len, 0)
                total += views[i].len
            acquire(self.header)
            if self.header.closed:
                unlock_ring(self.header)
                raise QueueClosed("the queue is closed")
            state = committed(self.header)[0]
            if total < NOGIL_COPY_BYTES:
                published = append_buffers(self, &state, views, n, source_id)
                self.publish(&state, published)
            else:
                with nogil:
                    published = append_buffers(self, &state, views, n, source_id)
                    self.publish(&state, published)
            return published
        finally:
            for i in range(n):
                PyBuffer_Release(&views[i])
            PyMem_Free(views)

    # -- Consumer side -------------------------------------------------------------------

    def get(self, bint block=True, timeout=None):
        self.lock_for_data(deadline_for(block, timeout))
        return self.take(1, False)[0]

    def get_nowait(self):
        return self.get(False)

    def get_many(self, Py_ssize_t max_items=GET_MANY_DEFAULT, timeout=None, *,
                 bint block=True, bint with_source=False):
        if max_items < 1:
            raise ValueError(f"max_items must be at least 1, got {max_items}")
        self.lock_for_data(deadline_for(block, timeout))
        return self.take(max_items, with_source)

    def get_batch(self, Py_ssize_t max_items=GET_MANY_DEFAULT, timeout=None, *,
                  bint block=True, max_bytes=None):
        cdef uint64_t max_payload = UINT64_MAX
        if max_items < 1:
            raise ValueError(f"max_items must be at least 1, got {max_items}")
        if max_bytes is not None:
            max_bytes = operator.index(max_bytes)
            if max_bytes < 1:
                raise ValueError(f"max_bytes must be at least 1, got {max_bytes}")
            max_payload = min(max_bytes, MAX_BOUND)
        cdef Batch batch = Batch.__new__(Batch)
        self.lock_for_data(deadline_for(block, timeout))
        self.fill_batch(batch, max_items, max_payload)
        return batch

    # -- State ---------------------------------------------------------------------------

    def qsize(self):
        acquire(self.header)
        cdef uint64_t messages = queued_messages(committed(self.header))
        unlock_ring(self.header)
        return messages

    def empty(self):
        return self.qsize() == 0

    def full(self):
        acquire(self.header)
        cdef bint full = not self.fits(committed(self.header), 1)
        unlock_ring(self.header)
        return full

    def close(self):
        acquire(self.header)
        store_u32(&self.header.closed, 1, ATOMIC_RELAXED)
        add_u32(&self.header.data_seq, 1, ATOMIC_RELAXED)
        add_u32(&self.header.space_seq, 1, ATOMIC_RELAXED)
        unlock_ring(self.header)
        futex_wake(&self.header.data_seq, INT_MAX)
        futex_wake(&self.header.space_seq, INT_MAX)

    @property
    def closed(self):
        return load_u32(&self.header.closed, ATOMIC_RELAXED) != 0

    @property
    def stats(self):
        acquire(self.header)
        cdef RingState state = committed(self.header)[0]
        cdef RingCounters* counters = &self.header.counters
        cdef uint64_t dropped_messages = load_u64(&counters.dropped_messages, ATOMIC_RELAXED)
        cdef uint64_t dropped_bytes = load_u64(&counters.dropped_bytes, ATOMIC_RELAXED)
        cdef uint64_t full_events = load_u64(&counters.full_events, ATOMIC_RELAXED)
        cdef uint64_t paused_ns = load_u64(&counters.paused_ns, ATOMIC_RELAXED)
        cdef uint64_t producer_deaths = load_u64(&counters.producer_deaths, ATOMIC_RELAXED)
        unlock_ring(self.header)
        return RingStats(
            put_messages=state.put_messages,
            put_bytes=state.put_bytes,
            got_messages=state.got_messages,
            got_bytes=state.got_bytes,
            dropped_messages=dropped_messages,
            dropped_bytes=dropped_bytes,
            full_events=full_events,
            paused_seconds=paused_ns * 1e-9,
            producer_deaths=producer_deaths,
            messages_queued=queued_messages(&state),
            bytes_queued=queued_bytes(&state),
        )
