"""The compiled fast path: a request handler that hands each stream connection to the
compiled receive loop, which frames what arrives into a RingQueue without the GIL; on a
datagram server, the compiled datagram loop takes over the server's socket."""

import dataclasses
import functools
import logging
import os
import socket
import threading
from collections import OrderedDict

from . import constants
from . import server as _server
from ._impl import (
    ConnectionLedger,
    DatagramCounters,
    DatagramReceiver,
    Framer,
    ReceiveCounters,
    RingQueue,
    StreamEngine,
    StreamReceiver,
)
from ._ratelimit import RateLimitedLogger
from .errors import FrameTooLargeError, LineTooLongError
from .server import BaseRequestHandler

_log = RateLimitedLogger(logging.getLogger("fastsock"), constants.ERROR_LOG_INTERVAL)

__all__ = [
    "DatagramRegistry",
    "ReceiveHandler",
    "ReceiveRegistry",
    "receive_registry",
    "receiver",
]


class ReceiveRegistry:
    """A server's compiled receive loops: their shared counters, connection ids and peers.

    Created before any fork, its counters live in shared memory, so forked children add to
    the same numbers the parent reads.
    """

    def __init__(self):
        self.counters = ReceiveCounters()
        self.connections_refused = 0
        # In a forked request process: the ledger its parent keeps for its connection.
        self.request_ledger = None
        self._engine_group = None
        self._lock = threading.Lock()
        self._receivers = {}
        self._evicting = {}
        self._peers = OrderedDict()

    def open(self, make_receiver, client_address, max_connections, evict_idle_after):
        """Register a new connection: make_receiver(connection_id) builds its receiver.

        When this process already receives ``max_connections`` connections, the one silent
        longest is evicted if it has been silent ``evict_idle_after`` seconds; otherwise
        None: the refusal is counted in ``connections_refused``.
        """
        with self._lock:
            if len(self._receivers) >= max_connections:
                evicted = self._evict_idlest(evict_idle_after)
                if evicted is None:
                    self.connections_refused += 1
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

    def stop_all(self):
        """Ask every loop and engine of the server, in any process, to stop gracefully."""
        self.counters.request_stop()
        group = self._engine_group
        if group is not None:
            group.stop()

    def engines_for(self, server, handler):
        """The server's EngineGroup, started by the first call."""
        with self._lock:
            if self._engine_group is None:
                self._engine_group = EngineGroup(server, handler, self)
            return self._engine_group

    def finish_engines(self):
        """Stop the engines, wait for their drains and release them; False if there were
        none (the server never served on engines)."""
        with self._lock:
            group, self._engine_group = self._engine_group, None
        if group is None:
            return False
        group.close()
        return True

    def ledger_for_request(self):
        """Before a request process is forked: the ledger of its connection, which the
        child's loop keeps (as ``request_ledger``) and the parent settles when it reaps."""
        self.request_ledger = ConnectionLedger()
        return self.request_ledger

    def settle(self, ledger):
        """A request process was reaped: count what its loop did not close."""
        ledger.settle(self.counters)

    def peer(self, connection_id):
        """The client address of a connection, open or among the recently closed."""
        with self._lock:
            address = self._peers.get(connection_id)
            group = self._engine_group
        if address is None and group is not None:
            address = group.peer(connection_id)
        return address

    def stats(self):
        return dataclasses.replace(
            self.counters.snapshot(), connections_refused=self.connections_refused
        )


class DatagramRegistry:
    """A datagram server's compiled loop: its shared counters and the loop now running."""

    def __init__(self):
        self.counters = DatagramCounters()
        self.running = None

    def stop_all(self):
        running = self.running
        if running is not None:
            running.stop()

    def peer(self, connection_id):
        """Datagrams carry their sender in the message's source, not a connection id."""
        return None

    def stats(self):
        return self.counters.snapshot()


