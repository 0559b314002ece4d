"""``fastsock serve``: a receive server on the compiled path, without writing code."""

import argparse
import asyncio
import ipaddress
import logging
import math
import os
import signal
import socket
import ssl
import sys
import threading
import time
import urllib.parse

import fastsock
from fastsock import constants, metrics, pipeline, proxy
from fastsock._cli_support import CommandError, UsageError, number, positive_float, positive_int
from fastsock._impl import FRAMING_LIMITS
from fastsock._ratelimit import RateLimitedLogger
from fastsock.addresses import format_address
from fastsock.server import _unlink_own_socket_file

__all__ = ["SERVE_DETAILS", "add_serve_arguments", "run_serve"]

SERVE = "fastsock serve"

# -- fastsock serve: arguments ---------------------------------------------------------------

SCHEMES = ("tcp", "udp", "unix", "unixgram")
STREAM_LIMITS = (
    "max_line",
    "max_frame",
    "idle_timeout",
    "max_connections",
    "evict_idle_after",
    "max_partial_bytes",
)
STREAM_ONLY = ("framing", *STREAM_LIMITS)
DEFAULT_FRAMING = "lines"
DEFAULT_WORKERS = 2
LOOP_WAIT_SECONDS = 0.1
"""Longest wait for messages before the serving loop looks at signals, stats and workers."""


SERVE_DETAILS = f"""\
output formats:
  raw    each message and a newline; with --framing raw, the bytes exactly as received
  jsonl  one JSON object per message and line:
           {{"time": "2025-01-31T12:00:00.123456+00:00", "peer": "127.0.0.1:50412",
            "connection": 7, "text": "the message"}}
         time        when fastsock serve took the message from its queue (UTC, ISO 8601)
         peer        the sender: "host:port", "[host]:port" (IPv6) or a socket path; null
                     when unknown (an unbound Unix sender, a stream in --mode prefork);
                     with --proxy-protocol, the client the connection's header names
         connection  the stream connection's id, shared by all its messages; null for
                     datagrams
         subject     with --tls-client-ca, the subject of the client's certificate
                     ("CN=client,O=Example"); null without one (and in --mode prefork)
         text        the payload, when it is valid UTF-8; otherwise "base64" holds it

stopping (SIGINT, SIGTERM):
  the server stops accepting and shuts every connection both ways: a peer can send nothing
  more (TCP answers further data with a reset, never with an acknowledgement). Everything
  the peers sent before that is read, framed and written while the writer keeps up, for at
  most --drain-timeout seconds (default {constants.SHUTDOWN_DRAIN_TIMEOUT:g}); datagrams
  queued on the socket likewise. What is left then is counted in the final counters on
  stderr: "unread" (bytes the kernel held, or datagrams), "dropped" (framed messages) and
  "discarded" (a line or frame cut short). So every byte a sender's TCP saw acknowledged
  is written or counted. The exit status is 0, or 1 when some of it could not be
  delivered to the sink by the deadline (see sinks).

syslog (--framing syslog):
  what rsyslog accepts over TCP: a connection whose first byte is a digit is read as RFC
  6587 octet counting ("MSG-LEN SP MSG", what `logger --octet-count` and rsyslog send), any
  other as newline-delimited lines; over udp:// each datagram is one message (RFC 5426).
  --framing octets accepts octet counting only. A count that is not digits and a space,
  starts with 0, or is over --max-frame closes that connection, counted and logged with
  the start of what it sent, as a line over --max-line does.

behind a load balancer (--proxy-protocol):
  every stream connection must begin with a PROXY protocol header, v1 (text) or v2
  (binary): what HAProxy sends with send-proxy or send-proxy-v2, and nginx, Envoy, AWS and
  GCP load balancers when told to. The client it names is the connection's peer (a v2
  LOCAL or v1 UNKNOWN header keeps the real one). Only peers in --proxy-trusted may send
  one; any other connection is closed at once, unread. A missing, malformed or oversized
  header closes that connection, counted ("proxy headers" in the counters) and logged
  with the start of what it sent; so does a header not complete in time.
  Trusted by default: {", ".join(constants.PROXY_TRUSTED)}.
  Header limits: {constants.PROXY_HEADER_TIMEOUT:g} s to arrive whole;
  {constants.PROXY_MAX_HEADER:,} bytes (v2; a v1 header has at most 107).

TLS (--tls-cert FILE --tls-key FILE [--tls-client-ca FILE]):
  every stream connection is TLS (1.2 or 1.3), terminated here by Python's ssl module (the
  OpenSSL it links) with the certificate chain in --tls-cert (PEM) and its key. With
  --tls-client-ca, each client must present a certificate signed by a CA in that file
  (mTLS: its subject goes into jsonl records); without, none is asked for. A handshake
  that fails (not TLS, a missing or untrusted client certificate) or is not done within
  {constants.TLS_HANDSHAKE_TIMEOUT:g} s closes that connection, counted ("tls handshakes" in
  the counters) and logged with OpenSSL's reason. With --proxy-protocol, the PROXY header
  comes first, in plaintext, then TLS. No session tickets are sent: a client that
  only sends never reads them, and its close would then reset the connection and lose what
  the kernel still held of its data.

log rotation (SIGHUP):
  with --output FILE, SIGHUP makes fastsock serve reopen FILE between two batches of
  messages: logrotate can rename the file and send SIGHUP (postrotate kill -HUP PID), and
  every message before the reopen is in the renamed file, every one after in the new FILE,
  none lost or written twice. A SIGHUP while the server starts is kept, and acted on once
  it serves. Writing to stdout, SIGHUP is ignored (a line on stderr says so). Prefork
  workers ignore SIGHUP; only this process writes.

sinks (--sink URL):
  the messages go to the sink in batches; a batch leaves the queue only once the sink has
  confirmed it (written to the kernel; acknowledged by the broker). While a sink is
  unavailable (a broker down, a full disk) the same batch is retried, the wait doubling
  from {constants.SINK_RETRY_INITIAL:g} s to {constants.SINK_RETRY_MAX:g} s, the queue fills,
  and stream senders are held back by TCP (datagrams beyond the queue are dropped, counted).
  On SIGINT/SIGTERM, what is left is delivered for at most --sink-timeout seconds beyond
  the drain; what could not be is counted ("undelivered"), said on stderr, and the
  exit status is then 1. A crash loses what the queue held and the batch being delivered.
  Broker sinks need their extra: pip install 'fastsock[redis]' ('[nats]', '[kafka]').
  python://MODULE:CLASS?QUERY imports CLASS from MODULE and uses CLASS.from_url(URL): a
  class with write(messages), flush(timeout) and close(), or their coroutines (it then
  runs on an asyncio event loop); see fastsock.pipeline.

metrics (--metrics [HOST:]PORT):
  GET http://HOST:PORT/metrics answers the counters (the server's, summed over the prefork
  workers, the ring's and the sink pipeline's) in Prometheus's text format 0.0.4, from a
  thread of its own, so a scrape never holds up receiving. Per scrape:
  {constants.METRICS_REQUEST_TIMEOUT:g} s in all, {constants.METRICS_MAX_REQUEST_BYTES:,}
  bytes of request. HOST, unless given: {constants.METRICS_DEFAULT_HOST}. The README lists
  the metric names.

counters (stderr, every --stats-interval seconds):
  rates, messages received and written, connections, drops (streams: messages dropped,
  bytes discarded, lines or frames over the limits, connections closed for their PROXY
  header or their TLS handshake; datagrams: ring full, truncated, kernel),
  backpressure (seconds the receive loops waited for this process to take messages), the
  sink (batches delivered, retries, errors, messages undelivered) and the messages queued.
"""


