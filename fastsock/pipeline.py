"""The consumer side of a receive server, as a library: drain a ring into a sink.

    ring = fastsock.RingQueue()
    server = fastsock.ThreadingTCPServer(addr, fastsock.receiver(ring, framing="lines"))
    pipeline = Pipeline(ring, open_sink("/var/log/ingest.log"), server=server)
    ...                                    # server.serve_forever() in a thread
    pipeline.run()                         # until pipeline.stop(): then drain, flush, close

A sink is anything with the three methods of ``Sink`` (or, for asyncio, ``AsyncSink``).
``Pipeline`` takes batches from the ring with ``get_many()``, names each message's sender,
and hands the batch to ``sink.write()``; a batch leaves the pipeline only when ``write()``
returned.  ``SinkUnavailable`` from the sink is retried with the same batch, with an
exponential back-off, taking nothing more from the ring meanwhile: the ring fills and the
receive loops stop reading, so stream senders are held back by TCP's flow control and
nothing received is lost while the process lives.  Any other exception is fatal.  The
docstrings below (this module carries its types inline, with no .pyi beside it) and the README's
"Pipelines and sinks" say the exact semantics.
"""

import asyncio
import base64
import datetime
import errno
import importlib
import inspect
import json
import logging
import os
import queue
import socket
import stat
import sys
import threading
import time
import typing
import urllib.parse

from fastsock._ratelimit import RateLimitedLogger
from fastsock.addresses import address_from_sockaddr, format_address
from fastsock.constants import (
    ERROR_LOG_INTERVAL,
    GET_MANY_DEFAULT,
    PIPELINE_STOP_TIMEOUT,
    PIPELINE_WAIT,
    RECEIVE_CHECK_INTERVAL,
    RING_WAIT_SLICE,
    SINK_RETRY_INITIAL,
    SINK_RETRY_MAX,
)
from fastsock.errors import QueueClosed
from fastsock.stats import PipelineStats

__all__ = [
    "AsyncPipeline",
    "AsyncSink",
    "FileSink",
    "Message",
    "Pipeline",
    "PipelineStats",
    "Sink",
    "SinkUnavailable",
    "is_async_sink",
    "open_sink",
]

_log = logging.getLogger("fastsock")
_errors = RateLimitedLogger(_log, ERROR_LOG_INTERVAL)


class Message(typing.NamedTuple):
    """One message as a sink receives it."""

    connection_id: int | None
    """The stream connection's id, shared by all its messages; None for datagrams."""
    peer: str | None
    """The sender as ``fastsock serve`` writes it ("127.0.0.1:5000", "[::1]:5000", a Unix
    path), or None when unknown (an unbound Unix sender, a stream in a prefork worker)."""
    payload: bytes


# Message(...) runs the named tuple's __new__, a Python function, for every message of every
# batch; tuple.__new__ makes the same Message without it, in half the time.
_new_tuple = tuple.__new__


class SinkUnavailable(Exception):
    """Retryable: the destination is down, too slow, or refused the batch.

    The pipeline writes the *same* batch again after an exponential back-off
    (``constants.SINK_RETRY_INITIAL`` doubling up to ``SINK_RETRY_MAX``) and takes nothing
    more from the ring meanwhile, so the ring fills and stream senders are pushed back
    through TCP.  Any other exception from a sink is fatal: the pipeline stops and raises it.
    """


class Sink(typing.Protocol):
    """A synchronous sink: a file, stdout, a Redis stream, a Kafka topic."""

    def write(self, messages: list[Message]) -> None:
        """Deliver the batch, in order; return only once every message is confirmed (written
        to the kernel, acknowledged by the broker).  Raise SinkUnavailable to have the same
        list passed again later: a sink may keep state to resume a partly written batch."""

    def flush(self, timeout: float) -> None:
        """Push out anything buffered, within ``timeout`` seconds."""

    def close(self) -> None:
        """Release the sink's resources; called once, last."""


class AsyncSink(typing.Protocol):
    """An asyncio sink (NATS JetStream): the methods of ``Sink`` as coroutines."""

    async def write(self, messages: list[Message]) -> None:
        """As ``Sink.write``."""

    async def flush(self, timeout: float) -> None:
        """As ``Sink.flush``."""

    async def close(self) -> None:
        """As ``Sink.close``."""


# -- File sinks ------------------------------------------------------------------------------

FORMATS = ("raw", "jsonl")

# Errors a full or failing disk gives, which an operator can clear while the pipeline
# waits (free space, raise a quota, remount); any other write error is fatal.
_RETRYABLE_WRITE_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EAGAIN})


