"""The compiled path under attack: what bad peers, overload and shutdown races do to a
fastsock server on an exposed port, and what it must still guarantee.

Heavy scenarios run the server in a child process (tests/fault_helpers.py) so that their
descriptor limits, memory and floods stay out of the test process.  No assertion relies on
a tight wall-clock number: timings are compared against a control measured in the same test,
or bounded generously.
"""

import contextlib
import itertools
import os
import queue
import random
import signal
import socket
import statistics
import struct
import sys
import threading
import time

import pytest

import fastsock
from fastsock.constants import MAX_LINE_LENGTH, RECV_SIZE
from tests.fault_helpers import (
    CHECKSUM_MASK,
    GENEROUS,
    HOST,
    ServerProcess,
    checksum,
    connect,
    lines_stream,
    numbered_message,
    open_fd_count,
    wait_until,
)
from tests.support import Consumer

CPU_SAMPLE_SECONDS = 1.5


def _server_cpu_share(server):
    """The share of one core the server process used over CPU_SAMPLE_SECONDS."""
    cpu, wall = server.cpu_seconds(), time.monotonic()
    time.sleep(CPU_SAMPLE_SECONDS)
    return (server.cpu_seconds() - cpu) / (time.monotonic() - wall)


def _settled(server, messages=None, errors=0):
    """The server's stats once every connection has closed and the consumer has taken every
    message the loops published (and `messages` of them, when given), and `errors` reached
    handle_error (an engine reports them just after it closed their connection)."""

    def settled():
        reply = server.stats()
        published = reply["stats"]["messages_received"]
        consumed = reply["consumed"]["messages"]
        expected = published if messages is None else messages
        reported = len(reply["errors"]) >= errors
        return reply["active"] == 0 and consumed == published == expected and reported and reply

    return wait_until(settled, what="connections closed and their messages consumed")


def _exhaust_descriptors(port, count):
    """`count` clients, more than a server with little descriptor headroom can accept."""
    return [connect(port) for _ in range(count)]


@pytest.mark.slow
def test_descriptor_exhaustion_pauses_accepting_and_recovers(tmp_path):
    # An application that holds descriptors of its own: the compiled path's default
    # max_connections (from the descriptor limit) is then more than the descriptors left,
    # and accept() runs out.  The control, the stdlib pattern fastsock replaces, spins on
    # the connection it cannot accept.  Both get the same descriptors and the same clients.
    exhausting_clients = 24
    descriptors = {"occupied_fds": 64, "fd_headroom": 12}
    with ServerProcess(
        tmp_path, "stdlib", module="stdlib", handler="queueing", backlog=128, **descriptors
    ) as control:
        clients = _exhaust_descriptors(control.port, exhausting_clients)
        time.sleep(0.3)
        control_share = _server_cpu_share(control)
        for client in clients:
            client.close()
    # Even on a busy machine a spinning process gets a good share of a core.
    assert control_share > 0.1, "the control should spin: the scenario did not exhaust it"

    with ServerProcess(tmp_path, ordered=True, backlog=128, **descriptors) as server:
        clients = _exhaust_descriptors(server.port, exhausting_clients)
        time.sleep(0.3)
        share = _server_cpu_share(server)
        assert share < 0.25 and share < control_share / 4
        for client in clients:
            client.close()
        # Once descriptors are free the server accepts again, by itself.
        recovery = [numbered_message(999, sequence) for sequence in range(10)]
        with connect(server.port) as client:
            client.sendall(lines_stream(recovery))
            client.shutdown(socket.SHUT_WR)
            wait_until(
                lambda: server.stats()["consumed"]["clients"].get("999") == len(recovery),
                what="the recovery client's lines in the ring",
            )
        final = server.close()
    assert final["consumed"]["disorder"] == []
    assert "accepting paused" in server.stderr_text()


