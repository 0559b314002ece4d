"""TLS on the event engines (``ssl_context``): real certificates made by Debian's
``openssl`` command, real handshakes with the stdlib's ``ssl`` clients, with and without a
client certificate, on the compiled engine and its reference twin, on a server, and in
``fastsock serve``.  Bad TLS (garbage, no ClientHello, a handshake cut short, a refused or
missing client certificate, a reset inside a record) closes only that connection, counted
and logged with OpenSSL's reason; the other connections lose nothing."""

import json
import logging
import os
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time

import pytest

import fastsock
from fastsock import tls
from tests import test_engine
from tests.support import LOCALHOST, NETWORK_TIMEOUT, serving
from tests.test_cli import (
    ServeProcess,
    fastsock_command,
    payload,
    run_short_bench,
    started_by,
)
from tests.test_engine import client_of, closed_by_server, make_engine, running, take
from tests.test_proxy import GOOD_HEADERS
from tests.test_syslog import Recorded, wait_for

engine_impl = test_engine.engine_impl
listener = test_engine.listener

OPENSSL = shutil.which("openssl")
CLIENT_SUBJECT = "CN=client,O=Example"


def _openssl(*arguments, cwd):
    subprocess.run(
        [OPENSSL, *arguments], cwd=cwd, check=True, capture_output=True, timeout=NETWORK_TIMEOUT
    )


@pytest.fixture(scope="session")
def certificates(tmp_path_factory):
    """A CA, a server certificate for localhost and 127.0.0.1, and a client certificate
    (O=Example, CN=client), as files in a temporary directory; made by the openssl command
    (.ci/run installs it), the tests fail without it under CI=true and skip elsewhere."""
    if OPENSSL is None:
        message = "the openssl command is not installed (Debian: apt-get install openssl)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}: the TLS tests cannot make their certificates")
        pytest.skip(f"!!! {message}: the TLS tests are SKIPPED !!!")
    directory = tmp_path_factory.mktemp("certificates")
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=Test CA",
        "-keyout", "ca.key", "-out", "ca.pem",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip
    for name, subject in (("server", "/CN=localhost"), ("client", "/O=Example/CN=client")):
        (directory / f"{name}.ext").write_text(
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
            "authorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n"
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=serverAuth,clientAuth\n"
        )
        _openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-subj", subject,
            "-keyout", f"{name}.key", "-out", f"{name}.csr",
            cwd=directory,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem",
            cwd=directory,
        )  # fmt: skip
    return directory


def server_context(certificates, verify_mode=ssl.CERT_OPTIONAL, tickets=0):
    """The server's context; no session tickets unless asked: a client that never reads
    leaves the tickets unread, and its close then resets the connection."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificates / "server.pem", certificates / "server.key")
    context.load_verify_locations(certificates / "ca.pem")
    context.verify_mode = verify_mode
    context.num_tickets = tickets
    return context


def client_context(certificates, with_certificate=True):
    context = ssl.create_default_context(cafile=str(certificates / "ca.pem"))
    if with_certificate:
        context.load_cert_chain(certificates / "client.pem", certificates / "client.key")
    return context


def tls_client(sock, context):
    return context.wrap_socket(sock, server_hostname="localhost")


def client_hello(certificates):
    """The first flight of a real client: its ClientHello, as the wire carries it."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_context(certificates).wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()


def tls_engine(engine_impl, listener, certificates, **options):
    options.setdefault("ssl_context", server_context(certificates))
    return make_engine(engine_impl, listeners=[listener.fileno()], **options)


def closed_after_any_alert(sock):
    """True once the server closed the connection, after the alert it may have sent."""
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    return True


def events_of(runner, kind):
    return [event for event in runner.events if event.kind == kind]


def encoded(framing, payload):
    if framing == "length":
        return struct.pack(">I", len(payload)) + payload
    if framing in ("octets", "syslog"):
        return b"%d %s" % (len(payload), payload)
    return payload + b"\n"


