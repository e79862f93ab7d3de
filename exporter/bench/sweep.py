"""A bench: one run per context size (launching the server) or one run against a running one.

Each run is synchronous except its probe, which runs the daemon's `ProbeRunner` in its own
event loop. So Ctrl-C (KeyboardInterrupt) lands wherever the run is, loading or probing; the
run then stops the server it started and is recorded as interrupted with the samples it had.
After every run the caller gets the whole record so far, to write it before the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, Protocol

import structlog
from pydantic import SecretStr

from exporter import __version__
from exporter.bench.files import create_private
from exporter.bench.host import build_label, host_record
from exporter.bench.launch import ServerCommand, ServerCommandError
from exporter.bench.load import LoadMeter
from exporter.bench.memory import MemoryPeak
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
from exporter.gpu.nvml import Nvml
from exporter.host.address import local_port
from exporter.host.proc import (
    find_listening_pid,
    process_group,
    read_cmdline,
    read_environ,
)
from exporter.kv.facts import FactsError, KvOverrides, model_facts
from exporter.llama.client import LlamaClient, ServerError
from exporter.llama.discovery import ServerInfo, discover
from exporter.llama.redact import redacted, redacted_text
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
    api_key: SecretStr | None = None
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
    ) -> None:
        self.settings = settings
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

    def _timestamp(self) -> str:
        return self._now().isoformat(timespec="seconds").replace("+00:00", "Z")

    def execute(self) -> BenchRecord:
        """Every run in turn; an interrupt ends the bench with what was measured so far."""
        runs: list[RunRecord] = []
        command, target = self.settings.command, self.settings.target
        ctxs = self.settings.ctxs if command else (None,)
        interrupted = False
        for index, ctx in enumerate(ctxs, start=1):
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
            runs.append(run)
            self._observer.run_finished(run)
            self._publish(runs, interrupted=interrupted, finished=interrupted)
            if interrupted:
                break
        return self._publish(runs, interrupted=interrupted, finished=True)

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
        pid = _local_pid(url)
        peak = MemoryPeak(self._nvml, lambda: {pid} if pid is not None else set())
        # A server on another host, or another user's, has no /proc entry here: "other"
        # processes then include it, and the record says so.
        meter = self._load_meter(lambda: {pid} if pid is not None else set())
        try:
            asyncio.run(self._probe(url, state, peak))
        except KeyboardInterrupt:
            raise _InterruptedRunError(
                self._run_record(
                    state, "interrupted", "interrupted", peak, started, host_load=meter.finish()
                )
            ) from None
        host_load = meter.finish()
        argv = list(read_cmdline(pid) or ()) if pid is not None else None
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

    # -- shared --------------------------------------------------------------------------

    async def _probe(self, url: str, state: _RunState, peak: MemoryPeak) -> None:
        settings = self.settings
        client = LlamaClient(url, settings.api_key, timeout=settings.probe_timeout)
        watcher = asyncio.create_task(self._watch_memory(peak))
        try:
            self._observer.phase("reading /props")
            info = state.info = await discover(client)
            plan = settings.plan
            longest = max(plan.prompt_tokens), max(plan.generation_tokens)
            depths = tuple(d for d in plan.depths if fits_in_context(d, *longest, info.ctx))
            state.skipped_depths = [d for d in plan.depths if d not in depths]
            if not depths:
                state.problems.append(f"no depth of {list(plan.depths)} fits in n_ctx {info.ctx}")
                return
            for probe_plan in probe_plans(settings, depths):
                await self._round(client, probe_plan, state)
        except ServerError as exc:
            state.problems.append(f"{exc.reason}: {exc.detail}")
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            peak.sample()
            await client.aclose()

    async def _round(self, client: LlamaClient, plan: MeasurePlan, state: _RunState) -> None:
        def collect(sample: Sample) -> None:
            state.pending.append(sample)
            self._observer.sample(sample)

        energy = self._nvml.energy_joules if self._nvml is not None else (lambda: None)
        runner = ProbeRunner("bench", client, plan, energy=energy, on_sample=collect)
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
