"""The ring queue: the compiled fastsock._ring.RingQueue and its pure-Python reference run the
same tests, and hypothesis checks that they agree on random sequences of non-blocking
operations.  Sharing through fork(), surviving a SIGKILLed producer and the C-level
producer API exist only in the compiled ring and are tested on it alone."""

import collections
import contextlib
import functools
import importlib.util
import io
import os
import queue
import random
import resource
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from fastsock import _ring as compiled
from fastsock._reference import ring as reference
from fastsock.constants import RING_MAX_BYTES, RING_MAX_MESSAGES
from fastsock.errors import QueueClosed
from fastsock.stats import RingStats
from tests.compare import ring_observable

IMPLEMENTATIONS = {"compiled": compiled.RingQueue, "reference": reference.RingQueue}
MAX_SOURCE_LEN = compiled.MAX_SOURCE_LEN
MiB = 1024 * 1024

# Forking while the watchdog's thread runs is harmless here (the children only use the ring),
# but Python 3.12+ warns about it on every fork.
forks_with_threads = pytest.mark.filterwarnings(
    "ignore:This process .* is multi-threaded:DeprecationWarning"
)

PROMPTLY = 5.0
"""Seconds within which a woken or interrupted wait must return: far above any scheduling
delay, far below the 'forever' it would take if the wake-up were lost."""


@pytest.fixture(params=list(IMPLEMENTATIONS))
def ring_class(request):
    return IMPLEMENTATIONS[request.param]


def in_thread(function, *args, **kwargs):
    """Run `function` in a daemon thread; the returned dict gets its "result" or "error"."""
    outcome = {}

    def run():
        try:
            outcome["result"] = function(*args, **kwargs)
        except BaseException as exc:  # noqa: B036 - handed back to the test as is
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    outcome["thread"] = thread
    return outcome


def finished(outcome, timeout=PROMPTLY):
    outcome["thread"].join(timeout)
    return not outcome["thread"].is_alive()


def put_all(ring, items, source_id=0):
    """Put every item, in order, blocking (boundedly) whenever the ring is full."""
    sent = 0
    while sent < len(items):
        sent += ring.put_many(items[sent : sent + 256], source_id=source_id)
        if sent < len(items):
            ring.put(items[sent], timeout=30, source_id=source_id)
            sent += 1


def fork(work):
    """Run `work()` in a forked child that exits 0 if it returns, 1 if it raises."""
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            work()
            status = 0
        finally:
            os._exit(status)
    return pid


def exit_code(pid):
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def check_exactly_once_in_order(streams, producers, per_producer):
    """Each stream is what one consumer got; every (producer, seq) must appear once, and in
    each stream every producer's messages must come in the order they were put."""
    seen = set()
    for stream in streams:
        last = {}
        for message in stream:
            producer, seq = struct.unpack("<II", message)
            assert seq > last.get(producer, -1), "a producer's messages arrived out of order"
            last[producer] = seq
            assert (producer, seq) not in seen, "a message was delivered twice"
            seen.add((producer, seq))
    assert len(seen) == producers * per_producer, "messages were lost"


@contextlib.contextmanager
def keyboard_interrupt_after(seconds):
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# -- Construction ------------------------------------------------------------------------


def test_defaults_come_from_constants(ring_class):
    ring = ring_class()
    assert (ring.max_messages, ring.max_bytes) == (RING_MAX_MESSAGES, RING_MAX_BYTES)
    assert ring.qsize() == 0 and ring.empty() and not ring.full() and not ring.closed


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"max_messages": 0}, ValueError),
        ({"max_messages": -1}, ValueError),
        ({"max_messages": 2**32}, ValueError),
        ({"max_messages": 1.5}, TypeError),
        ({"max_bytes": 0}, ValueError),
        ({"max_bytes": 2**32}, ValueError),
        ({"max_bytes": "1"}, TypeError),
        ({"resume_fraction": 1.0}, ValueError),
        ({"resume_fraction": -0.1}, ValueError),
        ({"resume_fraction": float("nan")}, ValueError),
        ({"resume_fraction": "0.5"}, TypeError),
    ],
)
def test_invalid_arguments_are_rejected(ring_class, kwargs, error):
    with pytest.raises(error):
        ring_class(**kwargs)


def test_invalid_call_arguments_are_rejected(ring_class):
    ring = ring_class(4, 64)
    ring.put(b"x")
    with pytest.raises(ValueError):
        ring.get(timeout=-1)
    with pytest.raises(ValueError):
        ring.put(b"x", timeout=-1)
    with pytest.raises(ValueError):
        ring.get_many(0)
    with pytest.raises(ValueError):
        ring.get_batch(0)
    with pytest.raises(ValueError):
        ring.get_batch(max_bytes=0)
    with pytest.raises(TypeError):
        ring.put("text")
    with pytest.raises(OverflowError):
        ring.put(b"x", source_id=2**32)
    with pytest.raises(OverflowError):
        ring.put(b"x", source_id=-1)
    assert ring.qsize() == 1


