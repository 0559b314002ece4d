"""The ``fastsock`` command: argument errors are one line and a non-zero exit, a short
``fastsock bench`` writes JSON that follows docs/benchmark-json.md, and ``fastsock serve``
writes every message it received exactly once, then exits 0 on SIGTERM."""

import base64
import collections
import datetime
import json
import os
import re
import resource
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import fastsock
from fastsock import _cli_serve, cli
from fastsock.bench import catalogue, coordinator
from fastsock.bench.process import raise_open_file_limit
from tests.support import (
    LOCALHOST,
    NETWORK_TIMEOUT,
    NUMBERED_LINE,
    NUMBERED_LINE_SIZE,
    StreamingClient,
    fds_opened_since,
    open_fds,
)

PACKAGE_ROOT = str(Path(fastsock.__file__).resolve().parent.parent)


def fastsock_command(*arguments):
    """``python -m fastsock ARGUMENTS``, and an environment in which it imports the fastsock
    under test (run it from another directory than a source checkout)."""
    search_path = [PACKAGE_ROOT, os.environ.get("PYTHONPATH", "")]
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, search_path)))
    return [sys.executable, "-m", "fastsock", *arguments], environment


# -- Argument errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arguments, says",
    [
        ([], "required: command"),
        (["serve", "nonsense"], "is not an endpoint"),
        (["serve", "ftp://127.0.0.1:21"], "is not an endpoint"),
        (["serve", "tcp://127.0.0.1:99999"], "bad address"),
        (["serve", "tcp://127.0.0.1:port"], "bad address"),
        (["serve", "tcp://127.0.0.1"], "needs a host and a port"),
        (["serve", "tcp://[::1:9000"], "bad address"),
        (["serve", "unix://"], "names no socket path"),
        (["serve", "tcp://0.0.0.0:0"], "add --allow-remote"),
        (["serve", "tcp://127.0.0.1:0", "--framing", "xml"], "invalid choice: 'xml'"),
        (["serve", "udp://127.0.0.1:0", "--framing", "lines"], "--framing applies to stream"),
        (["serve", "tcp://127.0.0.1:0", "--max-datagram", "9"], "--max-datagram applies"),
        (["serve", "tcp://127.0.0.1:0", "--framing", "raw", "--max-line", "9"], "--max-line"),
        (["serve", "tcp://127.0.0.1:0", "--workers", "2"], "--workers applies to --mode"),
        (["serve", "unixgram:///tmp/x.sock", "--mode", "prefork"], "not unixgram://"),
        (["serve", "tcp://127.0.0.1:0", "--max-line", "0"], "integer >= 1"),
        (["serve", "udp://127.0.0.1:0", "--max-partial-bytes", "9"], "--max-partial-bytes"),
        (["serve", "tcp://127.0.0.1:0", "--evict-idle-after", "0"], "number > 0"),
        (["serve", "tcp://127.0.0.1:0", "--stats-interval", "-1"], "a number >= 0"),
        (["bench", "--workloads", "lines-1,nope"], "unknown name 'nope'"),
        (["bench", "--servers", ""], "choose among"),
        (["bench", "--servers", "c-epoll-sink"], "unknown name 'c-epoll-sink'"),
        (["bench", "--full", "--workloads", "bulk"], "--full runs everything"),
        (["bench", "--seconds", "soon"], "must be a number"),
        (["bench", "--runs", "0"], "integer >= 1"),
        (["bench", "--bytes", "lots"], "not a size"),
        (["bench", "--server-cpus", "0"], "give both --server-cpus and --client-cpus"),
        (["bench", "--server-cpus", "0", "--client-cpus", "0"], "must not share a CPU"),
        (["bench", "--server-cpus", "0", "--client-cpus", "4096"], "not available"),
        (["bench", "--share-cpus", "--server-cpus", "0"], "--share-cpus places both sides"),
        # No option is reachable by a prefix of its name, so no old name lives on as one.
        (["bench", "--server-cpu", "0", "--client-cpus", "1"], "unrecognized arguments"),
        (["serve", "tcp://127.0.0.1:0", "--max-lin", "9"], "unrecognized arguments: --max-lin"),
    ],
)
def test_bad_arguments_are_a_one_line_error(capsys, arguments, says):
    assert cli.main(arguments) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1, captured.err
    assert says in captured.err
    assert captured.err.startswith(
        ("fastsock: error: ", "fastsock bench: error: ", "fastsock serve")
    )


# A bound, not a measure: a short benchmark of four rows took 8 s on a loaded 2-core machine.
COMMAND_TIMEOUT = 6 * NETWORK_TIMEOUT


