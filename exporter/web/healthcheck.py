"""`llama-speed-exporter healthcheck`: does this host's daemon answer `/healthz`?

For a container's HEALTHCHECK, which a plain `urllib` one-liner cannot serve once TLS is on.
It resolves the settings as `run` does (flags, `LLAMA_SPEED_*` variables, the config file),
connects to the daemon's listen address on this machine, speaks TLS when the web config turns
it on, and asks `/healthz`, which needs no password. Exit status 0 when it answers 200 within
the timeout; 1 otherwise, with one line on stderr saying why.

The container engine starts the check as a process of its own, with the image's environment
but without `run`'s arguments: the listen address and web config file must come from the
environment or the config file for the two to agree.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from exporter import __version__
from exporter.config import Config, ConfigError
from exporter.host.address import split_listen_address
from exporter.web.webconfig import load_web_config

DEFAULT_TIMEOUT_SECONDS = 3.0
# Docker's statuses: 0 healthy, 1 unhealthy; it reserves 2, so nothing else is returned.
HEALTHY = 0
UNHEALTHY = 1
HEALTH_PATH = "/healthz"
_MAX_HEAD_BYTES = 16 * 1024
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3})(?: ([^\r\n]*))?")
# OpenSSL's reasons for a TLS client that got a plain HTTP answer.
_PLAIN_ANSWER_REASONS = ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG")
_PLAIN_PORT_HINT = "no TLS handshake: does the port speak plain HTTP, with another web config?"


class HealthcheckError(Exception):
    """Why the daemon is not healthy, in one line."""


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    # None for plain HTTP.
    tls: ssl.SSLContext | None = None
    # The web config requires a client certificate, and the server's own is presented.
    client_certificate: bool = False

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}{HEALTH_PATH}"


def connect_host(listen_host: str) -> str:
    """Where a client on this machine reaches a server listening on `listen_host`."""
    try:
        address = ipaddress.ip_address(listen_host)
    except ValueError:
        return listen_host  # a name such as localhost: resolved as the server resolved it
    if address.is_unspecified:
        # A wildcard listens on every interface, loopback included, of its family.
        return "127.0.0.1" if address.version == 4 else "::1"
    return listen_host


def endpoint(config: Config) -> Endpoint:
    """Where and how to ask, from the settings `run` would use; a bad web config raises."""
    host, port = split_listen_address(config.listen_address)
    if port == 0:
        raise HealthcheckError(
            f"the listen address {config.listen_address!r} has port 0 (a port chosen at each "
            "start): there is no known port to check"
        )
    host = connect_host(host)
    if config.web_config_file is None:
        return Endpoint(host, port)
    tls, mutual = client_context(config.web_config_file)
    return Endpoint(host, port, tls, mutual)


def client_context(web_config_file: Path) -> tuple[ssl.SSLContext | None, bool]:
    """The TLS client context for the daemon's web config, or None where it serves plain HTTP;
    and whether it presents a client certificate."""
    web = load_web_config(web_config_file)  # the checks `run` makes: a bad file is unhealthy
    if web.tls is None:
        return None, False
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # No verification of the server's certificate: this checks that the local process is
    # alive, not who it is. The connection goes to this machine's own listen address and
    # carries nothing secret (/healthz needs no password), and the certificate may well name
    # a host other than 127.0.0.1 or be signed by a CA this image does not hold.
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = web.tls.minimum_version
    context.maximum_version = web.tls.maximum_version
    if web.tls.verify_mode != ssl.CERT_REQUIRED:
        return context, False
    # RequireAndVerifyClientCert: the daemon answers nothing without a client certificate it
    # trusts. The only one at hand is the server's own: it serves where client_ca_file
    # issued it and it allows client authentication (no extendedKeyUsage, or clientAuth in
    # it); otherwise the check reports unhealthy and says so (docs/deploy.md).
    cert, key = _server_key_pair(web_config_file)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise HealthcheckError(f"cannot load {cert} as the client certificate: {exc}") from None
    return context, True


def _server_key_pair(web_config_file: Path) -> tuple[Path, Path]:
    """tls_server_config's cert_file and key_file, relative to the file as exporter-toolkit
    reads them; the file was checked by load_web_config just before."""
    import yaml  # noqa: PLC0415 - only with client certificates: see exporter.config.settings

    try:
        tls = yaml.safe_load(web_config_file.read_bytes())["tls_server_config"]
        names = (str(tls["cert_file"]), str(tls["key_file"]))
    except (OSError, yaml.YAMLError, KeyError, TypeError) as exc:
        raise HealthcheckError(f"{web_config_file} changed while read: {exc}") from None
    paths = (Path(name) for name in names)
    cert, key = (p if p.is_absolute() else web_config_file.parent / p for p in paths)
    return cert, key


def fetch_status(target: Endpoint, timeout: float) -> int:
    """The HTTP status of GET /healthz, all of it (connect, handshake, answer) within
    `timeout` seconds; a failure to get one raises HealthcheckError."""
    deadline = time.monotonic() + timeout

    def left() -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        return remaining

    handshake = False
    try:
        with socket.create_connection((target.host, target.port), timeout=left()) as raw:
            sock = raw
            if target.tls is not None:
                raw.settimeout(left())
                handshake = True
                sock = target.tls.wrap_socket(raw, server_hostname=_server_name(target.host))
                handshake = False
            with sock:
                return _exchange(sock, target, left)
    except TimeoutError:
        # A plain HTTP server waits for a request head, which a TLS client never sends.
        hint = f" ({_PLAIN_PORT_HINT})" if handshake else ""
        raise HealthcheckError(f"no answer within {timeout:g} s{hint}") from None
    except ssl.SSLError as exc:
        raise HealthcheckError(_tls_problem(exc, target)) from None
    except ConnectionRefusedError:
        raise HealthcheckError("connection refused: nothing listens there") from None
    except OSError as exc:
        raise HealthcheckError(exc.strerror or str(exc)) from None


def _exchange(sock: socket.socket, target: Endpoint, left: Callable[[], float]) -> int:
    host = f"[{target.host}]" if ":" in target.host else target.host
    request = (
        f"GET {HEALTH_PATH} HTTP/1.1\r\nHost: {host}:{target.port}\r\n"
        f"User-Agent: llama-speed-exporter-healthcheck/{__version__}\r\n"
        "Connection: close\r\n\r\n"
    )
    sock.settimeout(left())
    sock.sendall(request.encode("ascii"))
    head = b""
    # The status line is all that is needed; the rest of the answer is left unread.
    while b"\r\n" not in head and len(head) < _MAX_HEAD_BYTES:
        sock.settimeout(left())
        chunk = sock.recv(4096)
        if not chunk:
            break
        head += chunk
    line = head.split(b"\r\n", 1)[0]
    match = _STATUS_LINE.fullmatch(line)
    if match is None:
        if not head:
            raise HealthcheckError("the connection closed without an answer")
        raise HealthcheckError(f"not an HTTP answer: {line[:60]!r}")
    status = int(match[1])
    if status != 200:
        reason = (match[2] or b"").decode("latin-1")
        hint = ""
        if status == 400 and target.tls is None:
            hint = (
                " (a TLS port answers plain HTTP so: is the daemon's web config file set "
                "here too, as LLAMA_SPEED_WEB_CONFIG_FILE?)"
            )
        raise HealthcheckError(f"answered {status} {reason}".rstrip() + hint)
    return status


def _server_name(host: str) -> str | None:
    """SNI for a host name; an address literal is sent without (as browsers do)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host
    return None


def _tls_problem(exc: ssl.SSLError, target: Endpoint) -> str:
    text = f"TLS: {exc.reason or exc}"
    if exc.reason in _PLAIN_ANSWER_REASONS:
        return f"{text} ({_PLAIN_PORT_HINT})"
    if target.client_certificate:
        return text + (
            " (the web config requires a client certificate; the check presents the server's "
            "own, which client_ca_file must have issued for client authentication)"
        )
    return text


def check(
    config: Config,
    *,
    timeout: float = DEFAULT_TIMEOUT_SECONDS,
    prog: str = "llama-speed-exporter",
    stderr: TextIO | None = None,
) -> int:
    """HEALTHY if the daemon answers 200; else UNHEALTHY, and one line on `stderr`."""
    where = config.listen_address
    try:
        target = endpoint(config)
        where = target.url
        fetch_status(target, timeout)
    except (HealthcheckError, ConfigError) as exc:
        print(f"{prog} healthcheck: {where}: {exc}", file=stderr or sys.stderr)
        return UNHEALTHY
    return HEALTHY