# -- Producer and consumer basics --------------------------------------------------------


def test_fifo_of_any_bytes_like(ring_class):
    ring = ring_class(8, 1024)
    items = [b"first", bytearray(b"second"), memoryview(b"third"), b"", b"\x00" * 100]
    for item in items:
        ring.put(item)
    assert ring.qsize() == len(items) and not ring.empty()
    received = [ring.get() for _ in items]
    assert received == [bytes(item) for item in items]
    assert all(type(message) is bytes for message in received)
    assert ring.empty()


def test_bounded_by_message_count(ring_class):
    ring = ring_class(3, 1000)
    for index in range(3):
        ring.put_nowait(bytes([index]))
    assert ring.full()
    with pytest.raises(queue.Full):
        ring.put_nowait(b"x")
    with pytest.raises(queue.Full):
        ring.put(b"x", block=False)
    assert ring.get_nowait() == b"\x00"
    ring.put_nowait(b"x")
    assert ring.qsize() == 3


def test_bounded_by_payload_bytes(ring_class):
    ring = ring_class(100, 10)
    ring.put_nowait(b"123456")
    ring.put_nowait(b"7890")
    assert ring.full()
    with pytest.raises(queue.Full):
        ring.put_nowait(b"x")
    ring.put_nowait(b"")
    assert ring.get_nowait() == b"123456"
    ring.put_nowait(b"abcdef")
    assert ring.stats.bytes_queued == 10


def test_message_larger_than_max_bytes_is_rejected(ring_class):
    ring = ring_class(4, 10)
    ring.put(b"x" * 10)
    ring.get()
    for put in (ring.put, ring.put_nowait, ring.offer):
        with pytest.raises(ValueError):
            put(b"x" * 11)
    with pytest.raises(ValueError):
        ring.put_many([b"ok", b"x" * 11])
    assert ring.qsize() == 0, "put_many checks every item before it publishes any"


def test_source_is_limited_and_returned(ring_class):
    ring = ring_class(8, 1024)
    address = bytes(range(MAX_SOURCE_LEN))
    ring.put(b"a", source_id=7, source=address)
    ring.put(b"b", source_id=2**32 - 1, source=b"")
    ring.offer(b"c", source=bytearray(b"peer"))
    ring.put(b"d")
    with pytest.raises(ValueError):
        ring.put(b"x", source=address + b"!")
    assert ring.get_many(with_source=True) == [
        (7, address, b"a"),
        (2**32 - 1, None, b"b"),
        (0, b"peer", b"c"),
        (0, None, b"d"),
    ]


def test_get_many_returns_what_is_there_up_to_max_items(ring_class):
    ring = ring_class(100, 10_000)
    ring.put_many([b"m%d" % index for index in range(10)])
    assert ring.get_many(4) == [b"m0", b"m1", b"m2", b"m3"]
    assert ring.get_many() == [b"m%d" % index for index in range(4, 10)]
    with pytest.raises(queue.Empty):
        ring.get_many(block=False)


def test_put_many_publishes_what_fits_in_order(ring_class):
    ring = ring_class(3, 100)
    assert ring.put_many(iter([b"a", b"b", b"c", b"d", b"e"]), source_id=9) == 3
    assert ring.stats.full_events == 1
    assert ring.put_many([]) == 0
    assert ring.get_many(with_source=True) == [(9, None, b"a"), (9, None, b"b"), (9, None, b"c")]
    assert ring.put_many([b"x" * 60, b"y" * 60]) == 1


def test_offer_drops_and_counts_when_full(ring_class):
    ring = ring_class(2, 100)
    assert ring.offer(b"one") and ring.offer(b"two", source_id=3)
    assert not ring.offer(b"three")
    assert not ring.offer(b"four!")
    stats = ring.stats
    assert (stats.dropped_messages, stats.dropped_bytes, stats.full_events) == (2, 10, 2)
    assert ring.get_many() == [b"one", b"two"]


def test_large_messages_take_the_gil_free_copy(ring_class):
    ring = ring_class(8, 4 * MiB)
    big = bytes(range(256)) * 4096
    ring.put(big, source=b"src")
    assert ring.put_many([big[: 300 * 1024], big[: 400 * 1024]]) == 2
    assert ring.get_many(1, with_source=True) == [(0, b"src", big)]
    batch = ring.get_batch()
    assert list(batch) == [big[: 300 * 1024], big[: 400 * 1024]]
    ring.put(big)
    ring.put(big)
    assert ring.get_many() == [big, big]


