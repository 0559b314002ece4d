"""fastsock.pipeline: a batch leaves the ring only once the sink confirmed it; while the sink
is unavailable the batch is retried, the ring fills and TCP senders are held back, then every
message is delivered exactly once and in per-connection order; a stop's deadline counts what
could not be delivered; the file sinks and ``open_sink``; ``fastsock serve --sink`` with a
failing file and with an asyncio sink."""

import asyncio
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import fastsock
from fastsock import metrics
from fastsock.pipeline import (
    FileSink,
    Message,
    Pipeline,
    SinkUnavailable,
    is_async_sink,
    open_sink,
)
from tests.fault_helpers import wait_until
from tests.support import NETWORK_TIMEOUT, require_program, serving, start_thread
from tests.test_cli import PipedServeProcess, started_by

LINE = b"%02d-%010d" + b"." * 60 + b"\n"


class SwitchableSink:
    """A Sink that keeps what it is given, and refuses it (SinkUnavailable) while switched
    off: a real implementation of the protocol whose availability the test sets."""

    def __init__(self):
        self.available = threading.Event()
        self.messages = []
        self.refusals = 0
        self.flushed = self.closed = False

    def write(self, messages):
        if not self.available.is_set():
            self.refusals += 1
            raise SinkUnavailable("switched off")
        self.messages += messages

    def flush(self, timeout):
        self.flushed = True

    def close(self):
        self.closed = True


class PushingClient:
    """A non-blocking connection sending numbered lines until the server stops reading."""

    def __init__(self, address, number):
        self.sock = socket.create_connection(address, NETWORK_TIMEOUT)
        self.sock.setblocking(False)
        self.peer = "{}:{}".format(*self.sock.getsockname()[:2])
        self.number = number
        self.lines = 0
        self.pending = b""

    def more(self, count):
        self.pending += b"".join(
            LINE % (self.number, n) for n in range(self.lines, self.lines + count)
        )
        self.lines += count

    def push_until_held_back(self, most_bytes=256 * 1024 * 1024):
        """Send until a send stays impossible for a second: TCP holds the sender back."""
        sent = 0
        while sent < most_bytes:
            if not self.pending:
                self.more(1000)
            try:
                written = self.sock.send(self.pending)
            except BlockingIOError:
                if not select.select([], [self.sock], [], 1.0)[1]:
                    return True
                continue
            self.pending = self.pending[written:]
            sent += written
        return False

    def finish(self, count):
        self.sock.setblocking(True)
        self.sock.settimeout(NETWORK_TIMEOUT)
        self.more(count)
        self.sock.sendall(self.pending)
        self.sock.close()


def test_an_unavailable_sink_holds_tcp_senders_back_then_gets_everything_once_in_order():
    ring = fastsock.RingQueue(max_messages=512)
    server = fastsock.ThreadingTCPServer(
        ("127.0.0.1", 0), fastsock.receiver(ring, framing="lines", max_line=1024)
    )
    sink = SwitchableSink()
    pipeline = Pipeline(ring, sink, server=server)
    with serving(server):
        delivering = start_thread(pipeline.run)
        clients = [PushingClient(server.server_address, number) for number in range(3)]
        for client in clients:
            assert client.push_until_held_back(), "the sender was never held back"
        # Held back because the ring is full and the receive loops wait for room.
        assert server.stats().pauses >= 1
        assert pipeline.stats.messages_delivered == 0
        assert pipeline.stats.retries >= 1 and sink.refusals >= 1
        assert pipeline.stats.lag > 0
        sink.available.set()
        for client in clients:
            client.finish(500)
        total = sum(client.lines for client in clients)
        wait_until(lambda: len(sink.messages) >= total, NETWORK_TIMEOUT, what="delivery")
    pipeline.stop()
    delivering.join(NETWORK_TIMEOUT)
    stats = pipeline.stats
    assert (stats.messages_delivered, stats.undelivered, stats.lag) == (total, 0, 0)
    assert stats.sink_errors == sink.refusals and stats.retries >= 1
    assert sink.flushed and sink.closed and ring.closed
    for client in clients:
        mine = [m for m in sink.messages if m.peer == client.peer]
        assert [m.payload for m in mine] == [
            (LINE % (client.number, n))[:-1] for n in range(client.lines)
        ], "each connection's lines exactly once, in order"
        assert len({m.connection_id for m in mine}) == 1


