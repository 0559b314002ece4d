"""Faults: bad peers against an in-process server.  Connections that end mid-message
with a FIN or a reset (every byte accounted for), interleaved senders cutting their
streams at random points (each connection keeps its order), slowloris tricklers and silent
squatters beside a good client, and clients that vanish before their reply.

The misbehaving clients are in tests/fault_clients.py, the in-process server harness in
tests/fault_servers.py.

No assertion relies on a tight wall-clock number: timings are compared against a control
measured in the same test, or bounded generously.
"""

import random
import socket
import struct
import threading

import pytest

import fastsock
from tests.fault_clients import (
    FRAMING_OVERHEAD,
    MiB,
    _frame,
    _recv_exactly,
    _reset,
    _round_trips,
    _send_in_random_pieces,
    _Tricklers,
)
from tests.fault_helpers import GENEROUS, connect, numbered_message, wait_until
from tests.fault_servers import _drain, _LargeEcho, _recording_server, _serving


@pytest.mark.parametrize("ending", ["eof", "reset"])
@pytest.mark.parametrize(
    "framing, partial",
    [
        ("lines", b"unfinished line"),
        ("length", struct.pack(">I", 100) + b"ten bytes."),
        ("length", b"\0\0"),
        ("raw", b""),
    ],
    ids=["lines", "length-payload", "length-header", "raw"],
)
def test_a_connection_ending_mid_message_accounts_for_every_byte(framing, partial, ending):
    ring = fastsock.RingQueue()
    complete = [numbered_message(0, n, n % 7) for n in range(100)]
    stream = b"".join(_frame(framing, message) for message in complete) + partial
    with _serving(_recording_server(fastsock.receiver(ring, framing=framing))) as server:
        client = connect(server.server_address[1])
        client.sendall(stream)
        # An RST makes the kernel drop what the server has not read yet: reset only once
        # everything sent was received, so that the partial message is what is lost.
        wait_until(lambda: server.stats().bytes_received == len(stream), what="stream received")
        if ending == "reset":
            _reset(client)
        else:
            client.shutdown(socket.SHUT_WR)
        wait_until(lambda: server.stats().connections_active == 0, what="connection closed")
        if ending == "eof":
            client.close()
        stats = server.stats()
        delivered = _drain(ring, stats.messages_received)
    assert server.errors == []
    if framing == "raw":
        assert b"".join(delivered) == stream
    else:
        assert delivered == complete
    assert stats.bytes_discarded == len(partial)
    assert stats.resets == (1 if ending == "reset" else 0)
    assert stats.bytes_received == (
        sum(map(len, delivered))
        + FRAMING_OVERHEAD[framing] * len(delivered)
        + stats.bytes_discarded
    )


@pytest.mark.parametrize("framing", ["lines", "length"])
def test_each_connection_keeps_its_order_among_16_concurrent_ones(framing):
    clients, messages_each = 16, 2000
    rng = random.Random(framing)
    expected = {
        client: [numbered_message(client, n, rng.randrange(300)) for n in range(messages_each)]
        for client in range(clients)
    }
    ring = fastsock.RingQueue()
    with _serving(_recording_server(fastsock.receiver(ring, framing=framing))) as server:
        senders = [
            threading.Thread(
                target=_send_in_random_pieces,
                args=(
                    server.server_address[1],
                    b"".join(_frame(framing, message) for message in messages),
                    client,
                ),
                daemon=True,
            )
            for client, messages in expected.items()
        ]
        for sender in senders:
            sender.start()
        taken = _drain(ring, clients * messages_each, with_source=True)
        for sender in senders:
            sender.join(GENEROUS)
    by_connection = {}
    for connection, _, payload in taken:
        by_connection.setdefault(connection, []).append(payload)
    received = {int(payloads[0].split(b":")[0]): payloads for payloads in by_connection.values()}
    assert received == expected
    assert server.errors == []


def test_slowloris_and_silent_squatters_do_not_slow_a_good_client():
    tricklers_count, squatters_count, round_trips = 20, 20, 100
    ring = fastsock.RingQueue()
    handler = fastsock.receiver(ring, framing="lines")
    with _serving(_recording_server(handler, backlog=128)) as server:
        port = server.server_address[1]
        with connect(port) as good:
            unloaded = _round_trips(good, ring, round_trips, client_id=0)
            tricklers = _Tricklers(port, tricklers_count)
            squatters = [connect(port) for _ in range(squatters_count)]
            try:
                wait_until(
                    lambda: (
                        server.stats().connections_opened == 1 + tricklers_count + squatters_count
                    ),
                    what="every attacker served",
                )
                attacked = _round_trips(good, ring, round_trips, client_id=1)
            finally:
                tricklers.close()
                for squatter in squatters:
                    squatter.close()
            wait_until(lambda: server.stats().connections_active == 1, what="attackers closed")
        stats = server.stats()
    assert attacked < max(10 * unloaded, 0.02)
    assert tricklers.sent >= tricklers_count * 5, "the tricklers did not trickle"
    # The attackers' bytes never made a message: all of them were discarded, and counted.
    assert stats.messages_received == 2 * round_trips
    assert stats.bytes_discarded == tricklers.sent
    assert stats.lines_too_long == 0
    assert server.errors == []


@pytest.mark.parametrize("vanish", ["close", "reset"])
def test_clients_that_vanish_before_the_reply_are_reported_and_the_server_goes_on(vanish):
    vanishing = 20
    with _serving(_recording_server(_LargeEcho)) as server:
        port = server.server_address[1]
        for _ in range(vanishing):
            client = connect(port)
            client.sendall(b"request\n")
            if vanish == "reset":
                _reset(client)
            else:
                client.close()
        wait_until(lambda: len(server.errors) == vanishing, what="every failure reported")
        request = b"still there?\n"
        expected_reply = request * (8 * MiB // len(request))
        with connect(port) as survivor:
            survivor.sendall(request)
            reply = _recv_exactly(survivor, len(expected_reply))
    assert reply == expected_reply
    assert len(server.errors) == vanishing
    assert all(isinstance(error, ConnectionError) for error in server.errors), server.errors
