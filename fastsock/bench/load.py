"""The load generator of one ``fastsock bench`` run.

Run by ``fastsock.bench.coordinator`` as ``python -m fastsock.bench.load CONFIG``.  Everything is
sent by the compiled generator (``fastsock.bench._loadgen``, GIL-free): streams, datagrams, churn's
short connections and the held connections of idle and silent-live; but TLS, which Python's
ssl sends.  It reports in one JSON
line: ``{"start": T, "sent_units": N, "seconds": S, "cpu_seconds": C}``, ``start`` on the
system-wide monotonic clock that the server process reads too, ``C`` the CPU it used.  For
idle and silent-live it first reports ``{"opened": N, "start": T, "seconds": S}`` (when it
began opening them, and how long that took it) and waits for ``{"release": true}`` before
sending.  silent-live streams over its live connection alone first, reports that as above
and waits for ``{"continue": true}``; after its second stream's report it waits for
``{"close": true}`` before it closes the silent connections.
"""

import json
import os
import socket
import ssl
import sys
import time

from fastsock.bench import _loadgen
from fastsock.bench.catalogue import (
    BULK_BLOCK_BYTES,
    DATAGRAM_CAP,
    LINE_BYTES,
    MESSAGES_PER_BLOCK,
    SOURCE_ADDRESSES,
    UDP_GSO_BYTES,
    UDP_GSO_SEGMENTS,
    WORKLOADS,
)
from fastsock.bench.process import (
    REPORT_SECONDS,
    emit,
    pin,
    raise_open_file_limit,
    receive_command,
)

LINE = b"x" * (LINE_BYTES - 1) + b"\n"
CONNECT_WINDOW = 64
"""Connections being opened (and, for churn, waiting for the server's close) at once: far
below the listen backlog (BACKLOG), so no SYN is dropped and retried a second later, and
enough to keep the generator busy (16 to 128 measured alike on a 2-core VM; 256 slower)."""
CHURN_DRAIN_SECONDS = 10.0
"""How long past --seconds the churn generator waits for the server to close the
connections it has in flight."""


