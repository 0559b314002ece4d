"""``fastsock bench``: receive rates of fastsock against the stdlib, asyncio and C sinks.

Each run starts two processes, pinned to different CPUs when there are two: a server process
(``fastsock._bench_server``) that runs one server under test and counts every message its
consumer takes, and a load generator (``fastsock._bench_load``) that sends one workload
with the compiled generator of ``fastsock._loadgen``.  This module holds the catalog of
workloads and servers, drives the runs and summarizes them; ``fastsock._bench_report``
prints the table and writes the JSON and the plot.  ``bench/README.md`` explains every row
and column, ``docs/benchmark-json.md`` the JSON.
"""

import json
import os
import resource
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import fastsock

HOST = "127.0.0.1"
LINE_BYTES = 64
FRAME_BYTES = 128
"""Bytes of a length-prefixed frame on the wire: the 4-byte prefix and 124 bytes of payload."""
BULK_BLOCK_BYTES = 64 * 1024
MESSAGES_PER_BLOCK = 256
"""Messages in each block the stream generator writes (it sends whole blocks only)."""
BACKLOG = 4096
"""Listen backlog of every stream server, so that churn and held connections measure the
receive path and not SYN retries on the stdlib's backlog of 5: the most that Linux's
default net.core.somaxconn allows (4096 since 5.4), since a generator opening 20 k
connections/s filled 1024 whenever the server was preempted for 50 ms."""
DATAGRAM_CAP = 50_000_000
"""Most datagrams one run may send; in practice the run's --seconds ends it first."""
STREAM_STALL_SECONDS = 5.0
"""Seconds without progress after which a stream run reports what it counted as lost."""
UDP_GSO_SEGMENTS = 64
UDP_GSO_BYTES = 65507
"""The generator sends UDP as GSO sends of up to 64 datagrams and 65,507 bytes, which the
kernel cuts into ordinary datagrams: on loopback the sending CPU also delivers each one, and
one sendmmsg() slot per datagram capped it at 0.43 M/s (64 bytes, 2-core VM), below what
the receivers take; with GSO it offers 1.5-2 M/s."""
DATAGRAM_SETTLE_SECONDS = 0.3
"""Seconds without progress after which a datagram run's losses are taken as final."""
RUN_OVERHEAD_SECONDS = 0.1
ROW_OVERHEAD_SECONDS = 0.1
"""Measured on a 2-core machine: a generator process's start and a run's end, per run; a
server process's start and end, per row (the estimate printed before the runs)."""
GENERATOR_BUSY = 0.9
"""A generator using this much of its CPU or more while sending is said, in the table, to
have set the pace: the row then shows the generator's ceiling, not the server's."""
CHILD_EXIT_SECONDS = 2.0
"""How long a child that has reported may take to exit by itself before it is killed."""
WARMUP_SECONDS = 0.3
"""Longest warm-up run: enough to fault in the ring and start every thread of the row's
server process, which then serves the measured runs."""
DEFAULT_WORKLOADS = ["lines-1", "udp-64"]
DEFAULT_SECONDS = 1.0
DEFAULT_RUNS = 3
DEFAULT_WARMUPS = 1
DEFAULT_BYTES = 2 * 1024**3
DEFAULT_CHURN_CONNECTIONS = 20_000
DEFAULT_IDLE_CONNECTIONS = 1000
DEFAULT_SILENT_CONNECTIONS = 10_000
QUIET_SECONDS = 1.0
"""How long a silent-live row's server is watched, its connections all held and silent, for
the CPU it uses meanwhile (the issue's bound: under 1% of a core)."""
SOURCE_ADDRESSES = tuple(f"127.0.0.{number}" for number in range(1, 9))
"""Loopback addresses the generator connects from, in turn.  The kernel picks a connection's
port among 28,232 (Linux's default ip_local_port_range) per source and destination address:
too few for 50,000 held connections, and churn's closed connections sit in TIME_WAIT, where
even with tcp_tw_reuse a port waits a second before it can serve again."""
HELD_TIMEOUT_SECONDS = 0.003
"""Seconds a run's --timeout grows by per held connection: a thread-per-connection server
(stdlib-readline-queue) took 15 s for a silent-live run at 10,000 connections on a 2-core
VM, over the default 33 s when the machine was busy."""
DESCRIPTOR_MARGIN = 256
"""Descriptors a process needs beyond the connections it holds: the listening socket, the
interpreter's files, epoll and event descriptors, pipes."""


