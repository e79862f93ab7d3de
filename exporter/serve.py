"""The daemon's own process: it runs a resolved configuration handed over by the command line.

Resolving the settings takes pydantic-settings, the config file's parser and the table of
flags: some 7 MiB of code that the daemon needs for a second and would then carry for months.
So `run` resolves and checks everything (a bad setting still exits 2 with one line), writes
the result to an anonymous in-memory file, and replaces itself (`exec`: the same pid, so
systemd, Docker and a shell's `kill` see one process) with `python -m exporter.serve FD`,
which reads it back and runs the daemon without ever importing that code.
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Final, NoReturn

import structlog

from exporter import log
from exporter.config import Config, ConfigError
from exporter.config.resolved import config_from_json, config_to_json
from exporter.daemon import SHUTDOWN_DEADLINE_SECONDS, Daemon

PROG: Final = "llama-speed-exporter"
EXIT_CONFIG: Final = 2
# A configuration is a few KiB a target; anything larger was not written by `hand_over`.
_MAX_CONFIG_BYTES: Final = 16 * 1024 * 1024


def hand_over(config: Config) -> NoReturn:
    """Replace this process with the daemon's own, running `config`."""
    fd = os.memfd_create("llama-speed-exporter-config", 0)  # no CLOEXEC: exec passes it on
    os.write(fd, config_to_json(config).encode())
    os.lseek(fd, 0, os.SEEK_SET)
    os.set_inheritable(fd, True)
    sys.stdout.flush()
    sys.stderr.flush()
    env = dict(os.environ)
    # glibc gives each thread that allocates an arena of its own, up to eight per core, and
    # keeps their pages: the web server's workers would each hold one. The daemon's threads
    # mostly wait, so two arenas serve them as fast. An operator's own setting wins.
    env.setdefault("MALLOC_ARENA_MAX", "2")
    # This same interpreter, with arguments of our own making: no shell, nothing to quote.
    args = [sys.executable, "-m", "exporter.serve", str(fd)]
    os.execve(sys.executable, args, env)  # noqa: S606


def read_handed_over(fd: int) -> Config:
    # Read and closed at once: the API keys in it stay in this process's memory only.
    with os.fdopen(fd, "rb") as handed:
        return config_from_json(handed.read(_MAX_CONFIG_BYTES))


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
    # asyncio.run joins asyncio's default executor at its end, and the interpreter joins every
    # non-daemon thread at exit, both without a timeout; the deadline's watchdog ends the
    # process if either hangs (a DNS lookup that never returns).
    asyncio.run(daemon.run(exit_deadline=SHUTDOWN_DEADLINE_SECONDS))
    return 0


def main(argv: list[str]) -> int:
    config = read_handed_over(int(argv[0]))
    log.configure(config.log_format, config.log_level)
    return run_daemon(config)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
