"""Compiled stream framer: splits the bytes received on one connection into messages.

``fastsock._reference.framing.Framer`` is its pure-Python twin, with the same API and the
same behaviour byte for byte.
"""

from typing import Literal

from _typeshed import ReadableBuffer

FRAMINGS: tuple[str, ...]
"""The framings a Framer knows: "raw", "lines", "length", "octets", "syslog"."""

FRAMING_LIMITS: dict[str, tuple[str, ...]]
"""For each framing, the limits it enforces, named as Framer's arguments ("max_line",
"max_frame"): ``fastsock serve`` offers its --framing choices and checks which of
--max-line/--max-frame apply from this table, so a new framing needs no change there."""

class Framer:
    """Splits the bytes of one stream into complete messages.

    Framings:

    - ``"raw"``: each non-empty ``feed()`` is one message, exactly as received.
    - ``"lines"``: a message ends at ``delimiter``, kept at its end only with
      ``keep_delimiter``.  A delimiter split across feeds is found all the same, and an empty
      line is the message ``b""``.
    - ``"length"``: a 4-byte big-endian unsigned length, then that many bytes of payload; the
      message is the payload alone, and length 0 is the message ``b""``.
    - ``"octets"``: RFC 6587 octet counting, syslog's framing over TCP: ``MSG-LEN SP MSG``,
      MSG-LEN the payload's length in ASCII digits (at least 1, no leading zero); the
      message is MSG alone.
    - ``"syslog"``: what a syslog receiver such as rsyslog accepts over TCP: ``"octets"`` if
      the stream's first byte is a digit, else ``"lines"`` (non-transparent framing, with
      ``delimiter`` and ``max_line``), chosen once for the stream.

    The limits bound the memory any peer can make a framer hold.  A line longer than
    ``max_line`` bytes (delimiter excluded) raises ``LineTooLongError`` as soon as
    ``max_line + len(delimiter)`` of its bytes are buffered without a delimiter, without
    waiting for one.  A length prefix above ``max_frame`` raises ``FrameTooLargeError`` as
    soon as its 4 bytes are in, before anything is allocated for the payload; so does an
    octet count, at its first digit past ``max_frame``.  An octet count that is not digits
    then a space, or that starts with ``0``, raises ``MalformedFrameError`` at its first bad
    byte.  The error's ``messages`` holds the complete messages framed from the same feed
    before the violation, and its ``discarded`` the bytes thrown away: the offending
    message's buffered bytes and the rest of the feed.  The framer is then failed: every
    later ``feed()`` raises a plain ``FramingError`` and discards its bytes, and the
    connection should be closed.

    Every byte fed is accounted for: ``bytes_in`` equals the payload bytes of the messages
    returned, plus the delimiters, length prefixes or octet counts stripped from them, plus
    ``bytes_discarded``, plus ``pending``.

    Scanning is linear: no byte is scanned twice, however the stream is split into feeds.
    Feeds larger than 64 KiB are framed without the GIL.  A framer serves one connection, fed
    by one thread at a time: a ``feed()`` or ``eof()`` that overlaps a running ``feed()``
    raises ``RuntimeError``.
    """

    def __init__(
        self,
        framing: Literal["raw", "lines", "length", "octets", "syslog"] = "lines",
        *,
        delimiter: ReadableBuffer = b"\n",
        keep_delimiter: bool = False,
        max_line: int = 65536,
        max_frame: int = 1048576,
    ) -> None:
        """Create a framer for one stream.

        ``framing`` is ``"raw"``, ``"lines"`` (the default), ``"length"``, ``"octets"`` or
        ``"syslog"``.  ``delimiter`` (default ``b"\\n"``, any non-empty bytes-like, e.g.
        ``b"\\r\\n"``) and ``keep_delimiter`` (default ``False``) apply to lines.
        ``max_line`` (default 64 KiB, ``MAX_LINE_LENGTH``) bounds a line without its
        delimiter; ``max_frame`` (default 1 MiB, ``MAX_FRAME_SIZE``) bounds a length-prefixed
        or octet-counted payload.  Both limits must be between 1 and 2**32 - 1, the largest
        length a prefix can announce.

        Raises ``ValueError`` for an unknown framing, an empty delimiter or a limit out of
        range, and ``TypeError`` for a delimiter that is not bytes-like or a limit that is
        not an integer.
        """

    def feed(self, data: ReadableBuffer) -> list[bytes]:
        """Frame the next bytes of the stream and return the messages they complete, in order.

        ``data`` is any C-contiguous bytes-like object (``bytes``, ``bytearray``,
        ``memoryview``...); it is copied, never kept.  An empty ``data`` returns ``[]``.

        Raises ``LineTooLongError``, ``FrameTooLargeError`` or ``MalformedFrameError`` on a
        protocol error, and a plain ``FramingError`` once the framer has failed (see the
        class documentation); ``TypeError`` if ``data`` is not bytes-like, ``BufferError`` if
        it is not contiguous.
        """

    def peek_pending(self, limit: int) -> bytes:
        """The first ``limit`` bytes of the incomplete message, without consuming them.

        After a receive loop ends on a framing error (before the framer is closed), this is
        the start of the offending line or frame: the sample a log line shows.
        """

    def eof(self) -> int:
        """End the stream: discard the incomplete message and return its size in bytes.

        Returns 0 if the stream ended between messages.  The framer may be fed again after,
        as a new stream (``"syslog"`` chooses again); a failed framer stays failed.
        """

    @property
    def framing(self) -> Literal["raw", "lines", "length", "octets", "syslog"]:
        """The framing given at creation."""

    @property
    def delimiter(self) -> bytes:
        """The line delimiter, as bytes (default ``b"\\n"``)."""

    @property
    def keep_delimiter(self) -> bool:
        """Whether lines keep their delimiter at their end (default ``False``)."""

    @property
    def max_line(self) -> int:
        """The longest line accepted, in bytes, delimiter excluded (default 65536)."""

    @property
    def max_frame(self) -> int:
        """The largest length-prefixed or octet-counted payload accepted, in bytes (default
        1048576)."""

    @property
    def largest_message(self) -> int | None:
        """A bound on the length of every message ``feed()`` returns, from the framing and
        its limits (a line's delimiter counted, kept or not); None for ``"raw"``, whose
        messages are as long as the data fed."""

    @property
    def pending(self) -> int:
        """Bytes held of an incomplete message, its delimiter or prefix included."""

    @property
    def capacity(self) -> int:
        """Bytes of buffer the framer holds now; 0 once a receive loop released it for a
        silent peer with no incomplete message (the reference holds just the pending bytes)."""

    @property
    def failed(self) -> bool:
        """Whether a limit violation has failed the framer for good."""

    @property
    def bytes_in(self) -> int:
        """Bytes fed since creation, including those discarded."""

    @property
    def messages_out(self) -> int:
        """Messages returned since creation, including those carried by errors."""

    @property
    def bytes_discarded(self) -> int:
        """Bytes thrown away since creation, by limit violations, a failed framer or eof()."""
