"""Snapshots of fastsock's always-on counters."""

from dataclasses import dataclass

__all__ = ["DatagramStats", "PipelineStats", "ReceiveStats", "RingStats"]


@dataclass(frozen=True, slots=True)
class RingStats:
    """Counters of one ring-buffer queue, read at one instant.

    Producer counters (``put_*``, ``dropped_*``, ``paused_seconds``) and consumer counters
    (``got_*``) are kept in the ring itself, so they cover every process sharing it.
    """

    put_messages: int
    put_bytes: int
    got_messages: int
    got_bytes: int
    dropped_messages: int
    dropped_bytes: int
    full_events: int
    paused_seconds: float
    producer_deaths: int
    messages_queued: int
    bytes_queued: int


@dataclass(frozen=True, slots=True)
class ReceiveStats:
    """Counters of a server's compiled receive loops, read at one instant.

    Every byte received is in a delivered message, in the framing overhead (delimiters,
    length prefixes), or in ``bytes_discarded``; every framed message is in
    ``messages_received`` (published to the ring) or ``messages_dropped`` (the ring was
    closed under it, or the drain time after a stop ran out).  ``bytes_unread`` counts
    what the kernel had accepted for a connection that its loop never read: left at a
    graceful stop's deadline, or behind an end the loop chose (a protocol error, an
    eviction).  So after a graceful stop, the bytes each peer was told were delivered (TCP's
    acknowledgements) are exactly the delivered messages, their framing, ``bytes_discarded``
    and ``bytes_unread``.  ``idle_evictions`` and
    ``memory_evictions`` count connections closed to admit a new one when
    ``max_connections`` was reached, and as the largest holder of partial messages when
    their total passed the budget; ``partial_bytes`` is that total now (a gauge).
    ``lines_too_long``, ``frames_too_large`` (a length prefix or an octet count over
    ``max_frame``) and ``frames_malformed`` (an octet count that is not digits without a
    leading zero, then a space) count the connections closed for each protocol error;
    ``framing_errors`` is their sum.  ``proxy_header_errors`` counts the connections closed
    for their PROXY protocol header (``proxy_protocol``): none, malformed, oversized, not
    finished in time, or sent from outside ``proxy_trusted`` (closed at accept, never
    opened).
    """

    connections_opened: int
    connections_closed: int
    bytes_received: int
    messages_received: int
    messages_dropped: int
    bytes_discarded: int
    lines_too_long: int
    frames_too_large: int
    resets: int
    idle_timeouts: int
    pauses: int
    paused_seconds: float
    connections_refused: int = 0
    message_timeouts: int = 0
    idle_evictions: int = 0
    memory_evictions: int = 0
    partial_bytes: int = 0
    bytes_unread: int = 0
    frames_malformed: int = 0
    proxy_header_errors: int = 0

    @classmethod
    def zero(cls) -> "ReceiveStats":
        """The counters of a server that has not received yet."""
        return cls(*(0 for _ in cls.__slots__))

    @property
    def connections_active(self) -> int:
        return self.connections_opened - self.connections_closed

    @property
    def framing_errors(self) -> int:
        return self.lines_too_long + self.frames_too_large + self.frames_malformed


@dataclass(frozen=True, slots=True)
class DatagramStats:
    """Counters of a server's datagram receive loops, read at one instant.

    Every datagram that reached the socket is delivered (``datagrams_received``, whose
    payloads total ``bytes_received``) or dropped: refused by a full (or closed) ring
    (``dropped_queue_full``), longer than the receive buffer (``truncated``, never delivered
    cut), or dropped by the kernel before the loop could read it (``kernel_drops``, read
    back from the kernel's own counter).  ``receive_calls`` counts the system calls that
    returned datagrams.  ``datagrams_unread``: datagrams still queued on the socket when a
    graceful stop's drain time ran out (a sender still flooding), read and counted instead
    of delivered.
    """

    datagrams_received: int
    bytes_received: int
    dropped_queue_full: int
    dropped_queue_full_bytes: int
    truncated: int
    kernel_drops: int
    receive_calls: int
    datagrams_unread: int = 0

    @classmethod
    def zero(cls) -> "DatagramStats":
        """The counters of a server that has not received yet."""
        return cls(*(0 for _ in cls.__slots__))

    @property
    def datagrams_dropped(self) -> int:
        return self.dropped_queue_full + self.truncated + self.kernel_drops


@dataclass(frozen=True, slots=True)
class PipelineStats:
    """Counters of one ``fastsock.pipeline`` pipeline, read at one instant.

    ``messages_delivered`` (in ``batches_delivered`` batches, ``bytes_delivered`` of
    payload) are the messages the sink confirmed; ``undelivered`` those taken from the ring
    that never will be (the stop's deadline passed, or the sink failed fatally), counted
    with what was left in the ring then.  ``sink_errors`` counts the sink's failed writes
    and flushes, ``retries`` the writes of a batch again after ``SinkUnavailable``.
    ``lag`` is the messages queued in the ring now (a gauge), ``delivery_seconds`` the time
    spent in the sink's confirmed writes: divided by ``batches_delivered``, the mean time a
    batch takes to be confirmed.
    """

    batches_delivered: int
    messages_delivered: int
    bytes_delivered: int
    retries: int
    sink_errors: int
    undelivered: int
    lag: int
    delivery_seconds: float
