"""Faults: floods and memory.  An endless line, a hostile length prefix and a stalled
consumer must leave the server's memory bounded (read from /proc of a server in a child
process, tests/fault_helpers.py), refuse what is too large at once, and lose nothing that
backpressure held back; the stdlib pattern fastsock replaces is the control that grows.

No assertion relies on a tight wall-clock number: timings are compared against a control
measured in the same test, or bounded generously.
"""

import struct

import pytest

from fastsock.constants import MAX_LINE_LENGTH, RECV_SIZE
from tests.fault_clients import MiB, _Producers, _stream_until_refused
from tests.fault_helpers import ServerProcess, connect, wait_until
from tests.fault_servers import _rss_growth_when_stalled, _settled


def test_an_endless_line_is_cut_at_max_line_with_bounded_memory(tmp_path):
    max_line, attack = 16 * MiB, 300 * MiB
    with ServerProcess(tmp_path, max_line=max_line) as server:
        rss_before = server.status()["VmRSS"]
        with connect(server.port) as client:
            sent = _stream_until_refused(client, b"x" * MiB, attack)
        stats = _settled(server, errors=1)
        peak_growth = server.status()["VmHWM"] - rss_before
    assert sent < attack, "the server must close the connection, not read 300 MiB"
    assert stats["errors"] == ["LineTooLongError"]
    counters = stats["stats"]
    assert counters["lines_too_long"] == 1
    assert counters["messages_received"] == 0
    assert max_line < counters["bytes_received"] <= max_line + 1 + 2 * RECV_SIZE
    assert counters["bytes_discarded"] == counters["bytes_received"]
    assert peak_growth < 2 * (max_line + RECV_SIZE)


@pytest.mark.parametrize(
    "header",
    [
        struct.pack(">I", 0xFFFFFFFF),
        struct.pack(">I", 0x80000000),
        struct.pack(">I", 32 * MiB + 1),
        b"GET ",
    ],
    ids=["4GiB", "2GiB", "max_frame+1", "http"],
)
def test_a_hostile_length_prefix_is_refused_at_the_header(tmp_path, header):
    max_frame = 32 * MiB
    good_frame = struct.pack(">I", 3) + b"abc"
    with ServerProcess(tmp_path, framing="length", max_frame=max_frame) as server:
        before = server.status()
        with connect(server.port) as client:
            client.sendall(good_frame + header)
            # A server that believed the header would now read this payload into memory.
            sent = _stream_until_refused(client, b"\0" * MiB, max_frame + 8 * MiB)
        stats = _settled(server, errors=1)
        after = server.status()
    assert sent < max_frame, "the server must close the connection at the header"
    assert stats["errors"] == ["FrameTooLargeError"]
    counters = stats["stats"]
    assert counters["frames_too_large"] == 1
    assert stats["consumed"]["messages"] == counters["messages_received"] == 1
    assert counters["bytes_received"] <= len(good_frame) + len(header) + 2 * RECV_SIZE
    assert after["VmHWM"] - before["VmRSS"] < max_frame / 2
    # Nor was address space reserved for a GiB-sized announcement: the handler thread's
    # stack and malloc arena are the only growth.
    assert after["VmPeak"] - before["VmPeak"] < 512 * MiB


@pytest.mark.slow
def test_a_stalled_consumer_bounds_memory_and_loses_nothing(tmp_path):
    clients, messages_each, padding = 16, 32 * 1024, 500  # 16 MiB per client
    ring_bytes, ring_messages = 4 * MiB, 16 * 1024
    # The ring's whole record area, every connection's framing buffer, and the interpreter's
    # own (threads, the consumer's batches): nothing that grows with what is offered.
    ring_area = ring_bytes + 147 * ring_messages
    bound = ring_area + clients * (RECV_SIZE + MAX_LINE_LENGTH) + 24 * MiB

    with ServerProcess(
        tmp_path,
        ordered=True,
        consumer="paused",
        backlog=64,
        ring_max_bytes=ring_bytes,
        ring_max_messages=ring_messages,
    ) as server:
        rss_before = server.status()["VmRSS"]
        producers = _Producers(server.port, clients, messages_each, padding)
        wait_until(
            lambda: server.stats()["stats"]["connections_opened"] == clients,
            what="every producer connected",
        )
        stalled_growth = _rss_growth_when_stalled(
            server, producers, rss_before, lambda: server.stats()["stats"]["bytes_received"]
        )
        at_stall = server.stats()
        assert producers.alive() == clients, "backpressure must block every producer"
        assert at_stall["stats"]["bytes_received"] < producers.total_bytes
        assert at_stall["stats"]["pauses"] > 0
        server.resume_consumer()
        producers.join()
        stats = _settled(server, clients * messages_each)
        peak_growth = server.status()["VmHWM"] - rss_before

    assert stalled_growth < bound
    assert peak_growth < bound
    assert stats["consumed"]["disorder"] == []
    assert stats["consumed"]["clients"] == {str(c): messages_each for c in range(clients)}
    assert stats["consumed"]["bytes"] == producers.total_bytes - clients * messages_each
    assert stats["stats"]["messages_dropped"] == 0

    # The control: the stdlib pattern fastsock replaces keeps whatever it is offered.
    with ServerProcess(
        tmp_path, "stdlib", module="stdlib", handler="queueing", consumer="paused", backlog=64
    ) as control:
        rss_before = control.status()["VmRSS"]
        producers = _Producers(control.port, clients, messages_each, padding)
        control_growth = _rss_growth_when_stalled(control, producers, rss_before)
    assert control_growth > 4 * bound
