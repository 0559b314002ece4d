"""The datagram receive loop, compiled and reference, and the sender-address codec."""

import contextlib
import os
import queue
import signal
import socket
import struct
import threading
import time

import pytest

from fastsock import _dgramloop, _ring, addresses
from fastsock._reference import dgramloop as reference_dgramloop
from fastsock._reference import ring as reference_ring
from fastsock.addresses import address_from_sockaddr, sockaddr_from_address
from tests.support import skip_without_ipv6_loopback

GENEROUS = 10.0
LARGEST_UDP_PAYLOAD = 65507
SEQUENCE = struct.Struct(">Q")

IMPLEMENTATIONS = {
    "compiled": (
        _ring.RingQueue,
        _dgramloop.DatagramCounters,
        _dgramloop.DatagramReceiver,
    ),
    "reference": (
        reference_ring.RingQueue,
        reference_dgramloop.DatagramCounters,
        reference_dgramloop.DatagramReceiver,
    ),
}


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def impl(request):
    return IMPLEMENTATIONS[request.param]


def _receiver(impl, sock, ring=None, **options):
    ring_class, counters_class, receiver_class = impl
    ring = ring if ring is not None else ring_class()
    counters = counters_class()
    return receiver_class(sock.fileno(), ring, counters, **options), ring, counters


@contextlib.contextmanager
def _running(receiver, wake=None):
    """Run receiver.run() in a thread for the block; then stop it (calling `wake`, if
    given, to make a receiver with a long check interval look at the request) and join it.
    Yields a dict that holds the thread under "thread" and gets the end name under "end"."""
    outcome = {}

    def run():
        try:
            outcome["end"] = receiver.run()
        except BaseException as exc:  # noqa: B036 - handed back to the test as is
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    outcome["thread"] = thread
    try:
        yield outcome
    finally:
        receiver.stop()
        if wake is not None:
            wake()
        thread.join(GENEROUS)
    assert not thread.is_alive(), "run() did not return after stop()"
    if "error" in outcome:
        raise outcome["error"]


def _drain(ring, expected, timeout=GENEROUS):
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < expected and time.monotonic() < deadline:
        with contextlib.suppress(queue.Empty):
            got.extend(ring.get_many(timeout=0.05, with_source=True))
    return got


def _wait_until(predicate, timeout=GENEROUS):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _accounted(counters):
    stats = counters.snapshot()
    return stats.datagrams_received + stats.datagrams_dropped


def _udp_pair(host="127.0.0.1"):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server = socket.socket(family, socket.SOCK_DGRAM)
    client = socket.socket(family, socket.SOCK_DGRAM)
    server.bind((host, 0))
    client.bind((host, 0))
    client.connect(server.getsockname())
    client.settimeout(GENEROUS)
    return server, client


# -- delivery and sender addresses -------------------------------------------------------


def _sockets(kind, sock_dir):
    """(server, client, expected sender address) for each kind of datagram sender."""
    if kind == "udp4":
        server, client = _udp_pair("127.0.0.1")
        return server, client, client.getsockname()
    if kind == "udp6":
        skip_without_ipv6_loopback()
        server, client = _udp_pair("::1")
        return server, client, client.getsockname()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(os.path.join(sock_dir, "server"))
    client = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    client.settimeout(GENEROUS)
    if kind == "unix_path":
        client.bind(os.path.join(sock_dir, "client"))
    elif kind == "unix_abstract":
        client.bind("")  # Linux autobinds an abstract name
    client.connect(server.getsockname())
    return server, client, None if kind == "unix_unbound" else client.getsockname()


