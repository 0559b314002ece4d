"""Broker sinks: fastsock's receive path and pipeline against a plain asyncio server loop,
all writing into the same broker in the same batches of GET_MANY_DEFAULT messages, from 16
connections of 64-byte lines.  The asyncio loop writes twice over: with fastsock's own sink
class (same client library, same encoding: the receiving compared), and with the client
library's ordinary API as a user would write it (redis-py's pipeline of XADDs, nats-py's
JetStream publish per message, confluent-kafka's produce and flush: the issue's comparison).

    python bench/sinks.py                           # redis, nats, kafka: about 5 minutes
    python bench/sinks.py --sinks redis --messages 400000 --runs 3

Each row is a server process pinned to CPU 0 that receives MESSAGES lines and exits once the
sink has confirmed them all; the load generator and the broker (redis-server, nats-server, or
librdkafka's mock cluster in a process of its own: ``python -m fastsock.bench.kafka_mock``)
are pinned to CPU 1.  The rows of a
sink take their runs in turns.  A row's rate is MESSAGES over the time from the generator's
first byte to the sink's last confirmation.  Beside them, where the time goes: the same sink
fed pre-built batches with no receiving at all ("sink alone": client library and broker), the
two servers with a sink that discards ("receive alone"), and the CPU seconds the server
process, the broker and the generator (which shares the broker's CPU) used per 100,000
messages.

Needs redis-server and nats-server on PATH (or /usr/sbin) and fastsock's test extra (the
client libraries); the ratios in one run are the result, not the absolute rates.
"""

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

CONNECTIONS = 16
LINE_BYTES = 64
LINES_PER_BLOCK = 1024
SERVER_CPU = 0
OTHER_CPU = 1
HOST = "127.0.0.1"
NATS_STREAM = "BENCH"
NATS_SUBJECT = "bench.lines"


def pin(cpu):
    if hasattr(os, "sched_setaffinity") and os.cpu_count() > cpu:
        os.sched_setaffinity(0, {cpu})


def cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- The server processes ------------------------------------------------------------------------


class NullSink:
    """Discards every batch: the receive path alone."""

    def write(self, messages):
        pass

    def flush(self, timeout):
        pass

    def close(self):
        pass


def open_bench_sink(url):
    from fastsock.pipeline import open_sink

    return NullSink() if url == "null" else open_sink(url)


def warm_up_batch():
    """What each row's client writes before the row starts, so that no rate includes the
    client's start: a Kafka producer's first write waits about 0.5 s when it comes before
    the producer has the topic's metadata."""
    from fastsock.pipeline import Message

    return [Message(0, f"{HOST}:0", b"warm-up")]


def serve_fastsock(url, messages, ready):
    import fastsock
    from fastsock.pipeline import AsyncPipeline, Pipeline, is_async_sink

    ring = fastsock.RingQueue()
    server = fastsock.ThreadingTCPServer((HOST, 0), fastsock.receiver(ring, framing="lines"))
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    sink = open_bench_sink(url)
    if is_async_sink(sink):
        pipeline = AsyncPipeline(ring, sink, server=server)

        async def deliver_all():
            await sink.write(warm_up_batch())
            ready(server.server_address[1])
            while pipeline.stats.messages_delivered < messages:
                await pipeline.deliver(0.1)

        asyncio.run(deliver_all())
    else:
        sink.write(warm_up_batch())
        ready(server.server_address[1])
        pipeline = Pipeline(ring, sink, server=server)
        while pipeline.stats.messages_delivered < messages:
            pipeline.deliver(0.1)
    return server


