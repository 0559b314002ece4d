"""The drop-in promise: every test body here runs twice, through the ``ss`` fixture, once
against the stdlib ``socketserver`` (the oracle) and once against ``fastsock``.

Expected values are written out rather than read from the stdlib at run time: the stdlib
run proves the expectations true of CPython, the fastsock run holds fastsock to them.
"""

import errno
import inspect
import io
import itertools
import os
import selectors
import socket
import sys
import threading

import pytest

from tests.support import (
    LOCALHOST,
    NETWORK_TIMEOUT,
    call_bounded,
    connect,
    datagram_client,
    open_fd_count,
    recv_line,
    recv_until_eof,
    serving,
    start_thread,
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

HANDLER_NAMES = ("BaseRequestHandler", "StreamRequestHandler", "DatagramRequestHandler")
MIXIN_NAMES = ("ThreadingMixIn", "ForkingMixIn")
PUBLIC_NAMES = {"BaseServer", *SERVER_SHAPES, *MIXIN_NAMES, *HANDLER_NAMES}

_TCP = ["TCPServer", "BaseServer", "object"]
_UDP = ["UDPServer", *_TCP]
_UNIX_STREAM = ["UnixStreamServer", *_TCP]
_UNIX_DATAGRAM = ["UnixDatagramServer", *_UDP]
EXPECTED_MRO = {
    "BaseServer": ["BaseServer", "object"],
    "TCPServer": _TCP,
    "UDPServer": _UDP,
    "UnixStreamServer": _UNIX_STREAM,
    "UnixDatagramServer": _UNIX_DATAGRAM,
    "ThreadingMixIn": ["ThreadingMixIn", "object"],
    "ForkingMixIn": ["ForkingMixIn", "object"],
    "ThreadingTCPServer": ["ThreadingTCPServer", "ThreadingMixIn", *_TCP],
    "ThreadingUDPServer": ["ThreadingUDPServer", "ThreadingMixIn", *_UDP],
    "ThreadingUnixStreamServer": ["ThreadingUnixStreamServer", "ThreadingMixIn", *_UNIX_STREAM],
    "ThreadingUnixDatagramServer": [
        "ThreadingUnixDatagramServer",
        "ThreadingMixIn",
        *_UNIX_DATAGRAM,
    ],
    "ForkingTCPServer": ["ForkingTCPServer", "ForkingMixIn", *_TCP],
    "ForkingUDPServer": ["ForkingUDPServer", "ForkingMixIn", *_UDP],
    "BaseRequestHandler": ["BaseRequestHandler", "object"],
    "StreamRequestHandler": ["StreamRequestHandler", "BaseRequestHandler", "object"],
    "DatagramRequestHandler": ["DatagramRequestHandler", "BaseRequestHandler", "object"],
}
if PY312:
    EXPECTED_MRO["ForkingUnixStreamServer"] = [
        "ForkingUnixStreamServer",
        "ForkingMixIn",
        *_UNIX_STREAM,
    ]
    EXPECTED_MRO["ForkingUnixDatagramServer"] = [
        "ForkingUnixDatagramServer",
        "ForkingMixIn",
        *_UNIX_DATAGRAM,
    ]


def expected_class_attributes(name):
    """The documented class attributes of public class `name` and their defaults."""
    threading_defaults = {"daemon_threads": False, "block_on_close": True}
    forking_defaults = {
        "timeout": 300,
        "active_children": None,
        "max_children": 40,
        "block_on_close": True,
    }
    if name == "BaseServer":
        return {"timeout": None}
    if name == "ThreadingMixIn":
        return threading_defaults
    if name == "ForkingMixIn":
        return forking_defaults
    if name == "StreamRequestHandler":
        return {"rbufsize": -1, "wbufsize": 0, "timeout": None, "disable_nagle_algorithm": False}
    family, kind, mixin = SERVER_SHAPES[name]
    expected = {
        "timeout": None,
        "address_family": family,
        "socket_type": kind,
        "request_queue_size": 5,
        "allow_reuse_address": False,
    }
    if PY311:
        expected["allow_reuse_port"] = False
    if kind == socket.SOCK_DGRAM:
        expected["max_packet_size"] = 8192
    if mixin == "ThreadingMixIn":
        expected |= threading_defaults
    if mixin == "ForkingMixIn":
        expected |= forking_defaults
    return expected


def typed(mapping):
    """`mapping` with each value paired with its type: False must not pass for 0."""
    return {key: (type(value), value) for key, value in mapping.items()}


_SERVER_CONSTRUCTOR = "server_address, RequestHandlerClass, bind_and_activate=True"
_HANDLER_CONSTRUCTOR = "request, client_address, server"

BASE_SERVER_METHODS = {
    "serve_forever": "self, poll_interval=0.5",
    "shutdown": "self",
    "service_actions": "self",
    "handle_request": "self",
    "handle_timeout": "self",
    "server_activate": "self",
    "server_close": "self",
    "verify_request": "self, request, client_address",
    "process_request": "self, request, client_address",
    "finish_request": "self, request, client_address",
    "shutdown_request": "self, request",
    "close_request": "self, request",
    "handle_error": "self, request, client_address",
    "__enter__": "self",
    "__exit__": "self, *args",
}
SOCKET_SERVER_METHODS = BASE_SERVER_METHODS | {
    "server_bind": "self",
    "fileno": "self",
    "get_request": "self",
}
THREADING_METHODS = {
    "process_request": "self, request, client_address",
    "process_request_thread": "self, request, client_address",
    "server_close": "self",
}
FORKING_METHODS = {
    "collect_children": "self, *, blocking=False",
    "handle_timeout": "self",
    "service_actions": "self",
    "process_request": "self, request, client_address",
    "server_close": "self",
}
HANDLER_METHODS = {"setup": "self", "handle": "self", "finish": "self"}


def expected_signatures(name):
    """{callable name: parameter list} for public class `name`; "" names the class itself."""
    if name == "BaseServer":
        return {"": "server_address, RequestHandlerClass"} | BASE_SERVER_METHODS
    if name == "ThreadingMixIn":
        return THREADING_METHODS
    if name == "ForkingMixIn":
        return FORKING_METHODS
    if name in HANDLER_NAMES:
        return {"": _HANDLER_CONSTRUCTOR} | HANDLER_METHODS
    mixin = SERVER_SHAPES[name][2]
    mixin_methods = {"ThreadingMixIn": THREADING_METHODS, "ForkingMixIn": FORKING_METHODS}
    return {"": _SERVER_CONSTRUCTOR} | SOCKET_SERVER_METHODS | mixin_methods.get(mixin, {})


def parameters_of(parameter_list):
    """The inspect.Parameter objects of a parameter list written as in a `def`."""
    return list(inspect.signature(eval(f"lambda {parameter_list}: None")).parameters.values())


def describe(parameters):
    return [(p.name, p.kind.name, p.default) for p in parameters]


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


# -- Public names ----------------------------------------------------------------------


def test_all_lists_exactly_the_stdlib_names(ss):
    assert len(ss.__all__) == len(set(ss.__all__)), "__all__ has duplicates"
    assert set(ss.__all__) == PUBLIC_NAMES


def test_star_import_gives_exactly_the_public_classes(ss):
    namespace = {}
    exec(f"from {ss.__name__} import *", namespace)
    del namespace["__builtins__"]
    assert set(namespace) == PUBLIC_NAMES
    assert all(inspect.isclass(value) for value in namespace.values())


@pytest.mark.parametrize("name", sorted(EXPECTED_MRO))
def test_class_hierarchy(ss, name):
    mro = getattr(ss, name).__mro__
    assert [klass.__name__ for klass in mro] == EXPECTED_MRO[name]
    # The classes in the MRO are the module's own public classes, not look-alikes.
    for klass in mro[:-1]:
        assert getattr(ss, klass.__name__) is klass


def test_issubclass_relations_among_public_classes(ss):
    for name, other in itertools.product(sorted(EXPECTED_MRO), repeat=2):
        expected = other in EXPECTED_MRO[name]
        assert issubclass(getattr(ss, name), getattr(ss, other)) == expected, (name, other)


# BaseRequestHandler and DatagramRequestHandler document no class attributes.
@pytest.mark.parametrize(
    "name", sorted(PUBLIC_NAMES - {"BaseRequestHandler", "DatagramRequestHandler"})
)
def test_class_attribute_defaults(ss, name):
    expected = expected_class_attributes(name)
    klass = getattr(ss, name)
    actual = {attribute: getattr(klass, attribute, "<missing>") for attribute in expected}
    assert typed(actual) == typed(expected)


@pytest.mark.parametrize("name", sorted(PUBLIC_NAMES))
def test_signatures_extend_the_stdlib_ones(ss, name):
    """Stdlib parameters come first, unchanged; fastsock may add keyword-only ones with
    defaults after them, which no existing call can collide with."""
    klass = getattr(ss, name)
    for attribute, parameter_list in expected_signatures(name).items():
        target = getattr(klass, attribute) if attribute else klass
        expected = parameters_of(parameter_list)
        actual = list(inspect.signature(target).parameters.values())
        where = f"{name}.{attribute or '__init__'}"
        assert describe(actual[: len(expected)]) == describe(expected), where
        for extra in actual[len(expected) :]:
            assert extra.kind is inspect.Parameter.KEYWORD_ONLY, (where, extra)
            assert extra.default is not inspect.Parameter.empty, (where, extra)


def test_server_instance_attributes(ss):
    handler = upper_echo_handler(ss)
    with ss.TCPServer((LOCALHOST, 0), handler) as server:
        assert server.RequestHandlerClass is handler
        assert isinstance(server.socket, socket.socket)
        assert server.socket.family == socket.AF_INET
        assert server.socket.type == socket.SOCK_STREAM
        assert server.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
    with ss.UDPServer((LOCALHOST, 0), upper_echo_handler(ss, socket.SOCK_DGRAM)) as server:
        assert server.socket.type == socket.SOCK_DGRAM
        assert server.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 0


# -- Serving each kind of server -------------------------------------------------------


@ignore_fork_with_threads_warning
@pytest.mark.parametrize("name", sorted(SERVER_SHAPES))
def test_echo_through_every_server_class(ss, name, sock_dir, reap_children):
    family, kind, _ = SERVER_SHAPES[name]
    server_class = getattr(ss, name)
    handler = upper_echo_handler(ss, kind)
    with serving(server_class(server_address_for(family, sock_dir), handler)) as server:
        for payload in (b"hello\n", b"second request\n"):
            assert exchange(server, payload, sock_dir) == payload.upper()


def test_server_address_is_the_bound_address_after_binding_port_zero(ss):
    with ss.TCPServer((LOCALHOST, 0), upper_echo_handler(ss)) as server:
        assert server.server_address == server.socket.getsockname()
        assert server.server_address[0] == LOCALHOST
        assert server.server_address[1] != 0
    with ss.UDPServer((LOCALHOST, 0), upper_echo_handler(ss, socket.SOCK_DGRAM)) as server:
        assert server.server_address == server.socket.getsockname()
        assert server.server_address[1] != 0


def test_ipv6_server_on_loopback(ss):
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")

    class TCPServerV6(ss.TCPServer):
        address_family = socket.AF_INET6

    with serving(TCPServerV6(("::1", 0), upper_echo_handler(ss))) as server:
        host, port, _flowinfo, _scope_id = server.server_address
        assert host == "::1"
        assert port != 0
        with connect(server.server_address, socket.AF_INET6) as client:
            client.sendall(b"six\n")
            assert recv_until_eof(client) == b"SIX\n"


def test_unix_server_address_is_the_path_which_server_close_leaves_in_place(ss, sock_dir):
    path = os.path.join(sock_dir, "server.sock")
    with ss.UnixStreamServer(path, upper_echo_handler(ss)) as server:
        assert server.server_address == path
    # The stdlib never unlinks the socket file: code that removes it itself relies on that.
    assert os.path.exists(path)


def test_unix_client_addresses(ss, sock_dir):
    seen = []

    class RecordAddress(ss.BaseRequestHandler):
        def handle(self):
            seen.append(self.client_address)

    stream_path = os.path.join(sock_dir, "stream.sock")
    with ss.UnixStreamServer(stream_path, RecordAddress) as server:
        server.timeout = NETWORK_TIMEOUT
        with connect(stream_path, socket.AF_UNIX):
            server.handle_request()
    datagram_path = os.path.join(sock_dir, "datagram.sock")
    client_path = os.path.join(sock_dir, "client.sock")
    with ss.UnixDatagramServer(datagram_path, RecordAddress) as server:
        server.timeout = NETWORK_TIMEOUT
        with datagram_client(socket.AF_UNIX, client_path) as client:
            client.sendto(b"x", datagram_path)
            server.handle_request()
    # An unbound stream client has the empty address; a datagram client its bound path.
    assert seen == ["", client_path]


# -- Hook call order -------------------------------------------------------------------


@pytest.mark.parametrize("kind", [socket.SOCK_STREAM, socket.SOCK_DGRAM], ids=["tcp", "udp"])
def test_hooks_for_one_handled_request(ss, kind):
    server_class = ss.TCPServer if kind == socket.SOCK_STREAM else ss.UDPServer
    server = recording(server_class)((LOCALHOST, 0), upper_echo_handler(ss, kind))
    server.timeout = NETWORK_TIMEOUT
    if kind == socket.SOCK_STREAM:
        with connect(server.server_address) as client:
            client.sendall(b"ping\n")
            server.handle_request()
            assert recv_until_eof(client) == b"PING\n"
    else:
        with datagram_client() as client:
            client.sendto(b"ping", server.server_address)
            server.handle_request()
            assert client.recv(100) == b"PING"
    server.server_close()
    assert hook_names(server) == [
        "server_bind",
        "server_activate",
        *REQUEST_HOOKS,
        "server_close",
    ]


def test_hooks_when_verify_request_refuses(ss):
    handled = []

    class Refusing(ss.TCPServer):
        def verify_request(self, request, client_address):
            return False

    class Handler(ss.BaseRequestHandler):
        def handle(self):
            handled.append(self.client_address)

    with recording(Refusing)((LOCALHOST, 0), Handler) as server:
        server.timeout = NETWORK_TIMEOUT
        with connect(server.server_address) as client:
            server.handle_request()
            assert recv_until_eof(client) == b""
    assert handled == []
    assert hook_names(server) == [
        "server_bind",
        "server_activate",
        "get_request",
        "verify_request",
        "shutdown_request",
        "close_request",
        "server_close",
    ]


def test_hooks_when_the_handler_raises(ss, capsys):
    server = recording(ss.TCPServer)((LOCALHOST, 0), failing_handler(ss, ValueError("boom")))
    server.timeout = NETWORK_TIMEOUT
    with server, connect(server.server_address) as client:
        assert server.handle_request() is None
        assert recv_until_eof(client) == b"", "the failed request was not closed"
        client_address = client.getsockname()
    assert hook_names(server) == [
        "server_bind",
        "server_activate",
        "get_request",
        "verify_request",
        "process_request",
        "finish_request",
        "handle_error",
        "shutdown_request",
        "close_request",
        "server_close",
    ]
    # The default handle_error() prints the traceback between two rules on stderr.
    stderr = capsys.readouterr().err
    rule = "-" * 40
    assert stderr.startswith(
        f"{rule}\nException occurred during processing of request from {client_address}\n"
    )
    assert "Traceback (most recent call last):" in stderr
    assert stderr.endswith(f"ValueError: boom\n{rule}\n")


@pytest.mark.parametrize("exception", [SystemExit, KeyboardInterrupt])
def test_base_exception_from_the_handler_propagates_after_closing_the_request(ss, exception):
    server = recording(ss.TCPServer)((LOCALHOST, 0), failing_handler(ss, exception))
    server.timeout = NETWORK_TIMEOUT
    with server, connect(server.server_address) as client:
        with pytest.raises(exception):
            server.handle_request()
        assert recv_until_eof(client) == b"", "the failed request was not closed"
    assert hook_names(server) == [
        "server_bind",
        "server_activate",
        *REQUEST_HOOKS,
        "server_close",
    ]


def test_hooks_when_handle_request_times_out(ss):
    with recording(ss.TCPServer)((LOCALHOST, 0), upper_echo_handler(ss)) as server:
        server.timeout = 0.05
        assert call_bounded(server.handle_request) is None
    assert hook_names(server) == [
        "server_bind",
        "server_activate",
        "handle_timeout",
        "server_close",
    ]


def test_hooks_of_serve_forever(ss):
    server = recording(ss.TCPServer)((LOCALHOST, 0), upper_echo_handler(ss))
    # Connected before the loop starts, so that its first wait already sees the request.
    with connect(server.server_address) as client:
        client.sendall(b"ping\n")
        with serving(server):
            assert recv_until_eof(client) == b"PING\n"
    # How many idle ticks run is timing; runs of service_actions count once.
    names = [name for name, _ in itertools.groupby(hook_names(server))]
    assert names == [
        "server_bind",
        "server_activate",
        *REQUEST_HOOKS,
        "service_actions",
        "server_close",
    ]


def test_hooks_of_a_threading_server_whose_handler_raises(ss):
    server_class = recording(ss.ThreadingTCPServer)
    server = server_class((LOCALHOST, 0), failing_handler(ss, ValueError("boom")))
    server.timeout = NETWORK_TIMEOUT
    with connect(server.server_address) as client:
        server.handle_request()
        assert recv_until_eof(client) == b""
    server.server_close()  # joins the handler thread: its calls are all recorded now
    assert hook_names(server, in_main_thread=True) == [
        "server_bind",
        "server_activate",
        "get_request",
        "verify_request",
        "process_request",
        "server_close",
    ]
    assert hook_names(server, in_main_thread=False) == [
        "finish_request",
        "handle_error",
        "shutdown_request",
        "close_request",
    ]


@ignore_fork_with_threads_warning
def test_hooks_of_a_forking_server_in_the_parent(ss, reap_children):
    server = recording(ss.ForkingTCPServer)((LOCALHOST, 0), upper_echo_handler(ss))
    server.timeout = NETWORK_TIMEOUT
    with connect(server.server_address) as client:
        client.sendall(b"ping\n")
        server.handle_request()
        assert recv_until_eof(client) == b"PING\n"
    server.server_close()
    # The child handles and shuts the request down; the parent only closes its copy.
    assert hook_names(server) == [
        "server_bind",
        "server_activate",
        "get_request",
        "verify_request",
        "process_request",
        "close_request",
        "server_close",
    ]


# -- Request handlers ------------------------------------------------------------------


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


@pytest.mark.parametrize(
    "failing_step, expected_steps",
    [
        (None, ["setup", "handle", "finish"]),
        ("handle", ["setup", "handle", "finish"]),
        ("setup", ["setup"]),
        ("finish", ["setup", "handle", "finish"]),
    ],
)
def test_handler_lifecycle(ss, failing_step, expected_steps):
    events = []
    errors = []

    class Server(ss.TCPServer):
        def handle_error(self, request, client_address):
            errors.append(sys.exc_info()[1])

    with Server((LOCALHOST, 0), lifecycle_handler(ss, events, failing_step)) as server:
        server.timeout = NETWORK_TIMEOUT
        with connect(server.server_address) as client:
            server.handle_request()
            client_address = client.getsockname()
    (request, address, handler_server), *steps = events
    assert isinstance(request, socket.socket)
    assert (address, handler_server) == (client_address, server)
    assert steps == expected_steps
    assert [str(error) for error in errors] == ([failing_step] if failing_step else [])


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


def test_stream_handler_files(ss):
    def handle(handler):
        handler.line = handler.rfile.readline()
        handler.written = handler.wfile.write(memoryview(b"reply\n"))
        handler.filenos = (handler.wfile.fileno(), handler.connection.fileno())

    def talk(client):
        client.sendall(b"request\n")
        assert recv_until_eof(client) == b"reply\n"

    handler = stream_handler_run(ss, handle, talk)
    assert handler.connection is handler.request
    assert isinstance(handler.rfile, io.BufferedReader)
    assert isinstance(handler.wfile, io.BufferedIOBase)
    assert handler.wfile.writable()
    assert (handler.line, handler.written) == (b"request\n", 6)
    wfile_fileno, connection_fileno = handler.filenos
    assert wfile_fileno == connection_fileno
    # finish() closed both files.
    assert handler.rfile.closed and handler.wfile.closed


def test_unbuffered_wfile_sends_each_write_at_once(ss):
    def handle(handler):
        handler.wfile.write(b"first\n")
        handler.rfile.readline()
        handler.wfile.write(b"second\n")

    def talk(client):
        # The first reply must arrive before the client says anything: no flush needed.
        assert recv_line(client) == b"first\n"
        client.sendall(b"go on\n")
        assert recv_until_eof(client) == b"second\n"

    stream_handler_run(ss, handle, talk)


def test_buffered_wfile_is_flushed_at_finish(ss):
    def handle(handler):
        handler.wfile.write(b"held back\n")
        handler.rfile.readline()

    def talk(client):
        client.settimeout(0.3)
        with pytest.raises(TimeoutError):
            client.recv(100)
        client.settimeout(NETWORK_TIMEOUT)
        client.sendall(b"done\n")
        assert recv_until_eof(client) == b"held back\n"

    handler = stream_handler_run(ss, handle, talk, wbufsize=64 * 1024)
    assert isinstance(handler.wfile, io.BufferedWriter)


def test_unbuffered_rfile_reads_no_further_than_asked(ss):
    def handle(handler):
        handler.line = handler.rfile.readline()
        handler.rest = recv_until_eof(handler.connection)

    def talk(client):
        client.sendall(b"line\nrest")
        client.shutdown(socket.SHUT_WR)
        recv_until_eof(client)

    handler = stream_handler_run(ss, handle, talk, rbufsize=0)
    assert (handler.line, handler.rest) == (b"line\n", b"rest")


def test_handler_timeout_is_applied_to_the_connection(ss):
    def handle(handler):
        handler.timeout_seen = handler.connection.gettimeout()
        try:
            handler.rfile.readline()
        except TimeoutError as exc:
            handler.error = exc

    def talk(client):
        assert recv_until_eof(client) == b""

    handler = stream_handler_run(ss, handle, talk, timeout=0.2)
    assert handler.timeout_seen == 0.2
    assert isinstance(handler.error, TimeoutError)


def test_handler_connection_has_no_timeout_by_default(ss):
    def handle(handler):
        handler.timeout_seen = handler.connection.gettimeout()

    handler = stream_handler_run(ss, handle, recv_until_eof)
    assert handler.timeout_seen is None


@pytest.mark.parametrize("disable_nagle", [False, True])
def test_disable_nagle_algorithm_sets_tcp_nodelay(ss, disable_nagle):
    def handle(handler):
        handler.nodelay = handler.connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)

    handler = stream_handler_run(ss, handle, recv_until_eof, disable_nagle_algorithm=disable_nagle)
    assert bool(handler.nodelay) is disable_nagle


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