@dataclass(frozen=True)
class Workload:
    name: str
    transport: str
    """"tcp", "unix" (stream), "udp" or "unixgram" (datagram)."""
    pattern: str
    """"bulk", "lines", "frames", "datagrams", "churn", "idle" or "silent"."""
    unit_bytes: int
    """Bytes on the wire per counted unit: a message, or one byte for bulk."""
    connections: int
    """Stream connections at once; churn, idle and silent take theirs from the options (a
    silent row's rate is that of its one live connection)."""
    summary: str

    @property
    def datagram(self):
        return self.transport in ("udp", "unixgram")

    @property
    def unit(self):
        return "byte" if self.pattern == "bulk" else "message"

    @property
    def framing(self):
        """The framing fastsock.receiver needs for this stream workload."""
        return {"bulk": "raw", "frames": "length"}.get(self.pattern, "lines")

    @property
    def baseline(self):
        """The stdlib server every other row of this workload is compared with."""
        return {
            "bulk": "stdlib-recv-queue",
            "frames": "stdlib-frame-queue",
            "datagrams": "stdlib-datagram-queue",
        }.get(self.pattern, "stdlib-readline-queue")


WORKLOADS = {
    workload.name: workload
    for workload in [
        Workload("bulk", "tcp", "bulk", 1, 1, "one TCP connection of raw 64 KiB blocks"),
        Workload("lines-1", "tcp", "lines", LINE_BYTES, 1, "64-byte lines, one TCP connection"),
        Workload("lines-16", "tcp", "lines", LINE_BYTES, 16, "64-byte lines, 16 TCP connections"),
        Workload(
            "frames-1", "tcp", "frames", FRAME_BYTES, 1, "128-byte length-prefixed frames, one TCP"
        ),
        Workload("udp-64", "udp", "datagrams", 64, 0, "64-byte UDP datagrams (sendmmsg)"),
        Workload("udp-1400", "udp", "datagrams", 1400, 0, "1400-byte UDP datagrams (sendmmsg)"),
        Workload(
            "unix-lines-1", "unix", "lines", LINE_BYTES, 1, "64-byte lines, one Unix stream socket"
        ),
        Workload("unixgram-64", "unixgram", "datagrams", 64, 0, "64-byte Unix datagrams"),
        Workload(
            "churn", "tcp", "churn", LINE_BYTES, 0, "short TCP connections, one 64-byte line each"
        ),
        Workload(
            "idle", "tcp", "idle", LINE_BYTES, 0, "idle TCP connections held at once, then a line"
        ),
        Workload(
            "silent-live",
            "tcp",
            "silent",
            LINE_BYTES,
            1,
            "silent TCP connections (one line each) held, then one live one streaming lines",
        ),
    ]
}


@dataclass(frozen=True)
class Server:
    name: str
    summary: str
    patterns: frozenset
    """The workload patterns it runs."""
    transports: frozenset = frozenset({"tcp", "unix", "udp", "unixgram"})

    def applies(self, workload):
        return workload.pattern in self.patterns and workload.transport in self.transports


_ALL = frozenset({"bulk", "lines", "frames", "datagrams", "churn", "idle", "silent"})
_LINE_PATTERNS = frozenset({"lines", "churn", "idle", "silent"})
_HELD_PATTERNS = frozenset({"idle", "silent"})
"""Workloads whose rows measure what held connections cost: a fresh server per run."""

