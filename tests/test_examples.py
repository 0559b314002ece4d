"""The examples run as a user runs them: the stdlib server (on the stdlib and, unchanged, on
fastsock in its place), its rewrite on the compiled path, and the sender that feeds them."""

import ast
import os
import re
import signal
import subprocess
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
GENEROUS = 30.0
LINES, CONNECTIONS = 2000, 4

# Runs an example with fastsock importable as socketserver: the drop-in promise.
AS_SOCKETSERVER = (
    "import runpy, sys, fastsock; sys.modules['socketserver'] = fastsock; "
    "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)


class ExampleServer:
    def __init__(self, command):
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            # Not the checkout, whose fastsock/ has no compiled modules: the installed one.
            cwd=EXAMPLES,
        )
        first = self.process.stdout.readline()
        match = re.match(r"listening on \('127\.0\.0\.1', (\d+)\)", first)
        if match is None:
            self.process.kill()
            pytest.fail(f"the example did not start: {first!r} {self.process.stderr.read()!r}")
        self.port = int(match.group(1))

    def interrupt(self):
        """Ctrl-C, as the examples say; then their whole output."""
        self.process.send_signal(signal.SIGINT)
        out, err = self.process.communicate(timeout=GENEROUS)
        assert self.process.returncode == 0, err
        return out


def send_lines(port):
    sender = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, "send_lines.py"), "--port", str(port)]
        + ["--count", str(LINES), "--connections", str(CONNECTIONS)],
        capture_output=True,
        text=True,
        timeout=GENEROUS,
    )
    assert sender.returncode == 0, sender.stderr
    assert sender.stdout.strip() == f"sent {LINES * CONNECTIONS} lines"


def wait_for_count(server, pattern, expected):
    """Read the example's progress lines until the count in them reaches `expected`."""
    seen = 0
    while seen < expected:
        line = server.process.stdout.readline()
        assert line, f"the example stopped at {seen} of {expected}"
        match = re.search(pattern, line)
        if match:
            seen = int(match.group(1))
    assert seen == expected


@pytest.mark.parametrize("framework", ["socketserver", "fastsock"])
def test_the_stdlib_example_receives_every_byte(framework):
    script = os.path.join(EXAMPLES, "recv_queue_stdlib.py")
    prefix = (
        [sys.executable, script]
        if framework == "socketserver"
        else [sys.executable, "-c", AS_SOCKETSERVER, script]
    )
    server = ExampleServer([*prefix, "--port", "0"])
    send_lines(server.port)
    total = sum(
        len(b"connection %d line %d\n" % (connection, number))
        for connection in range(CONNECTIONS)
        for number in range(LINES)
    )
    wait_for_count(server, r"\((\d+) in all\)", total)
    server.interrupt()


@pytest.mark.parametrize("framing", ["lines", "raw"])
def test_the_compiled_rewrite_receives_every_line(framing):
    script = os.path.join(EXAMPLES, "recv_queue_fastsock.py")
    server = ExampleServer([sys.executable, script, "--port", "0", "--framing", framing])
    send_lines(server.port)
    if framing == "lines":
        wait_for_count(server, r"\((\d+) in all\)", LINES * CONNECTIONS)
    # The consumer thread may still print while the main thread prints the stats.
    stats = re.search(r"ReceiveStats\((.*?)\)", server.interrupt())
    assert stats is not None
    fields = dict(re.findall(r"(\w+)=([\d.]+)", stats.group(1)))
    assert int(fields["connections_opened"]) == int(fields["connections_closed"]) == CONNECTIONS
    assert int(fields["messages_dropped"]) == int(fields["bytes_discarded"]) == 0
    if framing == "lines":
        assert int(fields["messages_received"]) == LINES * CONNECTIONS


def test_the_examples_parse_and_say_how_to_run_them():
    for name in sorted(os.listdir(EXAMPLES)):
        with open(os.path.join(EXAMPLES, name), encoding="utf-8") as source:
            tree = ast.parse(source.read())
        assert f"examples/{name}" in (ast.get_docstring(tree) or ""), name
