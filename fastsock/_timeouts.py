"""The ``timeout`` argument of the rings' gets and puts as a deadline, in one place for the
pure-Python code that takes one (the reference ring and the asyncio consumer of both rings);
the compiled ring's ``deadline_for()`` follows the same rule without the GIL's help."""

import time


def deadline(block: bool, timeout: "float | None") -> float:
    """The ``time.monotonic()`` by which a wait must end: -inf when not blocking (do not
    wait), +inf for no timeout; ValueError for a negative or NaN timeout."""
    if not block:
        return -float("inf")
    if timeout is None:
        return float("inf")
    seconds = float(timeout)
    if not seconds >= 0.0:
        raise ValueError("'timeout' must be a non-negative number")
    return time.monotonic() + seconds
