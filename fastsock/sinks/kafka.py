"""A Kafka sink (``pip install 'fastsock[kafka]'``, confluent-kafka on librdkafka): acks=all
and idempotence, and a batch confirmed only when every message's delivery report is OK.

When the broker is slow or away, ``write`` reports it unavailable after its timeout but leaves
the batch's messages with librdkafka, which keeps retrying them itself, with no deadline of its
own (``message.timeout.ms`` 0); the pipeline's retry of the same batch then waits for the
reports still missing and produces again only the messages whose report said they failed.

A message reaches the topic twice only when librdkafka sent it, the reply was lost (the
connection broke, the request timed out) and then either the broker does not recognise the
retry (idempotence off on the broker's side; librdkafka's mock cluster checks sequence numbers
for transactional producers only), or the message failed locally after being sent: a
``message.timeout.ms`` given in the URL ran out, librdkafka reports ``_MSG_TIMED_OUT``, and the
sink produces it again as a new message.
"""

import functools
import time

import confluent_kafka

from fastsock import constants
from fastsock.pipeline import Message, SinkUnavailable
from fastsock.sinks import (
    SOURCE_CONNECTION,
    SOURCE_PEER,
    TIMEOUT_OPTIONS,
    parse_sink_url,
    take_options,
)

DEFAULT_PORT = 9092
CONNECTION_HEADER = "fastsock-" + SOURCE_CONNECTION
PEER_HEADER = "fastsock-" + SOURCE_PEER
POLL_SLICE = 0.1
"""Seconds of each wait for delivery reports, so a write's own deadline is kept."""

# What the sink's guarantees rest on: the configuration cannot weaken them.
_FIXED_CONFIG = {"acks": "all", "enable.idempotence": True}
_KafkaError = confluent_kafka.KafkaError
# Failed deliveries that a wait cures, beyond those librdkafka itself calls retriable: a
# message that timed out while the broker was away, brokers down, a full local queue.
_RETRYABLE_CODES = frozenset(
    {
        _KafkaError._MSG_TIMED_OUT,
        _KafkaError._TIMED_OUT,
        _KafkaError._TRANSPORT,
        _KafkaError._ALL_BROKERS_DOWN,
        _KafkaError._QUEUE_FULL,
        _KafkaError.NOT_ENOUGH_REPLICAS,
        _KafkaError.NOT_ENOUGH_REPLICAS_AFTER_APPEND,
    }
)


class KafkaDeliveryError(Exception):
    """A message the broker refused for good (too large, not authorised, an unknown topic,
    or a fatal error of the idempotent producer): retrying cannot deliver it."""


class _Batch:
    """The delivery reports of one batch, filled in by librdkafka's callbacks."""

    def __init__(self, messages: list[Message]):
        self.messages = messages
        self.awaited = len(messages)
        self.failed: list[int] = []
        self.errors: list = []

    def report(self, index: int, error, _message) -> None:
        self.awaited -= 1
        if error is not None:
            self.failed.append(index)
            self.errors.append(error)


