"""The README and the shipped examples say what the code does."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from exporter.bench import command as bench_command
from exporter.bench.record import load
from exporter.bench.report import render_report, summary_table
from exporter.cli import parse
from exporter.collectors import catalogue as metrics
from exporter.config.flags import markdown_table
from exporter.probe.results import (
    CANARY_FAILURE_REASONS,
    DISCARD_REASONS,
    FAILURE_REASONS,
    SKIP_REASONS,
)

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()


def readme_metric_rows() -> dict[str, list[str]]:
    rows = {}
    for line in README.splitlines():
        match = re.match(r"\| `(llama_speed_[a-z_]+)` \| (\w+) \| ([^|]*) \|", line)
        if match:
            rows[match.group(1)] = [match.group(2), match.group(3).strip()]
    return rows


def test_readme_lists_every_metric_with_its_type_and_labels() -> None:
    rows = readme_metric_rows()
    assert set(rows) == {m.exposed_name for m in metrics.CATALOGUE}
    for m in metrics.CATALOGUE:
        kind, labels = rows[m.exposed_name]
        assert kind == m.type, m.name
        assert labels == ", ".join(m.labels), m.name


def test_readme_names_every_reason() -> None:
    for reason in (*FAILURE_REASONS, *SKIP_REASONS, *DISCARD_REASONS, *CANARY_FAILURE_REASONS):
        assert f"`{reason}`" in README, reason


SETTINGS_BEGIN = "<!-- settings table: generated from the declarations, see tests/test_docs.py -->"
SETTINGS_END = "<!-- end of settings table -->"


def test_readme_settings_table_is_generated_from_the_declarations() -> None:
    """Every flag, variable, file key and default, as the code declares them.

    `UPDATE_GOLDEN=1 pytest tests/test_docs.py` rewrites the table after a change."""
    head, begin, rest = README.partition(SETTINGS_BEGIN)
    body, end, tail = rest.partition(SETTINGS_END)
    assert begin and end, "README lacks the settings table markers"
    expected = "\n" + markdown_table()
    if os.environ.get("UPDATE_GOLDEN"):
        (ROOT / "README.md").write_text(head + begin + expected + end + tail)
        return
    assert body == expected, (
        "README settings table is stale: UPDATE_GOLDEN=1 pytest tests/test_docs.py"
    )


@pytest.mark.parametrize("name", ["config.example.yaml"])
def test_shipped_config_examples_load(name: str, monkeypatch: pytest.MonkeyPatch,
                                      tmp_path: Path) -> None:  # fmt: skip
    example = ROOT / "deploy" / name
    text = example.read_text().replace("/etc/llama-speed-exporter/coder.key", str(tmp_path / "k"))
    (tmp_path / "k").write_text("secret\n")
    # The state directory must exist: the example names the shipped deployments' one.
    text = text.replace("/var/lib/llama-speed-exporter", str(tmp_path / "state"))
    (tmp_path / "state").mkdir()
    (tmp_path / name).write_text(text)
    _, config = parse(["--config.file", str(tmp_path / name)])
    assert [t.name for t in config.targets] == ["coder"]
    assert config.targets[0].plan.depths == (0, 16384)
    assert config.storage_path == tmp_path / "state"


def test_readme_bench_example_is_what_its_results_render() -> None:
    """The shipped example report is the real one: rendered from the recorded samples."""
    example = ROOT / "docs" / "bench"
    record = load(example / "results.json")
    assert (example / "report.md").read_text() == render_report(record)
    assert "\n".join(summary_table(record)) in README
    assert (example / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {run.status for run in record.runs} == {"stable"}


def test_bench_doc_lists_every_bench_flag() -> None:
    doc = (ROOT / "docs" / "bench.md").read_text()
    parser = bench_command.build_parser("llama-speed-exporter")
    subcommands = next(a for a in parser._actions if a.dest == "bench_command")
    run = subcommands.choices["run"]  # type: ignore[index]
    flags = {o for action in run._actions for o in action.option_strings if o.startswith("--")}
    missing = {flag for flag in flags - {"--help"} if f"`{flag}" not in doc}
    assert not missing
