"""The Markdown report of a bench (golden and targeted checks) and the JSON record it is made from.

The record is built in code after the owner's hand-made report (2× RTX 3060 12 GB, a 40B-A3B
IQ3_M model, q8_0/q4_0 cache, 32k to 262k contexts): one stable run with every figure, one whose
probe failed, and one whose server did not load. The targeted checks recompute the figures from
the samples with `statistics`, independently of the bench's own code.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path

import pytest

from exporter.bench.record import (
    SCHEMA,
    BenchFileError,
    BenchRecord,
    GpuMemory,
    HostGpu,
    HostLoadRecord,
    HostRecord,
    KvRecord,
    PlanRecord,
    RunRecord,
    SampleRecord,
    ServerRecord,
    load,
)
from exporter.bench.report import render_report
from tests.golden_files import check_golden

GIB = 1024**3
MIB = 1024**2
PP = 512
TG = 127  # the steps after the first token: llama-bench's tg128
MODEL_PATH = "/models/Qwen3-Coder-Next-REAP-40B-A3B.i1-IQ3_M.gguf"
COMMAND = (
    "llama-server",
    "-m",
    MODEL_PATH,
    *("-ngl", "99", "-fa", "on", "-ctk", "q8_0", "-ctv", "q4_0", "-ts", "1,1"),
)
KV_BYTES_PER_TOKEN = 10 * 1024  # the seed report's "10 KiB/tok"
OOM_LOG = (
    "ggml_backend_cuda_buffer_type_alloc_buffer: allocating 2720.00 MiB on device 1: "
    "cudaMalloc failed: out of memory",
    "alloc_tensor_range: failed to allocate CUDA1 buffer of size 2852126720",
    "llama_init_from_model: failed to initialize the context: failed to allocate buffer for kv "
    "cache",
    f"common_init_from_params: failed to create context with model '{MODEL_PATH}'",
    f"srv    load_model: failed to load model, '{MODEL_PATH}'",
    "main: exiting due to model loading error",
)


# --- building records ---


def prompt(depth: int, speeds: Sequence[float]) -> tuple[SampleRecord, ...]:
    # Time to first token: the prompt's decode plus a little HTTP and sampling overhead.
    return tuple(
        SampleRecord(
            kind="prompt",
            depth=depth,
            tokens=PP,
            seconds=PP / v,
            time_to_first_token_seconds=PP / v + 0.04,
        )
        for v in speeds
    )


def generation(
    depth: int, speeds: Sequence[float], joules: Sequence[float] | None = None
) -> tuple[SampleRecord, ...]:
    energy: Sequence[float | None] = joules if joules is not None else [None] * len(speeds)
    return tuple(
        SampleRecord(kind="generation", depth=depth, tokens=TG, seconds=TG / v, energy_joules=e)
        for v, e in zip(speeds, energy, strict=True)
    )


def server(n_ctx: int) -> ServerRecord:
    return ServerRecord(
        model="Qwen3-Coder-Next-REAP-40B-A3B.i1-IQ3_M",
        model_path=MODEL_PATH,
        quant="IQ3_M",
        build="b7040-8f7e2a1",
        n_ctx=n_ctx,
        slots=1,
        size_bytes=18_200_000_000,
    )


def gpus(used_gib: tuple[float, float], server_gib: tuple[float, float]) -> tuple[GpuMemory, ...]:
    return tuple(
        GpuMemory(
            index=i,
            name="NVIDIA GeForce RTX 3060",
            used_bytes=round(used * GIB),
            total_bytes=12 * GIB,
            server_bytes=round(held * GIB),
        )
        for i, (used, held) in enumerate(zip(used_gib, server_gib, strict=True))
    )


def kv(cells: int, *, logged: bool = True) -> KvRecord:
    return KvRecord(
        type_k="q8_0",
        type_v="q4_0",
        bytes_per_token=KV_BYTES_PER_TOKEN,
        cells=cells,
        bytes=cells * KV_BYTES_PER_TOKEN,
        log_bytes=cells * KV_BYTES_PER_TOKEN if logged else None,
    )


def stable_run() -> RunRecord:
    return RunRecord(
        ctx=32768,
        status="stable",
        server=server(32768),
        samples=(
            *prompt(0, [101.8, 102.4, 100.9]),
            *generation(0, [22.41, 22.38, 22.45], joules=[1303.5, 1298.2, 1310.0]),
            *prompt(4096, [95.2, 96.0, 94.7]),
            *generation(4096, [21.9, 22.0, 21.8], joules=[1320.4, 1318.9, 1325.1]),
        ),
        gpus=gpus((9.4, 8.8), (9.1, 8.5)),
        server_rss_bytes=round(1.2 * GIB),
        kv=kv(32768),
        log_file="bench-20260214-010203/logs/llama-server-ctx-32768.log",
        load_seconds=14.2,
        duration_seconds=95.0,
    )


def probe_failed_run() -> RunRecord:
    problems = (
        "generation: http_error",
        "HTTP 500 from /completion: failed to find free space in the KV cache",
    )
    return RunRecord(
        ctx=65536,
        status="probe_failed",
        reason="; ".join(problems),
        server=server(65536),
        samples=(
            *prompt(0, [56.1, 56.8, 56.3]),
            *generation(0, [22.40, 22.35, 22.47]),
            *prompt(4096, [54.0, 54.9, 53.8]),
        ),
        gpus=gpus((9.6, 8.9), (9.3, 8.6)),
        server_rss_bytes=round(1.3 * GIB),
        kv=kv(65536, logged=False),
        problems=problems,
        log_file="bench-20260214-010203/logs/llama-server-ctx-65536.log",
        load_seconds=15.8,
        duration_seconds=120.5,
    )


def not_stable_run() -> RunRecord:
    return RunRecord(
        ctx=262144,
        status="not_stable",
        reason="llama-server exited with status 1 before it was ready",
        log_lines=OOM_LOG,
        log_file="bench-20260214-010203/logs/llama-server-ctx-262144.log",
        duration_seconds=21.3,
    )


def host(*, with_gpus: bool = True) -> HostRecord:
    return HostRecord(
        hostname="llmlab",
        cpu="AMD Ryzen 7 5700X 8-Core Processor",
        cpu_count=16,
        memory_bytes=64 * GIB,
        gpus=(
            tuple(
                HostGpu(index=i, name="NVIDIA GeForce RTX 3060", total_bytes=12 * GIB)
                for i in range(2)
            )
            if with_gpus
            else ()
        ),
        driver_version="580.95.05" if with_gpus else None,
    )


def seed_record() -> BenchRecord:
    return BenchRecord(
        label="Qwen3-Coder-Next-REAP-40B-A3B.i1-IQ3_M",
        mode="launch",
        started_at="2026-02-14T01:02:03Z",
        finished_at="2026-02-14T02:17:45Z",
        exporter_version="0.1.0",
        command=COMMAND,
        llama_cpp_build="b7040-8f7e2a1",
        host=host(),
        plan=PlanRecord(
            prompt_tokens=(PP,),
            generation_tokens=(TG + 1,),
            depths=(0, 4096),
            repetitions=3,
            warmup=True,
        ),
        runs=(stable_run(), probe_failed_run(), not_stable_run()),
    )


def section(report: str, number: int) -> str:
    start = report.index(f"### Run {number}:")
    end = report.find("\n### ", start + 1)
    return report[start : end if end != -1 else report.index("## Summary")]


def summary(report: str) -> list[str]:
    return [line for line in report.split("## Summary")[1].splitlines() if line.startswith("|")]


# --- the report ---


def test_golden_report() -> None:
    check_golden("bench_report.md", render_report(seed_record()))


def test_run_figures_are_mean_and_sd_of_the_samples() -> None:
    record = seed_record()
    report = render_report(record)
    for number, run in enumerate(record.runs, start=1):
        groups: dict[tuple[str, int], list[float]] = {}
        for s in run.samples:
            groups.setdefault((s.kind, s.depth), []).append(s.tokens / s.seconds)
        text = section(report, number)
        for (kind, depth), speeds in groups.items():
            name = (f"pp{PP}" if kind == "prompt" else f"tg{TG + 1}") + (
                f" @ d{depth}" if depth else ""
            )
            mean, sd = statistics.fmean(speeds), statistics.stdev(speeds)
            figure = f"{mean:.2f} ± {sd:.2f} tok/s (n={len(speeds)})"
            # TG is the figure that matters most for chat: bold, as in the owner's report.
            value = f"**{figure}**" if kind == "generation" else figure
            assert f"| **{name}** | {value} |" in text, (name, figure)
            assert f"{mean:.2f} ± {sd:.2f}" in summary(report)[2 + number - 1]


def test_the_stable_run_shows_energy_memory_and_kv_cache() -> None:
    run = stable_run()
    text = section(render_report(seed_record()), 1)
    tg = [s for s in run.samples if s.kind == "generation"]
    joules = sum(s.energy_joules or 0 for s in tg) / sum(s.tokens for s in tg)
    assert f"| **TG energy** | {joules:.3f} J/token (all GPUs) |" in text
    assert "| **GPU0 VRAM** | 9.40 GiB of 12.00 GiB (server 9.10 GiB) |" in text
    assert "| **GPU1 VRAM** | 8.80 GiB of 12.00 GiB (server 8.50 GiB) |" in text
    assert "| **Total VRAM** | 18.20 GiB (server 17.60 GiB) |" in text
    # 32k cells × 10 KiB is the seed report's "~320 MB (32k × 10 KiB/tok)".
    assert (
        "| **KV cache** | 320.0 MiB (32,768 cells × 10.0 KiB/token, K q8_0, V q4_0); "
        "llama-server logged 320.0 MiB |"
    ) in text
    assert "| **Time to first token (pp512)** |" in text
    assert "| **Status** | ✅ Stable |" in text
    # A stable run has nothing to explain and its log is not worth a look.
    assert "**Notes:**" not in text
    assert "llama-server-ctx-32768.log" not in text


def test_failed_runs_explain_themselves() -> None:
    report = render_report(seed_record())
    failed = section(report, 2)
    assert "| **Status** | ⚠️ Probe failed |" in failed
    # The reason already holds both problems: each is said once.
    assert failed.count("failed to find free space in the KV cache") == 1
    assert "tg128 @ d4096" not in failed
    broken = section(report, 3)
    assert broken.startswith("### Run 3: 256k context\n")
    assert "- llama-server exited with status 1 before it was ready" in broken
    assert "- full llama-server log: `bench-20260214-010203/logs/llama-server-ctx-262144.log`" in (
        broken
    )
    assert "```\n" + "\n".join(OOM_LOG) + "\n```" in broken
    assert summary(report)[-1].endswith("| n/a | n/a | ❌ Not stable |")


def test_an_interrupted_bench_says_so_at_the_top_of_the_results() -> None:
    stopped = stable_run().model_copy(update={"status": "interrupted", "reason": "interrupted"})
    record = seed_record().model_copy(
        update={"runs": (stable_run(), stopped), "interrupted": True, "finished_at": None}
    )
    report = render_report(record)
    banner = (
        "> **Interrupted:** the bench was stopped during run 2; the figures below are what was "
        "measured until then."
    )
    assert banner in report
    assert report.index(banner) < report.index("### Run 1:")
    assert "| **Status** | ⏹️ Interrupted |" in section(report, 2)
    # "interrupted" as a reason would only repeat the status.
    assert "- interrupted" not in report
    assert "**Interrupted:**" not in render_report(seed_record())


def test_a_target_mode_record_names_the_server_not_a_command() -> None:
    run = RunRecord(
        ctx=None,
        status="stable",
        server=server(32768),
        samples=(*prompt(0, [100, 102]), *generation(0, [22.4, 22.5])),
    )
    record = seed_record().model_copy(
        update={
            "mode": "target",
            "command": None,
            "target": "http://127.0.0.1:8080",
            "runs": (run,),
        }
    )
    report = render_report(record)
    assert "**Server:** `http://127.0.0.1:8080` (already running)  \n" in report
    assert "Server command" not in report
    assert "### Run 1: running server, 32k context\n" in report
    assert summary(report)[2].startswith("| 32k | 101.00 ± 1.41 | 22.45 ± 0.07 |")


def test_a_record_without_gpus_says_so_and_has_no_vram_column() -> None:
    run = RunRecord(
        ctx=4096,
        status="stable",
        server=server(4096),
        samples=(*prompt(0, [30, 31]), *generation(0, [5, 5.2])),
        gpu_note="GPU memory not read (--no-gpu)",
        server_rss_bytes=20 * GIB,
    )
    record = seed_record().model_copy(update={"host": host(with_gpus=False), "runs": (run,)})
    report = render_report(record)
    assert (
        "**Hardware:** no GPU seen by NVML; AMD Ryzen 7 5700X 8-Core Processor (16 threads), "
        "64.00 GiB RAM  \n"
    ) in report
    head = summary(report)[0]
    assert "VRAM" not in head
    assert head == (
        "| Context | pp512 (tok/s) | tg128 (tok/s) | Server RSS (GiB) | KV cache | Status |"
    )
    assert "VRAM" not in section(report, 1)
    assert "- GPU memory not read (--no-gpu)" in section(report, 1)
    assert "| **Server RSS (host memory)** | 20.00 GiB |" in section(report, 1)


def test_the_header_describes_model_hardware_command_and_plan() -> None:
    report = render_report(seed_record(), json_name="iq3m.json")
    assert report.startswith("# Qwen3-Coder-Next-REAP-40B-A3B.i1-IQ3_M benchmark\n")
    assert "**Date:** 2026-02-14 01:02:03 UTC  \n" in report
    assert f"**Model:** `{Path(MODEL_PATH).name}` (16.95 GiB, IQ3_M)  \n" in report
    assert (
        "**Hardware:** 2× NVIDIA GeForce RTX 3060 12.00 GiB (driver 580.95.05); "
        "AMD Ryzen 7 5700X 8-Core Processor (16 threads), 64.00 GiB RAM  \n"
    ) in report
    assert f"**Server command:** `{' '.join(COMMAND)} -c <context>`  \n" in report
    assert "**Cache:** K q8_0, V q4_0; flash attention on; 4 slots, unified  \n" in report
    assert "**Probes:** pp512, tg128 at depth 0, 4096; 3 repetitions after a warm-up;" in report
    assert "Every sample is in `iq3m.json`." in report


# --- host load ---


def test_a_runs_host_load_is_shown_in_its_table() -> None:
    load = HostLoadRecord(
        seconds=61.0,
        cores=16,
        load1_start=0.42,
        load1_end=3.1,
        steal_percent=0.25,
        other_cpu_seconds=6.1,
    )
    record = seed_record().model_copy(
        update={"runs": (stable_run().model_copy(update={"host_load": load}),)}
    )
    text = section(render_report(record), 1)
    assert (
        "| **Host load** | other processes 0.10 cores (1 % of 16), steal 0.2 %, "
        "load average 0.42 → 3.10, over 61 s |"
    ) in text
    assert "| **Status** | ✅ Stable |" in text
    assert "disturbed" not in text.lower()


def test_a_disturbed_run_says_so_in_its_status_notes_and_summary() -> None:
    load = HostLoadRecord(seconds=60.0, cores=2, steal_percent=6.0, other_cpu_seconds=30.0)
    record = seed_record().model_copy(
        update={"runs": (stable_run().model_copy(update={"host_load": load}),)}
    )
    report = render_report(record)
    text = section(report, 1)
    assert "| **Status** | ✅ Stable, ⚠️ disturbed |" in text
    assert (
        "- **Disturbed by host load**: other processes used 0.50 cores on average (25 % of 2; "
        "limit 0.25); CPU steal 6.0 % (limit 5 %)."
    ) in text
    assert summary(report)[-1].endswith("| ✅ Stable, ⚠️ disturbed |")


def test_a_server_the_bench_could_not_see_is_not_judged_by_other_load() -> None:
    load = HostLoadRecord(seconds=60.0, cores=2, other_cpu_seconds=90.0, server_seen=False)
    record = seed_record().model_copy(
        update={"runs": (stable_run().model_copy(update={"host_load": load}),)}
    )
    text = section(render_report(record), 1)
    assert "other processes 1.50 cores (75 % of 2), the server's included" in text
    assert "- the server's processes were not visible from the bench" in text
    assert "disturbed" not in text.lower()


# --- secrets ---


def test_a_record_written_before_a_redaction_rule_does_not_pass_its_secret_on() -> None:
    """An older bench kept `-hft` and a `sh -c` script's key: the report hides them now."""
    command = ("sh", "-c", "exec llama-server --api-key K3Y-1 -hft HF-2 -m m.gguf")
    log_lines = ("main: using --hf-token HF-2", "srv load: model loaded")
    run = not_stable_run().model_copy(update={"log_lines": log_lines})
    record = seed_record().model_copy(update={"command": command, "runs": (run,)})
    report = render_report(record)
    assert "K3Y-1" not in report
    assert "HF-2" not in report
    assert "**Server command:** `sh -c 'exec llama-server --api-key *** -hft *** -m m.gguf'" in (
        report
    )
    assert "main: using --hf-token ***\nsrv load: model loaded" in report


