"""Simulate the shipped alerts over a speed trace: when would each have gone pending, fired and
resolved?

    .venv/bin/python scripts/alert_sim.py --trace drop.csv --json

The exporter's real scheduling and confirmation code (`exporter.daemon.Daemon`, its probe
rounds, bands and duty budget) runs on a virtual clock (`alertsim.virtual_loop`) against a
fake llama-server whose speeds follow the trace (`alertsim.trace`, `alertsim.trace_server`).
What Prometheus would have scraped is written as OpenMetrics (`alertsim.scrape`), and the
rule files (deploy/prometheus/rules/*.yml by default) are evaluated over it by Prometheus
itself (`alertsim.rule_eval`). 30 simulated days take a few minutes.

The schedule is the daemon's: discovery every `discovery_interval` from the start, probe rounds
by APScheduler's own IntervalTrigger with the configured jitter, one at a time, the first 1 to
6 s after each start. The jitter comes from `random`, seeded with --seed, as is the server's
noise, so that a run repeats exactly. `scheduled_round_starts` replays that schedule alone, in
a moment, so that a trace can place a slow round on one scheduled round of a run
(`alertsim.scenarios`); `simulate_alerts` runs both halves, as this command does.

Output: with --json, `{"alerts": [...], "pending_only": [...], "rounds": N, "confirmations":
N}`, each alert with its name, labels and the trace times (seconds from the trace's start) it
went pending, fired and resolved (null while still firing at the end); "alerts" holds the
episodes that fired, "pending_only" those that went pending and never fired. Without --json, a
table. Progress goes to stderr as log lines. Exit status 2 for bad arguments or a bad trace, 1
when promtool or Prometheus fails.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import math
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, NoReturn

ROOT: Final = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the fake server comes from tests.fakes

import structlog  # noqa: E402
from alertsim.alert_states import AlertEpisode  # noqa: E402
from alertsim.backfill import PromtoolError  # noqa: E402
from alertsim.prometheus_server import PrometheusError  # noqa: E402
from alertsim.rule_eval import evaluate_rules  # noqa: E402
from alertsim.scrape import SCRAPE_INTERVAL_SECONDS, ScrapeRecorder, rule_identifiers  # noqa: E402
from alertsim.trace import (  # noqa: E402
    EXPORTER_RESTART,
    Trace,
    TraceError,
    read_trace,
)
from alertsim.trace_server import TraceServer  # noqa: E402
from alertsim.virtual_loop import (  # noqa: E402
    VirtualTimeLoop,
    run_virtual,
    running_virtual_loop,
)
from apscheduler.triggers.interval import IntervalTrigger  # noqa: E402

from exporter import log as exporter_log  # noqa: E402
from exporter.collectors import exporter_collectors  # noqa: E402
from exporter.config import Config, Target  # noqa: E402
from exporter.daemon import Daemon  # noqa: E402
from exporter.probe.plan import MeasurePlan  # noqa: E402
from exporter.probe.results import RoundResult  # noqa: E402
from exporter.safe_argparse import SafeArgumentParser  # noqa: E402
from exporter.schedule.clock import Clock  # noqa: E402
from exporter.schedule.plan import Schedule  # noqa: E402

log = structlog.get_logger("alert_sim")

RULES: Final = ROOT / "deploy" / "prometheus" / "rules"
TARGET_NAME: Final = "sim"
TARGET_URL: Final = "http://llama-sim:8080"  # not this host: no process or model file to read
# An exporter restart: stopped, then started again this much later (a systemd restart).
EXPORTER_DOWN_SECONDS: Final = 10.0
EVAL_INTERVAL_SECONDS: Final = 60  # deploy/prometheus/prometheus.yml's evaluation_interval
# Prometheus scrapes a target at a fixed offset into each interval; half of it keeps scrapes
# off the instants the exporter's discovery runs at, so no result depends on which of two
# simultaneous tasks goes first.
SCRAPE_OFFSET_SHARE: Final = 0.5
PROGRESS_SECONDS: Final = 86400.0  # a progress line per simulated day
# Real seconds an exporter's file read or write (run on a thread, while the virtual clock
# stands still) may take before the simulation counts it as stuck and moves the clock on:
# far above what one takes even on a loaded machine, so that a run's schedule, and so its
# alerts, do not depend on the load. At the virtual loop's default of 5 s, a busy machine
# (four simulations and their Prometheus on 2 cores) once held the state file's read at an
# exporter start that long: it failed at its 10-s deadline, and every round of that
# exporter came 10 s late.
THREAD_GRACE_SECONDS: Final = 120.0


@dataclass(frozen=True)
class SimOptions:
    noise_cv: float = 0.02
    seed: int = 1
    storage: bool = True  # keep the bands across exporter restarts in <workdir>/state
    scrape_interval: float = SCRAPE_INTERVAL_SECONDS
    rules: tuple[Path, ...] = ()


@dataclass
class SimResult:
    openmetrics: Path
    start_unix: float  # trace time 0
    end_unix: float
    rounds: int = 0  # scheduled rounds recorded
    confirmations: int = 0  # confirmation rounds recorded
    round_starts: list[float] = field(default_factory=list)  # trace seconds, scheduled rounds
    scrapes: int = 0
    samples_written: int = 0
    seconds_per_scrape: float = 0.0  # real time


class IntervalJob:
    """One of the daemon's APScheduler jobs, run on the virtual clock as APScheduler would
    (`exporter.schedule.scheduler`): fire times from the real IntervalTrigger on virtual
    datetimes, one instance at a time (a fire time that finds the last run still going is
    skipped and reported), due fire times coalesced into one run."""

    def __init__(
        self,
        func: Callable[[str], Coroutine[Any, Any, Any]],
        arg: str,
        *,
        interval: float,
        jitter: float,
        first_delay: float,
        wall: Callable[[], float],
        on_max_instances: Callable[[str], None] = lambda _: None,
        on_failure: Callable[[BaseException], None] = lambda _: None,
    ) -> None:
        self._func, self._arg = func, arg
        self._trigger = IntervalTrigger(seconds=interval, jitter=jitter or None, timezone=UTC)
        self._first_delay = first_delay
        self._wall = wall
        self._on_max_instances = on_max_instances
        self._on_failure = on_failure
        self.running: asyncio.Task[Any] | None = None

    async def run_forever(self) -> None:
        next_run: datetime | None = _at(self._wall() + self._first_delay)
        while next_run is not None:
            await asyncio.sleep(max(0.0, next_run.timestamp() - self._wall()))
            # Microseconds: the datetime may round a hair past the clock it was made from.
            now = max(_at(self._wall()), next_run)
            run_times: list[datetime] = []
            due: datetime | None = next_run
            while due is not None and due <= now:  # as apscheduler.job.Job._get_run_times
                run_times.append(due)
                due = self._trigger.get_next_fire_time(due, now)
            if self.running is not None and not self.running.done():
                self._on_max_instances(self._arg)
            else:
                self.running = asyncio.create_task(self._func(self._arg))
                self.running.add_done_callback(self._finished)
            next_run = self._trigger.get_next_fire_time(run_times[-1], now)

    def _finished(self, run: asyncio.Task[Any]) -> None:
        # APScheduler would log a job's exception and go on; here it is a bug to report.
        error = None if run.cancelled() else run.exception()
        if error is not None:
            self._on_failure(error)

    async def stop(self) -> None:
        if self.running is not None:
            self.running.cancel()
            await asyncio.gather(self.running, return_exceptions=True)
            self.running = None


def _at(unix: float) -> datetime:
    return datetime.fromtimestamp(unix, UTC)


def probe_job(
    probe: Callable[[str], Coroutine[Any, Any, Any]],
    target: Target,
    *,
    wall: Callable[[], float],
    on_max_instances: Callable[[str], None] = lambda _: None,
    on_failure: Callable[[BaseException], None] = lambda _: None,
) -> IntervalJob:
    """A target's probe job, as an exporter start schedules it. Its first round comes as
    Daemon.run puts it (`Schedule.first_round_delay`): one draw of `random`, made here,
    before any of the trigger's."""
    schedule = target.schedule
    return IntervalJob(
        probe, target.name, interval=schedule.interval, jitter=schedule.jitter,
        first_delay=schedule.first_round_delay(), wall=wall,
        on_max_instances=on_max_instances, on_failure=on_failure,
    )  # fmt: skip


