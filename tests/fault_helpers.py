"""Helpers for the fault suite: a fastsock server in a child process, the child's resource
use read from /proc, and bounded clients.

Run as a script (``python fault_helpers.py CONFIG_JSON``), this file is the child: it serves
with the configuration given, drains its queue in a consumer thread that checks every
message, and answers one JSON line per command read on stdin.  The parent copies it to the
test's tmp_path and starts it with ``ServerProcess``, so heavy scenarios (descriptor limits,
memory measurements, floods) cannot disturb the test process.  It imports only the standard
library and, in the child, the server module under test.
"""

import dataclasses
import importlib
import json
import os
import queue
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib

GENEROUS = 10.0
"""Seconds any single wait may take: far above what loopback ever needs."""

HOST = "127.0.0.1"

CHECKSUM_MASK = (1 << 64) - 1
STATS_POLL_INTERVAL = 0.02


# -- messages -------------------------------------------------------------------------------


def numbered_message(client, sequence, padding=0):
    """The payload of message `sequence` of `client`: the consumer checks both numbers."""
    return b"%d:%d:%s" % (client, sequence, b"p" * padding)


def checksum(payloads):
    """Order-insensitive sum of the payloads' CRCs, as the child's consumer computes it."""
    return sum(zlib.crc32(payload) for payload in payloads) & CHECKSUM_MASK


def lines_stream(messages):
    return b"".join(message + b"\n" for message in messages)


# -- the parent's side ------------------------------------------------------------------------