# -- The engine, compiled and reference --------------------------------------------------------


@pytest.mark.parametrize("framing", ["lines", "length", "octets", "syslog"])
@pytest.mark.parametrize("with_certificate", [True, False])
def test_every_framing_over_tls_with_messages_split_across_records(
    engine_impl, listener, certificates, framing, with_certificate
):
    engine, ring, counters = tls_engine(engine_impl, listener, certificates, framing=framing)
    payloads = [b"message %d " % index + b"x" * (index * 37 % 500) for index in range(300)]
    stream = b"".join(encoded(framing, payload) for payload in payloads)
    context = client_context(certificates, with_certificate)
    with running(engine) as runner:
        with tls_client(client_of(listener), context) as client:
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # Each send is a record of its own: the messages straddle records.
            for start in range(0, len(stream), 777):
                client.sendall(stream[start : start + 777])
            got = take(ring, len(payloads))
            connection_id = got[0][0]
            subject = engine.peer_subject(connection_id)
        wait_for(lambda: counters.snapshot().connections_closed == 1)
    assert [payload for _, payload in got] == payloads
    assert subject == (CLIENT_SUBJECT if with_certificate else None)
    stats = counters.snapshot()
    assert stats.bytes_received == len(stream)
    assert (stats.tls_handshake_errors, stats.resets, stats.bytes_discarded) == (0, 0, 0)
    assert runner.events == []
    assert engine.tls_sessions_open == 0


def test_multi_mebibyte_bulk_arrives_whole(engine_impl, listener, certificates):
    engine, ring, counters = tls_engine(
        engine_impl, listener, certificates, framing="lines", recv_size=65536
    )
    lines = [b"%063d" % index for index in range(80_000)]  # 5 MiB
    with running(engine), tls_client(client_of(listener), client_context(certificates)) as client:
        sender = threading.Thread(target=client.sendall, args=(b"\n".join(lines) + b"\n",))
        sender.start()
        got = take(ring, len(lines))
        sender.join(NETWORK_TIMEOUT)
    assert [payload for _, payload in got] == lines
    assert counters.snapshot().tls_handshake_errors == 0


