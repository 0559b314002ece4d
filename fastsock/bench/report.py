"""What ``fastsock bench`` shows and writes: the machine, the table, the JSON, the plot.

The JSON document is described field by field in ``docs/benchmark-json.md``; its
``schema`` field changes whenever a field changes meaning or disappears.
"""

import datetime
import os
import platform

import fastsock
from fastsock.bench import catalogue

SCHEMA = "fastsock-bench/1"


def cpu_model():
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or None


def memory_bytes():
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def machine(load_average=None):
    """This machine; ``load_average`` as it was when the runs started (default: now)."""
    return {
        "cores": os.cpu_count(),
        "cpus_available": sorted(os.sched_getaffinity(0)),
        "cpu_model": cpu_model(),
        "memory_bytes": memory_bytes(),
        "system": platform.system(),
        "kernel": platform.release(),
        "architecture": platform.machine(),
        "load_average": list(load_average or os.getloadavg()),
    }


def versions():
    try:
        import uvloop

        uvloop_version = uvloop.__version__
    except ImportError:
        uvloop_version = None
    return {
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "fastsock": fastsock.__version__,
        "fastsock_implementation": fastsock.IMPLEMENTATION,
        "uvloop": uvloop_version,
    }


def timestamp(seconds):
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat(
        timespec="seconds"
    )


def document(rows, settings, placement, started, finished, load_average, command):
    """The JSON document of one invocation (docs/benchmark-json.md)."""
    return {
        "schema": SCHEMA,
        "started": timestamp(started),
        "finished": timestamp(finished),
        "duration_seconds": round(finished - started, 3),
        "command": command,
        "machine": machine(load_average),
        "versions": versions(),
        "settings": {
            "workloads": settings.workloads,
            "servers": settings.servers,
            "seconds": settings.seconds,
            "runs": settings.runs,
            "warmups": settings.warmups,
            "bytes": settings.bytes,
            "churn_connections": settings.churn_connections,
            "idle_connections": settings.idle_connections,
            "silent_connections": settings.silent_connections,
            "server_cpus": settings.server_cpus,
            "client_cpus": settings.client_cpus,
            "placement": placement,
            "timeout": settings.timeout,
        },
        "rows": rows,
    }


# -- The table -------------------------------------------------------------------------------


def count(value):
    """A rate or count in three significant figures: 612k, 1.23M."""
    if value is None:
        return "-"
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= limit:
            scaled = value / limit
            return f"{scaled:.3g}{suffix}" if scaled < 100 else f"{scaled:.0f}{suffix}"
    return f"{value:.0f}"


def megabytes(value):
    scaled = value / 1e6
    return f"{scaled:,.0f}" if scaled >= 100 else f"{scaled:.3g}"


def plural(number, noun):
    return f"{number} {noun}" + ("" if number == 1 else "s")


def ratio(value):
    return "-" if value is None else f"{value:.2f}x"


def lost_cell(summary):
    lost = summary["lost"]
    if not lost:
        return "0"
    return f"{lost:,} ({summary['lost_fraction']:.0%})" if summary["sent"] else f"{lost:,}"


def notes(row):
    summary = row["summary"]
    parts = []
    if row["status"] != "ok":
        return f"{row['status']}: {row['error']}"
    if summary["kernel_drops"] is not None:
        parts.append(f"dropped: kernel {summary['kernel_drops']:,}")
    own = summary["fastsock_drops"]
    if own is not None:
        parts.append(f"ring full {own['queue_full']:,}, truncated {own['truncated']:,}")
    counted = (summary["kernel_drops"] or 0) + (own["queue_full"] + own["truncated"] if own else 0)
    if summary["lost"] > counted:
        parts.append(f"unaccounted {summary['lost'] - counted:,}")
    busy = summary["generator_cpu_fraction"]
    if busy is not None and busy >= catalogue.GENERATOR_BUSY:
        parts.append(f"generator at {busy:.0%} CPU")
    if summary["idle"] is not None:
        parts.extend(held_notes(summary["idle"]))
    return "; ".join(parts)


def held_notes(idle):
    """What holding an idle or silent-live row's connections cost its server."""
    cost = idle["kib_per_connection"]
    parts = [
        f"{idle['connections']:,} held in {idle['accept_seconds']:.2f} s"
        + (
            ""
            if idle["accept_ratio_to_uvloop"] is None
            else f" ({ratio(idle['accept_ratio_to_uvloop'])} uvloop)"
        ),
        ("?" if cost is None else f"{cost:+.1f}") + " KiB RSS/conn",
        plural(idle["threads"], "thread"),
    ]
    if idle["listen_overflows"]:
        parts.append(f"{idle['listen_overflows']:,} accept-queue overflows")
    if idle["quiet_cpu_fraction"] is not None:
        parts.append(f"{idle['quiet_cpu_fraction']:.1%} CPU silent")
    if idle["live_ratio_to_alone"] is not None:
        alone = count(idle["alone_messages_per_second"])
        parts.append(f"live {ratio(idle['live_ratio_to_alone'])} its {alone} alone")
    return parts