def wait_until(predicate, timeout=GENEROUS, interval=STATS_POLL_INTERVAL, what="condition"):
    """Poll `predicate` until it returns a true value, and return that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(interval)


def connect(port, timeout=GENEROUS):
    """A TCP client of the loopback server on `port`, every operation bounded by `timeout`."""
    return socket.create_connection((HOST, port), timeout=timeout)


def open_fd_count(pid="self"):
    return len(os.listdir(f"/proc/{pid}/fd"))


def proc_status(pid="self"):
    """From /proc/<pid>/status: VmRSS, VmHWM (peak RSS) and VmPeak (peak address space) in
    bytes, and Threads."""
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            parts = value.split()
            if name in ("VmRSS", "VmHWM", "VmPeak"):
                fields[name] = int(parts[0]) * 1024
            elif name == "Threads":
                fields[name] = int(parts[0])
    return fields


class ServerProcess:
    """A server in a child process, driven by one-line commands; a context manager.

    Keyword arguments configure the child (see ``ChildConfig``).  ``pid`` and ``port`` name
    it; ``stats()`` returns its counters and its consumer's tally; the child's stderr is kept
    in a file, read by ``stderr_text()``; ``fds_at_start`` is how many descriptors it held
    before it made its server, and its ring's eventfd.
    """

    def __init__(self, directory, label="server", **config):
        script = directory / "fault_server.py"
        if not script.exists():
            shutil.copyfile(__file__, script)
        self._stderr_path = directory / f"{label}-stderr.txt"
        with open(self._stderr_path, "w") as stderr:
            # The environment (PYTHONPATH included) is inherited, so the child imports the
            # same fastsock as the tests.
            self.process = subprocess.Popen(
                [sys.executable, str(script), json.dumps(config)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
        self._replies = queue.Queue()
        self._reader = threading.Thread(target=self._read_replies, daemon=True)
        self._reader.start()
        try:
            hello = self._reply()
        except BaseException:
            self.kill()
            raise
        self.pid = hello["pid"]
        self.port = hello["port"]
        self.fds_at_start = hello["fds_at_start"]

    def _read_replies(self):
        for line in self.process.stdout:
            self._replies.put(json.loads(line))
        self._replies.put(None)

    def _reply(self, timeout=GENEROUS):
        try:
            reply = self._replies.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"the server process did not answer within {timeout} s") from None
        if reply is None:
            raise AssertionError(f"the server process exited:\n{self.stderr_text()}")
        return reply

    def command(self, name):
        self.process.stdin.write(name + "\n")
        self.process.stdin.flush()
        return self._reply()

    def stats(self):
        return self.command("stats")

    def interrupt(self, timeout=GENEROUS):
        """Ctrl-C: SIGINT to a child that serves in its main thread (serve_in_main_thread).
        Its answer, once the server is closed and the consumer has taken every message the
        server published (or `timeout` seconds), is the final stats with ``fds``, the
        descriptors it then holds; the child then exits."""
        self.process.send_signal(signal.SIGINT)
        return self._reply(timeout)

    def resume_consumer(self):
        self.command("resume")

    def status(self):
        return proc_status(self.pid)

    def fd_count(self):
        return open_fd_count(self.pid)

    def stderr_text(self):
        return self._stderr_path.read_text()

    def close(self):
        """Ask the child to shut its server down and exit; return its final stats."""
        try:
            return self.command("exit")
        finally:
            self.kill()

    def kill(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(GENEROUS)
        # The reader ends at the pipe's end of file; only then may the pipe be closed.
        self._reader.join(GENEROUS)
        self.process.stdin.close()
        self.process.stdout.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.kill()


# -- the child ------------------------------------------------------------------------------


@dataclasses.dataclass
class ChildConfig:
    """What the child serves.

    ``handler``: "receiver" is fastsock's compiled path (``fastsock.receiver``) into a
    ``RingQueue``; "queueing" is the pattern fastsock replaces, a handler that puts every
    ``recv(1024)`` into a ``queue.Queue``, served by ``module`` (fastsock or the stdlib).
    ``consumer``: "running", or "paused" until the "resume" command.  ``ordered``: the
    consumer checks that each client's messages (see ``numbered_message``) arrive with
    consecutive sequence numbers from 0.  ``occupied_fds``: descriptors the application
    holds for itself (opened on /dev/null).  ``fd_headroom``: when set, RLIMIT_NOFILE is
    lowered to the descriptors open before serving plus this many.  ``max_connections``,
    ``drain_timeout`` and ``engine_threads`` go to ``fastsock.receiver`` when set.
    ``serve_in_main_thread``: serve_forever() runs in the main thread, as in a program that
    Ctrl-C stops, within the server's ``with`` block; commands are answered by a thread.
    """

    module: str = "fastsock"
    handler: str = "receiver"
    framing: str = "lines"
    max_line: int | None = None
    max_frame: int | None = None
    ring_max_messages: int | None = None
    ring_max_bytes: int | None = None
    backlog: int | None = None
    max_threads: int | None = None
    consumer: str = "running"
    ordered: bool = False
    occupied_fds: int = 0
    fd_headroom: int | None = None
    max_connections: int | None = None
    drain_timeout: float | None = None
    engine_threads: int | None = None
    serve_in_main_thread: bool = False


class Tally:
    """What the consumer took: count, bytes, checksum and, when ordered, each client's next
    sequence number and the first few messages that broke the order."""

    def __init__(self, ordered):
        self.lock = threading.Lock()
        self.messages = 0
        self.bytes = 0
        self.checksum = 0
        self.next_sequence = {} if ordered else None
        self.disorder = []

    def add(self, payloads):
        with self.lock:
            for payload in payloads:
                self.messages += 1
                self.bytes += len(payload)
                self.checksum = (self.checksum + zlib.crc32(payload)) & CHECKSUM_MASK
                if self.next_sequence is not None:
                    self._check_order(payload)

    def _check_order(self, payload):
        client, sequence, _ = payload.split(b":", 2)
        client, sequence = int(client), int(sequence)
        expected = self.next_sequence.get(client, 0)
        if sequence != expected and len(self.disorder) < 10:
            self.disorder.append([client, sequence, expected])
        self.next_sequence[client] = sequence + 1

    def snapshot(self):
        with self.lock:
            return {
                "messages": self.messages,
                "bytes": self.bytes,
                "checksum": self.checksum,
                "clients": {} if self.next_sequence is None else dict(self.next_sequence),
                "disorder": list(self.disorder),
            }


def _queueing_handler(module):
    class QueueingHandler(module.BaseRequestHandler):
        def handle(self):
            while True:
                data = self.request.recv(1024)
                if not data:
                    break
                self.server.result_queue.put(data)

    return QueueingHandler


def _build_server(config, errors):
    module = importlib.import_module("socketserver" if config.module == "stdlib" else "fastsock")

    class Server(module.ThreadingTCPServer):
        daemon_threads = True

        def handle_error(self, request, client_address):
            errors.append(type(sys.exc_info()[1]).__name__)

    if config.handler == "queueing":
        handler = _queueing_handler(module)
        source = queue.Queue()
    else:
        import fastsock

        ring_bounds = {
            name: value
            for name, value in (
                ("max_messages", config.ring_max_messages),
                ("max_bytes", config.ring_max_bytes),
            )
            if value is not None
        }
        source = fastsock.RingQueue(**ring_bounds)
        limits = {
            name: value
            for name, value in (
                ("max_line", config.max_line),
                ("max_frame", config.max_frame),
                ("max_connections", config.max_connections),
                ("drain_timeout", config.drain_timeout),
                ("engine_threads", config.engine_threads),
            )
            if value is not None
        }
        handler = fastsock.receiver(source, framing=config.framing, **limits)
    if config.backlog is None:
        server = Server((HOST, 0), handler)
    elif config.module == "stdlib":
        # The stdlib has no backlog switch: its documented way is the class attribute.
        Server.request_queue_size = config.backlog
        server = Server((HOST, 0), handler)
    else:
        server = Server((HOST, 0), handler, backlog=config.backlog)
    if config.max_threads is not None:
        server.max_threads = config.max_threads
    server.result_queue = source
    return server, source


def _consume(source, tally, resumed, stopping):
    resumed.wait()
    while not stopping.is_set():
        try:
            if isinstance(source, queue.Queue):
                batch = [source.get(timeout=0.1)]
            else:
                batch = source.get_many(timeout=0.1)
        except queue.Empty:
            continue
        tally.add(batch)


def _reply(**fields):
    print(json.dumps(fields), flush=True)


def _report(server, tally, errors, **fields):
    stats = server.stats() if hasattr(server, "stats") else None
    _reply(
        stats=None if stats is None else dataclasses.asdict(stats),
        active=None if stats is None else stats.connections_active,
        consumed=tally.snapshot(),
        errors=list(errors),
        # Each thread's id in /proc/PID/task, for tests that watch one thread.
        threads={thread.name: thread.native_id for thread in threading.enumerate()},
        **fields,
    )


def _answer_commands(server, tally, errors, resumed, serving):
    """Answer the commands read on stdin; "exit" stops the `serving` thread's server."""
    for line in sys.stdin:
        command = line.strip()
        if command == "resume":
            resumed.set()
            _reply(ok=True)
            continue
        if command == "exit" and serving is not None:
            server.shutdown()
            serving.join()
            server.server_close()
        _report(server, tally, errors)
        if command == "exit":
            break


