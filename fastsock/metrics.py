"""fastsock's counters for Prometheus, in its text exposition format (version 0.0.4).

    from fastsock import metrics

    text = metrics.prometheus_text(server, ring)       # for an exporter of your own
    REGISTRY.register(metrics.Collector(server, ring))  # prometheus_client's registry
    exporter = metrics.MetricsHTTPServer(("127.0.0.1", 9108), server, ring)
    # ... pipeline=pipeline in each: a fastsock.pipeline pipeline's counters too
    exporter.start()                                    # GET http://127.0.0.1:9108/metrics
    ...
    exporter.close()

``server`` is a fastsock server or a ``PreforkServer`` (anything with ``stats()``), or a
``ReceiveStats``/``DatagramStats`` snapshot; ``ring`` a ``RingQueue`` or a ``RingStats``;
``pipeline`` a ``fastsock.pipeline`` pipeline or a ``PipelineStats``.
The counters live in shared memory, so a server's are summed over its prefork workers and
forked children, as ``stats()`` sums them.  Reading them takes atomic loads (and the ring's
lock for an instant): a scrape never waits for the consumer or holds up a receive loop.

The names are stable: ``STREAM_METRICS``, ``DATAGRAM_METRICS``, ``RING_METRICS`` and
``PIPELINE_METRICS`` list them, with the counter field each reports.  Counters end in
``_total``; the messages and bytes queued, the connections open, the partial bytes held and
the pipeline's lag are gauges.

Only the standard library is needed at run time: ``Collector`` imports prometheus_client
when it is collected, which only its users do.
"""

import http.server
import logging
import selectors
import socket
import threading
import time
from collections import namedtuple

from . import constants
from ._protocol_errors import PROTOCOL_ERRORS
from ._ratelimit import RateLimitedLogger
from .addresses import format_address
from .stats import DatagramStats, PipelineStats, ReceiveStats, RingStats

__all__ = [
    "CONTENT_TYPE",
    "DATAGRAM_METRICS",
    "PIPELINE_METRICS",
    "RING_METRICS",
    "SCRAPES_REFUSED",
    "STREAM_METRICS",
    "Collector",
    "Metric",
    "MetricsHTTPServer",
    "prometheus_text",
    "samples",
]

