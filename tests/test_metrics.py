"""Metrics for Prometheus: fastsock.metrics and ``fastsock serve --metrics``, read with
prometheus_client's own parser; names, types and values match the servers' and the ring's
counters, a scrape answers while the consumer is stalled, and a bad scraper is bounded."""

import dataclasses
import re
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import fastsock
from fastsock import metrics
from tests.fault_helpers import wait_until
from tests.support import LOCALHOST, NETWORK_TIMEOUT, serving
from tests.test_cli import PipedServeProcess, fastsock_command, started_by

README = Path(__file__).resolve().parent.parent / "README.md"


def parse(text):
    """{sample name: (family type, value)} of an exposition, checked by the real parser:
    every family has HELP text and exactly one sample, named as its TYPE line says."""
    found = {}
    for family in text_string_to_metric_families(text):
        assert family.documentation, family.name
        assert len(family.samples) == 1, family
        sample = family.samples[0]
        assert sample.labels == {}
        suffix = "_total" if family.type == "counter" else ""
        assert sample.name == family.name + suffix
        found[sample.name] = (family.type, sample.value)
    return found


def expected(table, stats):
    return {metric.name: (metric.type, getattr(stats, metric.field)) for metric in table}


def scrape(url, timeout=NETWORK_TIMEOUT):
    with urllib.request.urlopen(url, timeout=timeout) as answer:
        assert answer.headers["Content-Type"] == metrics.CONTENT_TYPE
        return answer.read().decode()


TABLES = (
    metrics.STREAM_METRICS,
    metrics.DATAGRAM_METRICS,
    metrics.RING_METRICS,
    metrics.PIPELINE_METRICS,
    (metrics.SCRAPES_REFUSED,),
)


def test_the_names_are_unique_conventional_and_in_the_readme():
    readme = README.read_text()
    for table in TABLES:
        names = [metric.name for metric in table]
        assert len(set(names)) == len(names)
        for metric in table:
            assert re.fullmatch(r"fastsock_[a-z_]+", metric.name)
            assert metric.name.endswith("_total") == (metric.type == "counter"), metric
            assert f"`{metric.name}`" in readme, f"{metric.name} is not in the README"
    documented = set(re.findall(r"`(fastsock_[a-z_]+)`", readme))
    exported = {metric.name for table in TABLES for metric in table}
    assert documented <= exported, f"the README names unknown metrics: {documented - exported}"


def test_a_stream_server_and_its_ring_in_the_text_format():
    ring = fastsock.RingQueue()
    server = fastsock.ThreadingTCPServer((LOCALHOST, 0), fastsock.receiver(ring, framing="lines"))
    with serving(server):
        for _ in range(3):
            with socket.create_connection(server.server_address, NETWORK_TIMEOUT) as client:
                client.sendall(b"".join(b"message %d\n" % n for n in range(100)))
        taken = []
        while len(taken) < 250:
            taken += ring.get_many(max_items=250 - len(taken), timeout=NETWORK_TIMEOUT)
        deadline = time.monotonic() + NETWORK_TIMEOUT
        while server.stats().connections_closed < 3:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        found = parse(metrics.prometheus_text(server, ring))
        stats, ring_stats = server.stats(), ring.stats
    assert found == expected(metrics.STREAM_METRICS, stats) | expected(
        metrics.RING_METRICS, ring_stats
    )
    assert found["fastsock_received_messages_total"] == ("counter", 300)
    assert found["fastsock_connections_opened_total"] == ("counter", 3)
    assert found["fastsock_connections_active"] == ("gauge", 0)
    assert found["fastsock_ring_queued_messages"] == ("gauge", 50)
    assert found["fastsock_ring_got_messages_total"] == ("counter", 250)
    assert found["fastsock_receive_paused_seconds_total"][0] == "counter"


