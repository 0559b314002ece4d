"""The compiled fast path: a request handler that hands each stream connection to the
compiled receive loop, which frames what arrives into a RingQueue without the GIL; on a
datagram server, the compiled datagram loop takes over the server's socket."""

import dataclasses
import functools
import logging
import os
import socket
import threading
import time
from collections import OrderedDict

from . import _protocol_errors, constants, proxy
from . import server as _server
from ._impl import (
    ConnectionLedger,
    DatagramCounters,
    DatagramReceiver,
    ReceiveCounters,
    RingQueue,
    StreamEngine,
    StreamReceiver,
)
from ._ratelimit import RateLimitedLogger
from .errors import ProxyHeaderError
from .options import ReceiveOptions
from .server import BaseRequestHandler

_log = RateLimitedLogger(logging.getLogger("fastsock"), constants.ERROR_LOG_INTERVAL)

__all__ = [
    "DatagramPath",
    "ReceiveHandler",
    "ReceiveOptions",
    "ReceiveRegistry",
    "StreamPath",
    "receive_path",
    "receiver",
]


class ReceiveRegistry:
    """The connections of a server received each by a loop of its own (a handler thread or
    process): admission under ``max_connections``, idle and memory eviction, their peers.

    Its counters are created before any fork and live in shared memory, so forked children
    add to the same numbers the parent reads.
    """

    def __init__(self, counters=None):
        self.counters = ReceiveCounters() if counters is None else counters
        self._lock = threading.Lock()
        self._receivers = {}
        self._evicting = {}
        self._peers = OrderedDict()

    def open(self, make_receiver, client_address, max_connections, evict_idle_after):
        """Register a new connection: make_receiver(connection_id) builds its receiver.

        When this process already receives ``max_connections`` connections, the one silent
        longest is evicted if it has been silent ``evict_idle_after`` seconds; otherwise
        None: the caller counts the refusal.
        """
        with self._lock:
            if len(self._receivers) >= max_connections:
                evicted = self._evict_idlest(evict_idle_after)
                if evicted is None:
                    return None
                del self._receivers[evicted.source_id]
            connection_id = self.counters.next_connection_id()
            receiver = make_receiver(connection_id)
            self._receivers[connection_id] = receiver
            self._peers[connection_id] = client_address
            self._peers.move_to_end(connection_id)
            while len(self._peers) > constants.RECENT_PEERS + len(self._receivers):
                self._peers.popitem(last=False)
        return receiver

    def close(self, receiver):
        receiver.close()
        with self._lock:
            self._receivers.pop(receiver.source_id, None)
            self._evicting.pop(receiver.source_id, None)

    def make_room(self, evict_idle_after):
        """Evict the connection silent longest, if silent ``evict_idle_after`` seconds, so
        that a connection waiting for a handler thread gets one; one eviction at a time."""
        with self._lock:
            if not self._evicting:
                self._evict_idlest(evict_idle_after)

    def relieve_memory(self, budget):
        """The partial messages of all connections passed ``budget``: close the largest
        holder; one such eviction at a time."""
        with self._lock:
            if "memory" in self._evicting.values():
                return
            # A loop reports a crossing it saw a moment ago: an eviction may have ended it.
            if self.counters.partial_bytes <= budget:
                return
            candidates = [receiver for receiver in self._not_evicting() if receiver.held_bytes]
            if not candidates:
                return
            largest = max(candidates, key=lambda receiver: receiver.held_bytes)
            self._evict(largest, "memory")
            peer = self._peers.get(largest.source_id)
        _log.warning(
            "memory-eviction",
            "closed %s: largest holder of partial messages (%d bytes) over the budget",
            _escaped(peer),
            largest.held_bytes,
        )

    def _evict_idlest(self, evict_idle_after):
        # Called with the lock held, so no receiver's socket is closed under evict().
        candidates = self._not_evicting()
        if not candidates:
            return None
        idlest = max(candidates, key=lambda receiver: receiver.idle_seconds)
        idle_seconds = idlest.idle_seconds
        if idle_seconds < evict_idle_after:
            return None
        self._evict(idlest, "idle")
        _log.log(
            logging.INFO,
            "idle-eviction",
            "evicted %s, silent for %.1f s, to admit a new connection",
            _escaped(self._peers.get(idlest.source_id)),
            idle_seconds,
        )
        return idlest

    def _not_evicting(self):
        return [
            receiver
            for connection_id, receiver in self._receivers.items()
            if connection_id not in self._evicting
        ]

    def _evict(self, receiver, reason):
        self._evicting[receiver.source_id] = reason
        receiver.evict(reason)

    def peer(self, connection_id):
        with self._lock:
            return self._peers.get(connection_id)

    def set_peer(self, connection_id, address):
        """The connection's address is now address (the client its PROXY header named)."""
        with self._lock:
            if connection_id in self._peers:
                self._peers[connection_id] = address


