"""Secrets out of a command line, a URL or a log line before any of them is logged or written.

Redaction goes by rule, not by a list of llama-server's options: a wrapper script, another
llama.cpp release or another program in the command names its secrets as it likes. Hidden:

- the value of an option, `-x` or `--x`, given as `--opt value` or `--opt=value`, whose name
  (lower case, `-` and `_` dropped: `--api_key`, `--apiKey`, `-api-key` all read `apikey`)
  holds one of key, token, secret, password, passwd or auth; and llama-server's `-hft`, the
  short spelling of `--hf-token`. "tokens" is a count, not a credential (`--image-max-tokens`);
- the value of an assignment `NAME=value` (`HF_TOKEN=...`, `env LLAMA_API_KEY=...`) whose
  name reads the same way;
- the password of a URL (`https://user:password@host/`), and query values under such names;
- the same inside an argument that is itself a command line (`sh -c '...'`, `bash -lc "..."`,
  `ssh host '...'`: the argument after a `-c`, or any with spaces in it): it is split as a shell
  would, redacted, and quoted again. An argument that held no secret is kept as written.

Each hidden value becomes `***`. What no rule names (a secret given positionally, or under a
name without those words) is not recognised: the command is the owner's, and so is that choice.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from typing import Final

MASK: Final = "***"
# Options llama-server spells without a telling word (common/arg.cpp).
_SHORT_SECRET_OPTIONS: Final = frozenset({"-hft"})
# Applied to a name lowered with `-` and `_` removed.
_SECRET_WORD: Final = re.compile(r"key|token(?!s)|secret|passw(?:or)?d|auth")
_ASSIGNMENT: Final = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)=(.*)", re.DOTALL)
_URL_PASSWORD: Final = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*:)[^/\s@]+(@)")
# Free text (a log line) has no argv to walk: options and assignments are found by pattern, a
# value being a quoted string or a word (which ends at a shell separator or a URL's `&`).
_TEXT_OPTION: Final = re.compile(r"(?<![\w-])--?[A-Za-z][\w-]*")
_TEXT_OPTION_VALUE: Final = re.compile(r"(?:=|[ \t]+)(\"[^\"]*\"|'[^']*'|[^\s\"'&;]+)")
_TEXT_NAME: Final = re.compile(r"(?<![\w.-])[A-Za-z_]\w*(?==)")
_TEXT_ASSIGNED_VALUE: Final = re.compile(r"=(\"[^\"]*\"|'[^']*'|[^\s\"'&;]+)")
# `sh -c "bash -c '...'"`: deeper than this is not a command anyone writes.
_MAX_NESTING: Final = 4
_SHELL_PUNCTUATION: Final = frozenset("();<>|&")
# What a shell's script follows: `-c`, or `-c` among other single-letter options (`bash -lc`).
_SCRIPT_OPTION: Final = re.compile(r"-[A-Za-z]*c")


def is_secret_name(name: str) -> bool:
    """Whether an option or variable name (`--hf-token`, `LLAMA_API_KEY`) names a secret."""
    if name in _SHORT_SECRET_OPTIONS:
        return True
    normal = name.lstrip("-").replace("-", "").replace("_", "").lower()
    return _SECRET_WORD.search(normal) is not None


def redacted(argv: Sequence[str]) -> list[str]:
    """`argv` fit for a log line or a report: every secret value replaced by `***`."""
    return _redact_argv(argv, 0)


def redacted_text(text: str) -> str:
    """Free text (a log line, a URL, an error message) with the secrets the rules find hidden."""
    text = _mask_values(text, _TEXT_OPTION, _TEXT_OPTION_VALUE)
    text = _mask_values(text, _TEXT_NAME, _TEXT_ASSIGNED_VALUE)
    return _URL_PASSWORD.sub(rf"\1{MASK}\2", text)


def _mask_values(text: str, names: re.Pattern[str], values: re.Pattern[str]) -> str:
    # Only a secret name's value is consumed: `--verbose --api-key K` must not read
    # "--api-key" as the value of --verbose and so skip past K.
    pieces: list[str] = []
    done = 0
    for name in names.finditer(text):
        if name.start() < done or not is_secret_name(name.group()):
            continue
        value = values.match(text, name.end())
        if value is None:
            continue
        pieces += [text[done : value.start(1)], MASK]
        done = value.end(1)
    return "".join([*pieces, text[done:]])


def _is_option(token: str) -> bool:
    # "-1" is a negative number and "-" or "--" stand for stdin or the end of the options.
    return token.startswith("-") and len(token) > 1 and token.lstrip("-")[:1].isalpha()


def _redact_argv(argv: Sequence[str], depth: int) -> list[str]:
    out: list[str] = []
    hide_next = False
    for i, token in enumerate(argv):
        if hide_next:
            # Whatever follows a secret option is its value, even one that starts with "-":
            # showing a dash-led key would be worse than hiding the next option by mistake.
            out.append(MASK)
            hide_next = False
            continue
        if _is_option(token):
            name, inline, _ = token.partition("=")
            if is_secret_name(name):
                out.append(f"{name}={MASK}" if inline else token)
                hide_next = not inline
                continue
        script = i > 0 and _SCRIPT_OPTION.fullmatch(argv[i - 1]) is not None
        out.append(_redact_word(token, depth, script=script))
    return out


def _redact_word(token: str, depth: int, *, script: bool) -> str:
    command = depth < _MAX_NESTING and any(c.isspace() for c in token)
    if command and script:
        # `sh -c 'HF_TOKEN=... llama-server ...'`: a script that starts with an assignment,
        # not one assignment whose value has spaces.
        return _redact_command_string(token, depth)
    assignment = _ASSIGNMENT.fullmatch(token)
    if assignment is not None and is_secret_name(assignment.group(1)):
        return f"{assignment.group(1)}={MASK}"
    if command:
        return _redact_command_string(token, depth)
    # A URL's password, or a query value under a secret name (`?token=...`).
    return redacted_text(token) if "://" in token else token


def _redact_command_string(text: str, depth: int) -> str:
    """An argument that holds a command line (`sh -c '...'`), redacted as one."""
    try:
        words = _shell_words(text)
    except ValueError:  # unbalanced quotes: no argv to walk, so read it as free text
        return redacted_text(text)
    hidden = _redact_argv(words, depth + 1)
    if hidden == words:
        return text  # nothing secret: the owner's own quoting stays
    return " ".join(_requote(word) for word in hidden)


def _shell_words(text: str) -> list[str]:
    # Punctuation split off as the shell does, so that `HF_TOKEN=x;` is an assignment too.
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def _requote(word: str) -> str:
    if word == MASK or (word and set(word) <= _SHELL_PUNCTUATION):
        return word
    # A masked assignment or option stays readable: `HF_TOKEN=***`, not `'HF_TOKEN=***'`.
    if word.endswith("=" + MASK):
        return _requote(word[: -len(MASK) - 1]) + "=" + MASK
    return shlex.quote(word)
