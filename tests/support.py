"""Helpers shared by the test modules: bounded clients (many of them in a child process, or
one flooding among trickling ones), a background serve_forever(), a ring's consumer, the
descriptor limit raised, and a look at this process's file descriptors and children.

Every blocking call here is bounded by NETWORK_TIMEOUT, so that a broken server makes a
test fail instead of hanging it.
"""

import contextlib
import os
import queue
import resource
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.fault_helpers import wait_until

NETWORK_TIMEOUT = 10.0
"""Seconds any single network wait may take: far above what loopback ever needs."""

LOCALHOST = "127.0.0.1"

NUMBERED_LINE = b"%040d\n"
NUMBERED_LINE_SIZE = len(NUMBERED_LINE % 0)
STREAM_LINES = 400_000
# struct tcp_info (linux/tcp.h): tcpi_bytes_acked is the u64 at byte 120.
TCP_INFO_BYTES_ACKED = struct.Struct("=Q")
TCP_INFO_BYTES_ACKED_OFFSET = 120


def free_port():
    """A TCP port free on loopback now, for a server the test starts as another process."""
    with socket.socket() as probe:
        probe.bind((LOCALHOST, 0))
        return probe.getsockname()[1]


def require_program(path, name, package, tests):
    """path, a program the tests run (None when it is not installed): without it the test
    fails under CI=true, as .ci/run installs it, and skips, loudly, elsewhere; tests says
    which ("the tests behind a real HAProxy")."""
    if path is None:
        message = f"{name} is not installed (Debian: apt-get install {package})"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}: {tests} cannot run")
        pytest.skip(f"!!! {message}: {tests} are SKIPPED !!!")
    return path


def connect(address, family=socket.AF_INET):
    """A stream client connected to `address`, with NETWORK_TIMEOUT on every operation."""
    client = socket.socket(family, socket.SOCK_STREAM)
    client.settimeout(NETWORK_TIMEOUT)
    try:
        client.connect(address)
    except BaseException:
        client.close()
        raise
    return client


def datagram_client(family=socket.AF_INET, bind_to=None):
    """A datagram client with NETWORK_TIMEOUT, bound to `bind_to` if given.

    Unix datagram clients must be bound to a path to receive replies; inet clients left
    unbound are bound by the kernel, to the wildcard address, at their first sendto().
    """
    client = socket.socket(family, socket.SOCK_DGRAM)
    client.settimeout(NETWORK_TIMEOUT)
    if bind_to is not None:
        client.bind(bind_to)
    return client


