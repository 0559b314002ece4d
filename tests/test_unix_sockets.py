"""Unix socket files: stale ones replaced, by exactly one of the servers starting at once,
live ones and other files never touched, and private permissions from the moment the file
exists."""

import errno
import multiprocessing
import os
import socket
import stat
import threading

import pytest

import fastsock

GENEROUS = 10.0
RACERS = 4
RACE_ROUNDS = 300

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


def test_where_no_lock_file_can_be_made_a_stale_socket_is_kept(kind, sock_dir):
    server_class, handler, socket_type = kind
    path = os.path.join(sock_dir, "s")
    # A directory where the lock file goes: open() fails as in a directory the user cannot
    # write to, which cannot be tested as root.
    os.mkdir(path + ".fastsock-lock")
    _leave_stale_socket(path, socket_type)
    inode = os.lstat(path).st_ino
    with pytest.raises(IsADirectoryError, match="cannot open the lock file"):
        server_class(path, handler)
    assert os.lstat(path).st_ino == inode
    os.unlink(path)
    with socket.socket(socket.AF_UNIX, socket_type) as live:
        live.bind(path)
        if socket_type == socket.SOCK_STREAM:
            live.listen()
        with pytest.raises(OSError, match="a live server is bound") as raised:
            server_class(path, handler)
        assert raised.value.errno == errno.EADDRINUSE


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


def _race_to_bind(server_class, handler, path, barrier, results, rounds):
    """One racer: each round, when the barrier releases everyone, start a server on
    ``path``, report the outcome, and keep a bound server until the checks are done."""
    for _ in range(rounds):
        barrier.wait(GENEROUS)
        try:
            server = server_class(path, handler)
        except OSError as exc:
            results.send((exc.errno, str(exc)))
            barrier.wait(GENEROUS)
            continue
        results.send(("bound", None))
        barrier.wait(GENEROUS)
        # Closed, the server leaves its file behind: the next round's stale socket.
        server.server_close()


def _reachable(path, socket_type):
    with socket.socket(socket.AF_UNIX, socket_type) as client:
        client.settimeout(GENEROUS)
        try:
            client.connect(path)
        except OSError:
            return False
    return True


def test_racers_on_a_stale_socket_file_start_exactly_one_server(kind, sock_dir, thread_free):
    server_class, handler, socket_type = kind
    path = os.path.join(sock_dir, "s")
    _leave_stale_socket(path, socket_type)
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(RACERS + 1)
    pipes = [context.Pipe(duplex=False) for _ in range(RACERS)]
    racers = [
        context.Process(
            target=_race_to_bind,
            args=(server_class, handler, path, barrier, sender, RACE_ROUNDS),
        )
        for _, sender in pipes
    ]
    for racer in racers:
        racer.start()
    bad_rounds = []
    try:
        for round_number in range(RACE_ROUNDS):
            barrier.wait(GENEROUS)
            outcomes = []
            for receiver, _ in pipes:
                assert receiver.poll(GENEROUS), f"round {round_number}: a racer went silent"
                outcomes.append(receiver.recv())
            winners = [outcome for outcome in outcomes if outcome[0] == "bound"]
            losers = [outcome for outcome in outcomes if outcome[0] != "bound"]
            refused_as_live = all(
                code == errno.EADDRINUSE and "a live server is bound to" in message
                for code, message in losers
            )
            reachable = _reachable(path, socket_type)
            if len(winners) != 1 or not refused_as_live or not reachable:
                bad_rounds.append((round_number, len(winners), reachable, losers))
            barrier.wait(GENEROUS)
    except BaseException:
        # Racers still waiting for this process stop at once.
        barrier.abort()
        raise
    finally:
        for racer in racers:
            racer.join(GENEROUS)
            if racer.is_alive():
                racer.kill()
                racer.join()
        for receiver, sender in pipes:
            receiver.close()
            sender.close()
    assert [racer.exitcode for racer in racers] == [0] * RACERS
    assert bad_rounds == [], (
        f"{len(bad_rounds)} of {RACE_ROUNDS} rounds went wrong: "
        f"{sum(winners != 1 for _, winners, _, _ in bad_rounds)} without exactly one "
        f"winner, {sum(not reachable for _, _, reachable, _ in bad_rounds)} unreachable"
    )
    assert os.listdir(sock_dir) == ["s"], "the lock file is not left behind"
