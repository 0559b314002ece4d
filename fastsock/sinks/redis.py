"""A Redis Streams sink: each batch becomes one MULTI/EXEC transaction of pipelined XADDs
(``pip install 'fastsock[redis]'``, redis-py).

The transaction also records the batch's number in a key of the sink's own, so when a write
fails with its outcome unknown (the connection broke after EXEC went out), the retry reads
that key and does not add the batch twice.
"""

import uuid

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from fastsock import constants
from fastsock.pipeline import Message, SinkUnavailable
from fastsock.sinks import (
    SOURCE_CONNECTION,
    SOURCE_PEER,
    TIMEOUT_OPTIONS,
    parse_sink_url,
    take_options,
)

DEFAULT_PORT = 6379
PAYLOAD_FIELD = b"payload"
_CONNECTION_FIELD = SOURCE_CONNECTION.encode()
_PEER_FIELD = SOURCE_PEER.encode()

# Replies that mean "not now" rather than "never": the server is loading its data, out of
# memory (MAXLEN trimming or a consumer may free it), a replica, or failing to persist.
_RETRYABLE_REPLIES = ("LOADING", "OOM", "READONLY", "MISCONF", "TRYAGAIN", "MASTERDOWN", "BUSY")


class RedisStreamSink:
    """Appends each message to a Redis stream with XADD: field ``payload`` (the bytes),
    ``connection`` (its connection id, in decimal; absent for datagrams) and ``peer`` (its peer
    address, when known).  ``write`` returns once the transaction holding the whole batch has
    been executed (with ``appendfsync always``, also written to the AOF)."""

    def __init__(
        self,
        *,
        stream: str,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        tls: bool = False,
        maxlen: int | None = None,
        connect_timeout: float = constants.SINK_CONNECT_TIMEOUT,
        write_timeout: float = constants.SINK_WRITE_TIMEOUT,
    ):
        if maxlen is not None and maxlen < 1:
            raise ValueError(f"maxlen must be at least 1, not {maxlen}")
        self.stream = stream
        self.maxlen = maxlen
        self.address = f"{host}:{port}"
        # No retries inside redis-py: the pipeline retries the whole batch, with backoff and
        # counters, and a transaction retried blindly could be executed twice.
        self._client = redis.Redis(
            host=host,
            port=port,
            db=db,
            username=username,
            password=password,
            ssl=tls,
            socket_connect_timeout=connect_timeout,
            socket_timeout=write_timeout,
            retry=Retry(NoBackoff(), 0),
        )
        self._marker_key = f"{stream}:fastsock-batch:{uuid.uuid4().hex}"
        self._batch_number = 0
        self._unconfirmed: list[Message] | None = None

    @classmethod
    def from_url(cls, url: str) -> "RedisStreamSink":
        """``redis://[user:password@]host[:port]/stream[?maxlen=N&db=N&connect_timeout=S&
        write_timeout=S]``; ``rediss://`` for TLS."""
        tls = url.lower().startswith("rediss://")
        address = parse_sink_url(url, "rediss" if tls else "redis", DEFAULT_PORT, "stream")
        if len(address.servers) != 1:
            raise ValueError(f"{url!r}: a Redis sink writes to one server")
        options = take_options(url, address.options, {"maxlen": int, "db": int, **TIMEOUT_OPTIONS})
        host, port = address.servers[0]
        return cls(
            stream=address.name,
            host=host,
            port=port,
            username=address.username,
            password=address.password,
            tls=tls,
            **options,
        )

    def write(self, messages: list[Message]) -> None:
        if not messages:
            return
        try:
            if self._unconfirmed is not None and self._unconfirmed == messages:
                if self._client.get(self._marker_key) == b"%d" % self._batch_number:
                    self._unconfirmed = None
                    return
            else:
                self._batch_number += 1
                self._unconfirmed = list(messages)
            self._commit(messages)
        except redis.RedisError as error:
            if _retryable(error):
                raise SinkUnavailable(f"redis {self.address}: {error}") from error
            raise
        self._unconfirmed = None

    def _commit(self, messages: list[Message]) -> None:
        transaction = self._client.pipeline(transaction=True)
        stream = self.stream
        maxlen = self.maxlen
        for message in messages:
            fields = {PAYLOAD_FIELD: message.payload}
            if message.connection_id is not None:
                fields[_CONNECTION_FIELD] = message.connection_id
            if message.peer is not None:
                fields[_PEER_FIELD] = message.peer
            transaction.xadd(stream, fields, maxlen=maxlen, approximate=True)
        transaction.set(
            self._marker_key, self._batch_number, ex=constants.REDIS_BATCH_MARKER_SECONDS
        )
        transaction.execute()

    def flush(self, timeout: float) -> None:
        """Nothing is buffered: ``write`` returns only once Redis has executed the batch."""

    def close(self) -> None:
        self._client.close()


def _retryable(error: Exception) -> bool:
    if isinstance(error, redis.AuthenticationError | redis.exceptions.AuthorizationError):
        return False
    if isinstance(error, redis.ConnectionError | redis.TimeoutError):
        return True
    return isinstance(error, redis.ResponseError) and str(error).startswith(_RETRYABLE_REPLIES)