def serve_asyncio(url, messages, ready, plain=False):
    """The plain loop: an asyncio server reading lines with StreamReader.readline() into a
    list, a task handing batches of the same size as the pipeline's to fastsock's sink class
    (a synchronous sink's writes in the default executor, so reading goes on meanwhile), or
    with plain, to the client library's ordinary API as a user would call it."""
    from fastsock.constants import GET_MANY_DEFAULT
    from fastsock.pipeline import Message, is_async_sink

    async def main():
        if plain:
            write = await plain_writer(url)
        else:
            sink = open_bench_sink(url)
            if is_async_sink(sink):
                write = sink.write
            else:

                async def write(batch):
                    await loop.run_in_executor(None, sink.write, batch)

        pending = []
        arrived = asyncio.Event()
        connection_ids = iter(range(1, 1 << 62))

        async def receive(reader, writer):
            connection = next(connection_ids)
            host, port = writer.get_extra_info("peername")[:2]
            peer = f"{host}:{port}"
            while line := await reader.readline():
                pending.append(Message(connection, peer, line[:-1]))
                if len(pending) >= GET_MANY_DEFAULT:
                    arrived.set()
            writer.close()

        loop = asyncio.get_running_loop()
        await write(warm_up_batch())
        server = await asyncio.start_server(receive, HOST, 0, backlog=CONNECTIONS)
        ready(server.sockets[0].getsockname()[1])
        delivered = 0
        while delivered < messages:
            if not pending:
                with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                    await asyncio.wait_for(arrived.wait(), 0.1)
                arrived.clear()
                continue
            batch = pending[:GET_MANY_DEFAULT]
            del pending[:GET_MANY_DEFAULT]
            await write(batch)
            delivered += len(batch)
        server.close()

    asyncio.run(main())


async def plain_writer(url):
    """A coroutine writing one batch with the client library's ordinary API, the same
    fields or headers as fastsock's sink, and returning once the broker confirmed it all:
    redis-py's asyncio pipeline of one XADD per message, nats-py's JetStream publish per
    message gathered, confluent-kafka's produce per message and a flush."""
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    name = parts.path.lstrip("/")
    if parts.scheme == "redis":
        import redis.asyncio

        client = redis.asyncio.Redis(host=parts.hostname, port=parts.port)

        async def write(batch):
            pipeline = client.pipeline(transaction=False)
            for connection, peer, payload in batch:
                pipeline.xadd(name, {"payload": payload, "connection": connection, "peer": peer})
            await pipeline.execute()

    elif parts.scheme == "nats":
        import uuid

        import nats

        jetstream = (await nats.connect(f"nats://{parts.netloc}")).jetstream()
        producer, sequences = uuid.uuid4().hex, iter(range(1 << 62))

        async def write(batch):
            await asyncio.gather(
                *(
                    jetstream.publish(
                        name,
                        payload,
                        headers={
                            "Nats-Msg-Id": f"{producer}-{next(sequences)}",
                            "Fastsock-Connection": str(connection),
                            "Fastsock-Peer": peer,
                        },
                    )
                    for connection, peer, payload in batch
                )
            )

    elif parts.scheme == "kafka":
        import confluent_kafka

        from fastsock.constants import KAFKA_LINGER_MS

        producer = confluent_kafka.Producer(
            {"bootstrap.servers": parts.netloc, "acks": "all", "enable.idempotence": True,
             "linger.ms": KAFKA_LINGER_MS, "log_level": 3}
        )  # fmt: skip
        loop = asyncio.get_running_loop()

        async def write(batch):
            for connection, peer, payload in batch:
                key = str(connection)
                headers = {"fastsock-connection": key, "fastsock-peer": peer}
                producer.produce(name, payload, key, headers=headers)
                producer.poll(0)
            if await loop.run_in_executor(None, producer.flush, 30):
                raise RuntimeError("kafka: messages left unconfirmed")

    else:
        raise SystemExit(f"no plain client loop for {url}")
    return write


def serve_child(kind, url, messages):
    """A row's server: announces its port, delivers messages, reports when and its CPU."""
    pin(SERVER_CPU)
    started = cpu_seconds()

    def ready(port):
        print(json.dumps({"port": port}), flush=True)

    if kind == "fastsock":
        result = serve_fastsock(url, messages, ready)
    else:
        result = serve_asyncio(url, messages, ready, plain=kind == "plain")
    done = time.monotonic()
    print(json.dumps({"done": done, "cpu": cpu_seconds() - started}), flush=True)
    if result is not None:
        result.server_close()
    os._exit(0)


