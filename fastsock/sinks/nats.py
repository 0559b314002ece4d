"""A NATS JetStream sink, on asyncio (``pip install 'fastsock[nats]'``, nats-py): every
message of a batch is published at once, and ``write`` returns when JetStream has acked them
all, so a batch costs one round trip, not one per message.

Each message carries a ``Nats-Msg-Id`` made of the sink's own id and a sequence number, the
same when a batch is retried: JetStream drops a message it stored already (within the stream's
duplicate window, 2 minutes by default), so a retry after a partial failure adds no copies.
"""

import asyncio
import logging
import uuid

import nats
import nats.errors
import nats.js.errors

from fastsock import constants
from fastsock.pipeline import Message, SinkUnavailable
from fastsock.sinks import (
    SOURCE_CONNECTION,
    SOURCE_PEER,
    TIMEOUT_OPTIONS,
    parse_sink_url,
    take_options,
)

DEFAULT_PORT = 4222
MESSAGE_ID_HEADER = "Nats-Msg-Id"
CONNECTION_HEADER = "Fastsock-" + SOURCE_CONNECTION.capitalize()
PEER_HEADER = "Fastsock-" + SOURCE_PEER.capitalize()

_log = logging.getLogger("fastsock")

# Failures that a reconnect or a moment's wait cures: no server, a lost connection, no ack in
# time, a publish buffer full while reconnecting, JetStream not (yet) answering the subject.
_RETRYABLE = (
    nats.errors.NoServersError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.StaleConnectionError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
    nats.js.errors.TooManyStalledMsgsError,
    asyncio.TimeoutError,
    OSError,
)


class NatsJetStreamSink:
    """Publishes each message to a JetStream subject, with headers ``Fastsock-Connection``
    (its connection id, in decimal; absent for datagrams) and ``Fastsock-Peer`` (its peer
    address, when known).  A stream must take the subject (``nats stream add``); the first
    write checks that one does.  ``write`` returns once every message's ack came back: the
    stream has stored it (replicated to a quorum when the stream has replicas)."""

    def __init__(
        self,
        *,
        subject: str,
        servers: tuple[str, ...] = ("nats://127.0.0.1:4222",),
        user: str | None = None,
        password: str | None = None,
        token: str | None = None,
        connect_timeout: float = constants.SINK_CONNECT_TIMEOUT,
        write_timeout: float = constants.SINK_WRITE_TIMEOUT,
        max_pending_acks: int = constants.NATS_MAX_PENDING_ACKS,
    ):
        if max_pending_acks < 1:
            raise ValueError(f"max_pending_acks must be at least 1, not {max_pending_acks}")
        self.subject = subject
        self.servers = tuple(servers)
        self._credentials = {"user": user, "password": password, "token": token}
        self._connect_timeout = connect_timeout
        self._write_timeout = write_timeout
        self._max_pending_acks = max_pending_acks
        self._connection = None
        self._jetstream = None
        self._producer_id = uuid.uuid4().hex
        self._next_sequence = 0
        self._first_sequence = 0
        self._unconfirmed: list[Message] | None = None

    @classmethod
    def from_url(cls, url: str) -> "NatsJetStreamSink":
        """``nats://[user:password@]host[:port][,host[:port]...]/subject[?token=T&
        connect_timeout=S&write_timeout=S]``."""
        address = parse_sink_url(url, "nats", DEFAULT_PORT, "subject")
        options = take_options(url, address.options, {"token": str, **TIMEOUT_OPTIONS})
        return cls(
            subject=address.name,
            servers=tuple(f"nats://{host}:{port}" for host, port in address.servers),
            user=address.username,
            password=address.password,
            **options,
        )

    async def write(self, messages: list[Message]) -> None:
        if not messages:
            return
        if self._unconfirmed is None or self._unconfirmed != messages:
            self._first_sequence = self._next_sequence
            self._next_sequence += len(messages)
            self._unconfirmed = list(messages)
        try:
            jetstream = await self._connected()
            await asyncio.wait_for(self._publish(jetstream, messages), self._write_timeout)
        except _RETRYABLE as error:
            raise SinkUnavailable(
                f"nats {','.join(self.servers)} {self.subject}: {type(error).__name__} {error}"
            ) from error
        self._unconfirmed = None

    async def _publish(self, jetstream, messages: list[Message]) -> None:
        acks = []
        try:
            for sequence, message in enumerate(messages, self._first_sequence):
                headers = {MESSAGE_ID_HEADER: f"{self._producer_id}-{sequence}"}
                if message.connection_id is not None:
                    headers[CONNECTION_HEADER] = str(message.connection_id)
                if message.peer is not None:
                    headers[PEER_HEADER] = message.peer
                acks.append(
                    await jetstream.publish_async(self.subject, message.payload, headers=headers)
                )
            await asyncio.gather(*acks)
        finally:
            for ack in acks:
                ack.cancel()

    async def _connected(self):
        if self._connection is not None and not self._connection.is_closed:
            return self._jetstream
        # Once connected, nats-py reconnects by itself for as long as it takes; but with
        # unlimited reconnects its first connect never gives up either, hence the deadline.
        connection = await asyncio.wait_for(
            nats.connect(
                servers=list(self.servers),
                connect_timeout=self._connect_timeout,
                reconnect_time_wait=constants.NATS_RECONNECT_WAIT,
                max_reconnect_attempts=-1,
                allow_reconnect=True,
                error_cb=_log_connection_error,
                **{name: value for name, value in self._credentials.items() if value is not None},
            ),
            self._connect_timeout,
        )
        jetstream = connection.jetstream(
            timeout=self._write_timeout, publish_async_max_pending=self._max_pending_acks
        )
        try:
            await jetstream.find_stream_name_by_subject(self.subject)
        except nats.js.errors.NotFoundError:
            await connection.close()
            raise LookupError(
                f"no JetStream stream takes subject {self.subject!r} on "
                f"{','.join(self.servers)}: create one (nats stream add --subjects ...)"
            ) from None
        except BaseException:
            await connection.close()
            raise
        self._connection, self._jetstream = connection, jetstream
        return jetstream

    async def flush(self, timeout: float) -> None:
        """Nothing is buffered: ``write`` returns only once every publish is acked."""

    async def close(self) -> None:
        if self._connection is not None:
            connection, self._connection = self._connection, None
            await connection.close()


async def _log_connection_error(error: Exception) -> None:
    # nats-py reconnects by itself; the pipeline counts the failed writes, so one line each
    # at debug level is enough here.
    _log.debug("nats connection: %s: %s", type(error).__name__, error)
