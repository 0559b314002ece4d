"""The PROXY protocol (v1 and v2) in front of framing: hand-built headers on the compiled
event engine and its reference twin, on a server on engines and on a per-connection server,
and behind a real HAProxy (Debian's haproxy, ``send-proxy`` and ``send-proxy-v2``) started
by the test, its clients bound to another loopback address than HAProxy's.  Bad headers
(none, garbage, too long, a bogus v2 length, cut short, too slow, or from outside
``proxy_trusted``) close only their connection, counted, logged with a sample and passed to
handle_error."""

import contextlib
import json
import logging
import random
import shutil
import socket
import struct
import subprocess
import sys
import time

import pytest

import fastsock
from fastsock import ReceiveOptions, _cli_serve, cli, constants, proxy
from tests import test_cli, test_engine
from tests.support import LOCALHOST, NETWORK_TIMEOUT, free_port, require_program, serving
from tests.test_engine import adopted_pair, client_of, closed_by_server, make_engine, running, take
from tests.test_syslog import Recorded, wait_for

# test_engine's fixtures: each implementation, and a loopback listener.
engine_impl = test_engine.engine_impl
listener = test_engine.listener

# -- Hand-built headers ----------------------------------------------------------------------


def v2(command, family, body):
    """A v2 header: signature, version 2 and command, family and transport, length, body."""
    return (
        proxy.V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", len(body)) + body
    )


def v2_inet(source, destination, source_port, destination_port, tlvs=b""):
    family = socket.AF_INET6 if ":" in source else socket.AF_INET
    body = (
        socket.inet_pton(family, source)
        + socket.inet_pton(family, destination)
        + struct.pack("!HH", source_port, destination_port)
        + tlvs
    )
    return v2(1, 0x11 if family == socket.AF_INET else 0x21, body)


# Two TLVs a load balancer may add (ALPN "h2", a unique ID): skipped.
TLVS = b"\x01\x00\x02h2" + b"\x05\x00\x04abcd"

GOOD_HEADERS = {
    "v1-tcp4": (b"PROXY TCP4 192.0.2.7 198.51.100.1 50123 514\r\n", ("192.0.2.7", 50123)),
    "v1-tcp6": (
        b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 514\r\n",
        ("2001:db8::7", 40000, 0, 0),
    ),
    "v1-unknown": (b"PROXY UNKNOWN ffff:f...f:ffff 1 2 3\r\n", None),
    "v2-ipv4-tlvs": (v2_inet("203.0.113.9", "10.0.0.1", 65535, 514, TLVS), ("203.0.113.9", 65535)),
    "v2-ipv6": (v2_inet("2001:db8::9", "2001:db8::1", 1234, 514), ("2001:db8::9", 1234, 0, 0)),
    "v2-local": (v2(0, 0x00, TLVS), None),
}

