"""Which options a llama.cpp program takes, and whether each takes a value: read from `--help`.

llama-perplexity takes llama-server's model-loading options but not its serving ones, and which
are which changes between llama.cpp releases. So bench asks the two binaries it will run: an
option of the server command that llama-perplexity's own `--help` does not list is left out of
the quality run, and llama-server's `--help` says whether it takes a value, so that its value
goes with it.

`common/arg.cpp` prints each option as its names, comma-separated, then the value's hint after
one space, then the description after two or more spaces or on the next line:

    -t,    --threads N                      number of CPU threads to use during generation
    -fa,   --flash-attn [on|off|auto]       set Flash Attention use ('on', 'off', or 'auto', ...
    -kvo,  --kv-offload, -nkvo, --no-kv-offload
    -ot,   --override-tensor <tensor name pattern>=<buffer type>,...
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Mapping, Sequence
from typing import Final

from exporter.llama.argv import find_options, option_name

# Names, each but the last followed by a comma; then one space and a hint when it takes a value.
_OPTION_LINE: Final = re.compile(r"((?:-[^\s,]+,\s+)*-[^\s,]+)( \S)?")
_HELP_TIMEOUT_S: Final = 60.0
# Enough for any real usage text (llama-server's is about 60 KB), not a runaway program's.
_HELP_MAX_BYTES: Final = 4 * 1024 * 1024
# What llama.cpp's programs read from the environment; inherited, it would change the run.
ENV_PREFIXES: Final = ("LLAMA_ARG_", "LLAMA_API_KEY")


class ToolOptionsError(RuntimeError):
    """A program's options could not be read from its `--help`."""


def parse_help(text: str) -> dict[str, bool]:
    """Option name -> whether it takes a value, for every option the usage text lists."""
    options: dict[str, bool] = {}
    for line in text.splitlines():
        if not line.startswith("-"):
            continue  # a description's continuation, a section title, a blank line
        found = _OPTION_LINE.match(line)
        if found is None:
            continue
        takes_value = found.group(2) is not None
        for name in found.group(1).split(","):
            options[option_name(name.strip())] = takes_value
    return options


def clean_environment() -> dict[str, str]:
    """The bench's environment less what llama.cpp's programs would read as options."""
    return {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIXES)}


def read_options(program: str) -> dict[str, bool]:
    """Run `program --help` and parse it; raises ToolOptionsError saying why it could not."""
    try:
        done = subprocess.run(  # noqa: S603  # a list, from the owner's own command
            [program, "--help"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=_HELP_TIMEOUT_S,
            check=False,
            env=clean_environment(),
        )
    except subprocess.TimeoutExpired:
        raise ToolOptionsError(
            f"{program} --help did not end within {_HELP_TIMEOUT_S:g} s"
        ) from None
    except OSError as exc:
        raise ToolOptionsError(f"cannot run {program}: {exc.strerror or exc}") from None
    text = (done.stdout + done.stderr)[:_HELP_MAX_BYTES].decode("utf-8", errors="replace")
    options = parse_help(text)
    if not options:
        raise ToolOptionsError(
            f"{program} --help listed no options (exit status {done.returncode})"
        )
    return options


def split_options(
    argv: Sequence[str], known: Mapping[str, bool], wanted: Mapping[str, bool]
) -> tuple[list[str], list[str]]:
    """`argv`'s tokens kept for a program that takes `wanted`, and the names of those dropped.

    `known` (name -> takes a value) says how to read `argv`: each option it names is kept, with
    its value, when `wanted` lists it too, and dropped otherwise. A token `known` does not
    name (a positional word, an option of another release) is kept as it is: the program then
    rejects it, as the server would have. Raises ArgvError when an option lacks its value.
    """
    unwanted = [o for o in find_options(argv, known) if o.name not in wanted]
    dropped = {i for o in unwanted for i in range(o.start, o.end)}
    kept = [token for i, token in enumerate(argv) if i not in dropped]
    return kept, list(dict.fromkeys(o.name for o in unwanted))
