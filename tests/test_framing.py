"""The stream framer: the compiled fastsock._framing.Framer and its pure-Python reference run
the same tests, and hypothesis checks that they agree byte for byte on random streams split
into random feeds, and that both frame any split of a stream as they frame it whole."""

import array
import random
import re
import threading
import tracemalloc
from itertools import pairwise

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastsock import _framing
from fastsock._reference import framing as reference
from fastsock.constants import MAX_FRAME_SIZE, MAX_LINE_LENGTH
from fastsock.errors import (
    FrameTooLargeError,
    FramingError,
    LineTooLongError,
    MalformedFrameError,
)
from tests.compare import feed_outcome, framer_counters

MiB = 1024 * 1024
IMPLEMENTATIONS = {"compiled": _framing.Framer, "reference": reference.Framer}
HOSTILE_LENGTHS = [0xFFFFFFFF, 0x80000000, MAX_FRAME_SIZE + 1, int.from_bytes(b"GET ", "big")]


@pytest.fixture(params=list(IMPLEMENTATIONS))
def framer_class(request):
    return IMPLEMENTATIONS[request.param]


def prefix(length):
    return length.to_bytes(4, "big")


def frame(payload):
    return prefix(len(payload)) + payload


def counted(payload):
    """An RFC 6587 octet-counted frame: MSG-LEN SP MSG."""
    return b"%d %s" % (len(payload), payload)


def effective_framing(framing, stream):
    """What a framing frames a stream as: syslog chooses by the stream's first byte."""
    if framing != "syslog":
        return framing
    if not stream:
        return None
    return "octets" if stream[:1].isdigit() else "lines"


def feed_all(framer, chunks):
    messages = []
    for chunk in chunks:
        messages += framer.feed(chunk)
    return messages


def assert_accounted(framer, messages, framing=None):
    """Every byte fed is in a message, a stripped delimiter, prefix or count, discarded or
    pending.  ``framing``: what a syslog framer chose, if not its framing."""
    framing = framing or framer.framing
    if framing == "lines" and not framer.keep_delimiter:
        overhead = len(framer.delimiter) * len(messages)
    elif framing == "length":
        overhead = 4 * len(messages)
    elif framing == "octets":
        overhead = sum(len(b"%d " % len(message)) for message in messages)
    else:
        overhead = 0
    payload = sum(map(len, messages))
    assert framer.messages_out == len(messages)
    assert framer.bytes_in == payload + overhead + framer.bytes_discarded + framer.pending


# -- Random streams -----------------------------------------------------------------------


def split_at(stream, cuts):
    bounds = [0, *sorted(cuts), len(stream)]
    return [stream[start:end] for start, end in pairwise(bounds)]


