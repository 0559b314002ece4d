"""Chooses between the compiled core and the pure-Python reference.

The compiled modules are the product; the reference exists to define behaviour and to
serve as the tests' oracle.  It is used only when ``FASTSOCK_PURE_PYTHON=1`` is set: a
missing or broken compiled module is an ImportError, never a silent slowdown.
"""

import os

__all__ = [
    "IMPLEMENTATION",
    "ConnectionLedger",
    "DatagramCounters",
    "DatagramReceiver",
    "FRAMING_LIMITS",
    "Framer",
    "ReceiveCounters",
    "RingQueue",
    "StreamEngine",
    "StreamReceiver",
]

_SWITCH = "FASTSOCK_PURE_PYTHON"
_choice = os.environ.get(_SWITCH, "")
if _choice not in ("", "0", "1"):
    raise ImportError(
        f"{_SWITCH} must be 1 (pure-Python reference) or 0/unset (compiled), not {_choice!r}"
    )

if _choice == "1":
    from ._reference.dgramloop import DatagramCounters, DatagramReceiver
    from ._reference.engine import StreamEngine
    from ._reference.framing import FRAMING_LIMITS, Framer
    from ._reference.receiver import ConnectionLedger, ReceiveCounters, StreamReceiver
    from ._reference.ring import RingQueue

    IMPLEMENTATION = "python"
else:
    try:
        from ._dgramloop import DatagramCounters, DatagramReceiver
        from ._engine import StreamEngine
        from ._framing import FRAMING_LIMITS, Framer
        from ._recvloop import ConnectionLedger, ReceiveCounters, StreamReceiver
        from ._ring import RingQueue
    except ImportError as exc:
        raise ImportError(
            "fastsock's compiled extension modules are missing or do not load "
            f"({exc}). Install fastsock with `pip install .` (it compiles them), or set "
            f"{_SWITCH}=1 to run the slow pure-Python reference implementation."
        ) from exc

    IMPLEMENTATION = "compiled"