def test_datagram_handler_files_and_reply_at_finish(ss):
    def handle(handler):
        handler.read = handler.rfile.read()
        handler.wfile.write(b"re")
        handler.wfile.write(b"ply")

    handler, server, reply, client_address = datagram_handler_run(ss, handle, b"packet")
    assert isinstance(handler.rfile, io.BytesIO) and isinstance(handler.wfile, io.BytesIO)
    assert handler.read == handler.packet == b"packet"
    assert handler.socket is server.socket
    assert handler.client_address == client_address
    # Everything written goes out as one datagram, after handle() returned.
    assert reply == b"reply"


def test_datagram_handler_sends_an_empty_reply_when_nothing_was_written(ss):
    _, _, reply, _ = datagram_handler_run(ss, lambda handler: None, b"packet")
    assert reply == b""


def test_udp_request_is_the_packet_and_the_server_socket(ss):
    requests = []

    class Handler(ss.BaseRequestHandler):
        def handle(self):
            requests.append(self.request)

    with ss.UDPServer((LOCALHOST, 0), Handler) as server:
        server.timeout = NETWORK_TIMEOUT
        with datagram_client() as client:
            client.sendto(b"packet", server.server_address)
            server.handle_request()
    ((data, sock),) = requests
    assert type(data) is bytes and data == b"packet"
    assert sock is server.socket


