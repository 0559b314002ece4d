"""Pure-Python reference of the compiled datagram receive loop (fastsock/_dgramloop.pyx).

Same constructor, methods, ends and counters; it receives one datagram per recvmsg() call
and publishes to whichever RingQueue it is given, with ``offer()``.  Sender addresses go to
the ring as the raw sockaddr the kernel reported, rebuilt from the socket module's address.
"""

import dataclasses
import errno
import operator
import os
import socket
import struct
import threading
import time

from fastsock.addresses import sockaddr_from_address
from fastsock.constants import (
    DATAGRAM_BATCH,
    DATAGRAM_BUSY_POLL,
    DATAGRAM_MAX_SIZE,
    RECEIVE_CHECK_INTERVAL,
)
from fastsock.errors import QueueClosed
from fastsock.stats import DatagramStats

__all__ = ["DatagramCounters", "DatagramReceiver"]

# Linux's values (asm-generic/socket.h, linux/sock_diag.h); the socket module lacks them.
SO_MEMINFO = 55
SK_MEMINFO_DROPS = 8
_DROPS = struct.Struct("=I")
_MAX_BATCH = 1024
_MAX_RECEIVE_BUFFER = 2**31 - 1
_MAX_CHECK_INTERVAL = 86400.0


class DatagramCounters:
    """The counters of a server's datagram loops (thread-safe, not shared across fork)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._values = {field.name: 0 for field in dataclasses.fields(DatagramStats)}

    def add(self, name, amount):
        with self._lock:
            self._values[name] += amount

    def snapshot(self):
        with self._lock:
            return DatagramStats(**self._values)

    def offer_counted(self, ring, data, source):
        """``ring.offer()`` and its count in one step, so that a snapshot never lags what a
        consumer may have taken already; False if the ring is full or closed."""
        with self._lock:
            try:
                published = ring.offer(data, source=source)
            except QueueClosed:
                published = False
            if published:
                self._values["datagrams_received"] += 1
                self._values["bytes_received"] += len(data)
            else:
                self._values["dropped_queue_full"] += 1
                self._values["dropped_queue_full_bytes"] += len(data)
        return published


class DatagramReceiver:
    """Receives one datagram socket and publishes each datagram to a ring."""

    def __init__(
        self,
        fd,
        ring,
        counters,
        *,
        max_datagram=DATAGRAM_MAX_SIZE,
        batch=DATAGRAM_BATCH,
        check_interval=RECEIVE_CHECK_INTERVAL,
        receive_buffer=None,
        busy_poll=DATAGRAM_BUSY_POLL,
        drain_timeout=0.0,
    ):
        # batch and busy_poll are checked as the compiled loop checks them; one recvmsg()
        # per datagram has neither batches to take nor a reason to poll.
        fd = operator.index(fd)
        if fd < 0:
            raise ValueError(f"fd must be an open file descriptor, not {fd}")
        max_datagram = operator.index(max_datagram)
        if not 1 <= max_datagram <= ring.max_bytes:
            raise ValueError(
                f"max_datagram must be between 1 and the ring's max_bytes "
                f"({ring.max_bytes}), not {max_datagram}"
            )
        batch = operator.index(batch)
        if not 1 <= batch <= _MAX_BATCH:
            raise ValueError(f"batch must be between 1 and {_MAX_BATCH}, not {batch}")
        check_interval = float(check_interval)
        if not 0 < check_interval <= _MAX_CHECK_INTERVAL:
            raise ValueError(
                f"check_interval must be > 0 and <= {_MAX_CHECK_INTERVAL} seconds, "
                f"not {check_interval}"
            )
        if not drain_timeout >= 0:
            raise ValueError(f"drain_timeout must not be negative, not {drain_timeout!r}")
        if not 0 <= busy_poll <= check_interval:
            raise ValueError(
                f"busy_poll must be between 0 and check_interval ({check_interval}) seconds, "
                f"not {busy_poll}"
            )
        if receive_buffer is not None:
            receive_buffer = operator.index(receive_buffer)
            if not 1 <= receive_buffer <= _MAX_RECEIVE_BUFFER:
                raise ValueError(
                    f"receive_buffer must be between 1 and {_MAX_RECEIVE_BUFFER} or None, "
                    f"not {receive_buffer}"
                )
        blocking = os.get_blocking(fd)
        with _borrowed(fd) as view:
            if view.type != socket.SOCK_DGRAM:
                raise ValueError(f"fd {fd} is not a datagram socket")
            if not blocking:
                raise ValueError("the socket must be blocking: call settimeout(None) first")
            if receive_buffer is not None:
                view.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
            seconds = int(check_interval)
            microseconds = int((check_interval - seconds) * 1e6)
            view.setsockopt(
                socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", seconds, microseconds)
            )
            # Drops before this receiver existed are not its to count.
            self._drops_seen = _read_drops(view) or 0
        self._fd = fd
        self._ring = ring
        self._counters = counters
        self._max_datagram = max_datagram
        self._check_interval = check_interval
        self._drain_timeout = drain_timeout
        self._stop_requested = False
        self._running = False
        self.last_errno = 0

    @property
    def receive_buffer(self):
        with _borrowed(self._fd) as view:
            return view.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)

    def run(self):
        """Receive until stopped or failed; return the name of the end."""
        if self._running:
            raise RuntimeError("run() is already running in another thread")
        self._running = True
        try:
            with _borrowed(self._fd) as view:
                end = self._receive(view)
                self._observe_drops(_read_drops(view))
                return end
        finally:
            self._running = False

    def stop(self):
        """Stop gracefully (see _drain()); safe from any thread."""
        self._stop_requested = True

    def _receive(self, view):
        check_at = time.monotonic() + self._check_interval
        while True:
            if self._ring.closed:
                return "ring_closed"
            if self._stop_requested:
                return self._drain(view)
            if time.monotonic() >= check_at:
                check_at = time.monotonic() + self._check_interval
                self._observe_drops(_read_drops(view))
            try:
                data, _, flags, address = view.recvmsg(self._max_datagram)
            except BlockingIOError:
                # SO_RCVTIMEO expired: the socket was silent for a check interval.
                self._observe_drops(_read_drops(view))
                continue
            except OSError as exc:
                return self._failed(exc)
            self._deliver(view, data, flags, address)

    def _drain(self, view):
        # As the compiled loop's drain(): what is queued is delivered until the socket is
        # empty or drain_timeout passes; then, for one check interval at most, counted.
        deadline = time.monotonic() + self._drain_timeout
        while time.monotonic() < deadline:
            if self._ring.closed:
                return "ring_closed"
            try:
                data, _, flags, address = view.recvmsg(self._max_datagram, 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return "stopped"
            except OSError as exc:
                return self._failed(exc)
            self._deliver(view, data, flags, address)
        deadline = time.monotonic() + self._check_interval
        while time.monotonic() < deadline:
            try:
                view.recvmsg(self._max_datagram, 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return "stopped"
            except OSError as exc:
                return self._failed(exc)
            self._counters.add("datagrams_unread", 1)
        return "stopped"

    def _failed(self, error):
        self.last_errno = error.errno
        return "no_memory" if error.errno == errno.ENOMEM else "os_error"

    def _deliver(self, view, data, flags, address):
        self._counters.add("receive_calls", 1)
        if flags & socket.MSG_TRUNC:
            self._counters.add("truncated", 1)
            return
        source = sockaddr_from_address(address, view.family) or None
        self._counters.offer_counted(self._ring, data, source)

    def _observe_drops(self, drops):
        # The kernel's counter is 32 bits wide and wraps; it never gains 2**31 between two
        # reads, so a move backwards cannot happen and is ignored.
        if drops is None:
            return
        advance = (drops - self._drops_seen) & 0xFFFF_FFFF
        if 0 < advance < 0x8000_0000:
            self._drops_seen = drops
            self._counters.add("kernel_drops", advance)


class _borrowed:
    """A socket object over a descriptor the caller owns, detached (not closed) on exit."""

    def __init__(self, fd):
        self._view = socket.socket(fileno=fd)

    def __enter__(self):
        return self._view

    def __exit__(self, *exc_info):
        self._view.detach()


def _read_drops(view):
    """The socket's kernel drop counter now, or None where the kernel cannot tell."""
    try:
        meminfo = view.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, 4 * (SK_MEMINFO_DROPS + 1))
    except OSError:
        return None
    if len(meminfo) < 4 * (SK_MEMINFO_DROPS + 1):
        return None
    return _DROPS.unpack_from(meminfo, 4 * SK_MEMINFO_DROPS)[0]
