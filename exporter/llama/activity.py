"""Is production traffic in flight? Read from `/slots`, or from `/metrics` as a fallback.

`/slots` is the preferred source: reading it changes nothing on the server. Reading
llama-server's `/metrics` resets its two throughput gauges (`llamacpp:prompt_tokens_seconds`,
`llamacpp:predicted_tokens_seconds`) for every other scraper, so it is used only when `/slots`
is disabled (`--no-slots`) and `/metrics` is enabled (`--metrics`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

from exporter.llama.client import BAD_RESPONSE, NOT_SUPPORTED, ServerApi, ServerError
from exporter.llama.untrusted import MAX_SLOTS, MAX_TOKENS, bounded_int


@dataclass(frozen=True)
class Activity:
    processing: int  # requests being processed, the probe's own included
    deferred: int  # requests queued for a slot (known only from /metrics)
    busy_slots: frozenset[int] | None  # which slots, when /slots says
    # The id of each slot's current or last task, when /slots says: a changed id shows that a
    # request ran in that slot since, even one too short for any poll to see it in flight.
    tasks: tuple[tuple[int, int], ...] | None = None
    # Tokens the slots hold (prompt and generated, `n_prompt_tokens`), when /slots says.
    tokens_held: int | None = None

    @property
    def idle(self) -> bool:
        return self.processing == 0 and self.deferred == 0

    def others_active(self, probe_slot: int) -> bool:
        """True when a request other than the probe's own is in flight or waiting."""
        if self.deferred > 0:
            return True
        if self.busy_slots is not None:
            return bool(self.busy_slots - {probe_slot})
        return self.processing > 1

    def others_started_since(self, earlier: Activity, probe_slot: int) -> bool:
        """True when a slot other than the probe's took a new task after `earlier` was read."""
        if self.tasks is None or earlier.tasks is None:
            return False
        before = dict(earlier.tasks)
        return any(task != before.get(slot) for slot, task in self.tasks if slot != probe_slot)


# Task ids only count up; past this one is not a task id.
_MAX_ID = 2**63 - 1


def _slot_id(slot: Any) -> int:
    return bounded_int(slot["id"], 0, MAX_SLOTS, "slot id")


def parse_slots(data: Any) -> Activity:
    if not isinstance(data, list) or len(data) > MAX_SLOTS:
        raise ServerError(BAD_RESPONSE, "/slots is not a JSON array of slots")
    try:
        busy = frozenset(_slot_id(s) for s in data if s.get("is_processing"))
        tasks = tuple(
            (_slot_id(s), int(s["id_task"]))
            for s in data
            if isinstance(s.get("id_task"), int) and abs(s["id_task"]) <= _MAX_ID
        )
        held = sum(
            bounded_int(s.get("n_prompt_tokens", 0), 0, MAX_TOKENS, "n_prompt_tokens") for s in data
        )
    except (KeyError, TypeError, ValueError, AttributeError):
        raise ServerError(BAD_RESPONSE, "/slots entries lack id or is_processing") from None
    return Activity(len(busy), 0, busy, tasks, held)


def parse_metrics(text: str) -> Activity:
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("llamacpp:requests_"):
            name, _, value = line.partition(" ")
            try:
                number = float(value)
            except ValueError:
                number = math.nan
            if not 0 <= number <= _MAX_ID:  # NaN fails this too
                raise ServerError(BAD_RESPONSE, "/metrics has a bad requests_ value") from None
            values[name] = number
    if "llamacpp:requests_processing" not in values:
        raise ServerError(BAD_RESPONSE, "/metrics lacks llamacpp:requests_processing")
    return Activity(
        int(values["llamacpp:requests_processing"]),
        int(values.get("llamacpp:requests_deferred", 0)),
        None,
    )


class ActivitySource(Protocol):
    """Whether production is in flight: one server (`ActivityReader`), or every model behind
    a router or llama-swap (`exporter.llama.fleet.FleetActivity`)."""

    async def read(self, metrics_enabled: bool) -> Activity | None: ...

    def reset(self) -> None: ...


class ActivityReader:
    """Remembers which source works, so a server without /slots is not asked at every poll of
    a round; `reset` at each discovery asks again, since /slots may come back at any time."""

    def __init__(self, client: ServerApi) -> None:
        self._client = client
        self._slots_disabled = False

    async def read(self, metrics_enabled: bool) -> Activity | None:
        """The current activity, or None when the server offers no way to tell."""
        if not self._slots_disabled:
            try:
                return parse_slots(await self._client.get_json("/slots"))
            except ServerError as exc:
                if exc.reason != NOT_SUPPORTED:
                    raise
                self._slots_disabled = True
        if metrics_enabled:
            return parse_metrics(await self._client.get_text("/metrics"))
        return None

    def reset(self) -> None:
        self._slots_disabled = False