HEADERS = [
    "workload",
    "server",
    "msg/s",
    "min-max",
    "MB/s",
    "x stdlib",
    "x C sink",
    "lost",
    "RSS MiB",
    "CPU s",
    "gen rate",
    "notes",
]
LEFT_ALIGNED = {"workload", "server", "notes"}


def table_cells(row):
    if row["status"] != "ok":
        return [row["workload"], row["server"], *["-"] * 9, notes(row)]
    summary = row["summary"]
    if row["unit"] == "byte":
        rates = summary["bytes_per_second"]
        rate_cell = "-"
        spread_cell = f"{megabytes(rates['min'])}-{megabytes(rates['max'])} MB/s"
        generator = summary["generator_bytes_per_second"]
        generator_cell = "-" if generator is None else f"{megabytes(generator)} MB/s"
    else:
        rates = summary["messages_per_second"]
        rate_cell = count(rates["median"])
        spread_cell = f"{count(rates['min'])}-{count(rates['max'])}"
        generator = summary["generator_bytes_per_second"]
        generator_cell = (
            "-" if generator is None else f"{count(generator / row['unit_bytes'])} msg/s"
        )
    return [
        row["workload"],
        row["server"],
        rate_cell,
        spread_cell,
        megabytes(summary["bytes_per_second"]["median"]),
        ratio(summary["ratio_to_baseline"]),
        ratio(summary["ratio_to_ceiling"]),
        lost_cell(summary),
        f"{summary['peak_rss_kib'] / 1024:.1f}",
        f"{summary['cpu_seconds']:.2f}",
        generator_cell,
        notes(row),
    ]


def table(rows):
    lines = [HEADERS] + [table_cells(row) for row in rows]
    widths = [max(len(line[column]) for line in lines) for column in range(len(HEADERS))]
    text = []
    previous_workload = None
    for index, line in enumerate(lines):
        if index > 1 and line[0] != previous_workload:
            text.append("")
        previous_workload = line[0]
        cells = [
            cell.ljust(width) if HEADERS[column] in LEFT_ALIGNED else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(line, widths, strict=True))
        ]
        text.append("  ".join(cells).rstrip())
    return "\n".join(text)


LEGEND = """\
msg/s: messages the server's consumer took per second, median over the runs, timed from the
  generator's first send to the last message taken; min-max: the slowest and fastest run.
  bulk counts bytes (MB/s). MB/s: bytes per second (10^6), framing bytes included.
x stdlib: median rate over the same workload's stdlib row in this invocation; x C sink: over
  the c-sink row, the ceiling of receiving at all (above 1.00x: the generator, not the
  receiver, set the pace; on loopback the sender also pays for delivering each datagram).
lost: sent minus counted, over all runs (streams must show 0). Datagram losses are itemized
  in notes: kernel = the socket's receive queue overflowed (/proc/net/udp), ring full and
  truncated = counted by fastsock. Unix datagram senders wait instead of losing.
RSS MiB: peak resident memory (VmHWM) of the server process, the highest over the runs;
  prefork adds its workers' (so the shared ring counts once per process).
CPU s: CPU seconds, user + system, of the server process(es) per run (median).
gen rate: the load generator's own send rate in that row; in the c-sink row, its ceiling.
  "generator at N% CPU" in notes: it used 90% or more of its CPU while sending, so the rate
  may be its pace rather than the server's (churn on loopback: the sending CPU also runs
  the kernel's handshake for the receiving side).
idle and silent-live rows (a fresh server per run): "N held in S s" is the time from the
  generator's first connect until the server held all N (silent-live: and had taken the one
  line each sent), "(Rx uvloop)" over the uvloop row's; KiB RSS/conn is the server's RSS
  growth while holding them, per connection; threads: the server process's, while held;
  accept-queue overflows: connections the kernel turned away while the server's accept
  queue (backlog 4096) was full, each then held up by TCP's 1-second SYN-ACK retry (a
  machine-wide count, over the runs: other tests on the machine add to it).
idle rows: the rate is how fast the server took one line from each when all woke at once.
silent-live rows: the rate is the one live connection's, streaming while the others stay
  silent; "CPU silent" is the server's CPU over 1 s with every connection silent, in % of
  one core; "live Rx its R alone": the live rate over R, the rate of the same connection
  streaming for --seconds on the same fresh server just before the silent ones opened.
fastsock-compiled-2: engine_threads=2. What limits it on 2 cores (--share-cpus): the two
  engines, the consumer thread and the generator share them, every message still goes
  through the one ring to one Python consumer, and the engines take connections from one
  listening socket, a few per turn (constants.ENGINE_SHARED_ACCEPTS_PER_TURN), each then
  queueing behind the other for the listener's next wake-up: connections arriving while
  both wait alternate between them, but an engine that runs while the other is not yet
  scheduled still takes a fast burst's next ones (16 connections often all go to one)."""


