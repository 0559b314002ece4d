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
from cpython.exc cimport PyErr_CheckSignals
from cpython.list cimport PyList_New, PyList_SET_ITEM
from cpython.mem cimport PyMem_Calloc, PyMem_Free
from cpython.ref cimport Py_INCREF
from libc.errno cimport errno
from libc.limits cimport INT_MAX
from libc.math cimport INFINITY
from libc.stdint cimport UINT64_MAX, int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset
from posix.mman cimport MAP_ANONYMOUS, MAP_FAILED, MAP_SHARED, PROT_READ, PROT_WRITE
from posix.mman cimport mmap, munmap
from posix.unistd cimport close, write

from fastsock._native cimport (
    EFD_CLOEXEC,
    EFD_NONBLOCK,
    EOWNERDEAD,
    eventfd,
    fastsock_counter_add,
    fastsock_counter_load,
    fastsock_futex_wait,
    fastsock_futex_wake,
    fastsock_map_pages,
    fastsock_ring_mutex_consistent,
    fastsock_ring_mutex_init,
    fastsock_word_add,
    fastsock_word_load,
    fastsock_word_publish,
    fastsock_word_store,
    fastsock_word_sub,
    monotonic,
    pthread_mutex_lock,
    pthread_mutex_trylock,
    pthread_mutex_unlock,
    raise_errno,
)
from fastsock._span cimport MessageSpan

from fastsock.constants import (
    GET_MANY_DEFAULT,
    RING_MAP_STRIDE,
    RING_MAX_BYTES,
    RING_MAX_MESSAGES,
    RING_RESUME_FRACTION,
    RING_WAIT_SLICE,
)
from fastsock.errors import QueueClosed
from fastsock.stats import RingStats


cdef size_t MAP_STRIDE = RING_MAP_STRIDE


cdef enum:
    # A copy this short takes less time than handing the GIL to another thread and back.
    NOGIL_COPY_BYTES = 256 * 1024

    # Bounds on a record of more than one message.  Gets may take part of a record, and the
    # part they took stays in the record area until the record's last message goes: these
    # bound that dead space, which the record area has room for.
    RECORD_MESSAGES = 4096
    RECORD_BYTES = 256 * 1024

# The record length field is 32 bits wide.
cdef uint64_t MAX_BOUND = 0xFFFFFFFF
cdef uint64_t RECORD_ALIGN = 8
cdef double WAIT_SLICE = RING_WAIT_SLICE
cdef const char* BYTE_FORMAT = b"B"
cdef Py_ssize_t BYTE_ITEMSIZE = 1

Empty = queue.Empty
Full = queue.Full


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


cdef inline uint64_t lengths_size(uint64_t count, uint64_t source_bytes) noexcept nogil:
    # The message lengths, and the source lengths when the record has sources.
    if source_bytes:
        return count * (sizeof(uint32_t) + sizeof(uint8_t))
    return count * sizeof(uint32_t)


cdef inline uint64_t record_size(uint64_t count, uint64_t source_bytes,
                                 uint64_t payload) noexcept nogil:
    return align(sizeof(RecordHeader) + lengths_size(count, source_bytes) + source_bytes + payload)


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


cdef inline uint32_t length_at(RingQueue ring, uint64_t offset) noexcept nogil:
    return (<uint32_t*>(ring.records + offset))[0]


cdef uint64_t sum_lengths(RingQueue ring, uint64_t offset, uint64_t count) noexcept nogil:
    cdef uint64_t total = 0
    cdef uint64_t _
    for _ in range(count):
        total += length_at(ring, offset)
        offset = advance(ring, offset, sizeof(uint32_t))
    return total


cdef uint64_t sum_source_lengths(RingQueue ring, uint64_t offset, uint64_t count) noexcept nogil:
    cdef uint64_t total = 0
    cdef uint64_t _
    for _ in range(count):
        total += <uint8_t>ring.records[offset]
        offset = advance(ring, offset, 1)
    return total


cdef void recover(RingHeader* header) noexcept nogil:
    # A dead holder either never flipped header.current or flipped it after writing a whole
    # state, so the committed state needs no repair: only the mutex must be marked usable.
    fastsock_ring_mutex_consistent(&header.lock)
    fastsock_counter_add(&header.counters.producer_deaths, 1)


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
    fastsock_word_publish(&header.current, next_index)


