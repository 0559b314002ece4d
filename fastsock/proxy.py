"""The PROXY protocol (HAProxy's, versions 1 and 2): the header a load balancer sends first
on each connection it forwards, naming the client it accepted.

This is the pure-Python parser, used by the reference engine and by the per-connection
path (ReceiveHandler); the compiled event engine (fastsock/_engine.pyx) parses the same
way in C, with the same reasons, in the same order, for what it refuses.

``parse(data)`` takes the bytes a connection has sent so far: None while they are all the
beginning of a header, a ``ProxyHeader`` once one is complete, and a ``HeaderRejected``
(a ValueError) as soon as they cannot begin one.
"""

import ipaddress
import socket
import struct
from typing import NamedTuple

from . import constants
from .addresses import address_from_sockaddr, sockaddr_from_address

__all__ = [
    "REASONS",
    "V1_MAX_HEADER",
    "V2_SIGNATURE",
    "HeaderRejected",
    "ProxyHeader",
    "is_trusted",
    "parse",
    "trusted_networks",
]

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
V1_MAX_HEADER = 107
"""The longest v1 header, its CRLF included (the specification's limit)."""

# Why a header was refused; the compiled engine reports the index into this tuple.
REASONS = (
    "not a PROXY protocol header",
    "a v1 header without CRLF within 107 bytes",
    "a malformed v1 header",
    "a v2 header of an unknown version, command or family",
    "a v2 header whose length is too short for its addresses",
    f"a v2 header longer than {constants.PROXY_MAX_HEADER} bytes",
    "no complete header within the header timeout",
    "the connection ended inside the header",
)
(
    NOT_PROXY,
    V1_TOO_LONG,
    V1_MALFORMED,
    V2_UNSUPPORTED,
    V2_BAD_LENGTH,
    V2_TOO_LARGE,
    TIMED_OUT,
    TRUNCATED,
) = range(len(REASONS))

# v2 address families (the high nibble of byte 13) and the bytes of their addresses.
_V2_ADDRESS_BYTES = {0: 0, 1: 12, 2: 36, 3: 216}


class ProxyHeader(NamedTuple):
    """A complete header: its length in bytes, and the client it names (None: keep the real
    peer, for a v2 LOCAL command, v1 UNKNOWN, or an address family with no client to name)."""

    length: int
    address: object


class HeaderRejected(ValueError):
    """The bytes cannot begin a PROXY header; ``reason`` indexes REASONS."""

    def __init__(self, reason):
        super().__init__(REASONS[reason])
        self.reason = reason


def parse(data):
    """The header at the start of data, None if data is only its beginning so far; raises
    HeaderRejected."""
    data = bytes(data)
    if data[:1] == V2_SIGNATURE[:1]:
        return _parse_v2(data)
    return _parse_v1(data)


def _parse_v1(data):
    if not V1_PREFIX.startswith(data[: len(V1_PREFIX)]):
        raise HeaderRejected(NOT_PROXY)
    end = data.find(b"\r\n", 0, V1_MAX_HEADER)
    if end < 0:
        if len(data) >= V1_MAX_HEADER:
            raise HeaderRejected(V1_TOO_LONG)
        return None
    fields = data[len(V1_PREFIX) : end].split(b" ")
    if fields[0] == b"UNKNOWN":
        # The specification: the rest of the line is ignored.
        return ProxyHeader(end + 2, None)
    families = {b"TCP4": socket.AF_INET, b"TCP6": socket.AF_INET6}
    if len(fields) != 5 or fields[0] not in families:
        raise HeaderRejected(V1_MALFORMED)
    family = families[fields[0]]
    try:
        host = fields[1].decode("ascii")
        socket.inet_pton(family, host)
        socket.inet_pton(family, fields[2].decode("ascii"))
    except (UnicodeDecodeError, OSError, ValueError):
        raise HeaderRejected(V1_MALFORMED) from None
    ports = [_v1_port(field) for field in fields[3:]]
    address = (host, ports[0]) if family == socket.AF_INET else (host, ports[0], 0, 0)
    # As the kernel would give it: the same text for the same address.
    return ProxyHeader(end + 2, address_from_sockaddr(sockaddr_from_address(address, family)))


def _v1_port(field):
    if not (1 <= len(field) <= 5 and field.isdigit()) or (field[:1] == b"0" and len(field) > 1):
        raise HeaderRejected(V1_MALFORMED)
    port = int(field)
    if port > 65535:
        raise HeaderRejected(V1_MALFORMED)
    return port


def _parse_v2(data):
    if not V2_SIGNATURE.startswith(data[: len(V2_SIGNATURE)]):
        raise HeaderRejected(NOT_PROXY)
    if len(data) < 16:
        return None
    version, command = data[12] >> 4, data[12] & 0x0F
    family, transport = data[13] >> 4, data[13] & 0x0F
    if version != 2 or command > 1 or family not in _V2_ADDRESS_BYTES or transport > 2:
        raise HeaderRejected(V2_UNSUPPORTED)
    (length,) = struct.unpack_from("!H", data, 14)
    if 16 + length > constants.PROXY_MAX_HEADER:
        raise HeaderRejected(V2_TOO_LARGE)
    if command == 1 and length < _V2_ADDRESS_BYTES[family]:
        raise HeaderRejected(V2_BAD_LENGTH)
    if len(data) < 16 + length:
        return None
    address = None
    # LOCAL (command 0): the load balancer's own connection, e.g. a health check.
    if command == 1 and family == 1:
        host = socket.inet_ntop(socket.AF_INET, data[16:20])
        address = (host, struct.unpack_from("!H", data, 24)[0])
    elif command == 1 and family == 2:
        host = socket.inet_ntop(socket.AF_INET6, data[16:32])
        address = (host, struct.unpack_from("!H", data, 48)[0], 0, 0)
    return ProxyHeader(16 + length, address)


def trusted_networks(networks):
    """The ip_network objects of networks: strings or ipaddress networks; raises ValueError."""
    if isinstance(networks, (str, bytes)):
        raise ValueError(f"proxy_trusted must be a sequence of networks, not {networks!r}")
    return tuple(ipaddress.ip_network(network, strict=False) for network in networks)


def is_trusted(address, networks):
    """True if the real peer ``address`` may send a header: its IP is in one of networks
    (an IPv4-mapped IPv6 address as its IPv4), or it is a Unix socket peer (this host)."""
    if not isinstance(address, tuple):
        return True  # a Unix socket path or an abstract name: a process on this host
    try:
        ip = ipaddress.ip_address(address[0].partition("%")[0])
    except ValueError:
        return False
    candidates = [ip]
    if ip.version == 6 and ip.ipv4_mapped is not None:
        candidates.append(ip.ipv4_mapped)
    return any(candidate in network for candidate in candidates for network in networks)
