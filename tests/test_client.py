"""The HTTP client: streamed completions parsed exactly, failures mapped to reasons."""

from __future__ import annotations

import asyncio
import http.server
import json
import math
import threading
from typing import Any

import httpx
import pytest

from exporter.llama.client import LlamaClient, ServerError
from exporter.llama.limits import RequestLimits

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


def client_for(handler: Any, **kwargs: Any) -> LlamaClient:
    return LlamaClient("http://llama", transport=httpx.MockTransport(handler), **kwargs)


def get_json(handler: Any, path: str = "/props", **kwargs: Any) -> Any:
    async def go() -> Any:
        client = client_for(handler, **kwargs)
        try:
            return await client.get_json(path)
        finally:
            await client.aclose()

    return asyncio.run(go())


SMALL = RequestLimits(max_response_bytes=64 * 1024, discovery_timeout=5)


def test_a_stream_line_over_the_limit_is_oversized_without_waiting_for_its_end() -> None:
    sent: list[int] = []

    async def endless() -> Any:
        yield b"data: {"
        while True:  # a line that never ends: only the cap stops it
            sent.append(1)
            yield b"x" * 4096

    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=endless())

    async def go() -> None:
        client = client_for(handler, limits=SMALL)
        try:
            await client.complete({"prompt": [1], "n_predict": 3}, timeout=5)
        finally:
            await client.aclose()

    with pytest.raises(ServerError) as info:
        asyncio.run(go())
    assert info.value.reason == "oversized"
    assert len(sent) * 4096 <= 2 * SMALL.max_response_bytes


def test_a_body_over_the_limit_is_oversized() -> None:
    async def endless() -> Any:
        while True:
            yield b" " * 8192

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=endless())

    with pytest.raises(ServerError) as info:
        get_json(handler, limits=SMALL)
    assert info.value.reason == "oversized"


def test_a_declared_length_over_the_limit_is_refused_before_reading() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"{}", headers={"content-length": str(10**9)})

    with pytest.raises(ServerError) as info:
        get_json(handler, limits=SMALL)
    assert info.value.reason == "oversized"


def test_a_dripping_answer_meets_the_discovery_deadline() -> None:
    async def drip() -> Any:
        while True:  # a byte at a time: no read ever times out, only the whole deadline
            await asyncio.sleep(0.01)
            yield b" "

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=drip())

    with pytest.raises(ServerError) as info:
        get_json(handler, limits=RequestLimits(discovery_timeout=0.2))
    assert info.value.reason == "timeout"


@pytest.mark.parametrize("text", ['{"n": NaN}', '{"n": Infinity}', '{"n": 1e999}'])
def test_non_finite_json_numbers_parse_and_are_judged_later(text: str) -> None:
    value = get_json(lambda request: httpx.Response(200, content=text.encode()))
    assert not math.isfinite(value["n"])


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("prompt_ms", "NaN", None),  # a float: validation calls it invalid_timings
        ("prompt_ms", "1e999", None),
        ("prompt_n", "1.5", "bad_response"),
        ("prompt_n", "true", "bad_response"),
        ("prompt_n", "1e999", "bad_response"),
        ("predicted_ms", '"12"', "bad_response"),
    ],
)
def test_timings_fields_are_typed(field: str, value: str, reason: str | None) -> None:
    timings = json.dumps(TIMINGS).replace(f'"{field}": {json.dumps(TIMINGS[field])}',
                                          f'"{field}": {value}')  # fmt: skip
    content = b"data: " + json.dumps({"stop": True}).encode()[:-1] + b', "timings": '
    content += timings.encode() + b"}\n\n"
    if reason is None:
        done = complete(content)
        assert not math.isfinite(getattr(done.timings, field))
        return
    with pytest.raises(ServerError) as info:
        complete(content)
    assert info.value.reason == reason


def test_an_error_event_of_any_shape_is_an_error_with_a_reason() -> None:
    for error in ('"boom"', "[1]", '{"code": 1e999}', '{"code": "x"}'):
        with pytest.raises(ServerError) as info:
            complete(b'data: {"error": ' + error.encode() + b"}\n\n")
        assert info.value.reason == "http_error"


def test_an_error_message_is_cleaned_and_capped() -> None:
    body = json.dumps({"error": {"code": 500, "message": "a\nb\udc80" + "x" * 5000}}).encode()
    with pytest.raises(ServerError) as info:
        get_json(lambda request: httpx.Response(500, content=body))
    assert "\n" not in info.value.detail and "\udc80" not in info.value.detail
    assert len(info.value.detail) < 300


def test_the_environment_s_proxy_is_ignored_and_a_configured_one_used(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[str] = []

    class Proxy(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.path)  # a proxy is sent the whole URL
            body = b'{"via": "proxy"}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    proxy_url = f"http://127.0.0.1:{proxy.server_address[1]}"
    # The environment's proxy would answer for every host: the client must not ask it.
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, proxy_url)

    async def get(client: LlamaClient) -> Any:
        try:
            return await client.get_json("/props")
        finally:
            await client.aclose()

    try:
        with pytest.raises(ServerError) as info:  # no server there, and no proxy taken
            asyncio.run(get(LlamaClient("http://127.0.0.1:9", limits=SMALL)))
        assert info.value.reason == "connect" and seen == []
        answer = asyncio.run(get(LlamaClient("http://llama.invalid:8080", proxy=proxy_url)))
        assert answer == {"via": "proxy"}
        assert seen == ["http://llama.invalid:8080/props"]
    finally:
        proxy.shutdown()
        proxy.server_close()


def test_a_stream_past_the_tokens_asked_for_ends_the_probe() -> None:
    token = event({"stop": False, "content": "x"})
    with pytest.raises(ServerError) as info:
        complete(token * 100 + event({"stop": True, "timings": TIMINGS}))
    assert info.value.reason == "bad_response"
    # One event a token and the final one is what llama-server sends.
    assert complete(token * 3 + event({"stop": True, "timings": TIMINGS})).timings.prompt_n == 4


def test_a_completion_sent_on_a_connection_closed_under_it_is_sent_once_more() -> None:
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) == 1:  # the server had closed the kept-alive connection
            raise httpx.RemoteProtocolError("Server disconnected", request=request)
        return httpx.Response(200, content=event({"stop": True, "timings": TIMINGS}))

    async def go() -> Any:
        client = client_for(handler)
        try:
            return await client.complete({"prompt": [1], "n_predict": 3}, timeout=5)
        finally:
            await client.aclose()

    assert asyncio.run(go()).timings.prompt_n == 4
    assert len(calls) == 2
