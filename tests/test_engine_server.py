"""The event engines' promises kept through the servers users run (issue 13).

tests/test_engine.py holds the engine to them directly; here the same promises are checked
through the public API only: the stream server classes given a ``fastsock.receiver(...)``
handler, ``serve_forever()``, ``shutdown()``, ``server_close()``, Ctrl-C, ``stats()``,
``connection_address()`` and the ring.  Clients are real sockets on loopback or Unix
sockets in a temporary directory; every wait is bounded, and nothing is timed for speed:
the few time bounds tell a server that reacts from one that waits for something else (a
drain deadline, a poll), far above what either implementation needs on a loaded machine.
The connection churn soak through ThreadingTCPServer is test_faults_connections.py's.
"""

import dataclasses
import os
import selectors
import socket
import threading
import time

import pytest

import fastsock
from tests.fault_helpers import ServerProcess, checksum, wait_until
from tests.support import (
    NETWORK_TIMEOUT,
    Consumer,
    call_bounded,
    connect,
    descriptor_limit,
    fds_opened_since,
    many_clients,
    many_clients_lines,
    open_fds,
    serving,
    skip_without_ipv6_loopback,
    slowest_trickle,
    start_thread,
)

HOST = "127.0.0.1"
GENEROUS = 20.0
# Far beyond what a stop needs: a stop that returns well before it did not wait for it.
DRAIN_TIMEOUT = 60.0
TEN_THOUSAND = 10_000


def thread_count():
    """This process's threads, whether Python knows them or not."""
    return len(os.listdir("/proc/self/task"))


def check_every_line_delivered_or_counted(stats, count, messages, payload_bytes):
    """After a stop with many_clients(address, count) open: every connection was opened and
    closed, and every byte they sent is a delivered line (`messages` of them, `payload_bytes`
    without delimiters) or named by the counters; with DRAIN_TIMEOUT, all were delivered."""
    sent = sum(len(line) + 1 for line in many_clients_lines(count))
    assert stats["connections_opened"] == stats["connections_closed"] == count
    assert stats["connections_refused"] == 0
    assert stats["bytes_received"] + stats["bytes_unread"] == sent
    assert sent == (
        payload_bytes
        + messages
        + stats["messages_dropped"]
        + stats["bytes_discarded"]
        + stats["bytes_unread"]
    ), stats
    assert stats["messages_received"] == messages == count, "the drain had time for them all"


# -- 10,000 connections -----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.watchdog(180)
def test_shutdown_and_server_close_with_ten_thousand_connections_open():
    with descriptor_limit(TEN_THOUSAND + 1024):
        ring = fastsock.RingQueue()
        # Taken with the ring, which holds its eventfd (the asyncio wake-up) for its life.
        fds_before = open_fds()
        handler = fastsock.receiver(
            ring,
            framing="lines",
            max_connections=TEN_THOUSAND,
            drain_timeout=DRAIN_TIMEOUT,
            engine_threads=2,
        )
        server = fastsock.ThreadingTCPServer((HOST, 0), handler)
        loop = start_thread(server.serve_forever)
        consumer = Consumer(ring)
        with many_clients(server.server_address, TEN_THOUSAND):
            wait_until(
                lambda: server.stats().connections_active == TEN_THOUSAND,
                60.0,
                what="every connection open",
            )
            # Each bounded by NETWORK_TIMEOUT: together well under the drain deadline.
            call_bounded(server.shutdown)
            call_bounded(server.server_close)
            loop.join(NETWORK_TIMEOUT)
            assert not loop.is_alive(), "serve_forever() did not return after shutdown()"
        taken = consumer.stop()
        stats = dataclasses.asdict(server.stats())
    payloads = [payload for _, _, payload in taken]
    check_every_line_delivered_or_counted(
        stats, TEN_THOUSAND, len(payloads), sum(map(len, payloads))
    )
    assert sorted(payloads) == many_clients_lines(TEN_THOUSAND)
    assert len({connection_id for connection_id, _, _ in taken}) == TEN_THOUSAND
    assert fds_opened_since(fds_before) == {}, "descriptors leaked"


