"""Compiled load generator and C-level sinks; fastsock/bench/_loadgen.pyi documents them.

Each function checks its arguments with the GIL, runs its whole socket loop in C without it,
and turns the errno value the loop hands back into the stdlib's OSError subclass.  The loops
never touch the descriptors' file status flags where a per-call MSG_DONTWAIT does the job,
so the caller's sockets keep whatever blocking mode they had.
"""

from cpython.mem cimport PyMem_RawCalloc, PyMem_RawFree, PyMem_RawMalloc
from libc.errno cimport (
    EAGAIN, ECONNABORTED, ECONNRESET, EINPROGRESS, EINTR, ENOBUFS, ETIMEDOUT, errno,
)
from libc.math cimport ceil
from libc.stdint cimport uint16_t
from libc.string cimport memchr, memcpy, memset
from posix.fcntl cimport F_GETFL, F_SETFL, O_NONBLOCK, fcntl
from posix.time cimport nanosleep, timespec, timeval
from posix.uio cimport iovec
from posix.unistd cimport close

import math
import operator
import os
import socket


cdef enum:
    MAX_EVENTS = 64
    # sendmmsg() and recvmmsg() take at most UIO_MAXIOV messages per call.
    MAX_BATCH = 1024
    # Large enough for the largest UDP payload, so only Unix datagrams can be truncated,
    # and then MSG_TRUNC still reports their full length.
    DATAGRAM_SLOT = 65536
    # UDP_MAX_SEGMENTS of the kernels that introduced UDP GSO (4.18); later ones take more.
    MAX_SEGMENTS = 64
    # The most UDP payload one IPv4 datagram carries, and so one GSO send.
    MAX_UDP_PAYLOAD = 65507
    # What churn() reads at once while it waits for the server's close: servers send
    # nothing, so one read normally sees the EOF.  Also the longest line it sends, which a
    # new connection's empty send buffer always takes whole.
    CLOSE_READ_BYTES = 256

# Bytes one send() may move: large enough that a syscall carries thousands of small messages.
cdef Py_ssize_t PATTERN_BYTES = 256 * 1024
# Bytes one recv() of the stream sink may fill: as much as fastsock's own loop asks for, and
# small enough to stay in L2 (1 MiB reads measured slower on loopback than 256 KiB ones).
cdef size_t SINK_BUFFER_BYTES = 256 * 1024
# Seconds a stream sender still waits, after max_seconds, for its peers to take the rest of a
# started block: long enough for any live reader, short enough that a dead one cannot hang it.
cdef double FINISH_GRACE_SECONDS = 5.0
# A datagram sender that meets EAGAIN first waits in poll() for room, up to this long: enough
# for a reader to wake up, short enough to keep an eye on the deadline.
cdef int ROOM_WAIT_MS = 10
# poll() cannot wait for room where the socket looks writable while the send still fails (an
# unconnected Unix socket whose destination is full; ENOBUFS), so repeated failures pause,
# doubling from the first to the longest pause, rather than spin.
cdef long FIRST_PAUSE_NS = 20 * 1000
cdef long LONGEST_PAUSE_NS = 1000 * 1000
# Longest the datagram sink sleeps in recvmmsg() on a silent socket before it looks at its
# deadline and idle time again: how late past them it may return.
cdef double SINK_WAKE_SECONDS = 0.05


cdef int milliseconds_until(double deadline, double now) noexcept nogil:
    if deadline <= now:
        return 0
    return <int>min(ceil((deadline - now) * 1000.0), 3600.0 * 1000.0)


cdef int wait_for(int fd, short events, int timeout_ms) noexcept nogil:
    cdef pollfd watched
    watched.fd = fd
    watched.events = events
    watched.revents = 0
    if poll(&watched, 1, timeout_ms) < 0 and errno != EINTR:
        return errno
    return 0


cdef void close_descriptors(const int* fds, Py_ssize_t count) noexcept nogil:
    # Entries below 0 are slots without a descriptor.
    cdef Py_ssize_t i
    for i in range(count):
        if fds[i] >= 0:
            close(fds[i])


cdef int checked_fd(object fd, str name) except -1:
    fd = operator.index(fd)
    if not 0 <= fd <= 2**31 - 1:
        raise ValueError(f"{name} must be a file descriptor (an int >= 0), not {fd}")
    return fd


cdef double checked_seconds(object seconds, str name) except -1.0:
    seconds = float(seconds)
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ValueError(f"{name} must be a finite number of seconds > 0, not {seconds}")
    return seconds


cdef object checked_count(object count, str name):
    count = operator.index(count)
    if count < 0:
        raise ValueError(f"{name} must be >= 0, not {count}")
    return count


cdef Py_ssize_t checked_batch(object batch) except -1:
    batch = operator.index(batch)
    if not 1 <= batch <= MAX_BATCH:
        raise ValueError(f"batch must be between 1 and {MAX_BATCH}, not {batch}")
    return batch


cdef int socket_option(int fd, int option) except? -1:
    cdef int value = 0
    cdef socklen_t length = sizeof(value)
    if getsockopt(fd, SOL_SOCKET, option, &value, &length) < 0:
        raise_errno(errno)
    return value