BAD_HEADERS = {
    "none": (b"a plain line\n", proxy.NOT_PROXY),
    "garbage": (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", proxy.NOT_PROXY),
    "v1-no-crlf": (b"PROXY TCP4 " + b"1" * 120 + b"\r\n", proxy.V1_TOO_LONG),
    "v1-bad-address": (b"PROXY TCP4 192.0.2.300 10.0.0.1 1 2\r\nx\n", proxy.V1_MALFORMED),
    "v1-bad-port": (b"PROXY TCP4 192.0.2.3 10.0.0.1 01 2\r\nx\n", proxy.V1_MALFORMED),
    "v1-tcp6-with-ipv4": (b"PROXY TCP6 192.0.2.3 10.0.0.1 1 2\r\nx\n", proxy.V1_MALFORMED),
    "v2-bogus-length": (v2(1, 0x21, b"\0" * 12), proxy.V2_BAD_LENGTH),
    "v2-oversized": (v2(1, 0x11, b"\0" * constants.PROXY_MAX_HEADER), proxy.V2_TOO_LARGE),
    "v2-version-3": (proxy.V2_SIGNATURE + b"\x31\x11\x00\x0c" + b"\0" * 12, proxy.V2_UNSUPPORTED),
}

LINES = b"first\nsecond\n"


@pytest.mark.parametrize("name", GOOD_HEADERS)
def test_the_parser_reads_each_header(name):
    header, address = GOOD_HEADERS[name]
    assert proxy.parse(header + LINES) == proxy.ProxyHeader(len(header), address)
    for end in range(len(header)):
        assert proxy.parse(header[:end]) is None, end


@pytest.mark.parametrize("name", BAD_HEADERS)
def test_the_parser_refuses_each_bad_header(name):
    data, reason = BAD_HEADERS[name]
    with pytest.raises(proxy.HeaderRejected) as raised:
        proxy.parse(data)
    assert raised.value.reason == reason


def test_the_trusted_networks_and_the_options():
    networks = proxy.trusted_networks(constants.PROXY_TRUSTED)
    assert proxy.is_trusted(("127.0.0.2", 1), networks)
    assert proxy.is_trusted(("::1", 1, 0, 0), networks)
    assert proxy.is_trusted(("::ffff:127.0.0.1", 1, 0, 0), networks)
    assert proxy.is_trusted("/run/x.sock", networks)
    assert not proxy.is_trusted(("192.0.2.1", 1), networks)
    assert ReceiveOptions().proxy_protocol is False
    assert ReceiveOptions(proxy_trusted=["10.1.2.3/8"]).proxy_trusted == ("10.0.0.0/8",)
    for bad in ("10.0.0.0/8", ["not a network"], [None]):
        with pytest.raises(ValueError, match="proxy_trusted"):
            ReceiveOptions(proxy_trusted=bad)
    with pytest.raises(ValueError, match="proxy_protocol"):
        ReceiveOptions(proxy_protocol=1)


# -- The engine, compiled and reference ------------------------------------------------------

PROXY_OPTIONS = {"framing": "lines", "proxy_protocol": True}


def lines_engine(engine_impl, **options):
    return make_engine(engine_impl, **{**PROXY_OPTIONS, **options})


@pytest.mark.parametrize("name", GOOD_HEADERS)
@pytest.mark.parametrize("split", ["one-send", "byte-by-byte"])
def test_the_header_sets_the_address_and_the_rest_is_framed(engine_impl, listener, name, split):
    header, address = GOOD_HEADERS[name]
    engine, ring, counters = lines_engine(engine_impl, listeners=[listener.fileno()])
    with running(engine) as runner, client_of(listener) as client:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        stream = header + LINES
        if split == "one-send":
            client.sendall(stream)
        else:
            for index in range(len(stream)):
                client.sendall(stream[index : index + 1])
                time.sleep(0.001)
        got = take(ring, 2)
        assert [payload for _, payload in got] == [b"first", b"second"]
        connection_id = got[0][0]
        expected = address if address is not None else client.getsockname()
        assert engine.peer(connection_id) == expected
    stats = counters.snapshot()
    assert stats.proxy_header_errors == 0 and not runner.events_of("proxy_header")
    assert stats.bytes_received == len(header) + len(LINES)
    assert stats.bytes_discarded == 0


def test_a_socket_pair_is_trusted_and_a_header_alone_delivers_nothing(engine_impl):
    engine, ring, counters = lines_engine(engine_impl)
    header, address = GOOD_HEADERS["v2-ipv4-tlvs"]
    connection_id, client = adopted_pair(engine)
    with running(engine):
        with client:
            client.sendall(header)
            time.sleep(0.1)
            assert ring.qsize() == 0
            client.sendall(b"after\n")
            assert take(ring, 1) == [(connection_id, b"after")]
            assert engine.peer(connection_id) == address
    assert counters.snapshot().proxy_header_errors == 0


def steady_client(listener, ring):
    """A good connection that must keep working while the bad ones are closed."""
    client = client_of(listener)
    client.sendall(GOOD_HEADERS["v1-tcp4"][0] + b"steady\n")
    assert take(ring, 1)[0][1] == b"steady"
    return client


@pytest.mark.parametrize("name", BAD_HEADERS)
def test_a_bad_header_closes_only_its_connection(engine_impl, listener, name):
    data, reason = BAD_HEADERS[name]
    engine, ring, counters = lines_engine(engine_impl, listeners=[listener.fileno()])
    with running(engine) as runner, steady_client(listener, ring) as steady:
        with client_of(listener) as bad:
            bad.sendall(data)
            assert closed_by_server(bad), "the offending connection is closed"
            real = bad.getsockname()
        wait_for(lambda: runner.events_of("proxy_header"))
        steady.sendall(b"still\n")
        assert take(ring, 1)[0][1] == b"still"
        assert ring.qsize() == 0, "nothing of the bad connection was framed"
    [event] = runner.events_of("proxy_header")
    assert event.address == real
    assert event.detail == (proxy.REASONS[reason], data[: constants.PROTOCOL_ERROR_SAMPLE])
    stats = counters.snapshot()
    assert stats.proxy_header_errors == 1
    assert stats.connections_opened == stats.connections_closed == 2
    assert stats.messages_received == 2


def test_a_header_cut_short_is_an_error_and_no_bytes_at_all_are_not(engine_impl, listener):
    engine, ring, counters = lines_engine(engine_impl, listeners=[listener.fileno()])
    with running(engine) as runner:
        # Connects and closes without a byte: a TCP health check, a port scan.
        client_of(listener).close()
        with client_of(listener) as cut:
            cut.sendall(b"PROXY TCP4 1.2.3.4")
            time.sleep(0.1)
        wait_for(lambda: counters.snapshot().connections_closed == 2)
    [event] = runner.events_of("proxy_header")
    assert event.detail == (proxy.REASONS[proxy.TRUNCATED], b"PROXY TCP4 1.2.3.4")
    stats = counters.snapshot()
    assert stats.proxy_header_errors == 1
    assert stats.bytes_discarded == len(b"PROXY TCP4 1.2.3.4")


def test_a_header_not_finished_in_time_closes_the_connection(engine_impl, listener, monkeypatch):
    monkeypatch.setattr(constants, "PROXY_HEADER_TIMEOUT", 0.3)
    engine, ring, counters = lines_engine(engine_impl, listeners=[listener.fileno()])
    with running(engine) as runner, client_of(listener) as slow:
        slow.sendall(proxy.V2_SIGNATURE)
        started = time.monotonic()
        assert slow.recv(1) == b""
        assert time.monotonic() - started >= 0.2
        wait_for(lambda: runner.events_of("proxy_header"))
    [event] = runner.events_of("proxy_header")
    assert event.detail == (proxy.REASONS[proxy.TIMED_OUT], proxy.V2_SIGNATURE)
    assert counters.snapshot().proxy_header_errors == 1


def test_a_peer_outside_the_trusted_networks_is_closed_at_accept(engine_impl, listener):
    engine, ring, counters = lines_engine(
        engine_impl, listeners=[listener.fileno()], proxy_trusted=["192.0.2.0/24"]
    )
    with running(engine) as runner, client_of(listener) as client:
        client.sendall(GOOD_HEADERS["v1-tcp4"][0] + b"forged\n")
        assert closed_by_server(client)
        wait_for(lambda: runner.events_of("proxy_untrusted"))
        real = client.getsockname()
    assert runner.events_of("proxy_untrusted") == [("proxy_untrusted", None, real, None)]
    stats = counters.snapshot()
    assert (stats.proxy_header_errors, stats.connections_opened, stats.messages_received) == (
        1,
        0,
        0,
    )


def test_without_the_option_a_header_is_data(engine_impl, listener):
    engine, ring, counters = make_engine(
        engine_impl, framing="lines", listeners=[listener.fileno()]
    )
    with running(engine), client_of(listener) as client:
        client.sendall(GOOD_HEADERS["v1-tcp4"][0] + b"x\n")
        got = take(ring, 2)
        assert got[0][1] == GOOD_HEADERS["v1-tcp4"][0][:-2] + b"\r"
        assert engine.peer(got[0][0]) == client.getsockname()


def mutations(count, seed=14):
    """Headers good and bad: the good ones cut short, with a byte changed, with the v2
    length or family changed, with bytes after them, and random bytes after a v2
    signature."""
    rng = random.Random(seed)
    headers = [header for header, _ in GOOD_HEADERS.values()]
    headers += [header for header, _ in BAD_HEADERS.values()]
    for _ in range(count):
        data = bytearray(rng.choice(headers))
        kind = rng.randrange(5)
        if kind == 0:
            data = data[: rng.randrange(1, len(data) + 1)]
        elif kind == 1:
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif kind == 2 and data.startswith(proxy.V2_SIGNATURE):
            data[rng.choice([13, 14, 15])] = rng.randrange(256)
        elif kind == 3:
            data += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))
        else:
            data = bytearray(proxy.V2_SIGNATURE) + rng.randbytes(rng.randrange(4, 120))
        yield bytes(data)