def _serve_datagrams(server, handler, registry, poll_interval):
    # poll_interval is not needed: shutdown() interrupts the loop directly.
    server.socket.setblocking(True)
    receiver = DatagramReceiver(
        server.socket.fileno(),
        handler.queue,
        registry.counters,
        max_datagram=handler.max_datagram,
        batch=handler.datagram_batch,
        receive_buffer=handler.receive_buffer,
        busy_poll=handler.datagram_busy_poll,
        drain_timeout=handler.drain_timeout or 0.0,
    )
    registry.running = receiver
    try:
        with server._interruptible_by_shutdown(receiver.stop):
            end = receiver.run()
    finally:
        registry.running = None
    if end == "no_memory":
        raise MemoryError("no memory for the datagram receive loop")
    if end == "os_error":
        error = receiver.last_errno
        raise OSError(error, f"receiving datagrams: {os.strerror(error)}")


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


def _serve_streams(server, handler, registry, poll_interval):
    """serve_forever() of a stream server on event engines: they accept until shutdown();
    the connections they hold are served until server_close(), as handler threads would
    serve theirs."""
    # poll_interval is not needed: nothing here polls; shutdown() wakes this thread.
    engines = registry.engines_for(server, handler)
    shut_down = threading.Event()
    engines.accept_connections(True)
    try:
        with server._interruptible_by_shutdown(shut_down.set):
            shut_down.wait()
    finally:
        engines.accept_connections(False)
    engines.raise_failure()


class EngineGroup:
    """A stream server's event engines on its listening socket (``engine_threads`` under
    ThreadingMixIn, else one), each driven by a thread of its own from the first
    serve_forever() until server_close()."""

    def __init__(self, server, handler, registry):
        count = handler.engine_threads if isinstance(server, _server.ThreadingMixIn) else 1
        self._server = server
        self._handler = handler
        self._registry = registry
        self._failures = []
        self.engines = [_make_engine(server, handler, registry) for _ in range(count)]
        self._threads = [
            threading.Thread(
                target=self._drive, args=(engine,), name=f"fastsock-engine-{index}", daemon=True
            )
            for index, engine in enumerate(self.engines)
        ]
        for thread in self._threads:
            thread.start()

    def _drive(self, engine):
        try:
            while True:
                end = engine.run()
                for event in engine.take_events():
                    _report(self._server, self._handler, self._registry, event)
                if end != "events":
                    return
        except BaseException as exc:  # noqa: B036 - raised again by serve_forever()
            self._failures.append(exc)
            self._server._request_shutdown()

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

    def peer(self, connection_id):
        for engine in self.engines:
            address = engine.peer(connection_id)
            if address is not None:
                return address
        return None

    def close(self):
        """Stop, wait for the drains, release the engines."""
        self.stop()
        for thread in self._threads:
            thread.join()
        for engine in self.engines:
            engine.close()


def _make_engine(server, handler, registry):
    return StreamEngine(
        handler.queue,
        registry.counters,
        listeners=[server.socket.fileno()],
        framing=handler.framing,
        delimiter=handler.delimiter,
        keep_delimiter=handler.keep_delimiter,
        max_line=handler.max_line,
        max_frame=handler.max_frame,
        recv_size=handler.recv_size,
        idle_timeout=handler.idle_timeout,
        message_timeout=handler.message_timeout,
        drain_timeout=handler.drain_timeout or 0.0,
        max_connections=handler.max_connections,
        evict_idle_after=handler.evict_idle_after,
        partial_budget=handler.max_partial_bytes,
    )


_FRAMING_ERRORS = {
    "line_too_long": (LineTooLongError, "sent a line longer than max_line={} bytes", "max_line"),
    "frame_too_large": (
        FrameTooLargeError,
        "announced a frame larger than max_frame={} bytes",
        "max_frame",
    ),
}


def _report(server, handler, registry, event):
    """Log an engine's event as the per-connection handler does, and pass the errors that
    handle() would have raised to the server's handle_error()."""
    peer = _escaped(event.address)
    if event.kind in _FRAMING_ERRORS:
        error_class, what, limit = _FRAMING_ERRORS[event.kind]
        message = f"{peer} {what.format(getattr(handler, limit))}; the connection was closed"
        _log.warning("protocol-error", "%s (it began %s)", message, _escaped(event.detail))
        _handle_error(server, error_class(message), event.address)
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
        registry.connections_refused += 1
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


