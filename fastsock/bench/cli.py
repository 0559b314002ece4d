"""``fastsock bench``: its arguments and its run; fastsock/bench/coordinator.py measures.

Imported only when the command runs: fastsock/cli.py builds this subcommand's parser when
its arguments are parsed, so ``fastsock serve`` and ``import fastsock`` never load the
benchmark.
"""

import json
import os
import time
from pathlib import Path

from fastsock._cli_support import (
    CommandError,
    UsageError,
    byte_size,
    cpu_list,
    name_list,
    natural_int,
    positive_float,
    positive_int,
)
from fastsock.bench import catalogue, coordinator, report

__all__ = ["add_bench_arguments", "run_bench"]

BENCH = "fastsock bench"


def add_bench_arguments(parser):
    parser.description = (
        "Receive rates of fastsock's servers against the stdlib patterns they "
        "replace, asyncio (and uvloop) and C sinks, on loopback. Without options it "
        f"runs {', '.join(catalogue.DEFAULT_WORKLOADS)} against every server in "
        "about a minute; --full runs every workload. bench/README.md explains each "
        "row and column."
    )
    parser.set_defaults(run=run_bench)
    choose = parser.add_argument_group("what to measure")
    choose.add_argument(
        "--workloads",
        type=name_list(list(catalogue.WORKLOADS)),
        metavar="NAME,...",
        help=f"default: {','.join(catalogue.DEFAULT_WORKLOADS)}; --list shows them all",
    )
    choose.add_argument(
        "--servers",
        type=name_list(list(catalogue.SERVERS)),
        metavar="NAME,...",
        help="default: every server (but the prefork ones when the server side has one "
        "CPU); each runs only the workloads it applies to",
    )
    choose.add_argument("--full", action="store_true", help="every workload and every server")
    choose.add_argument(
        "--list", action="store_true", help="describe the workloads and servers, and exit"
    )
    how = parser.add_argument_group("how long")
    how.add_argument(
        "--seconds",
        type=positive_float,
        default=catalogue.DEFAULT_SECONDS,
        help=f"sending time of each run (default {catalogue.DEFAULT_SECONDS:g})",
    )
    how.add_argument(
        "--runs",
        type=positive_int,
        default=catalogue.DEFAULT_RUNS,
        help=f"measured runs per row (default {catalogue.DEFAULT_RUNS})",
    )
    how.add_argument(
        "--warmups",
        type=natural_int,
        default=catalogue.DEFAULT_WARMUPS,
        help=f"discarded runs before them (default {catalogue.DEFAULT_WARMUPS})",
    )
    how.add_argument(
        "--bytes",
        type=byte_size,
        default=catalogue.DEFAULT_BYTES,
        help="a stream run also stops after this many bytes (default 2G)",
    )
    how.add_argument(
        "--churn-connections",
        type=positive_int,
        default=catalogue.DEFAULT_CHURN_CONNECTIONS,
        help=f"most connections of a churn run (default {catalogue.DEFAULT_CHURN_CONNECTIONS})",
    )
    how.add_argument(
        "--idle-connections",
        type=positive_int,
        help="connections the idle and silent-live workloads hold (default "
        f"{catalogue.DEFAULT_IDLE_CONNECTIONS:,} and {catalogue.DEFAULT_SILENT_CONNECTIONS:,}); "
        "above the descriptor limit it is raised, which may need root",
    )
    how.add_argument(
        "--timeout",
        type=positive_float,
        help="seconds before a run is abandoned as failed (default 3 * seconds + 30); idle "
        "and silent-live runs get 3 ms more per connection they hold",
    )
    where = parser.add_argument_group("where")
    where.add_argument(
        "--server-cpus",
        type=cpu_list,
        metavar="CPUS",
        help="CPUs of the server process (default: all but the last available)",
    )
    where.add_argument(
        "--client-cpus",
        type=cpu_list,
        metavar="CPUS",
        help="CPUs of the load generator (default: the last available)",
    )
    where.add_argument(
        "--share-cpus",
        action="store_true",
        help="server process and load generator both on every available CPU: how prefork "
        "scales when the generator competes for the same cores",
    )
    output = parser.add_argument_group("output")
    output.add_argument("--json", type=Path, metavar="PATH", help="write every run to PATH")
    output.add_argument(
        "--plot", type=Path, metavar="PATH", help="draw the ratios to PATH (needs matplotlib)"
    )