class StreamPath:
    """The compiled receive path of a stream server: the one object the server calls.

    The handler class (``fastsock.receiver(...)``) creates it with the server
    (``ReceiveHandler.fastsock_receive_path``), and the server keeps it as
    ``receive_path``.  Its connections run on event engines (``on_engines``) unless the
    server or the handler overrides a step that runs per connection (see
    ``_runs_on_engines``); then each runs the compiled loop in its own handler thread or
    process, admitted by ``connections`` (a ReceiveRegistry).

    The server calls: ``serve(interruptible)`` from serve_forever() when ``serves_itself``;
    ``stop()`` to stop every loop gracefully without waiting; ``finish()`` from
    server_close() to wait for the engines' drains; ``stats()``; ``peer(connection_id)``;
    ``make_room()`` when every pooled handler thread is busy; ``ledger_for_request()``
    and ``settle(ledger)`` around a request process of ForkingMixIn.
    """

    def __init__(self, server, handler):
        self.options = _checked_options(handler)
        self.proxy_trusted = proxy.trusted_networks(self.options.proxy_trusted)
        self.queue = handler.queue
        self.counters = ReceiveCounters()
        self.connections = ReceiveRegistry(self.counters)
        # In a forked request process: the ledger its parent keeps for its connection.
        self.request_ledger = None
        self.on_engines = _runs_on_engines(server, handler)
        if self.options.ssl_context is not None and not self.on_engines:
            raise ValueError(
                "ssl_context: TLS is terminated by the event engines only, and this server "
                "receives each connection in a handler of its own (ForkingMixIn, or a "
                "request hook or handler step overridden); serve it on the engines, or "
                "terminate TLS in front of it"
            )
        self._server = server
        self._handler = handler
        self._engines_lock = threading.Lock()
        self._engines = None
        self._finished_engines = None

    @property
    def serves_itself(self):
        """True when serve_forever() runs the engines instead of the server's select loop."""
        return self.on_engines

    def serve(self, interruptible):
        """serve_forever() of a server on event engines: they accept until shutdown(); the
        connections they hold are served until server_close(), as handler threads would
        serve theirs.  ``interruptible(interrupt)`` is the server's context manager under
        which shutdown() calls interrupt()."""
        engines = self._engine_group()
        engines.serving.clear()
        engines.accept_connections(True)
        try:
            with interruptible(engines.serving.set):
                engines.serving.wait()
        finally:
            engines.accept_connections(False)
        engines.raise_failure()

    def _engine_group(self):
        with self._engines_lock:
            if self._engines is None:
                # Started once it is known here: peer() must find a connection it accepted.
                self._engines = EngineGroup(self)
                self._engines.start()
            return self._engines

    def stop(self):
        """Ask every loop and engine of the server, in any process, to stop gracefully."""
        self.counters.request_stop()
        engines = self._engines
        if engines is not None:
            engines.stop()

    def finish(self):
        """Stop the engines, wait for their drains and release them; False if there were
        none (the server never served on engines)."""
        with self._engines_lock:
            engines, self._engines = self._engines, None
            if engines is None:
                return False
            # Closed engines still name the peers of their connections: the ring may hold
            # their messages for a consumer that looks them up after the stop.
            self._finished_engines = engines
        engines.close()
        return True

    def open_connection(self, sock, client_address, ledger):
        """A StreamReceiver for a connection served by its own handler, or None when
        ``max_connections`` are open and none could be evicted (refused and logged)."""
        options = self.options
        max_connections = options.connections_limit(thread_each=True)
        receiver = self.connections.open(
            lambda connection_id: StreamReceiver(
                sock.fileno(),
                options.framer(),
                self.queue,
                self.counters,
                connection_id,
                recv_size=options.recv_size,
                idle_timeout=options.idle_timeout,
                message_timeout=options.message_timeout,
                drain_timeout=options.drain_seconds,
                partial_budget=options.max_partial_bytes,
                on_over_budget=functools.partial(
                    self.connections.relieve_memory, options.max_partial_bytes
                ),
                ledger=ledger,
            ),
            client_address,
            max_connections,
            options.evict_idle_after,
        )
        if receiver is None:
            self._refused(client_address, max_connections)
        return receiver

    def _refused(self, client_address, max_connections):
        self.counters.count_refusal()
        _log.warning(
            "too-many-connections",
            "refused %s: already receiving max_connections=%d connections",
            _escaped(client_address),
            max_connections,
        )

    def make_room(self):
        """Every handler thread is busy: evict the connection silent longest if it has been
        silent ``evict_idle_after`` seconds."""
        self.connections.make_room(self.options.evict_idle_after)

    def ledger_for_request(self):
        """Before a request process is forked: the ledger of its connection, which the
        child's loop keeps (as ``request_ledger``) and the parent settles when it reaps."""
        self.request_ledger = ConnectionLedger()
        return self.request_ledger

    def settle(self, ledger):
        """A request process was reaped: count what its loop did not close."""
        ledger.settle(self.counters)

    def peer(self, connection_id):
        """The client address of a connection, open or among the recently closed (also
        after finish())."""
        address = self.connections.peer(connection_id)
        engines = self._engines or self._finished_engines
        if address is None and engines is not None:
            address = engines.peer(connection_id)
        return address

    def peer_subject(self, connection_id):
        """The subject of the client certificate of a TLS connection, open or among the
        recently closed ("CN=client,O=Example"); None without one."""
        engines = self._engines or self._finished_engines
        return None if engines is None else engines.peer_subject(connection_id)

    def stats(self):
        return self.counters.snapshot()

    def engine_connections(self):
        """The connections each event engine holds open now, in engine order; empty while
        the server serves on none.  How evenly engine_threads share the load."""
        engines = self._engines
        return [] if engines is None else engines.connections()


