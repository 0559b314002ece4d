"""The broker sinks (fastsock.sinks) against real brokers: Debian's redis-server and
nats-server started by the test on loopback, Kafka as librdkafka's mock cluster.  Each sink
writes batches that are read back from the stream, subject or topic with their source fields;
a stopped server makes a write raise SinkUnavailable, and after a restart the pipeline's retry
of the same batch resumes, without losing or duplicating a message.  For Kafka also a broker
down longer than librdkafka's message.timeout.ms, a broker slower than the write timeout, and
the one case where the retry writes a message twice."""

import asyncio

import pytest

from fastsock.bench.kafka_mock import KafkaMockCluster
from fastsock.pipeline import Message, SinkUnavailable, open_sink
from tests.broker_servers import (
    add_nats_stream,
    kafka_mock_cluster,
    kafka_topic_messages,
    kafka_topic_size,
    nats_server,
    nats_stream_messages,
    redis_server,
    redis_stream_entries,
)
from tests.support import LOCALHOST, NETWORK_TIMEOUT, free_port

BATCHES = 5
BATCH_SIZE = 200
SHORT_TIMEOUT = 1.0
"""A sink's connect and write timeouts where the broker is down: the test waits that long."""


def numbered_batch(number, size=BATCH_SIZE):
    """Messages from four connections (ids 1-4) and one datagram sender (no id)."""
    batch = []
    for index in range(size):
        connection = index % 5
        if connection:
            batch.append(
                Message(connection, f"127.0.0.{connection}:5000", b"%d-%d" % (number, index))
            )
        else:
            batch.append(Message(None, "[::1]:6000", b"%d-%d" % (number, index)))
    return batch


def expected_payloads(batches):
    return [message.payload for batch in batches for message in batch]


def write_through(url, batches):
    """Each batch written through the (synchronous) sink open_sink makes of url."""
    sink = open_sink(url)
    for batch in batches:
        sink.write(batch)
    sink.flush(1.0)
    sink.close()


# -- Redis Streams -----------------------------------------------------------------------------

redis_sink = pytest.importorskip("fastsock.sinks.redis")
redis = pytest.importorskip("redis")


def test_redis_batches_are_read_back_in_order_with_their_source(tmp_path):
    batches = [numbered_batch(number) for number in range(BATCHES)]
    with redis_server(tmp_path) as broker:
        write_through(f"redis://{LOCALHOST}:{broker.port}/ingest", batches)
        entries = redis_stream_entries(broker.port, "ingest")
    assert [entry[b"payload"] for entry in entries] == expected_payloads(batches)
    sent = [message for batch in batches for message in batch]
    for entry, message in zip(entries, sent, strict=True):
        assert entry[b"peer"] == message.peer.encode()
        if message.connection_id is None:
            assert b"connection" not in entry
        else:
            assert entry[b"connection"] == b"%d" % message.connection_id


def test_redis_maxlen_trims_the_stream(tmp_path):
    with redis_server(tmp_path) as broker:
        sink = redis_sink.RedisStreamSink.from_url(
            f"redis://{LOCALHOST}:{broker.port}/capped?maxlen=100"
        )
        for number in range(BATCHES):
            sink.write(numbered_batch(number))
        sink.close()
        length = len(redis_stream_entries(broker.port, "capped"))
    # "~": whole nodes of entries are trimmed, so at least maxlen stay, a few more may.
    assert 100 <= length < BATCHES * BATCH_SIZE


def test_redis_down_is_retryable_and_the_retry_resumes_after_a_restart(tmp_path):
    with redis_server(tmp_path) as broker:
        sink = redis_sink.RedisStreamSink(
            stream="ingest",
            port=broker.port,
            connect_timeout=SHORT_TIMEOUT,
            write_timeout=SHORT_TIMEOUT,
        )
        first, second = numbered_batch(0), numbered_batch(1)
        sink.write(first)
        broker.stop()
        with pytest.raises(SinkUnavailable):
            sink.write(second)
        with pytest.raises(SinkUnavailable):
            sink.write(second)
        broker.start()
        sink.write(second)
        sink.close()
        # The AOF (appendfsync always) kept what was acked before the stop.
        entries = redis_stream_entries(broker.port, "ingest")
    assert [entry[b"payload"] for entry in entries] == expected_payloads([first, second])