def test_a_burst_of_200_connections_is_served_completely(tmp_path):
    connections, lines_each = 200, 5
    with ServerProcess(tmp_path, ordered=True, backlog=256) as server:
        # Stopped, the server cannot accept: every connection of the burst must wait in the
        # listen backlog, the worst case of a burst that outruns accept().
        server.process.send_signal(signal.SIGSTOP)
        try:
            clients = []
            for index in range(connections):
                client = connect(server.port, timeout=3.0)
                clients.append(client)
                client.sendall(lines_stream(numbered_message(index, n) for n in range(lines_each)))
                client.shutdown(socket.SHUT_WR)
        finally:
            server.process.send_signal(signal.SIGCONT)
        stats = _settled(server, connections * lines_each)
        for client in clients:
            client.close()
    assert stats["consumed"]["disorder"] == []
    assert stats["consumed"]["clients"] == {str(i): lines_each for i in range(connections)}
    assert stats["stats"]["connections_opened"] == connections
    assert stats["errors"] == []


def test_slow_connections_beyond_max_threads_wait_without_multiplying_threads(tmp_path):
    connections, max_threads, hold_seconds = 300, 16, 0.1
    with ServerProcess(tmp_path, ordered=True, backlog=512, max_threads=max_threads) as server:
        idle_threads = server.status()["Threads"]
        clients = {}
        for index in range(connections):
            clients[index] = connect(server.port)
            clients[index].sendall(numbered_message(index, 0) + b"\n")
        # Each connection stays open hold_seconds after its first line reached the ring: a
        # slow peer that keeps its handler busy.  Only then does it finish and hang up.
        first_seen = {}
        most_threads = idle_threads
        deadline = time.monotonic() + 60
        while clients and time.monotonic() < deadline:
            most_threads = max(most_threads, server.status()["Threads"])
            now = time.monotonic()
            for client in server.stats()["consumed"]["clients"]:
                first_seen.setdefault(int(client), now)
            for index, seen in first_seen.items():
                if index in clients and now - seen >= hold_seconds:
                    client = clients.pop(index)
                    client.sendall(numbered_message(index, 1) + b"\n")
                    client.close()
            time.sleep(0.02)
        assert not clients, f"{len(clients)} connections never served"
        stats = _settled(server, 2 * connections)
    assert most_threads <= idle_threads + max_threads
    assert stats["consumed"]["clients"] == {str(i): 2 for i in range(connections)}
    assert stats["consumed"]["disorder"] == []
    assert stats["stats"]["connections_opened"] == connections


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


def test_an_endless_line_is_cut_at_max_line_with_bounded_memory(tmp_path):
    max_line, attack = 16 * MiB, 300 * MiB
    with ServerProcess(tmp_path, max_line=max_line) as server:
        rss_before = server.status()["VmRSS"]
        with connect(server.port) as client:
            sent = _stream_until_refused(client, b"x" * MiB, attack)
        stats = _settled(server, errors=1)
        peak_growth = server.status()["VmHWM"] - rss_before
    assert sent < attack, "the server must close the connection, not read 300 MiB"
    assert stats["errors"] == ["LineTooLongError"]
    counters = stats["stats"]
    assert counters["lines_too_long"] == 1
    assert counters["messages_received"] == 0
    assert max_line < counters["bytes_received"] <= max_line + 1 + 2 * RECV_SIZE
    assert counters["bytes_discarded"] == counters["bytes_received"]
    assert peak_growth < 2 * (max_line + RECV_SIZE)


@pytest.mark.parametrize(
    "header",
    [
        struct.pack(">I", 0xFFFFFFFF),
        struct.pack(">I", 0x80000000),
        struct.pack(">I", 32 * MiB + 1),
        b"GET ",
    ],
    ids=["4GiB", "2GiB", "max_frame+1", "http"],
)
def test_a_hostile_length_prefix_is_refused_at_the_header(tmp_path, header):
    max_frame = 32 * MiB
    good_frame = struct.pack(">I", 3) + b"abc"
    with ServerProcess(tmp_path, framing="length", max_frame=max_frame) as server:
        before = server.status()
        with connect(server.port) as client:
            client.sendall(good_frame + header)
            # A server that believed the header would now read this payload into memory.
            sent = _stream_until_refused(client, b"\0" * MiB, max_frame + 8 * MiB)
        stats = _settled(server, errors=1)
        after = server.status()
    assert sent < max_frame, "the server must close the connection at the header"
    assert stats["errors"] == ["FrameTooLargeError"]
    counters = stats["stats"]
    assert counters["frames_too_large"] == 1
    assert stats["consumed"]["messages"] == counters["messages_received"] == 1
    assert counters["bytes_received"] <= len(good_frame) + len(header) + 2 * RECV_SIZE
    assert after["VmHWM"] - before["VmRSS"] < max_frame / 2
    # Nor was address space reserved for a GiB-sized announcement: the handler thread's
    # stack and malloc arena are the only growth.
    assert after["VmPeak"] - before["VmPeak"] < 512 * MiB


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


