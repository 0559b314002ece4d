"""The compiled load generator and sinks count exactly, stay bounded, and fail cleanly."""

import errno
import math
import os
import socket
import struct
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from fastsock.bench import _loadgen
from tests.support import LOCALHOST, fds_opened_since, open_fds

LINE = b"x" * 63 + b"\n"
LINES_PER_BLOCK = 16
BLOCK = LINE * LINES_PER_BLOCK
GENEROUS = 10.0


@pytest.fixture
def in_background():
    """Runs a call in another thread (the functions release the GIL), for a sink that must
    receive while the test sends."""
    with ThreadPoolExecutor(max_workers=1) as executor:
        yield executor.submit


def listener(family, sock_dir):
    server = socket.socket(family, socket.SOCK_STREAM)
    server.bind(os.path.join(sock_dir, "stream") if family == socket.AF_UNIX else (LOCALHOST, 0))
    server.listen(16)
    return server


def connect_all(server, count):
    clients = []
    for _ in range(count):
        client = socket.socket(server.family, socket.SOCK_STREAM)
        client.settimeout(GENEROUS)
        client.connect(server.getsockname())
        clients.append(client)
    return clients


def stream_through(sock_dir, in_background, family, connections, total, max_seconds=GENEROUS):
    with listener(family, sock_dir) as server:
        received = in_background(
            _loadgen.sink_stream, server.fileno(), connections, ord("\n"), GENEROUS
        )
        clients = connect_all(server, connections)
        try:
            sent, seconds = _loadgen.send_stream(
                [client.fileno() for client in clients], BLOCK, total, max_seconds
            )
            return sent, seconds, received.result(timeout=GENEROUS)
        finally:
            for client in clients:
                client.close()


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_UNIX], ids=["tcp", "unix"])
@pytest.mark.parametrize("connections", [1, 4])
def test_stream_counts_every_byte_and_line(sock_dir, in_background, family, connections):
    # 2,049 blocks do not split evenly over 4 connections: the shares differ by one block.
    total = 2049 * len(BLOCK) + len(BLOCK) // 2
    sent, seconds, (received, lines, sink_seconds) = stream_through(
        sock_dir, in_background, family, connections, total
    )
    assert sent == received == 2049 * len(BLOCK)
    assert lines == 2049 * LINES_PER_BLOCK
    assert 0 < seconds < GENEROUS and 0 < sink_seconds < GENEROUS


def test_stream_time_limit_still_sends_whole_blocks(sock_dir, in_background):
    started = time.monotonic()
    sent, seconds, (received, lines, _) = stream_through(
        sock_dir, in_background, socket.AF_INET, 4, 2**50, max_seconds=0.2
    )
    assert time.monotonic() - started < 3.0
    assert 0.2 <= seconds < 3.0
    assert sent == received > 0
    assert sent % len(BLOCK) == 0
    assert lines == sent // len(LINE)


def test_stream_sends_nothing_below_one_block_but_still_shuts_down(sock_dir, in_background):
    sent, _, (received, lines, sink_seconds) = stream_through(
        sock_dir, in_background, socket.AF_INET, 2, len(BLOCK) - 1
    )
    assert (sent, received, lines, sink_seconds) == (0, 0, 0, 0.0)


def test_stream_sink_gives_up_at_its_deadline(sock_dir):
    with listener(socket.AF_INET, sock_dir) as server:
        started = time.monotonic()
        assert _loadgen.sink_stream(server.fileno(), 1, max_seconds=0.2) == (0, 0, 0.0)
        assert 0.2 <= time.monotonic() - started < 2.0
        # The listening socket is handed back in its original (blocking) mode.
        assert server.getblocking()


def test_stream_to_a_vanished_peer_raises_a_connection_error(sock_dir):
    with listener(socket.AF_INET, sock_dir) as server, connect_all(server, 1)[0] as client:
        accepted, _ = server.accept()
        # Closing with unread data and a zero linger sends a reset.
        accepted.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        accepted.close()
        time.sleep(0.05)
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            _loadgen.send_stream([client.fileno()], BLOCK, 64 * 1024 * 1024, GENEROUS)