def test_redis_retry_of_a_batch_committed_unknowingly_adds_nothing(tmp_path):
    """The connection broke after the chunks went out: Redis added them all, but the sink
    read only the first reply, so it raised SinkUnavailable and the pipeline retries the
    same batch."""
    with redis_server(tmp_path) as broker:
        sink = redis_sink.RedisStreamSink(stream="ingest", port=broker.port, chunk_messages=64)
        sink.write(numbered_batch(1))
        pool = sink._client.connection_pool
        connection = pool.get_connection()
        replies = []

        def reply_then_lost_connection(*args, **kwargs):
            if replies:
                del connection.read_response
                raise redis.ConnectionError("connection lost")
            replies.append(type(connection).read_response(connection, *args, **kwargs))
            return replies[-1]

        connection.read_response = reply_then_lost_connection
        pool.release(connection)
        batch = numbered_batch(0)
        with pytest.raises(SinkUnavailable, match="connection lost"):
            sink.write(batch)
        assert replies == [1]
        sink.write(batch)
        sink.write(numbered_batch(2))
        sink.close()
        entries = redis_stream_entries(broker.port, "ingest")
    assert [entry[b"payload"] for entry in entries] == expected_payloads(
        [numbered_batch(1), batch, numbered_batch(2)]
    )


def test_redis_chunk_after_one_not_added_adds_nothing(tmp_path):
    """A batch's chunks go out back to back; one that failed must not leave the next ones
    added, or the retry (which skips what the marker says was added) would lose it."""
    with redis_server(tmp_path) as broker:
        sink = redis_sink.RedisStreamSink(stream="ingest", port=broker.port, chunk_messages=64)
        sink.write(numbered_batch(1))
        client = redis.Redis(port=broker.port)
        # The chunk numbered after the next one, chained to a predecessor never sent.
        sink._first_chunk = sink._next_chunk + 1
        command = sink._chunk_command(0, True, numbered_batch(2)[:64])
        connection = client.connection_pool.get_connection()
        connection.send_packed_command([command])
        with pytest.raises(redis.ResponseError, match="FASTSOCKGAP"):
            connection.read_response()
        client.close()
        sink.write(numbered_batch(3))
        sink.close()
        entries = redis_stream_entries(broker.port, "ingest")
    assert [entry[b"payload"] for entry in entries] == expected_payloads(
        [numbered_batch(1), numbered_batch(3)]
    )


def test_redis_refusal_for_now_is_retryable_and_the_retry_adds_the_batch_once(tmp_path):
    """Out of memory (maxmemory reached): the write is retryable; once Redis has room, the
    same batch is added once, its chunks in order."""
    with redis_server(tmp_path) as broker:
        sink = redis_sink.RedisStreamSink(stream="ingest", port=broker.port, chunk_messages=64)
        sink.write(numbered_batch(1))
        admin = redis.Redis(port=broker.port)
        admin.config_set("maxmemory", 1)
        with pytest.raises(SinkUnavailable, match="maxmemory"):
            sink.write(numbered_batch(2))
        admin.config_set("maxmemory", 0)
        sink.write(numbered_batch(2))
        sink.close()
        admin.close()
        entries = redis_stream_entries(broker.port, "ingest")
    assert [entry[b"payload"] for entry in entries] == expected_payloads(
        [numbered_batch(1), numbered_batch(2)]
    )


@pytest.mark.parametrize(
    "url, complaint",
    [
        ("redis://127.0.0.1:6379/", "no stream"),
        ("redis://127.0.0.1:6379/s?maxlen=x", "maxlen"),
        ("redis://127.0.0.1:6379/s?maxlen=0", "at least 1"),
        ("redis://127.0.0.1:6379/s?colour=red", "unknown option"),
        ("redis://127.0.0.1:99999/s", "bad port"),
        ("redis://a:1,b:2/s", "one server"),
    ],
)
def test_redis_bad_urls_are_refused_clearly(url, complaint):
    with pytest.raises(ValueError, match=complaint):
        redis_sink.RedisStreamSink.from_url(url)


# -- NATS JetStream ----------------------------------------------------------------------------

nats_sink = pytest.importorskip("fastsock.sinks.nats")


def nats_sink_for(broker, **options):
    return nats_sink.NatsJetStreamSink(
        subject="ingest.lines", servers=(f"nats://{LOCALHOST}:{broker.port}",), **options
    )


