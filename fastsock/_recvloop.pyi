"""The compiled receive loop behind ``fastsock.receiver``.

Most users never touch it: ``fastsock.receiver(ring, ...)`` builds the request handler that
drives one ``StreamReceiver`` per connection.  It is public to the package so that other
front ends (the forking and prefork servers, the CLI) drive the same loop.
"""

from collections.abc import Callable
from typing import Literal

from fastsock._framing import Framer
from fastsock._ring import RingQueue
from fastsock.stats import ReceiveStats

class ReceiveCounters:
    """The always-on counters of a server's receive loops.

    They live in an anonymous shared mapping and are updated with relaxed atomic adds, so
    every loop of a server, in any thread or forked child, adds to the same numbers.
    """

    def __init__(self) -> None: ...
    def snapshot(self) -> ReceiveStats:
        """Every counter, read at one instant (each one whole; not a single transaction)."""

    def request_stop(self) -> None:
        """Make every loop counting here return "stopped" within one check interval, in
        this process and in every forked one.  Permanent."""

    @property
    def stop_requested(self) -> bool: ...
    @property
    def partial_bytes(self) -> int:
        """Bytes of incomplete messages held by every loop counting here, now."""
    def count_refusal(self) -> None:
        """A connection was refused: ``max_connections`` were open and none could be evicted
        (``connections_refused``)."""
    def count_proxy_header(self, received: int, failed: bool) -> None:
        """A PROXY header read in Python (the per-connection path): ``received`` bytes were
        received; if it ``failed``, they were discarded and ``proxy_header_errors`` counts
        the connection."""
    def next_connection_id(self) -> int:
        """A connection id unique among every process sharing these counters, starting at
        1 and wrapping at 2**32."""

class ConnectionLedger:
    """Whether one connection's loop still has it open, and the partial-message bytes it
    holds, in memory shared with the parent of the forked request process it runs in:
    ``ForkingMixIn`` makes one before each fork and settles it when it reaps the child."""

    def __init__(self) -> None: ...
    def settle(self, counters: ReceiveCounters) -> bool:
        """If the loop never closed its connection (its process was killed): count it
        closed in ``counters`` and its partial message discarded (and out of the
        ``partial_bytes`` gauge); True if it had to."""

class StreamReceiver:
    """Receives one stream connection into its framer and publishes the messages to a ring.

    ``fd`` must be a connected, blocking stream socket; the receiver sets its SO_RCVTIMEO
    to ``check_interval`` so that a silent peer does not keep it from seeing ``stop()``,
    signals and ``idle_timeout``.  Messages are published with ``source_id``.  When the
    ring is full the loop stops reading until the ring drains to its resume mark, so the
    kernel's TCP window pushes back on the peer: nothing is dropped.
    """

    source_id: int
    last_errno: int
    """The errno of the recv() failure behind an "os_error" or "reset" end."""
    held_bytes: int
    """Bytes of the incomplete message this loop holds, as counted in the shared
    ``partial_bytes`` total (updated after each receive)."""

    def __init__(
        self,
        fd: int,
        framer: Framer,
        ring: RingQueue,
        counters: ReceiveCounters,
        source_id: int = 0,
        *,
        recv_size: int = ...,
        idle_timeout: float | None = None,
        message_timeout: float | None = None,
        drain_timeout: float = 0.0,
        partial_budget: int | None = None,
        on_over_budget: Callable[[], object] | None = None,
        check_interval: float = ...,
        spans_per_publish: int = ...,
        ledger: ConnectionLedger | None = None,
    ) -> None:
        """``recv_size`` defaults to ``constants.RECV_SIZE``, ``check_interval`` to
        ``constants.RECEIVE_CHECK_INTERVAL``, ``spans_per_publish`` to
        ``constants.SPANS_PER_PUBLISH``.

        ``drain_timeout``: after ``stop()`` (or the counters' ``request_stop()``), how long
        the loop still hands over what the peer sent before the stop: it reads what the
        kernel holds and waits for ring room to publish it.  What is left then is counted:
        framed messages in ``messages_dropped``, a partial one in ``bytes_discarded``, bytes
        still in the kernel in ``bytes_unread``.  ``partial_budget``: when the
        partial-message bytes of every loop sharing ``counters`` pass it, and this loop
        holds some, ``run()`` calls ``on_over_budget()`` with the GIL (a server's registry
        evicts its largest holder there).  ``ledger``: in a forked request process, the
        ledger its parent settles if this process dies before ``close()``."""

    def run(self) -> str:
        """Receive with the GIL released until the connection ends; return how it ended.

        One of "eof", "stopped", "reset", "idle_timeout", "message_timeout" (one
        message, from its first byte, took longer than ``message_timeout``),
        "evicted_idle", "evicted_memory" (``evict()`` was called), "line_too_long",
        "frame_too_large", "frame_malformed" (an octet count that is not digits, then a
        space), "ring_closed", "no_memory", "os_error".  A signal handler's
        exception (KeyboardInterrupt) propagates within one check interval; ``run()`` may
        then be called again and resumes where it stopped.
        """

    def stop(self) -> None:
        """Stop gracefully; any thread may call.  Within one check interval the loop shuts
        the socket both ways, so the peer can send nothing more (TCP answers further data
        with a reset, never with an acknowledgement), reads and publishes what the kernel
        already holds, and returns "stopped" once it is all read or ``drain_timeout``
        passed.  Whatever the peer was told was delivered is then in the ring or counted."""

    def evict(self, reason: Literal["idle", "memory"]) -> None:
        """End ``run()`` at once with "evicted_idle" or "evicted_memory", counted in
        ``idle_evictions`` / ``memory_evictions``: the socket is shut down for reading, which
        wakes a blocked ``recv()``.  Any thread may call it while the socket is open."""

    @property
    def idle_seconds(self) -> float:
        """Seconds since the peer last sent anything (or since the receiver was made); 0 while
        the loop waits for ring room (backpressure is no silence)."""

    def offending_sample(self, limit: int) -> bytes:
        """After a "line_too_long", "frame_too_large" or "frame_malformed" end and before
        ``close()``: the first ``limit`` bytes of the offending line or frame (its header
        included); b"" after ``close()``."""

    def close(self) -> None:
        """Count what the connection leaves behind: the partial message in the framer and
        any framed messages not published (``bytes_discarded``, ``messages_dropped``); bytes
        the kernel still held when ``run()`` ended were counted then (``bytes_unread``).
        Idempotent; the socket itself belongs to the caller."""
