"""The receive loop, compiled and reference, and the servers' compiled fast path."""

import os
import queue
import random
import signal
import socket
import struct
import sys
import threading
import time

import pytest

import fastsock

GENEROUS = 10.0
HOST = "127.0.0.1"


def _receiver(impl, sock, framing="lines", ring=None, **options):
    framer_class, ring_class, counters_class, receiver_class = impl
    framer_options = {k: options.pop(k) for k in list(options) if k in ("max_line", "max_frame")}
    ring = ring if ring is not None else ring_class()
    counters = counters_class()
    receiver = receiver_class(
        sock.fileno(), framer_class(framing, **framer_options), ring, counters, 7, **options
    )
    return receiver, ring, counters


def _send_in_thread(sock, chunks, close=True):
    def send():
        try:
            for chunk in chunks:
                sock.sendall(chunk)
            if close:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the receiving side closed the connection: that test is about it

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def _drain(ring, expected, timeout=GENEROUS, with_source=False):
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < expected:
        try:
            remaining = max(0.0, deadline - time.monotonic())
            got.extend(ring.get_many(timeout=remaining, with_source=with_source))
        except queue.Empty:
            break
    return got


def _random_chunks(data, rng):
    chunks, position = [], 0
    while position < len(data):
        size = rng.choice([1, 2, 7, 100, 4096, 65536, 300_000])
        chunks.append(data[position : position + size])
        position += size
    return chunks


@pytest.mark.parametrize("framing", ["lines", "length", "raw"])
def test_every_message_arrives_once_in_order(impl, framing):
    rng = random.Random(framing)
    messages = [
        rng.randbytes(rng.choice([0, 1, 63, 1000, 60_000])).replace(b"\n", b"") for _ in range(400)
    ]
    if framing == "lines":
        stream = b"".join(m + b"\n" for m in messages)
    elif framing == "length":
        stream = b"".join(struct.pack(">I", len(m)) + m for m in messages)
    else:
        stream = b"".join(messages)
    server_side, client_side = socket.socketpair()
    with server_side, client_side:
        receiver, ring, counters = _receiver(impl, server_side, framing)
        sender = _send_in_thread(client_side, _random_chunks(stream, rng))
        assert receiver.run() == "eof"
        receiver.close()
        sender.join(GENEROUS)
    stats = counters.snapshot()
    assert stats.bytes_received == len(stream)
    assert stats.connections_opened == stats.connections_closed == 1
    assert stats.bytes_discarded == 0
    if framing == "raw":
        got = []
        while not ring.empty():
            got.extend(ring.get_many())
        assert b"".join(got) == stream
        assert stats.messages_received == len(got)
    else:
        assert _drain(ring, len(messages)) == messages
        assert stats.messages_received == len(messages)


def test_messages_carry_their_connection_id(impl):
    server_side, client_side = socket.socketpair()
    with server_side, client_side:
        receiver, ring, _ = _receiver(impl, server_side)
        _send_in_thread(client_side, [b"a\nb\n"])
        assert receiver.run() == "eof"
    assert ring.get_many(with_source=True) == [(7, None, b"a"), (7, None, b"b")]


def test_a_line_over_the_limit_ends_the_connection_after_the_good_lines(impl):
    server_side, client_side = socket.socketpair()
    with server_side, client_side:
        receiver, ring, counters = _receiver(impl, server_side, max_line=100)
        stream = [b"ok\n", b"x" * 100 + b"\n", b"y" * 101, b"never\n"]
        _send_in_thread(client_side, stream, close=False)
        assert receiver.run() == "line_too_long"
        receiver.close()
    assert _drain(ring, 2) == [b"ok", b"x" * 100]
    stats = counters.snapshot()
    assert stats.lines_too_long == 1
    assert stats.framing_errors == 1
    assert stats.bytes_discarded >= 101