class Exporter:
    """The exporter process of the simulation: a Daemon and its two jobs; `stop` ends it."""

    def __init__(
        self,
        config: Config,
        server: TraceServer,
        clock: Clock,
        sim: SimResult,
        failed: asyncio.Future[None],
    ) -> None:
        self._sim = sim
        self._clock = clock
        self.started_at = clock.wall()
        self.daemon = Daemon(
            config,
            transport_factory=lambda _: server.transport(),
            clock=clock,
            on_round=self._count,
        )
        target = config.targets[0]
        self.source = exporter_collectors(
            self.daemon.store.snapshot, {target.name: target.schedule}
        )
        schedule = target.schedule

        def failing(error: BaseException) -> None:
            if not failed.done():
                failed.set_exception(error)

        self._jobs = (
            IntervalJob(
                self.daemon.discover, target.name, interval=schedule.discovery_interval,
                jitter=0.0, first_delay=0.0, wall=clock.wall, on_failure=failing,
            ),
            probe_job(
                self.daemon.probe, target, wall=clock.wall,
                on_max_instances=self.daemon.skipped_in_progress, on_failure=failing,
            ),
        )  # fmt: skip
        self._tasks: list[asyncio.Task[None]] = []

    def _count(self, result: RoundResult) -> None:
        if result.confirmation:
            self._sim.confirmations += 1
        else:
            self._sim.rounds += 1
            self._sim.round_starts.append(result.started_at - self._sim.start_unix)

    async def start(self) -> None:
        if self.daemon.storage is not None:
            await self.daemon.storage.load(self._clock.wall())  # as Daemon.run does first
        self._tasks = [asyncio.create_task(job.run_forever()) for job in self._jobs]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        failures = [
            r
            for r in await asyncio.gather(*self._tasks, return_exceptions=True)
            if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError)
        ]
        for job in self._jobs:
            await job.stop()
        self.daemon.web.close()  # bound in Daemon.__init__, never started here
        if failures:
            raise failures[0]


