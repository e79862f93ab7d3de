"""One probe round against one llama-server: discover, check it is idle, measure, validate.

A round measures, for each depth D of the plan (llama-bench's `@ dD`):

* fill: D fresh tokens into the probe's slot (`cache_prompt: false`, so nothing is reused);
* PP: the same D tokens plus N fresh ones with `cache_prompt: true`, so the server reuses the
  D filled tokens and decodes exactly the N new ones (`cache_n == D`, `prompt_n == N`);
* TG: the D tokens plus one fresh token, `n_predict: M`, `ignore_eos`, giving M-1 timed steps.

At depth 0 there is no fill and both requests use `cache_prompt: false`. Speeds come from the
server's own `timings`; the time to first token is the client's, over the streamed PP request.
After the samples, the round may send the output canary (`exporter.probe.canary`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from exporter.llama.activity import Activity, ActivityReader, ActivitySource, parse_slots
from exporter.llama.client import (
    CONTEXT_EXCEEDED,
    NOT_LOADED,
    TIMEOUT,
    Completion,
    ServerApi,
    ServerError,
)
from exporter.llama.discovery import ServerInfo, discover
from exporter.probe import canary
from exporter.probe.plan import MeasurePlan
from exporter.probe.results import (
    DISCARD_OVERLAP,
    INVALID_CACHE_N,
    INVALID_PREDICTED_N,
    INVALID_PROMPT_N,
    KINDS,
    SKIP_BUSY,
    SKIP_BUSY_UNKNOWN,
    SKIP_DEPTH_EXCEEDS_CONTEXT,
    SKIP_NOT_LOADED,
    SKIP_SLEEPING,
    SLOT_OUT_OF_RANGE,
    CanaryOutcome,
    Kind,
    KindOutcome,
    RoundResult,
    Sample,
)
from exporter.probe.validate import timing_problem

T = TypeVar("T")


class _OverlapError(Exception):
    """Production traffic ran beside the probe: its figures are not clean."""


class _InvalidSampleError(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass
class _KindLog:
    samples: list[Sample] = field(default_factory=list)
    failure: str | None = None
    discards: list[str] = field(default_factory=list)
    duration: float = 0.0
    attempted: bool = False

    def freeze(self, kind: Kind) -> KindOutcome:
        return KindOutcome(
            kind,
            tuple(self.samples),
            self.failure,
            tuple(self.discards),
            self.duration,
            self.attempted,
        )


class ProbeRunner:
    """Runs probe rounds for one target. Not re-entrant: the scheduler runs one at a time."""

    def __init__(
        self,
        target: str,
        client: ServerApi,
        plan: MeasurePlan,
        *,
        model: str | None = None,
        activity: ActivitySource | None = None,
        overlap_poll_interval: float = 0.5,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        energy: Callable[[], float | None] = lambda: None,
        on_sample: Callable[[Sample], None] = lambda _: None,
    ) -> None:
        self.target = target
        self.plan = plan
        self._client = client
        # Behind a router or llama-swap: the model's name, which labels its figures whatever
        # alias its server gives itself, and the busy check of every model that shares the
        # GPUs (`exporter.llama.fleet`).
        self.model = model
        self._activity: ActivitySource = activity or ActivityReader(client)
        self._poll = overlap_poll_interval
        self._rng = rng or random.Random()
        self._clock = clock
        self._wall = wall_clock
        self._energy = energy
        self._on_sample = on_sample
        self.last_server: ServerInfo | None = None
        # The token the probe slot holds right after the depth prefix. The next request's first
        # fresh token must differ from it, or the server would reuse one token more than the
        # prefix and decode one fewer: a tiny vocabulary makes that collision common.
        self._after_prefix: int | None = None

    async def refresh(self) -> ServerInfo:
        """Read /props and /v1/models; raises ServerError."""
        info = await discover(self._client)
        if self.model is not None:
            info = dataclasses.replace(info, model=self.model)
        # A skip for want of /slots must not outlive its cause: /slots can come back on the
        # same model and ctx (a restart with other flags), so each discovery asks it again.
        self._activity.reset()
        self.last_server = info
        return info

    async def tokens_held(self, info: ServerInfo) -> int | None:
        """Tokens in all slots, from /slots; None where that would wake or cannot be read."""
        if info.sleeping or not info.slots_endpoint:
            return None
        try:
            return parse_slots(await self._client.get_json("/slots")).tokens_held
        except ServerError:
            return None

    async def run_round(self) -> RoundResult:
        """One round of the plan. Whether one may run now is the scheduler's question."""
        started_wall, started = self._wall(), self._clock()
        kinds = self.plan.kinds
        logs: dict[Kind, _KindLog] = {k: _KindLog() for k in KINDS}
        skips: list[str] = []
        info: ServerInfo | None = None
        server_error: str | None = None
        detail = ""
        measured = False
        deadline = asyncio.timeout(self.plan.timeout)
        try:
            async with deadline:
                info = await self.refresh()
                skip, detail = await self._precheck(info)
                if skip is not None:
                    skips.append(skip)
                else:
                    detail = await self._measure(info, logs, skips, kinds)
                    measured = True
        except TimeoutError:
            detail = f"probe round exceeded its {self.plan.timeout:g} s timeout"
            server_error = TIMEOUT if info is None else None
            self._fail_all(logs, TIMEOUT, kinds)
        except ServerError as exc:
            detail = exc.detail
            if exc.reason == NOT_LOADED:
                # The model unloaded: what it measured before stays valid, the rest is not
                # a failure of a server that was asked nothing it could serve.
                skips.append(SKIP_NOT_LOADED)
            else:
                server_error = exc.reason if info is None else None
                self._fail_all(logs, exc.reason, kinds)
        checked = None
        # Only after a round that measured undisturbed: production that overlapped a sample
        # may still be running, and a round that broke off has no idle server to ask.
        overlapped = any(log.discards for log in logs.values())
        if self.plan.canary and measured and not overlapped and info is not None:
            checked = await self._canary(info, deadline.when())
        duration = self._clock() - started
        return RoundResult(
            self.target,
            started_wall,
            duration,
            info,
            server_error=server_error,
            skips=tuple(skips),
            outcomes={k: logs[k].freeze(k) for k in KINDS if logs[k].attempted},
            detail=detail,
            canary=checked,
            model=self.model,
        )

    async def _canary(self, info: ServerInfo, deadline: float | None) -> CanaryOutcome | None:
        """The fixed greedy request, within what is left of the round's timeout. Its failure
        is its own: the samples before it stay valid."""
        slot = self._probe_slot(info)  # checked by the measuring already: it cannot raise
        # Its prompt and every generated token but the last share the slot, as a depth's do.
        if not fits_in_context(canary.PROMPT_TOKENS, 0, canary.GENERATED_TOKENS, info.ctx):
            return CanaryOutcome(failure=CONTEXT_EXCEEDED, detail=f"ctx {info.ctx} too small")
        body = canary.request_body(info.n_vocab, slot)
        try:
            async with asyncio.timeout_at(deadline):
                answer = await self._guarded(
                    lambda: self._client.complete_whole(body, self.plan.timeout), slot, info
                )
            return CanaryOutcome(canary.read_answer(answer, info.n_vocab))
        except TimeoutError:
            return CanaryOutcome(failure=TIMEOUT, detail="canary ran past the round's timeout")
        except ServerError as exc:
            if exc.reason == NOT_LOADED:
                return None  # the model unloaded: no answer, and no failure of it either
            return CanaryOutcome(failure=exc.reason, detail=exc.detail)
        except _OverlapError:
            return CanaryOutcome(failure=DISCARD_OVERLAP, detail="production overlapped it")

    @staticmethod
    def _fail_all(logs: dict[Kind, _KindLog], reason: str, kinds: tuple[Kind, ...]) -> None:
        """A round that breaks off fails every kind: none of them got a trustworthy sample."""
        for log in (logs[k] for k in kinds):
            log.attempted = True
            log.failure = log.failure or reason

    async def _precheck(self, info: ServerInfo) -> tuple[str | None, str]:
        if info.sleeping:
            # A probe would wake the server and reload the model: monitoring must not do that.
            return SKIP_SLEEPING, "server is sleeping (--sleep-idle-seconds)"
        activity = await self._activity.read(info.metrics_endpoint)
        if activity is None:
            if self.plan.require_busy_check:
                return SKIP_BUSY_UNKNOWN, "server has /slots disabled and /metrics off"
            return None, ""
        if not activity.idle:
            return SKIP_BUSY, f"{activity.processing + activity.deferred} requests in flight"
        return None, ""

    def _probe_slot(self, info: ServerInfo) -> int:
        slot = self.plan.slot if self.plan.slot is not None else info.slots - 1
        if slot >= info.slots:
            raise ServerError(
                SLOT_OUT_OF_RANGE, f"probe slot {slot} but the server has {info.slots} slots"
            )
        return slot

    async def _measure(
        self,
        info: ServerInfo,
        logs: dict[Kind, _KindLog],
        skips: list[str],
        kinds: tuple[Kind, ...],
    ) -> str:
        slot = self._probe_slot(info)
        n_prompt, n_gen = self.plan.prompt_tokens, self.plan.generation_tokens
        detail = ""
        at_risk: Kind = "prompt"  # the kind whose sample an overlap would spoil
        try:
            warm_prompt = max(n_prompt, 1)  # a TG-only plan still warms the generation path
            if self.plan.warmup and warm_prompt + 2 < info.ctx:
                # Like llama-bench's warm-up run: the first request after a pause pays for cold
                # caches and clocks, which is noise, not the server's speed.
                await self._unmeasured(self._fresh(info, warm_prompt), 2, slot, info)
            for depth in self.plan.depths:
                if not fits_in_context(depth, n_prompt, n_gen, info.ctx):
                    skips.append(SKIP_DEPTH_EXCEEDS_CONTEXT)
                    detail = f"depth {depth} does not fit in ctx {info.ctx}"
                    continue
                prefix = self._fresh(info, depth)
                if depth > 0:
                    # The fill is not timed: only the new tokens on top of it are measured.
                    at_risk = "prompt"
                    await self._unmeasured(prefix, 1, slot, info)
                    # Its one sampled token is never decoded: the slot ends at the prefix.
                    self._after_prefix = None
                for _ in range(self.plan.repetitions):
                    for kind in kinds:
                        at_risk = kind
                        log = logs[kind]
                        log.attempted = True
                        began = self._clock()
                        joules_before = self._energy()
                        try:
                            sample = await self._sample(kind, info, depth, prefix, slot)
                            sample = self._with_energy(sample, joules_before)
                            log.samples.append(sample)
                            self._on_sample(sample)
                        except _InvalidSampleError as exc:
                            log.failure = log.failure or exc.reason
                            detail = str(exc)
                        finally:
                            log.duration += self._clock() - began
        except _OverlapError:
            logs[at_risk].attempted = True
            logs[at_risk].discards.append(DISCARD_OVERLAP)
            return "a production request overlapped the probe; sample discarded, round ended"
        return detail

    def _with_energy(self, sample: Sample, before: float | None) -> Sample:
        after = self._energy()
        # Busy-awareness makes the GPUs' whole draw the probe's: nothing else ran meanwhile.
        # A counter that went back (driver reload) gives no figure rather than a wrong one.
        if before is None or after is None or after < before:
            return sample
        return dataclasses.replace(sample, energy_joules=after - before)

    async def _unmeasured(
        self, tokens: list[int], n_predict: int, slot: int, info: ServerInfo
    ) -> None:
        """A request whose timings are not used (warm-up, depth fill); may raise _OverlapError."""
        body = self._body(tokens, n_predict, cache=False, slot=slot)
        await self._completed(body, slot, info)

    async def _sample(
        self, kind: Kind, info: ServerInfo, depth: int, prefix: list[int], slot: int
    ) -> Sample:
        cache = depth > 0
        if kind == "prompt":
            n = self.plan.prompt_tokens
            body = self._body(prefix + self._suffix(info, n), 1, cache=cache, slot=slot)
            done = await self._completed(body, slot, info)
            t = done.timings
            _expect(INVALID_PROMPT_N, "prompt_n", t.prompt_n, n)
            _expect(INVALID_CACHE_N, "cache_n", t.cache_n, depth)
            _check_timings(kind, done)
            return Sample(kind, depth, t.prompt_n, t.prompt_ms / 1000, done.first_chunk_seconds, t)
        m = self.plan.generation_tokens
        body = self._body(prefix + self._suffix(info, 1), m, cache=cache, slot=slot)
        done = await self._completed(body, slot, info)
        t = done.timings
        _expect(INVALID_PROMPT_N, "prompt_n", t.prompt_n, 1)
        _expect(INVALID_CACHE_N, "cache_n", t.cache_n, depth)
        _expect(INVALID_PREDICTED_N, "predicted_n", t.predicted_n, m)
        _check_timings(kind, done)
        # predicted_ms covers the steps after the first token, which comes with the prompt.
        return Sample(kind, depth, t.predicted_n - 1, t.predicted_ms / 1000, None, t)

    async def _completed(self, body: dict[str, Any], slot: int, info: ServerInfo) -> Completion:
        return await self._guarded(
            lambda: self._client.complete(body, self.plan.timeout), slot, info
        )

    async def _guarded(self, request: Callable[[], Awaitable[T]], slot: int, info: ServerInfo) -> T:
        """Run a request while watching for production traffic; abort it if some arrives.

        The request is made here, after the first read of the activity: made by the caller, it
        would be left never awaited when that read fails or the round is cancelled."""
        before = await self._activity.read(info.metrics_endpoint)
        task = asyncio.ensure_future(request())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=self._poll)
                if done:
                    break
                if self._overlapped(await self._activity.read(info.metrics_endpoint), before, slot):
                    raise _OverlapError
            result = task.result()
            # A request that came after the last poll shared batches with the probe too.
            if self._overlapped(await self._activity.read(info.metrics_endpoint), before, slot):
                raise _OverlapError
            return result
        finally:
            if not task.done():
                # Closing the stream makes llama-server drop the task: production stops waiting.
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    @staticmethod
    def _overlapped(now: Activity | None, before: Activity | None, slot: int) -> bool:
        """Whether production ran beside the probe: another slot is busy now, or shows a new
        task id, a request that came and went between two polls (on a loaded machine a poll
        can take longer than a short request)."""
        if now is None:
            return False
        started = before is not None and now.others_started_since(before, slot)
        return now.others_active(slot) or started

    def _suffix(self, info: ServerInfo, count: int) -> list[int]:
        """Fresh tokens to follow the prefix, never starting as the slot's current suffix does."""
        tokens = self._fresh(info, count)
        while info.n_vocab > 1 and tokens[0] == self._after_prefix:
            tokens[0] = self._rng.randrange(info.n_vocab)
        self._after_prefix = tokens[0]
        return tokens

    def _fresh(self, info: ServerInfo, count: int) -> list[int]:
        # Random ids as llama-bench draws them: never seen before, so no cache can serve them.
        return [self._rng.randrange(info.n_vocab) for _ in range(count)]

    @staticmethod
    def _body(tokens: list[int], n_predict: int, *, cache: bool, slot: int) -> dict[str, Any]:
        return {
            "prompt": tokens,
            "n_predict": n_predict,
            "cache_prompt": cache,
            "id_slot": slot,
            "ignore_eos": True,
            "temperature": 0,
            "samplers": ["top_k"],
            "top_k": 1,
            # The final event would otherwise echo the whole prompt as text: megabytes at a
            # deep depth, for nothing the exporter reads.
            "response_fields": ["stop", "timings"],
        }


def fits_in_context(depth: int, prompt_tokens: int, generation_tokens: int, n_ctx: int) -> bool:
    """Whether a depth's PP and TG requests fit in a slot of `n_ctx` tokens."""
    # The server refuses a prompt that fills the slot, and stops generating at its end.
    return depth + max(prompt_tokens, generation_tokens + 1) + 1 <= n_ctx


def _check_timings(kind: Kind, done: Completion) -> None:
    problem = timing_problem(kind, done)
    if problem is not None:
        raise _InvalidSampleError(*problem)


def _expect(reason: str, name: str, got: int, want: int) -> None:
    if got != want:
        raise _InvalidSampleError(reason, f"server reported {name}={got}, probe asked for {want}")
