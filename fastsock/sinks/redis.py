"""A Redis Streams sink (``pip install 'fastsock[redis]'``, redis-py): a batch is sent as
chunks, each one call of a server-side script that XADDs its messages (with ``MAXLEN ~`` when
asked) and records the chunk's number in a key of the sink's own, atomically.  The chunks go
out back to back on one connection, so Redis runs one chunk while the sink encodes the next,
and ``write`` reads every reply before it returns.  When a write fails with its outcome
unknown (the connection broke after chunks went out), the retry finds the number of the last
chunk added and adds nothing twice; a chunk whose predecessor in the same send was not added
adds nothing either, so what a batch added is always a prefix of its chunks.
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

# KEYS: the stream, the sink's marker key.  ARGV: the chunk's number, the number of the chunk
# that must have been added just before it ("" when that one is confirmed already), the
# marker's lifetime, MAXLEN ("" for none), then payload, connection id and peer of each
# message ("" for none).  A script runs atomically, so the marker says exactly which chunks
# were added; and a chunk is one command to pack and one reply to parse, where one XADD each
# cost the client more than Redis.  Four XADD forms spare Lua a table per message.
_ADD_CHUNK = f"""
local done = tonumber(redis.call('GET', KEYS[2]) or '')
if done and done >= tonumber(ARGV[1]) then return 0 end
if ARGV[2] ~= '' and done ~= tonumber(ARGV[2]) then
    return redis.error_reply('FASTSOCKGAP chunk ' .. ARGV[1] .. ' follows one not added')
end
local stream, call, maxlen = KEYS[1], redis.call, ARGV[4]
local function add(...)
    if maxlen == '' then return call('XADD', stream, '*', ...) end
    return call('XADD', stream, 'MAXLEN', '~', maxlen, '*', ...)
end
for i = 5, #ARGV, 3 do
    local payload, connection, peer = ARGV[i], ARGV[i + 1], ARGV[i + 2]
    if connection ~= '' and peer ~= '' then
        add('{PAYLOAD_FIELD}', payload, '{SOURCE_CONNECTION}', connection, '{SOURCE_PEER}', peer)
    elseif peer ~= '' then
        add('{PAYLOAD_FIELD}', payload, '{SOURCE_PEER}', peer)
    elseif connection ~= '' then
        add('{PAYLOAD_FIELD}', payload, '{SOURCE_CONNECTION}', connection)
    else
        add('{PAYLOAD_FIELD}', payload)
    end
