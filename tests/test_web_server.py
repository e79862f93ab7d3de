"""The scrape endpoint's server under hostile and careless clients, over real sockets.

Timeouts are injected short where a test waits for one to fire, and long where a test shows
that something does *not* wait for one: the two cases then differ by the design, not by a
margin on a measured time.
"""

from __future__ import annotations

import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

import httpx
import pytest
import structlog
from prometheus_client import CollectorRegistry

from exporter.web.endpoint import WebServer, make_app
from exporter.web.protocol import StartResponse
from exporter.web.server import PLAIN_HTTP_ANSWER, Limits, listen_backlog
from tests.certificates import make_certificate

CLIENT_TIMEOUT_S = 10.0  # what a client here waits for an answer that should come at once
# Long enough that a test which passes without waiting for it cannot have waited for it.
NEVER_S = 600.0


def hello(environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
    body = f"{environ['REQUEST_METHOD']} {environ['PATH_INFO']} {environ.get('HTTPS', '-')}"
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [f"{body} {environ['wsgi.url_scheme']}\n".encode()]


@contextmanager
def serving(
    app: Callable[[dict[str, Any], StartResponse], Any] = hello,
    tls: Callable[[], ssl.SSLContext] | None = None,
    **limits: Any,
) -> Iterator[WebServer]:
    server = WebServer(app, "127.0.0.1", 0, tls, Limits(**limits))
    server.start()
    try:
        yield server
    finally:
        server.close()


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT_S)


def read_to_end(sock: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def exchange(port: int, request: bytes) -> bytes:
    with connect(port) as sock:
        sock.sendall(request)
        return read_to_end(sock)


def read_response(stream: BinaryIO, *, head: bool = False) -> tuple[int, dict[str, str], bytes]:
    """One response off a connection's `makefile("rb")`: status, headers (lower-case), body."""
    status_line = stream.readline()
    assert status_line, "closed before a response"
    headers: dict[str, str] = {}
    while (line := stream.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.lower()] = value.strip()
    body = b"" if head else stream.read(int(headers["content-length"]))
    return int(status_line.split(b" ")[1]), headers, body


def get(port: int, path: str = "/") -> bytes:
    with connect(port) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        with sock.makefile("rb") as stream:
            status, _, body = read_response(stream)
    assert status == 200
    return body


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server has closed `sock`: it reads as ended (or reset) without blocking."""
    if not select.select([sock], [], [], 0)[0]:
        return False
    try:
        return sock.recv(65536, socket.MSG_PEEK) == b""
    except ConnectionResetError:
        return True


def eventually(check: Callable[[], bool], what: str, timeout: float = CLIENT_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.01)  # poll interval inside the deadline


def wait_closed(sock: socket.socket, timeout: float = CLIENT_TIMEOUT_S) -> None:
    """Blocks until the server closes `sock` (what it sent before is read and dropped)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass


def test_idle_connections_take_no_thread_and_do_not_stop_scrapes() -> None:
    registry = CollectorRegistry()
    app = make_app(registry, list)
    with serving(app, workers=4, head_timeout=NEVER_S) as server, ExitStack() as stack:
        threads = threading.active_count()
        idle = [stack.enter_context(connect(server.port)) for _ in range(200)]
        eventually(lambda: server.open_connections == len(idle), "all idle connections taken")
        body = get(server.port, "/metrics")
        assert b"# HELP" in body or body == b""  # an empty registry renders as nothing
        assert threading.active_count() <= threads
        assert not any(closed_by_server(sock) for sock in idle)


def test_a_half_sent_head_is_closed_at_the_deadline_however_it_trickles() -> None:
    with serving(head_timeout=0.5) as server, connect(server.port) as silent:
        with connect(server.port) as trickle:
            started = time.monotonic()
            trickle.sendall(b"GET /metrics HTTP/1.1\r\n")
            # One byte of header every 0.1 s: each is progress, none extends the deadline.
            for byte in b"X-Slow: " * 100:
                if select.select([trickle], [], [], 0.1)[0]:
                    break
                try:
                    trickle.send(bytes([byte]))
                except (BrokenPipeError, ConnectionResetError):
                    break
            wait_closed(trickle)
            assert time.monotonic() - started >= 0.5
        wait_closed(silent)  # one that never sent a byte is closed the same way
        assert get(server.port) == b"GET / - http\n"


@pytest.mark.parametrize("ended", [True, False])
def test_an_oversized_head_is_refused(ended: bool) -> None:
    head = b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 5000 + (b"\r\n\r\n" if ended else b"")
    with serving(max_head_bytes=4096) as server:
        answer = exchange(server.port, head)
        assert answer.startswith(b"HTTP/1.1 431 ")
        assert b"Connection: close" in answer
        assert get(server.port) == b"GET / - http\n"


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"POST /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc", 405),
        (b"GET /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc", 413),
        (b"GET /metrics HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 413),
        (b"GET /metrics HTTP/1.1\r\nX-Bad : smuggled\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\nX-A: 1\r\n folded\r\n\r\n", 400),
        (b"GET /metrics\r\n\r\n", 400),
        (b"GET metrics HTTP/1.1\r\n\r\n", 400),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
    ],
)
def test_requests_that_are_not_served_are_refused_and_closed(
    request_bytes: bytes, status: int
) -> None:
    with serving() as server:
        answer = exchange(server.port, request_bytes)
        assert answer.startswith(f"HTTP/1.1 {status} ".encode()), answer
        assert b"Connection: close" in answer


