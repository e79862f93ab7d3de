"""Quality in `bench`: llama-perplexity's output read into figures, and those figures rendered.

The parser is checked against recorded real outputs of llama.cpp b11434's llama-perplexity
(tests/fixtures/bench/perplexity/README.md says how each was made), the option split against the
two binaries' recorded `--help`, and the report, `bench compare` and the chart against records
built from those outputs. Expected figures are read off the fixtures by eye, not recomputed by
the code under test.
"""

from __future__ import annotations

import json
import math
import re
import stat
import statistics
import struct
from pathlib import Path

import pytest

from exporter.bench.compare import compare_data, compare_markdown
from exporter.bench.goal import SpeedTally, bench_quality, goal_sentence, speed_tally
from exporter.bench.kld_file import (
    MAGIC,
    BaselineFileError,
    TextInfo,
    check_reuse,
    file_bytes,
    is_logits_file,
    max_chunks,
    read_header,
    scored_tokens,
    sidecar_path,
    write_sidecar,
)
from exporter.bench.perplexity_output import (
    MissingFigureError,
    PerplexityOutputError,
    PerplexityResult,
    TooFewTokensError,
    error_lines,
    failure_reason,
    parse_kl_divergence,
    parse_perplexity,
)
from exporter.bench.quality_chart import quality_points, write_quality_chart
from exporter.bench.quality_figures import (
    change_cell,
    compare_kld,
    compare_ppl,
    compare_quality,
    differs,
    short_cell,
)
from exporter.bench.record import (
    BenchRecord,
    Estimate,
    QualityBaselineRecord,
    QualityRecord,
    RunRecord,
    load,
)
from exporter.bench.report import render_report, summary_table
from exporter.bench.tool_options import parse_help, split_options
from tests.golden_files import check_golden
from tests.test_bench_compare import iq3, q2, table
from tests.test_bench_report import seed_record

FIXTURES = Path(__file__).parent / "fixtures" / "bench" / "perplexity"
SHA = "a45566822f9493479c78a66adeda76b514813a4a6a7022716f188d90fff3d4c5"  # sample.txt
BASE_BYTES = 10_099_392  # small.gguf
TOOL = "/opt/llama.cpp/build/bin/llama-perplexity"
KLD_OPTIONS = ("--kl-divergence-base", "bench-x/quality/baseline.kld", "--kl-divergence")


def recorded(name: str) -> str:
    return (FIXTURES / name).read_text(encoding="utf-8")


# --- the parser, on real outputs ---


def test_a_perplexity_run_gives_the_final_estimate_and_its_error() -> None:
    result = parse_perplexity(recorded("ppl-q4_0.txt"))
    assert result.ppl == Estimate(value=372.9810, error=5.81601)
    assert (result.chunks, result.n_ctx) == (8, 128)
    assert result.kld is None


def test_the_baseline_run_prints_its_own_perplexity() -> None:
    assert parse_perplexity(recorded("kld-base.txt")).ppl == Estimate(value=375.7719, error=5.714)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("kld-q8_0.txt", {
            "kld": (0.000020, 0.0), "spread": (0.000019, 0.000027, 0.000028),
            "same_top": (97.619, 0.680), "ppl": (376.301927, 5.725170),
            "ratio": (1.001410, 0.000265)}),
        ("kld-q4_0.txt", {
            "kld": (0.003468, 0.000031), "spread": (0.003256, 0.004838, 0.004981),
            "same_top": (68.254, 2.076), "ppl": (372.980980, 5.816007),
            "ratio": (0.992573, 0.003381)}),
        ("kld-q4_0-cache-q4_0.txt", {
            "kld": (0.004211, 0.000037), "spread": (0.003880, 0.006452, 0.006700),
            "same_top": (62.103, 2.163), "ppl": (371.416997, 5.863070),
            "ratio": (0.988411, 0.004005)}),
    ],
)  # fmt: skip
def test_a_kl_divergence_run_gives_every_figure(
    name: str, expected: dict[str, tuple[float, ...]]
) -> None:
    result = parse_kl_divergence(recorded(name))

    def estimate(key: str) -> Estimate:
        value, error = expected[key]
        return Estimate(value=value, error=error)

    assert result.kld == estimate("kld")
    assert (result.kld_median, result.kld_p99, result.kld_max) == expected["spread"]
    assert result.same_top_percent == estimate("same_top")
    assert result.ppl == estimate("ppl")
    assert result.ppl_base == Estimate(value=375.771938, error=5.714007)
    assert result.ppl_ratio == estimate("ratio")
    assert (result.chunks, result.n_ctx) == (8, 128)