def test_udp_max_packet_size_truncates_the_packet(ss):
    def handle(handler):
        handler.wfile.write(handler.packet)

    _, _, reply, _ = datagram_handler_run(ss, handle, b"abcdefgh", max_packet_size=4)
    assert reply == b"abcd"


# -- Threading servers -----------------------------------------------------------------


@pytest.mark.parametrize("daemon_threads", [False, True])
def test_threading_handler_runs_in_a_worker_thread(ss, daemon_threads):
    threads = []

    class Handler(ss.StreamRequestHandler):
        def handle(self):
            threads.append(threading.current_thread())
            self.wfile.write(b"done\n")

    with ss.ThreadingTCPServer((LOCALHOST, 0), Handler) as server:
        server.daemon_threads = daemon_threads
        server.timeout = NETWORK_TIMEOUT
        with connect(server.server_address) as client:
            server.handle_request()
            assert recv_until_eof(client) == b"done\n"
    (thread,) = threads
    assert isinstance(thread, threading.Thread)
    assert thread is not threading.main_thread()
    assert thread.daemon is daemon_threads


@pytest.mark.parametrize(
    "block_on_close, daemon_threads, waits",
    [(True, False, True), (False, False, False), (True, True, False)],
    ids=["joins", "block_on_close=False", "daemon_threads=True"],
)
def test_threading_server_close_waits_for_non_daemon_threads(
    ss, block_on_close, daemon_threads, waits
):
    release = threading.Event()
    finished = threading.Event()

    class Slow(ss.BaseRequestHandler):
        def handle(self):
            release.wait(NETWORK_TIMEOUT)
            finished.set()

    server = ss.ThreadingTCPServer((LOCALHOST, 0), Slow)
    server.block_on_close = block_on_close
    server.daemon_threads = daemon_threads
    server.timeout = NETWORK_TIMEOUT
    with connect(server.server_address):
        server.handle_request()
        # The handler can finish only once released, a little after server_close() began.
        releaser = threading.Timer(0.2, release.set)
        releaser.start()
        try:
            server.server_close()
            assert finished.is_set() is waits
        finally:
            releaser.join()
            assert finished.wait(NETWORK_TIMEOUT)