SERVERS = {
    server.name: server
    for server in [
        Server(
            "stdlib-recv-queue",
            "socketserver.ThreadingTCPServer, recv(65536) chunks into a queue.Queue",
            frozenset({"bulk"}),
        ),
        Server(
            "stdlib-readline-queue",
            "socketserver threading stream server, StreamRequestHandler lines into a queue.Queue",
            _LINE_PATTERNS,
        ),
        Server(
            "stdlib-frame-queue",
            "socketserver.ThreadingTCPServer, rfile.read() of prefix and payload into a queue",
            frozenset({"frames"}),
        ),
        Server(
            "stdlib-datagram-queue",
            "socketserver.UDPServer / UnixDatagramServer, handler puts datagrams into a queue",
            frozenset({"datagrams"}),
        ),
        Server("fastsock-dropin", "the stdlib row's code with fastsock's classes", _ALL),
        Server("fastsock-compiled", "fastsock.receiver(ring), consumer ring.get_many()", _ALL),
        Server(
            "fastsock-compiled-batch", "fastsock.receiver(ring), consumer ring.get_batch()", _ALL
        ),
        Server(
            "fastsock-compiled-2",
            "fastsock-compiled with engine_threads=2: two engine threads on the listening "
            "socket (not in the default run; give it 2 CPUs: --share-cpus)",
            _ALL - {"datagrams"},
            frozenset({"tcp", "unix"}),
        ),
        Server(
            "fastsock-prefork",
            "PreforkServer, 2 worker processes into one ring, consumer get_batch()",
            _ALL,
            frozenset({"tcp", "unix", "udp"}),
        ),
        Server(
            "fastsock-prefork-1",
            "PreforkServer with 1 worker process: what the 2 workers are scaled against",
            _ALL,
            frozenset({"tcp", "unix", "udp"}),
        ),
        Server(
            "fastsock-forking",
            "ForkingTCPServer + fastsock.receiver(ring): a process per connection into one "
            "ring, consumer get_many()",
            frozenset({"bulk", "lines", "frames", "churn"}),
            frozenset({"tcp"}),
        ),
        Server("asyncio-protocol", "asyncio Protocol / DatagramProtocol counting inline", _ALL),
        Server("uvloop-protocol", "the same protocols on uvloop", _ALL),
        Server(
            "c-sink",
            "fastsock._loadgen.sink_stream / sink_datagrams: C loop that only counts (ceiling)",
            _ALL - _HELD_PATTERNS,
        ),
    ]
}
SERVER_ALIASES = {"c-epoll-sink": "c-sink"}
"""Older names still accepted: bench/bench_stream.py called the C sink c-epoll-sink."""
CEILING = "c-sink"


PREFORK_SERVERS = ("fastsock-prefork", "fastsock-prefork-1")
FULL_RUN_SERVERS = ("fastsock-compiled-2",)
"""Servers only --full or --servers runs: the default run stays about a minute."""
UVLOOP = "uvloop-protocol"
"""The row a silent-live row's time to accept its connections is compared with."""


def default_servers(server_cpus):
    """Every server, except FULL_RUN_SERVERS, and the prefork ones when the server process
    has a single CPU: their workers could only share that CPU, which the --full run shows."""
    names = [name for name in SERVERS if name not in FULL_RUN_SERVERS]
    if server_cpus is not None and len(server_cpus) < 2:
        names = [name for name in names if name not in PREFORK_SERVERS]
    return names


def unavailable(server_name):
    """Why a server cannot run here, or None."""
    if server_name == "uvloop-protocol":
        try:
            import uvloop  # noqa: F401
        except ImportError:
            return "uvloop is not installed (pip install uvloop)"
    return None


def package_root():
    """The directory holding the fastsock package this process imported."""
    return str(Path(fastsock.__file__).resolve().parent.parent)


# -- Shared by the coordinator and its child processes ---------------------------------------


def emit(message):
    """Send one JSON line to the coordinator."""
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def receive_command():
    """The next JSON line from the coordinator."""
    line = sys.stdin.readline()
    if not line:
        raise SystemExit("the coordinator went away")
    return json.loads(line)


