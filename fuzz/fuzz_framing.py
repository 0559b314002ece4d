"""Differential fuzzing of the compiled stream framer against its pure-Python reference.

Each input is decoded into a framer configuration (framing, delimiter, keep_delimiter,
max_line, max_frame) and a sequence of operations: feeds of bytes taken from the input,
length prefixes or octet counts (digits, perhaps malformed, perhaps past max_frame), whole
frames (length-prefixed or octet-counted) repeated up to 1500 times, runs of one chunk
repeated up to 5000 times (past the 1024 spans one internal commit holds, the 64 KiB above
which feed() frames without the GIL, and the 256 KiB pieces it copies in), and eof().  Each
feed's bytes are passed as bytes or as a memoryview of a bytearray.  The compiled framer and
the reference get the same calls; after each one their results (messages, or the error's
type, text, messages and discarded count) and their counters must be equal, and every byte
fed must be accounted for.  A difference raises AssertionError, which atheris reports as a
crash and saves the input.

Run it through fuzz/run.sh, on the instrumented build that fuzz/build.sh makes.
"""

import sys

import atheris

with atheris.instrument_imports(include=["fastsock._reference"]):
    from fastsock._reference import framing as reference

from fastsock import _framing as compiled
from tests.compare import feed_outcome, framer_counters

FRAMINGS = ("raw", "lines", "length", "octets", "syslog")
# Limits around the 64-byte blocks of the compiled line scan, the defaults, the largest.
LIMITS = (1, 2, 3, 63, 64, 65, 127, 128, 1000, 65536, 1048576, 2**32 - 1)
PREFIX_SIZE = 4
# What one input may cost at most, so that an execution stays within milliseconds: the
# bytes it feeds, and the messages its repeated chunks can make (the reference frames
# each message in Python).
FEED_BUDGET = 1 << 20
MESSAGE_BUDGET = 20_000

OP_FEED, OP_PREFIX, OP_FRAME, OP_REPEAT, OP_EOF = range(5)


class Budget:
    def __init__(self):
        self.feed = FEED_BUDGET
        self.messages = MESSAGE_BUDGET


def limit(provider):
    if provider.ConsumeBool():
        return provider.ConsumeIntInRange(1, 300)
    return LIMITS[provider.ConsumeIntInRange(0, len(LIMITS) - 1)]


def most_messages_in(framer, unit):
    """An upper bound on the messages that one copy of unit can complete."""
    if framer.framing == "lines":
        return unit.count(framer.delimiter)
    if framer.framing == "length":
        return len(unit) // PREFIX_SIZE + 1
    if framer.framing in ("octets", "syslog"):
        # An octet-counted message takes at least 3 bytes ("1 x"), a syslog line 1.
        return max(unit.count(framer.delimiter), len(unit) // 3 + 1)
    return 1


def counted_framing(framer):
    return framer.framing in ("octets", "syslog")


def octet_count(provider):
    """An octet count as a syslog sender writes it, or one of the ways it goes wrong."""
    count = str(provider.ConsumeIntInRange(0, 2**33)).encode()
    kind = provider.ConsumeIntInRange(0, 3)
    if kind == 0:
        return count + b" "
    if kind == 1:
        return b"0" + count + b" "
    if kind == 2:
        return count + provider.ConsumeBytes(1)
    return count


def next_chunk(provider, framer, budget):
    """The bytes of the next feed, or None for eof()."""
    op = provider.ConsumeIntInRange(0, OP_EOF)
    if op == OP_EOF:
        return None
    if op == OP_PREFIX and counted_framing(framer) and provider.ConsumeBool():
        chunk = octet_count(provider) + provider.ConsumeBytes(provider.ConsumeIntInRange(0, 16))
    elif op == OP_PREFIX:
        chunk = provider.ConsumeIntInRange(0, 2**32 - 1).to_bytes(PREFIX_SIZE, "big")
        chunk += provider.ConsumeBytes(provider.ConsumeIntInRange(0, 16))
    elif op == OP_FRAME:
        # A payload with the prefix that announces it, once or many times over: valid
        # frames, not only noise, and more of them than one internal commit holds.
        payload = provider.ConsumeBytes(provider.ConsumeIntInRange(0, 300))
        if counted_framing(framer) and provider.ConsumeBool():
            unit = b"%d %s" % (len(payload), payload)
        else:
            unit = len(payload).to_bytes(PREFIX_SIZE, "big") + payload
        per_unit = most_messages_in(framer, unit)
        times = min(
            provider.ConsumeIntInRange(1, 1500), max(1, budget.messages // max(1, per_unit))
        )
        budget.messages -= times * per_unit
        chunk = unit * times
    elif op == OP_REPEAT:
        unit = provider.ConsumeBytes(provider.ConsumeIntInRange(1, 128)) or framer.delimiter
        per_unit = most_messages_in(framer, unit)
        times = min(
            provider.ConsumeIntInRange(2, 5000),
            max(1, budget.feed // len(unit)),
            max(1, budget.messages // max(1, per_unit)),
        )
        budget.messages -= times * per_unit
        chunk = unit * times
    else:
        chunk = provider.ConsumeBytes(provider.ConsumeIntInRange(0, 128))
    chunk = chunk[: budget.feed]
    budget.feed -= len(chunk)
    return chunk


def overhead(framing, framer, messages):
    """The delimiters, prefixes or counts stripped from messages, framed as framing (what a
    syslog framer chose for its stream)."""
    if framing == "lines" and not framer.keep_delimiter:
        return len(framer.delimiter) * len(messages)
    if framing == "length":
        return PREFIX_SIZE * len(messages)
    if framing == "octets":
        return sum(len(b"%d " % len(message)) for message in messages)
    return 0


def test_one_input(data):
    provider = atheris.FuzzedDataProvider(data)
    options = dict(
        framing=FRAMINGS[provider.ConsumeIntInRange(0, len(FRAMINGS) - 1)],
        delimiter=provider.ConsumeBytes(provider.ConsumeIntInRange(1, 4)) or b"\n",
        keep_delimiter=provider.ConsumeBool(),
        max_line=limit(provider),
        max_frame=limit(provider),
    )
    framer, oracle = compiled.Framer(**options), reference.Framer(**options)
    budget = Budget()
    messages = payload = stripped = 0
    # What the stream is framed as: a syslog framer chooses by the first byte of a stream
    # (until eof()), which the harness then knows too.
    framing = None if options["framing"] == "syslog" else options["framing"]
    while provider.remaining_bytes():
        chunk = next_chunk(provider, framer, budget)
        if chunk is None:
            got, expected = framer.eof(), oracle.eof()
            framed = []
            if options["framing"] == "syslog":
                framing = None
        else:
            if framing is None and chunk:
                framing = "octets" if chunk[:1].isdigit() else "lines"
            fed = memoryview(bytearray(chunk)) if provider.ConsumeBool() else chunk
            got, expected = feed_outcome(framer.feed, fed), feed_outcome(oracle.feed, chunk)
            framed = got if isinstance(got, list) else got[2]
        assert got == expected, (options, chunk, got, expected)
        assert framer_counters(framer) == framer_counters(oracle), (
            options,
            framer_counters(framer),
            framer_counters(oracle),
        )
        messages += len(framed)
        payload += sum(map(len, framed))
        stripped += overhead(framing, framer, framed)
        assert framer.messages_out == messages, (options, framer.messages_out, messages)
        accounted = payload + stripped + framer.bytes_discarded
        assert framer.bytes_in == accounted + framer.pending, (options, framer_counters(framer))


def main():
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
