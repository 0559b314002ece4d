"""``fastsock serve --sink`` into real brokers, end to end: several TCP senders, a known set of
numbered lines, everything read back from the Redis stream, the JetStream subject or the
Kafka topic exactly once and in each connection's order.  The broker stopped mid-run and
started again (the redis-server or nats-server process; every broker of Kafka's mock cluster,
through librdkafka's mock API) loses nothing: the counters show the sink's retries and the
receive loops held back (backpressure) while the ring was full, and delivery resumes.
SIGTERM delivers what was received before the process exits."""

import collections
import re
import socket
import time
import urllib.request

import pytest

from fastsock.bench.kafka_mock import KafkaMockCluster
from tests.broker_servers import (
    kafka_topic_messages,
    kafka_topic_size,
    nats_server,
    nats_stream_messages,
    redis_server,
    redis_stream_entries,
)
from tests.support import LOCALHOST, NETWORK_TIMEOUT, start_thread
from tests.test_cli import PipedServeProcess

SENDERS = 8
LINES = 2_000
OUTAGE_LINES = 12_000
"""Lines per sender in the outage tests: 96,000 in all, more than the ring's 65,536 slots, so
the ring fills while the broker is down and the receive loops are held back."""
DELIVERED = "fastsock_pipeline_messages_delivered_total"
RETRIES = "fastsock_pipeline_retries_total"
RING_FULL = "fastsock_ring_full_events_total"
PAUSES = "fastsock_receive_pauses_total"
STATS = re.compile(
    r"received (?P<received>[\d,]+) messages, written (?P<written>[\d,]+) .*"
    r"backpressure (?P<backpressure>[\d.]+) s \| sink (?P<batches>[\d,]+) batches, "
    r"(?P<retries>[\d,]+) retries, (?P<errors>[\d,]+) errors, (?P<undelivered>[\d,]+) undelivered"
)


def counters(line):
    match = STATS.search(line)
    assert match, line
    return {name: float(value.replace(",", "")) for name, value in match.groupdict().items()}


class SinkServe(PipedServeProcess):
    """``fastsock serve tcp://127.0.0.1:0 --framing lines --sink URL --metrics 0``.  Its
    counters are read from its metrics endpoint, which a thread of its own serves, so they
    are read while the pipeline waits for a broker that is down."""

    def __init__(self, tmp_path, sink_url):
        options = ("--framing", "lines", "--sink", sink_url, "--metrics", "0")
        super().__init__(tmp_path, "tcp://127.0.0.1:0", *options)
        self.metrics_url = self.line_matching("metrics at").split()[-1]

    def metrics(self):
        with urllib.request.urlopen(self.metrics_url, timeout=NETWORK_TIMEOUT) as answer:
            text = answer.read().decode()
        return {
            name: float(value)
            for name, value in (line.split() for line in text.splitlines() if line[:1] != "#")
        }

    def metrics_when(self, condition):
        """The first metrics that satisfy condition, polled for up to 4 NETWORK_TIMEOUTs."""
        deadline = time.monotonic() + 4 * NETWORK_TIMEOUT
        while not condition(metrics := self.metrics()):
            assert time.monotonic() < deadline, metrics
            time.sleep(0.05)
        return metrics

    def stop_and_count(self):
        """SIGTERM: the final counters, after checking the exit was clean."""
        status, _ = self.stop()
        assert status == 0, "".join(self.stderr)
        assert "Traceback" not in "".join(self.stderr)
        assert "stopped by SIGTERM" in self.stderr[-1], self.stderr[-1]
        return counters(self.stderr[-1])


def numbered_lines(sender, first, count):
    return [b"sender %d line %06d" % (sender, index) for index in range(first, first + count)]


def send_numbered(clients, first, count):
    """Lines first..first+count-1 on every client, each naming its client; returns them, a
    list per client."""
    sent = []
    for number, client in enumerate(clients):
        sent.append(numbered_lines(number, first, count))
        client.sendall(b"".join(line + b"\n" for line in sent[-1]))
    return sent


def connect_senders(server):
    return [socket.create_connection(server.address, NETWORK_TIMEOUT) for _ in range(SENDERS)]


def check_exactly_once_in_order(records, sent):
    """records, (connection id, payload) in the order the broker holds them: each
    connection's payloads are exactly one sender's lines, in order."""
    received = collections.defaultdict(list)
    for connection, payload in records:
        received[connection].append(payload)
    assert sorted(received.values()) == sorted(sent)


def send_through(server, total_lines):
    """SENDERS connections each sending total_lines lines and closing, then SIGTERM straight
    away: what the connections handed over must all be delivered before the exit."""
    clients = connect_senders(server)
    try:
        sent = send_numbered(clients, 0, total_lines)
    finally:
        for client in clients:
            client.close()
    final = server.stop_and_count()
    total = SENDERS * total_lines
    assert (final["received"], final["written"], final["undelivered"]) == (total, total, 0)
    return sent


def redis_records(port):
    return [
        (entry[b"connection"], entry[b"payload"]) for entry in redis_stream_entries(port, "ingest")
    ]


def kafka_messages(bootstrap_servers, count):
    """The topic's messages, after checking that it holds count, no more (a duplicate) and
    no fewer."""
    assert kafka_topic_size(bootstrap_servers, "ingest") == count
    return kafka_topic_messages(bootstrap_servers, "ingest", count)


