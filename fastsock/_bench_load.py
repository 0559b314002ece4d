"""The load generator of one ``fastsock bench`` run.

Run by ``fastsock.benchmark`` as ``python -m fastsock._bench_load CONFIG``.  Streams and
datagrams are sent by the compiled generator (``fastsock._loadgen``, GIL-free); churn, which
is about connecting, is a plain socket loop.  It reports in one JSON line:
``{"start": T, "sent_units": N, "seconds": S}``, ``start`` on the system-wide monotonic
clock that the server process reads too.  For the idle workload it first reports
``{"opened": N}`` and waits for ``{"release": true}`` before sending.
"""

import errno
import json
import os
import selectors
import socket
import sys
import time

from fastsock import _loadgen
from fastsock.benchmark import (
    BULK_BLOCK_BYTES,
    DATAGRAM_CAP,
    LINE_BYTES,
    MESSAGES_PER_BLOCK,
    UDP_GSO_BYTES,
    UDP_GSO_SEGMENTS,
    WORKLOADS,
    emit,
    pin,
    raise_open_file_limit,
    receive_command,
)

LINE = b"x" * (LINE_BYTES - 1) + b"\n"
CHURN_WINDOW = 64
"""Churn connections in flight at once: far below the listen backlog (BACKLOG)."""
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
    return socket.AF_INET if workload.transport in ("tcp", "udp") else socket.AF_UNIX


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
    """Connect, send one line, shut down: up to churn_connections times, or for --seconds.

    At most CHURN_WINDOW connections are in flight; one is done when the server closes its
    side.  An open loop would overflow the listen backlog, and the kernel's 1-second retry
    of a dropped SYN would then be what the run measured.
    """
    start = time.monotonic()
    deadline = start + config["seconds"]
    sent = made = 0
    with selectors.DefaultSelector() as selector:
        while True:
            now = time.monotonic()
            while (
                made < config["churn_connections"]
                and now < deadline
                and len(selector.get_map()) < CHURN_WINDOW
            ):
                selector.register(start_connecting(workload, address), selectors.EVENT_WRITE)
                made += 1
            if not selector.get_map():
                break
            if now > deadline + CHURN_DRAIN_SECONDS:
                raise TimeoutError(
                    f"the server did not close {len(selector.get_map())} connections "
                    f"within {CHURN_DRAIN_SECONDS} s"
                )
            for key, events in selector.select(timeout=CHURN_DRAIN_SECONDS):
                connection = key.fileobj
                if events & selectors.EVENT_WRITE:
                    error = connection.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if error:
                        raise OSError(error, f"connecting to {address!r}: {os.strerror(error)}")
                    # 64 bytes into the empty send buffer of a new connection: sent whole.
                    connection.send(LINE)
                    connection.shutdown(socket.SHUT_WR)
                    selector.modify(connection, selectors.EVENT_READ)
                    sent += 1
                elif not connection.recv(LINE_BYTES):
                    selector.unregister(connection)
                    connection.close()
    return start, sent, time.monotonic() - start


def start_connecting(workload, address):
    connection = socket.socket(family(workload), socket.SOCK_STREAM)
    connection.setblocking(False)
    error = connection.connect_ex(address)
    if error not in (0, errno.EINPROGRESS):
        connection.close()
        raise OSError(error, f"connecting to {address!r}: {os.strerror(error)}")
    return connection


def hold_idle(workload, address, config):
    """Open idle_connections connections, report, wait; then one line on each and close."""
    connections = []
    try:
        for _ in range(config["idle_connections"]):
            connections.append(connect(workload, address))
        emit({"opened": len(connections)})
        receive_command()
        start = time.monotonic()
        for connection in connections:
            connection.sendall(LINE)
    finally:
        for connection in connections:
            connection.close()
    return start, len(connections), time.monotonic() - start


def main(config):
    pin(config["cpus"])
    raise_open_file_limit()
    workload = WORKLOADS[config["workload"]]
    address = config["address"]
    if isinstance(address, list):
        address = tuple(address)
    if workload.datagram:
        send = send_datagrams
    else:
        send = {"churn": churn, "idle": hold_idle}.get(workload.pattern, send_stream)
    start, units, seconds = send(workload, address, config)
    emit({"start": start, "sent_units": units, "seconds": seconds})


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