end
call('SET', KEYS[2], ARGV[1], 'EX', ARGV[3])
return 1
"""

# Replies that mean "not now" rather than "never": the server is loading its data, out of
# memory (MAXLEN trimming or a consumer may free it), a replica, or failing to persist; and
# FASTSOCKGAP, a chunk behind one that failed in the same send (the retry sends both again).
_RETRYABLE_REPLIES = (
    "LOADING", "OOM", "READONLY", "MISCONF", "TRYAGAIN", "MASTERDOWN", "BUSY", "FASTSOCKGAP",
)  # fmt: skip
_SCRIPT = _ADD_CHUNK.encode()
_EVAL_PREFIX = b"$4\r\nEVAL\r\n$%d\r\n%b\r\n$1\r\n2\r\n" % (len(_SCRIPT), _SCRIPT)


class RedisStreamSink:
    """Appends each message to a Redis stream with XADD: field ``payload`` (the bytes),
    ``connection`` (its connection id, in decimal; absent for datagrams) and ``peer`` (its peer
    address, when known).  ``write`` returns once Redis has executed every chunk of the batch
    (with ``appendfsync always``, also written to the AOF)."""

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
        chunk_messages: int = constants.REDIS_CHUNK_MESSAGES,
    ):
        if maxlen is not None and maxlen < 1:
            raise ValueError(f"maxlen must be at least 1, not {maxlen}")
        if chunk_messages < 1:
            raise ValueError(f"chunk_messages must be at least 1, not {chunk_messages}")
        self.stream = stream
        self.maxlen = maxlen
        self.chunk_messages = chunk_messages
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
        self._marker_key = f"{stream}:fastsock-batch:{uuid.uuid4().hex}"
        # What every chunk's command shares: the keys, and (after the chunk numbers) the
        # marker's lifetime and MAXLEN.
        self._keys = _bulk(stream.encode()) + _bulk(self._marker_key.encode())
        self._options = _bulk(b"%d" % constants.REDIS_BATCH_MARKER_SECONDS) + _bulk(
            b"" if maxlen is None else b"%d" % maxlen
        )
        # Chunks are numbered on from 1 across batches: the unconfirmed batch's first chunk
        # is number _first_chunk, and its first _chunks_added chunks are confirmed added.
        self._next_chunk = 1
        self._first_chunk = 1
        self._chunks_added = 0
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
            self._unconfirmed = list(messages)
            self._first_chunk = self._next_chunk
            self._next_chunk += -(-len(messages) // self.chunk_messages)
            self._chunks_added = 0
        try:
            self._commit()
        except redis.RedisError as error:
            if _retryable(error):
                raise SinkUnavailable(f"redis {self.address}: {error}") from error
            raise
        self._unconfirmed = None

    def _commit(self) -> None:
        """Sends the unconfirmed batch's chunks not confirmed added yet, back to back, then
        reads every reply; raises the first error reply once all are read."""
        size = self.chunk_messages
        messages = self._unconfirmed
        first, end = self._chunks_added, -(-len(messages) // size)
        pool = self._client.connection_pool
        connection = pool.get_connection()
        failure = None
        try:
            for index in range(first, end):
                chunk = messages[index * size : (index + 1) * size]
                connection.send_packed_command([self._chunk_command(index, index > first, chunk)])
            for _ in range(first, end):
                try:
                    connection.read_response()
                except redis.ResponseError as error:
                    failure = failure or error
                else:
                    if failure is None:
                        self._chunks_added += 1
        except BaseException:
            # Replies may be left unread: the connection's state is unknown.
            connection.disconnect()
            raise
        finally:
            pool.release(connection)
        if failure is not None:
            raise failure

    def _chunk_command(self, index: int, chained: bool, chunk: list[Message]) -> bytes:
        """The RESP command calling the script for the index-th chunk, encoded here: redis-py's
        general encoder took more client time per message than Redis took to add it.  A
        chained chunk is added only if the one before it was."""
        number = self._first_chunk + index
        sources: dict[tuple[int | None, str | None], bytes] = {}
        parts = [
            b"*%d\r\n" % (9 + 3 * len(chunk)),
            _EVAL_PREFIX,
            self._keys,
            _bulk(b"%d" % number),
            _bulk(b"%d" % (number - 1) if chained else b""),
            self._options,
        ]
        for connection_id, peer, payload in chunk:
            source = sources.get((connection_id, peer))
            if source is None:
                source = sources[connection_id, peer] = _bulk(
                    b"" if connection_id is None else b"%d" % connection_id
                ) + _bulk(b"" if peer is None else peer.encode())
            parts.append(b"$%d\r\n%b\r\n%b" % (len(payload), payload, source))
        return b"".join(parts)

    def flush(self, timeout: float) -> None:
        """Nothing is buffered: ``write`` returns only once Redis has executed every chunk."""

    def close(self) -> None:
        self._client.close()


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%b\r\n" % (len(value), value)


def _retryable(error: Exception) -> bool:
    if isinstance(error, redis.AuthenticationError | redis.exceptions.AuthorizationError):
        return False
    if isinstance(error, redis.ConnectionError | redis.TimeoutError):
        return True
    if not isinstance(error, redis.ResponseError):
        return False
    # redis-py strips the code of the replies it has a class for (OOM, READONLY, ...) and
    # keeps it in status_code; the others keep it in the text.
    code = getattr(error, "status_code", None) or str(error).partition(" ")[0]
    return code in _RETRYABLE_REPLIES