def stored_payloads(broker):
    return [payload for payload, _ in nats_stream_messages(broker.port, "INGEST", "ingest.lines")]


def test_nats_batches_are_read_back_in_order_with_their_source(tmp_path):
    batches = [numbered_batch(number) for number in range(BATCHES)]
    with nats_server(tmp_path, "INGEST", ["ingest.>"]) as broker:

        async def write_all():
            sink = open_sink(f"nats://{LOCALHOST}:{broker.port}/ingest.lines")
            assert isinstance(sink, nats_sink.NatsJetStreamSink)
            for batch in batches:
                await sink.write(batch)
            await sink.flush(1.0)
            await sink.close()

        asyncio.run(write_all())
        messages = nats_stream_messages(broker.port, "INGEST", "ingest.lines")
    assert [payload for payload, _ in messages] == expected_payloads(batches)
    sent = [message for batch in batches for message in batch]
    for (_, headers), message in zip(messages, sent, strict=True):
        assert headers[nats_sink.PEER_HEADER] == message.peer
        if message.connection_id is None:
            assert nats_sink.CONNECTION_HEADER not in headers
        else:
            assert headers[nats_sink.CONNECTION_HEADER] == str(message.connection_id)
    assert len({headers[nats_sink.MESSAGE_ID_HEADER] for _, headers in messages}) == len(sent)


def test_nats_retried_batch_is_stored_once(tmp_path):
    """A retry republishes the batch with the same message ids: JetStream drops the copies of
    those it had acked before the failure."""
    with nats_server(tmp_path, "INGEST", ["ingest.>"]) as broker:

        async def write_twice():
            sink = nats_sink_for(broker)
            batch = numbered_batch(0)
            await sink.write(batch)
            # As if every ack had been lost: the write raised SinkUnavailable after JetStream
            # stored the batch, and the retry publishes it all again.
            sink._unconfirmed = batch
            sink._awaited = set(range(sink._first_sequence, sink._next_sequence))
            await sink.write(batch)
            assert not sink._awaited
            await sink.write(numbered_batch(1))
            await sink.close()

        asyncio.run(write_twice())
        assert stored_payloads(broker) == expected_payloads([numbered_batch(0), numbered_batch(1)])


def test_nats_down_is_retryable_and_the_retry_resumes_after_a_restart(tmp_path):
    with nats_server(tmp_path, "INGEST", ["ingest.>"]) as broker:

        async def outage():
            sink = nats_sink_for(broker, connect_timeout=SHORT_TIMEOUT, write_timeout=SHORT_TIMEOUT)
            first, second = numbered_batch(0), numbered_batch(1)
            await sink.write(first)
            broker.stop()
            with pytest.raises(SinkUnavailable):
                await sink.write(second)
            broker.start()
            for _ in range(20):
                try:
                    await sink.write(second)
                    break
                except SinkUnavailable:
                    await asyncio.sleep(SHORT_TIMEOUT / 2)
            else:
                pytest.fail("the NATS sink did not resume after the restart")
            await sink.close()

        asyncio.run(outage())
        assert stored_payloads(broker) == expected_payloads([numbered_batch(0), numbered_batch(1)])


def test_nats_subject_without_a_stream_is_a_clear_error(tmp_path):
    with nats_server(tmp_path, "INGEST", ["ingest.>"]) as broker:
        sink = nats_sink.NatsJetStreamSink(
            subject="elsewhere", servers=(f"nats://{LOCALHOST}:{broker.port}",)
        )
        with pytest.raises(LookupError, match="no JetStream stream takes subject 'elsewhere'"):
            asyncio.run(sink.write(numbered_batch(0)))


def test_nats_a_message_the_stream_refuses_is_a_fatal_error(tmp_path):
    with nats_server(tmp_path, "INGEST", ["ingest.>"]) as broker:
        add_nats_stream(broker.port, "SMALL", ["small"], max_msg_size=256)
        sink = nats_sink.NatsJetStreamSink(
            subject="small", servers=(f"nats://{LOCALHOST}:{broker.port}",)
        )
        batch = [Message(1, "127.0.0.1:5000", b"short"), Message(1, "127.0.0.1:5000", b"x" * 512)]

        async def write():
            try:
                await sink.write(batch)
            finally:
                await sink.close()

        with pytest.raises(nats_sink.JetStreamRefused, match="refused 1 messages"):
            asyncio.run(write())


