"""What fastsock's drop-in servers do better than the stdlib, and its opt-in switches."""

import errno
import logging
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import fastsock
from fastsock.errors import DatagramTruncatedError
from tests.support import fds_opened_since, open_fds, runnable_share

HOST = "127.0.0.1"
GENEROUS = 10.0


def _serve_in_thread(server, poll_interval=0.5):
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": poll_interval}, daemon=True
    )
    thread.start()
    return thread


class _EchoLine(fastsock.StreamRequestHandler):
    def handle(self):
        self.wfile.write(self.rfile.readline())


def _echo_roundtrip(address, family=socket.AF_INET, payload=b"ping\n"):
    with socket.socket(family, socket.SOCK_STREAM) as client:
        client.settimeout(GENEROUS)
        client.connect(address)
        client.sendall(payload)
        return client.makefile("rb").readline()


def test_shutdown_does_not_wait_for_the_poll_interval():
    with fastsock.TCPServer((HOST, 0), _EchoLine) as server:
        # The stdlib would take up to a whole poll_interval (60 s) to notice.
        thread = _serve_in_thread(server, poll_interval=60)
        assert _echo_roundtrip(server.server_address) == b"ping\n"
        started = time.monotonic()
        server.shutdown()
        thread.join(GENEROUS)
        assert not thread.is_alive()
        assert time.monotonic() - started < GENEROUS


def test_shutdown_from_a_handler_of_a_synchronous_server_stops_the_loop():
    class StopsServer(fastsock.BaseRequestHandler):
        def handle(self):
            self.server.shutdown()

    with fastsock.TCPServer((HOST, 0), StopsServer) as server:
        thread = _serve_in_thread(server, poll_interval=60)
        socket.create_connection(server.server_address, timeout=GENEROUS).close()
        thread.join(GENEROUS)
        assert not thread.is_alive()


def test_shutdown_from_a_signal_handler_stops_serve_forever_in_the_main_thread():
    with fastsock.TCPServer((HOST, 0), _EchoLine) as server:
        previous = signal.signal(signal.SIGUSR1, lambda signum, frame: server.shutdown())
        try:
            main = threading.get_ident()
            timer = threading.Timer(0.2, signal.pthread_kill, (main, signal.SIGUSR1))
            timer.start()
            started = time.monotonic()
            server.serve_forever(poll_interval=60)
            timer.join()
        finally:
            signal.signal(signal.SIGUSR1, previous)
        assert time.monotonic() - started < GENEROUS


def test_shutdown_before_serve_forever_starts_still_stops_it():
    with fastsock.TCPServer((HOST, 0), _EchoLine) as server:
        stopper = threading.Thread(target=server.shutdown)
        stopper.start()
        server.serve_forever(poll_interval=60)
        stopper.join(GENEROUS)
        assert not stopper.is_alive()


def test_serve_forever_can_run_again_after_shutdown():
    with fastsock.ThreadingTCPServer((HOST, 0), _EchoLine) as server:
        for _ in range(3):
            thread = _serve_in_thread(server, poll_interval=60)
            assert _echo_roundtrip(server.server_address) == b"ping\n"
            server.shutdown()
            thread.join(GENEROUS)
            assert not thread.is_alive()


_EXHAUSTION_SERVER = textwrap.dedent(
    """
    import os, resource, sys, threading
    import fastsock

    class Hold(fastsock.StreamRequestHandler):
        def handle(self):
            for line in self.rfile:
                self.wfile.write(line)

    server = fastsock.ThreadingTCPServer(("127.0.0.1", 0), Hold, backlog=128)
    server.daemon_threads = True
    in_use = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 12, in_use + 12))
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    print(server.server_address[1], serving.native_id, flush=True)
    sys.stdin.read()
    """
)


