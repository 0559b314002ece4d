"""The ring's asyncio consumer (``get_many_async``, ``get_batch_async``, ``batches()``) on
asyncio's and uvloop's event loops, compiled and reference: woken by producer threads, by a
forked producer, by the receive loops of a real server, and by ``close()``; a cancelled or
timed-out wait loses no message and leaves no waiter counted or reader registered."""

import asyncio
import contextlib
import os
import queue
import socket
import subprocess
import sys
import threading
import time

import pytest

import fastsock
from fastsock import _asyncring
from fastsock import _ring as compiled
from fastsock._reference import ring as reference
from fastsock.errors import QueueClosed
from tests.support import NETWORK_TIMEOUT, start_thread
from tests.test_cli import fastsock_command
from tests.test_ring import exit_code, fork, forks_with_threads

IMPLEMENTATIONS = {"compiled": compiled.RingQueue, "reference": reference.RingQueue}


def _uvloop():
    return pytest.importorskip("uvloop").new_event_loop()


LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": _uvloop}


@pytest.fixture(autouse=True)
def woken_only_by_the_eventfd(monkeypatch):
    """No periodic recheck: a wake-up that producers fail to signal hangs the test."""
    monkeypatch.setattr(_asyncring, "RING_ASYNC_RECHECK", 3600.0)


@pytest.fixture(params=list(IMPLEMENTATIONS))
def ring_class(request):
    return IMPLEMENTATIONS[request.param]


@pytest.fixture(params=list(LOOPS))
def run(request, capsys):
    """Runs a coroutine to completion on a fresh loop of the kind, bounded in time."""

    def run(coroutine):
        loop = LOOPS[request.param]()
        try:
            if request.param == "asyncio":
                return loop.run_until_complete(asyncio.wait_for(coroutine, NETWORK_TIMEOUT))
            # libuv reports a failed assertion or epoll_ctl() on the process's stderr and
            # aborts: with pytest's capture of that descriptor the message would die with it.
            with capsys.disabled():
                return loop.run_until_complete(asyncio.wait_for(coroutine, NETWORK_TIMEOUT))
        finally:
            loop.close()

    return run


def no_waiter_left(ring):
    """No async waiter counted in the ring, no reader left on any loop."""
    return ring._async_waiters == 0 and not _asyncring._readiness


def test_a_thread_s_puts_wake_an_awaiting_consumer_and_arrive_in_order(ring_class, run):
    ring = ring_class(max_messages=64)
    count = 5000

    def produce():
        for n in range(count):
            ring.put(b"%d" % n, timeout=NETWORK_TIMEOUT)

    async def consume():
        producer = start_thread(produce)
        got = []
        while len(got) < count:
            got += await ring.get_many_async(100)
        producer.join(NETWORK_TIMEOUT)
        return got

    assert run(consume()) == [b"%d" % n for n in range(count)]
    assert no_waiter_left(ring)


def test_get_batch_async_and_sources(ring_class, run):
    ring = ring_class()

    async def consume():
        start_thread(lambda: [ring.put(b"abc", source_id=7), ring.put(b"de", source_id=8)])
        batch = await ring.get_batch_async(max_bytes=3)
        rest = await ring.get_many_async(with_source=True)
        return batch, rest

    batch, rest = run(consume())
    assert list(batch) == [b"abc"] and list(batch.source_ids) == [7]
    assert rest == [(8, None, b"de")]


def test_close_ends_the_iteration_of_batches_after_what_is_left(ring_class, run):
    ring = ring_class()
    ring.put(b"left")

    async def consume():
        seen = []
        async for messages in ring.batches():
            seen += messages
            if messages == [b"left"]:
                # Closed while the iteration waits: it takes what was put, then ends.
                asyncio.get_running_loop().call_later(0.05, ring.put, b"last")
                asyncio.get_running_loop().call_later(0.1, ring.close)
        return seen

    assert run(consume()) == [b"left", b"last"]
    assert no_waiter_left(ring)
    with pytest.raises(QueueClosed):
        run(ring.get_many_async())


def test_timeout_raises_empty_and_leaves_no_waiter(ring_class, run):
    ring = ring_class()
    with pytest.raises(queue.Empty):
        run(ring.get_many_async(timeout=0.05))
    with pytest.raises(queue.Empty):
        run(ring.get_batch_async(timeout=0))
    assert no_waiter_left(ring)


def test_cancelled_waits_lose_no_message_and_leave_no_waiter(ring_class, run):
    """Waits cancelled asleep, cancelled with their wake-up on its way (the eventfd
    written, its readiness not yet dispatched), or cancelled too late: every message is
    taken exactly once, in order, and no waiter stays counted."""
    ring = ring_class()
    rounds = 300

    async def consume():
        got, cancelled = [], 0
        for n in range(rounds):
            waiting = asyncio.ensure_future(ring.get_many_async())
            await asyncio.sleep(0)
            if n % 3:
                ring.put(b"%d" % n)
            if n % 3 == 2:
                await asyncio.sleep(0.001)
            if waiting.cancel():
                cancelled += 1
            try:
                got += await waiting
            except asyncio.CancelledError:
                assert ring._async_waiters == 0
            # What a cancelled wait left behind, so that the next wait finds the ring empty.
            if not ring.empty():
                got += await ring.get_many_async()
        return got, cancelled

    got, cancelled = run(consume())
    assert got == [b"%d" % n for n in range(rounds) if n % 3]
    assert cancelled >= 2 * rounds // 3
    assert no_waiter_left(ring)


