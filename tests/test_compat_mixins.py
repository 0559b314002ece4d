"""The drop-in promise, ThreadingMixIn and ForkingMixIn: handlers in worker threads,
daemon_threads and block_on_close at server_close(), finished threads forgotten; handlers
in forked children, reaped at close, after a handle_request() timeout, and bounded by
max_children.

Each body runs against the stdlib ``socketserver`` (the oracle) and ``fastsock``: see
tests/compat_helpers.py.
"""

import os
import threading

import pytest

from tests.compat_helpers import (
    ignore_fork_with_threads_warning,
    pid_then_wait_handler,
    upper_echo_handler,
)
from tests.support import LOCALHOST, NETWORK_TIMEOUT, connect, recv_line, recv_until_eof, serving


@pytest.mark.parametrize("daemon_threads", [False, True])
def test_threading_handler_runs_in_a_worker_thread(ss, daemon_threads):
    threads = []

    class Handler(ss.StreamRequestHandler):
        def handle(self):
            threads.append(threading.current_thread())
            self.wfile.write(b"done\n")

    with ss.ThreadingTCPServer((LOCALHOST, 0), Handler) as server:
        server.daemon_threads = daemon_threads
        server.timeout = NETWORK_TIMEOUT
        with connect(server.server_address) as client:
            server.handle_request()
            assert recv_until_eof(client) == b"done\n"
    (thread,) = threads
    assert isinstance(thread, threading.Thread)
    assert thread is not threading.main_thread()
    assert thread.daemon is daemon_threads


@pytest.mark.parametrize(
    "block_on_close, daemon_threads, waits",
    [(True, False, True), (False, False, False), (True, True, False)],
    ids=["joins", "block_on_close=False", "daemon_threads=True"],
)
def test_threading_server_close_waits_for_non_daemon_threads(
    ss, block_on_close, daemon_threads, waits
):
    release = threading.Event()
    finished = threading.Event()

    class Slow(ss.BaseRequestHandler):
        def handle(self):
            release.wait(NETWORK_TIMEOUT)
            finished.set()

    server = ss.ThreadingTCPServer((LOCALHOST, 0), Slow)
    server.block_on_close = block_on_close
    server.daemon_threads = daemon_threads
    server.timeout = NETWORK_TIMEOUT
    with connect(server.server_address):
        server.handle_request()
        # The handler can finish only once released, a little after server_close() began.
        releaser = threading.Timer(0.2, release.set)
        releaser.start()
        try:
            server.server_close()
            assert finished.is_set() is waits
        finally:
            releaser.join()
            assert finished.wait(NETWORK_TIMEOUT)


def test_threading_server_forgets_finished_threads(ss):
    with ss.ThreadingTCPServer((LOCALHOST, 0), upper_echo_handler(ss)) as server:
        server.timeout = NETWORK_TIMEOUT
        tracked = []
        for _ in range(60):
            with connect(server.server_address) as client:
                client.sendall(b"x\n")
                server.handle_request()
                assert recv_until_eof(client) == b"X\n"
            tracked.append(len(server._threads))
    # Each new thread is tracked for server_close() to join, and the finished ones are
    # dropped as new ones come: a long-running server does not accumulate them.
    assert min(tracked) >= 1
    assert max(tracked) <= 10


@ignore_fork_with_threads_warning
def test_forking_handler_runs_in_a_child_reaped_at_close(ss, reap_children):
    server = ss.ForkingTCPServer((LOCALHOST, 0), pid_then_wait_handler(ss))
    server.timeout = NETWORK_TIMEOUT
    assert server.active_children is None
    with connect(server.server_address) as client:
        server.handle_request()
        child_pid = int(recv_line(client))
        assert child_pid != os.getpid()
        assert server.active_children == {child_pid}
        client.sendall(b"bye\n")
        assert recv_until_eof(client) == b""
    server.server_close()
    assert server.active_children == set()
    with pytest.raises(ChildProcessError):
        os.waitpid(child_pid, os.WNOHANG)


@ignore_fork_with_threads_warning
@pytest.mark.parametrize("block_on_close", [True, False])
def test_forking_server_close_and_block_on_close(ss, block_on_close, reap_children):
    server = ss.ForkingTCPServer((LOCALHOST, 0), pid_then_wait_handler(ss))
    server.block_on_close = block_on_close
    server.timeout = NETWORK_TIMEOUT
    with connect(server.server_address) as client:
        server.handle_request()
        child_pid = int(recv_line(client))
        # The child can exit only once released, a little after server_close() began.
        releaser = threading.Timer(0.2, client.sendall, [b"bye\n"])
        releaser.start()
        try:
            server.server_close()
            if block_on_close:
                assert server.active_children == set()
            else:
                assert server.active_children == {child_pid}
        finally:
            releaser.join()
    if not block_on_close:
        assert os.waitpid(child_pid, 0)[0] == child_pid


@ignore_fork_with_threads_warning
def test_forking_server_honours_max_children(ss, reap_children):
    class TwoChildren(ss.ForkingTCPServer):
        max_children = 2

    with serving(TwoChildren((LOCALHOST, 0), pid_then_wait_handler(ss))) as server:
        first, second, third = (connect(server.server_address) for _ in range(3))
        with first, second, third:
            recv_line(first)
            recv_line(second)
            # Two children run: the third connection waits until one of them exits.
            third.settimeout(0.5)
            with pytest.raises(TimeoutError):
                third.recv(100)
            third.settimeout(NETWORK_TIMEOUT)
            first.sendall(b"bye\n")
            assert recv_until_eof(first) == b""
            recv_line(third)
            for client in (second, third):
                client.sendall(b"bye\n")
                assert recv_until_eof(client) == b""


@ignore_fork_with_threads_warning
def test_forking_server_reaps_finished_children_when_handle_request_times_out(ss, reap_children):
    with ss.ForkingTCPServer((LOCALHOST, 0), upper_echo_handler(ss)) as server:
        server.timeout = NETWORK_TIMEOUT
        with connect(server.server_address) as client:
            client.sendall(b"x\n")
            server.handle_request()
            assert recv_until_eof(client) == b"X\n"
        assert len(server.active_children) == 1
        # The child has answered but may not have exited yet: idle ticks until it is reaped.
        server.timeout = 0.05
        for _ in range(int(NETWORK_TIMEOUT / server.timeout)):
            server.handle_request()
            if not server.active_children:
                break
        assert server.active_children == set()