def sim_target() -> Target:
    """The one target, with the default plan and schedule, as the exporter runs out of the
    box."""
    return Target(TARGET_NAME, TARGET_URL, None, plan=MeasurePlan(), schedule=Schedule())


def sim_config(workdir: Path, *, storage: bool) -> Config:
    """The exporter's configuration: `sim_target` alone."""
    target = sim_target()
    state = workdir / "state" if storage else None
    if state is not None:
        state.mkdir(parents=True, exist_ok=True)
    return Config(
        (target,), "127.0.0.1:0", "/metrics", "console", "warning", gpu=False, storage_path=state,
    )  # fmt: skip


class Simulation:
    """One run over a trace on the running virtual loop: the exporter process (restarted
    where the trace says), Prometheus' scrapes of it, and a progress line per day."""

    def __init__(self, trace: Trace, workdir: Path, options: SimOptions) -> None:
        self._loop = running_virtual_loop()
        self._t0 = self._loop.time()
        self._trace = trace
        self._options = options
        self.result = SimResult(
            workdir / "scrapes.om.txt", self._loop.wall(), self._loop.wall() + trace.end
        )
        self._clock = Clock(monotonic=self._loop.time, wall=self._loop.wall)
        self._server = TraceServer(
            trace, self._trace_time, noise_cv=options.noise_cv, seed=options.seed
        )
        self._config = sim_config(workdir, storage=options.storage)
        self._recorder = ScrapeRecorder(
            rule_identifiers(options.rules), scrape_interval=options.scrape_interval
        )
        # Set by the first job that raises: the run stops there, as for a bug in the exporter.
        self._failed: asyncio.Future[None] = self._loop.create_future()
        self._up: Exporter | None = None  # what a scrape finds: None during an exporter restart
        self._started_real = time.perf_counter()

    def _trace_time(self) -> float:
        return self._loop.time() - self._t0

    async def _until(self, t: float) -> None:
        await asyncio.sleep(max(0.0, t - self._trace_time()))

    async def _until_checked(self, t: float) -> None:
        """Until trace time `t`, or until a job of the exporter raises, which this raises."""
        await asyncio.wait({self._failed}, timeout=max(0.0, t - self._trace_time()))
        if self._failed.done():
            self._failed.result()

    def _exporter(self) -> Exporter:
        return Exporter(self._config, self._server, self._clock, self.result, self._failed)

    async def run(self) -> SimResult:
        started_cpu = time.process_time()
        exporter = self._exporter()
        await exporter.start()
        self._up = exporter
        scraping = asyncio.create_task(self._scrapes())
        reporting = asyncio.create_task(self._progress())
        try:
            for t in self._trace.events(EXPORTER_RESTART):
                await self._until_checked(t)
                self._up = None
                await exporter.stop()
                log.info("exporter_restart", t=t, down_s=EXPORTER_DOWN_SECONDS)
                await self._until_checked(t + EXPORTER_DOWN_SECONDS)
                exporter = self._exporter()
                await exporter.start()
                self._up = exporter
            await self._until_checked(self._trace.end)
            await scraping
        finally:
            scraping.cancel()
            reporting.cancel()
            await asyncio.gather(scraping, reporting, return_exceptions=True)
            await exporter.stop()
        sim, recorder = self.result, self._recorder
        recorder.save(sim.openmetrics)
        sim.scrapes, sim.samples_written = recorder.scrapes, recorder.samples_written
        sim.seconds_per_scrape = recorder.seconds_per_scrape
        log.info(
            "simulation_done", days=round(self._trace.end / 86400, 2), rounds=sim.rounds,
            confirmations=sim.confirmations, scrapes=sim.scrapes, samples=sim.samples_written,
            scrape_ms=round(sim.seconds_per_scrape * 1000, 3),
            real_s=round(time.perf_counter() - self._started_real, 1),
            cpu_s=round(time.process_time() - started_cpu, 1),
        )  # fmt: skip
        return sim

    async def _scrapes(self) -> None:
        interval = self._options.scrape_interval
        k = 0
        while (at := (k + SCRAPE_OFFSET_SHARE) * interval) <= self._trace.end:
            await self._until(at)
            if self._up is None:
                self._recorder.scrape_down(self._loop.wall())
            else:
                self._recorder.scrape_up(self._loop.wall(), self._up.source, self._up.started_at)
            k += 1

    async def _progress(self) -> None:
        day = PROGRESS_SECONDS
        while day < self._trace.end:
            await self._until(day)
            log.info(
                "simulated", day=round(day / 86400), rounds=self.result.rounds,
                confirmations=self.result.confirmations,
                real_s=round(time.perf_counter() - self._started_real, 1),
            )  # fmt: skip
            day += PROGRESS_SECONDS