cdef inline void wake_data_sleepers(RingHeader* header, int count) noexcept nogil:
    # After the unlock that committed the messages.  A consumer counts itself in data_waiters
    # under the lock before it sleeps, so one that saw the ring empty is counted here; one
    # that read data_seq and has not slept yet finds it changed, and futex_wait returns.
    if fastsock_word_load(&header.data_waiters):
        fastsock_word_add(&header.data_seq, 1)
        fastsock_futex_wake(&header.data_seq, count)
    if fastsock_word_load(&header.async_waiters):
        signal_async_waiters(header)


cdef inline void signal_async_waiters(RingHeader* header) noexcept nogil:
    # The eventfd adds what is written to its count and is readable while that is not zero;
    # a write fails only when the count would overflow, and then it is readable already.
    cdef uint64_t one = 1
    write(header.wake_fd, &one, sizeof(one))


cdef inline uint64_t queued_messages(const RingState* state) noexcept nogil:
    return state.put_messages - state.got_messages


cdef inline uint64_t queued_bytes(const RingState* state) noexcept nogil:
    return state.put_bytes - state.got_bytes


cdef inline bint room_for(RingQueue ring, const RingState* state, uint64_t count,
                          uint64_t source_bytes, uint64_t payload) noexcept nogil:
    # Whether a record of count messages fits in state: within both bounds and the room
    # left in the record area.
    return (queued_messages(state) + count <= <uint64_t>ring.max_messages
            and queued_bytes(state) + payload <= <uint64_t>ring.max_bytes
            and record_size(count, source_bytes, payload) <= ring.capacity - state.used)


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


cdef inline void count_misfit(RingHeader* header, Py_ssize_t length) noexcept nogil:
    fastsock_counter_add(&header.counters.full_events, 1)
    fastsock_counter_add(&header.counters.dropped_messages, 1)
    fastsock_counter_add(&header.counters.dropped_bytes, length)


cdef inline void view_buffers(MessageView* message, const Py_buffer* payload,
                              const Py_buffer* source) noexcept:
    message.data = <const char*>payload.buf
    message.length = payload.len
    message.source = <const char*>source.buf
    message.source_len = source.len


cdef struct Portion:
    # The next count messages a get takes from the oldest record: the offsets locate the
    # first one's length, source length, source and payload; the sizes are of them all.
    RecordHeader record
    uint64_t count
    uint64_t lengths
    uint64_t source_lengths
    uint64_t sources
    uint64_t payload
    uint64_t source_bytes
    uint64_t payload_bytes


cdef inline uint64_t start_record(RingQueue ring, RingState* state, uint64_t count,
                                  uint32_t source_id, uint64_t source_bytes,
                                  uint64_t payload) noexcept nogil:
    # Claims a record at the tail of state and writes its header; returns where its
    # lengths go, for the caller to write the rest.
    cdef RecordHeader record
    cdef uint64_t size = record_size(count, source_bytes, payload)
    record.count = <uint32_t>count
    record.source_id = source_id
    record.source_bytes = <uint32_t>source_bytes
    record.payload_bytes = <uint32_t>payload
    cdef uint64_t offset = write_at(ring, state.tail, &record, sizeof(record))
    state.tail = advance(ring, state.tail, size)
    state.used += size
    state.put_messages += count
    state.put_bytes += payload
    return offset


cdef inline void head_portion(RingQueue ring, const RingState* state, uint64_t most,
                              Portion* portion) noexcept nogil:
    # Up to most of the messages left in the oldest record of state.
    cdef RecordHeader* record = &portion.record
    read_at(ring, state.head, record, sizeof(RecordHeader))
    cdef uint64_t left = record.count - state.head_taken
    cdef uint64_t lengths_end = sizeof(RecordHeader) + record.count * sizeof(uint32_t)
    portion.count = min(left, most)
    portion.lengths = advance(ring, state.head, sizeof(RecordHeader)
                              + state.head_taken * sizeof(uint32_t))
    portion.source_lengths = advance(ring, state.head, lengths_end + state.head_taken)
    portion.sources = advance(ring, state.head,
                              lengths_end + record.count + state.head_sources)
    portion.payload = advance(ring, state.head, sizeof(RecordHeader)
                              + lengths_size(record.count, record.source_bytes)
                              + record.source_bytes + state.head_payload)
    if portion.count == left:
        portion.payload_bytes = record.payload_bytes - state.head_payload
        portion.source_bytes = record.source_bytes - state.head_sources
    else:
        portion.payload_bytes = sum_lengths(ring, portion.lengths, portion.count)
        portion.source_bytes = (
            sum_source_lengths(ring, portion.source_lengths, portion.count)
            if record.source_bytes else 0)


