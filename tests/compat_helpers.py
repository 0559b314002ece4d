"""What the drop-in tests (tests/test_compat_*.py) share: the server classes and their
shapes, the Python versions that change them, handlers (echo, failing, lifecycle-recording,
forking), server classes that record every hook call, clients of each kind, and the
stream and datagram handler runs.

Every test body of those modules runs twice, through the ``ss`` fixture
(tests/conftest.py), once against the stdlib ``socketserver`` (the oracle) and once against
``fastsock``.  Expected values are written out rather than read from the stdlib at run
time: the stdlib run proves the expectations true of CPython, the fastsock run holds
fastsock to them.
"""

import itertools
import os
import socket
import sys
import threading

import pytest

from tests.support import (
    LOCALHOST,
    NETWORK_TIMEOUT,
    connect,
    datagram_client,
    recv_until_eof,
    serving,
)

# Forked children inherit the test's client sockets, so a child whose server mishandles the
# conversation could wait forever for an EOF that it itself holds back, outliving pytest
# with its output pipe open. A handler timeout bounds every child's life.
CHILD_HANDLER_TIMEOUT = NETWORK_TIMEOUT

PY311 = sys.version_info >= (3, 11)
PY312 = sys.version_info >= (3, 12)

# Forking while pytest's helper threads (and the watchdog's) run is what these tests do on
# purpose; Python 3.12+ warns about it on every fork.
ignore_fork_with_threads_warning = pytest.mark.filterwarnings(
    "ignore:This process .* is multi-threaded:DeprecationWarning"
)

# name: (address family, socket type, concurrency mix-in or None)
SERVER_SHAPES = {
    "TCPServer": (socket.AF_INET, socket.SOCK_STREAM, None),
    "UDPServer": (socket.AF_INET, socket.SOCK_DGRAM, None),
    "UnixStreamServer": (socket.AF_UNIX, socket.SOCK_STREAM, None),
    "UnixDatagramServer": (socket.AF_UNIX, socket.SOCK_DGRAM, None),
    "ThreadingTCPServer": (socket.AF_INET, socket.SOCK_STREAM, "ThreadingMixIn"),
    "ThreadingUDPServer": (socket.AF_INET, socket.SOCK_DGRAM, "ThreadingMixIn"),
    "ThreadingUnixStreamServer": (socket.AF_UNIX, socket.SOCK_STREAM, "ThreadingMixIn"),
    "ThreadingUnixDatagramServer": (socket.AF_UNIX, socket.SOCK_DGRAM, "ThreadingMixIn"),
    "ForkingTCPServer": (socket.AF_INET, socket.SOCK_STREAM, "ForkingMixIn"),
    "ForkingUDPServer": (socket.AF_INET, socket.SOCK_DGRAM, "ForkingMixIn"),
}
if PY312:
    SERVER_SHAPES["ForkingUnixStreamServer"] = (socket.AF_UNIX, socket.SOCK_STREAM, "ForkingMixIn")
    SERVER_SHAPES["ForkingUnixDatagramServer"] = (socket.AF_UNIX, socket.SOCK_DGRAM, "ForkingMixIn")


def server_address_for(family, sock_dir, name="server.sock"):
    if family == socket.AF_UNIX:
        return os.path.join(sock_dir, name)
    return (LOCALHOST, 0)


_client_numbers = itertools.count()


def exchange(server, payload, sock_dir):
    """Send `payload` to `server` as a client of its kind would, and return the reply."""
    family = server.address_family
    if server.socket_type == socket.SOCK_STREAM:
        with connect(server.server_address, family) as client:
            client.sendall(payload)
            return recv_until_eof(client)
    client_address = server_address_for(family, sock_dir, f"client-{next(_client_numbers)}.sock")
    with datagram_client(family, client_address) as client:
        client.sendto(payload, server.server_address)
        return client.recv(65536)


def upper_echo_handler(ss, socket_type=socket.SOCK_STREAM):
    """A handler that replies with its request upper-cased: one line over a stream, one
    packet over datagrams."""
    if socket_type == socket.SOCK_STREAM:

        class UpperLine(ss.StreamRequestHandler):
            timeout = CHILD_HANDLER_TIMEOUT

            def handle(self):
                self.wfile.write(self.rfile.readline().upper())

        return UpperLine

    class UpperPacket(ss.DatagramRequestHandler):
        def handle(self):
            self.wfile.write(self.rfile.read().upper())

    return UpperPacket


