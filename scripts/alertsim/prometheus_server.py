"""A Prometheus that scrapes nothing and evaluates no rules: it only answers queries over the
blocks in its data directory, which it reads when it starts."""

from __future__ import annotations

import contextlib
import subprocess
import time
from pathlib import Path
from typing import IO, Any, Final

import httpx
import yaml

from exporter.llama.server_process import free_port

# Startup reads every block's index; the margin is for a loaded 2-core CI machine.
READY_TIMEOUT_S: Final = 60.0
STOP_TIMEOUT_S: Final = 30.0
QUERY_TIMEOUT_S: Final = 300.0
_POLL_INTERVAL_S: Final = 0.1
_LOG_TAIL_CHARS: Final = 3000
# Backfilled samples may be years older than the wall clock, and retention counts back from
# the newest block: nothing simulated may be deleted.
_RETENTION: Final = "100y"


class PrometheusError(RuntimeError):
    """Prometheus did not start, exited, or refused a query."""


class PrometheusServer:
    """Prometheus on `data_dir`; start, stop and start it again to make it read new blocks."""

    def __init__(self, binary: str, data_dir: Path, log_path: Path) -> None:
        self.binary = binary
        self.data_dir = data_dir
        self.log_path = log_path
        self.url = ""
        self._config = log_path.with_name("prometheus.yml")
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> None:
        self._config.write_text(yaml.safe_dump({"scrape_configs": []}))
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self._log = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            [
                self.binary,
                f"--config.file={self._config}",
                f"--storage.tsdb.path={self.data_dir}",
                f"--storage.tsdb.retention.time={_RETENTION}",
                f"--query.timeout={int(QUERY_TIMEOUT_S)}s",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
        )
        self._wait_ready()

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT_S)
        if self._log is not None:
            self._log.close()
            self._log = None

    def query(self, expr: str, at_ms: int) -> list[dict[str, Any]]:
        """The instant vector `expr` at `at_ms`."""
        return self._api("query", {"query": expr, "time": _seconds(at_ms)})

    def query_range(
        self, expr: str, start_ms: int, end_ms: int, step_ms: int
    ) -> list[dict[str, Any]]:
        """The matrix of `expr` evaluated at start_ms, start_ms + step_ms, ... <= end_ms."""
        params = {
            "query": expr,
            "start": _seconds(start_ms),
            "end": _seconds(end_ms),
            "step": _seconds(step_ms),
        }
        return self._api("query_range", params)

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-_LOG_TAIL_CHARS:]
        return ""

    def _api(self, endpoint: str, params: dict[str, str]) -> list[dict[str, Any]]:
        try:
            response = httpx.post(
                f"{self.url}/api/v1/{endpoint}", data=params, timeout=QUERY_TIMEOUT_S
            )
            body = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise self._error(f"{endpoint} {params['query']!r} failed: {exc}") from exc
        if body.get("status") != "success":
            raise self._error(f"{endpoint} {params['query']!r}: {body.get('error')}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                status = None if self._proc is None else self._proc.returncode
                raise self._error(f"Prometheus exited with status {status}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/-/ready", timeout=5).status_code == httpx.codes.OK:
                    return
            time.sleep(_POLL_INTERVAL_S)  # poll interval inside the deadline
        raise self._error(f"Prometheus was not ready within {READY_TIMEOUT_S:.0f} s")

    def _error(self, message: str) -> PrometheusError:
        return PrometheusError(f"{message}\n--- end of {self.log_path} ---\n{self.log_tail()}")


def _seconds(ms: int) -> str:
    return f"{ms // 1000}.{ms % 1000:03d}"