def block(workload):
    """Whole messages back to back: what the stream generator writes over and over."""
    if workload.pattern == "bulk":
        return bytes(range(256)) * (BULK_BLOCK_BYTES // 256)
    if workload.pattern == "frames":
        payload = b"f" * (workload.unit_bytes - 4)
        return (len(payload).to_bytes(4, "big") + payload) * MESSAGES_PER_BLOCK
    return b"".join(b"line %058d\n" % number for number in range(MESSAGES_PER_BLOCK))


def family(workload):
    return socket.AF_INET if workload.transport in ("tcp", "tls", "udp") else socket.AF_UNIX


def connect(workload, address):
    sock = socket.socket(family(workload), socket.SOCK_STREAM)
    try:
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


def send_stream(workload, address, config):
    connections = [connect(workload, address) for _ in range(workload.connections)]
    try:
        start = time.monotonic()
        sent, seconds = _loadgen.send_stream(
            [connection.fileno() for connection in connections],
            block(workload),
            config["total_bytes"],
            config["seconds"],
        )
    finally:
        for connection in connections:
            connection.close()
    return start, sent // workload.unit_bytes, seconds


TLS_SEND_BYTES = 1024 * 1024
"""Bytes of whole lines in each sendall() of the TLS generator: ssl cuts them into 16 KiB
records, encrypted in C with the GIL released, so Python's cost per call is amortised over
16,384 lines."""


def send_tls_stream(workload, address, config):
    """Lines over TLS with Python's ssl (the compiled generator has no TLS): large sendall()s
    of prebuilt lines for --seconds or the byte budget.  The server's certificate is the
    bench's own, self-signed: not verified."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    data = block(workload) * (TLS_SEND_BYTES // len(block(workload)))
    with context.wrap_socket(connect(workload, address)) as client:
        start = time.monotonic()
        sent = 0
        while sent < config["total_bytes"] and time.monotonic() - start < config["seconds"]:
            client.sendall(data)
            sent += len(data)
        seconds = time.monotonic() - start
    return start, sent // workload.unit_bytes, seconds


def segments(workload):
    """Datagrams per GSO send: UDP only (Unix datagrams have no GSO, and their sender
    waits for room rather than overflowing the receiver)."""
    if workload.transport != "udp":
        return 1
    return min(UDP_GSO_SEGMENTS, UDP_GSO_BYTES // workload.unit_bytes)


def send_datagrams(workload, address, config):
    with socket.socket(family(workload), socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        start = time.monotonic()
        sent, seconds = _loadgen.send_datagrams(
            sock.fileno(),
            b"d" * workload.unit_bytes,
            DATAGRAM_CAP,
            config["seconds"],
            segments=segments(workload),
        )
    return start, sent, seconds


def churn(workload, address, config):
    """Connect, send one line, shut down, wait for the server's close: up to
    churn_connections times, or for --seconds, CONNECT_WINDOW at a time.

    A closed loop: an open one would overflow the listen backlog, and the kernel's 1-second
    retry of a dropped SYN would then be what the run measured.
    """
    start = time.monotonic()
    made, seconds = _loadgen.churn(
        address,
        LINE,
        config["churn_connections"],
        config["seconds"],
        window=CONNECT_WINDOW,
        sources=SOURCE_ADDRESSES,
        drain_seconds=CHURN_DRAIN_SECONDS,
    )
    return start, made, seconds


def open_held(address, config, line):
    """Open held_connections connections, each sending ``line`` (maybe empty) once, report
    them and wait for the coordinator's release: (descriptors, the opening's start)."""
    wanted = config["held_connections"]
    start = time.monotonic()
    # Opening must end early enough for its failure to reach the coordinator before the
    # run's deadline, which started before this process did; open_connections() may take
    # twice the time it is given (it waits for the connections in flight when it stops).
    opening_seconds = config["report_by"] - REPORT_SECONDS - start
    if opening_seconds <= 0:
        raise TimeoutError("no time was left to open the connections in")
    descriptors, seconds = _loadgen.open_connections(
        address,
        line,
        wanted,
        opening_seconds / 2,
        window=CONNECT_WINDOW,
        sources=SOURCE_ADDRESSES,
    )
    try:
        if len(descriptors) < wanted:
            raise TimeoutError(
                f"opened {len(descriptors):,} of {wanted:,} connections "
                f"in {time.monotonic() - start:.1f} s"
            )
        emit({"opened": len(descriptors), "start": start, "seconds": seconds})
        receive_command()
    except BaseException:
        close_all(descriptors)
        raise
    return descriptors


def close_all(descriptors):
    for descriptor in descriptors:
        os.close(descriptor)


def hold_idle(workload, address, config):
    """Idle connections held silent; once released, one line on each, then closed."""
    descriptors = open_held(address, config, b"")
    try:
        start = time.monotonic()
        for descriptor in descriptors:
            # 64 bytes into the empty send buffer of a connection: written whole.
            os.write(descriptor, LINE)
    finally:
        close_all(descriptors)
    return start, len(descriptors), time.monotonic() - start


def silent_live(workload, address, config):
    """One connection streams lines for --seconds alone; then silent connections are held
    after one line each and, once released, another streams for --seconds while they stay
    silent.  Reports the second stream itself and closes the silent connections only when
    told to, once the server has counted it: their ends, queued in the server before the
    live stream's last lines, would otherwise be timed as the live connection's."""
    start, sent, seconds = send_stream(workload, address, config)
    emit({"start": start, "sent_units": sent, "seconds": seconds})
    receive_command()
    descriptors = open_held(address, config, LINE)
    try:
        start, sent, seconds = send_stream(workload, address, config)
        report(config, start, sent, seconds)
        receive_command()
    finally:
        close_all(descriptors)


def report(config, start, units, seconds):
    """The run's last report: what was sent, and the CPU used since sending began."""
    emit(
        {
            "start": start,
            "sent_units": units,
            "seconds": seconds,
            "cpu_seconds": time.process_time() - config["cpu_at_start"],
        }
    )


def main(config):
    pin(config["cpus"])
    raise_open_file_limit(config["held_connections"])
    workload = WORKLOADS[config["workload"]]
    address = config["address"]
    if isinstance(address, list):
        address = tuple(address)
    if workload.datagram:
        send = send_datagrams
    else:
        patterns = {"churn": churn, "idle": hold_idle, "silent": silent_live}
        send = patterns.get(workload.pattern, send_stream)
        if workload.transport == "tls":
            send = send_tls_stream
    config["cpu_at_start"] = time.process_time()
    sent = send(workload, address, config)
    if sent is not None:
        report(config, *sent)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