def pin(cpus):
    if cpus:
        os.sched_setaffinity(0, set(cpus))


def raise_open_file_limit(connections=0):
    """Idle, silent and churn runs hold many descriptors: take the hard limit as the soft
    one, first raising the hard limit (root may, up to fs.nr_open) if ``connections`` need
    more.  RuntimeError if they cannot have them: a row must not quietly hold fewer."""
    needed = connections + DESCRIPTOR_MARGIN
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, needed))
        except (OSError, ValueError) as exc:
            raise RuntimeError(
                f"{connections:,} connections need {needed:,} file descriptors, and the "
                f"hard limit {hard:,} cannot be raised ({exc}): run as root or raise it "
                "(ulimit -Hn)"
            ) from None
        return
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- Coordinator -----------------------------------------------------------------------------


class RunFailed(Exception):
    pass


class Child:
    """One child process (a module of this package run with -m), talked to in JSON lines.

    It runs from the directory that holds the fastsock package this process imported, so it
    imports that same package rather than a source checkout in the current directory.
    """

    def __init__(self, module, label, config):
        self.stderr = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            [sys.executable, "-m", module, json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            cwd=package_root(),
            # A session of its own: close() ends it with whatever it forked, and Ctrl-C
            # reaches only the coordinator, which then closes it.
            start_new_session=True,
        )
        self.label = label
        self.pending = b""

    def send(self, message):
        self.process.stdin.write(json.dumps(message).encode() + b"\n")
        self.process.stdin.flush()

    def receive(self, deadline):
        fd = self.process.stdout.fileno()
        while b"\n" not in self.pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RunFailed(f"over --timeout, still waiting for the {self.label}")
            if select.select([fd], [], [], remaining)[0]:
                data = os.read(fd, 65536)
                if not data:
                    raise RunFailed(f"the {self.label} failed: {self.last_error()}")
                self.pending += data
        line, self.pending = self.pending.split(b"\n", 1)
        return json.loads(line)

    def last_error(self):
        self.process.wait()
        self.stderr.seek(0)
        detail = self.stderr.read().decode(errors="replace").strip()
        return detail.splitlines()[-1] if detail else f"exit status {self.process.returncode}"

    def close(self):
        """Let the child exit by itself, then end its process group: a server process that
        failed or timed out may leave prefork workers behind."""
        try:
            self.process.wait(CHILD_EXIT_SECONDS)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        self.stderr.close()


@dataclass
class Settings:
    """What one invocation measures and how; built by the CLI from its options."""

    workloads: list
    servers: list
    seconds: float = DEFAULT_SECONDS
    runs: int = DEFAULT_RUNS
    warmups: int = DEFAULT_WARMUPS
    bytes: int = DEFAULT_BYTES
    churn_connections: int = DEFAULT_CHURN_CONNECTIONS
    idle_connections: int = DEFAULT_IDLE_CONNECTIONS
    silent_connections: int = DEFAULT_SILENT_CONNECTIONS
    server_cpus: list = None
    client_cpus: list = None
    timeout: float = None

    def __post_init__(self):
        if self.timeout is None:
            self.timeout = 3 * self.seconds + 30

    @property
    def warmup_seconds(self):
        return min(self.seconds, WARMUP_SECONDS)

    def warmups_for(self, workload):
        """Idle and silent rows measure fresh servers (a server process per run): nothing
        to warm."""
        return 0 if workload.pattern in _HELD_PATTERNS else self.warmups

    def run_timeout(self, workload):
        """--timeout, and HELD_TIMEOUT_SECONDS more per connection a run holds."""
        return self.timeout + self.held_connections(workload) * HELD_TIMEOUT_SECONDS

    def held_connections(self, workload):
        """The silent connections a run of ``workload`` holds at once."""
        return {"idle": self.idle_connections, "silent": self.silent_connections}.get(
            workload.pattern, 0
        )