def test_threading_server_forgets_finished_threads(ss):
    with ss.ThreadingTCPServer((LOCALHOST, 0), upper_echo_handler(ss)) as server:
        server.timeout = NETWORK_TIMEOUT
        tracked = []
        for _ in range(60):
            with connect(server.server_address) as client:
                client.sendall(b"x\n")
                server.handle_request()
                assert recv_until_eof(client) == b"X\n"
            tracked.append(len(server._threads))
    # Each new thread is tracked for server_close() to join, and the finished ones are
    # dropped as new ones come: a long-running server does not accumulate them.
    assert min(tracked) >= 1
    assert max(tracked) <= 10


# -- Forking servers -------------------------------------------------------------------


def pid_then_wait_handler(ss):
    class PidThenWait(ss.StreamRequestHandler):
        """Writes its process's pid, then waits for one line from the client."""

        timeout = CHILD_HANDLER_TIMEOUT

        def handle(self):
            self.wfile.write(b"%d\n" % os.getpid())
            self.rfile.readline()

    return PidThenWait


@ignore_fork_with_threads_warning
def test_forking_handler_runs_in_a_child_reaped_at_close(ss, reap_children):
    server = ss.ForkingTCPServer((LOCALHOST, 0), pid_then_wait_handler(ss))
    server.timeout = NETWORK_TIMEOUT
    assert server.active_children is None
    with connect(server.server_address) as client:
        server.handle_request()
        child_pid = int(recv_line(client))
        assert child_pid != os.getpid()
        assert server.active_children == {child_pid}
        client.sendall(b"bye\n")
        assert recv_until_eof(client) == b""
    server.server_close()
    assert server.active_children == set()
    with pytest.raises(ChildProcessError):
        os.waitpid(child_pid, os.WNOHANG)


