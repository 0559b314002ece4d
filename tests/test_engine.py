"""The event engine, compiled and reference: one loop receiving many stream connections.

Every test runs on both implementations; the compiled one must load, so a missing
fastsock._engine is an error here, never a skip.  Clients are real sockets on loopback or
Unix sockets, every wait is bounded, and nothing is timed for speed: the few time bounds
tell a loop that reacts from one that waits for something else, far above what either
needs on a loaded machine.
"""

import contextlib
import gc
import os
import queue
import random
import signal
import socket
import struct
import threading
import time
from typing import NamedTuple

import pytest

from fastsock import ReceiveOptions, constants
from tests.fault_helpers import wait_until
from tests.support import (
    NETWORK_TIMEOUT,
    SlowConsumer,
    StreamingClient,
    check_stop_accounting,
    descriptor_limit,
    many_clients,
    many_clients_lines,
    slowest_trickle,
    start_thread,
)

GENEROUS = 20.0
HOST = "127.0.0.1"


class Implementation(NamedTuple):
    engine_class: type
    ring_class: type
    counters_class: type


@pytest.fixture(params=["compiled", "reference"])
def engine_impl(request):
    """(StreamEngine, RingQueue, ReceiveCounters) of the compiled core, then of the
    reference: the same test body runs on both."""
    if request.param == "compiled":
        from fastsock import _engine, _recvloop, _ring

        return Implementation(_engine.StreamEngine, _ring.RingQueue, _recvloop.ReceiveCounters)
    from fastsock._reference import engine, receiver, ring

    return Implementation(engine.StreamEngine, ring.RingQueue, receiver.ReceiveCounters)


# An engine of these tests has no timer and no drain unless the test gives one.
QUIET_OPTIONS = {"idle_timeout": None, "message_timeout": None, "drain_timeout": 0.0}


def make_engine(impl, *, ring=None, counters=None, listeners=(), **options):
    ring = ring if ring is not None else impl.ring_class()
    counters = counters if counters is not None else impl.counters_class()
    options = ReceiveOptions(**{**QUIET_OPTIONS, **options})
    engine = impl.engine_class(ring, counters, options, listeners=listeners)
    return engine, ring, counters


@pytest.fixture
def listener(sock_dir, request):
    """A listening socket: TCP on loopback unless the test is parametrized with a family."""
    family = getattr(request, "param", "tcp")
    if family == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(os.path.join(sock_dir, "engine.sock"))
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((HOST, 0))
    sock.listen(constants.COMPILED_BACKLOG)
    with sock:
        yield sock


def client_of(listener):
    client = socket.socket(listener.family, socket.SOCK_STREAM)
    client.settimeout(NETWORK_TIMEOUT)
    try:
        client.connect(listener.getsockname())
    except BaseException:
        client.close()
        raise
    return client


def adopted_pair(engine):
    """A connected socket pair whose server end the engine adopts: (id, client end)."""
    server_side, client_side = socket.socketpair()
    client_side.settimeout(NETWORK_TIMEOUT)
    return engine.add_connection(server_side.detach()), client_side


class Runner(threading.Thread):
    """Calls engine.run() until it returns something other than "events", taking the events
    as they come unless told not to."""

    def __init__(self, engine, take_events=True):
        super().__init__(name="engine", daemon=True)
        self.engine = engine
        self.take_events = take_events
        self.events = []
        self.end = None
        self.error = None

    def run(self):
        try:
            while (end := self.engine.run()) == "events":
                if self.take_events:
                    self.events.extend(self.engine.take_events())
            self.end = end
        except BaseException as exc:  # noqa: B036 - handed to the test
            self.error = exc

    def events_of(self, kind):
        return [event for event in self.events if event.kind == kind]

    def join_bounded(self):
        self.join(GENEROUS)
        assert not self.is_alive(), "run() did not return"
        assert self.error is None, self.error
        self.events.extend(self.engine.take_events())
        return self.end


@contextlib.contextmanager
def running(engine, take_events=True):
    """The engine running in a thread for the block; then stopped and closed."""
    runner = Runner(engine, take_events)
    runner.start()
    try:
        yield runner
    finally:
        engine.stop()
        runner.join(GENEROUS)
        if not runner.is_alive():
            # Events the engine recorded after the runner's last take_events().
            runner.events.extend(engine.take_events())
            engine.close()
    assert not runner.is_alive(), "run() did not return after stop()"
    assert runner.error is None, runner.error