def encode_raw(messages: list[Message], separator: bytes) -> bytes:
    """Each payload followed by ``separator``."""
    return b"".join(message.payload + separator for message in messages)


def encode_jsonl(
    messages: list[Message], subject_of: "typing.Callable[[int], str | None] | None" = None
) -> bytes:
    """One JSON object per message and line (the format ``fastsock serve --format jsonl``
    documents): time, peer, connection, the TLS client certificate's subject when
    ``subject_of`` (connection id -> subject) is given, and text or base64."""
    taken = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds")
    lines = []
    for connection_id, peer, payload in messages:
        entry = {"time": taken, "peer": peer, "connection": connection_id}
        if subject_of is not None:
            entry["subject"] = subject_of(connection_id)
        try:
            entry["text"] = payload.decode("utf-8")
        except UnicodeDecodeError:
            entry["base64"] = base64.b64encode(payload).decode("ascii")
        lines.append(json.dumps(entry, ensure_ascii=False))
    return ("\n".join(lines) + "\n").encode()


class FileSink:
    """Appends messages to a file (``path``) or to stdout (``path`` None or "-").

    ``format`` "raw" writes each payload followed by ``separator`` (b"" keeps a raw
    stream's bytes exactly as received); "jsonl" writes one JSON object per message, as
    ``fastsock serve --format jsonl`` documents, with a "subject" in each record when
    ``subject_of`` (connection id -> the TLS client certificate's subject, such as
    ``StreamPath.peer_subject``) is given.  A write is confirmed once the kernel has every
    byte.  A full disk or quota, or an I/O error, raises SinkUnavailable, and the
    retried batch resumes where the write stopped; any other error (a closed pipe) is
    fatal.  A batch given up part-written (at ``close()``, at a ``reopen()``, when another
    batch is written instead, or on a fatal error) is cut off a regular file again, so a
    reader finds each batch whole or not at all, and a pipeline's ``undelivered`` counts
    exactly the messages missing; a pipe or terminal cannot be cut, and keeps the part
    written.  The file is opened at once: OSError if it cannot be.
    """

    def __init__(
        self,
        path: "str | os.PathLike[str] | None" = None,
        *,
        format: str = "raw",
        separator: bytes = b"\n",
        subject_of: "typing.Callable[[int], str | None] | None" = None,
    ) -> None:
        if format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, not {format!r}")
        self.path = None if path in (None, "-") else os.fspath(path)
        self.name = self.path or "stdout"
        self.format = format
        self.separator = bytes(separator)
        self.subject_of = subject_of
        self._fd = sys.stdout.fileno() if self.path is None else self._open()
        # The batch a retryable error interrupted, its bytes not yet written, and how many
        # it wrote: written again, the same batch resumes there, so no byte is written
        # twice; given up, its written bytes are cut off again (_give_up_pending).
        self._pending_batch = None
        self._pending = b""
        self._pending_written = 0

    @property
    def is_stdout(self) -> bool:
        return self.path is None

    def fileno(self) -> int:
        """The file descriptor written to."""
        return self._fd

    def _open(self):
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)

    def encode(self, messages: list[Message]) -> bytes:
        if self.format == "jsonl":
            return encode_jsonl(messages, self.subject_of)
        return encode_raw(messages, self.separator)

    def write(self, messages: list[Message]) -> None:
        if messages is self._pending_batch:
            data, written = self._pending, self._pending_written
        else:
            self._give_up_pending()
            data, written = self.encode(messages), 0
        self._pending_batch, self._pending, self._pending_written = None, b"", 0
        view = memoryview(data)
        # os.write() until all is written, not a buffered stream's write(): when a signal
        # interrupts a large write to a pipe part way, CPython's BufferedWriter (3.10-3.13)
        # loses part of the data without an error.
        while view:
            try:
                done = os.write(self._fd, view)
            except OSError as exc:
                self._pending_batch, self._pending = messages, bytes(view)
                self._pending_written = written
                if exc.errno not in _RETRYABLE_WRITE_ERRORS:
                    self._give_up_pending()
                    raise
                raise SinkUnavailable(f"cannot write to {self.name}: {exc.strerror}") from exc
            view = view[done:]
            written += done

    def _give_up_pending(self):
        """Cut the part of the interrupted batch that was written off the file again: a
        record torn at the end of the file, or whole ones of a batch counted undelivered,
        would mislead its reader.  Not possible on a pipe or terminal, whose reader may
        have the bytes already."""
        written, self._pending_written = self._pending_written, 0
        self._pending_batch, self._pending = None, b""
        if written and stat.S_ISREG(os.fstat(self._fd).st_mode):
            # Where this process's writes ended, also when the descriptor lacks O_APPEND
            # (stdout redirected with >); seeking back there, the next write follows on.
            end = os.lseek(self._fd, 0, os.SEEK_CUR) - written
            os.ftruncate(self._fd, end)
            os.lseek(self._fd, end, os.SEEK_SET)

    def flush(self, timeout: float) -> None:
        """Nothing to do: write() hands every byte to the kernel before it returns."""

    def reopen(self) -> None:
        """Open the path anew (after logrotate renamed the file) and close the file written
        so far; OSError, and the old file kept, if the path cannot be opened.  Call it
        between two batches."""
        if self.is_stdout:
            raise ValueError("stdout cannot be reopened")
        new = self._open()
        # A batch retried across the reopen is written whole to the new file.
        batch = self._pending_batch
        self._give_up_pending()
        if batch is not None:
            self._pending_batch, self._pending = batch, self.encode(batch)
        old, self._fd = self._fd, new
        os.close(old)

    def close(self) -> None:
        if self._fd < 0:
            return
        try:
            self._give_up_pending()
        finally:
            if not self.is_stdout:
                os.close(self._fd)
            self._fd = -1