def add_serve_arguments(parser):
    parser.set_defaults(run=run_serve)
    parser.add_argument(
        "url",
        metavar="URL",
        help="tcp://HOST:PORT, udp://HOST:PORT (IPv6: tcp://[::1]:9000), unix:///PATH or "
        "unixgram:///PATH; port 0 picks a free port",
    )
    parser.add_argument(
        "--framing",
        choices=list(FRAMING_LIMITS),
        help="streams: lines (default), length (4-byte big-endian prefix), raw chunks, "
        "octets (RFC 6587 octet counting: MSG-LEN SP MSG) or syslog (octets if a connection's "
        "first byte is a digit, else lines, as rsyslog; also accepted for udp://, where "
        "each datagram is one message)",
    )
    parser.add_argument(
        "--mode",
        choices=["threaded", "prefork"],
        default="threaded",
        help="threaded (default): one process; prefork: --workers processes receive into "
        "one shared ring (tcp://, unix://, udp://)",
    )
    parser.add_argument(
        "--workers", type=positive_int, help=f"prefork workers (default {DEFAULT_WORKERS})"
    )
    limits = parser.add_argument_group("limits")
    limits.add_argument(
        "--max-line",
        type=positive_int,
        metavar="BYTES",
        help=f"longest line (default {constants.MAX_LINE_LENGTH}); longer closes that connection "
        f"(--framing {framings_limited_by('max_line')})",
    )
    limits.add_argument(
        "--max-frame",
        type=positive_int,
        metavar="BYTES",
        help=f"largest length-prefixed or octet-counted frame (default "
        f"{constants.MAX_FRAME_SIZE}; --framing {framings_limited_by('max_frame')})",
    )
    limits.add_argument(
        "--idle-timeout",
        type=positive_float,
        metavar="SECONDS",
        help=f"close a stream connection silent for this long (default {constants.IDLE_TIMEOUT:g})",
    )
    limits.add_argument(
        "--max-connections",
        type=positive_int,
        metavar="N",
        help="most stream connections received at once, per process (default: the "
        "file-descriptor limit, less a reserve); "
        "then the connection silent longest is evicted for a new one if it has been silent "
        "--evict-idle-after seconds, or the new one is refused",
    )
    limits.add_argument(
        "--evict-idle-after",
        type=positive_float,
        metavar="SECONDS",
        help=f"silence after which a connection may be evicted for a new one when the server "
        f"is full (default {constants.EVICT_IDLE_AFTER:g})",
    )
    limits.add_argument(
        "--max-partial-bytes",
        type=positive_int,
        metavar="BYTES",
        help="incomplete lines or frames all connections of a process may hold together; "
        f"above it the largest holder is closed (default {constants.MAX_PARTIAL_BYTES})",
    )
    limits.add_argument(
        "--max-datagram",
        type=positive_int,
        metavar="BYTES",
        help=f"datagrams: longest delivered, longer ones are counted as truncated "
        f"(default {constants.DATAGRAM_MAX_SIZE})",
    )
    limits.add_argument(
        "--drain-timeout",
        type=_seconds,
        metavar="SECONDS",
        help="on SIGINT/SIGTERM, how long the connections (or the datagram socket) may still "
        "hand over what was sent before the stop; what is left is counted "
        f"(default {constants.SHUTDOWN_DRAIN_TIMEOUT:g}; 0: count at once)",
    )
    proxied = parser.add_argument_group("PROXY protocol")
    proxied.add_argument(
        "--proxy-protocol",
        action="store_true",
        help="streams: each connection begins with a PROXY protocol header (v1 or v2, "
        "HAProxy's send-proxy/send-proxy-v2) naming the client, which becomes its peer",
    )
    proxied.add_argument(
        "--proxy-trusted",
        type=proxy_networks,
        metavar="CIDR,...",
        help="with --proxy-protocol, the networks that may send a header (default "
        f"{','.join(constants.PROXY_TRUSTED)}); a connection from elsewhere is closed",
    )
    secured = parser.add_argument_group("TLS")
    secured.add_argument(
        "--tls-cert",
        metavar="FILE",
        help="streams: terminate TLS with this certificate chain (PEM); needs --tls-key",
    )
    secured.add_argument("--tls-key", metavar="FILE", help="the private key of --tls-cert (PEM)")
    secured.add_argument(
        "--tls-client-ca",
        metavar="FILE",
        help="require a client certificate signed by a CA in FILE (PEM): mutual TLS",
    )
    output = parser.add_argument_group("output")
    output.add_argument(
        "--output",
        metavar="FILE",
        help="append the messages to FILE (default: stdout; - is stdout); SIGHUP reopens "
        "FILE, for logrotate's postrotate kill -HUP",
    )
    output.add_argument(
        "--sink",
        metavar="URL",
        help="where the messages go instead of --output: - (stdout), a path or file:///PATH, "
        "redis://HOST:PORT/..., nats://HOST:PORT/..., kafka://HOST:PORT/..., or "
        "python://MODULE:CLASS?... (a sink class of your own); see 'sinks' below",
    )
    output.add_argument(
        "--format",
        choices=["raw", "jsonl"],
        default="raw",
        help="file sinks: raw (default): each message and a newline (raw framing: the bytes "
        "as received); jsonl: one JSON object per message with time, peer and the payload "
        "as text or base64",
    )
    output.add_argument(
        "--sink-timeout",
        type=_seconds,
        default=constants.PIPELINE_STOP_TIMEOUT,
        metavar="SECONDS",
        help="on SIGINT/SIGTERM, how long delivering what was received may take once the "
        "connections have handed it over; what is left then is counted as undelivered "
        f"(default {constants.PIPELINE_STOP_TIMEOUT:g})",
    )
    output.add_argument(
        "--stats-interval",
        type=_seconds,
        default=5.0,
        metavar="SECONDS",
        help="seconds between two counter lines on stderr (default 5; 0: none)",
    )
    parser.add_argument(
        "--metrics",
        type=metrics_address,
        metavar="[HOST:]PORT",
        help="serve the counters for Prometheus at http://HOST:PORT/metrics (HOST: "
        f"{constants.METRICS_DEFAULT_HOST} unless given; port 0 picks a free port)",
    )
    parser.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a host that is not a loopback address (0.0.0.0, a LAN address...): the "
        "server then receives from anyone who can reach it",
    )