cdef int require_socket_type(int fd, int expected, str name) except -1:
    if socket_option(fd, SO_TYPE) != expected:
        kind = "stream" if expected == SOCK_STREAM else "datagram"
        raise ValueError(f"{name} {fd} is not a {kind} socket")
    return 0


# -- send_stream ---------------------------------------------------------------------------

cdef struct Outgoing:
    int fd
    bint open
    unsigned long long quota
    unsigned long long sent


cdef struct StreamPump:
    int epfd
    Outgoing* connections
    Py_ssize_t count
    Py_ssize_t remaining
    # Whole blocks repeated over twice `unit` bytes, so a send() starting at any offset
    # within a unit can still move a full unit.
    const char* pattern
    Py_ssize_t unit
    unsigned long long block
    double deadline
    bint stopping


cdef int finish_connection(StreamPump* pump, Outgoing* connection) noexcept nogil:
    connection.open = False
    pump.remaining -= 1
    epoll_ctl(pump.epfd, EPOLL_CTL_DEL, connection.fd, NULL)
    if shutdown(connection.fd, SHUT_WR) < 0:
        return errno
    return 0


cdef int send_until_blocked(StreamPump* pump, Outgoing* connection) noexcept nogil:
    # Edge-triggered: keep writing until the kernel says EAGAIN, the quota is met, or (before
    # the stop) the deadline passes, after which the stop phase writes to every connection.
    cdef unsigned long long offset, length
    cdef ssize_t written
    while connection.sent < connection.quota:
        if not pump.stopping and monotonic() >= pump.deadline:
            return 0
        offset = connection.sent % <unsigned long long>pump.unit
        length = min(<unsigned long long>pump.unit, connection.quota - connection.sent)
        written = send(connection.fd, pump.pattern + offset, length, MSG_DONTWAIT | MSG_NOSIGNAL)
        if written < 0:
            if errno == EINTR:
                continue
            if errno == EAGAIN:
                return 0
            return errno
        connection.sent += written
    return finish_connection(pump, connection)


cdef int stop_at_block_boundary(StreamPump* pump) noexcept nogil:
    # The receiver counts whole messages, so each connection completes the block it started.
    cdef Outgoing* connection
    cdef Py_ssize_t i
    cdef int code
    pump.stopping = True
    for i in range(pump.count):
        connection = &pump.connections[i]
        if connection.open:
            connection.quota = connection.sent + (
                pump.block - connection.sent % pump.block) % pump.block
            code = send_until_blocked(pump, connection)
            if code != 0:
                return code
    return 0


cdef int pump_streams(StreamPump* pump) noexcept nogil:
    cdef epoll_event event
    cdef epoll_event events[MAX_EVENTS]
    cdef double now, wait_until
    cdef Py_ssize_t i
    cdef int ready, code
    for i in range(pump.count):
        event.events = EPOLLOUT | EPOLLET
        event.data.u64 = i
        if epoll_ctl(pump.epfd, EPOLL_CTL_ADD, pump.connections[i].fd, &event) < 0:
            return errno
        if pump.connections[i].quota == 0:
            code = finish_connection(pump, &pump.connections[i])
            if code != 0:
                return code
    while pump.remaining > 0:
        now = monotonic()
        if not pump.stopping and now >= pump.deadline:
            code = stop_at_block_boundary(pump)
            if code != 0:
                return code
            continue
        wait_until = pump.deadline + FINISH_GRACE_SECONDS if pump.stopping else pump.deadline
        if now >= wait_until:
            return ETIMEDOUT
        ready = epoll_wait(pump.epfd, events, MAX_EVENTS, milliseconds_until(wait_until, now))
        if ready < 0 and errno != EINTR:
            return errno
        for i in range(max(ready, 0)):
            if pump.connections[events[i].data.u64].open:
                code = send_until_blocked(pump, &pump.connections[events[i].data.u64])
                if code != 0:
                    return code
    return 0