def take(ring, count, timeout=GENEROUS):
    """Exactly `count` messages as (connection id, payload), or fewer at the deadline."""
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < count:
        try:
            records = ring.get_many(timeout=max(0.0, deadline - time.monotonic()), with_source=True)
        except queue.Empty:
            break
        got.extend((source_id, payload) for source_id, _, payload in records)
    return got


def closed_by_server(client):
    try:
        return client.recv(1) == b""
    except ConnectionResetError:
        return True


def encode(framing, payload):
    return struct.pack(">I", len(payload)) + payload if framing == "length" else payload + b"\n"


# -- Options --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"framing": "raw", "recv_size": 1001},
        {"framing": "lines", "max_line": 1000},
        {"framing": "length", "max_frame": 1001},
    ],
)
def test_a_message_larger_than_the_ring_takes_is_refused_up_front(engine_impl, options):
    ring = engine_impl.ring_class(max_bytes=1000)
    with pytest.raises(ValueError, match="max_bytes"):
        make_engine(engine_impl, ring=ring, **options)


def test_the_ring_counters_and_options_must_be_the_engines_own_kinds(engine_impl):
    """Refused, and the half-made engine closes nothing: the compiled one, refused before
    its __cinit__ ran, once closed descriptor 0 twice on its way out (the next eventfd made
    then took number 0, and uvloop's loop, given it, aborted the process on close)."""
    options = ReceiveOptions()
    standard = {fd: os.fstat(fd) for fd in (0, 1, 2)}
    with pytest.raises(TypeError):
        engine_impl.engine_class(queue.Queue(), engine_impl.counters_class(), options)
    with pytest.raises(TypeError):
        engine_impl.engine_class(engine_impl.ring_class(), object(), options)
    with pytest.raises(TypeError):
        engine_impl.engine_class(
            engine_impl.ring_class(), engine_impl.counters_class(), {"framing": "lines"}
        )
    gc.collect()
    for fd, before in standard.items():
        after = os.fstat(fd)
        assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino), f"fd {fd} closed"


# -- Delivery -------------------------------------------------------------------------------


@pytest.mark.parametrize("listener", ["tcp", "unix"], indirect=True)
def test_many_connections_each_arrive_whole_and_in_order(engine_impl, listener):
    clients_count, lines_count = 200, 100
    engine, ring, counters = make_engine(
        engine_impl, listeners=[listener.fileno()], framing="lines"
    )
    rng = random.Random(listener.family)
    streams = [
        b"".join(b"%03d %03d %s\n" % (c, n, b"x" * rng.randrange(60)) for n in range(lines_count))
        for c in range(clients_count)
    ]
    with running(engine):
        clients = [client_of(listener) for _ in range(clients_count)]
        addresses = [client.getsockname() for client in clients]
        positions = [0] * clients_count
        # Interleaved chunks that cut lines anywhere: each connection's framer keeps its own
        # partial line between turns.
        while any(p < len(s) for p, s in zip(positions, streams, strict=True)):
            for index, client in enumerate(clients):
                size = rng.choice([1, 7, 50, 700, 4000])
                client.sendall(streams[index][positions[index] : positions[index] + size])
                positions[index] += size
        for client in clients:
            client.close()
        got = take(ring, clients_count * lines_count)
        wait_until(lambda: engine.connections == 0, GENEROUS, what="every connection ended")
        by_connection = {}
        for connection_id, payload in got:
            by_connection.setdefault(connection_id, []).append(payload)
        assert len(by_connection) == clients_count
        for connection_id, payloads in by_connection.items():
            index = int(payloads[0][:3])
            assert b"".join(p + b"\n" for p in payloads) == streams[index]
            if listener.family == socket.AF_INET:
                assert engine.peer(connection_id) == addresses[index], "a closed one's peer"
            else:
                assert engine.peer(connection_id) == ""
    stats = counters.snapshot()
    assert stats.connections_opened == stats.connections_closed == clients_count
    assert stats.messages_received == clients_count * lines_count
    assert stats.bytes_received == sum(map(len, streams))
    assert stats.bytes_discarded == stats.messages_dropped == stats.bytes_unread == 0


