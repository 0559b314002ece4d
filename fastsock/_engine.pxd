# The compiled event engine: one epoll loop, run without the GIL, that accepts, reads,
# frames and publishes for every connection it owns.  A connection is a plain C struct
# (its framer state, its clocks, its links in the timer lists); the engine finds it by
# descriptor, and its peer address by connection id in the PeerTable.

from libc.stdint cimport uint8_t, uint32_t, uint64_t

from fastsock._framing cimport FramerConfig, FramerState, FramerStatus
from fastsock._native cimport epoll_event, pthread_mutex_t, socklen_t
from fastsock._recvloop cimport ReceiveCounters
from fastsock._ring cimport RingQueue
from fastsock._span cimport MessageSpan


cdef enum:
    # Room for any sockaddr (sizeof(struct sockaddr_storage)).
    ADDRESS_ROOM = 128


cdef struct PeerAddress:
    socklen_t length
    uint8_t bytes[ADDRESS_ROOM]


cdef struct ProxyHeader:
    # The PROXY protocol header of a connection while it is pending (proxy_protocol on):
    # allocated at accept with the engine's proxy_room bytes after it, freed once the header
    # is parsed or the connection ends, so a connection pays only a pointer for it after.
    # The pending headers form a list in accept order: the head's deadline is the nearest.
    uint64_t started_ns
    ProxyHeader* prev
    ProxyHeader* next
    void* connection              # the Connection it belongs to
    Py_ssize_t length             # bytes received into it


cdef struct TrustedNetwork:
    # One network of proxy_trusted: a peer whose address starts with these prefix bits may
    # send a PROXY header.
    int family                    # AF_INET or AF_INET6
    int prefix
    uint8_t bytes[16]


cdef struct TlsRecords:
    # Where a TLS connection's ciphertext stands in its records (fastsock.tls's
    # RecordBoundaries in C): the header so far, the body bytes still to come, and the bytes
    # of the incomplete record at the end (-1: the stream is not made of TLS records).
    uint8_t header[5]
    uint8_t header_length
    uint32_t body_left
    Py_ssize_t unfinished


cdef enum ConnectionListKind:
    # Every connection is in the idle list, ordered by last_data_ns (silent longest first);
    # one with a partial message also in the message list, by message_started_ns; one
    # holding a receive buffer also in the buffer list, by last_data_ns; a TLS one whose
    # handshake is under way also in the handshake list, by handshake_started_ns.
    IDLE_LIST
    MESSAGE_LIST
    BUFFER_LIST
    HANDSHAKE_LIST
    LIST_KINDS


cdef struct Connection:
    int fd                        # -1 once ended, until the end of the turn frees it
    uint32_t id
    FramerState framer
    uint64_t last_data_ns         # the last byte received (or the accept)
    uint64_t message_started_ns   # when the partial message began; 0: none pending
    unsigned long long messages_at_start  # the framer's messages_out then
    uint64_t held_bytes           # this connection's share of the partial-bytes gauge
    Connection* prev[LIST_KINDS]
    Connection* next[LIST_KINDS]
    bint listed[LIST_KINDS]
    Connection* next_ended        # the turn's ended connections, freed after it
    ProxyHeader* proxy            # NULL unless its PROXY header is still pending
    bint tls                      # its TlsSession is in the engine's tls_sessions
    bint handshaking              # TLS, and the handshake is not done
    uint64_t handshake_started_ns
    TlsRecords records            # TLS: where its ciphertext stands in its records


cdef struct ConnectionList:
    ConnectionListKind kind
    Connection* head
    Connection* tail


cdef struct PeerSlot:
    # An open-addressing slot, free while address is NULL; the address, allocated as long
    # as it is, belongs to the table.
    uint32_t id
    PeerAddress* address


