"""Exceptions raised by fastsock's framers, ring queue and servers."""

import queue

__all__ = [
    "DatagramTruncatedError",
    "FrameTooLargeError",
    "FramingError",
    "LineTooLongError",
    "MalformedFrameError",
    "ProxyHeaderError",
    "QueueClosed",
]


class FramingError(ValueError):
    """A peer sent bytes that cannot be framed within the configured limits.

    ``messages`` holds the complete messages framed before the error, so that nothing a
    peer sent correctly is lost; ``discarded`` is the number of bytes thrown away.
    """

    def __init__(self, message: str, messages: list | None = None, discarded: int = 0):
        super().__init__(message)
        self.messages = [] if messages is None else messages
        self.discarded = discarded


class LineTooLongError(FramingError):
    """A line grew past ``max_line`` bytes without its delimiter."""


class FrameTooLargeError(FramingError):
    """A length prefix or an octet count announced a frame larger than ``max_frame`` bytes."""


class MalformedFrameError(FramingError):
    """An octet count (RFC 6587 ``MSG-LEN SP``) was not a decimal number without a leading
    zero followed by a space."""


class ProxyHeaderError(FramingError):
    """A connection that had to begin with a PROXY protocol header did not: none, a
    malformed, oversized or unfinished one, or one from outside ``proxy_trusted``."""


_ShutDown = getattr(queue, "ShutDown", None)
_QueueClosedBases = (Exception,) if _ShutDown is None else (_ShutDown,)


class QueueClosed(*_QueueClosedBases):
    """The ring queue was closed: producers may not put, and it has been drained.

    On Python 3.13+ this is a subclass of ``queue.ShutDown``.
    """


class DatagramTruncatedError(OSError):
    """A datagram was longer than the server's ``max_packet_size`` and was dropped.

    Raised by ``UDPServer.get_request`` when ``report_truncation`` is on; its ``errno``
    is ``EMSGSIZE``.
    """