def test_records_wrapping_around_the_ring_stay_intact(ring_class):
    # Sizes and sources vary so that records, and their headers, straddle the end of the
    # compiled ring's record area at every possible offset.
    rng = random.Random(7)
    ring = ring_class(3, 50)
    model = collections.deque()
    for step in range(3000):
        queued_bytes = sum(len(payload) for _, _, payload in model)
        if len(model) < 3 and rng.random() < 0.55:
            payload = rng.randbytes(rng.randint(0, 50 - queued_bytes))
            source_len = rng.choice([0, MAX_SOURCE_LEN, rng.randint(1, MAX_SOURCE_LEN)])
            source = rng.randbytes(source_len) or None
            ring.put_nowait(payload, source_id=step, source=source)
            model.append((step, source, payload))
        elif model:
            taken = ring.get_many(rng.randint(1, 3), block=False, with_source=True)
            assert taken == [model.popleft() for _ in taken]
    assert ring.qsize() == len(model)


def test_stats_add_up(ring_class):
    ring = ring_class(4, 100)
    ring.put_many([b"aa", b"bbb", b"c"])
    ring.offer(b"dddd")
    ring.offer(b"dropped")
    ring.get()
    ring.get_batch(2)
    stats = ring.stats
    assert isinstance(stats, RingStats)
    assert stats.put_messages == stats.got_messages + stats.messages_queued == 4
    assert stats.put_bytes == stats.got_bytes + stats.bytes_queued == 10
    assert (stats.got_messages, stats.got_bytes) == (3, 6)
    assert (stats.dropped_messages, stats.dropped_bytes) == (1, 7)
    assert (stats.producer_deaths, stats.paused_seconds) == (0, 0.0)


# -- Batches -----------------------------------------------------------------------------


def test_batch_holds_payloads_back_to_back(ring_class):
    ring = ring_class(10, 1000)
    for index, payload in enumerate([b"alpha", b"", b"be", b"gamma!"]):
        ring.put(payload, source_id=index + 10, source=b"ignored")
    batch = ring.get_batch()
    assert len(batch) == 4 and batch.nbytes == 13
    view = memoryview(batch)
    assert view.readonly and view.format == "B" and view.tobytes() == b"alphabegamma!"
    assert batch.offsets.format == "q" and batch.offsets.tolist() == [0, 5, 5, 7, 13]
    assert batch.source_ids.format == "I" and batch.source_ids.tolist() == [10, 11, 12, 13]
    assert batch[0] == b"alpha" and batch[-1] == b"gamma!" and batch[1] == b""
    assert list(batch) == [b"alpha", b"", b"be", b"gamma!"]
    with pytest.raises(IndexError):
        batch[4]
    with pytest.raises(IndexError):
        batch[-5]
    with pytest.raises(TypeError):
        view[0] = 1
    with pytest.raises(TypeError):
        io.BytesIO(b"overwrite").readinto(batch)
    with pytest.raises(TypeError):
        io.BytesIO(b"overwrite").readinto(batch.offsets)


def test_batch_views_outlive_the_batch(ring_class):
    ring = ring_class(10, 1000)
    ring.put_many([b"one", b"two"])
    batch = ring.get_batch()
    view, offsets = memoryview(batch), batch.offsets
    del batch
    assert view.tobytes() == b"onetwo" and offsets.tolist() == [0, 3, 6]


def test_batch_limits(ring_class):
    ring = ring_class(10, 1000)
    ring.put_many([b"x" * 40, b"y" * 40, b"z" * 40, b"w" * 5])
    assert list(ring.get_batch(max_bytes=90)) == [b"x" * 40, b"y" * 40]
    assert list(ring.get_batch(max_bytes=10)) == [b"z" * 40], "at least one message"
    ring.put_many([b"1", b"2", b"3"])
    assert list(ring.get_batch(2)) == [b"w" * 5, b"1"]
    assert list(ring.get_batch(block=False)) == [b"2", b"3"]
    with pytest.raises(queue.Empty):
        ring.get_batch(block=False)


# -- Timeouts and wake-ups ---------------------------------------------------------------


@pytest.mark.parametrize(
    "get",
    [
        lambda ring: ring.get_nowait(),
        lambda ring: ring.get(block=False),
        lambda ring: ring.get(timeout=0),
        lambda ring: ring.get_many(block=False, timeout=10),
        lambda ring: ring.get_batch(block=False),
    ],
)
def test_non_blocking_get_on_empty_ring_raises_empty(ring_class, get):
    with pytest.raises(queue.Empty):
        get(ring_class(4, 64))


@pytest.mark.parametrize("method", ["get", "get_many", "get_batch"])
def test_get_timeout_raises_empty_after_the_timeout(ring_class, method):
    ring = ring_class(4, 64)
    start = time.monotonic()
    with pytest.raises(queue.Empty):
        getattr(ring, method)(timeout=0.2)
    assert 0.9 * 0.2 <= time.monotonic() - start < PROMPTLY


def test_put_timeout_raises_full_after_the_timeout(ring_class):
    ring = ring_class(1, 64)
    ring.put(b"x")
    start = time.monotonic()
    with pytest.raises(queue.Full):
        ring.put(b"y", timeout=0.2)
    assert 0.9 * 0.2 <= time.monotonic() - start < PROMPTLY
    assert ring.stats.full_events == 1, "a put that waits counts one full event"