def test_adopted_connections_are_received_and_the_engine_then_has_nothing(engine_impl):
    engine, ring, counters = make_engine(engine_impl, framing="lines")
    first_id = counters.next_connection_id()
    pairs = [adopted_pair(engine) for _ in range(5)]
    ids = [connection_id for connection_id, _ in pairs]
    assert ids == list(range(first_id + 1, first_id + 6)), "ids come from the counters"
    assert engine.connections == 5
    assert [engine.peer(connection_id) for connection_id in ids] == [""] * 5
    for number, (_, client) in enumerate(pairs):
        client.sendall(b"from %d\nand more\n" % number)
        client.close()
    runner = Runner(engine)
    runner.start()
    assert runner.join_bounded() == "empty"
    got = take(ring, 10)
    for number, connection_id in enumerate(ids):
        assert [p for i, p in got if i == connection_id] == [b"from %d" % number, b"and more"]
    assert engine.peer(ids[0]) == "", "a recently closed one"
    assert engine.peer(first_id) is None
    stats = counters.snapshot()
    assert stats.connections_opened == stats.connections_closed == 5
    assert engine.run() == "empty"
    engine.close()


def test_an_engine_with_nothing_to_receive_returns_empty_at_once(engine_impl):
    engine, _, _ = make_engine(engine_impl)
    assert engine.run() == "empty"
    engine.close()


def test_end_of_stream_and_reset_end_their_connection_and_are_counted(engine_impl, listener):
    engine, ring, counters = make_engine(
        engine_impl, listeners=[listener.fileno()], framing="lines"
    )
    with running(engine) as runner:
        ending = client_of(listener)
        ending.sendall(b"whole\npartial")
        assert take(ring, 1) == [(1, b"whole")]
        ending.close()
        wait_until(lambda: counters.snapshot().connections_closed == 1, GENEROUS, what="EOF")
        resetting = client_of(listener)
        resetting.sendall(b"x\n")
        assert take(ring, 1) == [(2, b"x")]
        # An abortive close: the peer gets a reset, not an end of stream.
        resetting.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        resetting.close()
        wait_until(lambda: counters.snapshot().connections_closed == 2, GENEROUS, what="reset")
    stats = counters.snapshot()
    assert (stats.bytes_discarded, stats.resets, stats.messages_received) == (7, 1, 2)
    assert runner.events == [], "a peer's end is no event"


# -- Fairness -------------------------------------------------------------------------------


def test_a_flooding_connection_does_not_starve_trickling_ones(engine_impl, listener):
    engine, ring, _ = make_engine(
        engine_impl, listeners=[listener.fileno()], framing="lines", max_line=8192
    )
    with running(engine):
        slowest = slowest_trickle(lambda: client_of(listener), ring, trickling=50)
    assert slowest < 2.0, f"a trickling line waited {slowest:.2f} s behind the flood"


# -- Timers ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_silent_connections_cost_no_wakeups_and_their_timers_fire(engine_impl, listener):
    idle_timeout, message_timeout, each = 4.0, 3.0, 50
    engine, ring, counters = make_engine(
        engine_impl,
        listeners=[listener.fileno()],
        framing="lines",
        idle_timeout=idle_timeout,
        message_timeout=message_timeout,
    )
    with running(engine) as runner:
        sent_at = time.monotonic()
        complete = [client_of(listener) for _ in range(each)]
        partial = [client_of(listener) for _ in range(each)]
        for client in complete:
            client.sendall(b"whole\n")
        for client in partial:
            client.sendall(b"part")
        assert len(take(ring, each)) == each
        wait_until(lambda: counters.snapshot().partial_bytes == 4 * each, what="partials held")
        wakeups_before = engine.wakeups
        time.sleep(1.0)
        wakeups = engine.wakeups - wakeups_before
        assert time.monotonic() - sent_at < message_timeout, "too slow to see a silent second"
        assert engine.connections == 2 * each, "no timer fired early"
        assert wakeups <= 5, f"{wakeups} wake-ups over a silent second"
        for client in complete + partial:
            assert closed_by_server(client)
        wait_until(lambda: engine.connections == 0, what="every timer fired")
        wait_until(lambda: len(runner.events_of("message_timeout")) == each, what="the events")
        late = runner.events_of("message_timeout")
        assert sorted(event.address for event in late) == sorted(
            client.getsockname() for client in partial
        )
        assert {event.detail for event in late} == {message_timeout}
        for client in complete + partial:
            client.close()
    stats = counters.snapshot()
    assert (stats.idle_timeouts, stats.message_timeouts) == (each, each)
    assert stats.bytes_discarded == 4 * each
    assert runner.events == late, "an idle timeout is no event"


