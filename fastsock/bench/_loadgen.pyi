"""Compiled load generator and C-level sinks: the measuring instruments of fastsock's benchmarks.

Every function runs its whole socket loop in C with the GIL released, so other Python
threads (a server under test, say) run meanwhile, and each is bounded in time by its
``max_seconds``.  Descriptors are borrowed: none is closed (except the connections that
``sink_stream`` accepts itself) and none has its blocking mode changed for good.  System
call failures raise the stdlib's OSError subclass for their errno (``ConnectionResetError``,
``BrokenPipeError``, ``TimeoutError``, plain ``OSError`` for ``EBADF``...); bad arguments
raise ``TypeError`` or ``ValueError`` before any byte moves.  A call cannot be interrupted
by Ctrl-C: the signal is handled when it returns, at most ``max_seconds`` later.
"""

from collections.abc import Sequence
from os import PathLike

from _typeshed import ReadableBuffer

_Destination = tuple[str, int] | tuple[str, int, int, int] | str | bytes | PathLike[str]

def send_stream(
    fds: Sequence[int], block: ReadableBuffer, total_bytes: int, max_seconds: float
) -> tuple[int, float]:
    """Write ``block`` over and over to connected stream sockets, then shut their write side.

    ``total_bytes``, rounded down to whole blocks, is shared out as evenly as whole blocks
    allow: each connection gets ``total // len(block) // len(fds)`` blocks, and the first
    ones one block more for the remainder.  Sending stops early once ``max_seconds`` have
    passed, but each connection first completes the block it has started (waiting up to 5
    more seconds for its peer to make room, else ``TimeoutError``), so exactly
    ``bytes_sent // len(block)`` whole blocks are sent in all.  Build ``block`` from whole
    messages (64-byte lines, length-prefixed frames...): messages sent are then blocks sent
    times messages per block.

    Each connection gets ``shutdown(SHUT_WR)`` as soon as its share is written, and all of
    them on any error too, so the receiver always sees EOF.  The sockets are written
    without blocking (MSG_DONTWAIT) under edge-triggered epoll, from a 256 KiB (or larger)
    buffer of repeated blocks, so one send() moves up to 256 KiB.

    Returns ``(bytes_sent, seconds)``: the bytes written over all connections, and the time
    from the first write to the last shutdown.

    Raises ValueError for an empty ``fds`` or ``block``, a descriptor given twice or one that
    is not a stream socket, a negative ``total_bytes`` or a ``max_seconds`` that is not a
    finite number > 0.
    """

def sink_stream(
    listen_fd: int, connections: int, count_byte: int = -1, max_seconds: float = 60.0
) -> tuple[int, int, float]:
    """Accept ``connections`` connections on a listening socket and read them all to EOF.

    The baseline "C epoll sink that only counts": one thread, level-triggered epoll and
    256 KiB recv() calls.  Besides the bytes it counts the occurrences of ``count_byte``
    (``ord("\\n")`` counts lines) with a memchr() loop; -1 counts nothing.

    Returns ``(bytes, count, seconds)`` once every connection has reached EOF, or when
    ``max_seconds`` have passed: compare ``bytes`` with what was sent to tell a complete
    transfer from a timed-out one.  ``seconds`` runs from the first byte received to the
    last EOF (to the last byte after a timeout), 0.0 if nothing arrived.  The accepted
    connections are closed before it returns; the listening socket is left open and in its
    original blocking mode.

    Raises ValueError if ``listen_fd`` is not a listening stream socket, ``connections`` is
    below 1 or ``count_byte`` is outside -1..255.
    """

def send_datagrams(
    fd: int,
    payload: ReadableBuffer,
    count: int,
    max_seconds: float,
    batch: int = 64,
    destination: _Destination | None = None,
    sequence: bool = False,
    segments: int = 1,
) -> tuple[int, float]:
    """Send ``count`` copies of ``payload`` as datagrams, ``batch`` messages per sendmmsg().

    With ``segments`` above 1 (UDP only, up to 64, and ``segments * len(payload)`` up to
    65,507 bytes), each message is one UDP GSO send of that many datagrams, which the
    kernel cuts apart: the receiver gets ordinary ``len(payload)``-byte datagrams, but
    the sender pays for one trip through its stack per message, not per datagram.  The
    option rides on each message (a UDP_SEGMENT control message), so the socket itself
    is left unchanged.  A kernel without UDP GSO (before Linux 4.18) raises OSError.

    Without ``destination`` the socket must be connected; with it, every datagram goes to
    that address, given as the socket module takes it for the socket's family: ``(host,
    port)`` or ``(host, port, flowinfo, scope_id)`` for AF_INET and AF_INET6 (``host`` is
    resolved once, before sending), a path for AF_UNIX (a leading NUL byte names an abstract
    address).  With ``sequence=True`` the first 8 bytes of each datagram are replaced by its
    index, 0 to ``count - 1``, big-endian, so that a receiver can account for every loss and
    reordering; the payload must then be at least 8 bytes long.

    Sending never blocks: when the kernel has no room (EAGAIN, ENOBUFS) it waits for room in
    poll() and, if that cannot tell, pauses 20 microseconds to 1 millisecond, so a slow
    receiver throttles it without a spinning CPU.  It stops after ``count`` datagrams or
    ``max_seconds``, whichever comes first.

    Returns ``(sent, seconds)``: the datagrams the kernel accepted (for UDP, accepted is not
    delivered: a full receive buffer drops them) and the time the sending took.

    Raises ValueError if ``fd`` is not a datagram socket, for a ``batch`` outside 1..1024, a
    negative ``count``, a bad ``destination``, a too-short numbered payload and ``segments``
    out of range or on a Unix socket; socket.gaierror if ``host`` does not resolve.
    """

