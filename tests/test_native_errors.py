"""The compiled core's OSErrors read as the stdlib's: the errno's OSError subclass, strerror's
text and the failed call where the stdlib names a file ("[Errno 24] Too many open files:
'epoll_create1'"), here from a real EMFILE under a lowered RLIMIT_NOFILE."""

import json
import os
import subprocess
import sys

import pytest

from tests.support import NETWORK_TIMEOUT

# In a process of its own: the descriptor limit is lowered to the lowest free descriptor,
# so the engine's first one (its epoll instance) cannot be made.
OUT_OF_DESCRIPTORS = """
import json, os, resource
import fastsock
from fastsock import _engine, _recvloop, _ring

ring, counters = _ring.RingQueue(), _recvloop.ReceiveCounters()
options = fastsock.ReceiveOptions(max_connections=16)
lowest_free = os.dup(0)
os.close(lowest_free)
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
try:
    _engine.StreamEngine(ring, counters, options)
except OSError as exc:
    print(json.dumps([type(exc).__name__, exc.errno, exc.strerror, exc.filename, str(exc)]))
"""


@pytest.mark.skipif(
    os.environ.get("FASTSOCK_PURE_PYTHON") == "1", reason="the compiled core's own errors"
)
def test_an_engine_out_of_descriptors_says_emfile_like_the_stdlib(tmp_path):
    # From elsewhere than the checkout, whose fastsock/ has no compiled modules.
    done = subprocess.run(
        [sys.executable, "-c", OUT_OF_DESCRIPTORS],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=NETWORK_TIMEOUT,
    )
    assert done.returncode == 0, done.stderr
    kind, code, text, what, message = json.loads(done.stdout)
    assert (kind, code, what) == ("OSError", 24, "epoll_create1")
    assert text == "Too many open files"
    assert message == "[Errno 24] Too many open files: 'epoll_create1'"
