"""Compiled datagram receive loop; fastsock/_dgramloop.pyi documents it.

A DatagramReceiver runs with the GIL released and takes it back only every check interval,
or when it must report an end, so it receives in parallel with a Python consumer.  A
datagram the ring cannot take is dropped and counted at once: waiting would only move the
loss into the kernel's receive queue, where nobody sees it.
"""

from cpython.exc cimport PyErr_CheckSignals
from cpython.mem cimport PyMem_RawCalloc, PyMem_RawFree, PyMem_RawMalloc
from libc.errno cimport EAGAIN, EINTR, ENOMEM, errno
from libc.stdint cimport INT32_MAX, uint32_t, uint64_t
from posix.fcntl cimport F_GETFL, O_NONBLOCK, fcntl
from posix.mman cimport MAP_ANONYMOUS, MAP_FAILED, MAP_SHARED, PROT_READ, PROT_WRITE, mmap, munmap
from posix.time cimport timeval

from fastsock._native cimport (
    EWOULDBLOCK,
    MSG_TRUNC,
    SO_RCVBUF,
    SO_RCVTIMEO,
    SO_TYPE,
    SOCK_DGRAM,
    SOL_SOCKET,
    fastsock_counter_add,
    fastsock_counter_add_release,
    fastsock_counter_load,
    fastsock_counter_load_acquire,
    fastsock_read_drops,
    fastsock_receive_datagrams,
    getsockopt,
    monotonic_ns,
    raise_errno,
    sched_yield,
    seconds_to_ns,
    seconds_to_timeval,
    setsockopt,
    socklen_t,
)
from fastsock._ring cimport MAX_SOURCE_LEN, MessageView

import operator

from fastsock.constants import (
    DATAGRAM_ANNOUNCE_AFTER,
    DATAGRAM_BATCH,
    DATAGRAM_BUSY_POLL,
    DATAGRAM_COUNT_WAIT,
    DATAGRAM_MAX_SIZE,
    RECEIVE_CHECK_INTERVAL,
)
from fastsock.stats import DatagramStats


# recvmmsg() takes at most UIO_MAXIOV datagrams per call.
cdef unsigned int MAX_BATCH = 1024
cdef int MAX_RECEIVE_BUFFER = 2**31 - 1
# A day: far beyond any useful check interval, well within timeval and uint64 nanoseconds.
cdef double MAX_CHECK_INTERVAL = 86400.0

END_NAMES = {
    END_STOPPED: "stopped",
    END_RING_CLOSED: "ring_closed",
    END_NO_MEMORY: "no_memory",
    END_OS_ERROR: "os_error",
}


cdef int socket_option(int fd, int name) except? -1:
    cdef int value = 0
    cdef socklen_t length = sizeof(value)
    if getsockopt(fd, SOL_SOCKET, name, &value, &length) != 0:
        raise_errno(errno, "getsockopt")
    return value


cdef int set_socket_option(int fd, int name, const void* value, socklen_t length) except -1:
    if setsockopt(fd, SOL_SOCKET, name, value, length) != 0:
        raise_errno(errno, "setsockopt")
    return 0


cdef int require_blocking_datagram_socket(int fd) except -1:
    cdef int flags = fcntl(fd, F_GETFL)
    if flags < 0:
        raise_errno(errno, "fcntl")
    if socket_option(fd, SO_TYPE) != SOCK_DGRAM:
        raise ValueError(f"fd {fd} is not a datagram socket")
    if flags & O_NONBLOCK:
        raise ValueError("the socket must be blocking: call settimeout(None) first")
    return 0