@pytest.mark.parametrize("kind", ["udp4", "udp6", "unix_path", "unix_abstract", "unix_unbound"])
def test_datagrams_arrive_in_order_with_their_sender(impl, kind, sock_dir):
    server, client, sender = _sockets(kind, sock_dir)
    payloads = [b"%d:" % n + b"p" * (n * 37 % 1400) for n in range(60)] + [b""]
    with server, client:
        receiver, ring, counters = _receiver(impl, server)
        with _running(receiver) as outcome:
            for payload in payloads:
                client.send(payload)
            got = _drain(ring, len(payloads))
        assert outcome["end"] == "stopped"
    assert [payload for _, _, payload in got] == payloads
    expected_source = sockaddr_from_address(sender, server.family) or None
    assert {source for _, source, _ in got} == {expected_source}
    assert {source_id for source_id, _, _ in got} == {0}
    assert address_from_sockaddr(got[0][1]) == sender
    if kind == "unix_abstract":
        assert isinstance(sender, bytes) and sender.startswith(b"\0")
    stats = counters.snapshot()
    assert stats.datagrams_received == len(payloads)
    assert stats.bytes_received == sum(map(len, payloads))
    assert stats.datagrams_dropped == 0
    assert 1 <= stats.receive_calls <= len(payloads)


def test_the_largest_udp_datagrams_arrive_whole(impl):
    server, client = _udp_pair()
    with server, client:
        receiver, ring, counters = _receiver(impl, server)
        with _running(receiver):
            for n in range(5):
                payload = bytes([n]) * LARGEST_UDP_PAYLOAD
                client.send(payload)
                assert ring.get(timeout=GENEROUS) == payload
    assert counters.snapshot().truncated == 0


@pytest.mark.parametrize("family", [socket.AF_UNIX, socket.AF_INET])
def test_longer_datagrams_are_counted_as_truncated_never_delivered_cut(impl, family):
    if family == socket.AF_UNIX:
        server, client = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        sizes = [100, 101, 0, 5000, 99, 70_000]
    else:
        server, client = _udp_pair()
        sizes = [100, 101, 0, LARGEST_UDP_PAYLOAD, 99]
    with server, client:
        receiver, ring, counters = _receiver(impl, server, max_datagram=100)
        with _running(receiver):
            for size in sizes:
                client.send(b"t" * size)
            assert _wait_until(lambda: _accounted(counters) == len(sizes))
            got = [payload for _, _, payload in _drain(ring, 3)]
    assert got == [b"t" * 100, b"", b"t" * 99]
    stats = counters.snapshot()
    assert stats.truncated == len(sizes) - 3
    assert stats.datagrams_received == 3


# -- accounting for every datagram ---------------------------------------------------------


def test_a_full_ring_drops_and_counts_every_datagram(impl):
    ring_class = impl[0]
    ring = ring_class(max_messages=8)
    server, client = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    client.settimeout(GENEROUS)
    sent = 200
    oversize = set(range(5, sent, 10))
    with server, client:
        receiver, ring, counters = _receiver(impl, server, ring=ring, max_datagram=128)
        with _running(receiver):
            for n in range(sent):
                client.send(SEQUENCE.pack(n) + bytes(192 if n in oversize else 56))
            assert _wait_until(lambda: _accounted(counters) == sent)
    stats = counters.snapshot()
    assert sent == (
        stats.datagrams_received + stats.dropped_queue_full + stats.truncated + stats.kernel_drops
    )
    assert stats.datagrams_received == 8
    assert stats.truncated == len(oversize)
    assert stats.dropped_queue_full == sent - 8 - len(oversize)
    assert stats.dropped_queue_full_bytes == 64 * stats.dropped_queue_full
    assert ring.stats.dropped_messages == stats.dropped_queue_full
    assert ring.stats.dropped_bytes == stats.dropped_queue_full_bytes
    delivered = [SEQUENCE.unpack(payload[:8])[0] for payload in ring.get_many()]
    assert delivered == [n for n in range(sent) if n not in oversize][:8]


def _burst(client, first, count):
    for n in range(first, first + count):
        client.send(SEQUENCE.pack(n) + bytes(56))


def _collect_sequence_numbers(ring, numbers):
    while not ring.empty():
        numbers.extend(SEQUENCE.unpack(payload[:8])[0] for payload in ring.get_many())
    return numbers


