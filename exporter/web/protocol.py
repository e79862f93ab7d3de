"""HTTP/1.x as the scrape endpoint speaks it: a request head in, a WSGI call, a response out.

No sockets here: `exporter.web.server` moves the bytes. The endpoint serves GET (and HEAD and
OPTIONS) of small documents, so a request with a body is refused rather than read: the server
never has to hold or wait for more than the head.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any
from urllib.parse import unquote, urlsplit

import structlog

log = structlog.get_logger(__name__)

StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

METHODS = ("GET", "HEAD", "OPTIONS")
# A blank line ends the head; bare LF line ends are taken too, as most servers take them.
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_VERSION = re.compile(r"HTTP/\d\.\d")
# Framing is the server's: an app's own would contradict the Content-Length set here.
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length"})
_REASONS = {
    400: "Bad Request",
    405: "Method Not Allowed",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    505: "HTTP Version Not Supported",
}


class HttpError(Exception):
    """A request the server answers itself, with `code`, and then closes the connection."""

    def __init__(self, code: int, detail: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.headers = headers


@dataclass(frozen=True)
class Request:
    method: str
    target: str
    version: str
    headers: tuple[tuple[str, str], ...]  # names lower-cased, in the order sent
    keep_alive: bool


def head_end(buffer: bytes | bytearray, limit: int, searched: int = 0) -> int | None:
    """Where the head ends in `buffer` (past its blank line), or None while it is incomplete.

    A head longer than `limit` raises 431, whether or not its end has arrived: the server
    holds at most `limit` bytes (and one read) for any client. `searched` is how much of
    `buffer` an earlier call saw: a head sent a byte at a time is then scanned once, not
    once per byte.
    """
    match = _HEAD_END.search(buffer, max(0, searched - 3), limit + 4)
    if match is not None and match.end() <= limit:
        return match.end()
    if match is not None or len(buffer) > limit:
        raise HttpError(431, f"the request head is over {limit} bytes")
    return None


def parse_head(head: bytes) -> Request:
    """The request line and headers of a complete head; HttpError for what is not served."""
    lines = [line.removesuffix("\r") for line in head.decode("latin-1").split("\n")]
    parts = lines[0].split(" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not _VERSION.fullmatch(parts[2]):
        raise HttpError(400, "malformed request line")
    method, target, version = parts
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise HttpError(505, f"{version} is not served here; use HTTP/1.1")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        # A space before the colon or a folded line is how requests get smuggled past
        # proxies that read them differently: refused, as RFC 9112 says.
        if not sep or not _TOKEN.fullmatch(name):
            raise HttpError(400, "malformed header line")
        headers.append((name.lower(), value.strip(" \t")))
    if method not in METHODS:
        raise HttpError(405, f"{method} is not served here", (("Allow", ", ".join(METHODS)),))
    _refuse_body(headers)
    connection = ",".join(value for name, value in headers if name == "connection")
    tokens = {token.strip().lower() for token in connection.split(",")}
    if version == "HTTP/1.1":
        keep_alive = "close" not in tokens
    else:
        keep_alive = "keep-alive" in tokens and "close" not in tokens
    return Request(method, target, version, tuple(headers), keep_alive)


def _refuse_body(headers: list[tuple[str, str]]) -> None:
    for name, value in headers:
        if name == "transfer-encoding":
            raise HttpError(413, "request bodies are not accepted")
        if name == "content-length":
            if not value.isdigit():
                raise HttpError(400, "malformed Content-Length")
            if int(value):
                raise HttpError(413, "request bodies are not accepted")


class _ErrorStream(io.TextIOBase):
    """`wsgi.errors`: what an app writes there becomes a log event, like every other line."""

    def write(self, text: str) -> int:
        if text.strip():
            log.warning("wsgi_error", message=text.rstrip())
        return len(text)


def wsgi_environ(
    request: Request,
    *,
    client: tuple[str, int],
    server: tuple[str, int],
    https: bool,
) -> dict[str, Any]:
    target = request.target
    if target.startswith(("http://", "https://")):  # the absolute form, as sent to a proxy
        split = urlsplit(target)
        path, query = split.path or "/", split.query
    elif target.startswith("/") or (target == "*" and request.method == "OPTIONS"):
        path, _, query = target.partition("?")
    else:
        raise HttpError(400, "malformed request target")
    environ: dict[str, Any] = {
        "REQUEST_METHOD": request.method,
        "SCRIPT_NAME": "",
        "PATH_INFO": unquote(path, "latin-1"),  # PEP 3333: bytes as latin-1, as wsgiref does
        "QUERY_STRING": query,
        "SERVER_NAME": server[0],
        "SERVER_PORT": str(server[1]),
        "SERVER_PROTOCOL": request.version,
        "REMOTE_ADDR": client[0],
        "REMOTE_PORT": str(client[1]),
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "https" if https else "http",
        "wsgi.input": io.BytesIO(),
        "wsgi.errors": _ErrorStream(),
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    if https:
        environ["HTTPS"] = "on"
    for name, value in request.headers:
        # Underscores would let a header pose as another (X_Forwarded_For as X-Forwarded-For):
        # dropped, as wsgiref drops them.
        if "_" in name:
            continue
        key = name.upper().replace("-", "_")
        if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            key = "HTTP_" + key
        environ[key] = f"{environ[key]},{value}" if key in environ else value
    return environ


@dataclass
class Response:
    status: str
    headers: list[tuple[str, str]]
    body: bytes


def call_app(app: WsgiApp, environ: dict[str, Any]) -> Response:
    """Runs the app to the end and keeps its whole answer: the socket is written afterwards,
    by whichever thread can, so that a slow reader never holds the app's thread."""
    started: list[Response] = []
    chunks: list[bytes] = []

    def start_response(
        status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], None]:
        # Nothing is sent before the app returns, so an error page may always replace the
        # first answer (PEP 3333's exc_info case).
        if started and exc_info is None:
            raise RuntimeError("start_response called twice without exc_info")
        if not re.fullmatch(r"\d{3} [^\r\n]*", status):
            raise ValueError(f"malformed status {status!r}")
        for name, value in headers:
            if not _TOKEN.fullmatch(name) or "\r" in value or "\n" in value:
                raise ValueError(f"malformed header {name!r}")
        started[:] = [Response(status, list(headers), b"")]
        return chunks.append

    result = app(environ, start_response)
    try:
        for chunk in result:
            if not isinstance(chunk, bytes):
                raise TypeError(f"the app yielded {type(chunk).__name__}, not bytes")
            chunks.append(chunk)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    if not started:
        raise RuntimeError("the app returned without calling start_response")
    started[0].body = b"".join(chunks)
    return started[0]


def render(response: Response, *, version: str, keep_alive: bool, head_only: bool) -> bytes:
    """The response on the wire: always with Content-Length, so that a connection can be kept."""
    lines = [f"HTTP/1.1 {response.status}"]
    lines += [f"{n}: {v}" for n, v in response.headers if n.lower() not in _HOP_BY_HOP]
    lines.append(f"Date: {formatdate(usegmt=True)}")
    lines.append(f"Content-Length: {len(response.body)}")
    if not keep_alive:
        lines.append("Connection: close")
    elif version == "HTTP/1.0":
        lines.append("Connection: keep-alive")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + response.body


def error_response(error: HttpError) -> bytes:
    """The server's own answer to a request it does not serve; the connection closes after."""
    reason = _REASONS.get(error.code, "Error")
    response = Response(
        f"{error.code} {reason}",
        [("Content-Type", "text/plain; charset=utf-8"), *error.headers],
        f"{reason}: {error.detail}\n".encode(),
    )
    return render(response, version="HTTP/1.1", keep_alive=False, head_only=False)