@pytest.mark.slow
@pytest.mark.watchdog(180)
def test_ctrl_c_with_ten_thousand_connections_open(tmp_path):
    with descriptor_limit(TEN_THOUSAND + 1024):
        # `with server: server.serve_forever()` in the main thread of a process of its own.
        with ServerProcess(
            tmp_path,
            serve_in_main_thread=True,
            max_connections=TEN_THOUSAND,
            drain_timeout=DRAIN_TIMEOUT,
        ) as server:
            with many_clients((HOST, server.port), TEN_THOUSAND):
                wait_until(
                    lambda: server.stats()["active"] == TEN_THOUSAND,
                    60.0,
                    what="every connection open",
                )
                # The answer comes once the server is closed and its messages consumed.
                final = server.interrupt(timeout=GENEROUS)
            server.process.wait(GENEROUS)
            assert server.process.returncode == 0, server.stderr_text()
    assert final["interrupted"], "serve_forever() returned without KeyboardInterrupt"
    consumed = final["consumed"]
    check_every_line_delivered_or_counted(
        final["stats"], TEN_THOUSAND, consumed["messages"], consumed["bytes"]
    )
    assert consumed["checksum"] == checksum(many_clients_lines(TEN_THOUSAND))
    assert final["errors"] == []
    assert final["fds"] == server.fds_at_start, "descriptors leaked in the server process"


# -- Fairness ---------------------------------------------------------------------------------


def test_a_flooding_connection_does_not_starve_a_hundred_trickling_ones():
    ring = fastsock.RingQueue()
    handler = fastsock.receiver(ring, framing="lines", max_line=8192)
    with serving(fastsock.ThreadingTCPServer((HOST, 0), handler)) as server:
        slowest = slowest_trickle(lambda: connect(server.server_address), ring, trickling=100)
    # The engine's own test allows 2 s; the server adds nothing to the path of a message.
    assert slowest < 3.0, f"a trickling line waited {slowest:.2f} s behind the flood"
    stats = server.stats()
    assert stats.connections_opened == stats.connections_closed == 101


# -- Timers -----------------------------------------------------------------------------------

# How much later than its deadline a timer may fire, and how much earlier it may seem to
# (the server's clock starts when it reads the data, a moment after the client sent it).
TIMER_LATE = 3.0
TIMER_EARLY = 0.25


def ends_seen(clients, deadline):
    """When each client saw the server end its connection (EOF or reset), until `deadline`."""
    ends = {}
    with selectors.DefaultSelector() as selector:
        for client in clients:
            selector.register(client, selectors.EVENT_READ)
        while len(ends) < len(clients) and time.monotonic() < deadline:
            for key, _ in selector.select(max(0.0, deadline - time.monotonic())):
                try:
                    data = key.fileobj.recv(1)
                except ConnectionResetError:
                    data = b""
                assert data == b"", f"the server sent {data!r}"
                ends[key.fileobj] = time.monotonic()
                selector.unregister(key.fileobj)
    return ends


class Talkers:
    """Clients that each send a line every `interval` seconds until stopped."""

    def __init__(self, clients, interval=0.3):
        self.clients = clients
        self.interval = interval
        self.stopping = threading.Event()
        self.thread = start_thread(self._talk)

    def _talk(self):
        while not self.stopping.wait(self.interval):
            for client in self.clients:
                client.sendall(b"still here\n")

    def stop(self):
        self.stopping.set()
        self.thread.join(NETWORK_TIMEOUT)
        assert not self.thread.is_alive()


@pytest.mark.slow
@pytest.mark.watchdog(120)
def test_idle_and_message_timeouts_fire_on_time_among_two_thousand_connections():
    silent_each, talking = 500, 1000
    idle_timeout, message_timeout = 2.5, 1.5
    ring = fastsock.RingQueue()
    handler = fastsock.receiver(
        ring,
        framing="lines",
        idle_timeout=idle_timeout,
        message_timeout=message_timeout,
        max_connections=2 * silent_each + talking,
    )
    with (
        descriptor_limit(2 * (2 * silent_each + talking) + 1024),
        serving(fastsock.ThreadingTCPServer((HOST, 0), handler)) as server,
    ):
        consumer = Consumer(ring)
        talkers = Talkers([connect(server.server_address) for _ in range(talking)])
        complete = [connect(server.server_address) for _ in range(silent_each)]
        partial = [connect(server.server_address) for _ in range(silent_each)]
        complete_sent = time.monotonic()
        for client in complete:
            client.sendall(b"one whole line\n")
        partial_sent = time.monotonic()
        for client in partial:
            client.sendall(b"part")
        sent = time.monotonic()
        ends = ends_seen(complete + partial, sent + idle_timeout + TIMER_LATE)
        active = server.stats().connections_active
        talkers.stop()
        for client in talkers.clients + complete + partial:
            client.close()
    taken = consumer.stop()
    assert len(ends) == 2 * silent_each, "a silent connection outlived its timer"
    assert active == talking, "a talking connection was closed"
    for group, started, timeout in (
        (complete, complete_sent, idle_timeout),
        (partial, partial_sent, message_timeout),
    ):
        waited = [ends[client] - started for client in group]
        assert min(waited) > timeout - TIMER_EARLY, f"a {timeout} s timer fired early"
        assert max(waited) < timeout + TIMER_LATE, f"a {timeout} s timer fired late"
    stats = server.stats()
    assert (stats.idle_timeouts, stats.message_timeouts) == (silent_each, silent_each)
    assert stats.bytes_discarded == len(b"part") * silent_each
    assert stats.connections_opened == stats.connections_closed == 2 * silent_each + talking
    assert stats.messages_received == len(taken)