def memory_client(sock, context):
    """A client whose records the test sends itself: an SSLObject over memory BIOs, its
    handshake done over ``sock``; returns (client, outgoing)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    sock.settimeout(NETWORK_TIMEOUT)
    while True:
        try:
            client.do_handshake()
            break
        except ssl.SSLWantReadError:
            sock.sendall(outgoing.read())
            incoming.write(sock.recv(65536))
    sock.sendall(outgoing.read())
    return client, outgoing


def test_records_trickled_a_few_bytes_at_a_time_arrive_whole(engine_impl, listener, certificates):
    # Record headers and bodies cut across reads: the engine follows the record boundaries
    # to ask for plaintext only when a whole record waits, and must lose none of them.
    engine, ring, counters = tls_engine(engine_impl, listener, certificates, framing="lines")
    lines = [b"line %d" % index for index in range(6)]
    with running(engine), client_of(listener) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client, outgoing = memory_client(sock, client_context(certificates))
        for line in lines:
            client.write(line + b"\n")
        wire = outgoing.read()
        for start in range(0, len(wire), 3):
            sock.sendall(wire[start : start + 3])
            time.sleep(0.002)
        got = take(ring, len(lines))
    assert [payload for _, payload in got] == lines
    assert counters.snapshot().resets == 0


def test_a_required_client_certificate_missing_is_refused(engine_impl, listener, certificates):
    context = server_context(certificates, ssl.CERT_REQUIRED)
    engine, ring, counters = tls_engine(
        engine_impl, listener, certificates, framing="lines", ssl_context=context
    )
    with running(engine) as runner:
        with tls_client(client_of(listener), client_context(certificates)) as good:
            good.sendall(b"with a certificate\n")
            assert take(ring, 1)[0][1] == b"with a certificate"
        raw = client_of(listener)
        # TLS 1.3: the client's side of the handshake ends before the server checks it.
        with tls_client(raw, client_context(certificates, with_certificate=False)) as bad:
            try:
                bad.sendall(b"without one\n")
                closed = closed_by_server(bad)
            except (ssl.SSLError, OSError):
                closed = True
        assert closed
        wait_for(lambda: counters.snapshot().tls_handshake_errors == 1)
        wait_for(lambda: events_of(runner, "tls_handshake"))
    assert take(ring, 1, timeout=0.2) == []
    [event] = events_of(runner, "tls_handshake")
    assert "CERTIFICATE" in event.detail
    assert engine.tls_sessions_open == 0


def test_garbage_a_silent_client_and_a_cut_handshake_close_only_themselves(
    engine_impl, listener, certificates
):
    engine, ring, counters = tls_engine(
        engine_impl, listener, certificates, framing="lines", tls_handshake_timeout=0.5
    )
    hello = client_hello(certificates)
    with running(engine) as runner:
        with tls_client(client_of(listener), client_context(certificates)) as good:
            garbage = client_of(listener)
            garbage.sendall(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n")
            silent = client_of(listener)
            cut = client_of(listener)
            cut.sendall(hello[: len(hello) // 2])
            for bad in (garbage, silent, cut):
                assert closed_after_any_alert(bad)
                bad.close()
            good.sendall(b"still here\n")
            assert take(ring, 1)[0][1] == b"still here"
        wait_for(lambda: counters.snapshot().connections_closed == 4)
    reasons = sorted(event.detail for event in events_of(runner, "tls_handshake"))
    assert reasons == sorted(
        ["HTTP_REQUEST"] + ["no handshake within tls_handshake_timeout"] * 2
    ), reasons
    stats = counters.snapshot()
    assert (stats.tls_handshake_errors, stats.connections_opened) == (3, 4)
    assert engine.tls_sessions_open == 0


def test_a_client_gone_before_its_hello_is_no_handshake_error(engine_impl, listener, certificates):
    engine, _, counters = tls_engine(engine_impl, listener, certificates)
    with running(engine) as runner:
        client_of(listener).close()
        wait_for(lambda: counters.snapshot().connections_closed == 1)
    assert counters.snapshot().tls_handshake_errors == 0 and runner.events == []


def test_a_reset_inside_a_record_loses_only_that_connection(engine_impl, listener, certificates):
    engine, ring, counters = tls_engine(engine_impl, listener, certificates, framing="lines")
    context = client_context(certificates)
    with running(engine):
        with tls_client(client_of(listener), context) as good:
            broken = tls_client(client_of(listener), context)
            broken.sendall(b"before the reset\n")
            assert take(ring, 1)[0][1] == b"before the reset"
            # Half a record on the wire, then a reset (SO_LINGER 0).
            raw = socket.socket(fileno=broken.detach())
            raw.sendall(b"\x17\x03\x03\x01\x00" + b"\x00" * 100)
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            raw.close()
            wait_for(lambda: counters.snapshot().connections_closed == 1)
            good.sendall(b"unaffected\n")
            assert take(ring, 1)[0][1] == b"unaffected"
    stats = counters.snapshot()
    assert stats.tls_handshake_errors == 0
    assert stats.resets == 1


def test_close_notify_ends_the_connection_and_is_answered(engine_impl, listener, certificates):
    # Session tickets on: this client reads them as it unwraps.
    context = server_context(certificates, tickets=2)
    engine, ring, counters = tls_engine(
        engine_impl, listener, certificates, framing="lines", ssl_context=context
    )
    with running(engine) as runner:
        client = tls_client(client_of(listener), client_context(certificates))
        client.sendall(b"then close_notify\n")
        raw = client.unwrap()
        assert raw.recv(1) == b""
        raw.close()
        assert take(ring, 1)[0][1] == b"then close_notify"
        wait_for(lambda: counters.snapshot().connections_closed == 1)
    assert runner.events == [] and counters.snapshot().resets == 0


def test_many_connections_and_one_misbehaving_lose_nothing(engine_impl, listener, certificates):
    engine, ring, counters = tls_engine(engine_impl, listener, certificates, framing="lines")
    clients, per_client = 20, 500
    context = client_context(certificates)

    def send(index):
        with tls_client(client_of(listener), context) as client:
            for start in range(0, per_client, 50):
                client.sendall(b"".join(b"%d %d\n" % (index, n) for n in range(start, start + 50)))

    with running(engine) as runner:
        senders = [threading.Thread(target=send, args=(index,)) for index in range(clients)]
        misbehaving = client_of(listener)
        misbehaving.sendall(b"\x16\x03\x01\xff\xff" + b"\xee" * 200)
        for sender in senders:
            sender.start()
        got = take(ring, clients * per_client)
        for sender in senders:
            sender.join(NETWORK_TIMEOUT)
        assert closed_after_any_alert(misbehaving)
        misbehaving.close()
        wait_for(lambda: counters.snapshot().connections_closed == clients + 1)
    by_client = {}
    for _, message in got:
        index, number = message.split()
        by_client.setdefault(int(index), []).append(int(number))
    assert by_client == {index: list(range(per_client)) for index in range(clients)}
    assert counters.snapshot().tls_handshake_errors == 1
    assert len(events_of(runner, "tls_handshake")) == 1
    assert engine.tls_sessions_open == 0


@pytest.mark.parametrize("name", ["v1-tcp4", "v2-ipv4-tlvs", "v2-ipv6"])
def test_a_proxy_header_then_tls(engine_impl, listener, certificates, name):
    header, address = GOOD_HEADERS[name]
    engine, ring, counters = tls_engine(
        engine_impl, listener, certificates, framing="lines", proxy_protocol=True
    )
    with running(engine) as runner:
        raw = client_of(listener)
        raw.sendall(header)
        with tls_client(raw, client_context(certificates)) as client:
            client.sendall(b"behind a load balancer\n")
            [(connection_id, payload)] = take(ring, 1)
        wait_for(lambda: counters.snapshot().connections_closed == 1)
    assert payload == b"behind a load balancer"
    assert engine.peer(connection_id) == address
    assert engine.peer_subject(connection_id) == CLIENT_SUBJECT
    stats = counters.snapshot()
    assert stats.bytes_received == len(header) + len(b"behind a load balancer\n")
    assert runner.events == []


def test_a_stop_drains_what_tls_clients_sent(engine_impl, listener, certificates):
    engine, ring, counters = tls_engine(
        engine_impl, listener, certificates, framing="lines", drain_timeout=5.0
    )
    with running(engine), tls_client(client_of(listener), client_context(certificates)) as client:
        client.sendall(b"".join(b"line %d\n" % index for index in range(1000)))
        wait_for(lambda: counters.snapshot().messages_received == 1000)
    assert len(take(ring, 1000)) == 1000
    assert counters.snapshot().messages_dropped == 0


# -- Options and the paths that refuse TLS -----------------------------------------------------


def test_servers_that_cannot_terminate_tls_refuse_it_when_made(certificates):
    ring = fastsock.RingQueue()
    handler = fastsock.receiver(ring, ssl_context=server_context(certificates))
    with pytest.raises(ValueError, match="DTLS"):
        fastsock.UDPServer((LOCALHOST, 0), handler)
    with pytest.raises(ValueError, match="engines"):
        fastsock.ForkingTCPServer((LOCALHOST, 0), handler)


# -- A server ----------------------------------------------------------------------------------


def test_a_server_logs_a_failed_handshake_and_names_the_client_certificate(
    certificates, caplog, monkeypatch
):
    monkeypatch.setattr(fastsock.receiver.__globals__["_log"], "_next_allowed", {})
    ring = fastsock.RingQueue()
    handler = fastsock.receiver(ring, framing="lines", ssl_context=server_context(certificates))
    with (
        caplog.at_level(logging.WARNING, "fastsock"),
        Recorded((LOCALHOST, 0), handler) as server,
        serving(server),
    ):
        address = server.server_address
        with tls_client(socket.create_connection(address), client_context(certificates)) as client:
            client.sendall(b"hello\n")
            [(connection_id, _, payload)] = ring.get_many(timeout=NETWORK_TIMEOUT, with_source=True)
            assert server.receive_path.peer_subject(connection_id) == CLIENT_SUBJECT
            assert server.connection_address(connection_id)[0] == LOCALHOST
        with socket.create_connection(address) as garbage:
            garbage.sendall(b"not TLS at all, but long enough to be refused\r\n\r\n")
            assert closed_by_server(garbage)
        wait_for(lambda: server.stats().tls_handshake_errors == 1)
        wait_for(lambda: "TLS handshake failed" in caplog.text)
    assert payload == b"hello"
    assert "WRONG_VERSION_NUMBER" in caplog.text, caplog.text


# -- fastsock serve ------------------------------------------------------------------------------


@pytest.fixture
def serve(tmp_path):
    yield from started_by(ServeProcess, tmp_path)


def test_serve_with_mutual_tls_writes_the_subject_and_refuses_a_client_without(serve, certificates):
    server = serve(
        "tcp://127.0.0.1:0",
        "--format",
        "jsonl",
        "--tls-cert",
        str(certificates / "server.pem"),
        "--tls-key",
        str(certificates / "server.key"),
        "--tls-client-ca",
        str(certificates / "ca.pem"),
    )
    address = server.inet_address()
    lines = [b"over mTLS %d" % index for index in range(200)]
    with tls_client(socket.create_connection(address), client_context(certificates)) as client:
        client.sendall(b"".join(line + b"\n" for line in lines))
    without = tls_client(
        socket.create_connection(address), client_context(certificates, with_certificate=False)
    )
    with without:
        try:
            without.sendall(b"refused\n")
            assert closed_after_any_alert(without)
        except (ssl.SSLError, OSError):
            pass
    server.line_matching("tls handshakes 1")
    assert server.stop() == 0
    records = [json.loads(line) for line in server.output.read_text().splitlines()]
    assert [payload(record) for record in records] == lines
    assert {record["subject"] for record in records} == {CLIENT_SUBJECT}
    assert any("TLS handshake failed" in line for line in server.stderr), server.stderr


@pytest.mark.parametrize(
    "arguments, says",
    [
        (["--tls-cert", "server.pem"], "go together"),
        (["--tls-client-ca", "ca.pem"], "applies with --tls-cert"),
        (["--tls-cert", "missing.pem", "--tls-key", "server.key"], "No such file"),
        (["--tls-cert", "server.pem", "--tls-key", "client.key"], "not a certificate and its key"),
        (
            ["--tls-cert", "server.pem", "--tls-key", "server.key", "--tls-client-ca", "ca.key"],
            "CA",
        ),
    ],
)
def test_bad_tls_files_are_a_one_line_error(certificates, arguments, says):
    completed = subprocess.run(
        fastsock_command("serve", "tcp://127.0.0.1:0", *arguments)[0],
        cwd=certificates,
        env=fastsock_command()[1],
        capture_output=True,
        text=True,
        timeout=NETWORK_TIMEOUT,
    )
    assert completed.returncode == 2, completed
    assert says in completed.stderr and "Traceback" not in completed.stderr, completed.stderr
    assert len(completed.stderr.strip().splitlines()) == 1, completed.stderr


def test_serve_help_names_the_tls_flags(tmp_path):
    completed = subprocess.run(
        fastsock_command("serve", "--help")[0],
        cwd=tmp_path,
        env=fastsock_command()[1],
        capture_output=True,
        text=True,
        timeout=NETWORK_TIMEOUT,
    )
    for flag in ("--tls-cert", "--tls-key", "--tls-client-ca", "TLS (--tls-cert"):
        assert flag in completed.stdout


# -- The benchmark's TLS rows ------------------------------------------------------------------


def test_the_tls_rows_of_the_benchmark_take_everything_sent(tmp_path):
    servers = "stdlib-recv-queue,stdlib-readline-queue,fastsock-compiled-batch,uvloop-protocol"
    finished, document = run_short_bench(tmp_path, "tls-bulk,tls-lines-1", servers)
    assert "Traceback" not in finished.stderr
    rows = {(row["workload"], row["server"]): row for row in document["rows"]}
    assert set(rows) == {
        ("tls-bulk", "stdlib-recv-queue"),
        ("tls-bulk", "fastsock-compiled-batch"),
        ("tls-bulk", "uvloop-protocol"),
        ("tls-lines-1", "stdlib-readline-queue"),
        ("tls-lines-1", "fastsock-compiled-batch"),
        ("tls-lines-1", "uvloop-protocol"),
    }
    for row in rows.values():
        assert row["status"] == "ok", row["error"]
        assert row["summary"]["received"] > 0 and row["summary"]["lost"] == 0


# -- Record boundaries -------------------------------------------------------------------------


def records(*bodies, kind=23):
    return b"".join(bytes([kind, 3, 3]) + len(body).to_bytes(2, "big") + body for body in bodies)


@pytest.mark.parametrize("chunk", [1, 2, 5, 7, 300, 100_000])
def test_record_boundaries_count_the_incomplete_record_at_any_cut(chunk):
    bodies = [b"", b"a", b"b" * 300, b"c" * (2**14 + 256), b"d" * 5]
    stream = records(*bodies)
    ends = []
    for body in bodies:
        ends.append((ends[-1] if ends else 0) + 5 + len(body))
    boundaries = tls.RecordBoundaries()
    for start in range(0, len(stream), chunk):
        fed = min(start + chunk, len(stream))
        last_end = max([end for end in ends if end <= fed], default=0)
        assert boundaries.follow(stream[start:fed]) == fed - last_end


@pytest.mark.parametrize(
    "stream",
    [
        b"GET / HTTP/1.1\r\n",  # not a record type
        b"\x80\x2e\x01\x03\x01",  # an SSLv2-style ClientHello
        b"\x17\x02\x00\x00\x01",  # not version 3.x
        b"\x17\x03\x03\x48\x01",  # a body longer than TLS allows
    ],
)
def test_record_boundaries_give_up_on_what_is_not_tls(stream):
    boundaries = tls.RecordBoundaries()
    assert boundaries.follow(records(b"fine") + stream) == tls.UNKNOWN
    assert boundaries.follow(records(b"later")) == tls.UNKNOWN


def test_a_session_asks_ssl_only_for_whole_records(certificates):
    server_end, client_end = socket.socketpair()
    with server_end, client_end:
        session = tls.TlsSession(server_context(certificates), server_end.fileno())
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        client = client_context(certificates).wrap_bio(
            incoming, outgoing, server_hostname="localhost"
        )
        client_end.settimeout(NETWORK_TIMEOUT)
        while True:
            try:
                client.do_handshake()
                break
            except ssl.SSLWantReadError:
                session.receive(outgoing.read())
                assert not session.advance_handshake()
                incoming.write(client_end.recv(65536))
        session.receive(outgoing.read())
        assert session.advance_handshake()
        buffer = memoryview(bytearray(65536))
        assert session.read_into(buffer) == 0 and session.drained
        client.write(b"x" * 100)
        record = outgoing.read()
        session.receive(record[:50])
        assert session.read_into(buffer) == 0 and session.drained
        assert session.unfinished == 50
        session.receive(record[50:])
        assert session.read_into(buffer) == 100 and session.drained
        assert bytes(buffer[:100]) == b"x" * 100
