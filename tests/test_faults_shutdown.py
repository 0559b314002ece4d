"""Faults: shutdown and close races.  shutdown() during a burst loses nothing it
counted and leaks no thread or descriptor; server_close() stops a handler that registers
its loop after it; consumers blocked in get_many() wake whichever of the server and the
ring closes first.

The in-process server harness is in tests/fault_servers.py, the blasting clients in
tests/fault_clients.py.
"""

import threading
import time

import pytest

import fastsock
from tests.fault_clients import _Blasters
from tests.fault_helpers import GENEROUS, connect, wait_until
from tests.fault_servers import (
    _assert_in_order_without_gaps,
    _BlockingConsumers,
    _bounded,
    _recording_server,
)
from tests.support import Consumer, fds_opened_since, open_fds


def test_shutdown_during_a_burst_loses_nothing_it_counted_and_leaks_nothing():
    threads_before = set(threading.enumerate())
    ring = fastsock.RingQueue()
    # Taken with the ring, which holds its eventfd (the asyncio wake-up) for its life.
    fds_before = open_fds()
    server = _recording_server(fastsock.receiver(ring, framing="lines"), backlog=64)
    loop = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    loop.start()
    consumer = Consumer(ring)
    blasters = _Blasters(server.server_address[1], 8)
    try:
        wait_until(
            lambda: (
                (stats := server.stats()).connections_opened == 8
                and stats.messages_received > 100_000
            ),
            what="the burst under way on every connection",
        )
        _bounded(server.shutdown)
        loop.join(GENEROUS)
        _bounded(server.server_close)
    finally:
        blasters.stop()
    taken = consumer.stop()
    stats = server.stats()
    assert stats.connections_opened == 8
    assert stats.connections_active == 0
    assert stats.messages_received == len(taken)
    _assert_in_order_without_gaps(taken)
    # Messages framed but not published when the loops stopped are dropped and counted,
    # their payload in bytes_discarded with any partial line.
    framed = len(taken) + stats.messages_dropped
    assert stats.bytes_received == (
        sum(len(payload) for _, _, payload in taken) + framed + stats.bytes_discarded
    )
    assert server.errors == []
    assert set(threading.enumerate()) == threads_before
    assert fds_opened_since(fds_before) == {}


def test_server_close_stops_a_handler_that_starts_receiving_after_it():
    # A handler thread accepted before shutdown() may be descheduled before it registers
    # its receive loop; server_close() must stop that loop too, or block_on_close waits for
    # a peer that never hangs up.
    ring = fastsock.RingQueue()
    entered_setup = threading.Event()
    resume_setup = threading.Event()

    class LateHandler(fastsock.receiver(ring, framing="lines")):
        def setup(self):
            entered_setup.set()
            resume_setup.wait(GENEROUS)
            super().setup()

    server = _recording_server(LateHandler)
    loop = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    loop.start()
    with connect(server.server_address[1]) as silent_peer:
        assert entered_setup.wait(GENEROUS)
        _bounded(server.shutdown)
        loop.join(GENEROUS)
        closer = threading.Thread(target=server.server_close, daemon=True)
        closer.start()
        time.sleep(0.2)
        resume_setup.set()
        closer.join(GENEROUS)
        assert not closer.is_alive(), "server_close() waits for a peer that never hangs up"
        assert silent_peer.recv(1) == b""
    assert server.stats().connections_active == 0


@pytest.mark.parametrize("order", ["server_first", "ring_first", "together"])
def test_consumers_blocked_in_get_many_wake_when_the_server_and_ring_close(order):
    ring = fastsock.RingQueue(max_messages=4096, max_bytes=256 * 1024)
    server = _recording_server(fastsock.receiver(ring, framing="lines"))
    loop = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    loop.start()
    busy = _BlockingConsumers(ring, 4)
    blasters = _Blasters(server.server_address[1], 4)
    try:
        wait_until(lambda: server.stats().pauses > 0, what="the loops paused by a full ring")

        def close_server():
            server.shutdown()
            server.server_close()

        closers = {
            "server_first": [close_server, ring.close],
            "ring_first": [ring.close, close_server],
        }
        if order == "together":
            threads = [threading.Thread(target=close) for close in (close_server, ring.close)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(GENEROUS)
            assert not any(thread.is_alive() for thread in threads)
        else:
            for close in closers[order]:
                _bounded(close)
        loop.join(GENEROUS)
        # A consumer that comes after the close gets what is left, then QueueClosed, at once.
        idle = _BlockingConsumers(ring, 2)
        busy.join()
        idle.join()
    finally:
        blasters.stop()
    assert all(isinstance(ending, fastsock.QueueClosed) for ending in busy.endings + idle.endings)
    assert len(busy.endings) == 4 and len(idle.endings) == 2
    taken = busy.taken + idle.taken
    stats = server.stats()
    assert stats.connections_active == 0
    assert stats.messages_received == len(taken) == ring.stats.got_messages
    assert ring.stats.messages_queued == 0
    assert server.errors == []
    # Several consumers take batches concurrently, so only completeness can be checked.
    sequences = {}
    for connection, _, payload in taken:
        sequences.setdefault(connection, []).append(int(payload.split(b":")[1]))
    for connection, numbers in sequences.items():
        assert sorted(numbers) == list(range(len(numbers))), f"connection {connection}"
