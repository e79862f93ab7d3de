"""The socket side of the scrape endpoint: one IO thread, a fixed pool of workers.

One thread owns every connection while it waits on the network: it accepts, does the TLS
handshake, reads request heads and writes responses, all non-blocking, each wait with a
deadline. Only a complete request reaches a worker, which runs the WSGI app and tries one
non-blocking write. So an idle, slow or never-reading client costs a socket and a few
kilobytes, never a thread: the thread count is fixed at start, and the number of connections
is bounded too.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import queue
import resource
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum, auto
from pathlib import Path
from typing import cast

import structlog

from exporter.web.protocol import (
    HttpError,
    Request,
    WsgiApp,
    call_app,
    error_response,
    head_end,
    parse_head,
    render,
    wsgi_environ,
)

log = structlog.get_logger(__name__)

_READ, _WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE
_TLS_HANDSHAKE_RECORD = 0x16
# What Go's net/http answers on a TLS port to a plain HTTP request (so does every Go exporter):
# the user who typed http:// reads why, instead of a reset connection.
PLAIN_HTTP_ANSWER = (
    b"HTTP/1.0 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Connection: close\r\n\r\nClient sent an HTTP request to an HTTPS server.\n"
)
# Closing with a request unread sends a reset, which can reach the client before the answer
# does: after the last answer the server reads what the client still sends, within a bound.
_LINGER_BYTES = 64 * 1024
_ACCEPTS_PER_WAKE = 64  # then the connections already open get their turn
_ACCEPT_PAUSE_SECONDS = 0.1  # out of file descriptors: accepting again at once would spin
_LIMIT_LOG_INTERVAL_SECONDS = 60.0
_SOMAXCONN = Path("/proc/sys/net/core/somaxconn")


@dataclass(frozen=True)
class Limits:
    workers: int = 8
    # Connections the kernel completes while the IO thread is busy; capped by somaxconn.
    backlog: int = 1024
    max_connections: int = 1024
    # From accept (or from a kept connection's first new byte) to a complete request head,
    # the TLS handshake included. Not renewed by each byte, so a trickle does not extend it.
    head_timeout: float = 10.0
    # A kept-alive connection between requests: longer than Prometheus' usual 1 min interval,
    # so that its scrapes reuse their connection.
    idle_timeout: float = 120.0
    # For a client to take a whole response.
    write_timeout: float = 10.0
    max_head_bytes: int = 16 * 1024
    linger_timeout: float = 1.0


def listen_backlog(wanted: int) -> int:
    """`wanted`, capped as the kernel would cap it; what `listen` is given."""
    try:
        return min(wanted, int(_SOMAXCONN.read_text()))
    except (OSError, ValueError):
        return wanted


def connection_limit(wanted: int) -> int:
    """`wanted`, kept under the file descriptor limit with room for the rest of the process."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(16, min(wanted, soft - 64))


class _State(Enum):
    PEEK = auto()  # TLS port: the first byte tells a handshake from plain HTTP
    HANDSHAKE = auto()
    HEAD = auto()  # reading a request head
    IDLE = auto()  # kept alive, between requests
    WORKING = auto()  # a worker holds it; the IO thread does not watch it
    WRITING = auto()
    LINGER = auto()  # answered and shut for writing; reading what is left before closing


class _Kind(Enum):
    """A kind of wait, each with one fixed timeout."""

    HEAD = auto()
    IDLE = auto()
    WRITE = auto()
    LINGER = auto()


class _Conn:
    __slots__ = (
        "client",
        "events",
        "failed",
        "inbuf",
        "keep_alive",
        "lingered",
        "out",
        "searched",
        "sock",
        "state",
        "tls",
        "wait",
    )

    def __init__(self, sock: socket.socket, client: tuple[str, int], state: _State) -> None:
        self.sock = sock
        self.client = client
        self.state = state
        self.tls = False
        self.events = 0
        self.wait: _Kind | None = None
        self.inbuf = bytearray()
        self.searched = 0  # how much of inbuf has been looked through for the head's end
        self.out = memoryview(b"")
        self.keep_alive = False
        self.failed = False
        self.lingered = 0


class _ClosedError(Exception):
    """The client closed its side, or reset."""


