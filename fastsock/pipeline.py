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
stubs (``pipeline.pyi``) and the README's "Pipelines and sinks" say the exact semantics.
"""

import base64
import datetime
import errno
import importlib
import json
import os
import sys
import typing
import urllib.parse

__all__ = [
    "AsyncSink",
    "FileSink",
    "Message",
    "Sink",
    "SinkUnavailable",
    "open_sink",
]


class Message(typing.NamedTuple):
    """One message as a sink receives it."""

    connection_id: int | None
    """The stream connection's id, shared by all its messages; None for datagrams."""
    peer: str | None
    """The sender as ``fastsock serve`` writes it ("127.0.0.1:5000", "[::1]:5000", a Unix
    path), or None when unknown (an unbound Unix sender, a stream in a prefork worker)."""
    payload: bytes


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


def encode_raw(messages, separator):
    """Each payload followed by ``separator``."""
    return b"".join(message.payload + separator for message in messages)


def encode_jsonl(messages):
    """One JSON object per message and line (the format ``fastsock serve --format jsonl``
    documents): time, peer, connection, and text or base64."""
    taken = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds")
    lines = []
    for connection_id, peer, payload in messages:
        entry = {"time": taken, "peer": peer, "connection": connection_id}
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
    ``fastsock serve --format jsonl`` documents.  A write is confirmed once the kernel has
    every byte.  A full disk or quota, or an I/O error, raises SinkUnavailable, and the
    retried batch resumes where the write stopped; any other error (a closed pipe) is
    fatal.  The file is opened at once: OSError if it cannot be.
    """

    def __init__(self, path=None, *, format="raw", separator=b"\n"):
        if format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, not {format!r}")
        self.path = None if path in (None, "-") else os.fspath(path)
        self.name = self.path or "stdout"
        self.format = format
        self.separator = bytes(separator)
        self._fd = sys.stdout.fileno() if self.path is None else self._open()
        # The batch a retryable error interrupted, and its bytes not yet written: written
        # again, the same batch resumes there, so no byte is written twice.
        self._pending_batch = None
        self._pending = b""

    @property
    def is_stdout(self):
        return self.path is None

    def _open(self):
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)

    def encode(self, messages):
        if self.format == "jsonl":
            return encode_jsonl(messages)
        return encode_raw(messages, self.separator)

    def write(self, messages):
        if messages is self._pending_batch:
            data = self._pending
        else:
            data = self.encode(messages)
        self._pending_batch = None
        view = memoryview(data)
        # os.write() until all is written, not a buffered stream's write(): when a signal
        # interrupts a large write to a pipe part way, CPython's BufferedWriter (3.10-3.13)
        # loses part of the data without an error.
        while view:
            try:
                view = view[os.write(self._fd, view) :]
            except OSError as exc:
                if exc.errno not in _RETRYABLE_WRITE_ERRORS:
                    raise
                self._pending_batch, self._pending = messages, bytes(view)
                raise SinkUnavailable(f"cannot write to {self.name}: {exc.strerror}") from exc

    def flush(self, timeout):
        """Nothing to do: write() hands every byte to the kernel before it returns."""

    def reopen(self):
        """Open the path anew (after logrotate renamed the file) and close the file written
        so far; OSError, and the old file kept, if the path cannot be opened.  Call it
        between two batches."""
        if self.is_stdout:
            raise ValueError("stdout cannot be reopened")
        new = self._open()
        old, self._fd = self._fd, new
        os.close(old)

    def close(self):
        if not self.is_stdout and self._fd >= 0:
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
    then: ImportError names the extra to install when the client library is missing.
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
    if scheme not in _BROKER_SINKS:
        known = ", ".join(["file", *sorted(_BROKER_SINKS)])
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
