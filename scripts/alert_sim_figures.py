"""The alert simulator's figures: every scenario (`alertsim.scenarios`) over many seeds, as a
Markdown table for docs/alerting.md.

    .venv/bin/python scripts/alert_sim_figures.py --seeds 10 --jobs 2

Per scenario: the runs, the alerts that fired (for the steady ones, how many runs had a false
alert), the time to alert from the start of the first round that saw the change (min / median
/ max, minutes), the time to resolve from the first round back at full speed, and the
confirmation rounds per simulated day; then each run that missed an expectation, and the
command. The seeds are `--first-seed` on (default 1001), apart from the seeds the test suite
runs (tests/test_alert_sim.py), so the table speaks of traces the tests have never seen.

The scenarios run in `--jobs` processes; the two 30-day ones take 2-3 minutes each, the rest
seconds. `--json` prints every run's outcome instead of the table, `--json-file PATH` writes
it as well. `--workdir DIR` keeps each run's files (the scrapes, the bands' state,
Prometheus' data) in DIR/<scenario>-<seed>. Exit status 1 when a run missed an expectation,
2 for bad arguments. Needs promtool and prometheus on the PATH (Debian package prometheus).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import shlex
import sys
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Final, NoReturn

ROOT: Final = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import structlog  # noqa: E402
from alertsim.scenarios import (  # noqa: E402
    GENERATION,
    LONG_SCENARIOS,
    MINUTE,
    PROMPT,
    SCENARIOS,
    Outcome,
    by_length,
    quiet_worker,
    run_scenario,
)

from exporter import log as exporter_log  # noqa: E402
from exporter.safe_argparse import SafeArgumentParser  # noqa: E402

log = structlog.get_logger("alert_sim_figures")

FIRST_SEED: Final = 1001
SHORT_ALERT_NAMES: Final = {GENERATION: "TG", PROMPT: "PP"}


class _OneLineParser(SafeArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message}\n")


def _count(text: str) -> int:
    if not text.isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number above 0")
    return int(text)


def parser() -> argparse.ArgumentParser:
    p = _OneLineParser(prog="alert_sim_figures.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=_count, default=10, help="runs per scenario (default 10)")
    p.add_argument(
        "--first-seed", type=int, default=FIRST_SEED, help=f"the first seed (default {FIRST_SEED})"
    )
    p.add_argument("--jobs", type=_count, default=1, help="processes to run in (default 1)")
    p.add_argument(
        "--scenarios", nargs="+", choices=sorted(SCENARIOS), help="only these (default all)"
    )
    p.add_argument("--json", action="store_true", help="print every run's outcome as JSON")
    p.add_argument(
        "--json-file", type=Path, help="also write every run's outcome as JSON to this file"
    )
    p.add_argument("--workdir", type=Path, help="keep each run's files under this directory")
    return p


def run_all(
    names: Sequence[str],
    seeds: Sequence[int],
    *,
    jobs: int,
    workdir: Path | None = None,
    on_outcome: Callable[[list[Outcome]], None] = lambda _: None,
) -> list[Outcome]:
    """Every scenario of `names` with every seed of `seeds`, in `jobs` fresh processes (each
    simulation seeds the `random` of its own process), longest first; in scenario and seed
    order. `on_outcome` gets the outcomes so far after each run."""
    context = multiprocessing.get_context("spawn")  # no fork of a process that has threads
    outcomes: list[Outcome] = []
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=quiet_worker) as pool:
        runs: dict[Future[Outcome], tuple[str, int]] = {}
        for name in by_length(names):
            for seed in seeds:
                work = None if workdir is None else workdir / f"{name}-{seed}"
                if work is not None:
                    work.mkdir(parents=True, exist_ok=True)
                runs[pool.submit(run_scenario, name, seed, work)] = (name, seed)
        for done in as_completed(runs):
            outcome = done.result()
            outcomes.append(outcome)
            log.info(
                "run_done", scenario=outcome.scenario, seed=outcome.seed,
                real_s=round(outcome.real_seconds, 1), problems=list(outcome.problems),
                left=len(runs) - len(outcomes),
            )  # fmt: skip
            on_outcome(outcomes)
    order = {name: i for i, name in enumerate(names)}
    return sorted(outcomes, key=lambda o: (order[o.scenario], o.seed))


def _minutes(values: Iterable[float | None]) -> str:
    """min / median / max in minutes, or - for none."""
    present = sorted(v / MINUTE for v in values if v is not None)
    if not present:
        return "-"
    mid = len(present) // 2
    median = present[mid] if len(present) % 2 else (present[mid - 1] + present[mid]) / 2
    return f"{present[0]:.1f} / {median:.1f} / {present[-1]:.1f}"


def _fired_summary(outcomes: Sequence[Outcome]) -> str:
    """How many runs fired each (alert, severity), expected or not; for a scenario that must
    fire nothing, how many runs had a false alert."""
    runs = len(outcomes)
    expected = SCENARIOS[outcomes[0].scenario].expected
    if not expected.must_fire:
        false_runs = sum(1 for o in outcomes if o.false_alerts)
        names = sorted({e.name for o in outcomes for e in o.false_alerts})
        return f"false alert in {false_runs} of {runs} runs" + (
            f" ({', '.join(names)})" if names else ""
        )
    fired: dict[str, int] = {}
    for o in outcomes:
        for key in sorted({f"{_short(e.name)} {e.severity}" for e in o.alerts}):
            fired[key] = fired.get(key, 0) + 1
    parts = [f"{key} {n}/{runs}" for key, n in sorted(fired.items())]
    false_runs = sum(1 for o in outcomes if o.false_alerts)
    if false_runs:
        parts.append(f"false alert in {false_runs}/{runs}")
    return ", ".join(parts) or "none"


def _short(alert: str) -> str:
    return SHORT_ALERT_NAMES.get(alert, alert)


def _time_to_alert(outcomes: Sequence[Outcome]) -> str:
    keys = [m.key for m in SCENARIOS[outcomes[0].scenario].expected.must_fire]
    if not keys:
        return "-"
    parts = []
    for key in keys:
        alert, severity = key.split("/")
        label = f"{_short(alert)} {severity}" if len(keys) > 1 else ""
        parts.append(f"{label}: {_minutes(o.time_to_fire[key] for o in outcomes)}".lstrip(": "))
    return "; ".join(parts)


def _resolve(outcomes: Sequence[Outcome]) -> str:
    values = [v for o in outcomes for v in o.resolved_after.values()]
    return _minutes(values) if values else "-"


def table(outcomes: Sequence[Outcome], command: str) -> str:
    """The Markdown table, the runs that missed an expectation, and the command."""
    by_scenario: dict[str, list[Outcome]] = {}
    for o in outcomes:
        by_scenario.setdefault(o.scenario, []).append(o)
    lines = [
        "| scenario | what | runs | alerts that fired | time to alert, min (min / median / "
        "max) | resolved after recovery, min | confirmation rounds / day | runs missing an "
        "expectation |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, runs in by_scenario.items():
        scenario = SCENARIOS[name]
        per_day = sum(o.confirmations for o in runs) / sum(o.days for o in runs)
        missed = [o for o in runs if o.problems]
        lines.append(
            f"| {name} | {scenario.summary} | {len(runs)} | {_fired_summary(runs)} | "
            f"{_time_to_alert(runs)} | {_resolve(runs)} | {per_day:.1f} | {len(missed)} |"
        )
    failures = [o for o in outcomes if o.problems]
    if failures:
        lines += ["", "Runs that missed an expectation:", ""]
        lines += [f"* {o.scenario} seed {o.seed}: {'; '.join(o.problems)}" for o in failures]
    seeds = sorted({o.seed for o in outcomes})
    lines += [
        "",
        f"Seeds {seeds[0]}-{seeds[-1]}; time to alert from the start of the first round at or "
        "after the change; produced by:",
        "",
        "```sh",
        command,
        "```",
    ]
    return "\n".join(lines) + "\n"


def _json_text(outcomes: Sequence[Outcome]) -> str:
    return json.dumps([_as_json(o) for o in outcomes], indent=2)


def _as_json(outcome: Outcome) -> dict[str, Any]:
    data = dataclasses.asdict(outcome)
    data.pop("round_starts")  # thousands of numbers, and in the run's files anyway
    data["confirmations_per_day"] = outcome.confirmations_per_day
    return data


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    exporter_log.configure("console", "info")
    names = args.scenarios or list(SCENARIOS)
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    log.info(
        "running", scenarios=names, seeds=f"{seeds[0]}-{seeds[-1]}", jobs=args.jobs,
        long=[n for n in names if n in LONG_SCENARIOS],
    )  # fmt: skip

    def save(outcomes: list[Outcome]) -> None:
        # After every run, so that a run of hours stopped half-way keeps what it found.
        if args.json_file is not None:
            args.json_file.write_text(_json_text(outcomes) + "\n", encoding="utf-8")

    outcomes = run_all(names, seeds, jobs=args.jobs, workdir=args.workdir, on_outcome=save)
    save(outcomes)
    command = shlex.join(
        [".venv/bin/python", "scripts/alert_sim_figures.py", *(argv or sys.argv[1:])]
    )
    if args.json:
        print(_json_text(outcomes))
    else:
        sys.stdout.write(table(outcomes, command))
    return 1 if any(o.problems for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