class KafkaSink:
    """Produces each message to a Kafka topic, keyed by its connection id (a datagram: by its
    sender's address), so a connection's messages share a partition and keep their order; with
    headers ``fastsock-connection``
    (its connection id, in decimal; absent for datagrams) and ``fastsock-peer``.  ``write``
    returns once every message's delivery report is OK: with acks=all, every in-sync replica
    of its partition has it."""

    def __init__(
        self,
        *,
        topic: str,
        bootstrap_servers: str = f"127.0.0.1:{DEFAULT_PORT}",
        config: dict | None = None,
        connect_timeout: float = constants.SINK_CONNECT_TIMEOUT,
        write_timeout: float = constants.SINK_WRITE_TIMEOUT,
    ):
        config = dict(config or {})
        overridden = sorted(name for name in _FIXED_CONFIG if name in config)
        if overridden:
            raise ValueError(f"the Kafka sink sets {', '.join(overridden)} itself")
        self.topic = topic
        self.bootstrap_servers = bootstrap_servers
        self._write_timeout = write_timeout
        self._producer = confluent_kafka.Producer(
            {
                "bootstrap.servers": bootstrap_servers,
                "socket.connection.setup.timeout.ms": int(connect_timeout * 1000),
                "linger.ms": constants.KAFKA_LINGER_MS,
                "message.timeout.ms": constants.KAFKA_MESSAGE_TIMEOUT_MS,
                **config,
                **_FIXED_CONFIG,
            }
        )
        self._batch: _Batch | None = None

    @classmethod
    def from_url(cls, url: str) -> "KafkaSink":
        """``kafka://broker[:port][,broker[:port]...]/topic[?librdkafka.property=value...]``:
        the options are librdkafka properties (``compression.type=lz4``, ``linger.ms=20``),
        and ``connect_timeout=S``, ``write_timeout=S``."""
        address = parse_sink_url(url, "kafka", DEFAULT_PORT, "topic")
        config = dict(address.options)
        timeouts = take_options(
            url,
            {name: config.pop(name) for name in TIMEOUT_OPTIONS if name in config},
            TIMEOUT_OPTIONS,
        )
        return cls(
            topic=address.name,
            bootstrap_servers=",".join(f"{host}:{port}" for host, port in address.servers),
            config=config,
            **timeouts,
        )

    def write(self, messages: list[Message]) -> None:
        if not messages:
            return
        batch = self._batch
        if batch is None or batch.messages != messages:
            batch = self._batch = _Batch(list(messages))
            pending = range(len(messages))
        else:
            pending, batch.failed, batch.errors = batch.failed, [], []
            batch.awaited += len(pending)
        deadline = time.monotonic() + self._write_timeout
        self._produce(batch, pending, deadline)
        while batch.awaited:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SinkUnavailable(
                    f"kafka {self.bootstrap_servers} {self.topic}: {batch.awaited} of "
                    f"{len(messages)} messages not confirmed within {self._write_timeout} s"
                )
            self._producer.poll(min(remaining, POLL_SLICE))
        if batch.errors:
            fatal = [error for error in batch.errors if not _retryable(error)]
            if fatal:
                self._batch = None
                raise KafkaDeliveryError(
                    f"kafka {self.bootstrap_servers} {self.topic}: {fatal[0]} "
                    f"({len(fatal)} of {len(messages)} messages)"
                )
            raise SinkUnavailable(
                f"kafka {self.bootstrap_servers} {self.topic}: {batch.errors[0]} "
                f"({len(batch.errors)} of {len(messages)} messages)"
            )
        self._batch = None

    def _produce(self, batch: _Batch, indexes, deadline: float) -> None:
        produce = self._producer.produce
        topic = self.topic
        for index in indexes:
            message = batch.messages[index]
            headers = []
            if message.connection_id is not None:
                headers.append((CONNECTION_HEADER, str(message.connection_id)))
            if message.peer is not None:
                headers.append((PEER_HEADER, message.peer))
            # The key picks the partition, so it must not change within a connection: its
            # id is there for every message, its peer address may be unknown for some.
            key = message.peer if message.connection_id is None else str(message.connection_id)
            report = functools.partial(batch.report, index)
            while True:
                try:
                    produce(topic, message.payload, key, on_delivery=report, headers=headers)
                    break
                except BufferError:
                    # librdkafka's queue is full: serve its reports to make room.
                    if time.monotonic() >= deadline:
                        report(_KafkaError(_KafkaError._QUEUE_FULL), None)
                        break
                    self._producer.poll(POLL_SLICE)

    def flush(self, timeout: float) -> None:
        """Waits up to timeout for librdkafka to deliver what it still holds."""
        self._producer.flush(timeout)

    def close(self) -> None:
        self._producer.flush(0)


def _retryable(error) -> bool:
    return not error.fatal() and (error.retriable() or error.code() in _RETRYABLE_CODES)
