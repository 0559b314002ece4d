"""Differential fuzzing of the compiled ring queue against its pure-Python reference.

Each input is decoded into ring bounds and a sequence of non-blocking operations: put,
offer and put_many of payloads and sources taken from the input, get, get_many (with and
without sources), get_batch (with and without a byte cap), close, and churn: hundreds of
puts and gets that keep the ring from emptying, so that records wrap around the end of
the compiled ring's area.  Small bounds split the records that put_many writes across
gets.  The compiled ring and the reference get the same calls; their results (payloads,
sources, batches with their buffer, offsets and source ids, or the exception type), their
state and their counters must be equal after each one.  A difference raises
AssertionError, which atheris reports as a crash.

Run it through fuzz/run.sh, on the instrumented build that fuzz/build.sh makes.
"""

import sys

import atheris

with atheris.instrument_imports(include=["fastsock._reference"]):
    from fastsock._reference import ring as reference

from fastsock import _ring as compiled
from tests.compare import ring_observable  # after the instrumented import, which it shares

MAX_SOURCE_LEN = compiled.MAX_SOURCE_LEN
OPERATIONS = ("put", "offer", "put_many", "get", "get_many", "get_batch", "close", "churn")
# Churn steps one input may make in all, so that an execution stays within milliseconds.
CHURN_BUDGET = 1000


def both(rings, method, *args, **kwargs):
    outcomes = []
    for ring in rings:
        try:
            outcomes.append(ring_observable(getattr(ring, method)(*args, **kwargs)))
        except Exception as error:  # the type is what is compared
            outcomes.append(type(error))
    assert outcomes[0] == outcomes[1], (method, args, kwargs, outcomes)


def payload(provider):
    # Mostly short, sometimes past the bounds: records of any size relative to the area.
    return provider.ConsumeBytes(
        provider.ConsumeIntInRange(0, 40 if provider.ConsumeBool() else 600)
    )


def source(provider):
    if provider.ConsumeBool():
        return None
    return provider.ConsumeBytes(provider.ConsumeIntInRange(0, MAX_SOURCE_LEN + 1))


def churn(rings, provider, most):
    """Up to most puts, each followed by a get once another message is queued: the ring
    never empties (which would start its next record at the front of the area), so the
    records travel all round the area and straddle its end at many offsets.  Returns the
    number of puts."""
    body, blob = payload(provider), source(provider) or b""
    steps = min(provider.ConsumeIntInRange(1, 300), most)
    for step in range(steps):
        cut = step % (len(body) + 1)
        both(rings, "put_nowait", body[cut:], source_id=step, source=blob[cut:] or None)
        if rings[0].qsize() > 1:
            both(rings, "get_nowait")
    return steps


def test_one_input(data):
    provider = atheris.FuzzedDataProvider(data)
    bounds = (provider.ConsumeIntInRange(1, 64), provider.ConsumeIntInRange(1, 4096))
    resume_fraction = provider.ConsumeIntInRange(0, 99) / 100
    rings = [
        ring_class(*bounds, resume_fraction=resume_fraction)
        for ring_class in (compiled.RingQueue, reference.RingQueue)
    ]
    churn_left = CHURN_BUDGET
    while provider.remaining_bytes():
        operation = OPERATIONS[provider.ConsumeIntInRange(0, len(OPERATIONS) - 1)]
        if operation == "put":
            source_id = provider.ConsumeIntInRange(0, 2**32 - 1)
            both(
                rings, "put_nowait", payload(provider), source_id=source_id, source=source(provider)
            )
        elif operation == "offer":
            both(rings, "offer", payload(provider), source=source(provider))
        elif operation == "put_many":
            items = [payload(provider) for _ in range(provider.ConsumeIntInRange(0, 40))]
            both(rings, "put_many", items, source_id=provider.ConsumeIntInRange(0, 3))
        elif operation == "get":
            both(rings, "get_nowait")
        elif operation == "get_many":
            max_items = provider.ConsumeIntInRange(1, 80)
            both(rings, "get_many", max_items, block=False, with_source=provider.ConsumeBool())
        elif operation == "get_batch":
            max_items = provider.ConsumeIntInRange(1, 80)
            max_bytes = provider.ConsumeIntInRange(1, 5000) if provider.ConsumeBool() else None
            both(rings, "get_batch", max_items, block=False, max_bytes=max_bytes)
        elif operation == "close":
            both(rings, "close")
        else:
            churn_left -= churn(rings, provider, churn_left)
        for method in ("qsize", "empty", "full"):
            both(rings, method)
        assert rings[0].closed == rings[1].closed
        assert rings[0].stats == rings[1].stats, (rings[0].stats, rings[1].stats)


def main():
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
