"""Server-side harness of the fault suite (tests/test_faults_*.py): what is read of a
server running in a child process (tests/fault_helpers.py) once it has settled, and for
in-process servers, serving bounded in a thread, servers that record what reaches
handle_error, handlers that record how each loop ended or echo large replies, signal
storms and their targets, and consumers blocked in get_many().
"""

import contextlib
import queue
import signal
import sys
import threading
import time

import fastsock
from tests.fault_clients import MiB
from tests.fault_helpers import GENEROUS, HOST, wait_until
from tests.support import runnable_share


def _running_share(server, thread_prefix):
    """runnable_share() of the threads of the server process whose name starts with
    `thread_prefix`."""
    tids = [
        tid for name, tid in server.stats()["threads"].items() if name.startswith(thread_prefix)
    ]
    assert tids, f"no thread {thread_prefix}* in the server process"
    return runnable_share(server.pid, tids)


def _settled(server, messages=None, errors=0):
    """The server's stats once every connection has closed and the consumer has taken every
    message the loops published (and `messages` of them, when given), and `errors` reached
    handle_error (an engine reports them just after it closed their connection)."""

    def settled():
        reply = server.stats()
        published = reply["stats"]["messages_received"]
        consumed = reply["consumed"]["messages"]
        expected = published if messages is None else messages
        reported = len(reply["errors"]) >= errors
        return reply["active"] == 0 and consumed == published == expected and reported and reply

    return wait_until(settled, what="connections closed and their messages consumed")


def _rss_growth_when_stalled(server, producers, rss_before, received=lambda: None):
    """Wait until the producers stop making progress, then return the server's RSS growth."""
    progress = [None, time.monotonic()]

    def stalled():
        now_sent = (sum(producers.sent), received())
        if now_sent != progress[0]:
            progress[:] = [now_sent, time.monotonic()]
        return not producers.alive() or time.monotonic() - progress[1] > 0.5

    wait_until(stalled, timeout=30, what="producers stalled or done")
    return server.status()["VmRSS"] - rss_before


def _quiet_resources(server):
    """The server's descriptors and threads once they have held still for 100 ms: a handler
    thread closes its socket and exits just after its connection is counted closed."""
    samples = []

    def quiet():
        samples.append((server.fd_count(), server.status()["Threads"]))
        return len(samples) >= 5 and len(set(samples[-5:])) == 1 and samples[-1]

    fds, threads = wait_until(quiet, what="descriptors and threads holding still")
    return {"fds": fds, "threads": threads, "rss": server.status()["VmRSS"]}


@contextlib.contextmanager
def _serving(server):
    """serve_forever() in a thread for the block; then shutdown and close, both bounded."""
    loop = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    loop.start()
    try:
        yield server
    finally:
        _bounded(server.shutdown)
        loop.join(GENEROUS)
        _bounded(server.server_close)
    assert not loop.is_alive(), "serve_forever() did not return after shutdown()"


def _bounded(function, *args):
    """Call `function` in a thread and return its result or raise its exception; fail,
    instead of hanging, if it blocks past GENEROUS."""
    outcome = {}

    def call():
        try:
            outcome["result"] = function(*args)
        except BaseException as exc:  # noqa: B036 - handed back to the caller
            outcome["error"] = exc

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(GENEROUS)
    assert not thread.is_alive(), f"{function.__qualname__}() blocked for {GENEROUS} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


class _ErrorRecorder:
    """Mixed into a server class: keeps what handle_error is given instead of printing it."""

    def handle_error(self, request, client_address):
        self.errors.append(sys.exc_info()[1])


def _recording_server(handler, server_class=fastsock.ThreadingTCPServer, **options):
    """A loopback server of `server_class` whose `errors` lists what reached handle_error."""
    recording_class = type(server_class.__name__, (_ErrorRecorder, server_class), {})
    server = recording_class((HOST, 0), handler, **options)
    server.errors = []
    return server


def _drain(ring, count, with_source=False):
    """Take `count` messages from `ring`, failing if they do not all come within GENEROUS."""
    taken = []
    deadline = time.monotonic() + GENEROUS
    while len(taken) < count:
        try:
            taken += ring.get_many(
                timeout=max(0.0, deadline - time.monotonic()), with_source=with_source
            )
        except queue.Empty:
            raise AssertionError(f"{len(taken)} of {count} messages arrived") from None
    return taken


def _assert_in_order_without_gaps(taken):
    """Each connection's messages are its first ones, in order, none missing or repeated."""
    next_sequence = {}
    for connection, _, payload in taken:
        client, sequence, _ = payload.split(b":", 2)
        expected = next_sequence.get(connection, 0)
        assert int(sequence) == expected, f"connection {connection}: {payload[:30]!r}"
        next_sequence[connection] = expected + 1


@contextlib.contextmanager
def _timer_signal_storm(interval=0.001):
    """SIGALRM every `interval` seconds, handled by a no-op handler; yields the count."""
    delivered = [0]

    def count(signum, frame):
        delivered[0] += 1

    previous = signal.signal(signal.SIGALRM, count)
    signal.setitimer(signal.ITIMER_REAL, interval, interval)
    try:
        yield delivered
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        # A last SIGALRM may still be on its way to a thread: let it reach the no-op handler
        # rather than the default action, which ends the process.
        time.sleep(0.05)
        signal.signal(signal.SIGALRM, previous)


class _EndRecorder:
    """Mixed into a receiver handler class: records how each connection's loop ended."""

    ends = None

    def finish(self):
        self.ends.append(getattr(self, "end", None))
        super().finish()


class _SignalTargets:
    """The threads running receive loops now, for a storm of signals aimed at them.

    A thread leaves the set, under the lock, before it exits, so that pthread_kill() never
    names a thread that is gone (undefined behaviour: it may crash the process)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.idents = set()
        self.signalled = 0

    def handler_mixin(self):
        targets = self

        class Targeted:
            def setup(self):
                super().setup()
                with targets.lock:
                    targets.idents.add(threading.get_ident())

            def finish(self):
                with targets.lock:
                    targets.idents.discard(threading.get_ident())
                super().finish()

        return Targeted

    def storm(self, stopping, interval=0.001):
        """Send SIGALRM to every target every `interval` s until `stopping` is set."""
        while not stopping.wait(interval):
            with self.lock:
                for ident in self.idents:
                    signal.pthread_kill(ident, signal.SIGALRM)
                    self.signalled += 1


class _LargeEcho(fastsock.StreamRequestHandler):
    """Answers each request line with a reply far larger than the socket buffers."""

    def handle(self):
        for line in self.rfile:
            self.wfile.write(line * (8 * MiB // len(line)))


class _BlockingConsumers:
    """Threads blocked in get_many() without a timeout, taking slowly so the ring stays
    full, until the ring is closed; each records how it ended."""

    def __init__(self, ring, count):
        self.ring = ring
        self.taken = []
        self.lock = threading.Lock()
        self.endings = []
        self.threads = [threading.Thread(target=self._consume, daemon=True) for _ in range(count)]
        for thread in self.threads:
            thread.start()

    def _consume(self):
        try:
            while True:
                batch = self.ring.get_many(500, with_source=True)
                with self.lock:
                    self.taken += batch
                time.sleep(0.001)
        except BaseException as exc:
            self.endings.append(exc)

    def join(self):
        for thread in self.threads:
            thread.join(GENEROUS)
        assert not any(thread.is_alive() for thread in self.threads), "a consumer deadlocked"