def numbered_indices(datagrams):
    return [struct.unpack(">Q", datagram[:8])[0] for datagram in datagrams]


def test_datagrams_carry_their_sequence_numbers():
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender,
    ):
        receiver.bind((LOCALHOST, 0))
        receiver.settimeout(GENEROUS)
        payload = b"P" * 100
        # Few enough to fit in the default receive buffer: UDP drops what does not fit.
        sent, _ = _loadgen.send_datagrams(
            sender.fileno(),
            payload,
            100,
            GENEROUS,
            batch=16,
            destination=receiver.getsockname(),
            sequence=True,
        )
        assert sent == 100
        datagrams = [receiver.recv(1024) for _ in range(100)]
    assert numbered_indices(datagrams) == list(range(100))
    assert all(datagram[8:] == payload[8:] for datagram in datagrams)


@pytest.mark.parametrize("connected", [True, False], ids=["connected", "to-destination"])
def test_unix_datagrams_are_all_counted(sock_dir, in_background, connected):
    # A Unix datagram sender waits for room instead of dropping, so the counts are exact
    # even though the receiver queue holds only a few datagrams at a time.
    path = os.path.join(sock_dir, "datagrams")
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender,
    ):
        receiver.bind(path)
        if connected:
            sender.connect(path)
        count = 20_000
        received = in_background(_loadgen.sink_datagrams, receiver.fileno(), count, GENEROUS)
        sent, seconds = _loadgen.send_datagrams(
            sender.fileno(),
            b"D" * 200,
            count,
            GENEROUS,
            destination=None if connected else path,
            sequence=True,
        )
        assert (sent, 0 < seconds < GENEROUS) == (count, True)
        assert received.result(timeout=GENEROUS)[:2] == (count, count * 200)


def test_datagram_sink_stops_at_expected_and_leaves_the_rest_queued():
    receiver, sender = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with receiver, sender:
        receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        assert _loadgen.send_datagrams(sender.fileno(), b"abc", 8, GENEROUS)[0] == 8
        assert _loadgen.sink_datagrams(receiver.fileno(), 5, GENEROUS, batch=2)[:2] == (5, 15)
        assert _loadgen.sink_datagrams(receiver.fileno(), 5, 2.0, idle_seconds=0.1)[:2] == (3, 9)


def test_datagram_sink_stops_when_the_sender_goes_quiet():
    receiver, sender = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with receiver, sender:
        sender.send(b"only one")
        started = time.monotonic()
        result = _loadgen.sink_datagrams(receiver.fileno(), 10, GENEROUS, idle_seconds=0.2)
        assert result == (1, 8, 0.0)
        assert time.monotonic() - started < 2.0


@pytest.mark.parametrize("spin_seconds", [0.0, 0.001], ids=["blocking", "spinning"])
def test_datagram_sink_returns_promptly_once_a_live_sender_stops(
    sock_dir, in_background, spin_seconds
):
    # The sink waits inside recvmmsg(), after spinning a while if asked: it must still see
    # the sender go quiet while its socket stays silent, and count every datagram before.
    path = os.path.join(sock_dir, "quiet")
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender,
    ):
        receiver.bind(path)
        sender.connect(path)
        received = in_background(
            _loadgen.sink_datagrams, receiver.fileno(), 10**9, GENEROUS, 256, 0.2, spin_seconds
        )
        sent, _ = _loadgen.send_datagrams(sender.fileno(), b"q" * 64, 30_000, GENEROUS)
        stopped = time.monotonic()
        count, total_bytes, seconds = received.result(timeout=GENEROUS)
        assert time.monotonic() - stopped < 2.0
        assert (count, total_bytes) == (sent, sent * 64) == (30_000, 30_000 * 64)
        assert 0.0 < seconds < GENEROUS