def test_quants_and_cache_types_come_out_in_the_expected_order() -> None:
    q8, q4, q4_cache = (
        parse_kl_divergence(recorded(f"kld-{name}.txt"))
        for name in ("q8_0", "q4_0", "q4_0-cache-q4_0")
    )
    assert q8.kld and q4.kld and q4_cache.kld
    assert 0 < q8.kld.value < q4.kld.value < q4_cache.kld.value


def test_too_few_tokens_for_statistics_says_why() -> None:
    with pytest.raises(TooFewTokensError) as raised:
        parse_kl_divergence(recorded("kld-too-few-tokens.txt"))
    assert str(raised.value) == (
        "llama-perplexity scored 62 tokens (2 chunks of 64) and prints KL divergence statistics "
        "from 100 on; give more chunks or a longer context"
    )


def test_output_cut_short_is_a_missing_figure_not_too_few_tokens() -> None:
    # 20 chunks of 512 score 5,100 tokens: the statistics were printed, then lost.
    with pytest.raises(MissingFigureError, match="printed no Mean PPL"):
        parse_kl_divergence(recorded("kld-ended-early.txt"))


@pytest.mark.parametrize(
    ("name", "returncode", "reason"),
    [
        ("ppl-short-text.txt", 0,
         "perplexity: you need at least 256 tokens to evaluate perplexity with a context of 128; "
         "perplexity: the data file you provided tokenizes to only 96 tokens"),
        # The first error is the cause; the tool's last word follows, the cascade between not.
        ("ppl-missing-model.txt", 1,
         "gguf_init_from_file: failed to open GGUF file 'missing.gguf' (No such file or "
         "directory); …; llama_perplexity: unable to load model (exit status 1)"),
        ("ppl-silent-exit.txt", 0, "llama-perplexity printed no result and no error message"),
        ("kld-base-ended-early.txt", 0,
         "llama-perplexity printed no result and no error message"),
    ],
)  # fmt: skip
def test_a_run_without_a_result_is_explained_in_its_own_words(
    name: str, returncode: int, reason: str
) -> None:
    text = recorded(name)
    with pytest.raises(PerplexityOutputError):
        parse_perplexity(text)
    assert failure_reason(text, returncode) == reason


def test_an_unprefixed_crash_message_is_a_reason() -> None:
    text = "ggml/src/ggml.c:1234: GGML_ASSERT(n_batch % n_ctx == 0) failed\n"
    assert failure_reason(text, -6) == (
        "ggml/src/ggml.c:1234: GGML_ASSERT(n_batch % n_ctx == 0) failed (exit status -6)"
    )
    assert failure_reason("", 139) == "llama-perplexity exited with status 139 and no error message"


def test_colour_codes_and_carriage_returns_do_not_hide_a_figure() -> None:
    text = "\x1b[32m0.00.052.989 I Final estimate: PPL = 6.1234 +/- 0.04500\x1b[0m\r\n"
    assert parse_perplexity(text).ppl == Estimate(value=6.1234, error=0.045)


def test_a_figure_printed_as_nan_is_no_figure() -> None:
    with pytest.raises(PerplexityOutputError, match="nan"):
        parse_perplexity("Final estimate: PPL = nan +/- nan\n")


def test_error_lines_are_the_error_level_ones_without_their_prefix() -> None:
    assert error_lines(recorded("ppl-short-text.txt")) == [
        "perplexity: you need at least 256 tokens to evaluate perplexity with a context of 128",
        "perplexity: the data file you provided tokenizes to only 96 tokens",
    ]


# --- which server options llama-perplexity takes: the recorded --help of both ---


@pytest.fixture(scope="module")
def helps() -> tuple[dict[str, bool], dict[str, bool]]:
    return (
        parse_help(recorded("llama-server-help.txt")),
        parse_help(recorded("llama-perplexity-help.txt")),
    )


