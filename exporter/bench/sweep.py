"""A bench: one run per context size (launching the server) or one run against a running one.

Each run is synchronous except its probe, which runs the daemon's `ProbeRunner` in its own
event loop. So Ctrl-C (KeyboardInterrupt) lands wherever the run is, loading or probing; the
run then stops the server it started and is recorded as interrupted with the samples it had.
After every run the caller gets the whole record so far, to write it before the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, Protocol

import httpx
import structlog

from exporter import __version__
from exporter.bench.files import create_private
from exporter.bench.host import build_label, host_record
from exporter.bench.launch import ServerCommand, ServerCommandError
from exporter.bench.load import LoadMeter
from exporter.bench.memory import MemoryPeak
from exporter.bench.quality import QualitySettings, QualityStep
from exporter.bench.record import (
    BenchRecord,
    HostLoadRecord,
    KvRecord,
    PlanRecord,
    RunRecord,
    SampleRecord,
    ServerRecord,
    Status,
)
from exporter.bench.target import (
    BenchTarget,
    RefusedError,
    SeveralModelsError,
    choose_at,
    model_pid,
)
from exporter.gpu.nvml import Nvml
from exporter.host.address import local_port
from exporter.host.proc import (
    find_listening_pid,
    process_group,
    read_cmdline,
    read_environ,
)
from exporter.kv.facts import FactsError, KvOverrides, model_facts
from exporter.llama.activity import ActivitySource
from exporter.llama.client import LlamaClient, ServerApi, ServerError
from exporter.llama.discovery import ServerInfo, discover
from exporter.llama.fleet import Fleet, FleetActivity
from exporter.llama.redact import redacted, redacted_text
from exporter.llama.secret import Secret
from exporter.llama.server_process import ServerProcess, ServerStartError
from exporter.probe.plan import MeasurePlan
from exporter.probe.results import (
    DISCARD_OVERLAP,
    SKIP_BUSY,
    SKIP_DEPTH_EXCEEDS_CONTEXT,
    RoundResult,
    Sample,
)
from exporter.probe.runner import ProbeRunner, fits_in_context

log = structlog.get_logger(__name__)

_MEMORY_POLL_S: Final = 1.0
_LOG_LINES_KEPT: Final = 20
_KV_LOG_LINE: Final = re.compile(r"KV buffer size\s*=\s*([0-9.]+)\s*MiB")


class Observer(Protocol):
    """What a bench tells the terminal while it runs."""

    def run_started(self, index: int, total: int, title: str, samples_expected: int) -> None: ...
    def phase(self, text: str) -> None: ...
    def sample(self, sample: Sample) -> None: ...
    def run_finished(self, run: RunRecord) -> None: ...


@dataclass(frozen=True)
class BenchSettings:
    plan: PlanRecord
    probe_timeout: float
    load_timeout: float
    log_dir: Path
    label: str | None = None
    command: ServerCommand | None = None  # launch mode
    ctxs: tuple[int | None, ...] = (None,)
    target: str | None = None  # target mode
    # Target mode, behind a router or llama-swap: the loaded model to measure (None: the one
    # loaded); against a single server, the model it must be serving.
    model: str | None = None
    api_key: Secret | None = None
    quality: QualitySettings | None = None  # launch mode: llama-perplexity after the first run
    # A running server may be busy with production traffic: wait for it, up to this many times.
    busy_retries: int = 3
    busy_wait_s: float = 5.0

    def samples_expected(self) -> int:
        per_depth = len(self.plan.prompt_tokens) + len(self.plan.generation_tokens)
        return per_depth * len(self.plan.depths) * self.plan.repetitions


class _InterruptedRunError(Exception):
    def __init__(self, run: RunRecord) -> None:
        super().__init__("interrupted")
        self.run = run


@dataclass
class _RunState:
    """What one run has measured so far: kept when it is interrupted."""

    ctx: int | None
    samples: list[Sample] = field(default_factory=list)
    pending: list[Sample] = field(default_factory=list)  # the current round, until it counts
    info: ServerInfo | None = None
    problems: list[str] = field(default_factory=list)
    skipped_depths: list[int] = field(default_factory=list)
    load_seconds: float | None = None

    def all_samples(self) -> tuple[SampleRecord, ...]:
        return tuple(SampleRecord.of(s) for s in (*self.samples, *self.pending))


@dataclass(frozen=True)
class _Scope:
    """What a run's probes speak to: the server, or one model behind a router or llama-swap."""

    server: ServerApi
    fleet: Fleet | None = None
    model: str | None = None

    @classmethod
    def of(cls, client: LlamaClient, chosen: BenchTarget | None) -> _Scope:
        kind = chosen.multi_kind() if chosen is not None else None
        if chosen is None or chosen.model is None or kind is None:
            return cls(client)
        fleet = Fleet(client, kind)
        # Every request names the model in the form that cannot load it (autoload=false, or
        # /upstream/ after /running says it is ready): never a load or a swap.
        return cls(fleet.model_client(chosen.model.name), fleet, chosen.model.name)

    def activity(self) -> ActivitySource | None:
        """The busy check: on a single server its own slots; behind a router or llama-swap
        every loaded model's, since they share the GPUs (`FleetActivity`)."""
        if self.fleet is None or self.model is None:
            return None
        return FleetActivity(self.fleet, self.model)


