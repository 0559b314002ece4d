"""Syslog framing end to end: the real ``logger`` (util-linux) sends to ``fastsock serve
--framing syslog`` and to library servers with ``receiver(framing="syslog")``, over TCP
with octet counting (RFC 6587) and with newlines, and over UDP (a message per datagram);
bad counts close only their connection, counted, logged with a sample and passed to
handle_error, on the event engine and on the per-connection loop."""

import json
import logging
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest

import fastsock
from fastsock import _cli_serve, cli
from tests import test_cli
from tests.support import LOCALHOST, NETWORK_TIMEOUT, serving

LOGGER = shutil.which("logger")
needs_logger = pytest.mark.skipif(LOGGER is None, reason="util-linux logger is not installed")

# What logger sends by default (RFC 5424): the header, then the message as given.
HEADER = rb"<13>1 \S+ \S+ tag - - \[timeQuality [^\]]*\] "
MESSAGES = [b"first message", b"with  two spaces", b"x" * 700, b"caf\xc3\xa9 \xe2\x9c\x93"]
TRANSPORTS = {"octets": ["-T", "--octet-count"], "lines": ["-T"], "udp": ["-d"]}


def logger(port, transport, messages=MESSAGES):
    """Send messages with logger, one per line of its standard input: over TCP, one
    connection carries them all."""
    command = [LOGGER, *TRANSPORTS[transport], "-n", LOCALHOST, "-P", str(port), "-t", "tag"]
    subprocess.run(command, input=b"\n".join(messages) + b"\n", check=True, timeout=NETWORK_TIMEOUT)


def assert_logged(received, messages=MESSAGES):
    """Exactly the messages, each with logger's header and nothing else (no count, no
    newline)."""
    assert len(received) == len(messages), received
    for got, message in zip(received, messages, strict=True):
        assert re.fullmatch(HEADER + re.escape(message), got, re.DOTALL), got


def get_messages(ring, count):
    return [ring.get(timeout=NETWORK_TIMEOUT) for _ in range(count)]


# -- fastsock serve --------------------------------------------------------------------------


# The fixture that starts `fastsock serve` processes (ServeProcess) and kills them after.
serve = test_cli.serve


def served_texts(server):
    records = [json.loads(line) for line in server.output.read_text().splitlines()]
    return [record["text"].encode() for record in records]


@needs_logger
@pytest.mark.parametrize("transport", ["octets", "lines", "udp"])
def test_logger_to_fastsock_serve(serve, transport):
    scheme = "udp" if transport == "udp" else "tcp"
    server = serve(f"{scheme}://127.0.0.1:0", "--framing", "syslog", "--format", "jsonl")
    logger(server.inet_address()[1], transport)
    if transport == "udp":
        # The datagrams are in the socket once logger returns; the stop's drain reads them.
        time.sleep(0.2)
    else:
        server.line_matching("1 opened")
    assert server.stop() == 0
    assert "Traceback" not in "\n".join(server.stderr)
    assert_logged(served_texts(server))


def test_fastsock_serve_closes_a_connection_with_a_bad_count(serve):
    server = serve("tcp://127.0.0.1:0", "--framing", "syslog", "--max-frame", "100")
    with socket.create_connection(server.inet_address(), NETWORK_TIMEOUT) as good:
        good.sendall(b"5 hello")
        with socket.create_connection(server.inet_address(), NETWORK_TIMEOUT) as bad:
            bad.sendall(b"2 ok101 ")
            assert bad.recv(1) == b""
        good.sendall(b"5 world")
        warning = server.line_matching("the connection was closed")
    assert "max_frame=100" in warning and "b'101 '" in warning
    assert server.stop() == 0
    assert "over limits 1" in server.stderr[-1]
    assert sorted(server.output.read_bytes().splitlines()) == [b"hello", b"ok", b"world"]


@pytest.mark.parametrize(
    "arguments, says",
    [
        (["udp://127.0.0.1:0", "--framing", "octets"], "--framing applies to stream"),
        (["udp://127.0.0.1:0", "--framing", "syslog", "--max-line", "9"], "--max-line applies"),
        (["tcp://127.0.0.1:0", "--framing", "octets", "--max-line", "9"], "lines and syslog"),
        (["tcp://127.0.0.1:0", "--framing", "lines", "--max-frame", "9"], "octets and syslog"),
    ],
)
def test_serve_refuses_limits_that_do_not_apply(capsys, arguments, says):
    assert cli.main(["serve", *arguments]) == 2
    assert says in capsys.readouterr().err


@pytest.mark.parametrize("framing", ["octets", "syslog"])
def test_serve_hands_the_framing_and_its_limits_to_the_receiver(framing):
    arguments = ["serve", "tcp://127.0.0.1:0", "--framing", framing, "--max-frame", "99"]
    if framing == "syslog":
        arguments += ["--max-line", "77"]
    options = cli.build_parser().parse_args(arguments)
    endpoint = _cli_serve.parse_endpoint(options.url, allow_remote=False)
    _cli_serve.check_serve_options(options, endpoint)
    limits = _cli_serve.receive_options(options, endpoint)
    assert (limits.framing, limits.max_frame) == (framing, 99)
    assert limits.max_line == (77 if framing == "syslog" else fastsock.constants.MAX_LINE_LENGTH)


# -- Library servers ---------------------------------------------------------------------------


