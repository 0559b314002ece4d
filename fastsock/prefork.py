"""Prefork: several worker processes accept on one port and receive into one shared ring.

One Python process does at most one core of Python work; the compiled receive loops do
theirs without the GIL, but accepting, dispatching and the consumer still share that core.
PreforkServer forks ``workers`` processes, each running a threaded server on the same
listening port, so the receive work spreads over the cores while the parent (or any
process holding the ring) consumes.
"""

import ctypes
import errno
import logging
import os
import signal
import socket
import threading
import time

from . import constants
from .server import ThreadingTCPServer

__all__ = ["PreforkServer"]

_log = logging.getLogger("fastsock")

# <sys/prctl.h>: deliver a signal to this process when its parent dies.
_PR_SET_PDEATHSIG = 1


class PreforkServer:
    """``workers`` forked copies of a server sharing one port.

    With ``SO_REUSEPORT`` (Linux) every worker but the first binds a socket of its own to
    the port and the kernel spreads new connections over them; elsewhere, or with
    ``reuse_port=False``, every worker accepts on the one inherited listening socket.  The
    request handler is usually ``fastsock.receiver(ring, ...)``: its ring and counters live
    in shared memory created before the fork, so ``stats()`` and the ring cover every
    worker.  ``server_class=fastsock.UDPServer`` gives each worker a compiled datagram loop
    on its own SO_REUSEPORT socket.  ``start()`` forks, so call it before this process
    starts any thread.
    """

    def __init__(
        self,
        server_address,
        RequestHandlerClass,
        *,
        workers=None,
        server_class=ThreadingTCPServer,
        reuse_port=None,
        **server_options,
    ):
        self.worker_count = (os.cpu_count() or 1) if workers is None else workers
        if not isinstance(self.worker_count, int) or self.worker_count < 1:
            raise ValueError(f"workers must be a positive int, not {workers!r}")
        if reuse_port is None:
            reuse_port = hasattr(socket, "SO_REUSEPORT")
        self.reuse_port = reuse_port
        self.server = server_class(
            server_address, RequestHandlerClass, bind_and_activate=False, **server_options
        )
        try:
            if reuse_port:
                self.server.allow_reuse_port = True
            self.server.server_bind()
            self.server.server_activate()
        except BaseException:
            self.server.server_close()
            raise
        self.server_address = self.server.server_address
        self.worker_crashes = 0
        self._workers = {}
        self._stop = threading.Event()
        # stats() reaps too, and a metrics scrape may call it from its own thread.
        self._reap_lock = threading.Lock()
        self._closed = False

    def start(self):
        """Fork the workers.  Refused once threads run here: fork would copy their locks."""
        if self._workers:
            raise RuntimeError("the workers are already started")
        if threading.active_count() > 1:
            raise RuntimeError(
                "PreforkServer.start() forks: call it before this process starts threads"
            )
        parent = os.getpid()
        for index in range(self.worker_count):
            pid = os.fork()
            if pid == 0:
                self._run_worker(index, parent)
            self._workers[pid] = index
        if self.reuse_port:
            # The first worker owns the inherited socket now: were it open here too, the
            # kernel would keep queueing connections on it after that worker died.
            self.server.socket.close()

    def _run_worker(self, index, parent):
        status = 1
        try:
            server = self.server
            if self.reuse_port and index > 0:
                server.socket = _listening_socket_like(
                    server.socket, server.server_address, server.request_queue_size
                )
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, lambda signum, frame: _stop_worker(server))
            _stop_with_parent(parent)
            server.serve_forever(poll_interval=constants.RECEIVE_CHECK_INTERVAL)
            server.server_close()
            status = 0
        except BaseException:
            _log.exception("prefork worker %d failed", index)
        finally:
            os._exit(status)

    @property
    def workers(self):
        """The pids of the workers not yet reaped."""
        return sorted(self._workers)

    def reap(self):
        """Collect the workers that exited; a worker that did not exit cleanly is counted
        in ``worker_crashes`` and logged.  Returns how many were collected."""
        collected = 0
        with self._reap_lock:
            for pid in list(self._workers):
                try:
                    reaped, status = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    reaped, status = pid, 0
                if reaped == 0:
                    continue
                index = self._workers.pop(pid)
                collected += 1
                if status != 0 and not self._closed:
                    self.worker_crashes += 1
                    _log.error(
                        "prefork worker %d (pid %d) died: wait status %d", index, pid, status
                    )
        return collected

    def serve_forever(self, poll_interval=0.5):
        """Supervise the workers (reaping any that die) until ``shutdown()``."""
        if not self._workers:
            self.start()
        self._stop.clear()
        while not self._stop.wait(poll_interval):
            self.reap()
            if not self._workers:
                break

    def shutdown(self):
        """Make ``serve_forever()`` return; the workers keep running until server_close."""
        self._stop.set()

    def stats(self):
        """The receive counters of every worker (see ``BaseServer.stats``)."""
        self.reap()
        return self.server.stats()

    def server_close(self, timeout=None):
        """Stop the workers: they stop accepting and their receive loops stop gracefully,
        handing over what their peers sent before the stop (the handler's
        ``drain_timeout``) while this process, or another, consumes the ring.  A worker still
        running after ``timeout`` seconds (default: that drain timeout plus
        ``constants.SHUTDOWN_GRACE``) is killed."""
        if self._closed:
            return
        self._closed = True
        if timeout is None:
            drain_timeout = getattr(self.server.RequestHandlerClass, "drain_timeout", None)
            timeout = (drain_timeout or 0.0) + constants.SHUTDOWN_GRACE
        if self.server.receive_path is not None:
            self.server.receive_path.stop()
        for pid in self._workers:
            _signal_worker(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self._workers and time.monotonic() < deadline:
            self.reap()
            time.sleep(0.01)
        for pid in self._workers:
            _signal_worker(pid, signal.SIGKILL)
        with self._reap_lock:
            for pid in list(self._workers):
                os.waitpid(pid, 0)
                del self._workers[pid]
        self.server.socket.close()

    def __enter__(self):
        return self

    def __exit__(self, *args):
        self.server_close()


def _listening_socket_like(inherited, address, backlog):
    own = socket.socket(inherited.family, inherited.type)
    try:
        own.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        own.bind(address)
        if own.type == socket.SOCK_STREAM:
            own.listen(backlog)
    except BaseException:
        own.close()
        raise
    inherited.close()
    return own


def _stop_with_parent(parent):
    """Have this worker sent SIGTERM when its parent dies, even by SIGKILL (Linux), so that
    no worker keeps the port and the ring alive for a consumer that is gone."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return
    if prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        return
    if os.getppid() != parent:
        # The parent died before the request took effect.
        os.kill(os.getpid(), signal.SIGTERM)


def _stop_worker(server):
    # The handler may run before serve_forever() starts, where shutdown() would wait forever.
    server.request_stop()


def _signal_worker(pid, signum):
    try:
        os.kill(pid, signum)
    except OSError as exc:
        if exc.errno != errno.ESRCH:
            raise