# -- Backpressure ---------------------------------------------------------------------------


class Sender(threading.Thread):
    """Sends `lines` numbered lines, counting what the kernel took, then closes."""

    def __init__(self, client, number, lines):
        super().__init__(name=f"sender-{number}", daemon=True)
        self.client = client
        self.stream = b"".join(b"%d %05d %s\n" % (number, n, b"s" * 40) for n in range(lines))
        self.sent = 0

    def run(self):
        view = memoryview(self.stream)
        while self.sent < len(view):
            self.sent += self.client.send(view[self.sent : self.sent + 65536])
        self.client.close()


def test_a_full_ring_holds_every_sender_back_and_loses_nothing(engine_impl):
    lines, timeout, stall = 20_000, 0.5, 1.2
    ring = engine_impl.ring_class(max_messages=1024)
    # Both timeouts far shorter than the stall: no connection held back is silent, and no
    # message late, because the engine did not read it.
    engine, _, counters = make_engine(
        engine_impl, ring=ring, framing="lines", idle_timeout=timeout, message_timeout=timeout
    )
    quiet_id, quiet = adopted_pair(engine)
    partial_id, partial = adopted_pair(engine)
    pairs = [adopted_pair(engine) for _ in range(3)]
    senders = [Sender(client, number, lines) for number, (_, client) in enumerate(pairs)]
    runner = Runner(engine)
    runner.start()
    quiet.sendall(b"before\n")
    partial.sendall(b"par")
    assert take(ring, 1) == [(quiet_id, b"before")]
    wait_until(lambda: counters.snapshot().partial_bytes == 3, what="a partial message held")
    for sender in senders:
        sender.start()
    wait_until(lambda: counters.snapshot().pauses >= 1, GENEROUS, what="the ring full")
    time.sleep(0.3)
    received, sent = counters.snapshot().bytes_received, [s.sent for s in senders]
    time.sleep(stall)
    assert counters.snapshot().bytes_received == received, "nothing read while paused"
    assert [s.sent for s in senders] == sent, "every sender pushed back"
    assert all(s.sent < len(s.stream) for s in senders)
    got = take(ring, 3 * lines)
    # The last pause has just ended, more than both timeouts after the quiet connection's
    # last byte and the partial message's first: both clocks restarted there.
    quiet.sendall(b"after\n")
    partial.sendall(b"ti")
    wait_until(lambda: counters.snapshot().partial_bytes != 3, what="the message read on")
    partial.sendall(b"al\n")
    quiet.close()
    partial.close()
    got += take(ring, 2)
    assert runner.join_bounded() == "empty"
    assert [p for i, p in got if i == quiet_id] == [b"after"]
    assert [p for i, p in got if i == partial_id] == [b"partial"]
    for number, (connection_id, _) in enumerate(pairs):
        payloads = [payload + b"\n" for i, payload in got if i == connection_id]
        assert b"".join(payloads) == senders[number].stream, f"connection {number} whole"
    stats = counters.snapshot()
    assert (stats.idle_timeouts, stats.message_timeouts) == (0, 0)
    assert stats.messages_received == 3 * lines + 3
    assert stats.bytes_discarded == stats.messages_dropped == 0
    assert stats.pauses >= 1 and stats.paused_seconds >= stall
    engine.close()


