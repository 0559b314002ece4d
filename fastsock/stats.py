"""Snapshots of fastsock's always-on counters."""

from dataclasses import dataclass

__all__ = ["RingStats"]


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
