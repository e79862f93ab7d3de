"""llama-server's command line as llama.cpp's `common/arg.cpp` reads it: the one argv parser.

Only the options a caller asks about are recognised; every other token is passed over one at
a time, so an unknown option's value is skipped too, unless that value is spelled exactly like
an option asked about (`--alias -c`), which no real command line does. `--long_option` is the
same as `--long-option`. llama-server itself rejects `--option=value`; it is accepted here
anyway, because tools that build command lines sometimes write it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass


class ArgvError(ValueError):
    """An option asked about lacks the value it takes."""


@dataclass(frozen=True)
class Option:
    name: str  # as normalised: `--ctx-size`, `-c`
    value: str | None  # None for a flag without a value
    start: int  # argv[start:end] are its tokens
    end: int


def option_name(token: str) -> str:
    """`--long_option=x` -> `--long-option`; short options and plain words are unchanged."""
    if not token.startswith("--"):
        return token
    return token.split("=", 1)[0].replace("_", "-")


def find_options(argv: Sequence[str], takes_value: Mapping[str, bool]) -> Iterator[Option]:
    """The occurrences, in order, of the options named in `takes_value` (name -> takes one)."""
    i = 0
    while i < len(argv):
        token = argv[i]
        name = option_name(token)
        if name not in takes_value:
            i += 1
            continue
        inline = token.startswith("--") and "=" in token
        if inline:
            yield Option(name, token.split("=", 1)[1], i, i + 1)
            i += 1
        elif not takes_value[name]:
            yield Option(name, None, i, i + 1)
            i += 1
        elif i + 1 < len(argv):
            yield Option(name, argv[i + 1], i, i + 2)
            i += 2
        else:
            raise ArgvError(f"{name} needs a value")


def has_option(argv: Sequence[str], *names: str) -> bool:
    """Whether any of `names` (options that take a value) is given."""
    return any(True for _ in find_options(argv, dict.fromkeys(names, True)))


def without_options(argv: Sequence[str], takes_value: Mapping[str, bool]) -> list[str]:
    """`argv` less every occurrence of the named options and their values."""
    dropped = {i for o in find_options(argv, takes_value) for i in range(o.start, o.end)}
    return [token for i, token in enumerate(argv) if i not in dropped]