def sink_datagrams(
    fd: int,
    expected: int,
    max_seconds: float,
    batch: int = 64,
    idle_seconds: float = 0.5,
    spin_seconds: float = 0.001,
) -> tuple[int, int, float]:
    """Receive datagrams with recvmmsg(), ``batch`` per call, and count them.

    The ceiling of receiving at all: each call blocks only until the first datagram is
    there (MSG_WAITFORONE), then takes whatever else is queued, so a busy socket costs
    one system call per batch and no poll().  For ``spin_seconds`` after each datagram
    the calls do not block at all (MSG_DONTWAIT): a receiver that sleeps as soon as it
    has caught up pays a wake-up each time, which on a virtual machine can take long
    enough for the receive queue to overflow, so it would measure wake-ups, not
    receiving.  0 never spins.  While the socket is silent the call wakes every 50 ms (a
    receive timeout, SO_RCVTIMEO) to look at the deadline and idle time, so it returns
    at most that much after them.  For that wait the socket is made
    blocking with a receive timeout; its file status flags and timeout are put back
    before returning.

    Stops once ``expected`` datagrams have arrived (it never reads past them), when
    ``max_seconds`` have passed, or when nothing has arrived for ``idle_seconds`` after the
    first datagram: a sender that lost some is not waited for until the deadline.

    Returns ``(datagrams, bytes, seconds)``: ``bytes`` counts every datagram's full length,
    even one longer than the 64 KiB receive slot, and ``seconds`` runs from the first
    datagram to the last.

    Raises ValueError if ``fd`` is not a datagram socket, for a ``batch`` outside 1..1024, a
    negative ``expected`` and a ``spin_seconds`` outside 0..``idle_seconds``.
    """

def open_connections(
    address: tuple[str, int],
    line: ReadableBuffer,
    count: int,
    max_seconds: float,
    window: int = 64,
    sources: Sequence[str] = (),
) -> tuple[list[int], float]:
    """Open ``count`` TCP connections to an IPv4 ``address``, each sending ``line`` once,
    and keep them open: the silent peers of a server under test.

    At most ``window`` connections are connecting at once (non-blocking ``connect()`` under
    epoll).  On loopback the handshake has usually completed within ``connect()``, so the
    line (up to 256 bytes, which a new connection's empty send buffer takes whole) is sent
    at once, and only a connection still connecting waits for epoll.  An empty ``line``
    sends nothing: the connection is complete when it is connected.  ``sources`` are IPv4
    addresses to connect from, in turn, each bound with ``IP_BIND_ADDRESS_NO_PORT`` so that
    each has the whole ephemeral port range (28,232 ports by default) for itself: on
    loopback, ``127.0.0.2``, ``127.0.0.3``... let one destination take more connections
    than one source address has ports.  Empty: the kernel chooses.

    No connection starts after ``max_seconds``; those connecting then are waited for up to
    ``max_seconds`` more.  Returns ``(descriptors, seconds)``: the connected descriptors,
    non-blocking and close-on-exec, now the caller's to close (fewer than ``count`` if the
    time ran out), and the time until the last one was connected.  On an error (refused,
    ``EADDRNOTAVAIL`` once the ports run out, ``EMFILE``...) every descriptor it opened is
    closed and the OSError raised.

    Raises ValueError for a negative ``count``, a ``window`` below 1, a ``line`` over 256
    bytes or a ``max_seconds`` that is not a finite number > 0.
    """

def churn(
    address: tuple[str, int],
    line: ReadableBuffer,
    count: int,
    max_seconds: float,
    window: int = 64,
    sources: Sequence[str] = (),
    drain_seconds: float = 10.0,
) -> tuple[int, float]:
    """Short connections, ``window`` at a time: each connects to an IPv4 ``address``,
    sends ``line``, shuts down its write side and waits for the server to close it (an EOF
    or a reset), then closes; another starts at once in its place.

    Up to ``count`` connections, none started after ``max_seconds``; those in flight then
    are waited for up to ``drain_seconds`` more, then ``TimeoutError``.  ``line`` and
    ``sources`` are as for ``open_connections``; the line is sent with ``MSG_MORE``, so the
    FIN of the shutdown rides in the same segment, and the server's close is seen in the
    epoll event itself (``EPOLLRDHUP``), without a ``recv()``.  Per connection that leaves
    ``socket``, ``setsockopt`` and ``bind`` (with ``sources``), ``connect``, ``send``,
    ``shutdown``, one ``epoll_ctl`` and ``close``, plus a share of ``epoll_wait``.  The
    client closes first, so its side of every connection ends in TIME_WAIT: with
    ``tcp_tw_reuse`` (Linux's default allows it on loopback) a port can serve again one
    second later, so spread fast churn over several ``sources``.

    Returns ``(connections, seconds)``: the connections completed, and the time from the
    first ``connect()`` to the last close.  Raises as ``open_connections`` does.
    """
