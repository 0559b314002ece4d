"""The drop-in promise, the server's hooks: which of them are called, in which order and
in which thread, for a handled request, a refused one, a handler that raises (an exception
or SystemExit/KeyboardInterrupt), a timeout, serve_forever(), and threading and forking
servers.

Each body runs against the stdlib ``socketserver`` (the oracle) and ``fastsock``: see
tests/compat_helpers.py.
"""

import itertools
import socket

import pytest

from tests.compat_helpers import (
    REQUEST_HOOKS,
    failing_handler,
    hook_names,
    ignore_fork_with_threads_warning,
    recording,
    upper_echo_handler,
)
from tests.support import (
    LOCALHOST,
    NETWORK_TIMEOUT,
    call_bounded,
    connect,
    datagram_client,
    recv_until_eof,
    serving,
)


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
