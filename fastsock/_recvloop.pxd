# The compiled receive loop: one StreamReceiver drives one connection, receiving straight
# into its Framer's buffer and publishing the framed spans into a RingQueue, all without
# the GIL; ReceiveCounters are shared by every loop of a server (and, being in shared
# memory, by its forked children).

from libc.stdint cimport uint32_t, uint64_t

from fastsock._framing cimport PROTOCOL_ERROR_KINDS, Framer, FramerStatus, ProtocolError
from fastsock._ring cimport RingQueue
from fastsock._span cimport MessageSpan


cdef enum ReceiveCounter:
    COUNT_CONNECTIONS_OPENED
    COUNT_CONNECTIONS_CLOSED
    COUNT_BYTES_RECEIVED
    COUNT_MESSAGES_RECEIVED
    COUNT_MESSAGES_DROPPED
    COUNT_BYTES_DISCARDED
    COUNT_RESETS
    COUNT_IDLE_TIMEOUTS
    COUNT_PAUSES
    COUNT_PAUSED_NS
    COUNT_MESSAGE_TIMEOUTS
    COUNT_IDLE_EVICTIONS
    COUNT_MEMORY_EVICTIONS
    COUNT_BYTES_UNREAD
    COUNT_CONNECTIONS_REFUSED
    COUNT_PROXY_HEADER_ERRORS
    COUNT_TLS_HANDSHAKE_ERRORS
    # One counter per ProtocolError, in its order: kind k counts at COUNT_PROTOCOL_ERRORS + k - 1.
    COUNT_PROTOCOL_ERRORS
    COUNTER_SLOTS = COUNT_PROTOCOL_ERRORS + PROTOCOL_ERROR_KINDS


cdef enum StreamEnd:
    END_RECEIVING       # not an end: the loop goes on
    END_CHECK_IN        # a check interval passed: the caller checks signals, then resumes
    END_EOF             # the peer finished sending
    END_STOPPED         # stop() was called
    END_RESET           # the connection broke (reset, timed out): an ordinary end
    END_IDLE_TIMEOUT    # the peer sent nothing for idle_timeout seconds
    END_MESSAGE_TIMEOUT  # one message took longer than message_timeout to arrive whole
    END_EVICTED_IDLE    # closed while silent to make room for a new connection
    END_EVICTED_MEMORY  # closed as the largest holder of partial messages over the budget
    END_PROTOCOL_ERROR  # the framer failed: its state's ProtocolError names the end
    END_RING_CLOSED     # the ring was closed: the messages not yet published are dropped
    END_NO_MEMORY
    END_OS_ERROR        # any other recv() failure: see last_errno


cdef enum StopReason:
    STOP_NONE
    STOP_ASKED          # stop(): a graceful end, which drains what was framed
    STOP_EVICT_IDLE
    STOP_EVICT_MEMORY


cdef class ReceiveCounters:
    # COUNTER_SLOTS counters, then the server-wide stop word, the last connection id given
    # out and the partial-message bytes all loops hold, in an anonymous shared mapping.
    cdef uint64_t* values

    cdef void add(self, ReceiveCounter counter, uint64_t amount) noexcept nogil
    cdef void count_protocol_error(self, ProtocolError kind) noexcept nogil
    cdef bint stopping(self) noexcept nogil
    # Moves this loop's share of the partial bytes from held to now; returns the new total.
    cdef uint64_t hold_partial(self, uint64_t held, uint64_t now) noexcept nogil
    # A connection id unique among every process sharing these counters (wraps at 2**32).
    cdef uint32_t take_connection_id(self) noexcept nogil


cdef class ConnectionLedger:
    # Two words in an anonymous shared mapping, made before a request process is forked:
    # whether its connection is open, and the partial-message bytes its loop holds, so that
    # the parent can settle the counters if the process dies without closing it.
    cdef uint64_t* words


cdef class StreamReceiver:
    cdef int fd
    cdef Framer framer
    cdef RingQueue ring
    cdef ReceiveCounters counters
    cdef ConnectionLedger ledger      # None unless the loop runs in a forked request process
    cdef readonly uint32_t source_id
    cdef Py_ssize_t recv_size
    cdef uint64_t check_interval_ns
    cdef uint64_t idle_timeout_ns     # 0: no idle timeout
    cdef uint64_t last_data_ns
    cdef uint64_t message_timeout_ns  # 0: no deadline for a message to arrive whole
    cdef uint64_t message_started_ns  # when the partial message began; 0: none pending
    cdef uint64_t messages_at_start   # the framer's messages_out when it began
    cdef volatile StopReason stop_requested
    cdef uint64_t drain_timeout_ns    # after a stop, how long the loop may still hand over
    cdef bint draining                # a stop was seen: the socket is shut both ways
    cdef uint64_t drain_deadline_ns
    cdef readonly uint64_t held_bytes  # partial-message bytes counted in the shared total
    cdef uint64_t partial_budget      # 0: no cap on the shared total
    cdef bint over_budget             # the total crossed partial_budget: run() reports it
    cdef object on_over_budget        # called by run() with the GIL when it does
    cdef readonly int last_errno
    cdef bint closed
    cdef bint paused                  # the ring was full at the last publish
    cdef bint buffer_released         # silent with nothing pending: the framer freed its buffer
    cdef bint ring_mapped             # map_pages() was called for this loop
    cdef bint unread_counted          # the kernel's leftover was added to bytes_unread

    # The framed spans not yet published: spans[published:nspans], then status.
    cdef MessageSpan* spans
    cdef Py_ssize_t max_spans
    cdef Py_ssize_t nspans
    cdef Py_ssize_t published
    cdef FramerStatus status

    cdef StreamEnd pump(self) noexcept nogil
    cdef StreamEnd stop_end(self) noexcept nogil
    cdef void count_unread(self) noexcept nogil
    cdef bint message_overdue(self, uint64_t now) noexcept nogil
    cdef void frame(self, Py_ssize_t received) noexcept nogil
    cdef StreamEnd deliver(self) noexcept nogil
    cdef StreamEnd publish_pending(self) noexcept nogil
