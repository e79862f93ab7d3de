"""What one probe round produced: immutable values handed from the prober to the store."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Final, Literal

from exporter.frozen import Frozen
from exporter.llama import client
from exporter.llama.client import Timings
from exporter.llama.discovery import ServerInfo

Kind = Literal["prompt", "generation"]
KINDS: Final[tuple[Kind, ...]] = ("prompt", "generation")

# Skip reasons: the probe was not started.
SKIP_BUSY: Final = "busy"
SKIP_BUSY_UNKNOWN: Final = "busy_unknown"
SKIP_DUTY_BUDGET: Final = "duty_budget"
SKIP_DEPTH_EXCEEDS_CONTEXT: Final = "depth_exceeds_context"
SKIP_IN_PROGRESS: Final = "in_progress"
SKIP_SLEEPING: Final = "sleeping"
# A model behind a router or llama-swap that is not loaded: never probed, since a request
# naming it would load it (and may evict production's model). Also a round whose model
# unloaded midway: the router refused the next request, and nothing was loaded.
SKIP_NOT_LOADED: Final = client.NOT_LOADED
SKIP_REASONS: Final = (
    SKIP_BUSY,
    SKIP_BUSY_UNKNOWN,
    SKIP_DUTY_BUDGET,
    SKIP_DEPTH_EXCEEDS_CONTEXT,
    SKIP_IN_PROGRESS,
    SKIP_SLEEPING,
    SKIP_NOT_LOADED,
)

# Discard reasons: the probe ran, but its sample is not a clean measurement.
DISCARD_OVERLAP: Final = "overlap"

# Failure reasons beyond the client's transport reasons: the server answered, but not with
# what was asked for.
INVALID_PROMPT_N: Final = "prompt_n_mismatch"
INVALID_CACHE_N: Final = "cache_n_mismatch"
INVALID_PREDICTED_N: Final = "predicted_n_mismatch"
SLOT_OUT_OF_RANGE: Final = "slot_out_of_range"
# The server's timings cannot be true: not finite or not positive, or at odds with the time
# the exporter itself measured around the request (`exporter.probe.validate`).
INVALID_TIMINGS: Final = "invalid_timings"
INCONSISTENT_TIMINGS: Final = "inconsistent_timings"
# The canary's answer is not the output asked for: a token id outside the vocabulary, a
# probability that is no probability, another number of tokens, a malformed answer.
INVALID_OUTPUT: Final = "invalid_output"
FINGERPRINT_CHARS: Final = 12


@dataclass(frozen=True)
class Sample:
    """One valid measurement, in the server's own timings."""

    kind: Kind
    depth: int
    tokens: int  # prompt tokens decoded, or generation steps (predicted_n - 1)
    seconds: float
    time_to_first_token_seconds: float | None  # client-measured, prompt samples only
    timings: Timings
    # GPU energy counters' increase over the request, summed over all GPUs; None without NVML.
    energy_joules: float | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class KindOutcome:
    """How one probe kind fared in a round."""

    kind: Kind
    samples: tuple[Sample, ...] = ()
    failure: str | None = None  # the reason of the first failure, if any
    discards: tuple[str, ...] = ()
    duration: float = 0.0  # wall seconds of this kind's requests
    attempted: bool = False

    @property
    def succeeded(self) -> bool:
        return self.attempted and self.failure is None and bool(self.samples)


@dataclass(frozen=True)
class CanaryOutput:
    """The output canary's answer: the generated token ids and their mean probability."""

    tokens: tuple[int, ...]
    mean_probability: float | None  # None where the server gave no token's probability

    @property
    def fingerprint(self) -> str:
        """The first hex digits of the SHA-256 of the token ids: short enough for a label,
        long enough that two outputs never share one by chance."""
        text = ",".join(map(str, self.tokens)).encode()
        return hashlib.sha256(text).hexdigest()[:FINGERPRINT_CHARS]


@dataclass(frozen=True)
class CanaryOutcome:
    """How the canary fared in a round: an output, or the reason there is none."""

    output: CanaryOutput | None = None
    failure: str | None = None
    detail: str = ""


@dataclass(frozen=True)
class RoundResult(Frozen):
    target: str
    started_at: float  # unix time
    duration: float
    server: ServerInfo | None
    server_error: str | None = None  # why discovery failed, when it did
    skips: tuple[str, ...] = ()
    outcomes: dict[Kind, KindOutcome] = field(default_factory=dict)
    detail: str = ""  # human-readable cause of the first failure or skip, for logs and "/"
    canary: CanaryOutcome | None = None  # None where the round sent no canary
    # The model's name behind a router or llama-swap; None for a single server.
    model: str | None = None
    # Set on a confirmation round: why it ran (`exporter.state.baseline`); None on a
    # scheduled one.
    confirmation: str | None = None

    @property
    def samples(self) -> tuple[Sample, ...]:
        """The samples of the kinds that succeeded. One failed repetition makes the kind's
        other samples of this round suspect too: a server that sent one impossible figure
        may have sent plausible wrong ones, so none of them reaches a gauge or counter."""
        return tuple(s for o in self.outcomes.values() if o.succeeded for s in o.samples)


DISCARD_REASONS: Final = (DISCARD_OVERLAP,)
# How a request can fail on the way: the client's reasons, shared by probes and the canary.
TRANSPORT_REASONS: Final = (
    client.CONNECT,
    client.TIMEOUT,
    client.UNAUTHORIZED,
    client.LOADING,
    client.HTTP_ERROR,
    client.BAD_RESPONSE,
    client.CONTEXT_EXCEEDED,
    client.NOT_SUPPORTED,
    client.OVERSIZED,
)
FAILURE_REASONS: Final = (
    *TRANSPORT_REASONS,
    INVALID_PROMPT_N,
    INVALID_CACHE_N,
    INVALID_PREDICTED_N,
    SLOT_OUT_OF_RANGE,
    INVALID_TIMINGS,
    INCONSISTENT_TIMINGS,
)

# Why a canary gave no output to compare: what the server said, or production overlapping it
# (another request in the batch can change a slot's numerics).
CANARY_FAILURE_REASONS: Final = (
    *TRANSPORT_REASONS,
    INVALID_PREDICTED_N,
    INVALID_OUTPUT,
    DISCARD_OVERLAP,
)


@dataclass
class Figure:
    """One kind at one depth over a round: what the gauges, counters and log line show."""

    tokens: float = 0.0
    seconds: float = 0.0
    energy_joules: float | None = None
    ttfts: list[float] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float | None:
        # Token-weighted over the round's repetitions, like the counters' rate ratio.
        return self.tokens / self.seconds if self.seconds > 0 else None

    @property
    def time_to_first_token(self) -> float | None:
        return sum(self.ttfts) / len(self.ttfts) if self.ttfts else None


def round_figures(samples: tuple[Sample, ...]) -> dict[tuple[int, Kind], Figure]:
    figures: dict[tuple[int, Kind], Figure] = {}
    for s in samples:
        f = figures.setdefault((s.depth, s.kind), Figure())
        f.tokens += s.tokens
        f.seconds += s.seconds
        if s.energy_joules is not None:
            f.energy_joules = (f.energy_joules or 0.0) + s.energy_joules
        if s.time_to_first_token_seconds is not None:
            f.ttfts.append(s.time_to_first_token_seconds)
    return figures