def run_fastsock(tmp_path, *arguments, timeout=COMMAND_TIMEOUT):
    command, environment = fastsock_command(*arguments)
    return subprocess.run(
        command,
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_the_installed_command_reports_a_bad_port_without_a_traceback(tmp_path):
    finished = run_fastsock(tmp_path, "serve", "tcp://127.0.0.1:65536", "--framing", "lines")
    assert finished.returncode == 2
    assert finished.stderr.count("\n") == 1 and "Traceback" not in finished.stderr


def test_a_port_in_use_is_a_one_line_error(tmp_path):
    with socket.create_server((LOCALHOST, 0)) as taken:
        port = taken.getsockname()[1]
        finished = run_fastsock(tmp_path, "serve", f"tcp://127.0.0.1:{port}")
    assert finished.returncode == 1
    assert finished.stderr.count("\n") == 1 and "Traceback" not in finished.stderr
    assert f"cannot bind tcp://127.0.0.1:{port}" in finished.stderr


def test_a_unix_path_held_by_another_file_is_a_one_line_error(tmp_path, sock_dir):
    path = os.path.join(sock_dir, "taken.sock")
    Path(path).write_text("not a socket")
    finished = run_fastsock(tmp_path, "serve", f"unix://{path}")
    assert finished.returncode == 1
    assert finished.stderr.count("\n") == 1 and "Traceback" not in finished.stderr
    assert "is not a socket" in finished.stderr
    assert Path(path).read_text() == "not a socket"


# -- fastsock bench --json -------------------------------------------------------------------

NUMBER = (int, float)


class Nullable:
    def __init__(self, schema):
        self.schema = schema


class ListOf:
    def __init__(self, schema):
        self.schema = schema


def check(value, schema, where="document"):
    """Fail with the path of the first value that does not match ``schema``: a type, a
    tuple of types, a set of allowed values, a dict of exact keys, ListOf or Nullable."""
    if isinstance(schema, Nullable):
        if value is not None:
            check(value, schema.schema, where)
    elif isinstance(schema, ListOf):
        assert isinstance(value, list), f"{where}: not a list"
        for index, item in enumerate(value):
            check(item, schema.schema, f"{where}[{index}]")
    elif isinstance(schema, dict):
        assert isinstance(value, dict), f"{where}: not an object"
        assert set(value) == set(schema), f"{where}: fields {sorted(set(value) ^ set(schema))}"
        for key, item_schema in schema.items():
            check(value[key], item_schema, f"{where}.{key}")
    elif isinstance(schema, set):
        assert value in schema, f"{where}: {value!r} is not one of {sorted(schema)}"
    else:
        assert not isinstance(value, bool) or schema is bool, f"{where}: a boolean"
        assert isinstance(value, schema), f"{where}: {value!r} is not {schema}"


SPREAD = {"median": NUMBER, "min": NUMBER, "max": NUMBER}
DROPS = {"queue_full": int, "truncated": int, "kernel": int}
RUN = {
    "sent": int,
    "received": int,
    "lost": int,
    "complete": bool,
    "seconds": Nullable(NUMBER),
    "messages_per_second": Nullable(NUMBER),
    "bytes_per_second": NUMBER,
    "peak_rss_kib": int,
    "cpu_seconds": NUMBER,
    "generator_messages_per_second": Nullable(NUMBER),
    "generator_bytes_per_second": Nullable(NUMBER),
    "generator_cpu_fraction": Nullable(NUMBER),
    "kernel_drops": Nullable(int),
    "fastsock_drops": Nullable(DROPS),
    "idle": Nullable(
        {
            "connections": int,
            "rss_before_kib": int,
            "rss_held_kib": int,
            "kib_per_connection": Nullable(NUMBER),
            "accept_seconds": NUMBER,
            "open_seconds": NUMBER,
            "listen_overflows": int,
            "threads": int,
            "quiet_cpu_fraction": Nullable(NUMBER),
            "alone_messages_per_second": Nullable(NUMBER),
        }
    ),
}
SUMMARY = {
    "messages_per_second": Nullable(SPREAD),
    "bytes_per_second": SPREAD,
    "sent": int,
    "received": int,
    "lost": int,
    "lost_fraction": NUMBER,
    "peak_rss_kib": int,
    "cpu_seconds": NUMBER,
    "generator_messages_per_second": Nullable(NUMBER),
    "generator_bytes_per_second": Nullable(NUMBER),
    "generator_cpu_fraction": Nullable(NUMBER),
    "kernel_drops": Nullable(int),
    "fastsock_drops": Nullable(DROPS),
    "idle": Nullable(
        {
            "connections": int,
            "kib_per_connection": Nullable(NUMBER),
            "accept_seconds": Nullable(NUMBER),
            "listen_overflows": int,
            "threads": int,
            "quiet_cpu_fraction": Nullable(NUMBER),
            "alone_messages_per_second": Nullable(NUMBER),
            "live_ratio_to_alone": Nullable(NUMBER),
            "accept_ratio_to_uvloop": Nullable(NUMBER),
        }
    ),
    "ratio_to_baseline": Nullable(NUMBER),
    "ratio_to_ceiling": Nullable(NUMBER),
}
DOCUMENT = {
    "schema": {"fastsock-bench/1"},
    "started": str,
    "finished": str,
    "duration_seconds": NUMBER,
    "command": ListOf(str),
    "machine": {
        "cores": int,
        "cpus_available": ListOf(int),
        "cpu_model": Nullable(str),
        "memory_bytes": Nullable(int),
        "system": str,
        "kernel": str,
        "architecture": str,
        "load_average": ListOf(NUMBER),
    },
    "versions": {
        "python": str,
        "python_implementation": str,
        "fastsock": str,
        "fastsock_implementation": {"compiled", "python"},
        "uvloop": Nullable(str),
    },
    "settings": {
        "workloads": ListOf(str),
        "servers": ListOf(str),
        "seconds": NUMBER,
        "runs": int,
        "warmups": int,
        "bytes": int,
        "churn_connections": int,
        "idle_connections": int,
        "silent_connections": int,
        "server_cpus": Nullable(ListOf(int)),
        "client_cpus": Nullable(ListOf(int)),
        "placement": str,
        "timeout": NUMBER,
    },
    "rows": ListOf(
        {
            "workload": str,
            "server": str,
            "baseline": str,
            "unit": {"message", "byte"},
            "unit_bytes": int,
            "status": {"ok", "failed", "unavailable"},
            "error": Nullable(str),
            "warmup_runs": ListOf(RUN),
            "runs": ListOf(RUN),
            "summary": Nullable(SUMMARY),
        }
    ),
}


def run_short_bench(tmp_path, workloads, servers, *options, timeout=COMMAND_TIMEOUT):
    """A 0.2-second, one-run ``fastsock bench``: the finished process and its JSON document,
    checked against the schema."""
    finished = run_fastsock(
        tmp_path,
        "bench",
        "--seconds",
        "0.2",
        "--runs",
        "1",
        "--workloads",
        workloads,
        "--servers",
        servers,
        *options,
        "--json",
        "out.json",
        timeout=timeout,
    )
    assert finished.returncode == 0, finished.stderr
    document = json.loads((tmp_path / "out.json").read_text())
    check(document, DOCUMENT)
    return finished, document


def test_a_short_benchmark_writes_json_that_follows_the_schema(tmp_path):
    servers = "stdlib-readline-queue,stdlib-datagram-queue,fastsock-compiled,c-sink"
    finished, document = run_short_bench(tmp_path, "lines-1,udp-64", servers)
    assert "Traceback" not in finished.stderr
    assert "x stdlib" in finished.stdout and "fastsock-compiled" in finished.stdout
    rows = {(row["workload"], row["server"]): row for row in document["rows"]}
    assert set(rows) == {
        ("lines-1", "stdlib-readline-queue"),
        ("lines-1", "fastsock-compiled"),
        ("lines-1", "c-sink"),
        ("udp-64", "stdlib-datagram-queue"),
        ("udp-64", "fastsock-compiled"),
        ("udp-64", "c-sink"),
    }
    for (workload, server), row in rows.items():
        assert row["status"] == "ok", row["error"]
        assert len(row["warmup_runs"]) == 1 and len(row["runs"]) == 1
        summary = row["summary"]
        assert summary["received"] > 0
        if workload == "lines-1":
            assert summary["lost"] == 0
            assert row["runs"][0]["complete"]
        else:
            assert summary["kernel_drops"] is not None
            assert (summary["fastsock_drops"] is not None) == server.startswith("fastsock")
    assert rows["lines-1", "stdlib-readline-queue"]["summary"]["ratio_to_baseline"] == 1.0
    assert rows["udp-64", "c-sink"]["summary"]["ratio_to_ceiling"] == 1.0


class _Progress:
    def __init__(self):
        self.notes = []

    def step(self, text):
        pass

    def note(self, text):
        self.notes.append(text)


def test_the_rows_of_a_workload_take_their_runs_in_turns(monkeypatch):
    # Fakes stand in for the server and generator processes: the order of the runs, what
    # a failing row leaves behind and which server processes get closed are all that
    # is checked here (the benchmarks above run the real processes).
    taken = []
    closed = []

    class FakeServerProcess:
        def __init__(self, workload, server, settings, runs):
            self.server = server

        def close(self):
            closed.append(self.server)

    def fake_run_once(workload, server_process, settings, seconds):
        taken.append(server_process.server)
        if server_process.server == "asyncio-protocol" and len(taken) > 3:
            raise coordinator.RunFailed("the server process failed: boom")
        return {"server": server_process.server}

    monkeypatch.setattr(coordinator, "ServerProcess", FakeServerProcess)
    monkeypatch.setattr(coordinator, "run_once", fake_run_once)
    monkeypatch.setattr(coordinator, "summarize", lambda workload, runs: {"lost": 0})
    monkeypatch.setattr(coordinator, "median_unit_rate", lambda row: 1.0)
    monkeypatch.setattr(coordinator, "unavailable", lambda server: None)
    settings = coordinator.Settings(
        workloads=["lines-1"],
        servers=["stdlib-readline-queue", "fastsock-compiled", "asyncio-protocol"],
        runs=3,
        warmups=1,
    )
    rows = [
        coordinator.Row(catalogue.WORKLOADS["lines-1"], server, settings, str(number))
        for number, server in enumerate(settings.servers, 1)
    ]
    coordinator.measure_workload(rows, _Progress())
    stdlib, compiled, failing = "stdlib-readline-queue", "fastsock-compiled", "asyncio-protocol"
    assert taken == [
        stdlib, compiled, failing,  # the warm-ups
        compiled, failing, stdlib,  # one row later; the failing row drops out here
        stdlib, compiled,  # the third round of the two rows left
        compiled, stdlib,
    ]  # fmt: skip
    assert [len(row.record["runs"]) for row in rows] == [3, 3, 0]
    assert rows[2].record["status"] == "failed" and "boom" in rows[2].record["error"]
    assert sorted(closed) == sorted(settings.servers)


def test_forking_and_prefork_rows_count_every_line(tmp_path):
    servers = "fastsock-forking,fastsock-prefork-1,fastsock-prefork"
    _, document = run_short_bench(tmp_path, "lines-16", servers, "--share-cpus")
    assert "share" in document["settings"]["placement"]
    assert [row["server"] for row in document["rows"]] == [
        "fastsock-forking",
        "fastsock-prefork-1",
        "fastsock-prefork",
    ]
    for row in document["rows"]:
        assert row["status"] == "ok", row["error"]
        assert row["summary"]["lost"] == 0 and row["runs"][0]["complete"]
        # Request processes and workers are counted with the process that serves the row.
        assert row["summary"]["cpu_seconds"] > 0


def test_a_closed_child_process_leaves_no_descriptor_open():
    settings = coordinator.Settings(workloads=["lines-1"], servers=["fastsock-compiled"])
    before = open_fds()
    server_process = coordinator.ServerProcess(
        catalogue.WORKLOADS["lines-1"], "fastsock-compiled", settings, runs=1
    )
    assert server_process.child.process.poll() is None, "closed while it waits for a run"
    server_process.close()
    # Its stdin and stdout pipes stayed open for as long as the Child was referenced.
    assert fds_opened_since(before) == {}
    assert server_process.child.process.returncode is not None


def test_a_count_cut_short_by_the_run_timeout_is_still_reported_in_time():
    # More lines expected than anyone sends: the server process waits for them until the
    # run's deadline.  Before, its deadline began when it heard "begin", after the
    # coordinator's, and it read /proc after it: the coordinator always gave up first
    # ("over --timeout, still waiting for the server process") and its count was lost.
    workload = catalogue.WORKLOADS["lines-1"]
    settings = coordinator.Settings(
        workloads=["lines-1"], servers=["fastsock-compiled"], timeout=4.0
    )
    server_process = coordinator.ServerProcess(workload, "fastsock-compiled", settings, runs=1)
    try:
        deadline = time.monotonic() + settings.run_timeout(workload)
        server_process.begin_run(deadline)
        server_process.child.send({"expected": 10**9})
        counted = server_process.child.receive(deadline)
    finally:
        server_process.close()
    assert counted["received"] == 0 and counted["complete"] is False


def test_a_load_generator_that_cannot_open_its_connections_says_so_in_time():
    # A listener that never accepts, its backlog soon full: the generator's connections
    # stop completing.  Its opening must give up early enough for its own error to reach
    # the coordinator before the run's deadline, which started before the generator did,
    # not "over --timeout, still waiting for the load generator".
    with socket.create_server(("127.0.0.1", 0), backlog=0) as listener:
        deadline = time.monotonic() + 4.0
        generator = coordinator.Child(
            "fastsock.bench.load",
            "load generator",
            {
                "workload": "idle",
                "address": listener.getsockname(),
                "cpus": None,
                "seconds": 1.0,
                "total_bytes": 0,
                "churn_connections": 0,
                "held_connections": 500,
                "report_by": deadline,
            },
        )
        try:
            with pytest.raises(coordinator.RunFailed, match="load generator failed: TimeoutError"):
                generator.receive(deadline)
        finally:
            generator.close()


HELD_BENCH_SECONDS = 60
"""A held-connections bench runs a fresh server per row and watches each for a silent
second: longer than the other short benches, however fast the machine."""


def test_silent_live_rows_report_what_holding_costs_and_the_live_rate(tmp_path):
    # Small counts: that every field is there and sane, not how fast (a busy machine).
    servers = "fastsock-compiled,fastsock-compiled-2,uvloop-protocol,c-sink"
    held = 300
    finished, document = run_short_bench(
        tmp_path,
        "silent-live",
        servers,
        *("--idle-connections", str(held), "--share-cpus"),
        timeout=HELD_BENCH_SECONDS,
    )
    assert "held in" in finished.stdout
    assert document["settings"]["silent_connections"] == held
    rows = {row["server"]: row for row in document["rows"]}
    assert set(rows) == set(servers.split(",")) - {"c-sink"}
    uvloop = rows["uvloop-protocol"]["status"] == "ok"
    for server, row in rows.items():
        if server == "uvloop-protocol" and not uvloop:
            continue
        assert row["status"] == "ok", row["error"]
        assert len(row["warmup_runs"]) == 0
        summary = row["summary"]
        # Only the live connection's lines count: the silent ones were taken before.
        assert summary["lost"] == 0 and summary["received"] == summary["sent"] > 0
        idle = summary["idle"]
        assert idle["connections"] == held and 0 < idle["accept_seconds"] < HELD_BENCH_SECONDS
        assert idle["kib_per_connection"] is not None
        assert 0 <= idle["quiet_cpu_fraction"] < 2
        assert idle["alone_messages_per_second"] > 0 and idle["live_ratio_to_alone"] > 0
        if server.startswith("fastsock"):
            engines = 2 if server.endswith("-2") else 1
            # The engines, the serving and consumer threads and the main thread at most.
            assert 1 <= idle["threads"] <= engines + 3
        if uvloop:
            assert idle["accept_ratio_to_uvloop"] > 0
    if uvloop:
        assert rows["uvloop-protocol"]["summary"]["idle"]["accept_ratio_to_uvloop"] == 1.0


def test_churn_and_idle_rows_count_every_connection(tmp_path):
    held, churned = 200, 2000
    _, document = run_short_bench(
        tmp_path,
        "idle,churn",
        "fastsock-compiled-2,c-sink",
        *("--idle-connections", str(held), "--churn-connections", str(churned)),
        timeout=HELD_BENCH_SECONDS,
    )
    rows = {(row["workload"], row["server"]): row for row in document["rows"]}
    assert set(rows) == {
        ("idle", "fastsock-compiled-2"),
        ("churn", "fastsock-compiled-2"),
        ("churn", "c-sink"),
    }
    for row in rows.values():
        assert row["status"] == "ok", row["error"]
        assert row["summary"]["lost"] == 0
    idle = rows["idle", "fastsock-compiled-2"]["summary"]
    assert idle["received"] == held and idle["idle"]["connections"] == held
    assert idle["idle"]["threads"] >= 1
    assert idle["idle"]["quiet_cpu_fraction"] is idle["idle"]["alone_messages_per_second"] is None
    for server in ("fastsock-compiled-2", "c-sink"):
        churn = rows["churn", server]["summary"]
        # Each connection sent one line, which the server took.
        assert 0 < churn["received"] == churn["sent"] <= churned
        assert churn["idle"] is None and 0 < churn["generator_cpu_fraction"] < 2
    assert idle["generator_cpu_fraction"] is None


def test_the_default_run_leaves_out_the_full_run_servers():
    assert "fastsock-compiled-2" not in catalogue.default_servers(None)
    assert "fastsock-compiled-2" not in catalogue.default_servers([0])
    assert "fastsock-compiled" in catalogue.default_servers([0])


def test_a_descriptor_limit_that_cannot_be_raised_fails_loudly(monkeypatch):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        pytest.skip("no hard limit on descriptors to exceed")

    def refuse(which, limits):
        raise ValueError("not allowed")

    monkeypatch.setattr(resource, "setrlimit", refuse)
    with pytest.raises(RuntimeError, match="cannot be raised"):
        raise_open_file_limit(hard + 1)


# -- The benchmark stays out of the receive core ---------------------------------------------

# Prints, to stderr when the interpreter exits, the fastsock.bench modules it loaded.
REPORT_BENCH_MODULES = """
import atexit, sys

def report():
    loaded = sorted(name for name in sys.modules if name.split(".")[:2] == ["fastsock", "bench"])
    print("bench modules:", " ".join(loaded), file=sys.stderr)

atexit.register(report)
"""
RUN_COMMAND = """
import runpy
sys.argv = ["fastsock", *{arguments!r}]
runpy.run_module("fastsock", run_name="__main__")
"""


def bench_modules_loaded(tmp_path, code):
    _, environment = fastsock_command()
    finished = subprocess.run(
        [sys.executable, "-c", REPORT_BENCH_MODULES + code],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
    )
    reported = [line for line in finished.stderr.splitlines() if line.startswith("bench modules:")]
    assert len(reported) == 1, finished.stderr
    return set(reported[0].split()[2:])


@pytest.mark.parametrize(
    "code",
    [
        "import fastsock",
        "import fastsock.cli\nfastsock.cli.build_parser()",
        "import fastsock.cli\nfastsock.cli.build_parser().parse_args(['serve', 'udp://127.0.0.1:0'])",
        RUN_COMMAND.format(arguments=["serve", "--help"]),
        RUN_COMMAND.format(arguments=["serve", "tcp://127.0.0.1:99999"]),
    ],
    ids=["import", "build-parser", "parse-serve", "serve-help", "serve-error"],
)
def test_fastsock_and_fastsock_serve_do_not_load_the_benchmark(tmp_path, code):
    assert bench_modules_loaded(tmp_path, code) == set()


def test_fastsock_bench_loads_the_benchmark_and_its_children_not_the_coordinator(tmp_path):
    listed = bench_modules_loaded(tmp_path, RUN_COMMAND.format(arguments=["bench", "--list"]))
    assert {"fastsock.bench", "fastsock.bench.cli", "fastsock.bench.catalogue"} <= listed
    children = bench_modules_loaded(tmp_path, "import fastsock.bench.server, fastsock.bench.load")
    assert "fastsock.bench._loadgen" in children
    assert "fastsock.bench.coordinator" not in children


# -- fastsock serve --------------------------------------------------------------------------


class ServeProcess:
    """``fastsock serve URL ... --output FILE`` in a child process, its stderr read line by
    line with a deadline."""

    def __init__(self, tmp_path, url, *options):
        self.output = tmp_path / "received.out"
        command, environment = fastsock_command(
            "serve", url, "--output", str(self.output), "--stats-interval", "0.1", *options
        )
        self.process = subprocess.Popen(
            command, cwd=tmp_path, env=environment, stderr=subprocess.PIPE
        )
        self.pending = b""
        self.stderr = []
        announcement = self.line_matching("receiving")
        self.url = re.search(r" on (\S+) \(", announcement).group(1)

    def line_matching(self, text):
        deadline = time.monotonic() + NETWORK_TIMEOUT
        while True:
            while b"\n" in self.pending:
                line, self.pending = self.pending.split(b"\n", 1)
                self.stderr.append(line.decode())
                if text in self.stderr[-1]:
                    return self.stderr[-1]
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no {text!r} on stderr: {self.stderr}"
            fd = self.process.stderr.fileno()
            if select.select([fd], [], [], remaining)[0]:
                data = os.read(fd, 65536)
                assert data, f"fastsock serve exited: {self.stderr}"
                self.pending += data

    def inet_address(self):
        host, _, port = self.url.partition("://")[2].rpartition(":")
        return host.strip("[]"), int(port)

    def stop(self):
        """SIGTERM; the exit status and the rest of stderr."""
        self.process.send_signal(signal.SIGTERM)
        remaining = self.process.communicate(timeout=NETWORK_TIMEOUT)[1].decode()
        self.stderr.extend(remaining.splitlines())
        return self.process.returncode

    def kill(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class PipedServeProcess:
    """``fastsock serve URL ...`` in a session (process group) of its own, stdout a pipe,
    stderr read by line."""

    def __init__(self, tmp_path, url, *arguments):
        command, environment = fastsock_command("serve", url, *arguments)
        self.process = subprocess.Popen(
            command,
            cwd=tmp_path,
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self.stderr = []
        announcement = self.line_matching("receiving")
        host, _, port = re.search(r" on \w+://(\S+) \(", announcement).group(1).rpartition(":")
        self.address = host.strip("[]"), int(port)

    def line_matching(self, text):
        # A thread reads, so that a silent server fails the test instead of hanging it.
        found = []

        def read():
            while line := self.process.stderr.readline():
                self.stderr.append(line.decode())
                if text in self.stderr[-1]:
                    found.append(self.stderr[-1])
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(NETWORK_TIMEOUT)
        assert found, f"no {text!r} on stderr: {self.stderr}"
        return found[0]

    def hangup_group(self):
        """SIGHUP to the server and its prefork workers, as a terminal's hangup would."""
        os.killpg(self.process.pid, signal.SIGHUP)

    def stop(self):
        self.process.terminate()
        out, err = self.process.communicate(timeout=4 * NETWORK_TIMEOUT)
        self.stderr += err.decode().splitlines(keepends=True)
        return self.process.returncode, out

    def kill(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()


def started_by(factory, tmp_path):
    """For a fixture: yields ``start(*arguments)``, which returns ``factory(tmp_path,
    *arguments)``; afterwards kills every process it started."""
    started = []

    def start(*arguments):
        started.append(factory(tmp_path, *arguments))
        return started[-1]

    yield start
    for process in started:
        process.kill()


@pytest.fixture
def serve(tmp_path):
    yield from started_by(ServeProcess, tmp_path)


def payload(record):
    if "text" in record:
        return record["text"].encode()
    return base64.b64decode(record["base64"])


def check_record_fields(record):
    assert set(record) - {"text", "base64"} == {"time", "peer", "connection"}
    assert len(set(record) & {"text", "base64"}) == 1
    taken = datetime.datetime.fromisoformat(record["time"])
    assert abs(taken - datetime.datetime.now(datetime.timezone.utc)).total_seconds() < 60


def test_serve_tcp_lines_writes_every_line_exactly_once(serve):
    server = serve("tcp://127.0.0.1:0", "--framing", "lines", "--format", "jsonl")
    clients = [socket.create_connection(server.inet_address(), NETWORK_TIMEOUT) for _ in "abc"]
    sent = collections.defaultdict(list)
    try:
        for number, client in enumerate(clients):
            lines = [b"client %d line %d" % (number, index) for index in range(300)]
            lines += ["caf\u00e9 \u2713".encode(), b"\xff\xfe not UTF-8", b""]
            client.sendall(b"".join(line + b"\n" for line in lines))
            sent[client.getsockname()] = lines
        server.line_matching("3 opened")
        # Sent just before the signal, on a connection still open at the stop: the server
        # must still read it from the kernel and write it.
        late = b"sent right before SIGTERM"
        clients[2].sendall(late + b"\n")
        sent[clients[2].getsockname()].append(late)
        clients[0].close()
        assert server.stop() == 0
    finally:
        for client in clients:
            client.close()
    assert "Traceback" not in "\n".join(server.stderr)
    assert "stopped by SIGTERM" in server.stderr[-1]
    total = sum(map(len, sent.values()))
    assert f"received {total:,} messages, written {total:,}" in server.stderr[-1]
    records = [json.loads(line) for line in server.output.read_text().splitlines()]
    received = collections.defaultdict(list)
    for record in records:
        check_record_fields(record)
        host, _, port = record["peer"].rpartition(":")
        received[host, int(port)].append(payload(record))
    assert received == sent
    assert {record["base64"] for record in records if "base64" in record} == {
        base64.b64encode(b"\xff\xfe not UTF-8").decode()
    }


def test_serve_udp_writes_every_datagram_exactly_once(serve):
    server = serve("udp://127.0.0.1:0", "--format", "jsonl")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.bind((LOCALHOST, 0))
        datagrams = [b"datagram %d" % number for number in range(500)] + [b"\x00\xff\x80"]
        for number, datagram in enumerate(datagrams):
            client.sendto(datagram, server.inet_address())
            if number % 50 == 49:
                # Paced, so that the default receive buffer never overflows.
                time.sleep(0.002)
        sender = client.getsockname()
        assert server.stop() == 0
    assert "Traceback" not in "\n".join(server.stderr)
    assert "received 501 datagrams, written 501 | dropped 0" in server.stderr[-1]
    records = [json.loads(line) for line in server.output.read_text().splitlines()]
    for record in records:
        check_record_fields(record)
        assert record["peer"] == f"{sender[0]}:{sender[1]}"
        assert record["connection"] is None
    assert sorted(map(payload, records)) == sorted(datagrams)


def test_serve_raw_over_a_unix_socket_copies_lines_and_removes_its_socket(serve, sock_dir):
    path = os.path.join(sock_dir, "serve.sock")
    server = serve(f"unix://{path}", "--format", "raw")
    lines = [b"line %d" % number for number in range(1000)]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(path)
        client.sendall(b"".join(line + b"\n" for line in lines))
    assert server.stop() == 0
    assert server.output.read_bytes() == b"".join(line + b"\n" for line in lines)
    assert not os.path.exists(path)


def test_serve_leaves_a_socket_file_that_replaced_its_own(serve, sock_dir):
    path = os.path.join(sock_dir, "serve.sock")
    server = serve(f"unix://{path}")
    # As a server started once this one has closed its socket would replace the then
    # stale file, before this one removes it on its way out.
    os.unlink(path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as successor:
        successor.bind(path)
        successor.listen()
        successor_file = os.lstat(path)
        assert server.stop() == 0
        assert os.path.samestat(os.lstat(path), successor_file)
    assert os.listdir(sock_dir) == ["serve.sock"]


def test_serve_hands_its_stream_limits_to_the_receiver():
    options = cli.build_parser().parse_args(
        ["serve", "tcp://127.0.0.1:0", "--max-connections", "3", "--evict-idle-after", "7"]
        + ["--max-partial-bytes", "12345", "--idle-timeout", "9"]
    )
    endpoint = _cli_serve.parse_endpoint(options.url, allow_remote=False)
    limits = _cli_serve.receive_options(options, endpoint)
    assert limits.max_connections == 3
    assert (limits.evict_idle_after, limits.max_partial_bytes) == (7.0, 12345)
    assert limits.idle_timeout == 9.0


class SlowPipeReader(threading.Thread):
    """Reads a pipe at about 2 MB/s: a downstream slower than the sender."""

    def __init__(self, pipe):
        super().__init__(name="slow-pipe-reader", daemon=True)
        self.pipe = pipe
        self.data = bytearray()

    def run(self):
        while chunk := os.read(self.pipe.fileno(), 32768):
            self.data += chunk
            time.sleep(0.015)


@pytest.mark.parametrize("mode", ["threaded", "prefork"])
def test_serve_sigterm_writes_or_counts_every_acknowledged_byte(tmp_path, mode):
    command, environment = fastsock_command(
        "serve", "tcp://127.0.0.1:0", "--framing", "lines", "--format", "jsonl", "--output", "-"
    )
    command += ["--stats-interval", "0", "--drain-timeout", "0.5", "--mode", mode]
    with subprocess.Popen(
        command, cwd=tmp_path, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as process:
        try:
            announcement = process.stderr.readline().decode()
            host, _, port = re.search(r" on tcp://(\S+) \(", announcement).group(1).rpartition(":")
            reader = SlowPipeReader(process.stdout)
            reader.start()
            client = StreamingClient((host, int(port)), socket.AF_INET)
            client.start()
            deadline = time.monotonic() + NETWORK_TIMEOUT
            while client.sent < 8 * 1024 * 1024:
                assert time.monotonic() < deadline and client.is_alive(), client.ended_by
                time.sleep(0.02)
            process.send_signal(signal.SIGTERM)
            # Not communicate(): the slow reader owns stdout.  With no stats interval, stderr
            # holds a few lines only.
            process.wait(timeout=4 * NETWORK_TIMEOUT)
            stderr = process.stderr.read().decode()
            reader.join(NETWORK_TIMEOUT)
            client.join(NETWORK_TIMEOUT)
            acknowledged = client.delivered_to_server()
            client.sock.close()
        finally:
            if process.poll() is None:
                process.kill()
    assert process.returncode == 0, stderr
    final = stderr.splitlines()[-1]
    assert "stopped by SIGTERM" in final
    counted = re.search(r"dropped ([\d,]+), discarded ([\d,]+) B, unread ([\d,]+) B", final)
    dropped, discarded, unread = (int(number.replace(",", "")) for number in counted.groups())
    written = [json.loads(line)["text"].encode() for line in reader.data.splitlines()]
    assert written == [NUMBERED_LINE[:-1] % n for n in range(len(written))], "in order, no gap"
    assert acknowledged == len(written) * NUMBERED_LINE_SIZE + dropped + discarded + unread, final
    assert unread > 0, "the writer was slower than the drain: the rest is counted"