@pytest.mark.parametrize("method", ["get", "get_many", "get_batch"])
def test_blocked_get_is_woken_by_put(ring_class, method):
    ring = ring_class(4, 64)
    getter = in_thread(getattr(ring, method), timeout=30)
    time.sleep(0.05)
    ring.put(b"wake")
    assert finished(getter), "the blocked get was not woken"
    result = getter["result"]
    assert ([result] if method == "get" else list(result)) == [b"wake"]


def test_blocked_put_is_woken_by_get(ring_class):
    ring = ring_class(1, 64)
    ring.put(b"first")
    putter = in_thread(ring.put, b"second", timeout=30)
    time.sleep(0.05)
    assert ring.get() == b"first"
    assert finished(putter) and "error" not in putter
    assert ring.get(timeout=PROMPTLY) == b"second"


def test_blocked_put_waits_for_room_in_bytes(ring_class):
    ring = ring_class(10, 10)
    ring.put(b"12345678")
    putter = in_thread(ring.put, b"abcdef", timeout=30)
    time.sleep(0.05)
    ring.put(b"12")
    assert ring.get() == b"12345678"
    assert finished(putter) and "error" not in putter
    assert ring.get_many() == [b"12", b"abcdef"]


def test_close_wakes_every_blocked_getter(ring_class):
    ring = ring_class(4, 64)
    getters = [in_thread(ring.get) for _ in range(3)] + [in_thread(ring.get_many)]
    time.sleep(0.05)
    ring.close()
    for getter in getters:
        assert finished(getter), "close() did not wake a blocked get"
        assert isinstance(getter["error"], QueueClosed)


def test_close_wakes_blocked_putters(ring_class):
    ring = ring_class(1, 64)
    ring.put(b"full")
    putters = [in_thread(ring.put, b"x") for _ in range(2)]
    time.sleep(0.05)
    ring.close()
    for putter in putters:
        assert finished(putter), "close() did not wake a blocked put"
        assert isinstance(putter["error"], QueueClosed)


def test_closed_ring_refuses_puts_and_drains_before_raising(ring_class):
    ring = ring_class(4, 64)
    ring.put_many([b"a", b"b", b"c"])
    ring.close()
    ring.close()
    assert ring.closed
    for put in (ring.put, ring.put_nowait, ring.offer, lambda data: ring.put_many([data])):
        with pytest.raises(QueueClosed):
            put(b"late")
    assert ring.get() == b"a"
    assert ring.get_many() == [b"b", b"c"]
    for get in (ring.get, ring.get_nowait, ring.get_many, ring.get_batch):
        with pytest.raises(QueueClosed):
            get()
    assert issubclass(QueueClosed, getattr(queue, "ShutDown", Exception))


@pytest.mark.parametrize("method", ["get", "get_many", "get_batch"])
def test_keyboard_interrupt_stops_a_blocked_get(ring_class, method):
    ring = ring_class(4, 64)
    start = time.monotonic()
    with keyboard_interrupt_after(0.1), pytest.raises(KeyboardInterrupt):
        getattr(ring, method)()
    assert time.monotonic() - start < PROMPTLY
    ring.put(b"still works")
    assert ring.get(timeout=PROMPTLY) == b"still works"


def test_keyboard_interrupt_stops_a_blocked_put(ring_class):
    ring = ring_class(1, 64)
    ring.put(b"full")
    start = time.monotonic()
    with keyboard_interrupt_after(0.1), pytest.raises(KeyboardInterrupt):
        ring.put(b"blocked")
    assert time.monotonic() - start < PROMPTLY
    assert ring.get_many() == [b"full"]


# -- Concurrency -------------------------------------------------------------------------


def test_many_producers_and_consumers_deliver_each_message_once_in_order(ring_class):
    producers, consumers, per_producer = 4, 4, 50_000
    ring = ring_class(512, 8 * 1024)

    def produce(producer):
        messages = [struct.pack("<II", producer, seq) for seq in range(per_producer)]
        put_all(ring, messages, source_id=producer)

    def consume(consumer):
        received = []
        with contextlib.suppress(QueueClosed):
            while True:
                if consumer == 0:
                    received.append(ring.get(timeout=30))
                elif consumer == 1:
                    received.extend(ring.get_batch(300, timeout=30))
                else:
                    received.extend(ring.get_many(200 * consumer, timeout=30))
        return received

    consuming = [in_thread(consume, consumer) for consumer in range(consumers)]
    producing = [in_thread(produce, producer) for producer in range(producers)]
    for producer in producing:
        assert finished(producer, 60) and "error" not in producer, producer.get("error")
    ring.close()
    for consumer in consuming:
        assert finished(consumer, 60) and "error" not in consumer, consumer.get("error")
    streams = [consumer["result"] for consumer in consuming]
    check_exactly_once_in_order(streams, producers, per_producer)
    stats = ring.stats
    assert stats.put_messages == stats.got_messages == producers * per_producer


# -- Compiled and reference agree --------------------------------------------------------


