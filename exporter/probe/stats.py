"""Per-test figures as llama-bench prints them: pp512, tg128 @ d4096, mean ± sd over repetitions.

Used by the `probe` command's table and by `bench`, for any samples that say their kind, depth,
token count, speed and time to first token (a live `Sample` or a recorded one).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from typing import Protocol

from pydantic import BaseModel, ConfigDict

from exporter.probe.results import Kind


class SampleLike(Protocol):
    @property
    def kind(self) -> Kind: ...
    @property
    def depth(self) -> int: ...
    @property
    def tokens(self) -> int: ...
    @property
    def tokens_per_second(self) -> float: ...
    @property
    def time_to_first_token_seconds(self) -> float | None: ...


class TestStats(BaseModel):
    """One llama-bench test (pp512, tg128 @ d4096, ...) over its repetitions."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    __test__ = False  # not a pytest test class, despite the name

    name: str
    kind: Kind
    depth: int
    tokens: int
    n: int
    mean: float  # tokens per second
    sd: float | None  # sample standard deviation; None for a single repetition
    ttft_mean_seconds: float | None = None


def test_name(kind: Kind, tokens: int, depth: int) -> str:
    # A TG sample times the steps after the first token, which arrives with the prompt: a
    # request for 128 tokens times 127 steps, and is llama-bench's tg128.
    name = f"pp{tokens}" if kind == "prompt" else f"tg{tokens + 1}"
    return f"{name} @ d{depth}" if depth else name


def summarize(samples: Iterable[SampleLike]) -> tuple[TestStats, ...]:
    groups: dict[tuple[int, bool, int], list[SampleLike]] = {}
    for s in samples:
        groups.setdefault((s.depth, s.kind != "prompt", s.tokens), []).append(s)
    out = []
    for (depth, _, tokens), group in sorted(groups.items()):
        kind = group[0].kind
        speeds = [s.tokens_per_second for s in group]
        ttfts = [
            s.time_to_first_token_seconds
            for s in group
            if s.time_to_first_token_seconds is not None
        ]
        out.append(
            TestStats(
                name=test_name(kind, tokens, depth),
                kind=kind,
                depth=depth,
                tokens=tokens,
                n=len(speeds),
                mean=statistics.fmean(speeds),
                sd=statistics.stdev(speeds) if len(speeds) > 1 else None,
                ttft_mean_seconds=statistics.fmean(ttfts) if ttfts else None,
            )
        )
    return tuple(out)
