"""Compiled event engine; fastsock/_engine.pyi documents it.

One epoll loop per engine, run with the GIL released.  It wakes only for readiness, for
its nearest deadline (kept in lists ordered by time, so the nearest is at a list's head),
or for stop() through its eventfd; Python runs only when there are events to report.
"""

from cpython.buffer cimport PyBUF_READ, PyBUF_WRITE
from cpython.exc cimport PyErr_CheckSignals
from cpython.memoryview cimport PyMemoryView_FromMemory
from cpython.mem cimport PyMem_RawCalloc, PyMem_RawFree, PyMem_RawMalloc, PyMem_RawRealloc
from libc.errno cimport (
    EAGAIN,
    ECONNABORTED,
    ECONNRESET,
    EINTR,
    EMFILE,
    ENFILE,
    ENOBUFS,
    ENOMEM,
    ENOTCONN,
    EPROTO,
    ETIMEDOUT,
    errno,
)
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memchr, memcmp, memcpy, memset, strlen
from posix.fcntl cimport F_GETFL, F_SETFL, O_NONBLOCK, fcntl
from posix.unistd cimport close, read, write

from fastsock._framing cimport (
    FRAMER_PROTOCOL_ERROR,
    FRAMER_SPANS_FULL,
    ProtocolError,
    framer_base,
    framer_commit,
    framer_config_clear,
    framer_configure,
    framer_consume,
    framer_discard_pending,
    framer_free,
    framer_held_bytes,
    framer_release_if_empty,
    framer_reserve,
    framer_write_pointer,
    framer_write_space,
)
from fastsock._native cimport (
    AF_INET,
    AF_INET6,
    AF_UNIX,
    EFD_CLOEXEC,
    EFD_NONBLOCK,
    EPOLL_CLOEXEC,
    EPOLL_CTL_ADD,
    EPOLL_CTL_DEL,
    EPOLLEXCLUSIVE,
    EPOLLIN,
    FIONREAD,
    SHUT_RDWR,
    SOCK_CLOEXEC,
    SOCK_NONBLOCK,
    accept4,
    epoll_create1,
    epoll_ctl,
    epoll_event,
    epoll_wait,
    eventfd,
    getpeername,
    inet_pton,
    ioctl,
    monotonic_ns,
    pthread_mutex_destroy,
    pthread_mutex_init,
    pthread_mutex_lock,
    pthread_mutex_unlock,
    raise_errno,
    recv,
    seconds_to_ns,
    shutdown,
    sockaddr,
)
from fastsock._recvloop cimport (
    COUNT_BYTES_DISCARDED,
    COUNT_BYTES_RECEIVED,
    COUNT_BYTES_UNREAD,
    COUNT_CONNECTIONS_CLOSED,
    COUNT_CONNECTIONS_OPENED,
    COUNT_CONNECTIONS_REFUSED,
    COUNT_IDLE_EVICTIONS,
    COUNT_IDLE_TIMEOUTS,
    COUNT_MEMORY_EVICTIONS,
    COUNT_MESSAGE_TIMEOUTS,
    COUNT_MESSAGES_DROPPED,
    COUNT_MESSAGES_RECEIVED,
    COUNT_PAUSED_NS,
    COUNT_PAUSES,
    COUNT_PROXY_HEADER_ERRORS,
    COUNT_RESETS,
    COUNT_TLS_HANDSHAKE_ERRORS,
)

import ipaddress
from collections import OrderedDict, namedtuple

from fastsock import constants, proxy, tls
from fastsock._protocol_errors import numbered
from fastsock.addresses import address_from_sockaddr
from fastsock.options import ReceiveOptions


cdef enum EventKind:
    EVENT_PROTOCOL_ERROR  # number: the ProtocolError, whose name is the event's kind
    EVENT_MESSAGE_TIMEOUT
    EVENT_EVICTED_IDLE
    EVENT_EVICTED_MEMORY
    EVENT_REFUSED
    EVENT_ACCEPT_PAUSED
    EVENT_NO_MEMORY
    EVENT_OS_ERROR
    EVENT_PROXY_HEADER
    EVENT_PROXY_UNTRUSTED
    EVENT_TLS_HANDSHAKE
    EVENT_TLS_ERROR


EVENT_NAMES = {
    EVENT_MESSAGE_TIMEOUT: "message_timeout",
    EVENT_EVICTED_IDLE: "evicted_idle",
    EVENT_EVICTED_MEMORY: "evicted_memory",
    EVENT_REFUSED: "refused",
    EVENT_ACCEPT_PAUSED: "accept_paused",
    EVENT_NO_MEMORY: "no_memory",
    EVENT_OS_ERROR: "os_error",
    EVENT_PROXY_HEADER: "proxy_header",
    EVENT_PROXY_UNTRUSTED: "proxy_untrusted",
    EVENT_TLS_HANDSHAKE: "tls_handshake",
    EVENT_TLS_ERROR: "tls_error",
}

END_NAMES = {ENGINE_EVENTS: "events", ENGINE_STOPPED: "stopped", ENGINE_EMPTY: "empty"}

EngineEvent = namedtuple("EngineEvent", ["kind", "connection_id", "address", "detail"])

# epoll tags: 0 is the wake-up eventfd, 1..listener_count the listeners; any larger value is
# a Connection pointer (no allocation lies in the first pages of the address space).
cdef uint64_t WAKE_TAG = 0
# Connections accepted from one listener per turn at most: a connect flood then still
# leaves the turn to the connections that have data.
cdef int ACCEPTS_PER_TURN = 1024
cdef int SHARED_ACCEPTS_PER_TURN = constants.ENGINE_SHARED_ACCEPTS_PER_TURN
cdef int EVENTS_PER_WAIT = 1024
cdef uint64_t ANNOUNCE_AFTER = constants.ENGINE_ANNOUNCE_AFTER
cdef double PAUSED_WAIT_SLICE = constants.RING_WAIT_SLICE
cdef Py_ssize_t SAMPLE_LENGTH = constants.PROTOCOL_ERROR_SAMPLE
cdef double BACKOFF_INITIAL = constants.ACCEPT_BACKOFF_INITIAL
cdef double BACKOFF_MAX = constants.ACCEPT_BACKOFF_MAX
# What tls_step() returns besides a plaintext byte count: the peer's close_notify, or a
# failure it recorded and counted (the caller ends the connection).
cdef Py_ssize_t TLS_CLOSED = tls.TLS_CLOSED
cdef Py_ssize_t TLS_FAILED = -2
# The most plaintext one TLS record carries: a read may complete a record begun by the
# bytes of an earlier one, so it can yield up to this much more than it brought.
cdef Py_ssize_t TLS_RECORD_PLAINTEXT = 16384
cdef const char* HANDSHAKE_TIMED_OUT = b"no handshake within tls_handshake_timeout"
cdef const char* HANDSHAKE_RESET = b"the connection was reset during the handshake"
cdef uint8_t RECORD_HEADER_BYTES = tls.RECORD_HEADER_BYTES
cdef uint32_t RECORD_MAX_BODY = tls.RECORD_MAX_BODY
cdef uint8_t RECORD_TYPE_FIRST = tls.RECORD_TYPES.start
cdef uint8_t RECORD_TYPE_LAST = tls.RECORD_TYPES.stop - 1
cdef Py_ssize_t RECORDS_UNKNOWN = tls.UNKNOWN


cdef Py_ssize_t tls_records_follow(TlsRecords* records, const uint8_t* data,
                                   Py_ssize_t size) noexcept nogil:
    # fastsock.tls.RecordBoundaries.follow(): the bytes of an incomplete record at the end
    # of all the ciphertext so far, after these; RECORDS_UNKNOWN once a header is not a
    # TLS record's.
    cdef Py_ssize_t at = 0
    cdef Py_ssize_t take
    while at < size and records.unfinished != RECORDS_UNKNOWN:
        if records.header_length < RECORD_HEADER_BYTES:
            take = min(RECORD_HEADER_BYTES - records.header_length, size - at)
            memcpy(records.header + records.header_length, data + at, take)
            records.header_length += take
            records.unfinished += take
            at += take
            if records.header_length < RECORD_HEADER_BYTES:
                break
            records.body_left = (<uint32_t>records.header[3] << 8) | records.header[4]
            if (records.header[0] < RECORD_TYPE_FIRST or records.header[0] > RECORD_TYPE_LAST
                    or records.header[1] != 3 or records.body_left > RECORD_MAX_BODY):
                records.unfinished = RECORDS_UNKNOWN
                break
        take = min(<Py_ssize_t>records.body_left, size - at)
        records.body_left -= take
        records.unfinished += take
        at += take
        if records.body_left == 0:
            records.header_length = 0
            records.unfinished = 0
    return records.unfinished


# -- Connection lists: intrusive, doubly linked, ordered by the time of the last move -----