class DatagramPath:
    """The compiled receive path of a datagram server: serve() runs the datagram loop on the
    server's socket (the same interface as StreamPath)."""

    serves_itself = True

    def __init__(self, server, handler):
        self.options = _checked_options(handler, datagrams=True)
        if self.options.ssl_context is not None:
            raise ValueError("ssl_context: a datagram server has no TLS (DTLS is not supported)")
        self.queue = handler.queue
        self.counters = DatagramCounters()
        self.running = None
        self._server = server

    def serve(self, interruptible):
        sock = self._server.socket
        sock.setblocking(True)
        options = self.options
        receiver = DatagramReceiver(
            sock.fileno(),
            self.queue,
            self.counters,
            max_datagram=options.max_datagram,
            batch=options.datagram_batch,
            receive_buffer=options.receive_buffer,
            busy_poll=options.datagram_busy_poll,
            drain_timeout=options.drain_seconds,
        )
        self.running = receiver
        try:
            with interruptible(receiver.stop):
                end = receiver.run()
        finally:
            self.running = None
        if end == "no_memory":
            raise MemoryError("no memory for the datagram receive loop")
        if end == "os_error":
            error = receiver.last_errno
            raise OSError(error, f"receiving datagrams: {os.strerror(error)}")

    def stop(self):
        running = self.running
        if running is not None:
            running.stop()

    def finish(self):
        return False

    def make_room(self):
        """Datagrams take no connection slots."""

    def peer(self, connection_id):
        """Datagrams carry their sender in the message's source, not a connection id."""
        return None

    def peer_subject(self, connection_id):
        """Datagrams have no TLS."""
        return None

    def stats(self):
        return self.counters.snapshot()