# -- Threads and CPU --------------------------------------------------------------------------

CPU_SAMPLE_SECONDS = 1.0


def cpu_share_when_quiet(samples=3):
    """The smallest share of a core this process used over a quiet second, of up to
    `samples` tries: one quiet second is enough to show a server that does not poll, and a
    neighbour's burst on a shared machine cannot fail the test alone."""
    shares = []
    for _ in range(samples):
        cpu, wall = time.process_time(), time.monotonic()
        time.sleep(CPU_SAMPLE_SECONDS)
        shares.append((time.process_time() - cpu) / (time.monotonic() - wall))
        if shares[-1] < 0.05:
            break
    return min(shares)


@pytest.mark.parametrize("engine_threads", [1, 2])
def test_a_thousand_silent_connections_cost_no_threads_and_no_cpu(engine_threads):
    count = 1000
    ring = fastsock.RingQueue()
    handler = fastsock.receiver(
        ring, framing="lines", engine_threads=engine_threads, max_connections=count
    )
    with descriptor_limit(2 * count + 1024):
        consumer = Consumer(ring)
        threads_before = thread_count()
        with serving(fastsock.ThreadingTCPServer((HOST, 0), handler)) as server:
            clients = [connect(server.server_address) for _ in range(count)]
            for number, client in enumerate(clients):
                client.sendall(b"%05d\n" % number)
            wait_until(lambda: len(consumer.taken) == count, GENEROUS, what="every line")
            assert server.stats().connections_active == count
            threads = thread_count() - threads_before
            # A silent connection's receive buffer is given back after 50 ms: a timer that
            # then has nothing more to do.
            time.sleep(0.2)
            cpu_share = cpu_share_when_quiet()
            for client in clients:
                client.close()
    consumer.stop()
    # serve_forever()'s thread, the engines, and leeway for a helper thread.
    assert threads <= engine_threads + 3, f"{threads} threads for {count} connections"
    assert cpu_share < 0.05, f"{cpu_share:.1%} of a core while every peer was silent"
    stats = server.stats()
    assert stats.connections_opened == stats.connections_closed == count


# -- Address families -------------------------------------------------------------------------


def inet_server(server_class, host, **options):
    def make(handler, sock_dir):
        if ":" in host:
            skip_without_ipv6_loopback()
        return server_class((host, 0), handler, **options)

    return make


def unix_server(server_class):
    def make(handler, sock_dir):
        return server_class(os.path.join(sock_dir, "server.sock"), handler)

    return make


def expected_peer(server, client):
    """The client address socketserver gives for `client`: an IPv4 client of a dual-stack
    server as an IPv4-mapped IPv6 address; a Unix client by the path it is bound to, if any."""
    name = client.getsockname()
    if server.address_family == socket.AF_INET6 and client.family == socket.AF_INET:
        return ("::ffff:" + name[0], name[1], 0, 0)
    return name


SERVERS = {
    "ipv6": (inet_server(fastsock.TCPServer, "::1", address_family=socket.AF_INET6), ["::1"]),
    "dual-stack": (
        inet_server(fastsock.ThreadingTCPServer, "::", dual_stack=True),
        [HOST, "::1"],
    ),
    "unix": (unix_server(fastsock.UnixStreamServer), [None]),
    "threading-unix": (unix_server(fastsock.ThreadingUnixStreamServer), [None]),
}


def client_of(server, host, sock_dir, number):
    """A client of `server`: over TCP to `host`, else over its Unix socket, bound to a path
    of its own when `number` is odd (so that the server knows it by that path)."""
    if host is None:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if number % 2:
            client.bind(os.path.join(sock_dir, f"client-{number}.sock"))
        address = server.server_address
    else:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        client = socket.socket(family, socket.SOCK_STREAM)
        address = (host, server.server_address[1])
    client.settimeout(NETWORK_TIMEOUT)
    client.connect(address)
    return client


