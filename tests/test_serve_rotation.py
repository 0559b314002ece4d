"""``fastsock serve --output FILE`` reopens FILE on SIGHUP, as logrotate's ``postrotate
kill -HUP`` needs: renamed mid-stream, the old and the new file together hold every line
exactly once and in order, in threaded and prefork mode; writing to stdout, SIGHUP is
ignored."""

import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.support import NETWORK_TIMEOUT
from tests.test_cli import PipedServeProcess, started_by

LINE = b"%012d\n"


class PacedClient(threading.Thread):
    """Sends numbered lines in small batches, a little at a time, until ``stop()``."""

    def __init__(self, address):
        super().__init__(name="paced-client", daemon=True)
        self.sock = socket.create_connection(address, NETWORK_TIMEOUT)
        self.sent = 0
        self.failure = None
        self.stopping = threading.Event()

    def run(self):
        try:
            while not self.stopping.is_set():
                self.sock.sendall(b"".join(LINE % n for n in range(self.sent, self.sent + 50)))
                self.sent += 50
                time.sleep(0.001)
        except OSError as exc:
            self.failure = exc

    def stop(self):
        self.stopping.set()
        self.join(NETWORK_TIMEOUT)
        self.sock.close()
        assert self.failure is None, self.failure
        return self.sent


@pytest.fixture
def serve(tmp_path, monkeypatch):
    # Where the tests' own sinks are (hangup_file_sink.py), for the server's python:// URLs.
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))
    yield from started_by(PipedServeProcess, tmp_path)


def wait_for_size(path, size):
    deadline = time.monotonic() + NETWORK_TIMEOUT
    while not (path.exists() and path.stat().st_size >= size):
        assert time.monotonic() < deadline, f"{path} did not reach {size} bytes"
        time.sleep(0.01)


@pytest.mark.parametrize("mode", ["threaded", "prefork"])
def test_sighup_after_a_rename_splits_the_stream_without_loss_or_repeat(serve, tmp_path, mode):
    output = tmp_path / "received.log"
    rotated = tmp_path / "received.log.1"
    server = serve(
        "tcp://127.0.0.1:0", "--output", str(output), "--mode", mode, "--stats-interval", "0"
    )
    assert "SIGHUP reopens the file" in server.stderr[0]
    client = PacedClient(server.address)
    client.start()
    wait_for_size(output, 1000 * len(LINE % 0))
    # What logrotate does: rename, then postrotate's kill -HUP.  The whole process group is
    # signalled: prefork workers must ignore it, only the writer reopens.
    output.rename(rotated)
    server.hangup_group()
    assert f"SIGHUP: reopened {output}" in server.line_matching("SIGHUP")
    wait_for_size(output, 1000 * len(LINE % 0))
    sent = client.stop()
    status, _ = server.stop()
    assert status == 0, server.stderr
    assert "every prefork worker exited" not in "".join(server.stderr)
    assert f"received {sent:,} messages, written {sent:,}" in server.stderr[-1]
    old, new = rotated.read_bytes(), output.read_bytes()
    assert old.endswith(b"\n") and new.endswith(b"\n"), "each file holds whole lines"
    assert old + new == b"".join(LINE % n for n in range(sent)), "every line once, in order"
    assert len(new) >= 1000 * len(LINE % 0)


def test_two_rotations_in_a_row(serve, tmp_path):
    output = tmp_path / "received.log"
    server = serve("tcp://127.0.0.1:0", "--output", str(output), "--stats-interval", "0")
    client = PacedClient(server.address)
    client.start()
    for generation in (1, 2):
        wait_for_size(output, 500 * len(LINE % 0))
        output.rename(tmp_path / f"received.log.{generation}")
        server.process.send_signal(signal.SIGHUP)
        server.line_matching("reopened")
    sent = client.stop()
    status, _ = server.stop()
    assert status == 0, server.stderr
    parts = [(tmp_path / name).read_bytes() for name in ("received.log.1", "received.log.2")]
    assert all(parts)
    assert b"".join(parts) + output.read_bytes() == b"".join(LINE % n for n in range(sent))


def test_sighup_writing_to_stdout_is_ignored_and_said(serve):
    server = serve("tcp://127.0.0.1:0", "--output", "-", "--stats-interval", "0")
    assert "SIGHUP" not in server.stderr[0]
    with socket.create_connection(server.address, NETWORK_TIMEOUT) as client:
        client.sendall(b"before\n")
        server.process.send_signal(signal.SIGHUP)
        assert "SIGHUP ignored: writing to stdout" in server.line_matching("SIGHUP")
        client.sendall(b"after\n")
    status, out = server.stop()
    assert status == 0, server.stderr
    assert out == b"before\nafter\n"
    assert "stopped by SIGTERM" in server.stderr[-1]


def test_a_file_that_cannot_be_reopened_keeps_the_old_one(serve, tmp_path):
    directory = tmp_path / "logs"
    directory.mkdir()
    output = directory / "received.log"
    server = serve("tcp://127.0.0.1:0", "--output", str(output), "--stats-interval", "0")
    with socket.create_connection(server.address, NETWORK_TIMEOUT) as client:
        client.sendall(b"one\n")
        wait_for_size(output, 4)
        output.rename(tmp_path / "moved.log")
        directory.rmdir()
        server.process.send_signal(signal.SIGHUP)
        line = server.line_matching("SIGHUP")
        assert "cannot open" in line and "still writing to the file open before" in line
        client.sendall(b"two\n")
    status, _ = server.stop()
    assert status == 0, server.stderr
    assert (tmp_path / "moved.log").read_bytes() == b"one\ntwo\n"


@pytest.mark.parametrize("mode", ["threaded", "prefork"])
def test_a_sighup_while_the_server_starts_reopens_once_it_serves(serve, tmp_path, mode):
    output = tmp_path / "received.log"
    server = serve(
        "tcp://127.0.0.1:0",
        *("--sink", f"python://hangup_file_sink:HangupFileSink?path={output}"),
        *("--mode", mode, "--stats-interval", "0"),
    )
    assert f"SIGHUP: reopened {output}" in server.line_matching("SIGHUP")
    with socket.create_connection(server.address, NETWORK_TIMEOUT) as client:
        client.sendall(b"after the reopen\n")
    wait_for_size(output, len(b"after the reopen\n"))
    status, _ = server.stop()
    assert status == 0, server.stderr
    assert output.read_bytes() == b"after the reopen\n"
    assert "every prefork worker exited" not in "".join(server.stderr)


def test_help_says_sighup_reopens_the_output(capsys):
    from fastsock import cli

    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "SIGHUP reopens FILE, for logrotate's postrotate kill -HUP" in text
    assert "log rotation (SIGHUP):" in text and "--metrics [HOST:]PORT" in text
