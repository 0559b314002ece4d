"""The drop-in promise, the public API: ``__all__`` and star-import, the class hierarchy,
the documented class attributes and their defaults, the signatures (fastsock's may only
extend the stdlib's), and a server's instance attributes.

Each body runs against the stdlib ``socketserver`` (the oracle) and ``fastsock``: see
tests/compat_helpers.py.
"""

import inspect
import itertools
import socket

import pytest

from tests.compat_helpers import PY311, PY312, SERVER_SHAPES, upper_echo_handler
from tests.support import LOCALHOST

HANDLER_NAMES = ("BaseRequestHandler", "StreamRequestHandler", "DatagramRequestHandler")
MIXIN_NAMES = ("ThreadingMixIn", "ForkingMixIn")
PUBLIC_NAMES = {"BaseServer", *SERVER_SHAPES, *MIXIN_NAMES, *HANDLER_NAMES}

_TCP = ["TCPServer", "BaseServer", "object"]
_UDP = ["UDPServer", *_TCP]
_UNIX_STREAM = ["UnixStreamServer", *_TCP]
_UNIX_DATAGRAM = ["UnixDatagramServer", *_UDP]
EXPECTED_MRO = {
    "BaseServer": ["BaseServer", "object"],
    "TCPServer": _TCP,
    "UDPServer": _UDP,
    "UnixStreamServer": _UNIX_STREAM,
    "UnixDatagramServer": _UNIX_DATAGRAM,
    "ThreadingMixIn": ["ThreadingMixIn", "object"],
    "ForkingMixIn": ["ForkingMixIn", "object"],
    "ThreadingTCPServer": ["ThreadingTCPServer", "ThreadingMixIn", *_TCP],
    "ThreadingUDPServer": ["ThreadingUDPServer", "ThreadingMixIn", *_UDP],
    "ThreadingUnixStreamServer": ["ThreadingUnixStreamServer", "ThreadingMixIn", *_UNIX_STREAM],
    "ThreadingUnixDatagramServer": [
        "ThreadingUnixDatagramServer",
        "ThreadingMixIn",
        *_UNIX_DATAGRAM,
    ],
    "ForkingTCPServer": ["ForkingTCPServer", "ForkingMixIn", *_TCP],
    "ForkingUDPServer": ["ForkingUDPServer", "ForkingMixIn", *_UDP],
    "BaseRequestHandler": ["BaseRequestHandler", "object"],
    "StreamRequestHandler": ["StreamRequestHandler", "BaseRequestHandler", "object"],
    "DatagramRequestHandler": ["DatagramRequestHandler", "BaseRequestHandler", "object"],
}
if PY312:
    EXPECTED_MRO["ForkingUnixStreamServer"] = [
        "ForkingUnixStreamServer",
        "ForkingMixIn",
        *_UNIX_STREAM,
    ]
    EXPECTED_MRO["ForkingUnixDatagramServer"] = [
        "ForkingUnixDatagramServer",
        "ForkingMixIn",
        *_UNIX_DATAGRAM,
    ]


def expected_class_attributes(name):
    """The documented class attributes of public class `name` and their defaults."""
    threading_defaults = {"daemon_threads": False, "block_on_close": True}
    forking_defaults = {
        "timeout": 300,
        "active_children": None,
        "max_children": 40,
        "block_on_close": True,
    }
    if name == "BaseServer":
        return {"timeout": None}
    if name == "ThreadingMixIn":
        return threading_defaults
    if name == "ForkingMixIn":
        return forking_defaults
    if name == "StreamRequestHandler":
        return {"rbufsize": -1, "wbufsize": 0, "timeout": None, "disable_nagle_algorithm": False}
    family, kind, mixin = SERVER_SHAPES[name]
    expected = {
        "timeout": None,
        "address_family": family,
        "socket_type": kind,
        "request_queue_size": 5,
        "allow_reuse_address": False,
    }
    if PY311:
        expected["allow_reuse_port"] = False
    if kind == socket.SOCK_DGRAM:
        expected["max_packet_size"] = 8192
    if mixin == "ThreadingMixIn":
        expected |= threading_defaults
    if mixin == "ForkingMixIn":
        expected |= forking_defaults
    return expected


def typed(mapping):
    """`mapping` with each value paired with its type: False must not pass for 0."""
    return {key: (type(value), value) for key, value in mapping.items()}


_SERVER_CONSTRUCTOR = "server_address, RequestHandlerClass, bind_and_activate=True"
_HANDLER_CONSTRUCTOR = "request, client_address, server"

