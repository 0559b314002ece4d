"""ReceiveOptions: one set of defaults and checks for receiver(), ReceiveHandler subclasses,
fastsock serve and the engines."""

import dataclasses
import resource
import ssl

import pytest

import fastsock
from fastsock import ReceiveOptions, constants
from fastsock.options import default_max_connections

HOST = "127.0.0.1"

BAD_OPTIONS = [
    {"framing": "words"},
    {"framing": "lines", "delimiter": b""},
    {"framing": "lines", "max_line": 0},
    {"recv_size": 0},
    {"recv_size": 1.5},
    {"idle_timeout": 0},
    {"idle_timeout": float("nan")},
    {"message_timeout": -1.0},
    {"drain_timeout": -0.5},
    {"max_connections": 0},
    {"max_connections": True},
    {"evict_idle_after": -1.0},
    {"max_partial_bytes": 0},
    {"engine_threads": 0},
    {"max_datagram": 0},
    {"datagram_batch": 0},
    {"datagram_busy_poll": 1.0},
    {"receive_buffer": -1},
    {"ssl_context": "server.pem"},
    {"ssl_context": ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)},
    {"ssl_context": ssl.create_default_context()},
    {"tls_handshake_timeout": 0},
    {"tls_handshake_timeout": None},
]


@pytest.mark.parametrize("options", BAD_OPTIONS)
def test_a_bad_option_is_refused_by_every_way_in(options):
    with pytest.raises(ValueError):
        ReceiveOptions(**options)
    with pytest.raises(ValueError):
        fastsock.receiver(fastsock.RingQueue(), **options)
    with pytest.raises(ValueError):
        fastsock.receiver(fastsock.RingQueue(), ReceiveOptions(), **options)
    subclass = type("Configured", (fastsock.ReceiveHandler,), {"queue": fastsock.RingQueue()})
    for name, value in options.items():
        setattr(subclass, name, value)
    with pytest.raises(ValueError):
        fastsock.TCPServer((HOST, 0), subclass)


def test_an_unknown_option_is_a_type_error():
    with pytest.raises(TypeError):
        fastsock.receiver(fastsock.RingQueue(), max_lines=10)


def test_the_handler_class_carries_the_options_as_attributes():
    options = ReceiveOptions(framing="lines", max_line=100, idle_timeout=None)
    handler = fastsock.receiver(fastsock.RingQueue(), options, engine_threads=2)
    assert handler.receive_options() == dataclasses.replace(options, engine_threads=2)
    assert (handler.framing, handler.max_line, handler.engine_threads) == ("lines", 100, 2)
    defaults = fastsock.ReceiveHandler
    assert (defaults.max_line, defaults.idle_timeout) == (
        constants.MAX_LINE_LENGTH,
        constants.IDLE_TIMEOUT,
    )


def test_a_subclass_configured_by_attributes_serves_with_them():
    ring = fastsock.RingQueue()
    subclass = type("Configured", (fastsock.ReceiveHandler,), {"queue": ring, "framing": "lines"})
    with fastsock.TCPServer((HOST, 0), subclass) as server:
        assert server.receive_path.options.framing == "lines"


@pytest.mark.parametrize(
    ("options", "largest"),
    [
        ({"framing": "raw", "recv_size": 1000}, 1000),
        ({"framing": "lines", "max_line": 1000}, 1001),
        ({"framing": "lines", "max_line": 1000, "delimiter": b"\r\n"}, 1002),
        ({"framing": "length", "max_frame": 1000}, 1000),
    ],
)
def test_the_largest_message_decides_the_ring_it_fits(options, largest):
    assert ReceiveOptions(**options).largest_message == largest
    fastsock.receiver(fastsock.RingQueue(max_bytes=largest), **options)
    with pytest.raises(ValueError, match="max_bytes"):
        fastsock.receiver(fastsock.RingQueue(max_bytes=largest - 1), **options)


def test_the_queue_must_be_a_ring():
    with pytest.raises(TypeError, match="RingQueue"):
        fastsock.receiver([], framing="lines")


@pytest.mark.parametrize("soft", [100, 5000, "hard"])
def test_max_connections_follows_the_descriptor_limit_on_engines_only(soft):
    old_soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == "hard":
        soft = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        expected = soft - constants.FD_RESERVE
        assert default_max_connections(thread_each=False) == expected
        assert default_max_connections(thread_each=True) == min(
            expected, constants.MAX_CONNECTIONS_CAP
        )
        assert ReceiveOptions().connections_limit(thread_each=False) == expected
        assert ReceiveOptions(max_connections=7).connections_limit(thread_each=False) == 7
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (old_soft, hard))


def test_a_server_side_ssl_context_is_taken_as_it_is():
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    options = ReceiveOptions(ssl_context=context, tls_handshake_timeout=2.5)
    assert options.ssl_context is context and options.tls_handshake_timeout == 2.5
    assert ReceiveOptions().ssl_context is None
    assert ReceiveOptions().tls_handshake_timeout == constants.TLS_HANDSHAKE_TIMEOUT
    # The handler class holds the context itself: an SSLContext cannot be copied.
    handler = fastsock.receiver(fastsock.RingQueue(), options)
    assert handler.ssl_context is context
    assert handler.receive_options() == options
    with pytest.raises(ValueError, match="client-side"):
        ReceiveOptions(ssl_context=ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