@st.composite
def scenarios(draw):
    """Framer options, and a stream split into feeds of any sizes, empty ones included."""
    framing = draw(st.sampled_from(["raw", "lines", "length", "octets", "syslog"]))
    delimiter = draw(
        st.sampled_from([b"\n", b"\r\n", b"aa", b"aba", b"\x00\xff\x00"])
        | st.binary(min_size=1, max_size=3)
    )
    options = dict(
        framing=framing,
        delimiter=delimiter,
        keep_delimiter=draw(st.booleans()),
        max_line=draw(st.integers(1, 24) | st.just(MAX_LINE_LENGTH)),
        max_frame=draw(st.integers(1, 24) | st.just(MAX_FRAME_SIZE)),
    )
    # Few distinct bytes, the delimiter's among them: delimiters and their prefixes abound.
    text = st.lists(st.sampled_from(sorted(set(delimiter + b"ab\r\n\x00"))), max_size=30).map(bytes)
    if draw(st.integers(0, 9)) == 0:
        stream = draw(st.binary(max_size=120))
    elif framing == "length":
        parts = [frame(payload) for payload in draw(st.lists(st.binary(max_size=30), max_size=8))]
        if draw(st.booleans()):
            hostile = draw(st.sampled_from(HOSTILE_LENGTHS) | st.integers(0, 64))
            parts.insert(draw(st.integers(0, len(parts))), prefix(hostile))
        stream = b"".join(parts) + draw(st.binary(max_size=6))
    elif framing == "octets" or (framing == "syslog" and draw(st.booleans())):
        parts = [counted(payload) for payload in draw(st.lists(text, max_size=8))]
        if draw(st.booleans()):
            hostile = draw(
                st.sampled_from([b"0 ", b"01 a", b"1x", b"-1 ", b" 1 a", b"1\n", b"99999999999"])
                | st.integers(0, 64).map(lambda n: b"%d " % n)
            )
            parts.insert(draw(st.integers(0, len(parts))), hostile)
        stream = b"".join(parts) + draw(st.sampled_from([b"", b"1", b"12", b"3 ", b"3 ab"]))
    else:
        lines = draw(st.lists(text, max_size=8))
        stream = b"".join(line + delimiter for line in lines) + draw(text)
    if draw(st.integers(0, 4)) == 0:
        chunks = [stream[i : i + 1] for i in range(len(stream))]
    else:
        chunks = split_at(stream, draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    kind = st.sampled_from([bytes, bytearray, memoryview])
    kinds = draw(st.lists(kind, min_size=len(chunks), max_size=len(chunks)))
    return options, [kind(chunk) for kind, chunk in zip(kinds, chunks, strict=True)]


def frame_whole(options, stream):
    """How a stream frames, however it is split (but for "raw"): its messages, the error it
    ends in or None, and the bytes left pending at its end."""
    framing = effective_framing(options["framing"], stream)
    if framing is None:
        return [], None, 0
    if framing == "octets":
        return frame_octets_whole(options, stream)
    if framing == "lines":
        delimiter = options["delimiter"]
        messages, head = [], 0
        while (found := stream.find(delimiter, head)) >= 0:
            if found - head > options["max_line"]:
                return messages, LineTooLongError, 0
            end = found + len(delimiter)
            messages.append(stream[head : end if options["keep_delimiter"] else found])
            head = end
        if len(stream) - head >= options["max_line"] + len(delimiter):
            return messages, LineTooLongError, 0
        return messages, None, len(stream) - head
    messages, head = [], 0
    while len(stream) - head >= 4:
        length = int.from_bytes(stream[head : head + 4], "big")
        if length > options["max_frame"]:
            return messages, FrameTooLargeError, 0
        if len(stream) - head - 4 < length:
            break
        messages.append(stream[head + 4 : head + 4 + length])
        head += 4 + length
    return messages, None, len(stream) - head


def frame_octets_whole(options, stream):
    """RFC 6587 octet counting, read with a regular expression over the whole stream."""
    messages, head = [], 0
    while head < len(stream):
        match = re.compile(rb"[0-9]*").match(stream, head)
        digits = match.group()
        if not digits or digits[:1] == b"0":
            return messages, MalformedFrameError, 0
        if int(digits) > options["max_frame"]:
            return messages, FrameTooLargeError, 0
        if match.end() == len(stream):
            break
        if stream[match.end() : match.end() + 1] != b" ":
            return messages, MalformedFrameError, 0
        start = match.end() + 1
        if len(stream) - start < int(digits):
            break
        messages.append(stream[start : start + int(digits)])
        head = start + int(digits)
    return messages, None, len(stream) - head


SCENARIO_SETTINGS = settings(
    max_examples=800,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@SCENARIO_SETTINGS
@given(scenarios())
def test_compiled_and_reference_agree_feed_by_feed(scenario):
    options, chunks = scenario
    compiled, pure = _framing.Framer(**options), reference.Framer(**options)
    for chunk in chunks:
        assert feed_outcome(compiled.feed, chunk) == feed_outcome(pure.feed, chunk)
        assert framer_counters(compiled) == framer_counters(pure)
    assert compiled.eof() == pure.eof()
    assert framer_counters(compiled) == framer_counters(pure)


@SCENARIO_SETTINGS
@given(scenarios())
def test_any_split_frames_like_the_whole_stream(framer_class, scenario):
    options, chunks = scenario
    framer = framer_class(**options)
    messages, error = [], None
    stream = b"".join(bytes(chunk) for chunk in chunks)
    framing = effective_framing(options["framing"], stream)
    for chunk in chunks:
        try:
            messages += framer.feed(chunk)
        except FramingError as raised:
            error = raised
            messages += raised.messages
            break
        assert_accounted(framer, messages, framing)
    if options["framing"] == "raw":
        expected, expected_error, expected_pending = [bytes(c) for c in chunks if len(c)], None, 0
    else:
        expected, expected_error, expected_pending = frame_whole(options, stream)
    assert messages == expected
    if expected_error is None:
        assert error is None
        assert framer.pending == expected_pending
        assert framer.eof() == expected_pending
    else:
        assert type(error) is expected_error
        assert error.discarded == framer.bytes_discarded
        assert framer.failed and framer.pending == 0
    assert_accounted(framer, messages, framing)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    framing=st.sampled_from(["lines", "length", "octets", "syslog"]),
    delimiter=st.sampled_from([b"\n", b"\r\n", b"\x00\x01\x02"]),
)
def test_compiled_and_reference_agree_on_large_streams(seed, framing, delimiter):
    """Messages up to the limits, in feeds of up to 1.5 MiB: the compiled framer's buffer
    grows, compacts and frames in pieces without the GIL, and must not show it."""
    rng = random.Random(seed)
    options = dict(
        framing=framing,
        delimiter=delimiter,
        max_line=rng.choice([1000, 70_000, MAX_LINE_LENGTH]),
        max_frame=rng.choice([5000, 300_000, MAX_FRAME_SIZE]),
    )
    if framing == "syslog":
        # Either way a syslog connection can go, as its first byte says.
        framing = rng.choice(["lines", "octets"])
    limit = options["max_line" if framing == "lines" else "max_frame"]

    def part(size):
        payload = rng.randbytes(size) if rng.random() < 0.5 else b"x" * size
        if framing == "lines":
            return b"<" + payload[1:].replace(delimiter[:1], b"") + delimiter
        return frame(payload) if framing == "length" else counted(payload)

    parts, total = [], 0
    while total < 2 * MiB:
        parts.append(
            part(rng.choice([0, rng.randrange(100), rng.randrange(limit - 50, limit + 1)]))
        )
        total += len(parts[-1])
    if rng.random() < 0.3:
        parts.insert(rng.randrange(len(parts) + 1), part(limit + 1))
    stream = b"".join(parts)
    chunk_sizes = rng.choice([(1, 300), (1000, 70_000), (200_000, 3 * MiB // 2)])
    compiled, pure = _framing.Framer(**options), reference.Framer(**options)
    start = 0
    while start < len(stream):
        end = start + rng.randint(*chunk_sizes)
        chunk = stream[start:end]
        assert feed_outcome(compiled.feed, chunk) == feed_outcome(pure.feed, chunk)
        assert framer_counters(compiled) == framer_counters(pure)
        start = end
    assert compiled.eof() == pure.eof()


# 28 s of CPU: a busy 2-core machine stretched it past the default 60 s watchdog.
@pytest.mark.watchdog(240)
@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), keep_delimiter=st.booleans())
def test_compiled_and_reference_agree_on_many_short_lines(seed, keep_delimiter):
    """The compiled framer finds a one-byte delimiter 64 bytes at a time: lines of every
    length around that block and around max_line, thousands per feed (so that the span array
    fills in the middle of a block), must frame exactly as the reference frames them."""
    rng = random.Random(seed)
    max_line = rng.choice([1, 40, 63, 64, 65, 127, 128, 300, MAX_LINE_LENGTH])
    options = dict(framing="lines", keep_delimiter=keep_delimiter, max_line=max_line)
    parts = []
    for _ in range(rng.randrange(1, 3000)):
        length = rng.choice([0, 1, rng.randrange(200), rng.randrange(60, 70), max_line])
        parts.append(bytes(rng.choices(b"ab\r\x00", k=length)) + b"\n")
    if rng.random() < 0.3:
        parts.insert(rng.randrange(len(parts) + 1), b"z" * (max_line + 1))
    stream = b"".join(parts) + b"tail" * rng.randrange(3)
    compiled, pure = _framing.Framer(**options), reference.Framer(**options)
    start = 0
    while start < len(stream):
        end = start + rng.choice([1, rng.randrange(1, 200), rng.randrange(1, 100_000)])
        chunk = stream[start:end]
        assert feed_outcome(compiled.feed, chunk) == feed_outcome(pure.feed, chunk)
        assert framer_counters(compiled) == framer_counters(pure)
        start = end
    assert compiled.eof() == pure.eof()


# -- Lines ---------------------------------------------------------------------------------


def test_lines_end_at_the_delimiter(framer_class):
    framer = framer_class()
    assert framer.feed(b"one\ntwo\n\nthr") == [b"one", b"two", b""]
    assert framer.pending == 3
    assert framer.feed(b"ee\n") == [b"three"]
    assert framer.pending == 0
    assert_accounted(framer, [b"one", b"two", b"", b"three"])


def test_keep_delimiter(framer_class):
    framer = framer_class(delimiter=b"\r\n", keep_delimiter=True)
    messages = framer.feed(b"a\r\n\r\nb\r")
    assert messages == [b"a\r\n", b"\r\n"]
    assert framer.feed(b"\n") == [b"b\r\n"]
    assert_accounted(framer, [*messages, b"b\r\n"])


@pytest.mark.parametrize("delimiter", [b"\r\n", b"abc", b"aab", b"\x00\x00\x00\x00"])
def test_delimiter_split_across_feeds_at_every_point(framer_class, delimiter):
    stream = b"x" + delimiter + b"a" + delimiter + delimiter
    for first in range(len(stream) + 1):
        for second in range(first, len(stream) + 1):
            framer = framer_class(delimiter=delimiter)
            chunks = [stream[:first], stream[first:second], stream[second:]]
            assert feed_all(framer, chunks) == [b"x", b"a", b""]
            assert framer.pending == 0


@pytest.mark.parametrize("delimiter", [b"\n", b"\r\n"])
def test_line_of_exactly_max_line_bytes_is_accepted(framer_class, delimiter):
    line = b"x" * 10
    assert framer_class(delimiter=delimiter, max_line=10).feed(line + delimiter) == [line]
    framer = framer_class(delimiter=delimiter, max_line=10)
    assert feed_all(framer, [bytes([byte]) for byte in line + delimiter]) == [line]


@pytest.mark.parametrize("delimiter", [b"\n", b"\r\n"])
def test_line_of_max_line_plus_one_bytes_is_rejected(framer_class, delimiter):
    framer = framer_class(delimiter=delimiter, max_line=10)
    with pytest.raises(LineTooLongError) as raised:
        framer.feed(b"ok" + delimiter + b"x" * 11 + delimiter + b"next" + delimiter)
    assert raised.value.messages == [b"ok"]
    assert raised.value.discarded == 11 + len(delimiter) + 4 + len(delimiter)
    assert framer.failed and framer.pending == 0
    assert_accounted(framer, [b"ok"])


def test_line_error_comes_with_the_first_byte_past_the_limit(framer_class):
    framer = framer_class(max_line=10)
    assert framer.feed(b"x" * 10) == []
    with pytest.raises(LineTooLongError) as raised:
        framer.feed(b"x")
    assert raised.value.discarded == 11


def test_multibyte_delimiter_error_waits_only_for_the_delimiter_bytes(framer_class):
    # Eleven bytes may still be ten and the first byte of b"\r\n"; twelve cannot.
    framer = framer_class(delimiter=b"\r\n", max_line=10)
    assert framer.feed(b"x" * 10 + b"\r") == []
    assert framer.feed(b"\n") == [b"x" * 10]
    assert framer.feed(b"y" * 11) == []
    with pytest.raises(LineTooLongError):
        framer.feed(b"y")


def test_unterminated_line_fails_on_the_first_feed_past_the_limit(framer_class):
    chunk = b"x" * MiB
    framer = framer_class()
    with pytest.raises(LineTooLongError) as raised:
        framer.feed(chunk)
    assert raised.value.messages == [] and raised.value.discarded == MiB

    framer = framer_class(max_line=3 * MiB)
    for _ in range(3):
        assert framer.feed(chunk) == []
        assert framer.pending <= 3 * MiB
    with pytest.raises(LineTooLongError) as raised:
        framer.feed(chunk)
    assert raised.value.discarded == 4 * MiB
    assert framer.bytes_discarded == 4 * MiB and framer.pending == 0


@pytest.mark.parametrize("delimiter", [b"\n", b"\r\n"])
def test_one_byte_feeds_of_a_max_line_line(framer_class, delimiter):
    framer = framer_class(delimiter=delimiter)
    for _ in range(MAX_LINE_LENGTH):
        assert framer.feed(b"x") == []
    assert feed_all(framer, [delimiter[:1], delimiter[1:]]) == [b"x" * MAX_LINE_LENGTH]
    for _ in range(MAX_LINE_LENGTH):
        framer.feed(b"y")
    # The start of a delimiter may still end a line of max_line bytes; one more byte cannot.
    for byte in delimiter[:-1]:
        assert framer.feed(bytes([byte])) == []
    with pytest.raises(LineTooLongError):
        framer.feed(b"y")


def test_thousands_of_messages_in_one_feed(framer_class):
    lines = [b"%d" % number for number in range(100_000)]
    framer = framer_class()
    assert framer.feed(b"\n".join(lines) + b"\n") == lines
    assert framer.feed(b"\n" * 5000) == [b""] * 5000
    assert_accounted(framer, [*lines, *[b""] * 5000])

    framer = framer_class("length")
    assert framer.feed(prefix(0) * 5000 + frame(b"end")) == [b""] * 5000 + [b"end"]


def test_messages_before_an_error_in_a_long_feed_are_kept(framer_class):
    framer = framer_class(max_line=100)
    with pytest.raises(LineTooLongError) as raised:
        framer.feed(b"line\n" * 3000 + b"z" * 500 + b"\n" + b"after\n")
    assert raised.value.messages == [b"line"] * 3000
    assert raised.value.discarded == 507


# -- Length prefixes -----------------------------------------------------------------------


def test_length_prefixed_frames(framer_class):
    framer = framer_class("length")
    stream = frame(b"hello") + frame(b"") + frame(b"\n\x00") + prefix(3) + b"ab"
    assert framer.feed(stream) == [b"hello", b"", b"\n\x00"]
    assert framer.pending == 6
    assert framer.feed(b"c") == [b"abc"]
    assert_accounted(framer, [b"hello", b"", b"\n\x00", b"abc"])


def test_prefix_split_across_feeds_at_every_point(framer_class):
    stream = frame(b"abc") + frame(b"") + frame(b"d")
    for cut in range(len(stream) + 1):
        framer = framer_class("length")
        assert feed_all(framer, [stream[:cut], stream[cut:]]) == [b"abc", b"", b"d"]


def test_frame_of_exactly_max_frame_bytes_is_accepted(framer_class):
    assert framer_class("length", max_frame=10).feed(frame(b"x" * 10)) == [b"x" * 10]


def test_frame_of_max_frame_plus_one_bytes_is_rejected_at_its_prefix(framer_class):
    framer = framer_class("length", max_frame=10)
    with pytest.raises(FrameTooLargeError) as raised:
        framer.feed(frame(b"ok") + prefix(11))
    assert raised.value.messages == [b"ok"]
    assert raised.value.discarded == 4
    assert framer.failed


@pytest.mark.parametrize("length", HOSTILE_LENGTHS, ids=hex)
def test_hostile_prefix_costs_nothing(framer_class, length):
    framer = framer_class("length")
    tracemalloc.start()
    try:
        assert framer.feed(frame(b"ok") + prefix(length)[:2]) == [b"ok"]
        with pytest.raises(FrameTooLargeError) as raised:
            framer.feed(prefix(length)[2:] + b"payload")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024
    assert raised.value.messages == []
    assert raised.value.discarded == 4 + len(b"payload")
    assert str(length) in str(raised.value)
    assert framer.pending == 0


def test_five_mib_frame(framer_class):
    payload = bytes(range(256)) * (5 * MiB // 256)
    stream = frame(payload) + frame(b"next")
    assert framer_class("length", max_frame=8 * MiB).feed(stream) == [payload, b"next"]
    framer = framer_class("length", max_frame=8 * MiB)
    chunks = [stream[start : start + MiB] for start in range(0, len(stream), MiB)]
    assert feed_all(framer, chunks[:-1]) == []
    assert framer.feed(chunks[-1]) == [payload, b"next"]
    assert_accounted(framer, [payload, b"next"])


# -- Raw -----------------------------------------------------------------------------------


def test_raw_feeds_are_messages(framer_class):
    framer = framer_class("raw")
    assert framer.feed(b"a\nb") == [b"a\nb"]
    assert framer.feed(b"") == []
    assert framer.feed(bytearray(3 * MiB)) == [bytes(3 * MiB)]
    assert framer.pending == 0
    assert_accounted(framer, [b"a\nb", bytes(3 * MiB)])


# -- Every framing -------------------------------------------------------------------------


@pytest.mark.parametrize("framing", ["raw", "lines", "length", "octets", "syslog"])
def test_empty_feed_returns_nothing(framer_class, framing):
    framer = framer_class(framing)
    assert framer.feed(b"") == []
    assert framer_counters(framer) == (0, 0, 0, 0, False)


def test_eof_discards_the_partial_message(framer_class):
    framer = framer_class()
    assert framer.eof() == 0
    assert framer.feed(b"a\npart") == [b"a"]
    assert framer.eof() == 4
    assert framer.pending == 0 and framer.bytes_discarded == 4
    assert framer.feed(b"b\n") == [b"b"]
    assert_accounted(framer, [b"a", b"b"])


def test_failed_framer_refuses_every_feed(framer_class):
    framer = framer_class("length", max_frame=4)
    with pytest.raises(FrameTooLargeError):
        framer.feed(prefix(5))
    for data in [b"more", b"", frame(b"ok")]:
        with pytest.raises(FramingError) as raised:
            framer.feed(data)
        assert type(raised.value) is FramingError
        assert raised.value.messages == [] and raised.value.discarded == len(data)
    assert framer.eof() == 0
    assert framer.failed
    assert_accounted(framer, [])


@pytest.mark.parametrize(
    "data",
    [
        b"ab\ncd\n",
        bytearray(b"ab\ncd\n"),
        memoryview(b"..ab\ncd\n")[2:],
        array.array("B", b"ab\ncd\n"),
        memoryview(b"ab\ncd\n").cast("B", [2, 3]),
    ],
    ids=["bytes", "bytearray", "memoryview-slice", "array", "memoryview-2d"],
)
def test_bytes_like_data(framer_class, data):
    assert framer_class().feed(data) == [b"ab", b"cd"]


def test_wide_items_count_in_bytes(framer_class):
    data = array.array("H", [0x0A0A, 0x4141])
    framer = framer_class()
    assert framer.feed(data) == [b"", b""]
    assert framer.bytes_in == 4 and framer.pending == 2


@pytest.mark.parametrize(
    "data, error",
    [("text\n", TypeError), (None, TypeError), (memoryview(b"a\nb\n")[::2], BufferError)],
)
def test_data_that_is_not_contiguous_bytes(framer_class, data, error):
    framer = framer_class()
    with pytest.raises(error):
        framer.feed(data)
    assert framer_counters(framer) == (0, 0, 0, 0, False)


@pytest.mark.parametrize(
    "arguments",
    [
        {"framing": "udp"},
        {"framing": "octet"},
        {"framing": None},
        {"framing": b"lines"},
        {"delimiter": b""},
        {"delimiter": "\n"},
        {"delimiter": 10},
        {"max_line": 0},
        {"max_line": -1},
        {"max_line": 2**32},
        {"max_line": 1.5},
        {"max_frame": 0},
        {"max_frame": 2**32},
        {"max_frame": "1"},
    ],
    ids=repr,
)
def test_bad_arguments_are_refused_alike(arguments):
    errors = []
    for framer_class in IMPLEMENTATIONS.values():
        with pytest.raises((ValueError, TypeError)) as raised:
            framer_class(**arguments)
        errors.append((type(raised.value), str(raised.value)))
    assert errors[0] == errors[1]


def test_largest_limits_are_accepted(framer_class):
    framer = framer_class("length", max_line=2**32 - 1, max_frame=2**32 - 1)
    assert framer.feed(frame(b"x")) == [b"x"]


def test_properties(framer_class):
    framer = framer_class()
    assert (framer.framing, framer.delimiter, framer.keep_delimiter) == ("lines", b"\n", False)
    assert (framer.max_line, framer.max_frame) == (MAX_LINE_LENGTH, MAX_FRAME_SIZE)
    assert framer_counters(framer) == (0, 0, 0, 0, False)
    framer = framer_class("length", delimiter=bytearray(b"\r\n"), keep_delimiter=1, max_line=7)
    assert (framer.framing, framer.delimiter, framer.keep_delimiter) == ("length", b"\r\n", True)
    assert type(framer.delimiter) is bytes and framer.max_line == 7
    for name in ["framing", "delimiter", "max_frame", "pending", "failed", "bytes_in"]:
        with pytest.raises(AttributeError):
            setattr(framer, name, getattr(framer, name))


@pytest.mark.parametrize(
    ("framing", "stream"),
    [
        ("lines", b"x" * 7 + b"\r\n"),
        ("length", frame(b"y" * 9)),
        ("octets", counted(b"z" * 9)),
        ("syslog", counted(b"z" * 9)),
        ("syslog", b"x" * 7 + b"\r\n"),
    ],
)
def test_largest_message_is_the_longest_the_limits_let_through(framer_class, framing, stream):
    framer = framer_class(framing, delimiter=b"\r\n", keep_delimiter=True, max_line=7, max_frame=9)
    assert framer.largest_message == 9
    assert [len(message) for message in framer.feed(stream)] == [9]
    line_longer = {"lines": 41, "length": 30, "octets": 30, "syslog": 41}[framing]
    frame_longer = {"lines": 21, "length": 30, "octets": 30, "syslog": 30}[framing]
    assert framer_class(framing, max_line=40, max_frame=30).largest_message == line_longer
    assert framer_class(framing, max_line=20, max_frame=30).largest_message == frame_longer
    assert framer_class("raw").largest_message is None


@pytest.mark.parametrize("framing", _framing.FRAMINGS)
def test_framing_limits_name_exactly_the_limits_that_bound_each_framing(framer_class, framing):
    # fastsock serve offers --max-line/--max-frame per framing from this table.
    assert reference.FRAMING_LIMITS == _framing.FRAMING_LIMITS
    assert tuple(_framing.FRAMING_LIMITS) == _framing.FRAMINGS == reference.FRAMINGS
    for limit in ("max_line", "max_frame"):
        largest = {
            framer_class(framing, **{"max_line": 50, "max_frame": 50, limit: value}).largest_message
            for value in (10, 1000)
        }
        assert (len(largest) == 2) == (limit in _framing.FRAMING_LIMITS[framing]), limit


def test_framers_share_nothing(framer_class):
    delimiter = bytearray(b"\r\n")
    crlf = framer_class(delimiter=delimiter, max_line=8)
    delimiter[:] = b"||"
    pipes = framer_class(delimiter=delimiter, keep_delimiter=True)
    assert crlf.feed(b"a||b\r\nc") == [b"a||b"]
    assert pipes.feed(b"x\r\ny||z") == [b"x\r\ny||"]
    with pytest.raises(LineTooLongError):
        crlf.feed(b"c" * 9)
    assert pipes.feed(b"||") == [b"z||"]
    assert (crlf.delimiter, pipes.delimiter) == (b"\r\n", b"||")
    assert crlf.failed and not pipes.failed


def test_a_framer_leaves_no_memory_behind(framer_class):
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        framer = framer_class(delimiter=b"|" * MiB, max_line=4 * MiB)
        framer.feed(b"x" * (2 * MiB))
        held = tracemalloc.get_traced_memory()[0] - before
        del framer
        left = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # The delimiter's copy and the partial line.
    assert held > 3 * MiB
    assert left < 64 * 1024


@pytest.mark.parametrize("framing", ["lines", "length", "octets", "syslog"])
def test_memory_stays_bounded_under_a_long_stream(framer_class, framing):
    if framing == "lines":
        stream = (b"x" * 999 + b"\n") * (16 * MiB // 1000)
    elif framing == "length":
        stream = frame(b"x" * (MAX_FRAME_SIZE - 4)) * 16
    else:
        stream = counted(b"x" * (MAX_FRAME_SIZE - 8)) * 16
    chunks = [stream[start : start + MiB] for start in range(0, len(stream), MiB)]
    framer = framer_class(framing)
    tracemalloc.start()
    try:
        framed = 0
        for chunk in chunks:
            framed += len(framer.feed(chunk))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert framed == len(stream) // (1000 if framing == "lines" else MAX_FRAME_SIZE)
    # One chunk's messages, the partial message and the buffer's slack: far below the stream.
    assert peak < 4 * MiB


def test_concurrent_feeds_never_corrupt_the_compiled_framer():
    framer = _framing.Framer()
    chunk = b"".join(b"%07d\n" % number for number in range(40_000))
    expected = chunk.split(b"\n")[:-1]
    results, refusals = [], []

    def feed_repeatedly():
        for _ in range(10):
            try:
                results.append(framer.feed(chunk))
            except RuntimeError:
                refusals.append(1)

    threads = [threading.Thread(target=feed_repeatedly) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) + len(refusals) == 20
    assert all(messages == expected for messages in results)
    assert framer.pending == 0
    assert framer.bytes_in == len(chunk) * len(results)


# -- Octet counting (RFC 6587) and syslog --------------------------------------------------


def test_octet_counted_frames(framer_class):
    framer = framer_class("octets")
    assert framer.feed(b"5 hello3 a\nb1") == [b"hello", b"a\nb"]
    assert framer.pending == 1
    assert framer.feed(b"  11 ") == [b" "]
    assert framer.pending == 3
    assert framer.feed(b"x" * 11) == [b"x" * 11]
    assert framer.pending == 0
    assert_accounted(framer, [b"hello", b"a\nb", b" ", b"x" * 11])


def test_octet_count_split_across_feeds_at_every_point(framer_class):
    messages = [b"<13>hello world", b"x", b"y" * 10, b"z" * 123]
    stream = b"".join(map(counted, messages))
    for cut in range(len(stream) + 1):
        framer = framer_class("octets")
        assert feed_all(framer, [stream[:cut], stream[cut:]]) == messages
        assert_accounted(framer, messages)
    framer = framer_class("octets")
    assert feed_all(framer, [stream[i : i + 1] for i in range(len(stream))]) == messages
    assert_accounted(framer, messages)


@pytest.mark.parametrize("size", [1, 2, 9, 10, 99, 100])
def test_count_of_exactly_max_frame_is_accepted(framer_class, size):
    framer = framer_class("octets", max_frame=size)
    assert framer.feed(counted(b"m" * size) + counted(b"k")) == [b"m" * size, b"k"]


@pytest.mark.parametrize("size", [1, 9, 10, 99, 100, 2**32 - 2])
def test_count_of_max_frame_plus_one_is_rejected_at_its_last_digit(framer_class, size):
    framer = framer_class("octets", max_frame=size)
    digits = b"%d" % (size + 1)
    assert framer.feed(counted(b"o") + digits[:-1]) == [b"o"]
    with pytest.raises(FrameTooLargeError) as raised:
        framer.feed(digits[-1:])
    assert raised.value.messages == []
    assert raised.value.discarded == len(digits)
    assert str(size) in str(raised.value)
    assert framer.failed and framer.pending == 0
    assert_accounted(framer, [b"o"])


@pytest.mark.parametrize(
    "count", [b"99999999999999999999999", b"4294967296", b"18446744073709551616"]
)
def test_hostile_count_costs_nothing(framer_class, count):
    framer = framer_class("octets", max_frame=2**32 - 1)
    tracemalloc.start()
    try:
        with pytest.raises(FrameTooLargeError) as raised:
            framer.feed(count + b" payload")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024
    # Refused at the digit that took it past the limit: the rest of the feed is discarded.
    assert raised.value.discarded == len(count) + len(b" payload")


@pytest.mark.parametrize(
    "stream",
    [b"0 ", b"0", b"00 x", b"01 a", b"5x", b"5\nhello", b"-1 a", b" 1 a", b"x", b"\n", b"1\t"],
    ids=repr,
)
def test_malformed_count_fails_the_framer(framer_class, stream):
    framer = framer_class("octets")
    with pytest.raises(MalformedFrameError) as raised:
        framer.feed(counted(b"first") + stream)
    assert raised.value.messages == [b"first"]
    assert raised.value.discarded == len(stream)
    assert framer.failed
    with pytest.raises(FramingError):
        framer.feed(counted(b"later"))
    assert_accounted(framer, [b"first"])


def test_malformed_count_fails_on_its_first_bad_byte(framer_class):
    framer = framer_class("octets")
    assert framer.feed(b"12") == []
    with pytest.raises(MalformedFrameError) as raised:
        framer.feed(b"a")
    assert raised.value.discarded == 3


def test_a_count_with_no_message_yet_is_pending(framer_class):
    framer = framer_class("octets")
    assert framer.feed(b"3 ab") == []
    assert framer.pending == 4
    assert framer.eof() == 4
    assert framer.bytes_discarded == 4


def test_multi_mib_octet_counted_frame(framer_class):
    payload = bytes(range(256)) * (5 * MiB // 256)
    stream = counted(payload) + counted(b"next")
    framer = framer_class("octets", max_frame=5 * MiB)
    chunks = [stream[start : start + 64 * 1024] for start in range(0, len(stream), 64 * 1024)]
    assert feed_all(framer, chunks) == [payload, b"next"]
    assert_accounted(framer, [payload, b"next"])
    with pytest.raises(FrameTooLargeError):
        framer_class("octets", max_frame=5 * MiB - 1).feed(stream)


def test_syslog_frames_octet_counts_when_the_first_byte_is_a_digit(framer_class):
    framer = framer_class("syslog")
    assert framer.feed(b"") == []
    assert framer.feed(b"1") == []
    assert framer.feed(b"1 <13>a\nb c d") == [b"<13>a\nb c d"]
    # Decided for the connection: a line now is a malformed count.
    with pytest.raises(MalformedFrameError):
        framer.feed(b"<13>line\n")


def test_syslog_frames_lines_otherwise(framer_class):
    framer = framer_class("syslog", max_line=20)
    assert framer.feed(b"<13>one\n<13>tw") == [b"<13>one"]
    # Decided for the connection: digits now start a line, not a count.
    assert framer.feed(b"o\n12 ab\n") == [b"<13>two", b"12 ab"]
    with pytest.raises(LineTooLongError):
        framer.feed(b"x" * 21)


def test_syslog_limits_are_max_line_and_max_frame(framer_class):
    assert framer_class("syslog", max_line=3, max_frame=10).feed(b"<1>\n") == [b"<1>"]
    with pytest.raises(LineTooLongError):
        framer_class("syslog", max_line=3, max_frame=10).feed(b"<13>\n")
    assert framer_class("syslog", max_line=3, max_frame=10).feed(counted(b"x" * 10)) == [b"x" * 10]
    with pytest.raises(FrameTooLargeError):
        framer_class("syslog", max_line=3, max_frame=10).feed(b"11 ")


def test_syslog_chooses_again_after_eof(framer_class):
    framer = framer_class("syslog")
    assert framer.feed(b"3 abc") == [b"abc"]
    framer.eof()
    assert framer.feed(b"abc\n") == [b"abc"]
