"""Fixtures shared by the whole suite: the stdlib-versus-fastsock parametrization, a
per-test watchdog, a short temporary directory for Unix socket paths, and a process fit to
fork."""

import faulthandler
import importlib
import os
import shutil
import socketserver
import sys
import tempfile
import threading
import warnings

import pytest

from fastsock import _framing, _recvloop, _ring
from fastsock._reference import framing as reference_framing
from fastsock._reference import receiver as reference_receiver
from fastsock._reference import ring as reference_ring
from tests.support import child_pids, kill_and_reap

DEFAULT_WATCHDOG_SECONDS = 60.0

# The watchdog writes to a duplicate of the real stderr taken at configure time: by the
# time a test runs, pytest's capture has redirected fd 2 to a temporary file that is lost
# when faulthandler exits the process.
_watchdog_stream = None


def pytest_configure(config):
    global _watchdog_stream
    config.addinivalue_line(
        "markers",
        "watchdog(seconds): let this test run up to `seconds` (instead of the default) "
        "before the watchdog dumps every thread's traceback and aborts the run",
    )
    _watchdog_stream = os.fdopen(os.dup(sys.stderr.fileno()), "w")


def pytest_unconfigure(config):
    _watchdog_stream.close()


@pytest.fixture(autouse=True)
def watchdog(request):
    """Abort the whole run, with every thread's traceback, if one test hangs.

    The limit is FASTSOCK_TEST_TIMEOUT seconds (default 60); a `watchdog(seconds)` marker
    raises it for a test that legitimately runs longer.
    """
    seconds = float(os.environ.get("FASTSOCK_TEST_TIMEOUT", DEFAULT_WATCHDOG_SECONDS))
    marker = request.node.get_closest_marker("watchdog")
    if marker is not None:
        seconds = max(seconds, marker.args[0])
    faulthandler.dump_traceback_later(seconds, exit=True, file=_watchdog_stream)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(params=["stdlib", "fastsock"])
def ss(request):
    """The module under test, used exactly as `import ... as socketserver` would be: the
    stdlib `socketserver` (the oracle) or `fastsock`."""
    if request.param == "stdlib":
        return socketserver
    return importlib.import_module("fastsock")


@pytest.fixture
def sock_dir():
    """A temporary directory with a short path: Unix socket paths are limited to 107 bytes,
    which pytest's tmp_path can exceed."""
    path = tempfile.mkdtemp(prefix="fastsock-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def thread_free():
    """No thread but this one, so fork is safe, with fork warnings turned into errors.  The
    watchdog is a thread too: it is cancelled, so every wait of the test must be bounded."""
    faulthandler.cancel_dump_traceback_later()
    assert threading.active_count() == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        yield


@pytest.fixture
def reap_children():
    """Fail a test that leaves forked children behind, and kill and reap them."""
    test_pid = os.getpid()
    children_before = child_pids()
    yield
    if os.getpid() != test_pid:
        # A forked child that returned into the test instead of exiting: stop it here
        # rather than let it run the rest of the session a second time.
        os._exit(70)
    leftover = child_pids() - children_before
    kill_and_reap(leftover)
    assert not leftover, f"forked children left running or unreaped: {sorted(leftover)}"


RECEIVE_IMPLEMENTATIONS = {
    "compiled": (
        _framing.Framer,
        _ring.RingQueue,
        _recvloop.ReceiveCounters,
        _recvloop.StreamReceiver,
    ),
    "reference": (
        reference_framing.Framer,
        reference_ring.RingQueue,
        reference_receiver.ReceiveCounters,
        reference_receiver.StreamReceiver,
    ),
}


@pytest.fixture(params=sorted(RECEIVE_IMPLEMENTATIONS))
def impl(request):
    """(Framer, RingQueue, ReceiveCounters, StreamReceiver) of the compiled core, then of
    the pure-Python reference: the same receive-loop test body runs on both."""
    return RECEIVE_IMPLEMENTATIONS[request.param]
