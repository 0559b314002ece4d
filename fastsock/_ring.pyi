"""The bounded ring-buffer queue between fastsock's receive loops and Python consumers.

A ``RingQueue`` is a FIFO of byte messages bounded both by a message count and by the
total bytes of payload.  Its consumer side is a superset of ``queue.Queue``'s get side;
``get_many`` and ``get_batch`` drain thousands of messages per call.  The queue lives in
one shared memory mapping made by the constructor, so after ``os.fork()`` the parent and
the child share it through the same object (fork, not spawn: the object cannot be
pickled).  A producer process killed at any instant, even with SIGKILL, leaves no torn or
duplicated message behind and the queue keeps working.

Each message may carry a ``source_id`` (an unsigned 32-bit integer) and a ``source``, an
opaque blob of up to ``MAX_SOURCE_LEN`` bytes such as a datagram sender's address; an
empty source is returned as ``None``.  ``fastsock._reference.ring`` has the same API in
pure Python, without the sharing across processes.
"""

from collections.abc import AsyncIterator, Coroutine, Iterable, Iterator
from typing import Any

from _typeshed import ReadableBuffer

from fastsock.stats import RingStats

MAX_SOURCE_LEN: int
"""Longest ``source`` blob, in bytes: 128, the size of a ``sockaddr_storage``."""

class Batch:
    """Messages taken by one ``RingQueue.get_batch()`` call, stored in one buffer.

    The payloads lie back to back in a single read-only buffer exported through the buffer
    protocol, so ``memoryview(batch)`` sees them all without a copy: message ``i`` is
    ``memoryview(batch)[batch.offsets[i]:batch.offsets[i + 1]]``.  Indexing and iteration
    return each message as ``bytes``.  Batches are made only by ``get_batch()``.
    """

    def __len__(self) -> int:
        """Number of messages in the batch."""

    def __getitem__(self, index: int) -> bytes:
        """Message ``index`` (negative indices count from the end) as a new bytes object."""

    def __iter__(self) -> Iterator[bytes]:
        """Every message, in queue order, each as a new bytes object."""

    def __buffer__(self, flags: int, /) -> memoryview:
        """All payloads back to back, read-only, format ``"B"``."""

    @property
    def nbytes(self) -> int:
        """Total bytes of payload: the length of the buffer."""

    @property
    def offsets(self) -> memoryview:
        """Read-only int64 (format ``"q"``) view of ``len(batch) + 1`` offsets into the
        buffer; message ``i`` spans ``offsets[i]`` to ``offsets[i + 1]``."""

    @property
    def source_ids(self) -> memoryview:
        """Read-only uint32 (format ``"I"``) view of each message's ``source_id``."""

