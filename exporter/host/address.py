"""Where a target's URL points: its port, and whether its server runs on this host."""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

_LOOPBACK = {"localhost", "127.0.0.1", "::1", "0.0.0.0", "::"}  # noqa: S104 - names, not binds


def uses_tls(url: str) -> bool:
    """Whether the URL's scheme is https, however it is spelled (`HTTPS://` too)."""
    return urlsplit(url).scheme == "https"


def port_of(url: str) -> int:
    """The URL's port, or its scheme's default."""
    return urlsplit(url).port or (443 if uses_tls(url) else 80)


def is_this_host(hostname: str) -> bool:
    """A port lookup is only meaningful for a server on this machine."""
    return hostname in _LOOPBACK or hostname.startswith("127.") or hostname in {
        socket.gethostname(), socket.getfqdn(),
    }  # fmt: skip


def local_port(url: str) -> int | None:
    """The port to find the server's process by, when the URL names this host; else None."""
    hostname = urlsplit(url).hostname
    return port_of(url) if hostname is not None and is_this_host(hostname) else None


def split_listen_address(address: str) -> tuple[str, int]:
    """`HOST:PORT`, `:PORT` or `[::1]:PORT` as the host and port to bind."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{address!r} is not HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 - exporters listen on all