BASE_SERVER_METHODS = {
    "serve_forever": "self, poll_interval=0.5",
    "shutdown": "self",
    "service_actions": "self",
    "handle_request": "self",
    "handle_timeout": "self",
    "server_activate": "self",
    "server_close": "self",
    "verify_request": "self, request, client_address",
    "process_request": "self, request, client_address",
    "finish_request": "self, request, client_address",
    "shutdown_request": "self, request",
    "close_request": "self, request",
    "handle_error": "self, request, client_address",
    "__enter__": "self",
    "__exit__": "self, *args",
}
SOCKET_SERVER_METHODS = BASE_SERVER_METHODS | {
    "server_bind": "self",
    "fileno": "self",
    "get_request": "self",
}
THREADING_METHODS = {
    "process_request": "self, request, client_address",
    "process_request_thread": "self, request, client_address",
    "server_close": "self",
}
FORKING_METHODS = {
    "collect_children": "self, *, blocking=False",
    "handle_timeout": "self",
    "service_actions": "self",
    "process_request": "self, request, client_address",
    "server_close": "self",
}
HANDLER_METHODS = {"setup": "self", "handle": "self", "finish": "self"}


def expected_signatures(name):
    """{callable name: parameter list} for public class `name`; "" names the class itself."""
    if name == "BaseServer":
        return {"": "server_address, RequestHandlerClass"} | BASE_SERVER_METHODS
    if name == "ThreadingMixIn":
        return THREADING_METHODS
    if name == "ForkingMixIn":
        return FORKING_METHODS
    if name in HANDLER_NAMES:
        return {"": _HANDLER_CONSTRUCTOR} | HANDLER_METHODS
    mixin = SERVER_SHAPES[name][2]
    mixin_methods = {"ThreadingMixIn": THREADING_METHODS, "ForkingMixIn": FORKING_METHODS}
    return {"": _SERVER_CONSTRUCTOR} | SOCKET_SERVER_METHODS | mixin_methods.get(mixin, {})


def parameters_of(parameter_list):
    """The inspect.Parameter objects of a parameter list written as in a `def`."""
    return list(inspect.signature(eval(f"lambda {parameter_list}: None")).parameters.values())


def describe(parameters):
    return [(p.name, p.kind.name, p.default) for p in parameters]


def test_all_lists_exactly_the_stdlib_names(ss):
    assert len(ss.__all__) == len(set(ss.__all__)), "__all__ has duplicates"
    assert set(ss.__all__) == PUBLIC_NAMES


def test_star_import_gives_exactly_the_public_classes(ss):
    namespace = {}
    exec(f"from {ss.__name__} import *", namespace)
    del namespace["__builtins__"]
    assert set(namespace) == PUBLIC_NAMES
    assert all(inspect.isclass(value) for value in namespace.values())


@pytest.mark.parametrize("name", sorted(EXPECTED_MRO))
def test_class_hierarchy(ss, name):
    mro = getattr(ss, name).__mro__
    assert [klass.__name__ for klass in mro] == EXPECTED_MRO[name]
    # The classes in the MRO are the module's own public classes, not look-alikes.
    for klass in mro[:-1]:
        assert getattr(ss, klass.__name__) is klass


def test_issubclass_relations_among_public_classes(ss):
    for name, other in itertools.product(sorted(EXPECTED_MRO), repeat=2):
        expected = other in EXPECTED_MRO[name]
        assert issubclass(getattr(ss, name), getattr(ss, other)) == expected, (name, other)


# BaseRequestHandler and DatagramRequestHandler document no class attributes.
@pytest.mark.parametrize(
    "name", sorted(PUBLIC_NAMES - {"BaseRequestHandler", "DatagramRequestHandler"})
)
def test_class_attribute_defaults(ss, name):
    expected = expected_class_attributes(name)
    klass = getattr(ss, name)
    actual = {attribute: getattr(klass, attribute, "<missing>") for attribute in expected}
    assert typed(actual) == typed(expected)


@pytest.mark.parametrize("name", sorted(PUBLIC_NAMES))
def test_signatures_extend_the_stdlib_ones(ss, name):
    """Stdlib parameters come first, unchanged; fastsock may add keyword-only ones with
    defaults after them, which no existing call can collide with."""
    klass = getattr(ss, name)
    for attribute, parameter_list in expected_signatures(name).items():
        target = getattr(klass, attribute) if attribute else klass
        expected = parameters_of(parameter_list)
        actual = list(inspect.signature(target).parameters.values())
        where = f"{name}.{attribute or '__init__'}"
        assert describe(actual[: len(expected)]) == describe(expected), where
        for extra in actual[len(expected) :]:
            assert extra.kind is inspect.Parameter.KEYWORD_ONLY, (where, extra)
            assert extra.default is not inspect.Parameter.empty, (where, extra)


def test_server_instance_attributes(ss):
    handler = upper_echo_handler(ss)
    with ss.TCPServer((LOCALHOST, 0), handler) as server:
        assert server.RequestHandlerClass is handler
        assert isinstance(server.socket, socket.socket)
        assert server.socket.family == socket.AF_INET
        assert server.socket.type == socket.SOCK_STREAM
        assert server.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
    with ss.UDPServer((LOCALHOST, 0), upper_echo_handler(ss, socket.SOCK_DGRAM)) as server:
        assert server.socket.type == socket.SOCK_DGRAM
        assert server.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 0
