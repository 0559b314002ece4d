"""Compiled receive loop; fastsock/_recvloop.pyi documents it.

A StreamReceiver runs with the GIL released and takes it back only every check interval
while its peer is silent, or when it must report an end, so many connections receive in
parallel with a Python consumer.
"""

from cpython.exc cimport PyErr_CheckSignals
from cpython.mem cimport PyMem_RawFree, PyMem_RawMalloc
from libc.errno cimport (
    EAGAIN,
    ECONNABORTED,
    ECONNRESET,
    EINTR,
    ENOTCONN,
    ETIMEDOUT,
    errno,
)
from libc.stdint cimport uint32_t, uint64_t
from posix.fcntl cimport F_GETFL, O_NONBLOCK, fcntl
from posix.mman cimport MAP_ANONYMOUS, MAP_FAILED, MAP_SHARED, PROT_READ, PROT_WRITE, mmap, munmap
from posix.time cimport timeval

from fastsock._native cimport (
    EWOULDBLOCK,
    FIONREAD,
    MSG_PEEK,
    SHUT_RD,
    SHUT_RDWR,
    SO_RCVTIMEO,
    SOL_SOCKET,
    fastsock_counter_add,
    fastsock_counter_add_fetch,
    fastsock_counter_load,
    fastsock_counter_store,
    ioctl,
    monotonic_ns,
    raise_errno,
    recv,
    seconds_to_ns,
    seconds_to_timeval,
    setsockopt,
    shutdown,
)
from fastsock._framing cimport (
    FRAMER_OK,
    FRAMER_PROTOCOL_ERROR,
    FRAMER_SPANS_FULL,
    framer_held_bytes,
)

from fastsock._protocol_errors import PROTOCOL_ERRORS, numbered
from fastsock.constants import RECEIVE_CHECK_INTERVAL, RECV_SIZE, SPANS_PER_PUBLISH
from fastsock.stats import ReceiveStats


cdef enum:
    STOP_WORD = COUNTER_SLOTS
    LAST_CONNECTION_ID_WORD
    PARTIAL_BYTES_WORD
    MAPPED_WORDS


END_NAMES = {
    END_EOF: "eof",
    END_STOPPED: "stopped",
    END_RESET: "reset",
    END_IDLE_TIMEOUT: "idle_timeout",
    END_MESSAGE_TIMEOUT: "message_timeout",
    END_EVICTED_IDLE: "evicted_idle",
    END_EVICTED_MEMORY: "evicted_memory",
    END_RING_CLOSED: "ring_closed",
    END_NO_MEMORY: "no_memory",
    END_OS_ERROR: "os_error",
}


cdef int set_receive_timeout(int fd, double seconds) except -1:
    # A blocking recv() that returns every so often while the peer is silent: the loop then
    # sees stop requests, signals and idle timeouts without a poll() per recv().
    cdef int flags = fcntl(fd, F_GETFL)
    cdef timeval interval = seconds_to_timeval(seconds)
    if flags < 0:
        raise_errno(errno)
    if flags & O_NONBLOCK:
        raise ValueError("the socket must be blocking: call settimeout(None) first")
    if setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &interval, sizeof(interval)) != 0:
        raise_errno(errno)
    return 0


