"""A Redis Streams sink (``pip install 'fastsock[redis]'``, redis-py): each batch is one call
of a server-side script that XADDs every message (with ``MAXLEN ~`` when asked) and records
the batch's number in a key of the sink's own, atomically.  When a write fails with its
outcome unknown (the connection broke after the call went out), the retry finds that number
and adds nothing twice.
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
PAYLOAD_FIELD = "payload"

# KEYS: the stream, the sink's marker key.  ARGV: the batch's number, the marker's lifetime,
# MAXLEN ("" for none), then payload, connection id and peer of each message ("" for none).
# A script runs atomically, so the marker says exactly whether the batch was added; and the
# whole batch is one command to pack and one reply to parse, where one XADD each cost the
# client more than Redis.
_ADD_BATCH = f"""
if redis.call('GET', KEYS[2]) == ARGV[1] then return 0 end
local added = 0
for i = 4, #ARGV, 3 do
    local fields = {{'{PAYLOAD_FIELD}', ARGV[i]}}
    if ARGV[i + 1] ~= '' then
        fields[#fields + 1] = '{SOURCE_CONNECTION}'
        fields[#fields + 1] = ARGV[i + 1]
    end
    if ARGV[i + 2] ~= '' then
        fields[#fields + 1] = '{SOURCE_PEER}'
        fields[#fields + 1] = ARGV[i + 2]
    end
    if ARGV[3] == '' then
        redis.call('XADD', KEYS[1], '*', unpack(fields))
    else
        redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', unpack(fields))
    end
    added = added + 1
end
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[2])
return added
"""

# Replies that mean "not now" rather than "never": the server is loading its data, out of
# memory (MAXLEN trimming or a consumer may free it), a replica, or failing to persist.
_RETRYABLE_REPLIES = ("LOADING", "OOM", "READONLY", "MISCONF", "TRYAGAIN", "MASTERDOWN", "BUSY")


class RedisStreamSink:
    """Appends each message to a Redis stream with XADD: field ``payload`` (the bytes),
    ``connection`` (its connection id, in decimal; absent for datagrams) and ``peer`` (its peer
    address, when known).  ``write`` returns once Redis has executed the script holding the
    whole batch (with ``appendfsync always``, also written to the AOF)."""

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
        # counters.
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
        self._add_batch = self._client.register_script(_ADD_BATCH)
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
        if self._unconfirmed is None or self._unconfirmed != messages:
            self._batch_number += 1
            self._unconfirmed = list(messages)
        try:
            self._commit(messages)
        except redis.RedisError as error:
            if _retryable(error):
                raise SinkUnavailable(f"redis {self.address}: {error}") from error
            raise
        self._unconfirmed = None

    def _commit(self, messages: list[Message]) -> None:
        """One call of the batch script: it adds the batch unless the marker says it did."""
        arguments = [
            self._batch_number,
            constants.REDIS_BATCH_MARKER_SECONDS,
            "" if self.maxlen is None else self.maxlen,
        ]
        for connection_id, peer, payload in messages:
            arguments += (payload, "" if connection_id is None else connection_id, peer or "")
        self._add_batch(keys=[self.stream, self._marker_key], args=arguments)

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