@pytest.mark.parametrize("subject", ["", "ingest lines", "ingest\r\nPUB x 1"])
def test_nats_subject_that_is_no_subject_is_refused_clearly(subject):
    with pytest.raises(ValueError, match="not a NATS subject"):
        nats_sink.NatsJetStreamSink(subject=subject)


def test_nats_no_server_is_retryable():
    sink = nats_sink.NatsJetStreamSink(
        subject="ingest.lines",
        servers=(f"nats://{LOCALHOST}:{free_port()}",),
        connect_timeout=SHORT_TIMEOUT,
    )
    with pytest.raises(SinkUnavailable):
        asyncio.run(sink.write(numbered_batch(0)))


# -- Kafka -------------------------------------------------------------------------------------

kafka_sink = pytest.importorskip("fastsock.sinks.kafka")


def check_kafka_messages(messages, sent):
    """messages, as read from the topic, are exactly sent: each source's (a connection's, a
    datagram sender's) in one partition in the order sent, with its key and headers."""
    assert sorted(value for *_, value in messages) == sorted(message.payload for message in sent)
    # Keyed by connection (a datagram sender: by peer): one source's messages share a
    # partition, in the order sent.
    for peer in {message.peer for message in sent}:
        mine = [message for message in sent if message.peer == peer]
        key = (peer if mine[0].connection_id is None else str(mine[0].connection_id)).encode()
        received = [(partition, value) for partition, got, _, value in messages if got == key]
        assert len({partition for partition, _ in received}) == 1
        assert [value for _, value in received] == [message.payload for message in mine]
    by_payload = {value: headers for _, _, headers, value in messages}
    for message in sent:
        headers = by_payload[message.payload]
        assert headers[kafka_sink.PEER_HEADER] == message.peer.encode()
        if message.connection_id is None:
            assert kafka_sink.CONNECTION_HEADER not in headers
        else:
            assert headers[kafka_sink.CONNECTION_HEADER] == b"%d" % message.connection_id


def test_kafka_batches_are_read_back_in_per_source_order_with_their_source():
    batches = [numbered_batch(number) for number in range(BATCHES)]
    sent = [message for batch in batches for message in batch]
    with kafka_mock_cluster() as bootstrap:
        write_through(f"kafka://{bootstrap}/ingest", batches)
        messages = kafka_topic_messages(bootstrap, "ingest", len(sent))
    check_kafka_messages(messages, sent)


def test_kafka_no_broker_is_retryable_and_the_messages_stay_queued():
    sink = kafka_sink.KafkaSink(
        topic="ingest",
        bootstrap_servers=f"{LOCALHOST}:{free_port()}",
        config={"log_level": 0},
        write_timeout=SHORT_TIMEOUT,
    )
    batch = numbered_batch(0)
    with pytest.raises(SinkUnavailable, match=f"{BATCH_SIZE} of {BATCH_SIZE} messages"):
        sink.write(batch)
    # The retry waits for the same messages rather than producing them again.
    with pytest.raises(SinkUnavailable, match=f"{BATCH_SIZE} of {BATCH_SIZE} messages"):
        sink.write(batch)
    assert len(sink._producer) == BATCH_SIZE
    sink._producer.purge()


KAFKA_MESSAGE_TIMEOUT_MS = 2000
"""A message.timeout.ms given in the URL: long enough for the first write's connection and
metadata, short enough for the test to outlast it."""
KAFKA_SLOW_REPLIES_MS = 2 * KAFKA_MESSAGE_TIMEOUT_MS


def kafka_sink_for(broker, write_timeout, **config):
    return kafka_sink.KafkaSink(
        topic="ingest",
        bootstrap_servers=broker.bootstrap_servers,
        config={"log_level": 0, **config},
        write_timeout=write_timeout,
    )


def write_until_confirmed(sink, batch):
    for _ in range(20):
        try:
            sink.write(batch)
            return
        except SinkUnavailable:
            pass
    pytest.fail("the Kafka sink did not resume")


def kafka_messages(broker):
    """Every message the topic holds."""
    size = kafka_topic_size(broker.bootstrap_servers, "ingest")
    messages = kafka_topic_messages(broker.bootstrap_servers, "ingest", size)
    assert len(messages) == size
    return messages