@ignore_fork_with_threads_warning
@pytest.mark.parametrize("block_on_close", [True, False])
def test_forking_server_close_and_block_on_close(ss, block_on_close, reap_children):
    server = ss.ForkingTCPServer((LOCALHOST, 0), pid_then_wait_handler(ss))
    server.block_on_close = block_on_close
    server.timeout = NETWORK_TIMEOUT
    with connect(server.server_address) as client:
        server.handle_request()
        child_pid = int(recv_line(client))
        # The child can exit only once released, a little after server_close() began.
        releaser = threading.Timer(0.2, client.sendall, [b"bye\n"])
        releaser.start()
        try:
            server.server_close()
            if block_on_close:
                assert server.active_children == set()
            else:
                assert server.active_children == {child_pid}
        finally:
            releaser.join()
    if not block_on_close:
        assert os.waitpid(child_pid, 0)[0] == child_pid


@ignore_fork_with_threads_warning
def test_forking_server_honours_max_children(ss, reap_children):
    class TwoChildren(ss.ForkingTCPServer):
        max_children = 2

    with serving(TwoChildren((LOCALHOST, 0), pid_then_wait_handler(ss))) as server:
        first, second, third = (connect(server.server_address) for _ in range(3))
        with first, second, third:
            recv_line(first)
            recv_line(second)
            # Two children run: the third connection waits until one of them exits.
            third.settimeout(0.5)
            with pytest.raises(TimeoutError):
                third.recv(100)
            third.settimeout(NETWORK_TIMEOUT)
            first.sendall(b"bye\n")
            assert recv_until_eof(first) == b""
            recv_line(third)
            for client in (second, third):
                client.sendall(b"bye\n")
                assert recv_until_eof(client) == b""