cdef inline void consume(RingQueue ring, RingState* state,
                         const Portion* portion) noexcept nogil:
    cdef const RecordHeader* record = &portion.record
    cdef uint64_t size
    if state.head_taken + portion.count == record.count:
        size = record_size(record.count, record.source_bytes, record.payload_bytes)
        state.used -= size
        # An empty ring starts over at the front: the record area in use then stays as
        # small, and as warm in the cache, as the backlog is.
        state.head = advance(ring, state.head, size) if state.used else 0
        if not state.used:
            state.tail = 0
        state.head_taken = state.head_sources = 0
        state.head_payload = 0
    else:
        state.head_taken += portion.count
        state.head_sources += portion.source_bytes
        state.head_payload += portion.payload_bytes
    state.got_messages += portion.count
    state.got_bytes += portion.payload_bytes


cdef Py_ssize_t measure(RingQueue ring, RingState* state, Py_ssize_t max_items,
                        uint64_t max_payload, uint64_t* payload,
                        uint64_t* source_bytes) noexcept nogil:
    # How many messages a get takes from the head: up to max_items, and up to max_payload
    # bytes of payload unless the first message alone exceeds it.  Consumes them from state,
    # a scratch copy.
    cdef uint64_t limit = min(<uint64_t>max_items, queued_messages(state))
    cdef uint64_t count = 0
    cdef uint64_t length, lengths, cut, cut_bytes
    cdef Portion portion
    payload[0] = source_bytes[0] = 0
    while count < limit:
        head_portion(ring, state, limit - count, &portion)
        if payload[0] + portion.payload_bytes > max_payload:
            # Cut inside the record: its lengths say where.
            lengths = portion.lengths
            cut = cut_bytes = 0
            while cut < portion.count:
                length = length_at(ring, lengths)
                if (count or cut) and payload[0] + cut_bytes + length > max_payload:
                    break
                cut += 1
                cut_bytes += length
                lengths = advance(ring, lengths, sizeof(uint32_t))
            portion.count = cut
            portion.payload_bytes = cut_bytes
            if portion.record.source_bytes:
                portion.source_bytes = sum_source_lengths(ring, portion.source_lengths, cut)
            limit = count + cut
        count += portion.count
        payload[0] += portion.payload_bytes
        source_bytes[0] += portion.source_bytes
        consume(ring, state, &portion)
    return count


cdef struct Taken:
    # Where take() copies what it takes, for the list it builds once the ring is unlocked:
    # the lengths, the payloads back to back and, with sources, the source ids, lengths and
    # the sources back to back.
    uint32_t* lengths
    uint32_t* source_ids
    uint8_t* source_lengths
    char* sources
    char* payloads


cdef void drain_records(RingQueue ring, RingState* state, Py_ssize_t count,
                        bint with_source, Taken* out) noexcept nogil:
    cdef Portion portion
    cdef uint64_t index
    cdef uint64_t done = 0
    while done < <uint64_t>count:
        head_portion(ring, state, count - done, &portion)
        read_at(ring, portion.lengths, out.lengths + done, portion.count * sizeof(uint32_t))
        read_at(ring, portion.payload, out.payloads, portion.payload_bytes)
        out.payloads += portion.payload_bytes
        if with_source:
            for index in range(done, done + portion.count):
                out.source_ids[index] = portion.record.source_id
            if portion.record.source_bytes:
                read_at(ring, portion.source_lengths, out.source_lengths + done, portion.count)
                read_at(ring, portion.sources, out.sources, portion.source_bytes)
                out.sources += portion.source_bytes
            else:
                memset(out.source_lengths + done, 0, portion.count)
        done += portion.count
        consume(ring, state, &portion)
    ring.release(state)