# -- Protocol errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "framing, chunks, sample",
    [
        ("lines", [b"fine\n", b"A" * 20, b"B" * 200], b"A" * 20 + b"B" * 12),
        ("lines", [b"fine\nC" + b"\x00\xff" * 100], b"C" + b"\x00\xff" * 15 + b"\x00"),
        (
            "length",
            [struct.pack(">I", 2) + b"ok", b"GET / HTTP/1.1\r\n\r\n"],
            b"GET / HTTP/1.1\r\n\r\n",
        ),
        ("length", [struct.pack(">I", 2) + b"ok\xff\xff", b"\xff\xffrest"], b"\xff" * 4 + b"rest"),
    ],
)
def test_a_framing_error_closes_only_its_connection(engine_impl, listener, framing, chunks, sample):
    engine, ring, counters = make_engine(
        engine_impl, listeners=[listener.fileno()], framing=framing, max_line=50, max_frame=100
    )
    kind = "line_too_long" if framing == "lines" else "frame_too_large"
    with running(engine) as runner:
        good = [client_of(listener) for _ in range(2)]
        for client in good:
            client.sendall(encode(framing, b"before"))
        assert [payload for _, payload in take(ring, 2)] == [b"before"] * 2
        bad = client_of(listener)
        for chunk in chunks:
            bad.sendall(chunk)
            time.sleep(0.05)
        assert closed_by_server(bad)
        wait_until(lambda: runner.events, GENEROUS, what="the error's event")
        [event] = runner.events
        [(bad_id, first)] = take(ring, 1)
        assert first in (b"fine", b"ok")
        assert event == (kind, bad_id, bad.getsockname(), sample)
        for client in good:
            client.sendall(encode(framing, b"after"))
        assert [payload for _, payload in take(ring, 2)] == [b"after"] * 2
        assert engine.connections == 2
        for client in good + [bad]:
            client.close()
    stats = counters.snapshot()
    assert (stats.lines_too_long, stats.frames_too_large) == (
        (1, 0) if framing == "lines" else (0, 1)
    )


# -- Limits ---------------------------------------------------------------------------------


def test_a_full_engine_refuses_when_no_connection_was_silent_long_enough(engine_impl, listener):
    engine, ring, counters = make_engine(
        engine_impl,
        listeners=[listener.fileno()],
        framing="lines",
        max_connections=3,
        evict_idle_after=60.0,
    )
    with running(engine) as runner:
        clients = [client_of(listener) for _ in range(3)]
        for client in clients:
            client.sendall(b"in\n")
        assert len(take(ring, 3)) == 3
        refused = client_of(listener)
        assert closed_by_server(refused)
        wait_until(lambda: runner.events, GENEROUS, what="the refusal's event")
        assert runner.events == [("refused", None, refused.getsockname(), 3)]
        for client in clients:
            client.sendall(b"still in\n")
        assert len(take(ring, 3)) == 3
        assert engine.connections == 3
        for client in clients + [refused]:
            client.close()
    stats = counters.snapshot()
    assert (stats.connections_opened, stats.idle_evictions, stats.connections_refused) == (3, 0, 1)


def test_adopting_beyond_max_connections_is_refused_with_an_error(engine_impl):
    engine, _, counters = make_engine(engine_impl, max_connections=1, evict_idle_after=60.0)
    _, kept = adopted_pair(engine)
    server_side, client_side = socket.socketpair()
    client_side.settimeout(NETWORK_TIMEOUT)
    with pytest.raises(ConnectionRefusedError):
        engine.add_connection(server_side.detach())
    assert closed_by_server(client_side), "the refused descriptor is closed"
    assert engine.take_events() == [], "the caller was told by the exception"
    stats = counters.snapshot()
    assert (engine.connections, stats.connections_opened, stats.connections_refused) == (1, 1, 1)
    engine.close()
    kept.close()
    client_side.close()


def test_a_full_engine_evicts_the_connection_silent_longest(engine_impl, listener):
    evict_idle_after = 0.3
    engine, ring, counters = make_engine(
        engine_impl,
        listeners=[listener.fileno()],
        framing="lines",
        max_connections=3,
        evict_idle_after=evict_idle_after,
    )
    with running(engine) as runner:
        silent, *talking = [client_of(listener) for _ in range(3)]
        silent.sendall(b"silent\n")
        [(silent_id, _)] = take(ring, 1)
        time.sleep(2 * evict_idle_after)
        for client in talking:
            client.sendall(b"talking\n")
        assert len(take(ring, 2)) == 2
        newcomer = client_of(listener)
        newcomer.sendall(b"newcomer\n")
        assert [payload for _, payload in take(ring, 1)] == [b"newcomer"]
        assert closed_by_server(silent)
        wait_until(lambda: runner.events, GENEROUS, what="the eviction's event")
        [event] = runner.events
        assert event[:3] == ("evicted_idle", silent_id, silent.getsockname())
        assert event.detail >= evict_idle_after
        assert engine.connections == 3
        for client in talking + [silent, newcomer]:
            client.close()
    assert counters.snapshot().idle_evictions == 1