# -- Serving, shutting down and closing ------------------------------------------------


def test_serve_forever_serves_until_shutdown_and_can_serve_again(ss):
    with ss.TCPServer((LOCALHOST, 0), upper_echo_handler(ss)) as server:
        for round_number in range(2):
            loop = start_thread(server.serve_forever, poll_interval=0.05)
            for request_number in range(3):
                line = b"round %d request %d\n" % (round_number, request_number)
                with connect(server.server_address) as client:
                    client.sendall(line)
                    assert recv_until_eof(client) == line.upper()
            call_bounded(server.shutdown)
            loop.join(NETWORK_TIMEOUT)
            assert not loop.is_alive()


def test_shutdown_called_before_serve_forever_still_stops_it(ss):
    with ss.TCPServer((LOCALHOST, 0), upper_echo_handler(ss)) as server:
        stopper = start_thread(server.shutdown)
        # Give shutdown() time to ask before the loop starts; were it slower, the loop
        # would still see the request on its next tick.
        stopper.join(0.2)
        call_bounded(server.serve_forever, poll_interval=0.05)
        stopper.join(NETWORK_TIMEOUT)
        assert not stopper.is_alive(), "shutdown() did not return after the loop stopped"


def test_service_actions_runs_repeatedly_while_idle(ss):
    ticked_three_times = threading.Event()
    ticks = itertools.count(1)

    class Server(ss.TCPServer):
        def service_actions(self):
            if next(ticks) == 3:
                ticked_three_times.set()

    with serving(Server((LOCALHOST, 0), upper_echo_handler(ss)), poll_interval=0.01):
        assert ticked_three_times.wait(NETWORK_TIMEOUT)


