"""Compiled stream framer; fastsock/_framing.pyi documents it.

feed() runs on the same C-level API as the recv loop (see _framing.pxd), so what the tests
prove of feed() holds for the loop too.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.mem cimport PyMem_RawFree, PyMem_RawRealloc
from cpython.pyport cimport PY_SSIZE_T_MAX
from libc.stdint cimport uint64_t
from libc.string cimport memcpy, memmove

import operator

from fastsock.constants import (
    FRAMER_INITIAL_BUFFER,
    LENGTH_PREFIX_SIZE,
    LINE_DELIMITER,
    MAX_FRAME_SIZE,
    MAX_LINE_LENGTH,
    RECV_SIZE,
)
from fastsock.errors import FrameTooLargeError, FramingError, LineTooLongError


cdef extern from "string.h" nogil:
    void* memchr(const void* haystack, int byte, size_t haystack_length)
    # A GNU extension (Python.h defines _GNU_SOURCE) that searches in linear time.
    void* memmem(const void* haystack, size_t haystack_length,
                 const void* needle, size_t needle_length)


cdef extern from *:
    """
    #include <stdint.h>
    #ifdef __SSE2__
    #include <emmintrin.h>
    #define FASTSOCK_BLOCK_SCAN 1

    /* Bit i set where block[i] is byte, for the 64 bytes at block: one look at each byte
       finds every delimiter of a block, where memchr() pays a call and a setup per line.
       SSE2 is part of x86-64. */
    static inline uint64_t fastsock_block_hits(const char *block, char byte) {
        const __m128i wanted = _mm_set1_epi8(byte);
        uint64_t hits = 0;
        int part;
        for (part = 3; part >= 0; part--) {
            __m128i bytes = _mm_loadu_si128((const __m128i *)(block + 16 * part));
            hits = (hits << 16)
                   | (uint16_t)_mm_movemask_epi8(_mm_cmpeq_epi8(bytes, wanted));
        }
        return hits;
    }
    #else
    #define FASTSOCK_BLOCK_SCAN 0
    static inline uint64_t fastsock_block_hits(const char *block, char byte) {
        (void)block;
        (void)byte;
        return 0;
    }
    #endif
    """
    bint BLOCK_SCAN "FASTSOCK_BLOCK_SCAN"
    uint64_t block_hits "fastsock_block_hits"(const char* block, char byte) nogil
    int count_trailing_zeros "__builtin_ctzll"(unsigned long long bits) nogil


cdef enum:
    FEED_SPANS = 1024  # spans per commit() inside feed(): 16 KiB of stack

# Below this many bytes, framing takes less time than releasing and re-taking the GIL.
cdef Py_ssize_t RELEASE_GIL_ABOVE = 64 * 1024
# feed() copies large data in recv-sized pieces, so its buffer stays as small as the loop's.
cdef Py_ssize_t FEED_PIECE = RECV_SIZE
cdef Py_ssize_t INITIAL_BUFFER = FRAMER_INITIAL_BUFFER
cdef Py_ssize_t PREFIX_SIZE = LENGTH_PREFIX_SIZE

FRAMINGS = ("raw", "lines", "length")  # indexed by FramingKind
LARGEST_LIMIT = 2 ** (8 * LENGTH_PREFIX_SIZE) - 1
LINE_TOO_LONG_TEXT = "line longer than max_line={} bytes"
FRAME_TOO_LARGE_TEXT = "length prefix announces {} bytes, more than max_frame={}"
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


cdef class Framer:

    def __cinit__(self, framing="lines", *, delimiter=LINE_DELIMITER, keep_delimiter=False,
                  max_line=MAX_LINE_LENGTH, max_frame=MAX_FRAME_SIZE):
        if framing not in FRAMINGS:
            raise ValueError(f"framing must be 'raw', 'lines' or 'length', not {framing!r}")
        self.delimiter = bytes(memoryview(delimiter))
        if not self.delimiter:
            raise ValueError("delimiter must not be empty")
        self.kind = <FramingKind><int>FRAMINGS.index(framing)
        self.framing = FRAMINGS[self.kind]
        self.delimiter_data = self.delimiter
        self.delimiter_length = len(self.delimiter)
        self.keep_delimiter = keep_delimiter
        self.max_line = checked_limit("max_line", max_line)
        self.max_frame = checked_limit("max_frame", max_frame)
        if self.kind == FRAMING_LINES:
            self.message_room = self.max_line + self.delimiter_length
        elif self.kind == FRAMING_LENGTH:
            self.message_room = PREFIX_SIZE + self.max_frame

    def __dealloc__(self):
        PyMem_RawFree(self.buffer)

    @property
    def pending(self):
        return self.tail - self.head

    def peek_pending(self, Py_ssize_t limit):
        if limit < 0:
            raise ValueError(f"limit must not be negative, not {limit}")
        return PyBytes_FromStringAndSize(self.buffer + self.head,
                                         min(limit, self.tail - self.head))

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
        discarded = self.discard_pending()
        self.consume()
        return discarded

    cdef char* base(self) noexcept nogil:
        return self.buffer

    cdef char* write_pointer(self) noexcept nogil:
        return self.buffer + self.tail

    cdef Py_ssize_t write_space(self) noexcept nogil:
        return self.capacity - self.tail

    cdef int reserve(self, Py_ssize_t minimum) noexcept nogil:
        cdef Py_ssize_t pending = self.tail - self.head
        cdef Py_ssize_t target
        cdef char* grown
        if self.capacity - self.tail >= minimum:
            return 0
        if self.head > 0:
            # Only when the free tail runs short: the incomplete message then stays at the
            # front until it completes, so no message is ever moved twice.
            memmove(self.buffer, self.buffer + self.head, pending)
            self.scan_pos -= self.head
            self.head = 0
            self.tail = pending
            if self.capacity - self.tail >= minimum:
                return 0
        if minimum > PY_SSIZE_T_MAX // 4:
            # No allocator grants that much, and the sums below stay clear of overflow.
            return -1
        target = min(max(2 * self.capacity, INITIAL_BUFFER), self.message_room + minimum)
        target = max(target, self.tail + minimum)
        grown = <char*>PyMem_RawRealloc(self.buffer, target)
        if grown == NULL:
            return -1
        self.buffer = grown
        self.capacity = target
        return 0

    cdef FramerStatus commit(self, Py_ssize_t nbytes, MessageSpan* spans, Py_ssize_t max_spans,
                             Py_ssize_t* nspans) noexcept nogil:
        cdef FramerStatus status
        nspans[0] = 0
        self.bytes_in += nbytes
        if self.failed:
            self.bytes_discarded += nbytes
            return FRAMER_FAILED
        self.tail += nbytes
        if self.kind == FRAMING_LINES:
            status = self.frame_lines(spans, max_spans, nspans)
        elif self.kind == FRAMING_LENGTH:
            status = self.frame_length(spans, max_spans, nspans)
        else:
            status = self.frame_raw(spans, max_spans, nspans)
        self.messages_out += nspans[0]
        self.failed = status == FRAMER_LINE_TOO_LONG or status == FRAMER_FRAME_TOO_LARGE
        return status

    cdef void consume(self) noexcept nogil:
        # Published spans lie before head, so dropping them moves nothing; the incomplete
        # message is left in place until reserve() runs short of room.
        if self.head == self.tail:
            self.head = self.tail = self.scan_pos = 0

    cdef bint release_if_empty(self) noexcept nogil:
        if self.head != self.tail:
            return False
        PyMem_RawFree(self.buffer)
        self.buffer = NULL
        self.capacity = self.head = self.tail = self.scan_pos = 0
        return True

    cdef Py_ssize_t discard_pending(self) noexcept nogil:
        cdef Py_ssize_t discarded = self.tail - self.head
        self.bytes_discarded += discarded
        self.head = self.scan_pos = self.tail
        return discarded

    cdef FramerStatus frame_raw(self, MessageSpan* spans, Py_ssize_t max_spans,
                                Py_ssize_t* nspans) noexcept nogil:
        if self.head == self.tail:
            return FRAMER_OK
        if max_spans == 0:
            return FRAMER_SPANS_FULL
        add_span(spans, nspans, self.head, self.tail - self.head)
        self.head = self.tail
        return FRAMER_OK

    cdef FramerStatus frame_lines(self, MessageSpan* spans, Py_ssize_t max_spans,
                                  Py_ssize_t* nspans) noexcept nogil:
        # The loop keeps its cursors in locals: stores through spans could otherwise alias
        # the framer's fields and force a reload of each on every line.
        cdef char* buffer = self.buffer
        cdef const char* delimiter = self.delimiter_data
        cdef Py_ssize_t delimiter_length = self.delimiter_length
        cdef Py_ssize_t longest = self.max_line + delimiter_length
        cdef Py_ssize_t kept = delimiter_length if self.keep_delimiter else 0
        cdef bint by_block = BLOCK_SCAN and delimiter_length == 1
        cdef Py_ssize_t head = self.head
        cdef Py_ssize_t scan = self.scan_pos
        cdef Py_ssize_t tail = self.tail
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
                hits = block_hits(buffer + scan, delimiter[0])
                while hits:
                    line_end = scan + count_trailing_zeros(hits)
                    if count == max_spans:
                        return self.frame_stopped(head, line_end, count, nspans,
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
                    return self.frame_stopped(head, scan, count, nspans, FRAMER_LINE_TOO_LONG)
                return self.frame_stopped(head, max(head, tail - delimiter_length + 1), count,
                                          nspans, FRAMER_OK)
            line_end = found - buffer
            if count == max_spans:
                return self.frame_stopped(head, line_end, count, nspans, FRAMER_SPANS_FULL)
            spans[count].offset = head
            spans[count].length = line_end - head + kept
            count += 1
            head = scan = line_end + delimiter_length

    cdef FramerStatus frame_stopped(self, Py_ssize_t head, Py_ssize_t scan, Py_ssize_t count,
                                    Py_ssize_t* nspans, FramerStatus status) noexcept nogil:
        self.head = head
        self.scan_pos = scan
        nspans[0] = count
        return status

    cdef FramerStatus frame_length(self, MessageSpan* spans, Py_ssize_t max_spans,
                                   Py_ssize_t* nspans) noexcept nogil:
        cdef unsigned long long length
        while self.tail - self.head >= PREFIX_SIZE:
            length = read_length(self.buffer + self.head)
            if length > <unsigned long long>self.max_frame:
                return FRAMER_FRAME_TOO_LARGE
            if self.tail - self.head - PREFIX_SIZE < <Py_ssize_t>length:
                return FRAMER_OK
            if nspans[0] == max_spans:
                return FRAMER_SPANS_FULL
            add_span(spans, nspans, self.head + PREFIX_SIZE, <Py_ssize_t>length)
            self.head += PREFIX_SIZE + <Py_ssize_t>length
        return FRAMER_OK

    cdef int copy_and_commit(self, const char* data, Py_ssize_t size, MessageSpan* spans,
                             Py_ssize_t* nspans, FramerStatus* status) noexcept nogil:
        if self.reserve(size) != 0:
            return -1
        memcpy(self.write_pointer(), data, size)
        status[0] = self.commit(size, spans, FEED_SPANS, nspans)
        return 0

    cdef list feed_buffer(self, const char* data, Py_ssize_t size):
        cdef MessageSpan spans[FEED_SPANS]
        cdef Py_ssize_t nspans = 0
        cdef Py_ssize_t copied = 0
        cdef Py_ssize_t piece
        # A raw message is the whole feed; the other framings keep their buffer bounded.
        cdef Py_ssize_t largest_piece = size if self.kind == FRAMING_RAW else FEED_PIECE
        cdef FramerStatus status = FRAMER_OK
        cdef int reserved
        cdef list messages = []
        if self.failed:
            self.bytes_in += size
            self.bytes_discarded += size
            raise FramingError(FAILED_TEXT, messages, size)
        while copied < size or status == FRAMER_SPANS_FULL:
            piece = 0 if status == FRAMER_SPANS_FULL else min(size - copied, largest_piece)
            if size > RELEASE_GIL_ABOVE:
                with nogil:
                    reserved = self.copy_and_commit(data + copied, piece, spans, &nspans, &status)
            else:
                reserved = self.copy_and_commit(data + copied, piece, spans, &nspans, &status)
            if reserved != 0:
                raise MemoryError()
            copied += piece
            self.publish(spans, nspans, messages)
            if status != FRAMER_OK and status != FRAMER_SPANS_FULL:
                raise self.framing_error(status, messages, size - copied)
        return messages

    cdef int publish(self, const MessageSpan* spans, Py_ssize_t nspans, list messages) except -1:
        cdef Py_ssize_t i
        for i in range(nspans):
            messages.append(PyBytes_FromStringAndSize(self.buffer + spans[i].offset,
                                                      spans[i].length))
        self.consume()
        return 0

    cdef object framing_error(self, FramerStatus status, list messages, Py_ssize_t unread):
        if status == FRAMER_LINE_TOO_LONG:
            error_type = LineTooLongError
            text = LINE_TOO_LONG_TEXT.format(self.max_line)
        else:
            error_type = FrameTooLargeError
            text = FRAME_TOO_LARGE_TEXT.format(read_length(self.buffer + self.head),
                                               self.max_frame)
        self.bytes_in += unread
        self.bytes_discarded += unread
        return error_type(text, messages, self.discard_pending() + unread)