def test_help_says_which_options_take_a_value(helps: tuple[dict[str, bool], ...]) -> None:
    server, tool = helps
    assert server["-fa"] and server["--flash-attn"]  # `[on|off|auto]`
    assert server["-ot"]  # a hint with spaces in it
    assert not server["--no-kv-offload"] and not server["-kvo"]  # names only, to the line's end
    assert not server["--metrics"]
    assert server["--api-key"] and server["--host"]
    assert tool["--kl-divergence-base"] and not tool["--kl-divergence"]
    assert "--host" not in tool and "--api-key" not in tool and "--metrics" not in tool
    # The model-loading options are both programs'.
    for name in ("-m", "-t", "-ngl", "-ts", "-ctk", "-ctv", "-fa", "-np", "--n-cpu-moe"):
        assert name in tool, name


def test_the_owners_command_keeps_its_loading_options_and_drops_the_servers(
    helps: tuple[dict[str, bool], dict[str, bool]],
) -> None:
    server, tool = helps
    loading = ["-m", "/models/m.gguf", "-ngl", "99", "-fa", "on", "-ctk", "q8_0", "-ctv", "q4_0",
               "-ts", "1,1", "-t", "8"]  # fmt: skip
    serving = ["--api-key", "K", "--metrics", "--alias", "coder", "--slots", "--port=8080"]
    argv = [*loading, *serving, "-np", "2", "--jinja"]
    kept, dropped = split_options(argv, {**tool, **server}, tool)
    assert kept == [*loading, "-np", "2"]
    assert dropped == ["--api-key", "--metrics", "--alias", "--slots", "--port", "--jinja"]


# --- the baseline file ---


def kld_bytes(n_ctx: int, n_vocab: int, n_chunk: int, size: int | None = None) -> bytes:
    head = struct.pack("<8siii", MAGIC, n_ctx, n_vocab, n_chunk)
    total = file_bytes(n_vocab, n_ctx, n_chunk) if size is None else size
    return head + bytes(total - len(head))


def test_file_size_is_what_llama_perplexity_wrote() -> None:
    # The recorded baseline: 8 chunks of 128 tokens, the tiny model's 314-token vocabulary.
    assert file_bytes(314, 128, 8) == 324_660
    assert scored_tokens(128) == 63
    assert scored_tokens(512) == 255


def test_a_texts_bytes_bound_its_chunks() -> None:
    assert max_chunks(512, 50, 10_000_000) == 50
    assert max_chunks(512, 50, 5118) == 10  # (5118 + 2) // 512
    assert max_chunks(512, 50, 100) == 0


def test_a_complete_header_is_read(tmp_path: Path) -> None:
    path = tmp_path / "base.kld"
    path.write_bytes(kld_bytes(128, 314, 8))
    assert is_logits_file(path)
    header = read_header(path)
    assert (header.n_ctx, header.n_vocab, header.n_chunk) == (128, 314, 8)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"GGUF" + bytes(40), "not a llama-perplexity --kl-divergence-base file"),
        (MAGIC + struct.pack("<i", 128), "holds no tokens (12 bytes)"),
        (kld_bytes(128, 314, 8, size=300_000), "300000 bytes where 8 chunks of 128 tokens"),
    ],
    ids=["model", "short-text", "truncated"],
)
def test_a_file_that_is_not_a_whole_baseline_is_refused(
    tmp_path: Path, data: bytes, message: str
) -> None:
    path = tmp_path / "base.kld"
    path.write_bytes(data)
    with pytest.raises(BaselineFileError, match=re.escape(message)):
        read_header(path)


def baseline_record(logits: Path, **changes: object) -> QualityBaselineRecord:
    record = QualityBaselineRecord(
        status="measured",
        model="small.gguf",
        model_bytes=BASE_BYTES,
        logits_file=str(logits),
        logits_bytes=324_660,
        estimated_bytes=324_660,
        n_vocab=314,
        text="sample.txt",
        text_sha256=SHA,
        ctx=128,
        chunks=8,
        n_chunk=8,
        ppl=Estimate(value=375.7719, error=5.714),
        seconds=0.14,
    )
    return record.model_copy(update=changes)


