"""Unix socket files: stale ones replaced, live ones and other files never touched, and
private permissions from the moment the file exists."""

import errno
import os
import socket
import stat
import threading

import pytest

import fastsock

GENEROUS = 10.0

SERVERS = [
    (fastsock.UnixStreamServer, fastsock.StreamRequestHandler, socket.SOCK_STREAM),
    (fastsock.UnixDatagramServer, fastsock.DatagramRequestHandler, socket.SOCK_DGRAM),
]


@pytest.fixture(params=SERVERS, ids=["stream", "datagram"])
def kind(request):
    return request.param


def _leave_stale_socket(path, socket_type):
    dead = socket.socket(socket.AF_UNIX, socket_type)
    dead.bind(path)
    dead.close()
    assert stat.S_ISSOCK(os.lstat(path).st_mode)


def _mode(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_a_stale_socket_file_is_replaced(kind, sock_dir):
    server_class, handler, socket_type = kind
    path = os.path.join(sock_dir, "s")
    _leave_stale_socket(path, socket_type)
    with server_class(path, handler) as server:
        assert server.server_address == path
        with socket.socket(socket.AF_UNIX, socket_type) as client:
            client.connect(path)


def test_a_live_servers_socket_is_never_unlinked(kind, sock_dir):
    server_class, handler, socket_type = kind
    path = os.path.join(sock_dir, "s")
    with server_class(path, handler):
        inode = os.lstat(path).st_ino
        with pytest.raises(OSError) as raised:
            server_class(path, handler)
        assert raised.value.errno == errno.EADDRINUSE
        assert os.lstat(path).st_ino == inode
        with socket.socket(socket.AF_UNIX, socket_type) as client:
            client.connect(path)


def test_a_regular_file_is_never_unlinked(kind, sock_dir):
    server_class, handler, _ = kind
    path = os.path.join(sock_dir, "data")
    with open(path, "w") as precious:
        precious.write("keep me")
    with pytest.raises(FileExistsError, match="not a socket"):
        server_class(path, handler)
    with open(path) as precious:
        assert precious.read() == "keep me"


def test_drop_in_servers_keep_the_stdlib_permissions(kind, sock_dir):
    server_class, handler, _ = kind
    path = os.path.join(sock_dir, "s")
    umask = os.umask(0o022)
    try:
        with server_class(path, handler):
            assert _mode(path) == 0o755
    finally:
        os.umask(umask)


def test_the_compiled_path_creates_private_socket_files(kind, sock_dir):
    server_class, _, _ = kind
    path = os.path.join(sock_dir, "s")
    umask = os.umask(0)
    try:
        # With umask 0 a plain bind creates the file 0777: 0600 can only come from the
        # creation itself, so there is no moment where the file is wider.
        with server_class(path, fastsock.receiver(fastsock.RingQueue())):
            assert _mode(path) == 0o600
        assert os.umask(0) == 0, "the process umask is restored"
    finally:
        os.umask(umask)


def test_socket_mode_keyword(kind, sock_dir):
    server_class, handler, _ = kind
    path = os.path.join(sock_dir, "s")
    with server_class(path, handler, socket_mode=0o660):
        assert _mode(path) == 0o660


@pytest.mark.parametrize("bad", [-1, 0o1000, "0600"])
def test_socket_mode_is_validated(bad, sock_dir):
    with pytest.raises(ValueError, match="socket_mode"):
        fastsock.UnixStreamServer(
            os.path.join(sock_dir, "s"), fastsock.StreamRequestHandler, socket_mode=bad
        )


def test_socket_mode_is_refused_for_inet_servers():
    with pytest.raises(ValueError, match="Unix"):
        fastsock.TCPServer(("127.0.0.1", 0), fastsock.StreamRequestHandler, socket_mode=0o600)


def test_concurrent_binds_with_modes_do_not_leak_their_umask(sock_dir):
    umask = os.umask(0o022)
    try:
        errors = []

        def bind(index):
            try:
                path = os.path.join(sock_dir, f"s{index}")
                with fastsock.UnixStreamServer(
                    path, fastsock.StreamRequestHandler, socket_mode=0o600
                ):
                    if _mode(path) != 0o600:
                        errors.append(path)
            except Exception as exc:
                errors.append(exc)

        threads = [threading.Thread(target=bind, args=(n,)) for n in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(GENEROUS)
        assert errors == []
        assert os.umask(0o022) == 0o022
    finally:
        os.umask(umask)
