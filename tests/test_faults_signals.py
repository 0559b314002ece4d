"""Faults: signals.  Ctrl-C interrupts a loaded receive loop in the main thread
promptly and the server closes cleanly; a storm of SIGALRM, at the main thread or at each
receiving thread, disturbs neither the loops nor a consumer (no lost, repeated or
reordered message, no error).

The signal storms and the in-process server harness are in tests/fault_servers.py, the
paced and blasting clients in tests/fault_clients.py.
"""

import signal
import threading
import time

import pytest

import fastsock
from tests.fault_clients import _Blasters, _paced_sender
from tests.fault_helpers import GENEROUS, HOST, numbered_message, wait_until
from tests.fault_servers import (
    _assert_in_order_without_gaps,
    _drain,
    _EndRecorder,
    _recording_server,
    _serving,
    _SignalTargets,
    _timer_signal_storm,
)
from tests.support import Consumer, fds_opened_since, open_fds


def test_ctrl_c_interrupts_a_loaded_loop_in_the_main_thread_and_the_server_closes_cleanly():
    ring = fastsock.RingQueue()
    # Taken with the ring, which holds its eventfd (the asyncio wake-up) for its life.
    fds_before = open_fds()
    server = fastsock.TCPServer((HOST, 0), fastsock.receiver(ring, framing="lines"))
    consumer = Consumer(ring)
    blasters = _Blasters(server.server_address[1], 1, seconds=8.0)
    signalled = []

    def interrupt():
        signalled.append(time.monotonic())
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    # Under load the loop rarely waits in recv(): the signal must still be seen promptly,
    # not when the blaster gives up after its 8 s.
    timer = threading.Timer(0.3, interrupt)
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            server.handle_request()
        interrupted = time.monotonic()
        timer.join(GENEROUS)
        # The interrupted connection was shut down: the blaster's sends now fail.
        blasters.threads[0].join(GENEROUS)
        assert blasters.broken, "the interrupted connection was left open"
    finally:
        timer.cancel()
        blasters.stop()
        server.server_close()
    taken = consumer.stop()
    assert interrupted - signalled[0] < 2.0
    stats = server.stats()
    assert stats.messages_received > 1000, "the loop was not under load"
    assert stats.connections_active == 0
    assert stats.messages_received == len(taken)
    _assert_in_order_without_gaps(taken)
    assert fds_opened_since(fds_before) == {}


def test_a_timer_signal_storm_does_not_disturb_a_loop_in_the_main_thread():
    messages = [numbered_message(0, n, 10) for n in range(100_000)]
    ring = fastsock.RingQueue()
    handler = type("Handler", (_EndRecorder, fastsock.receiver(ring, framing="lines")), {})
    handler.ends = []
    consumer = Consumer(ring)
    with _recording_server(handler, fastsock.TCPServer) as server:
        sender = _paced_sender(server.server_address[1], messages)
        with _timer_signal_storm() as delivered:
            server.handle_request()
        sender.join(GENEROUS)
        stats = server.stats()
    taken = consumer.stop()
    assert delivered[0] > 100, "the storm did not happen"
    assert server.errors == []
    assert handler.ends == ["eof"]
    assert [payload for _, _, payload in taken] == messages
    assert stats.messages_received == len(messages)
    assert stats.bytes_discarded == stats.resets == 0


def test_a_signal_storm_does_not_disturb_threaded_loops_or_a_consumer_in_the_main_thread():
    clients, messages_each = 4, 25_000
    expected = {
        client: [numbered_message(client, n, 10) for n in range(messages_each)]
        for client in range(clients)
    }
    ring = fastsock.RingQueue()
    targets = _SignalTargets()
    handler = type(
        "Handler",
        (_EndRecorder, targets.handler_mixin(), fastsock.receiver(ring, framing="lines")),
        {"ends": []},
    )
    stopping = threading.Event()
    with _serving(_recording_server(handler)) as server:
        # The process timer's SIGALRM goes to the main thread, where the consumer waits;
        # the receiving threads get theirs directly.
        with _timer_signal_storm() as delivered:
            storm = threading.Thread(target=targets.storm, args=(stopping,))
            storm.start()
            try:
                senders = [
                    _paced_sender(server.server_address[1], messages)
                    for messages in expected.values()
                ]
                taken = _drain(ring, clients * messages_each)
                for sender in senders:
                    sender.join(GENEROUS)
                wait_until(lambda: len(handler.ends) == clients, what="every connection ended")
            finally:
                stopping.set()
                storm.join(GENEROUS)
    assert targets.signalled > 100, "the receiving threads were not signalled"
    assert delivered[0] > 100, "the storm did not happen"
    assert handler.ends == ["eof"] * clients
    assert server.errors == []
    received = {}
    for payload in taken:
        received.setdefault(int(payload.split(b":")[0]), []).append(payload)
    assert received == expected
    assert ring.empty()
