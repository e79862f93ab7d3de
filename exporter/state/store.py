"""The latest probe results per target, written by the prober and read at scrape time.

The prober (asyncio thread) calls `record_*`; collectors (HTTP threads) call `snapshot`. A lock
guards every access and snapshots are deep copies, so a scrape never sees half a round.
Series are keyed by the server's identity (model, ctx): when it changes, the old label sets
are dropped, so they disappear from /metrics instead of lingering.

A router or llama-swap target holds one `ModelState` per loaded model it probes, and the list
of every model it knows (`listed`, for `llama_speed_model_loaded`). A model that is no longer
loaded loses its `ModelState`, and with it every series that claims a speed for it. The
counters of a target (probes, skips, failures) stay per target: its models share the GPUs and
one schedule.
"""

from __future__ import annotations

import copy
import threading
from collections import Counter
from dataclasses import dataclass, field

from exporter.kv.facts import ModelFacts
from exporter.llama.discovery import ServerInfo
from exporter.probe.results import KINDS, Kind, RoundResult, round_figures
from exporter.state.baseline import BandFigures, Baselines, SeriesKey
from exporter.state.canary import CanaryState


@dataclass
class KindState:
    attempts: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    discards: Counter[str] = field(default_factory=Counter)
    success: bool | None = None  # None until a probe of this kind has finished
    duration: float | None = None
    last_success_time: float | None = None


@dataclass
class SeriesState:
    """Figures for one (model, ctx, depth) label set."""

    prompt_tokens_per_second: float | None = None
    generation_tokens_per_second: float | None = None
    time_to_first_token: float | None = None
    prompt_tokens: float = 0.0
    prompt_seconds: float = 0.0
    generated_tokens: float = 0.0
    generation_seconds: float = 0.0
    energy_joules: dict[str, float] = field(default_factory=dict)  # by probe kind
    bands: dict[Kind, BandFigures] = field(default_factory=dict)  # `exporter.state.baseline`


@dataclass
class ModelState:
    """What one served model has shown: a single server's, or one model's behind a router."""

    server: ServerInfo | None = None
    up: bool = False
    series: dict[int, SeriesState] = field(default_factory=dict)  # by depth
    model_facts: ModelFacts | None = None
    tokens_held: int | None = None
    canary: CanaryState = field(default_factory=CanaryState)
    last_round: RoundResult | None = None
    pid: int | None = None  # its own process on this host, when found (router: the child)


@dataclass
class TargetState:
    name: str
    url: str
    up: bool = False
    server: ServerInfo | None = None  # the last server seen; kept while it is down
    server_error: str | None = None
    series: dict[int, SeriesState] = field(default_factory=dict)  # by depth
    kinds: dict[Kind, KindState] = field(default_factory=lambda: {k: KindState() for k in KINDS})
    skips: Counter[str] = field(default_factory=Counter)
    duty_ratio: float = 0.0
    last_round: RoundResult | None = None
    model_facts: ModelFacts | None = None  # for the server last seen
    kv_errors: Counter[str] = field(default_factory=Counter)
    tokens_held: int | None = None  # in all slots, from /slots
    canary: CanaryState = field(default_factory=CanaryState)  # for the server's identity
    canary_failures: Counter[str] = field(default_factory=Counter)
    confirmations: Counter[str] = field(default_factory=Counter)  # rounds run, by reason
    storage_errors: Counter[str] = field(default_factory=Counter)  # state file, by operation
    kind: str | None = None  # single, router or llama-swap; None until found
    listed: dict[str, bool] = field(default_factory=dict)  # every watched model: loaded?
    models: dict[str, ModelState] = field(default_factory=dict)  # the loaded ones, by name

    @property
    def multi(self) -> bool:
        return self.kind in ("router", "llama-swap")

    def views(self) -> list[ModelState]:
        """Each served model's state: the single server's own, or each loaded model's."""
        if self.multi:
            return [self.models[name] for name in sorted(self.models)]
        return [
            ModelState(
                self.server, self.up, self.series, self.model_facts, self.tokens_held,
                self.canary, self.last_round,
            )
        ]  # fmt: skip