cdef inline void list_remove(ConnectionList* connections, Connection* connection) noexcept nogil:
    cdef int kind = connections.kind
    if not connection.listed[kind]:
        return
    if connection.prev[kind] != NULL:
        connection.prev[kind].next[kind] = connection.next[kind]
    else:
        connections.head = connection.next[kind]
    if connection.next[kind] != NULL:
        connection.next[kind].prev[kind] = connection.prev[kind]
    else:
        connections.tail = connection.prev[kind]
    connection.prev[kind] = connection.next[kind] = NULL
    connection.listed[kind] = False


cdef inline void list_append(ConnectionList* connections, Connection* connection) noexcept nogil:
    # Appends, or moves to the end: the list stays ordered by the time of this call.
    cdef int kind = connections.kind
    if connection.listed[kind]:
        if connections.tail == connection:
            return
        list_remove(connections, connection)
    connection.prev[kind] = connections.tail
    connection.next[kind] = NULL
    if connections.tail != NULL:
        connections.tail.next[kind] = connection
    else:
        connections.head = connection
    connections.tail = connection
    connection.listed[kind] = True


# -- The peer table ------------------------------------------------------------------------

cdef inline size_t peer_home(const PeerTable* table, uint32_t connection_id) noexcept nogil:
    return (<size_t>connection_id * <size_t>2654435761) & table.mask


cdef int peer_table_init(PeerTable* table, size_t recent) noexcept nogil:
    # Small at first: the slots grow with the entries, so that a server allowed many
    # connections pays for the ones it has, not for its limit.
    table.slots = <PeerSlot*>PyMem_RawCalloc(16, sizeof(PeerSlot))
    table.closed_ids = <uint32_t*>PyMem_RawCalloc(max(recent, <size_t>1), sizeof(uint32_t))
    if table.slots == NULL or table.closed_ids == NULL:
        return -1
    table.mask = 15
    table.closed_capacity = recent
    return 0


cdef void peer_table_free(PeerTable* table) noexcept nogil:
    cdef size_t index
    if table.slots != NULL:
        for index in range(table.mask + 1):
            PyMem_RawFree(table.slots[index].address)
    PyMem_RawFree(table.slots)
    PyMem_RawFree(table.closed_ids)
    table.slots = NULL
    table.closed_ids = NULL


cdef PeerSlot* peer_find(PeerTable* table, uint32_t connection_id) noexcept nogil:
    cdef size_t index = peer_home(table, connection_id)
    while table.slots[index].address != NULL:
        if table.slots[index].id == connection_id:
            return &table.slots[index]
        index = (index + 1) & table.mask
    return NULL


cdef PeerAddress* peer_address_copy(const PeerAddress* address) noexcept nogil:
    # Only as long as the address: most are 16 or 28 bytes of a 128-byte room.
    cdef socklen_t length = min(address.length, <socklen_t>ADDRESS_ROOM)
    cdef PeerAddress* stored = <PeerAddress*>PyMem_RawMalloc(
        sizeof(PeerAddress) - ADDRESS_ROOM + length)
    if stored != NULL:
        stored.length = length
        memcpy(stored.bytes, address.bytes, length)
    return stored


cdef void peer_address_get(PeerAddress* out, const PeerAddress* stored) noexcept nogil:
    out.length = stored.length
    memcpy(out.bytes, stored.bytes, stored.length)


cdef bint peer_reserve(PeerTable* table) noexcept nogil:
    # Room for one more entry at a load of at most a half; False out of memory.
    cdef size_t capacity = table.mask + 1
    cdef PeerSlot* old = table.slots
    cdef size_t index, slot
    if 2 * (table.count + 1) <= capacity:
        return True
    table.slots = <PeerSlot*>PyMem_RawCalloc(2 * capacity, sizeof(PeerSlot))
    if table.slots == NULL:
        table.slots = old
        return False
    table.mask = 2 * capacity - 1
    for index in range(capacity):
        if old[index].address != NULL:
            slot = peer_home(table, old[index].id)
            while table.slots[slot].address != NULL:
                slot = (slot + 1) & table.mask
            table.slots[slot] = old[index]
    PyMem_RawFree(old)
    return True


cdef void peer_put(PeerTable* table, uint32_t connection_id, PeerAddress* stored) noexcept nogil:
    # Takes stored (a peer_address_copy()); peer_reserve() made room.
    cdef size_t index = peer_home(table, connection_id)
    while table.slots[index].address != NULL and table.slots[index].id != connection_id:
        index = (index + 1) & table.mask
    if table.slots[index].address == NULL:
        table.count += 1
    PyMem_RawFree(table.slots[index].address)
    table.slots[index].id = connection_id
    table.slots[index].address = stored


cdef void peer_forget(PeerTable* table, uint32_t connection_id) noexcept nogil:
    # Backward-shift deletion: an entry after the hole moves into it unless its home lies
    # cyclically between the hole and itself, so every probe sequence stays unbroken.
    cdef PeerSlot* found = peer_find(table, connection_id)
    cdef size_t hole, index, home
    if found == NULL:
        return
    hole = <size_t>(found - table.slots)
    PyMem_RawFree(found.address)
    table.slots[hole].address = NULL
    table.count -= 1
    index = hole
    while True:
        index = (index + 1) & table.mask
        if table.slots[index].address == NULL:
            return
        home = peer_home(table, table.slots[index].id)
        if (hole <= index and hole < home <= index) or (
                hole > index and (home > hole or home <= index)):
            continue
        table.slots[hole] = table.slots[index]
        table.slots[index].address = NULL
        hole = index


cdef void peer_closed(PeerTable* table, uint32_t connection_id) noexcept nogil:
    # The closed connection's address stays known until RECENT_PEERS more have closed.
    if table.closed_capacity == 0:
        peer_forget(table, connection_id)
        return
    if table.closed_count == table.closed_capacity:
        peer_forget(table, table.closed_ids[table.closed_next])
    else:
        table.closed_count += 1
    table.closed_ids[table.closed_next] = connection_id
    table.closed_next = (table.closed_next + 1) % table.closed_capacity


cdef object address_object(const PeerAddress* address):
    if address.length == 0:
        return None
    return address_from_sockaddr(
        (<const char*>address.bytes)[:min(<Py_ssize_t>address.length, ADDRESS_ROOM)])


cdef inline bint is_reset(int error) noexcept nogil:
    return (error == ECONNRESET or error == ETIMEDOUT or error == ECONNABORTED
            or error == ENOTCONN)


cdef inline bint out_of_descriptors(int error) noexcept nogil:
    return error == EMFILE or error == ENFILE or error == ENOBUFS or error == ENOMEM


# -- The PROXY protocol (fastsock/proxy.py is its Python twin) -------------------------------

cdef enum ProxyParse:
    # Why a header was refused, in the order of fastsock.proxy.REASONS; then the results
    # that are not refusals.
    PROXY_NOT_PROXY
    PROXY_V1_TOO_LONG
    PROXY_V1_MALFORMED
    PROXY_V2_UNSUPPORTED
    PROXY_V2_BAD_LENGTH
    PROXY_V2_TOO_LARGE
    PROXY_TIMED_OUT
    PROXY_TRUNCATED
    PROXY_DONE                    # a complete header: consumed bytes, the address (or none)
    PROXY_MORE                    # every byte so far begins a header


cdef enum:
    V1_MAX_HEADER = 107           # the v1 specification's longest header, CRLF included
    V1_MAX_FIELDS = 6


cdef const uint8_t* V2_SIGNATURE = <const uint8_t*>b"\r\n\r\n\x00\r\nQUIT\n"
cdef const uint8_t* V1_PREFIX = <const uint8_t*>b"PROXY "


cdef inline uint8_t* proxy_bytes(ProxyHeader* header) noexcept nogil:
    return (<uint8_t*>header) + sizeof(ProxyHeader)


cdef void inet_address(PeerAddress* address, int family, const uint8_t* host,
                       uint32_t port) noexcept nogil:
    # The sockaddr_in or sockaddr_in6 accept() would give for host and port.
    cdef uint16_t family_word = <uint16_t>family
    memset(address.bytes, 0, ADDRESS_ROOM)
    memcpy(address.bytes, &family_word, sizeof(family_word))
    address.bytes[2] = <uint8_t>(port >> 8)
    address.bytes[3] = <uint8_t>(port & 0xFF)
    if family == AF_INET:
        memcpy(address.bytes + 4, host, 4)
        address.length = 16
    else:
        memcpy(address.bytes + 8, host, 16)
        address.length = 28


cdef int v1_port(const uint8_t* text, Py_ssize_t length, uint32_t* port) noexcept nogil:
    # Decimal, 0 to 65535, no leading zero: 0, or -1 if malformed.
    cdef Py_ssize_t index
    if length < 1 or length > 5 or (text[0] == 48 and length > 1):
        return -1
    port[0] = 0
    for index in range(length):
        if text[index] < 48 or text[index] > 57:  # not '0' to '9'
            return -1
        port[0] = port[0] * 10 + (text[index] - 48)
    return 0 if port[0] <= 65535 else -1