def _rss_growth_when_stalled(server, producers, rss_before, received=lambda: None):
    """Wait until the producers stop making progress, then return the server's RSS growth."""
    progress = [None, time.monotonic()]

    def stalled():
        now_sent = (sum(producers.sent), received())
        if now_sent != progress[0]:
            progress[:] = [now_sent, time.monotonic()]
        return not producers.alive() or time.monotonic() - progress[1] > 0.5

    wait_until(stalled, timeout=30, what="producers stalled or done")
    return server.status()["VmRSS"] - rss_before


@pytest.mark.slow
def test_a_stalled_consumer_bounds_memory_and_loses_nothing(tmp_path):
    clients, messages_each, padding = 16, 32 * 1024, 500  # 16 MiB per client
    ring_bytes, ring_messages = 4 * MiB, 16 * 1024
    # The ring's whole record area, every connection's framing buffer, and the interpreter's
    # own (threads, the consumer's batches): nothing that grows with what is offered.
    ring_area = ring_bytes + 147 * ring_messages
    bound = ring_area + clients * (RECV_SIZE + MAX_LINE_LENGTH) + 24 * MiB

    with ServerProcess(
        tmp_path,
        ordered=True,
        consumer="paused",
        backlog=64,
        ring_max_bytes=ring_bytes,
        ring_max_messages=ring_messages,
    ) as server:
        rss_before = server.status()["VmRSS"]
        producers = _Producers(server.port, clients, messages_each, padding)
        wait_until(
            lambda: server.stats()["stats"]["connections_opened"] == clients,
            what="every producer connected",
        )
        stalled_growth = _rss_growth_when_stalled(
            server, producers, rss_before, lambda: server.stats()["stats"]["bytes_received"]
        )
        at_stall = server.stats()
        assert producers.alive() == clients, "backpressure must block every producer"
        assert at_stall["stats"]["bytes_received"] < producers.total_bytes
        assert at_stall["stats"]["pauses"] > 0
        server.resume_consumer()
        producers.join()
        stats = _settled(server, clients * messages_each)
        peak_growth = server.status()["VmHWM"] - rss_before

    assert stalled_growth < bound
    assert peak_growth < bound
    assert stats["consumed"]["disorder"] == []
    assert stats["consumed"]["clients"] == {str(c): messages_each for c in range(clients)}
    assert stats["consumed"]["bytes"] == producers.total_bytes - clients * messages_each
    assert stats["stats"]["messages_dropped"] == 0

    # The control: the stdlib pattern fastsock replaces keeps whatever it is offered.
    with ServerProcess(
        tmp_path, "stdlib", module="stdlib", handler="queueing", consumer="paused", backlog=64
    ) as control:
        rss_before = control.status()["VmRSS"]
        producers = _Producers(control.port, clients, messages_each, padding)
        control_growth = _rss_growth_when_stalled(control, producers, rss_before)
    assert control_growth > 4 * bound


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


def _quiet_resources(server):
    """The server's descriptors and threads once they have held still for 100 ms: a handler
    thread closes its socket and exits just after its connection is counted closed."""
    samples = []

    def quiet():
        samples.append((server.fd_count(), server.status()["Threads"]))
        return len(samples) >= 5 and len(set(samples[-5:])) == 1 and samples[-1]

    fds, threads = wait_until(quiet, what="descriptors and threads holding still")
    return {"fds": fds, "threads": threads, "rss": server.status()["VmRSS"]}


# Seconds of churn after the warm-up: CI's newest Python runs the full minute of the soak.
CHURN_SECONDS = float(os.environ.get("FASTSOCK_CHURN_SECONDS", 16.0))