@dataclass(frozen=True)
class Recorded:
    """What a recorded round asks of the daemon."""

    canary_replaced: str | None = None  # the fingerprint a confirmed output change replaced
    confirm: str | None = None  # the reason a confirmation round should follow


class Store:
    def __init__(
        self, targets: list[tuple[str, str]], confirmations: dict[str, int] | None = None
    ) -> None:
        """`confirmations`: per target, how many confirmation rounds settle a new verdict
        (0 or absent: none run, and each round's verdict stands)."""
        self._lock = threading.Lock()
        self._targets = {name: TargetState(name, url) for name, url in targets}
        self._confirmations = confirmations or {}
        self.baselines = Baselines()  # guarded by the lock too; see `locked`

    def locked(self) -> threading.Lock:
        """The lock, for the state file's reads and writes of `baselines`."""
        return self._lock

    def snapshot(self) -> list[TargetState]:
        with self._lock:
            return copy.deepcopy(list(self._targets.values()))

    def record_discovery(self, target: str, server: ServerInfo | None, error: str | None) -> None:
        with self._lock:
            state = self._targets[target]
            self._apply_discovery(state, server, error)
            self._show_bands(target, state)

    def record_model(
        self, target: str, facts: ModelFacts | None, error: str | None, tokens_held: int | None
    ) -> None:
        with self._lock:
            state = self._targets[target]
            state.model_facts = facts
            state.tokens_held = tokens_held
            if error is not None:
                state.kv_errors[error] += 1

    def record_tokens_held(self, target: str, tokens: int | None) -> None:
        with self._lock:
            self._targets[target].tokens_held = tokens

    def record_skip(self, target: str, reason: str) -> None:
        with self._lock:
            self._targets[target].skips[reason] += 1

    def record_duty(self, target: str, ratio: float) -> None:
        with self._lock:
            self._targets[target].duty_ratio = ratio

    def record_kind(self, target: str, kind: str | None) -> None:
        with self._lock:
            state = self._targets[target]
            if kind != state.kind:
                state.listed.clear()
                state.models.clear()
            state.kind = kind

    def record_listing(self, target: str, listed: dict[str, bool]) -> None:
        """A router's or llama-swap's watched models, loaded or not. A model no longer loaded
        loses its state: no gauge goes on claiming a speed for a model that is gone."""
        with self._lock:
            state = self._targets[target]
            state.up = True
            state.server_error = None
            state.listed = dict(listed)
            for name in [n for n in state.models if not listed.get(n)]:
                del state.models[name]

    def record_model_discovery(
        self, target: str, model: str, server: ServerInfo | None, error: str | None
    ) -> None:
        with self._lock:
            state = self._targets[target]
            if state.listed.get(model):  # not one that unloaded meanwhile
                served = state.models.setdefault(model, ModelState())
                self._apply_discovery(served, server, error)
                self._show_bands(target, served)

    def record_model_facts(
        self,
        target: str,
        model: str,
        facts: ModelFacts | None,
        error: str | None,
        tokens_held: int | None,
        *,
        pid: int | None,
    ) -> None:
        with self._lock:
            state = self._targets[target]
            if error is not None:
                state.kv_errors[error] += 1
            held = state.models.get(model)
            if held is not None:
                held.model_facts, held.tokens_held, held.pid = facts, tokens_held, pid

    def record_model_tokens_held(self, target: str, model: str, tokens: int | None) -> None:
        with self._lock:
            held = self._targets[target].models.get(model)
            if held is not None:
                held.tokens_held = tokens

    def record_storage_error(self, target: str, operation: str) -> None:
        with self._lock:
            self._targets[target].storage_errors[operation] += 1

    def record_round(self, result: RoundResult) -> Recorded:
        with self._lock:
            state = self._targets[result.target]
            served: TargetState | ModelState = state
            if result.model is not None:
                if not state.listed.get(result.model):
                    served = ModelState()  # unloaded meanwhile: counted, never shown
                else:
                    served = state.models.setdefault(result.model, ModelState())
            if result.server is not None or result.server_error is not None:
                self._apply_discovery(served, result.server, result.server_error)
            state.last_round = result
            served.last_round = result
            for reason in result.skips:
                state.skips[reason] += 1
            if result.confirmation is not None and result.outcomes:  # one that ran
                state.confirmations[result.confirmation] += 1
            for kind, outcome in result.outcomes.items():
                ks = state.kinds[kind]
                ks.attempts += 1
                ks.duration = outcome.duration
                for reason in outcome.discards:
                    ks.discards[reason] += 1
                if outcome.failure is not None:
                    ks.failures[outcome.failure] += 1
                    ks.success = False
                elif outcome.samples:
                    ks.success = True
                    ks.last_success_time = result.started_at + result.duration
                # A round whose only sample was discarded says nothing about success.
            confirm = self._apply_samples(served, result)
            return Recorded(self._apply_canary(state, served, result), confirm)

    @staticmethod
    def _apply_canary(
        state: TargetState, served: TargetState | ModelState, result: RoundResult
    ) -> str | None:
        outcome = result.canary
        if outcome is None:
            return None
        if outcome.failure is not None:
            state.canary_failures[outcome.failure] += 1
        if outcome.output is None:
            return None
        return served.canary.observe(outcome.output, result.started_at + result.duration)

    @staticmethod
    def _apply_discovery(
        state: TargetState | ModelState, server: ServerInfo | None, error: str | None
    ) -> None:
        state.up = server is not None and error is None
        if isinstance(state, TargetState):
            state.server_error = error
        if server is None:
            return
        if state.server is not None and state.server.identity != server.identity:
            state.series.clear()  # another model or ctx: the old figures no longer describe it
            state.model_facts = None
            # Its output is another model's: a new baseline, not a change. A file swapped
            # under the same alias keeps the identity, and the canary counts that.
            state.canary = CanaryState()
        state.server = server

    def _show_bands(self, target: str, state: TargetState | ModelState) -> None:
        """Show the bands the state file restored for the served file before its first round
        here; a series that has had a round already shows its own."""
        server = state.server
        if server is None:
            return
        bands = self.baselines.of_file(target, server.model, server.ctx, _file(server))
        for (depth, kind), figures in bands.items():
            state.series.setdefault(depth, SeriesState()).bands.setdefault(kind, figures)

    def _apply_samples(self, state: TargetState | ModelState, result: RoundResult) -> str | None:
        """Add the round's figures; returns why a confirmation round should follow, if one
        should (the first reason of its series, in depth and kind order)."""
        confirm = None
        server = state.server
        for (depth, kind), f in sorted(round_figures(result.samples).items()):
            tps = f.tokens_per_second
            if tps is None:
                continue
            series = state.series.setdefault(depth, SeriesState())
            if server is not None:
                key = SeriesKey(result.target, server.model, server.ctx, depth, kind)
                series.bands[kind], reason = self.baselines.record(
                    key, _file(server), result.started_at, tps,
                    confirmation=result.confirmation is not None,
                    needed=self._confirmations.get(result.target, 0),
                )  # fmt: skip
                confirm = confirm or reason
            if kind == "prompt":
                series.prompt_tokens += f.tokens
                series.prompt_seconds += f.seconds
                series.prompt_tokens_per_second = tps
                if f.time_to_first_token is not None:
                    series.time_to_first_token = f.time_to_first_token
            else:
                series.generated_tokens += f.tokens
                series.generation_seconds += f.seconds
                series.generation_tokens_per_second = tps
            if f.energy_joules is not None:
                series.energy_joules[kind] = series.energy_joules.get(kind, 0.0) + f.energy_joules
        return confirm


def _file(server: ServerInfo) -> str:
    """The served file's identity for its bands: another path or quant under the same model
    name is another file, with another speed."""
    return f"{server.model_path}|{server.quant}"