# -- open_sink -------------------------------------------------------------------------------

# scheme: (module, class, the extra that installs its client library)
_BROKER_SINKS = {
    "redis": ("fastsock.sinks.redis", "RedisStreamSink", "redis"),
    "rediss": ("fastsock.sinks.redis", "RedisStreamSink", "redis"),
    "nats": ("fastsock.sinks.nats", "NatsJetStreamSink", "nats"),
    "kafka": ("fastsock.sinks.kafka", "KafkaSink", "kafka"),
}


def open_sink(url: str, *, format: str = "raw", separator: bytes = b"\n") -> "Sink | AsyncSink":
    """The sink a URL names.

    "-" or "stdout": stdout; a path or file:///PATH: that file, appended to (``format``
    "raw", each payload and ``separator``, or "jsonl"; see ``FileSink``); redis://,
    rediss://, nats://, kafka://: the broker sinks of ``fastsock.sinks``, imported only
    then: ImportError names the extra to install when the client library is missing;
    python://MODULE:CLASS?QUERY: a sink class of your own, ``CLASS.from_url(url)``.
    ValueError for an unknown scheme; OSError if the file cannot be opened.
    """
    if url in ("-", "stdout"):
        return FileSink(None, format=format, separator=separator)
    scheme, has_scheme, _ = url.partition("://")
    if not has_scheme:
        return FileSink(url, format=format, separator=separator)
    scheme = scheme.lower()
    if scheme == "file":
        path = urllib.parse.unquote(urllib.parse.urlsplit(url).path)
        if not path:
            raise ValueError(f"{url!r} names no file: say file:///PATH")
        return FileSink(path, format=format, separator=separator)
    if scheme == "python":
        return _user_sink(url)
    if scheme not in _BROKER_SINKS:
        known = ", ".join(["file", "python", *sorted(_BROKER_SINKS)])
        raise ValueError(f"{url!r}: unknown sink scheme {scheme!r} (known: {known}, or a path)")
    module_name, class_name, extra = _BROKER_SINKS[scheme]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(
            f"the {scheme}:// sink needs a client library that is not installed ({exc}): "
            f"pip install 'fastsock[{extra}]'"
        ) from exc
    return getattr(module, class_name).from_url(url)


def _user_sink(url):
    """python://MODULE:CLASS?QUERY: ``CLASS.from_url(url)``, CLASS imported from MODULE."""
    spec = url.partition("://")[2].partition("?")[0]
    module_name, _, class_name = spec.partition(":")
    if not module_name or not class_name:
        raise ValueError(f"{url!r} names no class: say python://MODULE:CLASS?...")
    module = importlib.import_module(module_name)
    try:
        sink_class = getattr(module, class_name)
    except AttributeError:
        raise ValueError(f"{url!r}: module {module_name} has no {class_name}") from None
    return sink_class.from_url(url)


def is_async_sink(sink: "Sink | AsyncSink") -> bool:
    """True for an ``AsyncSink`` (its write() is a coroutine function)."""
    return inspect.iscoroutinefunction(sink.write)


# -- Pipelines -------------------------------------------------------------------------------