# The request hooks the event engine replaces (see _runs_on_engines).
_ENGINE_REPLACES = {
    "get_request": (_server.TCPServer.get_request,),
    "verify_request": (_server.BaseServer.verify_request,),
    "process_request": (_server.BaseServer.process_request, _server.ThreadingMixIn.process_request),
    "finish_request": (_server.BaseServer.finish_request,),
    "service_actions": (_server.BaseServer.service_actions,),
}


def _runs_on_engines(server, handler):
    """True unless the server overrides a request hook or the handler class its setup(),
    handle() or finish(): overrides run per connection, so they keep a handler per
    connection (thread or process) and run as they always did."""
    server_keeps_hooks = all(
        getattr(type(server), name) in defaults for name, defaults in _ENGINE_REPLACES.items()
    )
    handler_keeps_steps = all(
        getattr(handler, name) is getattr(ReceiveHandler, name)
        for name in ("setup", "handle", "finish")
    )
    return server_keeps_hooks and handler_keeps_steps


class EngineGroup:
    """A stream server's event engines on its listening socket (``engine_threads`` under
    ThreadingMixIn, else one), each driven by a thread of its own from start() (the first
    serve_forever()) until server_close()."""

    def __init__(self, path):
        server = path._server
        count = path.options.engine_threads if isinstance(server, _server.ThreadingMixIn) else 1
        self._path = path
        self._failures = []
        # Set to end serve(): by shutdown(), or by an engine that failed.
        self.serving = threading.Event()
        self.engines = [
            StreamEngine(
                path.queue,
                path.counters,
                path.options,
                listeners=[server.socket.fileno()],
                shared_listeners=count > 1,
            )
            for _ in range(count)
        ]
        self._threads = [
            threading.Thread(
                target=self._drive, args=(engine,), name=f"fastsock-engine-{index}", daemon=True
            )
            for index, engine in enumerate(self.engines)
        ]

    def start(self):
        for thread in self._threads:
            thread.start()

    def _drive(self, engine):
        try:
            while True:
                end = engine.run()
                for event in engine.take_events():
                    _report(self._path, event)
                if end != "events":
                    return
        except BaseException as exc:  # noqa: B036 - raised again by serve_forever()
            self._failures.append(exc)
            self.serving.set()

    def accept_connections(self, accepting):
        for engine in self.engines:
            engine.accept_connections(accepting)

    def raise_failure(self):
        if self._failures:
            raise self._failures.pop(0)

    def stop(self):
        """Every engine stops gracefully (see StreamEngine.stop), without waiting."""
        for engine in self.engines:
            engine.stop()

    def connections(self):
        return [engine.connections for engine in self.engines]

    def peer(self, connection_id):
        for engine in self.engines:
            address = engine.peer(connection_id)
            if address is not None:
                return address
        return None

    def peer_subject(self, connection_id):
        for engine in self.engines:
            subject = engine.peer_subject(connection_id)
            if subject is not None:
                return subject
        return None

    def close(self):
        """Stop, wait for the drains, release the engines."""
        self.stop()
        for thread in self._threads:
            thread.join()
        for engine in self.engines:
            engine.close()


