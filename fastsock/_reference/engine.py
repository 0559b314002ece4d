"""Pure-Python reference of the compiled event engine (fastsock/_engine.pyx, documented in
fastsock/_engine.pyi): one ``selectors`` loop receiving many stream connections.

Same constructor, methods, counters and events.  It frames with the reference Framer and
publishes to the reference RingQueue, and it is a model of the semantics, not of the
speed: where the compiled engine waits on the ring's resume mark, this one polls the ring
(as the reference StreamReceiver does).
"""

import contextlib
import errno
import operator
import os
import queue
import selectors
import socket
import ssl
import threading
import time
from collections import OrderedDict, deque
from typing import NamedTuple

from fastsock import constants, proxy, tls
from fastsock._protocol_errors import BY_ERROR
from fastsock._reference.framing import Framer
from fastsock._reference.receiver import ReceiveCounters, count_leftovers, count_unread
from fastsock._reference.ring import RingQueue
from fastsock.errors import FramingError, QueueClosed
from fastsock.options import ReceiveOptions

__all__ = ["EngineEvent", "StreamEngine"]

# Seconds between two tries to publish while the ring is full: the reference receiver's.
RING_POLL_INTERVAL = 0.005
ACCEPT_EXHAUSTION_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# accept(2): Linux hands a new connection's pending network error to accept(); the next
# connection in the backlog may be fine.
ACCEPT_RETRY_ERRNOS = frozenset(
    {
        errno.ECONNABORTED,
        errno.EPROTO,
        errno.ENETDOWN,
        errno.ENOPROTOOPT,
        errno.EHOSTDOWN,
        errno.ENONET,
        errno.EHOSTUNREACH,
        errno.EOPNOTSUPP,
        errno.ENETUNREACH,
        errno.EPERM,
    }
)
RESET_ERRNOS = frozenset({errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT, errno.ENOTCONN})
WAKEUP = "wakeup"
# What _admit() returns for a peer outside proxy_trusted, and when it could not make the
# connection's TLS session (the event is recorded).
UNTRUSTED = "untrusted"
FAILED = "failed"
# Bytes a pending PROXY header may take: what one read brings at most until it is parsed.
PROXY_ROOM = max(constants.PROXY_MAX_HEADER, proxy.V1_MAX_HEADER)
# The most plaintext one TLS record carries (the compiled engine's room beyond recv_size).
TLS_RECORD_PLAINTEXT = 16384
HANDSHAKE_TIMED_OUT = "no handshake within tls_handshake_timeout"
HANDSHAKE_RESET = "the connection was reset during the handshake"


class EngineEvent(NamedTuple):
    """Something the engine did that Python reports; see fastsock/_engine.pyi."""

    kind: str
    connection_id: int | None
    address: object
    detail: object


class _Connection:
    __slots__ = (
        "id",
        "sock",
        "address",
        "framer",
        "last_data",
        "message_started",
        "messages_at_start",
        "held_bytes",
        "unpublished",
        "ending",
        "watched",
        "header",
        "header_started",
        "tls",
        "handshake_started",
        "header_started",
    )

    def __init__(self, connection_id, sock, address, framer, now):
        self.id = connection_id
        self.sock = sock
        self.address = address
        self.framer = framer
        self.last_data = now
        self.message_started = None
        self.messages_at_start = 0
        self.held_bytes = 0
        # Framed, not yet published: only the connection the ring refused holds any.
        self.unpublished = deque()
        # The event its close will report, once its framed messages are published.
        self.ending = None
        self.watched = True
        # The PROXY header received so far, while it is pending; None after (or without).
        self.header = None
        self.header_started = now
        # Its TlsSession (ssl_context), and when its handshake began while it is under way.
        self.tls = None
        self.handshake_started = None