def run_simulation(trace: Trace, workdir: Path, options: SimOptions) -> SimResult:
    """`simulate` on a virtual-time loop of its own; `random` seeded for APScheduler's jitter."""
    random.seed(options.seed)

    async def simulate() -> SimResult:
        return await Simulation(trace, workdir, options).run()

    with asyncio.Runner(
        loop_factory=lambda: VirtualTimeLoop(thread_grace=THREAD_GRACE_SECONDS)
    ) as runner:
        return runner.run(simulate())


def scheduled_round_starts(trace: Trace, options: SimOptions) -> list[float]:
    """The trace times at which a run of `trace` with `options` (`run_simulation`) starts its
    scheduled rounds, confirmation rounds left out, without running the exporter, the server
    or Prometheus: a fraction of a second for 30 days.

    The schedule is replayed by the same code on the same clock: the probe job of each
    exporter start (`probe_job`: the real IntervalTrigger in `IntervalJob`) with a job that
    only notes the time, the same exporter restarts from the trace, and `random` seeded
    alike, drawn in the same order: one draw per start for the first round's delay, then one
    per fire time and one per next fire time, as the job makes them. Nothing else in a run
    draws from `random` (the server's noise has a generator of its own, the discovery job no
    jitter), so the times are the run's, to the rounding of a float. A round that an
    exporter restart or the trace's end cuts short is listed here, though a run records
    only the rounds that finish."""
    random.seed(options.seed)
    target = sim_target()
    restarts = trace.events(EXPORTER_RESTART)
    lives = zip(
        (0.0, *(t + EXPORTER_DOWN_SECONDS for t in restarts)), (*restarts, trace.end), strict=True
    )

    async def replay() -> list[float]:
        loop = running_virtual_loop()
        start_unix = loop.wall()
        starts: list[float] = []

        async def note(_: str) -> None:
            starts.append(loop.wall() - start_unix)

        async def until(t: float) -> None:
            await asyncio.sleep(max(0.0, t - (loop.wall() - start_unix)))

        for begin, end in lives:
            await until(begin)
            job = probe_job(note, target, wall=loop.wall)
            running = asyncio.create_task(job.run_forever())
            await until(end)
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
            await job.stop()
        return starts

    return run_virtual(replay())