@pytest.mark.parametrize("prefix", [0xFFFFFFFF, 0x80000000, 1025, b"GET "])
def test_a_hostile_length_prefix_is_refused_at_the_header(impl, prefix):
    header = prefix if isinstance(prefix, bytes) else struct.pack(">I", prefix)
    server_side, client_side = socket.socketpair()
    with server_side, client_side:
        receiver, ring, counters = _receiver(impl, server_side, "length", max_frame=1024)
        _send_in_thread(client_side, [struct.pack(">I", 3) + b"abc", header], close=False)
        assert receiver.run() == "frame_too_large"
        receiver.close()
    assert ring.get_many(timeout=GENEROUS) == [b"abc"]
    assert counters.snapshot().frames_too_large == 1


def test_end_of_stream_mid_frame_counts_the_partial_frame(impl):
    server_side, client_side = socket.socketpair()
    with server_side, client_side:
        receiver, ring, counters = _receiver(impl, server_side, "length")
        stream = struct.pack(">I", 2) + b"ok" + struct.pack(">I", 10) + b"par"
        _send_in_thread(client_side, [stream])
        assert receiver.run() == "eof"
        receiver.close()
    assert ring.get_many(timeout=GENEROUS) == [b"ok"]
    stats = counters.snapshot()
    assert stats.bytes_discarded == 7
    assert stats.bytes_received == 6 + 7


def test_a_reset_mid_frame_is_an_ordinary_end(impl):
    listener = socket.create_server((HOST, 0))
    client = socket.create_connection(listener.getsockname())
    server_side, _ = listener.accept()
    with listener, server_side:
        receiver, ring, counters = _receiver(impl, server_side)
        client.sendall(b"whole\npart")
        time.sleep(0.1)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        assert receiver.run() == "reset"
        receiver.close()
    assert ring.get_many(timeout=GENEROUS) == [b"whole"]
    stats = counters.snapshot()
    assert stats.resets == 1
    assert stats.bytes_discarded == 4


