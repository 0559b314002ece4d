"""The compiled datagram receive loop: UDP (IPv4, IPv6) and Unix datagram sockets.

A ``DatagramReceiver`` drains one datagram socket with the GIL released, up to ``batch``
datagrams per ``recvmmsg()`` call (where the platform has no ``recvmmsg()``, a
``recvmsg()`` per datagram, as many as are queued, up to ``batch``), and publishes each
datagram as one ring message: the payload, with ``source_id`` 0 and the sender's raw
sockaddr as ``source`` (``None`` for a sender without an address, such as an unbound Unix
datagram socket).  ``fastsock.addresses`` turns a source into the address
``socket.recvfrom()`` would have returned.

Datagrams have no back-pressure: a receiver that stopped reading would only move the loss
into the kernel's receive queue.  So a datagram the ring cannot take is dropped at once and
counted, and the drops the kernel makes anyway (receive queue full) are read back from the
kernel's own counter, so that every datagram that reached the socket is accounted for::

    arrived == datagrams_received + dropped_queue_full + truncated + kernel_drops

``fastsock._reference.dgramloop`` has the same API in pure Python.
"""

from fastsock._ring import RingQueue
from fastsock.stats import DatagramStats

class DatagramCounters:
    """The always-on counters of a server's datagram loops.

    They live in an anonymous shared mapping and are updated with relaxed atomic adds, so
    every loop of a server, in any thread or forked child, adds to the same numbers.  Loops
    on different sockets may share one ``DatagramCounters``.
    """

    publishes_given_up: int
    """Batches a loop began to publish whose counts this object's snapshots stopped waiting
    for: their process died in between (a prefork worker killed).  Later snapshots wait only
    for publishes beyond these, so a dead worker costs one ``DATAGRAM_COUNT_WAIT``, not one
    per snapshot."""

    def __init__(self) -> None: ...
    def snapshot(self) -> DatagramStats:
        """Every counter, read at one instant (each one whole; not a single transaction).

        Waits, at most ``DATAGRAM_COUNT_WAIT`` seconds, for the counts of the batches the
        loops have published, so that they never lag what a consumer took."""

class DatagramReceiver:
    """Receives one datagram socket and publishes every datagram to a ring.

    ``fd`` must be a blocking datagram socket (UDP or AF_UNIX ``SOCK_DGRAM``), bound by the
    caller, who keeps owning it.  The constructor changes two of its options:

    - SO_RCVTIMEO is set to ``check_interval``, so that a silent socket does not keep
      ``run()`` from seeing ``stop()`` and signals;
    - SO_RCVBUF is set to ``receive_buffer`` when given (the kernel doubles the request and
      caps it at ``net.core.rmem_max``; the ``receive_buffer`` property tells what it
      granted).

    ``kernel_drops`` counts only the drops made after the receiver was constructed.  The
    loop reads the socket's drop counter (SO_MEMINFO, Linux) every check interval, busy or
    silent, and when ``run()`` returns, so a drop shows within one check interval.  (Not
    SO_RXQ_OVFL: the kernel would attach the counter to every datagram once it is nonzero,
    which costs the loop about a tenth of its rate.)  The counter belongs to the socket:
    run one receiver per socket at a time (several sockets, with SO_REUSEPORT, scale out
    instead).

    Each datagram becomes exactly one message or one count:

    - delivered: ``datagrams_received``, ``bytes_received``;
    - longer than ``max_datagram`` (the kernel reports MSG_TRUNC): dropped, never delivered
      cut, and counted in ``truncated``;
    - the ring is full: dropped and counted in ``dropped_queue_full`` (and
      ``dropped_queue_full_bytes``) and in the ring's ``dropped_messages``/``dropped_bytes``;
    - the ring closed under the loop: the rest of the batch already received is counted in
      ``dropped_queue_full`` (not in the ring's counters), and ``run()`` ends.

    Raises ValueError for a bad argument, a socket that is not a datagram socket or is
    non-blocking; OSError (its errno's subclass) if the socket cannot be inspected or
    configured, MemoryError if the buffers (``batch`` times ``max_datagram`` bytes, touched
    only as far as datagrams fill them) cannot be allocated.
    """

    last_errno: int
    """The errno of the receive failure behind an "os_error" or "no_memory" end; 0 before."""

    def __init__(
        self,
        fd: int,
        ring: RingQueue,
        counters: DatagramCounters,
        *,
        max_datagram: int = 65535,
        batch: int = 64,
        check_interval: float = ...,
        receive_buffer: int | None = None,
        busy_poll: float = ...,
        drain_timeout: float = 0.0,
    ) -> None:
        """``max_datagram`` is the longest datagram delivered, between 1 and the ring's
        ``max_bytes`` (default ``DATAGRAM_MAX_SIZE``: any UDP datagram); ``batch`` the most
        datagrams taken per system call, 1 to 1024 (default ``DATAGRAM_BATCH``);
        ``check_interval`` defaults to ``constants.RECEIVE_CHECK_INTERVAL``, > 0 and at most a
        day (86400 seconds); ``receive_buffer``, bytes, 1 to 2**31 - 1.

        ``busy_poll`` (default ``constants.DATAGRAM_BUSY_POLL``, 0 to ``check_interval``
        seconds): after a batch of at least a quarter of ``batch`` datagrams, the loop asks
        again without sleeping, yielding the core between tries, for up to this long before
        it sleeps in the kernel.  Under load a sender then finds the receiver awake and
        does not pay to wake it; under light traffic (small batches) it never polls.  0
        turns it off.  The pure-Python reference checks it and does not poll.
        ``drain_timeout``: after ``stop()``, how long the loop still reads and publishes the
        datagrams queued on the socket (see ``stop()``)."""

    @property
    def receive_buffer(self) -> int:
        """The socket's SO_RCVBUF now, as the kernel reports it (twice what was asked, for
        its bookkeeping).  OSError if the socket was closed."""

    def run(self) -> str:
        """Receive with the GIL released until stopped or failed; return how it ended.

        One of "stopped", "ring_closed" (also returned at once, receiving nothing, if the
        ring is already closed), "no_memory" and "os_error" (see ``last_errno``).  EINTR
        never ends it.  A signal handler's exception (KeyboardInterrupt) propagates within
        one check interval, after the batch at hand is delivered; ``run()`` may then be
        called again.  RuntimeError if another thread is running it.
        """

    def stop(self) -> None:
        """Stop gracefully, now and for every later call; any thread may call it.  Within
        one check interval the loop stops waiting for datagrams and reads, without waiting,
        what is queued on the socket, publishing it as usual, until the socket is empty
        (then ``run()`` returns "stopped") or ``drain_timeout`` passed.  What a sender
        still flooding keeps queued then is read and counted in ``datagrams_unread`` for at
        most one more check interval."""
