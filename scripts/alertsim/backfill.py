"""TSDB blocks made by promtool: the scraped samples from an OpenMetrics file, and recording
rules evaluated over them by a running Prometheus, one dependency layer at a time."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import yaml

from alertsim.group_offset import RULES_FILE, group_name_for_offset

# Backfilling 30 days of samples takes seconds; the margin is for a loaded 2-core CI machine.
PROMTOOL_TIMEOUT_S: Final = 600
_STDERR_TAIL_CHARS: Final = 3000
# promtool's block ranges (tsdb.ExponentialBlockRanges(2h, 10, 3)): --max-block-duration picks
# the largest one not above it.
_BLOCK_RANGES_H: Final = tuple(2 * 3**power for power in range(10))
# Prometheus refuses range queries of more points than this, and promtool asks for a whole
# block's evaluations in one query.
_MAX_POINTS_PER_QUERY: Final = 11_000


class PromtoolError(RuntimeError):
    """promtool failed or timed out."""


@dataclass(frozen=True)
class RecordingRule:
    record: str
    expr: str
    labels: dict[str, str] = field(default_factory=dict)


def backfill_openmetrics(promtool: str, openmetrics: Path, data_dir: Path) -> None:
    """Write the samples of `openmetrics` as blocks into `data_dir`."""
    # One block for all of it: promtool reads the whole input once per block it writes, and
    # Prometheus answers faster from few blocks.
    longest = f"{_BLOCK_RANGES_H[-1]}h"
    run_promtool(
        promtool,
        "tsdb", "create-blocks-from", f"--max-block-duration={longest}",
        "openmetrics", str(openmetrics), str(data_dir),
    )  # fmt: skip


def dependency_layers(rules: Sequence[RecordingRule]) -> list[list[RecordingRule]]:
    """The rules in layers, each reading only series recorded by the layers before it."""
    recorders: dict[str, list[int]] = {}
    for index, rule in enumerate(rules):
        recorders.setdefault(rule.record, []).append(index)
    layer: dict[int, int] = {}

    def layer_of(index: int, path: tuple[int, ...]) -> int:
        if index in path:
            cycle = " -> ".join(rules[i].record for i in (*path, index))
            raise ValueError(f"recording rules read each other in a cycle: {cycle}")
        if index not in layer:
            inputs = [
                i
                for name, indexes in recorders.items()
                if _names_metric(rules[index].expr, name)
                for i in indexes
            ]
            layer[index] = 1 + max((layer_of(i, (*path, index)) for i in inputs), default=-1)
        return layer[index]

    layers: list[list[RecordingRule]] = []
    for index, rule in enumerate(rules):
        level = layer_of(index, ())
        layers += [[] for _ in range(level + 1 - len(layers))]
        layers[level].append(rule)
    return layers


def record_layer(
    promtool: str,
    rules: Sequence[RecordingRule],
    *,
    url: str,
    start_s: int,
    end_s: int,
    interval_s: int,
    workdir: Path,
) -> list[Path]:
    """Evaluate `rules` through the Prometheus at `url` at start_s + k * interval_s <= end_s,
    and return the blocks written under `workdir`."""
    # Puts promtool's evaluations at start_s + k * interval_s, where the alerts look.
    group_name = group_name_for_offset(start_s * 10**9, interval_s * 10**9)
    flags = [
        f"--url={url}", f"--start={start_s}", f"--end={end_s}", f"--eval-interval={interval_s}s"
    ]  # fmt: skip

    def record(index: int) -> list[Path]:
        rule_dir = workdir / f"rule-{index}"
        rule_dir.mkdir(parents=True)
        group = {"name": group_name, "rules": [_rule_entry(rules[index])]}
        (rule_dir / RULES_FILE).write_text(yaml.safe_dump({"groups": [group]}, sort_keys=False))
        output = rule_dir / "blocks"
        run_promtool(
            promtool,
            "tsdb", "create-blocks-from", f"--max-block-duration={_block_range(interval_s)}",
            "rules", *flags, f"--output-dir={output}", RULES_FILE,
            cwd=rule_dir,
        )  # fmt: skip
        return [path.parent for path in output.glob("*/meta.json")]

    # One promtool per rule, as many at once as there are cores: Prometheus evaluates each
    # range query on one core, and a rule over weeks of samples can take a minute.
    with ThreadPoolExecutor(max_workers=len(os.sched_getaffinity(0))) as pool:
        return sorted(block for blocks in pool.map(record, range(len(rules))) for block in blocks)


def move_blocks(blocks: Sequence[Path], data_dir: Path) -> None:
    for block in blocks:
        shutil.move(block, data_dir / block.name)


def run_promtool(promtool: str, *args: str, cwd: Path | None = None) -> str:
    """Run promtool and return its output; raise PromtoolError with its stderr if it fails."""
    command = " ".join([promtool, *args])
    try:
        result = subprocess.run(
            [promtool, *args],
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=PROMTOOL_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise PromtoolError(f"{command} took over {PROMTOOL_TIMEOUT_S} s") from exc
    if result.returncode != 0:
        tail = (result.stdout + result.stderr)[-_STDERR_TAIL_CHARS:]
        raise PromtoolError(f"{command} exited with status {result.returncode}:\n{tail}")
    return result.stdout


def _rule_entry(rule: RecordingRule) -> dict[str, object]:
    entry: dict[str, object] = {"record": rule.record, "expr": rule.expr}
    if rule.labels:
        entry["labels"] = rule.labels
    return entry


def _names_metric(expr: str, name: str) -> bool:
    # Textual, and so cautious: a label value spelled like the metric also counts as a read,
    # which at worst puts a rule one layer later than it needs.
    return re.search(rf"(?<![\w:]){re.escape(name)}(?![\w:])", expr) is not None


def _block_range(interval_s: int) -> str:
    fitting = [h for h in _BLOCK_RANGES_H if h * 3600 // interval_s <= _MAX_POINTS_PER_QUERY]
    if not fitting:
        raise ValueError(f"an evaluation interval of {interval_s} s is too short for promtool")
    return f"{fitting[-1]}h"