def test_a_consumer_never_takes_a_datagram_the_counters_have_not_counted(impl):
    # The loop publishes a batch, then counts it: a consumer taking it at once and reading
    # the counters must find it counted (and a drop likewise), never a count that lags.
    server, client = _udp_pair()
    receiver, ring, counters = _receiver(impl, server, ring=impl[0](max_messages=256))
    sending = threading.Event()

    def send():
        for number in range(200_000):
            if not sending.is_set():
                return
            with contextlib.suppress(OSError):
                client.send(SEQUENCE.pack(number))

    sender = threading.Thread(target=send, daemon=True)
    taken = checks = lagging = 0
    with server, client, _running(receiver):
        sending.set()
        sender.start()
        deadline = time.monotonic() + 5.0
        while sender.is_alive() and checks < 20_000 and time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                taken += len(ring.get_many(64, timeout=0.05))
                stats = counters.snapshot()
                checks += 1
                lagging += stats.datagrams_received < taken
        sending.clear()
        sender.join(GENEROUS)
    assert checks > 100, "the consumer took too few batches to tell"
    assert lagging == 0, f"{lagging} of {checks} snapshots counted less than was taken"


def test_kernel_drops_after_the_last_datagram_show_within_a_check_interval(impl):
    # The socket's queue fills within the first few datagrams of the burst and the kernel
    # drops the rest: no later datagram reports those drops, so the loop must read the
    # kernel's counter itself.
    server, client = _udp_pair()
    sent = 1000
    with server, client:
        receiver, ring, counters = _receiver(impl, server, receive_buffer=1)
        _burst(client, 0, sent)
        with _running(receiver):
            assert _wait_until(lambda: _accounted(counters) == sent), counters.snapshot()
    stats = counters.snapshot()
    assert stats.kernel_drops > 0
    assert stats.datagrams_received + stats.kernel_drops == sent
    numbers = _collect_sequence_numbers(ring, [])
    assert len(numbers) == stats.datagrams_received
    assert numbers == sorted(set(numbers))


def test_kernel_drops_show_within_a_check_interval_while_the_socket_stays_busy(impl):
    # The loop never waits out a receive timeout here, so only its timed check-in can read
    # the kernel's counter: the drops must show while the datagrams still flow.
    server, client = _udp_pair()
    client.setblocking(False)
    stop_sending = threading.Event()
    sent = 0

    def flood():
        nonlocal sent
        deadline = time.monotonic() + GENEROUS
        while not stop_sending.is_set() and time.monotonic() < deadline:
            with contextlib.suppress(BlockingIOError):
                client.send(SEQUENCE.pack(sent) + bytes(56))
                sent += 1

    with server, client:
        receiver, ring, counters = _receiver(impl, server, receive_buffer=1, check_interval=0.05)
        sender = threading.Thread(target=flood)
        with _running(receiver):
            sender.start()
            try:
                assert _wait_until(lambda: counters.snapshot().kernel_drops > 0)
                assert sender.is_alive(), "the drops showed only after the flood ended"
            finally:
                stop_sending.set()
                sender.join()
            assert _wait_until(lambda: _accounted(counters) == sent), counters.snapshot()
    stats = counters.snapshot()
    assert stats.datagrams_received + stats.kernel_drops == sent
    numbers = _collect_sequence_numbers(ring, [])
    assert len(numbers) == stats.datagrams_received
    assert numbers == sorted(set(numbers))


def test_drops_before_the_receiver_existed_are_not_counted(impl):
    # The socket dropped datagrams before the receiver was made, and some of the survivors
    # are still queued when it starts: only the drops after its construction are its own.
    server, client = _udp_pair()
    with server, client:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
        server.settimeout(0.2)
        _burst(client, 0, 500)
        with contextlib.suppress(TimeoutError):
            while True:
                server.recv(100)
        _burst(client, 500, 500)
        server.settimeout(None)
        earlier_drops = _socket_meminfo(server).drops
        receiver, ring, counters = _receiver(impl, server)
        with _running(receiver):
            assert _wait_until(lambda: _socket_meminfo(server).queued_bytes == 0)
            time.sleep(0.2)  # a few check-ins
            assert counters.snapshot().kernel_drops == 0
            _burst(client, 1000, 500)
            assert _wait_until(
                lambda: (
                    _socket_meminfo(server).queued_bytes == 0
                    and counters.snapshot().kernel_drops
                    == _socket_meminfo(server).drops - earlier_drops
                )
            )
    stats = counters.snapshot()
    assert stats.kernel_drops > 0
    numbers = _collect_sequence_numbers(ring, [])
    assert len(numbers) == stats.datagrams_received
    queued_at_start = sum(1 for n in numbers if n < 1000)
    assert stats.datagrams_received + stats.kernel_drops == queued_at_start + 500


