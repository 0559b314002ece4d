"""What the benchmark's coordinator and its child processes share: JSON lines over the
child's stdin and stdout, CPU pinning, the open-file limit."""

import json
import os
import resource
import sys

DESCRIPTOR_MARGIN = 256
"""Descriptors a process needs beyond the connections it holds: the listening socket, the
interpreter's files, epoll and event descriptors, pipes."""


REPORT_SECONDS = 1.0
"""What a child process keeps, of the time the coordinator gives a run, for what it does
after a wait (the server reads /proc for its CPU, RSS, threads and listen overflows, and its
counters) and for its answer to travel: milliseconds on a quiet machine, but a wait that
runs to the coordinator's own deadline leaves the answer late, and the coordinator then
reports only that it was still waiting, not what the child counted or why it stopped."""


def emit(message):
    """Send one JSON line to the coordinator."""
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def receive_command():
    """The next JSON line from the coordinator."""
    line = sys.stdin.readline()
    if not line:
        raise SystemExit("the coordinator went away")
    return json.loads(line)


def pin(cpus):
    if cpus:
        os.sched_setaffinity(0, set(cpus))


def raise_open_file_limit(connections=0):
    """Idle, silent and churn runs hold many descriptors: take the hard limit as the soft
    one, first raising the hard limit (root may, up to fs.nr_open) if ``connections`` need
    more.  RuntimeError if they cannot have them: a row must not quietly hold fewer."""
    needed = connections + DESCRIPTOR_MARGIN
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, needed))
        except (OSError, ValueError) as exc:
            raise RuntimeError(
                f"{connections:,} connections need {needed:,} file descriptors, and the "
                f"hard limit {hard:,} cannot be raised ({exc}): run as root or raise it "
                "(ulimit -Hn)"
            ) from None
        return
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
