"""The drop-in promise, request handlers: the setup/handle/finish lifecycle (also when a
step raises); StreamRequestHandler's rfile and wfile (buffered and not), its timeout and
disable_nagle_algorithm; DatagramRequestHandler's files and reply, and what a UDP request
is (the packet and the server socket, truncated at max_packet_size).

Each body runs against the stdlib ``socketserver`` (the oracle) and ``fastsock``: see
tests/compat_helpers.py.
"""

import io
import socket
import sys

import pytest

from tests.compat_helpers import datagram_handler_run, lifecycle_handler, stream_handler_run
from tests.support import (
    LOCALHOST,
    NETWORK_TIMEOUT,
    connect,
    datagram_client,
    recv_line,
    recv_until_eof,
)


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
