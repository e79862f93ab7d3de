"""SIGTERM ends the process within a bound, whatever a thread is blocked on: the orderly stop
when it can, the watchdog's os._exit when it cannot."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import yaml

from exporter.daemon import SHUTDOWN_DEADLINE_SECONDS
from exporter.llama.server_process import free_port
from exporter.watchdog import EXIT_SHUTDOWN_FORCED, ShutdownWatchdog
from tests.daemon_harness import sample
from tests.fakes import fixture_json
from tests.stuck_daemon import STUCK_THREAD
from tests.test_cli import clean_env, exporter_process, logged_process, stderr_of

# The promise is 5 s; this much is allowed on a loaded 2-core machine before the test calls
# it broken. What each test asserts is that the process exited, and which path ended it.
EXIT_WAIT_S = 30.0
REPO = Path(__file__).resolve().parent.parent


def events(stderr: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def terminate(proc: subprocess.Popen[str]) -> tuple[int, float, str]:
    """SIGTERM to an exporter of `exporter_process`, then its exit status, the seconds it
    took and its stderr."""
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=EXIT_WAIT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        err = stderr_of(proc)
        raise AssertionError(f"still running {EXIT_WAIT_S} s after SIGTERM:\n{err}") from None
    return proc.returncode, time.monotonic() - started, stderr_of(proc)


# --- the watchdog, in this process -------------------------------------------------------------


def watchdogs() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "shutdown-watchdog"]


def test_the_watchdog_exits_once_past_its_deadline() -> None:
    exited: list[int] = []
    done = threading.Event()

    def record(code: int) -> None:
        exited.append(code)
        done.set()

    dog = ShutdownWatchdog(0.05, lambda: {"jobs": ["probe:t"]}, exit_process=record)
    dog.arm()
    dog.arm()  # a second stop request keeps the first countdown
    assert done.wait(EXIT_WAIT_S)
    for thread in watchdogs():  # each ends once its exit call returns
        thread.join(EXIT_WAIT_S)
        assert not thread.is_alive()
    assert exited == [EXIT_SHUTDOWN_FORCED]  # once: both arms share one countdown


def test_a_disarmed_watchdog_does_not_exit() -> None:
    exited: list[int] = []
    dog = ShutdownWatchdog(EXIT_WAIT_S, exit_process=exited.append)
    dog.arm()
    (thread,) = watchdogs()
    assert thread.daemon
    dog.disarm()
    thread.join(EXIT_WAIT_S)
    assert not thread.is_alive() and exited == []


# --- whole processes ---------------------------------------------------------------------------


def test_a_thread_the_exit_would_join_for_ever_is_cut_short() -> None:
    """The real daemon, SIGTERM, and a default-executor call that never returns: asyncio.run
    would wait for it without end; the watchdog ends the process and says what was running."""
    port = free_port()
    cmd = [sys.executable, "-m", "tests.stuck_daemon", f"127.0.0.1:{port}"]
    with logged_process(cmd, env=clean_env(), cwd=REPO) as proc:
        wait_until_serving(proc, f"http://127.0.0.1:{port}")
        code, _, err = terminate(proc)
    assert code == EXIT_SHUTDOWN_FORCED, err
    names = [e["event"] for e in events(err)]
    assert "exporter_stopped" in names  # the orderly part finished; the join did not
    (forced,) = [e for e in events(err) if e["event"] == "shutdown_forced"]
    assert forced["deadline_s"] == SHUTDOWN_DEADLINE_SECONDS
    assert any(t.startswith(STUCK_THREAD) for t in forced["threads"]), forced
    assert "Traceback" not in err


def wait_until_serving(proc: subprocess.Popen[str], base: str) -> None:
    deadline = time.monotonic() + EXIT_WAIT_S
    while True:
        try:
            httpx.get(f"{base}/healthz", timeout=1)
        except httpx.TransportError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(stderr_of(proc)) from None
            time.sleep(0.05)  # polling for the port to open, within the deadline
        else:
            return


class _FakeServer(BaseHTTPRequestHandler):
    """Just enough of llama-server for discovery: /props names the model file."""

    model_path = ""

    def do_GET(self) -> None:
        if self.path == "/props":
            body = fixture_json("props.json")
            body["model_path"] = body["model_alias"] = self.model_path
        elif self.path == "/v1/models":
            body = fixture_json("models.json")
        elif self.path == "/slots":
            body = fixture_json("slots_idle.json")
        else:
            self.send_error(404)
            return
        raw = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the test's output is the exporter's log, not this server's


@contextmanager
def fake_llama_server(model_path: str) -> Iterator[str]:
    handler = type("Handler", (_FakeServer,), {"model_path": model_path})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_the_command_with_a_fifo_for_a_model_stops_on_sigterm(tmp_path: Path) -> None:
    """The finding, outside in: a model path naming a FIFO used to block discovery for good,
    and then SIGTERM logged "stopped" and the process never exited."""
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    with fake_llama_server("/models/on-the-server.gguf") as url:
        config = tmp_path / "exporter.yaml"
        config.write_text(yaml.safe_dump({"targets": [{"url": url, "model_path": str(fifo)}]}))
        with exporter_process("--config.file", str(config)) as (proc, base):
            wait_for_kv_error(base)
            code, seconds, err = terminate(proc)
    assert code == 0, err
    assert events(err)[-1]["event"] == "exporter_stopped"
    assert "shutdown_forced" not in err and "Traceback" not in err
    assert seconds < EXIT_WAIT_S


def wait_for_kv_error(base: str) -> None:
    deadline = time.monotonic() + EXIT_WAIT_S
    while True:
        text = httpx.get(f"{base}/metrics", timeout=5).text
        errors = sample(text, "llama_speed_kv_cache_errors_total", reason="model_unreadable")
        if errors:
            return
        assert time.monotonic() < deadline, text
        time.sleep(0.1)  # polling the exporter's discovery, within the deadline