def test_a_full_ring_pauses_reading_and_loses_nothing(impl):
    ring_class = impl[1]
    ring = ring_class(max_messages=64, max_bytes=64 * 1024)
    line = b"z" * 1023 + b"\n"
    total = 16 * 1024  # 16 MiB: far more than the ring and the socket buffers hold
    server_side, client_side = socket.socketpair()
    with server_side, client_side:
        receiver, ring, counters = _receiver(impl, server_side, ring=ring)
        sender = _send_in_thread(client_side, [line * 256] * (total // 256))
        result = {}
        loop = threading.Thread(target=lambda: result.setdefault("end", receiver.run()))
        loop.start()
        time.sleep(0.5)
        assert sender.is_alive(), "the stalled consumer must push back on the sender"
        assert ring.qsize() <= 64
        got = _drain(ring, total, timeout=60)
        loop.join(GENEROUS)
        sender.join(GENEROUS)
        receiver.close()
    assert result["end"] == "eof"
    assert len(got) == total and set(got) == {line[:-1]}
    stats = counters.snapshot()
    assert stats.pauses >= 1
    assert stats.paused_seconds > 0
    assert stats.messages_dropped == 0


def test_a_message_too_large_for_the_resume_mark_waits_without_spinning(impl):
    # At the resume mark (45 of 100 bytes queued) the 70-byte line still does not fit: the
    # loop must wait for room for it, not resume and retry in a busy loop.
    ring = impl[1](max_messages=100, max_bytes=100, resume_fraction=0.5)
    server_side, client_side = socket.socketpair()
    with server_side, client_side:
        receiver, ring, counters = _receiver(impl, server_side, ring=ring, max_line=80)
        _send_in_thread(client_side, [b"a" * 45 + b"\n" + b"b" * 70 + b"\n"])
        result = {}

        def run():
            started = time.thread_time()
            result["end"] = receiver.run()
            result["cpu"] = time.thread_time() - started

        loop = threading.Thread(target=run)
        loop.start()
        time.sleep(0.5)
        assert ring.qsize() == 1
        got = _drain(ring, 2)
        loop.join(GENEROUS)
        receiver.close()
    assert got == [b"a" * 45, b"b" * 70]
    assert result["end"] == "eof"
    assert result["cpu"] < 0.25, "the paused loop spun"
    assert counters.snapshot().pauses == 1


def test_stop_ends_a_loop_whose_peer_is_silent(impl):
    server_side, client_side = socket.socketpair()
    with server_side, client_side:
        receiver, _, _ = _receiver(impl, server_side)
        threading.Timer(0.2, receiver.stop).start()
        started = time.monotonic()
        assert receiver.run() == "stopped"
        assert time.monotonic() - started < GENEROUS


def test_idle_timeout(impl):
    server_side, client_side = socket.socketpair()
    with server_side, client_side:
        receiver, _, counters = _receiver(impl, server_side, idle_timeout=0.3)
        client_side.sendall(b"one\n")
        started = time.monotonic()
        assert receiver.run() == "idle_timeout"
        assert 0.25 <= time.monotonic() - started < GENEROUS
    assert counters.snapshot().idle_timeouts == 1


def test_a_closed_ring_drops_and_counts(impl):
    server_side, client_side = socket.socketpair()
    with server_side, client_side:
        receiver, ring, counters = _receiver(impl, server_side)
        ring.close()
        client_side.sendall(b"a\nb\n")
        assert receiver.run() == "ring_closed"
        receiver.close()
    stats = counters.snapshot()
    assert stats.messages_dropped == 2
    assert stats.bytes_discarded == 2


def test_ctrl_c_interrupts_a_loop_in_the_main_thread(impl):
    server_side, client_side = socket.socketpair()
    with server_side, client_side:
        receiver, _, _ = _receiver(impl, server_side)
        main = threading.get_ident()
        threading.Timer(0.2, signal.pthread_kill, (main, signal.SIGINT)).start()
        started = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            receiver.run()
        assert time.monotonic() - started < GENEROUS


def test_a_non_blocking_socket_is_refused(impl):
    server_side, client_side = socket.socketpair()
    with server_side, client_side:
        server_side.settimeout(1.0)
        with pytest.raises(ValueError, match="blocking"):
            _receiver(impl, server_side)


# -- the servers' fast path (the implementation fastsock was imported with) ----------------


def _serve(server):
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return thread


def _lines_of(client_index, count):
    return [b"%d:%d:%s" % (client_index, n, b"p" * (n % 50)) for n in range(count)]


@pytest.mark.parametrize(
    "server_class, address",
    [
        (fastsock.ThreadingTCPServer, (HOST, 0)),
        (fastsock.ThreadingTCPServer, ("::1", 0)),
        (fastsock.ThreadingUnixStreamServer, None),
    ],
    ids=["tcp4", "tcp6", "unix"],
)
def test_threaded_server_frames_many_connections_into_one_ring(server_class, address, tmp_path):
    family = socket.AF_UNIX if address is None else socket.AF_INET
    if address is not None and ":" in address[0]:
        family = socket.AF_INET6
    address = str(tmp_path / "sock") if address is None else address
    ring = fastsock.RingQueue()
    options = {"address_family": family} if family == socket.AF_INET6 else {}
    server = server_class(address, fastsock.receiver(ring, framing="lines"), **options)
    with server:
        thread = _serve(server)
        expected = {index: _lines_of(index, 5000) for index in range(16)}
        senders = []
        for lines in expected.values():
            client = socket.socket(family, socket.SOCK_STREAM)
            client.connect(server.server_address)
            senders.append((client, _send_in_thread(client, [b"\n".join(lines) + b"\n"])))
        got = _drain(ring, 16 * 5000, with_source=True)
        by_connection = {}
        for source_id, _, payload in got:
            by_connection.setdefault(source_id, []).append(payload)
        for client, sender in senders:
            sender.join(GENEROUS)
            client.close()
        server.shutdown()
        thread.join(GENEROUS)
    assert sorted(by_connection.values()) == sorted(expected.values())
    stats = server.stats()
    assert stats.messages_received == 16 * 5000
    assert stats.connections_opened == 16


def test_source_ids_name_the_connections(tmp_path):
    ring = fastsock.RingQueue()
    with fastsock.ThreadingTCPServer((HOST, 0), fastsock.receiver(ring, framing="lines")) as server:
        thread = _serve(server)
        with socket.create_connection(server.server_address) as client:
            client.sendall(b"hi\n")
            [(source_id, source, payload)] = ring.get_many(timeout=GENEROUS, with_source=True)
            assert source is None and payload == b"hi"
            assert server.connection_address(source_id) == client.getsockname()
        server.shutdown()
        thread.join(GENEROUS)


def test_a_framing_error_reaches_handle_error_and_spares_the_other_connections():
    ring = fastsock.RingQueue()
    errors = []

    class Server(fastsock.ThreadingTCPServer):
        def handle_error(self, request, client_address):
            errors.append(sys.exc_info()[1])

    with Server((HOST, 0), fastsock.receiver(ring, framing="lines", max_line=1000)) as server:
        thread = _serve(server)
        good = socket.create_connection(server.server_address)
        bad = socket.create_connection(server.server_address)
        bad.sendall(b"fine\n" + b"!" * 5000)
        assert bad.recv(1) == b"", "the offending connection is closed"
        good.sendall(b"still\nhere\n")
        got = [ring.get(timeout=GENEROUS) for _ in range(3)]
        assert sorted(got) == [b"fine", b"here", b"still"]
        good.close()
        bad.close()
        server.shutdown()
        thread.join(GENEROUS)
    assert len(errors) == 1 and isinstance(errors[0], fastsock.LineTooLongError)
    assert "max_line=1000" in str(errors[0])
    assert server.stats().lines_too_long == 1


def test_server_close_stops_receivers_whose_peers_never_hang_up():
    ring = fastsock.RingQueue()
    server = fastsock.ThreadingTCPServer((HOST, 0), fastsock.receiver(ring))
    thread = _serve(server)
    clients = [socket.create_connection(server.server_address) for _ in range(5)]
    for client in clients:
        client.sendall(b"x")
    deadline = time.monotonic() + GENEROUS
    while server.stats().connections_opened < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    server.shutdown()
    thread.join(GENEROUS)
    closer = threading.Thread(target=server.server_close)
    closer.start()
    closer.join(GENEROUS)
    assert not closer.is_alive()
    assert server.stats().connections_active == 0
    for client in clients:
        client.close()


def test_synchronous_server_with_the_fast_path():
    ring = fastsock.RingQueue()
    with fastsock.TCPServer((HOST, 0), fastsock.receiver(ring, framing="length")) as server:
        with socket.create_connection(server.server_address) as client:
            client.sendall(struct.pack(">I", 5) + b"hello")
            client.shutdown(socket.SHUT_WR)
            server.handle_request()
        assert ring.get_nowait() == b"hello"


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"framing": "words"}, ValueError, "framing"),
        ({"framing": "lines", "max_line": 2 * 1024 * 1024}, ValueError, "max_bytes"),
        ({"recv_size": 0}, ValueError, "recv_size"),
        ({"idle_timeout": -1}, ValueError, "idle_timeout"),
        ({"datagram_busy_poll": -0.001}, ValueError, "datagram_busy_poll"),
        ({"datagram_busy_poll": 1.0}, ValueError, "datagram_busy_poll"),
    ],
)
def test_receiver_options_are_checked_before_serving(options, error, match):
    ring = fastsock.RingQueue(max_bytes=1024 * 1024)
    with pytest.raises(error, match=match):
        fastsock.receiver(ring, **options)


def test_receiver_needs_a_ring_queue():
    with pytest.raises(TypeError, match="RingQueue"):
        fastsock.receiver(queue.Queue())


def test_drop_in_servers_report_zero_receive_stats():
    with fastsock.TCPServer((HOST, 0), fastsock.StreamRequestHandler) as server:
        stats = server.stats()
    assert stats.bytes_received == 0 and stats.connections_active == 0


def test_os_environment_switch_is_reported():
    assert fastsock.IMPLEMENTATION == (
        "python" if os.environ.get("FASTSOCK_PURE_PYTHON") == "1" else "compiled"
    )
