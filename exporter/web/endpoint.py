"""The HTTP endpoint: `/metrics`, `/healthz` and a landing page at `/`."""

from __future__ import annotations

import contextlib
import html
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import structlog
from prometheus_client import CollectorRegistry, make_wsgi_app

from exporter import __version__
from exporter.state.store import TargetState

log = structlog.get_logger(__name__)

StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


def _fmt(value: float | None, unit: str = "") -> str:
    return "-" if value is None else f"{value:,.1f}{unit}"


def landing_page(targets: list[TargetState], telemetry_path: str, now: float) -> str:
    rows = []
    for t in targets:
        s = t.server
        last = t.last_round
        when = f"{now - last.started_at:.0f} s ago" if last else "not yet"
        outcome = "-"
        if last is not None:
            outcome = ", ".join(last.skips) or "ok"
            failures = [o.failure for o in last.outcomes.values() if o.failure]
            if failures:
                outcome = f"failed: {failures[0]}"
            if last.detail:
                outcome += f" ({last.detail})"
        speeds = "".join(
            f"<li>depth {depth}: PP {_fmt(x.prompt_tokens_per_second)} t/s, "
            f"TG {_fmt(x.generation_tokens_per_second)} t/s, "
            f"TTFT {_fmt(None if x.time_to_first_token is None else x.time_to_first_token * 1e3)}"
            " ms</li>"
            for depth, x in sorted(t.series.items())
        )
        rows.append(
            "<tr>"
            f"<td>{html.escape(t.name)}</td><td>{html.escape(t.url)}</td>"
            f"<td>{'up' if t.up else 'down'}</td>"
            f"<td>{html.escape(s.model) if s else '-'}</td><td>{s.ctx if s else '-'}</td>"
            f"<td><ul>{speeds}</ul></td><td>{when}</td><td>{html.escape(outcome)}</td>"
            "</tr>"
        )
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        "<title>llama-speed-exporter</title></head><body>"
        f"<h1>llama-speed-exporter {html.escape(__version__)}</h1>"
        f"<p><a href='{html.escape(telemetry_path)}'>Metrics</a> · "
        "<a href='/healthz'>Health</a></p>"
        "<table border='1' cellpadding='4'><tr><th>Target</th><th>URL</th><th>Server</th>"
        "<th>Model</th><th>ctx</th><th>Last results</th><th>Last round</th><th>Outcome</th></tr>"
        + "".join(rows)
        + "</table></body></html>"
    )


def make_app(
    registry: CollectorRegistry,
    snapshot: Callable[[], list[TargetState]],
    telemetry_path: str = "/metrics",
    clock: Callable[[], float] = time.time,
) -> WsgiApp:
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == telemetry_path:
            return metrics_app(environ, start_response)  # type: ignore[no-any-return]
        if path == "/healthz":
            start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"ok\n"]
        if path == "/":
            body = landing_page(snapshot(), telemetry_path, clock()).encode()
            start_response("200 OK", [("Content-Type", "text/html; charset=utf-8")])
            return [body]
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found\n"]

    return app


# A client that connects and says nothing must not hold its thread for ever; per socket call.
TLS_IO_TIMEOUT_SECONDS = 10.0
_TLS_HANDSHAKE_RECORD = 0x16
# What Go's net/http answers on a TLS port to a plain HTTP request (so does every Go exporter):
# the user who typed http:// reads why, instead of a reset connection.
_PLAIN_HTTP_ANSWER = (
    b"HTTP/1.0 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Connection: close\r\n\r\nClient sent an HTTP request to an HTTPS server.\n"
)


def _refuse_plain_http(request: socket.socket) -> None:
    request.sendall(_PLAIN_HTTP_ANSWER)
    request.shutdown(socket.SHUT_WR)
    # Closing with the request unread would send a reset, which can reach the client before
    # the answer does: read it to the client's end first, within a bound.
    request.settimeout(1.0)
    left = 64 * 1024
    with contextlib.suppress(OSError):
        while left > 0 and (chunk := request.recv(4096)):
            left -= len(chunk)


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True
    # The context for each new connection; None serves plain HTTP.
    tls_context: Callable[[], ssl.SSLContext] | None = None

    def finish_request(self, request: Any, client_address: Any) -> None:
        """Runs on the connection's own thread: a slow handshake never holds up accept()."""
        if self.tls_context is None:
            super().finish_request(request, client_address)
            return
        conn = self._tls_handshake(request, client_address[0], self.tls_context())
        if conn is None:
            return
        try:
            super().finish_request(conn, client_address)
        finally:
            self.shutdown_request(conn)  # the raw socket, detached by wrap_socket, is dead

    @staticmethod
    def _tls_handshake(
        request: socket.socket, client: str, context: ssl.SSLContext
    ) -> ssl.SSLSocket | None:
        request.settimeout(TLS_IO_TIMEOUT_SECONDS)
        try:
            first = request.recv(1, socket.MSG_PEEK)
            if not first:
                return None  # a port check: connected, closed, said nothing
            if first[0] != _TLS_HANDSHAKE_RECORD:
                # The stdlib's handshake would fail with "[SSL: HTTP_REQUEST] http request"
                # and reset the connection; answer as Go does instead.
                log.info("tls_handshake_failed", client=client, error="plain HTTP on a TLS port")
                if first.isalpha():
                    _refuse_plain_http(request)
                return None
            return context.wrap_socket(request, server_side=True)
        except OSError as exc:  # ssl.SSLError, a timeout, a reset
            log.info("tls_handshake_failed", client=client, error=str(exc))
            return None

    def handle_error(self, request: Any, client_address: Any) -> None:
        """One log line where socketserver would print a traceback to stderr."""
        log.warning("web_request_failed", client=client_address[0], error=repr(sys.exc_info()[1]))


class _ThreadingServer6(_ThreadingServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every few seconds would flood the log; errors are logged by the app."""

    def get_environ(self) -> dict[str, Any]:
        environ = super().get_environ()
        if isinstance(self.connection, ssl.SSLSocket):
            environ["HTTPS"] = "on"  # wsgiref's cue for wsgi.url_scheme https
        return environ


class WebServer:
    """Serves the app on a background thread; `close` stops it.

    With `tls`, every connection is TLS, with the context it returns at that moment: a
    reloaded certificate applies to the next connection.
    """

    def __init__(
        self,
        app: WsgiApp,
        host: str,
        port: int,
        tls: Callable[[], ssl.SSLContext] | None = None,
    ) -> None:
        server_class = _ThreadingServer6 if ":" in host else _ThreadingServer
        self._server = make_server(
            host, port, app, server_class=server_class, handler_class=_QuietHandler
        )
        self._server.tls_context = tls
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="web", kwargs={"poll_interval": 0.2}
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
