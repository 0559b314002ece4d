"""The compiled path's secure defaults: limits on unless turned off, bad peers refused,
counted and logged."""

import logging
import socket
import sys
import threading
import time

import pytest

import fastsock
from fastsock import constants
from tests.fault_helpers import wait_until

GENEROUS = 10.0
HOST = "127.0.0.1"


def _serve(server):
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return thread


def test_compiled_path_defaults():
    handler = fastsock.receiver(fastsock.RingQueue())
    assert handler.idle_timeout == constants.IDLE_TIMEOUT == 300
    assert handler.message_timeout == constants.MESSAGE_TIMEOUT == 30
    assert handler.max_line == 64 * 1024 and handler.max_frame == 1024 * 1024
    with fastsock.ThreadingTCPServer((HOST, 0), handler) as server:
        assert server.request_queue_size == constants.COMPILED_BACKLOG == 511
    with fastsock.ThreadingTCPServer((HOST, 0), handler, backlog=50) as server:
        assert server.request_queue_size == 50
    with fastsock.ThreadingTCPServer((HOST, 0), fastsock.StreamRequestHandler) as server:
        assert server.request_queue_size == 5, "the drop-in classes keep the stdlib's default"


def test_connections_over_max_connections_are_refused_counted_and_logged(caplog, monkeypatch):
    monkeypatch.setattr(sys.modules["fastsock.receiver"]._log, "_next_allowed", {})
    ring = fastsock.RingQueue()
    # No eviction: the kept connections are never silent long enough to give up a slot.
    handler = fastsock.receiver(ring, framing="lines", max_connections=3, evict_idle_after=60)
    with fastsock.ThreadingTCPServer((HOST, 0), handler) as server:
        thread = _serve(server)
        kept = [socket.create_connection(server.server_address) for _ in range(3)]
        for client in kept:
            client.sendall(b"in\n")
        assert [ring.get(timeout=GENEROUS) for _ in range(3)] == [b"in"] * 3
        with caplog.at_level(logging.WARNING, logger="fastsock"):
            with socket.create_connection(server.server_address) as extra:
                extra.settimeout(GENEROUS)
                assert extra.recv(1) == b"", "the extra connection is closed at once"
            assert server.stats().connections_refused == 1
            # The engine closes the connection, then its thread reports the event.
            wait_until(lambda: "max_connections=3" in caplog.text, what="the refusal logged")
        kept[0].close()
        wait_until(lambda: server.stats().connections_active <= 2, what="a slot free again")
        with socket.create_connection(server.server_address) as again:
            again.sendall(b"room again\n")
            assert ring.get(timeout=GENEROUS) == b"room again"
        for client in kept[1:]:
            client.close()
        server.shutdown()
        thread.join(GENEROUS)


@pytest.mark.parametrize("bad", [0, -5, 2.5])
def test_max_connections_is_validated(bad):
    with pytest.raises(ValueError, match="max_connections"):
        fastsock.receiver(fastsock.RingQueue(), max_connections=bad)


def test_protocol_errors_are_logged_with_an_escaped_sample_and_rate_limited(caplog, monkeypatch):
    # Start from a fresh interval: earlier tests may have logged protocol errors.
    limiter = sys.modules["fastsock.receiver"]._log
    monkeypatch.setattr(limiter, "_next_allowed", {})
    ring = fastsock.RingQueue()

    class Quiet(fastsock.ThreadingTCPServer):
        def handle_error(self, request, client_address):
            pass

    handler = fastsock.receiver(ring, framing="length", max_frame=100)
    with Quiet((HOST, 0), handler) as server, caplog.at_level(logging.WARNING, "fastsock"):
        thread = _serve(server)
        for _ in range(5):
            with socket.create_connection(server.server_address) as client:
                client.settimeout(GENEROUS)
                client.sendall(b"GET /\x1b[31m HTTP/1.1\r\n\r\n" + b"z" * 500)
                assert client.recv(1) == b""
        deadline = time.monotonic() + GENEROUS
        while server.stats().frames_too_large < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        server.shutdown()
        thread.join(GENEROUS)
    records = [r for r in caplog.records if "max_frame=100" in r.getMessage()]
    assert len(records) == 1, "five errors inside the interval make one record"
    message = records[0].getMessage()
    assert "it began b'GET /\\x1b[31m HTTP/1.1\\r\\n\\r\\nzzzzzzzzz'" in message, message
    assert "\x1b" not in message and "\r" not in message, "the sample is escaped"
    assert server.stats().frames_too_large == 5