def kafka_records(messages):
    return [(headers["fastsock-connection"], value) for _, _, headers, value in messages]


def nats_records(port):
    return [
        (headers["Fastsock-Connection"], payload)
        for payload, headers in nats_stream_messages(port, "INGEST", "ingest.lines")
    ]


@pytest.fixture
def sink_serve(tmp_path):
    started = []

    def start(sink_url):
        started.append(SinkServe(tmp_path, sink_url))
        return started[-1]

    yield start
    for server in started:
        server.kill()


def test_serve_into_redis_delivers_every_line_once_in_order(tmp_path, sink_serve):
    with redis_server(tmp_path) as broker:
        server = sink_serve(f"redis://{LOCALHOST}:{broker.port}/ingest")
        sent = send_through(server, LINES)
        check_exactly_once_in_order(redis_records(broker.port), sent)


def test_serve_into_nats_delivers_every_line_once_in_order(tmp_path, sink_serve):
    with nats_server(tmp_path, "INGEST", ["ingest.>"]) as broker:
        server = sink_serve(f"nats://{LOCALHOST}:{broker.port}/ingest.lines")
        sent = send_through(server, LINES)
        check_exactly_once_in_order(nats_records(broker.port), sent)


def test_serve_into_kafka_delivers_every_line_once_in_order(tmp_path, sink_serve):
    with KafkaMockCluster() as broker:
        server = sink_serve(f"kafka://{broker.bootstrap_servers}/ingest?log_level=3")
        sent = send_through(server, LINES)
        messages = kafka_messages(broker.bootstrap_servers, SENDERS * LINES)
    check_exactly_once_in_order(kafka_records(messages), sent)
    # Keyed by connection: a connection's messages share a partition.
    partitions = collections.defaultdict(set)
    for partition, key, headers, _ in messages:
        assert key == headers["fastsock-connection"]
        partitions[key].add(partition)
    assert {len(used) for used in partitions.values()} == {1}


def outage(server, broker):
    """A first round delivered, the broker stopped, the rest sent while it is down (the ring
    fills, the senders are held back), the broker started again, then SIGTERM."""
    clients = connect_senders(server)
    try:
        send_numbered(clients, 0, 100)
        server.metrics_when(lambda now: now[DELIVERED] == SENDERS * 100)
        broker.stop()
        rest = start_thread(send_numbered, clients, 100, OUTAGE_LINES - 100)
        # The sink refuses, the ring fills, the receive loops stop reading.
        down = server.metrics_when(
            lambda now: now[RETRIES] > 0 and now[RING_FULL] > 0 and now[PAUSES] > 0
        )
        assert down[DELIVERED] < SENDERS * OUTAGE_LINES
        broker.start()
        rest.join(4 * NETWORK_TIMEOUT)
        assert not rest.is_alive()
    finally:
        for client in clients:
            client.close()
    server.metrics_when(lambda now: now[DELIVERED] == SENDERS * OUTAGE_LINES)
    final = server.stop_and_count()
    assert final["undelivered"] == 0
    assert final["retries"] >= down[RETRIES]
    assert final["backpressure"] > 0


@pytest.mark.slow
@pytest.mark.watchdog(180)
def test_redis_stopped_mid_run_loses_nothing_and_delivery_resumes(tmp_path, sink_serve):
    with redis_server(tmp_path) as broker:
        server = sink_serve(f"redis://{LOCALHOST}:{broker.port}/ingest?connect_timeout=1")
        outage(server, broker)
        records = redis_records(broker.port)
    check_exactly_once_in_order(records, expected_after_outage())


@pytest.mark.slow
@pytest.mark.watchdog(180)
def test_nats_stopped_mid_run_loses_nothing_and_delivery_resumes(tmp_path, sink_serve):
    with nats_server(tmp_path, "INGEST", ["ingest.>"]) as broker:
        server = sink_serve(
            f"nats://{LOCALHOST}:{broker.port}/ingest.lines?connect_timeout=1&write_timeout=1"
        )
        outage(server, broker)
        records = nats_records(broker.port)
    check_exactly_once_in_order(records, expected_after_outage())


@pytest.mark.slow
@pytest.mark.watchdog(180)
def test_kafka_stopped_mid_run_loses_nothing_and_delivery_resumes(tmp_path, sink_serve):
    with KafkaMockCluster() as broker:
        server = sink_serve(
            f"kafka://{broker.bootstrap_servers}/ingest?log_level=0&write_timeout=1"
        )
        outage(server, broker)
        messages = kafka_messages(broker.bootstrap_servers, SENDERS * OUTAGE_LINES)
    check_exactly_once_in_order(kafka_records(messages), expected_after_outage())


def expected_after_outage():
    return [numbered_lines(sender, 0, OUTAGE_LINES) for sender in range(SENDERS)]


def test_messages_delivered_during_the_stop_keep_their_peer(tmp_path, sink_serve):
    with redis_server(tmp_path) as broker:
        server = sink_serve(f"redis://{LOCALHOST}:{broker.port}/ingest")
        send_through(server, LINES)
        entries = redis_stream_entries(broker.port, "ingest")
    assert all(b"peer" in entry for entry in entries)