def sink_alone_child(url, messages):
    """The sink fed pre-built batches: the client library and the broker, no receiving.  A
    batch holds each connection's lines in runs of a block, as the receive path hands them
    over (a run of one connection's lines per read: 1,495 lines on average in this bench)."""
    from fastsock.constants import GET_MANY_DEFAULT
    from fastsock.pipeline import Message, is_async_sink

    pin(SERVER_CPU)
    sink = open_bench_sink(url)
    sources = [
        (1 + connection, f"{HOST}:{40000 + connection}") for connection in range(CONNECTIONS)
    ]
    batches = []
    for first in range(0, messages, GET_MANY_DEFAULT):
        count = min(GET_MANY_DEFAULT, messages - first)
        batches.append(
            [
                Message(*sources[index // LINES_PER_BLOCK % CONNECTIONS], b"x" * (LINE_BYTES - 1))
                for index in range(first, first + count)
            ]
        )
    if is_async_sink(sink):

        async def write_all():
            await sink.write(warm_up_batch())
            started = time.monotonic()
            for batch in batches:
                await sink.write(batch)
            return started

        cpu = cpu_seconds()
        started = asyncio.run(write_all())
    else:
        sink.write(warm_up_batch())
        started, cpu = time.monotonic(), cpu_seconds()
        for batch in batches:
            sink.write(batch)
    seconds = time.monotonic() - started
    print(json.dumps({"seconds": seconds, "cpu": cpu_seconds() - cpu}), flush=True)
    os._exit(0)


def load_child(port, messages):
    """16 connections, each sending its share of 64-byte lines in blocks, one thread each."""
    pin(OTHER_CPU)
    line = b"x" * (LINE_BYTES - 1) + b"\n"
    per_connection = messages // CONNECTIONS
    clients = [socket.create_connection((HOST, port)) for _ in range(CONNECTIONS)]

    def send(client):
        left = per_connection
        while left:
            count = min(LINES_PER_BLOCK, left)
            client.sendall(line * count)
            left -= count
        client.close()

    start = time.monotonic()
    threads = [threading.Thread(target=send, args=(client,)) for client in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(json.dumps({"start": start, "cpu": cpu_seconds()}), flush=True)


# -- The coordinator ---------------------------------------------------------------------------


def child(*arguments):
    return subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), *map(str, arguments)],
        stdout=subprocess.PIPE,
        text=True,
    )


def report_of(process):
    return json.loads(process.stdout.readline())