def _seconds(text):
    value = number(text, float)
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, not {text!r}")
    return value


def proxy_networks(text):
    """``CIDR,...`` of --proxy-trusted: a tuple of networks, checked."""
    networks = tuple(part.strip() for part in text.split(",") if part.strip())
    if not networks:
        raise argparse.ArgumentTypeError("names no network: say CIDR,... (e.g. 10.0.0.0/8)")
    try:
        proxy.trusted_networks(networks)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return networks


def metrics_address(text):
    """``PORT`` or ``HOST:PORT`` (IPv6: ``[::1]:9108``) of --metrics, resolved."""
    if text.isdigit():
        text = f"{constants.METRICS_DEFAULT_HOST}:{text}"
    try:
        parts = urllib.parse.urlsplit("//" + text)
        port = parts.port
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bad address {text!r}: {exc}") from None
    if parts.path or parts.query or parts.fragment or parts.username is not None:
        raise argparse.ArgumentTypeError(f"{text!r} is not [HOST:]PORT")
    if not parts.hostname or port is None:
        raise argparse.ArgumentTypeError(f"{text!r} needs a port: [HOST:]PORT")
    try:
        sockaddr = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)[0][4]
    except socket.gaierror as exc:
        raise argparse.ArgumentTypeError(
            f"cannot resolve {parts.hostname!r}: {exc.strerror}"
        ) from None
    return sockaddr[:2]


