"""Client-side harness of the fault suite (tests/test_faults_*.py): misbehaving and
demanding clients.  Producers as fast as the server takes them, connection churn,
tricklers, blasters, paced senders, senders in random pieces, resets instead of FINs, and
the framing of what they send.
"""

import contextlib
import itertools
import random
import socket
import statistics
import struct
import threading
import time

from tests.fault_helpers import (
    CHECKSUM_MASK,
    GENEROUS,
    checksum,
    connect,
    lines_stream,
    numbered_message,
)


def _exhaust_descriptors(port, count):
    """`count` clients, more than a server with little descriptor headroom can accept."""
    return [connect(port) for _ in range(count)]


MiB = 1024 * 1024


def _stream_until_refused(client, chunk, limit):
    """Send `chunk` repeatedly, up to `limit` bytes, until the server refuses more; return
    the bytes sent."""
    sent = 0
    try:
        while sent < limit:
            client.sendall(chunk)
            sent += len(chunk)
    except (BrokenPipeError, ConnectionResetError):
        pass
    return sent


class _Producers:
    """Client threads that each send their numbered lines as fast as the server takes them,
    each bounded by a deadline; `sent` counts the bytes each has handed to the kernel."""

    def __init__(self, port, clients, messages_each, padding):
        self.streams = [
            lines_stream(numbered_message(client, n, padding) for n in range(messages_each))
            for client in range(clients)
        ]
        self.sent = [0] * clients
        self.failures = []
        self.deadline = time.monotonic() + 60
        self.threads = [
            threading.Thread(target=self._produce, args=(port, client), daemon=True)
            for client in range(clients)
        ]
        for thread in self.threads:
            thread.start()

    def _produce(self, port, client):
        stream = memoryview(self.streams[client])
        piece = 256 * 1024
        try:
            with connect(port, timeout=self.deadline - time.monotonic()) as sock:
                for start in range(0, len(stream), piece):
                    sock.sendall(stream[start : start + piece])
                    self.sent[client] += len(stream[start : start + piece])
        except OSError as exc:
            self.failures.append(exc)

    @property
    def total_bytes(self):
        return sum(map(len, self.streams))

    def alive(self):
        return sum(thread.is_alive() for thread in self.threads)

    def join(self):
        for thread in self.threads:
            thread.join(max(0.0, self.deadline - time.monotonic()))
        assert not self.alive(), "producers still blocked at their deadline"
        assert self.failures == []


class _Churn:
    """Client threads that open short connections, each sending a few numbered lines, until
    told to stop; they count what they sent and its checksum."""

    def __init__(self, port, threads, lines_each):
        self.port = port
        self.lines_each = lines_each
        self.connection_ids = itertools.count()
        self.lock = threading.Lock()
        self.messages = 0
        self.checksum = 0
        self.failures = []
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._churn, daemon=True) for _ in range(threads)]
        for thread in self.threads:
            thread.start()

    def _churn(self):
        while not self.stopping.is_set():
            connection = next(self.connection_ids)
            lines = [numbered_message(connection, n) for n in range(self.lines_each)]
            try:
                with connect(self.port) as client:
                    client.sendall(lines_stream(lines))
                    # A polite client: it waits for the server to finish before it closes.
                    # (Clients that close first reuse ports whose server side is still
                    # closing, and loopback then delays their next SYN by a second.)
                    client.shutdown(socket.SHUT_WR)
                    reply = client.recv(1)
            except OSError as exc:
                self.failures.append(exc)
                return
            if reply:
                self.failures.append(f"the server sent {reply!r} to a receiving connection")
                return
            with self.lock:
                self.messages += len(lines)
                self.checksum = (self.checksum + checksum(lines)) & CHECKSUM_MASK

    def run_for(self, seconds):
        self.stopping.wait(seconds)

    def stop(self):
        self.stopping.set()
        for thread in self.threads:
            thread.join(GENEROUS)
        assert not any(thread.is_alive() for thread in self.threads)
        assert self.failures == []


