"""`bench` against the real llama-server: launching sweeps, failures, interrupts, a running server.

Each test runs the installed command as the owner would, and checks what it wrote: the report's
figures against the JSON samples, the statuses, and that no llama-server outlives the bench.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shlex
import signal
import stat
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import httpx
import pytest

from exporter.bench.progress import LogProgress
from exporter.bench.record import BenchRecord, PlanRecord, RunRecord, load
from exporter.bench.sweep import Bench, BenchSettings
from exporter.llama.server_process import free_port
from exporter.probe.plan import MAX_REPETITIONS
from tests.conftest import StartServer

BENCH = [sys.executable, "-m", "exporter", "bench"]
# Small tests: a real sweep's shape at a few seconds per run on 2 cores.
SMALL = ["-p", "64", "-n", "16", "-r", "3", "--no-gpu", "--log.format", "json"]
EXIT_DEADLINE_S = 60.0

pytestmark = pytest.mark.real_server


def bench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*BENCH, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def started_pids(log_text: str) -> list[int]:
    """The pids of every llama-server the bench said it started."""
    pids = []
    for line in log_text.splitlines():
        if line.startswith("{"):
            event = json.loads(line)
            if event.get("event") == "llama_server_started":
                pids.append(int(event["pid"]))
    return pids


def assert_gone(pids: list[int]) -> None:
    assert pids, "the bench started no server"
    for pid in pids:
        # The bench reaps its children; a pid still in /proc is a leaked (or zombie) server.
        assert not Path(f"/proc/{pid}").exists(), f"llama-server {pid} outlived the bench"


def mean_sd(values: list[float]) -> str:
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"


def run_section(report: str, number: int) -> str:
    start = report.index(f"### Run {number}:")
    end = report.find("\n### ", start + 1)
    return report[start : end if end != -1 else report.index("## Summary")]


def expected_rows(run: RunRecord) -> dict[str, str]:
    """From the raw samples, independently of the bench's own statistics."""
    groups: dict[str, list[float]] = {}
    for s in run.samples:
        name = f"pp{s.tokens}" if s.kind == "prompt" else f"tg{s.tokens + 1}"
        name += f" @ d{s.depth}" if s.depth else ""
        groups.setdefault(name, []).append(s.tokens / s.seconds)
    return {name: mean_sd(speeds) for name, speeds in groups.items()}