cdef class DatagramCounters:

    def __cinit__(self):
        cdef void* mapping = mmap(NULL, DATAGRAM_COUNTER_SLOTS * sizeof(uint64_t),
                                  PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0)
        if mapping == MAP_FAILED:
            raise_errno(errno, "mmap")
        self.values = <uint64_t*>mapping

    def __dealloc__(self):
        if self.values != NULL:
            munmap(self.values, DATAGRAM_COUNTER_SLOTS * sizeof(uint64_t))

    cdef void add(self, DatagramCounter counter, uint64_t amount) noexcept nogil:
        fastsock_counter_add(&self.values[<int>counter], amount)

    def _start_publish(self):
        """For tests: what a loop adds before it publishes a batch, without the count it
        adds after (as if its process were killed in between)."""
        self.add(COUNT_PUBLISHES_STARTED, 1)

    def _finish_publish(self):
        """For tests: what a loop adds once a batch's counts are all added."""
        fastsock_counter_add_release(&self.values[<int>COUNT_PUBLISHES_COUNTED], 1)

    def snapshot(self):
        cdef uint64_t[DATAGRAM_COUNTER_SLOTS] values
        cdef int slot
        cdef uint64_t started = fastsock_counter_load(&self.values[<int>COUNT_PUBLISHES_STARTED])
        cdef uint64_t counted = fastsock_counter_load_acquire(
            &self.values[<int>COUNT_PUBLISHES_COUNTED])
        cdef uint64_t given_up = self.publishes_given_up
        cdef uint64_t give_up_at
        if counted + given_up > started:
            # Some publishes given up on were slow, not dead: wait for later ones again.
            given_up = started - counted if started > counted else 0
        if counted + given_up < started:
            give_up_at = monotonic_ns() + seconds_to_ns(DATAGRAM_COUNT_WAIT)
            with nogil:
                # A datagram a consumer took may be in a batch whose counts are still being
                # added: wait for those (acquire: then their counts are seen whole).
                while counted + given_up < started:
                    if monotonic_ns() >= give_up_at:
                        # Their process died in between (a killed prefork worker): no later
                        # snapshot waits for them again.
                        given_up = started - counted
                        break
                    sched_yield()
                    counted = fastsock_counter_load_acquire(
                        &self.values[<int>COUNT_PUBLISHES_COUNTED])
        self.publishes_given_up = given_up
        for slot in range(<int>DATAGRAM_COUNTER_SLOTS):
            values[slot] = fastsock_counter_load(&self.values[slot])
        return DatagramStats(
            datagrams_received=values[<int>COUNT_DATAGRAMS_RECEIVED],
            bytes_received=values[<int>COUNT_BYTES_RECEIVED],
            dropped_queue_full=values[<int>COUNT_DROPPED_QUEUE_FULL],
            dropped_queue_full_bytes=values[<int>COUNT_DROPPED_QUEUE_FULL_BYTES],
            truncated=values[<int>COUNT_TRUNCATED],
            kernel_drops=values[<int>COUNT_KERNEL_DROPS],
            receive_calls=values[<int>COUNT_RECEIVE_CALLS],
            datagrams_unread=values[<int>COUNT_DATAGRAMS_UNREAD],
        )


