# The compiled framer as a recv loop drives it, without the GIL and without an extra copy:
#
#     framer_reserve(state, config, n)              make room for the next recv
#     recv(fd, framer_write_pointer(state), framer_write_space(state))
#     framer_commit(state, config, received, spans...)   frame the received bytes into
#                                                         spans over framer_base(state)
#     publish the spans, then framer_consume(state)
#     while the status is FRAMER_SPANS_FULL: framer_commit(state, config, 0, spans...),
#     publish, framer_consume(state)
#
# Spans are offsets from framer_base() into the state's own buffer.  They stay valid through
# framer_consume(), framer_commit(0, ...) and framer_discard_pending(), until the next
# framer_reserve(), which may move the incomplete message to the front or reallocate the
# buffer, or the next write.  A state has one driver at a time: the recv loop or feed(),
# never both at once.
#
# The functions take no Python object and never raise: they report through their result,
# and the Python boundary (Framer, or whatever else drives a state) raises.  Another module
# cimports them; the ones not inline here reach it through this module's C-API capsule, one
# indirect call each, as a cdef method did.

cimport cython

from fastsock._span cimport MessageSpan


cdef enum FramerStatus:
    FRAMER_OK               # every committed byte was framed
    FRAMER_SPANS_FULL       # more messages are ready: publish, consume, then commit 0 bytes
    FRAMER_PROTOCOL_ERROR   # failed now (state.failed: why); spans still good; discard_pending
    FRAMER_FAILED           # failed before: the committed bytes were counted as discarded


# Why a framer failed: the rows of fastsock/_protocol_errors.py's PROTOCOL_ERRORS, numbered
# in its order from 1 (the loops and engines look a number up there; 0: not failed).
cdef enum ProtocolError:
    PROTOCOL_NONE
    PROTOCOL_LINE_TOO_LONG
    PROTOCOL_FRAME_TOO_LARGE
    PROTOCOL_FRAME_MALFORMED  # an octet count that is not digits, then a space
    PROTOCOL_ERROR_KINDS = PROTOCOL_FRAME_MALFORMED  # how many rows


cdef enum FramingKind:
    FRAMING_RAW
    FRAMING_LINES
    FRAMING_LENGTH
    FRAMING_OCTETS      # RFC 6587 octet counting: MSG-LEN SP MSG
    FRAMING_SYSLOG      # octets if a connection's first byte is a digit, else lines


# How a server frames its connections.  Set once and then only read, so every connection
# of a server can share one, from any thread.
cdef struct FramerConfig:
    FramingKind kind
    bint keep_delimiter
    char* delimiter              # a copy of the delimiter the config owns
    Py_ssize_t delimiter_length
    Py_ssize_t max_line
    Py_ssize_t max_frame
    Py_ssize_t message_room      # most bytes an incomplete message can occupy


# One connection's framing progress: plain C (72 bytes), so an event loop can hold one per
# connection and create it without the GIL.  All zero is a fresh state with no buffer.
cdef struct FramerState:
    char* buffer
    Py_ssize_t capacity          # bytes of buffer held now
    Py_ssize_t head              # start of the incomplete message; published spans lie before
    Py_ssize_t tail              # end of the committed bytes, where the next recv writes
    Py_ssize_t scan_pos          # lines: no delimiter starts in [head, scan_pos)
    unsigned long long bytes_in
    unsigned long long messages_out
    unsigned long long bytes_discarded
    unsigned char failed         # a ProtocolError: every later byte is discarded; 0: none
    unsigned char chosen         # syslog: the FramingKind the first byte chose; 0 before it


# Validates the arguments of Framer() and fills config, which holds no delimiter yet (all
# zero, or cleared); raises as Framer() does.  The config then owns a copy of the
# delimiter: framer_config_clear() frees it.
cdef int framer_configure(FramerConfig* config, object framing, object delimiter,
                          object keep_delimiter, object max_line, object max_frame) except -1
cdef void framer_config_clear(FramerConfig* config) noexcept nogil

# 0 once framer_write_space() >= minimum, -1 out of memory.  The buffer never grows past
# config.message_room (0 for raw) plus minimum.
cdef int framer_reserve(FramerState* state, const FramerConfig* config,
                        Py_ssize_t minimum) noexcept nogil
cdef FramerStatus framer_commit(FramerState* state, const FramerConfig* config,
                                Py_ssize_t nbytes, MessageSpan* spans, Py_ssize_t max_spans,
                                Py_ssize_t* nspans) noexcept nogil
# Frees the buffer when no message is incomplete (then True): a silent connection then
# holds no memory; the next framer_reserve() allocates again.  Invalidates spans like it.
cdef bint framer_release_if_empty(FramerState* state) noexcept nogil
# Drops the incomplete message, counts it as discarded and returns its size.
cdef Py_ssize_t framer_discard_pending(FramerState* state) noexcept nogil
# Frees the buffer, leaving an empty state with the same counters.  Whatever it held is
# dropped uncounted: framer_discard_pending() first counts it.
cdef void framer_free(FramerState* state) noexcept nogil


# Inline: a recv loop calls these once or more per recv, and they only read a field or two.
cdef inline char* framer_base(FramerState* state) noexcept nogil:
    return state.buffer


cdef inline char* framer_write_pointer(FramerState* state) noexcept nogil:
    return state.buffer + state.tail


cdef inline Py_ssize_t framer_write_space(const FramerState* state) noexcept nogil:
    return state.capacity - state.tail


# Bytes of the incomplete message (its delimiter or prefix included).
cdef inline Py_ssize_t framer_held_bytes(const FramerState* state) noexcept nogil:
    return state.tail - state.head


cdef inline void framer_consume(FramerState* state) noexcept nogil:
    # Published spans lie before head, so dropping them moves nothing; the incomplete
    # message is left in place until framer_reserve() runs short of room.
    if state.head == state.tail:
        state.head = state.tail = state.scan_pos = 0


# One stream framed for Python: feed() and eof() on a config and a state of its own, and
# the driving protocol above as methods, for a StreamReceiver.
@cython.final
cdef class Framer:
    cdef FramerConfig config
    cdef FramerState state
    cdef bint feeding                # a feed() is running, perhaps without the GIL

    cdef char* base(self) noexcept nogil
    cdef char* write_pointer(self) noexcept nogil
    cdef Py_ssize_t write_space(self) noexcept nogil
    cdef int reserve(self, Py_ssize_t minimum) noexcept nogil
    cdef FramerStatus commit(self, Py_ssize_t nbytes, MessageSpan* spans, Py_ssize_t max_spans,
                             Py_ssize_t* nspans) noexcept nogil
    cdef void consume(self) noexcept nogil
    cdef bint release_if_empty(self) noexcept nogil
    cdef Py_ssize_t discard_pending(self) noexcept nogil

    # The steps behind feed().
    cdef list feed_buffer(self, const char* data, Py_ssize_t size)
    cdef int publish(self, const MessageSpan* spans, Py_ssize_t nspans, list messages) except -1
    cdef object framing_error(self, list messages, Py_ssize_t unread)