def default_rules() -> tuple[Path, ...]:
    """The shipped rule files, deploy/prometheus/rules/*.yml."""
    return tuple(sorted(RULES.glob("*.yml")))


def simulate_alerts(
    trace: Trace,
    workdir: Path,
    options: SimOptions,
    *,
    eval_interval: int = EVAL_INTERVAL_SECONDS,
) -> tuple[SimResult, list[AlertEpisode]]:
    """Both halves: the simulation of `trace` (`run_simulation`), then the alert episodes of
    the rule files over what it scraped (the shipped ones when `options.rules` is empty), by
    the promtool and prometheus on the PATH. Raises PromtoolError, PrometheusError or OSError
    when evaluating fails."""
    if not options.rules:
        options = dataclasses.replace(options, rules=default_rules())
    sim = run_simulation(trace, workdir, options)
    start = first_evaluation(sim, options.scrape_interval, eval_interval)
    if start > sim.end_unix:  # a trace shorter than that has nothing to evaluate
        return sim, []
    episodes = evaluate_rules(
        sim.openmetrics, options.rules, start=start, end=sim.end_unix,
        eval_interval=eval_interval, workdir=workdir / "prometheus",
    )  # fmt: skip
    return sim, episodes


# The command line.


class _OneLineParser(SafeArgumentParser):
    """Errors as one line naming what is wrong, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message}\n")


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number")
    return value


def _whole_seconds(text: str) -> int:
    if not text.isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of seconds above 0")
    return int(text)


def _cv(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 0 and below 1")
    return value


def parser() -> argparse.ArgumentParser:
    p = _OneLineParser(prog="alert_sim.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--trace", type=Path, required=True, help="the trace CSV (alertsim.trace)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--noise-cv", type=_cv, default=0.02, help="a round's noise (default 0.02)")
    p.add_argument("--seed", type=int, default=1, help="seeds noise and jitter (default 1)")
    p.add_argument("--workdir", type=Path, help="where files go (default: a temporary dir)")
    p.add_argument("--keep", action="store_true", help="keep the temporary working directory")
    p.add_argument("--no-storage", action="store_true", help="run without --storage.path")
    p.add_argument(
        "--rules", type=Path, nargs="+", help="rule files (default deploy/prometheus/rules/*.yml)"
    )
    p.add_argument("--scrape-interval", type=_positive, default=SCRAPE_INTERVAL_SECONDS)
    p.add_argument("--eval-interval", type=_whole_seconds, default=EVAL_INTERVAL_SECONDS)
    p.add_argument(
        "--verbose", action="store_true", help="also log the exporter's own info lines (rounds)"
    )
    return p


def first_evaluation(sim: SimResult, scrape_interval: float, eval_interval: int) -> float:
    """The unix time of the first rule evaluation: the first on the evaluation grid after the
    first scrape. One before it would find no `up` at all, an artefact of Prometheus and the
    exporter starting at the same instant, and LlamaSpeedExporterAbsent would go pending."""
    first_scrape = SCRAPE_OFFSET_SHARE * scrape_interval
    return sim.start_unix + math.ceil(first_scrape / eval_interval) * eval_interval


def report(episodes: Sequence[AlertEpisode], sim: SimResult) -> dict[str, Any]:
    """The JSON report: episodes in trace seconds, fired ones apart from pending-only ones."""

    def entry(e: AlertEpisode) -> dict[str, Any]:
        return {
            "name": e.name,
            "labels": dict(sorted(e.labels.items())),
            "pending_at": e.pending_at,
            "fired_at": e.fired_at,
            "resolved_at": e.resolved_at,
        }

    in_trace = [e.since(sim.start_unix) for e in episodes]
    ordered = sorted(in_trace, key=lambda e: (e.pending_at, e.name, sorted(e.labels.items())))
    return {
        "alerts": [entry(e) for e in ordered if e.fired_at is not None],
        "pending_only": [entry(e) for e in ordered if e.fired_at is None],
        "rounds": sim.rounds,
        "confirmations": sim.confirmations,
    }


def table(result: dict[str, Any]) -> str:
    """The report for people: one line per episode, times as d+hh:mm:ss of the trace."""

    def when(t: float | None) -> str:
        if t is None:
            return "-"
        days, rest = divmod(int(t), 86400)
        return f"{days}+{time.strftime('%H:%M:%S', time.gmtime(rest))}"

    rows = [("alert", "labels", "pending", "fired", "resolved")]
    for e in [*result["alerts"], *result["pending_only"]]:
        # The same for every alert of the simulation: left out.
        shown = {k: v for k, v in e["labels"].items() if k not in ("alertname", "job", "instance")}
        labels = ",".join(f"{k}={v}" for k, v in shown.items())
        rows.append(
            (e["name"], labels, when(e["pending_at"]), when(e["fired_at"]),
             when(e["resolved_at"]))
        )  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.append(f"rounds {result['rounds']}, confirmations {result['confirmations']}")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    exporter_log.configure("console", "info")
    if not args.verbose:
        # The exporter logs every round at info; its warnings (a server down) still show.
        logging.getLogger("exporter").setLevel(logging.WARNING)
    try:
        trace = read_trace(args.trace)
    except (TraceError, OSError) as exc:
        print(f"alert_sim.py: {exc}", file=sys.stderr)
        return 2
    rules = tuple(args.rules or default_rules())
    missing = [str(r) for r in rules if not r.is_file()]
    if missing or not rules:
        print(f"alert_sim.py: no such rule file: {', '.join(missing) or RULES}", file=sys.stderr)
        return 2
    made = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="alert-sim-")) if made else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    options = SimOptions(
        noise_cv=args.noise_cv, seed=args.seed, storage=not args.no_storage,
        scrape_interval=args.scrape_interval, rules=rules,
    )  # fmt: skip
    try:
        log.info("simulating", trace=str(args.trace), days=round(trace.end / 86400, 2),
                 workdir=str(workdir))  # fmt: skip
        sim, episodes = simulate_alerts(trace, workdir, options, eval_interval=args.eval_interval)
        result = report(episodes, sim)
    except (PromtoolError, PrometheusError, OSError) as exc:
        log.error("rule_evaluation_failed", error=str(exc))
        return 1
    finally:
        if made and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        elif made:
            log.info("kept", workdir=str(workdir))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        sys.stdout.write(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
