"""Quality beside speed with llama.cpp b11434's own llama-quantize, llama-server and
llama-perplexity, on a generated model and its Q8_0 and Q4_0 quants.

The issue's done-when: `bench --quality-text ... --quality-baseline base.gguf` records
KLD(Q4_0) > KLD(Q8_0) > 0 and same-top(Q8_0) > same-top(Q4_0); a q4_0 KV cache raises KLD over
f16; `bench compare` prints the Quality column; every quality figure in the report is the JSON's.
Kept to seconds: 8 chunks of 128 tokens of generated Python-like text, 2 repetitions of tiny
probes.
"""

from __future__ import annotations

import json
import random
import shlex
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from exporter.bench.kld_file import file_bytes
from exporter.bench.record import BenchRecord, QualityRecord, load
from testbed.quantize import quantize
from testbed.tiny_model import write_tiny_model
from tests.test_bench_quality_run import FIXTURES
from tests.test_bench_real import EXIT_DEADLINE_S, _Lines, assert_gone

pytestmark = pytest.mark.real_server

BENCH = [sys.executable, "-m", "exporter", "bench"]
SMALL = ["-p", "64", "-n", "16", "-r", "2", "--no-gpu", "--log.format", "json"]
SECRET = "K3Y-never-written"
TIMEOUT_S = 600  # a loaded 2-core machine runs llama.cpp many times slower


def bench(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*BENCH, *args], capture_output=True, text=True, timeout=TIMEOUT_S, check=False, cwd=cwd
    )


def pseudo_code(functions: int = 150, seed: int = 13) -> str:
    """Deterministic Python-like text: the kind of text a coder model is chosen for."""
    rng = random.Random(seed)
    words = ["tokens", "speed", "cache", "llama", "model", "seconds", "depth", "prompt", "slot"]
    lines = []
    for i in range(functions):
        lines.append(f"def {rng.choice(words)}_of_{rng.choice(words)}_{i}({', '.join(words[:2])}):")
        for _ in range(rng.randint(2, 5)):
            a, b = rng.sample(words, 2)
            comment = f"the {rng.choice(words)} is {rng.choice(words)}"
            lines.append(f"    {a} = {a} {rng.choice('+-*/')} {b}  # {comment}")
        lines += [f"    return {rng.choice(words)}", ""]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The F32 base and its quants, made by the build's own llama-quantize."""
    folder = tmp_path_factory.mktemp("quality-models")
    base = write_tiny_model(folder / "base.gguf")
    made = {"base": base}
    for kind in ("Q8_0", "Q4_0"):
        made[kind] = quantize(base, folder / f"tiny-{kind}.gguf", kind)
    return made


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("quality-text") / "code.py.txt"
    path.write_text(pseudo_code())
    return path


def quality_of(record: BenchRecord) -> QualityRecord:
    quality = record.runs[0].quality
    assert quality is not None and quality.status == "measured", quality
    return quality


def run_section(report: str, number: int) -> str:
    start = report.index(f"### Run {number}:")
    end = report.find("\n### ", start + 1)
    return report[start : end if end != -1 else report.index("## Summary")]


