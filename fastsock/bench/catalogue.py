"""The catalogue of ``fastsock bench``: its workloads, its servers under test and the
constants they run under.  Imported by the coordinator (``fastsock.bench.coordinator``) and
by its child processes (``fastsock.bench.server``, ``fastsock.bench.load``), which do not
import the coordinator.
"""

from dataclasses import dataclass

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


@dataclass(frozen=True)
class Workload:
    name: str
    transport: str
    """"tcp", "unix", "tls" (stream; TLS over TCP), "udp" or "unixgram" (datagram)."""
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
            "tls-lines-1",
            "tls",
            "lines",
            LINE_BYTES,
            1,
            "64-byte lines over TLS 1.3 (AES-256-GCM), one TCP connection; lines-1 in the same "
            "run is its plaintext cost",
        ),
        Workload(
            "tls-bulk",
            "tls",
            "bulk",
            1,
            1,
            "raw 64 KiB blocks over TLS 1.3 (AES-256-GCM), one TCP connection; bulk in the same "
            "run is its plaintext cost",
        ),
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
    """The transports it serves; only servers that name "tls" terminate TLS."""

    def applies(self, workload):
        return workload.pattern in self.patterns and workload.transport in self.transports


_ALL = frozenset({"bulk", "lines", "frames", "datagrams", "churn", "idle", "silent"})
_WITH_TLS = frozenset({"tcp", "unix", "udp", "unixgram", "tls"})
_LINE_PATTERNS = frozenset({"lines", "churn", "idle", "silent"})
HELD_PATTERNS = frozenset({"idle", "silent"})
"""Workloads whose rows measure what held connections cost: a fresh server per run."""

SERVERS = {
    server.name: server
    for server in [
        Server(
            "stdlib-recv-queue",
            "socketserver.ThreadingTCPServer, recv(65536) chunks into a queue.Queue "
            "(TLS: the accepted socket wrapped by ssl)",
            frozenset({"bulk"}),
            _WITH_TLS,
        ),
        Server(
            "stdlib-readline-queue",
            "socketserver threading stream server, StreamRequestHandler lines into a queue.Queue "
            "(TLS: the accepted socket wrapped by ssl)",
            _LINE_PATTERNS,
            _WITH_TLS,
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
        Server("fastsock-dropin", "the stdlib row's code with fastsock's classes", _ALL, _WITH_TLS),
        Server(
            "fastsock-compiled",
            "fastsock.receiver(ring), consumer ring.get_many() (TLS: ssl_context)",
            _ALL,
            _WITH_TLS,
        ),
        Server(
            "fastsock-compiled-batch",
            "fastsock.receiver(ring), consumer ring.get_batch()",
            _ALL,
            _WITH_TLS,
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
        Server(
            "asyncio-protocol",
            "asyncio Protocol / DatagramProtocol counting inline (TLS: create_server(ssl=))",
            _ALL,
            _WITH_TLS,
        ),
        Server("uvloop-protocol", "the same protocols on uvloop", _ALL, _WITH_TLS),
        Server(
            "c-sink",
            "fastsock.bench._loadgen.sink_stream / sink_datagrams: "
            "C loop that only counts (ceiling)",
            _ALL - HELD_PATTERNS,
        ),
    ]
}
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
            return "uvloop is not installed (pip install uvloop, or install fastsock with [bench])"
    return None
