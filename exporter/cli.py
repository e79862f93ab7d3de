"""Command line: `run` (the daemon, the default) and `probe` (one round, printed)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog

from exporter import __version__, log
from exporter.bench import command as bench_command
from exporter.bench.record import SampleRecord
from exporter.bench.stats import summarize
from exporter.config import ENV_PREFIX, Config, ConfigError, load_config
from exporter.daemon import Daemon
from exporter.llama.client import LlamaClient
from exporter.probe.results import RoundResult
from exporter.probe.runner import ProbeRunner

PROG = "llama-speed-exporter"
EXIT_CONFIG = 2

# flag -> path in the settings; every one is also LLAMA_SPEED_<PATH joined by _, upper-cased>.
_FLAGS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("--target", ("target",), "llama-server URL to probe (repeatable; default %s)"),
    ("--api-key-file", ("api_key_file",), "file holding the API key for --target servers"),
    ("--web.listen-address", ("web", "listen_address"), "address to serve metrics on"),
    ("--web.telemetry-path", ("web", "telemetry_path"), "path of the metrics endpoint"),
    ("--web.config.file", ("web", "config_file"), "web config file: TLS and basic auth"),
    ("--probe-interval", ("probe", "interval"), "seconds between probe rounds"),
    ("--probe-timeout", ("probe", "timeout"), "seconds one probe round may take"),
    ("--probe-jitter", ("probe", "jitter"), "random seconds added to each interval"),
    ("--probe-discovery-interval", ("probe", "discovery_interval"), "seconds between /props reads"),
    ("--probe-prompt-tokens", ("probe", "prompt_tokens"), "fresh tokens per PP sample"),
    ("--probe-generation-tokens", ("probe", "generation_tokens"), "tokens per TG sample"),
    ("--probe-depths", ("probe", "depths"), "context depths, e.g. 0,4096,16384"),
    ("--probe-repetitions", ("probe", "repetitions"), "samples per depth and round"),
    ("--probe-slot", ("probe", "slot"), "slot id for probes (default: the highest)"),
    ("--probe-duty-budget", ("probe", "duty_budget"), "max share of wall time for probes"),
    ("--collector.gpu", ("collector", "gpu"), "read GPUs through NVML: true or false"),
    ("--log-format", ("log", "format"), "json or console"),
    ("--log-level", ("log", "level"), "debug, info, warning or error"),
)


def env_name(path: tuple[str, ...]) -> str:
    return ENV_PREFIX + "_".join(path).upper()


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=argparse.SUPPRESS,
        help=f"TOML or YAML config file (env {ENV_PREFIX}CONFIG)",
    )
    for flag, path, text in _FLAGS:
        parser.add_argument(
            flag,
            dest="/".join(path),
            action="append" if flag == "--target" else "store",
            default=argparse.SUPPRESS,  # absent flags must not mask the env or the file
            metavar=path[-1].upper(),
            help=f"{text.replace('%s', 'http://127.0.0.1:8080')} (env {env_name(path)})",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Probe llama-server's prompt and generation speed; export it for Prometheus.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="run the exporter daemon (the default)")
    _add_settings_flags(run)
    probe = sub.add_parser("probe", help="run the probe plan once, print it, exit 1 on failure")
    _add_settings_flags(probe)
    probe.add_argument("--json", action="store_true", help="print JSON instead of a table")
    # Listed for --help; `bench` has its own parser (see exporter.bench.command).
    sub.add_parser(
        "bench",
        help="benchmark PP/TG, VRAM and KV cache across context sizes (bench --help)",
        add_help=False,
    )
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for _, path, _ in _FLAGS:
        key = "/".join(path)
        if key in vars(args):
            node = overrides
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = getattr(args, key)
    return overrides


def parse(argv: Sequence[str]) -> tuple[argparse.Namespace, Config]:
    """Parse flags and layer them over the environment and the config file."""
    argv = list(argv)
    if not argv or argv[0] not in ("run", "probe", "-h", "--help", "--version"):
        argv.insert(0, "run")  # `run` is the default sub-command
    args = build_parser().parse_args(argv)
    config_file = getattr(args, "config", None)
    if config_file is None and os.environ.get(f"{ENV_PREFIX}CONFIG"):
        config_file = Path(os.environ[f"{ENV_PREFIX}CONFIG"])
    return args, load_config(_overrides(args), config_file)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        return bench_command.main(argv[1:], PROG)
    try:
        args, config = parse(argv)
    except ConfigError as exc:
        print(f"{PROG}: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    log.configure(config.log_format, config.log_level)
    if args.command == "probe":
        return asyncio.run(probe_once(config, as_json=args.json))
    return run_daemon(config)


def run_daemon(config: Config) -> int:
    try:
        daemon = Daemon(config)
    except ConfigError as exc:  # the web config file, read when the daemon is set up
        print(f"{PROG}: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        structlog.get_logger().error(
            "cannot_listen", address=config.listen_address, error=exc.strerror or str(exc)
        )
        return 1
    asyncio.run(daemon.run())
    return 0


async def probe_once(config: Config, *, as_json: bool) -> int:
    results: list[RoundResult] = []
    for target in config.targets:
        client = LlamaClient(target.url, target.api_key, timeout=target.plan.timeout)
        try:
            runner = ProbeRunner(target.name, client, target.plan)
            results.append(await runner.run_round(ignore_budget=True))
        finally:
            await client.aclose()
    print(json.dumps([result_json(r) for r in results], indent=2) if as_json else table(results))
    return 0 if all(round_succeeded(r) for r in results) else 1


def round_succeeded(result: RoundResult) -> bool:
    return bool(result.outcomes) and all(o.succeeded for o in result.outcomes.values())


def result_json(result: RoundResult) -> dict[str, Any]:
    server = result.server
    return {
        "target": result.target,
        "ok": round_succeeded(result),
        "model": server.model if server else None,
        "ctx": server.ctx if server else None,
        "quant": server.quant if server else None,
        "build": server.build if server else None,
        "duration_seconds": result.duration,
        "skipped": list(result.skips),
        "failures": {k: o.failure for k, o in result.outcomes.items() if o.failure},
        "discarded": {k: list(o.discards) for k, o in result.outcomes.items() if o.discards},
        "detail": result.detail,
        "samples": [
            {
                "kind": s.kind,
                "depth": s.depth,
                "tokens": s.tokens,
                "seconds": s.seconds,
                "tokens_per_second": s.tokens_per_second,
                "time_to_first_token_seconds": s.time_to_first_token,
                "timings": vars(s.timings),
            }
            for s in result.samples
        ],
    }


def table(results: list[RoundResult]) -> str:
    """llama-bench's layout: one row per test, mean and sample standard deviation over reps."""
    lines = []
    for r in results:
        server = r.server
        head = f"{r.target}: " + (
            f"{server.model} ({server.quant}), ctx {server.ctx}, build {server.build}"
            if server
            else "server unavailable"
        )
        lines += [head, f"{'test':<18}{'t/s':>22}{'TTFT ms':>10}"]
        for test in summarize(SampleRecord.of(s) for s in r.samples):
            figure = f"{test.mean:.2f} ± {test.sd or 0.0:.2f}"
            ttft = test.ttft_mean_seconds
            ttft_ms = "" if ttft is None else f"{ttft * 1e3:.1f}"
            lines.append(f"{test.name:<18}{figure:>22}{ttft_ms:>10}")
        status = "ok" if round_succeeded(r) else "FAILED"
        problems = [*r.skips, *(f"{k}: {o.failure}" for k, o in r.outcomes.items() if o.failure)]
        problems += [f"{k}: discarded ({', '.join(o.discards)})" for k, o in r.outcomes.items()
                     if o.discards]  # fmt: skip
        if problems:
            status += " (" + ", ".join(problems) + (f"; {r.detail}" if r.detail else "") + ")"
        lines += [f"status: {status}", ""]
    return "\n".join(lines).rstrip()