class Endpoint:
    """Where ``fastsock serve`` receives: a parsed and resolved URL."""

    def __init__(self, scheme, address, family):
        self.scheme = scheme
        self.address = address
        self.family = family

    @property
    def datagram(self):
        return self.scheme in ("udp", "unixgram")

    def url(self, address=None):
        address = self.address if address is None else address
        if self.family == socket.AF_UNIX:
            return f"{self.scheme}://{address}"
        return f"{self.scheme}://{format_address(address)}"


def parse_endpoint(text, allow_remote):
    """The Endpoint of a URL; UsageError for a bad one or a non-loopback host without
    ``allow_remote``."""
    scheme, separator, rest = text.partition("://")
    scheme = scheme.lower()
    if not separator or scheme not in SCHEMES:
        raise UsageError(
            SERVE,
            f"{text!r} is not an endpoint: say tcp://HOST:PORT, "
            "udp://HOST:PORT, unix:///PATH or unixgram:///PATH",
        )
    if scheme in ("unix", "unixgram"):
        if not rest:
            raise UsageError(SERVE, f"{text!r} names no socket path")
        return Endpoint(scheme, rest, socket.AF_UNIX)
    try:
        parts = urllib.parse.urlsplit("//" + rest)
        port = parts.port
    except ValueError as exc:
        raise UsageError(SERVE, f"bad address in {text!r}: {exc}") from None
    if parts.path or parts.query or parts.fragment or parts.username is not None:
        raise UsageError(SERVE, f"{text!r}: only HOST:PORT may follow {scheme}://")
    if not parts.hostname or port is None:
        raise UsageError(SERVE, f"{text!r} needs a host and a port: HOST:PORT")
    kind = socket.SOCK_DGRAM if scheme == "udp" else socket.SOCK_STREAM
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(parts.hostname, port, type=kind)[0]
    except socket.gaierror as exc:
        raise UsageError(SERVE, f"cannot resolve {parts.hostname!r}: {exc.strerror}") from None
    host = sockaddr[0]
    if not ipaddress.ip_address(host.partition("%")[0]).is_loopback and not allow_remote:
        raise UsageError(
            SERVE,
            f"{host} is not a loopback address; add --allow-remote to receive from other hosts",
        )
    return Endpoint(scheme, (host, port), family)


def framings_limited_by(limit):
    """The framings that ``limit`` bounds, in words: "length, octets and syslog"."""
    *first, last = [name for name, limits in FRAMING_LIMITS.items() if limit in limits]
    return f"{', '.join(first)} and {last}" if first else last


def check_serve_options(options, endpoint):
    """Options that conflict with the endpoint or with each other: UsageError."""
    given = {name for name in STREAM_ONLY if getattr(options, name) is not None}
    if options.framing == "syslog":
        # Syslog over UDP (RFC 5426) is a message per datagram, as every datagram is here.
        given.discard("framing")
    if endpoint.datagram and given:
        flag = "--" + sorted(given)[0].replace("_", "-")
        raise UsageError(
            SERVE, f"{flag} applies to stream endpoints (tcp://, unix://), not {endpoint.scheme}://"
        )
    if not endpoint.datagram and options.max_datagram is not None:
        raise UsageError(SERVE, "--max-datagram applies to udp:// and unixgram:// endpoints")
    framing = options.framing or DEFAULT_FRAMING
    for limit in ("max_line", "max_frame"):
        if getattr(options, limit) is not None and limit not in FRAMING_LIMITS[framing]:
            flag = "--" + limit.replace("_", "-")
            raise UsageError(SERVE, f"{flag} applies to --framing {framings_limited_by(limit)}")
    if endpoint.datagram and options.proxy_protocol:
        raise UsageError(SERVE, "--proxy-protocol applies to stream endpoints (tcp://, unix://)")
    if options.proxy_trusted is not None and not options.proxy_protocol:
        raise UsageError(SERVE, "--proxy-trusted applies with --proxy-protocol")
    if (options.tls_cert is None) != (options.tls_key is None):
        raise UsageError(SERVE, "--tls-cert and --tls-key go together")
    if options.tls_client_ca is not None and options.tls_cert is None:
        raise UsageError(SERVE, "--tls-client-ca applies with --tls-cert and --tls-key")
    if endpoint.datagram and options.tls_cert is not None:
        raise UsageError(SERVE, "--tls-cert applies to stream endpoints (tcp://, unix://)")
    if options.workers is not None and options.mode != "prefork":
        raise UsageError(SERVE, "--workers applies to --mode prefork")
    if options.mode == "prefork" and endpoint.scheme == "unixgram":
        raise UsageError(
            SERVE,
            "--mode prefork serves tcp://, unix:// and udp://, not "
            "unixgram:// (its workers cannot each have a socket of their own)",
        )


