"""The types of bench's numeric flags: what argparse calls to read, and to refuse, a value."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def int_list(minimum: int) -> Callable[[str], tuple[int, ...]]:
    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(part) for part in text.replace(" ", "").split(",") if part)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a comma-separated list of integers"
            ) from None
        if not values:
            raise argparse.ArgumentTypeError("the list is empty")
        if min(values) < minimum:
            raise argparse.ArgumentTypeError(f"{text!r}: every value must be at least {minimum}")
        return values

    return parse


def positive(kind: Callable[[str], float | int]) -> Callable[[str], float | int]:
    def parse(text: str) -> float | int:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be positive")
        return value

    return parse