_log = logging.getLogger("fastsock")
_refusals = RateLimitedLogger(_log, constants.ERROR_LOG_INTERVAL)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The Content-Type of the text exposition format, as Prometheus asks for it."""

Metric = namedtuple("Metric", "name type help field")
Metric.__doc__ = """One exported metric: its name, "counter" or "gauge", its HELP text and
the attribute of the stats snapshot that holds its value."""


def _counter(name, field, help):
    return Metric(f"fastsock_{name}_total", "counter", help, field)


def _gauge(name, field, help):
    return Metric(f"fastsock_{name}", "gauge", help, field)


STREAM_METRICS = (
    _counter("connections_opened", "connections_opened", "Stream connections accepted."),
    _counter("connections_closed", "connections_closed", "Stream connections closed."),
    _gauge("connections_active", "connections_active", "Stream connections open now."),
    _counter("connections_refused", "connections_refused", "Connections refused: max_connections."),
    _counter("received_bytes", "bytes_received", "Bytes read from stream connections."),
    _counter("received_messages", "messages_received", "Messages framed and queued."),
    _counter(
        "dropped_messages", "messages_dropped", "Framed messages dropped: ring closed or drained."
    ),
    _counter("discarded_bytes", "bytes_discarded", "Bytes of lines or frames cut short."),
    _counter("unread_bytes", "bytes_unread", "Bytes left unread in the kernel, counted."),
    *(_counter(kind.counter, kind.counter, kind.metric_help) for kind in PROTOCOL_ERRORS),
    _counter(
        "proxy_header_errors",
        "proxy_header_errors",
        "Connections closed for a bad, late or untrusted PROXY header.",
    ),
    _counter(
        "tls_handshake_errors",
        "tls_handshake_errors",
        "Connections closed for a failed or late TLS handshake.",
    ),
    _counter("connection_resets", "resets", "Connections reset by their peer."),
    _counter("idle_timeouts", "idle_timeouts", "Connections closed for silence."),
    _counter("message_timeouts", "message_timeouts", "Connections closed for a slow message."),
    _counter("idle_evictions", "idle_evictions", "Idle connections evicted for a new one."),
    _counter("memory_evictions", "memory_evictions", "Connections evicted over max_partial_bytes."),
    _gauge("partial_bytes", "partial_bytes", "Bytes of incomplete messages held now."),
    _counter("receive_pauses", "pauses", "Times the receive loops waited for ring room."),
    _counter(
        "receive_paused_seconds", "paused_seconds", "Seconds the receive loops waited for room."
    ),
)
"""The metrics of a stream server (``ReceiveStats``)."""

DATAGRAM_METRICS = (
    _counter("received_datagrams", "datagrams_received", "Datagrams received and queued."),
    _counter("received_bytes", "bytes_received", "Payload bytes of the datagrams received."),
    _counter("ring_full_dropped_datagrams", "dropped_queue_full", "Datagrams dropped: ring full."),
    _counter(
        "ring_full_dropped_bytes",
        "dropped_queue_full_bytes",
        "Payload bytes of the datagrams dropped for a full ring.",
    ),
    _counter("truncated_datagrams", "truncated", "Datagrams over max_datagram, dropped."),
    _counter("kernel_dropped_datagrams", "kernel_drops", "Datagrams the kernel dropped."),
    _counter("unread_datagrams", "datagrams_unread", "Datagrams left at a stop's deadline."),
    _counter("receive_calls", "receive_calls", "recvmmsg() calls that returned datagrams."),
)
"""The metrics of a datagram server (``DatagramStats``)."""

RING_METRICS = (
    _counter("ring_put_messages", "put_messages", "Messages put into the ring."),
    _counter("ring_put_bytes", "put_bytes", "Payload bytes put into the ring."),
    _counter("ring_got_messages", "got_messages", "Messages taken from the ring."),
    _counter("ring_got_bytes", "got_bytes", "Payload bytes taken from the ring."),
    _counter("ring_dropped_messages", "dropped_messages", "Messages the full ring refused."),
    _counter("ring_dropped_bytes", "dropped_bytes", "Payload bytes the full ring refused."),
    _counter("ring_full_events", "full_events", "Times a producer found the ring full."),
    _counter("ring_paused_seconds", "paused_seconds", "Seconds producers waited for room."),
    _counter("ring_producer_deaths", "producer_deaths", "Producers that died holding the ring."),
    _gauge("ring_queued_messages", "messages_queued", "Messages queued now."),
    _gauge("ring_queued_bytes", "bytes_queued", "Payload bytes queued now."),
)
"""The metrics of a ring (``RingStats``)."""

PIPELINE_METRICS = (
    _counter("pipeline_batches_delivered", "batches_delivered", "Batches the sink confirmed."),
    _counter("pipeline_messages_delivered", "messages_delivered", "Messages the sink confirmed."),
    _counter("pipeline_bytes_delivered", "bytes_delivered", "Payload bytes the sink confirmed."),
    _counter("pipeline_retries", "retries", "Batches written again after the sink refused them."),
    _counter("pipeline_sink_errors", "sink_errors", "Failed writes and flushes of the sink."),
    _counter(
        "pipeline_undelivered_messages",
        "undelivered",
        "Messages received that the sink never confirmed: stop deadline or fatal sink error.",
    ),
    _counter(
        "pipeline_delivery_seconds", "delivery_seconds", "Seconds spent in confirmed sink writes."
    ),
    _gauge("pipeline_lag_messages", "lag", "Messages in the ring, not yet taken for the sink."),
)
"""The metrics of a pipeline (``PipelineStats``)."""

SCRAPES_REFUSED = _counter(
    "metrics_scrapes_refused",
    "scrapes_refused",
    "Metrics connections closed unanswered for want of room: max_waiting were waiting, "
    "or their request found no free scrape slot in time.",
)
"""The metrics server's own metric, in each of its answers (``MetricsHTTPServer``)."""


def samples(server=None, ring=None, pipeline=None):
    """``(Metric, value)`` for every metric of ``server``, ``ring`` and ``pipeline`` (any
    may be None), read now: the server's (stream or datagram) first, then the ring's, then
    the pipeline's."""
    found = []
    if server is not None:
        stats = server if isinstance(server, (ReceiveStats, DatagramStats)) else server.stats()
        table = DATAGRAM_METRICS if isinstance(stats, DatagramStats) else STREAM_METRICS
        found += [(metric, getattr(stats, metric.field)) for metric in table]
    if ring is not None:
        stats = ring if isinstance(ring, RingStats) else ring.stats
        found += [(metric, getattr(stats, metric.field)) for metric in RING_METRICS]
    if pipeline is not None:
        stats = pipeline if isinstance(pipeline, PipelineStats) else pipeline.stats
        found += [(metric, getattr(stats, metric.field)) for metric in PIPELINE_METRICS]
    return found


