"""What a probe round measures: each setting declared once, with its default, bound and meaning.

The daemon's flags, environment variables and file keys, the README's settings table and
`bench` all derive from this declaration (see `exporter.config.settings`). When rounds run is
another matter: `exporter.schedule.plan`.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from exporter.probe.results import KINDS, Kind

# Upper bounds, far past any real use, so that no accepted value is absurd where it is used:
# the token counts bound the lists a round builds in memory and sends, the repetitions the
# requests in one round; the timeout must fit under the schedule's interval anyway.
MAX_TIMEOUT_SECONDS = 86400.0
MAX_DEPTH = 1 << 24  # tokens; llama.cpp contexts are far smaller
MAX_TOKENS = 1 << 20  # per PP or TG sample
MAX_REPETITIONS = 100


def split_list(value: Any) -> Any:
    """A list from a flag or the environment may be written `a,b,c` as well as JSON."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("[") and text.endswith("]"):
            text = text[1:-1]
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


def _distinct_sorted(depths: tuple[int, ...]) -> tuple[int, ...]:
    if not depths:
        raise ValueError("must list at least one depth")
    return tuple(sorted(set(depths)))


def _none_or_at_least_two(tokens: int) -> int:
    # One generated token comes with the prompt: TG times the steps after it.
    if tokens == 1:
        raise ValueError("must be 0 (no TG probes) or at least 2")
    return tokens


Depths = Annotated[
    tuple[Annotated[int, Field(ge=0, le=MAX_DEPTH)], ...],
    # "0,4096" from a flag or the environment is not JSON: the settings layer marks such a
    # field not to be decoded (exporter.config.settings), so that the daemon, which never
    # loads pydantic-settings, can import the plan.
    BeforeValidator(split_list),
    AfterValidator(_distinct_sorted),
]


class MeasurePlan(BaseModel):
    """One round: per depth, a fill, then `repetitions` PP and TG samples, within `timeout`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    timeout: float = Field(
        120.0,
        gt=0,
        le=MAX_TIMEOUT_SECONDS,
        allow_inf_nan=False,
        description="seconds one probe round may take (at most 86400)",
    )
    prompt_tokens: int = Field(
        512,
        ge=0,
        le=MAX_TOKENS,
        description="fresh prompt tokens per PP sample (0: no PP probes; at most 1048576)",
    )
    generation_tokens: Annotated[int, AfterValidator(_none_or_at_least_two)] = Field(
        128,
        ge=0,
        le=MAX_TOKENS,
        description="tokens generated per TG sample (0: no TG probes; at most 1048576)",
    )
    depths: Depths = Field(
        (0,), description="context depths, e.g. 0,4096,16384 (each at most 16777216)"
    )
    repetitions: int = Field(
        3, ge=1, le=MAX_REPETITIONS, description="samples per depth and round (at most 100)"
    )
    slot: int | None = Field(None, ge=0, description="slot id for probes (default: the highest)")
    warmup: bool = Field(
        True, description="send one unmeasured request before each round, as llama-bench does"
    )
    require_busy_check: bool = Field(
        True, description="skip rounds when neither /slots nor /metrics tells whether busy"
    )
    canary: bool = Field(
        True,
        description="end each round with one fixed greedy request and watch its output change",
    )

    @model_validator(mode="after")
    def _measures_something(self) -> MeasurePlan:
        if not self.kinds:
            raise ValueError("prompt_tokens and generation_tokens are both 0: nothing to measure")
        return self

    @property
    def kinds(self) -> tuple[Kind, ...]:
        """The probe kinds this plan measures, in the order each repetition sends them."""
        sizes = {"prompt": self.prompt_tokens, "generation": self.generation_tokens}
        return tuple(kind for kind in KINDS if sizes[kind] > 0)
