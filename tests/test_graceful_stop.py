"""A graceful stop loses nothing a sender was told was delivered.

A client streams numbered lines as fast as it can while the consumer drains the ring more
slowly than they arrive; the server is stopped mid-stream with a short drain deadline.
Afterwards, for every way of serving, the bytes the client's TCP saw acknowledged (or the
bytes a Unix socket accepted from it) are exactly the delivered lines, their delimiters and
what the counters name: ``messages_dropped`` (framed, never published), ``bytes_discarded``
and ``bytes_unread`` (still in the kernel at the deadline).
"""

import os
import signal
import socket
import threading
import time
import warnings

import pytest

import fastsock
from tests.support import SlowConsumer, StreamingClient, check_stop_accounting

GENEROUS = 20.0
HOST = "127.0.0.1"
# A slow consumer gets long enough to make the loop read again after the stop (one recv
# frames thousands of lines); a stalled one a short deadline that surely leaves bytes.
DRAIN_TIMEOUTS = {"slow": 1.5, "stalls-at-stop": 0.3}


class Threaded:
    server_class = fastsock.ThreadingTCPServer
    family = socket.AF_INET

    def start(self, handler, sock_dir):
        address = os.path.join(sock_dir, "s") if self.family == socket.AF_UNIX else (HOST, 0)
        self.server = self.server_class(address, handler)
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()
        return self.server.server_address

    def stats(self):
        return self.server.stats()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(GENEROUS)


class ThreadedUnix(Threaded):
    server_class = fastsock.ThreadingUnixStreamServer
    family = socket.AF_UNIX


class Forking(Threaded):
    """ForkingTCPServer in a process of its own (forked before any thread starts), stopped
    with SIGTERM: its request processes drain while this process consumes."""

    def start(self, handler, sock_dir):
        self.server = fastsock.ForkingTCPServer((HOST, 0), handler)
        self.pid = os.fork()
        if self.pid == 0:
            status = 1
            try:
                signal.signal(signal.SIGTERM, lambda signum, frame: self.server.shutdown())
                self.server.serve_forever(poll_interval=0.05)
                self.server.server_close()
                status = 0
            finally:
                os._exit(status)
        self.server.socket.close()
        return self.server.server_address

    def stop(self):
        os.kill(self.pid, signal.SIGTERM)
        _, status = os.waitpid(self.pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


class Prefork(Threaded):
    def start(self, handler, sock_dir):
        self.server = fastsock.PreforkServer((HOST, 0), handler, workers=2)
        self.server.start()
        return self.server.server_address

    def stop(self):
        self.server.server_close()
        assert self.server.worker_crashes == 0


MODES = {"threaded": Threaded, "threaded-unix": ThreadedUnix, "forking": Forking}
MODES["prefork"] = Prefork


@pytest.mark.parametrize("consumer", sorted(DRAIN_TIMEOUTS))
@pytest.mark.parametrize("mode", sorted(MODES))
def test_a_graceful_stop_delivers_or_counts_every_acknowledged_byte(mode, consumer, sock_dir):
    if mode in ("forking", "prefork") and fastsock.IMPLEMENTATION != "compiled":
        pytest.skip("the reference ring is not shared across fork")
    server = MODES[mode]()
    ring = fastsock.RingQueue(max_messages=2048)
    drain_timeout = DRAIN_TIMEOUTS[consumer]
    handler = fastsock.receiver(ring, framing="lines", drain_timeout=drain_timeout)
    with warnings.catch_warnings():
        # The forking modes fork here, before this test starts a thread.
        warnings.simplefilter("error", DeprecationWarning)
        address = server.start(handler, sock_dir)
    client = StreamingClient(address, server.family)
    reader = SlowConsumer(ring, stall_for=drain_timeout + 0.3 if consumer != "slow" else 0)
    reader.start()
    client.start()
    deadline = time.monotonic() + GENEROUS
    while server.stats().pauses == 0 or client.sent < 4 * 1024 * 1024:
        assert time.monotonic() < deadline, "the consumer never held the stream back"
        assert client.is_alive(), f"the client stopped early: {client.ended_by!r}"
        time.sleep(0.02)
    before_stop = server.stats()
    reader.stop_started.set()
    server.stop()
    reader.stop_finished.set()
    client.join(GENEROUS)
    reader.join(GENEROUS)
    assert not client.is_alive() and not reader.is_alive()
    assert client.ended_by is not None, "the stop refused the client's further bytes"

    check_stop_accounting(client, reader.messages, before_stop, server.stats(), consumer)


@pytest.mark.parametrize("family", ["tcp", "unix"])
def test_server_close_serves_the_connections_waiting_in_the_backlog(family, sock_dir):
    ring = fastsock.RingQueue()
    handler = fastsock.receiver(ring, framing="lines", drain_timeout=GENEROUS)
    if family == "unix":
        server = fastsock.ThreadingUnixStreamServer(os.path.join(sock_dir, "s"), handler)
    else:
        server = fastsock.ThreadingTCPServer((HOST, 0), handler)
    waiting = []
    for number in range(5):
        client = socket.socket(server.address_family, socket.SOCK_STREAM)
        client.connect(server.server_address)
        client.sendall(b"waiting %d\n" % number)
        waiting.append(client)
    # Never served: the five wait in the kernel's backlog, their lines acknowledged.
    server.server_close()
    assert sorted(ring.get_many(timeout=GENEROUS)) == [b"waiting %d" % n for n in range(5)]
    stats = server.stats()
    assert (stats.connections_opened, stats.connections_closed) == (5, 5)
    for client in waiting:
        client.close()