def kafka_payloads(broker):
    return sorted(value for *_, value in kafka_messages(broker))


def write_through_an_outage(sink, broker, refusal):
    """A batch written, the broker stopped, the next batch refused twice as refusal says,
    the broker started: both batches end up in the topic exactly once, in order."""
    first, second = numbered_batch(0), numbered_batch(1)
    write_until_confirmed(sink, first)
    broker.stop()
    for _ in range(2):
        with pytest.raises(SinkUnavailable, match=refusal):
            sink.write(second)
    broker.start()
    write_until_confirmed(sink, second)
    sink.close()
    check_kafka_messages(kafka_messages(broker), first + second)


def test_kafka_down_longer_than_message_timeout_is_retryable_and_loses_nothing():
    """Messages that time out in librdkafka before they were ever sent fail the write as
    unavailable; the retry produces them again, once."""
    with KafkaMockCluster() as broker:
        sink = kafka_sink_for(
            broker, NETWORK_TIMEOUT, **{"message.timeout.ms": KAFKA_MESSAGE_TIMEOUT_MS}
        )
        write_through_an_outage(sink, broker, f"timed out.*{BATCH_SIZE} of {BATCH_SIZE}")


def test_kafka_full_local_queue_is_retryable_and_keeps_each_source_in_order():
    """librdkafka's queue takes a quarter of the batch while the broker is down: the rest is
    refused from the first message it has no room for, and produced again by the retries
    in the same order."""
    with KafkaMockCluster() as broker:
        sink = kafka_sink_for(
            broker, SHORT_TIMEOUT, **{"queue.buffering.max.messages": BATCH_SIZE // 4}
        )
        write_through_an_outage(sink, broker, f"{BATCH_SIZE // 4} of {BATCH_SIZE}")


def test_kafka_broker_slower_than_the_write_timeout_gets_each_message_once():
    """The retry of a batch still in flight waits for its reports: nothing produced again."""
    with KafkaMockCluster() as broker:
        sink = kafka_sink_for(broker, SHORT_TIMEOUT)
        first, second = numbered_batch(0), numbered_batch(1)
        write_until_confirmed(sink, first)
        broker.delay_replies(KAFKA_SLOW_REPLIES_MS)
        with pytest.raises(SinkUnavailable, match="not confirmed"):
            sink.write(second)
        write_until_confirmed(sink, second)
        broker.delay_replies(0)
        sink.close()
        assert kafka_payloads(broker) == sorted(expected_payloads([first, second]))


def test_kafka_batch_is_confirmed_without_waiting_out_the_linger():
    """A write sends what linger.ms still holds as soon as the batch is produced: with a
    linger longer than the write timeout, the batch is confirmed all the same."""
    with KafkaMockCluster() as broker:
        sink = kafka_sink_for(
            broker, NETWORK_TIMEOUT, **{"linger.ms": int(2 * NETWORK_TIMEOUT * 1000)}
        )
        batch = numbered_batch(0)
        sink.write(batch)
        sink.close()
        check_kafka_messages(kafka_messages(broker), batch)


def test_kafka_message_timed_out_after_it_was_sent_is_written_twice():
    """The one way the sink itself duplicates: a message.timeout.ms that runs out while the
    broker holds the message and its reply is still on the way; the retry produces the
    message again, as a new one."""
    with KafkaMockCluster() as broker:
        sink = kafka_sink_for(
            broker, NETWORK_TIMEOUT, **{"message.timeout.ms": KAFKA_MESSAGE_TIMEOUT_MS}
        )
        first, second = numbered_batch(0), numbered_batch(1)
        write_until_confirmed(sink, first)
        broker.delay_replies(KAFKA_SLOW_REPLIES_MS)
        with pytest.raises(SinkUnavailable, match="timed out"):
            sink.write(second)
        broker.delay_replies(0)
        write_until_confirmed(sink, second)
        sink.close()
        assert kafka_payloads(broker) == sorted(expected_payloads([first, second, second]))


def test_kafka_settings_its_guarantees_rest_on_cannot_be_overridden():
    with pytest.raises(ValueError, match="acks"):
        kafka_sink.KafkaSink.from_url("kafka://127.0.0.1:9092/ingest?acks=1")
    with pytest.raises(ValueError, match="enable.idempotence"):
        kafka_sink.KafkaSink(topic="t", config={"enable.idempotence": False})
