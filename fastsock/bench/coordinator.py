"""``fastsock bench``'s coordinator: drives the runs and summarizes them.

Each run starts two processes, pinned to different CPUs when there are two: a server process
(``fastsock.bench.server``) that runs one server under test and counts every message its
consumer takes, and a load generator (``fastsock.bench.load``) that sends one workload
with the compiled generator of ``fastsock.bench._loadgen``.  ``fastsock.bench.catalogue``
holds the workloads and servers, ``fastsock.bench.report`` prints the table and writes the
JSON and the plot.  ``bench/README.md`` explains every row and column,
``docs/benchmark-json.md`` the JSON.
"""

import contextlib
import json
import os
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
from fastsock.bench.catalogue import (
    CEILING,
    CHILD_EXIT_SECONDS,
    DEFAULT_BYTES,
    DEFAULT_CHURN_CONNECTIONS,
    DEFAULT_IDLE_CONNECTIONS,
    DEFAULT_RUNS,
    DEFAULT_SECONDS,
    DEFAULT_SILENT_CONNECTIONS,
    DEFAULT_WARMUPS,
    HELD_PATTERNS,
    HELD_TIMEOUT_SECONDS,
    QUIET_SECONDS,
    ROW_OVERHEAD_SECONDS,
    RUN_OVERHEAD_SECONDS,
    SERVERS,
    UVLOOP,
    WARMUP_SECONDS,
    WORKLOADS,
    unavailable,
)


def package_root():
    """The directory holding the fastsock package this process imported."""
    return str(Path(fastsock.__file__).resolve().parent.parent)


class RunFailed(Exception):
    pass


class Child:
    """One child process (a module of this package run with -m), talked to in JSON lines.

    It runs from the directory that holds the fastsock package this process imported, so it
    imports that same package rather than a source checkout in the current directory.
    """

    def __init__(self, module, label, config):
        self.stderr = tempfile.TemporaryFile()
        try:
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
        except BaseException:
            self.stderr.close()
            raise
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
        failed or timed out may leave prefork workers behind.  Closes the pipes and the
        stderr file too."""
        # The end of its input tells a child still waiting for a command to exit now.
        with contextlib.suppress(BrokenPipeError):  # a child gone with a command unread
            self.process.stdin.close()
        try:
            self.process.wait(CHILD_EXIT_SECONDS)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        self.process.stdout.close()
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
        return 0 if workload.pattern in HELD_PATTERNS else self.warmups

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
            "fastsock.bench.server",
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

    def begin_run(self, deadline):
        """Tell the server process a run begins, and that it must report by ``deadline`` (a
        time.monotonic() instant: the clock is the same in every process of the machine)."""
        self.child.send({"begin": True, "report_by": deadline})
        self.child.receive(deadline)

    def close(self):
        self.child.close()


def run_once(workload, server_process, settings, seconds):
    """One run sending for ``seconds``: a fresh load generator against the row's server
    process; a run record."""
    deadline = time.monotonic() + settings.run_timeout(workload)
    server_process.begin_run(deadline)
    receiver = server_process.child
    generator = Child(
        "fastsock.bench.load",
        "load generator",
        {
            "workload": workload.name,
            "address": server_process.started["address"],
            "cpus": settings.client_cpus,
            "seconds": seconds,
            "total_bytes": settings.bytes,
            "churn_connections": settings.churn_connections,
            "held_connections": settings.held_connections(workload),
            "report_by": deadline,
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
        if workload.pattern in HELD_PATTERNS:
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
        if workload.pattern == "silent":
            generator.send({"close": True})
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
            if sending["seconds"] > 0 and workload.pattern not in HELD_PATTERNS
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
        self.fresh_each_run = workload.pattern in HELD_PATTERNS
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
