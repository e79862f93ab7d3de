"""The installed command: `probe` once, and `run` as a process that stops cleanly on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from exporter.llama.server_process import free_port
from tests.conftest import StartServer
from tests.daemon_harness import sample

EXPORTER = [sys.executable, "-m", "exporter"]
FAST = [
    "--probe.interval", "3", "--probe.timeout", "2.5", "--probe.jitter", "0",
    "--probe.discovery-interval", "1", "--probe.prompt-tokens", "128",
    "--probe.generation-tokens", "16", "--probe.duty-budget", "1",
]  # fmt: skip


# Past the round's own timeout (120 s by default): a slow round is reported by the exporter,
# with its reason, and only a hang meets this deadline.
PROBE_DEADLINE_S = 180


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_SPEED_")}


@pytest.mark.real_server
def test_probe_command_prints_a_table_and_json(llama_server: StartServer) -> None:
    server = llama_server()
    # One repetition, no warm-up: the table's layout is what is tested, not the statistics.
    args = [*EXPORTER, "probe", "--target", server.url, "--probe.depths", "0,512",
            "--probe.repetitions", "1", "--probe.warmup", "false"]  # fmt: skip
    done = subprocess.run(
        args, capture_output=True, text=True, timeout=PROBE_DEADLINE_S, env=clean_env(),
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "pp512" in done.stdout and "tg128 @ d512" in done.stdout
    assert "status: ok" in done.stdout

    done = subprocess.run(
        [*args, "--json"], capture_output=True, text=True, timeout=PROBE_DEADLINE_S,
        env=clean_env(), check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (report,) = json.loads(done.stdout)
    assert report["ok"] is True and report["model"] == "tiny"
    assert {(s["kind"], s["depth"]) for s in report["samples"]} == {
        ("prompt", 0), ("generation", 0), ("prompt", 512), ("generation", 512),
    }  # fmt: skip


def test_probe_command_fails_with_reason_when_server_is_absent() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    done = subprocess.run(
        [*EXPORTER, "probe", "--target", url], capture_output=True, text=True, timeout=60,
        env=clean_env(), check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert "server unavailable" in done.stdout
    assert "prompt: connect" in done.stdout
    assert "Traceback" not in done.stderr


# Each exporter's stderr goes to a file, not a pipe: a pipe nobody reads fills up (64 KiB of
# debug lines) and the exporter then blocks on its next log line, probes and all.
_STDERR_FILES: dict[int, Path] = {}


@contextmanager
def logged_process(cmd: list[str], **popen: Any) -> Iterator[subprocess.Popen[str]]:
    """`cmd` started with its stderr in a file (`stderr_of`); killed at the end if still up."""
    with tempfile.TemporaryDirectory() as logs:
        log = Path(logs) / "stderr.log"
        with log.open("w") as stderr:
            proc = subprocess.Popen(
                cmd, stdout=subprocess.DEVNULL, stderr=stderr, text=True, **popen
            )
        _STDERR_FILES[proc.pid] = log
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            del _STDERR_FILES[proc.pid]


def stderr_of(proc: subprocess.Popen[str]) -> str:
    """What a process of `logged_process` has written to stderr so far."""
    return _STDERR_FILES[proc.pid].read_text(errors="replace")


@contextmanager
def exporter_process(*args: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    port = free_port()
    cmd = [*EXPORTER, "run", "--web.listen-address", f"127.0.0.1:{port}",
           "--log.format", "json", *args]  # fmt: skip
    with logged_process(cmd, env=clean_env()) as proc:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{base}/healthz", timeout=1)
                break
            except httpx.TransportError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(stderr_of(proc)) from None
                time.sleep(0.05)  # polling for the port to open, within the deadline
        yield proc, base


def scrape_until(base: str, name: str, value: float, timeout: float = 60, **labels: str) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = httpx.get(f"{base}/metrics", timeout=5).text
        if sample(text, name, **labels) == value:
            return text
        if time.monotonic() > deadline:
            raise AssertionError(text)
        time.sleep(0.1)


def stop_within(proc: subprocess.Popen[str], seconds: float) -> tuple[int, str]:
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=seconds + 5)
    assert time.monotonic() - started < seconds, "did not stop in time"
    return proc.returncode, stderr_of(proc)


@pytest.mark.real_server
def test_daemon_scrape_passes_promtool_and_stops_on_sigterm(
    llama_server: StartServer, promtool: str
) -> None:
    server = llama_server("--metrics")
    with exporter_process("--target", server.url, *FAST) as (proc, base):
        text = scrape_until(base, "llama_speed_probe_success", 1.0, probe="generation")
        check = subprocess.run(
            [promtool, "check", "metrics"], input=text, capture_output=True, text=True,
            check=False,
        )  # fmt: skip
        assert (check.returncode, check.stdout + check.stderr) == (0, "")
        code, err = stop_within(proc, 5)
    assert code == 0
    events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    rounds = [e for e in events if e["event"] == "probe_round" and "pp_d0_tps" in e]
    assert rounds and rounds[0]["model"] == "tiny" and rounds[0]["tg_d0_tps"] > 0
    assert events[-1]["event"] == "exporter_stopped"


@pytest.mark.real_server
def test_api_key_never_leaks(llama_server: StartServer, tmp_path: Path) -> None:
    key = "sk-test-0123456789abcdef"
    server = llama_server("--api-key", key)
    (tmp_path / "key").write_text(f"# the key\n{key}\n")
    (tmp_path / "wrong").write_text("sk-wrong-key-000000\n")
    args = ("--target", server.url, *FAST, "--log.level", "debug")
    with exporter_process(*args, "--api-key-file", str(tmp_path / "key")) as (proc, base):
        text = scrape_until(base, "llama_speed_probe_success", 1.0, probe="generation")
        page = httpx.get(f"{base}/", timeout=5).text
        _, err = stop_within(proc, 5)
    assert key not in text + page + err
    with exporter_process(*args, "--api-key-file", str(tmp_path / "wrong")) as (proc, base):
        text = scrape_until(base, "llama_speed_probe_success", 0.0, probe="prompt")
        page = httpx.get(f"{base}/", timeout=5).text
        _, err = stop_within(proc, 5)
    assert sample(text, "llama_speed_probe_failures_total", probe="prompt", reason="unauthorized")
    assert "unauthorized" in page
    assert "sk-wrong-key-000000" not in text + page + err


class HangingServer:
    """Accepts connections and never answers: a llama-server stuck in the middle of a probe."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.accepted = threading.Event()
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            self.accepted.set()

    def close(self) -> None:
        self.sock.close()
        for conn in self.conns:
            conn.close()


