"""fastsock: the stdlib's socketserver, drop-in, with a compiled GIL-free receive core.

    import fastsock as socketserver      # existing servers and handlers run unchanged

    import fastsock                      # the fast path: frame connections into a ring
    ring = fastsock.RingQueue()
    server = fastsock.ThreadingTCPServer(addr, fastsock.receiver(ring, framing="lines"))
    ...
    for line in ring.get_many(): ...

``__all__`` holds exactly the stdlib module's names, so ``from fastsock import *`` brings
what ``from socketserver import *`` does; the fast-path names are imported explicitly.
``IMPLEMENTATION`` is "compiled", or "python" when ``FASTSOCK_PURE_PYTHON=1`` selected
the pure-Python reference.
"""

from ._impl import IMPLEMENTATION, Framer, RingQueue
from .addresses import address_from_sockaddr
from .errors import (
    DatagramTruncatedError,
    FrameTooLargeError,
    FramingError,
    LineTooLongError,
    MalformedFrameError,
    ProxyHeaderError,
    QueueClosed,
)
from .options import ReceiveOptions
from .prefork import PreforkServer
from .receiver import ReceiveHandler, receiver
from .server import *  # noqa: F403
from .server import __all__

try:
    # Defined on every version, though __all__ lists them only where the stdlib has them
    # (3.12+), so the star import above leaves them out on 3.10 and 3.11.
    from .server import ForkingUnixDatagramServer, ForkingUnixStreamServer
except ImportError:  # a platform without fork() or Unix sockets
    pass
from .stats import DatagramStats, PipelineStats, ReceiveStats, RingStats

__version__ = "0.1.0"
