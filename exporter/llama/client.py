"""The HTTP side of llama-server: every request the exporter makes, and how each can fail.

Every failure becomes a `ServerError` with a reason from a fixed set, so that metrics and logs
name what went wrong without leaking the API key, a prompt or an unbounded string.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Final

import httpx
from pydantic import SecretStr

from exporter.host.address import uses_tls

# The fixed set of failure reasons, exported as the `reason` label.
CONNECT: Final = "connect"
TIMEOUT: Final = "timeout"
UNAUTHORIZED: Final = "unauthorized"
LOADING: Final = "loading"
HTTP_ERROR: Final = "http_error"
BAD_RESPONSE: Final = "bad_response"
CONTEXT_EXCEEDED: Final = "context_exceeded"
NOT_SUPPORTED: Final = "not_supported"


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
        try:
            return cls(
                prompt_n=int(data["prompt_n"]),
                prompt_ms=float(data["prompt_ms"]),
                cache_n=int(data["cache_n"]),
                predicted_n=int(data["predicted_n"]),
                predicted_ms=float(data["predicted_ms"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ServerError(BAD_RESPONSE, f"timings object is incomplete: {exc!r}") from None


@dataclass(frozen=True)
class Completion:
    timings: Timings
    first_chunk_seconds: float  # client-measured: request sent -> first streamed token


def _error_from_response(status: int, body: bytes) -> ServerError:
    message = ""
    error_type = ""
    try:
        error = json.loads(body).get("error", {})
        message = str(error.get("message", ""))[:200]
        error_type = str(error.get("type", ""))
    except (ValueError, AttributeError):
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


class LlamaClient:
    """One llama-server. Methods raise ServerError; nothing else escapes."""

    def __init__(
        self,
        base_url: str,
        api_key: SecretStr | None = None,
        *,
        timeout: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        headers = {"User-Agent": "llama-speed-exporter"}
        if api_key is not None:
            headers["Authorization"] = f"Bearer {api_key.get_secret_value()}"
        # A plain-HTTP target never speaks TLS: loading the CA bundle for it would cost some
        # 3 MiB per target for nothing. An https:// one verifies as usual.
        self._http = httpx.AsyncClient(
            base_url=base_url,
            headers=headers,
            timeout=timeout,
            transport=transport,
            verify=uses_tls(base_url),
        )
        self._clock = clock

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _get(self, path: str) -> httpx.Response:
        try:
            try:
                response = await self._http.get(path)
            except httpx.RemoteProtocolError:
                # llama-server closes a kept-alive connection after a few requests; a GET that
                # raced that close is safe to send again on a new connection.
                response = await self._http.get(path)
        except httpx.TimeoutException:
            raise ServerError(TIMEOUT, f"GET {path} timed out") from None
        except httpx.HTTPError as exc:
            raise ServerError(CONNECT, f"GET {path}: {type(exc).__name__}") from None
        if response.status_code != 200:
            raise _error_from_response(response.status_code, response.content)
        return response

    async def get_json(self, path: str) -> Any:
        response = await self._get(path)
        try:
            return response.json()
        except ValueError:
            raise ServerError(BAD_RESPONSE, f"GET {path} returned malformed JSON") from None

    async def get_text(self, path: str) -> str:
        return (await self._get(path)).text

    async def complete(self, body: dict[str, Any], timeout: float) -> Completion:
        """POST /completion as a stream; returns the final chunk's timings.

        Streaming lets the client time the first token, and lets a cancelled probe close the
        connection, which makes llama-server stop the task at once instead of finishing it.
        """
        started = self._clock()
        first: float | None = None
        final: dict[str, Any] | None = None
        try:
            async with self._http.stream(
                "POST", "/completion", json={**body, "stream": True}, timeout=timeout
            ) as response:
                if response.status_code != 200:
                    raise _error_from_response(response.status_code, await response.aread())
                async for chunk in _sse_events(response.aiter_bytes()):
                    if "error" in chunk:
                        raise _error_from_response(
                            int(chunk["error"].get("code", 500)), json.dumps(chunk).encode()
                        )
                    if first is None:
                        first = self._clock() - started
                    if chunk.get("stop"):
                        final = chunk
                        break
        except httpx.TimeoutException:
            raise ServerError(TIMEOUT, f"completion timed out after {timeout:g} s") from None
        except httpx.HTTPError as exc:
            raise ServerError(CONNECT, f"completion: {type(exc).__name__}") from None
        # The final chunk is a chunk too: `first` is set whenever `final` is.
        if final is None or first is None or "timings" not in final:
            raise ServerError(BAD_RESPONSE, "stream ended without a final chunk with timings")
        return Completion(Timings.parse(final["timings"]), first)


async def _sse_lines(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Split on LF only. httpx's aiter_lines splits like str.splitlines, which also breaks at
    U+0085 and U+2028: characters JSON leaves unescaped and a detokenized prompt can hold."""
    pending: list[bytes] = []  # pieces of a line not yet ended: a deep probe's final event
    async for chunk in chunks:  # carries the whole prompt as text, megabytes long
        *ended, rest = chunk.split(b"\n")
        for piece in ended:
            yield b"".join([*pending, piece]).rstrip(b"\r")
            pending.clear()
        pending.append(rest)
    if any(pending):
        yield b"".join(pending)


async def _sse_events(chunks: AsyncIterator[bytes]) -> AsyncIterator[dict[str, Any]]:
    async for raw in _sse_lines(chunks):
        line = raw.decode("utf-8", errors="replace")
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            return
        try:
            event = json.loads(payload)
        except ValueError:
            raise ServerError(BAD_RESPONSE, "stream carried malformed JSON") from None
        if not isinstance(event, dict):
            raise ServerError(BAD_RESPONSE, "stream event is not a JSON object")
        yield event
