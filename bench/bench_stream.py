"""fastsock's stream benchmark: receive rates against the stdlib, on this machine.

    python bench/bench_stream.py [--seconds S] [--runs N] [--bytes 2G]
                                 [--server-cpu 0 --client-cpu 1] [--json out.json]

Each run starts a server process and a load-generator process, pinned to different CPUs.
The generator (fastsock._loadgen.send_stream, compiled, GIL-free) connects, writes up to
--bytes (or for --seconds, cut to whole messages) and shuts its connections down; the
server counts every message its consumer gets.  The rate of a run is the messages counted
over the time from the generator's first write to the consumer's last message.  The
c-epoll-sink row receives with a plain C epoll loop: the ceiling of this machine, and its
"gen MB/s" is the generator's own ceiling.  bench/README.md explains each row and column.
"""

import argparse
import asyncio
import json
import os
import platform
import queue
import re
import resource
import select
import socket
import socketserver
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

try:
    import fastsock
except ImportError:
    # Run from a checkout where fastsock is built in place but not installed.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import fastsock

try:
    from fastsock import _loadgen
except ImportError:
    _loadgen = None

HOST = "127.0.0.1"
MB = 1e6
LINE_BYTES = 64
LINES_PER_BLOCK = 256
BULK_BLOCK_BYTES = 64 * 1024
RECV_BYTES = 65536
# Seconds a consumer may wait for one batch before it looks at whether it is done.
CONSUMER_POLL_SECONDS = 0.05
# Seconds without a new message, once the sent count is known, after which a consumer that
# counts towards that number gives up and reports what it has (a loss).
STALL_SECONDS = 5.0