def _server_record(info: ServerInfo) -> ServerRecord:
    return ServerRecord(
        model=info.model,
        model_path=info.model_path,
        quant=info.quant,
        build=info.build,
        n_ctx=info.ctx,
        slots=info.slots,
        size_bytes=info.size_bytes,
        n_ctx_train=info.n_ctx_train,
    )


def _round_problems(result: RoundResult) -> list[str]:
    problems = [s for s in result.skips if s != SKIP_DEPTH_EXCEEDS_CONTEXT]
    for kind, outcome in result.outcomes.items():
        if outcome.failure:
            problems.append(f"{kind}: {outcome.failure}")
        problems += [f"{kind}: discarded ({d})" for d in outcome.discards]
    if problems and result.detail:
        problems.append(result.detail)
    return problems


def _needs_retry(result: RoundResult) -> bool:
    """Production traffic, not the server, spoiled the round: another try may be clean."""
    overlap = any(DISCARD_OVERLAP in o.discards for o in result.outcomes.values())
    return SKIP_BUSY in result.skips or overlap


def probe_plans(settings: BenchSettings, depths: tuple[int, ...]) -> list[MeasurePlan]:
    """The rounds of one run, at the depths that fit its server's context.

    One round per size pair, as llama-bench runs its tests: where one list is longer, the
    other kind is left out (0 tokens) of the extra rounds.
    """
    plan = settings.plan
    return [
        MeasurePlan(
            timeout=settings.probe_timeout,
            prompt_tokens=prompt_tokens or 0,
            generation_tokens=generation_tokens or 0,
            depths=depths,
            repetitions=plan.repetitions,
            warmup=plan.warmup,
            # A running server may serve production: measure only while it is idle.
            require_busy_check=settings.command is None,
        )
        for prompt_tokens, generation_tokens in itertools.zip_longest(
            plan.prompt_tokens, plan.generation_tokens
        )
    ]


def kv_log_bytes(log_text: str) -> int | None:
    """The KV buffers llama-server logged (only at -lv 4), summed over devices."""
    sizes = [float(m) for m in _KV_LOG_LINE.findall(log_text)]
    return round(sum(sizes) * 2**20) if sizes else None


