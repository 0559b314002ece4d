"""Every tunable of fastsock, in one place, each with the reason for its default.

The compiled modules read these at import time through their Python callers; nothing
here is re-read after import, so change them by passing explicit arguments instead.
"""


# -- Framing -----------------------------------------------------------------------------

MAX_LINE_LENGTH = 64 * 1024
"""Longest line (delimiter excluded) a line framer accepts: far above any log or telemetry
record, small enough that 1,000 connections each holding a partial line cost 64 MiB."""

MAX_FRAME_SIZE = 1024 * 1024
"""Largest length-prefixed payload accepted, checked at the header before any allocation:
a hostile 4 GiB prefix must cost nothing."""

LINE_DELIMITER = b"\n"
"""Default line delimiter: newline-delimited JSON, logs and most line protocols."""

LENGTH_PREFIX_SIZE = 4
"""Bytes of the big-endian length header in front of each length-prefixed frame."""

RECV_SIZE = 256 * 1024
"""Bytes asked of each recv() by the compiled loop: large enough to amortise the syscall
over hundreds of small messages, small enough to stay in L2 while it is framed."""

FRAMER_INITIAL_BUFFER = 64 * 1024
"""Initial size of a framer's reassembly buffer; it grows only for larger frames."""

# -- Ring-buffer queue -------------------------------------------------------------------

RING_MAX_MESSAGES = 65_536
"""Messages a ring holds before producers wait: about a second of a fast sensor feed, and
the slot index stays cheap."""

RING_MAX_BYTES = 64 * 1024 * 1024
"""Payload bytes a ring holds before producers wait: bounds peak memory under a stalled
consumer, while leaving room for 64 full-size frames."""

RING_RESUME_FRACTION = 0.5
"""A paused producer resumes when the ring drains to this fraction of both bounds, so it
does not flap between paused and running on every message."""

RING_WAIT_SLICE = 0.05
"""Seconds a blocked wait sleeps with the GIL released before it checks for signals:
Ctrl-C is seen within this delay."""

RING_MAP_STRIDE = 64 * 1024
"""Bytes between the reads with which a forked process maps the shared ring: Linux's
fault-around window, so one read fault maps 16 pages instead of a write fault for each."""

GET_MANY_DEFAULT = 4096
"""Messages get_many() returns at most by default: one call amortises the lock and the
wake-up over thousands of messages without building huge lists."""

# -- Servers -----------------------------------------------------------------------------

ACCEPT_BACKOFF_INITIAL = 0.01
"""Seconds accept() pauses after EMFILE/ENFILE: long enough not to spin, short enough that
a recovering server accepts again almost at once."""

ACCEPT_BACKOFF_MAX = 1.0
"""Longest pause between accept() retries while file descriptors stay exhausted."""

ENGINE_SHARED_ACCEPTS_PER_TURN = 8
"""Connections an event engine accepts per turn from a listener other engines share: a burst
spreads over the engines instead of going to the one that woke first."""

THREAD_POOL_IDLE_TIMEOUT = 60.0
"""Seconds an idle pooled handler thread lives before it exits, so a burst does not leave
its threads behind forever."""

UNIX_SOCKET_MODE = 0o600
"""Permissions of the compiled path's Unix socket files: only the server's user may send to
an ingest endpoint unless the server is told otherwise (``socket_mode=``)."""

ERROR_LOG_INTERVAL = 10.0
"""Seconds between two log records of the same kind of recurring error (EMFILE, framing
errors), so a hostile peer cannot flood the log."""

# -- Receive loop ------------------------------------------------------------------------

SPANS_PER_PUBLISH = 1024
"""Messages the receive loop hands to the ring in one locked publish: amortises the lock and
the consumer wake-up over many small messages, and bounds the loop's span array to 16 KiB."""

ENGINE_ANNOUNCE_AFTER = 4096
"""Messages an event engine publishes before it wakes a sleeping consumer (it wakes it anyway
at the end of each turn, before it waits): a wake-up per publish of SPANS_PER_PUBLISH
messages made the engine and a consumer on one core switch every thousand 64-byte lines;
GET_MANY_DEFAULT messages are one take of the consumer."""

RECEIVE_CHECK_INTERVAL = 0.05
"""Seconds between the receive loop's checks, with the GIL, for signals (Ctrl-C), a stop
request and the idle timeout; it wakes this often only while its peer is silent."""

RECENT_PEERS = 4096
"""Closed connections whose client address a server still remembers, so a consumer can
name the sender of messages that were queued just before their connection closed."""

SHUTDOWN_DRAIN_TIMEOUT = 20.0
"""Seconds a gracefully stopping server gives its receive loops to hand over what their
peers sent before the stop (the kernel's buffers, then ring room for it): a full 64 MiB ring
drains through a 4 MB/s writer (a slow disk or pipe) in 17 s, and 20 s stays inside the
30 s that Kubernetes and many supervisors grant a stopping process before they kill it."""

