"""The server process of one ``fastsock bench`` row: one server under test and its consumer.

Run by ``fastsock.bench.coordinator`` as ``python -m fastsock.bench.server CONFIG``, it talks to the
coordinator in JSON lines on stdin and stdout:

    -> {"address": ...}                     the server is ready
    then for each of the row's runs (config "runs"):
    <- {"begin": true, "report_by": T}      every answer of the run is due by T (monotonic)
    -> {"ready": true}
    <- {"expected": UNITS, "before_hold": true}  silent-live only: the live connection alone
    -> {"received": ..., "end": ..., ...}
    <- {"hold": N, "quiet_seconds": Q}      idle and silent-live: wait for N open connections
    -> {"held": N, "held_at": T, "rss_kib": ..., "rss_before_kib": ..., "threads": ..., ...}
    <- {"expected": UNITS}                  what the run's load generator sent
    -> {"received": ..., "end": ..., ...}   what the consumer counted, and its costs

Every consumer keeps ``Tally.units`` current and stamps ``Tally.settled`` whenever it has
taken everything there was (asyncio protocols after every callback): the run ends when the
last message was taken, measured without a clock read per message.
"""

import asyncio
import functools
import json
import os
import queue
import resource
import shutil
import signal
import socket
import socketserver
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import traceback

import fastsock
from fastsock.bench import _loadgen
from fastsock.bench.catalogue import (
    BACKLOG,
    DATAGRAM_CAP,
    DATAGRAM_SETTLE_SECONDS,
    HOST,
    STREAM_STALL_SECONDS,
    WORKLOADS,
)
from fastsock.bench.process import (
    REPORT_SECONDS,
    emit,
    pin,
    raise_open_file_limit,
    receive_command,
)

RECV_BYTES = 65536
"""What the stdlib recv-queue handler asks of each recv(), as the pattern it stands for."""
WAIT_POLL_SECONDS = 0.01
HOLD_SETTLE_SECONDS = 0.2
"""Pause between the last idle connection being counted and the memory reading, so that
every handler has reached its blocking read."""
PREFORK_WORKERS = 2
UNLIMITED_CONNECTIONS = 2**31 - 1
"""max_connections when file descriptors are unlimited: no cap at all, as the stdlib's."""
SINK_CHURN_MARGIN_SECONDS = 1.0
"""How long past --seconds the C sink waits for churn connections that never come (the
generator stops at --seconds even if it made fewer than it announced)."""


class Tally:
    """What the consumer has taken, and when it last had taken everything it could."""

    def __init__(self):
        self.units = 0
        self.settled = (0, None)

    def settle(self):
        self.settled = (self.units, time.monotonic())


# -- Measuring the process -------------------------------------------------------------------


def _status_number(pid, field):
    """A number of /proc/PID/status (memory fields are in KiB, "Threads" counts); 0 for a
    process that is gone (a request process that ended)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def _cpu_seconds(pid, reaped_children=False):
    """User + system CPU seconds of a process, with ``reaped_children`` those of the
    children it has waited for too; 0.0 for a process that is gone."""
    if pid == os.getpid() and not reaped_children:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    try:
        with open(f"/proc/{pid}/stat") as stat:
            # The command name may hold spaces: the fields that follow it start after ")".
            fields = stat.read().rpartition(")")[2].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    ticks = sum(int(field) for field in fields[11 : 15 if reaped_children else 13])
    return ticks / os.sysconf("SC_CLK_TCK")


def _children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as children:
            return [int(child) for child in children.read().split()]
    except FileNotFoundError:
        return []


def listen_overflows():
    """The kernel's count of connections a full accept queue turned away (TcpExt
    ListenOverflows), machine-wide: each waits for the kernel's 1-second SYN-ACK retry."""
    with open("/proc/net/netstat") as netstat:
        lines = [line.split() for line in netstat if line.startswith("TcpExt:")]
    names, values = lines
    return int(values[names.index("ListenOverflows")])


def udp_drops(port):
    """The kernel's drop count, summed over every UDP socket bound to ``port``."""
    drops = 0
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            with open(table) as sockets:
                next(sockets)
                for line in sockets:
                    fields = line.split()
                    if int(fields[1].rpartition(":")[2], 16) == port:
                        drops += int(fields[-1])
        except FileNotFoundError:
            continue
    return drops


# -- Consumers -------------------------------------------------------------------------------