@pytest.fixture
def earlier_baseline(tmp_path: Path) -> tuple[Path, TextInfo]:
    """An earlier bench's baseline file, its sidecar, and the text it was made from."""
    text_path = tmp_path / "sample.txt"
    text_path.write_text("def speed(tokens):\n    return tokens\n" * 100)
    text = TextInfo.of(text_path)
    logits = tmp_path / "old" / "baseline.kld"
    logits.parent.mkdir()
    logits.write_bytes(kld_bytes(128, 314, 8))
    write_sidecar(logits, baseline_record(logits, text_sha256=text.sha256))
    return logits, text


def test_an_earlier_baseline_of_the_same_text_is_used_again(
    earlier_baseline: tuple[Path, TextInfo],
) -> None:
    logits, text = earlier_baseline
    assert stat.S_IMODE(sidecar_path(logits).stat().st_mode) == 0o600
    reused = check_reuse(logits, text, None, None)
    assert reused.status == "reused"
    assert (reused.ctx, reused.chunks, reused.n_chunk, reused.model) == (128, 8, 8, "small.gguf")
    assert check_reuse(logits, text, 128, 8) == reused


def test_an_earlier_baseline_of_another_text_or_context_is_refused(
    earlier_baseline: tuple[Path, TextInfo], tmp_path: Path
) -> None:
    logits, text = earlier_baseline
    other = tmp_path / "other.txt"
    other.write_text("something else\n")
    with pytest.raises(BaselineFileError, match="was made from another text"):
        check_reuse(logits, TextInfo.of(other), None, None)
    with pytest.raises(BaselineFileError, match="was made with --quality-ctx 128, not 512"):
        check_reuse(logits, text, 512, None)
    with pytest.raises(BaselineFileError, match="was made with --quality-chunks 8, not 20"):
        check_reuse(logits, text, None, 20)
    sidecar_path(logits).unlink()
    with pytest.raises(BaselineFileError, match=r"no baseline\.kld\.json beside it"):
        check_reuse(logits, text, None, None)


# --- significance and comparability ---


def test_a_difference_beyond_the_errors_is_significant() -> None:
    a = Estimate(value=0.003468, error=0.000031)
    assert differs(a, Estimate(value=0.004211, error=0.000037))
    # 1.96 × √2 × 0.000031 = 0.0000859: a difference of 0.00008 is inside it.
    assert not differs(a, Estimate(value=0.003548, error=0.000031))


def test_an_error_printed_as_zero_counts_as_half_the_last_digit() -> None:
    # Q8_0's KLD of the tiny model is printed 0.000020 ± 0.000000.
    a = Estimate(value=0.000020, error=0.0)
    assert not differs(a, Estimate(value=0.000021, error=0.0))
    assert differs(a, Estimate(value=0.000023, error=0.0))


def quality(name: str, *, run: int = 1, **changes: object) -> QualityRecord:
    """A run's quality as the bench records it, from a recorded llama-perplexity output."""
    text = recorded(name)
    kld = name.startswith("kld-")
    result: PerplexityResult = parse_kl_divergence(text) if kld else parse_perplexity(text)
    record = QualityRecord(
        status="measured",
        mode="kl_divergence" if kld else "perplexity",
        text="sample.txt",
        text_sha256=SHA,
        ctx=128,
        chunks=result.chunks,
        baseline_model="small.gguf" if kld else None,
        baseline_model_bytes=BASE_BYTES if kld else None,
        ppl=result.ppl,
        ppl_base=result.ppl_base,
        ppl_ratio=result.ppl_ratio,
        ln_ppl_ratio=result.ln_ppl_ratio,
        kld=result.kld,
        kld_median=result.kld_median,
        kld_p99=result.kld_p99,
        kld_max=result.kld_max,
        same_top_percent=result.same_top_percent,
        command=(TOOL, "-m", "/models/m.gguf", "-ngl", "99", "-c", "128", *KLD_OPTIONS)
        if kld
        else (TOOL, "-m", "/models/m.gguf", "-ngl", "99", "-f", "sample.txt", "-c", "128"),
        dropped_options=("--metrics", "--api-key"),
        measured_in_run=run,
        seconds=2.4,
        log_file="bench-x/logs/llama-perplexity.log",
    )
    return record.model_copy(update=changes)