def test_the_stop_deadline_counts_what_a_full_disk_kept_from_delivery():
    ring = fastsock.RingQueue()
    for n in range(10):
        ring.put(b"%d" % n, source_id=n % 2)
    pipeline = Pipeline(ring, FileSink("/dev/full"))
    pipeline.stop(0.3)
    stats = pipeline.run()
    assert (stats.messages_delivered, stats.undelivered) == (0, 10)
    assert stats.sink_errors >= 1 and stats.retries >= 1
    assert "No space left" in str(pipeline.last_error)
    assert ring.closed


# Run in a mount namespace of its own (unshare -Urm: also without root), on a tmpfs of
# TMPFS_BYTES: the first batch fits, the second fills the disk part way through a record.
FULL_DISK_PIPELINE = """
import dataclasses, json, sys
import fastsock
from fastsock.pipeline import FileSink, Pipeline

report, output, total, batch, format = sys.argv[1:]
total, batch = int(total), int(batch)
ring = fastsock.RingQueue()
for n in range(total):
    ring.put(b"%06d" % n + b"." * 90, source_id=n % 3)
pipeline = Pipeline(ring, FileSink(output, format=format), max_batch=batch)
pipeline.stop(0.3)
stats = pipeline.run()
with open(output, "rb") as written, open(report, "w") as out:
    json.dump({"stats": dataclasses.asdict(stats), "file": written.read().decode("latin-1")}, out)
"""
TMPFS_BYTES = 64 * 1024


# The same disk, filled by another file but for one page: a batch stops part way (ENOSPC);
# once the other file is removed, the batch is retried, and the next batch follows it.
FULL_DISK_RETRY = """
import json, os, sys
from fastsock.pipeline import FileSink, Message, SinkUnavailable

report, output = sys.argv[1:]
sink = FileSink(output)
batches = [
    [Message(None, None, b"%d-%05d" % (b, n) + b"." * 90) for n in range(100)] for b in (1, 2)
]
filler_path = os.path.join(os.path.dirname(output), "filler")
filler = os.open(filler_path, os.O_WRONLY | os.O_CREAT)
try:
    while True:
        os.write(filler, bytes(4096))
except OSError:
    pass
os.ftruncate(filler, os.fstat(filler).st_size - 4096)
refused = 0
try:
    sink.write(batches[0])
except SinkUnavailable:
    refused += 1
os.close(filler)
os.unlink(filler_path)
sink.write(batches[0])
sink.write(batches[1])
sink.close()
with open(output, "rb") as written, open(report, "w") as out:
    json.dump({"refused": refused, "file": written.read().decode()}, out)
"""


def run_on_a_small_disk(tmp_path, program, *arguments):
    """The report of ``program``, run on a TMPFS_BYTES disk: a real ENOSPC part way."""
    disk = tmp_path / "disk"
    disk.mkdir()
    script, report = tmp_path / "full_disk.py", tmp_path / "report.json"
    script.write_text(program)
    command = (
        f"mount -t tmpfs -o size={TMPFS_BYTES} tmpfs {disk} && exec {sys.executable} {script} "
        f"{report} {disk / 'out'} {' '.join(map(str, arguments))}"
    )
    unshare = require_program(
        shutil.which("unshare"), "unshare", "util-linux", "the full-disk file sink tests"
    )
    done = subprocess.run(
        [unshare, "-Urm", "sh", "-c", command],
        capture_output=True,
        text=True,
        timeout=NETWORK_TIMEOUT,
    )
    if done.returncode != 0 and "mount" in done.stderr and not report.exists():
        require_program(None, "a mount namespace (unshare -Urm)", "util-linux", done.stderr)
    assert done.returncode == 0, done.stderr
    return json.loads(report.read_text())


@pytest.mark.parametrize("format", ["raw", "jsonl"])
def test_a_batch_given_up_part_written_leaves_no_torn_record(tmp_path, format):
    total, batch = 1500, 200
    report = run_on_a_small_disk(tmp_path, FULL_DISK_PIPELINE, total, batch, format)
    stats, lines = report["stats"], report["file"].split("\n")
    assert lines.pop() == "", "the file ends with a whole record"
    if format == "jsonl":
        payloads = [json.loads(line)["text"] for line in lines]
    else:
        payloads = lines
    assert payloads == [f"{n:06d}" + "." * 90 for n in range(len(payloads))]
    assert 0 < len(payloads) < total, "the disk took some batches, not all"
    assert stats["messages_delivered"] == len(payloads)
    assert stats["undelivered"] == total - len(payloads)
    assert stats["sink_errors"] >= 1


