"""Text a server sent, made safe to become a label, a log field or a line on the landing page.

A model alias, a build string or an error message is whatever the server chose to send: it may
hold a lone surrogate (valid JSON, not encodable as UTF-8, which would fail the whole
exposition), control characters (which forge log lines), or megabytes.
"""

from __future__ import annotations

import unicodedata
from typing import Any, Final

# Long enough for any real model alias, build or quant name; short enough that a server
# cannot blow up the label index of every Prometheus that scrapes the exporter.
LABEL_MAX_CHARS: Final = 128
DETAIL_MAX_CHARS: Final = 200
_REPLACEMENT: Final = "\ufffd"
# More slots or tokens than any server has: such an answer is broken, not the server large.
MAX_SLOTS: Final = 4096
MAX_TOKENS: Final = 2**31 - 1


def clean_text(value: object, limit: int = LABEL_MAX_CHARS) -> str:
    """`value` as a string of at most `limit` characters that encodes as UTF-8 and holds no
    control or format characters; lone surrogates become U+FFFD."""
    text = str(value)
    if len(text) <= limit and text.isascii() and text.isprintable():
        return text  # the usual case, checked at C speed: every label of every scrape
    text = text[: limit * 2]  # cut first: the work below is per character
    text = "".join(
        _REPLACEMENT if unicodedata.category(c) == "Cs" else c
        for c in text
        if unicodedata.category(c) not in ("Cc", "Cf")
    )
    return text[:limit]


def bounded_int(value: Any, low: int, high: int, what: str) -> int:
    """`value` when it is a JSON integer (not a float, not a bool) in `low..high`; a larger
    figure than any real server sends is a broken or hostile answer. Raises ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{what} is not an integer in {low}..{high}")
    return value