cdef class ReceiveCounters:

    def __cinit__(self):
        cdef void* mapping = mmap(NULL, MAPPED_WORDS * sizeof(uint64_t), PROT_READ | PROT_WRITE,
                                  MAP_SHARED | MAP_ANONYMOUS, -1, 0)
        if mapping == MAP_FAILED:
            raise_errno(errno)
        self.values = <uint64_t*>mapping

    def __dealloc__(self):
        if self.values != NULL:
            munmap(self.values, MAPPED_WORDS * sizeof(uint64_t))

    cdef void add(self, ReceiveCounter counter, uint64_t amount) noexcept nogil:
        fastsock_counter_add(&self.values[<int>counter], amount)

    cdef void count_protocol_error(self, ProtocolError kind) noexcept nogil:
        fastsock_counter_add(&self.values[<int>COUNT_PROTOCOL_ERRORS + <int>kind - 1], 1)

    cdef bint stopping(self) noexcept nogil:
        return fastsock_counter_load(&self.values[<int>STOP_WORD]) != 0

    cdef uint64_t hold_partial(self, uint64_t held, uint64_t now) noexcept nogil:
        # Unsigned arithmetic wraps, so a shrinking share subtracts.
        return fastsock_counter_add_fetch(&self.values[<int>PARTIAL_BYTES_WORD], now - held)

    def count_proxy_header(self, uint64_t received, bint failed):
        """A PROXY header read in Python (the per-connection path): its bytes were received;
        if it failed, they were discarded and the connection counts as a header error."""
        self.add(COUNT_BYTES_RECEIVED, received)
        if failed:
            self.add(COUNT_BYTES_DISCARDED, received)
            self.add(COUNT_PROXY_HEADER_ERRORS, 1)

    def request_stop(self):
        """Stop every loop counting here, in this process and in forked ones."""
        fastsock_counter_store(&self.values[<int>STOP_WORD], 1)

    @property
    def partial_bytes(self):
        """Bytes of incomplete messages held by every loop counting here, now."""
        return fastsock_counter_load(&self.values[<int>PARTIAL_BYTES_WORD])

    @property
    def stop_requested(self):
        return bool(self.stopping())

    cdef uint32_t take_connection_id(self) noexcept nogil:
        return <uint32_t>fastsock_counter_add_fetch(&self.values[<int>LAST_CONNECTION_ID_WORD], 1)

    def count_refusal(self):
        """A connection was refused: max_connections were open and none could be evicted."""
        self.add(COUNT_CONNECTIONS_REFUSED, 1)

    def next_connection_id(self):
        """A connection id unique among every process sharing these counters (wraps at 2**32)."""
        return self.take_connection_id()

    def snapshot(self):
        cdef uint64_t[COUNTER_SLOTS] values
        cdef int slot
        for slot in range(<int>COUNTER_SLOTS):
            values[slot] = fastsock_counter_load(&self.values[slot])
        return ReceiveStats(
            connections_opened=values[<int>COUNT_CONNECTIONS_OPENED],
            connections_closed=values[<int>COUNT_CONNECTIONS_CLOSED],
            bytes_received=values[<int>COUNT_BYTES_RECEIVED],
            messages_received=values[<int>COUNT_MESSAGES_RECEIVED],
            messages_dropped=values[<int>COUNT_MESSAGES_DROPPED],
            bytes_discarded=values[<int>COUNT_BYTES_DISCARDED],
            proxy_header_errors=values[<int>COUNT_PROXY_HEADER_ERRORS],
            tls_handshake_errors=values[<int>COUNT_TLS_HANDSHAKE_ERRORS],
            resets=values[<int>COUNT_RESETS],
            idle_timeouts=values[<int>COUNT_IDLE_TIMEOUTS],
            message_timeouts=values[<int>COUNT_MESSAGE_TIMEOUTS],
            idle_evictions=values[<int>COUNT_IDLE_EVICTIONS],
            memory_evictions=values[<int>COUNT_MEMORY_EVICTIONS],
            bytes_unread=values[<int>COUNT_BYTES_UNREAD],
            connections_refused=values[<int>COUNT_CONNECTIONS_REFUSED],
            partial_bytes=fastsock_counter_load(&self.values[<int>PARTIAL_BYTES_WORD]),
            pauses=values[<int>COUNT_PAUSES],
            paused_seconds=values[<int>COUNT_PAUSED_NS] / 1e9,
            **{kind.counter: values[<int>COUNT_PROTOCOL_ERRORS + index]
               for index, kind in enumerate(PROTOCOL_ERRORS)},
        )


cdef enum:
    LEDGER_OPEN
    LEDGER_HELD_BYTES
    LEDGER_WORDS


cdef class ConnectionLedger:

    def __cinit__(self):
        cdef void* mapping = mmap(NULL, LEDGER_WORDS * sizeof(uint64_t), PROT_READ | PROT_WRITE,
                                  MAP_SHARED | MAP_ANONYMOUS, -1, 0)
        if mapping == MAP_FAILED:
            raise_errno(errno)
        self.words = <uint64_t*>mapping

    def __dealloc__(self):
        if self.words != NULL:
            munmap(self.words, LEDGER_WORDS * sizeof(uint64_t))

    def settle(self, ReceiveCounters counters not None):
        """Count the connection closed, and its partial message discarded, if its loop never
        closed it (its process was killed); True if it had to."""
        cdef uint64_t held = fastsock_counter_load(&self.words[<int>LEDGER_HELD_BYTES])
        if not fastsock_counter_load(&self.words[<int>LEDGER_OPEN]):
            return False
        counters.add(COUNT_BYTES_DISCARDED, held)
        counters.hold_partial(held, 0)
        counters.add(COUNT_CONNECTIONS_CLOSED, 1)
        fastsock_counter_store(&self.words[<int>LEDGER_HELD_BYTES], 0)
        fastsock_counter_store(&self.words[<int>LEDGER_OPEN], 0)
        return True