def test_a_datagram_server_and_snapshots():
    ring = fastsock.RingQueue()
    server = fastsock.UDPServer((LOCALHOST, 0), fastsock.receiver(ring))
    with serving(server), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        for number in range(20):
            client.sendto(b"datagram %d" % number, server.server_address)
        for _ in range(20):
            ring.get(timeout=NETWORK_TIMEOUT)
        # The loop counts a batch just after it publishes it.
        deadline = time.monotonic() + NETWORK_TIMEOUT
        while server.stats().datagrams_received < 20:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        stats, ring_stats = server.stats(), ring.stats
    assert isinstance(stats, fastsock.DatagramStats)
    # Snapshots are taken as they are: the values are those of that instant.
    found = parse(metrics.prometheus_text(stats, ring_stats))
    assert found == expected(metrics.DATAGRAM_METRICS, stats) | expected(
        metrics.RING_METRICS, ring_stats
    )
    assert found["fastsock_received_datagrams_total"] == ("counter", 20)
    assert "fastsock_connections_opened_total" not in found
    assert metrics.prometheus_text() == ""


def test_the_collector_in_prometheus_clients_registry():
    ring = fastsock.RingQueue()
    for number in range(7):
        ring.put(b"x" * number)
    registry = CollectorRegistry()
    registry.register(metrics.Collector(fastsock.ReceiveStats.zero(), ring))
    found = parse(generate_latest(registry).decode())
    assert found == parse(metrics.prometheus_text(fastsock.ReceiveStats.zero(), ring))
    assert found["fastsock_ring_queued_bytes"] == ("gauge", 21)
    assert found["fastsock_ring_put_messages_total"] == ("counter", 7)


@pytest.fixture
def exporter():
    started = []

    def start(*arguments, **options):
        started.append(metrics.MetricsHTTPServer((LOCALHOST, 0), *arguments, **options))
        started[-1].start()
        return started[-1]

    yield start
    for server in started:
        server.close()