class _Deliveries:
    """What both pipelines share: the batches' Messages, the counters, the stop deadline."""

    def __init__(
        self,
        ring: typing.Any,
        sink: typing.Any,
        *,
        server: typing.Any = None,
        datagram: bool | None = None,
        max_batch: int = GET_MANY_DEFAULT,
        while_unavailable: "typing.Callable[[], object] | None" = None,
    ) -> None:
        self.ring = ring
        self.sink = sink
        self.server = server
        self.while_unavailable = while_unavailable
        if datagram is None:
            datagram = server is not None and server.socket_type == socket.SOCK_DGRAM
        self.datagram = datagram
        self.max_batch = max_batch
        self.last_error = None
        self._sink_open = True
        # A batch the sink has not taken yet, kept across deliver() calls (see _set_aside).
        self._held = None
        self._stop_at = None
        self._batches = self._messages = self._bytes = 0
        self._retries = self._sink_errors = self._undelivered = 0
        self._delivery_seconds = 0.0

    def stop(self, timeout: float = PIPELINE_STOP_TIMEOUT) -> None:
        """Ask ``run()`` to stop: it then delivers what is left for at most ``timeout``
        seconds from now.  Safe in a signal handler; a later call can only bring the
        deadline nearer."""
        deadline = time.monotonic() + timeout
        if self._stop_at is None or deadline < self._stop_at:
            self._stop_at = deadline

    @property
    def stopping(self) -> bool:
        """True once ``stop()`` was called."""
        return self._stop_at is not None

    @property
    def stats(self) -> PipelineStats:
        """The counters now: a ``PipelineStats``."""
        return PipelineStats(
            batches_delivered=self._batches,
            messages_delivered=self._messages,
            bytes_delivered=self._bytes,
            retries=self._retries,
            sink_errors=self._sink_errors,
            undelivered=self._undelivered,
            lag=self.ring.qsize(),
            delivery_seconds=self._delivery_seconds,
        )

    def messages(self, records: list[tuple[int, bytes | None, bytes]]) -> list[Message]:
        """``Message``s of the ``(source_id, source, payload)`` records of a get_many(),
        asking the server for each connection's (or decoding each sender's) address once."""
        peers = {}
        batch = []
        if self.datagram:
            for _, source, payload in records:
                peer = peers.get(source, peers)
                if peer is peers:
                    peer = peers[source] = format_address(address_from_sockaddr(source))
                batch.append(_new_tuple(Message, (None, peer, payload)))
            return batch
        server = self.server
        # A take holds a connection's lines in runs (one run per read): its peer is looked
        # up where the connection changes.
        run_id, peer = object(), None
        for connection_id, _, payload in records:
            if connection_id != run_id:
                run_id = connection_id
                peer = peers.get(connection_id, peers)
                if peer is peers:
                    address = None if server is None else server.connection_address(connection_id)
                    peer = peers[connection_id] = format_address(address)
            batch.append(_new_tuple(Message, (connection_id, peer, payload)))
        return batch

    def _confirmed(self, batch, seconds):
        self._batches += 1
        self._messages += len(batch)
        self._bytes += sum(len(message.payload) for message in batch)
        self._delivery_seconds += seconds

    def _refused(self, exc):
        self._sink_errors += 1
        self.last_error = exc
        _errors.warning("sink", "sink unavailable, retrying: %s", exc)

    def _failed(self, exc, batch):
        self._sink_errors += 1
        self._undelivered += len(batch)
        self.last_error = exc

    def _attempts(self, batch):
        """The delivery of one batch without its I/O, for both pipelines: a generator that
        yields None when the batch is to be written (send back the SinkUnavailable the write
        raised, or None once it returned) and the seconds to sleep between two writes; it
        returns the messages delivered, 0 if the batch was set aside."""
        stop_seen = self._stop_at is not None
        delay = SINK_RETRY_INITIAL
        while True:
            started = time.monotonic()
            refusal = yield None
            if refusal is None:
                self._confirmed(batch, time.monotonic() - started)
                return len(batch)
            self._refused(refusal)
            retry_at = time.monotonic() + delay
            while (pause := self._pause(retry_at, stop_seen)) != 0.0:
                if pause is None:
                    self._set_aside(batch)
                    return 0
                yield pause
            self._retries += 1
            delay = min(2 * delay, SINK_RETRY_MAX)

    def _pause(self, until, stop_seen):
        """Seconds to sleep before the retry due at ``until`` (0: retry now), or None once
        the stop's deadline has passed, or when a stop was requested since the batch was
        taken (``stop_seen`` False): see ``_set_aside``."""
        now = time.monotonic()
        if self._stop_at is not None and (now >= self._stop_at or not stop_seen):
            return None
        if now >= until:
            return 0.0
        # In slices, so that a stop requested meanwhile is seen promptly.
        limit = until if self._stop_at is None else min(until, self._stop_at)
        return min(limit - now, RING_WAIT_SLICE)

    def _set_aside(self, batch):
        """Past the stop's deadline the batch is undelivered; before it, it is held for the
        next deliver(), which returns meanwhile so that its caller can act on the stop
        (stop the receivers) while the sink stays unavailable."""
        if self._deadline_passed():
            self._undelivered += len(batch)
        else:
            self._held = batch

    def _unavailable_pause_done(self):
        # A deliver() can wait out a long outage: its caller still reports meanwhile.
        if self.while_unavailable is not None:
            self.while_unavailable()

    def _deadline_passed(self):
        return self._stop_at is not None and time.monotonic() >= self._stop_at

    def _count_left(self):
        """The ring is closed: what is still in it, or held, is undelivered."""
        if self._held is not None:
            self._undelivered += len(self._held)
            self._held = None
        while True:
            try:
                left = self.ring.get_many(self.max_batch, block=False)
            except (QueueClosed, queue.Empty):
                return
            self._undelivered += len(left)

    def _flush_timeout(self):
        if self._stop_at is None:
            return PIPELINE_STOP_TIMEOUT
        return max(0.0, self._stop_at - time.monotonic())