def _frame(framing, payload):
    if framing == "lines":
        return payload + b"\n"
    if framing == "length":
        return struct.pack(">I", len(payload)) + payload
    return payload


FRAMING_OVERHEAD = {"lines": 1, "length": 4, "raw": 0}


def _reset(client):
    """Close with an RST instead of a FIN, as a crashed or hostile peer does."""
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()


def _send_in_random_pieces(port, stream, seed):
    """Send `stream` cut at random points, with random short pauses between the pieces."""
    rng = random.Random(seed)
    with connect(port) as client:
        position = 0
        while position < len(stream):
            size = rng.choice([1, 3, 17, 512, 4096, 65536])
            client.sendall(stream[position : position + size])
            position += size
            if rng.random() < 0.01:
                time.sleep(0.001)
        client.shutdown(socket.SHUT_WR)
        client.recv(1)


def _round_trips(client, ring, count, client_id):
    """Per-message latency from the good client's send to the message leaving the ring."""
    latencies = []
    for n in range(count):
        message = numbered_message(client_id, n)
        started = time.perf_counter()
        client.sendall(message + b"\n")
        assert ring.get(timeout=GENEROUS) == message
        latencies.append(time.perf_counter() - started)
        # Spread over a second or so, to interleave with the attackers' bytes.
        time.sleep(0.01)
    return statistics.median(latencies)


class _Tricklers:
    """Connections that each send one byte every 100 ms and never finish their line."""

    def __init__(self, port, count):
        self.clients = [connect(port) for _ in range(count)]
        self.sent = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._trickle, daemon=True)
        self.thread.start()

    def _trickle(self):
        while not self.stopping.wait(0.1):
            for client in self.clients:
                client.sendall(b"z")
                self.sent += 1

    def close(self):
        self.stopping.set()
        self.thread.join(GENEROUS)
        assert not self.thread.is_alive()
        for client in self.clients:
            client.close()


class _Blasters:
    """Clients that each send numbered lines in batches as fast as they can, until the server
    breaks their connection, or they are told to stop or `seconds` have passed (then they
    shut their side down)."""

    def __init__(self, port, count, seconds=3 * GENEROUS, batch=1000):
        self.batch = batch
        self.deadline = time.monotonic() + seconds
        self.stopping = threading.Event()
        self.clients = [connect(port) for _ in range(count)]
        self.threads = [
            threading.Thread(target=self._blast, args=(index,), daemon=True)
            for index in range(count)
        ]
        self.broken = []
        for thread in self.threads:
            thread.start()

    def _blast(self, index):
        client = self.clients[index]
        first = 0
        while not self.stopping.is_set() and time.monotonic() < self.deadline:
            lines = (numbered_message(index, n, 20) for n in range(first, first + self.batch))
            first += self.batch
            try:
                client.sendall(lines_stream(lines))
            except OSError as exc:
                self.broken.append(exc)
                return
        # Done: end the stream, so that a server still receiving it sees its end.
        with contextlib.suppress(OSError):
            client.shutdown(socket.SHUT_WR)

    def stop(self):
        self.stopping.set()
        for thread in self.threads:
            thread.join(GENEROUS)
        assert not any(thread.is_alive() for thread in self.threads)
        for client in self.clients:
            client.close()


def _paced_sender(port, messages, pieces=2000):
    """Send `messages` as lines in `pieces` sends with short pauses, so that the receiving
    loop spends the transfer waiting in recv(), where signals interrupt it."""

    def send():
        stream = lines_stream(messages)
        step = -(-len(stream) // pieces)
        with connect(port) as sock:
            for start in range(0, len(stream), step):
                sock.sendall(stream[start : start + step])
                time.sleep(0.0005)
            sock.shutdown(socket.SHUT_WR)
            sock.recv(1)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def _recv_exactly(sock, size):
    received = bytearray()
    while len(received) < size:
        chunk = sock.recv(size - len(received))
        if not chunk:
            break
        received += chunk
    return bytes(received)