cdef struct PeerTable:
    # Connection id -> peer address, for the open connections and the last RECENT_PEERS
    # closed ones (a ring of their ids says which to forget next).  Linear probing with
    # backward-shift deletion, so there are no tombstones to clean up; the slots double
    # when half of them are taken.
    PeerSlot* slots
    size_t mask
    size_t count
    uint32_t* closed_ids
    size_t closed_capacity
    size_t closed_count
    size_t closed_next


cdef struct EngineEventRecord:
    int kind                      # an EventKind
    uint32_t connection_id        # 0: none
    PeerAddress address           # length 0: none
    double seconds                # message_timeout, evicted_idle, accept_paused
    uint64_t number               # evicted_memory bytes, refused's limit, errno, ProtocolError
    Py_ssize_t sample_length
    char sample[64]               # a framing error's offending bytes, first ones


cdef enum AdoptResult:
    ADOPTED
    REFUSED                       # max_connections are open and none could be evicted
    UNTRUSTED                     # proxy_protocol, and the peer is outside proxy_trusted
    FAILED                        # out of memory, or epoll refused the descriptor


cdef enum EngineEnd:
    ENGINE_EVENTS
    ENGINE_STOPPED
    ENGINE_EMPTY
    ENGINE_INTERRUPTED            # a signal: the caller checks for it, then resumes


