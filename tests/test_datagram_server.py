"""Datagram servers on the compiled path: fastsock.receiver(ring) on UDPServer and
UnixDatagramServer, and prefork datagram workers."""

import faulthandler
import os
import queue
import socket
import struct
import threading
import time
import warnings

import pytest

import fastsock

GENEROUS = 10.0
HOST = "127.0.0.1"


def _start(server):
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    deadline = time.monotonic() + GENEROUS
    while server.receive_path.running is None:
        assert time.monotonic() < deadline, "the datagram loop did not start"
        time.sleep(0.001)
    return thread


def _stop(server, thread):
    server.shutdown()
    thread.join(GENEROUS)
    assert not thread.is_alive()


def _drain(ring, count):
    got = []
    deadline = time.monotonic() + GENEROUS
    while len(got) < count and time.monotonic() < deadline:
        try:
            got.extend(ring.get_many(timeout=0.2, with_source=True))
        except queue.Empty:
            pass
    return got


def _settled(server):
    """The counters once the loop has read everything the kernel still holds."""
    previous = None
    while True:
        time.sleep(3 * fastsock.constants.RECEIVE_CHECK_INTERVAL)
        stats = server.stats()
        if stats == previous:
            return stats
        previous = stats


def _send_paced(client, address, count, size=64):
    for number in range(count):
        client.sendto(struct.pack(">Q", number) + b"d" * (size - 8), address)
        if number % 100 == 99:
            time.sleep(0.002)


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_udp_datagrams_arrive_with_their_senders(family):
    host = HOST if family == socket.AF_INET else "::1"
    ring = fastsock.RingQueue()
    options = {"address_family": family} if family == socket.AF_INET6 else {}
    with fastsock.UDPServer((host, 0), fastsock.receiver(ring), **options) as server:
        thread = _start(server)
        with socket.socket(family, socket.SOCK_DGRAM) as client:
            _send_paced(client, server.server_address, 2000)
            sender = client.getsockname()
            stats = _settled(server)
            got = _drain(ring, stats.datagrams_received)
        _stop(server, thread)
    assert stats.datagrams_received + stats.datagrams_dropped == 2000
    numbers = [struct.unpack(">Q", payload[:8])[0] for _, _, payload in got]
    assert numbers == sorted(set(numbers))
    assert {fastsock.address_from_sockaddr(source)[:2] for _, source, _ in got} == {
        (host, sender[1])
    }


def test_unix_datagrams_name_their_bound_sender(tmp_path):
    ring = fastsock.RingQueue()
    path = str(tmp_path / "server")
    with fastsock.UnixDatagramServer(path, fastsock.receiver(ring)) as server:
        thread = _start(server)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as client:
            client.bind(str(tmp_path / "client"))
            client.sendto(b"hello", path)
            [(_, source, payload)] = _drain(ring, 1)
        _stop(server, thread)
    assert payload == b"hello"
    assert fastsock.address_from_sockaddr(source) == str(tmp_path / "client")


def test_largest_udp_datagram_arrives_whole():
    ring = fastsock.RingQueue()
    with fastsock.UDPServer((HOST, 0), fastsock.receiver(ring)) as server:
        thread = _start(server)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            payload = os.urandom(65_507)
            client.sendto(payload, server.server_address)
            [(_, _, got)] = _drain(ring, 1)
        _stop(server, thread)
    assert got == payload


def test_overrun_is_accounted_exactly():
    ring = fastsock.RingQueue(max_messages=200)
    handler = fastsock.receiver(ring, receive_buffer=4096)
    with fastsock.UDPServer((HOST, 0), handler) as server:
        thread = _start(server)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            for number in range(20_000):
                client.sendto(struct.pack(">Q", number) + b"o" * 56, server.server_address)
        stats = _settled(server)
        _stop(server, thread)
    assert stats.dropped_queue_full + stats.kernel_drops > 0, "the test must overrun"
    assert stats.datagrams_received == 200 == ring.qsize()
    assert stats.datagrams_received + stats.datagrams_dropped == 20_000
    assert ring.stats.dropped_messages == stats.dropped_queue_full


def test_truncated_datagrams_are_counted_never_delivered_cut():
    ring = fastsock.RingQueue()
    with fastsock.UDPServer((HOST, 0), fastsock.receiver(ring, max_datagram=100)) as server:
        thread = _start(server)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.sendto(b"t" * 101, server.server_address)
            client.sendto(b"f" * 100, server.server_address)
            [(_, _, payload)] = _drain(ring, 1)
        stats = _settled(server)
        _stop(server, thread)
    assert payload == b"f" * 100
    assert stats.truncated == 1 and stats.datagrams_received == 1


def test_shutdown_interrupts_the_loop_and_serving_can_resume():
    ring = fastsock.RingQueue()
    with fastsock.UDPServer((HOST, 0), fastsock.receiver(ring)) as server:
        for round_number in range(3):
            thread = _start(server)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
                client.sendto(b"%d" % round_number, server.server_address)
                assert [p for _, _, p in _drain(ring, 1)] == [b"%d" % round_number]
            started = time.monotonic()
            _stop(server, thread)
            assert time.monotonic() - started < GENEROUS


def test_a_datagram_too_large_for_the_ring_is_refused_up_front():
    ring = fastsock.RingQueue(max_bytes=1000)
    with pytest.raises(ValueError, match="max_bytes"):
        fastsock.UDPServer((HOST, 0), fastsock.receiver(ring))


def test_datagram_servers_report_datagram_stats():
    ring = fastsock.RingQueue()
    with fastsock.UDPServer((HOST, 0), fastsock.receiver(ring)) as server:
        assert server.stats() == fastsock.DatagramStats.zero()
        assert server.connection_address(1) is None


@pytest.mark.skipif(fastsock.IMPLEMENTATION != "compiled", reason="needs the shared ring")
def test_prefork_datagram_workers_share_the_port_and_the_ring():
    faulthandler.cancel_dump_traceback_later()
    ring = fastsock.RingQueue()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        server = fastsock.PreforkServer(
            (HOST, 0), fastsock.receiver(ring), workers=2, server_class=fastsock.UDPServer
        )
        with server:
            server.start()
            senders = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(16)]
            for sender in senders:
                sender.sendto(b"hi", server.server_address)
            got = _drain(ring, 16)
            for sender in senders:
                sender.close()
        assert len(got) == 16
        assert server.workers == [] and server.worker_crashes == 0
