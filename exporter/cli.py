"""Command line: `run` (the daemon, the default), `probe` (one round, printed), `bench`, and
`healthcheck` (does this host's daemon answer /healthz: a container's HEALTHCHECK).

Flags follow the Prometheus convention (`--probe.interval`, `--log.level`, `--config.file`)
and are built from the table of settings (`exporter.config.flags`); the spellings of earlier
releases still work, with a warning. `bench` is imported only when asked for: the daemon never
loads it or what it needs.
"""

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
from exporter.config import Config, ConfigError, Target
from exporter.config.flags import SETTINGS, Setting
from exporter.config.resolved import ModelRules
from exporter.config.settings import ENV_PREFIX, load_config
from exporter.llama.redact import redacted_text
from exporter.probe.once import RefusedError, probe_target
from exporter.probe.printout import result_json, round_succeeded, table
from exporter.probe.results import RoundResult
from exporter.safe_argparse import SafeArgumentParser
from exporter.serve import hand_over
from exporter.web import healthcheck
from exporter.web.webconfig import load_web_config

PROG = "llama-speed-exporter"
EXIT_CONFIG = 2
CONFIG_FILE_FLAG = "--config.file"
CONFIG_FILE_ENV = f"{ENV_PREFIX}CONFIG_FILE"
# Earlier spellings of the config file's flag and variable.
_DEPRECATED_CONFIG_FLAG = "--config"
_DEPRECATED_CONFIG_ENV = f"{ENV_PREFIX}CONFIG"
_COMMANDS = ("run", "probe", "healthcheck")


class _Deprecated(argparse.Action):
    """Stores the value of an earlier spelling, and notes it so that it can be warned about."""

    def __init__(self, *args: Any, replacement: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.replacement = replacement

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, values)
        used: list[tuple[str, str]] = getattr(namespace, "_deprecated", [])
        namespace._deprecated = [*used, (option_string or "", self.replacement)]


def _add(
    parser: argparse.ArgumentParser, flag: str, dest: str, text: str, metavar: str,
    *, repeatable: bool = False,
) -> None:  # fmt: skip
    parser.add_argument(
        flag,
        dest=dest,
        action="append" if repeatable else "store",
        default=argparse.SUPPRESS,  # absent flags must not mask the env or the file
        metavar=metavar,
        help=text,
    )


def _add_deprecated(parser: argparse.ArgumentParser, old: str, dest: str, new: str) -> None:
    parser.add_argument(
        old, dest=dest, action=_Deprecated, default=argparse.SUPPRESS, help=argparse.SUPPRESS,
        replacement=new,
    )  # fmt: skip


def _dest(setting: Setting) -> str:
    return "/".join(setting.path)


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    _add(parser, CONFIG_FILE_FLAG, "config_file",
         f"TOML or YAML config file (env {CONFIG_FILE_ENV})", "PATH")  # fmt: skip
    _add_deprecated(parser, _DEPRECATED_CONFIG_FLAG, "config_file", CONFIG_FILE_FLAG)
    parser.add_argument(
        "--config.check",
        dest="config_check",
        action="store_true",
        help="validate the whole configuration, print the resolved targets and plans, exit "
        "0 (valid) or 2",
    )
    for s in SETTINGS:
        _add(parser, s.flag, _dest(s), f"{s.help} (env {s.env})", s.metavar,
             repeatable=s.repeatable)  # fmt: skip
        for old in s.deprecated_flags:
            _add_deprecated(parser, old, _dest(s), s.flag)