class CompiledMatchesReference(RuleBasedStateMachine):
    """Random non-blocking operations on a compiled ring and a reference ring built alike
    give the same results, the same exceptions and the same counters."""

    payloads = st.binary(max_size=40)

    @initialize(
        max_messages=st.integers(1, 6),
        max_bytes=st.integers(1, 48),
        resume_fraction=st.floats(0.0, 0.99),
    )
    def build(self, max_messages, max_bytes, resume_fraction):
        self.rings = [
            ring_class(max_messages, max_bytes, resume_fraction=resume_fraction)
            for ring_class in IMPLEMENTATIONS.values()
        ]

    def both(self, method, *args, **kwargs):
        outcomes = []
        for ring in self.rings:
            try:
                outcomes.append(ring_observable(getattr(ring, method)(*args, **kwargs)))
            except Exception as exc:
                outcomes.append(type(exc))
        assert outcomes[0] == outcomes[1], (method, args, kwargs)

    @rule(
        data=payloads,
        source_id=st.integers(0, 2**32 - 1),
        source=st.none() | st.binary(max_size=MAX_SOURCE_LEN + 1),
    )
    def put_nowait(self, data, source_id, source):
        self.both("put_nowait", data, source_id=source_id, source=source)

    @rule(data=payloads, source=st.none() | st.binary(max_size=8))
    def offer(self, data, source):
        self.both("offer", data, source=source)

    @rule(items=st.lists(payloads, max_size=8), source_id=st.integers(0, 3))
    def put_many(self, items, source_id):
        self.both("put_many", items, source_id=source_id)

    @rule()
    def get_nowait(self):
        self.both("get_nowait")

    @rule(max_items=st.integers(1, 8), with_source=st.booleans())
    def get_many(self, max_items, with_source):
        self.both("get_many", max_items, block=False, with_source=with_source)

    @rule(max_items=st.integers(1, 8), max_bytes=st.none() | st.integers(1, 60))
    def get_batch(self, max_items, max_bytes):
        self.both("get_batch", max_items, block=False, max_bytes=max_bytes)

    @rule()
    def close(self):
        self.both("close")

    @invariant()
    def same_state(self):
        for method in ("qsize", "empty", "full"):
            self.both(method)
        assert self.rings[0].closed == self.rings[1].closed
        assert self.rings[0].stats == self.rings[1].stats


CompiledMatchesReference.TestCase.settings = settings(
    max_examples=80, stateful_step_count=40, deadline=None
)
test_compiled_matches_reference = CompiledMatchesReference.TestCase


# -- Shared memory across fork() (compiled only) -----------------------------------------


def test_mapping_into_the_process_changes_nothing_visible(ring_class):
    ring = ring_class(16, 1024)
    ring.put(b"before")
    ring.map_into_process()
    ring.put(b"after")
    assert ring.get_many() == [b"before", b"after"]


def _faults_while_putting(ring, chunks, mapped, report):
    if mapped:
        ring.map_into_process()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for chunk in chunks:
        ring.put_nowait(chunk)
    report.write(b"%d" % (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before))
    report.flush()


@forks_with_threads
def test_a_forked_producer_that_maps_the_ring_first_avoids_a_fault_per_page(reap_children):
    ring = compiled.RingQueue(1024, 16 * MiB)
    chunks = [bytes([n]) * (64 * 1024) for n in range(128)]
    # The parent writes the whole area once, so its pages exist in the shared mapping.
    for _ in range(2):
        for chunk in chunks:
            ring.put_nowait(chunk)
        assert len(ring.get_many(1024, timeout=PROMPTLY)) == len(chunks)
    faults = {}
    for mapped in (False, True):
        reader, writer = os.pipe()
        with os.fdopen(reader, "rb") as report_in, os.fdopen(writer, "wb") as report:
            pid = fork(functools.partial(_faults_while_putting, ring, chunks, mapped, report))
            report.close()
            faults[mapped] = int(report_in.read())
        assert exit_code(pid) == 0
        assert ring.get_many(1024, timeout=PROMPTLY) == chunks
    pages = 8 * MiB // 4096
    assert faults[False] >= pages // 2, faults
    assert faults[True] < faults[False] // 4, faults


@forks_with_threads
def test_forked_producer_feeds_the_parent(reap_children):
    ring = compiled.RingQueue(1024, 64 * 1024)
    count = 100_000
    pid = fork(lambda: put_all(ring, [seq.to_bytes(4, "little") * 4 for seq in range(count)]))
    received = []
    while len(received) < count:
        received.extend(ring.get_many(timeout=30))
    assert exit_code(pid) == 0
    assert received == [seq.to_bytes(4, "little") * 4 for seq in range(count)]
    assert ring.stats.put_messages == count