def test_several_waiters_on_one_loop_share_the_eventfd(ring_class, run):
    ring = ring_class()

    async def consume():
        waiters = [asyncio.ensure_future(ring.get_many_async(1)) for _ in range(4)]
        await asyncio.sleep(0.05)
        assert ring._async_waiters == 4
        for n in range(4):
            ring.put(b"%d" % n)
        return sorted(sum(await asyncio.gather(*waiters), []))

    assert run(consume()) == [b"0", b"1", b"2", b"3"]
    assert no_waiter_left(ring)


@pytest.mark.parametrize("kind", list(LOOPS))
def test_loops_in_several_threads_each_wake_on_one_ring(ring_class, kind, capsys):
    """A wake-up read off the ring's eventfd by one loop's reader must still reach the
    waiters of every other loop waiting on the ring.  Each round both consumers wait, two
    messages arrive, and each consumer takes exactly one; a consumer left asleep would
    keep the other at the barrier until it breaks."""
    ring = ring_class()
    rounds = 200
    barrier = threading.Barrier(3, timeout=NETWORK_TIMEOUT)
    taken = [[], []]
    errors = []

    async def consume(mine):
        for _ in range(rounds):
            mine += await ring.get_many_async(1, timeout=NETWORK_TIMEOUT)
            barrier.wait()

    def consumer(mine):
        loop = LOOPS[kind]()
        try:
            loop.run_until_complete(consume(mine))
        except BaseException as exc:  # noqa: B036 - handed to the test
            errors.append(exc)
            barrier.abort()
        finally:
            loop.close()

    # As in run(): a libuv abort's message must reach the real stderr.
    with capsys.disabled() if kind == "uvloop" else contextlib.nullcontext():
        threads = [start_thread(consumer, mine) for mine in taken]
        for n in range(rounds):
            deadline = time.monotonic() + NETWORK_TIMEOUT
            while ring._async_waiters < 2 and not errors:
                assert time.monotonic() < deadline, "the consumers never waited"
                time.sleep(0.0005)
            ring.put(b"%d" % (2 * n))
            ring.put(b"%d" % (2 * n + 1))
            barrier.wait()
        for thread in threads:
            thread.join(NETWORK_TIMEOUT)
    assert errors == []
    assert all(len(mine) == rounds for mine in taken)
    assert sorted(taken[0] + taken[1], key=int) == [b"%d" % n for n in range(2 * rounds)]
    assert no_waiter_left(ring)


@forks_with_threads
def test_a_forked_producer_wakes_an_asyncio_consumer(run, reap_children):
    ring = compiled.RingQueue(max_messages=128)
    count = 20_000

    def produce():
        for n in range(count):
            ring.put(b"%d" % n, timeout=NETWORK_TIMEOUT)

    async def consume():
        # Waiting already when the child starts: only the eventfd can wake this loop.
        first = asyncio.ensure_future(ring.get_many_async())
        await asyncio.sleep(0.05)
        assert ring._async_waiters == 1
        pid = fork(produce)
        got = await first
        while len(got) < count:
            got += await ring.get_many_async()
        return pid, got

    pid, got = run(consume())
    assert exit_code(pid) == 0
    assert got == [b"%d" % n for n in range(count)]
    assert no_waiter_left(ring)


def test_a_server_s_receive_loops_wake_an_asyncio_consumer(run):
    """The compiled engine wakes sleeping consumers only every ENGINE_ANNOUNCE_AFTER
    messages and at the end of each turn: an async consumer is woken at those moments."""
    ring = fastsock.RingQueue()
    server = fastsock.ThreadingTCPServer(("127.0.0.1", 0), fastsock.receiver(ring, framing="lines"))
    loop_thread = start_thread(server.serve_forever, poll_interval=0.05)
    lines = 10_000
    try:
        with socket.create_connection(server.server_address, NETWORK_TIMEOUT) as sock:

            async def consume():
                got = []
                # A few lines, then a pause, then the rest: wakes at the end of a turn.
                sock.sendall(b"first\n")
                got += await ring.get_many_async()
                sock.sendall(b"".join(b"%d\n" % n for n in range(lines)))
                while len(got) < lines + 1:
                    got += await ring.get_many_async()
                return got

            got = run(consume())
    finally:
        server.shutdown()
        loop_thread.join(NETWORK_TIMEOUT)
        server.server_close()
    assert got == [b"first"] + [b"%d" % n for n in range(lines)]
    assert no_waiter_left(ring)


def test_the_eventfd_is_made_once_per_ring_and_closed_with_it(ring_class):
    ring = ring_class()
    fd = ring._wake_fd
    assert os.get_inheritable(fd) is False
    del ring
    with pytest.raises(OSError):
        os.fstat(fd)


def test_only_the_async_methods_import_asyncio(tmp_path):
    # asyncio adds tens of milliseconds to an import: `import fastsock` must not pay for it.
    code = (
        "import sys, fastsock\n"
        "print('asyncio' in sys.modules)\n"
        "fastsock.RingQueue().get_many_async().close()\n"
        "print('asyncio' in sys.modules)\n"
    )
    _, environment = fastsock_command()
    finished = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=NETWORK_TIMEOUT,
    )
    assert finished.stdout.split() == ["False", "True"], finished.stderr
