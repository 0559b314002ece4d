"""Drain rate of the ring's asyncio consumer against its blocking one, in the same run.

    pip install '.[bench]'
    taskset -c 0,1 python bench/ring_async.py [--messages N] [--runs N]

Two consumers of the same compiled ring, each in turn, each run with a fresh ring and a
producer process forked for it (on the last CPU allowed, the consumer on the first) that puts
N 64-byte messages with put_many() as fast as the ring takes them:

- ``get_many``: the blocking ``ring.get_many()`` loop (the thread a sync consumer needs);
- ``get_many_async asyncio`` / ``uvloop``: ``await ring.get_many_async()`` on that loop.

The consumer sleeps whenever it has caught up, so the wake-ups are measured too: futex for
the blocking get, eventfd through the event loop for the async one.  The rate of a run is N
divided by the time from the fork to the last message taken; a row is the median of its
runs; the ratio divides it by the ``get_many`` row's.
"""

import argparse
import asyncio
import os
import statistics
import sys
import time

from fastsock import _ring

MESSAGE = b"m" * 63 + b"\n"
PUT_MANY = 256


def produce(ring, count, cpu):
    os.sched_setaffinity(0, {cpu})
    batch = [MESSAGE] * PUT_MANY
    left = count
    while left:
        put = ring.put_many(batch[: min(PUT_MANY, left)])
        left -= put
        if put == 0:
            # Full: wait for room as a receive loop does, in a blocking put.
            ring.put(MESSAGE, timeout=60)
            left -= 1


def drain_sync(ring, count):
    taken = 0
    while taken < count:
        taken += len(ring.get_many())


async def drain_async(ring, count):
    taken = 0
    while taken < count:
        taken += len(await ring.get_many_async())


def new_uvloop():
    import uvloop

    return uvloop.new_event_loop()


CONSUMERS = {
    "get_many": None,
    "get_many_async asyncio": asyncio.new_event_loop,
    "get_many_async uvloop": new_uvloop,
}


def one_run(consumer, count, cpus):
    ring = _ring.RingQueue()
    loop = None if CONSUMERS[consumer] is None else CONSUMERS[consumer]()
    started = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            produce(ring, count, cpus[-1])
            status = 0
        finally:
            os._exit(status)
    try:
        if loop is None:
            drain_sync(ring, count)
        else:
            loop.run_until_complete(drain_async(ring, count))
        elapsed = time.perf_counter() - started
    finally:
        if loop is not None:
            loop.close()
        _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"the producer of a {consumer} run failed")
    return count / elapsed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2_000_000)
    parser.add_argument("--runs", type=int, default=5)
    options = parser.parse_args(argv)
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpus[0]})
    rates = {consumer: [] for consumer in CONSUMERS}
    # Rows in turns, so that every row sees the same drift of a shared machine's speed.
    for _ in range(options.runs):
        for consumer in CONSUMERS:
            rates[consumer].append(one_run(consumer, options.messages, cpus))
    base = statistics.median(rates["get_many"])
    print(
        f"{options.messages:,} messages of {len(MESSAGE)} bytes, median of {options.runs} runs, "
        f"consumer on CPU {cpus[0]}, producer on CPU {cpus[-1]} ({sys.version.split()[0]})"
    )
    for consumer, values in rates.items():
        median = statistics.median(values)
        print(f"{consumer:24} {median / 1e6:8.2f} M msg/s   ratio {median / base:5.2f}")


if __name__ == "__main__":
    main()
