"""More silent connections than one process may hold, plus one live one: fastsock against uvloop.

    pip install '.[bench]'
    python bench/many_connections.py [--connections 50000] [--seconds 3] [--runs 3]

``fastsock bench``'s silent-live row holds its connections in one server process, so it
stops at the descriptor limit (``ulimit -Hn``; 20,000 on the machine this was written on,
where root lacks CAP_SYS_RESOURCE and cannot raise it).  This one spreads them over as many
processes as the limit requires, on both sides and for both servers alike:

- fastsock: a ``PreforkServer`` of W workers, each one compiled event engine, all receiving
  into one shared ring that the parent drains with ``get_batch()``;
- uvloop: W processes, each a uvloop ``Protocol`` server on its own ``SO_REUSEPORT``
  socket of the same port, splitting lines as a user would.

Every server process runs on CPU 0, the load on CPU 1.  Each run starts fresh servers and:

1. streams 64-byte lines over one connection for --seconds (the rate with no silent peers);
2. opens --connections connections from G generator processes (each from its own loopback
   source address), each sending one line and then staying silent, and takes the time until
   the server has counted every connection and line;
3. reads, over one quiet second, the server processes' CPU, and their memory (RSS summed)
   and threads against step 1;
4. streams again over a new connection while the others stay silent.

Reported per server: time to accept all, RSS growth per connection, threads, CPU while
silent, and the live rate with silent peers over the rate without; medians of --runs.
"""

import argparse
import asyncio
import json
import math
import os
import resource
import selectors
import socket
import statistics
import subprocess
import sys
import time

LINE = b"x" * 63 + b"\n"
BLOCK = LINE * 1024
HOST = "127.0.0.1"
SERVER_CPU = 0
LOAD_CPU = 1
DESCRIPTOR_MARGIN = 512
"""Descriptors a process needs beyond the connections it holds (interpreter, epoll, pipes)."""
CONNECT_WINDOW = 64
"""Connections being opened at once per generator, far below the listen backlog."""
BACKLOG = 4096
TIMEOUT = 120.0
"""Bound on every wait: a step that takes longer fails the run."""
POLL_SECONDS = 0.005


