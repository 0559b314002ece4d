"""A full server, a memory budget and a graceful stop: idle connections give their slots to
new ones, the largest holder of partial messages is closed when all of them together pass
the budget, a framing error keeps a sample of the offending bytes for its log line, and a
stop still delivers what was framed while the consumer catches up."""

import logging
import queue
import select
import socket
import struct
import sys
import threading
import time

import pytest

import fastsock
from fastsock._impl import StreamReceiver
from fastsock.receiver import ReceiveRegistry
from tests.fault_helpers import wait_until

GENEROUS = 10.0
HOST = "127.0.0.1"


def _receiver(impl, sock, framing="lines", counters=None, ring=None, **options):
    framer_class, ring_class, counters_class, receiver_class = impl
    framer_options = {k: options.pop(k) for k in list(options) if k in ("max_line", "max_frame")}
    ring = ring if ring is not None else ring_class()
    counters = counters if counters is not None else counters_class()
    receiver = receiver_class(
        sock.fileno(), framer_class(framing, **framer_options), ring, counters, 7, **options
    )
    return receiver, ring, counters


def _run_in_thread(receiver):
    ends = []
    thread = threading.Thread(target=lambda: ends.append(receiver.run()), daemon=True)
    thread.start()
    return thread, ends


def _serve(server):
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return thread


def _consume_while(running, ring):
    """Everything the ring gives while running() and until it is empty after that."""
    got = []
    while running() or ring.qsize():
        try:
            got.extend(ring.get_many(timeout=0.05))
        except queue.Empty:
            pass
    return got


def _closed_by_server(client):
    client.settimeout(GENEROUS)
    try:
        return client.recv(1) == b""
    except ConnectionResetError:
        return True


@pytest.mark.parametrize("reason", ["idle", "memory"])
def test_an_eviction_ends_a_silent_receiver_at_once_and_is_counted(impl, reason):
    server_side, client_side = socket.socketpair()
    with server_side, client_side:
        # A check interval far longer than the test: only the eviction's wake-up ends it.
        receiver, ring, counters = _receiver(impl, server_side, check_interval=30.0)
        client_side.sendall(b"before\n")
        thread, ends = _run_in_thread(receiver)
        assert ring.get(timeout=GENEROUS) == b"before"
        started = time.monotonic()
        receiver.evict(reason)
        thread.join(GENEROUS)
        assert ends == [f"evicted_{reason}"]
        assert time.monotonic() - started < 5.0
        receiver.close()
        stats = counters.snapshot()
        assert (stats.idle_evictions, stats.memory_evictions) == (
            (1, 0) if reason == "idle" else (0, 1)
        )
        with pytest.raises(ValueError, match="reason"):
            receiver.evict("boredom")


def test_idle_seconds_measures_the_silence(impl):
    server_side, client_side = socket.socketpair()
    with server_side, client_side:
        receiver, ring, _ = _receiver(impl, server_side, check_interval=0.02)
        thread, _ = _run_in_thread(receiver)
        client_side.sendall(b"x\n")
        assert ring.get(timeout=GENEROUS) == b"x"
        assert receiver.idle_seconds < 5.0
        time.sleep(0.3)
        assert receiver.idle_seconds >= 0.25
        client_side.sendall(b"y\n")
        assert ring.get(timeout=GENEROUS) == b"y"
        assert receiver.idle_seconds < 0.25
        client_side.shutdown(socket.SHUT_WR)
        thread.join(GENEROUS)
        receiver.close()


def test_a_silent_connection_with_no_partial_message_holds_no_buffer(impl):
    framer_class, _, counters_class, receiver_class = impl
    framer = framer_class("lines")
    ring = impl[1]()
    server_side, client_side = socket.socketpair()
    with server_side, client_side:
        receiver = receiver_class(
            server_side.fileno(), framer, ring, counters_class(), check_interval=0.02
        )
        thread, _ = _run_in_thread(receiver)
        client_side.sendall(b"complete\n")
        assert ring.get(timeout=GENEROUS) == b"complete"
        wait_until(lambda: framer.capacity == 0, what="the buffer released while silent")
        client_side.sendall(b"partial")
        wait_until(lambda: framer.pending == 7, what="a partial line held")
        time.sleep(0.1)
        assert framer.capacity >= 7, "a partial message keeps its buffer"
        client_side.sendall(b" done\n")
        assert ring.get(timeout=GENEROUS) == b"partial done"
        client_side.close()
        thread.join(GENEROUS)
        receiver.close()