def placement(server_cpus, client_cpus, share=False):
    """(server CPUs, client CPUs, description): the load generator on its own CPU, the
    server process on the others; with ``share``, both on every available CPU.  ValueError
    for CPUs that are not available or shared."""
    available = sorted(os.sched_getaffinity(0))
    if share:
        if server_cpus is not None or client_cpus is not None:
            raise ValueError("--share-cpus places both sides itself: drop --server/client-cpus")
        shared = f"server process and load generator share CPU {_cpu_list(available)}"
        return available, available, shared + ", not pinned apart"
    if server_cpus is None and client_cpus is None:
        if len(available) < 2:
            alone = f"one CPU available ({available[0]}): server and load generator share it"
            return None, None, alone
        server_cpus, client_cpus = available[:-1], available[-1:]
    elif server_cpus is None or client_cpus is None:
        raise ValueError("give both --server-cpus and --client-cpus, or neither")
    for cpus in (server_cpus, client_cpus):
        missing = sorted(set(cpus) - set(available))
        if missing:
            raise ValueError(f"CPU {missing[0]} is not available; choose among {available}")
    if set(server_cpus) & set(client_cpus):
        raise ValueError("--server-cpus and --client-cpus must not share a CPU")
    description = (
        f"server process on CPU {_cpu_list(server_cpus)} (its prefork workers too), "
        f"load generator on CPU {_cpu_list(client_cpus)}, of {len(available)} available"
    )
    return server_cpus, client_cpus, description


def _cpu_list(cpus):
    return ",".join(str(cpu) for cpu in cpus)


class ServerProcess:
    """The server process of a row: it serves ``runs`` runs, then exits."""

    def __init__(self, workload, server, settings, runs):
        self.child = Child(
            "fastsock._bench_server",
            "server process",
            {
                "workload": workload.name,
                "server": server,
                "runs": runs,
                "cpus": settings.server_cpus,
                "seconds": settings.seconds,
                "timeout": settings.run_timeout(workload),
                "churn_connections": settings.churn_connections,
                "held_connections": settings.held_connections(workload),
            },
        )
        try:
            self.started = self.child.receive(time.monotonic() + settings.run_timeout(workload))
        except BaseException:
            self.child.close()
            raise

    def close(self):
        self.child.close()


def run_once(workload, server_process, settings, seconds):
    """One run sending for ``seconds``: a fresh load generator against the row's server
    process; a run record."""
    deadline = time.monotonic() + settings.run_timeout(workload)
    receiver = server_process.child
    receiver.send({"begin": True})
    receiver.receive(deadline)
    generator = Child(
        "fastsock._bench_load",
        "load generator",
        {
            "workload": workload.name,
            "address": server_process.started["address"],
            "cpus": settings.client_cpus,
            "seconds": seconds,
            "total_bytes": settings.bytes,
            "churn_connections": settings.churn_connections,
            "held_connections": settings.held_connections(workload),
            "timeout": settings.run_timeout(workload),
        },
    )
    try:
        held = alone_rate = None
        if workload.pattern == "silent":
            # The live connection alone first: the rate its silent peers are not to slow,
            # measured on the same fresh server, warmed up as the live run finds it.
            alone = generator.receive(deadline)
            receiver.send({"expected": alone["sent_units"], "before_hold": True})
            alone_rate = run_rate(alone, receiver.receive(deadline))
            generator.send({"continue": True})
        if workload.pattern in _HELD_PATTERNS:
            opened = generator.receive(deadline)
            quiet = QUIET_SECONDS if workload.pattern == "silent" else None
            receiver.send({"hold": opened["opened"], "quiet_seconds": quiet})
            held = receiver.receive(deadline)
            held["accept_seconds"] = held.pop("held_at") - opened["start"]
            held["open_seconds"] = opened["seconds"]
            held["alone_messages_per_second"] = alone_rate
            generator.send({"release": True})
        sending = generator.receive(deadline)
        receiver.send({"expected": sending["sent_units"]})
        counted = receiver.receive(deadline)
    finally:
        generator.close()
    return run_record(workload, held, sending, counted)