def test_a_target_urls_password_is_not_shown() -> None:
    record = seed_record().model_copy(
        update={"mode": "target", "command": None, "target": "http://bench:pa55@10.0.0.5:8080"}
    )
    report = render_report(record)
    assert "pa55" not in report
    assert "**Server:** `http://bench:***@10.0.0.5:8080` (already running)" in report


# --- the JSON record ---


def test_save_then_load_round_trips(tmp_path: Path) -> None:
    record = seed_record()
    path = tmp_path / "results.json"
    record.save(path)
    assert load(path) == record
    assert json.loads(path.read_text())["schema"] == SCHEMA
    # The write is atomic: the temporary file is renamed, not left beside the result.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_saving_again_replaces_the_file(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    seed_record().model_copy(update={"runs": ()}).save(path)
    seed_record().save(path)
    assert len(load(path).runs) == 3
    assert not (tmp_path / "results.json.partial").exists()


def saved_json(tmp_path: Path) -> dict[str, object]:
    path = tmp_path / "results.json"
    seed_record().save(path)
    data: dict[str, object] = json.loads(path.read_text())
    return data


def test_loading_another_schema_is_refused(tmp_path: Path) -> None:
    data = saved_json(tmp_path)
    data["schema"] = "llama-speed-exporter/bench/v0"
    path = tmp_path / "old.json"
    path.write_text(json.dumps(data))
    with pytest.raises(
        BenchFileError,
        match=r"old\.json: not a bench result \(schema 'llama-speed-exporter/bench/v0', "
        r"want 'llama-speed-exporter/bench/v1'\)",
    ):
        load(path)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (
            "other.json",
            '{"model": "x", "results": []}',
            r"other\.json: not a bench result \(schema None",
        ),
        ("report.md", "# a Markdown report\n", r"report\.md: not JSON"),
        ("list.json", "[1, 2]", r"list\.json: not a bench result \(a JSON list, not an object\)"),
    ],
)
def test_loading_a_file_that_is_not_a_bench_result_says_what_it_is(
    tmp_path: Path, name: str, content: str, message: str
) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(BenchFileError, match=message):
        load(path)


def test_loading_a_record_with_a_missing_field_names_its_path(tmp_path: Path) -> None:
    data = saved_json(tmp_path)
    runs = data["runs"]
    assert isinstance(runs, list)
    del runs[1]["status"]
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(data))
    with pytest.raises(BenchFileError, match=r"broken\.json: runs\.1\.status: Field required"):
        load(path)


def test_loading_a_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(BenchFileError, match=r"nowhere\.json: cannot read"):
        load(tmp_path / "nowhere.json")