@forks_with_threads
def test_producers_and_consumers_in_several_processes(reap_children, tmp_path):
    ring = compiled.RingQueue(256, 16 * 1024)
    producers, per_producer = 3, 30_000

    def produce(producer):
        put_all(ring, [struct.pack("<II", producer, seq) for seq in range(per_producer)])

    def consume():
        received = []
        with contextlib.suppress(QueueClosed):
            while True:
                received.extend(ring.get_many(100, timeout=30))
        return received

    def consume_to_file():
        (tmp_path / "child").write_bytes(b"".join(consume()))

    producer_pids = [fork(lambda producer=producer: produce(producer)) for producer in range(3)]
    consumer_pid = fork(consume_to_file)
    in_parent = in_thread(consume)
    assert [exit_code(pid) for pid in producer_pids] == [0] * producers
    ring.close()
    assert exit_code(consumer_pid) == 0
    assert finished(in_parent, 30) and "error" not in in_parent
    child_data = (tmp_path / "child").read_bytes()
    in_child = [child_data[start : start + 8] for start in range(0, len(child_data), 8)]
    check_exactly_once_in_order([in_parent["result"], in_child], producers, per_producer)


KILL_BODIES = [bytes([index]) * size for index, size in enumerate([0, 7, 4096, 300_000, MiB])]
KILL_CHECKSUMS = [zlib.crc32(body) for body in KILL_BODIES]
KILL_HEADER = struct.Struct("<IIQI")  # round, body index, sequence number, crc32 of body


def produce_until_killed(ring, round_):
    """A forked producer's tight loop: it never returns.  Each message carries its header as
    its source, so the big body is copied only once, under the ring's lock."""
    seq = 0
    while True:
        index = seq % len(KILL_BODIES)
        header = KILL_HEADER.pack(round_, index, seq, KILL_CHECKSUMS[index])
        ring.put(KILL_BODIES[index], source=header)
        seq += 1


def check_killed_round(messages, round_):
    for expected_seq, (_, header, body) in enumerate(messages):
        round_seen, index, seq, checksum = KILL_HEADER.unpack(header)
        assert (round_seen, seq) == (round_, expected_seq), "lost or duplicated message"
        assert body == KILL_BODIES[index] and zlib.crc32(body) == checksum, "torn message"


@forks_with_threads
def test_producer_sigkilled_at_random_moments_leaves_only_whole_messages(reap_children):
    ring = compiled.RingQueue(64, 8 * MiB)
    rng = random.Random(20240229)
    for round_ in range(20):
        pid = fork(lambda round_=round_: produce_until_killed(ring, round_))
        killer = threading.Timer(rng.uniform(0.002, 0.03), os.kill, (pid, signal.SIGKILL))
        killer.start()
        give_up = time.monotonic() + PROMPTLY
        messages = []
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            assert time.monotonic() < give_up, "the producer survived SIGKILL"
            with contextlib.suppress(queue.Empty):
                messages.extend(ring.get_many(timeout=0.005, with_source=True))
        killer.join()
        with contextlib.suppress(queue.Empty):
            while True:
                messages.extend(ring.get_many(block=False, with_source=True))
        check_killed_round(messages, round_)
    ring.put(b"after")
    assert ring.get(timeout=PROMPTLY) == b"after"
    stats = ring.stats
    assert stats.put_messages == stats.got_messages and stats.messages_queued == 0


# -- C-level producer API (compiled only) ------------------------------------------------