class _Meminfo:
    def __init__(self, values):
        self.queued_bytes = values[0]  # SK_MEMINFO_RMEM_ALLOC
        self.drops = values[8]  # SK_MEMINFO_DROPS


def _socket_meminfo(sock):
    return _Meminfo(
        struct.unpack("9I", sock.getsockopt(socket.SOL_SOCKET, reference_dgramloop.SO_MEMINFO, 36))
    )


# -- ends ---------------------------------------------------------------------------------


def test_stop_from_another_thread_ends_an_idle_loop(impl):
    server, client = _udp_pair()
    with server, client:
        receiver, _, _ = _receiver(impl, server)
        with _running(receiver) as outcome:
            time.sleep(0.2)
            stopped_at = time.monotonic()
        assert outcome["end"] == "stopped"
        assert time.monotonic() - stopped_at < 2.0
        assert receiver.run() == "stopped"


def test_run_is_refused_while_another_thread_runs_it(impl):
    server, client = _udp_pair()
    with server, client:
        receiver, ring, _ = _receiver(impl, server)
        with _running(receiver):
            client.send(b"started")
            assert ring.get(timeout=GENEROUS) == b"started"
            with pytest.raises(RuntimeError):
                receiver.run()


def test_ctrl_c_interrupts_a_loop_in_the_main_thread_which_can_resume(impl):
    server, client = _udp_pair()
    with server, client:
        receiver, ring, _ = _receiver(impl, server)
        main = threading.get_ident()
        threading.Timer(0.2, signal.pthread_kill, (main, signal.SIGINT)).start()
        started = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            receiver.run()
        assert time.monotonic() - started < GENEROUS
        with _running(receiver) as outcome:
            client.send(b"after")
            assert ring.get(timeout=GENEROUS) == b"after"
        assert outcome["end"] == "stopped"


def test_closing_the_ring_ends_an_idle_loop(impl):
    server, client = _udp_pair()
    with server, client:
        receiver, ring, _ = _receiver(impl, server)
        with _running(receiver) as outcome:
            time.sleep(0.1)
            ring.close()
            assert _wait_until(lambda: "end" in outcome)
        assert outcome["end"] == "ring_closed"


def test_a_closed_ring_leaves_the_datagrams_in_the_socket(impl):
    server, client = _udp_pair()
    with server, client:
        receiver, ring, counters = _receiver(impl, server)
        ring.close()
        client.send(b"kept")
        assert receiver.run() == "ring_closed"
        assert server.recv(100, socket.MSG_DONTWAIT) == b"kept"
    assert counters.snapshot() == reference_dgramloop.DatagramStats.zero()


# -- arguments and socket options ----------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"max_datagram": 0},
        {"max_datagram": 1001},  # over the ring's max_bytes
        {"batch": 0},
        {"batch": 1025},
        {"check_interval": 0},
        {"check_interval": -1.0},
        {"check_interval": float("nan")},
        {"check_interval": float("inf")},
        {"check_interval": 86401.0},
        {"receive_buffer": 0},
        {"receive_buffer": 2**31},
        {"busy_poll": -0.001},
        {"busy_poll": 0.2, "check_interval": 0.1},  # polls past the check-in
        {"busy_poll": float("nan")},
    ],
)
def test_bad_arguments_are_refused(impl, options):
    ring_class = impl[0]
    server, client = _udp_pair()
    with server, client, pytest.raises(ValueError):
        _receiver(impl, server, ring=ring_class(max_bytes=1000), **options)


def _runnable_share_while_idle(receiver, client, datagrams, seconds):
    """The share of samples, every 5 ms for ``seconds``, in which the thread running
    ``receiver`` is runnable (state R in /proc), after a burst of ``datagrams`` queued before
    it starts so that it takes them in one batch; the socket then stays silent.  A polling
    loop stays runnable however busy the machine is; CPU time would measure the machine."""
    _burst(client, 0, datagrams)
    samples = []
    with _running(receiver) as outcome:
        stat_path = f"/proc/self/task/{outcome['thread'].native_id}/stat"
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            with open(stat_path) as stat:
                # The state follows the parenthesised command name, which may hold spaces.
                samples.append(stat.read().rpartition(")")[2].split()[0] == "R")
            time.sleep(0.005)
    return sum(samples) / len(samples)


