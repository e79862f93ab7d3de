"""Run a llama.cpp tool to its end, bounded in time and in output, its output kept in a log.

llama-perplexity over a real model takes minutes and prints a line per chunk; a wrong option
can make it run for hours (a huge text) or print without end (a debug verbosity). So the run
has a deadline and an output limit; past either, its process group is stopped (SIGTERM, then
SIGKILL) and the result says why. stdout and stderr are read line by line from two pipes and
written whole to one log file (0600: the tool may echo a secret of the command), so that a
figure on stdout is never cut by a log line from stderr. Ctrl-C stops the tool, then goes on.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final

import structlog

from exporter.bench.files import create_private
from exporter.llama.redact import redacted

log = structlog.get_logger(__name__)

_READ_BYTES: Final = 65536
_STOP_GRACE_S: Final = 10.0
# How often the deadline is looked at while the tool is silent.
_TICK_S: Final = 0.5


class ToolStartError(RuntimeError):
    """The program could not be started at all."""


@dataclass(frozen=True)
class ToolResult:
    returncode: int  # negative: ended by that signal
    output: str  # stdout and stderr, line by line as they came, at most the limit
    seconds: float
    stopped: str | None = None  # why the bench stopped it: a timeout, too much output


class _Lines:
    """One stream's bytes, passed on as whole lines."""

    def __init__(self) -> None:
        self.partial = b""

    def feed(self, data: bytes) -> list[bytes]:
        *lines, self.partial = (self.partial + data).split(b"\n")
        return [line + b"\n" for line in lines]

    def rest(self) -> list[bytes]:
        rest, self.partial = self.partial, b""
        return [rest + b"\n"] if rest else []


def run_tool(
    argv: Sequence[str],
    *,
    log_path: Path,
    timeout: float,
    max_output_bytes: int,
    env: Mapping[str, str] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> ToolResult:
    """Run `argv` to its end or its bounds; raises ToolStartError when it cannot start."""
    create_private(log_path)
    started = clock()
    try:
        proc = subprocess.Popen(  # noqa: S603  # a list, from the owner's own command
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(env) if env is not None else None,
            start_new_session=True,  # its own group: stopping it stops all it started
        )
    except OSError as exc:
        raise ToolStartError(f"cannot run {argv[0]}: {exc.strerror or exc}") from None
    try:
        # Inside the try: an interrupt that lands right after this line (a test sends one on
        # reading it) must still stop the tool.
        log.info("quality_tool_started", pid=proc.pid, cmd=redacted(argv), log=str(log_path))
        with log_path.open("ab") as sink:
            output, stopped = _collect(proc, sink, started + timeout, max_output_bytes, clock)
    finally:
        _stop(proc)
    seconds = clock() - started
    if stopped == "timeout":
        stopped = f"stopped after {timeout:g} s (--quality-timeout)"
    log.info("quality_tool_ended", pid=proc.pid, returncode=proc.returncode, stopped=stopped)
    text = output.decode("utf-8", errors="replace")
    return ToolResult(returncode=proc.returncode, output=text, seconds=seconds, stopped=stopped)


def _collect(
    proc: subprocess.Popen[bytes],
    sink: IO[bytes],
    deadline: float,
    limit: int,
    clock: Callable[[], float],
) -> tuple[bytes, str | None]:
    kept: list[bytes] = []
    size = 0
    with selectors.DefaultSelector() as selector:
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                selector.register(stream, selectors.EVENT_READ, _Lines())
        while selector.get_map():
            remaining = deadline - clock()
            if remaining <= 0:
                return b"".join(kept), "timeout"
            for key, _ in selector.select(timeout=min(_TICK_S, remaining)):
                lines: _Lines = key.data
                data = os.read(key.fd, _READ_BYTES)
                if data:
                    chunk = lines.feed(data)
                else:
                    selector.unregister(key.fileobj)
                    chunk = lines.rest()
                for line in chunk:
                    size += len(line)
                    if size > limit:
                        return b"".join(kept), f"stopped: it printed more than {limit:,} bytes"
                    sink.write(line)
                    kept.append(line)
                sink.flush()
    # Both pipes closed: the tool is ending, or closed them and goes on, which the deadline
    # still bounds.
    try:
        proc.wait(timeout=max(0.0, deadline - clock()))
    except subprocess.TimeoutExpired:
        return b"".join(kept), "timeout"
    return b"".join(kept), None


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """End the tool's process group, politely first; a tool that ended is only reaped."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=_STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