def test_the_largest_holder_of_partial_messages_is_evicted_over_the_budget(engine_impl):
    engine, ring, counters = make_engine(engine_impl, framing="lines", max_partial_bytes=1000)
    (large_id, large), (small_id, small) = adopted_pair(engine), adopted_pair(engine)
    with running(engine) as runner:
        large.sendall(b"a" * 600)
        wait_until(lambda: counters.snapshot().partial_bytes == 600, what="600 bytes held")
        small.sendall(b"b" * 300)
        wait_until(lambda: counters.snapshot().partial_bytes == 900, what="900 bytes held")
        assert runner.events == [], "within the budget"
        small.sendall(b"b" * 200)
        assert closed_by_server(large)
        wait_until(lambda: runner.events, GENEROUS, what="the eviction's event")
        assert runner.events == [("evicted_memory", large_id, "", 600)]
        assert counters.snapshot().partial_bytes == 500
        small.sendall(b"\n")
        assert take(ring, 1) == [(small_id, b"b" * 500)]
        large.close()
        small.close()
    stats = counters.snapshot()
    assert (stats.memory_evictions, stats.bytes_discarded) == (1, 600)


# -- Events ---------------------------------------------------------------------------------


@pytest.mark.parametrize("listener", ["unix"], indirect=True)
def test_events_beyond_the_kept_ones_are_only_counted(engine_impl, listener):
    beyond = 50
    engine, ring, _ = make_engine(
        engine_impl,
        listeners=[listener.fileno()],
        framing="lines",
        max_connections=1,
        evict_idle_after=60.0,
    )
    with running(engine, take_events=False):
        holder = client_of(listener)
        holder.sendall(b"holds the only slot\n")
        assert len(take(ring, 1)) == 1
        for _ in range(constants.ENGINE_EVENTS_KEPT + beyond):
            with client_of(listener) as refused:
                assert closed_by_server(refused)
        wait_until(lambda: engine.events_lost == beyond, GENEROUS, what="the lost events")
        events = engine.take_events()
        assert len(events) == constants.ENGINE_EVENTS_KEPT
        assert {event.kind for event in events} == {"refused"}
        assert engine.take_events() == []
        holder.close()


def test_a_closed_ring_stops_the_engine_counting_what_it_could_not_publish(engine_impl):
    engine, ring, counters = make_engine(engine_impl, framing="lines")
    _, client = adopted_pair(engine)
    client.sendall(b"one\ntwo\n")
    ring.close()
    assert engine.run() == "stopped"
    assert engine.run() == "stopped"
    assert closed_by_server(client)
    stats = counters.snapshot()
    assert (stats.messages_dropped, stats.bytes_discarded, stats.connections_closed) == (2, 6, 1)
    engine.close()
    client.close()


def test_close_counts_what_each_connection_leaves_and_ends_the_engine(engine_impl):
    engine, _, counters = make_engine(engine_impl, framing="lines")
    _, client = adopted_pair(engine)
    client.sendall(b"never read\n")
    engine.close()
    engine.close()
    stats = counters.snapshot()
    assert (stats.bytes_unread, stats.connections_closed) == (11, 1)
    assert closed_by_server(client)
    with pytest.raises(ValueError):
        engine.run()
    server_side, client_side = socket.socketpair()
    with pytest.raises(ConnectionRefusedError):
        engine.add_connection(server_side.detach())
    client_side.settimeout(NETWORK_TIMEOUT)
    assert closed_by_server(client_side)
    client.close()
    client_side.close()


# -- Stopping -------------------------------------------------------------------------------