class RingQueue:
    """A bounded FIFO of byte messages, shared with forked processes.

    ``max_messages`` (default ``RING_MAX_MESSAGES``) bounds the messages queued and
    ``max_bytes`` (default ``RING_MAX_BYTES``) their total payload; both lie between 1 and
    2**32 - 1, and a message larger than ``max_bytes`` is rejected with ``ValueError``.
    The ring is full when the next message would exceed either bound.  A producer paused
    by a full ring (the compiled receive loop) resumes only once the ring has drained to
    ``resume_fraction`` (default ``RING_RESUME_FRACTION``, 0 <= fraction < 1) of both
    bounds, so that it does not flap between paused and running, and once the message it
    holds fits.

    Blocking calls sleep without the GIL and wake every ``RING_WAIT_SLICE`` seconds to run
    signal handlers, so Ctrl-C interrupts them promptly.  Every method is safe to call from
    any number of threads and processes at once.

    The shared memory holds the record area sized for the worst case of both bounds (about
    ``max_bytes + 156 * max_messages`` bytes, plus up to 800 KiB for the part of one batch
    of messages that gets have taken already), touched only as messages pass through it.
    The messages of one put are stored as one record, so a batch costs one copy each way;
    when a get empties the ring, the next put starts over at the front of the area, so a
    consumer that keeps up keeps the memory in use small and in the cache.
    """

    def __init__(
        self,
        max_messages: int = 65536,
        max_bytes: int = 67108864,
        *,
        resume_fraction: float = 0.5,
    ) -> None:
        """Map the queue's shared memory.  Raises ``ValueError`` or ``TypeError`` for bad
        bounds, ``OSError`` if the memory cannot be mapped."""

    @property
    def max_messages(self) -> int:
        """The bound on queued messages."""

    @property
    def max_bytes(self) -> int:
        """The bound on queued payload bytes, and the largest message accepted."""

    # -- Producer side -----------------------------------------------------------------

    def put(
        self,
        data: ReadableBuffer,
        block: bool = True,
        timeout: float | None = None,
        *,
        source_id: int = 0,
        source: ReadableBuffer | None = None,
    ) -> None:
        """Append a copy of ``data``, waiting while the ring is full: forever when
        ``timeout`` is None, else up to ``timeout`` seconds, then ``queue.Full``; with
        ``block=False`` raise ``queue.Full`` at once.  Raises ``QueueClosed`` if the queue
        is or becomes closed, ``ValueError`` if ``data`` is larger than ``max_bytes`` or
        ``source`` longer than ``MAX_SOURCE_LEN``.  A put that finds the ring full counts
        one ``full_events``."""

    def put_nowait(
        self, data: ReadableBuffer, *, source_id: int = 0, source: ReadableBuffer | None = None
    ) -> None:
        """``put(data, block=False, ...)``."""

    def put_many(self, items: Iterable[ReadableBuffer], *, source_id: int = 0) -> int:
        """Append the items, in order and under one lock acquisition, until one does not
        fit; return how many were appended, without ever blocking.  Every item is checked
        (``ValueError`` if one is larger than ``max_bytes``) before any is appended.
        Stopping early counts one ``full_events``; ``QueueClosed`` if closed."""

    def offer(
        self, data: ReadableBuffer, *, source_id: int = 0, source: ReadableBuffer | None = None
    ) -> bool:
        """Append ``data`` if it fits now and return True; otherwise drop it, count it in
        ``dropped_messages``/``dropped_bytes`` and ``full_events``, and return False.  For
        producers that must never block, such as datagram receivers.  ``QueueClosed`` and
        ``ValueError`` as for ``put``."""

    # -- Consumer side -----------------------------------------------------------------

    def get(self, block: bool = True, timeout: float | None = None) -> bytes:
        """Remove and return the oldest message, waiting as ``put`` does; raises
        ``queue.Empty`` on timeout or, with ``block=False``, at once.  Once the queue is
        closed the remaining messages are still returned, then ``QueueClosed`` is raised
        (without waiting)."""

    def get_nowait(self) -> bytes:
        """``get(block=False)``."""

    def get_many(
        self,
        max_items: int = 4096,
        timeout: float | None = None,
        *,
        block: bool = True,
        with_source: bool = False,
    ) -> list[bytes] | list[tuple[int, bytes | None, bytes]]:
        """Wait as ``get`` does until at least one message is queued, then remove and
        return up to ``max_items`` (default ``GET_MANY_DEFAULT``) oldest messages in one
        call.  With ``with_source=True`` each is a ``(source_id, source, payload)`` tuple,
        ``source`` being None when the message had none.  ``queue.Empty`` and
        ``QueueClosed`` as for ``get``."""

    def get_batch(
        self,
        max_items: int = 4096,
        timeout: float | None = None,
        *,
        block: bool = True,
        max_bytes: int | None = None,
    ) -> Batch:
        """Like ``get_many``, but return the messages as one ``Batch`` instead of one bytes
        object each.  ``max_bytes`` caps the batch's payload bytes; the first message is
        taken even if it alone exceeds the cap."""

    # -- asyncio consumer --------------------------------------------------------------
    #
    # The ring owns an eventfd, made by the constructor and so shared with forked producers.
    # An asyncio consumer that finds the ring empty counts itself in (in the shared memory)
    # and waits for the eventfd on its event loop (asyncio's or uvloop's), with no thread:
    # producers signal it only while a consumer is counted in, at the moments they would
    # wake a sleeping get() (the compiled receive loops every ENGINE_ANNOUNCE_AFTER messages
    # and at the end of each turn), and close() always does.  Taking messages never awaits,
    # so cancelling a wait loses no message and leaves no waiter counted.

    def get_many_async(
        self,
        max_items: int = 4096,
        timeout: float | None = None,
        *,
        with_source: bool = False,
    ) -> Coroutine[Any, Any, list[bytes] | list[tuple[int, bytes | None, bytes]]]:
        """``await ring.get_many_async()``: ``get_many`` on an event loop.  Waits, without
        blocking the loop, until at least one message is queued (or ``timeout`` seconds,
        then ``queue.Empty``); ``QueueClosed`` once the queue is closed and drained."""

    def get_batch_async(
        self, max_items: int = 4096, timeout: float | None = None, *, max_bytes: int | None = None
    ) -> Coroutine[Any, Any, Batch]:
        """``await ring.get_batch_async()``: ``get_batch`` on an event loop, waiting as
        ``get_many_async`` does."""

    def batches(
        self, max_items: int = 4096, *, with_source: bool = False
    ) -> AsyncIterator[list[bytes] | list[tuple[int, bytes | None, bytes]]]:
        """``async for messages in ring.batches():`` each non-empty ``get_many_async()``
        list, until the queue is closed and drained (``QueueClosed`` ends the iteration)."""

    # -- State -------------------------------------------------------------------------

    def qsize(self) -> int:
        """Number of messages queued now."""

    def empty(self) -> bool:
        """True if no message is queued now."""

    def full(self) -> bool:
        """True if a one-byte message would not fit now."""

    def map_into_process(self) -> None:
        """Map the ring's pages into this process's page tables in one pass.

        A forked process inherits the shared mapping but none of its page-table entries,
        so each page it writes first costs a fault: up to 16,384 for a 64 MiB ring, tens
        of milliseconds.  One read per kernel fault-around window (64 KiB) maps the pages
        already in use 16 at a time instead.  The compiled receive loop does it when the
        ring first makes it wait, the sign of a stream that will cycle through the ring;
        short connections never pay for it.
        """

    def close(self) -> None:
        """Close the queue for every process sharing it, and wake every blocked caller:
        puts raise ``QueueClosed`` from now on, gets return what is left and then raise it.
        Idempotent."""

    @property
    def closed(self) -> bool:
        """True once ``close()`` was called, in any process."""

    @property
    def stats(self) -> RingStats:
        """The queue's counters, summed over every process sharing it, read at one
        instant: put + dropped are what producers offered, put = got + queued."""