def test_a_busy_batch_keeps_the_loop_polling_a_light_one_lets_it_sleep():
    impl = IMPLEMENTATIONS["compiled"]
    server, client = _udp_pair()
    with server, client:
        # A receiver per measurement: a stopped one returns at once when run again.
        polling, _, _ = _receiver(impl, server, busy_poll=0.5, check_interval=1.0)
        busy = _runnable_share_while_idle(polling, client, 64, 0.4)
        polling, _, _ = _receiver(impl, server, busy_poll=0.5, check_interval=1.0)
        light = _runnable_share_while_idle(polling, client, 1, 0.4)
        sleeping, _, _ = _receiver(impl, server, busy_poll=0, check_interval=1.0)
        off = _runnable_share_while_idle(sleeping, client, 64, 0.4)
    assert busy > 0.8, busy
    assert light < 0.2, light
    assert off < 0.2, off


def test_only_blocking_datagram_sockets_are_accepted(impl):
    ring_class, counters_class, receiver_class = impl
    with pytest.raises(ValueError):
        receiver_class(-1, ring_class(), counters_class())
    stream, _ = pair = socket.socketpair()
    with pair[0], pair[1], pytest.raises(ValueError, match="datagram"):
        _receiver(impl, stream)
    server, client = _udp_pair()
    with server, client:
        server.settimeout(1.0)
        with pytest.raises(ValueError, match="blocking"):
            _receiver(impl, server)
    read_end, write_end = os.pipe()
    os.close(write_end)
    os.close(read_end)
    with pytest.raises(OSError):
        receiver_class(read_end, ring_class(), counters_class())


def test_the_granted_receive_buffer_is_reported(impl):
    server, client = _udp_pair()
    with server, client:
        receiver, _, _ = _receiver(impl, server, receive_buffer=1)
        small = receiver.receive_buffer
        assert small == server.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        receiver, _, _ = _receiver(impl, server, receive_buffer=300_000)
        assert receiver.receive_buffer == server.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        assert receiver.receive_buffer > small


def test_fresh_counters_are_zero(impl):
    counters_class = impl[1]
    assert counters_class().snapshot() == reference_dgramloop.DatagramStats.zero()


# Forking while the watchdog's thread runs is harmless here (the child only runs the
# receiver), but Python 3.12+ warns about it on every fork.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_compiled_counters_and_ring_are_shared_with_a_forked_receiver(reap_children):
    server, client = _udp_pair()
    ring = _ring.RingQueue()
    counters = _dgramloop.DatagramCounters()
    with server, client:
        pid = os.fork()
        if pid == 0:
            try:
                receiver = _dgramloop.DatagramReceiver(server.fileno(), ring, counters)
                os._exit(0 if receiver.run() == "ring_closed" else 1)
            finally:
                os._exit(2)
        for n in range(10):
            client.send(b"%d" % n)
        assert _wait_until(lambda: counters.snapshot().datagrams_received == 10)
        got = _drain(ring, 10)
        ring.close()
        assert _wait_until(lambda: os.waitpid(pid, os.WNOHANG) == (pid, 0))
        assert {address_from_sockaddr(source) for _, source, _ in got} == {client.getsockname()}
    assert [payload for _, _, payload in got] == [b"%d" % n for n in range(10)]