def consume_messages(received, tally):
    get_nowait, get = received.get_nowait, received.get
    while True:
        try:
            get_nowait()
        except queue.Empty:
            tally.settle()
            get()
        tally.units += 1


def consume_chunks(received, tally):
    get_nowait, get = received.get_nowait, received.get
    while True:
        try:
            chunk = get_nowait()
        except queue.Empty:
            tally.settle()
            chunk = get()
        tally.units += len(chunk)


def consume_ring(ring, tally, counts_bytes, batches):
    take = ring.get_batch if batches else ring.get_many
    while True:
        try:
            taken = take(block=False)
        except queue.Empty:
            tally.settle()
            taken = take()
        if not counts_bytes:
            tally.units += len(taken)
        elif batches:
            tally.units += taken.nbytes
        else:
            tally.units += sum(map(len, taken))


def in_thread(target, *args):
    threading.Thread(target=target, args=args, daemon=True).start()


# -- Servers under test ----------------------------------------------------------------------


def stdlib_handlers(module, received):
    """The stdlib patterns fastsock replaces, by the name of their benchmark row: each
    handler puts what it reads into ``received``, a queue.Queue that one thread drains."""

    class RecvQueueHandler(module.BaseRequestHandler):
        def handle(self):
            while chunk := self.request.recv(RECV_BYTES):
                received.put(chunk)

    class ReadlineQueueHandler(module.StreamRequestHandler):
        def handle(self):
            for line in self.rfile:
                received.put(line)

    class FrameQueueHandler(module.StreamRequestHandler):
        def handle(self):
            read = self.rfile.read
            while len(prefix := read(4)) == 4:
                received.put(read(int.from_bytes(prefix, "big")))

    class DatagramQueueHandler(module.BaseRequestHandler):
        def handle(self):
            received.put(self.request[0])

    return {
        "stdlib-recv-queue": RecvQueueHandler,
        "stdlib-readline-queue": ReadlineQueueHandler,
        "stdlib-frame-queue": FrameQueueHandler,
        "stdlib-datagram-queue": DatagramQueueHandler,
    }


_SOCKETSERVER_CLASSES = {
    "tcp": "ThreadingTCPServer",
    "tls": "ThreadingTCPServer",
    "unix": "ThreadingUnixStreamServer",
    "udp": "UDPServer",
    "unixgram": "UnixDatagramServer",
}


def socketserver_class(module, workload, wrap_tls=False):
    """The module's server class for the workload's transport, with the shared backlog; with
    ``wrap_tls`` (a TLS workload on a stdlib handler), get_request() wraps each accepted
    socket (the handshake in the accepting thread)."""
    name = _SOCKETSERVER_CLASSES[workload.transport]
    attributes = {"request_queue_size": BACKLOG}
    if wrap_tls and workload.transport == "tls":
        base = getattr(module, name)

        def get_request(self):
            sock, address = base.get_request(self)
            return tls_context().wrap_socket(sock, server_side=True), address

        attributes["get_request"] = get_request
    return type(name, (getattr(module, name),), attributes)