@pytest.mark.slow
@pytest.mark.watchdog(90 + CHURN_SECONDS)
def test_connection_churn_leaves_nothing_behind(tmp_path):
    # A small ring: its whole record area is touched during the warm-up, so it does not
    # show as growth afterwards.
    with ServerProcess(tmp_path, ring_max_bytes=MiB, ring_max_messages=4096) as server:
        # The warm-up lets every first-use cache (thread stacks, allocator arenas, the
        # recently-closed peers table) reach its steady size.
        warm_up = _Churn(server.port, threads=4, lines_each=3)
        try:
            warm_up.run_for(4.0)
        finally:
            warm_up.stop()
        warm = _settled(server, warm_up.messages)
        baseline = _quiet_resources(server)
        churn = _Churn(server.port, threads=4, lines_each=3)
        try:
            churn.run_for(CHURN_SECONDS)
        finally:
            churn.stop()
        stats = _settled(server, warm_up.messages + churn.messages)
        after = _quiet_resources(server)
    connections = stats["stats"]["connections_opened"] - warm["stats"]["connections_opened"]
    assert connections > 5000, "too little churn to show a leak"
    assert stats["consumed"]["checksum"] == (warm_up.checksum + churn.checksum) & CHECKSUM_MASK
    assert stats["stats"]["bytes_discarded"] == 0
    assert stats["errors"] == []
    assert after["fds"] == baseline["fds"]
    assert after["threads"] == baseline["threads"]
    # The child's main and consumer threads, serve_forever()'s, and the one event engine
    # (engine_threads=1) that receives every connection: at most a few more, none per client.
    assert after["threads"] <= 3 + 1 + 3
    assert after["rss"] - baseline["rss"] < 8 * MiB


# -- in-process servers ------------------------------------------------------------------------


@contextlib.contextmanager
def _serving(server):
    """serve_forever() in a thread for the block; then shutdown and close, both bounded."""
    loop = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    loop.start()
    try:
        yield server
    finally:
        _bounded(server.shutdown)
        loop.join(GENEROUS)
        _bounded(server.server_close)
    assert not loop.is_alive(), "serve_forever() did not return after shutdown()"


def _bounded(function, *args):
    """Call `function` in a thread and return its result or raise its exception; fail,
    instead of hanging, if it blocks past GENEROUS."""
    outcome = {}

    def call():
        try:
            outcome["result"] = function(*args)
        except BaseException as exc:  # noqa: B036 - handed back to the caller
            outcome["error"] = exc

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(GENEROUS)
    assert not thread.is_alive(), f"{function.__qualname__}() blocked for {GENEROUS} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


class _ErrorRecorder:
    """Mixed into a server class: keeps what handle_error is given instead of printing it."""

    def handle_error(self, request, client_address):
        self.errors.append(sys.exc_info()[1])


def _recording_server(handler, server_class=fastsock.ThreadingTCPServer, **options):
    """A loopback server of `server_class` whose `errors` lists what reached handle_error."""
    recording_class = type(server_class.__name__, (_ErrorRecorder, server_class), {})
    server = recording_class((HOST, 0), handler, **options)
    server.errors = []
    return server


def _drain(ring, count, with_source=False):
    """Take `count` messages from `ring`, failing if they do not all come within GENEROUS."""
    taken = []
    deadline = time.monotonic() + GENEROUS
    while len(taken) < count:
        try:
            taken += ring.get_many(
                timeout=max(0.0, deadline - time.monotonic()), with_source=with_source
            )
        except queue.Empty:
            raise AssertionError(f"{len(taken)} of {count} messages arrived") from None
    return taken


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