@dataclass(frozen=True)
class Workload:
    name: str
    framing: str  # "raw" counts bytes, "lines" counts 64-byte lines
    connections: int

    @property
    def unit_bytes(self):
        """Bytes per counted unit: a byte of a raw stream, or a whole line."""
        return 1 if self.framing == "raw" else LINE_BYTES

    def block(self):
        if self.framing == "raw":
            return bytes(range(256)) * (BULK_BLOCK_BYTES // 256)
        return b"".join(b"line %058d\n" % i for i in range(LINES_PER_BLOCK))


WORKLOADS = {
    "bulk": Workload("bulk", "raw", 1),
    "lines-1": Workload("lines-1", "lines", 1),
    "lines-16": Workload("lines-16", "lines", 16),
}
BASELINE = {"raw": "stdlib-recv-queue", "lines": "stdlib-readline-queue"}
SERVERS = [
    "stdlib-recv-queue",
    "stdlib-readline-queue",
    "fastsock-dropin",
    "fastsock-compiled",
    "fastsock-compiled-batch",
    "asyncio-protocol",
    "uvloop-protocol",
    "c-epoll-sink",
]
CEILING = "c-epoll-sink"


def applies(server, workload):
    """stdlib-recv-queue is the bulk baseline, stdlib-readline-queue the lines baseline."""
    if server == "stdlib-recv-queue":
        return workload.framing == "raw"
    if server == "stdlib-readline-queue":
        return workload.framing == "lines"
    return True


def unavailable(server):
    """Why a server cannot run here, or None."""
    if _loadgen is None:
        return "fastsock._loadgen is not built (pip install . or cythonize it in place)"
    if server.startswith("fastsock-compiled") and not hasattr(fastsock, "receiver"):
        return "fastsock.receiver does not exist in this build"
    if server == "uvloop-protocol":
        try:
            import uvloop  # noqa: F401
        except ImportError:
            return "uvloop is not installed"
    return None


# -- Server process --------------------------------------------------------------------------


class Tally:
    """What the server's consumer counted, and when it had counted it all."""

    def __init__(self, counts_to_expected=False):
        # Consumers that cannot see EOF count until the sent total, known only at the end.
        self.counts_to_expected = counts_to_expected
        self.expected = None
        self.units = 0
        self.last_count = None
        self.end = None
        self.finished = threading.Event()

    def count(self, units):
        self.units = units
        self.last_count = time.monotonic()

    def finish(self, units=None):
        if units is not None:
            self.count(units)
        self.end = self.last_count
        self.finished.set()

    def wait(self):
        """Wait for the consumer; a counting-to-expected one that stalls reports a loss."""
        last_units, last_change = -1, time.monotonic()
        while not self.finished.wait(CONSUMER_POLL_SECONDS):
            if not self.counts_to_expected:
                continue
            if self.units != last_units:
                last_units, last_change = self.units, time.monotonic()
            elif time.monotonic() - last_change > STALL_SECONDS:
                return False
        return True


def serve_in_thread(server):
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server.server_address


def queue_server(module, workload, tally):
    """The stdlib pattern: a threading server whose handlers put what they read into a
    queue.Queue, drained by one consumer thread; each handler ends with a None."""
    received = queue.Queue()

    class RecvQueueHandler(module.BaseRequestHandler):
        def handle(self):
            while chunk := self.request.recv(RECV_BYTES):
                received.put(chunk)
            received.put(None)

    class ReadlineQueueHandler(module.StreamRequestHandler):
        def handle(self):
            for line in self.rfile:
                received.put(line)
            received.put(None)

    def consume_chunks():
        units = 0
        open_connections = workload.connections
        while True:
            chunk = received.get()
            if chunk is None:
                open_connections -= 1
                if not open_connections:
                    break
            else:
                units += len(chunk)
        tally.finish(units)

    def consume_lines():
        units = 0
        open_connections = workload.connections
        while True:
            if received.get() is None:
                open_connections -= 1
                if not open_connections:
                    break
            else:
                units += 1
        tally.finish(units)

    raw = workload.framing == "raw"
    handler = RecvQueueHandler if raw else ReadlineQueueHandler
    threading.Thread(target=consume_chunks if raw else consume_lines, daemon=True).start()
    return serve_in_thread(module.ThreadingTCPServer((HOST, 0), handler))


def compiled_server(workload, tally, batches):
    """fastsock's fast path: the compiled receive loop frames into a RingQueue; the consumer
    takes lists of bytes (get_many) or one buffer per batch (get_batch)."""
    ring = fastsock.RingQueue()
    raw = workload.framing == "raw"

    def consume():
        units = 0
        while tally.expected is None or units < tally.expected:
            try:
                if batches:
                    batch = ring.get_batch(timeout=CONSUMER_POLL_SECONDS)
                    units += batch.nbytes if raw else len(batch)
                else:
                    messages = ring.get_many(timeout=CONSUMER_POLL_SECONDS)
                    units += sum(map(len, messages)) if raw else len(messages)
            except queue.Empty:
                continue
            tally.count(units)
        tally.finish()

    threading.Thread(target=consume, daemon=True).start()
    handler = fastsock.receiver(ring, framing=workload.framing)
    return serve_in_thread(fastsock.ThreadingTCPServer((HOST, 0), handler))


def protocol_server(workload, tally, new_loop):
    """An asyncio Protocol that splits lines itself (keeping the partial tail) or counts
    bytes; the event loop runs in its own thread."""
    closed = 0
    units = 0

    class LineCounter(asyncio.Protocol):
        def __init__(self):
            self.tail = b""

        def data_received(self, data):
            nonlocal units
            lines = data.split(b"\n")
            lines[0] = self.tail + lines[0]
            self.tail = lines.pop()
            units += len(lines)

        def connection_lost(self, exc):
            nonlocal closed
            closed += 1
            if closed == workload.connections:
                tally.finish(units)

    class ByteCounter(LineCounter):
        def data_received(self, data):
            nonlocal units
            units += len(data)

    protocol = ByteCounter if workload.framing == "raw" else LineCounter
    loop = new_loop()
    server = loop.run_until_complete(loop.create_server(protocol, HOST, 0))
    threading.Thread(target=loop.run_forever, daemon=True).start()
    return server.sockets[0].getsockname()[:2]


def sink_server(workload, tally, max_seconds):
    """The ceiling: fastsock._loadgen.sink_stream, a C epoll loop that only counts."""
    listener = socket.create_server((HOST, 0), backlog=workload.connections)
    newline = ord("\n") if workload.framing == "lines" else -1

    def sink():
        received, lines, _ = _loadgen.sink_stream(
            listener.fileno(), workload.connections, newline, max_seconds
        )
        tally.finish(received if workload.framing == "raw" else lines)

    threading.Thread(target=sink, daemon=True).start()
    return listener.getsockname()


def start_server(name, workload, tally, max_seconds):
    if name.startswith("stdlib-"):
        return queue_server(socketserver, workload, tally)
    if name == "fastsock-dropin":
        return queue_server(fastsock, workload, tally)
    if name.startswith("fastsock-compiled"):
        return compiled_server(workload, tally, batches=name.endswith("-batch"))
    if name == "asyncio-protocol":
        return protocol_server(workload, tally, asyncio.new_event_loop)
    if name == "uvloop-protocol":
        import uvloop

        return protocol_server(workload, tally, uvloop.new_event_loop)
    if name == CEILING:
        return sink_server(workload, tally, max_seconds)
    raise ValueError(f"unknown server {name!r}")


def peak_rss_kib():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return None


def cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def emit(message):
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def pin(cpu):
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


def serve(config):
    """Server process: report the address, learn the sent total, report what was counted."""
    pin(config["cpu"])
    workload = WORKLOADS[config["workload"]]
    tally = Tally(counts_to_expected=config["server"].startswith("fastsock-compiled"))
    address = start_server(config["server"], workload, tally, config["max_seconds"])
    cpu_at_start = cpu_seconds()
    emit({"address": list(address)})
    tally.expected = json.loads(sys.stdin.readline())["expected"]
    complete = tally.wait()
    emit(
        {
            "received": tally.units,
            "end": tally.end if complete else tally.last_count,
            "stalled": not complete,
            "peak_rss_kib": peak_rss_kib(),
            "cpu_seconds": cpu_seconds() - cpu_at_start,
        }
    )
    # Handler and consumer threads may still sit in blocking calls: leave without them.
    os._exit(0)


def send(config):
    """Load-generator process: connect, write, report when it started and what it sent."""
    pin(config["cpu"])
    workload = WORKLOADS[config["workload"]]
    address = tuple(config["address"])
    connections = [socket.create_connection(address) for _ in range(workload.connections)]
    start = time.monotonic()
    sent, seconds = _loadgen.send_stream(
        [connection.fileno() for connection in connections],
        workload.block(),
        config["total_bytes"],
        config["seconds"],
    )
    emit({"start": start, "sent_bytes": sent, "send_seconds": seconds})
    for connection in connections:
        connection.close()


# -- Coordinator -----------------------------------------------------------------------------


class RunFailed(Exception):
    pass


class Child:
    """A role of this script in its own process, talked to in JSON lines, killed on exit."""

    def __init__(self, role, label, config):
        self.stderr = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), role, json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
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
                    self.process.wait()
                    self.stderr.seek(0)
                    detail = self.stderr.read().decode(errors="replace").strip()
                    last = detail.splitlines()[-1] if detail else f"exit {self.process.returncode}"
                    raise RunFailed(f"the {self.label} failed: {last}")
                self.pending += data
        line, self.pending = self.pending.split(b"\n", 1)
        return json.loads(line)

    def close(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.stderr.close()


def run_once(server, workload, options):
    deadline = time.monotonic() + options.timeout
    children = []
    try:
        receiver = Child(
            "_serve",
            "server process",
            {
                "server": server,
                "workload": workload.name,
                "cpu": options.server_cpu,
                "max_seconds": options.timeout,
            },
        )
        children.append(receiver)
        address = receiver.receive(deadline)["address"]
        sender = Child(
            "_send",
            "load generator",
            {
                "address": address,
                "workload": workload.name,
                "cpu": options.client_cpu,
                "total_bytes": options.bytes,
                "seconds": options.seconds,
            },
        )
        children.append(sender)
        sending = sender.receive(deadline)
        expected = sending["sent_bytes"] // workload.unit_bytes
        receiver.send({"expected": expected})
        result = receiver.receive(deadline)
    finally:
        for child in children:
            child.close()
    elapsed = result["end"] - sending["start"] if result["end"] else float("nan")
    return {
        "sent": expected,
        "received": result["received"],
        "stalled": result["stalled"],
        "seconds": elapsed,
        "units_per_second": result["received"] / elapsed,
        "mb_per_second": result["received"] * workload.unit_bytes / elapsed / MB,
        "peak_rss_kib": result["peak_rss_kib"],
        "cpu_seconds": result["cpu_seconds"],
        "generator_mb_per_second": sending["sent_bytes"] / sending["send_seconds"] / MB,
    }


def summarize(runs, workload):
    rates = [run["units_per_second"] for run in runs]
    return {
        "units_per_second": statistics.median(rates),
        "min": min(rates),
        "max": max(rates),
        "mb_per_second": statistics.median(run["mb_per_second"] for run in runs),
        "peak_rss_mib": max(run["peak_rss_kib"] for run in runs) / 1024,
        "cpu_seconds": statistics.median(run["cpu_seconds"] for run in runs),
        "sent": sum(run["sent"] for run in runs),
        "received": sum(run["received"] for run in runs),
        "generator_mb_per_second": statistics.median(
            run["generator_mb_per_second"] for run in runs
        ),
    }


def measure(server, workload, options):
    """Warm-up run (discarded), then options.runs runs; a row dict for the table."""
    row = {"workload": workload.name, "server": server, "runs": []}
    reason = unavailable(server)
    if reason:
        row["error"] = f"not available: {reason}"
        print(f"  {workload.name:9} {server:24} {row['error']}", flush=True)
        return row
    for index in range(options.runs + 1):
        label = "warm-up" if index == 0 else f"run {index}/{options.runs}"
        try:
            run = run_once(server, WORKLOADS[workload.name], options)
        except RunFailed as failure:
            row["error"] = f"failed: {failure}"
            print(f"  {workload.name:9} {server:24} {label}: {row['error']}", flush=True)
            return row
        rate = format_rate(run["units_per_second"], workload)
        print(
            f"  {workload.name:9} {server:24} {label}: {rate}  "
            f"{run['received']}/{run['sent']} counted",
            flush=True,
        )
        if index:
            row["runs"].append(run)
    row["summary"] = summarize(row["runs"], workload)
    return row


def format_rate(rate, workload):
    if workload.framing == "raw":
        return f"{rate / MB:9.1f} MB/s"
    return f"{rate / 1e6:9.3f} M msg/s ({rate * LINE_BYTES / MB:.1f} MB/s)"


def ratio(value, reference):
    return f"{value / reference:6.2f}x" if reference else "     -"


def print_table(rows, options):
    print()
    print(
        f"{'workload':9} {'server':24} {'msg/s (median)':>14} {'min-max':>15} {'MB/s':>8} "
        f"{'x stdlib':>8} {'x C sink':>8} {'RSS MiB':>8} {'CPU s':>6} {'received/sent':>23} "
        f"{'gen MB/s':>8}"
    )
    for workload in [WORKLOADS[name] for name in options.workloads]:
        done = {
            row["server"]: row["summary"]
            for row in rows
            if row["workload"] == workload.name and "summary" in row
        }
        baseline = done.get(BASELINE[workload.framing], {}).get("units_per_second")
        ceiling = done.get(CEILING, {}).get("units_per_second")
        for row in rows:
            if row["workload"] != workload.name:
                continue
            if "summary" not in row:
                print(f"{workload.name:9} {row['server']:24} {row['error']}")
                continue
            summary = row["summary"]
            rate = summary["units_per_second"]
            if workload.framing == "raw":
                spread = f"{summary['min'] / MB:,.0f}-{summary['max'] / MB:,.0f} MB/s"
                rate_text = f"{'-':>14} {spread:>15}"
            else:
                spread = f"{summary['min'] / 1e3:,.0f}-{summary['max'] / 1e3:,.0f}k"
                rate_text = f"{rate:14,.0f} {spread:>15}"
            lost = summary["sent"] - summary["received"]
            counted = f"{summary['received']}/{summary['sent']}"
            counted += " ok" if not lost else f" LOST {lost}"
            print(
                f"{workload.name:9} {row['server']:24} {rate_text} "
                f"{summary['mb_per_second']:8.1f} {ratio(rate, baseline):>8} "
                f"{ratio(rate, ceiling):>8} {summary['peak_rss_mib']:8.1f} "
                f"{summary['cpu_seconds']:6.2f} {counted:>23} "
                f"{summary['generator_mb_per_second']:8.0f}"
            )


def parse_bytes(text):
    match = re.fullmatch(r"(\d+)([KMG]?)(i?B)?", text.strip(), re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (say 2G, 512M or 1000000)")
    return int(match.group(1)) * 1024 ** " KMG".index(match.group(2).upper() or " ")


def parse_names(choices):
    def parse(text):
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in names if name not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"choose among {', '.join(choices)}")
        return names

    return parse


def parse_arguments():
    parser = argparse.ArgumentParser(
        description="Receive rates of fastsock against the stdlib, asyncio and a C sink."
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="sending time cap per run")
    parser.add_argument("--runs", type=int, default=3, help="measured runs per row")
    parser.add_argument(
        "--bytes", type=parse_bytes, default=2 * 1024**3, help="bytes per run (default 2G)"
    )
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--client-cpu", type=int, default=1)
    parser.add_argument(
        "--timeout", type=float, help="seconds before a run is killed (default 3 * seconds + 30)"
    )
    parser.add_argument("--workloads", type=parse_names(list(WORKLOADS)), default=list(WORKLOADS))
    parser.add_argument("--servers", type=parse_names(SERVERS), default=SERVERS)
    parser.add_argument("--json", type=Path, help="also write every run to this file")
    options = parser.parse_args()
    if options.seconds <= 0 or options.runs < 1:
        parser.error("--seconds and --runs must be positive")
    if options.timeout is None:
        options.timeout = 3 * options.seconds + 30
    return parser, options


def placement(parser, options):
    """Pin server and generator to different CPUs, or say why they are not pinned."""
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2:
        options.server_cpu = options.client_cpu = None
        return f"one CPU available ({available[0]}): server and load generator run unpinned"
    for cpu in (options.server_cpu, options.client_cpu):
        if cpu not in available:
            parser.error(f"CPU {cpu} is not available; choose among {available}")
    if options.server_cpu == options.client_cpu:
        parser.error("--server-cpu and --client-cpu must differ")
    return f"server on CPU {options.server_cpu}, load generator on CPU {options.client_cpu}"


def main():
    parser, options = parse_arguments()
    where = placement(parser, options)
    implementation = getattr(fastsock, "IMPLEMENTATION", "drop-in only")
    print(
        f"fastsock stream benchmark: {where} ({os.cpu_count()} CPUs); Python "
        f"{platform.python_version()}; fastsock {implementation} from "
        f"{Path(fastsock.__file__).parent}"
    )
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    print(f"load average before the start: {load} (other load widens the min-max ranges)")
    print(
        f"each row: 1 warm-up + {options.runs} runs, each sending up to "
        f"{options.bytes / 1024**3:g} GiB or for {options.seconds:g} s, killed after "
        f"{options.timeout:g} s",
        flush=True,
    )
    rows = []
    for name in options.workloads:
        workload = WORKLOADS[name]
        for server in options.servers:
            if applies(server, workload):
                rows.append(measure(server, workload, options))
    print_table(rows, options)
    if options.json:
        settings = vars(options) | {"json": str(options.json)}
        report = {"placement": where, "options": settings, "rows": rows}
        options.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] in ("_serve", "_send"):
        (serve if sys.argv[1] == "_serve" else send)(json.loads(sys.argv[2]))
    else:
        main()