@pytest.mark.skipif(
    fastsock.IMPLEMENTATION != "compiled",
    reason="the reference's selectors wake every engine (no EPOLLEXCLUSIVE): a race picks one",
)
def test_connections_one_at_a_time_alternate_between_two_engines():
    # Each connection arrives while both engines wait: the kernel wakes the first
    # registered waiter of the shared listener, and an engine that accepted registers again
    # behind the other (before, the first engine took 85-97% of them).
    count = 200
    ring = fastsock.RingQueue()
    handler = fastsock.receiver(ring, framing="lines", engine_threads=2, max_connections=count)
    with serving(fastsock.ThreadingTCPServer((HOST, 0), handler)) as server:
        clients = []
        try:
            for number in range(count):
                clients.append(connect(server.server_address))
                clients[-1].sendall(b"%d\n" % number)
                assert ring.get_many(timeout=GENEROUS) == [b"%d" % number]
            held = server.receive_path.engine_connections()
        finally:
            for client in clients:
                client.close()
    assert sum(held) == count
    assert max(held) <= count * 3 // 4, f"connections per engine: {held}"


def burst_over_two_engines(count):
    """Connections per engine after `count` clients connect at once and send a line each
    to two engines sharing a listener; every line must have been served."""
    ring = fastsock.RingQueue()
    handler = fastsock.receiver(ring, framing="lines", engine_threads=2, max_connections=count)
    with serving(fastsock.ThreadingTCPServer((HOST, 0), handler)) as server:
        consumer = Consumer(ring)
        with many_clients(server.server_address, count):
            wait_until(lambda: len(consumer.taken) == count, GENEROUS, what="a line from each")
            held = server.receive_path.engine_connections()
        taken = consumer.stop()
    assert sum(held) == count
    assert sorted(payload for _, _, payload in taken) == many_clients_lines(count)
    return held


def test_a_burst_of_connections_spreads_over_two_engines():
    # The engines share one listening socket and take a few connections per turn each, so
    # that neither takes the whole burst; every connection is still accepted and served:
    # none is left in the backlog.  A burst lasts about a second, and an engine thread that
    # a busy machine does not run for part of it cannot take its share: the other one
    # rightly takes the connections rather than leave them waiting (once, in CI, 1596 of
    # 2000).  So every burst must be served in full, and one of three must spread; engines
    # that do not spread a burst (the first to wake took 85-97% before) fail all three.
    count = 2000
    spreads = []
    with descriptor_limit(count + 1024):
        for _ in range(3):
            spreads.append(burst_over_two_engines(count))
            if max(spreads[-1]) <= count * 3 // 4:
                return
    pytest.fail(f"no burst spread over both engines; connections per engine: {spreads}")


@pytest.mark.parametrize("kind", sorted(SERVERS))
def test_every_address_family_is_served_on_the_engines(kind, sock_dir):
    count, lines = 200, 50
    make_server, hosts = SERVERS[kind]
    ring = fastsock.RingQueue()
    handler = fastsock.receiver(ring, framing="lines", engine_threads=2)
    with serving(make_server(handler, sock_dir)) as server:
        consumer = Consumer(ring)
        clients = [
            client_of(server, hosts[number % len(hosts)], sock_dir, number)
            for number in range(count)
        ]
        for number, client in enumerate(clients):
            client.sendall(b"".join(b"%d %d\n" % (number, n) for n in range(lines)))
        wait_until(lambda: len(consumer.taken) == count * lines, GENEROUS, what="every line")
        by_connection = {}
        for connection_id, _, payload in consumer.taken:
            by_connection.setdefault(connection_id, []).append(payload)
        assert len(by_connection) == count
        for connection_id, payloads in by_connection.items():
            number = int(payloads[0].split()[0])
            assert payloads == [b"%d %d" % (number, n) for n in range(lines)]
            expected = expected_peer(server, clients[number])
            assert server.connection_address(connection_id) == expected, kind
        for client in clients:
            client.close()
    consumer.stop()
    stats = server.stats()
    assert stats.connections_opened == stats.connections_closed == count
    assert stats.messages_received == count * lines


# -- Closing ----------------------------------------------------------------------------------


def test_server_close_may_be_called_again_as_with_the_stdlib():
    ring = fastsock.RingQueue()
    server = fastsock.ThreadingTCPServer((HOST, 0), fastsock.receiver(ring, framing="lines"))
    with serving(server), connect(server.server_address) as client:
        client.sendall(b"before the close\n")
        assert ring.get_many(timeout=GENEROUS) == [b"before the close"]
    # As a `with server:` block around the above would, or a second stop path of a program.
    server.server_close()