cdef void drain_payloads(RingQueue ring, RingState* state, Batch batch) noexcept nogil:
    cdef int64_t* offsets = <int64_t*>batch.block
    cdef uint32_t* source_ids = <uint32_t*>(offsets + batch.count + 1)
    cdef Portion portion
    cdef uint64_t lengths
    cdef uint64_t index
    cdef uint64_t done = 0
    cdef int64_t total = 0
    cdef uint32_t source_id
    cdef const uint32_t* contiguous
    offsets[0] = 0
    while done < <uint64_t>batch.count:
        head_portion(ring, state, batch.count - done, &portion)
        read_at(ring, portion.payload, batch.payloads + total, portion.payload_bytes)
        lengths = portion.lengths
        # In locals: the stores through offsets and source_ids could alias the ring's and
        # the portion's fields, which the compiler would then reload for every message.
        source_id = portion.record.source_id
        if lengths + portion.count * sizeof(uint32_t) <= ring.capacity:
            contiguous = <const uint32_t*>(ring.records + lengths)
            for index in range(portion.count):
                total += contiguous[index]
                offsets[done + index + 1] = total
                source_ids[done + index] = source_id
        else:
            for index in range(done, done + portion.count):
                total += length_at(ring, lengths)
                offsets[index + 1] = total
                source_ids[index] = source_id
                lengths = advance(ring, lengths, sizeof(uint32_t))
        done += portion.count
        consume(ring, state, &portion)
    ring.release(state)