def _report(path, event):
    """Log an engine's event as the per-connection handler does, and pass the errors that
    handle() would have raised to the server's handle_error()."""
    server = path._server
    peer = _escaped(event.address)
    if event.kind in _protocol_errors.BY_NAME:
        error = _protocol_error(_protocol_errors.BY_NAME[event.kind], path, peer, event.detail)
        _handle_error(server, error, event.address)
    elif event.kind in ("proxy_header", "proxy_untrusted"):
        reason, sample = event.detail if event.kind == "proxy_header" else (None, None)
        _reject_proxy(server, event.address, reason, sample)
    elif event.kind in ("tls_handshake", "tls_error"):
        what = "TLS handshake failed" if event.kind == "tls_handshake" else "TLS stream broke"
        _log.warning(
            event.kind.replace("_", "-"),
            "closed %s: %s (%s)",
            peer,
            what,
            _escaped(event.detail),
        )
    elif event.kind == "message_timeout":
        _log.warning(
            "message-timeout",
            "closed %s: a message took longer than message_timeout=%s s to arrive",
            peer,
            event.detail,
        )
    elif event.kind == "evicted_idle":
        _log.log(
            logging.INFO,
            "idle-eviction",
            "evicted %s, silent for %.1f s, to admit a new connection",
            peer,
            event.detail,
        )
    elif event.kind == "evicted_memory":
        _log.warning(
            "memory-eviction",
            "closed %s: largest holder of partial messages (%d bytes) over the budget",
            peer,
            event.detail,
        )
    elif event.kind == "refused":
        _log.warning(
            "too-many-connections",
            "refused %s: already receiving max_connections=%d connections",
            peer,
            event.detail,
        )
    elif event.kind == "accept_paused":
        _log.warning(
            "accept-exhausted",
            "%s: accepting paused for %.3f s: out of file descriptors or memory",
            type(server).__name__,
            event.detail,
        )
    elif event.kind == "no_memory":
        _handle_error(
            server, MemoryError(f"no memory to receive from {event.address!r}"), event.address
        )
    else:
        error = OSError(
            event.detail, f"receiving from {event.address!r}: {os.strerror(event.detail)}"
        )
        _handle_error(server, error, event.address)


def _protocol_error(kind, path, peer, sample):
    """Log a connection closed for a protocol error (a _protocol_errors row), with the peer
    (escaped) and the start of the offending bytes; the error to report."""
    message = f"{peer} {kind.describe(path.options)}; the connection was closed"
    _log.warning(kind.log_key, "%s (it began %s)", message, _escaped(sample))
    return kind.error(message)


def _proxy_complaint(address, reason):
    """The message of a ProxyHeaderError: what the peer at address (its real address) did,
    reason being one of fastsock.proxy.REASONS, or None for a peer outside proxy_trusted."""
    if reason is None:
        return (
            f"{_escaped(address)} is not in proxy_trusted, so it may not send a PROXY header; "
            "the connection was closed"
        )
    return f"{_escaped(address)} sent {reason}; the connection was closed"


def _proxy_error(address, reason, sample):
    """Log a connection closed for its PROXY header (with a sample of it, escaped); the
    ProxyHeaderError to report."""
    message = _proxy_complaint(address, reason)
    if sample is None:
        _log.warning("proxy-header", "%s", message)
    else:
        _log.warning("proxy-header", "%s (it began %s)", message, _escaped(sample))
    return ProxyHeaderError(message)


def _reject_proxy(server, address, reason, sample):
    """Log a connection closed for its PROXY header and pass the ProxyHeaderError to the
    server's handle_error()."""
    _handle_error(server, _proxy_error(address, reason, sample), address)


def _handle_error(server, error, client_address):
    # handle_error() reads the exception being handled, as when handle() raised it.
    try:
        raise error
    except Exception:
        server.handle_error(None, client_address)


_path_lock = threading.Lock()


def receive_path(server, handler):
    """The server's receive path: made by a fastsock server's constructor, or here on first
    use when a stdlib server runs a ReceiveHandler."""
    path = getattr(server, "receive_path", None)
    if path is None:
        with _path_lock:
            path = getattr(server, "receive_path", None)
            if path is None:
                path = server.receive_path = StreamPath(server, handler)
    return path


