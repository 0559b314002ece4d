"""Compiled stream framer; fastsock/_framing.pyi documents it.

feed() runs on the same C-level functions as the recv loop (see _framing.pxd), so what the
tests prove of feed() holds for the loop too.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.mem cimport PyMem_RawFree, PyMem_RawMalloc, PyMem_RawRealloc
from cpython.pyport cimport PY_SSIZE_T_MAX
from libc.stdint cimport uint64_t
from libc.string cimport memchr, memcpy, memmove

from fastsock._native cimport (
    FASTSOCK_BLOCK_SCAN,
    count_trailing_zeros,
    fastsock_block_hits,
    memmem,
)

import operator

from fastsock.constants import (
    FRAMER_INITIAL_BUFFER,
    LENGTH_PREFIX_SIZE,
    LINE_DELIMITER,
    MAX_FRAME_SIZE,
    MAX_LINE_LENGTH,
    RECV_SIZE,
)
from fastsock._protocol_errors import numbered
from fastsock.errors import FramingError


cdef enum:
    FEED_SPANS = 1024  # spans per commit() inside feed(): 16 KiB of stack

# Below this many bytes, framing takes less time than releasing and re-taking the GIL.
cdef Py_ssize_t RELEASE_GIL_ABOVE = 64 * 1024
# feed() copies large data in recv-sized pieces, so its buffer stays as small as the loop's.
cdef Py_ssize_t FEED_PIECE = RECV_SIZE
cdef Py_ssize_t INITIAL_BUFFER = FRAMER_INITIAL_BUFFER
cdef Py_ssize_t PREFIX_SIZE = LENGTH_PREFIX_SIZE

FRAMINGS = ("raw", "lines", "length", "octets", "syslog")  # indexed by FramingKind
# The limits each framing enforces, by the Framer argument that sets them: what a caller
# such as `fastsock serve` may let a user set for that framing.
FRAMING_LIMITS = {
    "raw": (),
    "lines": ("max_line",),
    "length": ("max_frame",),
    "octets": ("max_frame",),
    "syslog": ("max_line", "max_frame"),
}
LARGEST_LIMIT = 2 ** (8 * LENGTH_PREFIX_SIZE) - 1
LINE_TOO_LONG_TEXT = "line longer than max_line={} bytes"
FRAME_TOO_LARGE_TEXT = "length prefix announces {} bytes, more than max_frame={}"
COUNT_TOO_LARGE_TEXT = "octet count announces more than max_frame={} bytes"
MALFORMED_TEXT = "malformed octet count: not MSG-LEN SP (digits without a leading zero, a space)"
FAILED_TEXT = "the framer failed on an earlier framing error; close the connection"
BUSY_TEXT = "another thread is feeding this framer"


cdef inline unsigned long long read_length(const char* prefix) noexcept nogil:
    cdef const unsigned char* digits = <const unsigned char*>prefix
    cdef unsigned long long length = 0
    cdef Py_ssize_t i
    for i in range(PREFIX_SIZE):
        length = (length << 8) | digits[i]
    return length


cdef inline void add_span(MessageSpan* spans, Py_ssize_t* nspans, Py_ssize_t offset,
                          Py_ssize_t length) noexcept nogil:
    spans[nspans[0]].offset = offset
    spans[nspans[0]].length = length
    nspans[0] += 1


cdef Py_ssize_t checked_limit(str name, object value) except -1:
    value = operator.index(value)
    if not 1 <= value <= LARGEST_LIMIT:
        raise ValueError(f"{name} must be between 1 and {LARGEST_LIMIT}, not {value}")
    return value


cdef int framer_configure(FramerConfig* config, object framing, object delimiter,
                          object keep_delimiter, object max_line, object max_frame) except -1:
    if framing not in FRAMINGS:
        raise ValueError(
            f"framing must be 'raw', 'lines', 'length', 'octets' or 'syslog', not {framing!r}")
    cdef bytes delimiter_bytes = bytes(memoryview(delimiter))
    if not delimiter_bytes:
        raise ValueError("delimiter must not be empty")
    cdef FramingKind kind = <FramingKind><int>FRAMINGS.index(framing)
    cdef bint keep = keep_delimiter
    cdef Py_ssize_t line_limit = checked_limit("max_line", max_line)
    cdef Py_ssize_t frame_limit = checked_limit("max_frame", max_frame)
    cdef Py_ssize_t delimiter_length = len(delimiter_bytes)
    # Last, once nothing can fail but the allocation: a config is never half made.
    cdef char* delimiter_copy = <char*>PyMem_RawMalloc(delimiter_length)
    if delimiter_copy == NULL:
        raise MemoryError()
    memcpy(delimiter_copy, <const char*>delimiter_bytes, delimiter_length)
    config.kind = kind
    config.keep_delimiter = keep
    config.delimiter = delimiter_copy
    config.delimiter_length = delimiter_length
    config.max_line = line_limit
    config.max_frame = frame_limit
    if kind == FRAMING_LINES:
        config.message_room = line_limit + delimiter_length
    elif kind == FRAMING_LENGTH:
        config.message_room = PREFIX_SIZE + frame_limit
    elif kind == FRAMING_OCTETS:
        config.message_room = count_room(frame_limit) + frame_limit
    elif kind == FRAMING_SYSLOG:
        config.message_room = max(count_room(frame_limit) + frame_limit,
                                  line_limit + delimiter_length)
    else:
        config.message_room = 0
    return 0


cdef Py_ssize_t count_room(Py_ssize_t max_frame) noexcept nogil:
    # The bytes of the longest MSG-LEN SP under max_frame: its digits and the space.
    cdef Py_ssize_t room = 1
    while max_frame:
        room += 1
        max_frame //= 10
    return room


cdef void framer_config_clear(FramerConfig* config) noexcept nogil:
    PyMem_RawFree(config.delimiter)
    config.delimiter = NULL
    config.delimiter_length = 0


cdef int framer_reserve(FramerState* state, const FramerConfig* config,
                        Py_ssize_t minimum) noexcept nogil:
    cdef Py_ssize_t pending = state.tail - state.head
    cdef Py_ssize_t target
    cdef char* grown
    if state.capacity - state.tail >= minimum:
        return 0
    if state.head > 0:
        # Only when the free tail runs short: the incomplete message then stays at the
        # front until it completes, so no message is ever moved twice.
        memmove(state.buffer, state.buffer + state.head, pending)
        state.scan_pos -= state.head
        state.head = 0
        state.tail = pending
        if state.capacity - state.tail >= minimum:
            return 0
    if minimum > PY_SSIZE_T_MAX // 4:
        # No allocator grants that much, and the sums below stay clear of overflow.
        return -1
    target = min(max(2 * state.capacity, INITIAL_BUFFER), config.message_room + minimum)
    target = max(target, state.tail + minimum)
    grown = <char*>PyMem_RawRealloc(state.buffer, target)
    if grown == NULL:
        return -1
    state.buffer = grown
    state.capacity = target
    return 0


cdef FramerStatus framer_commit(FramerState* state, const FramerConfig* config,
                                Py_ssize_t nbytes, MessageSpan* spans, Py_ssize_t max_spans,
                                Py_ssize_t* nspans) noexcept nogil:
    cdef FramerStatus status
    cdef FramingKind kind = config.kind
    nspans[0] = 0
    state.bytes_in += nbytes
    if state.failed:
        state.bytes_discarded += nbytes
        return FRAMER_FAILED
    state.tail += nbytes
    if kind == FRAMING_SYSLOG:
        if state.chosen == 0:
            if state.tail == state.head:
                return FRAMER_OK
            # Once per connection, from its first byte, as rsyslog tells the two apart.
            state.chosen = FRAMING_OCTETS if is_digit(state.buffer[state.head]) else FRAMING_LINES
        kind = <FramingKind>state.chosen
    if kind == FRAMING_LINES:
        status = frame_lines(state, config, spans, max_spans, nspans)
    elif kind == FRAMING_LENGTH:
        status = frame_length(state, config, spans, max_spans, nspans)
    elif kind == FRAMING_OCTETS:
        status = frame_octets(state, config, spans, max_spans, nspans)
    else:
        status = frame_raw(state, spans, max_spans, nspans)
    state.messages_out += nspans[0]
    return status


cdef inline FramerStatus protocol_error(FramerState* state, ProtocolError kind) noexcept nogil:
    state.failed = kind
    return FRAMER_PROTOCOL_ERROR


cdef bint framer_release_if_empty(FramerState* state) noexcept nogil:
    if state.head != state.tail:
        return False
    framer_free(state)
    return True


cdef Py_ssize_t framer_discard_pending(FramerState* state) noexcept nogil:
    cdef Py_ssize_t discarded = state.tail - state.head
    state.bytes_discarded += discarded
    state.head = state.scan_pos = state.tail
    return discarded


cdef void framer_free(FramerState* state) noexcept nogil:
    PyMem_RawFree(state.buffer)
    state.buffer = NULL
    state.capacity = state.head = state.tail = state.scan_pos = 0


cdef FramerStatus frame_raw(FramerState* state, MessageSpan* spans, Py_ssize_t max_spans,
                            Py_ssize_t* nspans) noexcept nogil:
    if state.head == state.tail:
        return FRAMER_OK
    if max_spans == 0:
        return FRAMER_SPANS_FULL
    add_span(spans, nspans, state.head, state.tail - state.head)
    state.head = state.tail
    return FRAMER_OK


cdef FramerStatus frame_lines(FramerState* state, const FramerConfig* config,
                              MessageSpan* spans, Py_ssize_t max_spans,
                              Py_ssize_t* nspans) noexcept nogil:
    # The loop keeps its cursors in locals: stores through spans could otherwise alias the
    # state's fields and force a reload of each on every line.
    cdef char* buffer = state.buffer
    cdef const char* delimiter = config.delimiter
    cdef Py_ssize_t delimiter_length = config.delimiter_length
    cdef Py_ssize_t longest = config.max_line + delimiter_length
    cdef Py_ssize_t kept = delimiter_length if config.keep_delimiter else 0
    cdef bint by_block = FASTSOCK_BLOCK_SCAN and delimiter_length == 1
    cdef Py_ssize_t head = state.head
    cdef Py_ssize_t scan = state.scan_pos
    cdef Py_ssize_t tail = state.tail
    cdef Py_ssize_t count = nspans[0]
    cdef Py_ssize_t window_end, line_end
    cdef uint64_t hits
    cdef const char* found
    while True:
        # A delimiter starting past head + max_line would end a line that is too long, so
        # the search never looks further: the error shows without waiting for it.
        window_end = min(tail, head + longest)
        if by_block and window_end - scan >= 64:
            # Every line ending in the block is within max_line: head only moves on.
            hits = fastsock_block_hits(buffer + scan, delimiter[0])
            while hits:
                line_end = scan + count_trailing_zeros(hits)
                if count == max_spans:
                    return frame_stopped(state, head, line_end, count, nspans,
                                         FRAMER_SPANS_FULL)
                spans[count].offset = head
                spans[count].length = line_end - head + kept
                count += 1
                head = line_end + 1
                hits &= hits - 1
            scan += 64
            continue
        if delimiter_length == 1:
            found = <const char*>memchr(buffer + scan, delimiter[0], window_end - scan)
        else:
            found = <const char*>memmem(buffer + scan, window_end - scan, delimiter,
                                        delimiter_length)
        if found == NULL:
            if tail - head >= longest:
                return frame_stopped(state, head, scan, count, nspans,
                                     protocol_error(state, PROTOCOL_LINE_TOO_LONG))
            return frame_stopped(state, head, max(head, tail - delimiter_length + 1), count,
                                 nspans, FRAMER_OK)
        line_end = found - buffer
        if count == max_spans:
            return frame_stopped(state, head, line_end, count, nspans, FRAMER_SPANS_FULL)
        spans[count].offset = head
        spans[count].length = line_end - head + kept
        count += 1
        head = scan = line_end + delimiter_length


cdef FramerStatus frame_stopped(FramerState* state, Py_ssize_t head, Py_ssize_t scan,
                                Py_ssize_t count, Py_ssize_t* nspans,
                                FramerStatus status) noexcept nogil:
    # Saves frame_lines' cursors and returns status.
    state.head = head
    state.scan_pos = scan
    nspans[0] = count
    return status


cdef FramerStatus frame_length(FramerState* state, const FramerConfig* config,
                               MessageSpan* spans, Py_ssize_t max_spans,
                               Py_ssize_t* nspans) noexcept nogil:
    cdef unsigned long long length
    while state.tail - state.head >= PREFIX_SIZE:
        length = read_length(state.buffer + state.head)
        if length > <unsigned long long>config.max_frame:
            return protocol_error(state, PROTOCOL_FRAME_TOO_LARGE)
        if state.tail - state.head - PREFIX_SIZE < <Py_ssize_t>length:
            return FRAMER_OK
        if nspans[0] == max_spans:
            return FRAMER_SPANS_FULL
        add_span(spans, nspans, state.head + PREFIX_SIZE, <Py_ssize_t>length)
        state.head += PREFIX_SIZE + <Py_ssize_t>length
    return FRAMER_OK


cdef inline bint is_digit(char byte) noexcept nogil:
    return c'0' <= byte <= c'9'


cdef FramerStatus frame_octets(FramerState* state, const FramerConfig* config,
                               MessageSpan* spans, Py_ssize_t max_spans,
                               Py_ssize_t* nspans) noexcept nogil:
    # RFC 6587: MSG-LEN SP MSG, MSG-LEN a decimal number without a leading zero.  The count
    # is read again from head on each commit until its message is whole: at most the digits
    # of max_frame and a space, so the scan stays linear.  A count is refused at the first
    # byte that makes it malformed, or the first digit that takes it past max_frame, before
    # any of its payload is held.
    cdef const char* buffer = state.buffer
    cdef Py_ssize_t head = state.head
    cdef Py_ssize_t tail = state.tail
    cdef unsigned long long max_frame = <unsigned long long>config.max_frame
    cdef unsigned long long length
    cdef Py_ssize_t cursor
    cdef FramerStatus status = FRAMER_OK
    while head < tail:
        if not (c'1' <= buffer[head] <= c'9'):
            status = protocol_error(state, PROTOCOL_FRAME_MALFORMED)
            break
        length = buffer[head] - c'0'
        cursor = head + 1
        # length <= max_frame < 2**32 before each step, so it cannot overflow.
        while cursor < tail and is_digit(buffer[cursor]) and length <= max_frame:
            length = 10 * length + <unsigned long long>(buffer[cursor] - c'0')
            cursor += 1
        if length > max_frame:
            status = protocol_error(state, PROTOCOL_FRAME_TOO_LARGE)
            break
        if cursor == tail:
            break
        if buffer[cursor] != c' ':
            status = protocol_error(state, PROTOCOL_FRAME_MALFORMED)
            break
        cursor += 1
        if tail - cursor < <Py_ssize_t>length:
            break
        if nspans[0] == max_spans:
            status = FRAMER_SPANS_FULL
            break
        add_span(spans, nspans, cursor, <Py_ssize_t>length)
        head = cursor + <Py_ssize_t>length
    state.head = head
    return status


cdef int copy_and_commit(FramerState* state, const FramerConfig* config, const char* data,
                         Py_ssize_t size, MessageSpan* spans, Py_ssize_t* nspans,
                         FramerStatus* status) noexcept nogil:
    if framer_reserve(state, config, size) != 0:
        return -1
    memcpy(framer_write_pointer(state), data, size)
    status[0] = framer_commit(state, config, size, spans, FEED_SPANS, nspans)
    return 0


cdef class Framer:

    def __cinit__(self, framing="lines", *, delimiter=LINE_DELIMITER, keep_delimiter=False,
                  max_line=MAX_LINE_LENGTH, max_frame=MAX_FRAME_SIZE):
        framer_configure(&self.config, framing, delimiter, keep_delimiter, max_line, max_frame)

    def __dealloc__(self):
        framer_free(&self.state)
        framer_config_clear(&self.config)

    @property
    def framing(self):
        return FRAMINGS[self.config.kind]

    @property
    def delimiter(self):
        return PyBytes_FromStringAndSize(self.config.delimiter, self.config.delimiter_length)

    @property
    def keep_delimiter(self):
        return self.config.keep_delimiter

    @property
    def max_line(self):
        return self.config.max_line

    @property
    def max_frame(self):
        return self.config.max_frame

    @property
    def largest_message(self):
        cdef Py_ssize_t line = self.config.max_line + self.config.delimiter_length
        if self.config.kind == FRAMING_LINES:
            return line
        if self.config.kind == FRAMING_LENGTH or self.config.kind == FRAMING_OCTETS:
            return self.config.max_frame
        if self.config.kind == FRAMING_SYSLOG:
            return max(self.config.max_frame, line)
        return None

    @property
    def failed(self):
        return self.state.failed != PROTOCOL_NONE

    @property
    def bytes_in(self):
        return self.state.bytes_in

    @property
    def messages_out(self):
        return self.state.messages_out

    @property
    def bytes_discarded(self):
        return self.state.bytes_discarded

    @property
    def capacity(self):
        return self.state.capacity

    @property
    def pending(self):
        return framer_held_bytes(&self.state)

    def peek_pending(self, Py_ssize_t limit):
        if limit < 0:
            raise ValueError(f"limit must not be negative, not {limit}")
        return PyBytes_FromStringAndSize(self.state.buffer + self.state.head,
                                         min(limit, framer_held_bytes(&self.state)))

    def feed(self, data):
        cdef Py_buffer view
        if self.feeding:
            raise RuntimeError(BUSY_TEXT)
        # Claimed before the buffer request, which may run Python code and switch threads.
        self.feeding = True
        try:
            PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
            try:
                return self.feed_buffer(<const char*>view.buf, view.len)
            finally:
                PyBuffer_Release(&view)
        finally:
            self.feeding = False

    def eof(self):
        if self.feeding:
            raise RuntimeError(BUSY_TEXT)
        discarded = framer_discard_pending(&self.state)
        framer_consume(&self.state)
        self.state.chosen = 0  # a new stream chooses its syslog framing again
        return discarded

    cdef char* base(self) noexcept nogil:
        return framer_base(&self.state)

    cdef char* write_pointer(self) noexcept nogil:
        return framer_write_pointer(&self.state)

    cdef Py_ssize_t write_space(self) noexcept nogil:
        return framer_write_space(&self.state)

    cdef int reserve(self, Py_ssize_t minimum) noexcept nogil:
        return framer_reserve(&self.state, &self.config, minimum)

    cdef FramerStatus commit(self, Py_ssize_t nbytes, MessageSpan* spans, Py_ssize_t max_spans,
                             Py_ssize_t* nspans) noexcept nogil:
        return framer_commit(&self.state, &self.config, nbytes, spans, max_spans, nspans)

    cdef void consume(self) noexcept nogil:
        framer_consume(&self.state)

    cdef bint release_if_empty(self) noexcept nogil:
        return framer_release_if_empty(&self.state)

    cdef Py_ssize_t discard_pending(self) noexcept nogil:
        return framer_discard_pending(&self.state)

    cdef list feed_buffer(self, const char* data, Py_ssize_t size):
        cdef MessageSpan spans[FEED_SPANS]
        cdef Py_ssize_t nspans = 0
        cdef Py_ssize_t copied = 0
        cdef Py_ssize_t piece
        # A raw message is the whole feed; the other framings keep their buffer bounded.
        cdef Py_ssize_t largest_piece = size if self.config.kind == FRAMING_RAW else FEED_PIECE
        cdef FramerStatus status = FRAMER_OK
        cdef int reserved
        cdef list messages = []
        if self.state.failed:
            self.state.bytes_in += size
            self.state.bytes_discarded += size
            raise FramingError(FAILED_TEXT, messages, size)
        while copied < size or status == FRAMER_SPANS_FULL:
            piece = 0 if status == FRAMER_SPANS_FULL else min(size - copied, largest_piece)
            if size > RELEASE_GIL_ABOVE:
                with nogil:
                    reserved = copy_and_commit(&self.state, &self.config, data + copied, piece,
                                               spans, &nspans, &status)
            else:
                reserved = copy_and_commit(&self.state, &self.config, data + copied, piece,
                                           spans, &nspans, &status)
            if reserved != 0:
                raise MemoryError()
            copied += piece
            self.publish(spans, nspans, messages)
            if status == FRAMER_PROTOCOL_ERROR:
                raise self.framing_error(messages, size - copied)
        return messages

    cdef int publish(self, const MessageSpan* spans, Py_ssize_t nspans, list messages) except -1:
        cdef Py_ssize_t i
        for i in range(nspans):
            messages.append(PyBytes_FromStringAndSize(self.state.buffer + spans[i].offset,
                                                      spans[i].length))
        framer_consume(&self.state)
        return 0

    cdef object framing_error(self, list messages, Py_ssize_t unread):
        cdef ProtocolError kind = <ProtocolError>self.state.failed
        if kind == PROTOCOL_LINE_TOO_LONG:
            text = LINE_TOO_LONG_TEXT.format(self.config.max_line)
        elif kind == PROTOCOL_FRAME_MALFORMED:
            text = MALFORMED_TEXT
        elif self.config.kind != FRAMING_LENGTH:
            text = COUNT_TOO_LARGE_TEXT.format(self.config.max_frame)
        else:
            text = FRAME_TOO_LARGE_TEXT.format(read_length(self.state.buffer + self.state.head),
                                               self.config.max_frame)
        self.state.bytes_in += unread
        self.state.bytes_discarded += unread
        return numbered(kind).error(text, messages, framer_discard_pending(&self.state) + unread)
