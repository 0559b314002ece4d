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
    "Metrics connections closed unanswered: max_scrapes were being answered.",
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
    address, its port chosen when 0 was asked.  A scrape may take ``request_timeout``
    seconds to send its request and read the answer, and send ``max_request_bytes`` of
    request (request line and headers; 431 beyond): a slow or hostile scraper holds only its
    own thread, and that for a bounded time.  At most ``max_scrapes`` are answered at once;
    a connection beyond is closed at once, counted in ``scrapes_refused`` (exported as
    ``fastsock_metrics_scrapes_refused_total``) and logged, rate-limited.
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
    ):
        self.source = server
        self.ring = ring
        self.pipeline = pipeline
        self.request_timeout = request_timeout
        self.max_request_bytes = max_request_bytes
        self.max_scrapes = max_scrapes
        self.scrapes_refused = 0
        """Connections closed unanswered, ``max_scrapes`` being answered already."""
        self._scrape_slots = threading.BoundedSemaphore(max_scrapes)
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self._thread = None
        super().__init__(address, _MetricsHandler)

    @property
    def url(self):
        """``http://HOST:PORT/metrics`` of the bound address."""
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/metrics"

    def process_request(self, request, client_address):
        # In the serving thread, one connection at a time: the slot is taken here, and
        # given back by the scrape's thread when it is done.
        if not self._scrape_slots.acquire(blocking=False):
            self.scrapes_refused += 1
            _refusals.warning(
                "scrapes",
                "metrics: %d scrapes are being answered; closed the connection from %s",
                self.max_scrapes,
                format_address(client_address),
            )
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._scrape_slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._scrape_slots.release()

    def start(self):
        """Serve in a daemon thread until ``close()``."""
        self._thread = threading.Thread(
            target=self.serve_forever,
            kwargs={"poll_interval": constants.RECEIVE_CHECK_INTERVAL},
            name="fastsock-metrics",
            daemon=True,
        )
        self._thread.start()

    def close(self):
        """Stop serving and close the listening socket.  Idempotent."""
        if self._thread is not None:
            self.shutdown()
            self._thread.join()
            self._thread = None
        self.server_close()

    def __exit__(self, *args):
        self.close()


class _RequestReader:
    """A scrape's request as its handler reads it: at most ``limit`` bytes, all within
    ``timeout`` seconds; past either, the end of input (``exhausted`` says which)."""

    def __init__(self, sock, limit, timeout):
        self.sock = sock
        self.left = limit
        self.deadline = time.monotonic() + timeout
        self.buffer = b""
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
            self.connection, self.server.max_request_bytes, self.server.request_timeout
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
