"""ReceiveOptions: every option of the compiled receive path, its default and its checks, in
one place.  ``fastsock.receiver()``, ReceiveHandler subclasses, ``fastsock serve``, the
event engine and the per-connection loop all take their options from it."""

import dataclasses
import math
import resource
import ssl

# _impl as a module, not its names: the engines import this module while _impl is imported.
from . import _impl, constants, proxy

__all__ = ["ReceiveOptions"]


@dataclasses.dataclass(frozen=True)
class ReceiveOptions:
    """The options of a compiled receive path, checked when the object is made.

    Stream connections: ``framing``, ``delimiter``, ``keep_delimiter``, ``max_line``,
    ``max_frame`` (see ``fastsock.Framer``); ``recv_size``, the bytes asked of each read;
    ``idle_timeout``, seconds a connection may stay silent (None: forever); ``message_timeout``,
    seconds one line or frame may take to arrive whole (None: forever); ``drain_timeout``, how
    long a graceful stop still hands over what peers sent before it (None or 0: count it at
    once); ``max_connections``, connections received at once per process (None: the
    file-descriptor limit, see ``connections_limit()``); ``evict_idle_after``, the silence after
    which a connection gives its slot to a new one when the server is full;
    ``max_partial_bytes``, incomplete messages all connections of a process may hold together
    before the largest holder is closed (None: no cap); ``engine_threads``, event engines of a
    ThreadingMixIn server, each a thread of its own; ``proxy_protocol``, every connection begins
    with a PROXY protocol header (v1 or v2) naming the client a load balancer accepted, which
    becomes the connection's address; ``proxy_trusted``, the networks (CIDR strings) that may
    send one: a peer outside them is closed at accept;
    ``ssl_context``, a server-side ``ssl.SSLContext``: every connection is TLS, terminated
    here with the context's certificate, and client certificates required or checked as its
    ``verify_mode`` and CA settings say (None: plaintext); ``tls_handshake_timeout``, seconds
    a connection may take to finish its handshake.

    Datagrams: ``max_datagram``, bytes of buffer per datagram; ``datagram_batch``, datagrams
    one recvmmsg() takes; ``datagram_busy_poll``, seconds the loop keeps asking after a busy
    batch before it sleeps; ``receive_buffer``, SO_RCVBUF of the socket (None: the
    system's).
    """

    framing: str = "raw"
    delimiter: bytes = constants.LINE_DELIMITER
    keep_delimiter: bool = False
    max_line: int = constants.MAX_LINE_LENGTH
    max_frame: int = constants.MAX_FRAME_SIZE
    recv_size: int = constants.RECV_SIZE
    idle_timeout: float | None = constants.IDLE_TIMEOUT
    message_timeout: float | None = constants.MESSAGE_TIMEOUT
    drain_timeout: float | None = constants.SHUTDOWN_DRAIN_TIMEOUT
    max_connections: int | None = None
    evict_idle_after: float = constants.EVICT_IDLE_AFTER
    max_partial_bytes: int | None = constants.MAX_PARTIAL_BYTES
    engine_threads: int = 1
    max_datagram: int = constants.DATAGRAM_MAX_SIZE
    datagram_batch: int = constants.DATAGRAM_BATCH
    datagram_busy_poll: float = constants.DATAGRAM_BUSY_POLL
    receive_buffer: int | None = None
    proxy_protocol: bool = False
    proxy_trusted: tuple = constants.PROXY_TRUSTED
    ssl_context: ssl.SSLContext | None = None
    tls_handshake_timeout: float = constants.TLS_HANDSHAKE_TIMEOUT

    def __post_init__(self):
        # The framer checks its own options (framing, delimiter, the limits).
        self.framer()
        _check_positive_int("recv_size", self.recv_size)
        _check_positive_int("engine_threads", self.engine_threads)
        _check_positive_int("max_datagram", self.max_datagram)
        _check_positive_int("datagram_batch", self.datagram_batch)
        for name in ("max_connections", "max_partial_bytes", "receive_buffer"):
            if getattr(self, name) is not None:
                _check_positive_int(name, getattr(self, name))
        for name in ("idle_timeout", "message_timeout"):
            value = getattr(self, name)
            if value is not None and not (_is_number(value) and value > 0):
                raise ValueError(f"{name} must be positive or None, not {value!r}")
        if self.drain_timeout is not None and not (
            _is_number(self.drain_timeout) and self.drain_timeout >= 0
        ):
            raise ValueError(f"drain_timeout must be >= 0 or None, not {self.drain_timeout!r}")
        if not (_is_number(self.evict_idle_after) and self.evict_idle_after >= 0):
            raise ValueError(f"evict_idle_after must be >= 0, not {self.evict_idle_after!r}")
        if not isinstance(self.proxy_protocol, bool):
            raise ValueError(f"proxy_protocol must be a bool, not {self.proxy_protocol!r}")
        try:
            networks = proxy.trusted_networks(self.proxy_trusted)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"proxy_trusted: {exc}") from None
        # Normalised, so that equal options compare equal and the engines parse one form.
        object.__setattr__(self, "proxy_trusted", tuple(str(network) for network in networks))
        _check_ssl_context(self.ssl_context)
        if not (_is_number(self.tls_handshake_timeout) and self.tls_handshake_timeout > 0):
            raise ValueError(
                f"tls_handshake_timeout must be positive, not {self.tls_handshake_timeout!r}"
            )
        if not (
            _is_number(self.datagram_busy_poll)
            and 0 <= self.datagram_busy_poll <= constants.RECEIVE_CHECK_INTERVAL
        ):
            raise ValueError(
                f"datagram_busy_poll must be between 0 and {constants.RECEIVE_CHECK_INTERVAL} "
                f"seconds, not {self.datagram_busy_poll!r}"
            )

    def fields(self):
        """The options as a dict of field name to value, the values themselves (an
        SSLContext cannot be copied, as ``dataclasses.asdict()`` would)."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}

    def framer(self):
        """A new Framer with these framing options."""
        return _impl.Framer(
            self.framing,
            delimiter=self.delimiter,
            keep_delimiter=self.keep_delimiter,
            max_line=self.max_line,
            max_frame=self.max_frame,
        )

    @property
    def largest_message(self):
        """The longest message a stream connection can publish under these options."""
        largest = self.framer().largest_message
        # A raw message is what one read returns.
        return self.recv_size if largest is None else largest

    @property
    def drain_seconds(self):
        """``drain_timeout`` as a number: None means no drain."""
        return self.drain_timeout or 0.0

    def connections_limit(self, *, thread_each):
        """``max_connections``, or its default: the file-descriptor limit less
        ``constants.FD_RESERVE``; capped at ``constants.MAX_CONNECTIONS_CAP`` when each
        connection costs a thread (``thread_each``), never for the event engines."""
        if self.max_connections is not None:
            return self.max_connections
        return default_max_connections(thread_each=thread_each)

    def check_ring(self, ring, *, datagrams=False):
        """Raise ValueError unless ``ring`` takes the largest message (of a datagram server if
        ``datagrams``)."""
        if datagrams:
            kind, largest = "datagram", self.max_datagram
        else:
            kind, largest = repr(self.framing), self.largest_message
        if largest > ring.max_bytes:
            raise ValueError(
                f"a {kind} message may reach {largest} bytes, more than the queue's "
                f"max_bytes={ring.max_bytes}: raise max_bytes or lower the limit"
            )


def default_max_connections(*, thread_each):
    """The file-descriptor limit less FD_RESERVE, at least 1; at most MAX_CONNECTIONS_CAP if
    each connection costs a thread."""
    soft_limit, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft_limit == resource.RLIM_INFINITY:
        # Linux's default fs.nr_open: no process has more descriptors than that.
        soft_limit = 1 << 20
    limit = max(1, soft_limit - constants.FD_RESERVE)
    return min(constants.MAX_CONNECTIONS_CAP, limit) if thread_each else limit


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_ssl_context(context):
    if context is None:
        return
    if not isinstance(context, ssl.SSLContext):
        raise ValueError(f"ssl_context must be an ssl.SSLContext or None, not {context!r}")
    if context.protocol == ssl.PROTOCOL_TLS_CLIENT:
        raise ValueError(
            "ssl_context is a client-side context (PROTOCOL_TLS_CLIENT); a server needs "
            "ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER) or "
            "ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)"
        )


def _check_positive_int(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, not {value!r}")