cdef class DatagramReceiver:

    def __cinit__(self, int fd, RingQueue ring not None, DatagramCounters counters not None, *,
                  Py_ssize_t max_datagram=DATAGRAM_MAX_SIZE, Py_ssize_t batch=DATAGRAM_BATCH,
                  double check_interval=RECEIVE_CHECK_INTERVAL, receive_buffer=None,
                  double busy_poll=DATAGRAM_BUSY_POLL, double drain_timeout=0.0):
        cdef timeval interval
        cdef int requested_buffer = 0
        cdef unsigned int index
        if fd < 0:
            raise ValueError(f"fd must be an open file descriptor, not {fd}")
        if not 1 <= max_datagram <= ring.max_bytes:
            raise ValueError(f"max_datagram must be between 1 and the ring's max_bytes "
                             f"({ring.max_bytes}), not {max_datagram}")
        if not 1 <= batch <= MAX_BATCH:
            raise ValueError(f"batch must be between 1 and {MAX_BATCH}, not {batch}")
        if not 0 < check_interval <= MAX_CHECK_INTERVAL:
            raise ValueError(f"check_interval must be > 0 and <= {MAX_CHECK_INTERVAL} seconds, "
                             f"not {check_interval}")
        if not drain_timeout >= 0:
            raise ValueError(f"drain_timeout must not be negative, not {drain_timeout!r}")
        if not 0 <= busy_poll <= check_interval:
            raise ValueError(f"busy_poll must be between 0 and check_interval "
                             f"({check_interval}) seconds, not {busy_poll}")
        if receive_buffer is not None:
            receive_buffer = operator.index(receive_buffer)
            if not 1 <= receive_buffer <= MAX_RECEIVE_BUFFER:
                raise ValueError(f"receive_buffer must be between 1 and {MAX_RECEIVE_BUFFER} "
                                 f"or None, not {receive_buffer}")
            requested_buffer = receive_buffer
        require_blocking_datagram_socket(fd)

        self.messages = <mmsghdr*>PyMem_RawCalloc(batch, sizeof(mmsghdr))
        self.slots = <DatagramSlot*>PyMem_RawCalloc(batch, sizeof(DatagramSlot))
        self.payloads = <char*>PyMem_RawMalloc(<size_t>batch * <size_t>max_datagram)
        self.views = <MessageView*>PyMem_RawCalloc(batch, sizeof(MessageView))
        if (self.messages == NULL or self.slots == NULL or self.payloads == NULL
                or self.views == NULL):
            raise MemoryError()
        for index in range(<unsigned int>batch):
            self.slots[index].payload.iov_base = self.payloads + <size_t>index * max_datagram
            self.slots[index].payload.iov_len = max_datagram
            self.messages[index].msg_hdr.msg_name = &self.slots[index].sender
            self.messages[index].msg_hdr.msg_iov = &self.slots[index].payload
            self.messages[index].msg_hdr.msg_iovlen = 1
            self.rearm(index)

        if requested_buffer:
            set_socket_option(fd, SO_RCVBUF, &requested_buffer, sizeof(requested_buffer))
        # A blocking receive that returns every check interval while the socket is silent:
        # the loop then sees stop requests and signals without a poll() per call.
        interval = seconds_to_timeval(check_interval)
        set_socket_option(fd, SO_RCVTIMEO, &interval, sizeof(interval))
        # Drops before this receiver existed are not its to count.
        fastsock_read_drops(fd, &self.drops_seen)

        self.fd = fd
        self.ring = ring
        self.counters = counters
        self.batch = <unsigned int>batch
        self.check_interval_ns = <uint64_t>(check_interval * 1e9)
        self.announce_after = max(<unsigned int>batch, DATAGRAM_ANNOUNCE_AFTER)
        self.busy_poll_ns = <uint64_t>(busy_poll * 1e9)
        self.drain_timeout_ns = seconds_to_ns(drain_timeout)

    def __dealloc__(self):
        PyMem_RawFree(self.views)
        PyMem_RawFree(self.payloads)
        PyMem_RawFree(self.slots)
        PyMem_RawFree(self.messages)

    @property
    def receive_buffer(self):
        return socket_option(self.fd, SO_RCVBUF)

    def run(self):
        """Receive until stopped or failed; return the name of the end."""
        cdef DatagramEnd end
        if self.running:
            raise RuntimeError("run() is already running in another thread")
        self.running = True
        try:
            while True:
                if self.ring.closed:
                    return END_NAMES[END_RING_CLOSED]
                with nogil:
                    end = self.pump()
                    self.ring.wake_consumers()
                if end != END_CHECK_IN:
                    self.read_kernel_drops()
                    return END_NAMES[end]
                PyErr_CheckSignals()
        finally:
            self.running = False

    def stop(self):
        """Stop gracefully, from any thread: within one check interval the loop reads what is
        queued on the socket (see drain()) and run() returns "stopped"."""
        self.stop_requested = 1

    cdef DatagramEnd pump(self) noexcept nogil:
        cdef uint64_t check_at = monotonic_ns() + self.check_interval_ns
        cdef uint64_t now
        cdef int received
        cdef int error
        cdef bint wake
        cdef DatagramEnd end
        # Datagrams published since the consumers were last woken.  While the socket keeps
        # a backlog (full batches) they are woken once per announce_after datagrams, not per
        # batch: on a core shared with the consumer, each wake-up is two context switches.
        cdef unsigned int unannounced = 0
        # After a busy batch (a quarter of the batch or more), receives do not wait until
        # this time: the loop asks again, yielding the core in between, so that senders
        # find it awake.  Waking a sleeping receiver is work done by the sender (on
        # loopback, by the sending process itself) for every datagram that finds it asleep.
        cdef uint64_t poll_until = 0
        while not self.stop_requested:
            received = fastsock_receive_datagrams(self.fd, self.messages, self.batch,
                                                  unannounced == 0 and poll_until == 0)
            if received < 0:
                error = errno
                if (unannounced or poll_until) and (error == EAGAIN or error == EWOULDBLOCK):
                    if unannounced:
                        # The backlog is gone: wake the consumers before the loop waits.
                        self.ring.wake_consumers()
                        unannounced = 0
                    if poll_until:
                        if monotonic_ns() < poll_until:
                            sched_yield()
                        else:
                            poll_until = 0
                    continue
                if error == EAGAIN or error == EWOULDBLOCK or error == EINTR:
                    # SO_RCVTIMEO expired (the socket was silent for a check interval) or a
                    # signal arrived: either way the caller takes its turn.
                    return self.check_in()
                return self.receive_failed(error)
            self.counters.add(COUNT_RECEIVE_CALLS, 1)
            unannounced += <unsigned int>received
            wake = <unsigned int>received < self.batch or unannounced >= self.announce_after
            end = self.deliver(<unsigned int>received, wake)
            if wake:
                unannounced = 0
            if end != END_RECEIVING:
                return end
            now = monotonic_ns()
            if self.busy_poll_ns and <unsigned int>received * 4 >= self.batch:
                poll_until = now + self.busy_poll_ns
            if now >= check_at:
                return self.check_in()
        return self.drain()

    cdef DatagramEnd deliver(self, unsigned int received, bint wake) noexcept nogil:
        # The whole batch goes to the ring in one call: one lock and at most one wake-up.
        cdef unsigned int index
        cdef msghdr* header
        cdef MessageView* view
        cdef Py_ssize_t offered = 0
        cdef Py_ssize_t published = 0
        cdef uint64_t offered_bytes = 0
        cdef uint64_t published_bytes = 0
        cdef uint64_t truncated = 0
        cdef bint closed
        for index in range(received):
            header = &self.messages[index].msg_hdr
            if header.msg_flags & MSG_TRUNC:
                truncated += 1
            else:
                view = &self.views[offered]
                view.data = <const char*>header.msg_iov.iov_base
                view.length = self.messages[index].msg_len
                view.source = <const char*>header.msg_name
                view.source_len = min(<Py_ssize_t>header.msg_namelen,
                                      <Py_ssize_t>MAX_SOURCE_LEN)
                offered += 1
                offered_bytes += view.length
            self.rearm(index)
        if offered:
            # Before the ring lock's release makes the batch visible (see snapshot()).
            self.counters.add(COUNT_PUBLISHES_STARTED, 1)
            published = self.ring.offer_messages(self.views, offered, 0, &published_bytes,
                                                 wake)
        elif wake:
            # Every datagram of this batch was too long, but earlier ones may wait unannounced.
            self.ring.wake_consumers()
        # A closed ring refuses the whole batch, and counts none of it as dropped itself.
        closed = published < 0
        if closed:
            published = 0
        if published:
            self.counters.add(COUNT_DATAGRAMS_RECEIVED, published)
            self.counters.add(COUNT_BYTES_RECEIVED, published_bytes)
        if offered > published:
            self.counters.add(COUNT_DROPPED_QUEUE_FULL, offered - published)
            self.counters.add(COUNT_DROPPED_QUEUE_FULL_BYTES, offered_bytes - published_bytes)
        if truncated:
            self.counters.add(COUNT_TRUNCATED, truncated)
        if offered:
            fastsock_counter_add_release(&self.counters.values[<int>COUNT_PUBLISHES_COUNTED], 1)
        return END_RING_CLOSED if closed else END_RECEIVING

    cdef DatagramEnd check_in(self) noexcept nogil:
        self.read_kernel_drops()
        return END_CHECK_IN

    cdef DatagramEnd drain(self) noexcept nogil:
        # A stop: the datagrams queued on the socket are read and published (or dropped as
        # ever when the ring is full) until the socket is empty, within drain_timeout.  A
        # sender still flooding then keeps it from emptying: what is queued at the deadline
        # is read and counted in datagrams_unread, for at most one more check interval.
        cdef uint64_t deadline = monotonic_ns() + self.drain_timeout_ns
        cdef int received
        cdef unsigned int index
        cdef DatagramEnd end
        while monotonic_ns() < deadline:
            received = fastsock_receive_datagrams(self.fd, self.messages, self.batch, False)
            if received < 0:
                if errno == EINTR:
                    continue
                return self.receive_failed(errno)
            self.counters.add(COUNT_RECEIVE_CALLS, 1)
            end = self.deliver(<unsigned int>received, True)
            if end != END_RECEIVING:
                return end
        deadline = monotonic_ns() + self.check_interval_ns
        while monotonic_ns() < deadline:
            received = fastsock_receive_datagrams(self.fd, self.messages, self.batch, False)
            if received < 0:
                if errno == EINTR:
                    continue
                return self.receive_failed(errno)
            for index in range(<unsigned int>received):
                self.rearm(index)
            self.counters.add(COUNT_DATAGRAMS_UNREAD, <uint64_t>received)
        return END_STOPPED

    cdef DatagramEnd receive_failed(self, int error) noexcept nogil:
        # A stop's drain ends when the socket has nothing more (EAGAIN).
        if error == EAGAIN or error == EWOULDBLOCK:
            return END_STOPPED
        self.last_errno = error
        return END_NO_MEMORY if error == ENOMEM else END_OS_ERROR

    cdef void read_kernel_drops(self) noexcept nogil:
        # Read once per check interval rather than attached to every datagram (SO_RXQ_OVFL):
        # once the socket had dropped anything, that attachment cost the loop about a tenth
        # of its rate.  The counter is 32 bits wide and wraps; it never gains 2**31 between
        # two reads, so a move backwards cannot happen and is ignored.
        cdef uint32_t drops
        cdef uint32_t advance
        if fastsock_read_drops(self.fd, &drops):
            advance = drops - self.drops_seen
            if 0 < advance <= INT32_MAX:
                self.drops_seen = drops
                self.counters.add(COUNT_KERNEL_DROPS, advance)

    cdef void rearm(self, unsigned int index) noexcept nogil:
        # The kernel overwrites these lengths with what it filled in.
        self.messages[index].msg_hdr.msg_namelen = sizeof(sockaddr_storage)