cdef class StreamReceiver:

    def __cinit__(self, int fd, Framer framer not None, RingQueue ring not None,
                  ReceiveCounters counters not None, uint32_t source_id=0, *,
                  Py_ssize_t recv_size=RECV_SIZE, idle_timeout=None, message_timeout=None,
                  double drain_timeout=0.0, partial_budget=None, on_over_budget=None,
                  double check_interval=RECEIVE_CHECK_INTERVAL,
                  Py_ssize_t spans_per_publish=SPANS_PER_PUBLISH,
                  ConnectionLedger ledger=None):
        if fd < 0:
            raise ValueError(f"fd must be an open file descriptor, not {fd}")
        if recv_size < 1 or spans_per_publish < 1 or not check_interval > 0:
            raise ValueError("recv_size, spans_per_publish and check_interval must be positive")
        if idle_timeout is not None and not idle_timeout > 0:
            raise ValueError(f"idle_timeout must be positive or None, not {idle_timeout!r}")
        if message_timeout is not None and not message_timeout > 0:
            raise ValueError(
                f"message_timeout must be positive or None, not {message_timeout!r}")
        if not drain_timeout >= 0:
            raise ValueError(f"drain_timeout must not be negative, not {drain_timeout!r}")
        if partial_budget is not None and not partial_budget > 0:
            raise ValueError(f"partial_budget must be positive or None, not {partial_budget!r}")
        set_receive_timeout(fd, check_interval)
        self.spans = <MessageSpan*>PyMem_RawMalloc(spans_per_publish * sizeof(MessageSpan))
        if self.spans == NULL:
            raise MemoryError()
        self.fd = fd
        self.framer = framer
        self.ring = ring
        self.counters = counters
        self.source_id = source_id
        self.recv_size = recv_size
        self.max_spans = spans_per_publish
        self.check_interval_ns = seconds_to_ns(check_interval)
        self.idle_timeout_ns = 0 if idle_timeout is None else seconds_to_ns(idle_timeout)
        self.message_timeout_ns = (
            0 if message_timeout is None else seconds_to_ns(message_timeout))
        self.drain_timeout_ns = seconds_to_ns(drain_timeout)
        self.partial_budget = 0 if partial_budget is None else partial_budget
        self.on_over_budget = on_over_budget
        self.status = FRAMER_OK
        self.last_data_ns = monotonic_ns()
        counters.add(COUNT_CONNECTIONS_OPENED, 1)
        self.ledger = ledger
        if ledger is not None:
            fastsock_counter_store(&ledger.words[<int>LEDGER_OPEN], 1)

    def __dealloc__(self):
        PyMem_RawFree(self.spans)

    def run(self):
        """Receive until the connection ends; return the name of the end."""
        cdef StreamEnd end
        if self.closed:
            raise ValueError("the receiver is closed")
        self.last_data_ns = monotonic_ns()
        while True:
            with nogil:
                end = self.pump()
                if end != END_CHECK_IN:
                    self.count_unread()
            if end == END_PROTOCOL_ERROR:
                return numbered(self.framer.state.failed).name
            if end != END_CHECK_IN:
                return END_NAMES[end]
            PyErr_CheckSignals()
            if self.over_budget:
                self.over_budget = False
                if self.on_over_budget is not None:
                    self.on_over_budget()

    def stop(self):
        """Ask run() to stop gracefully, from any thread: within one check interval the loop
        shuts the socket both ways (the peer can send no more), hands over what the kernel
        already holds, and returns "stopped" once that is read or drain_timeout passed."""
        if self.stop_requested == STOP_NONE:
            self.stop_requested = STOP_ASKED

    def evict(self, str reason):
        """End run() now with "evicted_idle" or "evicted_memory"; safe from any thread while
        the socket is open."""
        if reason == "idle":
            self.stop_requested = STOP_EVICT_IDLE
            self.counters.add(COUNT_IDLE_EVICTIONS, 1)
        elif reason == "memory":
            self.stop_requested = STOP_EVICT_MEMORY
            self.counters.add(COUNT_MEMORY_EVICTIONS, 1)
        else:
            raise ValueError(f"reason must be 'idle' or 'memory', not {reason!r}")
        # Wakes a recv() blocked on this socket instead of waiting for its check interval.
        shutdown(self.fd, SHUT_RD)

    @property
    def idle_seconds(self):
        """Seconds since the peer last sent anything (or since the receiver was made); 0 while
        the loop waits for ring room, which is backpressure, not silence."""
        if self.paused:
            return 0.0
        return (monotonic_ns() - self.last_data_ns) / 1e9

    def offending_sample(self, Py_ssize_t limit):
        """The start of the line or frame a framing error ended run() on; b"" otherwise."""
        if self.closed:
            return b""
        return self.framer.peek_pending(limit)

    def close(self):
        """Account for what the connection leaves behind; idempotent."""
        cdef Py_ssize_t index
        cdef uint64_t unpublished_bytes = 0
        if self.closed:
            return
        self.closed = True
        for index in range(self.published, self.nspans):
            unpublished_bytes += self.spans[index].length
        self.counters.add(COUNT_MESSAGES_DROPPED, self.nspans - self.published)
        self.counters.add(COUNT_BYTES_DISCARDED,
                          unpublished_bytes + self.framer.discard_pending())
        self.published = self.nspans = 0
        self.counters.hold_partial(self.held_bytes, 0)
        self.held_bytes = 0
        self.counters.add(COUNT_CONNECTIONS_CLOSED, 1)
        # Last: a process killed between the counts above and this store is settled twice,
        # one killed before them not at all; the window is a few instructions either way.
        if self.ledger is not None:
            fastsock_counter_store(&self.ledger.words[<int>LEDGER_HELD_BYTES], 0)
            fastsock_counter_store(&self.ledger.words[<int>LEDGER_OPEN], 0)

    cdef StreamEnd pump(self) noexcept nogil:
        cdef uint64_t check_at = monotonic_ns() + self.check_interval_ns
        cdef uint64_t now
        cdef ssize_t received
        cdef int error
        cdef uint64_t held, total
        cdef char probe
        cdef StreamEnd end = self.deliver()
        while end == END_RECEIVING:
            end = self.stop_end()
            if end != END_RECEIVING:
                return end
            if self.buffer_released:
                # Waits for the peer's next byte without holding a buffer for it.
                received = recv(self.fd, &probe, 1, MSG_PEEK)
                if received > 0:
                    self.buffer_released = False
                    continue
            else:
                if self.framer.reserve(self.recv_size) != 0:
                    return END_NO_MEMORY
                received = recv(self.fd, self.framer.write_pointer(), self.framer.write_space(),
                                0)
            if received > 0:
                # Before the messages are published, so that a consumer who sees them sees
                # the connection as active (a publish that pauses restarts it on resuming).
                self.last_data_ns = monotonic_ns()
                self.counters.add(COUNT_BYTES_RECEIVED, received)
                self.frame(received)
                end = self.deliver()
                if end != END_RECEIVING:
                    return end
                now = monotonic_ns()
                held = framer_held_bytes(&self.framer.state)
                if held != self.held_bytes:
                    # The shared gauge is one cache line for every loop of the process: left
                    # alone while this loop's share stands still (most recvs end on a message
                    # boundary).  A loop whose share grows sees the total it makes.
                    total = self.counters.hold_partial(self.held_bytes, held)
                    self.held_bytes = held
                    if self.ledger is not None:
                        fastsock_counter_store(&self.ledger.words[<int>LEDGER_HELD_BYTES], held)
                    if self.partial_budget and held and total > self.partial_budget:
                        self.over_budget = True
                if self.message_overdue(now):
                    return END_MESSAGE_TIMEOUT
                if now >= check_at or self.over_budget:
                    return END_CHECK_IN
                continue
            if received == 0:
                if self.draining:
                    # Everything the peer sent before the stop has been handed over.
                    return END_STOPPED
                # An eviction shuts the socket down for reading to wake this recv().
                end = self.stop_end()
                return END_EOF if end == END_RECEIVING else end
            error = errno
            if error == EINTR:
                return END_CHECK_IN
            if error == EAGAIN or error == EWOULDBLOCK:
                # SO_RCVTIMEO expired: the peer was silent for a check interval.
                self.buffer_released = self.framer.release_if_empty()
                now = monotonic_ns()
                if self.idle_timeout_ns and now - self.last_data_ns >= self.idle_timeout_ns:
                    self.counters.add(COUNT_IDLE_TIMEOUTS, 1)
                    return END_IDLE_TIMEOUT
                if self.message_overdue(now):
                    return END_MESSAGE_TIMEOUT
                return END_CHECK_IN
            self.last_errno = error
            if (error == ECONNRESET or error == ETIMEDOUT or error == ECONNABORTED
                    or error == ENOTCONN):
                self.counters.add(COUNT_RESETS, 1)
                return END_RESET
            return END_OS_ERROR
        return end

    cdef StreamEnd stop_end(self) noexcept nogil:
        # END_RECEIVING unless an eviction was asked for, or a stop's drain is over.
        cdef StopReason reason = self.stop_requested
        if reason == STOP_EVICT_IDLE:
            return END_EVICTED_IDLE
        if reason == STOP_EVICT_MEMORY:
            return END_EVICTED_MEMORY
        if not self.draining:
            if reason != STOP_ASKED and not self.counters.stopping():
                return END_RECEIVING
            # Shut both ways: our FIN puts a TCP socket in FIN-WAIT, where the kernel answers
            # any further data with a reset instead of acknowledging it (RFC 1122), and a
            # Unix peer's sends fail.  What the kernel holds now is then all the peer was
            # told was delivered, and the loop reads it to the end (recv() returns 0).
            self.draining = True
            self.drain_deadline_ns = monotonic_ns() + self.drain_timeout_ns
            shutdown(self.fd, SHUT_RDWR)
        if monotonic_ns() >= self.drain_deadline_ns:
            return END_STOPPED
        return END_RECEIVING

    cdef void count_unread(self) noexcept nogil:
        # Bytes the kernel accepted for this connection that no recv() will take: left at
        # a stop's deadline, or behind an end the loop chose (a protocol error, an eviction).
        cdef int queued = 0
        if self.unread_counted:
            return
        self.unread_counted = True
        if ioctl(self.fd, FIONREAD, &queued) == 0 and queued > 0:
            self.counters.add(COUNT_BYTES_UNREAD, <uint64_t>queued)

    cdef bint message_overdue(self, uint64_t now) noexcept nogil:
        # The deadline is per message: a trickle that keeps the connection busy cannot
        # stretch one message forever, while a stream of complete messages never trips it.
        if framer_held_bytes(&self.framer.state) == 0:
            self.message_started_ns = 0
            return False
        if self.message_started_ns == 0 or self.framer.state.messages_out != self.messages_at_start:
            self.message_started_ns = now
            self.messages_at_start = self.framer.state.messages_out
            return False
        if self.message_timeout_ns and now - self.message_started_ns >= self.message_timeout_ns:
            self.counters.add(COUNT_MESSAGE_TIMEOUTS, 1)
            return True
        return False

    cdef void frame(self, Py_ssize_t received) noexcept nogil:
        self.published = 0
        self.status = self.framer.commit(received, self.spans, self.max_spans, &self.nspans)

    cdef StreamEnd deliver(self) noexcept nogil:
        cdef StreamEnd end
        while True:
            end = self.publish_pending()
            if end != END_RECEIVING:
                return end
            self.framer.consume()
            if self.status == FRAMER_SPANS_FULL:
                self.frame(0)
                continue
            if self.status == FRAMER_PROTOCOL_ERROR:
                self.counters.count_protocol_error(<ProtocolError>self.framer.state.failed)
                return END_PROTOCOL_ERROR
            return END_RECEIVING

    cdef StreamEnd publish_pending(self) noexcept nogil:
        cdef Py_ssize_t published
        cdef int resumed
        cdef uint64_t paused_at
        cdef StreamEnd end
        while self.published < self.nspans:
            if self.paused:
                # Resuming: the silence clock restarts before a consumer can see the messages.
                self.last_data_ns = monotonic_ns()
            published = self.ring.put_spans(
                self.framer.base(), self.spans + self.published, self.nspans - self.published,
                self.source_id)
            if published < 0:
                return END_RING_CLOSED
            if published > 0:
                self.counters.add(COUNT_MESSAGES_RECEIVED, published)
                self.published += published
                self.paused = False
                continue
            # Full: stop reading, so the kernel's window pushes back on the peer.
            if not self.paused:
                self.paused = True
                self.counters.add(COUNT_PAUSES, 1)
                if not self.ring_mapped:
                    # A loop the ring holds back will write all over it: in a forked process
                    # one pass now saves a page fault per ring page later.
                    self.ring.map_pages()
                    self.ring_mapped = True
            paused_at = monotonic_ns()
            resumed = self.ring.wait_resume(self.spans[self.published].length,
                                            self.check_interval_ns / 1e9)
            self.counters.add(COUNT_PAUSED_NS, monotonic_ns() - paused_at)
            if resumed < 0:
                return END_RING_CLOSED
            # A graceful stop still delivers what was framed while the consumer drains, until
            # its deadline.
            end = self.stop_end()
            if end != END_RECEIVING:
                return end
            if resumed == 0:
                return END_CHECK_IN
        return END_RECEIVING
