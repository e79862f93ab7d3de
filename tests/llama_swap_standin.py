"""A stand-in for llama-swap in front of real llama-server processes, built from its API.

No llama-swap binary is available here (a Go program, not on PyPI). This follows its HTTP
handlers as read at mostlygeek/llama-swap commit 0bdb3720 (tag v250 + 5,
`internal/server/server.go`, `api.go`, `internal/swaputil/http.go`, `internal/router/`):

- a request naming a model (the JSON `model` of `/v1/chat/completions`, `/completion`, ...;
  the `model` query parameter of `GET /props`) starts that model's command when it is not
  running, first stopping the running ones: the default group swaps, one model at a time;
- `/upstream/<model>/<path>` passes any request to the model's own server, and also starts
  it when it is not running, unless `<path>` matches `upstream.ignorePaths` (by default
  static files: `.json`, `.js`, `.css`, ...), which is answered 409 instead;
- `GET /running` lists the processes not stopped, `GET /v1/models` (and `/models`) every
  configured model with `status.value` "loaded" (any process not stopped) or "unloaded";
- `GET /unload` and `POST /api/models/unload[/<model>]` stop processes;
- errors are `{"src": "llama-swap", "error": {...}}` envelopes; an unknown path is Go's
  plain-text 404.

Left out: the UI, logs, API keys, profiles, selectors, peers, the swap matrix, TTL unloads,
request filters and macros other than `${PORT}`. The stand-in counts what matters to the
exporter's tests: every start, every swap that stopped a model, every request.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import shlex
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self
from urllib.parse import parse_qs, unquote, urlsplit

import structlog

from exporter.llama.server_process import ServerProcess, ServerStartError, free_port

log = structlog.get_logger(__name__)

# internal/config/upstream.go: DefaultUpstreamIgnorePathsPattern, matched anywhere (RE2's
# MatchString is a search).
DEFAULT_IGNORE_PATHS: Final = (re.compile(r".*\.(js|json|css|png|gif|jpg|jpeg|ico|txt)$"),)
# internal/server/server.go: the routes dispatched by the model their request names.
MODEL_POST_ROUTES: Final = frozenset(
    {
        "/v1/chat/completions",
        "/v1/responses",
        "/v1/completions",
        "/v1/messages",
        "/v1/embeddings",
        "/reranking",
        "/rerank",
        "/v1/rerank",
        "/v1/reranking",
        "/infill",
        "/completion",
    }
)
MODEL_GET_ROUTES: Final = frozenset({"/props"})
# llama-swap's default health check timeout is 120 s; a tiny model under load needs less.
READY_TIMEOUT_S: Final = 120.0
_MAX_BODY_BYTES: Final = 32 * 1024 * 1024  # swaputil.MaxMultiPartSize
_HOP_BY_HOP: Final = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host"}
)
_CHUNK: Final = 64 * 1024


@dataclass(frozen=True)
class SwapModel:
    """One entry of llama-swap's `models:`: a command with `${PORT}` where its port goes."""

    cmd: Sequence[str]
    name: str = ""
    description: str = ""
    unlisted: bool = False


@dataclass
class _Upstream:
    port: int
    process: ServerProcess | None = None
    state: str = "stopped"  # process.ProcessState: stopped, starting, ready, stopping
    in_flight: int = 0


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    standin: LlamaSwapStandin


