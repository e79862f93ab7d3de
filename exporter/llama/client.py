"""The HTTP side of llama-server: every request the exporter makes, and how each can fail.

Every failure becomes a `ServerError` with a reason from a fixed set, so that metrics and logs
name what went wrong without leaking the API key, a prompt or an unbounded string.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

import httpx

from exporter.host.address import uses_tls
from exporter.llama.limits import RequestLimits
from exporter.llama.secret import Secret
from exporter.llama.untrusted import DETAIL_MAX_CHARS, clean_text

# The fixed set of failure reasons, exported as the `reason` label.
CONNECT: Final = "connect"
TIMEOUT: Final = "timeout"
UNAUTHORIZED: Final = "unauthorized"
LOADING: Final = "loading"
HTTP_ERROR: Final = "http_error"
BAD_RESPONSE: Final = "bad_response"
CONTEXT_EXCEEDED: Final = "context_exceeded"
NOT_SUPPORTED: Final = "not_supported"
OVERSIZED: Final = "oversized"
# A router or llama-swap refused a request for a model that is no longer loaded (it unloaded
# after the list was read): never a failure of the server, and nothing was loaded for it.
NOT_LOADED: Final = "not_loaded"

# An error answer is read for its message only: a few KiB say all there is to say.
_ERROR_BODY_BYTES: Final = 16 * 1024
# Events a completion may carry beyond one a token: the final event, and room for a release
# that adds one of its own.
_SPARE_EVENTS: Final = 8


class ServerError(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Timings:
    """llama-server's own `timings` object for one completion."""

    prompt_n: int
    prompt_ms: float
    cache_n: int
    predicted_n: int
    predicted_ms: float

    @classmethod
    def parse(cls, data: Any) -> Timings:
        """The fields as the server typed them; whether their values make sense is the
        runner's question (`exporter.probe.validate`), which knows what was asked for."""
        if not isinstance(data, dict):
            raise ServerError(BAD_RESPONSE, "timings is not a JSON object")
        try:
            return cls(
                prompt_n=_count(data["prompt_n"]),
                prompt_ms=_number(data["prompt_ms"]),
                cache_n=_count(data["cache_n"]),
                predicted_n=_count(data["predicted_n"]),
                predicted_ms=_number(data["predicted_ms"]),
            )
        except KeyError as exc:
            raise ServerError(BAD_RESPONSE, f"timings lack {exc}") from None


def _count(value: Any) -> int:
    # A float count (or a bool, which is an int to Python) is not what llama-server sends.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ServerError(BAD_RESPONSE, "a timings count is not an integer")
    return value


def _number(value: Any) -> float:
    # NaN, Infinity and 1e999 parse as floats: they pass here and fail validation, so that
    # they are counted as invalid timings rather than as a malformed answer.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ServerError(BAD_RESPONSE, "a timings duration is not a number")
    try:
        return float(value)
    except OverflowError:  # an integer past 1e308
        return math.inf


@dataclass(frozen=True)
class Completion:
    timings: Timings
    first_chunk_seconds: float  # client-measured: request sent -> first streamed token
    total_seconds: float  # client-measured: request sent -> final event


def _error_from_response(status: int, body: bytes) -> ServerError:
    message = ""
    error_type = ""
    try:
        error = json.loads(body).get("error", {})
        message = clean_text(error.get("message", ""), DETAIL_MAX_CHARS)
        error_type = str(error.get("type", ""))
    except (ValueError, AttributeError, RecursionError):
        pass
    if status == 401:
        return ServerError(UNAUTHORIZED, "server refused the API key (HTTP 401)")
    if status == 503:
        return ServerError(LOADING, f"server unavailable (HTTP 503): {message or 'no detail'}")
    if status == 501:
        return ServerError(NOT_SUPPORTED, f"endpoint disabled (HTTP 501): {message}")
    if error_type == "exceed_context_size_error":
        return ServerError(CONTEXT_EXCEEDED, message)
    return ServerError(HTTP_ERROR, f"HTTP {status}: {message or 'no detail'}")


def _stream_error(event: dict[str, Any]) -> ServerError:
    """An error llama-server reports inside a stream, with the status it would have sent."""
    error = event.get("error")
    code = error.get("code") if isinstance(error, dict) else None
    status = code if isinstance(code, int) and not isinstance(code, bool) else 500
    return _error_from_response(status, json.dumps(event).encode())