def descriptor_limit():
    """The hard limit, taken as the soft one too: what one process may hold."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def processes_for(connections, limit):
    return max(1, math.ceil(connections / (limit - DESCRIPTOR_MARGIN)))


def emit(message):
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def commands():
    for line in sys.stdin:
        yield line.strip()


# -- servers: one role process answers the coordinator's "count" commands ------------------


def serve_fastsock(workers):
    import threading

    import fastsock

    ring = fastsock.RingQueue()
    prefork = fastsock.PreforkServer(
        (HOST, 0), fastsock.receiver(ring, framing="lines"), workers=workers, backlog=BACKLOG
    )
    prefork.start()
    counted = [0]

    def consume():
        try:
            while True:
                counted[0] += len(ring.get_batch(timeout=None))
        except fastsock.QueueClosed:
            return

    threading.Thread(target=consume, daemon=True).start()
    emit({"port": prefork.server_address[1], "pids": [os.getpid(), *prefork.workers]})
    for command in commands():
        if command != "count":
            break
        stats = prefork.stats()
        emit({"lines": counted[0], "open": stats.connections_opened - stats.connections_closed})
    prefork.server_close(timeout=5.0)
    ring.close()


class LineCounter(asyncio.Protocol):
    def __init__(self, tally, slot):
        self.tally = tally
        self.slot = slot
        self.partial = b""

    def connection_made(self, transport):
        self.tally[self.slot + 1] += 1

    def connection_lost(self, exc):
        self.tally[self.slot + 1] -= 1

    def data_received(self, data):
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        self.tally[self.slot] += len(lines)


def uvloop_worker(listener, tally, slot):
    import uvloop

    async def main():
        loop = asyncio.get_running_loop()
        await loop.create_server(lambda: LineCounter(tally, slot), sock=listener, backlog=BACKLOG)
        await asyncio.Event().wait()

    uvloop.run(main())


def serve_uvloop(workers):
    import multiprocessing

    tally = multiprocessing.Array("q", 2 * workers, lock=False)
    port = 0
    pids = []
    for index in range(workers):
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        listener.bind((HOST, port))
        port = listener.getsockname()[1]
        listener.listen(BACKLOG)
        pid = os.fork()
        if pid == 0:
            try:
                uvloop_worker(listener, tally, 2 * index)
            finally:
                os._exit(0)
        listener.close()
        pids.append(pid)
    emit({"port": port, "pids": [os.getpid(), *pids]})
    for command in commands():
        if command != "count":
            break
        emit({"lines": sum(tally[0::2]), "open": sum(tally[1::2])})
    for pid in pids:
        os.kill(pid, 9)
        os.waitpid(pid, 0)


# -- generators: hold a share of the silent connections ----------------------------------


def hold(port, count, source):
    from fastsock.bench import _loadgen

    descriptors, seconds = _loadgen.open_connections(
        (HOST, port), LINE, count, TIMEOUT, window=CONNECT_WINDOW, sources=[source]
    )
    emit({"opened": len(descriptors), "seconds": seconds})
    for _command in commands():
        break
    for descriptor in descriptors:
        os.close(descriptor)


# -- the coordinator ------------------------------------------------------------------------


def role(cpu, *arguments):
    process = subprocess.Popen(
        ["taskset", "-c", str(cpu), sys.executable, __file__, "--role", *map(str, arguments)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    return process


def ask(process, command=None):
    if command is not None:
        process.stdin.write(command + "\n")
        process.stdin.flush()
    line = read_line(process.stdout)
    return json.loads(line)


def read_line(stream):
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        if not selector.select(TIMEOUT):
            raise TimeoutError("a role process did not answer within the time bound")
    line = stream.readline()
    if not line:
        raise RuntimeError("a role process ended early (its error is above)")
    return line


def wait_for(server, lines, open_connections):
    deadline = time.monotonic() + TIMEOUT
    while True:
        count = ask(server, "count")
        if count["lines"] >= lines and count["open"] >= open_connections:
            return time.monotonic()
        if time.monotonic() > deadline:
            raise TimeoutError(f"server counted {count}, expected {lines} lines")
        time.sleep(POLL_SECONDS)


def usage(pids):
    """(RSS bytes, threads, CPU seconds) summed over ``pids``."""
    rss = threads = 0
    cpu = 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1]) * 1024
                elif line.startswith("Threads:"):
                    threads += int(line.split()[1])
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
            cpu += (int(fields[11]) + int(fields[12])) / ticks
    return rss, threads, cpu


def stream(server, port, seconds, lines_before, open_before):
    from fastsock.bench import _loadgen

    with socket.create_connection((HOST, port)) as live:
        start = time.monotonic()
        sent, _seconds = _loadgen.send_stream([live.fileno()], BLOCK, len(BLOCK) * 10**7, seconds)
        lines = sent // len(LINE)
        end = wait_for(server, lines_before + lines, open_before)
    return lines / (end - start)


def one_run(kind, connections, seconds, limit):
    workers = processes_for(connections + 1, limit)
    server = role(SERVER_CPU, "serve", kind, workers)
    try:
        started = ask(server)
        port, pids = started["port"], started["pids"]
        alone = stream(server, port, seconds, 0, 0)
        lines = ask(server, "count")["lines"]
        rss_before, threads_before, _cpu = usage(pids)
        shares = split(connections, processes_for(connections, limit))
        start = time.monotonic()
        holders = [
            role(LOAD_CPU, "hold", port, share, f"127.0.0.{2 + index}")
            for index, share in enumerate(shares)
        ]
        try:
            for holder, share in zip(holders, shares, strict=True):
                opened = ask(holder)
                if opened["opened"] != share:
                    raise RuntimeError(f"a generator opened {opened['opened']} of {share}")
            accepted = wait_for(server, lines + connections, connections) - start
            _rss, _threads, quiet_from = usage(pids)
            time.sleep(1.0)
            rss, threads, quiet_to = usage(pids)
            lines += connections
            with_silent = stream(server, port, seconds, lines, connections)
        finally:
            for holder in holders:
                holder.stdin.close()
                holder.wait(TIMEOUT)
    finally:
        server.stdin.close()
        server.wait(TIMEOUT)
    return {
        "workers": workers,
        "accept_seconds": accepted,
        "bytes_per_connection": (rss - rss_before) / connections,
        "threads": threads,
        "threads_before": threads_before,
        "silent_cpu": quiet_to - quiet_from,
        "alone": alone,
        "with_silent": with_silent,
    }


def split(total, parts):
    base, extra = divmod(total, parts)
    return [base + (index < extra) for index in range(parts)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--connections", type=int, default=50_000)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--servers", default="fastsock,uvloop")
    options = parser.parse_args()
    limit = descriptor_limit()
    if options.connections + 1 > 254 * 28_000:
        parser.error("more connections than 254 loopback sources have ports")
    os.sched_setaffinity(0, {LOAD_CPU})
    print(
        f"{options.connections:,} silent connections + 1 live, descriptor limit {limit:,} per "
        f"process, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}"
    )
    results = {}
    for kind in options.servers.split(","):
        runs = [
            one_run(kind, options.connections, options.seconds, limit)
            for _run in range(options.runs)
        ]
        row = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        results[kind] = row
        print(
            f"{kind:9} {row['workers']:.0f} server processes: all accepted in "
            f"{row['accept_seconds']:.2f} s, {row['bytes_per_connection'] / 1024:.2f} KiB RSS per "
            f"connection, {row['threads']:.0f} threads ({row['threads_before']:.0f} before), "
            f"{row['silent_cpu']:.1%} CPU silent, live {row['alone'] / 1e6:.2f}M lines/s alone "
            f"and {row['with_silent'] / 1e6:.2f}M with them "
            f"({row['with_silent'] / row['alone']:.2f}x)"
        )
    if {"fastsock", "uvloop"} <= results.keys():
        fast, uv = results["fastsock"], results["uvloop"]
        print(
            f"fastsock/uvloop: accept time {fast['accept_seconds'] / uv['accept_seconds']:.2f}x, "
            f"RSS per connection {fast['bytes_per_connection'] / uv['bytes_per_connection']:.2f}x, "
            f"live rate with silent peers {fast['with_silent'] / uv['with_silent']:.2f}x"
        )


def run_role(arguments):
    descriptor_limit()
    if arguments[0] == "serve":
        {"fastsock": serve_fastsock, "uvloop": serve_uvloop}[arguments[1]](int(arguments[2]))
    else:
        hold(int(arguments[1]), int(arguments[2]), arguments[3])


if __name__ == "__main__":
    if sys.argv[1:2] == ["--role"]:
        run_role(sys.argv[2:])
    else:
        main()
