"""Datagram sender addresses: the raw sockaddr blobs that the datagram receive loop stores as
each message's ``source``, and the addresses Python's socket module uses for them.

``address_from_sockaddr(source)`` returns exactly what ``socket.recvfrom()`` would have
returned for the same sender: ``(host, port)`` for AF_INET, ``(host, port, flowinfo,
scope_id)`` for AF_INET6, a ``str`` path for AF_UNIX (bytes for a Linux abstract name,
``""`` for an address without a path, ``None`` when the sender had no address at all).
Consumers call it once per message, so decoded addresses are cached by blob.

``sockaddr_from_address(address, family)`` builds the blob the kernel would report for an
address, numeric hosts only.  Comparing blobs is the cheapest way to filter by sender.
"""

import os
import socket
import struct

__all__ = ["address_from_sockaddr", "format_address", "sockaddr_from_address"]

# sa_family is in host byte order, ports, IPv4 addresses and the flow label in network
# order, and the IPv6 scope id in host order: hence one struct per byte order.
_FAMILY = struct.Struct("=H")
_PORT_FLOWINFO = struct.Struct("!HI")
_PORT = struct.Struct("!H")
_SCOPE_ID = struct.Struct("=I")
_INET_SIZE = 16
_INET6_SIZE = 28
_UNIX_PATH_OFFSET = 2
# sizeof(sockaddr_un.sun_path): a path fills it with its NUL, an abstract name without one.
_UNIX_PATH_CAPACITY = 108
# The generic sockaddr's sa_data, which Python returns for families it does not know.
_SA_DATA_SIZE = 14

# Decoded addresses by blob.  A server hears from a bounded set of peers far more often than
# from new ones; the cache is emptied when it reaches this size, so a scan from many
# addresses costs memory for at most this many entries.
_CACHE_SIZE = 4096
_cache: dict = {}


def address_from_sockaddr(blob):
    """The socket-module address of a raw sockaddr (see the module docstring)."""
    if not blob:
        return None
    address = _cache.get(blob)
    if address is None:
        address = _decode(blob)
        if len(_cache) >= _CACHE_SIZE:
            _cache.clear()
        _cache[blob] = address
    return address


def format_address(address):
    """An address as people write it: 127.0.0.1:9000, [::1]:9000, a path, @name for a Linux
    abstract name; None if unknown."""
    if not address:
        return None
    if isinstance(address, tuple):
        host, port = address[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if isinstance(address, bytes):
        return "@" + address[1:].decode(errors="backslashreplace")
    return str(address)


def _decode(blob):
    if len(blob) < 2:
        raise ValueError(f"a sockaddr is at least 2 bytes long, not {len(blob)}")
    (family,) = _FAMILY.unpack_from(blob)
    if family == socket.AF_INET:
        _check_size(blob, _INET_SIZE)
        (port,) = _PORT.unpack_from(blob, 2)
        return (socket.inet_ntop(socket.AF_INET, blob[4:8]), port)
    if family == socket.AF_INET6:
        _check_size(blob, _INET6_SIZE)
        port, flowinfo = _PORT_FLOWINFO.unpack_from(blob, 2)
        (scope_id,) = _SCOPE_ID.unpack_from(blob, 24)
        return (socket.inet_ntop(socket.AF_INET6, blob[8:24]), port, flowinfo, scope_id)
    if family == socket.AF_UNIX:
        path = blob[_UNIX_PATH_OFFSET:]
        if path[:1] == b"\0":
            return path
        return os.fsdecode(path.partition(b"\0")[0])
    return (family, blob[2 : 2 + _SA_DATA_SIZE].ljust(_SA_DATA_SIZE, b"\0"))


def _check_size(blob, size):
    if len(blob) < size:
        raise ValueError(f"a sockaddr of this family is {size} bytes long, not {len(blob)}")


def sockaddr_from_address(address, family):
    """The raw sockaddr that the kernel reports for ``address`` of ``family``.

    ``address`` is in the socket module's form; hosts must be numeric.  ``None`` (an
    unbound Unix sender) gives ``b""``.  Raises ValueError for an address that does not
    fit its family.
    """
    try:
        return _encode(address, family)
    except struct.error as exc:
        raise ValueError(f"{address!r} does not fit a {family!r} sockaddr: {exc}") from None


def _encode(address, family):
    if family == socket.AF_INET:
        host, port = address
        return (
            _FAMILY.pack(family)
            + _PORT.pack(port)
            + _packed_host(socket.AF_INET, host)
            + bytes(_INET_SIZE - 8)
        )
    if family == socket.AF_INET6:
        host, port, flowinfo, scope_id = (tuple(address) + (0, 0))[:4]
        return (
            _FAMILY.pack(family)
            + _PORT_FLOWINFO.pack(port, flowinfo)
            + _packed_host(socket.AF_INET6, host)
            + _SCOPE_ID.pack(scope_id)
        )
    if family == socket.AF_UNIX:
        if address is None:
            return b""
        path = os.fsencode(address)
        if path and path[:1] != b"\0":
            path += b"\0"
        if len(path) > _UNIX_PATH_CAPACITY:
            raise ValueError(f"AF_UNIX address too long: {address!r}")
        return _FAMILY.pack(family) + path
    raise ValueError(f"unsupported address family: {family!r}")


def _packed_host(family, host):
    try:
        return socket.inet_pton(family, host)
    except OSError:
        name = socket.AddressFamily(family).name
        raise ValueError(f"not a numeric {name} address: {host!r}") from None