@pytest.mark.parametrize("consumer", ["slow", "stalls-at-stop"])
def test_a_graceful_stop_delivers_or_counts_every_acknowledged_byte(
    engine_impl, listener, consumer
):
    drain_timeout = 1.5 if consumer == "slow" else 0.3
    ring = engine_impl.ring_class(max_messages=2048)
    engine, _, counters = make_engine(
        engine_impl,
        ring=ring,
        listeners=[listener.fileno()],
        framing="lines",
        drain_timeout=drain_timeout,
    )
    runner = Runner(engine)
    runner.start()
    client = StreamingClient(listener.getsockname(), socket.AF_INET)
    reader = SlowConsumer(ring, stall_for=drain_timeout + 0.3 if consumer != "slow" else 0)
    reader.start()
    client.start()
    wait_until(
        lambda: counters.snapshot().pauses and client.sent >= 4 * 1024 * 1024,
        GENEROUS,
        what="the consumer holding the stream back",
    )
    before_stop = counters.snapshot()
    reader.stop_started.set()
    engine.stop()
    assert runner.join_bounded() == "stopped"
    reader.stop_finished.set()
    client.join(GENEROUS)
    reader.join(GENEROUS)
    assert not client.is_alive() and not reader.is_alive()
    assert client.ended_by is not None, "the stop refused the client's further bytes"
    assert engine.run() == "stopped", "and at once on later calls"
    engine.close()

    check_stop_accounting(client, reader.messages, before_stop, counters.snapshot(), consumer)


def test_stop_from_another_thread_wakes_a_sleeping_run(engine_impl, listener):
    # A drain far longer than the test: only the stop's shutdown of each connection, which
    # ends the read side at once, lets run() return.
    engine, ring, counters = make_engine(
        engine_impl, listeners=[listener.fileno()], drain_timeout=10 * GENEROUS
    )
    runner = Runner(engine)
    runner.start()
    client = client_of(listener)
    client.sendall(b"x")
    assert take(ring, 1) == [(1, b"x")]
    with pytest.raises(RuntimeError):
        engine.run()
    with pytest.raises(RuntimeError):
        engine.close()
    time.sleep(0.2)
    stopped_at = time.monotonic()
    # Without a deadline, the loop would sleep until stop() wakes it: no timer could end it.
    start_thread(engine.stop)
    assert runner.join_bounded() == "stopped"
    assert time.monotonic() - stopped_at < 2.0, "stop() woke the loop"
    assert closed_by_server(client)
    assert engine.run() == "stopped"
    engine.close()
    assert counters.snapshot().connections_closed == 1
    assert not os.get_blocking(listener.fileno()), "the engine made the listener non-blocking"
    with client_of(listener):
        pass  # the engine did not close the listener
    client.close()


def test_a_signal_interrupts_a_sleeping_run_which_can_then_resume(engine_impl):
    assert threading.current_thread() is threading.main_thread()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    engine, ring, counters = make_engine(engine_impl, framing="lines")
    _, client = adopted_pair(engine)
    interrupted = threading.Event()

    def interrupt():
        time.sleep(0.2)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
        if not interrupted.wait(GENEROUS):
            engine.stop()

    start_thread(interrupt)
    with pytest.raises(KeyboardInterrupt):
        engine.run()
    interrupted.set()
    client.sendall(b"after\n")

    def stop_once_delivered():
        with contextlib.suppress(AssertionError):
            wait_until(lambda: counters.snapshot().messages_received, what="the line")
        engine.stop()

    start_thread(stop_once_delivered)
    while (end := engine.run()) == "events":
        pass
    assert end == "stopped"
    assert ring.get_many(timeout=GENEROUS) == [b"after"]
    engine.close()
    client.close()


# -- Scale ----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.watchdog(180)
def test_ten_thousand_connections(engine_impl, listener, reap_children):
    count = 10_000
    with descriptor_limit(count + 1024):
        engine, ring, counters = make_engine(
            engine_impl, listeners=[listener.fileno()], framing="lines", max_connections=count
        )
        with running(engine) as runner, many_clients(listener.getsockname(), count):
            got = take(ring, count, timeout=60.0)
            assert sorted(payload for _, payload in got) == many_clients_lines(count)
            ids = {connection_id for connection_id, _ in got}
            assert len(ids) == count
            wait_until(lambda: engine.connections == count, GENEROUS, what="all open")
            assert all(engine.peer(connection_id) is not None for connection_id in ids)
            engine.stop()
            assert runner.join_bounded() == "stopped"
            # The peers, grown to 10,000 entries, forget all but the last closed ones.
            known = [engine.peer(connection_id) is not None for connection_id in ids]
            assert sum(known) == constants.RECENT_PEERS
        assert runner.events == []
        stats = counters.snapshot()
        assert stats.connections_opened == stats.connections_closed == count