def send_stream(fds, block, total_bytes, max_seconds):
    cdef list descriptors = [checked_fd(fd, "fds") for fd in fds]
    cdef bytes data = bytes(memoryview(block))
    cdef unsigned long long total, blocks, share
    cdef Py_ssize_t count = len(descriptors), repeats, i
    cdef double seconds, started, elapsed
    cdef char* pattern = NULL
    cdef StreamPump pump
    cdef int code = 0
    if count == 0:
        raise ValueError("fds must hold at least one connected stream socket")
    if len(set(descriptors)) != count:
        raise ValueError("fds must not hold the same descriptor twice")
    if not data:
        raise ValueError("block must not be empty")
    total = checked_count(total_bytes, "total_bytes")
    seconds = checked_seconds(max_seconds, "max_seconds")
    for fd in descriptors:
        require_socket_type(fd, SOCK_STREAM, "fd")

    repeats = max(1, PATTERN_BYTES // len(data))
    pump.unit = repeats * len(data)
    pump.block = len(data)
    pump.count = count
    pump.remaining = 0
    pump.stopping = False
    pump.epfd = -1
    pump.connections = <Outgoing*>PyMem_RawCalloc(count, sizeof(Outgoing))
    pattern = <char*>PyMem_RawMalloc(2 * pump.unit)
    try:
        if pump.connections == NULL or pattern == NULL:
            raise MemoryError()
        for i in range(2 * repeats):
            memcpy(pattern + i * len(data), <const char*>data, len(data))
        pump.pattern = pattern
        # Whole blocks only, shared as evenly as blocks allow, so the total is exact.
        blocks = total // pump.block
        for i in range(count):
            share = blocks // count + (1 if <unsigned long long>i < blocks % count else 0)
            pump.connections[i].fd = descriptors[i]
            pump.connections[i].quota = share * pump.block
            pump.connections[i].open = True
        pump.remaining = count
        pump.epfd = epoll_create1(EPOLL_CLOEXEC)
        if pump.epfd < 0:
            raise_errno(errno)
        with nogil:
            started = monotonic()
            pump.deadline = started + seconds
            code = pump_streams(&pump)
            elapsed = monotonic() - started
        if code != 0:
            raise_errno(code)
        return sum([pump.connections[i].sent for i in range(count)]), elapsed
    finally:
        if pump.connections != NULL:
            # After a failure, the peers still see EOF instead of waiting for more.
            for i in range(count):
                if pump.connections[i].open:
                    shutdown(pump.connections[i].fd, SHUT_WR)
        if pump.epfd >= 0:
            close(pump.epfd)
        PyMem_RawFree(pattern)
        PyMem_RawFree(pump.connections)


# -- sink_stream ---------------------------------------------------------------------------

cdef struct StreamSink:
    int epfd
    int listen_fd
    # Accepted descriptors in accept order, -1 once closed at EOF.
    int* connections
    Py_ssize_t expected
    Py_ssize_t accepted
    Py_ssize_t open
    char* buffer
    int count_byte
    double deadline
    unsigned long long received
    unsigned long long matches
    double first_byte
    # The last byte or EOF: the end of the transfer, or of what arrived before the deadline.
    double last_event


cdef unsigned long long count_occurrences(const char* data, size_t length,
                                          int byte) noexcept nogil:
    cdef const char* position = data
    cdef const char* end = data + length
    cdef unsigned long long found = 0
    while position < end:
        position = <const char*>memchr(position, byte, end - position)
        if position == NULL:
            break
        found += 1
        position += 1
    return found


cdef int accept_pending(StreamSink* sink) noexcept nogil:
    cdef epoll_event event
    cdef int fd
    while sink.accepted < sink.expected:
        fd = accept4(sink.listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)
        if fd < 0:
            if errno == EINTR or errno == ECONNABORTED:
                continue
            if errno == EAGAIN:
                return 0
            return errno
        sink.connections[sink.accepted] = fd
        event.events = EPOLLIN
        event.data.u64 = sink.accepted
        sink.accepted += 1
        sink.open += 1
        if epoll_ctl(sink.epfd, EPOLL_CTL_ADD, fd, &event) < 0:
            return errno
    epoll_ctl(sink.epfd, EPOLL_CTL_DEL, sink.listen_fd, NULL)
    return 0


cdef int drain_connection(StreamSink* sink, Py_ssize_t index) noexcept nogil:
    cdef int fd = sink.connections[index]
    cdef ssize_t received
    cdef double now
    while True:
        received = recv(fd, sink.buffer, SINK_BUFFER_BYTES, 0)
        if received > 0:
            now = monotonic()
            if sink.received == 0:
                sink.first_byte = now
            sink.received += received
            sink.last_event = now
            if sink.count_byte >= 0:
                sink.matches += count_occurrences(sink.buffer, received, sink.count_byte)
            # A short read drained the socket: level-triggered epoll reports it again later,
            # which saves the recv() that would only say EAGAIN.
            if <size_t>received < SINK_BUFFER_BYTES or now >= sink.deadline:
                return 0
        elif received == 0:
            close(fd)
            sink.connections[index] = -1
            sink.open -= 1
            sink.last_event = monotonic()
            return 0
        elif errno == EAGAIN:
            return 0
        elif errno != EINTR:
            return errno


cdef int drain_streams(StreamSink* sink) noexcept nogil:
    cdef epoll_event event
    cdef epoll_event events[MAX_EVENTS]
    cdef Py_ssize_t index
    cdef double now
    cdef int ready, i, code
    # The listener's events carry index `expected`, past every connection's.
    event.events = EPOLLIN
    event.data.u64 = sink.expected
    if epoll_ctl(sink.epfd, EPOLL_CTL_ADD, sink.listen_fd, &event) < 0:
        return errno
    while sink.accepted < sink.expected or sink.open > 0:
        now = monotonic()
        if now >= sink.deadline:
            return 0
        ready = epoll_wait(sink.epfd, events, MAX_EVENTS, milliseconds_until(sink.deadline, now))
        if ready < 0 and errno != EINTR:
            return errno
        for i in range(max(ready, 0)):
            index = events[i].data.u64
            if index == sink.expected:
                code = accept_pending(sink)
            elif sink.connections[index] >= 0:
                code = drain_connection(sink, index)
            else:
                code = 0
            if code != 0:
                return code
    return 0


def sink_stream(listen_fd, connections, count_byte=-1, max_seconds=60.0):
    cdef StreamSink sink
    cdef double seconds
    cdef int code = 0, flags
    sink.listen_fd = checked_fd(listen_fd, "listen_fd")
    sink.expected = operator.index(connections)
    if sink.expected < 1:
        raise ValueError(f"connections must be at least 1, not {sink.expected}")
    sink.count_byte = operator.index(count_byte)
    if not -1 <= sink.count_byte <= 255:
        raise ValueError(f"count_byte must be a byte value 0-255, or -1, not {count_byte}")
    seconds = checked_seconds(max_seconds, "max_seconds")
    require_socket_type(sink.listen_fd, SOCK_STREAM, "listen_fd")
    if not socket_option(sink.listen_fd, SO_ACCEPTCONN):
        raise ValueError(f"listen_fd {sink.listen_fd} is not a listening socket")

    flags = fcntl(sink.listen_fd, F_GETFL)
    if flags < 0:
        raise_errno(errno)
    sink.accepted = sink.open = 0
    sink.received = sink.matches = 0
    sink.first_byte = sink.last_event = 0.0
    sink.epfd = -1
    sink.connections = <int*>PyMem_RawMalloc(sink.expected * sizeof(int))
    sink.buffer = <char*>PyMem_RawMalloc(SINK_BUFFER_BYTES)
    try:
        if sink.connections == NULL or sink.buffer == NULL:
            raise MemoryError()
        # accept() must not block when a connection vanishes between epoll and accept.
        if fcntl(sink.listen_fd, F_SETFL, flags | O_NONBLOCK) < 0:
            raise_errno(errno)
        sink.epfd = epoll_create1(EPOLL_CLOEXEC)
        if sink.epfd < 0:
            raise_errno(errno)
        with nogil:
            sink.deadline = monotonic() + seconds
            code = drain_streams(&sink)
        if code != 0:
            raise_errno(code)
        elapsed = sink.last_event - sink.first_byte if sink.received else 0.0
        return sink.received, sink.matches, elapsed
    finally:
        fcntl(sink.listen_fd, F_SETFL, flags)
        if sink.connections != NULL:
            close_descriptors(sink.connections, sink.accepted)
        if sink.epfd >= 0:
            close(sink.epfd)
        PyMem_RawFree(sink.buffer)
        PyMem_RawFree(sink.connections)


# -- send_datagrams ------------------------------------------------------------------------

cdef inline void store_big_endian_64(char* target, unsigned long long value) noexcept nogil:
    cdef int i
    for i in range(8):
        target[7 - i] = <char>(value & 0xFF)
        value >>= 8


cdef struct DatagramPump:
    int fd
    mmsghdr* messages
    iovec* vectors
    char* slots
    Py_ssize_t payload_length
    bint sequence
    # Datagrams per message: above 1, each message is one UDP GSO send that the kernel cuts
    # into this many datagrams of payload_length bytes.
    unsigned int segments
    unsigned int batch
    unsigned long long count
    double deadline
    unsigned long long sent


cdef int send_once(DatagramPump* pump, unsigned long long wanted) noexcept nogil:
    # One sendmmsg() of `wanted` datagrams: whole messages, the last one possibly with fewer
    # segments; the datagrams it sent are added to pump.sent.  Returns -1 or the errno.
    cdef unsigned int messages = <unsigned int>((wanted + pump.segments - 1) // pump.segments)
    cdef unsigned int last = messages - 1
    cdef unsigned long long i
    cdef int done
    if pump.sequence:
        # A message's segments lie back to back, so datagram i starts at i * payload_length.
        for i in range(wanted):
            store_big_endian_64(pump.slots + i * pump.payload_length, pump.sent + i)
    pump.vectors[last].iov_len = (wanted - last * pump.segments) * pump.payload_length
    done = sendmmsg(pump.fd, pump.messages, messages, MSG_DONTWAIT | MSG_NOSIGNAL)
    pump.vectors[last].iov_len = pump.segments * pump.payload_length
    if done < 0:
        return errno
    if <unsigned int>done == messages:
        pump.sent += wanted
    else:
        pump.sent += <unsigned long long>done * pump.segments
    return -1


cdef int send_batches(DatagramPump* pump) noexcept nogil:
    cdef double now
    cdef int code
    cdef timespec pause
    pause.tv_sec = 0
    pause.tv_nsec = 0
    while pump.sent < pump.count:
        now = monotonic()
        if now >= pump.deadline:
            return 0
        code = send_once(pump, min(<unsigned long long>pump.batch * pump.segments,
                                   pump.count - pump.sent))
        if code < 0:
            pause.tv_nsec = 0
        elif (code == EAGAIN or code == ENOBUFS) and pause.tv_nsec:
            nanosleep(&pause, NULL)
            pause.tv_nsec = min(2 * pause.tv_nsec, LONGEST_PAUSE_NS)
        elif code == EAGAIN or code == ENOBUFS:
            if code == EAGAIN:
                code = wait_for(pump.fd, POLLOUT,
                                min(milliseconds_until(pump.deadline, now), ROOM_WAIT_MS))
                if code != 0:
                    return code
            pause.tv_nsec = FIRST_PAUSE_NS
        elif code != EINTR:
            return code
    return 0


cdef socklen_t fill_destination(int family, object destination,
                                sockaddr_storage* storage) except 0:
    # The destination as the C sockaddr of the socket's family, and its length.
    cdef sockaddr_in* inet = <sockaddr_in*>storage
    cdef sockaddr_in6* inet6 = <sockaddr_in6*>storage
    cdef sockaddr_un* unix = <sockaddr_un*>storage
    cdef bytes path, numeric
    cdef socklen_t path_offset = <socklen_t>(<char*>unix.sun_path - <char*>unix)
    memset(storage, 0, sizeof(sockaddr_storage))
    if family == AF_UNIX:
        path = os.fsencode(destination)
        # A leading NUL names an abstract address, which has no terminating NUL.
        if not path or len(path) > <Py_ssize_t>sizeof(unix.sun_path) - (0 if path[0] == 0 else 1):
            raise ValueError(f"destination {destination!r} is not a valid Unix socket path")
        unix.sun_family = AF_UNIX
        memcpy(unix.sun_path, <const char*>path, len(path))
        return path_offset + len(path) + (0 if path[0] == 0 else 1)
    if family not in (AF_INET, AF_INET6):
        raise ValueError(f"destination: unsupported address family {family}")
    if not isinstance(destination, tuple) or len(destination) < 2:
        raise ValueError(f"destination must be a (host, port) tuple, not {destination!r}")
    port = operator.index(destination[1])
    if not 0 < port <= 65535:
        raise ValueError(f"destination port must be between 1 and 65535, not {port}")
    resolved = socket.getaddrinfo(destination[0], port, family, socket.SOCK_DGRAM)[0][4]
    numeric = resolved[0].encode("ascii")
    if family == AF_INET:
        inet.sin_family = AF_INET
        inet.sin_port = htons(port)
        inet_pton(AF_INET, numeric, &inet.sin_addr)
        return sizeof(sockaddr_in)
    inet6.sin6_family = AF_INET6
    inet6.sin6_port = htons(port)
    inet6.sin6_flowinfo = htonl(destination[2] if len(destination) > 2 else resolved[2])
    inet6.sin6_scope_id = destination[3] if len(destination) > 3 else resolved[3]
    inet_pton(AF_INET6, numeric, &inet6.sin6_addr)
    return sizeof(sockaddr_in6)


def send_datagrams(fd, payload, count, max_seconds, batch=64, destination=None,
                   sequence=False, segments=1):
    cdef int sock = checked_fd(fd, "fd")
    cdef bytes data = bytes(memoryview(payload))
    cdef DatagramPump pump
    cdef Py_ssize_t length = len(data), i, message_bytes
    cdef sockaddr_storage address
    cdef socklen_t address_length = 0
    cdef char* controls = NULL
    cdef double seconds = checked_seconds(max_seconds, "max_seconds")
    cdef double started, elapsed
    cdef int code, family
    pump.count = checked_count(count, "count")
    pump.batch = checked_batch(batch)
    pump.sequence = bool(sequence)
    segments = operator.index(segments)
    if not 1 <= segments <= MAX_SEGMENTS:
        raise ValueError(f"segments must be between 1 and {MAX_SEGMENTS}, not {segments}")
    pump.segments = segments
    pump.payload_length = length
    pump.sent = 0
    pump.fd = sock
    if pump.sequence and length < 8:
        raise ValueError("a sequence-numbered payload must be at least 8 bytes long")
    require_socket_type(sock, SOCK_DGRAM, "fd")
    family = socket_option(sock, SO_DOMAIN)
    if pump.segments > 1:
        if family not in (AF_INET, AF_INET6):
            raise ValueError("segments above 1 (UDP GSO) need a UDP socket")
        if length < 1 or length * pump.segments > MAX_UDP_PAYLOAD:
            raise ValueError(f"segments times the payload length must be between 1 and "
                             f"{MAX_UDP_PAYLOAD} bytes, not {length * pump.segments}")
    if destination is not None:
        address_length = fill_destination(family, destination, &address)

    message_bytes = length * pump.segments
    pump.messages = <mmsghdr*>PyMem_RawCalloc(pump.batch, sizeof(mmsghdr))
    pump.vectors = <iovec*>PyMem_RawCalloc(pump.batch, sizeof(iovec))
    # Numbered datagrams each need their own copy; the others all point at one message.
    pump.slots = <char*>PyMem_RawMalloc(
        max(message_bytes, 1) * (pump.batch if pump.sequence else 1))
    if pump.segments > 1:
        controls = <char*>PyMem_RawCalloc(pump.batch, fastsock_segment_control_bytes())
    try:
        if (pump.messages == NULL or pump.vectors == NULL or pump.slots == NULL
                or (pump.segments > 1 and controls == NULL)):
            raise MemoryError()
        for i in range(pump.batch):
            pump.vectors[i].iov_base = pump.slots + (i * message_bytes if pump.sequence else 0)
            pump.vectors[i].iov_len = message_bytes
            pump.messages[i].msg_hdr.msg_iov = &pump.vectors[i]
            pump.messages[i].msg_hdr.msg_iovlen = 1
            if address_length:
                pump.messages[i].msg_hdr.msg_name = &address
                pump.messages[i].msg_hdr.msg_namelen = address_length
            if pump.segments > 1:
                fastsock_attach_segment_size(
                    &pump.messages[i].msg_hdr,
                    controls + i * fastsock_segment_control_bytes(), <uint16_t>length)
        for i in range(pump.segments * (pump.batch if pump.sequence else 1)):
            memcpy(pump.slots + i * length, <const char*>data, length)
        with nogil:
            started = monotonic()
            pump.deadline = started + seconds
            code = send_batches(&pump)
            elapsed = monotonic() - started
        if code != 0:
            raise_errno(code)
        return pump.sent, elapsed
    finally:
        PyMem_RawFree(controls)
        PyMem_RawFree(pump.slots)
        PyMem_RawFree(pump.vectors)
        PyMem_RawFree(pump.messages)


# -- sink_datagrams ------------------------------------------------------------------------

cdef struct DatagramSink:
    int fd
    mmsghdr* messages
    unsigned long long expected
    unsigned int batch
    double deadline
    double idle
    double spin
    unsigned long long received
    unsigned long long received_bytes
    double first
    double last


cdef int receive_batches(DatagramSink* sink) noexcept nogil:
    # recvmmsg() waits for the first datagram only (MSG_WAITFORONE), then takes what is
    # queued: a busy socket costs one system call per batch and nothing else.  For `spin`
    # seconds after a datagram the call does not wait at all (MSG_DONTWAIT) and the loop
    # asks again: a receiver that sleeps whenever it has caught up pays a wake-up, on a VM
    # the host's too, while the queue overflows.  Asleep on a silent socket, the loop wakes
    # every SO_RCVTIMEO to look at its deadline and idle time.
    cdef double now = 0.0
    cdef int done, i, flags
    while sink.received < sink.expected:
        flags = MSG_WAITFORONE | MSG_TRUNC
        if sink.received and now - sink.last < sink.spin:
            flags |= MSG_DONTWAIT
        # Never more than expected: what follows stays queued for the next reader.
        done = recvmmsg(sink.fd, sink.messages,
                        <unsigned int>min(<unsigned long long>sink.batch,
                                          sink.expected - sink.received),
                        flags, NULL)
        now = monotonic()
        if done > 0:
            if sink.received == 0:
                sink.first = now
            sink.last = now
            sink.received += done
            for i in range(done):
                sink.received_bytes += sink.messages[i].msg_len
        elif errno != EAGAIN and errno != EINTR:
            return errno
        if now >= sink.deadline or (sink.received and done <= 0
                                    and now - sink.last >= sink.idle):
            return 0
    return 0


def sink_datagrams(fd, expected, max_seconds, batch=64, idle_seconds=0.5, spin_seconds=0.001):
    cdef DatagramSink sink
    cdef iovec* vectors = NULL
    cdef char* slots = NULL
    cdef unsigned int i
    cdef int code, flags
    cdef timeval wake, saved_timeout
    cdef socklen_t timeout_length = sizeof(saved_timeout)
    cdef bint timeout_changed = False
    sink.fd = checked_fd(fd, "fd")
    sink.expected = checked_count(expected, "expected")
    sink.batch = checked_batch(batch)
    sink.deadline = checked_seconds(max_seconds, "max_seconds")
    sink.idle = checked_seconds(idle_seconds, "idle_seconds")
    sink.spin = float(spin_seconds)
    if not 0 <= sink.spin <= sink.idle:
        raise ValueError(f"spin_seconds must be between 0 and idle_seconds, not {spin_seconds}")
    require_socket_type(sink.fd, SOCK_DGRAM, "fd")
    sink.received = sink.received_bytes = 0
    sink.first = sink.last = 0.0
    wake = seconds_to_timeval(min(sink.idle, sink.deadline, SINK_WAKE_SECONDS))
    if getsockopt(sink.fd, SOL_SOCKET, SO_RCVTIMEO, &saved_timeout, &timeout_length) < 0:
        raise_errno(errno)
    flags = fcntl(sink.fd, F_GETFL)
    if flags < 0:
        raise_errno(errno)

    sink.messages = <mmsghdr*>PyMem_RawCalloc(sink.batch, sizeof(mmsghdr))
    vectors = <iovec*>PyMem_RawCalloc(sink.batch, sizeof(iovec))
    slots = <char*>PyMem_RawMalloc(<size_t>sink.batch * DATAGRAM_SLOT)
    try:
        if sink.messages == NULL or vectors == NULL or slots == NULL:
            raise MemoryError()
        for i in range(sink.batch):
            vectors[i].iov_base = slots + <size_t>i * DATAGRAM_SLOT
            vectors[i].iov_len = DATAGRAM_SLOT
            sink.messages[i].msg_hdr.msg_iov = &vectors[i]
            sink.messages[i].msg_hdr.msg_iovlen = 1
        # The wait happens in recvmmsg() itself, which needs a blocking socket with a
        # receive timeout; both are put back as they were before returning.
        if flags & O_NONBLOCK and fcntl(sink.fd, F_SETFL, flags & ~O_NONBLOCK) < 0:
            raise_errno(errno)
        timeout_changed = True
        if setsockopt(sink.fd, SOL_SOCKET, SO_RCVTIMEO, &wake, sizeof(wake)) < 0:
            raise_errno(errno)
        with nogil:
            sink.deadline += monotonic()
            code = receive_batches(&sink)
        if code != 0:
            raise_errno(code)
        return sink.received, sink.received_bytes, sink.last - sink.first
    finally:
        if timeout_changed:
            setsockopt(sink.fd, SOL_SOCKET, SO_RCVTIMEO, &saved_timeout, sizeof(saved_timeout))
            fcntl(sink.fd, F_SETFL, flags)
        PyMem_RawFree(slots)
        PyMem_RawFree(vectors)
        PyMem_RawFree(sink.messages)


# -- open_connections, churn ---------------------------------------------------------------

cdef enum:
    # The phase of a connection in flight, in the upper half of its epoll data word; the
    # lower half is its slot.
    CONNECTING = 0
    AWAITING_CLOSE = 1


cdef struct Connector:
    int epfd
    sockaddr_storage destination
    socklen_t destination_length
    sockaddr_in* sources
    Py_ssize_t source_count
    const char* line
    Py_ssize_t line_length
    # Held connections are kept open once their line is sent (open_connections); the others
    # half-close and wait for the server to close them (churn).
    bint hold
    Py_ssize_t wanted
    Py_ssize_t started
    Py_ssize_t done
    # In-flight descriptors by slot (-1: free), and the stack of free slots.
    int* slots
    int* free_slots
    Py_ssize_t window
    Py_ssize_t free_count
    int* held
    # No connection starts after `deadline`; those in flight are waited for until `give_up`.
    double deadline
    double give_up
    double last_done


cdef int watch(Connector* c, Py_ssize_t slot, unsigned int events,
               unsigned long long phase, int operation) noexcept nogil:
    cdef epoll_event event
    event.events = events
    event.data.u64 = (phase << 32) | <unsigned long long>slot
    if epoll_ctl(c.epfd, operation, c.slots[slot], &event) < 0:
        return errno
    return 0


cdef int start_connection(Connector* c) noexcept nogil:
    cdef Py_ssize_t slot
    cdef int fd, code, one = 1
    fd = c_socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
    if fd < 0:
        return errno
    if c.source_count:
        # The port is then chosen at connect() for the whole address pair, so each source
        # address has the whole ephemeral port range to itself (bind() would pick a port
        # unique to the source address alone).
        if (setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof(one)) < 0
                or bind(fd, <sockaddr*>&c.sources[c.started % c.source_count],
                        sizeof(sockaddr_in)) < 0):
            code = errno
            close(fd)
            return code
    if connect(fd, <sockaddr*>&c.destination, c.destination_length) < 0 and errno != EINPROGRESS:
        code = errno
        close(fd)
        return code
    c.free_count -= 1
    slot = c.free_slots[c.free_count]
    c.slots[slot] = fd
    c.started += 1
    if c.line_length == 0:
        return watch(c, slot, EPOLLOUT, CONNECTING, EPOLL_CTL_ADD)
    # On loopback the handshake has usually completed within connect(): the line goes at
    # once, and only a connection still connecting waits for epoll to say it is writable.
    return send_line(c, slot, False)


cdef void release_slot(Connector* c, Py_ssize_t slot) noexcept nogil:
    c.slots[slot] = -1
    c.free_slots[c.free_count] = slot
    c.free_count += 1
    c.done += 1
    c.last_done = monotonic()


cdef int send_line(Connector* c, Py_ssize_t slot, bint watched) noexcept nogil:
    # The connection is connected, failed (send() or SO_ERROR tells: ECONNREFUSED...) or,
    # when not yet `watched` by epoll, maybe still connecting.
    cdef int fd = c.slots[slot]
    cdef ssize_t sent
    if c.line_length:
        # MSG_MORE holds the line back for the FIN that shutdown() adds: one segment, not two.
        sent = send(fd, c.line, c.line_length,
                    MSG_DONTWAIT | MSG_NOSIGNAL | (0 if c.hold else MSG_MORE))
        if sent < 0:
            if errno == EAGAIN and not watched:
                return watch(c, slot, EPOLLOUT, CONNECTING, EPOLL_CTL_ADD)
            return errno
        if sent != c.line_length:
            # The Python side allows only lines that an empty send buffer takes whole.
            return EAGAIN
    else:
        sent = socket_error(fd)
        if sent != 0:
            return <int>sent
    if c.hold:
        if watched and epoll_ctl(c.epfd, EPOLL_CTL_DEL, fd, NULL) < 0:
            return errno
        c.held[c.done] = fd
        release_slot(c, slot)
        return 0
    if shutdown(fd, SHUT_WR) < 0:
        return errno
    return watch(c, slot, EPOLLIN | EPOLLRDHUP, AWAITING_CLOSE,
                 EPOLL_CTL_MOD if watched else EPOLL_CTL_ADD)


cdef int socket_error(int fd) noexcept nogil:
    cdef int value = 0
    cdef socklen_t length = sizeof(value)
    if getsockopt(fd, SOL_SOCKET, SO_ERROR, &value, &length) < 0:
        return errno
    return value


cdef int await_close(Connector* c, Py_ssize_t slot, unsigned int events) noexcept nogil:
    cdef char discard[CLOSE_READ_BYTES]
    cdef int fd = c.slots[slot]
    cdef ssize_t received
    # The server's FIN (or reset) is all there is to wait for: no recv() to see it.
    while not events & (EPOLLRDHUP | EPOLLHUP | EPOLLERR):
        received = recv(fd, discard, CLOSE_READ_BYTES, MSG_DONTWAIT)
        if received == 0 or (received < 0 and errno == ECONNRESET):
            break
        if received < 0 and errno == EAGAIN:
            return 0
        if received < 0 and errno != EINTR:
            return errno
    close(fd)
    release_slot(c, slot)
    return 0


cdef int run_connector(Connector* c) noexcept nogil:
    cdef epoll_event events[MAX_EVENTS]
    cdef unsigned long long word
    cdef Py_ssize_t slot
    cdef double now, wait_until
    cdef int ready, i, code
    while True:
        now = monotonic()
        while c.free_count > 0 and c.started < c.wanted and now < c.deadline:
            code = start_connection(c)
            if code != 0:
                return code
        if c.free_count == c.window:
            return 0
        if now >= c.give_up:
            return ETIMEDOUT
        wait_until = c.deadline if c.started < c.wanted and now < c.deadline else c.give_up
        ready = epoll_wait(c.epfd, events, MAX_EVENTS, milliseconds_until(wait_until, now))
        if ready < 0 and errno != EINTR:
            return errno
        for i in range(max(ready, 0)):
            word = events[i].data.u64
            slot = <unsigned int>word
            if c.slots[slot] < 0:
                continue
            if word >> 32 == CONNECTING:
                code = send_line(c, slot, True)
            else:
                code = await_close(c, slot, events[i].events)
            if code != 0:
                return code


cdef object connect_all(object address, object line, object count, object max_seconds,
                        object window, object sources, object drain_seconds, bint hold):
    """(connections done, seconds, held descriptors) of one run of the connector."""
    cdef bytes data = bytes(memoryview(line))
    cdef Connector c
    cdef double seconds, drain, started = 0.0
    cdef sockaddr_in* source
    cdef Py_ssize_t i
    cdef int code = 0
    cdef list result
    c.wanted = checked_count(count, "count")
    seconds = checked_seconds(max_seconds, "max_seconds")
    drain = checked_seconds(drain_seconds, "drain_seconds")
    c.window = operator.index(window)
    if not 1 <= c.window <= 2**31 - 1:
        raise ValueError(f"window must be at least 1, not {window}")
    if len(data) > CLOSE_READ_BYTES:
        raise ValueError(f"line must be at most {CLOSE_READ_BYTES} bytes, not {len(data)}")
    source_hosts = [socket.inet_aton(host) for host in sources]
    c.destination_length = fill_destination(AF_INET, address, &c.destination)
    c.line = data
    c.line_length = len(data)
    c.hold = hold
    c.started = c.done = 0
    c.source_count = len(source_hosts)
    c.last_done = 0.0
    c.epfd = -1
    c.slots = <int*>PyMem_RawMalloc(c.window * sizeof(int))
    c.free_slots = <int*>PyMem_RawMalloc(c.window * sizeof(int))
    c.sources = <sockaddr_in*>PyMem_RawCalloc(max(c.source_count, 1), sizeof(sockaddr_in))
    c.held = <int*>PyMem_RawMalloc(max(c.wanted, 1) * sizeof(int)) if hold else NULL
    try:
        if (c.slots == NULL or c.free_slots == NULL or c.sources == NULL
                or (hold and c.held == NULL)):
            raise MemoryError()
        for i in range(c.window):
            c.slots[i] = -1
            c.free_slots[i] = c.window - 1 - i
        c.free_count = c.window
        for i in range(c.source_count):
            source = &c.sources[i]
            source.sin_family = AF_INET
            memcpy(&source.sin_addr, <const char*>source_hosts[i], 4)
        c.epfd = epoll_create1(EPOLL_CLOEXEC)
        if c.epfd < 0:
            raise_errno(errno)
        with nogil:
            started = monotonic()
            c.deadline = started + seconds
            c.give_up = c.deadline + drain
            code = run_connector(&c)
        if code != 0:
            raise_errno(code)
        result = [c.held[i] for i in range(c.done)] if hold else None
        return c.done, (c.last_done - started if c.done else 0.0), result
    except BaseException:
        if c.held != NULL:
            close_descriptors(c.held, c.done)
        raise
    finally:
        if c.slots != NULL:
            close_descriptors(c.slots, c.window)
        if c.epfd >= 0:
            close(c.epfd)
        PyMem_RawFree(c.held)
        PyMem_RawFree(c.sources)
        PyMem_RawFree(c.free_slots)
        PyMem_RawFree(c.slots)


def open_connections(address, line, count, max_seconds, window=64, sources=()):
    _, seconds, held = connect_all(address, line, count, max_seconds, window, sources,
                                   max_seconds, True)
    return held, seconds


def churn(address, line, count, max_seconds, window=64, sources=(), drain_seconds=10.0):
    done, seconds, _ = connect_all(address, line, count, max_seconds, window, sources,
                                   drain_seconds, False)
    return done, seconds
