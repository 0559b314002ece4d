"""Microbenchmarks of fastsock's compiled core, outside the default test run:

    pip install '.[bench]'
    pytest bench/ --benchmark-only
    pytest bench/ --benchmark-only --benchmark-autosave     # then: pytest-benchmark compare

What they time, one call each: framing one MiB of lines, length-prefixed frames or raw
bytes; one message through the ring (put then get), alone or 1024 at a time; and a consumer
taking 4096 queued messages one get() at a time, as one get_many() list or as one
get_batch() buffer, against queue.Queue as the stdlib reference.  Divide by the count in a
test's name for the cost per message.
"""

import queue

import pytest

pytest.importorskip("pytest_benchmark")

import fastsock  # noqa: E402

MIB = 1024 * 1024
LINE = b"x" * 63 + b"\n"
FRAME = (124).to_bytes(4, "big") + b"f" * 124
BULK = bytes(range(256))
ONE_MIB = {
    "lines": (LINE * (MIB // len(LINE)), MIB // len(LINE)),
    "length": (FRAME * (MIB // len(FRAME)), MIB // len(FRAME)),
    "raw": (BULK * (MIB // len(BULK)), 1),
}
MESSAGES = 4096
PUT_MANY = 1024


@pytest.mark.parametrize("framing", ["lines", "length", "raw"])
def test_framer_one_mib(benchmark, framing):
    data, messages = ONE_MIB[framing]
    framer = fastsock.Framer(framing)
    assert len(benchmark(framer.feed, data)) == messages
    assert framer.pending == 0


def test_ring_put_get_1_message(benchmark):
    ring = fastsock.RingQueue()

    def put_get():
        ring.put(LINE)
        return ring.get()

    assert benchmark(put_get) == LINE


def test_ring_put_many_get_many_1024_messages(benchmark):
    ring = fastsock.RingQueue()
    lines = [LINE] * PUT_MANY

    def put_get():
        ring.put_many(lines)
        return ring.get_many(PUT_MANY)

    assert len(benchmark(put_get)) == PUT_MANY


def take_one_by_one(ring):
    return sum(len(ring.get_nowait()) for _ in range(MESSAGES))


def take_get_many(ring):
    return sum(map(len, ring.get_many(MESSAGES)))


def take_get_batch(ring):
    return ring.get_batch(MESSAGES).nbytes


@pytest.mark.parametrize(
    "take",
    [take_one_by_one, take_get_many, take_get_batch],
    ids=["get", "get_many", "get_batch"],
)
def test_consume_4096_messages(benchmark, take):
    ring = fastsock.RingQueue()

    def fill():
        assert ring.put_many([LINE] * MESSAGES) == MESSAGES
        return (ring,), {}

    total = benchmark.pedantic(take, setup=fill, rounds=200)
    assert total == MESSAGES * len(LINE)


def test_consume_4096_messages_stdlib_queue(benchmark):
    """The reference: the same consumer on the queue.Queue that fastsock's ring replaces."""
    stdlib_queue = queue.Queue()

    def fill():
        for _ in range(MESSAGES):
            stdlib_queue.put(LINE)
        return (), {}

    def take():
        return sum(len(stdlib_queue.get_nowait()) for _ in range(MESSAGES))

    assert benchmark.pedantic(take, setup=fill, rounds=200) == MESSAGES * len(LINE)
