# The bounded ring-buffer queue: its shared-memory layout and the C-level producer API that
# the compiled receive loop calls without the GIL.
#
# One anonymous MAP_SHARED mapping holds a RingHeader followed by the record area, so a
# forked process shares the queue through its copy of the RingQueue object.

from libc.stdint cimport uint32_t, uint64_t

from fastsock._span cimport MessageSpan


cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass


cpdef enum:
    # Longest source blob: the size of a sockaddr_storage, so any sender address fits.
    MAX_SOURCE_LEN = 128


cdef struct RecordHeader:
    # Starts every record.  A record holds the messages of one put, one after the other:
    # after this header come count uint32 message lengths; then, when source_bytes is not
    # zero, count uint8 source lengths and the sources back to back; then the payloads back
    # to back.  The record is padded to a multiple of 8 bytes and may straddle the end of
    # the record area; its lengths, being 4-byte aligned, never do.
    uint32_t count
    uint32_t source_id
    uint32_t source_bytes
    uint32_t payload_bytes


cdef struct RingState:
    # Everything a put or a get changes.  head and tail are offsets into the record area and
    # used is the bytes between them.  A get may take only part of the oldest record: the
    # head_* fields say how much of it is gone.  Queued messages and bytes are the
    # differences of the put and got counters.
    uint64_t head
    uint64_t tail
    uint64_t used
    uint64_t head_payload
    uint32_t head_taken
    uint32_t head_sources
    uint64_t put_messages
    uint64_t put_bytes
    uint64_t got_messages
    uint64_t got_bytes


cdef struct MessageView:
    # One message of an offer_messages() call; source_len <= MAX_SOURCE_LEN.
    const char* data
    Py_ssize_t length
    const char* source
    Py_ssize_t source_len


cdef struct RingCounters:
    uint64_t dropped_messages
    uint64_t dropped_bytes
    uint64_t full_events
    uint64_t paused_ns
    uint64_t producer_deaths


cdef struct RingHeader:
    # Robust and process-shared: a holder killed at any instant hands it on with EOWNERDEAD.
    pthread_mutex_t lock
    # Futex words: data_seq moves when messages are published or the ring closes, space_seq
    # when records are freed or the ring closes.
    uint32_t data_seq
    uint32_t space_seq
    # Sleepers: getters on data_seq; blocked puts and wait_resume() callers on space_seq.
    # A sleeper counts itself in under the lock, before it unlocks, so a waker that sees
    # zero may skip the syscall, and resume waiters are woken only at the resume mark.  A
    # sleeper killed in its sleep leaves its count behind: spare wake-ups, nothing worse.
    uint32_t data_waiters
    uint32_t space_waiters
    uint32_t resume_waiters
    # asyncio consumers waiting on wake_fd, an eventfd made with the ring, so the same
    # descriptor in every forked process: producers add to it where they would wake
    # data_waiters, only while this count is not zero.  Counted in under the lock, as the
    # sleepers above.
    uint32_t async_waiters
    int wake_fd
    uint32_t closed
    # Index of the committed entry of state.  An operation writes the other entry and then
    # flips this index: that single store publishes it, so a process killed mid-operation
    # leaves the previous, complete state in force and its half-written record unreachable.
    uint32_t current
    RingState state[2]
    RingCounters counters


cdef class Batch:
    # One malloc'd block: int64 offsets[count + 1], uint32 source_ids[count], then payloads.
    cdef char* block
    cdef char* payloads
    cdef readonly Py_ssize_t nbytes
    cdef Py_ssize_t count


cdef class RingQueue:
    cdef RingHeader* header
    cdef char* records
    cdef size_t mapping_size
    # Bytes in the record area: enough for max_messages one-message records of the largest
    # overhead carrying max_bytes of payload, plus the part of one multi-message record that
    # gets may have taken already, so both bounds are always reachable.
    cdef uint64_t capacity
    cdef readonly Py_ssize_t max_messages
    cdef readonly Py_ssize_t max_bytes
    cdef uint64_t resume_messages
    cdef uint64_t resume_bytes

    # C-level producer API.  None of these raises or needs the GIL.
    # Publishes spans in order until one does not fit (a span longer than max_bytes never
    # does): returns how many were published, or -1 if the ring is closed.  Without wake,
    # as offer_messages().
    cdef Py_ssize_t put_spans(self, const char* base, const MessageSpan* spans, Py_ssize_t n,
                              uint32_t source_id, bint wake=*) noexcept nogil
    # Publishes, in order and under one lock acquisition, every message that fits, and drops
    # every one that does not, counting it as offer() does: returns how many were published
    # and stores their payload bytes in published_bytes, or returns -1 if the ring is closed.
    # Without wake, sleeping consumers are left asleep until the producer's wake_consumers()
    # (a producer with more messages at hand saves them a wake-up per call).
    cdef Py_ssize_t offer_messages(self, const MessageView* messages, Py_ssize_t n,
                                   uint32_t source_id, uint64_t* published_bytes,
                                   bint wake) noexcept nogil
    cdef void wake_consumers(self) noexcept nogil
    # Sleeps until the ring has drained to the resume mark and a message of length bytes fits
    # (1), the timeout passes (0) or the ring closes (-1); the time spent is added to
    # paused_seconds.
    cdef int wait_resume(self, Py_ssize_t length, double timeout) noexcept nogil
    # Maps every page of the ring into this process's page tables (see map_into_process).
    cdef void map_pages(self) noexcept nogil

    # Shared by both APIs.  They work on a copy of the committed state: the append_*
    # functions append records to it (gets take messages from it with module-level helpers);
    # publish and release commit it, unlock, then wake the consumers (publish) or the
    # producers (release).
    cdef bint below_resume_mark(self, const RingState* state) noexcept nogil
    cdef Py_ssize_t append_spans(self, RingState* state, const char* base,
                                 const MessageSpan* spans, Py_ssize_t n,
                                 uint32_t source_id) noexcept nogil
    cdef Py_ssize_t append_views(self, RingState* state, const MessageView* views,
                                 Py_ssize_t n, uint32_t source_id, bint drop_misfits,
                                 uint64_t* published_bytes) noexcept nogil
    cdef void publish(self, const RingState* state, Py_ssize_t published) noexcept nogil
    cdef void release(self, const RingState* state) noexcept nogil

    # Python-side helpers.  lock_for_* lock the ring and return once the wait is over, with
    # the lock held; sleep expects it held and keeps it; put_locked, take and fill_batch
    # expect it held and release it.  When they raise, the lock is released.
    cdef int check_message(self, Py_ssize_t length, Py_ssize_t source_len) except -1
    cdef int lock_for_data(self, double deadline) except -1
    cdef int lock_for_space(self, Py_ssize_t length, Py_ssize_t source_len,
                            double deadline) except -1
    cdef int sleep(self, uint32_t* word, uint32_t* sleepers, double deadline) except -1
    cdef void put_locked(self, const MessageView* message, uint32_t source_id) noexcept
    cdef list take(self, Py_ssize_t max_items, bint with_source)
    cdef bytes take_one(self)
    cdef int fill_batch(self, Batch batch, Py_ssize_t max_items, uint64_t max_payload) except -1
