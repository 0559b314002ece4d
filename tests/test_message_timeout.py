"""A message must arrive whole within message_timeout: a trickle cannot hold a connection."""

import socket
import threading
import time

import pytest

GENEROUS = 10.0


def _receiver(impl, sock, message_timeout):
    framer_class, ring_class, counters_class, receiver_class = impl
    ring, counters = ring_class(), counters_class()
    receiver = receiver_class(
        sock.fileno(),
        framer_class("lines"),
        ring,
        counters,
        check_interval=0.02,
        message_timeout=message_timeout,
    )
    return receiver, ring, counters


def _send_in_thread(target):
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def test_a_trickled_line_is_cut_at_the_deadline(impl):
    server_side, client_side = socket.socketpair()
    with server_side, client_side:
        receiver, ring, counters = _receiver(impl, server_side, message_timeout=0.3)
        stop = threading.Event()

        def trickle():
            client_side.sendall(b"whole\n")
            while not stop.wait(0.05):
                try:
                    client_side.sendall(b"x")
                except OSError:
                    return

        sender = _send_in_thread(trickle)
        started = time.monotonic()
        assert receiver.run() == "message_timeout"
        elapsed = time.monotonic() - started
        stop.set()
        receiver.close()
        sender.join(GENEROUS)
    assert 0.25 <= elapsed < GENEROUS
    assert ring.get_nowait() == b"whole"
    stats = counters.snapshot()
    assert stats.message_timeouts == 1
    assert stats.bytes_discarded >= 3
    assert stats.idle_timeouts == 0


def test_a_stream_of_whole_lines_never_trips_the_deadline(impl):
    server_side, client_side = socket.socketpair()
    with server_side, client_side:
        receiver, ring, counters = _receiver(impl, server_side, message_timeout=0.2)

        def stream():
            # Each send ends mid-line, so a partial line is pending after nearly every
            # read, for a second: five deadlines' worth.
            deadline = time.monotonic() + 1.0
            number = 0
            while time.monotonic() < deadline:
                client_side.sendall(b"tail-of-%d\nhead-of-%d " % (number, number + 1))
                number += 1
                time.sleep(0.01)
            client_side.sendall(b"end\n")
            client_side.shutdown(socket.SHUT_WR)

        sender = _send_in_thread(stream)
        assert receiver.run() == "eof"
        sender.join(GENEROUS)
    assert counters.snapshot().message_timeouts == 0
    assert not ring.empty()


def test_message_timeout_is_validated(impl):
    server_side, client_side = socket.socketpair()
    with server_side, client_side, pytest.raises(ValueError, match="message_timeout"):
        _receiver(impl, server_side, message_timeout=0)