def test_the_engine_parses_as_the_python_parser(engine_impl):
    """Each input, then the peer's end: the engine refuses it for the reason the Python
    parser gives (cut short if the parser wants more), or takes it with the address the
    parser reads."""
    engine, ring, counters = lines_engine(engine_impl, max_connections=1000)
    cases = []
    for data in mutations(300):
        connection_id, client = adopted_pair(engine)
        client.sendall(data)
        client.close()
        cases.append((connection_id, data))
    with running(engine) as runner:
        wait_for(lambda: counters.snapshot().connections_closed == len(cases))
    refused = {event.connection_id: event.detail for event in runner.events_of("proxy_header")}
    # What a socket pair's peer is: a header naming no client keeps it.
    server_side, client_side = socket.socketpair()
    with server_side, client_side:
        unix_peer = server_side.getpeername()
    for connection_id, data in cases:
        try:
            parsed = proxy.parse(data)
        except proxy.HeaderRejected as exc:
            expected = (proxy.REASONS[exc.reason], data[: constants.PROTOCOL_ERROR_SAMPLE])
            assert refused.get(connection_id) == expected, data
            continue
        if parsed is None:
            expected = (proxy.REASONS[proxy.TRUNCATED], data[: constants.PROTOCOL_ERROR_SAMPLE])
            assert refused.get(connection_id) == expected, data
            continue
        assert connection_id not in refused, data
        address = engine.peer(connection_id)
        if parsed.address is not None:
            assert address == parsed.address, data
        else:
            assert address == unix_peer, data
    assert counters.snapshot().proxy_header_errors == len(refused)