def prometheus_text(server=None, ring=None, pipeline=None):
    """The metrics of ``server``, ``ring`` and ``pipeline`` in the text exposition format
    0.0.4 (serve it as ``CONTENT_TYPE``): a HELP line, a TYPE line and the sample of each."""
    return _exposition(samples(server, ring, pipeline))


def _exposition(found):
    lines = []
    for metric, value in found:
        help_text = metric.help.replace("\\", "\\\\").replace("\n", "\\n")
        lines += [
            f"# HELP {metric.name} {help_text}",
            f"# TYPE {metric.name} {metric.type}",
            f"{metric.name} {value!r}",
        ]
    return "".join(line + "\n" for line in lines)


class Collector:
    """A collector for prometheus_client's registry: ``REGISTRY.register(Collector(server,
    ring, pipeline))`` exports the metrics of ``prometheus_text()``, read at each
    collection."""

    def __init__(self, server=None, ring=None, pipeline=None):
        self.server = server
        self.ring = ring
        self.pipeline = pipeline

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        for metric, value in samples(self.server, self.ring, self.pipeline):
            family = CounterMetricFamily if metric.type == "counter" else GaugeMetricFamily
            yield family(metric.name, metric.help, value=value)


class MetricsHTTPServer(http.server.ThreadingHTTPServer):
    """Serves ``prometheus_text(server, ring, pipeline)`` at ``GET /metrics`` (404
    elsewhere), from a thread of its own (``start()``) and a thread per scrape.

    Binds at construction (``OSError`` if it cannot); ``server_address`` is then the bound
    address, its port chosen when 0 was asked.

    A connection first waits, without a thread, in a waiting room (one more thread watches
    it) until its request has fully arrived: ``max_request_bytes`` of request line and
    headers at most (431 beyond), within ``request_timeout`` seconds of its accept, after
    which it is closed.  Only then does it take one of ``max_scrapes`` scrape slots, each a
    thread that answers it (again within ``request_timeout``).  So connections that stay
    silent or send slowly hold no slot, and cannot keep a real scrape from being answered.
    A request that finds every slot taken waits in the room for one, until its
    ``request_timeout`` is up.  The room holds ``max_waiting`` connections; a connection
    beyond closes the one that has waited longest without a complete request (or, if every
    one waiting has sent a request, is closed itself).  Connections closed for want of room
    (evicted, refused, or their request not given a slot in time) are counted in
    ``scrapes_refused``, exported as ``fastsock_metrics_scrapes_refused_total``, and logged,
    rate-limited.  Threads: the serving one, the room's and at most ``max_scrapes``.
    """

    daemon_threads = True

    def __init__(
        self,
        address,
        server=None,
        ring=None,
        *,
        pipeline=None,
        request_timeout=constants.METRICS_REQUEST_TIMEOUT,
        max_request_bytes=constants.METRICS_MAX_REQUEST_BYTES,
        max_scrapes=constants.METRICS_MAX_SCRAPES,
        max_waiting=constants.METRICS_MAX_WAITING,
    ):
        self.source = server
        self.ring = ring
        self.pipeline = pipeline
        self.request_timeout = request_timeout
        self.max_request_bytes = max_request_bytes
        self.max_scrapes = max_scrapes
        self.max_waiting = max_waiting
        self.scrapes_refused = 0
        """Connections closed unanswered for want of room (see the class)."""
        self._scrape_slots = threading.BoundedSemaphore(max_scrapes)
        # What the waiting room read of each request it handed to a scrape thread.
        self._arrived_requests = {}
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self._thread = None
        # Before binding: a failed bind calls server_close(), which closes it.
        self._waiting_room = _WaitingRoom(self)
        super().__init__(address, _MetricsHandler)

    @property
    def url(self):
        """``http://HOST:PORT/metrics`` of the bound address."""
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/metrics"

    def process_request(self, request, client_address):
        # In the serving thread: the waiting room takes the connection until its request
        # has arrived (see _WaitingRoom.dispatch()).
        self._waiting_room.admit(request, client_address)

    def answer_arrived(self, request, client_address, arrived):
        """A scrape slot is taken: answer the request in a thread of its own."""
        self._arrived_requests[request] = arrived
        try:
            super().process_request(request, client_address)
        except BaseException:
            del self._arrived_requests[request]
            self._scrape_slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._scrape_slots.release()
            # A request may wait in the room for this slot.
            self._waiting_room.wake()

    def refuse(self, request, client_address, reason):
        self.scrapes_refused += 1
        _refusals.warning(
            "scrapes",
            "metrics: %s; closed the connection from %s unanswered",
            reason,
            format_address(client_address),
        )
        self.shutdown_request(request)

    def start(self):
        """Serve in a daemon thread until ``close()``."""
        self._thread = threading.Thread(
            target=self.serve_forever,
            kwargs={"poll_interval": constants.RECEIVE_CHECK_INTERVAL},
            name="fastsock-metrics",
            daemon=True,
        )
        self._thread.start()

    def server_close(self):
        self._waiting_room.close()
        super().server_close()

    def close(self):
        """Stop serving and close the listening socket.  Idempotent."""
        if self._thread is not None:
            self.shutdown()
            self._thread.join()
            self._thread = None
        self.server_close()

    def __exit__(self, *args):
        self.close()