def process_cpu(pid):
    """User and system CPU seconds of a process, from /proc."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_row(kind, url, messages, broker_cpu):
    server = child("serve", kind, url, messages)
    port = report_of(server)["port"]
    broker_before = broker_cpu()
    load = child("load", port, messages)
    generator = report_of(load)
    done = report_of(server)
    broker_used = broker_cpu() - broker_before
    load.wait()
    server.wait()
    return {
        "rate": messages / (done["done"] - generator["start"]),
        "server_cpu": done["cpu"],
        "broker_cpu": broker_used,
        "generator_cpu": generator["cpu"],
    }


def sink_alone(url, messages):
    process = child("sink-alone", url, messages)
    result = report_of(process)
    process.wait()
    return messages / result["seconds"]


def program(name):
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin")
    if found is None:
        raise SystemExit(f"{name} is not installed (Debian: apt-get install {name})")
    return found


def free_port():
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def wait_listening(port, process):
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection((HOST, port), timeout=1).close()
            return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"broker on port {port} did not start") from None
            time.sleep(0.05)


@contextlib.contextmanager
def broker_process(command, port=None, stdin=None, stdout=subprocess.DEVNULL):
    """The broker's process on the broker CPU; with port, once it listens there.  A broker
    given stdin=PIPE lives until its standard input closes, the others until SIGTERM."""
    process = subprocess.Popen(
        command,
        stdin=stdin,
        stdout=stdout,
        stderr=subprocess.DEVNULL,
        text=True,
        preexec_fn=lambda: pin(OTHER_CPU),
    )
    try:
        if port is not None:
            wait_listening(port, process)
        yield process
    finally:
        if process.stdin is None:
            process.terminate()
        else:
            process.stdin.close()
        process.wait()


@contextlib.contextmanager
def broker(name, directory):
    """(the sink URL of a fresh stream/subject/topic per call, broker CPU seconds so far)."""
    if name == "redis":
        port = free_port()
        command = [program("redis-server"), "--port", str(port), "--bind", HOST,
                   "--dir", directory, "--save", "",
                   "--appendonly", "yes", "--appendfsync", "everysec"]  # fmt: skip
        with broker_process(command, port) as process:
            names = iter(range(1 << 30))
            yield (
                (lambda: f"redis://{HOST}:{port}/bench{next(names)}"),
                (lambda: process_cpu(process.pid)),
            )
    elif name == "nats":
        port = free_port()
        command = [program("nats-server"), "-a", HOST, "-p", str(port), "-js", "-sd",
                   os.path.join(directory, "jetstream")]  # fmt: skip
        with broker_process(command, port) as process:
            asyncio.run(add_nats_stream(port))
            yield (
                (lambda: f"nats://{HOST}:{port}/{NATS_SUBJECT}"),
                (lambda: process_cpu(process.pid)),
            )
    elif name == "kafka":
        # -P: the installed fastsock, as the rows import it, not a source tree in the cwd.
        command = [sys.executable, "-P", "-m", "fastsock.bench.kafka_mock"]
        with broker_process(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE) as process:
            bootstrap = process.stdout.readline().strip()
            if not bootstrap:
                raise SystemExit("the Kafka mock cluster did not start")
            names = iter(range(1 << 30))
            yield (
                (lambda: f"kafka://{bootstrap}/bench{next(names)}?log_level=3"),
                (lambda: process_cpu(process.pid)),
            )
    else:
        raise SystemExit(f"unknown sink {name!r}: redis, nats or kafka")


async def add_nats_stream(port):
    import nats

    connection = await nats.connect(f"nats://{HOST}:{port}")
    try:
        await connection.jetstream().add_stream(name=NATS_STREAM, subjects=[NATS_SUBJECT])
    finally:
        await connection.close()


def bench_sink(name, messages, runs):
    rows = {"fastsock": [], "asyncio": [], "plain": []}
    with tempfile.TemporaryDirectory() as directory, broker(name, directory) as (url, broker_cpu):
        alone = sink_alone(url(), messages)
        for run in range(runs):
            order = list(rows)[run % 3 :] + list(rows)[: run % 3]
            for kind in order:
                rows[kind].append(run_row(kind, url(), messages, broker_cpu))
                print(f"  {name} {kind} run {run + 1}: {rows[kind][-1]['rate']:,.0f} msg/s",
                      file=sys.stderr)  # fmt: skip
    return rows, alone


def median(rows, field):
    return statistics.median(row[field] for row in rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sinks", default="redis,nats,kafka")
    parser.add_argument("--messages", type=int, default=160_000)
    parser.add_argument("--runs", type=int, default=3)
    options = parser.parse_args()
    messages = options.messages - options.messages % CONNECTIONS
    print(f"{CONNECTIONS} connections x {messages // CONNECTIONS:,} lines of {LINE_BYTES} bytes; "
          f"server on CPU {SERVER_CPU}, load and broker on CPU {OTHER_CPU}; median of "
          f"{options.runs} runs in turns", file=sys.stderr)  # fmt: skip
    null_rows = {"fastsock": [], "asyncio": []}
    for _ in range(options.runs):
        for kind in null_rows:
            null_rows[kind].append(run_row(kind, "null", messages, lambda: 0.0))
    print("receive alone (a sink that discards): fastsock "
          f"{median(null_rows['fastsock'], 'rate'):,.0f} msg/s, asyncio loop "
          f"{median(null_rows['asyncio'], 'rate'):,.0f} msg/s")  # fmt: skip
    header = ("sink", "fastsock msg/s", "asyncio + sink class msg/s", "ratio",
              "asyncio + client API msg/s", "ratio", "sink alone msg/s",
              "server CPU s/100k (fastsock, sink class, client API)",
              "broker CPU s/100k (same)", "generator CPU s/100k (same)")  # fmt: skip
    print(" | ".join(header))
    for name in options.sinks.split(","):
        rows, alone = bench_sink(name, messages, options.runs)
        fast, same, plain = (median(rows[kind], "rate") for kind in rows)
        per = 100_000 / messages

        def cpu(field, per=per, rows=rows):
            return ", ".join(f"{median(rows[kind], field) * per:.2f}" for kind in rows)

        print(f"{name} | {fast:,.0f} | {same:,.0f} | {fast / same:.2f}x | {plain:,.0f} | "
              f"{fast / plain:.2f}x | {alone:,.0f} | {cpu('server_cpu')} | {cpu('broker_cpu')} | "
              f"{cpu('generator_cpu')} | "
              f"load average {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        serve_child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif len(sys.argv) > 1 and sys.argv[1] == "sink-alone":
        sink_alone_child(sys.argv[2], int(sys.argv[3]))
    elif len(sys.argv) > 1 and sys.argv[1] == "load":
        load_child(int(sys.argv[2]), int(sys.argv[3]))
    else:
        main()