class _Call(threading.Thread):
    """A function called in a thread of its own, its exception kept for ``result()``."""

    def __init__(self, function):
        super().__init__(target=self._call, args=(function,), name="fastsock-pipeline-stop")
        self.failure = None
        self.start()

    def _call(self, function):
        try:
            function()
        except BaseException as exc:
            self.failure = exc

    def result(self):
        self.join()
        if self.failure is not None:
            raise self.failure


class Pipeline(_Deliveries):
    """Drains ``ring`` into ``sink`` (a ``Sink``), one batch at a time.

    ``server`` (the receiving server, or None) names each stream message's sender through
    ``connection_address()``; ``datagram`` says the ring holds datagrams, whose senders are
    in the messages (default: whether ``server`` is a datagram server).  ``max_batch``
    bounds the messages of one batch.  ``while_unavailable``, if given, is called after each
    wait between two attempts at a batch the sink refused, so that a caller whose
    ``deliver()`` waits out a long outage can still report (``fastsock serve`` prints its
    counters from it).  ``run()`` delivers until ``stop()``, then finishes; or call
    ``deliver()`` in a loop of your own and ``finish()`` at the end.
    """

    def deliver(self, timeout: float = 0.0) -> int:
        """Take one batch, waiting up to ``timeout`` seconds for its first message, and
        deliver it, retrying while the sink is unavailable; return its size, 0 if no message
        came.  A ``stop()`` while the sink refuses the batch makes it return 0 at once,
        holding the batch for the next call, which retries it until the stop's deadline;
        past that the batch is counted ``undelivered``.
        ``QueueClosed`` once the ring is closed and drained; a fatal sink error propagates,
        its batch counted undelivered."""
        batch, self._held = self._held, None
        if batch is None:
            try:
                records = self.ring.get_many(
                    self.max_batch, timeout=timeout, block=timeout > 0, with_source=True
                )
            except queue.Empty:
                return 0
            batch = self.messages(records)
        steps = self._attempts(batch)
        try:
            pause = next(steps)
            while True:
                if pause is None:
                    try:
                        self.sink.write(batch)
                    except SinkUnavailable as exc:
                        pause = steps.send(exc)
                    else:
                        pause = steps.send(None)
                else:
                    time.sleep(pause)
                    self._unavailable_pause_done()
                    pause = next(steps)
        except StopIteration as done:
            return done.value
        except BaseException as exc:
            self._failed(exc, batch)
            raise

    def run(self, stop_producers: "typing.Callable[[], object] | None" = None) -> PipelineStats:
        """Deliver until ``stop()`` (or until the ring is closed and drained); then run
        ``stop_producers`` (a function, e.g. one that calls ``server.shutdown()`` and
        ``server.server_close()``) in a thread while delivering what they hand over, and
        ``finish()``; return the final ``stats``.  A fatal sink error closes the ring and
        the sink, counts what is left undelivered, and propagates."""
        try:
            while self._stop_at is None:
                self.deliver(PIPELINE_WAIT)
            if stop_producers is not None:
                self.deliver_while(stop_producers)
        except QueueClosed:
            pass
        except BaseException:
            self.abort()
            raise
        self.finish()
        return self.stats

    def deliver_while(self, function: "typing.Callable[[], object]") -> None:
        """Call ``function`` in a thread of its own and deliver until it returns: a graceful
        stop of the producers, whose receive loops wait for ring room to hand over what
        their peers sent.  Its exception, if any, is raised here."""
        running = _Call(function)
        while running.is_alive():
            self.deliver(RECEIVE_CHECK_INTERVAL)
        running.result()

    def finish(self) -> None:
        """Close the ring, deliver what is left in it until the stop's deadline (``stop()``'s
        timeout; ``PIPELINE_STOP_TIMEOUT`` if it was not called), flush the sink within
        what is left of the deadline, and close it.  Stop the producers first: the
        receivers' graceful stop hands over what their peers sent, and a producer still
        running finds the ring closed.  What is left at the deadline is ``undelivered``."""
        if self._stop_at is None:
            self.stop()
        self.ring.close()
        try:
            while not self._deadline_passed():
                self.deliver(0.0)
        except QueueClosed:
            pass
        except BaseException:
            self.abort()
            raise
        try:
            self.sink.flush(self._flush_timeout())
        except SinkUnavailable as exc:
            self._sink_errors += 1
            self.last_error = exc
        finally:
            self._count_left()
            self._close_sink()

    def abort(self) -> None:
        """Stop at once: close the ring and the sink, counting what is left undelivered."""
        self.ring.close()
        self._count_left()
        self._close_sink()

    def _close_sink(self):
        if self._sink_open:
            self._sink_open = False
            self.sink.close()