def test_sigterm_ends_an_in_flight_probe_within_5_seconds() -> None:
    hanging = HangingServer()
    try:
        with exporter_process("--target", hanging.url, "--probe.timeout", "60") as (proc, base):
            assert hanging.accepted.wait(30)  # a request is now in flight, and will never end
            assert httpx.get(f"{base}/metrics", timeout=5).status_code == 200
            code, err = stop_within(proc, 5)
        assert code == 0
        assert "exporter_stopped" in err
        assert "Traceback" not in err
    finally:
        hanging.close()


def test_busy_port_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [*EXPORTER, "run", "--web.listen-address", f"127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=60, env=clean_env(), check=False,
        )  # fmt: skip
    assert done.returncode == 1
    assert "cannot_listen" in done.stderr and "Traceback" not in done.stderr


def test_version() -> None:
    done = subprocess.run([*EXPORTER, "--version"], capture_output=True, text=True, check=True)
    assert done.stdout.startswith("llama-speed-exporter ")


def test_the_daemon_runs_in_its_own_process_without_the_settings_layer(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("handed-over-secret\n")
    args = ("--target", "http://127.0.0.1:9", "--api-key-file", str(key), *FAST)
    with exporter_process(*args) as (proc, base):
        # Replaced in place (exec): the same pid, now running only the daemon.
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        assert cmdline[1:3] == [b"-m", b"exporter.serve"]
        fds = Path(f"/proc/{proc.pid}/fd")
        # The hand-over file, which held the key, is read and closed before serving.
        assert not [fd for fd in fds.iterdir() if "memfd:" in os.readlink(fd)]
        assert httpx.get(f"{base}/metrics", timeout=5).status_code == 200
        code, err = stop_within(proc, 5)
    assert code == 0
    assert "handed-over-secret" not in err


def test_the_daemon_s_modules_need_neither_pydantic_nor_the_settings_layer() -> None:
    """Without a web config file: pydantic and yaml come with one (exporter.web.webconfig),
    bcrypt with its basic auth users."""
    probe = (
        "import sys, exporter.serve; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('pydantic', 'pydantic_core', 'pydantic_settings', 'yaml', 'bcrypt') or m in "
        "('exporter.config.settings', 'exporter.config.flags', 'exporter.cli')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
