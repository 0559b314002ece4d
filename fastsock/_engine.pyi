"""The compiled event engine: one loop receiving many stream connections.

A ``StreamEngine`` owns listening sockets and every connection it accepts from them (or is
given): one ``epoll`` loop, run with the GIL released, accepts in batches, reads each ready
connection up to a fairness budget per turn, frames what arrives with one framer state per
connection and publishes the messages to a ``RingQueue``.  No thread, Python object or
Python call per connection or per message; a server whose peers are all silent sleeps in
the kernel until its next deadline (idle or message timeout) or until ``stop()``.

It keeps every promise of the per-connection loop (``StreamReceiver``): the same framing
and limits, the same counters (a ``ReceiveCounters`` shared with forked processes), per-
connection FIFO, backpressure (a full ring stops all reading until it drains to its resume
mark, so TCP pushes back on every sender), and the graceful stop of issue 12 (stop
accepting, shut each connection both ways, hand over what the kernel holds within
``drain_timeout``, count the rest in ``bytes_unread``).
"""

from collections.abc import Sequence
from typing import NamedTuple

from fastsock._recvloop import ReceiveCounters
from fastsock._ring import RingQueue
from fastsock.options import ReceiveOptions

class EngineEvent(NamedTuple):
    """Something the engine did that Python reports (logs, or passes to ``handle_error``).

    ``kind`` is one of:

    - "line_too_long", "frame_too_large", "frame_malformed" (an octet count that is not
      digits, then a space): the connection was closed for a protocol error; ``detail`` is
      the start of the offending line or frame (at most
      ``constants.PROTOCOL_ERROR_SAMPLE`` bytes);
    - "message_timeout": closed, one message took longer than ``message_timeout``;
      ``detail`` is the timeout in seconds;
    - "evicted_idle": closed to admit a new connection when ``max_connections`` were open;
      ``detail`` is how long it had been silent, in seconds;
    - "evicted_memory": closed as the largest holder of partial messages when the shared
      total passed ``max_partial_bytes``; ``detail`` is the bytes it held;
    - "refused": a new connection was closed at once, ``max_connections`` being open and
      none silent for ``evict_idle_after`` (counted in ``connections_refused``, as a
      refused ``add_connection()`` is); ``connection_id`` is None, ``detail`` is
      ``max_connections``;
    - "accept_paused": ``accept()`` failed for lack of descriptors or memory (EMFILE,
      ENFILE, ENOBUFS, ENOMEM); accepting pauses ``detail`` seconds (10 ms doubling to 1 s)
      while the open connections are served; ``connection_id`` and ``address`` are None;
    - "no_memory", "os_error": receiving from the connection failed and it was closed;
      ``detail`` is the errno;
    - "proxy_header" (``proxy_protocol``): the connection was closed for its PROXY
      header: none, malformed, oversized, cut short by the peer's end, or not complete
      within ``constants.PROXY_HEADER_TIMEOUT``; ``detail`` is ``(reason, sample)``, reason
      one of ``fastsock.proxy.REASONS``, sample the header's first bytes (at most
      ``constants.PROTOCOL_ERROR_SAMPLE``); counted in ``proxy_header_errors``;
    - "proxy_untrusted" (``proxy_protocol``): a new connection from outside
      ``proxy_trusted`` was closed at accept, unread (counted in ``proxy_header_errors``,
      not opened); ``connection_id`` and ``detail`` are None;
    - "tls_handshake" (``ssl_context``): the connection was closed because its TLS
      handshake failed (not TLS, a client certificate missing or refused, a protocol
      error, a reset) or was not done within ``tls_handshake_timeout``; ``detail`` is the
      reason, as OpenSSL names it ("WRONG_VERSION_NUMBER", "HTTP_REQUEST",
      "PEER_DID_NOT_RETURN_A_CERTIFICATE"...) or "no handshake within
      tls_handshake_timeout"; counted in ``tls_handshake_errors``;
    - "tls_error" (``ssl_context``): after the handshake, a record that does not decrypt
      (tampered, or not TLS) closed the connection; ``detail`` is OpenSSL's reason;
      counted in ``resets``, as a connection broken mid-stream is.

    ``address`` is the peer's address as ``socket.accept()`` gives it (for a connection
    closed for its PROXY header, the real peer's: the header was never believed).
    """

    kind: str
    connection_id: int | None
    address: object
    detail: object