# -- Servers: on event engines, and a compiled loop per connection ---------------------------


class PerConnection(Recorded):
    """Overrides a request hook, so each connection runs the compiled loop in its handler
    thread, and the header is read there, in Python."""

    def verify_request(self, request, client_address):
        return True


SERVERS = {"engine": Recorded, "per-connection": PerConnection}


def proxy_server(path, ring, **options):
    handler = fastsock.receiver(ring, framing="lines", proxy_protocol=True, **options)
    return SERVERS[path]((LOCALHOST, 0), handler)


def messages_with_source(ring, count):
    got = []
    while len(got) < count:
        got.extend(ring.get_many(timeout=NETWORK_TIMEOUT, with_source=True))
    return [(source_id, payload) for source_id, _, payload in got]


@pytest.mark.parametrize("path", SERVERS)
def test_servers_report_the_client_the_header_names(path):
    ring = fastsock.RingQueue()
    with serving(proxy_server(path, ring)) as server:
        assert server.receive_path.on_engines == (path == "engine")
        for name, (header, address) in GOOD_HEADERS.items():
            with socket.create_connection(server.server_address, NETWORK_TIMEOUT) as client:
                client.sendall(header + LINES)
                got = messages_with_source(ring, 2)
                assert [payload for _, payload in got] == [b"first", b"second"], name
                expected = address if address is not None else client.getsockname()
                assert server.connection_address(got[0][0]) == expected, name
        # Split across reads: the header byte by byte, then lines.
        header, address = GOOD_HEADERS["v2-ipv6"]
        with socket.create_connection(server.server_address, NETWORK_TIMEOUT) as client:
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for index in range(len(header)):
                client.sendall(header[index : index + 1])
                time.sleep(0.001)
            client.sendall(b"split\n")
            [(source_id, payload)] = messages_with_source(ring, 1)
            assert payload == b"split"
            assert server.connection_address(source_id) == address
    stats = server.stats()
    assert stats.proxy_header_errors == 0 and server.errors == []
    assert stats.bytes_received == sum(len(h) + len(LINES) for h, _ in GOOD_HEADERS.values()) + (
        len(header) + len(b"split\n")
    )