def describe_catalog():
    lines = ["workloads (default: " + ", ".join(catalogue.DEFAULT_WORKLOADS) + "):"]
    for workload in catalogue.WORKLOADS.values():
        lines.append(f"  {workload.name:14} {workload.summary}; baseline {workload.baseline}")
    lines.append("servers (default: all; the prefork ones only when the server has 2+ CPUs):")
    for server in catalogue.SERVERS.values():
        lines.append(f"  {server.name:24} {server.summary}")
    return "\n".join(lines)


def run_bench(options):
    if options.list:
        print(describe_catalog())
        return 0
    if options.full and (options.workloads or options.servers):
        raise UsageError(BENCH, "--full runs everything: drop it, or drop --workloads/--servers")
    try:
        from fastsock.bench import _loadgen  # noqa: F401
    except ImportError as exc:
        raise CommandError(
            BENCH,
            f"the compiled load generator does not load ({exc}); "
            "install fastsock with pip install .",
        ) from None
    if options.plot:
        reason = report.plot_unavailable()
        if reason:
            raise CommandError(BENCH, reason)
    for path in (options.json, options.plot):
        if path is not None and not path.resolve().parent.is_dir():
            raise UsageError(BENCH, f"no directory to write {path} into")
    try:
        server_cpus, client_cpus, where = coordinator.placement(
            options.server_cpus, options.client_cpus, options.share_cpus
        )
    except ValueError as exc:
        raise UsageError(BENCH, str(exc)) from None
    if options.full:
        workloads, servers = list(catalogue.WORKLOADS), list(catalogue.SERVERS)
    else:
        workloads = options.workloads or list(catalogue.DEFAULT_WORKLOADS)
        servers = options.servers or catalogue.default_servers(server_cpus)
    settings = coordinator.Settings(
        workloads=workloads,
        servers=servers,
        seconds=options.seconds,
        runs=options.runs,
        warmups=options.warmups,
        bytes=options.bytes,
        churn_connections=options.churn_connections,
        idle_connections=options.idle_connections or catalogue.DEFAULT_IDLE_CONNECTIONS,
        silent_connections=options.idle_connections or catalogue.DEFAULT_SILENT_CONNECTIONS,
        server_cpus=server_cpus,
        client_cpus=client_cpus,
        timeout=options.timeout,
    )
    rows_planned = len(coordinator.planned_rows(settings))
    if not rows_planned:
        raise UsageError(BENCH, "none of these servers runs these workloads")
    progress = coordinator.Progress()
    progress.note(
        f"fastsock bench: {rows_planned} rows, each {settings.warmups} warm-up + "
        f"{settings.runs} measured runs, about {coordinator.estimated_seconds(settings):.0f} s; "
        f"{where}"
    )
    load_average = os.getloadavg()
    started = time.time()
    rows = coordinator.run(settings, progress)
    finished = time.time()
    print(report.report(rows, settings, where, started, finished, load_average), flush=True)
    if options.json:
        command = ["fastsock", *options.argv]
        document = report.document(rows, settings, where, started, finished, load_average, command)
        write_json(options.json, json.dumps(document, indent=2) + "\n")
        progress.note(f"fastsock bench: wrote {options.json}")
    if options.plot:
        title = f"fastsock bench, {report.timestamp(started)}\n{where}"
        try:
            report.plot(rows, options.plot, title)
        except (OSError, ValueError) as exc:
            raise CommandError(BENCH, f"cannot draw {options.plot}: {exc}") from None
        progress.note(f"fastsock bench: drew {options.plot}")
    failed = [row for row in rows if row["status"] == "failed"]
    return 1 if failed else 0


def write_json(path, text):
    try:
        path.write_text(text)
    except OSError as exc:
        raise CommandError(BENCH, f"cannot write {path}: {exc.strerror}") from None
