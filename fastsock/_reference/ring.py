"""Pure-Python reference of the compiled ring queue, fastsock._ring (documented in its .pyi).

It behaves like the compiled queue within one process; unlike it, it is not shared with
forked children, each of which gets its own copy.
"""

import numbers
import operator
import os
import queue
import threading
import time
import weakref
from array import array
from collections import deque

from fastsock import _timeouts
from fastsock.constants import (
    GET_MANY_DEFAULT,
    RING_MAX_BYTES,
    RING_MAX_MESSAGES,
    RING_RESUME_FRACTION,
)
from fastsock.errors import QueueClosed
from fastsock.stats import RingStats

__all__ = ["MAX_SOURCE_LEN", "Batch", "RingQueue"]

MAX_SOURCE_LEN = 128

# The compiled ring's record length field is 32 bits wide.
_MAX_BOUND = 0xFFFF_FFFF


def _check_bound(name, value):
    value = operator.index(value)
    if not 1 <= value <= _MAX_BOUND:
        raise ValueError(f"{name} must be between 1 and {_MAX_BOUND}, got {value}")
    return value


def _check_max_items(max_items):
    max_items = operator.index(max_items)
    if max_items < 1:
        raise ValueError(f"max_items must be at least 1, got {max_items}")
    return max_items