class WebServer:
    """Serves a WSGI app on a background IO thread and a fixed pool of workers; `close` stops it.

    With `tls`, every connection is TLS, with the context it returns at that moment: a
    reloaded certificate applies to the next connection.
    """

    def __init__(
        self,
        app: WsgiApp,
        host: str,
        port: int,
        tls: Callable[[], ssl.SSLContext] | None = None,
        limits: Limits | None = None,
    ) -> None:
        self._app = app
        self._tls = tls
        self._limits = limits or Limits()
        self._max_connections = connection_limit(self._limits.max_connections)
        self._timeouts = {
            _Kind.HEAD: self._limits.head_timeout,
            _Kind.IDLE: self._limits.idle_timeout,
            _Kind.WRITE: self._limits.write_timeout,
            _Kind.LINGER: self._limits.linger_timeout,
        }
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind((host, port))
            self.backlog = listen_backlog(self._limits.backlog)
            self._listener.listen(self.backlog)
            self._listener.setblocking(False)
        except OSError:
            self._listener.close()
            raise
        self._host = host
        self._port = int(self._listener.getsockname()[1])
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        # Touched by the IO thread only (and by `close` once the threads are gone).
        self._conns: set[_Conn] = set()
        # Per kind of wait, the waiting connections by deadline: one timeout per kind, so
        # insertion order is deadline order, and the first entry is the next to expire.
        self._waiting: dict[_Kind, collections.OrderedDict[_Conn, float]] = {
            kind: collections.OrderedDict() for kind in _Kind
        }
        self._accept_paused_until: float | None = None
        self._shed = 0
        self._shed_logged_at = -_LIMIT_LOG_INTERVAL_SECONDS
        # Workers hand connections back through this deque and a byte on the wake socket.
        self._jobs: queue.SimpleQueue[tuple[_Conn, Request] | None] = queue.SimpleQueue()
        self._returned: collections.deque[_Conn] = collections.deque()
        self._closing = threading.Event()
        self._closed = False
        self._io_thread = threading.Thread(target=self._serve, name="web")
        self._workers = [
            threading.Thread(target=self._work, name=f"web-worker-{i}", daemon=True)
            for i in range(self._limits.workers)
        ]

    @property
    def port(self) -> int:
        return self._port

    @property
    def open_connections(self) -> int:
        """Connections open now, whether waiting on the network or at a worker."""
        return len(self._conns)

    def start(self) -> None:
        for worker in self._workers:
            worker.start()
        self._io_thread.start()

    def close(self) -> None:
        """Stops serving: open connections are closed, requests in flight are not answered."""
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        self._wake()
        if self._io_thread.is_alive():
            self._io_thread.join()
        for _ in self._workers:
            self._jobs.put(None)
        deadline = time.monotonic() + 2.0
        stuck = set()
        for worker in self._workers:
            if worker.is_alive():
                worker.join(timeout=max(0.0, deadline - time.monotonic()))
                if worker.is_alive():
                    stuck.add(worker.name)
        # Handed back but not yet taken: no thread uses these any more.
        for conn in self._returned:
            self._close_conn(conn)
        if stuck:  # an app call that does not return: its socket is left to it
            log.warning("web_workers_still_busy", workers=sorted(stuck))
        else:
            for conn in list(self._conns):
                self._close_conn(conn)
        self._selector.close()
        self._listener.close()
        self._wake_r.close()
        self._wake_w.close()

    # The IO thread.

    def _serve(self) -> None:
        self._selector.register(self._listener, _READ)
        self._selector.register(self._wake_r, _READ)
        try:
            while not self._closing.is_set():
                for key, mask in self._selector.select(self._next_timeout()):
                    if key.fileobj is self._listener:
                        self._accept()
                    elif key.fileobj is self._wake_r:
                        with contextlib.suppress(OSError):
                            self._wake_r.recv(4096)
                    elif key.data is not None:
                        self._step(key.data, mask)
                while self._returned:
                    self._took_back(self._returned.popleft())
                self._expire(time.monotonic())
        except Exception:  # a bug here must not leave the port open and silent
            log.exception("web_server_failed")
        finally:
            # What workers hold is closed by `close` once they are gone.
            for conn in list(self._conns):
                if conn.state is not _State.WORKING:
                    self._close_conn(conn)

    def _next_timeout(self) -> float | None:
        deadlines = [next(iter(w.values())) for w in self._waiting.values() if w]
        if self._accept_paused_until is not None:
            deadlines.append(self._accept_paused_until)
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())

    def _expire(self, now: float) -> None:
        if self._accept_paused_until is not None and now >= self._accept_paused_until:
            self._accept_paused_until = None
            self._selector.register(self._listener, _READ)
        for kind, waiting in self._waiting.items():
            while waiting:
                conn, deadline = next(iter(waiting.items()))
                if deadline > now:
                    break
                if kind is _Kind.HEAD and conn.state in (_State.PEEK, _State.HANDSHAKE):
                    log.info("tls_handshake_failed", client=conn.client[0], error="timed out")
                self._close_conn(conn)

    def _accept(self) -> None:
        for _ in range(_ACCEPTS_PER_WAKE):
            try:
                sock, address = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # The connection stays in the backlog; accepting again at once would spin.
                    self._count_shed(f"accept failed: {exc.strerror}")
                    self._selector.unregister(self._listener)
                    self._accept_paused_until = time.monotonic() + _ACCEPT_PAUSE_SECONDS
                    return
                continue  # ECONNABORTED and the like: that client is gone
            if len(self._conns) >= self._max_connections and not self._evict():
                sock.close()
                self._count_shed("connection limit")
                continue
            sock.setblocking(False)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(sock, (address[0], address[1]), _State.HEAD)
            if self._tls is not None:
                conn.state, conn.tls = _State.PEEK, True
            self._conns.add(conn)
            self._wait(conn, _Kind.HEAD)
            self._watch(conn, _READ)

    def _evict(self) -> bool:
        """At the limit, the connection that has waited longest without a request makes room:
        a flood of idle connections then only pushes out its own, never a client that
        sends its request within the time it takes the flood to open the limit's worth."""
        for kind in (_Kind.IDLE, _Kind.LINGER, _Kind.HEAD):
            if self._waiting[kind]:
                self._close_conn(next(iter(self._waiting[kind])))
                self._count_shed("connection limit")
                return True
        return False

    def _count_shed(self, reason: str) -> None:
        """Counts a connection closed (or left waiting) for want of room; one log line a
        minute at most, since a flood that causes this would flood the log too."""
        self._shed += 1
        now = time.monotonic()
        if now - self._shed_logged_at >= _LIMIT_LOG_INTERVAL_SECONDS:
            log.warning(
                "web_connections_shed", reason=reason, limit=self._max_connections,
                shed_since_last_line=self._shed,
            )  # fmt: skip
            self._shed_logged_at, self._shed = now, 0

    def _step(self, conn: _Conn, mask: int) -> None:
        try:
            if conn.state is _State.PEEK:
                self._peek(conn)
            elif conn.state is _State.HANDSHAKE:
                self._handshake(conn)
            elif conn.state in (_State.HEAD, _State.IDLE):
                self._read_head(conn)
            elif conn.state is _State.WRITING:
                self._write(conn)
            elif conn.state is _State.LINGER:
                self._linger(conn)
        except (_ClosedError, OSError):
            self._close_conn(conn)
        except Exception as exc:  # one connection's bug must not stop the others
            log.warning("web_connection_failed", client=conn.client[0], error=repr(exc))
            self._close_conn(conn)

    def _peek(self, conn: _Conn) -> None:
        try:
            first = conn.sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        if not first:
            raise _ClosedError  # a port check: connected, closed, said nothing
        if first[0] != _TLS_HANDSHAKE_RECORD:
            # The stdlib's handshake would fail with "[SSL: HTTP_REQUEST] http request" and
            # reset the connection; answer as Go does instead.
            error = "plain HTTP on a TLS port"
            log.info("tls_handshake_failed", client=conn.client[0], error=error)
            if not first.isalpha():
                raise _ClosedError
            conn.tls = False
            self._answer(conn, PLAIN_HTTP_ANSWER, keep_alive=False)
            return
        try:
            context = cast(Callable[[], ssl.SSLContext], self._tls)()
        except Exception as exc:
            log.warning("tls_context_failed", error=repr(exc))
            raise _ClosedError from exc
        self._watch(conn, 0)  # wrap_socket detaches the socket the selector knows
        conn.sock = context.wrap_socket(conn.sock, server_side=True, do_handshake_on_connect=False)
        conn.state = _State.HANDSHAKE
        self._handshake(conn)

    def _handshake(self, conn: _Conn) -> None:
        sock = cast(ssl.SSLSocket, conn.sock)  # wrapped by _peek
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            self._watch(conn, _READ)
            return
        except ssl.SSLWantWriteError:
            self._watch(conn, _WRITE)
            return
        except OSError as exc:  # ssl.SSLError, a reset
            log.info("tls_handshake_failed", client=conn.client[0], error=str(exc))
            raise _ClosedError from exc
        conn.state = _State.HEAD
        self._watch(conn, _READ)
        # The request may have come with the handshake's last flight, already decrypted.
        self._read_head(conn)

    def _receive(self, conn: _Conn, limit: int) -> None:
        """Reads what there is, up to about `limit` bytes held; _ClosedError at the end."""
        while len(conn.inbuf) <= limit:
            try:
                chunk = conn.sock.recv(65536)
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return
            if not chunk:
                raise _ClosedError
            conn.inbuf += chunk

    def _read_head(self, conn: _Conn) -> None:
        self._receive(conn, self._limits.max_head_bytes)
        if conn.state is _State.IDLE and conn.inbuf:
            conn.state = _State.HEAD
            self._wait(conn, _Kind.HEAD)
        self._take_request(conn)

    def _take_request(self, conn: _Conn) -> None:
        """Hands a complete head to the workers, answers a bad one, or waits for the rest."""
        if conn.inbuf.startswith((b"\r", b"\n")):  # blank lines before a request are allowed
            del conn.inbuf[: len(conn.inbuf) - len(conn.inbuf.lstrip(b"\r\n"))]
            conn.searched = 0
        try:
            end = head_end(conn.inbuf, self._limits.max_head_bytes, conn.searched)
            if end is None:
                conn.searched = len(conn.inbuf)
                return
            request = parse_head(bytes(conn.inbuf[:end]))
        except HttpError as exc:
            self._answer(conn, error_response(exc), keep_alive=False)
            return
        del conn.inbuf[:end]
        conn.searched = 0
        conn.state = _State.WORKING
        self._watch(conn, 0)
        self._wait(conn, None)
        self._jobs.put((conn, request))

    def _answer(self, conn: _Conn, data: bytes, *, keep_alive: bool) -> None:
        conn.out, conn.keep_alive = memoryview(data), keep_alive
        conn.state = _State.WRITING
        self._wait(conn, _Kind.WRITE)
        self._write(conn)

    def _write(self, conn: _Conn) -> None:
        events = _send(conn)
        if events:
            self._watch(conn, events)
        else:
            self._done(conn)

    def _took_back(self, conn: _Conn) -> None:
        if conn.failed:
            self._close_conn(conn)
            return
        conn.state = _State.WRITING
        if conn.out:
            self._wait(conn, _Kind.WRITE)
            self._write(conn)
        else:
            self._done(conn)

    def _done(self, conn: _Conn) -> None:
        """The response is written: wait for the next request, or close."""
        if not conn.keep_alive:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_WR)
            conn.state = _State.LINGER
            self._wait(conn, _Kind.LINGER)
            self._watch(conn, _READ)
            return
        if conn.inbuf:  # the next request came with this one
            conn.state = _State.HEAD
            self._wait(conn, _Kind.HEAD)
            self._watch(conn, _READ)
            self._take_request(conn)
            return
        conn.state = _State.IDLE
        self._wait(conn, _Kind.IDLE)
        self._watch(conn, _READ)

    def _linger(self, conn: _Conn) -> None:
        while conn.lingered < _LINGER_BYTES:
            try:
                chunk = conn.sock.recv(4096)
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return
            if not chunk:
                break
            conn.lingered += len(chunk)
        self._close_conn(conn)

    def _wait(self, conn: _Conn, kind: _Kind | None) -> None:
        if conn.wait is not None:
            del self._waiting[conn.wait][conn]
        conn.wait = kind
        if kind is not None:
            self._waiting[kind][conn] = time.monotonic() + self._timeouts[kind]

    def _watch(self, conn: _Conn, events: int) -> None:
        if events == conn.events:
            return
        if not conn.events:
            self._selector.register(conn.sock, events, conn)
        elif not events:
            self._selector.unregister(conn.sock)
        else:
            self._selector.modify(conn.sock, events, conn)
        conn.events = events

    def _close_conn(self, conn: _Conn) -> None:
        if conn not in self._conns:
            return
        self._wait(conn, None)
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._watch(conn, 0)
        with contextlib.suppress(OSError):
            conn.sock.close()
        self._conns.discard(conn)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full: a wake-up is pending anyway
            self._wake_w.send(b"\0")

    # The workers.

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            conn, request = job
            if self._closing.is_set():
                conn.failed = True
            else:
                self._respond(conn, request)
            self._returned.append(conn)
            self._wake()

    def _respond(self, conn: _Conn, request: Request) -> None:
        try:
            environ = wsgi_environ(
                request, client=conn.client, server=(self._host, self._port), https=conn.tls
            )
            response = call_app(self._app, environ)
            data = render(
                response,
                version=request.version,
                keep_alive=request.keep_alive,
                head_only=request.method == "HEAD",
            )
        except HttpError as exc:
            data, conn.keep_alive = error_response(exc), False
        except Exception as exc:  # the app's bug: one log line, a 500, the server goes on
            log.warning("web_request_failed", client=conn.client[0], error=repr(exc))
            data, conn.keep_alive = error_response(HttpError(500, "see the exporter's log")), False
        else:
            conn.keep_alive = request.keep_alive
        conn.out = memoryview(data)
        try:
            # Most responses fit the socket's buffer: written here, the IO thread only
            # sees the connection again for its next request.
            _send(conn)
        except OSError:
            conn.failed = True


def _send(conn: _Conn) -> int:
    """Writes what the socket takes now; the events to wait for before the rest, or 0 when
    all is written."""
    while conn.out:
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError):
            return _WRITE
        except ssl.SSLWantReadError:
            return _READ
        conn.out = conn.out[sent:]
    return 0
