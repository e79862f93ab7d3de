"""What a probe round measures: each setting declared once, with its default, bound and meaning.

The daemon's flags, environment variables and file keys, the README's settings table and
`bench` all derive from this declaration (see `exporter.config.settings`). When rounds run is
another matter: `exporter.schedule.plan`.
"""

from __future__ import annotations

from dataclasses import dataclass

from exporter.declared import Declared, SettingError, setting
from exporter.probe.results import KINDS, Kind

# Upper bounds, far past any real use, so that no accepted value is absurd where it is used:
# the token counts bound the lists a round builds in memory and sends, the repetitions the
# requests in one round; the timeout must fit under the schedule's interval anyway.
MAX_TIMEOUT_SECONDS = 86400.0
MAX_DEPTH = 1 << 24  # tokens; llama.cpp contexts are far smaller
MAX_TOKENS = 1 << 20  # per PP or TG sample
MAX_REPETITIONS = 100


def _distinct_sorted(depths: tuple[int, ...]) -> tuple[int, ...]:
    if not depths:
        raise ValueError("must list at least one depth")
    return tuple(sorted(set(depths)))


def _none_or_at_least_two(tokens: int) -> int:
    # One generated token comes with the prompt: TG times the steps after it.
    if tokens == 1:
        raise ValueError("must be 0 (no TG probes) or at least 2")
    return tokens


@dataclass(frozen=True, slots=True, kw_only=True)
class MeasurePlan(Declared):
    """One round: per depth, a fill, then `repetitions` PP and TG samples, within `timeout`."""

    timeout: float = setting(
        120.0, "seconds one probe round may take (at most 86400)", gt=0, le=MAX_TIMEOUT_SECONDS
    )
    prompt_tokens: int = setting(
        512,
        "fresh prompt tokens per PP sample (0: no PP probes; at most 1048576)",
        ge=0,
        le=MAX_TOKENS,
    )
    generation_tokens: int = setting(
        128,
        "tokens generated per TG sample (0: no TG probes; at most 1048576)",
        ge=0,
        le=MAX_TOKENS,
        normalise=_none_or_at_least_two,
    )
    depths: tuple[int, ...] = setting(
        (0,),
        "context depths, e.g. 0,4096,16384 (each at most 16777216)",
        ge=0,
        le=MAX_DEPTH,
        normalise=_distinct_sorted,
    )
    repetitions: int = setting(
        3, "samples per depth and round (at most 100)", ge=1, le=MAX_REPETITIONS
    )
    slot: int | None = setting(None, "slot id for probes (default: the highest)", ge=0)
    warmup: bool = setting(
        True, "send one unmeasured request before each round, as llama-bench does"
    )
    require_busy_check: bool = setting(
        True, "skip rounds when neither /slots nor /metrics tells whether busy"
    )
    canary: bool = setting(
        True, "end each round with one fixed greedy request and watch its output change"
    )

    def check(self) -> None:
        if not self.kinds:
            raise SettingError(
                "", "prompt_tokens and generation_tokens are both 0: nothing to measure"
            )

    @property
    def kinds(self) -> tuple[Kind, ...]:
        """The probe kinds this plan measures, in the order each repetition sends them."""
        sizes = {"prompt": self.prompt_tokens, "generation": self.generation_tokens}
        return tuple(kind for kind in KINDS if sizes[kind] > 0)