def recv_until_eof(sock):
    """Everything the peer sends until it shuts its side down."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def recv_line(sock):
    """One b"\\n"-terminated line, read a byte at a time so nothing after it is consumed."""
    line = bytearray()
    while not line.endswith(b"\n"):
        byte = sock.recv(1)
        if not byte:
            raise EOFError(f"connection closed after {bytes(line)!r}")
        line += byte
    return bytes(line)


def skip_without_ipv6_loopback():
    """Skip the test on a machine without an IPv6 loopback address (::1)."""
    if socket.has_ipv6:
        try:
            with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
                probe.bind(("::1", 0))
        except OSError:
            pass
        else:
            return
    pytest.skip("this machine has no IPv6 loopback (::1)")


def start_thread(target, *args, **kwargs):
    """Start `target` in a daemon thread, so that a hung call cannot keep pytest alive."""
    thread = threading.Thread(target=target, args=args, kwargs=kwargs, daemon=True)
    thread.start()
    return thread


def call_bounded(function, *args, **kwargs):
    """Call `function` in a thread and return its result (or raise its exception); fail if
    it is still running after NETWORK_TIMEOUT."""
    outcome = {}

    def run():
        try:
            outcome["result"] = function(*args, **kwargs)
        except BaseException as exc:  # noqa: B036 - handed back to the caller as is
            outcome["error"] = exc

    start_thread(run).join(NETWORK_TIMEOUT)
    assert outcome, f"{function.__qualname__}() still blocked after {NETWORK_TIMEOUT} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


@contextlib.contextmanager
def serving(server, poll_interval=0.05):
    """Run server.serve_forever() in a thread for the duration of the block, then shut it
    down (bounded) and close the server."""
    loop = start_thread(server.serve_forever, poll_interval=poll_interval)
    try:
        yield server
    finally:
        start_thread(server.shutdown).join(NETWORK_TIMEOUT)
        loop.join(NETWORK_TIMEOUT)
        server.server_close()
    assert not loop.is_alive(), "serve_forever() did not return after shutdown()"


def open_fd_count():
    """How many file descriptors this process holds open."""
    return len(os.listdir("/proc/self/fd"))


def open_fds():
    """This process's open descriptors, each with the file it refers to (a socket's inode
    tells two sockets apart even when one got the other's number)."""
    found = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            found[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except FileNotFoundError:
            # Closed since the listing: the listing's own descriptor, or another thread's.
            pass
    return found


def fds_opened_since(before):
    """The descriptors open now that were not open, on the same file, at `before`
    (an `open_fds()`).  Descriptors closed meanwhile do not count: earlier tests' garbage,
    freed by the collector at any moment, closes its own."""
    return {fd: target for fd, target in open_fds().items() if before.get(fd) != target}


def runnable_share(pid, tids, samples=60, interval=0.02):
    """The share of `samples` looks at /proc/PID/task/TID/stat, `interval` seconds apart, in
    which any of the threads `tids` of process `pid` was running or runnable ('R').  Unlike
    its CPU time, this does not shrink when the machine is busy: a thread that spins is
    runnable whether or not it has a core, one that waits is asleep."""
    running = 0
    for _ in range(samples):
        states = []
        for tid in tids:
            with open(f"/proc/{pid}/task/{tid}/stat") as stat:
                # The name may hold spaces: the state is the first field after it.
                states.append(stat.read().rpartition(")")[2].split()[0])
        running += "R" in states
        time.sleep(interval)
    return running / samples


def child_pids():
    """Pids of this process's direct children, running or zombie, whichever thread forked
    them (Linux lists children per thread)."""
    pids = set()
    for children in Path("/proc/self/task").glob("*/children"):
        with contextlib.suppress(FileNotFoundError):  # the thread exited meanwhile
            pids.update(int(pid) for pid in children.read_text().split())
    return pids


def kill_and_reap(pids):
    """Kill and reap the given child processes."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


class StreamingClient(threading.Thread):
    """Streams numbered lines as fast as it can until the server refuses more (or all
    STREAM_LINES are sent); then tells what the server took responsibility for."""

    def __init__(self, address, family):
        super().__init__(name="streaming-client", daemon=True)
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(NETWORK_TIMEOUT)
        self.sock.connect(address)
        self.stream = memoryview(b"".join(NUMBERED_LINE % n for n in range(STREAM_LINES)))
        self.sent = 0
        self.ended_by = None

    def run(self):
        try:
            while self.sent < len(self.stream):
                self.sent += self.sock.send(self.stream[self.sent : self.sent + 65536])
        except OSError as exc:
            self.ended_by = exc

    def delivered_to_server(self):
        """What the server side took responsibility for: TCP's acknowledged bytes, or what a
        Unix socket accepted."""
        if self.sock.family == socket.AF_UNIX:
            return self.sent
        info = self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
        # The count includes the SYN's one sequence number.
        return TCP_INFO_BYTES_ACKED.unpack_from(info, TCP_INFO_BYTES_ACKED_OFFSET)[0] - 1


class SlowConsumer(threading.Thread):
    """Takes 128 messages every 10 ms; with stall_for, none for that many seconds from the
    stop (set stop_started), past the drain deadline, so that something is surely left to
    count; returns once the ring is empty after stop_finished is set."""

    def __init__(self, ring, stall_for):
        super().__init__(name="slow-consumer", daemon=True)
        self.ring = ring
        self.stall_for = stall_for
        self.stop_started = threading.Event()
        self.stop_finished = threading.Event()
        self.messages = []

    def run(self):
        stalled = False
        while True:
            if self.stall_for and self.stop_started.is_set() and not stalled:
                stalled = True
                time.sleep(self.stall_for)
            try:
                self.messages.extend(self.ring.get_many(max_items=128, timeout=0.05))
            except queue.Empty:
                if self.stop_finished.is_set():
                    return
                continue
            if not self.stop_finished.is_set():
                time.sleep(0.01)


def check_stop_accounting(client, delivered, before_stop, stats, consumer):
    """After a graceful stop of a StreamingClient's server: the lines delivered are a whole
    prefix, in order, and what the server took responsibility for is exactly those lines
    plus what the counters name.  A "slow" consumer let the server read after the stop; a
    stalled one left bytes in the kernel, counted."""
    delivered_to_server = client.delivered_to_server()
    client.sock.close()
    assert delivered == [NUMBERED_LINE[:-1] % n for n in range(len(delivered))], "in order"
    accounted = (
        len(delivered) * NUMBERED_LINE_SIZE
        + stats.messages_dropped
        + stats.bytes_discarded
        + stats.bytes_unread
    )
    assert delivered_to_server == accounted, stats
    assert stats.connections_active == 0
    if consumer == "slow":
        assert stats.bytes_received > before_stop.bytes_received, "it read after the stop"
    else:
        assert stats.bytes_unread > 0, "the deadline left bytes in the kernel, counted"


class Consumer:
    """A thread that drains the ring until told to stop, then takes what is left."""

    def __init__(self, ring):
        self.ring = ring
        self.taken = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._consume, daemon=True)
        self.thread.start()

    def _consume(self):
        while not self.stopping.is_set():
            with contextlib.suppress(queue.Empty):
                self.taken += self.ring.get_many(timeout=0.05, with_source=True)
        while not self.ring.empty():
            self.taken += self.ring.get_many(block=False, with_source=True)

    def stop(self):
        self.stopping.set()
        self.thread.join(NETWORK_TIMEOUT)
        assert not self.thread.is_alive()
        return self.taken


@contextlib.contextmanager
def descriptor_limit(needed):
    """RLIMIT_NOFILE raised to at least `needed` (the hard limit too, as root) for the block;
    the test fails if it cannot be.  Child processes started in the block inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        new_hard = hard if hard == resource.RLIM_INFINITY or hard >= needed else needed
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, new_hard))
        except (ValueError, OSError) as exc:
            pytest.fail(f"cannot raise RLIMIT_NOFILE from {(soft, hard)} to {needed}: {exc}")
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# Many clients live in a process of their own: with them, the test process would need a
# descriptor for each end, 20,000 for 10,000 connections, more than a container's hard limit
# often allows (raising it takes CAP_SYS_RESOURCE, which root in a container may lack).
MANY_CLIENTS_SCRIPT = """
import socket, sys
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
clients = []
for number in range(count):
    clients.append(socket.create_connection((host, port), timeout=10.0))
    clients[-1].sendall(b"%05d\\n" % number)
print("connected", flush=True)
sys.stdin.read()
"""