def test_quants_and_cache_types_rank_by_kl_divergence(
    models: dict[str, Path], text: Path, llama_server_binary: Path, tmp_path: Path
) -> None:
    server = shlex.quote(str(llama_server_binary))
    quality = ["--quality-text", str(text), "--quality-ctx", "128", "--quality-chunks", "8"]
    key_file = tmp_path / "key"
    key_file.write_text(SECRET)

    def measure(
        label: str, model: Path, *options: str, baseline: Path, ctx: str = "1024"
    ) -> subprocess.CompletedProcess[str]:
        cmd = f"{server} -m {shlex.quote(str(model))} -t 2 --metrics --api-key {SECRET}"
        return bench(
            "--server-cmd", " ".join([cmd, *options]), "--api-key-file", str(key_file),
            "--ctx", ctx, *SMALL, *quality, "--quality-baseline", str(baseline),
            "--label", label, "-o", str(tmp_path / label),
        )  # fmt: skip

    # Q8_0 makes the baseline's distributions (two contexts: quality is measured once).
    q8_done = measure("Q8_0", models["Q8_0"], baseline=models["base"], ctx="1024,2048")
    assert q8_done.returncode == 0, q8_done.stderr[-3000:]
    logits = tmp_path / "Q8_0" / "quality" / "baseline.kld"
    said = f"bench: quality: the baseline's distributions will take at most 317.1 KiB in {logits}"
    assert said in q8_done.stderr
    # The others use it again, as the owner would for a second quant.
    q4_done = measure("Q4_0", models["Q4_0"], baseline=logits)
    assert q4_done.returncode == 0, q4_done.stderr[-3000:]
    cache_done = measure(
        "Q4_0-kv-q4_0", models["Q4_0"], "-ctk", "q4_0", "-ctv", "q4_0", "-fa", "on",
        baseline=logits,
    )  # fmt: skip
    assert cache_done.returncode == 0, cache_done.stderr[-3000:]

    names = ("Q8_0", "Q4_0", "Q4_0-kv-q4_0")
    q8, q4, cache = (load(tmp_path / name / "results.json") for name in names)
    kld8, kld4, kld_cache = (quality_of(r).kld for r in (q8, q4, cache))
    top8, top4 = (quality_of(r).same_top_percent for r in (q8, q4))
    assert kld8 is not None and kld4 is not None and kld_cache is not None
    assert top8 is not None and top4 is not None
    assert kld4.value > kld8.value > 0
    assert top8.value > top4.value
    assert kld_cache.value > kld4.value  # a q4_0 KV cache loses more than an f16 one

    # The baseline: written once, its size said before, its sidecar beside it.
    baseline = q8.quality_baseline
    assert baseline is not None and baseline.status == "measured"
    assert baseline.n_vocab == 314 and baseline.n_chunk == 8
    assert baseline.estimated_bytes == baseline.logits_bytes == logits.stat().st_size
    assert logits.stat().st_size == file_bytes(314, 128, 8)
    assert q4.quality_baseline is not None and q4.quality_baseline.status == "reused"
    # Measured once for the bench, recorded in both of Q8_0's runs.
    assert q8.runs[0].quality == q8.runs[1].quality
    assert quality_of(q8).measured_in_run == 1
    # The server's own options are the tool's, the serving ones are not.
    q4_cache = quality_of(cache)
    assert q4_cache.dropped_options == ("--metrics", "--api-key")
    assert q4_cache.command[q4_cache.command.index("-ctk") :][:2] == ("-ctk", "q4_0")
    assert "-fa" in q4_cache.command

    for name in names:
        out = tmp_path / name
        for path in (p for p in out.rglob("*") if p.is_file()):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
            if path.suffix in (".json", ".md"):
                assert SECRET not in path.read_text(), path
        # bench report renders the same report again from the JSON alone.
        again = bench("report", str(out / "results.json"))
        assert again.stdout == (out / "report.md").read_text()
    for done in (q8_done, q4_done, cache_done):
        assert SECRET not in done.stdout + done.stderr

    results = [str(tmp_path / name / "results.json") for name in ("Q8_0", "Q4_0")]
    compared = bench("compare", *results)
    assert compared.returncode == 0, compared.stderr
    header = next(line for line in compared.stdout.splitlines() if line.startswith("| Context"))
    assert [c.strip() for c in header.split("|")][-3:-1] == ["Quality", "Status"]
    assert f"KLD {kld4.value - kld8.value:+.6f} (significant)" in compared.stdout
    assert "**Q4_0 vs Q8_0:** " in compared.stdout
    assert "and its quality is significantly worse (mean KLD " in compared.stdout

    chart = bench("chart", "--quality", *results, "-o", str(tmp_path / "q.png"))
    assert chart.returncode == 0, chart.stderr
    assert (tmp_path / "q.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_quality_figure_in_the_report_is_the_jsons(
    models: dict[str, Path], text: Path, llama_server_binary: Path, tmp_path: Path
) -> None:
    cmd = shlex.join([str(llama_server_binary), "-m", str(models["Q4_0"]), "-t", "2"])
    done = bench(
        "--server-cmd", cmd, "--ctx", "1024", *SMALL, "--quality-text", str(text),
        "--quality-ctx", "128", "--quality-chunks", "8", "--quality-baseline",
        str(models["base"]), "-o", str(tmp_path),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((tmp_path / "results.json").read_text())
    q = data["runs"][0]["quality"]
    section = run_section((tmp_path / "report.md").read_text(), 1)
    expected = {
        "Mean KLD": f"{q['kld']['value']:.6f} ± {q['kld']['error']:.6f}",
        "KLD median / 99 % / max": f"{q['kld_median']:.6f} / {q['kld_p99']:.6f} / "
        f"{q['kld_max']:.6f}",
        "Same top token": f"{q['same_top_percent']['value']:.3f} ± "
        f"{q['same_top_percent']['error']:.3f} %",
        "PPL": f"{q['ppl']['value']:.4f} ± {q['ppl']['error']:.4f}",
        "PPL of the baseline": f"{q['ppl_base']['value']:.4f} ± {q['ppl_base']['error']:.4f}",
        "PPL ratio to the baseline": f"{q['ppl_ratio']['value']:.6f} ± "
        f"{q['ppl_ratio']['error']:.6f}",
        "Tokens": f"8 chunks of 128 (504 scored) of `{text.name}`",
        "Status": "✅ Measured",
    }
    quality_part = section[section.index("#### Quality") :]
    for key, value in expected.items():
        assert f"| **{key}** | {value} |" in quality_part, (key, value, quality_part)
    # And from the tool's own log: the JSON holds what llama-perplexity printed.
    printed = (tmp_path / "logs" / "llama-perplexity.log").read_text()
    assert f"Mean    KLD: {q['kld']['value']:10.6f} ± {q['kld']['error']:10.6f}" in printed


def test_a_failed_quality_step_keeps_the_speed(
    models: dict[str, Path], text: Path, llama_server_binary: Path, tmp_path: Path
) -> None:
    """The real server beside a llama-perplexity that runs out of memory."""
    build = tmp_path / "build"
    build.mkdir()
    (build / "llama-server").symlink_to(llama_server_binary)
    tool = build / "llama-perplexity"
    help_text = FIXTURES / "llama-perplexity-help.txt"
    tool.write_text(
        "#!/bin/sh\n"
        f'[ "$1" = --help ] && exec cat {shlex.quote(str(help_text))}\n'
        "echo '0.00.512.004 E ggml_backend_cuda_buffer_type_alloc_buffer: allocating 9216.00 MiB "
        "on device 0: cudaMalloc failed: out of memory' >&2\n"
        "exit 1\n"
    )
    tool.chmod(0o755)
    cmd = shlex.join([str(build / "llama-server"), "-m", str(models["Q4_0"]), "-t", "2"])
    quality = ["--quality-text", str(text), "--quality-ctx", "128"]
    done = bench(
        "--server-cmd", cmd, "--ctx", "1024", *SMALL, *quality, "-o", str(tmp_path / "out")
    )
    assert done.returncode == 1, done.stderr[-3000:]  # asked for, and not measured
    (run,) = load(tmp_path / "out" / "results.json").runs
    assert run.status == "stable" and len(run.samples) == 4  # the speed stays
    assert run.quality is not None and run.quality.status == "failed"
    assert run.quality.reason == (
        "ggml_backend_cuda_buffer_type_alloc_buffer: allocating 9216.00 MiB on device 0: "
        "cudaMalloc failed: out of memory (exit status 1)"
    )
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| **Status** | ❌ Failed |" in report
    assert "- ggml_backend_cuda_buffer_type_alloc_buffer: allocating 9216.00 MiB" in report


def test_an_interrupt_during_llama_perplexity_stops_it_and_keeps_the_speed(
    models: dict[str, Path], llama_server_binary: Path, tmp_path: Path
) -> None:
    # Far more chunks than the test waits for: the interrupt lands while the tool runs.
    long_text = tmp_path / "long.txt"
    long_text.write_text(pseudo_code(functions=3000))
    cmd = shlex.join([str(llama_server_binary), "-m", str(models["Q4_0"]), "-t", "2"])
    proc = subprocess.Popen(
        [*BENCH, "--server-cmd", cmd, "--ctx", "1024", *SMALL, "--quality-text", str(long_text),
         "--quality-ctx", "64", "--quality-chunks", "100000", "-o", str(tmp_path / "out")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines = _Lines(proc)
    try:
        tool = int(str(lines.wait_for("quality_tool_started", EXIT_DEADLINE_S)["pid"]))
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=EXIT_DEADLINE_S) == 130, lines.rest()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        lines.close()
    assert_gone([tool])
    record = load(tmp_path / "out" / "results.json")
    assert record.interrupted
    (run,) = record.runs
    assert run.status == "stable" and run.samples  # measured before the interrupt
    assert run.quality is not None and run.quality.status == "interrupted"