@pytest.mark.parametrize("ending", ["eof", "reset"])
@pytest.mark.parametrize(
    "framing, partial",
    [
        ("lines", b"unfinished line"),
        ("length", struct.pack(">I", 100) + b"ten bytes."),
        ("length", b"\0\0"),
        ("raw", b""),
    ],
    ids=["lines", "length-payload", "length-header", "raw"],
)
def test_a_connection_ending_mid_message_accounts_for_every_byte(framing, partial, ending):
    ring = fastsock.RingQueue()
    complete = [numbered_message(0, n, n % 7) for n in range(100)]
    stream = b"".join(_frame(framing, message) for message in complete) + partial
    with _serving(_recording_server(fastsock.receiver(ring, framing=framing))) as server:
        client = connect(server.server_address[1])
        client.sendall(stream)
        # An RST makes the kernel drop what the server has not read yet: reset only once
        # everything sent was received, so that the partial message is what is lost.
        wait_until(lambda: server.stats().bytes_received == len(stream), what="stream received")
        if ending == "reset":
            _reset(client)
        else:
            client.shutdown(socket.SHUT_WR)
        wait_until(lambda: server.stats().connections_active == 0, what="connection closed")
        if ending == "eof":
            client.close()
        stats = server.stats()
        delivered = _drain(ring, stats.messages_received)
    assert server.errors == []
    if framing == "raw":
        assert b"".join(delivered) == stream
    else:
        assert delivered == complete
    assert stats.bytes_discarded == len(partial)
    assert stats.resets == (1 if ending == "reset" else 0)
    assert stats.bytes_received == (
        sum(map(len, delivered))
        + FRAMING_OVERHEAD[framing] * len(delivered)
        + stats.bytes_discarded
    )


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


@pytest.mark.parametrize("framing", ["lines", "length"])
def test_each_connection_keeps_its_order_among_16_concurrent_ones(framing):
    clients, messages_each = 16, 2000
    rng = random.Random(framing)
    expected = {
        client: [numbered_message(client, n, rng.randrange(300)) for n in range(messages_each)]
        for client in range(clients)
    }
    ring = fastsock.RingQueue()
    with _serving(_recording_server(fastsock.receiver(ring, framing=framing))) as server:
        senders = [
            threading.Thread(
                target=_send_in_random_pieces,
                args=(
                    server.server_address[1],
                    b"".join(_frame(framing, message) for message in messages),
                    client,
                ),
                daemon=True,
            )
            for client, messages in expected.items()
        ]
        for sender in senders:
            sender.start()
        taken = _drain(ring, clients * messages_each, with_source=True)
        for sender in senders:
            sender.join(GENEROUS)
    by_connection = {}
    for connection, _, payload in taken:
        by_connection.setdefault(connection, []).append(payload)
    received = {int(payloads[0].split(b":")[0]): payloads for payloads in by_connection.values()}
    assert received == expected
    assert server.errors == []


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


def test_slowloris_and_silent_squatters_do_not_slow_a_good_client():
    tricklers_count, squatters_count, round_trips = 20, 20, 100
    ring = fastsock.RingQueue()
    handler = fastsock.receiver(ring, framing="lines")
    with _serving(_recording_server(handler, backlog=128)) as server:
        port = server.server_address[1]
        with connect(port) as good:
            unloaded = _round_trips(good, ring, round_trips, client_id=0)
            tricklers = _Tricklers(port, tricklers_count)
            squatters = [connect(port) for _ in range(squatters_count)]
            try:
                wait_until(
                    lambda: (
                        server.stats().connections_opened == 1 + tricklers_count + squatters_count
                    ),
                    what="every attacker served",
                )
                attacked = _round_trips(good, ring, round_trips, client_id=1)
            finally:
                tricklers.close()
                for squatter in squatters:
                    squatter.close()
            wait_until(lambda: server.stats().connections_active == 1, what="attackers closed")
        stats = server.stats()
    assert attacked < max(10 * unloaded, 0.02)
    assert tricklers.sent >= tricklers_count * 5, "the tricklers did not trickle"
    # The attackers' bytes never made a message: all of them were discarded, and counted.
    assert stats.messages_received == 2 * round_trips
    assert stats.bytes_discarded == tricklers.sent
    assert stats.lines_too_long == 0
    assert server.errors == []


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


def _assert_in_order_without_gaps(taken):
    """Each connection's messages are its first ones, in order, none missing or repeated."""
    next_sequence = {}
    for connection, _, payload in taken:
        client, sequence, _ = payload.split(b":", 2)
        expected = next_sequence.get(connection, 0)
        assert int(sequence) == expected, f"connection {connection}: {payload[:30]!r}"
        next_sequence[connection] = expected + 1


def test_shutdown_during_a_burst_loses_nothing_it_counted_and_leaks_nothing():
    threads_before = set(threading.enumerate())
    fds_before = open_fd_count()
    ring = fastsock.RingQueue()
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
    assert open_fd_count() == fds_before


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