def test_context_manager_closes_the_socket(ss):
    with ss.TCPServer((LOCALHOST, 0), upper_echo_handler(ss)) as server:
        assert isinstance(server, ss.TCPServer)
        assert server.fileno() == server.socket.fileno() >= 0
    assert server.socket.fileno() == -1
    assert server.fileno() == -1


def test_server_is_usable_with_selectors(ss):
    with ss.TCPServer((LOCALHOST, 0), upper_echo_handler(ss)) as server:
        with selectors.DefaultSelector() as selector, connect(server.server_address):
            selector.register(server, selectors.EVENT_READ)
            ((key, events),) = selector.select(NETWORK_TIMEOUT)
            assert key.fileobj is server and events == selectors.EVENT_READ


def test_failed_bind_closes_the_socket(ss):
    with socket.socket() as occupant:
        occupant.bind((LOCALHOST, 0))
        occupant.listen()
        busy_address = occupant.getsockname()
        fds_before = open_fd_count()
        # The errors are kept: their tracebacks hold the servers, so an unclosed socket
        # stays open instead of being closed by garbage collection.
        errors = []
        for _ in range(200):
            with pytest.raises(OSError) as excinfo:
                ss.TCPServer(busy_address, upper_echo_handler(ss))
            errors.append(excinfo.value)
        assert {error.errno for error in errors} == {errno.EADDRINUSE}
        # Generous bound: a leak would be one descriptor per attempt.
        assert open_fd_count() - fds_before < 10