@pytest.mark.parametrize("path", SERVERS)
def test_bad_headers_close_only_their_connection_on_servers(path, caplog, monkeypatch):
    # Each bad connection is logged: a fresh interval for each.
    allowed = {}
    monkeypatch.setattr(sys.modules["fastsock.receiver"]._log, "_next_allowed", allowed)
    monkeypatch.setattr(constants, "PROXY_HEADER_TIMEOUT", 0.5)
    ring = fastsock.RingQueue()
    bad_streams = {
        "none": BAD_HEADERS["none"][0],
        "garbage": BAD_HEADERS["garbage"][0],
        "v1-no-crlf": BAD_HEADERS["v1-no-crlf"][0],
        "v2-bogus-length": BAD_HEADERS["v2-bogus-length"][0],
        "late": proxy.V2_SIGNATURE,
    }
    with (
        caplog.at_level(logging.WARNING, "fastsock"),
        serving(proxy_server(path, ring)) as server,
    ):
        address = server.server_address
        with socket.create_connection(address, NETWORK_TIMEOUT) as steady:
            steady.sendall(GOOD_HEADERS["v1-tcp4"][0] + b"steady\n")
            assert ring.get(timeout=NETWORK_TIMEOUT) == b"steady"
            for number, stream in enumerate(bad_streams.values(), 1):
                allowed.clear()
                with socket.create_connection(address, NETWORK_TIMEOUT) as bad:
                    bad.sendall(stream)
                    assert closed_by_server(bad), "the offending connection is closed"
                wait_for(lambda number=number: len(server.errors) == number)
            steady.sendall(b"still\n")
            assert ring.get(timeout=NETWORK_TIMEOUT) == b"still"
            wait_for(lambda: server.stats().connections_closed == len(bad_streams))
    assert ring.qsize() == 0
    stats = server.stats()
    assert stats.proxy_header_errors == len(bad_streams)
    assert all(type(error) is fastsock.ProxyHeaderError for error in server.errors)
    reasons = [proxy.NOT_PROXY, proxy.NOT_PROXY, proxy.V1_TOO_LONG, proxy.V2_BAD_LENGTH]
    reasons.append(proxy.TIMED_OUT)
    for error, reason in zip(server.errors, reasons, strict=True):
        assert proxy.REASONS[reason] in str(error)
    logged = [record.getMessage() for record in caplog.records]
    assert any("it began b'GET / HTTP/1.1\\r\\nHost" in text for text in logged), logged
    assert any("it began b'\\r\\n\\r\\n\\x00\\r\\nQUIT\\n'" in text for text in logged), logged


@pytest.mark.parametrize("path", SERVERS)
def test_servers_close_an_untrusted_peer_unread(path, caplog, monkeypatch):
    monkeypatch.setattr(sys.modules["fastsock.receiver"]._log, "_next_allowed", {})
    ring = fastsock.RingQueue()
    server = proxy_server(path, ring, proxy_trusted=["192.0.2.0/24"])
    with caplog.at_level(logging.WARNING, "fastsock"), serving(server):
        with socket.create_connection(server.server_address, NETWORK_TIMEOUT) as client:
            client.sendall(GOOD_HEADERS["v1-tcp4"][0] + b"forged\n")
            assert closed_by_server(client)
            real = client.getsockname()
        wait_for(lambda: server.errors)
    [error] = server.errors
    assert type(error) is fastsock.ProxyHeaderError and "not in proxy_trusted" in str(error)
    assert repr(real) in str(error)
    stats = server.stats()
    assert (stats.proxy_header_errors, stats.connections_opened, stats.messages_received) == (
        1,
        0,
        0,
    )
    assert any("not in proxy_trusted" in record.getMessage() for record in caplog.records)


