"""Real brokers for the sink tests, started on free loopback ports and stopped by the tests:
Debian's redis-server (AOF with ``appendfsync always``, so a restart keeps every entry it
acknowledged) and nats-server (JetStream on, its store in a temporary directory), both
installed by ``.ci/run``; and Kafka as librdkafka's mock cluster
(``fastsock.bench.kafka_mock``), which listens on a real loopback port, so the sink under
test and the reader are ordinary clients of it."""

import asyncio
import contextlib
import shutil
import socket
import subprocess
import time

from tests.support import LOCALHOST, NETWORK_TIMEOUT, free_port, require_program

REDIS_SERVER = shutil.which("redis-server") or shutil.which("redis-server", path="/usr/sbin")
NATS_SERVER = shutil.which("nats-server") or shutil.which("nats-server", path="/usr/sbin")


class BrokerProcess:
    """A broker process that can be stopped and started again on the same port and data
    directory, as an outage and a recovery."""

    def __init__(self, name, command, port, directory):
        self.name = name
        self.command = command
        self.port = port
        self.directory = directory
        self.process = None
        self._log_path = directory / f"{name}.log"

    def start(self):
        with open(self._log_path, "ab") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=log)
        deadline = time.monotonic() + NETWORK_TIMEOUT
        while not self._answers():
            assert self.process.poll() is None, self.log()
            assert time.monotonic() < deadline, f"{self.name} did not start: {self.log()}"
            time.sleep(0.05)

    def _answers(self):
        try:
            with socket.create_connection((LOCALHOST, self.port), timeout=1):
                return True
        except OSError:
            return False

    def stop(self):
        """SIGTERM, as a service manager stops it, and wait for the exit."""
        if self.process is not None:
            self.process.terminate()
            self.process.wait(NETWORK_TIMEOUT)
            self.process = None

    def log(self):
        return self._log_path.read_text(errors="replace")


@contextlib.contextmanager
def redis_server(directory):
    binary = require_program(REDIS_SERVER, "redis-server", "redis-server", "the Redis sink tests")
    port = free_port()
    broker = BrokerProcess(
        "redis-server",
        [binary, "--port", str(port), "--bind", LOCALHOST, "--dir", str(directory),
         "--appendonly", "yes", "--appendfsync", "always", "--save", "",
         "--daemonize", "no", "--logfile", ""],
        port,
        directory,
    )  # fmt: skip
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@contextlib.contextmanager
def nats_server(directory, stream, subjects):
    """nats-server with JetStream, and a file stream named stream taking subjects."""
    binary = require_program(NATS_SERVER, "nats-server", "nats-server", "the NATS sink tests")
    port = free_port()
    broker = BrokerProcess(
        "nats-server",
        [binary, "-a", LOCALHOST, "-p", str(port), "-js", "-sd", str(directory / "jetstream")],
        port,
        directory,
    )
    broker.start()
    try:
        add_nats_stream(port, stream, subjects)
        yield broker
    finally:
        broker.stop()


def add_nats_stream(port, stream, subjects, **config):
    """A file stream named stream taking subjects, with config (nats-py's StreamConfig
    fields: max_msg_size, ...)."""
    import nats

    async def add():
        connection = await nats.connect(f"nats://{LOCALHOST}:{port}")
        try:
            await connection.jetstream().add_stream(name=stream, subjects=subjects, **config)
        finally:
            await connection.close()

    asyncio.run(add())


def nats_stream_messages(port, stream, subject):
    """Every message in the stream (payload, headers), in stream order."""
    return asyncio.run(_read_stream(port, stream, subject))


async def _read_stream(port, stream, subject):
    import nats

    connection = await nats.connect(f"nats://{LOCALHOST}:{port}")
    try:
        jetstream = connection.jetstream()
        total = (await jetstream.stream_info(stream)).state.messages
        subscription = await jetstream.pull_subscribe(subject, stream=stream)
        messages = []
        while len(messages) < total:
            for message in await subscription.fetch(min(1000, total - len(messages)), timeout=5):
                await message.ack()
                messages.append((message.data, message.headers or {}))
        return messages
    finally:
        await connection.close()


def redis_stream_entries(port, stream):
    """Every entry of the stream (its fields, bytes to bytes), in stream order."""
    import redis

    with redis.Redis(host=LOCALHOST, port=port) as client:
        return [fields for _, fields in client.xrange(stream)]


@contextlib.contextmanager
def kafka_mock_cluster():
    """librdkafka's mock cluster (one broker); yields its bootstrap servers
    ("127.0.0.1:port")."""
    from fastsock.bench.kafka_mock import KafkaMockCluster

    with KafkaMockCluster() as cluster:
        yield cluster.bootstrap_servers


def kafka_topic_messages(bootstrap_servers, topic, count):
    """count messages of the topic as (partition, key, headers, value), each partition's in
    order; fewer if no more arrive within NETWORK_TIMEOUT."""
    import confluent_kafka

    consumer = confluent_kafka.Consumer(
        {
            "bootstrap.servers": bootstrap_servers,
            "group.id": f"reader-{time.monotonic_ns()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "log_level": 3,
        }
    )
    try:
        consumer.subscribe([topic])
        messages = []
        deadline = time.monotonic() + NETWORK_TIMEOUT
        while len(messages) < count and time.monotonic() < deadline:
            for message in consumer.consume(1000, 0.5):
                assert message.error() is None, message.error()
                headers = dict(message.headers() or [])
                messages.append((message.partition(), message.key(), headers, message.value()))
        return messages
    finally:
        consumer.close()


def kafka_topic_size(bootstrap_servers, topic):
    """How many messages the topic holds: the sum of its partitions' high watermarks (the
    sink never deletes, so every partition starts at offset 0)."""
    import confluent_kafka

    consumer = confluent_kafka.Consumer(
        {"bootstrap.servers": bootstrap_servers, "group.id": "sizer", "log_level": 3}
    )
    try:
        partitions = consumer.list_topics(topic, timeout=NETWORK_TIMEOUT).topics[topic].partitions
        return sum(
            consumer.get_watermark_offsets(
                confluent_kafka.TopicPartition(topic, partition), timeout=NETWORK_TIMEOUT
            )[1]
            for partition in partitions
        )
    finally:
        consumer.close()
