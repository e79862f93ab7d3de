"""`llama-speed-exporter bench [run|compare|chart|report]`: flags, outputs and exit statuses."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import signal
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import structlog

from exporter import log
from exporter.bench.chart import ChartUnavailableError, write_chart
from exporter.bench.compare import compare_data, compare_markdown
from exporter.bench.files import make_private_dir, write_private
from exporter.bench.flag_types import int_list, positive
from exporter.bench.launch import ServerCommand, ServerCommandError
from exporter.bench.progress import display
from exporter.bench.quality import BaselineEstimate
from exporter.bench.quality_chart import write_quality_chart
from exporter.bench.quality_flags import add_quality_flags, quality_settings
from exporter.bench.record import BenchFileError, BenchRecord, PlanRecord, load
from exporter.bench.report import render_report, summary_table
from exporter.bench.sweep import Bench, BenchSettings, probe_plans
from exporter.bench.target import RefusedError, choose_at
from exporter.declared import SettingError
from exporter.gpu.nvml import Nvml
from exporter.llama.client import ServerError
from exporter.llama.secret import Secret
from exporter.probe.plan import MeasurePlan
from exporter.safe_argparse import SafeArgumentParser

EXIT_OK: Final = 0
EXIT_NOT_ALL_STABLE: Final = 1
EXIT_USAGE: Final = 2
EXIT_INTERRUPTED: Final = 130  # the shell's convention for a command ended by SIGINT
SUBCOMMANDS: Final = ("run", "compare", "chart", "report")
RESULTS_JSON: Final = "results.json"
REPORT_MD: Final = "report.md"
CHART_PNG: Final = "chart.png"

logger = structlog.get_logger("bench")
# The daemon's declaration of each probe setting; bench takes its defaults from there, except
# the repetitions, which default to llama-bench's 5.
_PLAN_DEFAULTS: Final = MeasurePlan()


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = SafeArgumentParser(
        prog=f"{prog} bench",
        description="Benchmark llama-server's PP and TG speed, VRAM and KV cache across "
        "context sizes, and write a Markdown report, JSON with every sample and a chart.",
    )
    sub = parser.add_subparsers(
        dest="bench_command", required=True, parser_class=SafeArgumentParser
    )
    run = sub.add_parser("run", help="run a bench (the default)")
    mode = run.add_mutually_exclusive_group(required=True)
    mode.add_argument("--target", metavar="URL", help="benchmark this running llama-server")
    mode.add_argument(
        "--server-cmd",
        metavar="CMD",
        help='start this server once per --ctx value, e.g. "llama-server -m M.gguf -ngl 99"',
    )
    run.add_argument(
        "--ctx",
        type=int_list(1),
        metavar="LIST",
        help="context sizes (-c) to launch, e.g. 32768,65536",
    )
    run.add_argument("--api-key-file", type=Path, help="file holding the --target server's API key")
    run.add_argument(
        "--model",
        metavar="NAME",
        help="with --target, behind a router or llama-swap: measure this loaded model (default: "
        "the one loaded); a model that is not loaded is refused, never loaded",
    )
    run.add_argument(
        "-p",
        "--prompt-tokens",
        type=int_list(1),
        default=(_PLAN_DEFAULTS.prompt_tokens,),
        metavar="LIST",
        help="PP sizes (default 512)",
    )
    run.add_argument(
        "-n",
        "--generation-tokens",
        type=int_list(2),
        default=(_PLAN_DEFAULTS.generation_tokens,),
        metavar="LIST",
        help="TG sizes (default 128)",
    )
    run.add_argument(
        "-d",
        "--depths",
        type=int_list(0),
        default=_PLAN_DEFAULTS.depths,
        metavar="LIST",
        help="tokens already in context, e.g. 0,4096,16384 (default 0)",
    )
    run.add_argument(
        "-r", "--repetitions", type=positive(int), default=5, help="samples per test (default 5)"
    )
    run.add_argument("--no-warmup", action="store_true", help="skip the unmeasured warm-up request")
    run.add_argument(
        "--probe-timeout",
        type=positive(float),
        default=1800.0,
        metavar="S",
        help="seconds one run's probes may take (default 1800)",
    )
    run.add_argument(
        "--load-timeout",
        type=positive(float),
        default=600.0,
        metavar="S",
        help="seconds a launched server may take to load (default 600)",
    )
    run.add_argument("--label", help="name of this bench in reports (default: the model)")
    run.add_argument(
        "-o", "--out", type=Path, metavar="DIR", help="output directory (default bench-<UTC time>)"
    )
    run.add_argument("--no-gpu", action="store_true", help="do not read GPUs through NVML")
    run.add_argument("--no-chart", action="store_true", help="do not draw chart.png")
    add_quality_flags(run)
    # The daemon's spelling first; the dashed one of earlier releases still works.
    run.add_argument(
        "--log.format", "--log-format", dest="log_format", choices=("console", "json"),
        default="console",
    )  # fmt: skip
    run.add_argument(
        "--log.level", "--log-level", dest="log_level",
        choices=("debug", "info", "warning", "error"),
    )  # fmt: skip
    compare = sub.add_parser(
        "compare", allow_abbrev=False, help="compare two bench results, per context"
    )
    compare.add_argument("a", type=Path, metavar="A.json")
    compare.add_argument("b", type=Path, metavar="B.json")
    compare.add_argument(
        "--format",
        choices=("markdown", "json"),
        default="markdown",
        help="the table (default), or the same comparison as JSON",
    )
    compare.add_argument("-o", "--out", type=Path, metavar="FILE", help="write it here")
    report = sub.add_parser(
        "report", allow_abbrev=False, help="render a bench result's Markdown report again"
    )
    report.add_argument("result", type=Path, metavar="RESULT.json")
    report.add_argument("-o", "--out", type=Path, metavar="FILE", help="write Markdown here")
    chart = sub.add_parser(
        "chart", allow_abbrev=False, help="draw PP and TG against context for bench results"
    )
    chart.add_argument("results", type=Path, nargs="+", metavar="RESULT.json")
    chart.add_argument("-o", "--out", type=Path, default=Path(CHART_PNG), metavar="FILE")
    chart.add_argument(
        "--quality",
        action="store_true",
        help="draw each run's mean KL divergence (or PPL) against its PP and TG speed",
    )
    return parser


def main(argv: Sequence[str], prog: str) -> int:
    argv = list(argv)
    if not argv or argv[0] not in (*SUBCOMMANDS, "-h", "--help"):
        argv.insert(0, "run")
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.bench_command == "compare":
        return _compare(args)
    if args.bench_command == "chart":
        return _chart(args)
    if args.bench_command == "report":
        return _report(args)
    try:
        settings = _settings(args)
    except (ServerCommandError, OSError, ValueError) as exc:
        parser.error(str(exc))
    except RefusedError as exc:
        # Not a mistake in the flags: the target's state. One line, and nothing was written.
        print(f"{prog} bench: refused: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return _run(args, settings)


# The flag each MeasurePlan field of a bench comes from, to name it in an error.
_PLAN_FLAGS: Final = {
    "timeout": "--probe-timeout",
    "prompt_tokens": "-p/--prompt-tokens",
    "generation_tokens": "-n/--generation-tokens",
    "depths": "-d/--depths",
    "repetitions": "-r/--repetitions",
}


def _settings(args: argparse.Namespace) -> BenchSettings:
    if args.target is None and args.ctx is None:
        ctxs: tuple[int | None, ...] = (None,)
    elif args.target is not None and args.ctx is not None:
        raise ValueError("--ctx needs --server-cmd: a running server's context is its own")
    else:
        ctxs = args.ctx or (None,)
    if args.model is not None and args.target is None:
        raise ValueError("--model needs --target: --server-cmd runs the model its command loads")
    command = None
    if args.server_cmd is not None:
        command = ServerCommand.parse(args.server_cmd)
        command.program()  # a typo fails now, not once per context
    api_key = None
    if args.api_key_file is not None:
        api_key = Secret(args.api_key_file.read_text(encoding="utf-8").strip())
    out = args.out or Path(f"bench-{datetime.now(UTC):%Y%m%d-%H%M%S}")
    plan = PlanRecord(
        prompt_tokens=args.prompt_tokens,
        generation_tokens=args.generation_tokens,
        depths=args.depths,
        repetitions=args.repetitions,
        warmup=not args.no_warmup,
    )
    quality, estimate = quality_settings(args, out)
    settings = BenchSettings(
        plan=plan,
        probe_timeout=args.probe_timeout,
        load_timeout=args.load_timeout,
        log_dir=out / "logs",
        label=args.label,
        command=command,
        ctxs=ctxs,
        target=args.target,
        model=args.model,
        api_key=api_key,
        quality=quality,
    )
    _check_plans(settings)
    if settings.target is not None:
        settings = _choose_model(settings, settings.target)
    # Last: a refused command leaves no output directory behind.
    make_private_dir(out)
    args.out = out
    args.quality_estimate = estimate
    return settings


def _choose_model(settings: BenchSettings, url: str) -> BenchSettings:
    """The target's model, chosen before the output directory exists: a model that is not
    loaded, or a choice bench cannot make, is refused here, before any request names a model.

    Raises `RefusedError`, or `SeveralModelsError` (a usage error)."""
    try:
        chosen = asyncio.run(
            choose_at(url, settings.api_key, settings.model, timeout=settings.probe_timeout)
        )
    except ServerError:
        return settings  # the run reads the list again, and records why it cannot
    if chosen.model is None:
        return settings
    # Named for the run: it measures this model, even if another is loaded meanwhile.
    return dataclasses.replace(settings, model=chosen.model.name)


def _check_plans(settings: BenchSettings) -> None:
    """The rounds the runs will measure, built now: a value the probes refuse (past one of
    MeasurePlan's bounds) is a usage error naming its flag, not a traceback after a load."""
    try:
        probe_plans(settings, settings.plan.depths)
    except SettingError as exc:
        field = exc.loc.partition(".")[0]
        raise ValueError(f"{_PLAN_FLAGS.get(field, field)}: {exc.problem}") from None


def _interrupt_on_sigterm() -> None:
    # SIGTERM (systemd, docker stop, kill) ends a bench as Ctrl-C does: server stopped,
    # partial results written. Re-raising as SIGINT lets asyncio cancel a running probe.
    signal.signal(signal.SIGTERM, lambda *_: os.kill(os.getpid(), signal.SIGINT))


def _run(args: argparse.Namespace, settings: BenchSettings) -> int:
    out: Path = args.out
    estimate: BaselineEstimate | None = args.quality_estimate
    if estimate is not None:
        # Said before it is written: on a real model the file takes gigabytes.
        print(f"bench: quality: {estimate.text()}", file=sys.stderr)
    make_private_dir(settings.log_dir)
    interactive = sys.stderr.isatty() and args.log_format == "console"
    progress = display(interactive=interactive)
    nvml = None if args.no_gpu else Nvml()

    def write(record: BenchRecord) -> None:
        record.save(out / RESULTS_JSON)
        write_private(out / REPORT_MD, render_report(record, json_name=RESULTS_JSON))

    _interrupt_on_sigterm()
    with progress:
        # Configured inside the display, so that log lines print above its bars.
        log.configure(args.log_format, args.log_level or ("warning" if interactive else "info"))
        try:
            record = Bench(settings, nvml=nvml, observer=progress, on_update=write).execute()
        except KeyboardInterrupt:
            # Between runs, or a second Ctrl-C while a server stops: every finished run is
            # already written, and the server it started was stopped on the way out.
            logger.warning("bench_interrupted", results=str(out / RESULTS_JSON))
            return EXIT_INTERRUPTED
        finally:
            if nvml is not None:
                nvml.close()
    if not args.no_chart and any(run.tests for run in record.runs):
        try:
            write_chart([record], out / CHART_PNG)
        except ChartUnavailableError as exc:
            logger.warning("chart_skipped", reason=str(exc))
    print("\n".join(summary_table(record)))
    print(f"\nReport: {out / REPORT_MD}\nSamples: {out / RESULTS_JSON}")
    if record.interrupted:
        return EXIT_INTERRUPTED
    stable = record.runs and all(run.status == "stable" for run in record.runs)
    # Asked for and not measured counts as a failure too, so that a script notices.
    baseline = record.quality_baseline
    quality_failed = any(
        run.quality.status != "measured" for run in record.runs if run.quality
    ) or (baseline is not None and baseline.status == "failed")
    return EXIT_OK if stable and not quality_failed else EXIT_NOT_ALL_STABLE


def _compare(args: argparse.Namespace) -> int:
    try:
        a, b = load(args.a), load(args.b)
    except BenchFileError as exc:
        print(f"bench compare: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.format == "json":
        text = json.dumps(compare_data(a, b), indent=2, ensure_ascii=False) + "\n"
    else:
        text = compare_markdown(a, b)
    return _emit(text, args.out)


def _report(args: argparse.Namespace) -> int:
    try:
        text = render_report(load(args.result), json_name=args.result.name)
    except BenchFileError as exc:
        print(f"bench report: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return _emit(text, args.out)


def _emit(text: str, out: Path | None) -> int:
    if out is not None:
        write_private(out, text)
    else:
        print(text, end="")
    return EXIT_OK


def _chart(args: argparse.Namespace) -> int:
    draw = write_quality_chart if args.quality else write_chart
    try:
        draw([load(path) for path in args.results], args.out)
    except (BenchFileError, ChartUnavailableError) as exc:
        print(f"bench chart: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(args.out)
    return EXIT_OK