class StreamEngine:
    def __init__(
        self,
        ring: RingQueue,
        counters: ReceiveCounters,
        options: ReceiveOptions,
        *,
        listeners: Sequence[int] = (),
        shared_listeners: bool = False,
    ) -> None:
        """``options``: the framing and the limits (``fastsock.ReceiveOptions``, checked when
        it was made; the datagram fields are not used); ``max_connections`` None means the
        file-descriptor limit less ``constants.FD_RESERVE``.  ``listeners``: file descriptors
        of listening stream sockets (TCP, IPv4 or IPv6, or Unix); the engine makes them
        non-blocking (for good: several engines may share one) and accepts from them, but does
        not close them.  ``recv_size`` is also the fairness budget: each ready connection gets
        one ``recv()`` of at most that many bytes per turn of the loop, so a connection sending
        without pause cannot starve the others.  ``TypeError`` for a ring, counters or options
        of another kind; ``ValueError`` if the ring cannot take the largest message.
        ``proxy_protocol``: every connection first sends a PROXY header (v1 or v2), read
        before framing (the bytes after it in the same read are framed), within
        ``constants.PROXY_HEADER_TIMEOUT`` and ``constants.PROXY_MAX_HEADER`` bytes; a peer
        outside ``proxy_trusted`` (checked at accept on its real address; a Unix socket peer
        is trusted) is closed unread, and ``add_connection()`` refuses it with
        ``ConnectionRefusedError``.  ``shared_listeners``: other engines accept from the
        same listeners; each turn then takes at most
        ``constants.ENGINE_SHARED_ACCEPTS_PER_TURN`` connections from a listener and leaves
        the next ones to an engine that is waiting, so that a burst spreads over the
        engines (what is left is accepted in a later turn, never stranded).

        ``ssl_context`` (a server-side ``ssl.SSLContext``): every connection is TLS, after
        its PROXY header if ``proxy_protocol``.  The loop reads the ciphertext without the
        GIL, at most ``recv_size`` per turn as for plaintext, then takes the GIL once to
        hand it to the connection's ``fastsock.tls.TlsSession`` (Python's ``ssl`` over
        memory BIOs) and decrypt the plaintext straight into the framer's buffer (no bytes
        object), which it frames without the GIL; a plaintext connection never takes it.
        It follows the TLS record boundaries of the ciphertext (without the GIL), so that
        it asks ``ssl`` for plaintext only while a whole record waits.
        ``bytes_received`` counts the PROXY header and the plaintext, not the ciphertext.
        The handshake has ``tls_handshake_timeout`` (a deadline list, as pending PROXY
        headers have); its output and alerts are written to the socket at once.  A peer's
        close_notify is answered and ends the connection as its FIN does; an end without
        close_notify is an ordinary end too (most clients end so)."""

    def add_connection(self, fd: int) -> int:
        """Receive an already accepted, connected stream socket too, as if the engine had
        accepted it; returns its connection id.  The engine owns the descriptor from now
        on and closes it when the connection ends (call ``socket.detach()`` first).  Counts
        toward ``max_connections`` (evicting or refusing as for an accepted one:
        ``ConnectionRefusedError`` then, the descriptor closed).  Not while ``run()`` runs
        (``RuntimeError``)."""

    def run(self) -> str:
        """Receive with the GIL released; return why it returned:

        - "events": there are events to take (``take_events()``); call ``run()`` again;
        - "stopped": ``stop()`` was called and the drain is over: every connection is
          closed and its leftovers counted; later calls return "stopped" at once;
        - "empty": the engine has no listener and no connection left (an engine given
          connections only, after they all ended).

        A signal handler's exception (KeyboardInterrupt) propagates at once (the wait is
        interrupted by the signal); ``run()`` may then be called again and resumes.
        ``RuntimeError`` if another thread is running it.
        """

    def stop(self) -> None:
        """Stop gracefully; any thread may call it (it writes to the engine's eventfd, so a
        sleeping loop wakes at once).  The loop stops accepting, shuts every connection
        both ways, keeps reading, framing and publishing what the kernel holds until each
        connection has been read to its end or ``drain_timeout`` passed, counts the rest
        (``bytes_unread``, ``messages_dropped``, ``bytes_discarded``), closes every
        connection, and ``run()`` returns "stopped"."""

    def accept_connections(self, accepting: bool) -> None:
        """Stop (False) or resume (True) accepting from the listeners; any thread may call
        it.  Connections already accepted are served either way, and a stop still accepts
        what the backlogs hold (the kernel acknowledged it).  On by default."""

    def take_events(self) -> list[EngineEvent]:
        """The events since the last call, oldest first (at most
        ``constants.ENGINE_EVENTS_KEPT``; beyond that only counted in ``events_lost``)."""

    def peer(self, connection_id: int) -> object:
        """The client address of a connection, open or among the
        ``constants.RECENT_PEERS`` closed last; None otherwise.  With ``proxy_protocol``,
        the client its PROXY header named once it was read (the real peer before, and for
        a v2 LOCAL or v1 UNKNOWN header)."""

    def peer_subject(self, connection_id: int) -> str | None:
        """The subject of the certificate the client of a TLS connection presented, in RFC
        4514's order ("CN=client,O=Example"), known as long as ``peer()`` knows its address;
        None without one (no ``ssl_context``, no client certificate, or not yet)."""

    @property
    def tls_sessions_open(self) -> int:
        """TLS sessions the engine holds: one per open TLS connection, none once they end
        (every end frees its session: a leak would show here)."""

    @property
    def connections(self) -> int:
        """Connections open now."""

    @property
    def events_lost(self) -> int:
        """Events not kept because ``take_events()`` was not called often enough."""

    @property
    def wakeups(self) -> int:
        """Times the loop returned from ``epoll_wait()``: over a silent second it should
        stay at a handful."""

    def close(self) -> None:
        """Close every connection (counting what each leaves behind, as ``stop()`` with no
        drain) and release the engine's descriptors; not the listeners.  Idempotent; not
        while ``run()`` runs."""