def test_a_batch_retried_after_a_full_disk_is_kept_whole_when_the_next_follows(tmp_path):
    report = run_on_a_small_disk(tmp_path, FULL_DISK_RETRY)
    assert report["refused"] == 1
    expected = "".join(f"{b}-{n:05d}" + "." * 90 + "\n" for b in (1, 2) for n in range(100))
    assert report["file"] == expected


def test_a_fatal_sink_error_stops_the_pipeline_and_counts_what_is_left():
    class Broken(SwitchableSink):
        def write(self, messages):
            raise RuntimeError("the sink is broken")

    ring = fastsock.RingQueue()
    ring.put_many([b"a", b"b", b"c"])
    sink = Broken()
    pipeline = Pipeline(ring, sink, max_batch=2)
    with pytest.raises(RuntimeError, match="broken"):
        pipeline.run()
    assert (pipeline.stats.undelivered, pipeline.stats.sink_errors) == (3, 1)
    assert sink.closed and ring.closed


def test_datagram_senders_are_named_from_the_messages():
    ring = fastsock.RingQueue()
    server = fastsock.UDPServer(("127.0.0.1", 0), fastsock.receiver(ring))
    sink = SwitchableSink()
    sink.available.set()
    pipeline = Pipeline(ring, sink, server=server)
    with serving(server), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.bind(("127.0.0.1", 0))
        client.sendto(b"hello", server.server_address)
        wait_until(lambda: pipeline.deliver(0.1), NETWORK_TIMEOUT, what="a datagram")
        port = client.getsockname()[1]
    pipeline.finish()
    server.server_close()
    assert sink.messages == [Message(None, f"127.0.0.1:{port}", b"hello")]


def test_file_sink_formats_and_a_retried_batch_resumes_where_the_write_stopped(tmp_path):
    batch = [Message(3, "127.0.0.1:9", b"caf\xc3\xa9"), Message(None, None, b"\xff")]
    raw, jsonl = (
        FileSink(tmp_path / "raw", separator=b"|"),
        open_sink(f"file://{tmp_path}/jsonl", format="jsonl"),
    )
    for sink in (raw, jsonl):
        sink.write(batch)
        sink.close()
    assert (tmp_path / "raw").read_bytes() == b"caf\xc3\xa9|\xff|"
    records = [json.loads(line) for line in (tmp_path / "jsonl").read_text().splitlines()]
    assert [(r["connection"], r["peer"], r.get("text"), r.get("base64")) for r in records] == [
        (3, "127.0.0.1:9", "café", None),
        (None, None, None, "/w=="),
    ]
    # A pipe that cannot take the whole batch at once: EAGAIN part way, then the same
    # batch resumes, so the reader gets every byte exactly once.
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    sink = FileSink(fifo)
    os.set_blocking(sink.fileno(), False)
    big = [Message(1, None, b"%06d" % n * 100) for n in range(1000)]
    received, refusals = b"", 0
    while True:
        try:
            sink.write(big)
            break
        except SinkUnavailable:
            refusals += 1
            received += os.read(reader, 1 << 20)
    sink.close()
    while chunk := os.read(reader, 1 << 20):
        received += chunk
    os.close(reader)
    assert refusals >= 1
    assert received == b"".join(m.payload + b"\n" for m in big)


def test_open_sink_schemes_and_errors(tmp_path, monkeypatch):
    assert open_sink("-").is_stdout and open_sink("stdout").is_stdout
    assert open_sink(str(tmp_path / "a")).path == str(tmp_path / "a")
    with pytest.raises(ValueError, match="unknown sink scheme 'ftp'"):
        open_sink("ftp://host/x")
    with pytest.raises(ValueError, match="names no class"):
        open_sink("python://module_only")
    for scheme, extra in (("redis", "redis"), ("nats", "nats"), ("kafka", "kafka")):
        monkeypatch.setitem(sys.modules, f"fastsock.sinks.{scheme}", None)
        with pytest.raises(ImportError, match=rf"pip install 'fastsock\[{extra}\]'"):
            open_sink(f"{scheme}://127.0.0.1/x")
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    sink = open_sink(f"python://async_file_sink:AsyncFileSink?path={tmp_path / 'b'}")
    file_sink = FileSink(tmp_path / "c")
    assert is_async_sink(sink) and not is_async_sink(file_sink)
    asyncio.run(sink.close())
    file_sink.close()


