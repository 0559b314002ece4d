"""The protocol errors a framer can fail a stream connection with, in one table: for each,
what the loops and engines call it, the counter it adds to, how it is logged and the
exception the server's ``handle_error`` gets.  Every path reads it: the event engines and the
per-connection loop (compiled and reference), ``ReceiveStats.framing_errors``, the metrics
and the handler's reports.

The compiled framer numbers the rows in this order, from 1 (``ProtocolError`` in
fastsock/_framing.pxd); the reference framer raises their ``error`` classes.  A new failure
of a new framing is a row here, its entry in that enum, its ``ReceiveStats`` field and its
exception class.
"""

import dataclasses

from .errors import FrameTooLargeError, FramingError, LineTooLongError, MalformedFrameError


@dataclasses.dataclass(frozen=True)
class ProtocolError:
    """One way a peer's bytes failed framing; the connection is closed for it."""

    name: str  # the loop's end and the engine event's kind
    counter: str  # the ReceiveStats field, and the metric fastsock_<counter>_total
    log_key: str  # rate-limits its log records (constants.ERROR_LOG_INTERVAL)
    error: type[FramingError]  # what handle_error() gets
    complaint: str  # what the peer did, with the limit it broke ({max_line}, {max_frame})
    metric_help: str

    def describe(self, options):
        """What the peer did, with the limits of ``options`` (a ReceiveOptions)."""
        return self.complaint.format(max_line=options.max_line, max_frame=options.max_frame)


PROTOCOL_ERRORS = (
    ProtocolError(
        "line_too_long",
        "lines_too_long",
        "protocol-error",
        LineTooLongError,
        "sent a line longer than max_line={max_line} bytes",
        "Connections closed for a line over max_line.",
    ),
    ProtocolError(
        "frame_too_large",
        "frames_too_large",
        "protocol-error",
        FrameTooLargeError,
        "announced a frame larger than max_frame={max_frame} bytes",
        "Connections closed for a frame over max_frame.",
    ),
    ProtocolError(
        "frame_malformed",
        "frames_malformed",
        "protocol-error",
        MalformedFrameError,
        "sent a malformed octet count (not MSG-LEN SP: digits without a leading zero, a space)",
        "Connections closed for a malformed octet count (syslog).",
    ),
)

BY_NAME = {kind.name: kind for kind in PROTOCOL_ERRORS}
BY_ERROR = {kind.error: kind for kind in PROTOCOL_ERRORS}


def numbered(number):
    """The row the compiled framer numbers ``number`` (1 is the first)."""
    return PROTOCOL_ERRORS[number - 1]