def build_parser() -> argparse.ArgumentParser:
    parser = SafeArgumentParser(
        prog=PROG,
        description="Probe llama-server's prompt and generation speed; export it for Prometheus.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    # Subcommands are SafeArgumentParsers too: no abbreviations there either.
    sub = parser.add_subparsers(dest="command", parser_class=SafeArgumentParser)
    run = sub.add_parser("run", help="run the exporter daemon (the default)", allow_abbrev=False)
    _add_settings_flags(run)
    probe = sub.add_parser(
        "probe", help="run the probe plan once, print it, exit 1 on failure", allow_abbrev=False
    )
    _add_settings_flags(probe)
    probe.add_argument("--json", action="store_true", help="print JSON instead of a table")
    probe.add_argument(
        "--model", metavar="NAME",
        help="behind a router or llama-swap, probe this loaded model only (default: every "
        "loaded model); a model that is not loaded is refused, never loaded",
    )  # fmt: skip
    check = sub.add_parser(
        "healthcheck",
        help="exit 0 if this host's daemon answers /healthz (over TLS where the web config "
        "says), else 1",
        allow_abbrev=False,
    )
    # The settings flags too, so that the check finds the daemon where `run` would put it.
    _add_settings_flags(check)
    check.add_argument(
        "--timeout", type=_positive_seconds, default=healthcheck.DEFAULT_TIMEOUT_SECONDS,
        metavar="SECONDS", help="give up after this long (default %(default)g)",
    )  # fmt: skip
    # Listed for --help; `bench` has its own parser (see exporter.bench.command).
    sub.add_parser(
        "bench",
        help="benchmark PP/TG, VRAM and KV cache across context sizes (bench --help)",
        add_help=False,
    )
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for s in SETTINGS:
        if _dest(s) in vars(args):
            node = overrides
            for part in s.path[:-1]:
                node = node.setdefault(part, {})
            node[s.path[-1]] = getattr(args, _dest(s))
    return overrides


def deprecations(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(old spelling, the one to use) for each deprecated flag or variable in use."""
    used = list(getattr(args, "_deprecated", []))
    if os.environ.get(_DEPRECATED_CONFIG_ENV) and not os.environ.get(CONFIG_FILE_ENV):
        used.append((_DEPRECATED_CONFIG_ENV, CONFIG_FILE_ENV))
    return used


def parse(argv: Sequence[str]) -> tuple[argparse.Namespace, Config]:
    """Parse flags and layer them over the environment and the config file."""
    argv = list(argv)
    if not argv or argv[0] not in (*_COMMANDS, "-h", "--help", "--version"):
        argv.insert(0, "run")  # `run` is the default sub-command
    args = build_parser().parse_args(argv)
    config_file = getattr(args, "config_file", None)
    if config_file is None:
        from_env = os.environ.get(CONFIG_FILE_ENV) or os.environ.get(_DEPRECATED_CONFIG_ENV)
        config_file = from_env or None
    path = Path(config_file) if config_file else None
    return args, load_config(_overrides(args), path)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        from exporter.bench import command as bench_command  # noqa: PLC0415 - see the docstring

        return bench_command.main(argv[1:], PROG)
    if argv[:1] == ["healthcheck"]:
        return healthcheck_command(argv)
    try:
        args, config = parse(argv)
    except ConfigError as exc:
        print(f"{PROG}: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    log.configure(config.log_format, config.log_level)
    for old, new in deprecations(args):
        structlog.get_logger().warning("deprecated_flag", used=old, use=new)
    if args.config_check:
        return check_config(config)
    if args.command == "probe":
        return asyncio.run(probe_once(config, as_json=args.json, model=args.model))
    return hand_over(config)  # the daemon's own process from here on: exporter.serve


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def healthcheck_command(argv: Sequence[str]) -> int:
    """`healthcheck`: Docker's statuses, 0 healthy and 1 unhealthy (it reserves 2), so a config
    error is 1 as well; no log lines, only one line on stderr when unhealthy."""
    try:
        args, config = parse(argv)
    except ConfigError as exc:
        print(f"{PROG} healthcheck: config error: {exc}", file=sys.stderr)
        return healthcheck.UNHEALTHY
    return healthcheck.check(config, timeout=args.timeout, prog=PROG)


def check_config(config: Config) -> int:
    """`--config.check`: the web config file too, since the daemon would refuse to start."""
    if config.web_config_file is not None:
        try:
            load_web_config(config.web_config_file)
        except ConfigError as exc:
            print(f"{PROG}: config error: {exc}", file=sys.stderr)
            return EXIT_CONFIG
    import yaml  # noqa: PLC0415 - only here: see exporter.config.settings

    print(yaml.safe_dump(resolved_view(config), sort_keys=False), end="")
    return 0


def resolved_view(config: Config) -> dict[str, Any]:
    """What `--config.check` prints: every target with its plan and schedule, and the rest."""
    return {
        "targets": [
            {
                "name": t.name,
                "url": redacted_text(t.url),
                "api_key": "set" if t.api_key is not None else None,
                "plan": t.plan.as_json(),
                "schedule": t.schedule.as_json(),
                "limits": t.limits.as_json(),
                **({"proxy": redacted_text(t.proxy)} if t.proxy else {}),
                **({"pid_file": str(t.pid_file)} if t.pid_file else {}),
                **({"process_name": t.process_name} if t.process_name else {}),
                **({"mode": t.mode} if t.mode != "auto" else {}),
                **({"models": _model_rules_json(t)} if t.models != ModelRules() else {}),
            }
            for t in config.targets
        ],
        "web": {
            "listen_address": config.listen_address,
            "telemetry_path": config.telemetry_path,
            "config_file": str(config.web_config_file) if config.web_config_file else None,
        },
        "collector": {"gpu": config.gpu},
        "log": {"format": config.log_format, "level": config.log_level},
    }


def _model_rules_json(t: Target) -> dict[str, Any]:
    rules = t.models
    return {
        "include": list(rules.include),
        "exclude": list(rules.exclude),
        "model_probe": {
            p.glob: p.plan.as_json() if p.plan is not None else {"enabled": False}
            for p in rules.plans
        },
    }


async def probe_once(config: Config, *, as_json: bool, model: str | None = None) -> int:
    results: list[RoundResult] = []
    for target in config.targets:
        try:
            results += await probe_target(target, model)
        except RefusedError as exc:
            print(f"{PROG}: probe refused: {exc}", file=sys.stderr)
            return EXIT_CONFIG
    print(json.dumps([result_json(r) for r in results], indent=2) if as_json else table(results))
    return 0 if results and all(round_succeeded(r) for r in results) else 1