def test_a_connection_paused_by_a_full_ring_is_not_idle(impl):
    ring = impl[1](max_messages=5)
    server_side, client_side = socket.socketpair()
    with server_side, client_side:
        receiver, _, counters = _receiver(impl, server_side, ring=ring, check_interval=0.02)
        client_side.sendall(b"x\n" * 50)
        thread, _ = _run_in_thread(receiver)
        wait_until(lambda: counters.snapshot().pauses >= 1, what="the loop paused")
        time.sleep(0.3)
        assert receiver.idle_seconds == 0.0, "backpressure is not silence"
        got = _consume_while(lambda: counters.snapshot().messages_received < 50, ring)
        assert got == [b"x"] * 50
        assert receiver.idle_seconds < 0.25, "the pause does not count as silence afterwards"
        client_side.close()
        thread.join(GENEROUS)
        receiver.close()


@pytest.mark.parametrize(
    "framing, chunks, sample",
    [
        ("lines", [b"fine\n", b"A" * 20, b"B" * 200], b"A" * 20 + b"B" * 12),
        ("lines", [b"fine\nC" + b"\x00\xff" * 100], b"C" + b"\x00\xff" * 15 + b"\x00"),
        (
            "length",
            [struct.pack(">I", 2) + b"ok", b"GET / HTTP/1.1\r\n\r\n"],
            b"GET / HTTP/1.1\r\n\r\n",
        ),
        ("length", [struct.pack(">I", 2) + b"ok\xff\xff", b"\xff\xffrest"], b"\xff" * 4 + b"rest"),
    ],
)
def test_a_framing_error_keeps_a_sample_of_the_offending_bytes(impl, framing, chunks, sample):
    server_side, client_side = socket.socketpair()
    with server_side, client_side:
        receiver, ring, _ = _receiver(impl, server_side, framing, max_line=50, max_frame=100)
        thread, ends = _run_in_thread(receiver)
        for chunk in chunks:
            client_side.sendall(chunk)
            time.sleep(0.05)
        thread.join(GENEROUS)
        assert ends == ["line_too_long" if framing == "lines" else "frame_too_large"]
        assert ring.get_many(timeout=GENEROUS) in ([b"fine"], [b"ok"])
        assert receiver.offending_sample(32) == sample
        receiver.close()
        assert receiver.offending_sample(32) == b"", "the sample goes with the connection"


def test_partial_bytes_are_a_shared_gauge_and_the_budget_reports_the_crossing(impl):
    counters = impl[2]()
    crossings = []
    pairs = [socket.socketpair() for _ in range(2)]
    receivers = [
        _receiver(
            impl,
            server_side,
            counters=counters,
            partial_budget=1000,
            on_over_budget=lambda: crossings.append(1),
            check_interval=0.02,
        )[0]
        for server_side, _ in pairs
    ]
    threads = [_run_in_thread(receiver)[0] for receiver in receivers]
    pairs[0][1].sendall(b"a" * 600)
    wait_until(lambda: counters.snapshot().partial_bytes == 600, what="600 bytes held")
    assert not crossings
    pairs[1][1].sendall(b"b" * 600)
    wait_until(lambda: crossings, what="the budget's crossing reported")
    assert counters.snapshot().partial_bytes == 1200
    assert [receiver.held_bytes for receiver in receivers] == [600, 600]
    pairs[0][1].sendall(b"\n")
    wait_until(lambda: counters.snapshot().partial_bytes == 600, what="a completed line")
    for (server_side, client_side), thread, receiver in zip(pairs, threads, receivers, strict=True):
        client_side.close()
        thread.join(GENEROUS)
        receiver.close()
        server_side.close()
    assert counters.snapshot().partial_bytes == 0


@pytest.mark.parametrize("consumer", ["catches_up", "absent"])
def test_a_stop_publishes_what_was_framed_while_the_consumer_drains(impl, consumer):
    framer_class, ring_class, _, _ = impl
    ring = ring_class(max_messages=10)
    lines = [b"line %03d" % i for i in range(200)]
    server_side, client_side = socket.socketpair()
    with server_side, client_side:
        drain_timeout = 10.0 if consumer == "catches_up" else 0.3
        receiver, _, counters = _receiver(
            impl, server_side, ring=ring, drain_timeout=drain_timeout, check_interval=0.02
        )
        client_side.sendall(b"".join(line + b"\n" for line in lines))
        thread, ends = _run_in_thread(receiver)
        wait_until(lambda: counters.snapshot().pauses >= 1, what="the loop paused on a full ring")
        receiver.stop()
        got = []
        if consumer == "catches_up":
            time.sleep(0.2)
            got = _consume_while(thread.is_alive, ring)
        thread.join(GENEROUS)
        assert ends == ["stopped"]
        receiver.close()
        got.extend(ring.get_many(timeout=0) if ring.qsize() else [])
        stats = counters.snapshot()
        framed = stats.messages_received + stats.messages_dropped
        assert got == lines[: len(got)], "whole, in order, no duplicates"
        assert stats.messages_received == len(got)
        if consumer == "catches_up":
            assert stats.messages_dropped == 0 and framed == len(got)
        else:
            assert stats.messages_dropped > 0, "what the drain time did not cover is counted"


