"""A hostile llama-server: a real HTTP server on 127.0.0.1 that answers as b11434 does, until it
is told to misbehave.

Healthy, it serves /props, /v1/models, /slots, /health and streamed POST /completion with the
answers recorded in `tests/fixtures/llama/`, and its timings are true: a prompt of N tokens
takes N x PROMPT_MS_PER_TOKEN before the first streamed token, and each generated token after
the first comes GENERATION_MS_PER_TOKEN after the one before; the final event claims exactly
those times. The exporter's own clock therefore agrees with every honest answer, and every
honest figure is exactly PROMPT_TPS or GENERATION_TPS. Each completion takes a new task id in
its slot, as b11434's do; the other slots' ids change only when production is simulated.

`POST /_control` with `{"fault": NAME, ...params}` switches a fault on (any earlier one off);
`{"fault": null}` heals. `GET /_control` reads the fake's state. The control path is answered
whatever the fault. Switching ends every response that a fault holds open (a drip, a stall, an
endless stream): it closes that connection, as a restarted server would.

The HTTP is written by hand, so that a fault can misbehave at the byte level: drip a body,
reset the connection mid-stream, send a line that never ends, stall with the socket open.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Final, Literal

from tests.fakes import final_chunk_template, fixture_json

# Honest pacing: 800 t/s prompt processing, 100 t/s generation. With the suite's 32-token
# prompts and 8-token generations a request takes 40 ms or 70 ms.
PROMPT_MS_PER_TOKEN: Final = 1.25
GENERATION_MS_PER_TOKEN: Final = 10.0
PROMPT_TPS: Final = 1000 / PROMPT_MS_PER_TOKEN
GENERATION_TPS: Final = 1000 / GENERATION_MS_PER_TOKEN

# `tiny_timings`: the claim, and the time the work really takes. The exporter may allow its
# own view of a request some slack (a factor and a quarter of a second on top of the server's
# claim); these are far past it. Generation is measured from the first streamed token to the
# last, so a client slow to read the first token sees less of it: it gets the wider margin.
TINY_CLAIM_MS: Final = 10.0
TINY_ACTUAL_S: Final = {"prompt": 0.3, "generation": 0.45}
# `inflated_timings`: claims this many times the time the work took.
INFLATE_FACTOR: Final = 10.0

# Endless bodies are sent at about this rate, fast enough to pass any sane size cap within a
# fraction of a second, bounded so that an exporter without a cap grows at a rate a test can
# catch; and never past ENDLESS_SAFETY_BYTES, so that one cannot eat the test machine.
ENDLESS_CHUNK_BYTES: Final = 256 * 1024
ENDLESS_BYTES_PER_SECOND: Final = 128 * 1024 * 1024
ENDLESS_SAFETY_BYTES: Final = 1024 * 1024 * 1024
OVERSIZED_DEFAULT_BYTES: Final = 64 * 1024 * 1024

# A completion that arrives this long after the previous one ended starts a new round (for
# `one_bad_repetition`, which needs to know which repetition a request is).
ROUND_GAP_S: Final = 0.5

FAULTS: Final = frozenset(
    {
        "drip",  # /props (or `path`): headers, then the body one byte per `interval_s`
        "reset_mid_stream",  # completion: headers and one token, then a TCP reset
        "stall_mid_stream",  # completion (or `path`): part of the answer, then silence
        "oversized_body",  # /props of `size` bytes (valid JSON), Content-Length declared
        "endless_stream",  # `path` /props or /completion: a body that never ends, chunked
        "line_without_newline",  # completion: an SSE `data:` line that never ends
        "nan_timings",  # the kind's duration is NaN
        "inf_timings",  # ... Infinity, or `literal` (e.g. "1e999")
        "zero_timings",  # ... 0
        "negative_timings",  # ... negative
        "tiny_timings",  # claims TINY_CLAIM_MS for work that takes TINY_ACTUAL_S
        "inflated_timings",  # claims INFLATE_FACTOR times the time the work took
        "one_bad_repetition",  # tiny_timings in the `repetition`-th request of a round only
        "slots_toggle",  # /slots answers 501 and /props says endpoint_slots false
        "production_between_polls",  # another slot takes a new task during each completion
        "fifo_model_path",  # /props model_path is `path`
        "surrogate_label",  # model alias and build_info are `alias` and `build`
        "http_401_mid_run",  # after `after` completions, 401 on every protected endpoint
        "http_500_mid_run",  # after `after` completions, 500 on every completion
        "down",  # every connection is reset once its request is read
    }
)
# Faults that touch completions take `kinds`: ["prompt"], ["generation"] or both (default).
# A prompt request is recognised by its n_predict of 1.
Kind = Literal["prompt", "generation"]

_STATUS: Final = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    500: "Internal Server Error",
    501: "Not Implemented",
}
_PUBLIC_PATHS: Final = frozenset({"/health", "/v1/health", "/models", "/v1/models"})
_NOT_FOUND: Final = (404, {"error": {"code": 404, "message": "File Not Found",
                                     "type": "not_found_error"}})  # fmt: skip
_NO_SLOTS: Final = "This server does not support slots endpoint."
_NO_METRICS: Final = "This server does not support metrics endpoint."
# Faults that misbehave in the bytes of one endpoint's answer, and that endpoint by default.
_BYTE_FAULTS: Final = {
    "drip": "/props",
    "oversized_body": "/props",
    "endless_stream": "/props",
    "stall_mid_stream": "/completion",
}
# Requests a round sends per kind: the suite probes with this many repetitions.
REPETITIONS: Final = 3


def _byte_fault_path(fault: str, params: dict[str, Any]) -> str:
    return str(params.get("path", _BYTE_FAULTS[fault]))


class _GoneError(Exception):
    """The client closed the connection, or the fault that held it open was switched off."""


@dataclass(frozen=True)
class _Completion:
    prompt: list[int]
    n_predict: int
    kind: Kind
    slot: int
    response_fields: Any


def _spoil(claim: float, fault: _Fault) -> Any:
    """The claimed duration as a timing fault reports it."""
    spoiled: dict[str | None, Any] = {
        "tiny_timings": TINY_CLAIM_MS,
        "inflated_timings": claim * INFLATE_FACTOR,
        "nan_timings": float("nan"),
        "inf_timings": "__literal__",  # replaced in the encoded event by the literal
        "zero_timings": 0.0,
        "negative_timings": -claim,
    }
    return spoiled.get(fault.name, claim)


@dataclass
class _Fault:
    name: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    epoch: int = 0  # bumped at every switch: a held response ends when it changes
    completions: int = 0  # completions started since the switch


class HostileLlamaServer:
    def __init__(
        self,
        *,
        model_path: str = "/nonexistent/models/tiny.gguf",
        n_ctx: int = 4096,
        slots: int = 4,
        n_vocab: int = 64,
    ) -> None:
        self.model_path = model_path
        self.n_ctx = n_ctx
        self.slots = slots
        self.n_vocab = n_vocab
        self._lock = threading.Condition()
        self._fault = _Fault()
        self._closing = False
        self._id_task = list(range(slots))  # each slot's current or last task
        self._processing: set[int] = set()
        self._held_tokens = [0] * slots
        self._next_task = slots
        self._stalled = 0
        self._served: dict[str, int] = {}
        self._reps: dict[Kind, int] = {"prompt": 0, "generation": 0}
        self._last_completion_end = 0.0
        self._oversized: dict[int, bytes] = {}
        self._conns: set[socket.socket] = set()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, name="hostile-llama", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- control -----------------------------------------------------------------------------

    def switch(self, fault: str | None, **params: Any) -> None:
        """What `POST /_control` does; tests go through the endpoint, as an operator would."""
        if fault is not None and fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}")
        with self._lock:
            self._fault = _Fault(fault, dict(params), self._fault.epoch + 1)
            self._lock.notify_all()

    def state(self) -> dict[str, Any]:
        with self._lock:
            return {
                "fault": self._fault.name,
                "params": self._fault.params,
                "epoch": self._fault.epoch,
                "completions_since_switch": self._fault.completions,
                "stalled": self._stalled,
                "served": dict(self._served),
                "id_task": list(self._id_task),
            }

    def close(self) -> None:
        with self._lock:
            self._closing = True
            self._lock.notify_all()
            conns = list(self._conns)
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
        self._listener.close()
        for conn in conns:
            _reset(conn)
        self._thread.join(timeout=10)

    # -- connections -------------------------------------------------------------------------

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                if self._closing:
                    _reset(conn)
                    return
                self._conns.add(conn)
            threading.Thread(target=self._connection, args=(conn,), daemon=True).start()

    def _connection(self, conn: socket.socket) -> None:
        reader = conn.makefile("rb")
        try:
            while True:
                request = _read_request(reader)
                if request is None:
                    return
                method, path, body = request
                with self._lock:
                    self._served[path] = self._served.get(path, 0) + 1
                if not self._respond(conn, method, path, body):
                    return
        except (_GoneError, OSError, ValueError):
            return
        finally:
            with self._lock:
                self._conns.discard(conn)
            with contextlib.suppress(OSError):
                reader.close()
                conn.close()

    def _respond(self, conn: socket.socket, method: str, path: str, body: bytes) -> bool:
        """Answer one request; False when the connection must not be used again."""
        if path == "/_control":
            return self._control(conn, method, body)
        with self._lock:
            fault = self._fault.name
            params = dict(self._fault.params)
            epoch = self._fault.epoch
            # Like a server restarted with --api-key: the old key no longer opens anything.
            unauthorized = fault == "http_401_mid_run" and (
                self._fault.completions >= int(params.get("after", 0))
            )
        if fault == "down":
            _reset(conn)
            return False
        if unauthorized and path not in _PUBLIC_PATHS:
            _send_json(conn, 401, _error(401, "Invalid API Key", "authentication_error"))
            return True
        if path == "/completion" and method == "POST":
            return self._completion(conn, body)
        if method == "GET" and fault in _BYTE_FAULTS and _byte_fault_path(fault, params) == path:
            return self._misbehave_get(conn, fault, params, epoch, path)
        status, payload = self._answer_get(path, fault, params) if method == "GET" else _NOT_FOUND
        _send_json(conn, status, payload)
        return True

    def _control(self, conn: socket.socket, method: str, body: bytes) -> bool:
        if method == "POST":
            try:
                order = json.loads(body)
                params = {k: v for k, v in order.items() if k != "fault"}
                self.switch(order["fault"], **params)
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                _send_json(conn, 400, {"error": str(exc)})
                return True
        _send_json(conn, 200, self.state())
        return True

    # -- discovery ---------------------------------------------------------------------------

    def _props(self, fault: str | None, params: dict[str, Any]) -> dict[str, Any]:
        props: dict[str, Any] = fixture_json("props.json")
        props["default_generation_settings"]["n_ctx"] = self.n_ctx
        props["total_slots"] = self.slots
        props["model_path"] = self.model_path
        # The label comes from the alias: a path's stem, "tiny".
        props["model_alias"] = "/models/tiny.gguf"
        props["endpoint_metrics"] = False
        props["build_info"] = "b11434-deadbeef"
        if fault == "slots_toggle":
            props["endpoint_slots"] = False
        if fault == "fifo_model_path":
            props["model_path"] = str(params["path"])
        if fault == "surrogate_label":
            props["model_alias"] = str(params.get("alias", "bad\udc80name"))
            props["build_info"] = str(params.get("build", "b11434-\udc80"))
        return props

    def _models(self, fault: str | None, params: dict[str, Any]) -> dict[str, Any]:
        models: dict[str, Any] = fixture_json("models.json")
        entry = models["data"][0]
        entry["id"] = self._props(fault, params)["model_alias"]
        entry["aliases"] = [entry["id"]]
        entry["meta"].update(n_ctx=self.n_ctx, n_vocab=self.n_vocab)
        return models

    def _slots_answer(self, fault: str | None) -> tuple[int, Any]:
        if fault == "slots_toggle":
            return 501, _error(501, _NO_SLOTS, "not_supported_error")
        idle = fixture_json("slots_idle.json")[0]
        with self._lock:
            return 200, [
                {
                    **idle,
                    "id": i,
                    "n_ctx": self.n_ctx,
                    "is_processing": i in self._processing,
                    "id_task": self._id_task[i],
                    "n_prompt_tokens": self._held_tokens[i],
                }
                for i in range(self.slots)
            ]

    def _answer_get(self, path: str, fault: str | None, params: dict[str, Any]) -> tuple[int, Any]:
        routes: dict[str, Callable[[], tuple[int, Any]]] = {
            "/health": lambda: (200, {"status": "ok"}),
            "/props": lambda: (200, self._props(fault, params)),
            "/v1/models": lambda: (200, self._models(fault, params)),
            "/models": lambda: (200, self._models(fault, params)),
            "/slots": lambda: self._slots_answer(fault),
            "/metrics": lambda: (501, _error(501, _NO_METRICS, "not_supported_error")),
        }
        route = routes.get(path)
        return route() if route is not None else _NOT_FOUND

    def _misbehave_get(
        self, conn: socket.socket, fault: str, params: dict[str, Any], epoch: int, path: str
    ) -> bool:
        body = _dumps(self._answer_get(path, None, {})[1])
        if fault == "drip":
            conn.sendall(_head(200, "application/json; charset=utf-8", len(body)))
            pause = float(params.get("interval_s", 1.0))
            for i in range(len(body)):
                conn.sendall(body[i : i + 1])
                self._hold(conn, epoch, pause)
            return True
        if fault == "stall_mid_stream":
            conn.sendall(_head(200, "application/json; charset=utf-8", len(body)))
            conn.sendall(body[: len(body) // 2])
            self._stall(conn, epoch)
            return False
        if fault == "oversized_body":
            big = self._oversized_props(int(params.get("size", OVERSIZED_DEFAULT_BYTES)))
            conn.sendall(_head(200, "application/json; charset=utf-8", len(big)))
            view = memoryview(big)
            for start in range(0, len(big), 1024 * 1024):
                self._check(conn, epoch)
                conn.sendall(view[start : start + 1024 * 1024])
            return True
        # endless_stream: a JSON object whose padding string never closes.
        conn.sendall(_head(200, "application/json; charset=utf-8", None))
        conn.sendall(_chunk(body[:-1] + b', "pad": "'))
        self._endless(conn, epoch, b"x" * ENDLESS_CHUNK_BYTES, chunked=True)
        return False

    def _oversized_props(self, size: int) -> bytes:
        with self._lock:
            cached = self._oversized.get(size)
        if cached is None:
            head = _dumps(self._props(None, {}))[:-1] + b', "pad": "'
            cached = head + b"x" * max(size - len(head) - 2, 0) + b'"}'
            with self._lock:
                self._oversized = {size: cached}
        return cached

    # -- completions -------------------------------------------------------------------------

    def _completion(self, conn: socket.socket, raw: bytes) -> bool:
        try:
            body = json.loads(raw)
            prompt = [int(t) for t in body["prompt"]]
            n_predict = int(body["n_predict"])
            slot = int(body.get("id_slot", -1))
        except (ValueError, KeyError, TypeError):
            _send_json(conn, 400, _error(400, "Invalid request", "invalid_request_error"))
            return True
        if not prompt or any(not 0 <= t < self.n_vocab for t in prompt):
            message = "Prompt contains invalid tokens"
            _send_json(conn, 400, _error(400, message, "invalid_request_error"))
            return True
        if len(prompt) + max(n_predict, 0) >= self.n_ctx:
            message = "the request exceeds the available context size"
            _send_json(conn, 400, _error(400, message, "exceed_context_size_error"))
            return True
        request = _Completion(
            prompt=prompt,
            n_predict=n_predict,
            kind="prompt" if n_predict <= 1 else "generation",
            slot=slot if 0 <= slot < self.slots else 0,
            response_fields=body.get("response_fields"),
        )
        with self._lock:
            fault = self._fault.name
            params = dict(self._fault.params)
            epoch = self._fault.epoch
            done_before = self._fault.completions
            self._fault.completions += 1
            if (
                time.monotonic() - self._last_completion_end > ROUND_GAP_S
                or self._reps[request.kind] >= REPETITIONS
            ):
                self._reps = {"prompt": 0, "generation": 0}
            self._reps[request.kind] += 1
            repetition = self._reps[request.kind]
            self._id_task[request.slot] = self._next_task
            self._next_task += 1
            self._processing.add(request.slot)
        try:
            if fault in _BYTE_FAULTS and _byte_fault_path(fault, params) != "/completion":
                fault = None  # a fault of another endpoint
            if fault not in (None, "http_401_mid_run", "http_500_mid_run") and (
                request.kind not in (params.get("kinds") or ("prompt", "generation"))
            ):
                fault = None  # this fault leaves this kind alone
            if fault == "http_500_mid_run" and done_before >= int(params.get("after", 0)):
                _send_json(conn, 500, _error(500, "decode failed", "server_error"))
                return True
            if fault == "one_bad_repetition":
                bad = repetition == int(params.get("repetition", 2))
                fault = "tiny_timings" if bad else None
            return self._stream(conn, request, _Fault(fault, params, epoch))
        finally:
            with self._lock:
                self._processing.discard(request.slot)
                self._held_tokens[request.slot] = len(prompt) + max(n_predict - 1, 0)
                self._last_completion_end = time.monotonic()

    def _stream(self, conn: socket.socket, request: _Completion, fault: _Fault) -> bool:
        """A streamed completion, true to time unless the fault says otherwise."""
        tiny = fault.name == "tiny_timings"
        prompt_ms = len(request.prompt) * PROMPT_MS_PER_TOKEN
        steps = max(request.n_predict - 1, 0)
        tiny_prompt = tiny and request.kind == "prompt"
        time.sleep(TINY_ACTUAL_S["prompt"] if tiny_prompt else prompt_ms / 1000)
        conn.sendall(_head(200, "text/event-stream", None))
        token = {"index": 0, "content": "9", "tokens": [self.n_vocab - 1], "stop": False,
                 "id_slot": -1, "tokens_predicted": 1,
                 "tokens_evaluated": len(request.prompt)}  # fmt: skip
        conn.sendall(_chunk(_event(token)))
        if fault.name == "production_between_polls":
            # A request came and went on another slot: only its new task id shows it.
            with self._lock:
                self._id_task[(request.slot + 1) % self.slots] = self._next_task
                self._next_task += 1
        if not self._broken_stream(conn, fault, token):
            return False
        pause = GENERATION_MS_PER_TOKEN / 1000
        if tiny and request.kind == "generation" and steps:
            pause = TINY_ACTUAL_S["generation"] / steps
        for i in range(2, request.n_predict + 1):
            time.sleep(pause)  # the fake generating a token, not a test waiting
            conn.sendall(_chunk(_event({**token, "tokens_predicted": i})))
        claims: dict[str, Any] = {
            "prompt_ms": prompt_ms,
            "predicted_ms": steps * GENERATION_MS_PER_TOKEN if steps else 0.001,
        }
        # The duration the kind's speed comes from is the one a timing fault spoils.
        spoiled = "prompt_ms" if request.kind == "prompt" else "predicted_ms"
        claims[spoiled] = _spoil(claims[spoiled], fault)
        final = self._final(request, claims)
        literal = str(fault.params.get("literal", "Infinity"))
        conn.sendall(_chunk(_event(final).replace(b'"__literal__"', literal.encode())))
        conn.sendall(b"0\r\n\r\n")
        return True

    def _broken_stream(self, conn: socket.socket, fault: _Fault, token: dict[str, Any]) -> bool:
        """After the first token: break the stream as the fault says; False if it did."""
        if fault.name == "reset_mid_stream":
            _reset(conn)
        elif fault.name == "stall_mid_stream":
            self._stall(conn, fault.epoch)
        elif fault.name == "endless_stream":
            events = b"".join(_chunk(_event(token)) for _ in range(ENDLESS_CHUNK_BYTES // 200))
            self._endless(conn, fault.epoch, events, chunked=False)
        elif fault.name == "line_without_newline":
            conn.sendall(_chunk(b'data: {"content": "'))
            self._endless(conn, fault.epoch, b"9" * ENDLESS_CHUNK_BYTES, chunked=True)
        else:
            return True
        return False

    def _final(self, request: _Completion, claims: dict[str, Any]) -> dict[str, Any]:
        final = final_chunk_template()
        final.update(
            id_slot=request.slot,
            tokens_predicted=request.n_predict,
            tokens_evaluated=len(request.prompt),
            model=self.model_path,
            timings={
                "cache_n": 0,
                "prompt_n": len(request.prompt),
                "prompt_ms": claims["prompt_ms"],
                "prompt_per_token_ms": PROMPT_MS_PER_TOKEN,
                "prompt_per_second": PROMPT_TPS,
                "predicted_n": request.n_predict,
                "predicted_ms": claims["predicted_ms"],
                "predicted_per_token_ms": GENERATION_MS_PER_TOKEN,
                "predicted_per_second": GENERATION_TPS,
            },
        )
        fields = request.response_fields
        if isinstance(fields, list) and fields:
            # llama-server keeps only the fields asked for (here: top-level names).
            final = {k: final[k] for k in fields if isinstance(k, str) and k in final}
        return final

    # -- holding a connection ----------------------------------------------------------------

    def _check(self, conn: socket.socket, epoch: int) -> None:
        with self._lock:
            if self._closing or self._fault.epoch != epoch:
                raise _GoneError
        if _peer_closed(conn):
            raise _GoneError

    def _hold(self, conn: socket.socket, epoch: int, seconds: float) -> None:
        """Wait `seconds`; raise _GoneError as soon as the fault switches or the peer goes."""
        deadline = time.monotonic() + seconds
        while True:
            self._check(conn, epoch)
            left = deadline - time.monotonic()
            if left <= 0:
                return
            with self._lock:
                self._lock.wait_for(
                    lambda: self._closing or self._fault.epoch != epoch, timeout=min(left, 0.05)
                )

    def _stall(self, conn: socket.socket, epoch: int) -> None:
        with self._lock:
            self._stalled += 1
        try:
            while True:
                self._hold(conn, epoch, 3600)
        except _GoneError:
            _reset(conn)
            raise
        finally:
            with self._lock:
                self._stalled -= 1

    def _endless(self, conn: socket.socket, epoch: int, piece: bytes, *, chunked: bool) -> None:
        data = _chunk(piece) if chunked else piece
        pause = len(data) / ENDLESS_BYTES_PER_SECOND
        sent = 0
        try:
            while sent < ENDLESS_SAFETY_BYTES:
                self._check(conn, epoch)
                conn.sendall(data)
                sent += len(data)
                time.sleep(pause)  # pacing the fake's output, not a test waiting
        finally:
            _reset(conn)


# -- HTTP by hand ----------------------------------------------------------------------------


def _read_request(reader: BinaryIO) -> tuple[str, str, bytes] | None:
    line = reader.readline(65536)
    if not line:
        return None
    parts = line.decode("latin-1").split()
    if len(parts) != 3:
        raise ValueError("bad request line")
    method, target, _ = parts
    length = 0
    while True:
        header = reader.readline(65536)
        if header in (b"\r\n", b"\n", b""):
            break
        name, _, value = header.decode("latin-1").partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    if length > 16 * 1024 * 1024:
        raise ValueError("request body too large")
    body = reader.read(length) if length else b""
    return method, target.split("?", 1)[0], body


def _head(status: int, content_type: str, length: int | None) -> bytes:
    lines = [
        f"HTTP/1.1 {status} {_STATUS.get(status, 'Unknown')}",
        f"Content-Type: {content_type}",
        "Server: llama.cpp",
        "Keep-Alive: timeout=5, max=100",
        "Access-Control-Allow-Origin: ",
    ]
    lines.append("Transfer-Encoding: chunked" if length is None else f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _dumps(payload: Any) -> bytes:
    # ASCII JSON, as a C++ server may write it: a lone surrogate becomes the escape \udc80.
    return json.dumps(payload, separators=(",", ":")).encode("ascii")


def _event(payload: Any) -> bytes:
    return b"data: " + _dumps(payload) + b"\n\n"


def _error(code: int, message: str, kind: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "type": kind}}


def _send_json(conn: socket.socket, status: int, payload: Any) -> None:
    body = _dumps(payload)
    conn.sendall(_head(status, "application/json; charset=utf-8", len(body)) + body)


def _reset(conn: socket.socket) -> None:
    """Close with a TCP reset rather than a FIN: the peer sees ECONNRESET."""
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        conn.close()


def _peer_closed(conn: socket.socket) -> bool:
    try:
        readable, _, _ = select.select([conn], [], [], 0)
        if not readable:
            return False
        return conn.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


__all__ = [
    "FAULTS",
    "GENERATION_TPS",
    "PROMPT_TPS",
    "REPETITIONS",
    "HostileLlamaServer",
]