def test_launching_sweep_writes_a_report_made_of_its_samples(
    tiny_model: Path, llama_server_binary: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    # -lv 4 makes llama-server log its KV buffers, which the bench's arithmetic must match.
    cmd = f"{shlex.quote(str(llama_server_binary))} -m {shlex.quote(str(tiny_model))} -t 2 -lv 4"
    done = bench("--server-cmd", cmd, "--ctx", "1024,2048", "-d", "0,256", *SMALL, "-o", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert_gone(started_pids(done.stderr))

    record = load(out / "results.json")
    assert record.mode == "launch"
    assert [r.ctx for r in record.runs] == [1024, 2048]
    assert [r.status for r in record.runs] == ["stable", "stable"]
    report = (out / "report.md").read_text()
    assert report.startswith(f"# {record.label} benchmark\n")
    assert "b11434" in record.llama_cpp_build
    for number, run in enumerate(record.runs, start=1):
        assert run.server is not None
        assert run.server.n_ctx == run.ctx  # one slot's worth: -np auto gives a unified cache
        assert len(run.samples) == 2 * 2 * 3  # PP and TG, two depths, three repetitions
        rows = expected_rows(run)
        assert set(rows) == {"pp64", "tg16", "pp64 @ d256", "tg16 @ d256"}
        section = run_section(report, number)
        assert section.startswith(f"### Run {number}: {run.ctx // 1024}k context\n")
        for name, figure in rows.items():
            row = rf"\| \*\*{re.escape(name)}\*\* \| \**{re.escape(figure)} tok/s"
            assert re.search(row, section), (name, figure, section)
        assert run.kv is not None and run.kv.bytes is not None
        # The computed cache is the one llama-server allocated.
        assert run.kv.bytes == run.kv.log_bytes
        assert f"| **KV cache** | {_mib(run.kv.bytes)} (" in section
        assert run.server_rss_bytes is not None and run.server_rss_bytes > 0
        assert "✅ Stable" in section
        summary_row = next(
            line for line in report.split("## Summary")[1].splitlines()
            if line.startswith(f"| {run.ctx // 1024}k |")
        )  # fmt: skip
        for figure in rows.values():
            assert figure in summary_row
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The KV cache doubles with the context; the weights do not.
    first, second = record.runs[0].kv, record.runs[1].kv
    assert first is not None and second is not None and first.bytes is not None
    assert second.bytes == 2 * first.bytes
    for run in record.runs:
        # Host load over the probes: the window is part of the run, on this machine's CPUs.
        host = run.host_load
        assert host is not None and host.server_seen
        assert 0 < host.seconds < run.duration_seconds
        assert host.cores >= 1
        assert host.other_cpu_seconds is not None and host.other_cpu_seconds >= 0
        assert host.load1_start is not None and host.load1_end is not None
    assert "| **Host load** | other processes " in report


def test_a_bare_llama_server_comes_from_the_wheel_and_no_secret_is_written(
    tiny_model: Path, tmp_path: Path
) -> None:
    """The field's `pip install` case: llama-server off PATH, and secrets in the command."""
    out = tmp_path / "out"
    secret = "hf_S3CR3T-never-written"
    cmd = shlex.join(
        ["env", f"HF_TOKEN={secret}", "llama-server", "-m", str(tiny_model), "-t", "2",
         "-hft", secret, "--api_key", secret]
    )  # fmt: skip
    key_file = tmp_path / "key"  # the key the server requires, for the bench's probes
    key_file.write_text(secret)
    env = {**os.environ, "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [*BENCH, "--server-cmd", cmd, "--ctx", "1024", "--api-key-file", str(key_file), *SMALL,
         "-o", str(out)],
        capture_output=True, text=True, timeout=300, check=False, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert_gone(started_pids(done.stderr))
    record = load(out / "results.json")
    assert [run.status for run in record.runs] == ["stable"]
    assert "b11434" in record.llama_cpp_build  # the wheel's server, found off PATH
    for text in (done.stdout, done.stderr):
        assert secret not in text
    written = [p for p in out.rglob("*") if p.is_file()]
    assert {p.name for p in written} >= {"results.json", "report.md", "llama-server-ctx-1024.log"}
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        if path.suffix != ".log":  # llama-server's own output is its own
            assert secret not in path.read_text(errors="replace"), path
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    assert "HF_TOKEN=***" in (out / "report.md").read_text()


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def test_a_context_past_the_models_training_context_is_flagged(
    tiny_model: Path, llama_server_binary: Path, tmp_path: Path
) -> None:
    # The tiny model is trained for 8192 tokens: llama.cpp allocates -c, llama-server caps slots.
    cmd = f"{shlex.quote(str(llama_server_binary))} -m {shlex.quote(str(tiny_model))} -t 2 -lv 4"
    done = bench("--server-cmd", cmd, "--ctx", "16384", *SMALL, "-o", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = load(tmp_path / "results.json").runs
    assert run.server is not None
    assert (run.server.n_ctx, run.server.n_ctx_train) == (8192, 8192)
    assert run.kv is not None and run.kv.cells == 16384
    assert run.kv.bytes == run.kv.log_bytes
    section = run_section((tmp_path / "report.md").read_text(), 1)
    assert "| **Context size** | 16,384 (the server serves 8,192 per slot) |" in section
    assert "capped each slot at the model's training context, 8,192 tokens" in section


def test_a_context_that_cannot_load_is_not_stable_and_the_sweep_goes_on(
    tiny_model: Path, llama_server_binary: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    # A wrapper that fails at once for -c 1024, as llama-server does when the cache does not fit,
    # and runs the real server for any other context.
    script = (
        'case " $* " in *" -c 1024 "*) echo "simulated: failed to allocate KV cache" >&2; '
        'exit 3;; esac; exec "$0" "$@"'
    )
    cmd = shlex.join(["sh", "-c", script, str(llama_server_binary), "-m", str(tiny_model)])
    done = bench("--server-cmd", cmd, "--ctx", "1024,2048", *SMALL, "-o", str(out))
    assert done.returncode == 1, done.stderr[-3000:]  # not every context is stable
    assert_gone(started_pids(done.stderr))

    record = load(out / "results.json")
    failed, loaded = record.runs
    assert failed.status == "not_stable"
    assert failed.reason == "llama-server exited with status 3 before it was ready"
    assert failed.log_lines == ("simulated: failed to allocate KV cache",)
    assert failed.samples == ()
    assert loaded.status == "stable"
    assert loaded.samples
    report = (out / "report.md").read_text()
    first = run_section(report, 1)
    assert "❌ Not stable" in first
    assert "```\nsimulated: failed to allocate KV cache\n```" in first
    assert "✅ Stable" in run_section(report, 2)


def test_a_command_that_is_not_a_server_is_not_stable(tmp_path: Path) -> None:
    done = bench("--server-cmd", "true", "--ctx", "1024,2048", *SMALL, "-o", str(tmp_path))
    assert done.returncode == 1, done.stderr[-3000:]
    record = load(tmp_path / "results.json")
    assert [(r.ctx, r.status) for r in record.runs] == [(1024, "not_stable"), (2048, "not_stable")]
    assert record.runs[0].reason == "llama-server exited with status 0 before it was ready"


def test_a_server_that_never_gets_ready_is_not_stable_and_is_stopped(tmp_path: Path) -> None:
    silent = shlex.join(["sh", "-c", "exec sleep 600", "sh"])  # runs, never listens
    done = bench("--server-cmd", silent, "--ctx", "1024", "--load-timeout", "1", *SMALL,
                 "-o", str(tmp_path))  # fmt: skip
    assert done.returncode == 1, done.stderr[-3000:]
    assert_gone(started_pids(done.stderr))
    (run,) = load(tmp_path / "results.json").runs
    assert run.status == "not_stable"
    assert run.reason.startswith("llama-server was not ready after 1 s")


def test_a_running_server_that_is_down_is_reported_with_the_reason(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    done = bench("--target", url, *SMALL, "-o", str(tmp_path))
    assert done.returncode == 1, done.stderr[-3000:]
    (run,) = load(tmp_path / "results.json").runs
    assert run.status == "not_stable"
    assert run.reason.startswith("connect: GET /props")
    assert "connect: GET /props" in (tmp_path / "report.md").read_text()


class _Lines:
    """A process's stderr, line by line, readable with a deadline."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.seen: list[str] = []
        self._queue: queue.Queue[str] = queue.Queue()
        assert proc.stderr is not None
        self._proc = proc
        self._reader = threading.Thread(target=self._read, args=(proc.stderr,), daemon=True)
        self._reader.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self._queue.put(line)

    def close(self) -> None:
        """Once the process has exited: its stderr ends, and so does the reader."""
        self._reader.join(timeout=EXIT_DEADLINE_S)
        for stream in (self._proc.stdout, self._proc.stderr):
            if stream is not None:
                stream.close()

    def wait_for(self, event: str, deadline_s: float) -> dict[str, object]:
        deadline = time.monotonic() + deadline_s
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                break
            self.seen.append(line)
            if line.startswith("{") and json.loads(line).get("event") == event:
                return dict(json.loads(line))
        raise AssertionError(f"no {event} within {deadline_s} s:\n" + "".join(self.seen[-20:]))

    def rest(self) -> str:
        while not self._queue.empty():
            self.seen.append(self._queue.get())
        return "".join(self.seen)


@pytest.fixture
def long_bench(
    tiny_model: Path, llama_server_binary: Path, tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[str], _Lines, Path]]:
    """A bench with far more samples than a test waits for (the most repetitions the probes
    take, at three depths), logging every sample."""
    cmd = shlex.join([str(llama_server_binary), "-m", str(tiny_model), "-t", "2"])
    proc = subprocess.Popen(
        [*BENCH, "--server-cmd", cmd, "--ctx", "1024,2048", *SMALL, "-r", str(MAX_REPETITIONS),
         "-d", "0,256,512", "--log.level", "debug", "-o", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines = _Lines(proc)
    try:
        yield proc, lines, tmp_path
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        lines.close()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_stops_the_server_and_writes_what_was_measured(
    long_bench: tuple[subprocess.Popen[str], _Lines, Path], signum: signal.Signals
) -> None:
    proc, lines, out = long_bench
    pid = int(str(lines.wait_for("llama_server_started", EXIT_DEADLINE_S)["pid"]))
    lines.wait_for("bench_sample", EXIT_DEADLINE_S)
    proc.send_signal(signum)
    assert proc.wait(timeout=EXIT_DEADLINE_S) == 130, lines.rest()[-3000:]
    assert_gone([pid])

    record: BenchRecord = load(out / "results.json")
    assert record.interrupted
    assert record.finished_at is not None
    (run,) = record.runs  # the second context never started
    assert run.status == "interrupted"
    assert run.samples  # the samples measured before the interrupt are kept
    report = (out / "report.md").read_text()
    assert "**Interrupted:**" in report
    assert "⏹️ Interrupted" in report


def test_an_interrupt_while_the_server_loads_stops_its_whole_process_group(tmp_path: Path) -> None:
    # A wrapper whose child never serves: the bench waits for /health until it is interrupted.
    child_pid_file = tmp_path / "child.pid"
    script = f"sleep 600 & echo $! > {shlex.quote(str(child_pid_file))}; wait"
    proc = subprocess.Popen(
        [*BENCH, "--server-cmd", shlex.join(["sh", "-c", script, "sh"]), "--ctx", "1024",
         *SMALL, "-o", str(tmp_path / "out")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines = _Lines(proc)
    try:
        wrapper = int(str(lines.wait_for("llama_server_started", EXIT_DEADLINE_S)["pid"]))
        deadline = time.monotonic() + EXIT_DEADLINE_S
        while not (child_pid_file.exists() and child_pid_file.read_text().strip()):
            assert time.monotonic() < deadline, "the wrapper never started its child"
            # Paces the poll, and would end it at once if the bench exited instead.
            with contextlib.suppress(subprocess.TimeoutExpired):
                assert proc.wait(timeout=0.05) is None, lines.rest()[-3000:]
        child = int(child_pid_file.read_text())
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=EXIT_DEADLINE_S) == 130, lines.rest()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        lines.close()
    # The child was not the bench's own: only signalling the process group reaches it.
    assert_gone([wrapper])
    deadline = time.monotonic() + EXIT_DEADLINE_S
    while Path(f"/proc/{child}").exists() and _state(child) != "Z":
        assert time.monotonic() < deadline, f"the server's child {child} outlived the bench"
    (run,) = load(tmp_path / "out" / "results.json").runs
    assert (run.status, run.samples) == ("interrupted", ())


def _state(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "gone"
    return stat[stat.rfind(")") + 2]


def _slots_busy(url: str) -> bool:
    return any(s["is_processing"] for s in httpx.get(f"{url}/slots").json())


@pytest.mark.parametrize("ends_after_first_wait", [False, True])
def test_a_busy_running_server_is_waited_for(
    llama_server: StartServer, tmp_path: Path, ends_after_first_wait: bool
) -> None:
    # Context shift lets the production request generate until its client goes away.
    server = llama_server("-c", "4096", "-np", "2", "--context-shift")
    body = {"prompt": [1], "n_predict": -1, "ignore_eos": True, "id_slot": 0, "stream": True}
    done = threading.Event()

    # A production request that outlasts every retry. Streamed, so that closing it stops it:
    # llama-server drops the task of a client that went away.
    def produce() -> None:
        with httpx.stream("POST", f"{server.url}/completion", json=body, timeout=120) as answer:
            for _ in answer.iter_lines():
                if done.is_set():
                    return

    def end_production() -> None:
        done.set()
        production.join(timeout=EXIT_DEADLINE_S)
        deadline = time.monotonic() + EXIT_DEADLINE_S
        while _slots_busy(server.url):
            assert time.monotonic() < deadline, "the production request never ended"

    production = threading.Thread(target=produce, daemon=True)
    production.start()
    deadline = time.monotonic() + EXIT_DEADLINE_S
    while not _slots_busy(server.url):
        assert time.monotonic() < deadline, "the production request never started"
    settings = BenchSettings(
        plan=PlanRecord(prompt_tokens=(64,), generation_tokens=(16,), depths=(0,),
                        repetitions=2, warmup=True),
        probe_timeout=30, load_timeout=30, log_dir=tmp_path,
        target=server.url, busy_retries=2, busy_wait_s=0.1,
    )  # fmt: skip
    waits: list[str] = []

    def phase(text: str) -> None:
        if text.startswith("server busy"):
            waits.append(text)
            if ends_after_first_wait:
                end_production()

    observer = LogProgress()
    observer.phase = phase  # type: ignore[method-assign]
    try:
        (run,) = (
            Bench(settings, nvml=None, observer=observer, on_update=lambda _: None).execute().runs
        )
    finally:
        end_production()
    if ends_after_first_wait:
        assert len(waits) == 1
        assert (run.status, len(run.samples)) == ("stable", 4)
    else:
        assert len(waits) == 2  # waited as often as allowed, then reported
        assert (run.status, run.problems[0], run.samples) == ("probe_failed", "busy", ())


def test_against_a_running_server_depths_past_its_context_are_skipped(
    llama_server: StartServer, tmp_path: Path
) -> None:
    server = llama_server("-c", "2048")
    # Two PP sizes and one TG size: the second round measures PP only.
    sizes = ["-p", "64,128", "-n", "16"]
    done = bench("--target", server.url, "-d", "0,512,4096", *SMALL, *sizes, "-o", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    record = load(tmp_path / "results.json")
    (run,) = record.runs
    assert record.mode == "target"
    assert run.status == "stable"
    assert run.skipped_depths == (4096,)
    assert [(t.name, t.n) for t in run.tests] == [
        ("pp64", 3), ("pp128", 3), ("tg16", 3),
        ("pp64 @ d512", 3), ("pp128 @ d512", 3), ("tg16 @ d512", 3),
    ]  # fmt: skip
    assert run.server is not None and run.server.n_ctx == 2048
    # The server's options come from its process: f16 cache unless told otherwise.
    assert run.kv is not None and (run.kv.type_k, run.kv.type_v) == ("f16", "f16")
    report = (tmp_path / "report.md").read_text()
    assert "depth 4096 skipped: past the server's n_ctx 2048" in report
    assert "### Run 1: running server, 2k context" in report