def test_datagram_sink_on_a_silent_socket_ends_at_its_deadline_and_restores_the_socket():
    receiver, sender = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with receiver, sender:
        receiver.settimeout(7.5)
        started = time.monotonic()
        assert _loadgen.sink_datagrams(receiver.fileno(), 1, 0.2) == (0, 0, 0.0)
        assert 0.2 <= time.monotonic() - started < 2.0
        # It waits in a blocking recvmmsg() with its own receive timeout, then puts back
        # the caller's: Python's timeout is a non-blocking socket, and stays one.
        assert receiver.gettimeout() == 7.5
        assert not os.get_blocking(receiver.fileno())
        sender.send(b"after")
        assert receiver.recv(16) == b"after"


@pytest.mark.parametrize("count", [1, 63, 64, 65, 150])
def test_gso_datagrams_arrive_whole_numbered_and_counted(count):
    # 7 messages of up to 10 segments per sendmmsg(): counts that end mid-message and
    # mid-batch.  Few enough to fit in the default receive buffer.
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender,
    ):
        receiver.bind((LOCALHOST, 0))
        receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        receiver.settimeout(GENEROUS)
        payload = b"G" * 100
        try:
            sent, _ = _loadgen.send_datagrams(
                sender.fileno(),
                payload,
                count,
                GENEROUS,
                batch=7,
                destination=receiver.getsockname(),
                sequence=True,
                segments=10,
            )
        except OSError as error:
            pytest.skip(f"no UDP GSO here: {error}")
        assert sent == count
        datagrams = [receiver.recv(1024) for _ in range(count)]
        assert numbered_indices(datagrams) == list(range(count))
        assert all(datagram[8:] == payload[8:] for datagram in datagrams)
        assert _loadgen.sink_datagrams(receiver.fileno(), 1, 0.1) == (0, 0, 0.0)


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6")
def test_datagrams_to_an_ipv6_destination():
    try:
        receiver = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        receiver.bind(("::1", 0))
    except OSError as error:
        pytest.skip(f"no IPv6 loopback: {error}")
    with receiver, socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sender:
        sent, _ = _loadgen.send_datagrams(
            sender.fileno(), b"6" * 16, 20, GENEROUS, destination=receiver.getsockname()
        )
        assert sent == 20
        assert _loadgen.sink_datagrams(receiver.fileno(), 20, GENEROUS)[:2] == (20, 320)


@pytest.fixture
def stream_pair():
    first, second = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with first, second:
        yield first, second


@pytest.fixture
def datagram_pair():
    first, second = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with first, second:
        yield first, second


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda fd: _loadgen.send_stream([], BLOCK, 100, 1.0), "at least one"),
        (lambda fd: _loadgen.send_stream([fd, fd], BLOCK, 100, 1.0), "twice"),
        (lambda fd: _loadgen.send_stream([fd], b"", 100, 1.0), "block must not be empty"),
        (lambda fd: _loadgen.send_stream([fd], BLOCK, -1, 1.0), "total_bytes must be >= 0"),
        (lambda fd: _loadgen.send_stream([fd], BLOCK, 100, 0), "max_seconds"),
        (lambda fd: _loadgen.send_stream([fd], BLOCK, 100, math.nan), "max_seconds"),
        (lambda fd: _loadgen.send_stream([fd], BLOCK, 100, math.inf), "max_seconds"),
        (lambda fd: _loadgen.send_stream([-1], BLOCK, 100, 1.0), "file descriptor"),
    ],
    ids=[
        "no-fds",
        "same-fd-twice",
        "empty-block",
        "negative-total",
        "zero-seconds",
        "nan-seconds",
        "infinite-seconds",
        "negative-fd",
    ],
)
def test_send_stream_rejects_bad_arguments(stream_pair, call, message):
    with pytest.raises(ValueError, match=message):
        call(stream_pair[0].fileno())