class StreamEngine:
    """Receives many stream connections in one loop; documented in fastsock/_engine.pyi."""

    def __init__(self, ring, counters, options, *, listeners=(), shared_listeners=False):
        if not isinstance(ring, RingQueue):
            raise TypeError(f"ring must be a reference RingQueue, not {ring!r}")
        if not isinstance(counters, ReceiveCounters):
            raise TypeError(f"counters must be reference ReceiveCounters, not {counters!r}")
        if not isinstance(options, ReceiveOptions):
            raise TypeError(f"options must be a fastsock.ReceiveOptions, not {options!r}")
        options.check_ring(ring)
        self._framer_options = {
            "framing": options.framing,
            "delimiter": options.delimiter,
            "keep_delimiter": options.keep_delimiter,
            "max_line": options.max_line,
            "max_frame": options.max_frame,
        }
        listener_fds = [operator.index(fd) for fd in listeners]
        self._ring = ring
        self._counters = counters
        self._recv_size = options.recv_size
        self._idle_timeout = options.idle_timeout
        self._message_timeout = options.message_timeout
        self._drain_timeout = options.drain_seconds
        self._max_connections = options.connections_limit(thread_each=False)
        self._evict_idle_after = options.evict_idle_after
        self._partial_budget = options.max_partial_bytes
        self._proxy_protocol = options.proxy_protocol
        self._proxy_trusted = proxy.trusted_networks(options.proxy_trusted)
        self._ssl_context = options.ssl_context
        self._tls_handshake_timeout = options.tls_handshake_timeout
        # Connection id -> connection whose TLS handshake is under way, oldest first.
        self._by_handshake_start = OrderedDict()
        self._tls_subjects = OrderedDict()

        self._selector = selectors.DefaultSelector()
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._wake_writer.setblocking(False)
        self._selector.register(self._wake_reader, selectors.EVENT_READ, WAKEUP)
        # What a loop paused by a full ring waits on: only stop() may end the wait early.
        self._wakeup_selector = selectors.DefaultSelector()
        self._wakeup_selector.register(self._wake_reader, selectors.EVENT_READ)
        # Duplicates, so that closing the engine never closes the caller's listeners; they
        # share the open file, so the caller's descriptors become non-blocking too.
        self._listeners = []
        for fd in listener_fds:
            listener = socket.socket(fileno=os.dup(fd))
            listener.setblocking(False)
            self._listeners.append(listener)
        self._accepting = False
        self._accepting_wanted = True
        self._watch_listeners(True)
        self._accept_backoff = 0.0
        self._accept_resumes_at = None
        # A listener other engines share is taken a few connections per turn, so that a
        # burst spreads over them; what a turn leaves stays ready for the next one.
        self._accepts_per_turn = (
            constants.ENGINE_SHARED_ACCEPTS_PER_TURN if shared_listeners else None
        )

        self._connections = {}
        # Connection id -> connection, silent longest first: the front holds the nearest idle
        # deadline and is the one an eviction picks.
        self._by_silence = OrderedDict()
        # Connection id -> connection holding a partial message, oldest message first.
        self._by_message_start = OrderedDict()
        # Connection id -> connection whose PROXY header is pending, oldest first.
        self._by_header_start = OrderedDict()
        self._closed_peers = OrderedDict()
        # The connection whose messages the ring refused: while set, nothing is read.
        self._blocked = None
        # Clocks that started before the last pause restart at its end.
        self._resumed_at = float("-inf")

        self._events = []
        self._events_lock = threading.Lock()
        self._events_lost = 0
        self._unannounced = False
        self._wakeups = 0
        self._run_lock = threading.Lock()
        self._stop_asked = False
        self._draining = False
        self._drain_deadline = None
        self._ring_closed = False
        self._stopped = False
        self._closed = False

    # -- Public API ----------------------------------------------------------------------

    def add_connection(self, fd):
        """Adopt a connected stream socket; see fastsock/_engine.pyi."""
        fd = operator.index(fd)
        with self._exclusive("add_connection"):
            sock = socket.socket(fileno=fd)
            if self._stopped or self._closed:
                sock.close()
                raise ConnectionRefusedError(errno.ECONNREFUSED, "the engine has stopped")
            sock.setblocking(False)
            try:
                address = sock.getpeername()
            except OSError:
                address = None
            connection = self._admit(sock, address, time.monotonic())
            if connection is UNTRUSTED:
                sock.close()
                raise ConnectionRefusedError(errno.ECONNREFUSED, "the peer is not in proxy_trusted")
            if connection is FAILED:
                sock.close()
                raise MemoryError("no memory for the connection's TLS session")
            if connection is None:
                sock.close()
                raise ConnectionRefusedError(
                    errno.ECONNREFUSED,
                    f"already receiving max_connections={self._max_connections} connections",
                )
            return connection.id

    def run(self):
        """Receive until there are events, the engine stopped, or it has nothing left."""
        if self._closed:
            raise ValueError("the engine is closed")
        with self._exclusive("run"):
            return self._run()

    def stop(self):
        """Stop gracefully; safe from any thread, wakes a sleeping run() at once."""
        self._stop_asked = True
        self._wake()

    def accept_connections(self, accepting):
        """Stop or resume accepting; safe from any thread."""
        self._accepting_wanted = accepting
        self._wake()

    def _wake(self):
        try:
            self._wake_writer.send(b"\0")
        except OSError:
            pass  # a wake-up is already pending, or the engine is closed

    def take_events(self):
        with self._events_lock:
            events, self._events = self._events, []
        return events

    def peer(self, connection_id):
        connection = self._connections.get(connection_id)
        if connection is not None:
            return connection.address
        return self._closed_peers.get(connection_id)

    def peer_subject(self, connection_id):
        return self._tls_subjects.get(connection_id)

    @property
    def tls_sessions_open(self):
        return sum(1 for connection in self._connections.values() if connection.tls is not None)

    @property
    def connections(self):
        return len(self._connections)

    @property
    def events_lost(self):
        return self._events_lost

    @property
    def wakeups(self):
        return self._wakeups

    def close(self):
        """Close every connection, counting what each leaves, and the engine's descriptors."""
        with self._exclusive("close"):
            if self._closed:
                return
            self._closed = True
            self._end_all()
            self._selector.close()
            self._wakeup_selector.close()
            for listener in self._listeners:
                listener.close()
            self._wake_reader.close()
            self._wake_writer.close()

    # -- The loop ------------------------------------------------------------------------

    @contextlib.contextmanager
    def _exclusive(self, what):
        if not self._run_lock.acquire(blocking=False):
            raise RuntimeError(f"{what}() while another thread runs the engine")
        try:
            yield
        finally:
            self._run_lock.release()

    def _run(self):
        while True:
            if not self._stopped and (self._ring_closed or self._drain_over()):
                self._end_all()
                self._stopped = True
            if self._stopped:
                return "stopped"
            if self._unannounced:
                self._unannounced = False
                return "events"
            if (self._stop_asked or self._counters.stop_requested) and not self._draining:
                self._begin_drain()
                continue
            if (
                not self._draining
                and self._accept_resumes_at is None
                and self._accepting_wanted != self._accepting
            ):
                self._watch_listeners(self._accepting_wanted)
            if not self._listeners and not self._connections:
                return "empty"
            if self._blocked is not None:
                self._wait_for_ring()
            else:
                self._turn()

    def _turn(self):
        ready = self._selector.select(self._timeout(time.monotonic()))
        self._wakeups += 1
        for key, _ in ready:
            if key.data is WAKEUP:
                self._take_wakeups()
            elif self._blocked is not None:
                # The ring is full: the others stay ready (level-triggered) for later turns.
                continue
            elif isinstance(key.data, _Connection):
                if key.data.watched:
                    self._receive(key.data)
            elif self._accepting:
                self._accept(key.data, self._accepts_per_turn)
        now = time.monotonic()
        if self._accept_resumes_at is not None and now >= self._accept_resumes_at:
            self._accept_resumes_at = None
            self._watch_listeners(True)
        self._fire_timers(now)

    def _timeout(self, now):
        deadlines = []
        if self._idle_timeout is not None and self._by_silence:
            oldest = next(iter(self._by_silence.values()))
            deadlines.append(self._clock_start(oldest.last_data) + self._idle_timeout)
        if self._message_timeout is not None and self._by_message_start:
            oldest = next(iter(self._by_message_start.values()))
            deadlines.append(self._clock_start(oldest.message_started) + self._message_timeout)
        if self._accept_resumes_at is not None:
            deadlines.append(self._accept_resumes_at)
        if self._by_header_start:
            oldest = next(iter(self._by_header_start.values()))
            deadlines.append(
                self._clock_start(oldest.header_started) + constants.PROXY_HEADER_TIMEOUT
            )
        if self._by_handshake_start:
            oldest = next(iter(self._by_handshake_start.values()))
            deadlines.append(
                self._clock_start(oldest.handshake_started) + self._tls_handshake_timeout
            )
        if self._draining:
            deadlines.append(self._drain_deadline)
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - now)

    def _clock_start(self, started):
        # A connection is not silent, nor its message late, because a full ring kept the
        # engine from reading it.
        return max(started, self._resumed_at)

    def _fire_timers(self, now):
        if self._blocked is not None:
            return  # no clock runs while the ring holds the engine back
        if self._idle_timeout is not None:
            while self._by_silence:
                connection = next(iter(self._by_silence.values()))
                if now - self._clock_start(connection.last_data) < self._idle_timeout:
                    break
                self._counters.add("idle_timeouts", 1)
                self._close(connection)
        if self._message_timeout is not None:
            while self._by_message_start:
                connection = next(iter(self._by_message_start.values()))
                started = self._clock_start(connection.message_started)
                if now - started < self._message_timeout:
                    break
                self._counters.add("message_timeouts", 1)
                self._end(connection, "message_timeout", self._message_timeout)
        while self._by_header_start:
            connection = next(iter(self._by_header_start.values()))
            started = self._clock_start(connection.header_started)
            if now - started < constants.PROXY_HEADER_TIMEOUT:
                break
            self._header_failed(connection, proxy.TIMED_OUT)
        while self._by_handshake_start:
            connection = next(iter(self._by_handshake_start.values()))
            started = self._clock_start(connection.handshake_started)
            if now - started < self._tls_handshake_timeout:
                break
            self._handshake_failed(connection, HANDSHAKE_TIMED_OUT)

    def _wait_for_ring(self):
        """The ring refused a message: read nothing, retry it every RING_POLL_INTERVAL."""
        timeout = RING_POLL_INTERVAL
        if self._draining:
            timeout = max(0.0, min(timeout, self._drain_deadline - time.monotonic()))
        # Reading waits for ring room; accepting goes on between the waits.
        if self._accepting and self._accepting_wanted:
            for listener in self._listeners:
                self._accept(listener, self._accepts_per_turn)
        paused_at = time.monotonic_ns()
        ready = self._wakeup_selector.select(timeout)
        self._wakeups += 1
        self._counters.add("paused_seconds", time.monotonic_ns() - paused_at)
        if ready:
            self._take_wakeups()
        self._resumed_at = time.monotonic()
        self._publish(self._blocked)

    def _take_wakeups(self):
        while True:
            try:
                if not self._wake_reader.recv(4096):
                    return
            except BlockingIOError:
                return

    def _watch_listeners(self, watch):
        if watch == self._accepting:
            return
        self._accepting = watch
        for listener in self._listeners:
            if watch:
                self._selector.register(listener, selectors.EVENT_READ, listener)
            else:
                self._selector.unregister(listener)

    # -- Connections ---------------------------------------------------------------------

    def _accept(self, listener, budget=None):
        taken = 0
        while budget is None or taken < budget:
            try:
                sock, address = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in ACCEPT_EXHAUSTION_ERRNOS:
                    self._pause_accepting()
                    return
                if exc.errno in ACCEPT_RETRY_ERRNOS:
                    continue
                raise
            taken += 1
            self._accept_backoff = 0.0
            sock.setblocking(False)
            admitted = self._admit(sock, address, time.monotonic())
            if admitted is UNTRUSTED:
                sock.close()
                self._record(EngineEvent("proxy_untrusted", None, address, None))
            elif admitted is FAILED:
                sock.close()
            elif admitted is None:
                sock.close()
                self._record(EngineEvent("refused", None, address, self._max_connections))

    def _pause_accepting(self):
        self._accept_backoff = min(
            max(self._accept_backoff * 2, constants.ACCEPT_BACKOFF_INITIAL),
            constants.ACCEPT_BACKOFF_MAX,
        )
        self._accept_resumes_at = time.monotonic() + self._accept_backoff
        self._watch_listeners(False)
        self._record(EngineEvent("accept_paused", None, None, self._accept_backoff))

    def _admit(self, sock, address, now):
        """The new connection, None when max_connections are open and none may go, or
        UNTRUSTED for a peer that may not send the PROXY header it must send (counted)."""
        if self._proxy_protocol and not proxy.is_trusted(address, self._proxy_trusted):
            # Never read: whatever it would send cannot be believed.
            self._counters.add("proxy_header_errors", 1)
            return UNTRUSTED
        if len(self._connections) >= self._max_connections and not self._evict_idlest(now):
            self._counters.count_refusal()
            return None
        session = None
        if self._ssl_context is not None:
            try:
                session = tls.TlsSession(self._ssl_context, sock.fileno())
            except (MemoryError, ssl.SSLError):
                self._record(EngineEvent("no_memory", None, address, errno.ENOMEM))
                return FAILED
        connection = _Connection(
            self._counters.next_connection_id(),
            sock,
            address,
            Framer(**self._framer_options),
            now,
        )
        self._counters.add("connections_opened", 1)
        self._selector.register(sock, selectors.EVENT_READ, connection)
        self._connections[connection.id] = connection
        self._by_silence[connection.id] = connection
        connection.tls = session
        if self._proxy_protocol:
            connection.header = bytearray()
            self._by_header_start[connection.id] = connection
        elif connection.tls is not None:
            self._handshake_start(connection, now)
        if self._draining:
            self._shutdown(connection)
        return connection

    def _evict_idlest(self, now):
        if self._blocked is not None or not self._by_silence:
            return False
        idlest = next(iter(self._by_silence.values()))
        silent = now - self._clock_start(idlest.last_data)
        if silent < self._evict_idle_after:
            return False
        self._counters.add("idle_evictions", 1)
        self._end(idlest, "evicted_idle", silent)
        return True

    def _receive(self, connection):
        size = self._recv_size
        if connection.header is not None:
            # As the compiled engine: no more than a pending header has room for.
            size = min(size, PROXY_ROOM - len(connection.header))
        try:
            data = connection.sock.recv(size)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if exc.errno in RESET_ERRNOS and connection.handshake_started is not None:
                self._handshake_failed(connection, HANDSHAKE_RESET)
            elif exc.errno in RESET_ERRNOS:
                self._counters.add("resets", 1)
                self._close(connection)
            else:
                self._end(connection, "os_error", exc.errno)
            return
        if not data:
            if connection.header:
                self._header_failed(connection, proxy.TRUNCATED)
                return
            if connection.tls is not None and connection.header is None:
                if connection.handshake_started is None or connection.tls.received:
                    self._receive_tls(connection, data, time.monotonic())
                    return
            # The peer's end, or, in a drain, everything it sent before the stop (or a peer
            # that sent no PROXY header, or no ClientHello, at all: a health check, a port
            # scan).
            self._close(connection)
            return
        now = time.monotonic()
        connection.last_data = now
        self._by_silence.move_to_end(connection.id)
        if connection.tls is None or connection.header is not None:
            self._counters.add("bytes_received", len(data))
        if connection.header is not None:
            data = self._read_header(connection, data)
            if connection.tls is not None and connection.header is None and not connection.ending:
                # PROXY comes before TLS: the bytes after the header begin the handshake.
                self._counters.add("bytes_received", -len(data))
                self._handshake_start(connection, now)
                if data:
                    self._receive_tls(connection, data, now)
                return
            if not data:
                return
        if connection.tls is not None:
            self._receive_tls(connection, data, now)
            return
        self._frame(connection, data, now)

    def _receive_tls(self, connection, ciphertext, now):
        """Hand the ciphertext (b"": the peer's end) to the connection's session and frame
        the plaintext it yields; then end the connection if TLS or the peer ended it."""
        session = connection.tls
        session.receive(ciphertext)
        if connection.handshake_started is not None:
            try:
                if not session.advance_handshake():
                    return
            except tls.HandshakeFailed as exc:
                self._handshake_failed(connection, exc.reason)
                return
            connection.handshake_started = None
            self._by_handshake_start.pop(connection.id, None)
            if session.subject is not None:
                self._tls_subjects[connection.id] = session.subject
        buffer = memoryview(bytearray(self._recv_size + TLS_RECORD_PLAINTEXT))
        while connection.ending is None and connection.id in self._connections:
            try:
                count = session.read_into(buffer)
            except tls.TlsBroken as exc:
                self._counters.add("resets", 1)
                self._end(connection, "tls_error", exc.reason)
                return
            if count == tls.TLS_CLOSED:
                self._close(connection)
                return
            if count == 0:
                break
            self._counters.add("bytes_received", count)
            self._frame(connection, bytes(buffer[:count]), now)
            if session.drained:
                break
        if not ciphertext:
            self._close(connection)

    def _handshake_start(self, connection, now):
        connection.handshake_started = now
        self._by_handshake_start[connection.id] = connection

    def _handshake_failed(self, connection, reason):
        self._counters.add("tls_handshake_errors", 1)
        self._end(connection, "tls_handshake", reason)

    def _frame(self, connection, data, now):
        framer = connection.framer
        pending_start = framer.peek_pending(constants.PROTOCOL_ERROR_SAMPLE)
        try:
            connection.unpublished.extend(framer.feed(data))
        except FramingError as exc:
            self._fail(connection, exc, pending_start, data)
            return
        except MemoryError:
            self._end(connection, "no_memory", errno.ENOMEM)
            return
        self._publish(connection)
        over_budget = self._hold_partial(connection)
        if self._message_overdue(connection, now):
            self._counters.add("message_timeouts", 1)
            self._end(connection, "message_timeout", self._message_timeout)
        elif over_budget:
            self._relieve_memory()

    def _read_header(self, connection, data):
        """Add data to the pending PROXY header; once it is complete, the connection's
        address is the one it names (if any) and the bytes after it are returned, to be
        framed; b"" while it is pending or when it failed."""
        connection.header += data
        try:
            parsed = proxy.parse(connection.header)
        except proxy.HeaderRejected as exc:
            self._header_failed(connection, exc.reason)
            return b""
        if parsed is None:
            if len(connection.header) >= PROXY_ROOM:  # unreachable: refused before
                self._header_failed(connection, proxy.V2_TOO_LARGE)
            return b""
        if parsed.address is not None:
            connection.address = parsed.address
        rest = bytes(connection.header[parsed.length :])
        connection.header = None
        self._by_header_start.pop(connection.id, None)
        return rest

    def _header_failed(self, connection, reason):
        self._counters.add("proxy_header_errors", 1)
        sample = bytes(connection.header[: constants.PROTOCOL_ERROR_SAMPLE])
        self._end(connection, "proxy_header", (proxy.REASONS[reason], sample))

    def _fail(self, connection, error, pending_start, data):
        kind = BY_ERROR[type(error)]
        self._counters.add(kind.counter, 1)
        self._counters.add("bytes_discarded", error.discarded)
        connection.unpublished.extend(error.messages)
        self._publish(connection)
        self._hold_partial(connection)
        self._end(connection, kind.name, _offending_sample(error, pending_start, data))

    def _publish(self, connection):
        while connection.unpublished:
            try:
                self._ring.put_nowait(connection.unpublished[0], source_id=connection.id)
            except queue.Full:
                if self._blocked is None:
                    self._blocked = connection
                    self._counters.add("pauses", 1)
                return
            except QueueClosed:
                self._ring_closed = True
                return
            connection.unpublished.popleft()
            self._counters.add("messages_received", 1)
        if self._blocked is connection:
            self._blocked = None
        if connection.ending is not None:
            self._close(connection)

    def _hold_partial(self, connection):
        """Move the shared gauge to this connection's share; True if that passed the budget."""
        held = connection.framer.pending
        if held == connection.held_bytes:
            return False
        total = self._counters.hold_partial(connection.held_bytes, held)
        connection.held_bytes = held
        return bool(self._partial_budget and held and total > self._partial_budget)

    def _message_overdue(self, connection, now):
        # Per message: completing any message restarts the clock of the partial one.
        framer = connection.framer
        if not framer.pending:
            connection.message_started = None
            self._by_message_start.pop(connection.id, None)
            return False
        if (
            connection.message_started is None
            or framer.messages_out != connection.messages_at_start
        ):
            connection.message_started = now
            connection.messages_at_start = framer.messages_out
            self._by_message_start[connection.id] = connection
            self._by_message_start.move_to_end(connection.id)
            return False
        started = self._clock_start(connection.message_started)
        return self._message_timeout is not None and now - started >= self._message_timeout

    def _relieve_memory(self):
        # Another connection's end may already have brought the shared total back.
        if self._counters.partial_bytes <= self._partial_budget:
            return
        holders = [c for c in self._connections.values() if c.held_bytes and c.ending is None]
        if not holders:
            return
        largest = max(holders, key=operator.attrgetter("held_bytes"))
        self._counters.add("memory_evictions", 1)
        self._end(largest, "evicted_memory", largest.held_bytes)

    def _end(self, connection, kind, detail):
        """Close the connection with an event, once the messages it framed are published."""
        connection.ending = EngineEvent(kind, connection.id, connection.address, detail)
        self._unwatch(connection)
        if self._blocked is not connection:
            self._close(connection)

    def _unwatch(self, connection):
        if not connection.watched:
            return
        connection.watched = False
        self._selector.unregister(connection.sock)
        self._by_silence.pop(connection.id, None)
        self._by_message_start.pop(connection.id, None)
        self._by_header_start.pop(connection.id, None)
        self._by_handshake_start.pop(connection.id, None)

    def _close(self, connection):
        """Count what the connection leaves behind (the kernel's unread bytes, messages framed
        but not published, a partial message) and close it."""
        if self._connections.get(connection.id) is not connection:
            return
        self._unwatch(connection)
        if self._blocked is connection:
            self._blocked = None
        count_unread(self._counters, connection.sock.fileno())
        if connection.header is not None:
            # A header never completed: its bytes were received, never delivered.
            self._counters.add("bytes_discarded", len(connection.header))
            connection.header = None
        count_leftovers(
            self._counters, connection.unpublished, connection.framer, connection.held_bytes
        )
        connection.held_bytes = 0
        # Remembered before it leaves the open ones, so peer() always finds it.
        self._closed_peers[connection.id] = connection.address
        while len(self._closed_peers) > constants.RECENT_PEERS:
            self._closed_peers.popitem(last=False)
        connection.tls = None
        if connection.id in self._tls_subjects:
            self._tls_subjects.move_to_end(connection.id)
            open_tls = sum(1 for other in self._connections.values() if other.tls is not None)
            while len(self._tls_subjects) > constants.RECENT_PEERS + open_tls:
                self._tls_subjects.popitem(last=False)
        del self._connections[connection.id]
        connection.sock.close()
        if connection.ending is not None:
            self._record(connection.ending)

    def _end_all(self):
        for connection in list(self._connections.values()):
            self._close(connection)

    # -- Stopping ------------------------------------------------------------------------

    def _begin_drain(self):
        # What the backlogs hold was acknowledged by the kernel: it is drained like the rest.
        self._draining = True
        self._drain_deadline = time.monotonic() + self._drain_timeout
        for listener in self._listeners:
            self._accept(listener)
        self._accept_resumes_at = None
        self._watch_listeners(False)
        for connection in self._connections.values():
            self._shutdown(connection)

    def _drain_over(self):
        if not self._draining:
            return False
        return not self._connections or time.monotonic() >= self._drain_deadline

    @staticmethod
    def _shutdown(connection):
        # Both ways, as the receive loop does: the peer's further data is refused, not
        # acknowledged, so what the kernel holds now is all it was told was delivered.
        try:
            connection.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # the peer is already gone: what is queued is still read

    def _record(self, event):
        with self._events_lock:
            if len(self._events) < constants.ENGINE_EVENTS_KEPT:
                self._events.append(event)
            else:
                self._events_lost += 1
        self._unannounced = True


def _offending_sample(error, pending_start, data):
    """The start of the offending line or frame, as StreamReceiver.offending_sample gives it:
    it began in data unless the framer discarded more than data."""
    limit = constants.PROTOCOL_ERROR_SAMPLE
    if error.discarded <= len(data):
        start = len(data) - error.discarded
        return bytes(data[start : start + limit])
    return (pending_start + bytes(data[:limit]))[:limit]
