"""The asyncio consumer of both rings (compiled and reference): waiting on the ring's eventfd.

A ring owns an eventfd, made with the ring and so inherited by forked producers.  A waiter
counts itself in the ring's async waiters under the ring's lock, having found it empty (the
ring's ``_add_async_waiter()``); a producer that publishes while the count is not zero, at
the moments it would wake a sleeping ``get()``, adds to the eventfd, and ``close()`` always
does.  The waiter then awaits the eventfd's readiness on its event loop, counts itself out,
and takes the messages without blocking.  Taking never awaits, so a cancelled wait loses no
message, and its ``finally`` leaves no waiter counted.

asyncio allows one reader callback per file descriptor and loop, so the futures of one loop
waiting on one eventfd share a ``_Readiness`` that wakes them all.  Reading the eventfd
resets it, so the first loop to read a wake-up may leave the readers of other loops (in
other threads) nothing to see: the loop that read it passes it on to every other loop
waiting on the same eventfd.
"""

import asyncio
import os
import queue
import threading
import time

from fastsock import _timeouts
from fastsock.constants import RING_ASYNC_RECHECK
from fastsock.errors import QueueClosed

__all__ = ["batches", "get_batch_async", "get_many_async"]

# (loop, eventfd) -> _Readiness, while a future waits: the last one out removes it.  Loops
# in several threads look at each other's entries, under the lock.
_readiness = {}
_readiness_lock = threading.Lock()


class _Readiness:
    """The waiters of one event loop on one eventfd."""

    def __init__(self, loop, fd):
        self.loop = loop
        self.fd = fd
        self.futures = set()
        loop.add_reader(fd, self.ready)

    def ready(self):
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            # Another loop's reader reset it first, and passes the wake-up on to this one.
            pass
        with _readiness_lock:
            others = [
                readiness
                for (loop, fd), readiness in _readiness.items()
                if fd == self.fd and loop is not self.loop
            ]
        for other in others:
            try:
                other.loop.call_soon_threadsafe(other.wake)
            except RuntimeError:
                # Closed since: nothing waits there any more.
                pass
        self.wake()

    def wake(self):
        for future in self.futures:
            if not future.done():
                future.set_result(None)

    def discard(self, future):
        self.futures.discard(future)
        if not self.futures:
            self.loop.remove_reader(self.fd)
            with _readiness_lock:
                del _readiness[self.loop, self.fd]


def _wake(future):
    if not future.done():
        future.set_result(None)


async def wait_for_data(ring, deadline):
    """Return once the ring may hold a message, be closed, or ``deadline`` has come."""
    loop = asyncio.get_running_loop()
    fd = ring._wake_fd
    # Listed before it counts itself a waiter: a producer signals only counted waiters, so
    # the loop that reads that signal already sees this one to pass it on to.
    readiness = _readiness.get((loop, fd))
    if readiness is None:
        readiness = _Readiness(loop, fd)
        with _readiness_lock:
            _readiness[loop, fd] = readiness
    future = loop.create_future()
    readiness.futures.add(future)
    try:
        if not ring._add_async_waiter():
            return
        try:
            timer = loop.call_later(
                max(0.0, min(RING_ASYNC_RECHECK, deadline - time.monotonic())), _wake, future
            )
            try:
                await future
            finally:
                timer.cancel()
        finally:
            ring._remove_async_waiter()
    finally:
        readiness.discard(future)


async def _when_ready(ring, take, timeout):
    deadline = _timeouts.deadline(True, timeout)
    while True:
        try:
            return take()
        except queue.Empty:
            if time.monotonic() >= deadline:
                raise
        await wait_for_data(ring, deadline)


def get_many_async(ring, max_items, timeout, with_source):
    """``ring.get_many_async()``, documented in _ring.pyi."""
    return _when_ready(
        ring,
        lambda: ring.get_many(max_items, block=False, with_source=with_source),
        timeout,
    )


def get_batch_async(ring, max_items, timeout, max_bytes):
    """``ring.get_batch_async()``, documented in _ring.pyi."""
    return _when_ready(
        ring, lambda: ring.get_batch(max_items, block=False, max_bytes=max_bytes), timeout
    )


async def batches(ring, max_items, with_source):
    """``ring.batches()``, documented in _ring.pyi."""
    while True:
        try:
            messages = await get_many_async(ring, max_items, None, with_source)
        except QueueClosed:
            return
        yield messages