def test_kept_alive_pipelined_head_and_http_1_0() -> None:
    with serving() as server, connect(server.port) as sock, sock.makefile("rb") as stream:
        sock.sendall(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n\r\nHEAD /b HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(stream)[2] == b"GET /a - http\n"
        status, headers, _ = read_response(stream, head=True)
        assert (status, headers["content-length"]) == (200, "15")
        sock.sendall(b"GET /c HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert read_response(stream)[2] == b"GET /c - http\n"
        assert stream.read() == b""
        assert exchange(server.port, b"GET /d HTTP/1.0\r\n\r\n").endswith(b"GET /d - http\n")
        ten = b"GET /e HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
        with connect(server.port) as kept, kept.makefile("rb") as kept_stream:
            kept.sendall(ten + ten)
            assert read_response(kept_stream)[1]["connection"] == "keep-alive"
            assert read_response(kept_stream)[2] == b"GET /e - http\n"


def test_a_client_that_never_reads_holds_no_worker() -> None:
    big = b"x" * (32 * 1024 * 1024)  # far more than the socket buffers of both ends hold

    def app(environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [big if environ["PATH_INFO"] == "/big" else b"small\n"]

    # One worker, and a write timeout no test waits for: a stuck write would stall the rest.
    with serving(app, workers=1, write_timeout=NEVER_S) as server, connect(server.port) as stuck:
        for _ in range(3):  # kept-alive: the requests after the first wait behind it
            stuck.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        for _ in range(20):
            assert get(server.port, "/small") == b"small\n"
        assert not closed_by_server(stuck)


def test_a_response_not_read_is_dropped_at_the_write_timeout() -> None:
    big = b"x" * (32 * 1024 * 1024)

    def app(environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [big]

    with serving(app, write_timeout=0.3) as server, connect(server.port) as stuck:
        stuck.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        eventually(lambda: server.open_connections == 0, "the stuck connection closed")
        assert len(read_to_end(stuck)) < len(big)


def test_the_listen_backlog_holds_a_burst_of_connections() -> None:
    server = WebServer(hello, "127.0.0.1", 0)  # listening, not yet accepting
    assert server.backlog == listen_backlog(1024) > 100
    try:
        with ExitStack() as stack:
            # Without a backlog, connections past it would not complete (their SYNs dropped).
            burst = [stack.enter_context(connect(server.port)) for _ in range(100)]
            server.start()
            for sock in burst:
                sock.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
            answers = []
            for sock in burst:
                with sock.makefile("rb") as stream:
                    answers.append(read_response(stream)[2])
            assert answers == [b"GET /x - http\n"] * len(burst)
    finally:
        server.close()


def holds(server: WebServer, connections: int) -> bool:
    return server.open_connections == connections


def test_at_the_connection_limit_the_longest_idle_makes_room() -> None:
    with (
        serving(max_connections=20, head_timeout=NEVER_S) as server,
        structlog.testing.capture_logs() as logs,
        ExitStack() as stack,
    ):
        idle: list[socket.socket] = []
        for turn in range(2):
            while len(idle) - turn < 20:
                idle.append(stack.enter_context(connect(server.port)))
                eventually(partial(holds, server, len(idle) - turn), "connection taken")
            assert get(server.port) == b"GET / - http\n"
            wait_closed(idle[turn])  # the oldest made room
            eventually(lambda: server.open_connections == 19, "the scrape's connection closed")
        assert not any(closed_by_server(sock) for sock in idle[2:])
    # A flood would flood the log too: one line, then none for a minute.
    shed = [(e["event"], e["reason"]) for e in logs]
    assert shed == [("web_connections_shed", "connection limit")]


def test_an_app_that_fails_gets_a_500_and_the_server_goes_on() -> None:
    def app(environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        if environ["PATH_INFO"] == "/boom":
            raise RuntimeError("boom")
        return hello(environ, start_response)

    with serving(app, workers=1) as server, structlog.testing.capture_logs() as logs:
        assert exchange(server.port, b"GET /boom HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 500 ")
        assert get(server.port) == b"GET / - http\n"
    assert [e["event"] for e in logs] == ["web_request_failed"]
    assert "boom" in logs[0]["error"]


def test_close_is_prompt_with_hundreds_of_connections_open() -> None:
    server = WebServer(hello, "127.0.0.1", 0, limits=Limits(head_timeout=NEVER_S))
    server.start()
    with ExitStack() as stack:
        idle = [stack.enter_context(connect(server.port)) for _ in range(300)]
        eventually(lambda: server.open_connections == len(idle), "all connections taken")
        closing = threading.Thread(target=server.close)
        closing.start()
        # Far under the head timeout: close does not wait for the clients.
        closing.join(timeout=60)
        assert not closing.is_alive()
        for sock in idle:
            wait_closed(sock)


def test_an_ipv6_address_is_served() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this host")
    try:
        server = WebServer(hello, "::1", 0)
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback: {exc}")
    server.start()
    try:
        assert httpx.get(f"http://[::1]:{server.port}/v6", timeout=CLIENT_TIMEOUT_S).text == (
            "GET /v6 - http\n"
        )
    finally:
        server.close()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_certificate(tmp_path_factory.mktemp("certificate"), "server")


def server_context(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)
    return context


def test_tls_handshakes_hold_no_worker_and_time_out(certificate: tuple[Path, Path]) -> None:
    context = server_context(certificate)
    trust = ssl.create_default_context(cafile=str(certificate[0]))
    with (
        serving(tls=lambda: context, workers=1, head_timeout=2.0) as server,
        structlog.testing.capture_logs() as logs,
        ExitStack() as stack,
    ):
        # A TLS record header and nothing more: a handshake that never goes on.
        stalled = [stack.enter_context(connect(server.port)) for _ in range(20)]
        for sock in stalled:
            sock.sendall(b"\x16\x03\x01")
        url = f"https://localhost:{server.port}/tls"
        with httpx.Client(verify=trust, timeout=CLIENT_TIMEOUT_S) as client:
            for _ in range(3):  # on one kept-alive connection
                assert client.get(url).text == "GET /tls on https\n"
        for sock in stalled:
            wait_closed(sock)
    failures = [e for e in logs if e["event"] == "tls_handshake_failed"]
    assert len(failures) == 20 and {e["error"] for e in failures} == {"timed out"}
    assert {e["log_level"] for e in failures} == {"info"}


def test_plain_http_on_the_tls_port_gets_go_s_answer(certificate: tuple[Path, Path]) -> None:
    context = server_context(certificate)
    with serving(tls=lambda: context) as server, structlog.testing.capture_logs() as logs:
        answer = exchange(server.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer == PLAIN_HTTP_ANSWER
        with connect(server.port) as check:  # a port check: no answer, no log line
            check.shutdown(socket.SHUT_WR)
            assert read_to_end(check) == b""
    assert [(e["event"], e["error"]) for e in logs] == [
        ("tls_handshake_failed", "plain HTTP on a TLS port")
    ]


def test_each_tls_connection_takes_the_context_of_its_moment(
    certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    other = make_certificate(tmp_path, "other")
    contexts = [server_context(certificate)]
    with serving(tls=lambda: contexts[-1]) as server:
        url = f"https://localhost:{server.port}/"
        first = ssl.create_default_context(cafile=str(certificate[0]))
        second = ssl.create_default_context(cafile=str(other[0]))
        assert httpx.get(url, verify=first, timeout=CLIENT_TIMEOUT_S).status_code == 200
        contexts.append(server_context(other))
        assert httpx.get(url, verify=second, timeout=CLIENT_TIMEOUT_S).status_code == 200
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(url, verify=first, timeout=CLIENT_TIMEOUT_S)