def test_functions_reject_the_wrong_kind_of_socket(stream_pair, datagram_pair):
    with pytest.raises(ValueError, match="not a stream socket"):
        _loadgen.send_stream([datagram_pair[0].fileno()], BLOCK, 100, 1.0)
    with pytest.raises(ValueError, match="not a listening socket"):
        _loadgen.sink_stream(stream_pair[0].fileno(), 1, max_seconds=1.0)
    with pytest.raises(ValueError, match="not a stream socket"):
        _loadgen.sink_stream(datagram_pair[0].fileno(), 1, max_seconds=1.0)
    with pytest.raises(ValueError, match="not a datagram socket"):
        _loadgen.send_datagrams(stream_pair[0].fileno(), b"x", 1, 1.0)
    with pytest.raises(ValueError, match="not a datagram socket"):
        _loadgen.sink_datagrams(stream_pair[0].fileno(), 1, 1.0)
    with pytest.raises(TypeError):
        _loadgen.send_stream([stream_pair[0]], BLOCK, 100, 1.0)


def test_sinks_and_datagrams_reject_bad_arguments(sock_dir, datagram_pair):
    fd = datagram_pair[0].fileno()
    with listener(socket.AF_INET, sock_dir) as server:
        with pytest.raises(ValueError, match="connections"):
            _loadgen.sink_stream(server.fileno(), 0)
        with pytest.raises(ValueError, match="count_byte"):
            _loadgen.sink_stream(server.fileno(), 1, count_byte=256)
    for batch in (0, 1025):
        with pytest.raises(ValueError, match="batch"):
            _loadgen.send_datagrams(fd, b"x", 1, 1.0, batch=batch)
        with pytest.raises(ValueError, match="batch"):
            _loadgen.sink_datagrams(fd, 1, 1.0, batch=batch)
    with pytest.raises(ValueError, match="at least 8 bytes"):
        _loadgen.send_datagrams(fd, b"short", 1, 1.0, sequence=True)
    with pytest.raises(ValueError, match="count must be >= 0"):
        _loadgen.send_datagrams(fd, b"x", -1, 1.0)
    with pytest.raises(ValueError, match="expected must be >= 0"):
        _loadgen.sink_datagrams(fd, -1, 1.0)
    with pytest.raises(ValueError, match="idle_seconds"):
        _loadgen.sink_datagrams(fd, 1, 1.0, idle_seconds=0)
    for spin in (-0.001, 0.6):
        with pytest.raises(ValueError, match="spin_seconds"):
            _loadgen.sink_datagrams(fd, 1, 1.0, idle_seconds=0.5, spin_seconds=spin)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as inet:
        with pytest.raises(ValueError, match="host, port"):
            _loadgen.send_datagrams(inet.fileno(), b"x", 1, 1.0, destination="nowhere")
        with pytest.raises(ValueError, match="port"):
            _loadgen.send_datagrams(inet.fileno(), b"x", 1, 1.0, destination=(LOCALHOST, 0))
    with pytest.raises(ValueError, match="Unix socket path"):
        _loadgen.send_datagrams(fd, b"x", 1, 1.0, destination="/" + "p" * 200)
    with pytest.raises(ValueError, match="UDP socket"):
        _loadgen.send_datagrams(fd, b"x", 1, 1.0, segments=2)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as inet:
        for segments in (-1, 0, 65):
            with pytest.raises(ValueError, match="segments must be between"):
                _loadgen.send_datagrams(inet.fileno(), b"x", 1, 1.0, segments=segments)
        with pytest.raises(ValueError, match="65507 bytes"):
            _loadgen.send_datagrams(inet.fileno(), b"x" * 1400, 1, 1.0, segments=47)


# -- open_connections, churn ----------------------------------------------------------------

SOURCES = ("127.0.0.2", "127.0.0.3")


def test_churn_completes_every_connection_and_the_sink_counts_each_line(sock_dir, in_background):
    count = 300
    before = open_fds()
    with listener(socket.AF_INET, sock_dir) as server:
        server.listen(64)
        received = in_background(_loadgen.sink_stream, server.fileno(), count, ord("\n"), GENEROUS)
        made, seconds = _loadgen.churn(
            server.getsockname(), LINE, count, GENEROUS, window=8, sources=SOURCES
        )
        received_bytes, lines, _ = received.result(timeout=GENEROUS)
    assert made == count and 0 < seconds < GENEROUS
    assert (received_bytes, lines) == (count * len(LINE), count)
    assert fds_opened_since(before) == {}