@functools.cache
def tls_context():
    """The server context every TLS row uses: a self-signed P-256 certificate made by the
    openssl command, TLS 1.3's default cipher (AES-256-GCM), no session tickets (the
    generator never reads, so they would only wait unread)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError(
            "the TLS rows need the openssl command (Debian: apt-get install openssl)"
        )
    directory = tempfile.mkdtemp(prefix="fastsock-bench-tls-")
    try:
        subprocess.run(
            [
                openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                "-nodes", "-days", "1", "-subj", "/CN=localhost",
                "-keyout", "key.pem", "-out", "cert.pem",
            ],
            cwd=directory,
            check=True,
            capture_output=True,
        )  # fmt: skip
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(
            os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
        )
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    context.num_tickets = 0
    return context


def bound_socket(workload, address):
    """A socket bound to ``address`` (listening, for streams), for asyncio and the sinks."""
    family = socket.AF_INET if workload.transport in ("tcp", "tls", "udp") else socket.AF_UNIX
    kind = socket.SOCK_DGRAM if workload.datagram else socket.SOCK_STREAM
    sock = socket.socket(family, kind)
    sock.bind(address)
    if not workload.datagram:
        sock.listen(BACKLOG)
    return sock


def compiled_handler(ring, workload, engine_threads=1):
    """fastsock.receiver for the workload; as the stdlib servers, it takes every connection
    its file descriptors allow (fastsock's default stops at 1024)."""
    if workload.datagram:
        return fastsock.receiver(ring)
    soft_limit, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft_limit == resource.RLIM_INFINITY:
        soft_limit = UNLIMITED_CONNECTIONS
    return fastsock.receiver(
        ring,
        framing=workload.framing,
        max_connections=soft_limit,
        engine_threads=engine_threads,
        ssl_context=tls_context() if workload.transport == "tls" else None,
    )


class UnderTest:
    """A running server: where to send, what it holds, what it dropped, how to wait.

    It serves every run of a row; ``begin_run()`` marks where the next run's counts start.
    Servers of stream workloads also tell ``connections_active()``.
    """

    address = None

    def __init__(self, workload, tally):
        self.workload = workload
        self.tally = tally
        self.base_units = 0
        self.base_kernel_drops = 0
        self.base_fastsock_drops = None

    def pids(self):
        return [os.getpid()]

    def cpu_seconds(self):
        return sum(_cpu_seconds(pid) for pid in self.pids())

    def total_kernel_drops(self):
        if self.workload.transport != "udp":
            return None
        return udp_drops(self.address[1])

    def total_fastsock_drops(self):
        """Datagrams fastsock itself counted as dropped, by reason; None if not fastsock's."""
        return None

    def begin_run(self):
        self.base_units = self.tally.units
        self.base_kernel_drops = self.total_kernel_drops() or 0
        self.base_fastsock_drops = self.total_fastsock_drops()

    def kernel_drops(self):
        """This run's datagrams dropped by the kernel; None where it cannot drop any."""
        total = self.total_kernel_drops()
        return None if total is None else total - self.base_kernel_drops

    def fastsock_drops(self):
        total = self.total_fastsock_drops()
        if total is None:
            return None
        return {reason: total[reason] - self.base_fastsock_drops[reason] for reason in total}

    def counted_drops(self):
        dropped = self.kernel_drops() or 0
        own = self.fastsock_drops()
        if own is not None:
            dropped += own["queue_full"] + own["truncated"]
        return dropped

    def wait(self, expected, deadline):
        """(units, end, active_seconds, complete) of this run, once every unit sent is
        counted or dropped, or once progress stopped: the consumer's count is then final."""
        stall = DATAGRAM_SETTLE_SECONDS if self.workload.datagram else STREAM_STALL_SECONDS
        last_progress, last_change = None, time.monotonic()
        while True:
            units, at = self.tally.settled
            units -= self.base_units
            dropped = self.counted_drops()
            if units + dropped >= expected:
                return units, at, None, True
            now = time.monotonic()
            progress = (self.tally.units, dropped)
            if progress != last_progress:
                last_progress, last_change = progress, now
            elif now - last_change > stall or now > deadline:
                return units, at if units else None, None, False
            time.sleep(WAIT_POLL_SECONDS)

    def close(self):
        """Stop what would outlive this process (forked workers)."""


class QueueServer(UnderTest):
    """A socketserver (the stdlib's or fastsock's drop-in) with a stdlib queue handler."""

    def __init__(self, module, handler_name, workload, tally, address):
        super().__init__(workload, tally)
        received = queue.Queue()
        handler = stdlib_handlers(module, received)[handler_name]
        server = socketserver_class(module, workload, wrap_tls=True)(address, handler)
        server.daemon_threads = True
        self.address = server.server_address
        in_thread(server.serve_forever)
        in_thread(consume_chunks if workload.unit == "byte" else consume_messages, received, tally)
        self.serving_threads = threading.active_count()

    def connections_active(self):
        return threading.active_count() - self.serving_threads


class CompiledServer(UnderTest):
    """fastsock.receiver(ring) on fastsock's server class; get_many or get_batch consumer."""

    def __init__(self, workload, tally, address, batches, engine_threads=1):
        super().__init__(workload, tally)
        ring = fastsock.RingQueue()
        self.server = socketserver_class(fastsock, workload)(
            address, compiled_handler(ring, workload, engine_threads)
        )
        self.server.daemon_threads = True
        self.address = self.server.server_address
        in_thread(self.server.serve_forever)
        in_thread(consume_ring, ring, tally, workload.unit == "byte", batches)

    def connections_active(self):
        return self.server.stats().connections_active

    def total_fastsock_drops(self):
        if not self.workload.datagram:
            return None
        stats = self.server.stats()
        return {
            "queue_full": stats.dropped_queue_full,
            "truncated": stats.truncated,
            "kernel": stats.kernel_drops,
        }


class PreforkUnderTest(CompiledServer):
    """PreforkServer: ``workers`` forked workers receive into one ring; the consumer runs
    here.  The workers are forked before this process starts any thread."""

    _SERVER_CLASSES = {
        "tcp": fastsock.ThreadingTCPServer,
        "unix": fastsock.ThreadingUnixStreamServer,
        "udp": fastsock.UDPServer,
    }

    def __init__(self, workload, tally, address, workers):
        # Its server is made by PreforkServer: only CompiledServer's counters are reused.
        UnderTest.__init__(self, workload, tally)
        ring = fastsock.RingQueue()
        options = {} if workload.datagram else {"backlog": BACKLOG}
        self.prefork = fastsock.PreforkServer(
            address,
            compiled_handler(ring, workload),
            workers=workers,
            server_class=self._SERVER_CLASSES[workload.transport],
            # A Unix socket path cannot be bound twice: the workers share the one socket.
            reuse_port=workload.transport != "unix",
            **options,
        )
        self.server = self.prefork.server
        self.address = self.prefork.server_address
        self.prefork.start()
        in_thread(consume_ring, ring, tally, workload.unit == "byte", True)

    def pids(self):
        return [os.getpid(), *self.prefork.workers]

    def close(self):
        self.prefork.server_close(timeout=1.0)


class ForkingUnderTest(CompiledServer):
    """ForkingTCPServer with fastsock.receiver: a process per connection, every one
    publishing into the ring that the consumer (get_many(), as the threaded
    fastsock-compiled row) drains here.  The serving loop runs in a process forked
    before this one starts any thread: forking a threaded process would copy its locks."""

    def __init__(self, workload, tally, address):
        UnderTest.__init__(self, workload, tally)
        ring = fastsock.RingQueue()
        server_class = type(
            "ForkingTCPServer", (fastsock.ForkingTCPServer,), {"request_queue_size": BACKLOG}
        )
        self.server = server_class(address, compiled_handler(ring, workload))
        self.address = self.server.server_address
        self.serving = os.fork()
        if self.serving == 0:
            status = 1
            try:
                self.server.serve_forever()
                status = 0
            finally:
                os._exit(status)
        self.server.socket.close()
        in_thread(consume_ring, ring, tally, workload.unit == "byte", False)

    def pids(self):
        return [os.getpid(), self.serving, *_children(self.serving)]

    def cpu_seconds(self):
        # Request processes come and go within a run: those still running are read
        # directly, those already reaped through the serving process's children's times.
        live = _children(self.serving)
        return (
            _cpu_seconds(os.getpid())
            + _cpu_seconds(self.serving, reaped_children=True)
            + sum(_cpu_seconds(pid) for pid in live)
        )

    def close(self):
        os.kill(self.serving, signal.SIGKILL)
        os.waitpid(self.serving, 0)


class Connections:
    """Open connections of an asyncio server, counted on its event loop's thread."""

    def __init__(self):
        self.opened = 0
        self.closed = 0


class ByteCounter(asyncio.Protocol):
    """Counts the bytes of a stream (bulk)."""

    def __init__(self, tally, connections):
        self.tally = tally
        self.connections = connections

    def connection_made(self, transport):
        self.connections.opened += 1

    def connection_lost(self, exc):
        self.connections.closed += 1

    def data_received(self, data):
        self.tally.units += len(data)
        self.tally.settle()


class LineCounter(ByteCounter):
    """Splits lines itself, keeping the partial tail for the next call, and counts them."""

    def __init__(self, tally, connections):
        super().__init__(tally, connections)
        self.tail = b""

    def data_received(self, data):
        lines = data.split(b"\n")
        lines[0] = self.tail + lines[0]
        self.tail = lines.pop()
        self.tally.units += len(lines)
        self.tally.settle()


class FrameCounter(LineCounter):
    """Cuts length-prefixed frames out of the stream, keeping the partial tail."""

    def data_received(self, data):
        buffer = self.tail + data
        size = len(buffer)
        position = 0
        frames = []
        while size - position >= 4:
            end = position + 4 + int.from_bytes(buffer[position : position + 4], "big")
            if end > size:
                break
            frames.append(buffer[position + 4 : end])
            position = end
        self.tail = buffer[position:]
        self.tally.units += len(frames)
        self.tally.settle()


class DatagramCounter(asyncio.DatagramProtocol):
    def __init__(self, tally):
        self.tally = tally

    def datagram_received(self, data, addr):
        self.tally.units += 1
        self.tally.settle()


class ProtocolServer(UnderTest):
    """An asyncio (or uvloop) server whose protocol counts inline; its loop in a thread."""

    _STREAM_PROTOCOLS = {"bulk": ByteCounter, "frames": FrameCounter}

    def __init__(self, workload, tally, address, new_loop):
        super().__init__(workload, tally)
        loop = new_loop()
        sock = bound_socket(workload, address)
        self.address = sock.getsockname()
        self.connections = Connections()
        if workload.datagram:
            opening = loop.create_datagram_endpoint(lambda: DatagramCounter(tally), sock=sock)
        else:
            protocol = self._STREAM_PROTOCOLS.get(workload.pattern, LineCounter)

            def factory():
                return protocol(tally, self.connections)

            if workload.transport == "unix":
                opening = loop.create_unix_server(factory, sock=sock, backlog=BACKLOG)
            else:
                secure = tls_context() if workload.transport == "tls" else None
                opening = loop.create_server(factory, sock=sock, backlog=BACKLOG, ssl=secure)
        loop.run_until_complete(opening)
        in_thread(loop.run_forever)

    def connections_active(self):
        return self.connections.opened - self.connections.closed


class SinkServer(UnderTest):
    """fastsock.bench._loadgen's C sink: receives and counts in C, in a thread started for each
    run (its waits for connections and datagrams are bounded by the run's timeout)."""

    def __init__(self, workload, tally, address, config):
        super().__init__(workload, tally)
        self.sock = bound_socket(workload, address)
        self.address = self.sock.getsockname()
        self.config = config
        self.results = queue.SimpleQueue()

    def begin_run(self):
        super().begin_run()
        in_thread(self._sink_one_run)

    def _sink_one_run(self):
        self.results.put(self._sink_counts())

    def _sink_counts(self):
        """(units, seconds) of one run."""
        config = self.config
        workload = self.workload
        if workload.datagram:
            units, _, seconds = _loadgen.sink_datagrams(
                self.sock.fileno(),
                DATAGRAM_CAP,
                config["timeout"],
                idle_seconds=DATAGRAM_SETTLE_SECONDS,
            )
            return units, seconds
        if workload.pattern == "churn":
            _, units, seconds = _loadgen.sink_stream(
                self.sock.fileno(),
                config["churn_connections"],
                ord("\n"),
                config["seconds"] + SINK_CHURN_MARGIN_SECONDS,
            )
            return units, seconds
        count_byte = ord("\n") if workload.framing == "lines" else -1
        received, lines, seconds = _loadgen.sink_stream(
            self.sock.fileno(), workload.connections, count_byte, config["timeout"]
        )
        return (lines if workload.framing == "lines" else received // workload.unit_bytes), seconds

    def wait(self, expected, deadline):
        try:
            units, seconds = self.results.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            return 0, None, None, False
        return units, None, seconds, units + self.counted_drops() >= expected


def start(server, workload, tally, address, config):
    if server.startswith("stdlib-"):
        return QueueServer(socketserver, server, workload, tally, address)
    if server == "fastsock-dropin":
        return QueueServer(fastsock, workload.baseline, workload, tally, address)
    if server in ("fastsock-compiled", "fastsock-compiled-batch"):
        return CompiledServer(workload, tally, address, batches=server.endswith("-batch"))
    if server == "fastsock-compiled-2":
        return CompiledServer(workload, tally, address, batches=False, engine_threads=2)
    if server == "fastsock-prefork":
        return PreforkUnderTest(workload, tally, address, PREFORK_WORKERS)
    if server == "fastsock-prefork-1":
        return PreforkUnderTest(workload, tally, address, 1)
    if server == "fastsock-forking":
        return ForkingUnderTest(workload, tally, address)
    if server == "asyncio-protocol":
        return ProtocolServer(workload, tally, address, asyncio.new_event_loop)
    if server == "uvloop-protocol":
        import uvloop

        return ProtocolServer(workload, tally, address, uvloop.new_event_loop)
    if server == "c-sink":
        return SinkServer(workload, tally, address, config)
    raise ValueError(f"unknown server {server!r}")


# -- The process -----------------------------------------------------------------------------


def hold(under_test, count, quiet_seconds, deadline, overflows_before, rss_before):
    """Wait for ``count`` open connections and, for silent-live, the line each sent; then
    what holding them costs, and from then on count only what comes next (the live
    connection's lines).  Done by ``deadline``, the settling and quiet seconds included."""
    lines = count if under_test.workload.pattern == "silent" else 0
    wait_until = deadline - HOLD_SETTLE_SECONDS - (quiet_seconds or 0)
    while (
        under_test.connections_active() < count
        or under_test.tally.units - under_test.base_units < lines
    ) and time.monotonic() < wait_until:
        time.sleep(WAIT_POLL_SECONDS)
    held_at = time.monotonic()
    overflows = listen_overflows() - overflows_before
    time.sleep(HOLD_SETTLE_SECONDS)
    pids = under_test.pids()
    quiet_cpu_fraction = None
    if quiet_seconds:
        cpu = under_test.cpu_seconds()
        time.sleep(quiet_seconds)
        quiet_cpu_fraction = (under_test.cpu_seconds() - cpu) / quiet_seconds
    under_test.begin_run()
    return {
        "held": under_test.connections_active(),
        "held_at": held_at,
        "listen_overflows": overflows,
        "rss_before_kib": rss_before,
        "rss_kib": rss_kib(under_test),
        "threads": sum(_status_number(pid, "Threads") for pid in pids),
        "quiet_cpu_fraction": quiet_cpu_fraction,
    }


def rss_kib(under_test):
    return sum(_status_number(pid, "VmRSS") for pid in under_test.pids())


def counts(under_test, expected, deadline):
    """What the consumer took of ``expected`` units sent since begin_run()."""
    units, end, active_seconds, complete = under_test.wait(expected, deadline)
    return {"received": units, "end": end, "active_seconds": active_seconds, "complete": complete}


def measure_run(under_test):
    """One run, from the coordinator's "begin" (rows take their runs in turns, so the
    server may wait long for it): wait for the sent total (and, for idle and silent-live,
    hold the connections first); what the server counted and what it cost, each answer
    within the coordinator's deadline, so that a wait cut short still reports its count."""
    command = receive_command()
    deadline = command["report_by"] - REPORT_SECONDS
    cpu_at_start = under_test.cpu_seconds()
    overflows_before = listen_overflows()
    rss_before = rss_kib(under_test)
    under_test.begin_run()
    emit({"ready": True})
    command = receive_command()
    if command.get("before_hold"):
        alone = counts(under_test, command["expected"], deadline)
        # What holding costs is measured from here, the ring's pages already touched.  The
        # count starts over before the coordinator hears of it: it then lets the generator
        # open the silent connections, whose lines must not fall into the live ones' count.
        overflows_before = listen_overflows()
        rss_before = rss_kib(under_test)
        under_test.begin_run()
        emit(alone)
        command = receive_command()
    if "hold" in command:
        quiet = command["quiet_seconds"]
        emit(hold(under_test, command["hold"], quiet, deadline, overflows_before, rss_before))
        command = receive_command()
    return {
        **counts(under_test, command["expected"], deadline),
        "peak_rss_kib": sum(_status_number(pid, "VmHWM") for pid in under_test.pids()),
        "cpu_seconds": under_test.cpu_seconds() - cpu_at_start,
        "kernel_drops": under_test.kernel_drops(),
        "fastsock_drops": under_test.fastsock_drops(),
    }


def serve(config, directory):
    workload = WORKLOADS[config["workload"]]
    if workload.transport in ("tcp", "tls", "udp"):
        address = (HOST, 0)
    else:
        address = os.path.join(directory, "server.sock")
    tally = Tally()
    under_test = start(config["server"], workload, tally, address, config)
    try:
        emit({"address": under_test.address})
        for _ in range(config["runs"]):
            emit(measure_run(under_test))
    finally:
        under_test.close()


def main(config):
    pin(config["cpus"])
    raise_open_file_limit(config["held_connections"])
    directory = tempfile.mkdtemp(prefix="fastsock-bench-")
    status = 0
    try:
        serve(config, directory)
    except BaseException:
        traceback.print_exc()
        status = 1
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    # Handler and consumer threads sit in blocking calls: leave without them.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
