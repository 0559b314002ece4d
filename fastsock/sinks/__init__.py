"""Sinks into distributed logs, for ``fastsock serve --sink URL`` and for the library: each
writes the batches the pipeline takes from the ring and returns only once the broker has
confirmed every message (``fastsock.pipeline``'s sink protocol).

- ``redis://host:port/stream`` -> ``fastsock.sinks.redis.RedisStreamSink`` (extra ``redis``)
- ``nats://host:port/subject`` -> ``fastsock.sinks.nats.NatsJetStreamSink`` (extra ``nats``)
- ``kafka://broker:port/topic`` -> ``fastsock.sinks.kafka.KafkaSink`` (extra ``kafka``)

Each module imports its client library when it is imported (``fastsock.pipeline.open_sink``
imports the module only for its scheme, and names the extra when the library is missing), so
the core keeps no runtime dependency; this package holds what the three share: the URL parsing
and the names of the source fields.
"""

import urllib.parse
from dataclasses import dataclass

SOURCE_CONNECTION = "connection"
"""Name of the field (Redis) or header (NATS ``Fastsock-Connection``, Kafka
``fastsock-connection``) that carries a message's connection id, in decimal."""
SOURCE_PEER = "peer"
"""Name of the field or header that carries a message's peer address, as ``fastsock serve``
formats it."""


@dataclass(frozen=True)
class BrokerAddress:
    """A sink URL taken apart:
    ``scheme://[user:password@]host[:port][,host[:port]...]/name?option=value``."""

    servers: tuple[tuple[str, int], ...]
    name: str
    options: dict[str, str]
    username: str | None
    password: str | None


def parse_sink_url(url: str, scheme: str, default_port: int, what: str) -> BrokerAddress:
    """Split a sink URL, with default_port for hosts given without one; what names the path's
    meaning ("stream", "subject", "topic") in the errors."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != scheme:
        raise ValueError(f"{url!r}: not a {scheme}:// URL")
    if not parts.netloc:
        raise ValueError(f"{url!r}: no host (expected {scheme}://host:port/{what})")
    name = urllib.parse.unquote(parts.path.lstrip("/"))
    if not name:
        raise ValueError(f"{url!r}: no {what} (expected {scheme}://host:port/{what})")
    options: dict[str, str] = {}
    for key, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
        if key in options:
            raise ValueError(f"{url!r}: option {key!r} given twice")
        options[key] = value
    credentials, _, hosts = parts.netloc.rpartition("@")
    username, _, password = credentials.partition(":")
    servers = tuple(_host_port(url, server, default_port) for server in hosts.split(","))
    return BrokerAddress(
        servers,
        name,
        options,
        urllib.parse.unquote(username) or None,
        urllib.parse.unquote(password) or None,
    )


def _host_port(url: str, server: str, default_port: int) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(f"//{server}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{url!r}: bad port in {server!r}") from None
    if not parts.hostname:
        raise ValueError(f"{url!r}: no host in {server!r}")
    return parts.hostname, default_port if port is None else port


TIMEOUT_OPTIONS = {"connect_timeout": float, "write_timeout": float}
"""URL options every broker sink takes: seconds to (re)connect, seconds for a batch's acks."""


def take_options(url: str, options: dict[str, str], converters: dict) -> dict:
    """The URL's options converted by converters (option name -> function of the string);
    an unknown option or a value the converter refuses is a ValueError naming it."""
    unknown = sorted(set(options) - set(converters))
    if unknown:
        raise ValueError(
            f"{url!r}: unknown option(s) {', '.join(unknown)} (accepted: "
            f"{', '.join(sorted(converters))})"
        )
    converted = {}
    for key, value in options.items():
        try:
            converted[key] = converters[key](value)
        except ValueError as error:
            raise ValueError(f"{url!r}: option {key}={value!r}: {error}") from None
    return converted
