"""The long-running exporter: probes on a schedule, serves /metrics, stops cleanly on a signal."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import structlog
from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector

from exporter.collectors import exporter_collectors
from exporter.collectors.gpu import GpuCollector
from exporter.collectors.guard import SnapshotCollector
from exporter.config.resolved import Config, Target
from exporter.gpu.nvml import Nvml
from exporter.host.address import local_port, split_listen_address
from exporter.host.blocking import BlockingSlot
from exporter.host.targets import TargetProcesses
from exporter.kv.reads import read_facts
from exporter.llama.client import CONNECT, LlamaClient, ServerError
from exporter.llama.discovery import ServerInfo
from exporter.llama.redact import redacted_text
from exporter.llama.router import TargetKind, detect_kind
from exporter.multi_target import MultiTarget
from exporter.probe.results import DISCARD_OVERLAP, SKIP_IN_PROGRESS, RoundResult, round_figures
from exporter.probe.runner import ProbeRunner
from exporter.schedule.budget import DutyBudget
from exporter.schedule.clock import SYSTEM_CLOCK, Clock
from exporter.schedule.rounds import BudgetedRounds
from exporter.schedule.scheduler import Scheduler
from exporter.state.storage import BandStorage
from exporter.state.store import Recorded, Store
from exporter.watchdog import ShutdownWatchdog
from exporter.web.endpoint import WebServer, make_app
from exporter.web.webconfig import ReloadableWebConfig, secure_app

log = structlog.get_logger(__name__)

# SIGTERM must end the process within 5 s; in-flight probes get this long to close their streams.
SHUTDOWN_GRACE_SECONDS = 3.0
# ...and past this, from the stop request, the watchdog ends the process, whatever still runs:
# after the grace and the closing of the web server and clients, before the 5 s are up.
SHUTDOWN_DEADLINE_SECONDS = 4.5


@dataclass
class _TargetRuntime:
    target: Target
    client: LlamaClient
    runner: ProbeRunner
    rounds: BudgetedRounds
    model_key: tuple[object, ...] | None = None  # what the model facts were worked out for
    # The GGUF header read: a file the server names may sit on a mount that hangs.
    model_reads: BlockingSlot = field(default_factory=BlockingSlot)
    # What serves at the URL: the configured mode, or what `detect_kind` found (None until
    # then, and again after a connection failure: another program may answer there now).
    kind: TargetKind | None = None
    multi: MultiTarget | None = None  # a router's or llama-swap's models


def round_event(result: RoundResult) -> dict[str, object]:
    """The figures of one round, flat, for its log line."""
    event: dict[str, object] = {
        "target": result.target,
        "duration_s": round(result.duration, 3),
    }
    if result.server is not None:
        event.update(model=result.server.model, ctx=result.server.ctx)
    # The figures the gauges show.
    for (depth, kind), f in round_figures(result.samples).items():
        tps, ttft = f.tokens_per_second, f.time_to_first_token
        if tps is not None:
            event[f"{'pp' if kind == 'prompt' else 'tg'}_d{depth}_tps"] = round(tps, 2)
        if ttft is not None:
            event[f"ttft_d{depth}_ms"] = round(ttft * 1000, 1)
    failures = {k: o.failure for k, o in result.outcomes.items() if o.failure}
    discards = {k: list(o.discards) for k, o in result.outcomes.items() if o.discards}
    if failures:
        event["failures"] = failures
    if discards:
        event["discarded"] = discards
    if result.skips:
        event["skipped"] = list(result.skips)
    if result.canary is not None and result.canary.output is not None:
        event["canary"] = result.canary.output.fingerprint
    elif result.canary is not None:
        event.update(canary_failure=result.canary.failure, canary_detail=result.canary.detail)
    if result.detail:
        event["detail"] = result.detail
    if result.confirmation is not None:
        event["confirmation"] = result.confirmation
    return event


class Daemon:
    # Set by `run` when given an exit deadline; armed by the stop request.
    _watchdog: ShutdownWatchdog | None = None

    def __init__(
        self,
        config: Config,
        *,
        transport_factory: Callable[[Target], httpx.AsyncBaseTransport | None] = lambda t: None,
        overlap_poll_interval: float = 0.5,
        first_probe_delay: float | None = None,
        nvml: Nvml | None = None,
        clock: Clock = SYSTEM_CLOCK,
        on_round: Callable[[RoundResult], None] = lambda _: None,
        storage_slot: BlockingSlot | None = None,
    ) -> None:
        self.config = config
        # First: a bad web config file must stop the start before anything else is set up.
        web_config = ReloadableWebConfig(config.web_config_file) if config.web_config_file else None
        self.store = Store(
            [(t.name, redacted_text(t.url)) for t in config.targets],
            {t.name: t.schedule.confirmation_rounds for t in config.targets},
        )
        self.storage = None
        if config.storage_path is not None:
            names = tuple(t.name for t in config.targets)
            self.storage = BandStorage(config.storage_path, self.store, names, slot=storage_slot)
        self._clock = clock
        self._on_round = on_round
        self._nvml = (nvml or Nvml()) if config.gpu else None
        energy = self._nvml.energy_joules if self._nvml is not None else lambda: None
        self._runtimes = {
            t.name: self._runtime(t, transport_factory(t), overlap_poll_interval, energy, clock)
            for t in config.targets
        }
        self._poll, self._energy = overlap_poll_interval, energy
        self._first_probe_delay = first_probe_delay
        extra: list[tuple[str, SnapshotCollector]] = []
        self._processes = TargetProcesses(config.targets)
        if self._nvml is not None:
            extra.append(("gpu", GpuCollector(self._nvml, self._processes.pids)))
        self.registry = CollectorRegistry()
        self.registry.register(
            exporter_collectors(
                self.store.snapshot, {t.name: t.schedule for t in config.targets}, extra=extra
            )
        )
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        host, port = split_listen_address(config.listen_address)
        app = make_app(self.registry, self.store.snapshot, config.telemetry_path)
        tls = None
        if web_config is not None:
            app = secure_app(app, web_config)
            self.registry.register(web_config)  # its reload metrics
            tls = web_config.tls_context if web_config.tls_enabled else None
        self.web = WebServer(app, host, port, tls)
        self._stop = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    @staticmethod
    def _runtime(
        target: Target,
        transport: httpx.AsyncBaseTransport | None,
        poll: float,
        energy: Callable[[], float | None],
        clock: Clock,
    ) -> _TargetRuntime:
        # Each request may take the whole round's timeout; the round itself enforces it.
        client = LlamaClient(
            target.url, target.api_key, timeout=target.plan.timeout,
            limits=target.limits, proxy=target.proxy, transport=transport,
            clock=clock.monotonic,
        )  # fmt: skip
        runner = ProbeRunner(
            target.name, client, target.plan, overlap_poll_interval=poll, energy=energy,
            clock=clock.monotonic, wall_clock=clock.wall,
        )  # fmt: skip
        budget = DutyBudget(
            target.schedule.duty_budget, target.schedule.duty_window, clock=clock.monotonic
        )
        rounds = BudgetedRounds(target.name, runner.run_round, budget, wall_clock=clock.wall)
        rt = _TargetRuntime(target, client, runner, rounds)
        if target.mode != "auto":
            rt.kind = target.mode
        return rt

    async def _kind(self, rt: _TargetRuntime) -> TargetKind | None:
        """What serves at the target, found once from reads that name no model; None where
        it cannot be told now (the round then runs as for a single server, whose requests
        name no model either, and fails as it would)."""
        if rt.kind is None:
            try:
                rt.kind = await detect_kind(rt.client)
            except ServerError:
                return None
            log.info("target_kind", target=rt.target.name, kind=rt.kind)
        if rt.kind == "single":
            rt.multi = None
        elif rt.multi is None or rt.multi.kind != rt.kind:
            rt.multi = MultiTarget(
                rt.target, rt.client, rt.kind, self.store, rt.rounds.budget,
                poll=self._poll, energy=self._energy, proc_root=self._processes.proc_root,
                local=local_port(rt.target.url) is not None, clock=self._clock,
            )  # fmt: skip
        self.store.record_kind(rt.target.name, rt.kind)
        return rt.kind

    def _connection_lost(self, rt: _TargetRuntime, error: ServerError) -> None:
        if error.reason == CONNECT and rt.target.mode == "auto":
            rt.kind = None  # what answers when the port opens again may be another program

    async def discover(self, name: str) -> None:
        rt = self._runtimes[name]
        await self._kind(rt)
        try:
            if rt.multi is not None:
                await rt.multi.discover()
                info = None
            else:
                info = await rt.runner.refresh()
        except ServerError as exc:
            self._connection_lost(rt, exc)
            self.store.record_discovery(name, None, exc.reason)
            log.warning("server_unavailable", target=name, reason=exc.reason, detail=exc.detail)
        else:
            if info is not None:
                self.store.record_discovery(name, info, None)
                await self._refresh_model(rt, info)
        self.store.record_duty(name, rt.rounds.budget.used())

    async def _refresh_model(self, rt: _TargetRuntime, info: ServerInfo) -> None:
        """Work the KV cache out again when the model, ctx or process changed; read usage."""
        name = rt.target.name
        held = await rt.runner.tokens_held(info)
        pid = self._processes.pids().get(name)
        key = (info.model_path, info.identity, info.slots, pid)
        if key == rt.model_key:
            self.store.record_tokens_held(name, held)
            return
        rt.model_key = key
        facts, error, retry = await read_facts(
            rt.model_reads, info, rt.target.kv, pid,
            proc_root=self._processes.proc_root, target=name,
        )  # fmt: skip
        if retry:
            rt.model_key = None  # read again at the next discovery, once the thread is free
        self.store.record_model(name, facts, error, held)

    async def probe(self, name: str) -> RoundResult | None:
        """One scheduled round: the server's, or each loaded model's behind a router or
        llama-swap, then the confirmation rounds any of their series asks for
        (`exporter.state.baseline`); returns the last round's result (None where no model
        was probed)."""
        rt = self._runtimes[name]
        schedule = rt.target.schedule
        await self._kind(rt)
        last, confirm = await self._round(rt, {})
        for _ in range(schedule.confirmation_rounds):
            if not confirm:
                break
            await asyncio.sleep(schedule.confirmation_delay)
            result, confirm = await self._round(rt, confirm)
            last = result or last
        if self.storage is not None:
            await self.storage.save()
        return last

    async def _round(
        self, rt: _TargetRuntime, confirming: dict[str | None, str]
    ) -> tuple[RoundResult | None, dict[str | None, str]]:
        """A round of the target (`confirming` empty), or a confirmation round of the models
        it names (None: the single server), each with its reason. Returns the last result and
        the confirmations the recorded rounds ask for next, by model."""
        name = rt.target.name
        asked: dict[str | None, str] = {}
        recorded: list[RoundResult] = []

        def record(result: RoundResult) -> None:
            reason = confirming.get(result.model)
            if reason is not None:
                result = dataclasses.replace(result, confirmation=reason)
            recorded.append(result)
            wanted = self._record(result).confirm
            if wanted is not None:
                asked[result.model] = wanted

        if rt.multi is None:
            if confirming and None not in confirming:
                return None, {}
            result = await rt.rounds.next()
            if result.server_error is not None:
                self._connection_lost(rt, ServerError(result.server_error, result.detail))
            record(result)
            return recorded[-1], asked
        try:
            only = {m for m in confirming if m is not None} if confirming else None
            await rt.multi.probe(record, only=only)
            return (recorded[-1] if recorded else None), asked
        except ServerError as exc:
            self._connection_lost(rt, exc)
            self.store.record_discovery(name, None, exc.reason)
            log.warning("server_unavailable", target=name, reason=exc.reason, detail=exc.detail)
            return None, {}
        finally:
            self.store.record_duty(name, rt.rounds.budget.used())

    def _record(self, result: RoundResult) -> Recorded:
        name = result.target
        recorded = self.store.record_round(result)
        self.store.record_duty(name, self._runtimes[name].rounds.budget.used())
        failed = any(o.failure for o in result.outcomes.values())
        canary = result.canary
        failed |= canary is not None and canary.failure not in (None, DISCARD_OVERLAP)
        (log.warning if failed else log.info)("probe_round", **round_event(result))
        replaced = recorded.canary_replaced
        if replaced is not None and canary is not None and canary.output is not None:
            server = result.server
            log.warning(
                "canary_output_changed", target=name, model=server.model if server else None,
                was=replaced, now=canary.output.fingerprint,
            )  # fmt: skip
        self._on_round(result)
        return recorded

    def skipped_in_progress(self, name: str) -> None:
        self.store.record_skip(name, SKIP_IN_PROGRESS)
        log.info("probe_round", target=name, skipped=[SKIP_IN_PROGRESS])

    def request_stop(self) -> None:
        if self._watchdog is not None:
            self._watchdog.arm()
        self._stop.set()

    def request_stop_threadsafe(self) -> None:
        """For callers outside the daemon's event loop (tests, embedding)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.request_stop)

    async def run(self, *, handle_signals: bool = True, exit_deadline: float | None = None) -> None:
        """Serve and probe until SIGTERM or SIGINT (or `request_stop`), then stop cleanly.

        With `exit_deadline` (the command line's run, which owns the process), a stop request
        arms a watchdog that ends the process that many seconds later if it is still there
        (`exporter.watchdog`). Tests that run the daemon in their own process leave it None.
        """
        loop = asyncio.get_running_loop()
        self._loop = loop
        signals = (signal.SIGTERM, signal.SIGINT) if handle_signals else ()
        for sig in signals:
            loop.add_signal_handler(sig, self.request_stop)
        self.web.start()
        if self.storage is not None:
            await self.storage.load(self._clock.wall())
        log.info(
            "exporter_started",
            listen=self.config.listen_address,
            port=self.web.port,
            targets=[redacted_text(t.url) for t in self.config.targets],
        )
        scheduler = Scheduler(loop, on_max_instances=self.skipped_in_progress)
        if exit_deadline is not None:
            self._watchdog = ShutdownWatchdog(exit_deadline, lambda: {"jobs": scheduler.running()})
        for name, rt in self._runtimes.items():
            schedule = rt.target.schedule
            delay = self._first_probe_delay
            if delay is None:
                delay = schedule.first_round_delay()
            scheduler.add(
                f"discover:{name}", self.discover, name,
                interval=schedule.discovery_interval, jitter=0.0, first_delay=0.0,
            )  # fmt: skip
            scheduler.add(
                f"probe:{name}", self.probe, name,
                interval=schedule.interval, jitter=schedule.jitter, first_delay=delay,
            )  # fmt: skip
        scheduler.start()
        try:
            await self._stop.wait()
        finally:
            if self._watchdog is not None:
                self._watchdog.arm()  # the stop may come from an exception, not a request
            log.info("exporter_stopping")
            left = await scheduler.shutdown(SHUTDOWN_GRACE_SECONDS)
            if left:
                # Blocked outside the loop or deaf to cancellation; the exit leaves them behind.
                log.warning("jobs_still_running", jobs=left, grace_s=SHUTDOWN_GRACE_SECONDS)
            self.web.close()
            for rt in self._runtimes.values():
                await rt.client.aclose()
            if self._nvml is not None:
                self._nvml.close()
            for sig in signals:
                loop.remove_signal_handler(sig)
            log.info("exporter_stopped")