class Bench:
    def __init__(
        self,
        settings: BenchSettings,
        *,
        nvml: Nvml | None,
        observer: Observer,
        on_update: Callable[[BenchRecord], None],
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.settings = settings
        self._transport = transport  # tests: a fake server in place of the network
        self._nvml = nvml
        self._observer = observer
        self._on_update = on_update
        self._clock = clock
        self._now = now
        command = settings.command
        self._record = BenchRecord(
            label=settings.label or "llama-server",
            mode="launch" if command else "target",
            started_at=self._timestamp(),
            exporter_version=__version__,
            command=tuple(redacted(command.argv)) if command else None,
            target=redacted_text(settings.target) if settings.target else None,
            host=host_record(nvml),
            plan=settings.plan,
        )
        self._quality = (
            QualityStep(settings.quality, command, phase=observer.phase, clock=clock)
            if settings.quality is not None and command is not None
            else None
        )

    def _timestamp(self) -> str:
        return self._now().isoformat(timespec="seconds").replace("+00:00", "Z")

    def execute(self) -> BenchRecord:
        """Every run in turn; an interrupt ends the bench with what was measured so far."""
        runs: list[RunRecord] = []
        command, target = self.settings.command, self.settings.target
        ctxs = self.settings.ctxs if command else (None,)
        # An interrupt during the baseline leaves no run to do.
        interrupted = self._quality_baseline()
        for index, ctx in enumerate(() if interrupted else ctxs, start=1):
            title = f"ctx {ctx}" if ctx is not None else "running server"
            self._observer.run_started(index, len(ctxs), title, self.settings.samples_expected())
            try:
                if command is not None:
                    run = self._launch_run(command, ctx)
                elif target is not None:
                    run = self._target_run(target)
                else:
                    raise ValueError("a bench needs a server command or a target")
            except _InterruptedRunError as exc:
                run, interrupted = exc.run, True
            if self._quality is not None and not interrupted:
                # After the server stopped: the two never share the GPUs.
                quality = self._quality.measure(index)
                run = run.model_copy(update={"quality": quality})
                interrupted = quality.status == "interrupted"
            runs.append(run)
            self._observer.run_finished(run)
            self._publish(runs, interrupted=interrupted, finished=interrupted)
            if interrupted:
                break
        return self._publish(runs, interrupted=interrupted, finished=True)

    def _quality_baseline(self) -> bool:
        """The baseline's distributions, before any run; whether an interrupt came meanwhile."""
        if self._quality is None:
            return False
        baseline = self._quality.baseline()
        if baseline is None:
            return False
        self._record = self._record.model_copy(update={"quality_baseline": baseline})
        if baseline.status == "failed":
            log.warning("quality_baseline_failed", reason=baseline.reason)
        return baseline.status == "interrupted"

    def _publish(self, runs: list[RunRecord], *, interrupted: bool, finished: bool) -> BenchRecord:
        servers = [r.server for r in runs if r.server is not None]
        update: dict[str, object] = {"runs": tuple(runs), "interrupted": interrupted}
        if servers:
            first = servers[0]
            update["label"] = self.settings.label or first.model
            update["llama_cpp_build"] = build_label(first.build, self._executable())
        if finished:
            update["finished_at"] = self._timestamp()
        self._record = self._record.model_copy(update=update)
        self._on_update(self._record)
        return self._record

    def _executable(self) -> str | None:
        command = self.settings.command
        if command is None:
            return None
        try:
            return command.program()
        except ServerCommandError:
            return None

    def _load_meter(self, server_pids: Callable[[], set[int]]) -> LoadMeter:
        """Host load from now until `finish()`: the window the samples are taken in."""
        meter = LoadMeter(server_pids, clock=self._clock)
        meter.start()
        return meter

    # -- launch mode ---------------------------------------------------------------------

    def _launch_run(self, command: ServerCommand, ctx: int | None) -> RunRecord:
        state = _RunState(ctx)
        started = self._clock()
        log_path = self.settings.log_dir / f"llama-server-ctx-{ctx or 'default'}.log"
        port = command.pick_port()
        server = ServerProcess(
            command.for_ctx(ctx, port), host=command.host, port=port, log_path=log_path
        )
        peak: MemoryPeak | None = None
        meter: LoadMeter | None = None
        try:
            self._observer.phase("loading the model")
            # Private before llama-server writes to it: its output may echo a secret.
            create_private(log_path)
            server.start()
            server.wait_ready(self.settings.load_timeout)
            state.load_seconds = self._clock() - started
            peak = MemoryPeak(self._nvml, lambda: process_group(server.pid))
            meter = self._load_meter(lambda: process_group(server.pid))
            asyncio.run(self._probe(server.url, state, peak))
            # Before the server stops: its processes' CPU time is read from /proc.
            host_load = meter.finish()
            exited = server.returncode
            self._observer.phase("stopping the server")
            status: Status = "stable"
            reason = ""
            if exited is not None:
                status = "not_stable"
                reason = f"llama-server exited with status {exited} while probed"
            elif state.problems or not state.samples:
                status, reason = "probe_failed", "; ".join(state.problems) or "no sample measured"
            return self._run_record(
                state,
                status,
                reason,
                peak,
                started,
                server=server,
                argv=server.command(),
                log_file=str(log_path),
                log_lines=server.last_log_lines(_LOG_LINES_KEPT) if exited is not None else [],
                host_load=host_load,
            )
        except ServerStartError as exc:
            head = str(exc).split("\n", 1)[0]
            return RunRecord(
                ctx=ctx,
                status="not_stable",
                reason=redacted_text(head),
                log_lines=_redacted_lines(exc.log_lines or server.last_log_lines(_LOG_LINES_KEPT)),
                log_file=str(log_path),
                duration_seconds=self._clock() - started,
            )
        except KeyboardInterrupt:
            host_load = meter.finish() if meter is not None else None
            server.stop()
            raise _InterruptedRunError(
                self._run_record(
                    state,
                    "interrupted",
                    "interrupted",
                    peak,
                    started,
                    server=server,
                    argv=server.command(),
                    log_file=str(log_path),
                    host_load=host_load,
                )
            ) from None
        finally:
            server.stop()

    # -- target mode ---------------------------------------------------------------------

    def _target_run(self, url: str) -> RunRecord:
        state = _RunState(None)
        started = self._clock()
        try:
            chosen = asyncio.run(self._choose(url))
        except KeyboardInterrupt:
            raise _InterruptedRunError(
                RunRecord(ctx=None, status="interrupted", reason="interrupted",
                          duration_seconds=self._clock() - started)
            ) from None  # fmt: skip
        # Either way nothing was measured, and no request named a model.
        except ServerError as exc:  # the list of models could not be read
            return self._unmeasured(started, "not_stable", f"{exc.reason}: {exc.detail}")
        except (RefusedError, SeveralModelsError) as exc:
            return self._unmeasured(started, "probe_failed", str(exc))
        measured = chosen.model.name if chosen.model is not None else self.settings.model
        self._record = self._record.model_copy(
            update={"target_kind": chosen.kind, "target_model": measured}
        )
        # Behind a router or llama-swap, the model's own process holds its weights and cache.
        pid = model_pid(url, chosen.model) if chosen.model is not None else _local_pid(url)
        peak = MemoryPeak(self._nvml, lambda: {pid} if pid is not None else set())
        # A server on another host, or another user's, has no /proc entry here: "other"
        # processes then include it, and the record says so.
        meter = self._load_meter(lambda: {pid} if pid is not None else set())
        try:
            asyncio.run(self._probe(url, state, peak, chosen))
        except KeyboardInterrupt:
            raise _InterruptedRunError(
                self._run_record(
                    state, "interrupted", "interrupted", peak, started, host_load=meter.finish()
                )
            ) from None
        host_load = meter.finish()
        argv = list(read_cmdline(pid) or ()) if pid is not None else None
        if not argv and chosen.model is not None:
            # The router's `status.args` or llama-swap's `cmd`: the model's options all the same.
            argv = list(chosen.model.args)
        if state.info is None:
            status: Status = "not_stable"
        else:
            status = "probe_failed" if state.problems or not state.samples else "stable"
        reason = "; ".join(state.problems) if status != "stable" else ""
        return self._run_record(
            state,
            status,
            reason or "",
            peak,
            started,
            argv=argv or None,
            pid=pid,
            host_load=host_load,
        )

    def _unmeasured(self, started: float, status: Status, reason: str) -> RunRecord:
        reason = redacted_text(reason)
        return RunRecord(
            ctx=None, status=status, reason=reason, problems=(reason,),
            duration_seconds=self._clock() - started,
        )  # fmt: skip

    async def _choose(self, url: str) -> BenchTarget:
        settings = self.settings
        return await choose_at(
            url, settings.api_key, settings.model,
            timeout=settings.probe_timeout, transport=self._transport,
        )  # fmt: skip

    def _client(self, url: str) -> LlamaClient:
        settings = self.settings
        return LlamaClient(
            url, settings.api_key, timeout=settings.probe_timeout, transport=self._transport
        )

    # -- shared --------------------------------------------------------------------------

    async def _probe(
        self, url: str, state: _RunState, peak: MemoryPeak, chosen: BenchTarget | None = None
    ) -> None:
        settings = self.settings
        client = self._client(url)
        scope = _Scope.of(client, chosen)
        watcher = asyncio.create_task(self._watch_memory(peak))
        try:
            self._observer.phase("reading /props")
            info = await discover(scope.server)
            if scope.model is not None:
                # Known by the name it is listed under, whatever alias its server has.
                info = dataclasses.replace(info, model=scope.model)
            state.info = info
            plan = settings.plan
            longest = max(plan.prompt_tokens), max(plan.generation_tokens)
            depths = tuple(d for d in plan.depths if fits_in_context(d, *longest, info.ctx))
            state.skipped_depths = [d for d in plan.depths if d not in depths]
            if not depths:
                state.problems.append(f"no depth of {list(plan.depths)} fits in n_ctx {info.ctx}")
                return
            for probe_plan in probe_plans(settings, depths):
                await self._round(scope, probe_plan, state)
        except ServerError as exc:
            state.problems.append(f"{exc.reason}: {exc.detail}")
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            peak.sample()
            await client.aclose()

    async def _round(self, scope: _Scope, plan: MeasurePlan, state: _RunState) -> None:
        def collect(sample: Sample) -> None:
            state.pending.append(sample)
            self._observer.sample(sample)

        energy = self._nvml.energy_joules if self._nvml is not None else (lambda: None)
        runner = ProbeRunner(
            "bench", scope.server, plan, model=scope.model, activity=scope.activity(),
            energy=energy, on_sample=collect,
        )  # fmt: skip
        for attempt in range(self.settings.busy_retries + 1):
            state.pending.clear()
            self._observer.phase("probing" if attempt == 0 else f"probing (try {attempt + 1})")
            result = await runner.run_round()
            if _needs_retry(result) and attempt < self.settings.busy_retries:
                self._observer.phase(f"server busy ({result.detail}); waiting")
                await asyncio.sleep(self.settings.busy_wait_s)
                continue
            state.samples += state.pending
            state.pending.clear()
            state.problems += _round_problems(result)
            return

    async def _watch_memory(self, peak: MemoryPeak) -> None:
        while True:
            await asyncio.to_thread(peak.sample)
            await asyncio.sleep(_MEMORY_POLL_S)

    def _run_record(
        self,
        state: _RunState,
        status: Status,
        reason: str,
        peak: MemoryPeak | None,
        started: float,
        *,
        server: ServerProcess | None = None,
        argv: list[str] | None = None,
        pid: int | None = None,
        log_file: str | None = None,
        log_lines: list[str] | None = None,
        host_load: HostLoadRecord | None = None,
    ) -> RunRecord:
        kv, kv_note = self._kv(state.info, argv, pid, server)
        return RunRecord(
            ctx=state.ctx,
            status=status,
            reason=reason,
            server=_server_record(state.info) if state.info else None,
            samples=state.all_samples(),
            gpus=peak.gpus if peak else (),
            gpu_note=peak.note if peak else "",
            server_rss_bytes=peak.rss if peak else None,
            kv=kv,
            kv_note=kv_note,
            skipped_depths=tuple(state.skipped_depths),
            problems=tuple(state.problems),
            log_lines=_redacted_lines(log_lines or ()),
            log_file=log_file,
            load_seconds=state.load_seconds,
            duration_seconds=self._clock() - started,
            host_load=host_load,
        )

    @staticmethod
    def _kv(
        info: ServerInfo | None,
        argv: list[str] | None,
        pid: int | None,
        server: ServerProcess | None,
    ) -> tuple[KvRecord | None, str]:
        if info is None:
            return None, ""
        # A launched server's environment is the bench's, minus LLAMA_ARG_*: its argv says all.
        environ = read_environ(pid) if pid is not None else {}
        try:
            facts = model_facts(info, KvOverrides(), argv, environ)
        except FactsError as exc:
            return None, f"KV cache not computed: {exc.reason} ({exc.detail})"
        note = "" if argv else "server options unknown: cache types assumed f16"
        return KvRecord(
            type_k=facts.type_k,
            type_v=facts.type_v,
            bytes_per_token=facts.bytes_per_token,
            cells=facts.capacity.cells if facts.capacity else None,
            bytes=facts.capacity.total_bytes if facts.capacity else None,
            log_bytes=kv_log_bytes(server.log_text()) if server is not None else None,
        ), note


def _redacted_lines(lines: Sequence[str]) -> tuple[str, ...]:
    # llama-server's own output may echo an option or a URL with a secret in it.
    return tuple(redacted_text(line) for line in lines)


def _local_pid(url: str) -> int | None:
    port = local_port(url)
    return find_listening_pid(port).pid if port is not None else None
