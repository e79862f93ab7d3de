"""The long-running exporter: probes on a schedule, serves /metrics, stops cleanly on a signal."""

from __future__ import annotations

import asyncio
import random
import signal
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import structlog
from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector

from exporter.collectors import exporter_collectors
from exporter.collectors.gpu import GpuCollector
from exporter.collectors.guard import SnapshotCollector
from exporter.config.resolved import Config, Target
from exporter.config.settings import split_listen_address
from exporter.gpu.nvml import Nvml
from exporter.host.proc import read_cmdline, read_environ
from exporter.host.targets import TargetProcesses
from exporter.kv.facts import FactsError, model_facts
from exporter.llama.client import LlamaClient, ServerError
from exporter.llama.discovery import ServerInfo
from exporter.probe.results import SKIP_IN_PROGRESS, RoundResult, round_figures
from exporter.probe.runner import ProbeRunner
from exporter.schedule.budget import DutyBudget
from exporter.schedule.rounds import BudgetedRounds
from exporter.schedule.scheduler import Scheduler
from exporter.state.store import Store
from exporter.web.endpoint import WebServer, make_app
from exporter.web.webconfig import ReloadableWebConfig, secure_app

log = structlog.get_logger(__name__)

# SIGTERM must end the process within 5 s; in-flight probes get this long to close their streams.
SHUTDOWN_GRACE_SECONDS = 3.0


@dataclass
class _TargetRuntime:
    target: Target
    client: LlamaClient
    runner: ProbeRunner
    rounds: BudgetedRounds
    model_key: tuple[object, ...] | None = None  # what the model facts were worked out for


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
    if result.detail:
        event["detail"] = result.detail
    return event


class Daemon:
    def __init__(
        self,
        config: Config,
        *,
        transport_factory: Callable[[Target], httpx.AsyncBaseTransport | None] = lambda t: None,
        overlap_poll_interval: float = 0.5,
        first_probe_delay: float | None = None,
        nvml: Nvml | None = None,
    ) -> None:
        self.config = config
        # First: a bad web config file must stop the start before anything else is set up.
        web_config = ReloadableWebConfig(config.web_config_file) if config.web_config_file else None
        self.store = Store([(t.name, t.url) for t in config.targets])
        self._nvml = (nvml or Nvml()) if config.gpu else None
        energy = self._nvml.energy_joules if self._nvml is not None else lambda: None
        self._runtimes = {
            t.name: self._runtime(t, transport_factory(t), overlap_poll_interval, energy)
            for t in config.targets
        }
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
    ) -> _TargetRuntime:
        # Each request may take the whole round's timeout; the round itself enforces it.
        client = LlamaClient(target.url, target.api_key, timeout=target.plan.timeout,
                             transport=transport)  # fmt: skip
        runner = ProbeRunner(
            target.name, client, target.plan, overlap_poll_interval=poll, energy=energy
        )
        budget = DutyBudget(target.schedule.duty_budget, target.schedule.duty_window)
        return _TargetRuntime(
            target, client, runner, BudgetedRounds(target.name, runner.run_round, budget)
        )

    async def discover(self, name: str) -> None:
        rt = self._runtimes[name]
        try:
            info = await rt.runner.refresh()
        except ServerError as exc:
            self.store.record_discovery(name, None, exc.reason)
            log.warning("server_unavailable", target=name, reason=exc.reason, detail=exc.detail)
        else:
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
        argv = read_cmdline(pid) if pid is not None else None
        environ = read_environ(pid) if pid is not None else None
        try:
            # A header read is fast, but it is file I/O: keep it off the event loop.
            facts = await asyncio.to_thread(
                model_facts, info, rt.target.kv, list(argv) if argv else None, environ
            )
        except FactsError as exc:
            self.store.record_model(name, None, exc.reason, held)
            log.warning("kv_cache_unknown", target=name, reason=exc.reason, detail=exc.detail)
        else:
            self.store.record_model(name, facts, None, held)

    async def probe(self, name: str) -> RoundResult:
        rt = self._runtimes[name]
        result = await rt.rounds.next()
        self.store.record_round(result)
        self.store.record_duty(name, rt.rounds.budget.used())
        failed = any(o.failure for o in result.outcomes.values())
        (log.warning if failed else log.info)("probe_round", **round_event(result))
        return result

    def skipped_in_progress(self, name: str) -> None:
        self.store.record_skip(name, SKIP_IN_PROGRESS)
        log.info("probe_round", target=name, skipped=[SKIP_IN_PROGRESS])

    def request_stop(self) -> None:
        self._stop.set()

    def request_stop_threadsafe(self) -> None:
        """For callers outside the daemon's event loop (tests, embedding)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)

    async def run(self, *, handle_signals: bool = True) -> None:
        """Serve and probe until SIGTERM or SIGINT (or `request_stop`), then stop cleanly."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        signals = (signal.SIGTERM, signal.SIGINT) if handle_signals else ()
        for sig in signals:
            loop.add_signal_handler(sig, self.request_stop)
        self.web.start()
        log.info(
            "exporter_started",
            listen=self.config.listen_address,
            port=self.web.port,
            targets=[t.url for t in self.config.targets],
        )
        scheduler = Scheduler(loop, on_max_instances=self.skipped_in_progress)
        for name, rt in self._runtimes.items():
            schedule = rt.target.schedule
            delay = self._first_probe_delay
            if delay is None:
                # Spread targets so that they do not all probe at the same moment after a start.
                delay = 1.0 + random.uniform(0, min(schedule.jitter, 5.0))
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
            log.info("exporter_stopping")
            await scheduler.shutdown(SHUTDOWN_GRACE_SECONDS)
            self.web.close()
            for rt in self._runtimes.values():
                await rt.client.aclose()
            if self._nvml is not None:
                self._nvml.close()
            for sig in signals:
                loop.remove_signal_handler(sig)
            log.info("exporter_stopped")