def _handle_error(server, error, client_address):
    # handle_error() reads the exception being handled, as when handle() raised it.
    try:
        raise error
    except Exception:
        server.handle_error(None, client_address)


_registry_lock = threading.Lock()


def receive_registry(server):
    """The server's ReceiveRegistry, created on first use."""
    registry = vars(server).get("_receive_registry")
    if registry is None:
        with _registry_lock:
            registry = vars(server).get("_receive_registry")
            if registry is None:
                registry = server._receive_registry = ReceiveRegistry()
    return registry


class ReceiveHandler(BaseRequestHandler):
    """Receives a stream connection with the compiled loop and frames it into ``queue``.

    Configure it with ``receiver(queue, ...)`` or by subclassing and setting the class
    attributes below.  The handler returns when the peer closes the connection, breaks it,
    stays silent for ``idle_timeout`` seconds, or when the server is closed.  A line or
    frame over its limit raises ``LineTooLongError`` / ``FrameTooLargeError`` from
    ``handle()``, so the server reports it through ``handle_error`` and closes only that
    connection; the messages before it were delivered.
    """

    queue = None
    framing = "raw"
    delimiter = constants.LINE_DELIMITER
    keep_delimiter = False
    max_line = constants.MAX_LINE_LENGTH
    max_frame = constants.MAX_FRAME_SIZE
    recv_size = constants.RECV_SIZE
    idle_timeout = constants.IDLE_TIMEOUT
    message_timeout = constants.MESSAGE_TIMEOUT
    drain_timeout = constants.SHUTDOWN_DRAIN_TIMEOUT
    max_connections = None
    evict_idle_after = constants.EVICT_IDLE_AFTER
    max_partial_bytes = constants.MAX_PARTIAL_BYTES
    max_datagram = constants.DATAGRAM_MAX_SIZE
    datagram_batch = constants.DATAGRAM_BATCH
    datagram_busy_poll = constants.DATAGRAM_BUSY_POLL
    receive_buffer = None
    engine_threads = 1

    @classmethod
    def fastsock_prepare_server(cls, server):
        """Called by the server's constructor: the counters must exist before any fork, and
        a Unix socket file of the compiled path is private unless the server says
        otherwise."""
        if server.address_family == getattr(socket, "AF_UNIX", None):
            if server.socket_mode is None:
                server.socket_mode = constants.UNIX_SOCKET_MODE
        if server.socket_type == socket.SOCK_DGRAM:
            _check_message_size(cls.queue, "datagram", cls.max_datagram)
            registry = server._receive_registry = DatagramRegistry()
            server._compiled_serve = functools.partial(_serve_datagrams, server, cls, registry)
            return
        _check_fits(
            cls.queue, cls.framing, cls.delimiter, cls.max_line, cls.max_frame, cls.recv_size
        )
        if "request_queue_size" not in vars(server) and server.request_queue_size == 5:
            server.request_queue_size = constants.COMPILED_BACKLOG
        registry = receive_registry(server)
        if _runs_on_engines(server, cls):
            server._compiled_serve = functools.partial(_serve_streams, server, cls, registry)
            return
        server._make_room_for_connection = functools.partial(
            registry.make_room, cls.evict_idle_after
        )

    def setup(self):
        if self.server.socket_type == socket.SOCK_DGRAM:
            raise TypeError(
                "the compiled datagram path receives in serve_forever(); "
                "handle_request() has no datagram to give it"
            )
        _check_fits(
            self.queue, self.framing, self.delimiter, self.max_line, self.max_frame, self.recv_size
        )
        framer = Framer(
            self.framing,
            delimiter=self.delimiter,
            keep_delimiter=self.keep_delimiter,
            max_line=self.max_line,
            max_frame=self.max_frame,
        )
        self.request.settimeout(None)
        self.registry = receive_registry(self.server)
        max_connections = self.max_connections or constants.default_max_connections()
        self.receiver = self.registry.open(
            lambda connection_id: StreamReceiver(
                self.request.fileno(),
                framer,
                self.queue,
                self.registry.counters,
                connection_id,
                recv_size=self.recv_size,
                idle_timeout=self.idle_timeout,
                message_timeout=self.message_timeout,
                drain_timeout=self.drain_timeout or 0.0,
                partial_budget=self.max_partial_bytes,
                on_over_budget=functools.partial(
                    self.registry.relieve_memory, self.max_partial_bytes
                ),
                ledger=self.registry.request_ledger,
            ),
            self.client_address,
            max_connections,
            self.evict_idle_after,
        )
        if self.receiver is None:
            _log.warning(
                "too-many-connections",
                "refused %s: already receiving max_connections=%d connections",
                _escaped(self.client_address),
                max_connections,
            )
            self.connection_id = None
            return
        self.connection_id = self.receiver.source_id

    def handle(self):
        if self.receiver is None:
            self.end = "refused"
            return
        self.end = self.receiver.run()
        if self.end == "line_too_long":
            self._reject(
                LineTooLongError,
                f"sent a line longer than max_line={self.max_line} bytes",
            )
        if self.end == "frame_too_large":
            self._reject(
                FrameTooLargeError,
                f"announced a frame larger than max_frame={self.max_frame} bytes",
            )
        if self.end == "message_timeout":
            _log.warning(
                "message-timeout",
                "closed %s: a message took longer than message_timeout=%s s to arrive",
                _escaped(self.client_address),
                self.message_timeout,
            )
        if self.end == "no_memory":
            raise MemoryError(f"no memory to receive from {self.client_address!r}")
        if self.end == "os_error":
            error = self.receiver.last_errno
            raise OSError(error, f"receiving from {self.client_address!r}: {os.strerror(error)}")

    def _reject(self, error_class, what):
        sample = self.receiver.offending_sample(constants.PROTOCOL_ERROR_SAMPLE)
        self.registry.close(self.receiver)
        message = f"{_escaped(self.client_address)} {what}; the connection was closed"
        _log.warning("protocol-error", "%s (it began %s)", message, _escaped(sample))
        raise error_class(message)

    def finish(self):
        if self.receiver is not None:
            self.registry.close(self.receiver)