class ServerApi(Protocol):
    """What the prober asks of a server: a whole llama-server (`LlamaClient`), or one model
    behind a router or llama-swap (`exporter.llama.scoped.ModelClient`)."""

    async def get_json(self, path: str) -> Any: ...

    async def get_text(self, path: str) -> str: ...

    async def complete(self, body: dict[str, Any], timeout: float) -> Completion: ...

    async def complete_whole(self, body: dict[str, Any], timeout: float) -> Any: ...


class LlamaClient:
    """One llama-server. Methods raise ServerError; nothing else escapes."""

    def __init__(
        self,
        base_url: str,
        api_key: Secret | None = None,
        *,
        timeout: float = 10.0,
        limits: RequestLimits | None = None,
        proxy: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        headers = {"User-Agent": "llama-speed-exporter"}
        if api_key is not None:
            headers["Authorization"] = f"Bearer {api_key.get_secret_value()}"
        self.limits = limits or RequestLimits()
        # A plain-HTTP target never speaks TLS: loading the CA bundle for it would cost some
        # 3 MiB per target for nothing. An https:// one verifies as usual.
        self._http = httpx.AsyncClient(
            base_url=base_url,
            headers=headers,
            timeout=timeout,
            transport=transport,
            verify=uses_tls(base_url),
            # HTTP_PROXY and friends are meant for a user's own traffic: honouring them would
            # send the API key of a server next door to whatever proxy the environment names.
            trust_env=False,
            proxy=proxy,
        )
        self._clock = clock

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _get(self, path: str) -> bytes:
        """The body of a 200 answer, read whole within the discovery deadline and size cap."""
        deadline = self.limits.discovery_timeout
        try:
            async with asyncio.timeout(deadline):
                try:
                    return await self._get_once(path)
                except httpx.RemoteProtocolError:
                    # llama-server closes a kept-alive connection after a few requests; a GET
                    # that raced that close is safe to send again on a new connection.
                    return await self._get_once(path)
        except (TimeoutError, httpx.TimeoutException):
            raise ServerError(TIMEOUT, f"GET {path} took over {deadline:g} s") from None
        except httpx.HTTPError as exc:
            raise ServerError(CONNECT, f"GET {path}: {type(exc).__name__}") from None

    async def _get_once(self, path: str) -> bytes:
        async with self._http.stream("GET", path) as response:
            if response.status_code != 200:
                raise _error_from_response(response.status_code, await _error_body(response))
            return await _bounded_body(response, self.limits.max_response_bytes, f"GET {path}")

    async def get_json(self, path: str) -> Any:
        body = await self._get(path)
        try:
            return json.loads(body)
        except (ValueError, RecursionError):
            raise ServerError(BAD_RESPONSE, f"GET {path} returned malformed JSON") from None

    async def get_text(self, path: str) -> str:
        return (await self._get(path)).decode("utf-8", errors="replace")

    @contextlib.asynccontextmanager
    async def _posted(
        self, path: str, payload: dict[str, Any], timeout: float
    ) -> AsyncIterator[httpx.Response]:
        """POST `payload`, the answer streamed; sent once more on a new connection when a
        kept-alive one was closed under it before any answer came (llama-server drops an idle
        connection after a few seconds, and the pool may hand that one to a POST)."""
        request = self._http.build_request("POST", path, json=payload, timeout=timeout)
        try:
            response = await self._http.send(request, stream=True)
        except httpx.RemoteProtocolError:
            response = await self._http.send(request, stream=True)
        try:
            yield response
        finally:
            await response.aclose()

    async def complete(
        self, body: dict[str, Any], timeout: float, path: str = "/completion"
    ) -> Completion:
        """POST `path` (/completion) as a stream; returns the final chunk's timings.

        Streaming lets the client time the first token, and lets a cancelled probe close the
        connection, which makes llama-server stop the task at once instead of finishing it.
        """
        started = self._clock()
        first: float | None = None
        total = 0.0
        final: dict[str, Any] | None = None
        try:
            async with self._posted(path, {**body, "stream": True}, timeout) as response:
                if response.status_code != 200:
                    raise _error_from_response(response.status_code, await _error_body(response))
                lines = _sse_lines(response.aiter_bytes(), self.limits.max_response_bytes)
                # One event a token, and the final one: a server that streams on past that
                # would otherwise hold the probe, parsing, until the round's timeout.
                events_left = int(body.get("n_predict", 0)) + _SPARE_EVENTS
                async for chunk in _sse_events(lines):
                    events_left -= 1
                    if events_left < 0:
                        raise ServerError(BAD_RESPONSE, "stream ran past the tokens asked for")
                    if "error" in chunk:
                        raise _stream_error(chunk)
                    if first is None:
                        first = self._clock() - started
                    if chunk.get("stop"):
                        final = chunk
                        total = self._clock() - started
                        break
        except httpx.TimeoutException:
            raise ServerError(TIMEOUT, f"completion timed out after {timeout:g} s") from None
        except httpx.HTTPError as exc:
            raise ServerError(CONNECT, f"completion: {type(exc).__name__}") from None
        # The final chunk is a chunk too: `first` is set whenever `final` is.
        if final is None or first is None or "timings" not in final:
            raise ServerError(BAD_RESPONSE, "stream ended without a final chunk with timings")
        return Completion(Timings.parse(final["timings"]), first, total)

    async def complete_whole(
        self, body: dict[str, Any], timeout: float, path: str = "/completion"
    ) -> Any:
        """POST `path` (/completion) without streaming; returns the parsed answer, read within the
        size cap. For answers a stream cannot carry: llama-server streams no event for a
        token that ends inside a UTF-8 character, so only the whole answer has every id."""
        try:
            async with self._posted(path, {**body, "stream": False}, timeout) as response:
                if response.status_code != 200:
                    raise _error_from_response(response.status_code, await _error_body(response))
                raw = await _bounded_body(
                    response, self.limits.max_response_bytes, "POST /completion"
                )
        except httpx.TimeoutException:
            raise ServerError(TIMEOUT, f"completion timed out after {timeout:g} s") from None
        except httpx.HTTPError as exc:
            raise ServerError(CONNECT, f"completion: {type(exc).__name__}") from None
        try:
            return json.loads(raw)
        except (ValueError, RecursionError):
            raise ServerError(BAD_RESPONSE, "completion returned malformed JSON") from None


async def _bounded_body(response: httpx.Response, limit: int, what: str) -> bytes:
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ServerError(OVERSIZED, f"{what}: answer of {declared} bytes, over {limit}")
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > limit:
            raise ServerError(OVERSIZED, f"{what}: answer over {limit} bytes")
    return bytes(body)


async def _error_body(response: httpx.Response) -> bytes:
    """The start of an error answer: enough for its message, never all of an endless one."""
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) >= _ERROR_BODY_BYTES:
            break
    return bytes(body[:_ERROR_BODY_BYTES])


