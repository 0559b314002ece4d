"""What the tests and the fuzz harnesses compare between a compiled object and its
pure-Python reference.  fuzz/build.sh copies this file into its build, so it imports only
the package under test."""

from fastsock import _ring as compiled_ring
from fastsock._reference import ring as reference_ring
from fastsock.errors import FramingError


def feed_outcome(feed, data):
    """What feed(data) returned, or the framing error it raised, as a comparable value."""
    try:
        return feed(data)
    except FramingError as error:
        return type(error), str(error), error.messages, error.discarded


def framer_counters(framer):
    return (
        framer.bytes_in,
        framer.messages_out,
        framer.bytes_discarded,
        framer.pending,
        framer.failed,
    )


def ring_observable(value):
    """A ring call's result, a Batch unpacked into everything a consumer can see of it."""
    if isinstance(value, (compiled_ring.Batch, reference_ring.Batch)):
        return (
            "batch",
            list(value),
            bytes(memoryview(value)),
            value.offsets.tolist(),
            value.source_ids.tolist(),
            value.nbytes,
        )
    return value