@pytest.mark.parametrize("module", ["fastsock", "socketserver"])
def test_accept_pauses_instead_of_spinning_when_file_descriptors_run_out(module, tmp_path):
    script = tmp_path / "server.py"
    script.write_text(_EXHAUSTION_SERVER.replace("import fastsock", f"import {module} as fastsock"))
    if module == "socketserver":
        # The stdlib has no backlog switch: same server, stdlib defaults.
        script.write_text(script.read_text().replace(", backlog=128", ""))
    child = subprocess.Popen(
        [sys.executable, str(script)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    clients = []
    try:
        port, serving = map(int, child.stdout.readline().split())
        # More clients than the server has descriptors for, fewer than the stdlib's
        # backlog of 5 can hold beyond them.
        for _ in range(16):
            clients.append(socket.create_connection((HOST, port), timeout=GENEROUS))
        time.sleep(0.3)
        # Judged by the serving thread's state, not by CPU time: a busy machine takes cores
        # away from a spinning thread, but it stays runnable.
        running = runnable_share(child.pid, [serving])
        if module == "socketserver":
            # The control: the stdlib spins on the pending connections it cannot accept.
            assert running > 0.5, running
            return
        assert running < 0.25, running
        for client in clients[:10]:
            client.close()
        del clients[:10]
        reply = None
        deadline = time.monotonic() + GENEROUS
        while reply != b"back\n" and time.monotonic() < deadline:
            try:
                reply = _echo_roundtrip((HOST, port), payload=b"back\n")
            except OSError:
                time.sleep(0.1)
        assert reply == b"back\n"
    finally:
        for client in clients:
            client.close()
        child.kill()
        _, stderr = child.communicate(timeout=GENEROUS)
    if module == "fastsock":
        assert "accepting paused" in stderr


def _has_ipv6_loopback():
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback")


@needs_ipv6
def test_ipv6_server_by_keyword():
    with fastsock.ThreadingTCPServer(
        ("::1", 0), _EchoLine, address_family=socket.AF_INET6
    ) as server:
        thread = _serve_in_thread(server)
        assert server.socket.family == socket.AF_INET6
        assert _echo_roundtrip(server.server_address[:2], socket.AF_INET6) == b"ping\n"
        server.shutdown()
        thread.join(GENEROUS)


@needs_ipv6
def test_dual_stack_server_accepts_ipv4_and_ipv6_clients():
    with fastsock.ThreadingTCPServer(("::", 0), _EchoLine, dual_stack=True) as server:
        thread = _serve_in_thread(server)
        port = server.server_address[1]
        assert _echo_roundtrip((HOST, port)) == b"ping\n"
        assert _echo_roundtrip(("::1", port), socket.AF_INET6) == b"ping\n"
        server.shutdown()
        thread.join(GENEROUS)


@needs_ipv6
def test_ipv6_only_server_refuses_ipv4_clients():
    with fastsock.TCPServer(("::", 0), _EchoLine, dual_stack=False) as server:
        assert server.socket.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((HOST, server.server_address[1]), timeout=GENEROUS)


def test_dual_stack_is_refused_for_an_ipv4_family():
    with pytest.raises(ValueError, match="dual_stack"):
        fastsock.TCPServer((HOST, 0), _EchoLine, address_family=socket.AF_INET, dual_stack=True)


def _connects_completed_without_accept(server, attempts):
    completed = 0
    clients = []
    try:
        for _ in range(attempts):
            client = socket.socket()
            clients.append(client)
            client.settimeout(0.5)
            try:
                client.connect(server.server_address)
            except OSError:
                break
            completed += 1
    finally:
        for client in clients:
            client.close()
    return completed


def test_backlog_keyword_sets_the_listen_queue():
    with fastsock.TCPServer((HOST, 0), _EchoLine, backlog=64) as server:
        assert server.request_queue_size == 64
        assert _connects_completed_without_accept(server, 40) == 40
    # Control: with the stdlib's backlog of 5 the kernel stops completing handshakes.
    with fastsock.TCPServer((HOST, 0), _EchoLine) as server:
        assert _connects_completed_without_accept(server, 40) < 40


@pytest.mark.parametrize("bad", [0, -1, 2.5, "64"])
def test_backlog_keyword_is_validated(bad):
    with pytest.raises(ValueError, match="backlog"):
        fastsock.TCPServer((HOST, 0), _EchoLine, backlog=bad)


def test_backlog_keyword_is_refused_for_datagram_servers():
    with pytest.raises(ValueError, match="stream"):
        fastsock.UDPServer((HOST, 0), fastsock.DatagramRequestHandler, backlog=10)


def test_failed_bind_with_keywords_closes_the_socket():
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        fds_before = open_fds()
        for _ in range(50):
            with pytest.raises(OSError):
                fastsock.TCPServer(taken.getsockname(), _EchoLine, backlog=32)
        assert fds_opened_since(fds_before) == {}


class _Blocking(fastsock.BaseRequestHandler):
    def handle(self):
        server = self.server
        with server.lock:
            server.running += 1
            server.most_running = max(server.most_running, server.running)
            server.thread_names.add(threading.current_thread().name)
        server.release.wait(GENEROUS)
        with server.lock:
            server.running -= 1
            server.handled += 1


def _pool_server(max_threads, cls=fastsock.ThreadingTCPServer):
    backlog = {"backlog": 64} if cls.socket_type == socket.SOCK_STREAM else {}
    server = cls((HOST, 0), _Blocking, **backlog)
    server.max_threads = max_threads
    server.lock = threading.Lock()
    server.release = threading.Event()
    server.running = server.most_running = server.handled = 0
    server.thread_names = set()
    return server


def _wait_until(predicate, timeout=GENEROUS):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def test_bounded_thread_pool_never_runs_more_handlers_than_max_threads():
    server = _pool_server(max_threads=4)
    with server:
        thread = _serve_in_thread(server)
        clients = [socket.create_connection(server.server_address) for _ in range(20)]
        _wait_until(lambda: server.running == 4)
        time.sleep(0.2)
        assert server.most_running == 4
        server.release.set()
        _wait_until(lambda: server.handled == 20)
        assert server.most_running == 4
        assert len(server.thread_names) <= 4
        server.shutdown()
        thread.join(GENEROUS)
        for client in clients:
            client.close()


def test_bounded_thread_pool_reuses_threads_for_datagrams():
    server = _pool_server(max_threads=2, cls=fastsock.ThreadingUDPServer)
    server.release.set()
    with server, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        thread = _serve_in_thread(server)
        for index in range(200):
            client.sendto(b"%d" % index, server.server_address)
            if index % 50 == 49:
                _wait_until(lambda index=index: server.handled == index + 1)
        _wait_until(lambda: server.handled == 200)
        assert len(server.thread_names) <= 2
        server.shutdown()
        thread.join(GENEROUS)


def test_bounded_thread_pool_threads_are_joined_at_close():
    server = _pool_server(max_threads=3)
    thread = _serve_in_thread(server)
    clients = [socket.create_connection(server.server_address) for _ in range(3)]
    _wait_until(lambda: server.running == 3)
    server.shutdown()
    thread.join(GENEROUS)
    closer = threading.Thread(target=server.server_close)
    closer.start()
    time.sleep(0.2)
    assert closer.is_alive(), "block_on_close must wait for running handlers"
    server.release.set()
    closer.join(GENEROUS)
    assert not closer.is_alive()
    assert server.handled == 3
    assert not [t for t in threading.enumerate() if t.name.startswith("ThreadingTCPServer")]
    for client in clients:
        client.close()


def test_shutdown_is_prompt_while_the_thread_pool_is_saturated():
    server = _pool_server(max_threads=1)
    with server:
        thread = _serve_in_thread(server)
        clients = [socket.create_connection(server.server_address) for _ in range(3)]
        _wait_until(lambda: server.running == 1)
        time.sleep(0.2)
        server.shutdown()
        thread.join(GENEROUS)
        assert not thread.is_alive()
        server.release.set()
        for client in clients:
            client.close()


@pytest.mark.parametrize("bad", [0, -3, 1.5])
def test_max_threads_is_validated(bad):
    server = _pool_server(max_threads=bad)
    with server, socket.create_connection(server.server_address):
        request, client_address = server.get_request()
        with request, pytest.raises(ValueError, match="max_threads"):
            server.process_request(request, client_address)


class _RecordDatagram(fastsock.DatagramRequestHandler):
    def handle(self):
        self.server.received.append(self.packet)


def _udp_server(**attributes):
    server = fastsock.UDPServer((HOST, 0), _RecordDatagram)
    server.received = []
    server.timeout = GENEROUS
    for name, value in attributes.items():
        setattr(server, name, value)
    return server


def test_truncation_is_silent_by_default_as_in_the_stdlib():
    with (
        _udp_server(max_packet_size=100) as server,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client,
    ):
        client.sendto(b"x" * 200, server.server_address)
        server.handle_request()
        assert server.received == [b"x" * 100]
        assert server.truncated_datagrams == 0


def test_truncation_is_detected_counted_and_logged_when_asked(caplog):
    with (
        _udp_server(max_packet_size=100, report_truncation=True) as server,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client,
    ):
        client.sendto(b"x" * 200, server.server_address)
        client.sendto(b"y" * 100, server.server_address)
        with caplog.at_level(logging.WARNING, logger="fastsock"):
            with pytest.raises(DatagramTruncatedError) as raised:
                server.get_request()
            server.handle_request()
        assert raised.value.errno == errno.EMSGSIZE
        assert isinstance(raised.value, OSError)
        assert server.received == [b"y" * 100]
        assert server.truncated_datagrams == 1
        assert "longer than max_packet_size=100" in caplog.text


def test_truncated_datagram_is_not_a_request_in_the_serving_loop():
    with (
        _udp_server(max_packet_size=10, report_truncation=True) as server,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client,
    ):
        thread = _serve_in_thread(server)
        client.sendto(b"z" * 11, server.server_address)
        client.sendto(b"ok", server.server_address)
        _wait_until(lambda: server.received == [b"ok"])
        assert server.truncated_datagrams == 1
        server.shutdown()
        thread.join(GENEROUS)


@pytest.mark.parametrize("name", ["ForkingUnixStreamServer", "ForkingUnixDatagramServer"])
def test_the_312_forking_unix_servers_exist_on_every_version(name):
    server_class = getattr(fastsock, name)
    assert issubclass(server_class, fastsock.ForkingMixIn)
    assert (name in fastsock.__all__) == (sys.version_info >= (3, 12))
