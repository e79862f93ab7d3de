"""The HTTP client: streamed completions parsed exactly, failures mapped to reasons."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from exporter.llama.client import LlamaClient, ServerError

TIMINGS = {"cache_n": 0, "prompt_n": 4, "prompt_ms": 2.0, "predicted_n": 3, "predicted_ms": 1.0}


def complete(content: bytes, status: int = 200, chunk: int = 7) -> Any:
    async def stream() -> Any:
        for i in range(0, len(content), chunk):  # arbitrary chunk borders, as TCP gives them
            yield content[i : i + chunk]

    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, content=stream())

    async def go() -> Any:
        client = LlamaClient("http://llama", transport=httpx.MockTransport(handler))
        try:
            return await client.complete({"prompt": [1], "n_predict": 3}, timeout=5)
        finally:
            await client.aclose()

    return asyncio.run(go())


def event(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


def test_final_chunk_with_unicode_line_separators_is_one_event() -> None:
    # A detokenized random prompt can hold U+0085 and U+2028, which JSON leaves unescaped.
    final = {"stop": True, "prompt": "a\u0085b\u2028c\rd", "timings": TIMINGS}
    done = complete(event({"stop": False, "content": "x"}) + event(final))
    assert done.timings.prompt_n == 4
    assert done.timings.predicted_ms == 1.0


def test_crlf_line_endings() -> None:
    done = complete(event({"stop": True, "timings": TIMINGS}).replace(b"\n", b"\r\n"))
    assert done.timings.cache_n == 0


@pytest.mark.parametrize(
    ("content", "status", "reason"),
    [
        (event({"stop": False, "content": "x"}), 200, "bad_response"),  # no final chunk
        (event({"stop": True}), 200, "bad_response"),  # final chunk without timings
        (event({"stop": True, "timings": {"prompt_n": 1}}), 200, "bad_response"),
        (b"data: {oops\n\n", 200, "bad_response"),
        (event({"error": {"code": 500, "message": "boom", "type": "server_error"}}), 200,
         "http_error"),
        (json.dumps({"error": {"code": 400, "type": "exceed_context_size_error",
                               "message": "request (9000 tokens) exceeds"}}).encode(), 400,
         "context_exceeded"),
        (b'{"error":{"code":401,"message":"Invalid API Key","type":"authentication_error"}}',
         401, "unauthorized"),
        (b"<html>bad gateway</html>", 502, "http_error"),
    ],
)  # fmt: skip
def test_bad_answers_have_reasons(content: bytes, status: int, reason: str) -> None:
    with pytest.raises(ServerError) as info:
        complete(content, status)
    assert info.value.reason == reason