def _escaped(value, limit=80):
    """A peer-controlled value made safe and short for a log line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_fits(queue, framing, delimiter, max_line, max_frame, recv_size):
    largest = {
        "raw": recv_size,
        "lines": max_line + len(delimiter),
        "length": max_frame,
    }.get(framing, 0)
    _check_message_size(queue, repr(framing), largest)


def _check_message_size(queue, kind, largest):
    if not isinstance(queue, RingQueue):
        raise TypeError(f"ReceiveHandler.queue must be a fastsock.RingQueue, not {queue!r}")
    if largest > queue.max_bytes:
        raise ValueError(
            f"a {kind} message may reach {largest} bytes, more than the queue's "
            f"max_bytes={queue.max_bytes}: raise max_bytes or lower the limit"
        )


def receiver(
    queue,
    *,
    framing="raw",
    delimiter=constants.LINE_DELIMITER,
    keep_delimiter=False,
    max_line=constants.MAX_LINE_LENGTH,
    max_frame=constants.MAX_FRAME_SIZE,
    recv_size=constants.RECV_SIZE,
    idle_timeout=constants.IDLE_TIMEOUT,
    message_timeout=constants.MESSAGE_TIMEOUT,
    drain_timeout=constants.SHUTDOWN_DRAIN_TIMEOUT,
    max_connections=None,
    evict_idle_after=constants.EVICT_IDLE_AFTER,
    max_partial_bytes=constants.MAX_PARTIAL_BYTES,
    max_datagram=constants.DATAGRAM_MAX_SIZE,
    datagram_batch=constants.DATAGRAM_BATCH,
    datagram_busy_poll=constants.DATAGRAM_BUSY_POLL,
    receive_buffer=None,
    engine_threads=1,
):
    """A ReceiveHandler class that receives into ``queue``.

    Pass it to any server as its RequestHandlerClass.  On a stream server every
    connection is framed (``framing`` through ``max_partial_bytes``); on a datagram server
    ``serve_forever()`` runs the compiled datagram loop on the server's socket, each
    datagram one message with its sender as the message's source (the options from
    ``max_datagram``).  The options are checked here, so a bad one fails before the server
    starts.

    ``drain_timeout``: after ``server_close()`` (or, under prefork, a stop signal) asks the
    loops to stop, how long they still hand over what their peers sent before the stop:
    each connection is shut both ways (its peer can send no more; TCP answers further data
    with a reset, not an acknowledgement), then what the kernel holds is read, framed and
    published while the consumer drains the ring; the datagram loop reads what is queued on
    its socket.  What is left at the deadline is counted (``bytes_unread``,
    ``messages_dropped``, ``bytes_discarded``; ``datagrams_unread``).  None or 0: count at
    once.  ``evict_idle_after``: when
    ``max_connections`` are open (or every ``max_threads`` thread is busy), the connection
    silent longest is closed for a new one if it has been silent this long.
    ``max_partial_bytes``: incomplete messages held by all connections of the process
    together; above it the largest holder is closed (None: no cap).
    ``datagram_busy_poll``: seconds the datagram loop keeps asking for more, without
    sleeping, after a busy batch (0: sleep at once; see constants.DATAGRAM_BUSY_POLL).
    """
    _check_fits(queue, framing, delimiter, max_line, max_frame, recv_size)
    Framer(
        framing,
        delimiter=delimiter,
        keep_delimiter=keep_delimiter,
        max_line=max_line,
        max_frame=max_frame,
    )
    if not isinstance(recv_size, int) or recv_size < 1:
        raise ValueError(f"recv_size must be a positive int, not {recv_size!r}")
    if idle_timeout is not None and not idle_timeout > 0:
        raise ValueError(f"idle_timeout must be positive or None, not {idle_timeout!r}")
    if message_timeout is not None and not message_timeout > 0:
        raise ValueError(f"message_timeout must be positive or None, not {message_timeout!r}")
    if max_connections is not None and (
        not isinstance(max_connections, int) or max_connections < 1
    ):
        raise ValueError(f"max_connections must be a positive int, not {max_connections!r}")
    if drain_timeout is not None and not drain_timeout >= 0:
        raise ValueError(f"drain_timeout must be >= 0 or None, not {drain_timeout!r}")
    if not evict_idle_after >= 0:
        raise ValueError(f"evict_idle_after must be >= 0, not {evict_idle_after!r}")
    if not 0 <= datagram_busy_poll <= constants.RECEIVE_CHECK_INTERVAL:
        raise ValueError(
            f"datagram_busy_poll must be between 0 and {constants.RECEIVE_CHECK_INTERVAL} "
            f"seconds, not {datagram_busy_poll!r}"
        )
    if max_partial_bytes is not None and not max_partial_bytes > 0:
        raise ValueError(f"max_partial_bytes must be positive or None, not {max_partial_bytes!r}")
    if not isinstance(engine_threads, int) or engine_threads < 1:
        raise ValueError(f"engine_threads must be a positive int, not {engine_threads!r}")
    return type(
        "ReceiveHandler",
        (ReceiveHandler,),
        {
            "queue": queue,
            "framing": framing,
            "delimiter": delimiter,
            "keep_delimiter": keep_delimiter,
            "max_line": max_line,
            "max_frame": max_frame,
            "recv_size": recv_size,
            "idle_timeout": idle_timeout,
            "message_timeout": message_timeout,
            "drain_timeout": drain_timeout,
            "max_connections": max_connections,
            "evict_idle_after": evict_idle_after,
            "max_partial_bytes": max_partial_bytes,
            "max_datagram": max_datagram,
            "datagram_batch": datagram_batch,
            "datagram_busy_poll": datagram_busy_poll,
            "receive_buffer": receive_buffer,
            "engine_threads": engine_threads,
        },
    )
