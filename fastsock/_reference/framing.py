"""Pure-Python stream framer: the behaviour fastsock._framing.Framer must match.

fastsock/_framing.pyi documents the API both share.  This one keeps the stream in a
bytearray, scans it with bytearray.find() and never rescans a byte, so it stays linear too.
"""

import operator

from fastsock.constants import LENGTH_PREFIX_SIZE, LINE_DELIMITER, MAX_FRAME_SIZE, MAX_LINE_LENGTH
from fastsock.errors import (
    FrameTooLargeError,
    FramingError,
    LineTooLongError,
    MalformedFrameError,
)

__all__ = ["Framer"]

FRAMINGS = ("raw", "lines", "length", "octets", "syslog")
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
DIGITS = b"0123456789"
FAILED_TEXT = "the framer failed on an earlier framing error; close the connection"


def checked_limit(name, value):
    value = operator.index(value)
    if not 1 <= value <= LARGEST_LIMIT:
        raise ValueError(f"{name} must be between 1 and {LARGEST_LIMIT}, not {value}")
    return value


class Framer:
    """Splits the bytes of one stream into complete messages (see fastsock/_framing.pyi)."""

    __slots__ = (
        "_framing",
        "_delimiter",
        "_keep_delimiter",
        "_max_line",
        "_max_frame",
        "_failed",
        "_bytes_in",
        "_messages_out",
        "_bytes_discarded",
        "_buffer",
        "_scan_pos",
        "_chosen",
    )

    def __init__(
        self,
        framing="lines",
        *,
        delimiter=LINE_DELIMITER,
        keep_delimiter=False,
        max_line=MAX_LINE_LENGTH,
        max_frame=MAX_FRAME_SIZE,
    ):
        if framing not in FRAMINGS:
            raise ValueError(
                f"framing must be 'raw', 'lines', 'length', 'octets' or 'syslog', not {framing!r}"
            )
        delimiter = bytes(memoryview(delimiter))
        if not delimiter:
            raise ValueError("delimiter must not be empty")
        self._framing = FRAMINGS[FRAMINGS.index(framing)]
        self._delimiter = delimiter
        self._keep_delimiter = bool(keep_delimiter)
        self._max_line = checked_limit("max_line", max_line)
        self._max_frame = checked_limit("max_frame", max_frame)
        self._failed = False
        self._bytes_in = 0
        self._messages_out = 0
        self._bytes_discarded = 0
        self._buffer = bytearray()
        # Lines: no delimiter starts in the buffer before this offset.
        self._scan_pos = 0
        # Syslog: "octets" or "lines", chosen by the stream's first byte; None before it.
        self._chosen = None

    framing = property(operator.attrgetter("_framing"))
    delimiter = property(operator.attrgetter("_delimiter"))
    keep_delimiter = property(operator.attrgetter("_keep_delimiter"))
    max_line = property(operator.attrgetter("_max_line"))
    max_frame = property(operator.attrgetter("_max_frame"))
    failed = property(operator.attrgetter("_failed"))
    bytes_in = property(operator.attrgetter("_bytes_in"))
    messages_out = property(operator.attrgetter("_messages_out"))
    bytes_discarded = property(operator.attrgetter("_bytes_discarded"))

    @property
    def largest_message(self):
        line = self._max_line + len(self._delimiter)
        return {
            "raw": None,
            "lines": line,
            "length": self._max_frame,
            "octets": self._max_frame,
            "syslog": max(self._max_frame, line),
        }[self._framing]

    @property
    def pending(self):
        return len(self._buffer)

    @property
    def capacity(self):
        return len(self._buffer)

    def peek_pending(self, limit):
        if limit < 0:
            raise ValueError(f"limit must not be negative, not {limit}")
        return bytes(self._buffer[:limit])

    def feed(self, data):
        with memoryview(data) as view:
            if not view.c_contiguous:
                raise BufferError("feed() needs a C-contiguous bytes-like object")
            size = view.nbytes
            self._bytes_in += size
            if self._failed:
                self._bytes_discarded += size
                raise FramingError(FAILED_TEXT, [], size)
            if self._framing == "raw":
                messages = [view.tobytes()] if size else []
                self._messages_out += len(messages)
                return messages
            self._buffer += view
        messages = []
        framing = self._framing
        if framing == "syslog":
            if self._chosen is None and self._buffer:
                # Once per stream, from its first byte, as rsyslog tells the two apart.
                self._chosen = "octets" if self._buffer[0] in DIGITS else "lines"
            framing = self._chosen
        if framing == "lines":
            error_type, error_text = LineTooLongError, self._frame_lines(messages)
        elif framing == "octets":
            error_type, error_text = self._frame_octets(messages)
        elif framing == "length":
            error_type, error_text = FrameTooLargeError, self._frame_length(messages)
        else:
            error_type, error_text = None, None
        self._messages_out += len(messages)
        if error_text is not None:
            self._failed = True
            raise error_type(error_text, messages, self.eof())
        return messages

    def eof(self):
        discarded = len(self._buffer)
        self._bytes_discarded += discarded
        self._buffer.clear()
        self._scan_pos = 0
        self._chosen = None  # a new stream chooses its syslog framing again
        return discarded

    def _frame_lines(self, messages):
        buffer = self._buffer
        delimiter_length = len(self._delimiter)
        head = 0
        scan_pos = self._scan_pos
        with memoryview(buffer) as view:
            while True:
                # A delimiter starting past head + max_line would end a line that is too long,
                # so the search never looks further: the error shows without waiting for it.
                window_end = head + self._max_line + delimiter_length
                found = buffer.find(self._delimiter, scan_pos, window_end)
                if found < 0:
                    break
                end = found + delimiter_length
                messages.append(bytes(view[head : end if self._keep_delimiter else found]))
                head = scan_pos = end
        too_long = len(buffer) >= window_end
        self._scan_pos = max(head, len(buffer) - delimiter_length + 1) - head
        del buffer[:head]
        return LINE_TOO_LONG_TEXT.format(self._max_line) if too_long else None

    def _frame_length(self, messages):
        buffer = self._buffer
        head = 0
        error_text = None
        with memoryview(buffer) as view:
            while len(buffer) - head >= LENGTH_PREFIX_SIZE:
                start = head + LENGTH_PREFIX_SIZE
                length = int.from_bytes(view[head:start], "big")
                if length > self._max_frame:
                    error_text = FRAME_TOO_LARGE_TEXT.format(length, self._max_frame)
                    break
                if len(buffer) - start < length:
                    break
                messages.append(bytes(view[start : start + length]))
                head = start + length
        del buffer[:head]
        return error_text

    def _frame_octets(self, messages):
        """RFC 6587 octet counting: MSG-LEN SP MSG.  Returns the error type and text, or two
        Nones.  The count is read again from its start on each feed until its message is
        whole: at most the digits of max_frame and a space, so the scan stays linear."""
        buffer = self._buffer
        max_frame = self._max_frame
        head = 0
        error = None, None
        with memoryview(buffer) as view:
            while head < len(buffer):
                if buffer[head] not in b"123456789":
                    error = MalformedFrameError, MALFORMED_TEXT
                    break
                length = 0
                cursor = head
                while cursor < len(buffer) and buffer[cursor] in DIGITS and length <= max_frame:
                    length = 10 * length + buffer[cursor] - 48
                    cursor += 1
                if length > max_frame:
                    error = FrameTooLargeError, COUNT_TOO_LARGE_TEXT.format(max_frame)
                    break
                if cursor == len(buffer):
                    break
                if buffer[cursor] != 32:
                    error = MalformedFrameError, MALFORMED_TEXT
                    break
                start = cursor + 1
                if len(buffer) - start < length:
                    break
                messages.append(bytes(view[start : start + length]))
                head = start + length
        del buffer[:head]
        return error