class AsyncPipeline(_Deliveries):
    """``Pipeline`` for an ``AsyncSink``, on an asyncio (or uvloop) event loop: it waits for
    messages with ``ring.get_many_async()``, without a thread.  The same arguments, and the
    same methods as coroutines; ``stop()`` stays a plain function (call it from a
    ``loop.add_signal_handler`` callback)."""

    async def deliver(self, timeout: float = 0.0) -> int:
        """As ``Pipeline.deliver``."""
        batch, self._held = self._held, None
        if batch is None:
            try:
                records = await self.ring.get_many_async(
                    self.max_batch, timeout=timeout, with_source=True
                )
            except queue.Empty:
                return 0
            batch = self.messages(records)
        steps = self._attempts(batch)
        try:
            pause = next(steps)
            while True:
                if pause is None:
                    try:
                        await self.sink.write(batch)
                    except SinkUnavailable as exc:
                        pause = steps.send(exc)
                    else:
                        pause = steps.send(None)
                else:
                    await asyncio.sleep(pause)
                    self._unavailable_pause_done()
                    pause = next(steps)
        except StopIteration as done:
            return done.value
        except BaseException as exc:
            self._failed(exc, batch)
            raise

    async def run(
        self, stop_producers: "typing.Callable[[], object] | None" = None
    ) -> PipelineStats:
        """As ``Pipeline.run``."""
        try:
            while self._stop_at is None:
                await self.deliver(PIPELINE_WAIT)
            if stop_producers is not None:
                await self.deliver_while(stop_producers)
        except QueueClosed:
            pass
        except BaseException:
            await self.abort()
            raise
        await self.finish()
        return self.stats

    async def deliver_while(self, function: "typing.Callable[[], object]") -> None:
        """As ``Pipeline.deliver_while``: ``function`` runs in a thread, the loop delivers."""
        running = _Call(function)
        while running.is_alive():
            await self.deliver(RECEIVE_CHECK_INTERVAL)
        running.result()

    async def finish(self) -> None:
        """As ``Pipeline.finish``."""
        if self._stop_at is None:
            self.stop()
        self.ring.close()
        try:
            while not self._deadline_passed():
                await self.deliver(0.0)
        except QueueClosed:
            pass
        except BaseException:
            await self.abort()
            raise
        try:
            await self.sink.flush(self._flush_timeout())
        except SinkUnavailable as exc:
            self._sink_errors += 1
            self.last_error = exc
        finally:
            self._count_left()
            await self._close_sink()

    async def abort(self) -> None:
        """As ``Pipeline.abort``."""
        self.ring.close()
        self._count_left()
        await self._close_sink()

    async def _close_sink(self):
        if self._sink_open:
            self._sink_open = False
            await self.sink.close()
