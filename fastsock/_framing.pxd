# The compiled framer as a recv loop drives it, without the GIL and without an extra copy:
#
#     reserve(n)                  make room for the next recv
#     recv(fd, write_pointer(), write_space())
#     commit(received, spans...)  frame the received bytes into spans over base()
#     publish the spans, then consume()
#     while the status is FRAMER_SPANS_FULL: commit(0, spans...), publish, consume()
#
# Spans are offsets from base() into the framer's own buffer.  They stay valid through
# consume(), commit(0, ...) and discard_pending(), until the next reserve(), which may move
# the incomplete message to the front or reallocate the buffer, or the next write.
# A framer has one driver at a time: the recv loop or feed(), never both at once.

cimport cython

from fastsock._span cimport MessageSpan


cdef enum FramerStatus:
    FRAMER_OK               # every committed byte was framed
    FRAMER_SPANS_FULL       # more messages are ready: publish, consume(), then commit(0, ...)
    FRAMER_LINE_TOO_LONG    # failed now: the spans are still good; then discard_pending()
    FRAMER_FRAME_TOO_LARGE  # failed now: the spans are still good; then discard_pending()
    FRAMER_FAILED           # failed before: the committed bytes were counted as discarded


cdef enum FramingKind:
    FRAMING_RAW
    FRAMING_LINES
    FRAMING_LENGTH


@cython.final
cdef class Framer:
    cdef readonly str framing
    cdef readonly bytes delimiter
    cdef readonly bint keep_delimiter
    cdef readonly Py_ssize_t max_line
    cdef readonly Py_ssize_t max_frame
    cdef readonly bint failed
    cdef readonly unsigned long long bytes_in
    cdef readonly unsigned long long messages_out
    cdef readonly unsigned long long bytes_discarded

    cdef FramingKind kind
    cdef const char* delimiter_data  # self.delimiter, readable without the GIL
    cdef Py_ssize_t delimiter_length
    cdef Py_ssize_t message_room     # most bytes an incomplete message can occupy
    cdef char* buffer
    cdef readonly Py_ssize_t capacity  # bytes of buffer held now
    cdef Py_ssize_t head             # start of the incomplete message; published spans lie before
    cdef Py_ssize_t tail             # end of the committed bytes, where the next recv writes
    cdef Py_ssize_t scan_pos         # lines: no delimiter starts in [head, scan_pos)
    cdef bint feeding                # a feed() is running, perhaps without the GIL

    cdef char* base(self) noexcept nogil
    cdef char* write_pointer(self) noexcept nogil
    cdef Py_ssize_t write_space(self) noexcept nogil
    # 0 once write_space() >= minimum, -1 out of memory.  The buffer never grows past the
    # room one incomplete message needs (max_line + len(delimiter), or 4 + max_frame, or 0
    # for raw) plus minimum.
    cdef int reserve(self, Py_ssize_t minimum) noexcept nogil
    cdef FramerStatus commit(self, Py_ssize_t nbytes, MessageSpan* spans, Py_ssize_t max_spans,
                             Py_ssize_t* nspans) noexcept nogil
    cdef void consume(self) noexcept nogil
    # Frees the buffer when no message is incomplete (then True): a silent connection then
    # holds no memory; the next reserve() allocates again.  Invalidates spans like reserve().
    cdef bint release_if_empty(self) noexcept nogil
    # Drops the incomplete message, counts it as discarded and returns its size.
    cdef Py_ssize_t discard_pending(self) noexcept nogil

    # The steps behind commit() and feed().
    cdef FramerStatus frame_raw(self, MessageSpan* spans, Py_ssize_t max_spans,
                                Py_ssize_t* nspans) noexcept nogil
    cdef FramerStatus frame_lines(self, MessageSpan* spans, Py_ssize_t max_spans,
                                  Py_ssize_t* nspans) noexcept nogil
    # Saves frame_lines' cursors and returns status.
    cdef FramerStatus frame_stopped(self, Py_ssize_t head, Py_ssize_t scan, Py_ssize_t count,
                                    Py_ssize_t* nspans, FramerStatus status) noexcept nogil
    cdef FramerStatus frame_length(self, MessageSpan* spans, Py_ssize_t max_spans,
                                   Py_ssize_t* nspans) noexcept nogil
    cdef int copy_and_commit(self, const char* data, Py_ssize_t size, MessageSpan* spans,
                             Py_ssize_t* nspans, FramerStatus* status) noexcept nogil
    cdef list feed_buffer(self, const char* data, Py_ssize_t size)
    cdef int publish(self, const MessageSpan* spans, Py_ssize_t nspans, list messages) except -1
    cdef object framing_error(self, FramerStatus status, list messages, Py_ssize_t unread)