def receive_options(options, endpoint):
    """The ReceiveOptions of the command line's limits (a UsageError if one is refused)."""
    limits = {}
    if options.drain_timeout is not None:
        limits["drain_timeout"] = options.drain_timeout
    if endpoint.datagram:
        if options.max_datagram is not None:
            limits["max_datagram"] = options.max_datagram
    else:
        limits["framing"] = options.framing or DEFAULT_FRAMING
        for name in STREAM_LIMITS:
            if getattr(options, name) is not None:
                limits[name] = getattr(options, name)
        limits["proxy_protocol"] = options.proxy_protocol
        if options.proxy_trusted is not None:
            limits["proxy_trusted"] = options.proxy_trusted
        if options.tls_cert is not None:
            limits["ssl_context"] = tls_context(options)
    try:
        return fastsock.ReceiveOptions(**limits)
    except (TypeError, ValueError) as exc:
        raise UsageError(SERVE, str(exc)) from None


def tls_context(options):
    """The server's SSLContext of --tls-cert, --tls-key and --tls-client-ca (a UsageError
    for a file that cannot be read or a key that does not match)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # A sender that never reads leaves tickets unread: its close would reset the connection.
    context.num_tickets = 0
    # ssl.SSLError is an OSError: it is caught first.
    try:
        context.load_cert_chain(options.tls_cert, options.tls_key)
    except ssl.SSLError as exc:
        raise UsageError(
            SERVE, f"--tls-cert/--tls-key: not a certificate and its key ({exc.reason})"
        ) from None
    except OSError as exc:
        raise UsageError(SERVE, f"--tls-cert/--tls-key: {exc.strerror or exc}") from None
    if options.tls_client_ca is not None:
        try:
            context.load_verify_locations(options.tls_client_ca)
        except ssl.SSLError as exc:
            raise UsageError(SERVE, f"--tls-client-ca: no CA certificate ({exc.reason})") from None
        except OSError as exc:
            raise UsageError(SERVE, f"--tls-client-ca: {exc.strerror or exc}") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


# -- fastsock serve: servers -----------------------------------------------------------------

_log = logging.getLogger("fastsock")
_errors = RateLimitedLogger(_log, constants.ERROR_LOG_INTERVAL)


class ServeMixIn:
    """What ``fastsock serve`` adds to fastsock's servers, here or in a prefork worker: one
    line per failed connection instead of a traceback."""

    def handle_error(self, request, client_address):
        error = sys.exc_info()[1]
        if isinstance(error, fastsock.FramingError):
            # The receive handler has logged it already, rate-limited.
            return
        peer = format_address(client_address) or "a peer"
        _errors.warning(type(error).__name__, "connection from %s closed: %s", peer, error)


_SERVER_CLASSES = {
    "tcp": fastsock.ThreadingTCPServer,
    "unix": fastsock.ThreadingUnixStreamServer,
    "udp": fastsock.UDPServer,
    "unixgram": fastsock.UnixDatagramServer,
}


class Receiver:
    """A server receiving into the ring, in this process (threaded) or in forked workers
    (prefork); this process consumes."""

    def __init__(self, endpoint, handler):
        self.endpoint = endpoint
        self.closed = False
        base = _SERVER_CLASSES[endpoint.scheme]
        self.server_class = type(
            f"Serve{base.__name__}", (ServeMixIn, base), {"allow_reuse_address": True}
        )
        self.handler = handler
        self.server_options = {}
        if endpoint.family == socket.AF_INET6:
            self.server_options["address_family"] = socket.AF_INET6


class ThreadedReceiver(Receiver):
    """serve_forever() runs in a thread of this process."""

    def __init__(self, endpoint, handler):
        super().__init__(endpoint, handler)
        self.server = self.server_class(endpoint.address, self.handler, **self.server_options)
        self.address = self.server.server_address
        self.counters = self.server
        # Names the senders of stream messages (connection_address()).
        self.peers = self.server
        self.failure = None
        self.thread = threading.Thread(target=self._serve, name="fastsock-serve", daemon=True)

    def _serve(self):
        try:
            self.server.serve_forever(poll_interval=constants.RECEIVE_CHECK_INTERVAL)
        except BaseException as exc:
            self.failure = exc

    def start(self):
        self.thread.start()

    def stats(self):
        return self.server.stats()

    def check(self):
        if self.failure is not None:
            raise CommandError(SERVE, f"receiving failed: {self.failure}")

    def peer_subject(self, connection_id):
        return self.server.receive_path.peer_subject(connection_id)

    def close(self):
        """Stop accepting, stop every loop gracefully (each hands over what its peer sent
        before the stop, within the drain timeout) and wait for their threads; the ring
        must be consumed meanwhile.  Idempotent."""
        if self.closed:
            return
        self.closed = True
        if self.thread.is_alive():
            self.server.shutdown()
        self.server.server_close()


class PreforkReceiver(Receiver):
    """``workers`` forked processes receive into the shared ring; this one supervises."""

    def __init__(self, endpoint, handler, workers):
        super().__init__(endpoint, handler)
        self.prefork = fastsock.PreforkServer(
            endpoint.address,
            self.handler,
            workers=workers,
            server_class=self.server_class,
            # A Unix socket path is bound once: the workers share the listening socket.
            reuse_port=endpoint.scheme != "unix",
            **self.server_options,
        )
        self.address = self.prefork.server_address
        # What the metrics thread reads: the same shared counters as self.stats(), without
        # the reaping that PreforkServer.stats() does, which only the serving loop may do.
        self.counters = self.prefork.server
        # The workers accepted the connections: their peers are known only there.
        self.peers = None

    def start(self):
        self.prefork.start()

    def stats(self):
        return self.prefork.stats()

    def check(self):
        self.prefork.reap()
        if not self.prefork.workers:
            raise CommandError(SERVE, "every prefork worker exited")

    def peer_subject(self, connection_id):
        """Known only in the worker that accepted the connection, as its peer is."""
        return None

    def close(self):
        """Stop the workers gracefully, as ThreadedReceiver.close() does in each, and reap
        them; the ring must be consumed meanwhile.  Idempotent."""
        self.prefork.server_close()


# -- fastsock serve: output ------------------------------------------------------------------


def open_output(options, endpoint):
    """The sink of --sink URL or --output FILE (default stdout): UsageError for a URL that
    names no sink, CommandError for one that cannot be opened."""
    if options.sink is not None and options.output is not None:
        raise UsageError(SERVE, "--sink and --output both say where messages go: give one")
    raw_stream = not endpoint.datagram and (options.framing or DEFAULT_FRAMING) == "raw"
    # A raw stream's chunks are cut wherever recv() returned: copy the bytes unchanged.
    file_options = {"format": options.format, "separator": b"" if raw_stream else b"\n"}
    name = options.output if options.sink is None else options.sink
    try:
        if options.sink is None:
            return pipeline.FileSink(options.output, **file_options)
        return pipeline.open_sink(options.sink, **file_options)
    except ValueError as exc:
        raise UsageError(SERVE, str(exc)) from None
    except ImportError as exc:
        raise CommandError(SERVE, str(exc)) from None
    except OSError as exc:
        raise CommandError(SERVE, f"cannot open {name}: {exc.strerror or exc}") from None


def stats_line(stats, ring_stats, delivery, previous, seconds):
    """One line of counters (``delivery``: the pipeline's ``PipelineStats``); with
    ``previous`` (the counters ``seconds`` ago), rates too."""
    written = delivery.messages_delivered
    datagram = isinstance(stats, fastsock.DatagramStats)
    received = stats.datagrams_received if datagram else stats.messages_received
    parts = []
    if previous is not None and seconds > 0:
        before = previous.datagrams_received if datagram else previous.messages_received
        parts.append(
            f"{(received - before) / seconds:,.0f} msg/s "
            f"{(stats.bytes_received - previous.bytes_received) / seconds / 1e6:,.2f} MB/s"
        )
    noun = "datagrams" if datagram else "messages"
    parts.append(f"received {received:,} {noun}, written {written:,}")
    if datagram:
        parts.append(
            f"dropped {stats.datagrams_dropped:,} (ring full {stats.dropped_queue_full:,}, "
            f"truncated {stats.truncated:,}, kernel {stats.kernel_drops:,}), "
            f"unread {stats.datagrams_unread:,}"
        )
    else:
        parts.append(
            f"connections {stats.connections_active:,} open, {stats.connections_opened:,} "
            f"opened, {stats.connections_refused:,} refused, {stats.idle_timeouts:,} idle "
            f"timeouts, {stats.idle_evictions + stats.memory_evictions:,} evicted"
        )
        parts.append(
            f"dropped {stats.messages_dropped:,}, discarded {stats.bytes_discarded:,} B, "
            f"unread {stats.bytes_unread:,} B, over limits {stats.framing_errors:,}, "
            f"proxy headers {stats.proxy_header_errors:,}, "
            f"tls handshakes {stats.tls_handshake_errors:,}"
        )
        parts.append(f"backpressure {stats.paused_seconds:,.2f} s")
    parts.append(
        f"sink {delivery.batches_delivered:,} batches, {delivery.retries:,} retries, "
        f"{delivery.sink_errors:,} errors, {delivery.undelivered:,} undelivered"
    )
    parts.append(f"queued {ring_stats.messages_queued:,}")
    return " | ".join(parts)


# -- fastsock serve: the command -------------------------------------------------------------


class StopRequest:
    """A signal handler that only notes the signal, and tells ``then`` (the pipeline, which
    then stops retrying a sink that is down): the serving loop acts on it."""

    def __init__(self):
        self.signal_name = None
        self.then = None

    def __call__(self, signum, frame):
        self.signal_name = signal.Signals(signum).name
        if self.then is not None:
            self.then()


class ReopenRequest:
    """The SIGHUP handler: it only notes the request; the writer reopens its file between
    two batches, so that every message is whole in the old file or in the new one."""

    def __init__(self):
        self.requested = False

    def __call__(self, signum, frame):
        self.requested = True


def say(text):
    print(f"{SERVE}: {text}", file=sys.stderr, flush=True)


class StderrLines(logging.Handler):
    """fastsock's own warnings (accept back-off, failed connections) as lines on stderr."""

    def emit(self, record):
        print(f"fastsock serve: {record.getMessage()}", file=sys.stderr, flush=True)


_stderr_lines = StderrLines()


def run_serve(options):
    # First of all: a SIGHUP from here on is noted, never fatal, and the file is reopened
    # once serving starts (logrotate may rename it while the server starts).
    reopen = ReopenRequest()
    previous_handlers = {signal.SIGHUP: signal.signal(signal.SIGHUP, reopen)}
    try:
        endpoint = parse_endpoint(options.url, options.allow_remote)
        check_serve_options(options, endpoint)
        # From here on a signal is only noted: one that comes while the server starts stops
        # it as soon as it is up, with its counters printed, instead of killing it half-made.
        stop = StopRequest()
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous_handlers[signum] = signal.signal(signum, stop)
        return start_and_serve(options, endpoint, stop, reopen)
    finally:
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)