def test_the_http_server_answers_get_metrics_only(exporter):
    ring = fastsock.RingQueue()
    ring.put(b"queued")
    server = exporter(fastsock.ReceiveStats.zero(), ring)
    assert server.url == f"http://{LOCALHOST}:{server.server_address[1]}/metrics"
    found = parse(scrape(server.url))
    assert found["fastsock_ring_queued_messages"] == ("gauge", 1)
    for path in ("/", "/metrics/x", "/favicon.ico"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            scrape(server.url.replace("/metrics", path))
        assert refused.value.code == 404
        refused.value.close()
    request = urllib.request.Request(server.url, data=b"x", method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=NETWORK_TIMEOUT)
    assert refused.value.code == 501
    refused.value.close()


def test_a_silent_or_oversized_scrape_is_bounded_and_holds_up_no_other(exporter):
    server = exporter(fastsock.ReceiveStats.zero(), request_timeout=0.5, max_request_bytes=512)
    address = server.server_address
    with socket.create_connection(address, NETWORK_TIMEOUT) as silent:
        # A scraper that sends nothing: another scrape is answered meanwhile...
        assert "fastsock_received_bytes_total" in parse(scrape(server.url))
        # ...and the silent one is closed once its time is up.
        started = time.monotonic()
        silent.settimeout(NETWORK_TIMEOUT)
        assert silent.recv(1024) == b""
        assert time.monotonic() - started < 0.5 + 2
    with socket.create_connection(address, NETWORK_TIMEOUT) as oversized:
        oversized.settimeout(NETWORK_TIMEOUT)
        header = b"X-Filler: " + b"a" * 1000 + b"\r\n"
        try:
            oversized.sendall(b"GET /metrics HTTP/1.1\r\n" + header)
        except ConnectionResetError:
            pass
        answer = b""
        while chunk := oversized.recv(4096):
            answer += chunk
        assert answer.startswith(b"HTTP/1.0 431"), answer[:100]


def test_silent_connections_hold_no_scrape_slot_and_a_scrape_is_answered(exporter):
    server = exporter(fastsock.ReceiveStats.zero(), request_timeout=NETWORK_TIMEOUT)
    threads_before = threading.active_count()
    silent = []
    try:
        # As many silent connections as there are scrape slots: before, each took a slot
        # (and a thread) at accept for request_timeout, and the scrape was closed unanswered.
        for _ in range(server.max_scrapes):
            silent.append(socket.create_connection(server.server_address, NETWORK_TIMEOUT))
        found = parse(scrape(server.url))
        assert found["fastsock_received_bytes_total"] == ("counter", 0)
        assert found["fastsock_metrics_scrapes_refused_total"] == ("counter", 0)
        # They wait without a thread: the waiting room's is the one more.
        wait_until(
            lambda: threading.active_count() == threads_before + 1,
            NETWORK_TIMEOUT,
            what="only the waiting room's thread",
        )
        for sock in silent:
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(1)  # still open
    finally:
        for sock in silent:
            sock.close()


def test_past_max_waiting_the_longest_silent_connection_is_closed_and_counted(exporter):
    server = exporter(fastsock.ReceiveStats.zero(), request_timeout=60.0, max_waiting=4)
    threads_before = threading.active_count()
    silent = []
    try:
        for _ in range(4):
            silent.append(socket.create_connection(server.server_address, NETWORK_TIMEOUT))
        # Each newcomer closes the one that has waited longest, unanswered and counted (one
        # at a time, so that the listening socket's backlog holds none back).
        for refused in range(1, 11):
            silent.append(socket.create_connection(server.server_address, NETWORK_TIMEOUT))
            oldest = silent[refused - 1]
            oldest.settimeout(NETWORK_TIMEOUT)
            assert oldest.recv(1024) == b""
            assert server.scrapes_refused == refused
        assert threading.active_count() == threads_before + 1
        # A scrape, its request whole at once, closes one more silent connection and is
        # answered: the count is read after it was seated.
        found = parse(scrape(server.url))
        assert found["fastsock_metrics_scrapes_refused_total"] == ("counter", 11)
    finally:
        for sock in silent:
            sock.close()


class _HeldStats:
    """A server whose stats() waits until released: its scrape holds its slot meanwhile."""

    def __init__(self):
        self.entered = threading.Event()
        self.released = threading.Event()

    def stats(self):
        self.entered.set()
        self.released.wait(NETWORK_TIMEOUT)
        return fastsock.ReceiveStats.zero()


def _scrape_in_thread(url):
    answers = []
    thread = threading.Thread(target=lambda: answers.append(parse(scrape(url))))
    thread.start()
    return thread, answers


def _request_waits_for_a_slot(server):
    return any(visitor.arrived for visitor in list(server._waiting_room.visitors.values()))


def test_a_request_that_finds_every_slot_taken_waits_for_one(exporter):
    held = _HeldStats()
    server = exporter(held, request_timeout=NETWORK_TIMEOUT, max_scrapes=1)
    first, first_answers = _scrape_in_thread(server.url)
    held.entered.wait(NETWORK_TIMEOUT)
    second, second_answers = _scrape_in_thread(server.url)
    wait_until(lambda: _request_waits_for_a_slot(server), what="the second request waiting")
    held.released.set()
    first.join(NETWORK_TIMEOUT)
    second.join(NETWORK_TIMEOUT)
    assert len(first_answers) == len(second_answers) == 1
    assert second_answers[0]["fastsock_metrics_scrapes_refused_total"] == ("counter", 0)


def test_a_request_given_no_slot_within_request_timeout_is_refused_and_counted(exporter):
    held = _HeldStats()
    server = exporter(held, request_timeout=0.5, max_scrapes=1)
    first, first_answers = _scrape_in_thread(server.url)
    held.entered.wait(NETWORK_TIMEOUT)
    with socket.create_connection(server.server_address, NETWORK_TIMEOUT) as waiting:
        waiting.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        waiting.settimeout(NETWORK_TIMEOUT)
        assert waiting.recv(1024) == b"", "closed unanswered once its request_timeout is up"
    assert server.scrapes_refused == 1
    held.released.set()
    first.join(NETWORK_TIMEOUT)
    assert first_answers[0]["fastsock_metrics_scrapes_refused_total"] == ("counter", 1)


def test_a_scrape_answers_while_the_ring_is_full(exporter):
    ring = fastsock.RingQueue(max_messages=16)
    server = fastsock.ThreadingTCPServer((LOCALHOST, 0), fastsock.receiver(ring, framing="lines"))
    with serving(server), socket.create_connection(server.server_address) as client:
        metrics_server = exporter(server, ring)
        client.sendall(b"".join(b"line %d\n" % n for n in range(1000)))
        deadline = time.monotonic() + NETWORK_TIMEOUT
        while not ring.full() or ring.stats.full_events == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        found = parse(scrape(metrics_server.url, timeout=2))
        assert found["fastsock_ring_queued_messages"] == ("gauge", 16)
        assert found["fastsock_ring_full_events_total"][1] >= 1
        assert found["fastsock_connections_active"] == ("gauge", 1)
        taken = []
        while len(taken) < 1000:
            taken += ring.get_many(timeout=NETWORK_TIMEOUT)
    assert taken == [b"line %d" % n for n in range(1000)]


# -- fastsock serve --metrics ----------------------------------------------------------------


class MetricsServe(PipedServeProcess):
    """``fastsock serve URL --metrics 0 ...``: ``metrics_url`` is where it serves them."""

    def __init__(self, tmp_path, url, *options):
        super().__init__(tmp_path, url, "--metrics", "0", "--stats-interval", "0", *options)
        self.metrics_url = re.search(r"metrics at (\S+)", self.line_matching("metrics at"))[1]


@pytest.fixture
def metrics_serve(tmp_path):
    yield from started_by(MetricsServe, tmp_path)


def wait_for(url, name, value):
    """The metrics once ``name`` has reached ``value``."""
    deadline = time.monotonic() + NETWORK_TIMEOUT
    while True:
        found = parse(scrape(url))
        if found[name][1] >= value:
            return found
        assert time.monotonic() < deadline, found[name]
        time.sleep(0.02)


@pytest.mark.parametrize("mode", ["threaded", "prefork"])
def test_serve_metrics_count_what_was_sent(metrics_serve, mode):
    server = metrics_serve("tcp://127.0.0.1:0", "--mode", mode, "--output", "-")
    assert server.metrics_url.startswith("http://127.0.0.1:")
    lines = [b"line %d" % n for n in range(500)]
    for _ in range(4):
        with socket.create_connection(server.address, NETWORK_TIMEOUT) as client:
            client.sendall(b"".join(line + b"\n" for line in lines))
    found = wait_for(server.metrics_url, "fastsock_ring_got_messages_total", 2000)
    found = wait_for(server.metrics_url, "fastsock_connections_closed_total", 4)
    status, out = server.stop()
    err = "".join(server.stderr)
    assert status == 0, err
    assert out == b"".join(line + b"\n" for line in lines) * 4
    received = 4 * sum(len(line) + 1 for line in lines)
    assert found["fastsock_received_messages_total"] == ("counter", 2000)
    assert found["fastsock_received_bytes_total"] == ("counter", received)
    assert found["fastsock_connections_opened_total"] == ("counter", 4)
    assert found["fastsock_connections_active"] == ("gauge", 0)
    assert found["fastsock_ring_put_messages_total"] == ("counter", 2000)
    assert found["fastsock_ring_queued_messages"] == ("gauge", 0)
    assert found["fastsock_dropped_messages_total"] == ("counter", 0)
    # The same counters as the final line on stderr.
    assert "received 2,000 messages, written 2,000 | connections 0 open, 4 opened" in err


def test_serve_metrics_of_a_datagram_server(metrics_serve):
    server = metrics_serve("udp://127.0.0.1:0", "--output", "-")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        for number in range(50):
            client.sendto(b"datagram %d" % number, server.address)
    found = wait_for(server.metrics_url, "fastsock_received_datagrams_total", 50)
    assert found["fastsock_received_datagrams_total"] == ("counter", 50)
    assert found["fastsock_truncated_datagrams_total"] == ("counter", 0)
    assert "fastsock_connections_active" not in found
    status, out = server.stop()
    err = "".join(server.stderr)
    assert status == 0, err
    assert len(out.splitlines()) == 50


def test_serve_metrics_answer_while_the_writer_is_stalled(metrics_serve):
    # Nobody reads stdout: the writer blocks in write() once the pipe is full, the ring fills
    # and the receive loop waits for room; scrapes are still answered, and show it.
    server = metrics_serve("tcp://127.0.0.1:0", "--output", "-")
    client = socket.create_connection(server.address, NETWORK_TIMEOUT)
    lines = [b"%0100d" % n for n in range(200_000)]

    def send():
        try:
            client.sendall(b"".join(line + b"\n" for line in lines))
        except OSError:  # reset by the stop below
            pass

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        found = wait_for(server.metrics_url, "fastsock_receive_pauses_total", 1)
        for _ in range(5):
            started = time.monotonic()
            found = parse(scrape(server.metrics_url, timeout=2))
            assert time.monotonic() - started < 1
        assert found["fastsock_ring_queued_messages"][1] > 0
        assert found["fastsock_ring_full_events_total"][1] > 0
        assert found["fastsock_connections_active"] == ("gauge", 1)
        # stop() reads stdout: the writer goes on, the server drains and exits.
        status, out = server.stop()
        sender.join(NETWORK_TIMEOUT)
    finally:
        client.close()
        server.kill()
    assert status == 0, server.stderr
    written = out.splitlines()
    assert written == lines[: len(written)], "in order, no gap"
    assert len(written) >= found["fastsock_ring_got_messages_total"][1]


@pytest.mark.parametrize(
    "address, says",
    [
        ("nonsense", "needs a port"),
        ("127.0.0.1", "needs a port"),
        ("127.0.0.1:99999", "bad address"),
        ("127.0.0.1:http", "bad address"),
        ("[::1:9108", "bad address"),
        ("http://127.0.0.1:9108", "is not [HOST:]PORT"),
        ("no-such-host.invalid:9108", "cannot resolve"),
    ],
)
def test_a_bad_metrics_address_is_a_one_line_usage_error(capsys, address, says):
    from fastsock import cli

    assert cli.main(["serve", "tcp://127.0.0.1:0", "--metrics", address]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith("fastsock serve: error: argument --metrics: ")
    assert says in captured.err


def test_a_metrics_port_in_use_is_a_one_line_error(tmp_path):
    with socket.create_server((LOCALHOST, 0)) as taken:
        port = taken.getsockname()[1]
        command, environment = fastsock_command(
            "serve", "tcp://127.0.0.1:0", "--metrics", str(port)
        )
        finished = subprocess.run(
            command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=30
        )
    assert finished.returncode == 1
    assert finished.stderr.count("\n") == 1, finished.stderr
    assert f"cannot serve metrics on 127.0.0.1:{port}" in finished.stderr


@pytest.mark.parametrize(
    ("exported_metrics", "stats_class"),
    [
        (metrics.STREAM_METRICS, fastsock.ReceiveStats),
        (metrics.DATAGRAM_METRICS, fastsock.DatagramStats),
    ],
)
def test_every_counter_of_the_stats_is_exported(exported_metrics, stats_class):
    exported = {metric.field for metric in exported_metrics}
    assert {field.name for field in dataclasses.fields(stats_class)} <= exported