def test_pipeline_metrics_have_prometheus_names():
    ring = fastsock.RingQueue()
    ring.put(b"x")
    sink = SwitchableSink()
    sink.available.set()
    pipeline = Pipeline(ring, sink)
    pipeline.deliver()
    text = metrics.prometheus_text(pipeline=pipeline)
    assert "fastsock_pipeline_messages_delivered_total 1\n" in text
    assert "fastsock_pipeline_batches_delivered_total 1\n" in text
    assert "fastsock_pipeline_lag_messages 0\n" in text
    assert "# TYPE fastsock_pipeline_undelivered_messages_total counter" in text


# -- fastsock serve --sink -------------------------------------------------------------------


@pytest.fixture
def serve(tmp_path):
    yield from started_by(PipedServeProcess, tmp_path)


def send_lines(address, first, count):
    with socket.create_connection(address, NETWORK_TIMEOUT) as sock:
        sock.sendall(b"".join(b"%d\n" % n for n in range(first, first + count)))
        return "{}:{}".format(*sock.getsockname()[:2])


def test_serve_counts_and_reports_what_a_full_disk_kept_from_delivery_at_sigterm(serve):
    server = serve(
        "tcp://127.0.0.1:0",
        *("--sink", "/dev/full", "--sink-timeout", "0.3", "--drain-timeout", "0.3"),
        *("--stats-interval", "0"),
    )
    send_lines(server.address, 0, 100)
    assert "No space left" in server.line_matching("sink unavailable")
    status, _ = server.stop()
    assert status == 1, server.stderr
    assert "100 messages received were not delivered to /dev/full" in "".join(server.stderr)
    (final,) = [line for line in server.stderr if "stopped by SIGTERM" in line]
    assert "received 100 messages, written 0" in final
    assert "0 batches" in final and "100 undelivered" in final


def test_serve_reports_its_counters_while_the_sink_stays_unavailable(serve):
    # The pipeline retries one batch for as long as the outage lasts: the stats lines go on.
    server = serve(
        "tcp://127.0.0.1:0",
        *("--sink", "/dev/full", "--sink-timeout", "0.3", "--drain-timeout", "0.3"),
        *("--stats-interval", "0.2"),
    )
    send_lines(server.address, 0, 100)
    server.line_matching("sink unavailable")
    retries = []
    while len(retries) < 3:
        line = server.line_matching(" retries, ")
        retries.append(int(line.split(" retries, ")[0].rsplit(" ", 1)[-1].replace(",", "")))
    assert retries == sorted(retries) and retries[-1] > retries[0] >= 0, retries
    assert "received 100 messages" in line and "0 batches" in line
    status, _ = server.stop()
    assert status == 1, server.stderr


def test_serve_runs_an_asyncio_sink_on_an_event_loop(serve, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))
    output = tmp_path / "async.out"
    server = serve(
        "tcp://127.0.0.1:0",
        *("--sink", f"python://async_file_sink:AsyncFileSink?path={output}"),
        *("--stats-interval", "0"),
    )
    assert f"writing messages to {output}" in server.stderr[0]
    peers = [send_lines(server.address, 1000 * k, 1000) for k in range(3)]
    wait_until(
        lambda: output.exists() and output.read_bytes().count(b"\n") >= 3000,
        NETWORK_TIMEOUT,
        what="3000 lines written",
    )
    server.hangup_group()
    assert "SIGHUP ignored" in server.line_matching("SIGHUP")
    status, _ = server.stop()
    assert status == 0, server.stderr
    (final,) = [line for line in server.stderr if "stopped by SIGTERM" in line]
    assert "received 3,000 messages, written 3,000" in final
    lines = [line.split(b" ") for line in output.read_bytes().splitlines()]
    for k, peer in enumerate(peers):
        mine = [
            (connection, payload) for connection, name, payload in lines if name == peer.encode()
        ]
        assert [payload for _, payload in mine] == [
            b"%d" % n for n in range(1000 * k, 1000 * k + 1000)
        ]
        assert len({connection for connection, _ in mine}) == 1
