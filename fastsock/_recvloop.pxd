# The compiled receive loop: one StreamReceiver drives one connection, receiving straight
# into its Framer's buffer and publishing the framed spans into a RingQueue, all without
# the GIL; ReceiveCounters are shared by every loop of a server (and, being in shared
# memory, by its forked children).

from libc.stdint cimport uint32_t, uint64_t

from fastsock._framing cimport Framer, FramerStatus
from fastsock._ring cimport RingQueue
from fastsock._span cimport MessageSpan


cdef enum ReceiveCounter:
    COUNT_CONNECTIONS_OPENED
    COUNT_CONNECTIONS_CLOSED
    COUNT_BYTES_RECEIVED
    COUNT_MESSAGES_RECEIVED
    COUNT_MESSAGES_DROPPED
    COUNT_BYTES_DISCARDED
    COUNT_LINES_TOO_LONG
    COUNT_FRAMES_TOO_LARGE
    COUNT_RESETS
    COUNT_IDLE_TIMEOUTS
    COUNT_PAUSES
    COUNT_PAUSED_NS
    COUNT_MESSAGE_TIMEOUTS
    COUNTER_SLOTS


cdef enum StreamEnd:
    END_RECEIVING       # not an end: the loop goes on
    END_CHECK_IN        # a check interval passed: the caller checks signals, then resumes
    END_EOF             # the peer finished sending
    END_STOPPED         # stop() was called
    END_RESET           # the connection broke (reset, timed out): an ordinary end
    END_IDLE_TIMEOUT    # the peer sent nothing for idle_timeout seconds
    END_MESSAGE_TIMEOUT  # one message took longer than message_timeout to arrive whole
    END_LINE_TOO_LONG
    END_FRAME_TOO_LARGE
    END_RING_CLOSED     # the ring was closed: the messages not yet published are dropped
    END_NO_MEMORY
    END_OS_ERROR        # any other recv() failure: see last_errno


cdef class ReceiveCounters:
    # COUNTER_SLOTS counters, then the server-wide stop word and the last connection id given
    # out, in an anonymous shared mapping.
    cdef uint64_t* values

    cdef void add(self, ReceiveCounter counter, uint64_t amount) noexcept nogil
    cdef bint stopping(self) noexcept nogil


cdef class StreamReceiver:
    cdef int fd
    cdef Framer framer
    cdef RingQueue ring
    cdef ReceiveCounters counters
    cdef readonly uint32_t source_id
    cdef Py_ssize_t recv_size
    cdef uint64_t check_interval_ns
    cdef uint64_t idle_timeout_ns     # 0: no idle timeout
    cdef uint64_t last_data_ns
    cdef uint64_t message_timeout_ns  # 0: no deadline for a message to arrive whole
    cdef uint64_t message_started_ns  # when the partial message began; 0: none pending
    cdef uint64_t messages_at_start   # the framer's messages_out when it began
    cdef volatile int stop_requested
    cdef readonly int last_errno
    cdef bint closed
    cdef bint paused                  # the ring was full at the last publish

    # The framed spans not yet published: spans[published:nspans], then status.
    cdef MessageSpan* spans
    cdef Py_ssize_t max_spans
    cdef Py_ssize_t nspans
    cdef Py_ssize_t published
    cdef FramerStatus status

    cdef StreamEnd pump(self) noexcept nogil
    cdef bint message_overdue(self, uint64_t now) noexcept nogil
    cdef void frame(self, Py_ssize_t received) noexcept nogil
    cdef StreamEnd deliver(self) noexcept nogil
    cdef StreamEnd publish_pending(self) noexcept nogil
