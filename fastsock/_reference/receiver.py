"""Pure-Python reference of the compiled receive loop (fastsock/_recvloop.pyx).

Same constructor, methods and counters; it frames with whichever Framer and publishes to
whichever RingQueue it is given.
"""

import array
import dataclasses
import errno
import fcntl
import os
import queue
import socket
import struct
import termios
import threading
import time

from fastsock._protocol_errors import BY_ERROR
from fastsock.constants import RECEIVE_CHECK_INTERVAL, RECV_SIZE, SPANS_PER_PUBLISH
from fastsock.errors import FramingError, QueueClosed
from fastsock.stats import ReceiveStats

__all__ = ["ConnectionLedger", "ReceiveCounters", "StreamReceiver"]

# The reference remembers this much of an offending message for offending_sample().
SAMPLE_KEPT = 4096
STOP_REASONS = {"idle": "evicted_idle", "memory": "evicted_memory"}


def count_unread(counters, fd):
    """Count the bytes the kernel still holds for fd: what a closing loop leaves unread."""
    queued = array.array("i", [0])
    try:
        fcntl.ioctl(fd, termios.FIONREAD, queued)
    except OSError:
        return
    if queued[0] > 0:
        counters.add("bytes_unread", queued[0])


def count_leftovers(counters, unpublished, framer, held_bytes):
    """Count what a closing connection leaves behind: its framed messages not published
    (dropped), their bytes and its incomplete message (discarded), its share of the
    partial-bytes gauge, and the connection itself as closed."""
    counters.add("messages_dropped", len(unpublished))
    counters.add("bytes_discarded", sum(map(len, unpublished)) + framer.eof())
    unpublished.clear()
    counters.hold_partial(held_bytes, 0)
    counters.add("connections_closed", 1)


class ReceiveCounters:
    """The counters of a server's receive loops (thread-safe, not shared across fork)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._values = {field.name: 0 for field in dataclasses.fields(ReceiveStats)}
        self.stop_requested = False
        self._last_connection_id = 0

    def next_connection_id(self):
        """A connection id unique among the loops counting here (wraps at 2**32)."""
        with self._lock:
            self._last_connection_id += 1
            return self._last_connection_id & 0xFFFFFFFF

    def count_refusal(self):
        """A connection was refused: max_connections were open and none could be evicted."""
        self.add("connections_refused", 1)

    def count_proxy_header(self, received, failed):
        """A PROXY header read in Python: its bytes were received; if it failed, they were
        discarded and the connection counts as a header error."""
        self.add("bytes_received", received)
        if failed:
            self.add("bytes_discarded", received)
            self.add("proxy_header_errors", 1)

    def request_stop(self):
        """Stop every loop counting here (in this process: the reference is not shared)."""
        self.stop_requested = True

    def add(self, name, amount):
        with self._lock:
            self._values[name] += amount

    @property
    def partial_bytes(self):
        """Bytes of incomplete messages held by every loop counting here, now."""
        with self._lock:
            return self._values["partial_bytes"]

    def hold_partial(self, held, now):
        """Move one loop's share of the partial-message bytes from held to now; the total."""
        with self._lock:
            self._values["partial_bytes"] += now - held
            return self._values["partial_bytes"]

    def snapshot(self):
        with self._lock:
            values = dict(self._values)
        values["paused_seconds"] /= 1e9
        return ReceiveStats(**values)


class ConnectionLedger:
    """Whether a loop's connection is open and the partial bytes it holds, for its parent to
    settle if its process dies (the reference's is not shared across fork: API parity)."""

    def __init__(self):
        self.open = False
        self.held_bytes = 0

    def settle(self, counters):
        """Count the connection closed and its partial message discarded if its loop never
        closed it; True if it had to."""
        if not self.open:
            return False
        counters.add("bytes_discarded", self.held_bytes)
        counters.hold_partial(self.held_bytes, 0)
        counters.add("connections_closed", 1)
        self.open, self.held_bytes = False, 0
        return True