class _Visitor:
    """A connection in the waiting room: what it sent so far, and until when it may wait."""

    def __init__(self, request, client_address, deadline):
        self.request = request
        self.client_address = client_address
        self.deadline = deadline
        self.received = b""
        self.arrived = False


def _request_arrived(received, limit):
    """Whether ``received`` holds a whole request for the handler (headers and their blank
    line; a request line without a version has none), or as much as it may read."""
    if len(received) >= limit:
        return True
    line, newline, _ = received.partition(b"\n")
    if newline and len(line.split()) < 3:
        return True
    return b"\n\n" in received or b"\n\r\n" in received


class _WaitingRoom:
    """The connections of a MetricsHTTPServer whose request has not all arrived, or waits
    for a scrape slot, watched by one thread (started with the first connection)."""

    def __init__(self, server):
        self.server = server
        self.selector = selectors.DefaultSelector()
        self.wake_reader, self.wake_writer = socket.socketpair()
        self.wake_reader.setblocking(False)
        self.wake_writer.setblocking(False)
        self.selector.register(self.wake_reader, selectors.EVENT_READ)
        self.lock = threading.Lock()
        self.admitted = []  # handed over by the serving thread, not yet seen by the room's
        self.visitors = {}  # request -> _Visitor, the longest waiting first
        self.thread = None
        self.closing = False

    def admit(self, request, client_address):
        with self.lock:
            if self.closing:
                self.server.shutdown_request(request)
                return
            deadline = time.monotonic() + self.server.request_timeout
            self.admitted.append(_Visitor(request, client_address, deadline))
            if self.thread is None:
                self.thread = threading.Thread(
                    target=self.run, name="fastsock-metrics-requests", daemon=True
                )
                self.thread.start()
        self.wake()

    def wake(self):
        try:
            self.wake_writer.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # already woken, or closed

    def run(self):
        while not self.closing:
            waits = [visitor.deadline for visitor in self.visitors.values()]
            timeout = max(0.0, min(waits) - time.monotonic()) if waits else None
            for key, _ in self.selector.select(timeout):
                if key.fileobj is self.wake_reader:
                    self.drain_wake_ups()
                else:
                    self.read(key.data)
            with self.lock:
                admitted, self.admitted = self.admitted, []
            for visitor in admitted:
                self.seat(visitor)
            self.dispatch()
            self.expire()

    def drain_wake_ups(self):
        try:
            while self.wake_reader.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def seat(self, visitor):
        if len(self.visitors) >= self.server.max_waiting:
            silent = next((other for other in self.visitors.values() if not other.arrived), None)
            if silent is None:
                self.server.refuse(
                    visitor.request,
                    visitor.client_address,
                    f"{len(self.visitors)} requests wait for a scrape slot",
                )
                return
            self.leave(silent)
            self.server.refuse(
                silent.request,
                silent.client_address,
                f"{self.server.max_waiting} connections were waiting, this one the longest "
                "without a request",
            )
        visitor.request.setblocking(False)
        self.visitors[visitor.request] = visitor
        self.selector.register(visitor.request, selectors.EVENT_READ, visitor)

    def read(self, visitor):
        left = self.server.max_request_bytes - len(visitor.received)
        try:
            chunk = visitor.request.recv(min(left, 4096))
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            # Gone before its request was whole: nobody is left to answer.
            self.leave(visitor)
            self.server.shutdown_request(visitor.request)
            return
        visitor.received += chunk
        if _request_arrived(visitor.received, self.server.max_request_bytes):
            visitor.arrived = True
            self.selector.unregister(visitor.request)

    def dispatch(self):
        for visitor in [visitor for visitor in self.visitors.values() if visitor.arrived]:
            if not self.server._scrape_slots.acquire(blocking=False):
                return
            del self.visitors[visitor.request]
            visitor.request.setblocking(True)
            try:
                self.server.answer_arrived(
                    visitor.request, visitor.client_address, visitor.received
                )
            except Exception:
                self.server.handle_error(visitor.request, visitor.client_address)
                self.server.shutdown_request(visitor.request)

    def expire(self):
        now = time.monotonic()
        for visitor in [visitor for visitor in self.visitors.values() if visitor.deadline <= now]:
            self.leave(visitor)
            if visitor.arrived:
                self.server.refuse(
                    visitor.request,
                    visitor.client_address,
                    f"{self.server.max_scrapes} scrapes were being answered",
                )
            else:
                # Silent or slow past its time: its own doing, not a refusal.
                self.server.shutdown_request(visitor.request)

    def leave(self, visitor):
        del self.visitors[visitor.request]
        if not visitor.arrived:
            self.selector.unregister(visitor.request)

    def close(self):
        """Stop the thread; close every connection still waiting.  Idempotent."""
        with self.lock:
            if self.closing:
                return
            self.closing = True
            thread = self.thread
        self.wake()
        if thread is not None:
            thread.join()
        for visitor in [*self.admitted, *self.visitors.values()]:
            self.server.shutdown_request(visitor.request)
        self.admitted.clear()
        self.visitors.clear()
        self.selector.close()
        self.wake_reader.close()
        self.wake_writer.close()


