"""A Kafka sink (``pip install 'fastsock[kafka]'``, confluent-kafka on librdkafka): acks=all
and idempotence, and a batch confirmed only once librdkafka holds none of its messages and
has reported none failed (it reports failures only).

When the broker is slow or away, ``write`` reports it unavailable after its timeout but leaves
the batch's messages with librdkafka, which keeps retrying them itself, with no deadline of its
own (``message.timeout.ms`` 0); the pipeline's retry of the same batch then waits for the
messages still pending and produces again only those reported failed.

A message reaches the topic twice only when librdkafka sent it, the reply was lost (the
connection broke, the request timed out) and then either the broker does not recognise the
retry (idempotence off on the broker's side; librdkafka's mock cluster checks sequence numbers
for transactional producers only), or the message failed locally after being sent: a
``message.timeout.ms`` given in the URL ran out, librdkafka reports ``_MSG_TIMED_OUT``, and the
sink produces it again as a new message.
"""

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
"""Seconds of each wait for room in librdkafka's full queue, so a write's own deadline is
kept."""

# What the sink's guarantees rest on: the configuration cannot weaken them.  Reports of
# failures only: a message leaves librdkafka's count (len(producer)) when the broker acks it
# or when its failure is reported, so that count reaching 0 with no failure reported
# confirms the batch, without a Python call per message.
_FIXED_CONFIG = {"acks": "all", "enable.idempotence": True, "delivery.report.only.error": True}
# produce()'s arguments after the key, given by position because parsing its keywords costs
# more per message than librdkafka's own work: the partition (any: the key's), the
# delivery callback, its alias on_delivery (None), the timestamp (0: now), the headers.
_ANY_PARTITION = -1
_NOW = 0
# The source before a batch's first message: unequal to any, so that one looks its own up.
_NO_SOURCE = object()
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


class KafkaSink:
    """Produces each message to a Kafka topic, keyed by its connection id (a datagram: by its
    sender's address), so a connection's messages share a partition and keep their order; with
    headers ``fastsock-connection``
    (its connection id, in decimal; absent for datagrams) and ``fastsock-peer``.  ``write``
    returns once librdkafka holds none of the batch's messages and reported none failed: with
    acks=all, every in-sync replica of each message's partition has it."""

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
        self._unconfirmed: list[Message] | None = None
        # The failures librdkafka reported, as (error, message), in report order (a
        # partition's in produce order): what the retry of the batch produces again.  One
        # list for the sink's life: the callbacks of the batch's sources hold it.
        self._failed: list[tuple] = []

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
        if self._unconfirmed is None or self._unconfirmed != messages:
            self._unconfirmed = list(messages)
            outgoing = messages
        else:
            outgoing = [message for _, message in self._failed]
        self._failed.clear()
        deadline = time.monotonic() + self._write_timeout
        self._produce(outgoing, deadline)
        # flush(), unlike poll(), sends what linger.ms still holds at once: the batch is all
        # produced, so waiting out the linger would only delay its acks.
        unconfirmed = self._producer.flush(max(0.0, deadline - time.monotonic()))
        if unconfirmed:
            raise SinkUnavailable(
                f"kafka {self.bootstrap_servers} {self.topic}: {unconfirmed} of "
                f"{len(messages)} messages not confirmed within {self._write_timeout} s"
            )
        if self._failed:
            errors = [error for error, _ in self._failed]
            fatal = [error for error in errors if not _retryable(error)]
            if fatal:
                self._unconfirmed = None
                self._failed.clear()
                raise KafkaDeliveryError(
                    f"kafka {self.bootstrap_servers} {self.topic}: {fatal[0]} "
                    f"({len(fatal)} of {len(messages)} messages)"
                )
            raise SinkUnavailable(
                f"kafka {self.bootstrap_servers} {self.topic}: {errors[0]} "
                f"({len(errors)} of {len(messages)} messages)"
            )
        self._unconfirmed = None

    def _produce(self, outgoing: list[Message], deadline: float) -> None:
        """Hands librdkafka each message of outgoing with its source's key, headers and
        report.  This loop runs once a message: a source is looked up only where it changes
        (the ring holds a connection's lines in runs), and nothing is made per message."""
        produce = self._producer.produce
        topic = self.topic
        sources = {}
        source_id = source_peer = _NO_SOURCE
        outgoing = iter(outgoing)
        for connection_id, peer, payload in outgoing:
            if connection_id != source_id or peer != source_peer:
                source_id, source_peer = connection_id, peer
                produced_as = sources.get((connection_id, peer))
                if produced_as is None:
                    source = _Source(connection_id, peer, self._failed)
                    produced_as = (source.key, source.headers, source.report)
                    sources[connection_id, peer] = produced_as
                key, headers, report = produced_as
            try:
                produce(topic, payload, key, _ANY_PARTITION, report, None, _NOW, headers)
            except BufferError:
                if not self._produce_when_room(payload, key, headers, report, deadline):
                    # Refused as one, this message and all after it: a connection's order
                    # holds on the retry.
                    error = _KafkaError(_KafkaError._QUEUE_FULL)
                    self._failed.append((error, Message(connection_id, peer, payload)))
                    self._failed.extend((error, message) for message in outgoing)
                    return

    def _produce_when_room(self, payload, key, headers, report, deadline: float) -> bool:
        """librdkafka's queue is full: serves its reports to make room until the message is
        taken (True) or the deadline passes (False)."""
        while time.monotonic() < deadline:
            self._producer.poll(POLL_SLICE)
            try:
                self._producer.produce(
                    self.topic, payload, key, _ANY_PARTITION, report, None, _NOW, headers
                )
                return True
            except BufferError:
                pass
        return False

    def flush(self, timeout: float) -> None:
        """Waits up to timeout for librdkafka to deliver what it still holds."""
        self._producer.flush(timeout)

    def close(self) -> None:
        self._producer.flush(0)


class _Source:
    """A source's (a connection's, a datagram sender's) key and headers in one batch, and
    the delivery callback of its messages.  librdkafka reports failures only, and a report
    carries the payload but not the headers: the callback records the failure with the
    message to produce again."""

    __slots__ = ("connection_id", "peer", "key", "headers", "_failed")

    def __init__(self, connection_id: int | None, peer: str | None, failed: list):
        self.connection_id, self.peer = connection_id, peer
        # The key picks the partition, so it must not change within a connection: its id is
        # there for every message, its peer address may be unknown for some.
        headers = [] if peer is None else [(PEER_HEADER, peer)]
        if connection_id is None:
            self.key = peer
        else:
            self.key = str(connection_id)
            headers.insert(0, (CONNECTION_HEADER, self.key))
        self.headers = headers
        self._failed = failed

    def report(self, error, message) -> None:
        self._failed.append((error, Message(self.connection_id, self.peer, message.value())))


def _retryable(error) -> bool:
    return not error.fatal() and (error.retriable() or error.code() in _RETRYABLE_CODES)