def run_seconds(sending, counted):
    """A run's time: the C sinks' own, or from the generator's start to the last unit taken;
    None if nothing was taken."""
    if counted["active_seconds"] is not None:
        return counted["active_seconds"]
    if counted["end"] is not None:
        return counted["end"] - sending["start"]
    return None


def run_rate(sending, counted):
    received = counted["received"]
    seconds = run_seconds(sending, counted)
    return received / seconds if received and seconds and seconds > 0 else 0.0


def run_record(workload, held, sending, counted):
    received = counted["received"]
    seconds = run_seconds(sending, counted)
    rate = run_rate(sending, counted)
    generator_rate = sending["sent_units"] / sending["seconds"] if sending["seconds"] > 0 else None
    record = {
        "sent": sending["sent_units"],
        "received": received,
        "lost": sending["sent_units"] - received,
        "complete": counted["complete"],
        "seconds": seconds,
        "messages_per_second": None if workload.unit == "byte" else rate,
        "bytes_per_second": rate * workload.unit_bytes,
        "peak_rss_kib": counted["peak_rss_kib"],
        "cpu_seconds": counted["cpu_seconds"],
        "generator_messages_per_second": (
            None if workload.unit == "byte" or generator_rate is None else generator_rate
        ),
        "generator_bytes_per_second": (
            None if generator_rate is None else generator_rate * workload.unit_bytes
        ),
        # Held rows' generators also opened the connections meanwhile: no fraction.
        "generator_cpu_fraction": (
            sending["cpu_seconds"] / sending["seconds"]
            if sending["seconds"] > 0 and workload.pattern not in _HELD_PATTERNS
            else None
        ),
        "kernel_drops": counted["kernel_drops"],
        "fastsock_drops": counted["fastsock_drops"],
        "idle": None,
    }
    if held is not None:
        connections = held["held"]
        growth = held["rss_kib"] - held["rss_before_kib"]
        record["idle"] = {
            "connections": connections,
            "rss_before_kib": held["rss_before_kib"],
            "rss_held_kib": held["rss_kib"],
            "kib_per_connection": growth / connections if connections else None,
            "accept_seconds": held["accept_seconds"],
            "open_seconds": held["open_seconds"],
            "listen_overflows": held["listen_overflows"],
            "threads": held["threads"],
            "quiet_cpu_fraction": held["quiet_cpu_fraction"],
            "alone_messages_per_second": held["alone_messages_per_second"],
        }
    return record


