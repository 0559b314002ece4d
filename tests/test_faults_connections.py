"""Faults: many connections.  Descriptor exhaustion (accepting pauses, then recovers
by itself), a burst of connections that outruns accept(), slow connections beyond
max_threads, and the connection churn soak (FASTSOCK_CHURN_SECONDS long, 16 s by default;
CI's newest Python runs 56 s): what they do to a fastsock server on an exposed port, and
what it must still guarantee.

The server runs in a child process (tests/fault_helpers.py) so that its descriptor limits
and floods stay out of the test process; the misbehaving clients are in
tests/fault_clients.py, what is read of the server in tests/fault_servers.py.

No assertion relies on a tight wall-clock number: timings are compared against a control
measured in the same test, or bounded generously.
"""

import os
import signal
import socket
import time

import pytest

from tests.fault_clients import MiB, _Churn, _exhaust_descriptors
from tests.fault_helpers import (
    CHECKSUM_MASK,
    ServerProcess,
    connect,
    lines_stream,
    numbered_message,
    wait_until,
)
from tests.fault_servers import _quiet_resources, _running_share, _settled


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
        control_running = _running_share(control, "serving")
        for client in clients:
            client.close()
    # Judged by the accepting thread's state, not by CPU time: a busy machine takes cores
    # away from a spinning thread, but it stays runnable.
    assert control_running > 0.5, "the control should spin: the scenario did not exhaust it"

    with ServerProcess(tmp_path, ordered=True, backlog=128, **descriptors) as server:
        clients = _exhaust_descriptors(server.port, exhausting_clients)
        wait_until(lambda: "accepting paused" in server.stderr_text(), what="accepting paused")
        # The engine sleeps between its attempts (10 ms doubling to 1 s): runnable only for
        # the instants it tries.
        assert _running_share(server, "fastsock-engine") < 0.25
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