class ReceiveHandler(BaseRequestHandler):
    """Receives a stream connection with the compiled loop and frames it into ``queue``.

    Configure it with ``receiver(queue, ...)`` or by subclassing and setting ``queue`` and
    any of the class attributes named after the fields of ``ReceiveOptions`` (their
    defaults are its defaults).  A connection ends when the peer closes it, breaks it, stays
    silent for ``idle_timeout`` seconds, or when the server is closed.  A line or frame over
    its limit, or a malformed octet count, closes only that connection and reaches the
    server's ``handle_error`` as a ``LineTooLongError`` / ``FrameTooLargeError`` /
    ``MalformedFrameError``; the messages before it were delivered.

    Served by event engines unless the server overrides a request hook or this class its
    setup(), handle() or finish(); then each connection runs the compiled loop in its own
    handler thread or process, and the errors are raised from ``handle()``.

    With ``proxy_protocol``, each connection first sends a PROXY header (read in the handler
    thread, in Python, before the loop starts, with the engine's deadline and bounds); a bad
    one, or a peer outside ``proxy_trusted``, raises ``ProxyHeaderError``; a good one makes
    the client it names the handler's ``client_address`` and the connection's address.
    """

    queue = None

    @classmethod
    def receive_options(cls):
        """The class's options, checked: a ReceiveOptions of its attributes."""
        return ReceiveOptions(
            **{field.name: getattr(cls, field.name) for field in dataclasses.fields(ReceiveOptions)}
        )

    @classmethod
    def fastsock_receive_path(cls, server):
        """Called by the server's constructor: the receive path it keeps as
        ``receive_path``, made before any fork so that its counters are shared.  A Unix
        socket file of the compiled path is private unless the server says otherwise."""
        if server.address_family == getattr(socket, "AF_UNIX", None):
            if server.socket_mode is None:
                server.socket_mode = constants.UNIX_SOCKET_MODE
        if server.socket_type == socket.SOCK_DGRAM:
            return DatagramPath(server, cls)
        if "request_queue_size" not in vars(server) and server.request_queue_size == 5:
            server.request_queue_size = constants.COMPILED_BACKLOG
        return receive_path(server, cls)

    def setup(self):
        if self.server.socket_type == socket.SOCK_DGRAM:
            raise TypeError(
                "the compiled datagram path receives in serve_forever(); "
                "handle_request() has no datagram to give it"
            )
        self.request.settimeout(None)
        self.path = receive_path(self.server, type(self))
        self.untrusted = self.path.options.proxy_protocol and not proxy.is_trusted(
            self.client_address, self.path.proxy_trusted
        )
        if self.untrusted:
            # Never read: whatever it would send cannot be believed.  Not opened.
            self.path.counters.count_proxy_header(0, True)
            self.receiver = self.connection_id = None
            return
        self.receiver = self.path.open_connection(
            self.request, self.client_address, self.path.request_ledger
        )
        self.connection_id = None if self.receiver is None else self.receiver.source_id

    def handle(self):
        if self.untrusted:
            self.end = "proxy_untrusted"
            raise _proxy_error(self.client_address, None, None)
        if self.receiver is None:
            self.end = "refused"
            return
        if self.path.options.proxy_protocol and not self._take_proxy_header():
            return
        self.end = self.receiver.run()
        options = self.path.options
        if self.end in _protocol_errors.BY_NAME:
            sample = self.receiver.offending_sample(constants.PROTOCOL_ERROR_SAMPLE)
            self.path.connections.close(self.receiver)
            raise _protocol_error(
                _protocol_errors.BY_NAME[self.end], self.path, _escaped(self.client_address), sample
            )
        if self.end == "message_timeout":
            _log.warning(
                "message-timeout",
                "closed %s: a message took longer than message_timeout=%s s to arrive",
                _escaped(self.client_address),
                options.message_timeout,
            )
        if self.end == "no_memory":
            raise MemoryError(f"no memory to receive from {self.client_address!r}")
        if self.end == "os_error":
            error = self.receiver.last_errno
            raise OSError(error, f"receiving from {self.client_address!r}: {os.strerror(error)}")

    def _take_proxy_header(self):
        """Read the PROXY header before the compiled loop starts, never a byte past it: each
        read peeks first and takes only the header's bytes, so the loop frames the rest.
        True when the loop may run: the header was read (the connection's address is now
        the client it names, if it names one), or the peer closed before sending a byte.
        Raises ProxyHeaderError (logged, counted, the connection closed) for a bad header."""
        sock = self.request
        header = bytearray()
        peeked = b""
        deadline = time.monotonic() + constants.PROXY_HEADER_TIMEOUT
        room = max(constants.PROXY_MAX_HEADER, proxy.V1_MAX_HEADER)
        try:
            while True:
                if self.path.counters.stop_requested and not header:
                    self.end = "stopped"
                    self.path.connections.close(self.receiver)
                    return False
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise proxy.HeaderRejected(proxy.TIMED_OUT)
                # Sliced as the loop's checks are, so a stop is seen while a peer is silent.
                sock.settimeout(min(remaining, constants.RECEIVE_CHECK_INTERVAL))
                try:
                    peeked = sock.recv(room - len(header), socket.MSG_PEEK)
                except TimeoutError:
                    continue
                if not peeked:
                    if header:
                        raise proxy.HeaderRejected(proxy.TRUNCATED)
                    return True  # the loop sees the end
                parsed = proxy.parse(header + peeked)
                taking = len(peeked) if parsed is None else parsed.length - len(header)
                header += sock.recv(taking, socket.MSG_WAITALL)
                peeked = b""
                if parsed is not None:
                    break
        except proxy.HeaderRejected as exc:
            # What it sent so far is received and discarded with it.
            header += sock.recv(len(peeked), socket.MSG_WAITALL) if peeked else b""
            self.path.counters.count_proxy_header(len(header), True)
            self.end = "proxy_header"
            self.path.connections.close(self.receiver)
            sample = bytes(header[: constants.PROTOCOL_ERROR_SAMPLE])
            raise _proxy_error(self.client_address, proxy.REASONS[exc.reason], sample) from None
        except OSError:
            return True  # reset or broken: the loop sees it and ends as it would
        finally:
            sock.settimeout(None)
        self.path.counters.count_proxy_header(len(header), False)
        if parsed.address is not None:
            self.path.connections.set_peer(self.connection_id, parsed.address)
            self.client_address = parsed.address
        return True

    def finish(self):
        if self.receiver is not None:
            self.path.connections.close(self.receiver)


