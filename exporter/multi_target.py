"""A router or llama-swap target in the daemon: its models, their discovery and their rounds.

Each discovery and each scheduled round starts by reading the list of models (requests that
name no model, so they load nothing). Only watched models (`models.include`/`exclude`) count;
of those only the loaded ones are asked anything, each through its own `ModelClient` and
`ProbeRunner`, and a model that is not loaded is counted as a `not_loaded` skip.

Scheduling: the models share the GPUs, so one round runs at a time per target, whichever the
model. A scheduled round of the target probes every loaded model, one after another (in name
order, starting one further each round), each admitted by the target's one duty budget: an
owner sees each model's figures refreshed every interval, and the probes' share of wall time
stays within the budget however many models there are (past it, the remaining models are
skipped as `duty_budget`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from exporter.config.resolved import Target
from exporter.host.blocking import BlockingSlot
from exporter.host.proc import find_listening_pid
from exporter.kv.reads import read_facts
from exporter.llama.argv import ArgvError, find_options
from exporter.llama.client import NOT_LOADED, LlamaClient, ServerError
from exporter.llama.fleet import Fleet, FleetActivity
from exporter.llama.router import RouterModel
from exporter.llama.scoped import MultiKind
from exporter.probe.plan import MeasurePlan
from exporter.probe.results import SKIP_DUTY_BUDGET, SKIP_NOT_LOADED, RoundResult
from exporter.probe.runner import ProbeRunner
from exporter.schedule.budget import DutyBudget
from exporter.schedule.clock import SYSTEM_CLOCK, Clock
from exporter.state.store import Store

log = structlog.get_logger(__name__)


@dataclass
class _ModelRuntime:
    runner: ProbeRunner
    plan: MeasurePlan | None  # None: watched, never probed (`enabled: false`)
    facts_key: tuple[object, ...] | None = None  # what the KV facts were worked out for
    model_reads: BlockingSlot = field(default_factory=BlockingSlot)
    pid: int | None = None


class MultiTarget:
    def __init__(
        self,
        target: Target,
        client: LlamaClient,
        kind: MultiKind,
        store: Store,
        budget: DutyBudget,
        *,
        poll: float,
        energy: Callable[[], float | None],
        proc_root: Path,
        local: bool,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.target = target
        self.kind = kind
        self.fleet = Fleet(client, kind)
        self._store = store
        self._budget = budget
        self._poll = poll
        self._energy = energy
        self._proc_root = proc_root
        self._local = local  # whether the models' processes can be on this host
        self._clock = clock
        self._models: dict[str, _ModelRuntime] = {}
        self._turn = 0

    async def discover(self) -> None:
        """The list, then each loaded model's /props and KV facts. Raises ServerError when the
        list cannot be read."""
        for model in await self._list():
            if model.loaded:
                await self._discover_model(model)

    async def probe(
        self, record: Callable[[RoundResult], None], *, only: set[str] | None = None
    ) -> None:
        """One scheduled round of the target: every watched model, in name order from a
        starting point that moves on by one each round, so that a duty budget that admits
        only some of them does not always favour the same ones; or, with `only`, a
        confirmation round of those models. Each model's round goes to `record` as it ends."""
        listed = sorted(await self._list(), key=lambda m: m.name)
        if only is not None:
            listed = [m for m in listed if m.name in only]
        else:
            turn, self._turn = self._turn % max(len(listed), 1), self._turn + 1
            listed = listed[turn:] + listed[:turn]
        for model in listed:
            result = await self._round(model)
            if result is not None:
                record(result)

    async def _round(self, model: RouterModel) -> RoundResult | None:
        if not model.loaded:
            if self.target.models.plan_for(model.name, self.target.plan) is None:
                return None  # not probed by configuration: nothing skipped
            detail = f"model {model.name} is {model.status}: a probe would load it"
            return self._skipped(model.name, SKIP_NOT_LOADED, detail)
        rt = self._runtime(model.name)
        if rt.plan is None:
            return None
        if not self._budget.admits():
            used = self._budget.used()
            detail = f"probes used {used:.1%} of the last {self._budget.window:g} s"
            return self._skipped(model.name, SKIP_DUTY_BUDGET, detail)
        result = await rt.runner.run_round()
        self._budget.spend(result.duration, measured=bool(result.outcomes))
        return result

    def _skipped(self, model: str, reason: str, detail: str) -> RoundResult:
        return RoundResult(
            self.target.name,
            self._clock.wall(),
            0.0,
            None,
            skips=(reason,),
            detail=detail,
            model=model,
        )

    async def _list(self) -> list[RouterModel]:
        listed = [m for m in await self.fleet.models() if self.target.models.watched(m.name)]
        self._store.record_listing(self.target.name, {m.name: m.loaded for m in listed})
        loaded = {m.name for m in listed if m.loaded}
        for gone in [name for name in self._models if name not in loaded]:
            del self._models[gone]  # a model that loads again starts afresh
        return listed

    def _runtime(self, model: str) -> _ModelRuntime:
        rt = self._models.get(model)
        if rt is None:
            plan = self.target.models.plan_for(model, self.target.plan)
            runner = ProbeRunner(
                self.target.name, self.fleet.model_client(model), plan or self.target.plan,
                model=model, activity=FleetActivity(self.fleet, model),
                overlap_poll_interval=self._poll, energy=self._energy,
                clock=self._clock.monotonic, wall_clock=self._clock.wall,
            )  # fmt: skip
            rt = self._models[model] = _ModelRuntime(runner, plan)
        return rt

    async def _discover_model(self, model: RouterModel) -> None:
        rt = self._runtime(model.name)
        name = self.target.name
        try:
            info = await rt.runner.refresh()
        except ServerError as exc:
            if exc.reason == NOT_LOADED:
                return  # unloaded since the list was read: the next list says so
            self._store.record_model_discovery(name, model.name, None, exc.reason)
            log.warning("model_unavailable", target=name, model=model.name, reason=exc.reason,
                        detail=exc.detail)  # fmt: skip
            return
        self._store.record_model_discovery(name, model.name, info, None)
        held = await rt.runner.tokens_held(info)
        rt.pid = self._pid(model, rt.pid)
        key = (info.model_path, info.identity, info.slots, rt.pid, model.args)
        if key == rt.facts_key:
            self._store.record_model_tokens_held(name, model.name, held)
            return
        rt.facts_key = key
        facts, error, retry = await read_facts(
            rt.model_reads, info, self.target.kv, rt.pid, proc_root=self._proc_root,
            target=name, model=model.name, reported_argv=model.args,
        )  # fmt: skip
        if retry:
            rt.facts_key = None
        self._store.record_model_facts(name, model.name, facts, error, held, pid=rt.pid)

    def _pid(self, model: RouterModel, known: int | None) -> int | None:
        """The model's own process: the one listening on the port of its command line."""
        if not self._local:
            return None
        if known is not None and (self._proc_root / str(known)).is_dir():
            return known
        port = _port(model.args)
        if port is None:
            return None
        return find_listening_pid(port, proc_root=self._proc_root).pid


def _port(args: tuple[str, ...]) -> int | None:
    """`--port P` of a child's command line; None where absent, 0 (not yet started) or bad."""
    with contextlib.suppress(ArgvError):
        for option in find_options(args, {"--port": True}):
            if option.value is not None and option.value.isdigit() and int(option.value) > 0:
                return int(option.value)
    return None
