"""argparse as every command of the exporter uses it: no abbreviations, no secrets in errors.

With abbreviations, `--api-key SECRET` would be taken for `--api-key-file` and the key
printed in the error; and argparse's "unrecognized arguments" error repeats whatever it did
not know, an API key among them, to a terminal or a journal.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Sequence
from typing import Any

from exporter.llama.redact import redacted


class SafeArgumentParser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            self.error(f"unrecognized arguments: {shlex.join(redacted(unknown))}")
        return parsed
