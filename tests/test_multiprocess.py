"""The compiled path across processes: ForkingMixIn children and prefork workers feeding
one shared ring, with kill -9 at any moment.

Every fork here happens while the test process runs no other thread (the per-test
watchdog thread is cancelled first), with fork warnings turned into errors, as a user's
server process would run.
"""

import os
import queue
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
import warnings
import zlib
from pathlib import Path

import pytest

import fastsock

GENEROUS = 10.0
HOST = "127.0.0.1"

pytestmark = pytest.mark.skipif(
    fastsock.IMPLEMENTATION != "compiled", reason="the reference ring is not shared across fork"
)


@pytest.fixture
def forked_server(thread_free):
    """fork_server(server, errors_path) -> pid; a server process still running when the
    test ends (it failed) is killed, so it cannot outlive the run."""
    pids = []

    def fork_server(server, errors_path):
        pid = _fork_server(server, errors_path)
        pids.append(pid)
        return pid

    yield fork_server
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def _fork_server(server, errors_path):
    """Run server.serve_forever() in a forked process until SIGTERM; handler errors and
    the count of killed request processes go to errors_path."""
    pid = os.fork()
    if pid:
        return pid
    status = 1
    try:
        warnings.simplefilter("error")

        def handle_error(request, client_address):
            with open(errors_path, "a") as log:
                log.write(traceback.format_exc())

        server.handle_error = handle_error
        signal.signal(signal.SIGTERM, lambda signum, frame: server.shutdown())
        server.serve_forever(poll_interval=0.05)
        server.server_close()
        with open(errors_path, "a") as log:
            log.write(f"killed_children={getattr(server, 'killed_children', 0)}\n")
        status = 0
    finally:
        os._exit(status)


def _stop_server(pid):
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + GENEROUS
    while time.monotonic() < deadline:
        reaped, status = os.waitpid(pid, os.WNOHANG)
        if reaped:
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
            return
        time.sleep(0.01)
    raise AssertionError("the server process did not stop")


def _sequenced(connection, number):
    body = b"%d:%d:" % (connection, number) + b"q" * (number % 40)
    return body + b":%08x" % zlib.crc32(body)


def _check_whole(message):
    body, _, checksum = message.rpartition(b":")
    assert b"%08x" % zlib.crc32(body) == checksum, f"torn message {message!r}"
    connection, number, _ = body.split(b":", 2)
    return int(connection), int(number)


def _drain_until(ring, count, timeout=GENEROUS):
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        try:
            got.extend(ring.get_many(timeout=0.2))
        except queue.Empty:
            pass
    return got


def _send_lines(address, connections, per_connection):
    clients = []
    for index in range(connections):
        client = socket.create_connection(address, timeout=GENEROUS)
        client.sendall(b"".join(_sequenced(index, n) + b"\n" for n in range(per_connection)))
        clients.append(client)
    return clients


def _assert_in_order_exactly_once(messages, connections, per_connection):
    by_connection = {}
    for message in messages:
        connection, number = _check_whole(message)
        by_connection.setdefault(connection, []).append(number)
    assert by_connection == {c: list(range(per_connection)) for c in range(connections)}


def test_forking_children_feed_the_parents_ring(forked_server, tmp_path):
    ring = fastsock.RingQueue()
    errors = tmp_path / "errors"
    server = fastsock.ForkingTCPServer((HOST, 0), fastsock.receiver(ring, framing="lines"))
    server.request_queue_size = 64
    pid = forked_server(server, errors)
    server.socket.close()
    clients = _send_lines(server.server_address, 16, 3000)
    got = _drain_until(ring, 16 * 3000)
    for client in clients:
        client.close()
    _assert_in_order_exactly_once(got, 16, 3000)
    deadline = time.monotonic() + GENEROUS
    while server.stats().connections_closed < 16 and time.monotonic() < deadline:
        time.sleep(0.01)
    stats = server.stats()
    assert stats.connections_opened == stats.connections_closed == 16
    assert stats.messages_received == 16 * 3000
    _stop_server(pid)
    assert errors.read_text() == "killed_children=0\n"