# -- Behind a real HAProxy -------------------------------------------------------------------

HAPROXY = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/sbin")
# The clients' address, another than HAProxy's own (127.0.0.1): what the header must carry.
CLIENT_HOST = "127.0.0.2"


@pytest.fixture
def haproxy():
    """The haproxy binary (.ci/run installs it)."""
    return require_program(HAPROXY, "haproxy", "haproxy", "the tests behind a real HAProxy")


@contextlib.contextmanager
def haproxy_in_front(binary, backend, send_proxy, directory):
    """HAProxy in TCP mode on a loopback port, forwarding to backend with send_proxy ("" for
    no header); yields its frontend's address."""
    port = free_port()
    config = directory / "haproxy.cfg"
    config.write_text(
        "global\n"
        "    maxconn 64\n"
        "defaults\n"
        "    mode tcp\n"
        "    timeout connect 5s\n"
        "    timeout client 30s\n"
        "    timeout server 30s\n"
        "frontend clients\n"
        f"    bind {LOCALHOST}:{port}\n"
        "    default_backend fastsock\n"
        "backend fastsock\n"
        f"    server receiver {backend[0]}:{backend[1]} {send_proxy}\n"
    )
    log = open(directory / "haproxy.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen([binary, "-db", "-f", str(config)], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + NETWORK_TIMEOUT
        while not listening(LOCALHOST, port):
            assert process.poll() is None, (directory / "haproxy.log").read_text()
            assert time.monotonic() < deadline, "haproxy did not start listening"
            time.sleep(0.05)
        yield (LOCALHOST, port)
    finally:
        process.terminate()
        process.wait(NETWORK_TIMEOUT)
        log.close()


def listening(host, port):
    """True once something listens on host:port (read from /proc, not by connecting, so
    no connection reaches the backend)."""
    wanted = f"{socket.inet_aton(host)[::-1].hex().upper()}:{port:04X}"
    with open("/proc/net/tcp") as table:
        rows = [line.split() for line in table.readlines()[1:]]
    return any(row[1] == wanted and row[3] == "0A" for row in rows)


def client_through(frontend):
    client = socket.socket()
    client.settimeout(NETWORK_TIMEOUT)
    client.bind((CLIENT_HOST, 0))
    client.connect(frontend)
    return client


@pytest.mark.parametrize("send_proxy", ["send-proxy", "send-proxy-v2"])
@pytest.mark.parametrize("path", SERVERS)
def test_behind_haproxy_the_address_is_the_clients(haproxy, path, send_proxy, tmp_path):
    ring = fastsock.RingQueue()
    with (
        serving(proxy_server(path, ring)) as server,
        haproxy_in_front(haproxy, server.server_address, send_proxy, tmp_path) as frontend,
    ):
        clients = [client_through(frontend) for _ in range(3)]
        with contextlib.ExitStack() as stack:
            for client in clients:
                stack.enter_context(client)
            for number, client in enumerate(clients):
                client.sendall(b"hello %d\nbye %d\n" % (number, number))
            got = messages_with_source(ring, 2 * len(clients))
            by_payload = dict((payload, source_id) for source_id, payload in got)
            for number, client in enumerate(clients):
                source_id = by_payload[b"hello %d" % number]
                assert by_payload[b"bye %d" % number] == source_id
                address = server.connection_address(source_id)
                assert address == client.getsockname(), (address, client.getsockname())
                assert address[0] == CLIENT_HOST
    stats = server.stats()
    assert stats.proxy_header_errors == 0 and server.errors == []


@pytest.mark.parametrize("path", SERVERS)
def test_behind_haproxy_without_send_proxy_every_connection_is_refused(
    haproxy, path, tmp_path, monkeypatch
):
    monkeypatch.setattr(sys.modules["fastsock.receiver"]._log, "_next_allowed", {})
    ring = fastsock.RingQueue()
    with (
        serving(proxy_server(path, ring)) as server,
        haproxy_in_front(haproxy, server.server_address, "", tmp_path) as frontend,
    ):
        with client_through(frontend) as client:
            client.sendall(b"no header\n")
            assert closed_by_server(client)
        wait_for(lambda: server.errors)
    assert ring.qsize() == 0
    assert server.stats().proxy_header_errors == 1
    assert proxy.REASONS[proxy.NOT_PROXY] in str(server.errors[0])


# -- fastsock serve --proxy-protocol ---------------------------------------------------------

# The fixture that starts `fastsock serve` processes and kills them after.
serve = test_cli.serve


def test_fastsock_serve_writes_the_client_the_header_names(serve):
    server = serve("tcp://127.0.0.1:0", "--proxy-protocol", "--format", "jsonl")
    with socket.create_connection(server.inet_address(), NETWORK_TIMEOUT) as client:
        client.sendall(GOOD_HEADERS["v1-tcp4"][0] + b"behind a balancer\n")
        with socket.create_connection(server.inet_address(), NETWORK_TIMEOUT) as bad:
            bad.sendall(b"no header\n")
            assert closed_by_server(bad)
        warning = server.line_matching("it began")
        client.sendall(b"still here\n")
        server.line_matching("2 opened")
    assert server.stop() == 0
    records = [json.loads(line) for line in server.output.read_text().splitlines()]
    assert [(record["peer"], record["text"]) for record in records] == [
        ("192.0.2.7:50123", "behind a balancer"),
        ("192.0.2.7:50123", "still here"),
    ]
    assert proxy.REASONS[proxy.NOT_PROXY] in warning and "b'no header\\n'" in warning
    assert "proxy headers 1" in server.stderr[-1]


@pytest.mark.parametrize(
    "arguments, says",
    [
        (["udp://127.0.0.1:0", "--proxy-protocol"], "--proxy-protocol applies to stream"),
        (["tcp://127.0.0.1:0", "--proxy-trusted", "10.0.0.0/8"], "with --proxy-protocol"),
        (["tcp://127.0.0.1:0", "--proxy-protocol", "--proxy-trusted", "10.0.0.0/33"], "33"),
        (["tcp://127.0.0.1:0", "--proxy-protocol", "--proxy-trusted", ","], "names no network"),
    ],
)
def test_serve_refuses_proxy_options_that_do_not_apply(capsys, arguments, says):
    assert cli.main(["serve", *arguments]) == 2
    assert says in capsys.readouterr().err


def test_serve_hands_the_proxy_options_to_the_receiver():
    arguments = ["serve", "tcp://127.0.0.1:0", "--proxy-protocol"]
    arguments += ["--proxy-trusted", "10.1.0.0/16, 2001:db8::/32"]
    options = cli.build_parser().parse_args(arguments)
    endpoint = _cli_serve.parse_endpoint(options.url, allow_remote=False)
    _cli_serve.check_serve_options(options, endpoint)
    limits = _cli_serve.receive_options(options, endpoint)
    assert limits.proxy_protocol is True
    assert limits.proxy_trusted == ("10.1.0.0/16", "2001:db8::/32")
    default = cli.build_parser().parse_args(["serve", "tcp://127.0.0.1:0"])
    assert _cli_serve.receive_options(default, endpoint).proxy_protocol is False


def test_a_header_is_read_within_recv_size_and_raw_chunks_stay_within_it(engine_impl):
    engine, ring, counters = lines_engine(engine_impl, framing="raw", recv_size=16)
    header, address = GOOD_HEADERS["v2-ipv4-tlvs"]
    connection_id, client = adopted_pair(engine)
    with client:
        client.sendall(header + b"x" * 40)
        with running(engine):
            got = take(ring, 3)
            assert b"".join(payload for _, payload in got) == b"x" * 40
            assert max(len(payload) for _, payload in got) <= 16
            assert engine.peer(connection_id) == address