def many_clients_lines(count):
    """What many_clients(address, count) sends, one line per client."""
    return [b"%05d" % number for number in range(count)]


@contextlib.contextmanager
def many_clients(address, count):
    """`count` TCP clients of `address` in a child process, each connected and having sent
    its number as a line (many_clients_lines) when the block starts; they close when it
    ends (run it within descriptor_limit(count + ...) for a large count)."""
    host, port = address[:2]
    with subprocess.Popen(
        [sys.executable, "-c", MANY_CLIENTS_SCRIPT, host, str(port), str(count)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    ) as clients:
        try:
            assert call_bounded(clients.stdout.readline) == b"connected\n"
            yield
        finally:
            clients.stdin.close()
            try:
                clients.wait(2 * NETWORK_TIMEOUT)
            except subprocess.TimeoutExpired:
                clients.kill()
                raise
    assert clients.returncode == 0


def slowest_trickle(connect_client, ring, trickling, rounds=20, interval=0.05):
    """The longest a trickling line waited behind a flood: one client sends 4 KiB lines as
    fast as it can while `trickling` others each send a timestamped line every `interval`
    seconds for `rounds` rounds, and a thread consumes `ring`; the wait is from the send to
    the get_many() that took the line.  connect_client() returns a connected client."""
    flood_line = b"f" * 4095 + b"\n"
    generous = 2 * NETWORK_TIMEOUT
    flooding = threading.Event()
    flooded = []
    latencies = {}

    def flood(client):
        block = flood_line * 256
        with contextlib.suppress(OSError):
            while flooding.is_set():
                client.sendall(block)

    def consume():
        while flooding.is_set() or len(latencies) < trickling * rounds:
            try:
                messages = ring.get_many(timeout=0.05)
            except queue.Empty:
                continue
            arrived = time.monotonic()
            for message in messages:
                if message.startswith(b"t "):
                    _, index, number, sent = message.split()
                    latencies[int(index), int(number)] = arrived - float(sent)
                else:
                    flooded.append(len(message))

    flooder = connect_client()
    clients = [connect_client() for _ in range(trickling)]
    flooding.set()
    flood_thread = start_thread(flood, flooder)
    consumer = start_thread(consume)
    wait_until(lambda: sum(flooded) > 4 * 1024 * 1024, generous, what="the flood arriving")
    started = time.monotonic()
    for number in range(rounds):
        for index, client in enumerate(clients):
            client.sendall(b"t %d %d %.6f\n" % (index, number, time.monotonic()))
        time.sleep(max(0.0, started + (number + 1) * interval - time.monotonic()))
    wait_until(lambda: len(latencies) == trickling * rounds, generous, what="every trickle")
    flooding.clear()
    consumer.join(generous)
    # Wakes a sendall() that the server holds back now that nobody consumes.
    flooder.shutdown(socket.SHUT_RDWR)
    flood_thread.join(generous)
    for client in clients + [flooder]:
        client.close()
    assert not consumer.is_alive() and not flood_thread.is_alive()
    return max(latencies.values())