def spread(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(workload, runs):
    byte_rates = [run["bytes_per_second"] for run in runs]
    sent = sum(run["sent"] for run in runs)
    received = sum(run["received"] for run in runs)
    generator = [run["generator_bytes_per_second"] for run in runs]
    generator = [rate for rate in generator if rate is not None]
    generator_median = statistics.median(generator) if generator else None
    summary = {
        "messages_per_second": (
            None
            if workload.unit == "byte"
            else spread([run["messages_per_second"] for run in runs])
        ),
        "bytes_per_second": spread(byte_rates),
        "sent": sent,
        "received": received,
        "lost": sent - received,
        "lost_fraction": (sent - received) / sent if sent else 0.0,
        "peak_rss_kib": max(run["peak_rss_kib"] for run in runs),
        "cpu_seconds": statistics.median(run["cpu_seconds"] for run in runs),
        "generator_messages_per_second": (
            None
            if generator_median is None or workload.unit == "byte"
            else generator_median / workload.unit_bytes
        ),
        "generator_bytes_per_second": generator_median,
        "generator_cpu_fraction": _median(run["generator_cpu_fraction"] for run in runs),
        "kernel_drops": _total(run["kernel_drops"] for run in runs),
        "fastsock_drops": _total_counts(run["fastsock_drops"] for run in runs),
        "idle": None,
        "ratio_to_baseline": None,
        "ratio_to_ceiling": None,
    }
    idle = [run["idle"] for run in runs if run["idle"] is not None]
    if idle:
        summary["idle"] = {
            "connections": min(run["connections"] for run in idle),
            "kib_per_connection": _median(run["kib_per_connection"] for run in idle),
            "accept_seconds": _median(run["accept_seconds"] for run in idle),
            "listen_overflows": sum(run["listen_overflows"] for run in idle),
            "threads": max(run["threads"] for run in idle),
            "quiet_cpu_fraction": _median(run["quiet_cpu_fraction"] for run in idle),
            "alone_messages_per_second": _median(run["alone_messages_per_second"] for run in idle),
            "live_ratio_to_alone": None,
            "accept_ratio_to_uvloop": None,
        }
        alone = summary["idle"]["alone_messages_per_second"]
        if alone and summary["messages_per_second"]:
            summary["idle"]["live_ratio_to_alone"] = (
                summary["messages_per_second"]["median"] / alone
            )
    return summary


def _median(values):
    """The median of the values that are not None, or None."""
    values = [value for value in values if value is not None]
    return statistics.median(values) if values else None


def _total(values):
    values = [value for value in values if value is not None]
    return sum(values) if values else None


def _total_counts(dicts):
    dicts = [counts for counts in dicts if counts is not None]
    if not dicts:
        return None
    return {key: sum(counts[key] for counts in dicts) for key in dicts[0]}


def median_unit_rate(row):
    summary = row.get("summary")
    if not summary:
        return None
    rates = summary["messages_per_second"] or summary["bytes_per_second"]
    return rates["median"]


def add_ratios(rows):
    """Each row's median rate over its workload's stdlib baseline and over its C sink; a
    silent-live row's time to accept over uvloop's."""
    by_key = {(row["workload"], row["server"]): row for row in rows}
    for row in rows:
        rate = median_unit_rate(row)
        if rate is None:
            continue
        for field, reference in (
            ("ratio_to_baseline", row["baseline"]),
            ("ratio_to_ceiling", CEILING),
        ):
            reference_row = by_key.get((row["workload"], reference))
            reference_rate = median_unit_rate(reference_row) if reference_row else None
            if reference_rate:
                row["summary"][field] = rate / reference_rate
        if WORKLOADS[row["workload"]].pattern == "silent":
            held = row["summary"]["idle"]
            uvloop = by_key.get((row["workload"], UVLOOP))
            uvloop_held = uvloop["summary"]["idle"] if uvloop and uvloop["summary"] else None
            if uvloop_held and uvloop_held["accept_seconds"] and held["accept_seconds"]:
                held["accept_ratio_to_uvloop"] = (
                    held["accept_seconds"] / uvloop_held["accept_seconds"]
                )


class Progress:
    """One status line on stderr, rewritten in place on a terminal, one line per step else."""

    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.in_place = stream.isatty()

    def step(self, text):
        if self.in_place:
            self.stream.write("\r\033[K" + text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def note(self, text):
        """A line that stays: a finished row."""
        if self.in_place:
            self.stream.write("\r\033[K")
        self.stream.write(text + "\n")
        self.stream.flush()


def planned_rows(settings):
    return [
        (WORKLOADS[workload], server)
        for workload in settings.workloads
        for server in settings.servers
        if SERVERS[server].applies(WORKLOADS[workload])
    ]


def estimated_seconds(settings):
    """A rough duration: each run sends for --seconds, plus the generator's start and the
    server's draining (a datagram run whose losses cannot all be accounted for waits
    DATAGRAM_SETTLE_SECONDS more), plus a silent-live run's second live stream and quiet
    second; opening the held connections is left out."""
    seconds = 0.0
    for workload, _ in planned_rows(settings):
        warmups = settings.warmups_for(workload)
        seconds += ROW_OVERHEAD_SECONDS
        seconds += warmups * (settings.warmup_seconds + RUN_OVERHEAD_SECONDS)
        seconds += settings.runs * (settings.seconds + RUN_OVERHEAD_SECONDS)
        if workload.pattern == "silent":
            seconds += settings.runs * (QUIET_SECONDS + settings.seconds)
    return seconds


class Row:
    """One row of the report while its runs are taken: its record, and the server process
    that serves its runs (an idle row starts a fresh one per run)."""

    def __init__(self, workload, server, settings, position):
        self.workload = workload
        self.server = server
        self.settings = settings
        self.label = f"[{position}] {workload.name} / {server}"
        self.record = {
            "workload": workload.name,
            "server": server,
            "baseline": workload.baseline,
            "unit": workload.unit,
            "unit_bytes": workload.unit_bytes,
            "status": "ok",
            "error": None,
            "warmup_runs": [],
            "runs": [],
            "summary": None,
        }
        self.warmups = settings.warmups_for(workload)
        self.total = self.warmups + settings.runs
        # An idle or silent row measures what connections cost a fresh server: a server
        # process per run.  Every other row keeps one server process, which the warm-ups
        # really warm up.
        self.fresh_each_run = workload.pattern in _HELD_PATTERNS
        self.server_process = None
        self.taken = 0

    @property
    def active(self):
        return self.record["status"] == "ok" and self.taken < self.total

    def take_run(self, progress):
        """The row's next run (a warm-up first); on failure the row is marked failed and
        its server process closed."""
        warmup = self.taken < self.warmups
        if warmup:
            step = f"warm-up {self.taken + 1} of {self.warmups}"
        else:
            step = f"run {self.taken - self.warmups + 1} of {self.settings.runs}"
        progress.step(f"{self.label}: {step}")
        try:
            if self.server_process is None or self.fresh_each_run:
                self.close()
                runs = 1 if self.fresh_each_run else self.total
                self.server_process = ServerProcess(self.workload, self.server, self.settings, runs)
            seconds = self.settings.warmup_seconds if warmup else self.settings.seconds
            record = run_once(self.workload, self.server_process, self.settings, seconds)
        except RunFailed as failure:
            self.record["status"], self.record["error"] = "failed", str(failure)
            progress.note(f"{self.label}: {step} failed: {failure}")
            self.close()
            return
        self.taken += 1
        (self.record["warmup_runs"] if warmup else self.record["runs"]).append(record)
        if not self.active:
            self.close()
            self.finish(progress)

    def finish(self, progress):
        self.record["summary"] = summarize(self.workload, self.record["runs"])
        rate = median_unit_rate(self.record)
        unit = "B/s" if self.workload.unit == "byte" else "msg/s"
        lost = self.record["summary"]["lost"]
        progress.note(
            f"{self.label}: {rate:,.0f} {unit} (median)" + (f", {lost:,} lost" if lost else "")
        )

    def close(self):
        if self.server_process is not None:
            self.server_process.close()
            self.server_process = None


def measure_workload(rows, progress):
    """The rows of one workload, their runs interleaved: round after round, each row takes
    its next run, starting one row later each round.  A machine whose speed drifts (other
    tenants, turbo, thermal) then moves every row alike, and the ratios between rows hold."""
    try:
        for row in rows:
            reason = unavailable(row.server)
            if reason:
                row.record["status"], row.record["error"] = "unavailable", reason
                progress.note(f"{row.label}: not available: {reason}")
        rounds = 0
        while active := [row for row in rows if row.active]:
            start = rounds % len(active)
            for row in active[start:] + active[:start]:
                row.take_run(progress)
            rounds += 1
    finally:
        for row in rows:
            row.close()


def run(settings, progress):
    """Every planned row, a workload at a time; the rows with their ratios."""
    plan = planned_rows(settings)
    rows = [
        Row(workload, server, settings, f"{number}/{len(plan)}")
        for number, (workload, server) in enumerate(plan, 1)
    ]
    for workload in dict.fromkeys(row.workload for row in rows):
        measure_workload([row for row in rows if row.workload is workload], progress)
    records = [row.record for row in rows]
    add_ratios(records)
    return records