def test_kld_is_compared_against_one_baseline_and_ppl_over_the_same_tokens() -> None:
    q8, q4 = quality("kld-q8_0.txt"), quality("kld-q4_0.txt")
    judged = compare_quality(q8, q4)
    assert (judged.figure, judged.verdict, judged.better) == ("KLD", "significant", "A")
    assert judged.difference == pytest.approx(0.003448)
    assert compare_ppl(q8, q4).verdict == "within noise"  # PPL's error hides what KLD sees
    assert change_cell(q8, q4) == "KLD +0.003448 (significant); PPL -0.9 % (within noise)"


def test_kld_from_another_baseline_falls_back_to_ppl() -> None:
    q8 = quality("kld-q8_0.txt")
    q4 = quality("kld-q4_0.txt", baseline_model="other-f16.gguf")
    assert compare_kld(q8, q4).why_not == "not comparable: different baselines"
    assert compare_quality(q8, q4).figure == "PPL"


def test_quality_over_other_tokens_is_not_compared() -> None:
    q8 = quality("kld-q8_0.txt")
    assert compare_quality(q8, quality("kld-q4_0.txt", text_sha256="0" * 64)).why_not == (
        "not comparable: different texts"
    )
    assert compare_quality(q8, quality("kld-q4_0.txt", ctx=512, chunks=8)).why_not == (
        "not comparable: 8 chunks of 128 vs 8 of 512"
    )
    failed = quality("kld-q4_0.txt", status="failed", ppl=None, kld=None)
    assert compare_quality(q8, failed).why_not == "not measured in B"
    assert compare_quality(None, None).why_not == "not measured in A and B"
    assert change_cell(q8, failed) == "not measured in B"


def test_cells_show_kld_and_ppl_or_the_status() -> None:
    assert short_cell(quality("kld-q4_0.txt")) == "KLD 0.003468 ± 0.000031, PPL 372.9810 ± 5.8160"
    assert short_cell(quality("ppl-q4_0.txt")) == "PPL 372.9810 ± 5.8160"
    assert short_cell(quality("kld-q4_0.txt", status="failed")) == "failed"
    assert short_cell(None) == "—"


# --- the owner's question in one sentence ---


def test_speed_verdicts_are_counted_over_every_comparable_test() -> None:
    a, b = iq3(), q2()
    pairs = [(ra, rb) for ra in a.runs for rb in b.runs if ra.ctx == rb.ctx]
    # 32k: PP +20 % significant, TG within noise; 64k: PP within noise, TG -6 % significant;
    # 128k: single repetitions; 256k: A did not load.
    assert speed_tally(pairs) == SpeedTally(faster=1, slower=1, within_noise=2, unknown=2)


@pytest.mark.parametrize(
    ("tally", "phrase"),
    [
        (SpeedTally(faster=2, within_noise=2), "it is significantly faster (2 of 4 tests)"),
        (SpeedTally(slower=1, within_noise=3), "it is significantly slower (1 of 4 tests)"),
        (SpeedTally(within_noise=3, unknown=1),
         "it is not significantly faster or slower (3 of 4 tests within noise, 1 of unknown "
         "noise)"),
        (SpeedTally(faster=1, slower=1), "its speed is mixed (significantly faster in 1 and "
         "slower in 1 of 2 tests)"),
        (SpeedTally(), "its speed was not compared (no context ran stably in both)"),
        (SpeedTally(within_noise=2, disturbed=True), "it is not significantly faster or slower "
         "(2 of 2 tests within noise; on disturbed runs, untrustworthy)"),
    ],
)  # fmt: skip
def test_speed_phrases(tally: SpeedTally, phrase: str) -> None:
    assert tally.phrase() == phrase


def with_quality(record: BenchRecord, measured: QualityRecord) -> BenchRecord:
    runs = tuple(run.model_copy(update={"quality": measured}) for run in record.runs)
    return record.model_copy(update={"runs": runs})