class LlamaSwapStandin:
    """llama-swap on 127.0.0.1 over `models`; start with `with` or `start()`.

    `swap=True` is llama-swap's default group (starting one model stops the others);
    `swap=False` is a group with `swap: false`, where models run side by side.
    """

    def __init__(
        self,
        models: Mapping[str, SwapModel],
        *,
        log_dir: Path,
        swap: bool = True,
        ignore_paths: Sequence[re.Pattern[str]] = DEFAULT_IGNORE_PATHS,
        ready_timeout: float = READY_TIMEOUT_S,
    ) -> None:
        self.models = dict(models)
        self.swap = swap
        self.ignore_paths = tuple(ignore_paths)
        self.ready_timeout = ready_timeout
        self._log_dir = log_dir
        # Like llama-swap, each model gets its port when the configuration loads.
        self._upstreams = {name: _Upstream(free_port()) for name in self.models}
        self._cond = threading.Condition()  # guards the upstreams' state and the counters
        self._lifecycle = threading.Lock()  # one start or swap at a time, as its run loop
        self.starts: Counter[str] = Counter()
        self.stops: Counter[str] = Counter()
        self.swaps = 0  # starts that stopped another model to make room
        self.requests: list[str] = []
        self._http: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle of the stand-in -------------------------------------------------------

    @property
    def url(self) -> str:
        if self._http is None:
            raise RuntimeError("the llama-swap stand-in is not started")
        host, port = self._http.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> None:
        self._http = _HTTPServer(("127.0.0.1", 0), _Handler)
        self._http.standin = self
        # A short poll: shutdown() waits up to one poll interval for the serving loop to see it.
        self._thread = threading.Thread(
            target=self._http.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        log.info("llama_swap_standin_started", url=self.url, models=sorted(self.models))

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        if self._thread is not None:
            self._thread.join()
        self.unload()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def note_request(self, line: str) -> None:
        with self._cond:
            self.requests.append(line)

    # --- models --------------------------------------------------------------------------

    def running(self) -> dict[str, str]:
        """Model -> process state, for every process not stopped: what `/running` lists."""
        with self._cond:
            self._notice_exits()
            return {n: u.state for n, u in sorted(self._upstreams.items()) if u.state != "stopped"}

    def command(self, model: str) -> list[str]:
        port = str(self._upstreams[model].port)
        return [arg.replace("${PORT}", port) for arg in self.models[model].cmd]

    def unload(self, *models: str) -> None:
        """Stop the named models' processes, or every one (llama-swap's Unload)."""
        with self._lifecycle:
            for model in models or tuple(self._upstreams):
                self._stop(model)

    @contextlib.contextmanager
    def serving(self, model: str) -> Iterator[int]:
        """The port of `model`'s ready server, started (and the others stopped) if need be;
        the model counts as busy until the block ends, so no swap stops it meanwhile."""
        with self._lifecycle:
            upstream = self._upstreams[model]
            with self._cond:
                self._notice_exits()
                ready = upstream.state == "ready"
            if not ready:
                self._swap_in(model)
            with self._cond:
                upstream.in_flight += 1
        try:
            yield upstream.port
        finally:
            with self._cond:
                upstream.in_flight -= 1
                self._cond.notify_all()

    def _swap_in(self, model: str) -> None:
        others = [m for m, u in self._upstreams.items() if m != model and u.state != "stopped"]
        if self.swap and others:
            for other in others:
                self._stop(other)
            with self._cond:
                self.swaps += 1
        upstream = self._upstreams[model]
        with self._cond:
            self.starts[model] += 1
            upstream.state = "starting"
        process = ServerProcess(
            self.command(model),
            port=upstream.port,
            log_path=self._log_dir / f"llama-swap-{model}-{self.starts[model]}.log",
            ready_timeout=self.ready_timeout,
        )
        upstream.process = process
        log.info("llama_swap_standin_swap_in", model=model, stopped=others if self.swap else [])
        try:
            process.start()
            process.wait_ready(self.ready_timeout)  # GET /health: its default checkEndpoint
        except ServerStartError:
            with self._cond:
                upstream.process = None
                upstream.state = "stopped"
            raise
        with self._cond:
            upstream.state = "ready"

    def _stop(self, model: str) -> None:
        """Stop one model's process once its requests have ended (caller holds _lifecycle)."""
        upstream = self._upstreams[model]
        with self._cond:
            if upstream.process is None:
                return
            upstream.state = "stopping"
            deadline = time.monotonic() + self.ready_timeout
            while upstream.in_flight and time.monotonic() < deadline:
                self._cond.wait(deadline - time.monotonic())
        upstream.process.stop()
        with self._cond:
            upstream.process = None
            upstream.state = "stopped"
            self.stops[model] += 1

    def _notice_exits(self) -> None:
        # A server that exited on its own (a crash) is stopped: the next request starts it.
        for upstream in self._upstreams.values():
            process = upstream.process
            if process is not None and upstream.state == "ready" and process.returncode is not None:
                upstream.state = "stopped"
                upstream.process = None

    # --- the API's answers ----------------------------------------------------------------

    def running_answer(self) -> dict[str, Any]:
        """internal/server/api.go handleRunning: runningModel{model, state, cmd, proxy, ttl,
        name, description}, sorted by model."""
        return {
            "running": [
                {
                    "model": model,
                    "state": state,
                    "cmd": shlex.join(self.command(model)),
                    "proxy": f"http://localhost:{self._upstreams[model].port}",
                    "ttl": 0,
                    "name": self.models[model].name,
                    "description": self.models[model].description,
                }
                for model, state in self.running().items()
            ]
        }

    def models_answer(self) -> dict[str, Any]:
        """handleListModels: modelRecord{id, object, created, owned_by, name?, description?,
        meta?, status}, sorted by id; Go writes a map's keys sorted."""
        running = self.running()
        created = int(time.time())
        data = []
        for model, config in sorted(self.models.items()):
            if config.unlisted:
                continue
            record: dict[str, Any] = {
                "id": model,
                "object": "model",
                "created": created,
                "owned_by": "llama-swap",
            }
            if config.name.strip():
                record["name"] = config.name.strip()
            if config.description.strip():
                record["description"] = config.description.strip()
            record["meta"] = {"llamaswap": {"type": "model"}}
            record["status"] = {"value": "loaded" if model in running else "unloaded"}
            data.append(record)
        return {"data": data, "object": "list"}


def envelope(status: int, message: str) -> bytes:
    """swaputil.NewErrorEnvelope for the statuses the stand-in sends."""
    kinds = {
        404: ("invalid_request_error", "not_found"),
        409: ("invalid_request_error", "conflict"),
        502: ("server_error", "bad_gateway"),
    }
    error_type, code = kinds.get(status, ("server_error", "internal_error"))
    error = {"message": message, "type": error_type, "param": None, "code": code}
    return json.dumps({"src": "llama-swap", "error": error}).encode()


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.0: each answer ends with the connection, so a stream passes through as it comes.
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:  # `format`: the base's name
        """Requests are counted in `requests`; the base class would print each to stderr."""

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def _route(self, method: str) -> None:
        standin = self.server.standin
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        standin.note_request(f"{method} {self.path}")
        body = self._body()
        if body is None:
            return
        if method == "GET" and path == "/health":
            self._send(200, b"OK", "text/plain; charset=utf-8")
        elif method == "GET" and path == "/running":
            self._json(standin.running_answer())
        elif method == "GET" and path in ("/v1/models", "/models"):
            self._json(standin.models_answer())
        elif method == "GET" and path == "/unload":
            standin.unload()
            self._send(200, b"OK", "text/plain; charset=utf-8")
        elif method == "POST" and path == "/api/models/unload":
            standin.unload()
            self._json({"msg": "ok"})
        elif method == "POST" and path.startswith("/api/models/unload/"):
            self._unload_one(path.removeprefix("/api/models/unload/"))
        elif method == "GET" and path == "/metrics":
            # llama-swap's own system metrics; none here, as when its monitor is off.
            self._send(503, b"# performance monitor not available\n", "text/plain")
        elif parts.path.startswith("/upstream/"):
            self._upstream(method, parts.path, parts.query, body)
        elif method == "POST" and path in MODEL_POST_ROUTES:
            self._by_model(method, self._body_model(body), body)
        elif method == "GET" and path in MODEL_GET_ROUTES:
            self._by_model(method, parse_qs(parts.query).get("model", [""])[0], body)
        else:
            self._send(404, b"404 page not found\n", "text/plain; charset=utf-8")

    def _body(self) -> bytes | None:
        length = self.headers.get("Content-Length", "0")
        if not length.isdigit() or int(length) > _MAX_BODY_BYTES:
            self._send(413, envelope(413, "request body too large"), "application/json")
            return None
        return self.rfile.read(int(length))

    @staticmethod
    def _body_model(body: bytes) -> str:
        # gjson's `model` as a string: a JSON string, or nothing the router can dispatch.
        with contextlib.suppress(ValueError):
            data = json.loads(body)
            if isinstance(data, dict) and isinstance(data.get("model"), str):
                return str(data["model"])
        return ""

    def _by_model(self, method: str, model: str, body: bytes) -> None:
        """localPeerHandler: the model the request names is started if need be."""
        if not model:
            self._error(404, "no model id could be identified")
        elif model not in self.server.standin.models:
            self._error(404, "no router for requested model")
        else:
            self._proxy(method, model, self.path, body)

    def _upstream(self, method: str, raw_path: str, query: str, body: bytes) -> None:
        """handleUpstream: /upstream/<model>/<path>, the longest configured name first."""
        standin = self.server.standin
        segments = raw_path.removeprefix("/upstream/").split("/")
        found: tuple[str, str] | None = None
        name = ""
        for i, segment in enumerate(segments):
            if not segment:
                continue
            name = f"{name}/{unquote(segment)}" if name else unquote(segment)
            if name in standin.models:
                found = (name, "/" + "/".join(segments[i + 1 :]))
        if found is None:
            self._error(404, "model not found")
            return
        model, remaining = found
        if remaining == "/" and not raw_path.endswith("/"):
            location = f"/upstream/{model}/" + (f"?{query}" if query else "")
            self.send_response(301 if method == "GET" else 308)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        # A path llama-swap ignores reaches only a model that is ready: it never swaps.
        ignored = any(p.search(unquote(remaining)) for p in standin.ignore_paths)
        if ignored and standin.running().get(model) != "ready":
            self._error(409, f"model {model} is not loaded; path matches upstream.ignorePaths")
            return
        self._proxy(method, model, remaining + (f"?{query}" if query else ""), body)

    def _unload_one(self, model: str) -> None:
        if model not in self.server.standin.models:
            self._error(404, "model not found")
            return
        self.server.standin.unload(model)
        self._send(200, b"OK", "text/plain; charset=utf-8")

    def _proxy(self, method: str, model: str, target: str, body: bytes) -> None:
        standin = self.server.standin
        try:
            with standin.serving(model) as port:
                self._forward(method, port, target, body)
        except ServerStartError as exc:
            self._error(502, f"unable to start process: {exc}".splitlines()[0])

    def _forward(self, method: str, port: int, target: str, body: bytes) -> None:
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        upstream = http.client.HTTPConnection("127.0.0.1", port, timeout=READY_TIMEOUT_S)
        try:
            upstream.request(method, target, body=body or None, headers=headers)
            response = upstream.getresponse()
            self.send_response(response.status)
            for key, value in response.getheaders():
                if key.lower() not in _HOP_BY_HOP:
                    self.send_header(key, value)
            self.end_headers()
            while chunk := response.read1(_CHUNK):
                self.wfile.write(chunk)
                self.wfile.flush()
        finally:
            upstream.close()

    def _error(self, status: int, message: str) -> None:
        # swaputil.SendResponse: plain text for a client that asks for it, else JSON.
        if "text/plain" in self.headers.get("Accept", ""):
            self._send(status, f"llama-swap: {message}".encode(), "text/plain")
        else:
            self._send(status, envelope(status, message), "application/json")

    def _json(self, data: Any) -> None:
        # json.Encoder ends each value with a newline.
        self._send(200, json.dumps(data).encode() + b"\n", "application/json")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