cdef class StreamEngine:
    cdef RingQueue ring
    cdef ReceiveCounters counters
    cdef FramerConfig framer_config
    cdef bint framer_configured
    cdef int epoll_fd
    cdef int wake_fd                  # an eventfd: stop() writes it
    cdef int* listeners
    cdef Py_ssize_t listener_count
    cdef bint shared_listeners        # other engines accept from the listeners too
    cdef bint accepting               # the listeners are in the epoll set
    cdef volatile bint accepting_wanted  # accept_connections()
    cdef uint64_t accept_resume_ns    # accepting paused after EMFILE until then; 0: not
    cdef double accept_backoff

    # Options, in nanoseconds where they are durations; 0: none.
    cdef Py_ssize_t recv_size
    cdef uint64_t idle_timeout_ns
    cdef uint64_t message_timeout_ns
    cdef uint64_t drain_timeout_ns
    cdef uint64_t evict_idle_after_ns
    cdef uint64_t buffer_release_ns
    cdef Py_ssize_t max_connections
    cdef uint64_t partial_budget

    # The PROXY protocol: a header pending on each new connection, from a trusted peer only.
    cdef bint proxy_protocol
    cdef uint64_t proxy_timeout_ns
    cdef Py_ssize_t proxy_room        # bytes of a ProxyHeader's buffer
    cdef TrustedNetwork* trusted
    cdef Py_ssize_t trusted_count
    cdef ProxyHeader* proxy_head      # pending headers, oldest first
    cdef ProxyHeader* proxy_tail

    # TLS (ssl_context): each connection's fastsock.tls.TlsSession by connection id; the
    # subjects of client certificates, of the open connections and the last RECENT_PEERS
    # closed ones; the ciphertext of one read, before it goes to its session.
    cdef object ssl_context
    cdef dict tls_sessions
    cdef object tls_subjects
    cdef uint64_t tls_handshake_timeout_ns
    cdef ConnectionList handshake_list
    cdef uint8_t* ciphertext

    # Connections, by descriptor.
    cdef Connection** by_fd
    cdef Py_ssize_t by_fd_capacity
    cdef Py_ssize_t connection_count
    cdef ConnectionList idle_list
    cdef ConnectionList message_list
    cdef ConnectionList buffer_list
    cdef Connection* ended            # ended this turn: freed once no event can name them

    # The connection whose messages the full ring holds back, with its framed spans
    # spans[published:nspans] and the status that came with them.
    cdef Connection* blocked
    cdef MessageSpan* spans
    cdef Py_ssize_t max_spans
    cdef Py_ssize_t nspans
    cdef Py_ssize_t published
    cdef FramerStatus status
    cdef bint paused
    cdef uint64_t unannounced         # messages put since the consumers were last woken
    cdef uint64_t paused_at_ns
    cdef uint64_t resumed_at_ns       # clocks that started before this restart here

    cdef epoll_event* events
    cdef int max_events

    cdef pthread_mutex_t lock         # guards peers and the event records
    cdef PeerTable peers
    cdef EngineEventRecord* event_records
    cdef Py_ssize_t event_count
    cdef Py_ssize_t event_capacity
    cdef unsigned long long events_recorded   # kept ones, ever
    cdef unsigned long long events_announced  # events_recorded when run() last said so
    cdef readonly unsigned long long events_lost
    cdef readonly unsigned long long wakeups

    cdef volatile bint stop_requested
    cdef bint ring_closed
    cdef bint draining
    cdef uint64_t drain_deadline_ns
    cdef bint finished                # stopped and drained: run() returns "stopped"
    cdef bint running
    cdef bint constructed             # __cinit__ ran: the descriptors hold -1 or our own
    cdef bint closed

    cdef object event_detail(self, EngineEventRecord* event)
    cdef void release(self)
    cdef Connection* connection_of(self, int fd) noexcept
    cdef void wake(self) noexcept nogil
    cdef EngineEnd loop(self) noexcept nogil
    cdef int wait_timeout(self, uint64_t now) noexcept nogil
    cdef void expire(self, uint64_t now) noexcept nogil
    cdef uint64_t buffer_release_at(self, Connection* connection) noexcept nogil
    cdef void set_accepting(self, bint accepting) noexcept nogil
    cdef void watch_listener(self, Py_ssize_t index) noexcept nogil
    cdef void accept_turn(self, Py_ssize_t index, uint64_t now) noexcept nogil
    cdef int accept_from(self, int listener, int budget, uint64_t now) noexcept nogil
    cdef AdoptResult adopt(self, int fd, const PeerAddress* address,
                           uint64_t now) noexcept nogil
    cdef bint make_room(self, uint64_t now) noexcept nogil
    cdef void serve(self, Connection* connection, uint64_t now) noexcept nogil
    cdef void receive_failed(self, Connection* connection, int error) noexcept nogil
    cdef void serve_tls(self, Connection* connection, uint64_t now) noexcept nogil
    cdef void tls_process(self, Connection* connection, Py_ssize_t fed, bint eof,
                          uint64_t now) noexcept nogil
    cdef Py_ssize_t tls_step(self, Connection* connection, Py_ssize_t fed, bint eof,
                             char* plaintext, Py_ssize_t room,
                             bint* drained) noexcept with gil
    cdef bint tls_open(self, Connection* connection) noexcept with gil
    cdef void tls_forget(self, Connection* connection) noexcept with gil
    cdef void handshake_start(self, Connection* connection, uint64_t now) noexcept nogil
    cdef void serve_header(self, Connection* connection, uint64_t now) noexcept nogil
    cdef void header_done(self, Connection* connection, Py_ssize_t consumed,
                          const PeerAddress* address, uint64_t now) noexcept nogil
    cdef void header_failed(self, Connection* connection, int reason) noexcept nogil
    cdef void header_release(self, Connection* connection) noexcept nogil
    cdef bint peer_trusted(self, const PeerAddress* address) noexcept nogil
    cdef bint deliver(self, Connection* connection) noexcept nogil
    cdef bint publish_pending(self, Connection* connection) noexcept nogil
    cdef void framing_failed(self, Connection* connection) noexcept nogil
    cdef void after_read(self, Connection* connection, uint64_t now) noexcept nogil
    cdef void relieve_memory(self) noexcept nogil
    cdef void resume(self) noexcept nogil
    cdef void begin_drain(self, uint64_t now) noexcept nogil
    cdef void end_connection(self, Connection* connection) noexcept nogil
    cdef void free_ended(self) noexcept nogil
    cdef void record(self, int kind, Connection* connection, const PeerAddress* address,
                     double seconds, uint64_t number, const char* text=*,
                     Py_ssize_t text_length=*) noexcept nogil