CAPI_SOURCE = """
import os
import signal

from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport free, malloc

from fastsock._native cimport pthread_mutex_lock
from fastsock._ring cimport MessageView, RingQueue, RingState
from fastsock._span cimport MessageSpan


def put_spans(RingQueue ring, bytes base, list spans, uint32_t source_id):
    cdef const char* data = base
    cdef Py_ssize_t n = len(spans)
    cdef Py_ssize_t published
    cdef MessageSpan* array = <MessageSpan*>malloc((n + 1) * sizeof(MessageSpan))
    for i, (offset, length) in enumerate(spans):
        array[i].offset = offset
        array[i].length = length
    with nogil:
        published = ring.put_spans(data, array, n, source_id)
    free(array)
    return published


def offer_messages(RingQueue ring, list messages, uint32_t source_id, bint wake=True):
    # messages: (payload, source) pairs.
    cdef Py_ssize_t n = len(messages)
    cdef uint64_t published_bytes = 0
    cdef MessageView* views = <MessageView*>malloc((n + 1) * sizeof(MessageView))
    for i, (payload, source) in enumerate(messages):
        views[i].data = <bytes>payload
        views[i].length = len(payload)
        views[i].source = <bytes>source
        views[i].source_len = len(source)
    published = ring.offer_messages(views, n, source_id, &published_bytes, wake)
    free(views)
    return published, published_bytes


def wake_consumers(RingQueue ring):
    ring.wake_consumers()


def consumer_wake_state(RingQueue ring):
    # (sleeping consumers, wake-up sequence number)
    return ring.header.data_waiters, ring.header.data_seq


def wait_resume(RingQueue ring, Py_ssize_t length, double timeout):
    cdef int status
    with nogil:
        status = ring.wait_resume(length, timeout)
    return status


def die_holding_the_lock(RingQueue ring, bytes payload, bint committed):
    # What a producer killed inside its critical section leaves: a copied record, and the
    # state that publishes it written, or even committed, but the lock never released.
    cdef RingState state = ring.header.state[ring.header.current]
    cdef MessageView message
    cdef uint64_t published_bytes
    message.data = payload
    message.length = len(payload)
    message.source = NULL
    message.source_len = 0
    pthread_mutex_lock(&ring.header.lock)
    ring.append_views(&state, &message, 1, 0, False, &published_bytes)
    ring.header.state[ring.header.current ^ 1] = state
    if committed:
        ring.header.current ^= 1
    os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.fixture(scope="session")
def capi(tmp_path_factory):
    """A small extension module, built against the installed fastsock/_ring.pxd, that calls
    the C API; the .pxd files it cimports need the installed C headers (fastsock/include)."""
    pytest.importorskip("Cython")
    if shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.skip("no C compiler to build the C-API test module")
    build = tmp_path_factory.mktemp("ring_capi")
    (build / "ring_capi.pyx").write_text(CAPI_SOURCE)
    package = Path(compiled.__file__).resolve().parent
    search_path = [str(package.parent), os.environ.get("PYTHONPATH", "")]
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, search_path)),
        CFLAGS=f"{os.environ.get('CFLAGS', '')} -I{package / 'include'}",
    )
    built = subprocess.run(
        [sys.executable, "-m", "Cython.Build.Cythonize", "-i", "-3", "-q", "ring_capi.pyx"],
        cwd=build,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert built.returncode == 0, built.stderr
    (extension,) = build.glob("ring_capi*.so")
    spec = importlib.util.spec_from_file_location("ring_capi", extension)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_put_spans_publishes_in_order_until_full(capi):
    ring = compiled.RingQueue(3, 100)
    base = b"aaabbbbccd"
    spans = [(0, 3), (3, 4), (7, 2), (9, 1)]
    assert capi.put_spans(ring, base, spans, 5) == 3
    assert ring.stats.full_events == 1
    assert ring.get_many(with_source=True) == [
        (5, None, b"aaa"),
        (5, None, b"bbbb"),
        (5, None, b"cc"),
    ]
    assert capi.put_spans(ring, base, [], 0) == 0
    assert capi.put_spans(ring, b"x" * 101, [(0, 101)], 0) == 0, "longer than max_bytes"
    ring.close()
    assert capi.put_spans(ring, base, spans, 5) == -1


def test_offer_messages_publishes_what_fits_and_drops_the_rest(capi):
    ring = compiled.RingQueue(3, 10)
    messages = [(b"12345", b"a"), (b"678901", b""), (b"67", b"sockaddr"), (b"8", b"b"), (b"9", b"")]
    assert capi.offer_messages(ring, messages, 42) == (3, 8)
    stats = ring.stats
    assert (stats.full_events, stats.dropped_messages, stats.dropped_bytes) == (2, 2, 7)
    assert ring.get_many(with_source=True) == [
        (42, b"a", b"12345"),
        (42, b"sockaddr", b"67"),
        (42, b"b", b"8"),
    ]
    assert capi.offer_messages(ring, [], 0) == (0, 0)
    ring.close()
    assert capi.offer_messages(ring, messages, 0)[0] == -1


def _put_what_get_many_takes(ring, taken):
    taken.put(ring.get_many(timeout=PROMPTLY))


def test_offer_messages_without_wake_leaves_a_sleeping_consumer_to_wake_consumers(capi):
    # A sleeping consumer also looks again by itself every wait slice; an attempt in which
    # that happened between the offer and wake_consumers() proves nothing and is retried.
    ring = compiled.RingQueue()
    for _ in range(5):
        taken = queue.SimpleQueue()
        consumer = threading.Thread(target=_put_what_get_many_takes, args=(ring, taken))
        consumer.start()
        deadline = time.monotonic() + PROMPTLY
        while capi.consumer_wake_state(ring)[0] != 1:
            assert time.monotonic() < deadline, "the consumer never went to sleep"
            time.sleep(0.001)
        _, sequence = capi.consumer_wake_state(ring)
        assert capi.offer_messages(ring, [(b"quiet", b"")], 0, False) == (1, 5)
        assert capi.consumer_wake_state(ring)[1] == sequence, "offer_messages woke it"
        capi.wake_consumers(ring)
        woken = capi.consumer_wake_state(ring)[1] != sequence
        assert taken.get(timeout=PROMPTLY) == [b"quiet"]
        consumer.join()
        if woken:
            break
        assert ring.empty()
    else:
        pytest.fail("wake_consumers() never woke the sleeping consumer")
    capi.wake_consumers(ring)  # no sleeper: nothing to do
    assert capi.consumer_wake_state(ring) == (0, sequence + 1)


def test_wait_resume_waits_for_the_resume_mark_of_both_bounds(capi):
    ring = compiled.RingQueue(10, 1000, resume_fraction=0.5)
    ring.put_many([b"m"] * 10)
    waiter = in_thread(capi.wait_resume, ring, 1, 30.0)
    ring.get_many(4)
    time.sleep(0.2)
    assert waiter["thread"].is_alive(), "resumed above the resume mark"
    ring.get()
    assert finished(waiter) and waiter["result"] == 1
    assert ring.stats.paused_seconds > 0

    ring = compiled.RingQueue(100, 100, resume_fraction=0.5)
    ring.put_many([b"x" * 40, b"y" * 40])
    start = time.monotonic()
    assert capi.wait_resume(ring, 1, 0.1) == 0
    assert 0.09 <= time.monotonic() - start < PROMPTLY
    assert ring.stats.paused_seconds >= 0.09
    ring.get()
    assert capi.wait_resume(ring, 1, 0.0) == 1


def test_wait_resume_is_woken_by_close(capi):
    ring = compiled.RingQueue(2, 100)
    ring.put_many([b"a", b"b"])
    waiter = in_thread(capi.wait_resume, ring, 1, 30.0)
    time.sleep(0.05)
    ring.close()
    assert finished(waiter) and waiter["result"] == -1
    assert capi.wait_resume(ring, 1, 0.0) == -1


@forks_with_threads
@pytest.mark.parametrize("committed", [False, True])
def test_process_killed_holding_the_lock_is_recovered(capi, reap_children, committed):
    ring = compiled.RingQueue(8, 1000)
    ring.put(b"before")
    pid = fork(lambda: capi.die_holding_the_lock(ring, b"in flight", committed))
    assert exit_code(pid) == -signal.SIGKILL
    assert ring.get_many(timeout=PROMPTLY) == [b"before", b"in flight"][: 1 + committed]
    assert ring.stats.producer_deaths == 1
    ring.put(b"after")
    assert ring.get(timeout=PROMPTLY) == b"after"
    stats = ring.stats
    assert stats.put_messages == stats.got_messages == 2 + committed


def test_wait_resume_waits_until_the_pending_message_fits(capi):
    # Drained to the resume mark, the ring may still lack room for a large pending message:
    # resuming then would have the loop spin between a refused put and wait_resume().
    ring = compiled.RingQueue(100, 100, resume_fraction=0.5)
    ring.put(b"x" * 45)
    assert capi.wait_resume(ring, 60, 0.05) == 0
    waiter = in_thread(capi.wait_resume, ring, 60, 30.0)
    time.sleep(0.1)
    assert waiter["thread"].is_alive(), "resumed without room for the pending message"
    ring.get()
    assert finished(waiter) and waiter["result"] == 1
    assert capi.put_spans(ring, b"y" * 60, [(0, 60)], 0) == 1


def test_multi_message_records_wrapping_around_stay_intact(capi):
    # Records of many messages, some with sources, published by the C API and taken in
    # every way, whole and in part.  The ring is never drained, so that it does not start
    # over at the front: records, their length tables and payloads straddle the end of
    # the record area at every possible offset.
    rng = random.Random(11)
    ring = compiled.RingQueue(60, 3000)
    base = bytes(range(256)) * 24
    model = collections.deque()
    for step in range(4000):
        if rng.random() < 0.5:
            if rng.random() < 0.6:
                spans = [
                    (rng.randrange(len(base) - 130), rng.randrange(130))
                    for _ in range(rng.randrange(1, 25))
                ]
                published = capi.put_spans(ring, base, spans, step)
                expected = [(step, None, base[o : o + n]) for o, n in spans[:published]]
            else:
                messages = [
                    (rng.randbytes(rng.randrange(100)), rng.randbytes(rng.choice([0, 16, 128])))
                    for _ in range(rng.randrange(1, 25))
                ]
                published, _ = capi.offer_messages(ring, messages, step)
                expected = []
                for payload, source in messages:
                    fits = (
                        len(model) + len(expected) < 60
                        and sum(len(m[2]) for m in list(model) + expected) + len(payload) <= 3000
                    )
                    if fits:
                        expected.append((step, source or None, payload))
                assert published == len(expected)
            model.extend(expected)
        elif len(model) > 1:
            most = rng.randrange(1, len(model))
            way = rng.choice(["get", "get_many", "get_batch"])
            if way == "get":
                assert ring.get_nowait() == model.popleft()[2]
            elif way == "get_many":
                taken = ring.get_many(most, block=False, with_source=True)
                assert taken == [model.popleft() for _ in taken]
            else:
                cap = rng.choice([None, rng.randrange(1, 300)])
                batch = ring.get_batch(most, block=False, max_bytes=cap)
                expected = [model.popleft() for _ in range(len(batch))]
                assert list(batch) == [payload for _, _, payload in expected]
                assert batch.source_ids.tolist() == [source_id for source_id, _, _ in expected]
                if cap is not None and len(model) and len(batch) < most:
                    assert batch.nbytes + len(model[0][2]) > cap
        assert ring.qsize() == len(model)
    assert ring.get_many(len(model), block=False, with_source=True) == list(model)