class _RequestReader:
    """A scrape's request as its handler reads it: at most ``limit`` bytes (``arrived``, read
    by the waiting room, among them), all within ``timeout`` seconds; past either, the end
    of input (``exhausted`` says which)."""

    def __init__(self, sock, limit, timeout, arrived=b""):
        self.sock = sock
        self.left = limit - len(arrived)
        self.deadline = time.monotonic() + timeout
        self.buffer = arrived
        self.exhausted = False

    def readline(self, size=-1):
        while b"\n" not in self.buffer and (size < 0 or len(self.buffer) < size):
            remaining = self.deadline - time.monotonic()
            if self.left <= 0 or remaining <= 0:
                self.exhausted = True
                break
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(min(self.left, 4096))
            except OSError:  # TimeoutError among them
                chunk = b""
            if not chunk:
                self.exhausted = True
                break
            self.left -= len(chunk)
            self.buffer += chunk
        end = self.buffer.find(b"\n") + 1 or len(self.buffer)
        if size >= 0:
            end = min(end, size)
        line, self.buffer = self.buffer[:end], self.buffer[end:]
        return line

    def close(self):
        pass


class _MetricsHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one scrape per connection
    server_version = "fastsock"

    def setup(self):
        self.timeout = self.server.request_timeout
        super().setup()
        self.rfile.close()  # a socket stays open while a file made from it is
        self.rfile = _RequestReader(
            self.connection,
            self.server.max_request_bytes,
            self.server.request_timeout,
            self.server._arrived_requests.pop(self.request, b""),
        )

    def do_GET(self):
        self.answer(body=True)

    def do_HEAD(self):
        self.answer(body=False)

    def answer(self, body):
        self.connection.settimeout(self.server.request_timeout)
        if self.rfile.exhausted and self.rfile.left <= 0:
            self.send_error(431, "request larger than the metrics server reads")
            return
        if self.path.partition("?")[0] != "/metrics":
            self.send_error(404, "metrics are at /metrics")
            return
        try:
            exporter = self.server
            found = samples(exporter.source, exporter.ring, exporter.pipeline)
            found.append((SCRAPES_REFUSED, exporter.scrapes_refused))
            text = _exposition(found).encode()
        except Exception as exc:
            _log.warning("metrics: reading the counters failed: %s", exc)
            self.send_error(500)
            return
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(text)))
        self.end_headers()
        if body:
            self.wfile.write(text)

    def log_message(self, format, *args):
        """Scrapes are not logged: stderr is the operator's."""
