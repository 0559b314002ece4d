"""A NATS JetStream sink, on asyncio (``pip install 'fastsock[nats]'``, nats-py): every
message of a batch is published without waiting, each with a reply subject in an inbox of the
sink's own, and ``write`` returns when JetStream has acked them all, so a batch costs one round
trip, not one per message; nats-py sends each chunk of NATS_CHUNK_MESSAGES as it is made, so
JetStream stores it while the next is encoded.  The sink counts the acks itself rather than
through nats-py's ``publish_async``, whose future, semaphore and parsed ack per message made it
40% slower.

Each message carries a ``Nats-Msg-Id`` made of the sink's own id and a sequence number, the
same when a batch is retried: JetStream drops a message it stored already (within the stream's
duplicate window, 2 minutes by default), so a retry after a partial failure adds no copies.
"""

import asyncio
import json
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

# Failures that a reconnect or a moment's wait cures: no server, a lost connection, no acks in
# time, a publish buffer full while reconnecting.
_RETRYABLE = (
    nats.errors.NoServersError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.StaleConnectionError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.TimeoutError,
    asyncio.TimeoutError,
    OSError,
)
# JetStream's answer when it cannot take a message now (no leader, a stream restarting): a
# "503" status (no responders) or an error of that code in the ack.
_UNAVAILABLE = 503


class JetStreamRefused(Exception):
    """JetStream refused a message for good (its ack is an error other than "unavailable":
    a message over the stream's limits, a subject the stream does not take)."""


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
        chunk_messages: int = constants.NATS_CHUNK_MESSAGES,
    ):
        # Checked here once, so nats-py need not check every publish.
        if not subject or any(character.isspace() for character in subject):
            raise ValueError(f"{subject!r} is not a NATS subject (empty, or with white space)")
        if chunk_messages < 1:
            raise ValueError(f"chunk_messages must be at least 1, not {chunk_messages}")
        self.subject = subject
        self.chunk_messages = chunk_messages
        self.servers = tuple(servers)
        self._credentials = {"user": user, "password": password, "token": token}
        self._connect_timeout = connect_timeout
        self._write_timeout = write_timeout
        self._connection = None
        self._producer_id = uuid.uuid4().hex
        self._ack_prefix = f"_INBOX.{self._producer_id}."
        self._next_sequence = 0
        self._first_sequence = 0
        self._unconfirmed: list[Message] | None = None
        # The unconfirmed batch's sequences still without an ack; the acks' refusals.
        self._awaited: set[int] = set()
        self._refusals: list[tuple[int, str]] = []
        self._all_acked = asyncio.Event()

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
            self._awaited = set(range(self._first_sequence, self._next_sequence))
        # A retry publishes again only what has no ack yet, under the same message ids: an
        # ack that was lost rather than late makes JetStream drop the copy.
        self._refusals = []
        self._all_acked.clear()
        try:
            connection = await self._connected()
            await asyncio.wait_for(self._publish(connection), self._write_timeout)
        except _RETRYABLE as error:
            raise SinkUnavailable(
                f"nats {','.join(self.servers)} {self.subject}: {type(error).__name__} {error}"
            ) from error
        if self._refusals:
            self._refused()
        self._unconfirmed = None

    async def _publish(self, connection) -> None:
        first = self._first_sequence
        messages = self._unconfirmed
        publish = connection.publish
        subject, producer_id, ack_prefix = self.subject, self._producer_id, self._ack_prefix
        for count, sequence in enumerate(sorted(self._awaited), 1):
            connection_id, peer, payload = messages[sequence - first]
            headers = {MESSAGE_ID_HEADER: f"{producer_id}-{sequence}"}
            if connection_id is not None:
                headers[CONNECTION_HEADER] = str(connection_id)
            if peer is not None:
                headers[PEER_HEADER] = peer
            await publish(subject, payload, reply=f"{ack_prefix}{sequence}", headers=headers)
            if count % self.chunk_messages == 0:
                # nats-py's flusher writes what is buffered, and JetStream stores this chunk
                # while the next one is encoded.
                await asyncio.sleep(0)
        if self._awaited:
            await self._all_acked.wait()

    async def _on_ack(self, ack) -> None:
        sequence = int(ack.subject[len(self._ack_prefix) :])
        if sequence not in self._awaited:
            return  # a duplicate's ack, or a batch already given up
        data = ack.data
        if not data or b'"error"' in data:
            self._refusals.append((sequence, _refusal(ack)))
        self._awaited.discard(sequence)
        if not self._awaited:
            self._all_acked.set()

    def _refused(self) -> None:
        """Every message has an answer, some of them refusals: those go back in the
        awaited set, and the write fails, retryably if JetStream was only unavailable."""
        self._awaited.update(sequence for sequence, _ in self._refusals)
        first = self._refusals[0][1]
        what = f"nats {self.subject}: JetStream refused {len(self._refusals)} messages: {first}"
        if all(reason.startswith(f"{_UNAVAILABLE} ") for _, reason in self._refusals):
            raise SinkUnavailable(what)
        self._unconfirmed = None
        raise JetStreamRefused(what)

    async def _connected(self):
        if self._connection is not None and not self._connection.is_closed:
            return self._connection
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
                skip_subject_validation=True,
                **{name: value for name, value in self._credentials.items() if value is not None},
            ),
            self._connect_timeout,
        )
        try:
            jetstream = connection.jetstream(timeout=self._write_timeout)
            await jetstream.find_stream_name_by_subject(self.subject)
            await connection.subscribe(f"{self._ack_prefix}*", cb=self._on_ack)
        except nats.js.errors.NotFoundError:
            await connection.close()
            raise LookupError(
                f"no JetStream stream takes subject {self.subject!r} on "
                f"{','.join(self.servers)}: create one (nats stream add --subjects ...)"
            ) from None
        except BaseException:
            await connection.close()
            raise
        self._connection = connection
        return connection

    async def flush(self, timeout: float) -> None:
        """Nothing is buffered: ``write`` returns only once every publish is acked."""

    async def close(self) -> None:
        if self._connection is not None:
            connection, self._connection = self._connection, None
            await connection.close()


def _refusal(ack) -> str:
    """ "CODE description" of an ack that is an error, or a no-responders status."""
    if not ack.data:
        status = (ack.headers or {}).get("Status", "")
        return f"{status or _UNAVAILABLE} no stream answered"
    error = json.loads(ack.data).get("error", {})
    return f"{error.get('code', 0)} {error.get('description', ack.data.decode(errors='replace'))}"


async def _log_connection_error(error: Exception) -> None:
    # nats-py reconnects by itself; the pipeline counts the failed writes, so one line each
    # at debug level is enough here.
    _log.debug("nats connection: %s: %s", type(error).__name__, error)
