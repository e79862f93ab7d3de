"""The HTTP endpoint's app: `/metrics`, `/healthz` and a landing page at `/`."""

from __future__ import annotations

import html
import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, make_wsgi_app

from exporter import __version__
from exporter.probe.results import RoundResult
from exporter.state.store import ModelState, TargetState
from exporter.web.protocol import StartResponse, WsgiApp
from exporter.web.server import WebServer

# The server lives in exporter.web.server; its callers know it from here.
__all__ = ["StartResponse", "WebServer", "WsgiApp", "landing_page", "make_app"]


def _fmt(value: float | None, unit: str = "") -> str:
    return "-" if value is None else f"{value:,.1f}{unit}"


def _outcome(last: RoundResult | None) -> str:
    if last is None:
        return "-"
    outcome = ", ".join(last.skips) or "ok"
    failures = [o.failure for o in last.outcomes.values() if o.failure]
    if failures:
        outcome = f"failed: {failures[0]}"
    if last.detail:
        outcome += f" ({last.detail})"
    return outcome


def _row(t: TargetState, model: str, view: ModelState | None, status: str, now: float) -> str:
    s = view.server if view is not None else None
    last = view.last_round if view is not None else None
    when = f"{now - last.started_at:.0f} s ago" if last else "not yet"
    series = view.series if view is not None else {}
    speeds = "".join(
        f"<li>depth {depth}: PP {_fmt(x.prompt_tokens_per_second)} t/s, "
        f"TG {_fmt(x.generation_tokens_per_second)} t/s, "
        f"TTFT {_fmt(None if x.time_to_first_token is None else x.time_to_first_token * 1e3)}"
        " ms</li>"
        for depth, x in sorted(series.items())
    )
    return (
        "<tr>"
        f"<td>{html.escape(t.name)}</td><td>{html.escape(t.url)}</td>"
        f"<td>{html.escape(status)}</td>"
        f"<td>{html.escape(model)}</td><td>{s.ctx if s else '-'}</td>"
        f"<td><ul>{speeds}</ul></td><td>{when}</td><td>{html.escape(_outcome(last))}</td>"
        "</tr>"
    )


def _rows(t: TargetState, now: float) -> list[str]:
    """A single server's row, or one per model a router or llama-swap lists."""
    if not t.multi:
        (view,) = t.views()
        model = t.server.model if t.server else "-"
        return [_row(t, model, view, "up" if t.up else "down", now)]
    kind = t.kind or ""
    if not t.up:
        return [_row(t, "-", None, f"{kind} down", now)]
    if not t.listed:
        return [_row(t, "(no models)", None, f"{kind} up", now)]
    return [
        _row(t, name, t.models.get(name), f"{kind}: {'loaded' if loaded else 'not loaded'}", now)
        for name, loaded in sorted(t.listed.items())
    ]


def landing_page(targets: list[TargetState], telemetry_path: str, now: float) -> str:
    rows = [row for t in targets for row in _rows(t, now)]
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