def failing_handler(ss, exception):
    class Failing(ss.BaseRequestHandler):
        def handle(self):
            raise exception

    return Failing


SERVER_HOOKS = (
    "server_bind",
    "server_activate",
    "get_request",
    "verify_request",
    "process_request",
    "finish_request",
    "shutdown_request",
    "close_request",
    "handle_error",
    "handle_timeout",
    "service_actions",
    "server_close",
)


def recording(server_class):
    """A subclass of `server_class` that appends (hook name, calling thread) to
    `self.calls` at every hook call, then runs the hook as `server_class` would."""

    def __init__(self, *args, **kwargs):
        self.calls = []
        server_class.__init__(self, *args, **kwargs)

    def logged(name, method):
        def hook(self, *args, **kwargs):
            self.calls.append((name, threading.current_thread()))
            return method(self, *args, **kwargs)

        return hook

    namespace = {name: logged(name, getattr(server_class, name)) for name in SERVER_HOOKS}
    namespace["__init__"] = __init__
    return type(f"Recording{server_class.__name__}", (server_class,), namespace)


def hook_names(server, in_main_thread=None):
    """The hooks `server` called, in order; only those called in (or out of) the main
    thread if `in_main_thread` is given."""
    main = threading.main_thread()
    return [
        name
        for name, thread in server.calls
        if in_main_thread is None or (thread is main) == in_main_thread
    ]


REQUEST_HOOKS = [
    "get_request",
    "verify_request",
    "process_request",
    "finish_request",
    "shutdown_request",
    "close_request",
]


def lifecycle_handler(ss, events, failing_step=None):
    """A handler that logs its steps to `events` and raises ValueError in `failing_step`."""

    class Lifecycle(ss.BaseRequestHandler):
        def step(self, name):
            events.append(name)
            if name == failing_step:
                raise ValueError(name)

        def setup(self):
            events.append((self.request, self.client_address, self.server))
            self.step("setup")

        def handle(self):
            self.step("handle")

        def finish(self):
            self.step("finish")

    return Lifecycle


def stream_handler_run(ss, handle, client_talk, **handler_attributes):
    """Serve one connection with a StreamRequestHandler whose handle() is `handle` and
    whose class attributes are `handler_attributes`, while `client_talk(client)` runs as
    the client; return the handler instance."""
    handlers = []

    class Handler(ss.StreamRequestHandler):
        def handle(self):
            handlers.append(self)
            handle(self)

    for attribute, value in handler_attributes.items():
        setattr(Handler, attribute, value)
    with serving(ss.TCPServer((LOCALHOST, 0), Handler)) as server:
        with connect(server.server_address) as client:
            client_talk(client)
    (handler,) = handlers
    return handler


def datagram_handler_run(ss, handle, packet, server_class_name="UDPServer", **server_attributes):
    """Serve one datagram with a DatagramRequestHandler whose handle() is `handle`; return
    (the handler, the server, the reply datagram, the client's address)."""
    handlers = []

    class Handler(ss.DatagramRequestHandler):
        def handle(self):
            handlers.append(self)
            handle(self)

    server_class = type("Server", (getattr(ss, server_class_name),), server_attributes)
    with server_class((LOCALHOST, 0), Handler) as server:
        server.timeout = NETWORK_TIMEOUT
        with datagram_client(bind_to=(LOCALHOST, 0)) as client:
            client.sendto(packet, server.server_address)
            server.handle_request()
            reply = client.recv(65536)
            client_address = client.getsockname()
    (handler,) = handlers
    return handler, server, reply, client_address


def pid_then_wait_handler(ss):
    class PidThenWait(ss.StreamRequestHandler):
        """Writes its process's pid, then waits for one line from the client."""

        timeout = CHILD_HANDLER_TIMEOUT

        def handle(self):
            self.wfile.write(b"%d\n" % os.getpid())
            self.rfile.readline()

    return PidThenWait