def _wait(condition, deadline):
    """Wait on `condition` until notified or `deadline`; False if the deadline had passed."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return False
    condition.wait(None if remaining == float("inf") else remaining)
    return True


def _as_bytes(data):
    return memoryview(data).tobytes()


class Batch(bytes):
    """The payloads of several messages back to back; documented in fastsock/_ring.pyi.

    A bytes subclass only so that it exports the buffer protocol on every Python version.
    """

    def __new__(cls, records):
        self = super().__new__(cls, b"".join(payload for _, _, payload in records))
        self._offsets = array("q", [0])
        for _, _, payload in records:
            self._offsets.append(self._offsets[-1] + len(payload))
        self._source_ids = array("I", [source_id for source_id, _, _ in records])
        return self

    def __len__(self):
        return len(self._source_ids)

    def __getitem__(self, index):
        index = operator.index(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError("Batch index out of range")
        return bytes(memoryview(self)[self._offsets[index] : self._offsets[index + 1]])

    def __iter__(self):
        for index in range(len(self)):
            yield self[index]

    @property
    def nbytes(self):
        return self._offsets[-1]

    @property
    def offsets(self):
        return memoryview(self._offsets).toreadonly()

    @property
    def source_ids(self):
        return memoryview(self._source_ids).toreadonly()


class RingQueue:
    """Bounded FIFO of byte messages; documented in fastsock/_ring.pyi."""

    def __init__(
        self,
        max_messages=RING_MAX_MESSAGES,
        max_bytes=RING_MAX_BYTES,
        *,
        resume_fraction=RING_RESUME_FRACTION,
    ):
        self._max_messages = _check_bound("max_messages", max_messages)
        self._max_bytes = _check_bound("max_bytes", max_bytes)
        if not isinstance(resume_fraction, numbers.Real):
            raise TypeError(f"resume_fraction must be a number, got {resume_fraction!r}")
        if not 0.0 <= resume_fraction < 1.0:
            raise ValueError(f"resume_fraction must be >= 0 and < 1, got {resume_fraction}")
        self._records = deque()
        self._queued_bytes = 0
        self._lock = threading.Lock()
        self._data = threading.Condition(self._lock)
        self._space = threading.Condition(self._lock)
        self._closed = False
        self._put_messages = self._put_bytes = 0
        self._got_messages = self._got_bytes = 0
        self._dropped_messages = self._dropped_bytes = 0
        self._full_events = 0
        self._async_waiters = 0
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        weakref.finalize(self, os.close, self._wake_fd)

    @property
    def max_messages(self):
        return self._max_messages

    @property
    def max_bytes(self):
        return self._max_bytes

    # -- Producer side -------------------------------------------------------------------

    def _check_message(self, payload, source):
        if len(payload) > self._max_bytes:
            raise ValueError(f"message of {len(payload)} bytes exceeds max_bytes={self._max_bytes}")
        if source is not None and len(source) > MAX_SOURCE_LEN:
            raise ValueError(f"source of {len(source)} bytes exceeds {MAX_SOURCE_LEN} bytes")

    def _fits(self, length):
        return (
            len(self._records) < self._max_messages
            and self._queued_bytes + length <= self._max_bytes
        )

    def _append(self, source_id, source, payload):
        self._records.append((source_id, source or None, payload))
        self._queued_bytes += len(payload)
        self._put_messages += 1
        self._put_bytes += len(payload)

    @staticmethod
    def _check_source_id(source_id):
        source_id = operator.index(source_id)
        if not 0 <= source_id <= 0xFFFF_FFFF:
            raise OverflowError(f"source_id {source_id} does not fit in 32 bits")
        return source_id

    def put(self, data, block=True, timeout=None, *, source_id=0, source=None):
        source_id = self._check_source_id(source_id)
        deadline = _timeouts.deadline(block, timeout)
        payload = _as_bytes(data)
        source = None if source is None else _as_bytes(source)
        self._check_message(payload, source)
        counted = False
        with self._lock:
            while True:
                if self._closed:
                    raise QueueClosed("the queue is closed")
                if self._fits(len(payload)):
                    break
                if not counted:
                    self._full_events += 1
                    counted = True
                if not _wait(self._space, deadline):
                    raise queue.Full
            self._append(source_id, source, payload)
            self._data.notify()
            self._wake_async()

    def put_nowait(self, data, *, source_id=0, source=None):
        self.put(data, False, source_id=source_id, source=source)

    def offer(self, data, *, source_id=0, source=None):
        source_id = self._check_source_id(source_id)
        payload = _as_bytes(data)
        source = None if source is None else _as_bytes(source)
        self._check_message(payload, source)
        with self._lock:
            if self._closed:
                raise QueueClosed("the queue is closed")
            if not self._fits(len(payload)):
                self._full_events += 1
                self._dropped_messages += 1
                self._dropped_bytes += len(payload)
                return False
            self._append(source_id, source, payload)
            self._data.notify()
            self._wake_async()
            return True

    def put_many(self, items, *, source_id=0):
        source_id = self._check_source_id(source_id)
        payloads = [_as_bytes(item) for item in items]
        for payload in payloads:
            self._check_message(payload, None)
        with self._lock:
            if self._closed:
                raise QueueClosed("the queue is closed")
            published = 0
            for payload in payloads:
                if not self._fits(len(payload)):
                    self._full_events += 1
                    break
                self._append(source_id, None, payload)
                published += 1
            self._data.notify(published)
            if published:
                self._wake_async()
            return published

    # -- Consumer side -------------------------------------------------------------------

    def _wait_for_data(self, deadline):
        while not self._records:
            if self._closed:
                raise QueueClosed("the queue is closed and drained")
            if not _wait(self._data, deadline):
                raise queue.Empty

    def _take(self, count):
        records = [self._records.popleft() for _ in range(count)]
        taken = sum(len(payload) for _, _, payload in records)
        self._queued_bytes -= taken
        self._got_messages += count
        self._got_bytes += taken
        self._space.notify_all()
        return records

    def get(self, block=True, timeout=None):
        deadline = _timeouts.deadline(block, timeout)
        with self._lock:
            self._wait_for_data(deadline)
            return self._take(1)[0][2]

    def get_nowait(self):
        return self.get(False)

    def get_many(self, max_items=GET_MANY_DEFAULT, timeout=None, *, block=True, with_source=False):
        max_items = _check_max_items(max_items)
        deadline = _timeouts.deadline(block, timeout)
        with self._lock:
            self._wait_for_data(deadline)
            records = self._take(min(max_items, len(self._records)))
        if with_source:
            return records
        return [payload for _, _, payload in records]

    def get_batch(self, max_items=GET_MANY_DEFAULT, timeout=None, *, block=True, max_bytes=None):
        max_items = _check_max_items(max_items)
        if max_bytes is not None:
            max_bytes = operator.index(max_bytes)
            if max_bytes < 1:
                raise ValueError(f"max_bytes must be at least 1, got {max_bytes}")
        deadline = _timeouts.deadline(block, timeout)
        with self._lock:
            self._wait_for_data(deadline)
            count = payload = 0
            for _, _, message in self._records:
                if count == max_items:
                    break
                if count and max_bytes is not None and payload + len(message) > max_bytes:
                    break
                count += 1
                payload += len(message)
            records = self._take(count)
        return Batch(records)

    # fastsock._asyncring is imported by the async methods only: it imports asyncio, which
    # would add tens of milliseconds to every `import fastsock`.

    def get_many_async(self, max_items=GET_MANY_DEFAULT, timeout=None, *, with_source=False):
        from fastsock import _asyncring

        return _asyncring.get_many_async(self, max_items, timeout, with_source)

    def get_batch_async(self, max_items=GET_MANY_DEFAULT, timeout=None, *, max_bytes=None):
        from fastsock import _asyncring

        return _asyncring.get_batch_async(self, max_items, timeout, max_bytes)

    def batches(self, max_items=GET_MANY_DEFAULT, *, with_source=False):
        from fastsock import _asyncring

        return _asyncring.batches(self, max_items, with_source)

    # The primitives of fastsock._asyncring.

    def _wake_async(self):
        """Called with the lock held, after a publish."""
        if self._async_waiters:
            os.eventfd_write(self._wake_fd, 1)

    def _add_async_waiter(self):
        with self._lock:
            if self._records or self._closed:
                return False
            self._async_waiters += 1
            return True

    def _remove_async_waiter(self):
        with self._lock:
            self._async_waiters -= 1

    # -- State ---------------------------------------------------------------------------

    def qsize(self):
        with self._lock:
            return len(self._records)

    def empty(self):
        return self.qsize() == 0

    def full(self):
        with self._lock:
            return not self._fits(1)

    def map_into_process(self):
        """Nothing to map: the reference ring lives in one process's heap."""

    def close(self):
        with self._lock:
            self._closed = True
            self._data.notify_all()
            self._space.notify_all()
        os.eventfd_write(self._wake_fd, 1)

    @property
    def closed(self):
        return self._closed

    @property
    def stats(self):
        with self._lock:
            return RingStats(
                put_messages=self._put_messages,
                put_bytes=self._put_bytes,
                got_messages=self._got_messages,
                got_bytes=self._got_bytes,
                dropped_messages=self._dropped_messages,
                dropped_bytes=self._dropped_bytes,
                full_events=self._full_events,
                paused_seconds=0.0,
                producer_deaths=0,
                messages_queued=len(self._records),
                bytes_queued=self._queued_bytes,
            )