def start_and_serve(options, endpoint, stop, reopen):
    limits = receive_options(options, endpoint)
    largest = limits.max_datagram if endpoint.datagram else limits.largest_message
    ring = fastsock.RingQueue(max_bytes=max(constants.RING_MAX_BYTES, largest))
    handler = fastsock.receiver(ring, limits)
    sink = open_output(options, endpoint)
    if _stderr_lines not in _log.handlers:
        _log.addHandler(_stderr_lines)
    try:
        if options.mode == "prefork":
            receiver = PreforkReceiver(endpoint, handler, options.workers or DEFAULT_WORKERS)
        else:
            receiver = ThreadedReceiver(endpoint, handler)
    except OSError as exc:
        close_sink(sink)
        # A Unix path held by a live server or by another kind of file is refused here.
        raise CommandError(SERVE, f"cannot bind {endpoint.url()}: {exc.strerror or exc}") from None
    except BaseException:
        close_sink(sink)
        raise
    # Taken while the server is live, when the file at the path can only be its own.
    bound_file = os.lstat(endpoint.address) if endpoint.family == socket.AF_UNIX else None
    try:
        return Session(options, endpoint, ring, receiver, sink, stop, reopen).run()
    finally:
        if bound_file is not None:
            _unlink_own_socket_file(endpoint.address, bound_file)