async def _sse_lines(chunks: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes]:
    """Split on LF only. httpx's aiter_lines splits like str.splitlines, which also breaks at
    U+0085 and U+2028: characters JSON leaves unescaped and a detokenized prompt can hold.

    A line longer than `limit` ends the stream as oversized: without a cap, a server that
    never sends a newline would grow the exporter until the round's deadline.
    """
    pending: list[bytes] = []  # pieces of a line not yet ended
    held = 0
    async for chunk in chunks:
        *ended, rest = chunk.split(b"\n")
        for piece in ended:
            if held + len(piece) > limit:
                raise ServerError(OVERSIZED, f"stream line over {limit} bytes")
            yield b"".join([*pending, piece]).rstrip(b"\r")
            pending.clear()
            held = 0
        pending.append(rest)
        held += len(rest)
        if held > limit:
            raise ServerError(OVERSIZED, f"stream line over {limit} bytes")
    if any(pending):
        yield b"".join(pending)


async def _sse_events(lines: AsyncIterator[bytes]) -> AsyncIterator[dict[str, Any]]:
    async for raw in lines:
        line = raw.decode("utf-8", errors="replace")
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            return
        try:
            event = json.loads(payload)
        except (ValueError, RecursionError):
            raise ServerError(BAD_RESPONSE, "stream carried malformed JSON") from None
        if not isinstance(event, dict):
            raise ServerError(BAD_RESPONSE, "stream event is not a JSON object")
        yield event