class StreamReceiver:
    """Receives one connection, frames it and publishes the messages to a ring."""

    def __init__(
        self,
        fd,
        framer,
        ring,
        counters,
        source_id=0,
        *,
        recv_size=RECV_SIZE,
        idle_timeout=None,
        message_timeout=None,
        drain_timeout=0.0,
        partial_budget=None,
        on_over_budget=None,
        check_interval=RECEIVE_CHECK_INTERVAL,
        spans_per_publish=SPANS_PER_PUBLISH,
        ledger=None,
    ):
        if fd < 0:
            raise ValueError(f"fd must be an open file descriptor, not {fd}")
        if recv_size < 1 or spans_per_publish < 1 or not check_interval > 0:
            raise ValueError("recv_size, spans_per_publish and check_interval must be positive")
        if idle_timeout is not None and not idle_timeout > 0:
            raise ValueError(f"idle_timeout must be positive or None, not {idle_timeout!r}")
        if message_timeout is not None and not message_timeout > 0:
            raise ValueError(f"message_timeout must be positive or None, not {message_timeout!r}")
        if not drain_timeout >= 0:
            raise ValueError(f"drain_timeout must not be negative, not {drain_timeout!r}")
        if partial_budget is not None and not partial_budget > 0:
            raise ValueError(f"partial_budget must be positive or None, not {partial_budget!r}")
        if not os.get_blocking(fd):
            raise ValueError("the socket must be blocking: call settimeout(None) first")
        view = socket.socket(fileno=fd)
        try:
            seconds = int(check_interval)
            microseconds = int((check_interval - seconds) * 1e6)
            view.setsockopt(
                socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", seconds, microseconds)
            )
        finally:
            view.detach()
        self._fd = fd
        self._framer = framer
        self._ring = ring
        self._counters = counters
        self.source_id = source_id
        self._recv_size = recv_size
        self._idle_timeout = idle_timeout
        self._message_timeout = message_timeout
        self._message_started = None
        self._messages_at_start = 0
        self._check_interval = check_interval
        self._drain_timeout = drain_timeout
        self._drain_deadline = None
        self._stop_asked = False
        self._unread_counted = False
        self._partial_budget = partial_budget
        self._on_over_budget = on_over_budget
        self.held_bytes = 0
        self._offending = b""
        self._last_data = time.monotonic()
        self._unpublished = []
        self._stop_reason = None
        self._closed = False
        self._paused = False
        self.last_errno = 0
        counters.add("connections_opened", 1)
        self._ledger = ledger
        if ledger is not None:
            ledger.open = True

    def run(self):
        """Receive until the connection ends; return the name of the end."""
        if self._closed:
            raise ValueError("the receiver is closed")
        self._last_data = time.monotonic()
        end = self._receive()
        self._count_unread()
        return end

    def _receive(self):
        while True:
            end = self._publish() or self._stop_end()
            if end is not None:
                return end
            try:
                data = os.read(self._fd, self._recv_size)
            except BlockingIOError:
                if self._idle_timeout and time.monotonic() - self._last_data >= self._idle_timeout:
                    self._counters.add("idle_timeouts", 1)
                    return "idle_timeout"
                if self._message_overdue(time.monotonic()):
                    return "message_timeout"
                continue
            except (ConnectionResetError, ConnectionAbortedError, TimeoutError) as exc:
                self.last_errno = exc.errno
                self._counters.add("resets", 1)
                return "reset"
            except OSError as exc:
                self.last_errno = exc.errno
                if exc.errno == errno.ENOTCONN:
                    self._counters.add("resets", 1)
                    return "reset"
                return "os_error"
            if not data:
                if self._drain_deadline is not None:
                    # Everything the peer sent before the stop has been handed over.
                    return "stopped"
                return self._stop_end() or "eof"
            self._last_data = time.monotonic()
            self._counters.add("bytes_received", len(data))
            pending_start = self._framer.peek_pending(SAMPLE_KEPT)
            try:
                self._unpublished.extend(self._framer.feed(data))
            except FramingError as exc:
                self._keep_sample(exc, pending_start, data)
                return self._fail(exc)
            held = self._framer.pending
            over_budget = False
            if held != self.held_bytes:
                # As the compiled loop: the shared total moves only when this share does.
                total = self._counters.hold_partial(self.held_bytes, held)
                self.held_bytes = held
                if self._ledger is not None:
                    self._ledger.held_bytes = held
                over_budget = self._partial_budget and held and total > self._partial_budget
            if self._message_overdue(self._last_data):
                end = self._publish()
                return end if end is not None else "message_timeout"
            if over_budget and self._on_over_budget is not None:
                self._on_over_budget()

    def _stop_end(self):
        """None unless an eviction was asked for, or a stop's drain is over; the first stop
        seen shuts the socket both ways, as the compiled loop does (see its stop_end)."""
        if self._stop_reason is not None:
            return self._stop_reason
        if self._drain_deadline is None:
            if not (self._stop_asked or self._counters.stop_requested):
                return None
            self._drain_deadline = time.monotonic() + self._drain_timeout
            self._shutdown_socket(socket.SHUT_RDWR)
        if time.monotonic() >= self._drain_deadline:
            return "stopped"
        return None

    def _shutdown_socket(self, how):
        view = socket.socket(fileno=self._fd)
        try:
            view.shutdown(how)
        except OSError:
            pass
        finally:
            view.detach()

    def _count_unread(self):
        if self._unread_counted:
            return
        self._unread_counted = True
        count_unread(self._counters, self._fd)

    def _keep_sample(self, error, pending_start, data):
        # The offending message began in data unless the framer discarded more than data.
        if error.discarded <= len(data):
            start = len(data) - error.discarded
            self._offending = bytes(data[start : start + SAMPLE_KEPT])
        else:
            self._offending = (pending_start + bytes(data[:SAMPLE_KEPT]))[:SAMPLE_KEPT]

    def _message_overdue(self, now):
        # Per message: completing any message restarts the clock of the partial one.
        if not self._framer.pending:
            self._message_started = None
            return False
        if self._message_started is None or self._framer.messages_out != self._messages_at_start:
            self._message_started = now
            self._messages_at_start = self._framer.messages_out
            return False
        if self._message_timeout and now - self._message_started >= self._message_timeout:
            self._counters.add("message_timeouts", 1)
            return True
        return False

    def _fail(self, error):
        kind = BY_ERROR[type(error)]
        self._unpublished.extend(error.messages)
        self._counters.add(kind.counter, 1)
        self._counters.add("bytes_discarded", error.discarded)
        return self._publish() or kind.name

    def _publish(self):
        while self._unpublished:
            if self._paused:
                # Resuming: the silence clock restarts before a consumer can see the message.
                self._last_data = time.monotonic()
            try:
                self._ring.put_nowait(self._unpublished[0], source_id=self.source_id)
            except QueueClosed:
                return "ring_closed"
            except queue.Full:
                if not self._paused:
                    self._paused = True
                    self._counters.add("pauses", 1)
                paused_at = time.monotonic_ns()
                time.sleep(min(self._check_interval, 0.005))
                self._counters.add("paused_seconds", time.monotonic_ns() - paused_at)
                end = self._stop_end()
                if end is not None:
                    return end
                continue
            self._paused = False
            del self._unpublished[0]
            self._counters.add("messages_received", 1)
        return None

    def stop(self):
        """Stop gracefully (see the compiled loop's stop()); safe from any thread."""
        self._stop_asked = True

    def evict(self, reason):
        """End run() now with "evicted_idle" or "evicted_memory"."""
        if reason not in STOP_REASONS:
            raise ValueError(f"reason must be 'idle' or 'memory', not {reason!r}")
        self._stop_reason = STOP_REASONS[reason]
        self._counters.add(f"{reason}_evictions", 1)
        self._shutdown_socket(socket.SHUT_RD)

    @property
    def idle_seconds(self):
        """Seconds since the peer last sent anything (or since the receiver was made); 0 while
        the loop waits for ring room, which is backpressure, not silence."""
        if self._paused:
            return 0.0
        return time.monotonic() - self._last_data

    def offending_sample(self, limit):
        """The start of the line or frame a framing error ended run() on; b"" otherwise."""
        return b"" if self._closed else self._offending[:limit]

    def close(self):
        """Account for what the connection leaves behind; idempotent."""
        if self._closed:
            return
        self._closed = True
        count_leftovers(self._counters, self._unpublished, self._framer, self.held_bytes)
        self.held_bytes = 0
        if self._ledger is not None:
            self._ledger.open, self._ledger.held_bytes = False, 0