SHUTDOWN_GRACE = 2.0
"""Seconds a prefork server waits for its workers beyond the drain timeout before it kills
them: time to close their sockets and exit after their loops returned."""

IDLE_TIMEOUT = 300.0
"""Seconds a compiled-path connection may stay silent before it is closed: long enough for
any live sender's keep-alive, short enough that squatters cannot hold slots for hours."""

MESSAGE_TIMEOUT = 30.0
"""Seconds one line or frame may take to arrive whole on the compiled path: a trickle of a
byte now and then keeps a connection from being idle, but cannot hold it for hours."""

COMPILED_BACKLOG = 511
"""Listen backlog of compiled-path stream servers (the stdlib's 5 drops bursts of
connects): nginx's and Redis's default, and within Linux's usual somaxconn."""

MAX_CONNECTIONS_CAP = 1024
"""Connections one process receives at most by default where each costs a thread (a server
that overrides a request hook, ForkingMixIn): a thread's stack and wake-ups bound it there;
event engines take as many as the file-descriptor limit allows."""

FD_RESERVE = 32
"""File descriptors kept free of connections for logs, files and the server itself."""

EVICT_IDLE_AFTER = 2.0
"""Seconds of silence after which a connection gives its slot to a new one when the server
is full (max_connections, or every max_threads thread busy): senders of a live feed talk
more often, and an evicted peer loses nothing already framed."""

MAX_PARTIAL_BYTES = 128 * 1024 * 1024
"""Bytes of incomplete messages all connections of a process may hold together before the
largest holder is closed: 128 maximum-size frames in flight, where 1,024 connections each
trickling one would otherwise hold a gigabyte."""

PROTOCOL_ERROR_SAMPLE = 32
"""Bytes of an offending line or frame shown, escaped, in the log line about it: enough to
recognise b"GET / HTTP/1.1" or a binary header, too few to copy a payload into the logs."""

PROXY_HEADER_TIMEOUT = 5.0
"""Seconds a connection may take to send its whole PROXY protocol header: a load balancer
sends it at once, with or before the client's first bytes, so a slower one is not a load
balancer (or holds a slot on purpose)."""

PROXY_MAX_HEADER = 1024
"""Bytes a PROXY protocol v2 header may take (16 fixed, then addresses and TLVs): the
addresses need at most 216 and the TLVs load balancers add (ALPN, authority, unique ID, TLS
details, cloud endpoint IDs) a few hundred; a longer one is refused, not buffered.  A v1
header is at most 107 bytes, as its specification says."""

PROXY_TRUSTED = ("127.0.0.0/8", "::1/128")
"""Networks allowed to send a PROXY header by default: loopback only, where a load balancer
on the same host runs; any other must be named, since a trusted header sets the reported
client address."""

TLS_HANDSHAKE_TIMEOUT = 10.0
"""Seconds a TLS connection may take to finish its handshake (from accept, or from the end of
its PROXY header): two round trips and a certificate check take milliseconds, and seconds on
a lossy mobile link; a client that sends no ClientHello, or stops halfway, holds a slot and
a TLS object only this long."""

ENGINE_EVENTS_KEPT = 4096
"""Events an event engine keeps for ``take_events()``: a burst of refusals or protocol errors
between two takes is reported whole, while a caller that stops taking them costs at most
this many; beyond it they are only counted (``events_lost``)."""


# -- Datagram loop -----------------------------------------------------------------------

DATAGRAM_MAX_SIZE = 65535
"""Bytes of buffer per datagram: the largest UDP payload over IPv4 (65,507) and IPv6
(65,527) fits, so only Unix datagrams can be longer, and those are counted as truncated."""

DATAGRAM_ANNOUNCE_AFTER = 1024
"""Datagrams the loop publishes, while the socket keeps a backlog, before it wakes a sleeping
consumer: a wake-up per 64-datagram batch cost about a tenth of a shared core in context
switches; at 1 M datagrams/s this delays a message by at most 1 ms, and none once the
socket drains."""

DATAGRAM_BUSY_POLL = 0.0001
"""Seconds the datagram loop keeps asking, yielding the core in between, before it sleeps
after a busy batch: a sleeping receiver makes each sender pay to wake it, which cost about
a tenth of the delivered rate at 1 M datagrams/s on loopback; the spin costs at most this
much CPU per burst, and nothing under light traffic (small batches)."""

DATAGRAM_COUNT_WAIT = 0.1
"""Seconds a datagram server's stats() may wait for the loops to count the batches they have
published, so that a consumer never sees counters lag what it took: the counts follow each
publish within microseconds, unless the scheduler takes the loop's core away in between (a
time slice); bounded, for a prefork worker killed in between, and paid once for such a worker
(the counters remember the publishes they gave up on)."""

DATAGRAM_BATCH = 64
"""Datagrams one recvmmsg() call may take: amortises the system call over a burst, while the
buffers (64 times DATAGRAM_MAX_SIZE) are touched only as far as the datagrams fill them."""