def test_a_full_server_evicts_its_idlest_connection_for_a_new_one(caplog):
    ring = fastsock.RingQueue()
    handler = fastsock.receiver(ring, framing="lines", max_connections=2, evict_idle_after=0.3)
    with fastsock.ThreadingTCPServer((HOST, 0), handler) as server:
        thread = _serve(server)
        first = socket.create_connection(server.server_address)
        first.sendall(b"first\n")
        assert ring.get(timeout=GENEROUS) == b"first"
        time.sleep(0.1)
        second = socket.create_connection(server.server_address)
        second.sendall(b"second\n")
        assert ring.get(timeout=GENEROUS) == b"second"
        time.sleep(0.5)
        with caplog.at_level(logging.INFO, logger="fastsock"):
            newcomer = socket.create_connection(server.server_address)
            newcomer.sendall(b"newcomer\n")
            assert ring.get(timeout=GENEROUS) == b"newcomer"
            assert _closed_by_server(first), "the idlest connection gave up its slot"
        second.sendall(b"still here\n")
        assert ring.get(timeout=GENEROUS) == b"still here"
        stats = server.stats()
        assert (stats.idle_evictions, stats.connections_refused) == (1, 0)
        assert "evicted" in caplog.text and "silent for" in caplog.text
        for client in (first, second, newcomer):
            client.close()
        server.shutdown()
        thread.join(GENEROUS)


def test_a_full_server_refuses_when_no_connection_is_idle_long_enough():
    ring = fastsock.RingQueue()
    handler = fastsock.receiver(ring, framing="lines", max_connections=1, evict_idle_after=60)
    with fastsock.ThreadingTCPServer((HOST, 0), handler) as server:
        thread = _serve(server)
        with socket.create_connection(server.server_address) as busy:
            busy.sendall(b"busy\n")
            assert ring.get(timeout=GENEROUS) == b"busy"
            with socket.create_connection(server.server_address) as extra:
                assert _closed_by_server(extra)
            busy.sendall(b"unaffected\n")
            assert ring.get(timeout=GENEROUS) == b"unaffected"
        assert server.stats().connections_refused == 1
        assert server.stats().idle_evictions == 0
        server.shutdown()
        thread.join(GENEROUS)


def test_silent_connections_cannot_starve_max_threads():
    ring = fastsock.RingQueue()
    handler = fastsock.receiver(ring, framing="lines", evict_idle_after=0.3)

    class Pooled(fastsock.ThreadingTCPServer):
        max_threads = 2

        def verify_request(self, request, client_address):
            # An override of a request hook keeps a handler thread per connection.
            return True

    with Pooled((HOST, 0), handler) as server:
        thread = _serve(server)
        squatters = [socket.create_connection(server.server_address) for _ in range(2)]
        try:
            wait_until(lambda: server.stats().connections_active == 2, what="two squatters")
            with socket.create_connection(server.server_address) as good:
                good.sendall(b"served\n")
                assert ring.get(timeout=GENEROUS) == b"served"
            assert server.stats().idle_evictions >= 1
            readable, _, _ = select.select(squatters, [], [], GENEROUS)
            assert readable and all(_closed_by_server(squatter) for squatter in readable)
        finally:
            for squatter in squatters:
                squatter.close()
            server.shutdown()
            thread.join(GENEROUS)