def test_ctrl_c_interrupts_a_loaded_loop_in_the_main_thread_and_the_server_closes_cleanly():
    fds_before = open_fd_count()
    ring = fastsock.RingQueue()
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
    assert open_fd_count() == fds_before


@contextlib.contextmanager
def _timer_signal_storm(interval=0.001):
    """SIGALRM every `interval` seconds, handled by a no-op handler; yields the count."""
    delivered = [0]

    def count(signum, frame):
        delivered[0] += 1

    previous = signal.signal(signal.SIGALRM, count)
    signal.setitimer(signal.ITIMER_REAL, interval, interval)
    try:
        yield delivered
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        # A last SIGALRM may still be on its way to a thread: let it reach the no-op handler
        # rather than the default action, which ends the process.
        time.sleep(0.05)
        signal.signal(signal.SIGALRM, previous)


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


class _EndRecorder:
    """Mixed into a receiver handler class: records how each connection's loop ended."""

    ends = None

    def finish(self):
        self.ends.append(getattr(self, "end", None))
        super().finish()


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


class _SignalTargets:
    """The threads running receive loops now, for a storm of signals aimed at them.

    A thread leaves the set, under the lock, before it exits, so that pthread_kill() never
    names a thread that is gone (undefined behaviour: it may crash the process)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.idents = set()
        self.signalled = 0

    def handler_mixin(self):
        targets = self

        class Targeted:
            def setup(self):
                super().setup()
                with targets.lock:
                    targets.idents.add(threading.get_ident())

            def finish(self):
                with targets.lock:
                    targets.idents.discard(threading.get_ident())
                super().finish()

        return Targeted

    def storm(self, stopping, interval=0.001):
        """Send SIGALRM to every target every `interval` s until `stopping` is set."""
        while not stopping.wait(interval):
            with self.lock:
                for ident in self.idents:
                    signal.pthread_kill(ident, signal.SIGALRM)
                    self.signalled += 1


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


def _recv_exactly(sock, size):
    received = bytearray()
    while len(received) < size:
        chunk = sock.recv(size - len(received))
        if not chunk:
            break
        received += chunk
    return bytes(received)


class _LargeEcho(fastsock.StreamRequestHandler):
    """Answers each request line with a reply far larger than the socket buffers."""

    def handle(self):
        for line in self.rfile:
            self.wfile.write(line * (8 * MiB // len(line)))


@pytest.mark.parametrize("vanish", ["close", "reset"])
def test_clients_that_vanish_before_the_reply_are_reported_and_the_server_goes_on(vanish):
    vanishing = 20
    with _serving(_recording_server(_LargeEcho)) as server:
        port = server.server_address[1]
        for _ in range(vanishing):
            client = connect(port)
            client.sendall(b"request\n")
            if vanish == "reset":
                _reset(client)
            else:
                client.close()
        wait_until(lambda: len(server.errors) == vanishing, what="every failure reported")
        request = b"still there?\n"
        expected_reply = request * (8 * MiB // len(request))
        with connect(port) as survivor:
            survivor.sendall(request)
            reply = _recv_exactly(survivor, len(expected_reply))
    assert reply == expected_reply
    assert len(server.errors) == vanishing
    assert all(isinstance(error, ConnectionError) for error in server.errors), server.errors


class _BlockingConsumers:
    """Threads blocked in get_many() without a timeout, taking slowly so the ring stays
    full, until the ring is closed; each records how it ended."""

    def __init__(self, ring, count):
        self.ring = ring
        self.taken = []
        self.lock = threading.Lock()
        self.endings = []
        self.threads = [threading.Thread(target=self._consume, daemon=True) for _ in range(count)]
        for thread in self.threads:
            thread.start()

    def _consume(self):
        try:
            while True:
                batch = self.ring.get_many(500, with_source=True)
                with self.lock:
                    self.taken += batch
                time.sleep(0.001)
        except BaseException as exc:
            self.endings.append(exc)

    def join(self):
        for thread in self.threads:
            thread.join(GENEROUS)
        assert not any(thread.is_alive() for thread in self.threads), "a consumer deadlocked"


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