cdef int v1_host(const uint8_t* text, Py_ssize_t length, int family,
                 uint8_t* out) noexcept nogil:
    cdef char copy[64]
    if length >= 64 or memchr(text, 0, length) != NULL:
        return -1
    memcpy(copy, text, length)
    copy[length] = 0
    return 0 if inet_pton(family, copy, out) == 1 else -1


cdef int proxy_parse_v1(const uint8_t* data, Py_ssize_t length, Py_ssize_t* consumed,
                        PeerAddress* address) noexcept nogil:
    cdef Py_ssize_t end = -1
    cdef Py_ssize_t index, count = 0
    cdef Py_ssize_t starts[V1_MAX_FIELDS]
    cdef Py_ssize_t ends[V1_MAX_FIELDS]
    cdef int family
    cdef uint8_t host[16]
    cdef uint8_t ignored[16]
    cdef uint32_t port, other_port
    if memcmp(data, V1_PREFIX, min(length, <Py_ssize_t>6)) != 0:
        return PROXY_NOT_PROXY
    for index in range(min(length, <Py_ssize_t>V1_MAX_HEADER) - 1):
        if data[index] == b'\r' and data[index + 1] == b'\n':
            end = index
            break
    if end < 0:
        return PROXY_V1_TOO_LONG if length >= V1_MAX_HEADER else PROXY_MORE
    consumed[0] = end + 2
    address.length = 0
    # The fields between single spaces, as bytes.split(b" ") gives them.
    starts[0] = 6
    for index in range(6, end):
        if data[index] == b' ':
            ends[count] = index
            count += 1
            if count == V1_MAX_FIELDS:
                break
            starts[count] = index + 1
    if count < V1_MAX_FIELDS:
        ends[count] = end
        count += 1
    if ends[0] - starts[0] == 7 and memcmp(data + starts[0], b"UNKNOWN", 7) == 0:
        # The specification: the rest of the line is ignored; the real peer stays.
        return PROXY_DONE
    if count != 5 or ends[0] - starts[0] != 4:
        return PROXY_V1_MALFORMED
    if memcmp(data + starts[0], b"TCP4", 4) == 0:
        family = AF_INET
    elif memcmp(data + starts[0], b"TCP6", 4) == 0:
        family = AF_INET6
    else:
        return PROXY_V1_MALFORMED
    if (v1_host(data + starts[1], ends[1] - starts[1], family, host) != 0
            or v1_host(data + starts[2], ends[2] - starts[2], family, ignored) != 0
            or v1_port(data + starts[3], ends[3] - starts[3], &port) != 0
            or v1_port(data + starts[4], ends[4] - starts[4], &other_port) != 0):
        return PROXY_V1_MALFORMED
    inet_address(address, family, host, port)
    return PROXY_DONE


cdef int proxy_parse_v2(const uint8_t* data, Py_ssize_t length, Py_ssize_t max_header,
                        Py_ssize_t* consumed, PeerAddress* address) noexcept nogil:
    cdef int version, command, family, transport
    cdef Py_ssize_t body, needed
    if memcmp(data, V2_SIGNATURE, min(length, <Py_ssize_t>12)) != 0:
        return PROXY_NOT_PROXY
    if length < 16:
        return PROXY_MORE
    version = data[12] >> 4
    command = data[12] & 0x0F
    family = data[13] >> 4
    transport = data[13] & 0x0F
    if version != 2 or command > 1 or family > 3 or transport > 2:
        return PROXY_V2_UNSUPPORTED
    body = (<Py_ssize_t>data[14] << 8) | data[15]
    if 16 + body > max_header:
        return PROXY_V2_TOO_LARGE
    # The bytes of the family's addresses: UNSPEC, INET, INET6, UNIX.
    needed = 0 if family == 0 else 12 if family == 1 else 36 if family == 2 else 216
    if command == 1 and body < needed:
        return PROXY_V2_BAD_LENGTH
    if length < 16 + body:
        return PROXY_MORE
    consumed[0] = 16 + body
    address.length = 0
    # LOCAL (command 0): the load balancer's own connection, e.g. a health check; the TLVs
    # after the addresses are skipped.
    if command == 1 and family == 1:
        inet_address(address, AF_INET, data + 16, (<uint32_t>data[24] << 8) | data[25])
    elif command == 1 and family == 2:
        inet_address(address, AF_INET6, data + 16, (<uint32_t>data[48] << 8) | data[49])
    return PROXY_DONE


cdef int proxy_parse(const uint8_t* data, Py_ssize_t length, Py_ssize_t max_header,
                     Py_ssize_t* consumed, PeerAddress* address) noexcept nogil:
    # A ProxyParse for the bytes a connection sent so far (length > 0).
    if data[0] == V2_SIGNATURE[0]:
        return proxy_parse_v2(data, length, max_header, consumed, address)
    return proxy_parse_v1(data, length, consumed, address)


cdef bint network_contains(const TrustedNetwork* network, int family,
                           const uint8_t* host) noexcept nogil:
    cdef int whole = network.prefix // 8
    cdef int bits = network.prefix % 8
    cdef uint8_t mask
    if network.family != family or memcmp(network.bytes, host, whole) != 0:
        return False
    if bits == 0:
        return True
    mask = <uint8_t>(0xFF << (8 - bits))
    return (network.bytes[whole] & mask) == (host[whole] & mask)