def _start_publish_in_a_killed_child(counters):
    """A publish begun by a process killed before it counted it, as a prefork worker killed
    with kill -9 mid-batch leaves it."""
    pid = os.fork()
    if pid == 0:
        try:
            counters._start_publish()
            os.kill(os.getpid(), signal.SIGKILL)
        finally:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_publish_whose_process_died_is_waited_for_by_one_snapshot_only(reap_children):
    counters = _dgramloop.DatagramCounters()
    _start_publish_in_a_killed_child(counters)
    assert counters.publishes_given_up == 0
    counters.snapshot()
    assert counters.publishes_given_up == 1
    # Before, every snapshot waited DATAGRAM_COUNT_WAIT for it and gave up again.
    for _ in range(20):
        counters.snapshot()
        assert counters.publishes_given_up == 1


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_publishes_beyond_those_given_up_on_are_still_waited_for(reap_children):
    counters = _dgramloop.DatagramCounters()
    _start_publish_in_a_killed_child(counters)
    counters.snapshot()
    counters._start_publish()
    counters._finish_publish()
    counters.snapshot()
    assert counters.publishes_given_up == 1, "a live publish that was counted: no wait"
    counters._start_publish()
    counters.snapshot()
    assert counters.publishes_given_up == 2, "an uncounted publish beyond the dead one"
    # Both were slow, not dead: once counted, later publishes are waited for from zero.
    counters._finish_publish()
    counters._finish_publish()
    counters.snapshot()
    assert counters.publishes_given_up == 0
    counters._start_publish()
    counters.snapshot()
    assert counters.publishes_given_up == 1


# -- sender addresses -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "family, address",
    [
        (socket.AF_INET, ("127.0.0.1", 0)),
        (socket.AF_INET, ("10.20.30.40", 65535)),
        (socket.AF_INET6, ("::1", 5, 0, 0)),
        (socket.AF_INET6, ("fe80::1:2", 7, 0xABCDE, 3)),
        (socket.AF_INET6, ("::ffff:1.2.3.4", 9, 0, 0)),
        (socket.AF_UNIX, "/tmp/some.sock"),
        (socket.AF_UNIX, os.fsdecode(b"/tmp/caf\xe9")),
        (socket.AF_UNIX, b"\0abstract"),
        (socket.AF_UNIX, b"\0"),
        (socket.AF_UNIX, ""),
        (socket.AF_UNIX, None),
    ],
)
def test_addresses_round_trip_through_their_sockaddr(family, address):
    blob = sockaddr_from_address(address, family)
    assert address_from_sockaddr(blob) == address
    assert address_from_sockaddr(bytes(bytearray(blob))) == address  # an equal blob: cached


def test_unknown_families_and_malformed_sockaddrs():
    unknown = struct.pack("=H", 4000) + b"0123456789abcdef"
    assert address_from_sockaddr(unknown) == (4000, b"0123456789abcd")
    assert address_from_sockaddr(b"") is None
    assert address_from_sockaddr(None) is None
    for blob in [b"\x02", sockaddr_from_address(("1.2.3.4", 5), socket.AF_INET)[:8]]:
        with pytest.raises(ValueError):
            address_from_sockaddr(blob)
    with pytest.raises(ValueError):
        sockaddr_from_address(("not-numeric", 1), socket.AF_INET)
    with pytest.raises(ValueError):
        sockaddr_from_address(("1.2.3.4", 70000), socket.AF_INET)
    with pytest.raises(ValueError):
        sockaddr_from_address("x" * 108, socket.AF_UNIX)


def test_the_address_cache_stays_bounded():
    for port in range(10_000):
        address_from_sockaddr(sockaddr_from_address(("127.0.0.1", port), socket.AF_INET))
    assert len(addresses._cache) <= addresses._CACHE_SIZE


@pytest.mark.parametrize("drain_timeout", [GENEROUS, 0.0])
def test_a_stop_reads_what_is_queued_on_the_socket_or_counts_it(impl, drain_timeout):
    server_side, client_side = _udp_pair()
    with server_side, client_side:
        receiver, ring, counters = _receiver(impl, server_side, drain_timeout=drain_timeout)
        sent = 200
        for number in range(sent):
            client_side.send(SEQUENCE.pack(number))
        receiver.stop()
        assert receiver.run() == "stopped"
        stats = counters.snapshot()
        if drain_timeout:
            assert [SEQUENCE.unpack(data)[0] for data in ring.get_many()] == list(range(sent))
            assert (stats.datagrams_received, stats.datagrams_unread) == (sent, 0)
        else:
            assert ring.qsize() == 0
            assert (stats.datagrams_received, stats.datagrams_unread) == (0, sent)
        assert stats.kernel_drops == 0