def _serve_until_interrupted(server, tally, errors, resumed):
    """serve_forever() in the main thread until Ctrl-C, in the server's ``with`` block; then
    the final report, once the consumer has taken what the server published."""
    threading.Thread(
        target=_answer_commands, args=(server, tally, errors, resumed, None), daemon=True
    ).start()
    try:
        with server:
            server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        interrupted = True
    else:
        interrupted = False
    deadline = time.monotonic() + GENEROUS
    while tally.snapshot()["messages"] < server.stats().messages_received:
        if time.monotonic() > deadline:
            break
        time.sleep(STATS_POLL_INTERVAL)
    _report(server, tally, errors, interrupted=interrupted, fds=open_fd_count())


def _child_main(config):
    fds_at_start = open_fd_count()
    errors = []
    server, source = _build_server(config, errors)
    if not isinstance(source, queue.Queue):
        # The ring holds its eventfd (the asyncio wake-up) for its life, unlike the server
        # its listening socket, which server_close() closes.
        fds_at_start += 1
    tally = Tally(config.ordered)
    resumed = threading.Event()
    stopping = threading.Event()
    if config.consumer == "running":
        resumed.set()
    consumer = threading.Thread(target=_consume, args=(source, tally, resumed, stopping))
    consumer.start()
    occupied = [os.open(os.devnull, os.O_RDONLY) for _ in range(config.occupied_fds)]
    if config.fd_headroom is not None:
        limit = open_fd_count() + config.fd_headroom
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    if config.serve_in_main_thread:
        _reply(pid=os.getpid(), port=server.server_address[1], fds_at_start=fds_at_start)
        _serve_until_interrupted(server, tally, errors, resumed)
    else:
        serving = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.5}, name="serving"
        )
        serving.start()
        _reply(pid=os.getpid(), port=server.server_address[1], fds_at_start=fds_at_start)
        _answer_commands(server, tally, errors, resumed, serving)
    stopping.set()
    resumed.set()
    consumer.join()
    for fd in occupied:
        os.close(fd)


if __name__ == "__main__":
    _child_main(ChildConfig(**json.loads(sys.argv[1])))