def test_the_goal_sentence_answers_faster_and_better() -> None:
    a = with_quality(iq3(), quality("kld-q8_0.txt"))
    b = with_quality(q2(), quality("kld-q4_0.txt"))
    pairs = [(ra, rb) for ra in a.runs for rb in b.runs if ra.ctx == rb.ctx]
    assert goal_sentence(pairs, a, b, "IQ3_M", "Q2_K_XL") == (
        "**Q2_K_XL vs IQ3_M:** its speed is mixed (significantly faster in 1 and slower in 1 of "
        "6 tests), and its quality is significantly worse (mean KLD 0.003468 ± 0.000031 vs "
        "0.000020 ± 0.000000)."
    )
    assert goal_sentence(pairs, b, a, "Q2_K_XL", "IQ3_M").endswith(
        "its quality is significantly better (mean KLD 0.000020 ± 0.000000 vs 0.003468 ± 0.000031)."
    )


def test_the_bench_quality_is_the_first_measured_one() -> None:
    failed = quality("kld-q4_0.txt", status="failed")
    record = iq3()
    measured = quality("kld-q8_0.txt")
    runs = (
        record.runs[0].model_copy(update={"quality": failed}),
        record.runs[1].model_copy(update={"quality": measured}),
    )
    assert bench_quality(record.model_copy(update={"runs": runs})) == quality("kld-q8_0.txt")
    assert bench_quality(iq3()) is None


# --- the report ---


def quality_seed() -> BenchRecord:
    """The owner's report with quality: KLD measured after run 1, recorded in every run."""
    record = with_quality(seed_record(), quality("kld-q4_0-cache-q4_0.txt"))
    logits = Path("bench-20260214-010203/quality/baseline.kld")
    return record.model_copy(update={"quality_baseline": baseline_record(logits)})


def section(report: str, number: int) -> str:
    start = report.index(f"### Run {number}:")
    end = report.find("\n### ", start + 1)
    return report[start : end if end != -1 else report.index("## Summary")]


def test_golden_report_with_quality() -> None:
    check_golden("bench_report_quality.md", render_report(quality_seed()))