cdef list records_to_list(const Taken* taken, Py_ssize_t count, bint with_source):
    cdef list result = PyList_New(count)
    cdef const char* payload = taken.payloads
    cdef const char* source = taken.sources
    cdef Py_ssize_t index
    cdef object message
    for index in range(count):
        message = PyBytes_FromStringAndSize(payload, taken.lengths[index])
        payload += taken.lengths[index]
        if with_source:
            if taken.source_lengths[index]:
                sender = PyBytes_FromStringAndSize(source, taken.source_lengths[index])
                source += taken.source_lengths[index]
            else:
                sender = None
            message = (taken.source_ids[index], sender, message)
        Py_INCREF(message)
        PyList_SET_ITEM(result, index, message)
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

        # A message alone in its record costs at most this much besides its payload; the
        # messages of a record share its header and padding.
        cdef uint64_t overhead = (sizeof(RecordHeader) + sizeof(uint32_t) + sizeof(uint8_t)
                                  + MAX_SOURCE_LEN + RECORD_ALIGN - 1)
        cdef uint64_t dead_space = (
            min(<uint64_t>RECORD_MESSAGES, <uint64_t>self.max_messages)
            * (sizeof(uint32_t) + sizeof(uint8_t) + MAX_SOURCE_LEN)
            + min(<uint64_t>RECORD_BYTES, <uint64_t>self.max_bytes))
        self.capacity = align(self.max_bytes + self.max_messages * overhead + dead_space)
        cdef size_t header_size = (sizeof(RingHeader) + 63) & ~(<size_t>63)
        cdef void* mapping = mmap(NULL, header_size + self.capacity, PROT_READ | PROT_WRITE,
                                  MAP_SHARED | MAP_ANONYMOUS, -1, 0)
        if mapping == MAP_FAILED:
            raise_errno(errno)
        self.header = <RingHeader*>mapping
        self.mapping_size = header_size + self.capacity
        self.records = <char*>mapping + header_size
        self.header.wake_fd = -1
        cdef int rc = fastsock_ring_mutex_init(&self.header.lock)
        if rc != 0:
            raise OSError(rc, "cannot initialise the ring's process-shared mutex")
        # Made here, before any fork, so that producers in forked children signal it too.
        self.header.wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if self.header.wake_fd < 0:
            raise_errno(errno)

    def __dealloc__(self):
        if self.header != NULL:
            if self.header.wake_fd >= 0:
                close(self.header.wake_fd)
            munmap(self.header, self.mapping_size)

    # -- C-level producer API ------------------------------------------------------------

    cdef Py_ssize_t put_spans(self, const char* base, const MessageSpan* spans, Py_ssize_t n,
                              uint32_t source_id, bint wake=True) noexcept nogil:
        cdef RingState state
        cdef Py_ssize_t published
        lock_ring(self.header)
        if self.header.closed:
            unlock_ring(self.header)
            return -1
        state = committed(self.header)[0]
        published = self.append_spans(&state, base, spans, n, source_id)
        # publish() wakes the sleepers only for a count above zero.
        self.publish(&state, published if wake else 0)
        return published

    cdef Py_ssize_t offer_messages(self, const MessageView* messages, Py_ssize_t n,
                                   uint32_t source_id, uint64_t* published_bytes,
                                   bint wake) noexcept nogil:
        cdef RingState state
        cdef Py_ssize_t published
        lock_ring(self.header)
        if self.header.closed:
            unlock_ring(self.header)
            return -1
        state = committed(self.header)[0]
        published = self.append_views(&state, messages, n, source_id, True, published_bytes)
        # publish() wakes the sleepers only for a count above zero.
        self.publish(&state, published if wake else 0)
        return published

    cdef void wake_consumers(self) noexcept nogil:
        wake_data_sleepers(self.header, INT_MAX)

    cdef int wait_resume(self, Py_ssize_t length, double timeout) noexcept nogil:
        cdef double start = monotonic()
        cdef double now = start
        cdef uint32_t seen
        cdef int status
        cdef RingState* state
        lock_ring(self.header)
        while True:
            if self.header.closed:
                status = -1
                break
            state = committed(self.header)
            # Both, or a message that cannot fit at the resume mark would make the caller
            # spin between this and a refused put.
            if self.below_resume_mark(state) and room_for(self, state, 1, 0, length):
                status = 1
                break
            if not now - start < timeout:
                status = 0
                break
            seen = self.header.space_seq
            fastsock_word_add(&self.header.resume_waiters, 1)
            unlock_ring(self.header)
            fastsock_futex_wait(&self.header.space_seq, seen, timeout - (now - start))
            fastsock_word_sub(&self.header.resume_waiters, 1)
            lock_ring(self.header)
            now = monotonic()
        unlock_ring(self.header)
        fastsock_counter_add(&self.header.counters.paused_ns,
                             <uint64_t>((monotonic() - start) * 1e9))
        return status

    # -- Shared internals ----------------------------------------------------------------

    cdef bint below_resume_mark(self, const RingState* state) noexcept nogil:
        return (queued_messages(state) <= self.resume_messages
                and queued_bytes(state) <= self.resume_bytes)

    cdef Py_ssize_t append_spans(self, RingState* state, const char* base,
                                 const MessageSpan* spans, Py_ssize_t n,
                                 uint32_t source_id) noexcept nogil:
        # One record per run of spans, so that a consumer takes a record's payloads with one
        # copy.  room_for() in its inner loop, unrolled: this runs once per message.
        cdef Py_ssize_t first = 0
        cdef Py_ssize_t end, index, limit
        cdef uint64_t payload, offset, length, room_messages, room_bytes, room_area
        cdef uint32_t* lengths
        cdef char* out
        cdef bint full = False
        while first < n and not full:
            limit = min(n - first, <Py_ssize_t>RECORD_MESSAGES)
            room_messages = self.max_messages - queued_messages(state)
            room_bytes = self.max_bytes - queued_bytes(state)
            # The capacity and what is used are multiples of the alignment, so a record fits
            # when its unpadded size does.
            room_area = self.capacity - state.used
            end = first
            payload = 0
            while end - first < limit:
                length = spans[end].length
                if end > first and payload + length > RECORD_BYTES:
                    break
                if (<uint64_t>(end - first) == room_messages or payload + length > room_bytes
                        or sizeof(RecordHeader) + (end - first + 1) * sizeof(uint32_t)
                        + payload + length > room_area):
                    full = True
                    break
                payload += length
                end += 1
            if end == first:
                break
            offset = start_record(self, state, end - first, source_id, 0, payload)
            if offset + (end - first) * sizeof(uint32_t) <= self.capacity:
                lengths = <uint32_t*>(self.records + offset)
                for index in range(first, end):
                    lengths[index - first] = <uint32_t>spans[index].length
                offset = advance(self, offset, (end - first) * sizeof(uint32_t))
            else:
                for index in range(first, end):
                    (<uint32_t*>(self.records + offset))[0] = <uint32_t>spans[index].length
                    offset = advance(self, offset, sizeof(uint32_t))
            if offset + payload <= self.capacity:
                out = self.records + offset
                for index in range(first, end):
                    memcpy(out, base + spans[index].offset, spans[index].length)
                    out += spans[index].length
            else:
                for index in range(first, end):
                    offset = write_at(self, offset, base + spans[index].offset,
                                      spans[index].length)
            first = end
        if full:
            fastsock_counter_add(&self.header.counters.full_events, 1)
        return first

    cdef Py_ssize_t append_views(self, RingState* state, const MessageView* views,
                                 Py_ssize_t n, uint32_t source_id, bint drop_misfits,
                                 uint64_t* published_bytes) noexcept nogil:
        # Appends views in order, one record per run that fits, until one does not fit (its
        # full event counted), or with drop_misfits dropping and counting each that does not.
        cdef Py_ssize_t first = 0
        cdef Py_ssize_t published = 0
        cdef Py_ssize_t end, index
        cdef uint64_t payload, sources, offset
        cdef uint64_t total = 0
        cdef bint misfit
        while first < n:
            end = first
            payload = sources = 0
            misfit = False
            while end < n and (end == first or (end - first < RECORD_MESSAGES
                                                and payload + views[end].length <= RECORD_BYTES)):
                if not room_for(self, state, end - first + 1, sources + views[end].source_len,
                                payload + views[end].length):
                    misfit = True
                    break
                payload += views[end].length
                sources += views[end].source_len
                end += 1
            if end > first:
                offset = start_record(self, state, end - first, source_id, sources, payload)
                for index in range(first, end):
                    (<uint32_t*>(self.records + offset))[0] = <uint32_t>views[index].length
                    offset = advance(self, offset, sizeof(uint32_t))
                if sources:
                    for index in range(first, end):
                        self.records[offset] = <char>views[index].source_len
                        offset = advance(self, offset, 1)
                    for index in range(first, end):
                        offset = write_at(self, offset, views[index].source,
                                          views[index].source_len)
                for index in range(first, end):
                    offset = write_at(self, offset, views[index].data, views[index].length)
                published += end - first
                total += payload
            first = end
            if misfit:
                if not drop_misfits:
                    fastsock_counter_add(&self.header.counters.full_events, 1)
                    break
                count_misfit(self.header, views[first].length)
                first += 1
        published_bytes[0] = total
        return published

    cdef void publish(self, const RingState* state, Py_ssize_t published) noexcept nogil:
        commit(self.header, state)
        unlock_ring(self.header)
        if published > 0:
            wake_data_sleepers(self.header, <int>min(published, INT_MAX))

    cdef void release(self, const RingState* state) noexcept nogil:
        cdef bint wake = (
            fastsock_word_load(&self.header.space_waiters) != 0
            or (fastsock_word_load(&self.header.resume_waiters) != 0
                and self.below_resume_mark(state))
        )
        commit(self.header, state)
        if wake:
            fastsock_word_add(&self.header.space_seq, 1)
        unlock_ring(self.header)
        if wake:
            fastsock_futex_wake(&self.header.space_seq, INT_MAX)

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

    cdef int lock_for_space(self, Py_ssize_t length, Py_ssize_t source_len,
                            double deadline) except -1:
        cdef bint counted = False
        acquire(self.header)
        while True:
            if self.header.closed:
                unlock_ring(self.header)
                raise QueueClosed("the queue is closed")
            if room_for(self, committed(self.header), 1, source_len, length):
                return 0
            if not counted:
                fastsock_counter_add(&self.header.counters.full_events, 1)
                counted = True
            if monotonic() >= deadline:
                unlock_ring(self.header)
                raise Full
            self.sleep(&self.header.space_seq, &self.header.space_waiters, deadline)

    cdef int sleep(self, uint32_t* word, uint32_t* sleepers, double deadline) except -1:
        cdef uint32_t seen = word[0]
        cdef double seconds = min(deadline - monotonic(), WAIT_SLICE)
        fastsock_word_add(sleepers, 1)
        unlock_ring(self.header)
        with nogil:
            fastsock_futex_wait(word, seen, seconds)
        fastsock_word_sub(sleepers, 1)
        PyErr_CheckSignals()
        acquire(self.header)
        return 0

    cdef void put_locked(self, const MessageView* message, uint32_t source_id) noexcept:
        cdef RingState state = committed(self.header)[0]
        cdef uint64_t published_bytes
        if message.length < NOGIL_COPY_BYTES:
            self.append_views(&state, message, 1, source_id, False, &published_bytes)
            self.publish(&state, 1)
        else:
            with nogil:
                self.append_views(&state, message, 1, source_id, False, &published_bytes)
                self.publish(&state, 1)

    cdef list take(self, Py_ssize_t max_items, bint with_source):
        cdef RingState state = committed(self.header)[0]
        cdef RingState measured = state
        cdef uint64_t payload
        cdef uint64_t source_bytes
        cdef Py_ssize_t count = measure(self, &measured, max_items, UINT64_MAX, &payload,
                                        &source_bytes)
        if not with_source:
            source_bytes = 0
        cdef size_t ids_size = count * sizeof(uint32_t) if with_source else 0
        cdef size_t source_lengths_size = count if with_source else 0
        cdef char* scratch = <char*>malloc(count * sizeof(uint32_t) + ids_size + payload
                                           + source_lengths_size + source_bytes)
        if scratch == NULL:
            unlock_ring(self.header)
            raise MemoryError
        cdef Taken taken
        taken.lengths = <uint32_t*>scratch
        taken.source_ids = taken.lengths + count
        taken.payloads = <char*>taken.source_ids + ids_size
        taken.source_lengths = <uint8_t*>taken.payloads + payload
        taken.sources = <char*>taken.source_lengths + source_lengths_size
        cdef Taken cursor = taken
        if payload + source_bytes < NOGIL_COPY_BYTES:
            drain_records(self, &state, count, with_source, &cursor)
        else:
            with nogil:
                drain_records(self, &state, count, with_source, &cursor)
        try:
            return records_to_list(&taken, count, with_source)
        finally:
            free(scratch)

    cdef bytes take_one(self):
        # get(): one message, without a list and the sizing pass of a batch.
        cdef RingState state = committed(self.header)[0]
        cdef Portion portion
        head_portion(self, &state, 1, &portion)
        # One byte more: malloc(0) may return NULL.
        cdef char* payload = <char*>malloc(portion.payload_bytes + 1)
        if payload == NULL:
            unlock_ring(self.header)
            raise MemoryError
        read_at(self, portion.payload, payload, portion.payload_bytes)
        consume(self, &state, &portion)
        self.release(&state)
        try:
            return PyBytes_FromStringAndSize(payload, portion.payload_bytes)
        finally:
            free(payload)

    cdef int fill_batch(self, Batch batch, Py_ssize_t max_items, uint64_t max_payload) except -1:
        cdef RingState state = committed(self.header)[0]
        cdef RingState measured = state
        cdef uint64_t payload
        cdef uint64_t source_bytes
        cdef Py_ssize_t count = measure(self, &measured, max_items, max_payload, &payload,
                                        &source_bytes)
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
        cdef MessageView message
        PyObject_GetBuffer(data, &payload, PyBUF_SIMPLE)
        try:
            get_source(source, &sender)
            self.check_message(payload.len, sender.len)
            view_buffers(&message, &payload, &sender)
            self.lock_for_space(payload.len, sender.len, deadline)
            self.put_locked(&message, source_id)
        finally:
            PyBuffer_Release(&payload)
            PyBuffer_Release(&sender)

    def put_nowait(self, data, *, uint32_t source_id=0, source=None):
        self.put(data, False, source_id=source_id, source=source)

    def offer(self, data, *, uint32_t source_id=0, source=None):
        cdef Py_buffer payload
        cdef Py_buffer sender
        cdef MessageView message
        PyObject_GetBuffer(data, &payload, PyBUF_SIMPLE)
        try:
            get_source(source, &sender)
            self.check_message(payload.len, sender.len)
            view_buffers(&message, &payload, &sender)
            acquire(self.header)
            if self.header.closed:
                unlock_ring(self.header)
                raise QueueClosed("the queue is closed")
            if not room_for(self, committed(self.header), 1, sender.len, payload.len):
                count_misfit(self.header, payload.len)
                unlock_ring(self.header)
                return False
            self.put_locked(&message, source_id)
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
        cdef uint64_t published_bytes
        cdef RingState state
        cdef Py_buffer* buffers = <Py_buffer*>PyMem_Calloc(n, sizeof(Py_buffer))
        cdef MessageView* views = <MessageView*>PyMem_Calloc(n, sizeof(MessageView))
        if buffers == NULL or views == NULL:
            PyMem_Free(buffers)
            PyMem_Free(views)
            raise MemoryError
        try:
            for i in range(n):
                PyObject_GetBuffer(messages[i], &buffers[i], PyBUF_SIMPLE)
                self.check_message(buffers[i].len, 0)
                views[i].data = <const char*>buffers[i].buf
                views[i].length = buffers[i].len
                total += buffers[i].len
            acquire(self.header)
            if self.header.closed:
                unlock_ring(self.header)
                raise QueueClosed("the queue is closed")
            state = committed(self.header)[0]
            if total < NOGIL_COPY_BYTES:
                published = self.append_views(&state, views, n, source_id, False,
                                              &published_bytes)
                self.publish(&state, published)
            else:
                with nogil:
                    published = self.append_views(&state, views, n, source_id, False,
                                                  &published_bytes)
                    self.publish(&state, published)
            return published
        finally:
            for i in range(n):
                PyBuffer_Release(&buffers[i])
            PyMem_Free(buffers)
            PyMem_Free(views)

    # -- Consumer side -------------------------------------------------------------------

    def get(self, bint block=True, timeout=None):
        self.lock_for_data(deadline_for(block, timeout))
        return self.take_one()

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

    # fastsock._asyncring is imported by the async methods only: it imports asyncio, which
    # would add tens of milliseconds to every `import fastsock`.

    def get_many_async(self, max_items=GET_MANY_DEFAULT, timeout=None, *, with_source=False):
        from fastsock import _asyncring

        return _asyncring.get_many_async(self, max_items, timeout, with_source)

    def get_batch_async(self, max_items=GET_MANY_DEFAULT, timeout=None, *, max_bytes=None):
        from fastsock import _asyncring

        return _asyncring.get_batch_async(self, max_items, timeout, max_bytes)

    def batches(self, max_items=GET_MANY_DEFAULT, *, with_source=False):
        from fastsock import _asyncring

        return _asyncring.batches(self, max_items, with_source)

    # The primitives of fastsock._asyncring.

    @property
    def _wake_fd(self):
        return self.header.wake_fd

    @property
    def _async_waiters(self):
        return fastsock_word_load(&self.header.async_waiters)

    def _add_async_waiter(self):
        """Count in an asyncio waiter, unless a message is queued or the ring closed."""
        acquire(self.header)
        if queued_messages(committed(self.header)) or self.header.closed:
            unlock_ring(self.header)
            return False
        fastsock_word_add(&self.header.async_waiters, 1)
        unlock_ring(self.header)
        return True

    def _remove_async_waiter(self):
        fastsock_word_sub(&self.header.async_waiters, 1)

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
        cdef bint full = not room_for(self, committed(self.header), 1, 0, 1)
        unlock_ring(self.header)
        return full

    def map_into_process(self):
        """Map the ring's pages into this process's page tables in one pass."""
        with nogil:
            self.map_pages()

    cdef void map_pages(self) noexcept nogil:
        fastsock_map_pages(<const char*>self.header, self.mapping_size, MAP_STRIDE)

    def close(self):
        acquire(self.header)
        fastsock_word_store(&self.header.closed, 1)
        fastsock_word_add(&self.header.data_seq, 1)
        fastsock_word_add(&self.header.space_seq, 1)
        unlock_ring(self.header)
        fastsock_futex_wake(&self.header.data_seq, INT_MAX)
        fastsock_futex_wake(&self.header.space_seq, INT_MAX)
        signal_async_waiters(self.header)

    @property
    def closed(self):
        return fastsock_word_load(&self.header.closed) != 0

    @property
    def stats(self):
        acquire(self.header)
        cdef RingState state = committed(self.header)[0]
        cdef RingCounters* counters = &self.header.counters
        cdef uint64_t dropped_messages = fastsock_counter_load(&counters.dropped_messages)
        cdef uint64_t dropped_bytes = fastsock_counter_load(&counters.dropped_bytes)
        cdef uint64_t full_events = fastsock_counter_load(&counters.full_events)
        cdef uint64_t paused_ns = fastsock_counter_load(&counters.paused_ns)
        cdef uint64_t producer_deaths = fastsock_counter_load(&counters.producer_deaths)
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