# -- Pipelines (fastsock.pipeline, fastsock serve --sink) ----------------------------------

SINK_RETRY_INITIAL = 0.05
"""Seconds a pipeline waits before it writes a batch again after SinkUnavailable: a broker
that refused one batch under load often takes it a moment later."""

SINK_RETRY_MAX = 5.0
"""Longest wait between two writes of a batch to a sink that stays unavailable (the wait
doubles from SINK_RETRY_INITIAL): a restarted broker is used within seconds, while a dead
one costs a write every few seconds, not a busy loop."""

PIPELINE_WAIT = 0.1
"""Seconds a pipeline's run() waits for messages before it looks for a stop request."""

PIPELINE_STOP_TIMEOUT = 10.0
"""Seconds a stopping pipeline may take to deliver what is left in the ring and flush its
sink: a 64 MiB ring drains to a file in well under a second, and with the receivers' drain
(SHUTDOWN_DRAIN_TIMEOUT) it stays inside the 30 s supervisors grant a stopping process."""

RING_ASYNC_RECHECK = 0.5
"""Seconds an asyncio consumer waits on the ring's eventfd before it looks at the ring
anyway: several event loops share the eventfd and one may reset it before another saw it,
and a producer killed between its publish and its wake-up never signals."""


# -- Broker sinks (fastsock.sinks: Redis Streams, NATS JetStream, Kafka) -------------------

SINK_CONNECT_TIMEOUT = 5.0
"""Seconds a sink waits to (re)connect to its broker before the write counts as failed and
the pipeline backs off: a broker on the network answers within milliseconds, and a dead one
must not hold the pipeline longer than a retry is worth."""

SINK_WRITE_TIMEOUT = 10.0
"""Seconds a sink waits for the broker to confirm one batch before it reports the broker as
unavailable (the pipeline then retries the same batch): long enough for a broker fsyncing or
electing a leader, short enough that the counters show a stall within seconds."""

REDIS_BATCH_MARKER_SECONDS = 24 * 3600
"""Lifetime of the key in which a Redis sink records the last batch it committed (one key per
sink process): it is read only when a retried batch's outcome is unknown, seconds later, so a
day keeps it for any outage a restart recovers from without leaving keys behind forever."""

NATS_RECONNECT_WAIT = 0.5
"""Seconds nats-py waits between attempts to reconnect to a NATS server it lost: a restarted
server is written to again within half a second, at two connection attempts a second."""

KAFKA_LINGER_MS = 5
"""librdkafka's linger.ms: a batch handed to the Kafka sink is produced all at once, so a
short linger fills the broker's requests meanwhile; the sink's flush() then sends the rest
without waiting it out."""

KAFKA_MESSAGE_TIMEOUT_MS = 0
"""librdkafka's message.timeout.ms, 0 for none: librdkafka retries a produced message itself
(idempotently: the same sequence number, which the broker recognises) until the broker takes
it, while the sink reports the broker unavailable and the pipeline waits; a timeout would fail
a message possibly already written, which the sink would then produce again as a new one."""


# -- Metrics (fastsock serve --metrics, fastsock.metrics.MetricsHTTPServer) ---------------

METRICS_DEFAULT_HOST = "127.0.0.1"
"""Where the metrics server listens when only a port is given: counters tell an outsider how
busy the server is, so they are served to other hosts only when asked."""

METRICS_MAX_SCRAPES = 8
"""Scrapes answered at once, each in a thread once its request has arrived: Prometheus
scrapes a target once an interval, so a few cover several scrapers, and threads stay
bounded whatever connects."""

METRICS_MAX_WAITING = 64
"""Connections the metrics server holds (a descriptor each, no thread) while their requests
arrive or wait for a scrape slot: a scraper's request arrives within milliseconds, so the
one waiting longest without a request is closed for a newcomer, and silent connections
cannot shut a scraper out unless they keep coming faster than its request."""

METRICS_REQUEST_TIMEOUT = 5.0
"""Seconds a scrape may take to send its request and read the answer: Prometheus answers
within milliseconds on a live network (its default scrape timeout is 10 s), and a scraper that
stalls holds its one thread for no longer than this."""

METRICS_MAX_REQUEST_BYTES = 8192
"""Bytes of request line and headers a scrape may send: Prometheus sends about 300; more is
refused (431) rather than buffered."""

REDIS_CHUNK_MESSAGES = 512
"""Messages per script call of the Redis sink: a batch of GET_MANY_DEFAULT goes out as 8 calls
back to back, so Redis adds one chunk while the sink encodes the next, and a chunk's
arguments stay far below Lua's stack limits."""

NATS_CHUNK_MESSAGES = 512
"""Messages the NATS sink publishes before it lets nats-py's flusher send them: JetStream stores
one chunk while the sink encodes the next, instead of waiting for the whole batch."""
