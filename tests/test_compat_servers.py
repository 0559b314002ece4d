"""The drop-in promise, servers: every server class (TCP, UDP, Unix stream and datagram,
threading and forking) serves an echo; the addresses of IPv4, IPv6 and Unix servers and of
their clients; serve_forever(), shutdown(), service_actions(), the context manager and
server_close(); selectors; binding (a failed bind, bind_and_activate=False,
allow_reuse_address, allow_reuse_port); handle_request() timeouts.

Each body runs against the stdlib ``socketserver`` (the oracle) and ``fastsock``: see
tests/compat_helpers.py.
"""

import errno
import itertools
import os
import selectors
import socket
import threading

import pytest

from tests.compat_helpers import (
    PY311,
    SERVER_SHAPES,
    exchange,
    hook_names,
    ignore_fork_with_threads_warning,
    recording,
    server_address_for,
    upper_echo_handler,
)
from tests.support import (
    LOCALHOST,
    NETWORK_TIMEOUT,
    call_bounded,
    connect,
    datagram_client,
    open_fd_count,
    recv_until_eof,
    serving,
    start_thread,
)


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