for _field in dataclasses.fields(ReceiveOptions):
    setattr(ReceiveHandler, _field.name, _field.default)
del _field


def _checked_options(handler, datagrams=False):
    options = handler.receive_options()
    _check_queue(handler.queue, options, datagrams)
    return options


def _check_queue(queue, options, datagrams=False):
    if not isinstance(queue, RingQueue):
        raise TypeError(f"ReceiveHandler.queue must be a fastsock.RingQueue, not {queue!r}")
    options.check_ring(queue, datagrams=datagrams)


def _escaped(value, limit=80):
    """A peer-controlled value made safe and short for a log line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def receiver(queue, options=None, **overrides):
    """A ReceiveHandler class that receives into ``queue`` (a RingQueue).

    Pass it to any server as its RequestHandlerClass.  ``options`` is a ReceiveOptions
    (default: its defaults); keyword arguments replace single fields of it, e.g.
    ``receiver(ring, framing="lines", max_line=4096)``.  ReceiveOptions documents each one.
    On a stream server every connection is framed; on a datagram server ``serve_forever()``
    runs the compiled datagram loop on the server's socket, each datagram one message with
    its sender as the message's source.  The options are checked here, so a bad one fails
    before the server starts.

    ``drain_timeout``: after ``server_close()`` (or, under prefork, a stop signal) asks the
    loops to stop, how long they still hand over what their peers sent before the stop:
    each connection is shut both ways (its peer can send no more; TCP answers further data
    with a reset, not an acknowledgement), then what the kernel holds is read, framed and
    published while the consumer drains the ring; the datagram loop reads what is queued on
    its socket.  What is left at the deadline is counted (``bytes_unread``,
    ``messages_dropped``, ``bytes_discarded``; ``datagrams_unread``).
    """
    options = dataclasses.replace(options if options is not None else ReceiveOptions(), **overrides)
    _check_queue(queue, options)
    return type(
        "ReceiveHandler",
        (ReceiveHandler,),
        {"queue": queue, **options.fields()},
    )