def test_churn_gives_up_on_a_server_that_never_closes(sock_dir):
    with listener(socket.AF_INET, sock_dir) as server:
        before = open_fds()
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            _loadgen.churn(server.getsockname(), LINE, 4, 0.1, window=4, drain_seconds=0.2)
        assert time.monotonic() - started < GENEROUS
        assert fds_opened_since(before) == {}


def test_churn_to_a_closed_port_raises_and_leaks_nothing(sock_dir):
    with listener(socket.AF_INET, sock_dir) as server:
        address = server.getsockname()
    before = open_fds()
    with pytest.raises(ConnectionRefusedError):
        _loadgen.churn(address, LINE, 10, GENEROUS)
    with pytest.raises(ConnectionRefusedError):
        _loadgen.open_connections(address, b"", 10, GENEROUS)
    assert fds_opened_since(before) == {}


@pytest.mark.parametrize("line", [LINE, b""], ids=["one-line", "nothing"])
def test_open_connections_holds_them_from_every_source(sock_dir, line):
    count = 40
    with listener(socket.AF_INET, sock_dir) as server:
        server.listen(count)
        descriptors, seconds = _loadgen.open_connections(
            server.getsockname(), line, count, GENEROUS, window=8, sources=SOURCES
        )
        try:
            assert len(set(descriptors)) == count and 0 <= seconds < GENEROUS
            peers = []
            for _ in range(count):
                accepted, peer = server.accept()
                with accepted:
                    accepted.settimeout(GENEROUS)
                    if line:
                        assert accepted.recv(len(line), socket.MSG_WAITALL) == line
                    peers.append(peer[0])
            assert sorted(set(peers)) == list(SOURCES)
            assert peers.count(SOURCES[0]) == count // 2
            assert all(not os.get_blocking(fd) for fd in descriptors)
        finally:
            for fd in descriptors:
                os.close(fd)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda address: _loadgen.churn(address, LINE, 1, 1.0, window=0), "window"),
        (lambda address: _loadgen.churn(address, b"x" * 257, 1, 1.0), "at most 256"),
        (lambda address: _loadgen.churn(address, LINE, -1, 1.0), "count must be >= 0"),
        (lambda address: _loadgen.churn(address, LINE, 1, 0), "max_seconds"),
        (lambda address: _loadgen.churn(address, LINE, 1, 1.0, drain_seconds=0), "drain"),
        (lambda address: _loadgen.open_connections(address, LINE, 1, math.nan), "max_seconds"),
        (lambda address: _loadgen.open_connections(address[0], LINE, 1, 1.0), "host, port"),
    ],
)
def test_connectors_reject_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call((LOCALHOST, 9))


def test_connectors_with_nothing_to_do_return_at_once():
    assert _loadgen.churn((LOCALHOST, 9), LINE, 0, 1.0) == (0, 0.0)
    assert _loadgen.open_connections((LOCALHOST, 9), LINE, 0, 1.0) == ([], 0.0)


def closed_descriptor():
    with socket.socket() as doomed:
        return doomed.fileno()


@pytest.mark.parametrize(
    "call",
    [
        lambda fd: _loadgen.send_stream([fd], BLOCK, 100, 1.0),
        lambda fd: _loadgen.sink_stream(fd, 1, max_seconds=1.0),
        lambda fd: _loadgen.send_datagrams(fd, b"x", 1, 1.0),
        lambda fd: _loadgen.sink_datagrams(fd, 1, 1.0),
    ],
    ids=["send_stream", "sink_stream", "send_datagrams", "sink_datagrams"],
)
def test_a_closed_descriptor_raises_ebadf(call):
    with pytest.raises(OSError) as raised:
        call(closed_descriptor())
    assert raised.value.errno == errno.EBADF