def test_every_quality_figure_in_the_report_is_the_jsons(tmp_path: Path) -> None:
    quality_seed().save(tmp_path / "results.json")
    data = json.loads((tmp_path / "results.json").read_text())
    report = render_report(load(tmp_path / "results.json"))
    for number, run in enumerate(data["runs"], start=1):
        q = run["quality"]
        text = section(report, number)
        assert f"| **Mean KLD** | {q['kld']['value']:.6f} ± {q['kld']['error']:.6f} |" in text
        spread = f"{q['kld_median']:.6f} / {q['kld_p99']:.6f} / {q['kld_max']:.6f}"
        assert f"| **KLD median / 99 % / max** | {spread} |" in text
        top = q["same_top_percent"]
        assert f"| **Same top token** | {top['value']:.3f} ± {top['error']:.3f} % |" in text
        assert f"| **PPL** | {q['ppl']['value']:.4f} ± {q['ppl']['error']:.4f} |" in text
        base = q["ppl_base"]
        assert f"| **PPL of the baseline** | {base['value']:.4f} ± {base['error']:.4f} |" in text
        ratio = q["ppl_ratio"]
        assert f"| **PPL ratio to the baseline** | {ratio['value']:.6f} ± " in text
        scored = q["chunks"] * (q["ctx"] - 1 - q["ctx"] // 2)
        assert f"| **Tokens** | {q['chunks']} chunks of {q['ctx']} ({scored:,} scored)" in text
    summary = report.split("## Summary")[1]
    q = data["runs"][0]["quality"]
    assert f"KLD {q['kld']['value']:.6f} ± {q['kld']['error']:.6f}, PPL " in summary
    baseline = data["quality_baseline"]
    assert f"PPL {baseline['ppl']['value']:.4f} ± {baseline['ppl']['error']:.4f}" in report


def test_a_quality_measured_once_says_so_in_later_runs() -> None:
    report = render_report(quality_seed())
    assert "measured once for the bench" not in section(report, 1)
    assert "measured once for the bench, after run 1" in section(report, 2)
    left_out = "the bench sets them): `--metrics`, `--api-key`"
    assert f"left out of the llama-perplexity command (it does not take them, or {left_out}" in (
        section(report, 1)
    )


def test_a_failed_quality_step_is_explained_and_the_speed_stays() -> None:
    oom = "allocating 9216.00 MiB on device 0: cudaMalloc failed: out of memory"
    lines = (f"0.01.204.118 E ggml_backend_cuda_buffer_type_alloc_buffer: {oom}",)
    failed = quality(
        "kld-q4_0.txt",
        status="failed",
        reason="ggml_backend_cuda_buffer_type_alloc_buffer: allocating 9216.00 MiB on device 0: "
        "cudaMalloc failed: out of memory (exit status 1)",
        ppl=None,
        kld=None,
        log_lines=lines,
    )
    record = with_quality(seed_record(), failed)
    report = render_report(record)
    first = section(report, 1)
    assert "| **Status** | ✅ Stable |" in first  # the speed's
    assert "| **Status** | ❌ Failed |" in first  # the quality's
    assert "- ggml_backend_cuda_buffer_type_alloc_buffer: allocating 9216.00 MiB" in first
    assert "```\n" + lines[0] + "\n```" in first
    assert "- full llama-perplexity log: `bench-x/logs/llama-perplexity.log`" in first
    assert summary_table(record)[2].endswith("| failed | ✅ Stable |")


def test_a_failed_baseline_is_said_in_the_header() -> None:
    baseline = baseline_record(
        Path("q/baseline.kld"), status="failed", reason="not enough disk", ppl=None
    )
    record = quality_seed().model_copy(update={"quality_baseline": baseline})
    assert "**Quality baseline:** `small.gguf`: ❌ failed: not enough disk; PPL only  \n" in (
        render_report(record)
    )


def test_a_report_without_quality_has_no_quality() -> None:
    report = render_report(seed_record())
    assert "Quality" not in report
    assert "Quality" not in summary_table(seed_record())[0]


# --- bench compare ---


def quality_pair() -> tuple[BenchRecord, BenchRecord]:
    return (
        with_quality(iq3(), quality("kld-q8_0.txt")),
        with_quality(q2(), quality("kld-q4_0.txt")),
    )


def test_golden_comparison_with_quality() -> None:
    check_golden("bench_compare_quality.md", compare_markdown(*quality_pair()))


def test_compare_fills_the_quality_column_and_the_goal_sentence() -> None:
    text = compare_markdown(*quality_pair())
    header, *rows = table(text)
    assert header[-3:] == ["KV cache (MiB)", "Quality", "Status"]
    assert [row[-2] for row in rows[:3]] == [
        "KLD 0.000020 ± 0.000000, PPL 376.3019 ± 5.7252",
        "KLD 0.003468 ± 0.000031, PPL 372.9810 ± 5.8160",
        "KLD +0.003448 (significant); PPL -0.9 % (within noise)",
    ]
    # Measured apart from the server: shown beside a run that did not load, too.
    assert rows[-3][-2:] == [
        "KLD 0.000020 ± 0.000000, PPL 376.3019 ± 5.7252",
        "❌ Not stable: exited with status 1: out of memory",
    ]
    names = "Qwen3-Coder-Next-REAP-40B-A3B-Q2_K_XL vs Qwen3-Coder-Next-REAP-40B-A3B.i1-IQ3_M"
    assert f"\n**{names}:** its speed is mixed" in text


def test_compare_without_quality_is_as_before() -> None:
    text = compare_markdown(iq3(), q2())
    assert "Quality" not in text
    assert "goal" not in compare_data(iq3(), q2())


def test_the_json_comparison_carries_the_quality_and_the_goal() -> None:
    data = compare_data(*quality_pair())
    context = data["contexts"][0]
    judged = context["quality"]
    assert judged["figure"] == "KLD"
    assert judged["kld"]["verdict"] == "significant"
    assert judged["kld"]["better"] == "A"
    assert judged["kld"]["a"] == {"value": 0.00002, "error": 0.0}
    assert judged["ppl"]["verdict"] == "within noise"
    assert judged["a"]["kld"] == {"value": 0.00002, "error": 0.0}  # the whole record
    assert judged["b"]["dropped_options"] == ["--metrics", "--api-key"]
    goal = data["goal"]
    assert goal["speed"] == {
        "faster": 1, "slower": 1, "within_noise": 2, "unknown": 2, "disturbed": False
    }  # fmt: skip
    assert goal["quality"]["b"] == {"value": 0.003468, "error": 0.000031}
    assert goal["sentence"].startswith("**Qwen3-Coder-Next-REAP-40B-A3B-Q2_K_XL vs ")


# --- the chart ---


def test_quality_points_place_each_run_by_speed_and_kld() -> None:
    a, b = quality_pair()
    points = quality_points([a, b])
    first = points[0]
    assert (first.label, first.test, first.kind, first.figure) == (
        "Qwen3-Coder-Next-REAP-40B-A3B.i1-IQ3_M 32k", "pp512", "prompt", "KLD"
    )  # fmt: skip
    assert first.speed == pytest.approx(100.0)
    assert (first.value, first.error) == (0.000020, 0.0)
    # Every run with speed: 3 of A's (the 256k one did not load), 5 of B's; PP and TG each.
    assert len(points) == 2 * (3 + 5)
    assert {p.value for p in points if p.label.startswith("Qwen3-Coder-Next-REAP-40B-A3B-Q2")} == {
        0.003468
    }


def test_without_kld_everywhere_the_chart_shows_ppl() -> None:
    a = with_quality(iq3(), quality("ppl-q4_0.txt"))
    b = with_quality(q2(), quality("kld-q4_0.txt"))
    assert {p.figure for p in quality_points([a, b])} == {"PPL"}
    assert quality_points([iq3()]) == []


def test_the_quality_chart_is_a_private_png(tmp_path: Path) -> None:
    path = tmp_path / "quality.png"
    write_quality_chart(list(quality_pair()), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_runs_keep_their_quality_through_the_json(tmp_path: Path) -> None:
    record = quality_seed()
    record.save(tmp_path / "r.json")
    loaded = load(tmp_path / "r.json")
    assert loaded == record
    run: RunRecord = loaded.runs[0]
    assert run.quality is not None and run.quality.kld is not None
    assert math.isclose(run.quality.kld.value, 0.004211)


# --- the README's quality comparison: real runs, rendered from their JSON ---

ROOT = Path(__file__).parent.parent
SHIPPED = ROOT / "docs" / "bench" / "quality"
VARIANTS = ("q8_0", "q4_0", "q4_0-kv-q4_0")


def readme_row(record: BenchRecord) -> str:
    """A row of the README's table, from the record's samples and quality, by hand."""
    (run,) = record.runs
    q = run.quality
    assert q is not None and q.kld is not None and q.same_top_percent is not None and q.ppl
    speeds: dict[str, list[float]] = {}
    for sample in run.samples:
        speeds.setdefault(sample.kind, []).append(sample.tokens / sample.seconds)
    pp, tg = (
        f"{statistics.fmean(v):.2f} ± {statistics.stdev(v):.2f}"
        for v in (speeds["prompt"], speeds["generation"])
    )
    assert run.kv is not None and run.kv.bytes is not None
    cells = [
        record.label, pp, tg, f"{run.kv.bytes / 2**20:.1f} MiB",
        f"{q.kld.value:.6f} ± {q.kld.error:.6f}", f"{q.kld_p99:.6f}",
        f"{q.same_top_percent.value:.3f} ± {q.same_top_percent.error:.3f} %",
        f"{q.ppl.value:.4f} ± {q.ppl.error:.4f}",
    ]  # fmt: skip
    return "| " + " | ".join(cells) + " |"


def test_the_readme_quality_table_is_what_its_results_render() -> None:
    readme = (ROOT / "README.md").read_text()
    records = [load(SHIPPED / name / "results.json") for name in VARIANTS]
    for name, record in zip(VARIANTS, records, strict=True):
        assert (SHIPPED / name / "report.md").read_text() == render_report(record)
        assert readme_row(record) in readme
        assert [r.status for r in record.runs] == ["stable"]
        assert not record.runs[0].disturbed
    q8, q4, cache = records
    for a, b, name in ((q8, q4, "compare.md"), (q4, cache, "compare-cache.md")):
        text = compare_markdown(a, b)
        assert (SHIPPED / name).read_text() == text
        goal = next(line for line in text.splitlines() if line.startswith("**"))
        assert goal in readme
    klds = []
    for record in records:
        measured = bench_quality(record)
        assert measured is not None and measured.kld is not None
        klds.append(measured.kld.value)
    assert 0 < klds[0] < klds[1] < klds[2]
    assert (SHIPPED / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