def close_sink(sink):
    if pipeline.is_async_sink(sink):
        asyncio.run(sink.close())
    else:
        sink.close()


def sink_name(sink):
    return getattr(sink, "name", type(sink).__name__)


class Session:
    """A running ``fastsock serve``: deliver, report, and stop on a signal.  The pipeline
    owns the sink: it closes it when it finishes or aborts."""

    def __init__(self, options, endpoint, ring, receiver, sink, stop, reopen):
        self.options = options
        self.endpoint = endpoint
        self.ring = ring
        self.receiver = receiver
        self.sink = sink
        self.is_async = pipeline.is_async_sink(sink)
        kind = pipeline.AsyncPipeline if self.is_async else pipeline.Pipeline
        self.pipeline = kind(
            ring,
            sink,
            server=receiver.peers,
            datagram=endpoint.datagram,
            while_unavailable=self.report_when_due,
        )
        self.reopens = isinstance(sink, pipeline.FileSink) and not sink.is_stdout
        if options.tls_client_ca is not None and isinstance(sink, pipeline.FileSink):
            sink.subject_of = receiver.peer_subject
        self.stop = stop
        drain = options.drain_timeout
        # The receivers may take the drain timeout to hand over what was sent, and the
        # pipeline the sink timeout beyond that to deliver it.
        self.drain_timeout = constants.SHUTDOWN_DRAIN_TIMEOUT if drain is None else drain
        stop.then = self.stop_requested
        if stop.signal_name is not None:
            self.stop_requested()
        self.reopen = reopen
        self.exporter = None
        interval = options.stats_interval
        self.previous, self.previous_at = None, time.monotonic()
        self.next_report = self.previous_at + interval

    def announce(self):
        framing = "datagrams" if self.endpoint.datagram else self.options.framing or DEFAULT_FRAMING
        mode = self.options.mode
        if mode == "prefork":
            mode += f", {self.options.workers or DEFAULT_WORKERS} workers"
        written = self.options.format if isinstance(self.sink, pipeline.FileSink) else "messages"
        print(
            f"fastsock serve: receiving {framing} on {self.endpoint.url(self.receiver.address)} "
            f"({mode}), writing {written} to {sink_name(self.sink)}; SIGINT or SIGTERM "
            "stops" + (", SIGHUP reopens the file" if self.reopens else ""),
            file=sys.stderr,
            flush=True,
        )
        if self.endpoint.family != socket.AF_UNIX:
            host = self.receiver.address[0]
            if not ipaddress.ip_address(host.partition("%")[0]).is_loopback:
                print(
                    f"fastsock serve: warning: {host} is not loopback: anyone who can reach "
                    "it can send to this server",
                    file=sys.stderr,
                    flush=True,
                )
        if self.exporter is not None:
            say(f"metrics at {self.exporter.url}")

    def start_metrics(self):
        """Serve the counters from a thread of this process: after the fork of the prefork
        workers, which must not inherit it."""
        address = self.options.metrics
        if address is None:
            return
        try:
            self.exporter = metrics.MetricsHTTPServer(
                address, self.receiver.counters, self.ring, pipeline=self.pipeline
            )
        except OSError as exc:
            raise CommandError(
                SERVE, f"cannot serve metrics on {format_address(address)}: {exc.strerror or exc}"
            ) from None
        self.exporter.start()

    def run(self):
        try:
            # The threads and prefork workers started here inherit SIGHUP blocked, so that
            # only this thread takes it (the workers never: only this process writes); one
            # sent meanwhile waits, and is noted when it is unblocked.
            old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
            try:
                self.receiver.start()
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            self.start_metrics()
            self.announce()
            self.previous = self.receiver.stats()
            if self.is_async:
                asyncio.run(self.serve_async())
            else:
                self.serve()
        except BrokenPipeError:
            if getattr(self.sink, "is_stdout", False):
                # Nothing can reach a closed stdout: do not let exit-time flushing fail.
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            delivered = self.pipeline.stats.messages_delivered
            raise CommandError(
                SERVE, f"{sink_name(self.sink)} was closed: stopped after {delivered:,} messages"
            ) from None
        except (CommandError, KeyboardInterrupt):
            raise
        except Exception as exc:
            raise CommandError(SERVE, f"the sink failed: {type(exc).__name__}: {exc}") from None
        finally:
            self.receiver.close()
            if self.exporter is not None:
                self.exporter.close()
        delivery = self.pipeline.stats
        print(
            f"fastsock serve: stopped by {self.stop.signal_name}: "
            + stats_line(self.receiver.stats(), self.ring.stats, delivery, None, 0),
            file=sys.stderr,
            flush=True,
        )
        if delivery.undelivered:
            say(
                f"{delivery.undelivered:,} messages received were not delivered to "
                f"{sink_name(self.sink)} by the deadline (--sink-timeout)"
                + (f"; last error: {self.pipeline.last_error}" if self.pipeline.last_error else "")
            )
            return 1
        return 0

    def between_batches(self):
        """SIGHUP's reopen (only here: a file gets whole batches), the receiver's health,
        and the counters when they are due."""
        if self.reopen.requested:
            self.reopen_output()
        self.receiver.check()
        self.report_when_due()

    def report_when_due(self):
        """The counters, when they are due: between batches, and between the attempts at a
        batch while the sink is unavailable."""
        interval = self.options.stats_interval
        now = time.monotonic()
        if interval and now >= self.next_report:
            stats = self.receiver.stats()
            line = stats_line(
                stats, self.ring.stats, self.pipeline.stats, self.previous, now - self.previous_at
            )
            print(f"fastsock serve: {line}", file=sys.stderr, flush=True)
            self.previous, self.previous_at = stats, now
            self.next_report = now + interval

    def serve(self):
        try:
            while self.stop.signal_name is None:
                self.pipeline.deliver(LOOP_WAIT_SECONDS)
                self.between_batches()
            self.pipeline.deliver_while(self.close_receiver)
            self.pipeline.stop(self.options.sink_timeout)
            self.pipeline.finish()
        except BaseException:
            self.pipeline.abort()
            raise

    async def serve_async(self):
        """serve(), on an event loop: signals come through the loop."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self.stop, signum, None)
        loop.add_signal_handler(signal.SIGHUP, self.reopen, signal.SIGHUP, None)
        try:
            while self.stop.signal_name is None:
                await self.pipeline.deliver(LOOP_WAIT_SECONDS)
                self.between_batches()
            await self.pipeline.deliver_while(self.close_receiver)
            self.pipeline.stop(self.options.sink_timeout)
            await self.pipeline.finish()
        except BaseException:
            await self.pipeline.abort()
            raise
        finally:
            # Removing a loop's handler resets the signal to its default: note it instead,
            # until run_serve() puts the handlers from before back.
            for signum, handler in (
                (signal.SIGINT, self.stop),
                (signal.SIGTERM, self.stop),
                (signal.SIGHUP, self.reopen),
            ):
                loop.remove_signal_handler(signum)
                signal.signal(signum, handler)

    def reopen_output(self):
        """SIGHUP: write what follows to a new file at the output's path."""
        self.reopen.requested = False
        if not self.reopens:
            say(f"SIGHUP ignored: writing to {sink_name(self.sink)}, no file to reopen")
            return
        try:
            self.sink.reopen()
        except OSError as exc:
            say(
                f"SIGHUP: cannot open {self.sink.path}: {exc.strerror or exc}; still writing "
                "to the file open before"
            )
            return
        say(f"SIGHUP: reopened {self.sink.path}")

    def stop_requested(self):
        """From the signal handler: only sets the pipeline's deadline."""
        self.pipeline.stop(self.drain_timeout + self.options.sink_timeout)

    def close_receiver(self):
        """Stop the receiver gracefully (its loops wait for ring room up to the drain
        timeout, while the pipeline delivers what they hand over)."""
        try:
            self.receiver.close()
        except Exception as exc:
            raise CommandError(SERVE, f"stopping failed: {exc}") from None