cdef class StreamEngine:

    def __cinit__(self, RingQueue ring not None, ReceiveCounters counters not None,
                  options not None, *, listeners=(), bint shared_listeners=False):
        cdef Py_ssize_t index
        cdef int flags
        cdef epoll_event registration
        cdef list listener_list
        pthread_mutex_init(&self.lock, NULL)
        self.epoll_fd = -1
        self.wake_fd = -1
        self.constructed = True
        if not isinstance(options, ReceiveOptions):
            raise TypeError(f"options must be a fastsock.ReceiveOptions, not {options!r}")
        options.check_ring(ring)
        framer_configure(&self.framer_config, options.framing, options.delimiter,
                         options.keep_delimiter, options.max_line, options.max_frame)
        self.framer_configured = True
        max_connections = options.connections_limit(thread_each=False)
        self.ring = ring
        self.counters = counters
        self.recv_size = options.recv_size
        self.idle_timeout_ns = (
            0 if options.idle_timeout is None else seconds_to_ns(options.idle_timeout))
        self.message_timeout_ns = (
            0 if options.message_timeout is None else seconds_to_ns(options.message_timeout))
        self.drain_timeout_ns = seconds_to_ns(options.drain_seconds)
        self.evict_idle_after_ns = seconds_to_ns(options.evict_idle_after)
        self.buffer_release_ns = seconds_to_ns(constants.RECEIVE_CHECK_INTERVAL)
        self.max_connections = max_connections
        self.partial_budget = (
            0 if options.max_partial_bytes is None else options.max_partial_bytes)
        self.proxy_protocol = options.proxy_protocol
        self.proxy_timeout_ns = seconds_to_ns(constants.PROXY_HEADER_TIMEOUT)
        self.proxy_room = max(constants.PROXY_MAX_HEADER, <Py_ssize_t>V1_MAX_HEADER)
        networks = [ipaddress.ip_network(network) for network in options.proxy_trusted]
        self.trusted = <TrustedNetwork*>PyMem_RawCalloc(
            max(len(networks), 1), sizeof(TrustedNetwork))
        if self.trusted == NULL:
            raise MemoryError()
        for index in range(len(networks)):
            packed = networks[index].network_address.packed
            self.trusted[index].family = AF_INET if networks[index].version == 4 else AF_INET6
            self.trusted[index].prefix = networks[index].prefixlen
            memcpy(self.trusted[index].bytes, <const char*>packed, len(packed))
        self.trusted_count = len(networks)
        self.ssl_context = options.ssl_context
        self.tls_sessions = {}
        self.tls_subjects = OrderedDict()
        self.tls_handshake_timeout_ns = seconds_to_ns(options.tls_handshake_timeout)
        self.handshake_list.kind = HANDSHAKE_LIST
        if self.ssl_context is not None:
            self.ciphertext = <uint8_t*>PyMem_RawMalloc(self.recv_size)
            if self.ciphertext == NULL:
                raise MemoryError()
        self.idle_list.kind = IDLE_LIST
        self.message_list.kind = MESSAGE_LIST
        self.buffer_list.kind = BUFFER_LIST
        self.max_spans = constants.SPANS_PER_PUBLISH
        self.max_events = EVENTS_PER_WAIT
        self.event_capacity = constants.ENGINE_EVENTS_KEPT
        self.spans = <MessageSpan*>PyMem_RawMalloc(self.max_spans * sizeof(MessageSpan))
        self.events = <epoll_event*>PyMem_RawMalloc(self.max_events * sizeof(epoll_event))
        self.event_records = <EngineEventRecord*>PyMem_RawMalloc(
            self.event_capacity * sizeof(EngineEventRecord))
        if (self.spans == NULL or self.events == NULL or self.event_records == NULL
                or peer_table_init(&self.peers, constants.RECENT_PEERS) != 0):
            raise MemoryError()

        self.epoll_fd = epoll_create1(EPOLL_CLOEXEC)
        if self.epoll_fd < 0:
            raise_errno(errno, "epoll_create1")
        self.wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if self.wake_fd < 0:
            raise_errno(errno, "eventfd")
        registration.events = EPOLLIN
        registration.data.u64 = WAKE_TAG
        if epoll_ctl(self.epoll_fd, EPOLL_CTL_ADD, self.wake_fd, &registration) != 0:
            raise_errno(errno, "epoll_ctl")

        listener_list = [int(fd) for fd in listeners]
        self.listeners = <int*>PyMem_RawMalloc(max(len(listener_list), 1) * sizeof(int))
        if self.listeners == NULL:
            raise MemoryError()
        for index in range(len(listener_list)):
            self.listeners[index] = listener_list[index]
            # Non-blocking: with several engines on one listener, another may take the
            # connection that woke this one.
            flags = fcntl(self.listeners[index], F_GETFL)
            if flags < 0 or fcntl(self.listeners[index], F_SETFL, flags | O_NONBLOCK) != 0:
                raise_errno(errno, f"listener {self.listeners[index]}")
        self.listener_count = len(listener_list)
        self.shared_listeners = shared_listeners
        self.accepting_wanted = True
        self.set_accepting(True)

    def __dealloc__(self):
        # Arguments of the wrong type fail before __cinit__ runs, leaving the descriptors at
        # zero: releasing them would close the process's standard input.
        if not self.constructed:
            return
        if not self.closed:
            self.release()
        PyMem_RawFree(self.spans)
        PyMem_RawFree(self.events)
        PyMem_RawFree(self.event_records)
        PyMem_RawFree(self.listeners)
        PyMem_RawFree(self.trusted)
        PyMem_RawFree(self.ciphertext)
        peer_table_free(&self.peers)
        if self.framer_configured:
            framer_config_clear(&self.framer_config)
        pthread_mutex_destroy(&self.lock)

    # -- Python API --------------------------------------------------------------------------

    def add_connection(self, int fd):
        cdef PeerAddress address
        cdef int flags
        cdef AdoptResult result
        if self.running:
            raise RuntimeError("add_connection() while run() runs in another thread")
        if self.closed or self.finished:
            close(fd)
            raise ConnectionRefusedError("the engine is stopped")
        address.length = ADDRESS_ROOM
        if getpeername(fd, <sockaddr*>address.bytes, &address.length) != 0:
            raise_errno(errno, "getpeername")
        flags = fcntl(fd, F_GETFL)
        if flags < 0 or fcntl(fd, F_SETFL, flags | O_NONBLOCK) != 0:
            raise_errno(errno, "fcntl")
        result = self.adopt(fd, &address, monotonic_ns())
        if result == UNTRUSTED:
            raise ConnectionRefusedError("the peer is not in proxy_trusted")
        if result != ADOPTED:
            raise ConnectionRefusedError(
                f"already receiving max_connections={self.max_connections} connections")
        return self.connection_of(fd).id

    def run(self):
        cdef EngineEnd end
        if self.running:
            raise RuntimeError("run() is already running in another thread")
        if self.closed:
            raise ValueError("the engine is closed")
        if self.finished:
            return "stopped"
        self.running = True
        try:
            while True:
                with nogil:
                    end = self.loop()
                if end != ENGINE_INTERRUPTED:
                    return END_NAMES[end]
                PyErr_CheckSignals()
        finally:
            self.running = False

    def stop(self):
        self.stop_requested = True
        self.wake()

    def accept_connections(self, bint accepting):
        self.accepting_wanted = accepting
        self.wake()

    cdef void wake(self) noexcept nogil:
        cdef uint64_t one = 1
        if self.wake_fd >= 0:
            write(self.wake_fd, &one, sizeof(one))

    def take_events(self):
        cdef EngineEventRecord* records
        cdef Py_ssize_t count, index
        cdef EngineEventRecord* event
        pthread_mutex_lock(&self.lock)
        count = self.event_count
        records = <EngineEventRecord*>PyMem_RawMalloc(max(count, 1) * sizeof(EngineEventRecord))
        if records != NULL:
            memcpy(records, self.event_records, count * sizeof(EngineEventRecord))
            self.event_count = 0
        pthread_mutex_unlock(&self.lock)
        if records == NULL:
            raise MemoryError()
        try:
            taken = []
            for index in range(count):
                event = &records[index]
                taken.append(EngineEvent(
                    numbered(event.number).name if event.kind == EVENT_PROTOCOL_ERROR
                    else EVENT_NAMES[event.kind],
                    event.connection_id or None,
                    address_object(&event.address),
                    self.event_detail(event),
                ))
            return taken
        finally:
            PyMem_RawFree(records)

    cdef object event_detail(self, EngineEventRecord* event):
        if event.kind == EVENT_PROTOCOL_ERROR:
            return event.sample[:event.sample_length]
        if event.kind == EVENT_PROXY_HEADER:
            return (proxy.REASONS[event.number], event.sample[:event.sample_length])
        if event.kind == EVENT_PROXY_UNTRUSTED:
            return None
        if event.kind == EVENT_TLS_HANDSHAKE or event.kind == EVENT_TLS_ERROR:
            return event.sample[:event.sample_length].decode("ascii", "replace")
        if (event.kind == EVENT_MESSAGE_TIMEOUT or event.kind == EVENT_EVICTED_IDLE
                or event.kind == EVENT_ACCEPT_PAUSED):
            return event.seconds
        return event.number

    def peer(self, uint32_t connection_id):
        cdef PeerAddress address
        cdef PeerSlot* slot
        address.length = 0
        pthread_mutex_lock(&self.lock)
        slot = peer_find(&self.peers, connection_id) if self.peers.slots != NULL else NULL
        if slot != NULL:
            peer_address_get(&address, slot.address)
        pthread_mutex_unlock(&self.lock)
        if slot == NULL:
            return None
        return address_object(&address)

    def peer_subject(self, uint32_t connection_id):
        return self.tls_subjects.get(connection_id)

    @property
    def tls_sessions_open(self):
        return len(self.tls_sessions)

    @property
    def connections(self):
        return self.connection_count

    def close(self):
        if self.running:
            raise RuntimeError("close() while run() runs in another thread")
        if not self.closed:
            self.release()

    cdef void release(self):
        # Every connection ends as at a drain's deadline.  The listeners stay non-blocking:
        # another engine may still accept from them.
        while self.idle_list.head != NULL:
            self.end_connection(self.idle_list.head)
        self.free_ended()
        if self.epoll_fd >= 0:
            close(self.epoll_fd)
            self.epoll_fd = -1
        if self.wake_fd >= 0:
            close(self.wake_fd)
            self.wake_fd = -1
        PyMem_RawFree(self.by_fd)
        self.by_fd = NULL
        self.by_fd_capacity = 0
        self.closed = True

    cdef Connection* connection_of(self, int fd) noexcept:
        return self.by_fd[fd] if fd < self.by_fd_capacity else NULL

    # -- The loop ----------------------------------------------------------------------------

    cdef EngineEnd loop(self) noexcept nogil:
        cdef uint64_t now
        cdef uint64_t tag
        cdef uint64_t drained
        cdef int ready, index
        cdef Connection* connection
        while True:
            if self.unannounced:
                # Before the loop waits or returns: a consumer sleeping on an empty ring gets
                # the whole turn's messages in one wake-up.
                self.ring.wake_consumers()
                self.unannounced = 0
            now = monotonic_ns()
            if not self.draining and (self.stop_requested or self.ring_closed
                                      or self.counters.stopping()):
                self.begin_drain(now)
            if self.draining and (self.connection_count == 0 or self.ring_closed
                                  or now >= self.drain_deadline_ns):
                while self.idle_list.head != NULL:
                    self.end_connection(self.idle_list.head)
                self.free_ended()
                self.finished = True
                return ENGINE_STOPPED
            if self.events_recorded != self.events_announced:
                # Once per batch of new events: a caller that leaves them untaken is not
                # woken again for them.
                self.events_announced = self.events_recorded
                return ENGINE_EVENTS
            if (not self.draining and self.accepting_wanted != self.accepting
                    and self.accept_resume_ns == 0):
                self.set_accepting(self.accepting_wanted)
            if not self.draining and self.listener_count == 0 and self.connection_count == 0:
                return ENGINE_EMPTY
            if self.paused:
                # Reading waits for ring room; accepting goes on between the waits.
                if self.accepting and self.accepting_wanted:
                    for index in range(self.listener_count):
                        self.accept_turn(index, now)
                self.resume()
                continue
            ready = epoll_wait(self.epoll_fd, self.events, self.max_events,
                               self.wait_timeout(now))
            self.wakeups += 1
            if ready < 0:
                if errno == EINTR:
                    return ENGINE_INTERRUPTED
                # EBADF or EINVAL: the engine's own descriptors are gone; nothing to wait on.
                self.stop_requested = True
                continue
            now = monotonic_ns()
            for index in range(ready):
                tag = self.events[index].data.u64
                if tag == WAKE_TAG:
                    read(self.wake_fd, &drained, sizeof(drained))
                elif tag <= <uint64_t>self.listener_count:
                    if self.accepting and self.accepting_wanted:
                        self.accept_turn(<Py_ssize_t>(tag - 1), now)
                elif not self.paused:
                    # Level-triggered: what a pause leaves unread is reported again.
                    connection = <Connection*>tag
                    if connection.fd >= 0:
                        self.serve(connection, now)
            self.free_ended()
            if not self.paused:
                self.expire(now)
                self.free_ended()

    cdef int wait_timeout(self, uint64_t now) noexcept nogil:
        # Milliseconds to the nearest deadline, rounded up; -1 when there is none.
        cdef uint64_t deadline = 0
        cdef uint64_t candidate
        cdef Connection* head
        if self.draining:
            deadline = self.drain_deadline_ns
        else:
            head = self.idle_list.head
            if self.idle_timeout_ns and head != NULL:
                deadline = max(head.last_data_ns, self.resumed_at_ns) + self.idle_timeout_ns
            head = self.message_list.head
            if self.message_timeout_ns and head != NULL:
                candidate = (max(head.message_started_ns, self.resumed_at_ns)
                             + self.message_timeout_ns)
                if deadline == 0 or candidate < deadline:
                    deadline = candidate
            head = self.buffer_list.head
            if head != NULL:
                candidate = self.buffer_release_at(head)
                if deadline == 0 or candidate < deadline:
                    deadline = candidate
            if self.accept_resume_ns and (deadline == 0 or self.accept_resume_ns < deadline):
                deadline = self.accept_resume_ns
            if self.proxy_head != NULL:
                candidate = (max(self.proxy_head.started_ns, self.resumed_at_ns)
                             + self.proxy_timeout_ns)
                if deadline == 0 or candidate < deadline:
                    deadline = candidate
            head = self.handshake_list.head
            if head != NULL:
                candidate = (max(head.handshake_started_ns, self.resumed_at_ns)
                             + self.tls_handshake_timeout_ns)
                if deadline == 0 or candidate < deadline:
                    deadline = candidate
        if deadline == 0:
            return -1
        if deadline <= now:
            return 0
        return <int>min((deadline - now + 999999) // 1000000, <uint64_t>86400000)

    cdef uint64_t buffer_release_at(self, Connection* connection) noexcept nogil:
        # Rounded up to a whole number of intervals, so that the buffers of connections that
        # fell silent together are released at one wake-up, not one each.
        cdef uint64_t interval = self.buffer_release_ns
        cdef uint64_t due = connection.last_data_ns + interval
        return due + (interval - due % interval) % interval

    cdef void expire(self, uint64_t now) noexcept nogil:
        # The lists are ordered by their clocks, so only their heads can be due.
        cdef Connection* head
        if self.draining:
            return
        while self.idle_timeout_ns and self.idle_list.head != NULL:
            head = self.idle_list.head
            if now - max(head.last_data_ns, self.resumed_at_ns) < self.idle_timeout_ns:
                break
            self.counters.add(COUNT_IDLE_TIMEOUTS, 1)
            self.end_connection(head)
        while self.message_timeout_ns and self.message_list.head != NULL:
            head = self.message_list.head
            if (now - max(head.message_started_ns, self.resumed_at_ns)
                    < self.message_timeout_ns):
                break
            self.counters.add(COUNT_MESSAGE_TIMEOUTS, 1)
            self.record(EVENT_MESSAGE_TIMEOUT, head, NULL, self.message_timeout_ns / 1e9, 0)
            self.end_connection(head)
        while self.buffer_list.head != NULL:
            head = self.buffer_list.head
            if now < self.buffer_release_at(head):
                break
            # Silent for a while: a connection with no partial message gives its buffer
            # back (the next read allocates again); one with a partial keeps it.
            framer_release_if_empty(&head.framer)
            list_remove(&self.buffer_list, head)
        while self.proxy_head != NULL:
            if (now - max(self.proxy_head.started_ns, self.resumed_at_ns)
                    < self.proxy_timeout_ns):
                break
            self.header_failed(<Connection*>self.proxy_head.connection, PROXY_TIMED_OUT)
        while self.handshake_list.head != NULL:
            head = self.handshake_list.head
            if (now - max(head.handshake_started_ns, self.resumed_at_ns)
                    < self.tls_handshake_timeout_ns):
                break
            self.counters.add(COUNT_TLS_HANDSHAKE_ERRORS, 1)
            self.record(EVENT_TLS_HANDSHAKE, head, NULL, 0, 0, HANDSHAKE_TIMED_OUT,
                        strlen(HANDSHAKE_TIMED_OUT))
            self.end_connection(head)
        if self.accept_resume_ns and now >= self.accept_resume_ns:
            self.accept_resume_ns = 0
            self.set_accepting(True)

    # -- Accepting ---------------------------------------------------------------------------

    cdef void set_accepting(self, bint accepting) noexcept nogil:
        cdef Py_ssize_t index
        if accepting == self.accepting:
            return
        for index in range(self.listener_count):
            if accepting:
                self.watch_listener(index)
            else:
                epoll_ctl(self.epoll_fd, EPOLL_CTL_DEL, self.listeners[index], NULL)
        self.accepting = accepting

    cdef void watch_listener(self, Py_ssize_t index) noexcept nogil:
        # EPOLLEXCLUSIVE: of several engines on one listener, one wakes per connection
        # instead of all -- the first registered of those waiting in epoll_wait().  Adding
        # checks readiness at once, so a backlog that is already there is reported.
        cdef epoll_event registration
        registration.events = EPOLLIN | EPOLLEXCLUSIVE
        registration.data.u64 = <uint64_t>(index + 1)
        epoll_ctl(self.epoll_fd, EPOLL_CTL_ADD, self.listeners[index], &registration)

    cdef void accept_turn(self, Py_ssize_t index, uint64_t now) noexcept nogil:
        # A shared listener is taken a few connections at a time, and the engine that took
        # some registers again, which puts it behind the other engines in the listener's
        # queue of exclusive waiters: the next connection wakes another engine if one is
        # waiting.  What this turn leaves in the backlog is not lost: the listener is
        # level-triggered, so this engine's next epoll_wait() reports it again.
        if not self.shared_listeners:
            self.accept_from(self.listeners[index], ACCEPTS_PER_TURN, now)
            return
        if self.accept_from(self.listeners[index], SHARED_ACCEPTS_PER_TURN, now) == 0:
            return
        if self.accepting and not self.draining:
            epoll_ctl(self.epoll_fd, EPOLL_CTL_DEL, self.listeners[index], NULL)
            self.watch_listener(index)

    cdef int accept_from(self, int listener, int budget, uint64_t now) noexcept nogil:
        # Accepts at most budget connections; returns how many it took off the backlog.
        cdef PeerAddress address
        cdef AdoptResult result
        cdef int fd, error, _
        cdef int taken = 0
        for _ in range(budget):
            address.length = ADDRESS_ROOM
            fd = accept4(listener, <sockaddr*>address.bytes, &address.length,
                         SOCK_NONBLOCK | SOCK_CLOEXEC)
            if fd < 0:
                error = errno
                if error == EINTR or error == ECONNABORTED or error == EPROTO:
                    continue
                if out_of_descriptors(error):
                    self.accept_backoff = min(max(self.accept_backoff * 2, BACKOFF_INITIAL),
                                              BACKOFF_MAX)
                    self.accept_resume_ns = now + seconds_to_ns(self.accept_backoff)
                    self.set_accepting(False)
                    self.record(EVENT_ACCEPT_PAUSED, NULL, NULL, self.accept_backoff, error)
                return taken
            taken += 1
            self.accept_backoff = 0
            result = self.adopt(fd, &address, now)
            if result == REFUSED:
                self.record(EVENT_REFUSED, NULL, &address, 0, <uint64_t>self.max_connections)
            elif result == UNTRUSTED:
                self.record(EVENT_PROXY_UNTRUSTED, NULL, &address, 0, 0)
        return taken

    cdef AdoptResult adopt(self, int fd, const PeerAddress* address,
                           uint64_t now) noexcept nogil:
        # Unless ADOPTED, fd is closed.
        cdef Connection* connection
        cdef Connection** grown
        cdef Py_ssize_t capacity
        cdef epoll_event registration
        cdef PeerAddress* stored
        cdef ProxyHeader* header = NULL
        cdef bint reserved
        cdef int failure = 0
        cdef int error = 0
        if self.proxy_protocol and not self.peer_trusted(address):
            # Never read: whatever it would send cannot be believed.  Counted before the
            # close, so that a peer that sees its connection end sees the count too.
            self.counters.add(COUNT_PROXY_HEADER_ERRORS, 1)
            close(fd)
            return UNTRUSTED
        if self.connection_count >= self.max_connections and not self.make_room(now):
            self.counters.add(COUNT_CONNECTIONS_REFUSED, 1)
            close(fd)
            return REFUSED
        if fd >= self.by_fd_capacity:
            capacity = max(fd + 1, 2 * self.by_fd_capacity, 64)
            grown = <Connection**>PyMem_RawRealloc(self.by_fd, capacity * sizeof(Connection*))
            if grown == NULL:
                self.record(EVENT_NO_MEMORY, NULL, address, 0, ENOMEM)
                close(fd)
                return FAILED
            memset(grown + self.by_fd_capacity, 0,
                   (capacity - self.by_fd_capacity) * sizeof(Connection*))
            self.by_fd = grown
            self.by_fd_capacity = capacity
        connection = <Connection*>PyMem_RawCalloc(1, sizeof(Connection))
        stored = peer_address_copy(address)
        if self.proxy_protocol:
            header = <ProxyHeader*>PyMem_RawMalloc(sizeof(ProxyHeader) + self.proxy_room)
        pthread_mutex_lock(&self.lock)
        reserved = peer_reserve(&self.peers)
        pthread_mutex_unlock(&self.lock)
        if connection != NULL:
            connection.fd = fd
            connection.id = self.counters.take_connection_id()
        if (connection == NULL or stored == NULL or not reserved
                or (self.proxy_protocol and header == NULL)
                or (self.ssl_context is not None and not self.tls_open(connection))):
            failure, error = EVENT_NO_MEMORY, ENOMEM
        else:
            registration.events = EPOLLIN
            registration.data.u64 = <uint64_t>connection
            if epoll_ctl(self.epoll_fd, EPOLL_CTL_ADD, fd, &registration) != 0:
                failure, error = EVENT_OS_ERROR, errno
        if error != 0:
            self.record(failure, NULL, address, 0, error)
            if connection != NULL and connection.tls:
                self.tls_forget(connection)
            PyMem_RawFree(header)
            PyMem_RawFree(stored)
            PyMem_RawFree(connection)
            close(fd)
            return FAILED
        connection.last_data_ns = now
        self.by_fd[fd] = connection
        self.connection_count += 1
        self.counters.add(COUNT_CONNECTIONS_OPENED, 1)
        list_append(&self.idle_list, connection)
        pthread_mutex_lock(&self.lock)
        peer_put(&self.peers, connection.id, stored)
        pthread_mutex_unlock(&self.lock)
        if header != NULL:
            header.started_ns = now
            header.length = 0
            header.connection = connection
            header.next = NULL
            header.prev = self.proxy_tail
            if self.proxy_tail != NULL:
                self.proxy_tail.next = header
            else:
                self.proxy_head = header
            self.proxy_tail = header
            connection.proxy = header
        elif connection.tls:
            self.handshake_start(connection, now)
        if self.draining:
            # Accepted from the backlog by a stop: it hands over what it sent, like the rest.
            shutdown(fd, SHUT_RDWR)
        return ADOPTED

    cdef bint make_room(self, uint64_t now) noexcept nogil:
        # Evicts the connection silent longest if it has been silent evict_idle_after.
        cdef Connection* idlest = self.idle_list.head
        cdef uint64_t silent
        while idlest != NULL and idlest == self.blocked:
            idlest = idlest.next[<int>IDLE_LIST]
        if idlest == NULL:
            return False
        silent = now - max(idlest.last_data_ns, self.resumed_at_ns)
        if silent < self.evict_idle_after_ns:
            return False
        self.counters.add(COUNT_IDLE_EVICTIONS, 1)
        self.record(EVENT_EVICTED_IDLE, idlest, NULL, silent / 1e9, 0)
        self.end_connection(idlest)
        return True

    # -- Receiving ---------------------------------------------------------------------------

    cdef void serve(self, Connection* connection, uint64_t now) noexcept nogil:
        # One recv() of at most recv_size bytes: the fairness budget of a turn.
        cdef ssize_t received
        if connection.proxy != NULL:
            self.serve_header(connection, now)
            return
        if connection.tls:
            self.serve_tls(connection, now)
            return
        if framer_reserve(&connection.framer, &self.framer_config, self.recv_size) != 0:
            self.record(EVENT_NO_MEMORY, connection, NULL, 0, ENOMEM)
            self.end_connection(connection)
            return
        received = recv(connection.fd, framer_write_pointer(&connection.framer),
                        min(framer_write_space(&connection.framer), self.recv_size), 0)
        if received > 0:
            connection.last_data_ns = now
            list_append(&self.idle_list, connection)
            list_append(&self.buffer_list, connection)
            self.counters.add(COUNT_BYTES_RECEIVED, <uint64_t>received)
            self.published = 0
            self.status = framer_commit(&connection.framer, &self.framer_config, received,
                                        self.spans, self.max_spans, &self.nspans)
            if self.deliver(connection):
                self.after_read(connection, now)
            return
        if received == 0:
            # The peer finished, or a stop's drain read everything it had sent.
            self.end_connection(connection)
            return
        self.receive_failed(connection, errno)

    cdef void receive_failed(self, Connection* connection, int error) noexcept nogil:
        # recv() failed: a reset ends the connection as an ordinary end, another error with
        # an event; EAGAIN and EINTR are no failure.
        if error == EAGAIN or error == EINTR:
            return
        if is_reset(error):
            self.counters.add(COUNT_RESETS, 1)
        else:
            self.record(EVENT_OS_ERROR, connection, NULL, 0, error)
        self.end_connection(connection)

    # -- TLS: the ciphertext is read here without the GIL, and its session (Python's ssl)
    # -- decrypts it with the GIL straight into the framer's buffer -------------------------

    cdef void serve_tls(self, Connection* connection, uint64_t now) noexcept nogil:
        # One recv() of ciphertext, at most recv_size, as for a plaintext connection.
        cdef ssize_t received = recv(connection.fd, self.ciphertext, self.recv_size, 0)
        cdef int error
        if received < 0:
            error = errno
            if connection.handshaking and is_reset(error):
                self.counters.add(COUNT_TLS_HANDSHAKE_ERRORS, 1)
                self.record(EVENT_TLS_HANDSHAKE, connection, NULL, 0, error, HANDSHAKE_RESET,
                            strlen(HANDSHAKE_RESET))
                self.end_connection(connection)
                return
            self.receive_failed(connection, error)
            return
        if received > 0:
            connection.last_data_ns = now
            list_append(&self.idle_list, connection)
        self.tls_process(connection, received, received == 0, now)

    cdef void tls_process(self, Connection* connection, Py_ssize_t fed, bint eof,
                          uint64_t now) noexcept nogil:
        # Hands the ciphertext in self.ciphertext[:fed] (and the peer's end if eof) to the
        # session, then frames all the plaintext it yields, a framer's buffer at a time;
        # stops early when the ring is full (resume() calls again) or the connection ends.
        cdef Py_ssize_t plaintext
        cdef bint drained = False
        if fed:
            tls_records_follow(&connection.records, self.ciphertext, fed)
        while connection.fd >= 0:
            if framer_reserve(&connection.framer, &self.framer_config,
                              self.recv_size + TLS_RECORD_PLAINTEXT) != 0:
                self.record(EVENT_NO_MEMORY, connection, NULL, 0, ENOMEM)
                self.end_connection(connection)
                return
            plaintext = self.tls_step(connection, fed, eof,
                                      framer_write_pointer(&connection.framer),
                                      framer_write_space(&connection.framer), &drained)
            fed = 0
            if plaintext == TLS_FAILED or plaintext == TLS_CLOSED:
                self.end_connection(connection)
                return
            if plaintext == 0:
                break
            list_append(&self.buffer_list, connection)
            self.counters.add(COUNT_BYTES_RECEIVED, <uint64_t>plaintext)
            self.published = 0
            self.status = framer_commit(&connection.framer, &self.framer_config, plaintext,
                                        self.spans, self.max_spans, &self.nspans)
            if not self.deliver(connection):
                return
            self.after_read(connection, now)
            if drained:
                # Another step would only find that the session wants more ciphertext.
                break
        if eof and connection.fd >= 0:
            # The peer finished without close_notify, outside a record (inside one, the
            # session said so): an ordinary end, as for plaintext.
            self.end_connection(connection)

    cdef Py_ssize_t tls_step(self, Connection* connection, Py_ssize_t fed, bint eof,
                             char* plaintext, Py_ssize_t room,
                             bint* drained) noexcept with gil:
        # The one place the engine takes the GIL: feed, handshake, decrypt into plaintext;
        # drained: the plaintext was all the session had.
        cdef int kind = EVENT_TLS_HANDSHAKE
        cdef bytes reason
        cdef Py_ssize_t taken
        try:
            session = self.tls_sessions[connection.id]
            if fed:
                session.receive(PyMemoryView_FromMemory(<char*>self.ciphertext, fed, PyBUF_READ),
                                connection.records.unfinished)
            if eof:
                if connection.handshaking and not session.received:
                    # Closed before a byte (a TCP health check, a port scan): no handshake.
                    return TLS_CLOSED
                session.receive(b"")
            if connection.handshaking:
                if not session.advance_handshake():
                    return 0
                connection.handshaking = False
                list_remove(&self.handshake_list, connection)
                if session.subject is not None:
                    self.tls_subjects[connection.id] = session.subject
            taken = session.read_into(PyMemoryView_FromMemory(plaintext, room, PyBUF_WRITE))
            drained[0] = session.drained
            return taken
        except tls.HandshakeFailed as exc:
            self.counters.add(COUNT_TLS_HANDSHAKE_ERRORS, 1)
            reason = exc.reason.encode("ascii", "replace")
        except tls.TlsBroken as exc:
            kind = EVENT_TLS_ERROR
            self.counters.add(COUNT_RESETS, 1)
            reason = exc.reason.encode("ascii", "replace")
        except BaseException:
            self.record(EVENT_NO_MEMORY, connection, NULL, 0, ENOMEM)
            return TLS_FAILED
        self.record(kind, connection, NULL, 0, 0, reason, len(reason))
        return TLS_FAILED

    cdef bint tls_open(self, Connection* connection) noexcept with gil:
        # False out of memory (or if the context refuses to make a session).
        try:
            self.tls_sessions[connection.id] = tls.TlsSession(self.ssl_context, connection.fd)
        except BaseException:
            return False
        connection.tls = True
        return True

    cdef void tls_forget(self, Connection* connection) noexcept with gil:
        # The session goes with the connection; a subject stays as long as its address.
        connection.tls = False
        if self.tls_sessions is None:
            return  # the engine is being collected: its tables went first
        self.tls_sessions.pop(connection.id, None)
        if connection.id in self.tls_subjects:
            self.tls_subjects.move_to_end(connection.id)
            while len(self.tls_subjects) > constants.RECENT_PEERS + len(self.tls_sessions):
                self.tls_subjects.popitem(last=False)

    cdef void handshake_start(self, Connection* connection, uint64_t now) noexcept nogil:
        connection.handshaking = True
        connection.handshake_started_ns = now
        list_append(&self.handshake_list, connection)

    cdef void serve_header(self, Connection* connection, uint64_t now) noexcept nogil:
        # One recv() into the pending PROXY header's buffer, at most what it has room for
        # (no header is longer) and recv_size (the turn's budget, and so the bytes after
        # the header are at most what a read brings), then a parse of all received so far.
        cdef ProxyHeader* header = connection.proxy
        cdef uint8_t* data = proxy_bytes(header)
        cdef ssize_t received
        cdef int result
        cdef Py_ssize_t consumed = 0
        cdef PeerAddress address
        received = recv(connection.fd, data + header.length,
                        min(self.proxy_room - header.length, self.recv_size), 0)
        if received == 0:
            # A peer that sent nothing (a TCP health check, a port scan) just closed.
            if header.length == 0:
                self.end_connection(connection)
            else:
                self.header_failed(connection, PROXY_TRUNCATED)
            return
        if received < 0:
            self.receive_failed(connection, errno)
            return
        connection.last_data_ns = now
        list_append(&self.idle_list, connection)
        self.counters.add(COUNT_BYTES_RECEIVED, <uint64_t>received)
        header.length += received
        address.length = 0
        result = proxy_parse(data, header.length, self.proxy_room, &consumed, &address)
        if result == PROXY_DONE:
            self.header_done(connection, consumed, &address, now)
        elif result != PROXY_MORE:
            self.header_failed(connection, result)
        elif header.length == self.proxy_room:
            # Unreachable: every header longer than the room is refused before it fills.
            self.header_failed(connection, PROXY_V2_TOO_LARGE)

    cdef void header_done(self, Connection* connection, Py_ssize_t consumed,
                          const PeerAddress* address, uint64_t now) noexcept nogil:
        # The connection's address becomes the header's (unless it names none); the bytes
        # received after the header are framed as if this read had brought only them.
        cdef ProxyHeader* header = connection.proxy
        cdef Py_ssize_t rest = header.length - consumed
        cdef PeerAddress* stored
        if address.length:
            stored = peer_address_copy(address)
            if stored == NULL:
                self.record(EVENT_NO_MEMORY, connection, NULL, 0, ENOMEM)
                self.end_connection(connection)
                return
            pthread_mutex_lock(&self.lock)
            peer_put(&self.peers, connection.id, stored)
            pthread_mutex_unlock(&self.lock)
        if connection.tls:
            # PROXY comes before TLS: the bytes after the header begin the handshake, and
            # are counted as their plaintext (they were counted as received with the header;
            # the unsigned add of the negation subtracts).
            self.counters.add(COUNT_BYTES_RECEIVED, <uint64_t>0 - <uint64_t>rest)
            memcpy(self.ciphertext, proxy_bytes(header) + consumed, rest)
            self.header_release(connection)
            self.handshake_start(connection, now)
            if rest:
                self.tls_process(connection, rest, False, now)
            return
        if rest == 0:
            self.header_release(connection)
            return
        if framer_reserve(&connection.framer, &self.framer_config, rest) != 0:
            self.record(EVENT_NO_MEMORY, connection, NULL, 0, ENOMEM)
            self.end_connection(connection)
            return
        memcpy(framer_write_pointer(&connection.framer), proxy_bytes(header) + consumed, rest)
        self.header_release(connection)
        list_append(&self.buffer_list, connection)
        self.published = 0
        self.status = framer_commit(&connection.framer, &self.framer_config, rest,
                                    self.spans, self.max_spans, &self.nspans)
        if self.deliver(connection):
            self.after_read(connection, now)

    cdef void header_failed(self, Connection* connection, int reason) noexcept nogil:
        # Its bytes are counted as discarded when it ends.
        self.counters.add(COUNT_PROXY_HEADER_ERRORS, 1)
        self.record(EVENT_PROXY_HEADER, connection, NULL, 0, <uint64_t>reason)
        self.end_connection(connection)

    cdef void header_release(self, Connection* connection) noexcept nogil:
        cdef ProxyHeader* header = connection.proxy
        if header == NULL:
            return
        if header.prev != NULL:
            header.prev.next = header.next
        else:
            self.proxy_head = header.next
        if header.next != NULL:
            header.next.prev = header.prev
        else:
            self.proxy_tail = header.prev
        connection.proxy = NULL
        PyMem_RawFree(header)

    cdef bint peer_trusted(self, const PeerAddress* address) noexcept nogil:
        # At accept, by the real peer's address: a Unix socket peer is a process of this
        # host; an IPv4-mapped IPv6 address is matched as the IPv4 one.
        cdef uint16_t family = 0
        cdef const uint8_t* host
        cdef int host_family
        cdef Py_ssize_t index
        cdef uint8_t* mapped_prefix = <uint8_t*>b"\0\0\0\0\0\0\0\0\0\0\xff\xff"
        if address.length >= sizeof(family):
            memcpy(&family, address.bytes, sizeof(family))
        if family == AF_UNIX:
            return True
        # One assignment each: a tuple assignment goes through a temporary that drops const.
        if family == AF_INET and address.length >= 8:
            host_family = AF_INET
            host = address.bytes + 4
        elif family == AF_INET6 and address.length >= 24:
            host_family = AF_INET6
            host = address.bytes + 8
            if memcmp(host, mapped_prefix, 12) == 0:
                host_family = AF_INET
                host = host + 12
        else:
            return False
        for index in range(self.trusted_count):
            if network_contains(&self.trusted[index], host_family, host):
                return True
        # An IPv4-mapped address also matches an IPv6 network that holds it as such.
        if host_family == AF_INET and family == AF_INET6:
            for index in range(self.trusted_count):
                if network_contains(&self.trusted[index], AF_INET6, address.bytes + 8):
                    return True
        return False

    cdef bint deliver(self, Connection* connection) noexcept nogil:
        # Publishes the framed spans; False when the ring held them back (the engine is
        # paused) or the connection ended on a framing error.
        while True:
            if not self.publish_pending(connection):
                return False
            framer_consume(&connection.framer)
            if self.status == FRAMER_SPANS_FULL:
                self.published = 0
                self.status = framer_commit(&connection.framer, &self.framer_config, 0,
                                            self.spans, self.max_spans, &self.nspans)
                continue
            if self.status == FRAMER_PROTOCOL_ERROR:
                self.framing_failed(connection)
                return False
            self.nspans = self.published = 0
            return True

    cdef bint publish_pending(self, Connection* connection) noexcept nogil:
        cdef Py_ssize_t published
        while self.published < self.nspans:
            published = self.ring.put_spans(
                framer_base(&connection.framer), self.spans + self.published,
                self.nspans - self.published, connection.id, False)
            if published < 0:
                self.ring_closed = True
                self.blocked = connection
                return False
            if published == 0:
                # Full: no connection is read until the ring drains to its resume mark, so
                # TCP's windows push back on every sender.
                self.blocked = connection
                self.paused = True
                self.paused_at_ns = monotonic_ns()
                self.counters.add(COUNT_PAUSES, 1)
                return False
            self.counters.add(COUNT_MESSAGES_RECEIVED, <uint64_t>published)
            self.published += published
            self.unannounced += <uint64_t>published
            if self.unannounced >= ANNOUNCE_AFTER:
                self.ring.wake_consumers()
                self.unannounced = 0
        return True

    cdef void resume(self) noexcept nogil:
        # Waits one slice for ring room, then delivers the rest of the held-back messages;
        # meanwhile the loop looks at stop requests and the drain deadline between slices.
        cdef Connection* connection = self.blocked
        cdef int resumed = self.ring.wait_resume(self.spans[self.published].length,
                                                 PAUSED_WAIT_SLICE)
        cdef uint64_t now
        if resumed < 0:
            self.ring_closed = True
            return
        if resumed == 0:
            return
        now = monotonic_ns()
        self.counters.add(COUNT_PAUSED_NS, now - self.paused_at_ns)
        self.paused = False
        self.resumed_at_ns = now
        self.blocked = NULL
        connection.last_data_ns = now
        list_append(&self.idle_list, connection)
        if self.deliver(connection):
            self.after_read(connection, now)
            if connection.tls:
                # What the session still holds yields no readiness event of its own.
                self.tls_process(connection, 0, False, now)

    cdef void framing_failed(self, Connection* connection) noexcept nogil:
        cdef ProtocolError kind = <ProtocolError>connection.framer.failed
        self.counters.count_protocol_error(kind)
        self.nspans = self.published = 0
        self.record(EVENT_PROTOCOL_ERROR, connection, NULL, 0, kind)
        self.end_connection(connection)

    cdef void after_read(self, Connection* connection, uint64_t now) noexcept nogil:
        cdef uint64_t held = framer_held_bytes(&connection.framer)
        cdef uint64_t total
        cdef bint over_budget = False
        if held != connection.held_bytes:
            total = self.counters.hold_partial(connection.held_bytes, held)
            connection.held_bytes = held
            over_budget = self.partial_budget and held and total > self.partial_budget
        if held == 0:
            connection.message_started_ns = 0
            list_remove(&self.message_list, connection)
        elif (connection.message_started_ns == 0
                or connection.framer.messages_out != connection.messages_at_start):
            # The deadline is per message: completing one restarts the clock.
            connection.message_started_ns = now
            connection.messages_at_start = connection.framer.messages_out
            list_append(&self.message_list, connection)
        if over_budget:
            self.relieve_memory()

    cdef void relieve_memory(self) noexcept nogil:
        cdef Connection* candidate = self.idle_list.head
        cdef Connection* largest = NULL
        while candidate != NULL:
            if candidate != self.blocked and (
                    largest == NULL or candidate.held_bytes > largest.held_bytes):
                largest = candidate
            candidate = candidate.next[<int>IDLE_LIST]
        if largest == NULL or largest.held_bytes == 0:
            return
        self.counters.add(COUNT_MEMORY_EVICTIONS, 1)
        self.record(EVENT_EVICTED_MEMORY, largest, NULL, 0, largest.held_bytes)
        self.end_connection(largest)

    # -- Stopping and ending -----------------------------------------------------------------

    cdef void begin_drain(self, uint64_t now) noexcept nogil:
        # Connections still in the listeners' backlogs were acknowledged by the kernel:
        # they are accepted and drained like the others (also when accepting was off), then
        # accepting stops.
        cdef Connection* connection
        cdef Py_ssize_t index
        self.draining = True
        self.drain_deadline_ns = now + (0 if self.ring_closed else self.drain_timeout_ns)
        if not self.ring_closed:
            for index in range(self.listener_count):
                self.accept_from(self.listeners[index], ACCEPTS_PER_TURN, now)
        self.set_accepting(False)
        self.accept_resume_ns = 0
        connection = self.idle_list.head
        while connection != NULL:
            # Our FIN puts TCP in FIN-WAIT, where the kernel answers further data with a
            # reset instead of acknowledging it: what it holds now is all the peer was told
            # was delivered.  A Unix peer's sends fail.
            shutdown(connection.fd, SHUT_RDWR)
            connection = connection.next[<int>IDLE_LIST]

    cdef void end_connection(self, Connection* connection) noexcept nogil:
        cdef int queued = 0
        cdef Py_ssize_t index
        cdef uint64_t unpublished_bytes = 0
        if ioctl(connection.fd, FIONREAD, &queued) == 0 and queued > 0:
            self.counters.add(COUNT_BYTES_UNREAD, <uint64_t>queued)
        if connection == self.blocked:
            for index in range(self.published, self.nspans):
                unpublished_bytes += self.spans[index].length
            self.counters.add(COUNT_MESSAGES_DROPPED, <uint64_t>(self.nspans - self.published))
            if self.paused:
                self.counters.add(COUNT_PAUSED_NS, monotonic_ns() - self.paused_at_ns)
            self.blocked = NULL
            self.paused = False
            self.nspans = self.published = 0
        if connection.proxy != NULL:
            unpublished_bytes += <uint64_t>connection.proxy.length
            self.header_release(connection)
        if connection.tls:
            self.tls_forget(connection)
        self.counters.add(COUNT_BYTES_DISCARDED,
                          unpublished_bytes + framer_discard_pending(&connection.framer))
        self.counters.hold_partial(connection.held_bytes, 0)
        connection.held_bytes = 0
        framer_free(&connection.framer)
        self.counters.add(COUNT_CONNECTIONS_CLOSED, 1)
        close(connection.fd)
        self.by_fd[connection.fd] = NULL
        self.connection_count -= 1
        list_remove(&self.idle_list, connection)
        list_remove(&self.message_list, connection)
        list_remove(&self.buffer_list, connection)
        list_remove(&self.handshake_list, connection)
        pthread_mutex_lock(&self.lock)
        peer_closed(&self.peers, connection.id)
        pthread_mutex_unlock(&self.lock)
        # Freed after the turn: a later event of the same epoll_wait may still name it.
        connection.fd = -1
        connection.next_ended = self.ended
        self.ended = connection

    cdef void free_ended(self) noexcept nogil:
        cdef Connection* connection
        while self.ended != NULL:
            connection = self.ended
            self.ended = connection.next_ended
            PyMem_RawFree(connection)

    cdef void record(self, int kind, Connection* connection, const PeerAddress* address,
                     double seconds, uint64_t number, const char* text=NULL,
                     Py_ssize_t text_length=0) noexcept nogil:
        cdef EngineEventRecord* event
        cdef PeerSlot* slot
        pthread_mutex_lock(&self.lock)
        if self.event_count == self.event_capacity:
            self.events_lost += 1
            pthread_mutex_unlock(&self.lock)
            return
        event = &self.event_records[self.event_count]
        self.event_count += 1
        self.events_recorded += 1
        event.kind = kind
        event.connection_id = 0 if connection == NULL else connection.id
        event.seconds = seconds
        event.number = number
        event.sample_length = 0
        event.address.length = 0
        if address != NULL:
            event.address = address[0]
        elif connection != NULL:
            slot = peer_find(&self.peers, connection.id)
            if slot != NULL:
                peer_address_get(&event.address, slot.address)
        if connection != NULL and kind == EVENT_PROXY_HEADER and connection.proxy != NULL:
            event.sample_length = min(connection.proxy.length, SAMPLE_LENGTH)
            memcpy(event.sample, proxy_bytes(connection.proxy), event.sample_length)
        if connection != NULL and kind == EVENT_PROTOCOL_ERROR:
            event.sample_length = min(framer_held_bytes(&connection.framer), SAMPLE_LENGTH)
            memcpy(event.sample, framer_base(&connection.framer) + connection.framer.head,
                   event.sample_length)
        if text != NULL:
            event.sample_length = min(text_length, <Py_ssize_t>sizeof(event.sample))
            memcpy(event.sample, text, event.sample_length)
        pthread_mutex_unlock(&self.lock)