def test_server_close_stops_children_whose_peers_stay_connected(forked_server, tmp_path):
    ring = fastsock.RingQueue()
    server = fastsock.ForkingTCPServer((HOST, 0), fastsock.receiver(ring, framing="lines"))
    pid = forked_server(server, tmp_path / "errors")
    server.socket.close()
    clients = _send_lines(server.server_address, 4, 10)
    assert len(_drain_until(ring, 40)) == 40
    started = time.monotonic()
    _stop_server(pid)
    assert time.monotonic() - started < GENEROUS
    assert server.stats().connections_active == 0
    for client in clients:
        assert client.recv(1) == b"", "the child closed its connection"
        client.close()


def _request_children(server_pid):
    """The server's request processes, zombies included."""
    children = Path(f"/proc/{server_pid}/task/{server_pid}/children")
    return {int(pid) for pid in children.read_text().split()}


def _children_serving(server_pid, client_ports):
    """The server's request processes, still running, that hold the server's end of a
    connection from one of ``client_ports``.  By pid alone, a process of an earlier round
    forked late on a loaded machine could be taken for one of this round; it exits by itself
    once its client is closed, and a kill that finds it gone is never counted."""
    peer_port_of = {}
    with open(f"/proc/{server_pid}/net/tcp") as table:
        for row in table.read().splitlines()[1:]:
            fields = row.split()
            peer_port_of[fields[9]] = int(fields[2].rsplit(":", 1)[1], 16)
    serving = []
    for child in _request_children(server_pid):
        descriptors = f"/proc/{child}/fd"
        try:
            links = [os.readlink(f"{descriptors}/{fd}") for fd in os.listdir(descriptors)]
        except FileNotFoundError:
            continue  # exited since the listing
        inodes = {link[len("socket:[") : -1] for link in links if link.startswith("socket:[")}
        if any(peer_port_of.get(inode) in client_ports for inode in inodes) and not _gone(child):
            serving.append(child)
    return sorted(serving)


def test_kill_9_of_children_mid_stream_never_tears_or_duplicates(forked_server, tmp_path):
    ring = fastsock.RingQueue(max_messages=4096, max_bytes=256 * 1024)
    errors = tmp_path / "errors"
    server = fastsock.ForkingTCPServer((HOST, 0), fastsock.receiver(ring, framing="lines"))
    server.request_queue_size = 64
    pid = forked_server(server, errors)
    server.socket.close()
    rng = random.Random(9)
    seen = set()
    last_number = {}
    rounds = 8
    for round_number in range(rounds):
        clients = []
        for index in range(4):
            connection = round_number * 4 + index
            client = socket.create_connection(server.server_address, timeout=GENEROUS)
            client.setblocking(False)
            clients.append((connection, client, [0]))
        deadline = time.monotonic() + 0.3 + rng.random() * 0.3
        victims = []
        while time.monotonic() < deadline or not victims:
            for connection, client, sent in clients:
                batch = b"".join(_sequenced(connection, sent[0] + n) + b"\n" for n in range(200))
                try:
                    client.send(batch)
                    sent[0] += 200
                except (BlockingIOError, ConnectionError):
                    pass  # full, or its request process was killed
            for message in ring.get_many(block=False) if not ring.empty() else ():
                connection, number = _check_whole(message)
                assert (connection, number) not in seen, "duplicated message"
                assert number > last_number.get(connection, -1), "out of order"
                seen.add((connection, number))
                last_number[connection] = number
            if not victims and time.monotonic() > deadline - 0.2:
                # Under a slow fork (a loaded machine, ASan) not every child may run yet.
                ports = {client.getsockname()[1] for _, client, _ in clients}
                live = _children_serving(pid, ports)
                victims = live[-2:] if len(live) >= 2 else []
                for victim in victims:
                    os.kill(victim, signal.SIGKILL)
        for _, client, _ in clients:
            client.close()
    survivor = socket.create_connection(server.server_address, timeout=GENEROUS)
    survivor.sendall(_sequenced(999, 0) + b"\n")
    deadline = time.monotonic() + GENEROUS
    found = False
    while not found and time.monotonic() < deadline:
        for message in _drain_until(ring, 1, timeout=1):
            connection, number = _check_whole(message)
            assert (connection, number) not in seen, "duplicated message"
            seen.add((connection, number))
            found = found or connection == 999
    assert found, "the ring still works after the kills"
    survivor.close()
    _stop_server(pid)
    assert f"killed_children={2 * rounds}" in errors.read_text()
    stats = server.stats()
    assert stats.connections_opened == stats.connections_closed, "the parent settled the killed"
    assert stats.partial_bytes == 0