@needs_logger
@pytest.mark.parametrize("transport", ["octets", "lines"])
def test_logger_to_a_stream_server(transport):
    ring = fastsock.RingQueue()
    handler = fastsock.receiver(ring, framing="syslog")
    with serving(fastsock.ThreadingTCPServer((LOCALHOST, 0), handler)) as server:
        logger(server.server_address[1], transport)
        assert_logged(get_messages(ring, len(MESSAGES)))
    assert server.stats().framing_errors == 0


@needs_logger
def test_logger_to_a_datagram_server():
    ring = fastsock.RingQueue()
    handler = fastsock.receiver(ring, framing="syslog")
    with serving(fastsock.UDPServer((LOCALHOST, 0), handler)) as server:
        logger(server.server_address[1], "udp")
        assert_logged(get_messages(ring, len(MESSAGES)))


class Recorded(fastsock.ThreadingTCPServer):
    """Keeps what handle_error() was given."""

    def __init__(self, *arguments):
        super().__init__(*arguments)
        self.errors = []

    def handle_error(self, request, client_address):
        self.errors.append(sys.exc_info()[1])


def handler_for(path, ring, **options):
    handler = fastsock.receiver(ring, **options)
    if path == "engine":
        return handler

    class PerConnection(handler):
        # A handler overriding setup() keeps a compiled loop per connection.
        def setup(self):
            super().setup()

    return PerConnection


def wait_for(condition):
    deadline = time.monotonic() + NETWORK_TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.parametrize("path", ["engine", "per-connection"])
def test_bad_counts_close_only_their_connection(path, caplog, monkeypatch):
    # Protocol errors are logged once per interval: each bad connection starts a fresh one.
    allowed = {}
    monkeypatch.setattr(sys.modules["fastsock.receiver"]._log, "_next_allowed", allowed)
    ring = fastsock.RingQueue()
    handler = handler_for(path, ring, framing="syslog", max_frame=1000)
    with (
        caplog.at_level(logging.WARNING, "fastsock"),
        serving(Recorded((LOCALHOST, 0), handler)) as server,
    ):
        address = server.server_address
        with socket.create_connection(address, NETWORK_TIMEOUT) as steady:
            steady.sendall(b"6 steady")
            assert ring.get(timeout=NETWORK_TIMEOUT) == b"steady"
            bad_streams = {
                "oversized": b"2 ok1001 " + b"z" * 50,
                "non-digit": b"2 ok<13>a line\n",
                "leading zero": b"2 ok05 hello",
            }
            for number, stream in enumerate(bad_streams.values(), 1):
                allowed.clear()
                with socket.create_connection(address, NETWORK_TIMEOUT) as bad:
                    bad.sendall(stream)
                    assert bad.recv(1) == b"", "the offending connection is closed"
                assert ring.get(timeout=NETWORK_TIMEOUT) == b"ok"
                # Logged, then passed to handle_error().
                wait_for(lambda number=number: len(server.errors) == number)
            # A count cut short by the peer's end: discarded and counted, not an error.
            with socket.create_connection(address, NETWORK_TIMEOUT) as truncated:
                truncated.sendall(b"2 ok9")
            assert ring.get(timeout=NETWORK_TIMEOUT) == b"ok"
            steady.sendall(b"5 still7 running")
            assert get_messages(ring, 2) == [b"still", b"running"]
            wait_for(lambda: server.stats().connections_closed == 4)
    stats = server.stats()
    assert (stats.frames_too_large, stats.frames_malformed, stats.lines_too_long) == (1, 2, 0)
    assert stats.framing_errors == 3
    # The count cut short ("9"), and each offending connection's bytes from its bad count on.
    assert stats.bytes_discarded == 1 + sum(len(stream) - 4 for stream in bad_streams.values())
    assert [type(error) for error in server.errors] == [
        fastsock.FrameTooLargeError,
        fastsock.MalformedFrameError,
        fastsock.MalformedFrameError,
    ]
    assert "max_frame=1000" in str(server.errors[0])
    assert "malformed octet count" in str(server.errors[1])
    logged = [record.getMessage() for record in caplog.records]
    assert any("max_frame=1000" in text and "b'1001 zzz" in text for text in logged), logged
    malformed = [text for text in logged if "malformed octet count" in text]
    assert malformed and "it began b'<13>a line\\n'" in malformed[0], logged


def test_octets_over_a_server_and_the_largest_message():
    ring = fastsock.RingQueue(max_bytes=64 * 1024)
    with pytest.raises(ValueError, match="'octets' message may reach 1048576 bytes"):
        fastsock.receiver(ring, framing="octets")
    handler = fastsock.receiver(ring, framing="octets", max_frame=60_000)
    with serving(fastsock.ThreadingTCPServer((LOCALHOST, 0), handler)) as server:
        with socket.create_connection(server.server_address, NETWORK_TIMEOUT) as client:
            payload = bytes(range(256)) * 234
            stream = b"%d %s1 x" % (len(payload), payload)
            for start in range(0, len(stream), 1000):
                client.sendall(stream[start : start + 1000])
            assert get_messages(ring, 2) == [payload, b"x"]
    assert fastsock.ReceiveOptions(framing="syslog", max_line=10).largest_message == 1048576
    assert fastsock.ReceiveOptions(framing="syslog", max_frame=10).largest_message == 65537