def test_the_largest_holder_of_partial_frames_is_closed_over_the_budget(caplog, monkeypatch):
    limiter = sys.modules["fastsock.receiver"]._log
    monkeypatch.setattr(limiter, "_next_allowed", {})
    monkeypatch.setattr(limiter, "interval", 0.0)
    ring = fastsock.RingQueue(max_bytes=16 * 1024 * 1024)
    handler = fastsock.receiver(
        ring, framing="length", max_frame=4 * 1024 * 1024, max_partial_bytes=1024 * 1024
    )
    errors = []

    class Recording(fastsock.ThreadingTCPServer):
        def handle_error(self, request, client_address):
            errors.append(sys.exc_info()[1])

    with Recording((HOST, 0), handler) as server, caplog.at_level(logging.WARNING, "fastsock"):
        thread = _serve(server)
        hoarder = socket.create_connection(server.server_address)
        modest = None
        try:
            hoarder.sendall(struct.pack(">I", 3 * 1024 * 1024) + b"h" * 800 * 1024)
            wait_until(lambda: server.stats().partial_bytes >= 800 * 1024, what="800 KiB held")
            modest = socket.create_connection(server.server_address)
            modest.sendall(struct.pack(">I", 400 * 1024) + b"m" * 300 * 1024)
            assert _closed_by_server(hoarder), "the largest holder is closed"
            modest.sendall(b"m" * 100 * 1024)
            try:
                completed = ring.get(timeout=GENEROUS)
            except queue.Empty:
                raise AssertionError(
                    f"the other one did not complete: {server.stats()}, errors {errors!r}, "
                    f"log {caplog.text!r}"
                ) from None
            assert completed == b"m" * 400 * 1024
            assert server.stats().memory_evictions == 1
            assert caplog.text.count("largest holder") == 1
        finally:
            hoarder.close()
            if modest is not None:
                modest.close()
        wait_until(lambda: server.stats().connections_active == 0, what="both closed")
        assert server.stats().partial_bytes == 0
        assert server.stats().bytes_discarded >= 800 * 1024
        assert errors == []
        server.shutdown()
        thread.join(GENEROUS)


def test_server_close_drains_framed_messages_to_a_live_consumer():
    ring = fastsock.RingQueue(max_messages=50)
    handler = fastsock.receiver(ring, framing="lines")
    lines = [b"message %04d" % i for i in range(3000)]
    server = fastsock.ThreadingTCPServer((HOST, 0), handler)
    thread = _serve(server)
    with socket.create_connection(server.server_address) as client:
        client.sendall(b"".join(line + b"\n" for line in lines))
        wait_until(lambda: server.stats().pauses >= 1, what="a paused loop")
        server.shutdown()
        thread.join(GENEROUS)
        closing = threading.Thread(target=server.server_close)
        closing.start()
        time.sleep(0.2)
        got = _consume_while(closing.is_alive, ring)
        closing.join(GENEROUS)
    stats = server.stats()
    assert stats.messages_dropped == 0
    assert stats.messages_received == len(got) > 50
    assert got == lines[: len(got)]


def test_a_stale_budget_report_evicts_nobody():
    registry = ReceiveRegistry()
    ring = fastsock.RingQueue()
    server_side, client_side = socket.socketpair()
    with server_side, client_side:
        receiver = registry.open(
            lambda connection_id: StreamReceiver(
                server_side.fileno(),
                fastsock.Framer("lines"),
                ring,
                registry.counters,
                connection_id,
                check_interval=0.02,
            ),
            "peer",
            max_connections=4,
            evict_idle_after=60,
        )
        thread, ends = _run_in_thread(receiver)
        client_side.sendall(b"x" * 100)
        wait_until(lambda: registry.counters.partial_bytes == 100, what="100 bytes held")
        registry.relieve_memory(1000)
        assert registry.counters.snapshot().memory_evictions == 0, (
            "the total is back under the budget"
        )
        registry.relieve_memory(50)
        thread.join(GENEROUS)
        assert ends == ["evicted_memory"]
        registry.close(receiver)
        assert registry.counters.snapshot().memory_evictions == 1
        assert registry.counters.partial_bytes == 0


def test_on_event_engines_silent_connections_hold_no_thread():
    ring = fastsock.RingQueue()
    handler = fastsock.receiver(ring, framing="lines", evict_idle_after=0.3)

    class Pooled(fastsock.ThreadingTCPServer):
        max_threads = 2

    with Pooled((HOST, 0), handler) as server:
        thread = _serve(server)
        squatters = [socket.create_connection(server.server_address) for _ in range(4)]
        try:
            wait_until(lambda: server.stats().connections_active == 4, what="four squatters")
            with socket.create_connection(server.server_address) as good:
                good.sendall(b"served\n")
                assert ring.get(timeout=GENEROUS) == b"served"
            assert server.stats().idle_evictions == 0
            assert not select.select(squatters, [], [], 0.5)[0], "no squatter was closed"
        finally:
            for squatter in squatters:
                squatter.close()
            server.shutdown()
            thread.join(GENEROUS)