def test_prefork_workers_feed_one_ring(thread_free):
    ring = fastsock.RingQueue()
    server = fastsock.PreforkServer(
        (HOST, 0), fastsock.receiver(ring, framing="lines"), workers=2, backlog=64
    )
    with server:
        server.start()
        assert len(server.workers) == 2
        clients = _send_lines(server.server_address, 16, 3000)
        got = _drain_until(ring, 16 * 3000)
        _assert_in_order_exactly_once(got, 16, 3000)
        for client in clients:
            client.close()
        workers = server.workers
    assert server.workers == []
    for worker in workers:
        with pytest.raises(ChildProcessError):
            os.waitpid(worker, os.WNOHANG)
    assert server.worker_crashes == 0
    assert server.stats().connections_opened == 16


def test_prefork_survives_a_killed_worker(thread_free):
    ring = fastsock.RingQueue()
    server = fastsock.PreforkServer(
        (HOST, 0), fastsock.receiver(ring, framing="lines"), workers=2, backlog=64
    )
    with server:
        server.start()
        victim = server.workers[0]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + GENEROUS
        while victim in server.workers and time.monotonic() < deadline:
            server.reap()
            time.sleep(0.01)
        assert server.worker_crashes == 1
        clients = _send_lines(server.server_address, 8, 100)
        _assert_in_order_exactly_once(_drain_until(ring, 800), 8, 100)
        for client in clients:
            client.close()


def test_prefork_refuses_to_fork_with_threads_running():
    ring = fastsock.RingQueue()
    release = threading.Event()
    helper = threading.Thread(target=release.wait)
    helper.start()
    try:
        with fastsock.PreforkServer((HOST, 0), fastsock.receiver(ring), workers=1) as server:
            with pytest.raises(RuntimeError, match="before this process starts threads"):
                server.start()
    finally:
        release.set()
        helper.join()


@pytest.mark.parametrize("workers", [0, -1, 1.5])
def test_prefork_worker_count_is_checked(workers):
    with pytest.raises(ValueError, match="workers"):
        fastsock.PreforkServer((HOST, 0), fastsock.receiver(fastsock.RingQueue()), workers=workers)


def test_length_prefixed_frames_from_forked_children(forked_server, tmp_path):
    ring = fastsock.RingQueue()
    server = fastsock.ForkingTCPServer((HOST, 0), fastsock.receiver(ring, framing="length"))
    pid = forked_server(server, tmp_path / "errors")
    server.socket.close()
    frames = [os.urandom(n) for n in (0, 1, 1000, 100_000)]
    with socket.create_connection(server.server_address, timeout=GENEROUS) as client:
        client.sendall(b"".join(struct.pack(">I", len(f)) + f for f in frames))
        assert _drain_until(ring, len(frames)) == frames
    _stop_server(pid)


PREFORK_PARENT = """
import sys
import time

import fastsock

server = fastsock.PreforkServer(
    ("127.0.0.1", 0), fastsock.receiver(fastsock.RingQueue(), framing="lines"), workers=2
)
server.start()
print(*server.workers, flush=True)
time.sleep(60)
"""


def _gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def test_prefork_workers_stop_when_their_parent_is_killed(tmp_path):
    # From elsewhere than the checkout, whose fastsock/ has no compiled modules in CI, and
    # with the directory of the fastsock under test first on the path.
    search_path = [str(Path(fastsock.__file__).parent.parent), os.environ.get("PYTHONPATH", "")]
    parent = subprocess.Popen(
        [sys.executable, "-c", PREFORK_PARENT],
        stdout=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, search_path))),
    )
    try:
        workers = [int(pid) for pid in parent.stdout.readline().split()]
        assert len(workers) == 2 and not any(_gone(pid) for pid in workers)
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()
    deadline = time.monotonic() + GENEROUS
    try:
        while not all(_gone(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert all(_gone(pid) for pid in workers), "workers outlived their killed parent"
    finally:
        for pid in workers:
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)