def report(rows, settings, placement, started, finished, load_average):
    """The text printed at the end: what ran where, the table, the legend."""
    info = machine()
    version = versions()
    load = ", ".join(f"{value:.2f}" for value in load_average)
    busy = load_average[0] > 0.5
    header = [
        f"fastsock bench, {timestamp(started)}, {finished - started:.0f} s",
        f"machine: {info['cores']} CPUs ({info['cpu_model'] or 'unknown model'}), "
        f"{info['system']} {info['kernel']}; Python {version['python']}; fastsock "
        f"{version['fastsock']} ({version['fastsock_implementation']}); uvloop "
        f"{version['uvloop'] or 'not installed'}",
        f"placement: {placement}",
        f"load average at the start: {load}"
        + (" (other work on this machine widens the min-max ranges)" if busy else ""),
        f"each row: {plural(settings.warmups, 'warm-up run')} of {settings.warmup_seconds:g} s, "
        f"then {plural(settings.runs, 'measured run')} of up to {settings.seconds:g} s (streams "
        f"also stop at {settings.bytes / 1024**3:g} GiB), against one server process; the rows "
        "of a workload take their runs in turns, so that drift in the machine's speed moves "
        "them alike; idle and silent-live rows: a fresh server per run, no warm-up; every run "
        "from a fresh "
        "load-generator process",
    ]
    if version["fastsock_implementation"] != "compiled":
        header.append(
            "WARNING: FASTSOCK_PURE_PYTHON=1: the fastsock rows measure the slow pure-Python "
            "reference, not the compiled core"
        )
    return "\n".join(header + ["", table(rows), "", LEGEND])


# -- The plot --------------------------------------------------------------------------------


def plot_unavailable():
    """Why --plot cannot work here, or None."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "--plot needs matplotlib: pip install 'fastsock[plot]' (or pip install matplotlib)"
    return None


def plot(rows, path, title):
    """One horizontal bar chart per workload: each server's rate over the stdlib baseline,
    with the min-max of its runs as an error bar, on a log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot
    from matplotlib import ticker

    measured = [row for row in rows if row["summary"] and row["summary"]["ratio_to_baseline"]]
    workloads = list(dict.fromkeys(row["workload"] for row in measured))
    if not workloads:
        raise ValueError("no row has a ratio to its stdlib baseline to plot")
    heights = [sum(row["workload"] == name for row in measured) for name in workloads]
    figure, axes = pyplot.subplots(
        len(workloads),
        1,
        figsize=(9, 1.2 + 0.32 * sum(heights) + 0.6 * len(workloads)),
        gridspec_kw={"height_ratios": heights},
        squeeze=False,
    )
    plain = ticker.FuncFormatter(lambda value, _: f"{value:g}x")
    for axis, name in zip(axes[:, 0], workloads, strict=True):
        chosen = [row for row in measured if row["workload"] == name]
        servers = [row["server"] for row in chosen]
        ratios, below, above = [], [], []
        for row in chosen:
            summary = row["summary"]
            value = summary["ratio_to_baseline"]
            rates = summary["messages_per_second"] or summary["bytes_per_second"]
            scale = value / rates["median"]
            ratios.append(value)
            # Rounding may leave a hair below zero when every run had the same rate.
            below.append(max(0.0, value - rates["min"] * scale))
            above.append(max(0.0, rates["max"] * scale - value))
        positions = range(len(servers))
        axis.barh(
            positions,
            ratios,
            xerr=[below, above],
            color=[_color(server) for server in servers],
            capsize=2,
        )
        axis.set_yticks(list(positions), servers, fontsize=8)
        axis.invert_yaxis()
        axis.set_xscale("log")
        lowest = min(value - low for value, low in zip(ratios, below, strict=True))
        highest = max(value + high for value, high in zip(ratios, above, strict=True))
        axis.set_xlim(min(lowest, 1.0) / 1.5, max(highest, 1.0) * 2.0)
        axis.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        axis.xaxis.set_major_formatter(plain)
        axis.xaxis.set_minor_formatter(ticker.NullFormatter())
        axis.axvline(1.0, color="black", linewidth=0.8)
        axis.set_title(f"{name}: {catalogue.WORKLOADS[name].summary}", fontsize=9, loc="left")
        for position, value, high in zip(positions, ratios, above, strict=True):
            axis.annotate(f" {value:.2f}x", (value + high, position), va="center", fontsize=7)
        axis.tick_params(axis="x", labelsize=8)
    axes[-1, 0].set_xlabel("rate / stdlib baseline of the same workload (log scale)", fontsize=8)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)


def _color(server):
    if server.startswith("stdlib-"):
        return "#888888"
    if server.startswith("fastsock-"):
        return "#1f77b4"
    if server == catalogue.CEILING:
        return "#2ca02c"
    return "#ff7f0e"