def test_bind_and_activate_false_defers_binding_to_the_caller(ss):
    server = ss.TCPServer((LOCALHOST, 0), upper_echo_handler(ss), bind_and_activate=False)
    with server:
        assert server.server_address == (LOCALHOST, 0)
        assert server.socket.getsockname() == ("0.0.0.0", 0)
        server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.server_bind()
        server.server_activate()
        assert server.server_address[1] != 0
        server.timeout = NETWORK_TIMEOUT
        with connect(server.server_address) as client:
            client.sendall(b"late\n")
            server.handle_request()
            assert recv_until_eof(client) == b"LATE\n"


@pytest.mark.parametrize("name", ["TCPServer", "UDPServer"])
@pytest.mark.parametrize("set_on", ["class", "instance"])
def test_allow_reuse_address_sets_so_reuseaddr(ss, name, set_on):
    server_class = getattr(ss, name)
    with server_class((LOCALHOST, 0), upper_echo_handler(ss)) as server:
        assert server.socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 0
    if set_on == "class":
        reusing_class = type("Reusing", (server_class,), {"allow_reuse_address": True})
        server = reusing_class((LOCALHOST, 0), upper_echo_handler(ss))
    else:
        server = server_class((LOCALHOST, 0), upper_echo_handler(ss), False)
        server.allow_reuse_address = True
        server.server_bind()
    with server:
        assert server.socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) != 0


@pytest.mark.skipif(not PY311, reason="allow_reuse_port is new in Python 3.11")
@pytest.mark.parametrize("name", ["TCPServer", "UDPServer"])
def test_allow_reuse_port_lets_two_servers_share_a_port(ss, name):
    server_class = getattr(ss, name)
    with server_class((LOCALHOST, 0), upper_echo_handler(ss)) as server:
        assert server.socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 0
    reusing_class = type("Reusing", (server_class,), {"allow_reuse_port": True})
    with reusing_class((LOCALHOST, 0), upper_echo_handler(ss)) as first:
        assert first.socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) != 0
        with reusing_class(first.server_address, upper_echo_handler(ss)) as second:
            assert second.server_address == first.server_address


@pytest.mark.parametrize(
    "server_timeout, socket_timeout",
    [(0.1, None), (None, 0.1), (0.1, 30.0), (30.0, 0.1)],
    ids=["server-timeout", "socket-timeout", "server-timeout-shorter", "socket-timeout-shorter"],
)
def test_handle_request_honours_the_shorter_timeout(ss, server_timeout, socket_timeout):
    with recording(ss.TCPServer)((LOCALHOST, 0), upper_echo_handler(ss)) as server:
        server.timeout = server_timeout
        server.socket.settimeout(socket_timeout)
        # Bounded well below the 30 s timeout: only the shorter one lets this return.
        assert call_bounded(server.handle_request) is None
        assert hook_names(server)[2:] == ["handle_timeout"]


@ignore_fork_with_threads_warning
def test_forking_server_reaps_finished_children_when_handle_request_times_out(ss, reap_children):
    with ss.ForkingTCPServer((LOCALHOST, 0), upper_echo_handler(ss)) as server:
        server.timeout = NETWORK_TIMEOUT
        with connect(server.server_address) as client:
            client.sendall(b"x\n")
            server.handle_request()
            assert recv_until_eof(client) == b"X\n"
        assert len(server.active_children) == 1
        # The child has answered but may not have exited yet: idle ticks until it is reaped.
        server.timeout = 0.05
        for _ in range(int(NETWORK_TIMEOUT / server.timeout)):
            server.handle_request()
            if not server.active_children:
                break
        assert server.active_children == set()
