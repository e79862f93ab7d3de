"""The alert simulator's front half (scripts/alertsim, scripts/alert_sim.py): the trace, the
virtual clock, the fake server that follows the trace, the scrapes it writes, and the
simulation of the real daemon on them, without Prometheus."""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import math
import statistics
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import alert_sim
import httpx
import pytest
from alertsim.alert_states import AlertEpisode
from alertsim.scrape import ScrapeRecorder, rule_identifiers
from alertsim.trace import (
    DAY,
    Trace,
    TraceBuilder,
    TraceError,
    TraceRow,
    expected_round_start,
    format_trace,
    parse_trace,
    read_trace,
    write_trace,
)
from alertsim.trace_server import TraceServer, model_path
from alertsim.virtual_loop import (
    BASE_UNIX,
    VirtualTimeLoop,
    run_virtual,
    running_virtual_loop,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics import parser as openmetrics

from exporter.daemon import Daemon
from exporter.host.blocking import BlockingSlot, DeadlineExceededError

ROOT = Path(__file__).resolve().parent.parent

HEADER = "t_seconds,tg_tps,pp_tps,event\n"


def parse_openmetrics(text: str) -> list[Metric]:
    """prometheus_client's OpenMetrics parser, strict about families being whole."""
    return list(openmetrics.text_string_to_metric_families(text))  # type: ignore[no-untyped-call]


# --- the trace ---------------------------------------------------------------------------


def test_a_trace_sets_speeds_from_each_row_on() -> None:
    trace = parse_trace(HEADER + "0,40,800,\n100,30,700,restart\n250.5,40,800,model_change\n\n")
    assert trace.end == 250.5
    assert trace.row_at(0) == TraceRow(0, 40, 800, "")
    assert trace.row_at(99.9).tg_tps == 40
    assert trace.row_at(100) == TraceRow(100, 30, 700, "restart")
    assert trace.row_at(1e9).pp_tps == 800
    assert trace.events("restart") == (100,)
    assert trace.events("model_change") == (250.5,)
    assert trace.events("exporter_restart") == ()


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("t,tg,pp,event\n0,1,1,\n1,1,1,\n", "line 1"),
        ("", "line 1"),
        (HEADER + "0,40,800\n1,40,800,\n", "line 2: 3 columns"),
        (HEADER + "0,40,800,\n5,fast,800,\n", "line 3, column tg_tps: 'fast' is not a number"),
        (HEADER + "0,40,800,\n5,40,nan,\n", "line 3, column pp_tps: 'nan' is not finite"),
        (HEADER + "0,40,800,\ninf,40,800,\n", "line 3, column t_seconds: 'inf' is not finite"),
        (HEADER + "0,40,800,\n5,0,800,\n", "line 3, column tg_tps: must be > 0"),
        (HEADER + "0,40,-1,\n5,40,800,\n", "line 2, column pp_tps: must be > 0"),
        (HEADER + "1,40,800,\n5,40,800,\n", "line 2, column t_seconds: the first row must be at 0"),
        (HEADER + "0,40,800,\n5,40,800,\n5,40,800,\n", "line 4, column t_seconds: 5 does not"),
        (HEADER + "0,40,800,\n5,40,800,\n3,40,800,\n", "line 4, column t_seconds: 3 does not"),
        (HEADER + "0,40,800,\n5,40,800,reboot\n", "line 3, column event: 'reboot' is not one"),
        (HEADER + "0,40,800,\n", "a trace needs a row at t=0 and a later one"),
    ],
)
def test_a_bad_trace_is_refused_naming_line_and_column(text: str, where: str) -> None:
    with pytest.raises(TraceError) as caught:
        parse_trace(text, "drop.csv")
    assert str(caught.value).startswith("drop.csv")
    assert where in str(caught.value)


def test_rows_made_in_code_are_checked_as_a_file_is() -> None:
    with pytest.raises(TraceError, match="first row must be at t=0"):
        Trace((TraceRow(1, 40, 800), TraceRow(2, 40, 800)))
    with pytest.raises(TraceError, match="finite and > 0"):
        Trace((TraceRow(0, 40, 800), TraceRow(2, math.inf, 800)))
    with pytest.raises(TraceError, match="unknown event"):
        Trace((TraceRow(0, 40, 800), TraceRow(2, 40, 800, "reboot")))


def test_a_built_trace_is_written_and_read_back_unchanged(tmp_path: Path) -> None:
    start = expected_round_start(10)
    trace = (
        TraceBuilder(tg_tps=40, pp_tps=800)
        .outlier(start, 0.5)
        .at(DAY, tg_tps=32)
        .at(DAY, event="exporter_restart")  # the same row: a drop and a restart at once
        .at(2 * DAY, event="restart")
        .scaled(2.5 * DAY, 1.25, pp=False)
        .build(30 * DAY)
    )
    assert start == pytest.approx(3.5 + 10 * 1205)
    assert trace.rows == (
        TraceRow(0, 40, 800),
        TraceRow(start - 20, 20, 400),
        TraceRow(start + 40, 40, 800),
        TraceRow(DAY, 32, 800, "exporter_restart"),
        TraceRow(2 * DAY, 32, 800, "restart"),
        TraceRow(2.5 * DAY, 40, 800),
        TraceRow(30 * DAY, 40, 800),
    )
    path = tmp_path / "trace.csv"
    write_trace(path, trace)
    assert path.read_text().startswith(HEADER + "0,40,800,\n12033.5,20,400,\n")
    assert read_trace(path) == trace
    assert parse_trace(format_trace(trace.rows)) == trace
    with pytest.raises(TraceError, match="time order"):
        TraceBuilder().at(10).at(5)


# --- the virtual clock -------------------------------------------------------------------


def test_a_sleep_of_days_returns_at_once_with_the_clock_moved_on() -> None:
    async def main() -> tuple[float, float]:
        loop = running_virtual_loop()
        await asyncio.sleep(30 * DAY)
        return loop.time(), loop.wall()

    began = time.perf_counter()
    virtual, wall = run_virtual(main())
    assert time.perf_counter() - began < 1.0
    assert virtual == 30 * DAY
    assert wall == BASE_UNIX + 30 * DAY
    assert BASE_UNIX % 7200 == 0  # backfilled blocks line up with the TSDB's 2-hour ones


def test_timers_fire_in_order_at_their_virtual_times() -> None:
    async def main() -> list[tuple[str, float]]:
        loop = running_virtual_loop()
        fired: list[tuple[str, float]] = []

        async def after(name: str, delay: float) -> None:
            await asyncio.sleep(delay)
            fired.append((name, loop.time()))

        loop.call_later(2.5, lambda: fired.append(("call_later", loop.time())))
        await asyncio.gather(after("c", 3600), after("a", 1), after("b", 1.5))
        return fired

    assert run_virtual(main()) == [("a", 1), ("b", 1.5), ("call_later", 2.5), ("c", 3600)]


def test_timeouts_expire_on_the_virtual_clock() -> None:
    async def main() -> list[float]:
        loop = running_virtual_loop()
        expired: list[float] = []
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(120):
                await asyncio.sleep(DAY)
        expired.append(loop.time())
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.Event().wait(), 30)
        expired.append(loop.time())
        async with asyncio.timeout(10):
            await asyncio.sleep(9)  # within it
        expired.append(loop.time())
        return expired

    assert run_virtual(main()) == [120, 150, 159]


def test_a_thread_takes_no_virtual_time() -> None:
    """The exporter reads files on threads of its own, with a deadline on the loop's clock:
    the clock must wait for them rather than jump to the deadline."""

    def slow_read() -> int:
        time.sleep(0.02)  # a file read, in real time
        return 42

    async def main() -> tuple[int, int, float]:
        loop = running_virtual_loop()
        ticking = asyncio.create_task(asyncio.sleep(1))  # a timer the clock could jump to
        answer = await BlockingSlot(deadline=10).run(slow_read, name="read")
        pooled = await asyncio.to_thread(slow_read)
        at = loop.time()
        await ticking
        return answer, pooled, at

    assert run_virtual(main()) == (42, 42, 0)


def test_a_stuck_thread_lets_the_clock_run_on_after_the_grace() -> None:
    release = threading.Event()

    async def main() -> float:
        loop = running_virtual_loop()
        with pytest.raises(DeadlineExceededError):
            await BlockingSlot(deadline=10).run(release.wait, name="stuck")
        return loop.time()

    with asyncio.Runner(loop_factory=lambda: VirtualTimeLoop(thread_grace=0.05)) as runner:
        try:
            assert runner.run(main()) == 10
        finally:
            release.set()


# --- the server that follows the trace ---------------------------------------------------


def _completion(n_prompt: int, n_predict: int, *, stream: bool = True) -> dict[str, Any]:
    prompt = [i % 300 for i in range(n_prompt)]  # ids within the fake's vocabulary
    return {"prompt": prompt, "n_predict": n_predict, "cache_prompt": False, "id_slot": 3,
            "stream": stream}  # fmt: skip


def _timings(response: httpx.Response) -> dict[str, Any]:
    last = [line for line in response.text.splitlines() if line.startswith("data:")][-1]
    timings: dict[str, Any] = json.loads(last[5:])["timings"]
    return timings


async def _at(t: float) -> None:
    await asyncio.sleep(max(0.0, t - asyncio.get_running_loop().time()))


def test_completions_follow_the_trace_and_take_the_time_they_claim() -> None:
    trace = TraceBuilder(tg_tps=40, pp_tps=800).at(1000, tg_tps=20, pp_tps=400).build(2000)

    async def main() -> list[tuple[float, float, float]]:
        loop = running_virtual_loop()
        server = TraceServer(trace, loop.time, noise_cv=0.0)
        seen = []
        async with httpx.AsyncClient(transport=server.transport(), base_url="http://s") as client:
            for t in (0, 999, 1000, 1500):
                await _at(t)
                began = loop.time()
                timings = _timings(await client.post("/completion", json=_completion(512, 128)))
                took = loop.time() - began
                claimed = (timings["prompt_ms"] + timings["predicted_ms"]) / 1000
                assert took == pytest.approx(claimed)
                pp = timings["prompt_n"] / timings["prompt_ms"] * 1000
                tg = (timings["predicted_n"] - 1) / timings["predicted_ms"] * 1000
                seen.append((pp, tg, took))
        return seen

    seen = run_virtual(main())
    assert [(round(pp), round(tg)) for pp, tg, _ in seen] == [(800, 40)] * 2 + [(400, 20)] * 2
    assert seen[0][2] == pytest.approx(512 / 800 + 127 / 40)


def test_noise_draws_one_factor_per_round_from_the_seed() -> None:
    trace = TraceBuilder(tg_tps=40, pp_tps=800).build(1000 * 100)

    async def main(seed: int) -> tuple[list[float], list[float]]:
        loop = running_virtual_loop()
        server = TraceServer(trace, loop.time, noise_cv=0.05, seed=seed)
        round_speeds: list[float] = []
        within: list[float] = []
        async with httpx.AsyncClient(transport=server.transport(), base_url="http://s") as client:
            for k in range(400):
                await _at(k * 100)  # further apart than a round's requests: one round each
                speeds = []
                for _ in range(3):
                    timings = _timings(await client.post("/completion", json=_completion(64, 2)))
                    speeds.append(timings["prompt_n"] / timings["prompt_ms"] * 1000)
                round_speeds.append(statistics.fmean(speeds))
                within.append(statistics.pstdev(speeds) / statistics.fmean(speeds))
        assert server.rounds == 400
        return round_speeds, within

    speeds, within = run_virtual(main(7))
    cv = statistics.pstdev(speeds) / statistics.fmean(speeds)
    # Deterministic for the seed; and about what was asked, a round's repetitions close.
    assert cv == pytest.approx(0.051039, abs=1e-6)
    assert statistics.fmean(within) == pytest.approx(0.003677, abs=1e-6)
    assert statistics.fmean(speeds) == pytest.approx(800.44, abs=0.01)
    assert run_virtual(main(7))[0] == speeds
    assert run_virtual(main(8))[0] != speeds


def test_a_restart_refuses_connections_for_a_minute_then_a_fresh_server_answers() -> None:
    trace = TraceBuilder().at(100, event="restart").at(500, event="restart").build(1000)

    async def main() -> list[str]:
        loop = running_virtual_loop()
        server = TraceServer(trace, loop.time, noise_cv=0.0)
        outcomes = []
        async with httpx.AsyncClient(transport=server.transport(), base_url="http://s") as client:
            await client.post("/completion", json=_completion(16, 2))
            first = server.server_at(loop.time())
            assert first.slot_tokens
            for t in (99, 100, 159.9, 160):
                await _at(t)
                try:
                    outcomes.append(str((await client.get("/props")).status_code))
                except httpx.ConnectError:
                    outcomes.append("refused")
            fresh = server.server_at(loop.time())
            assert fresh is not first and not fresh.slot_tokens
            await _at(498)  # a request in flight when the server goes down loses its answer
            try:
                await client.post("/completion", json=_completion(16, 200))
            except httpx.RemoteProtocolError:
                outcomes.append("disconnected")
        return outcomes

    assert run_virtual(main()) == ["200", "refused", "refused", "200", "disconnected"]


def test_a_model_change_serves_another_model_from_then_on() -> None:
    trace = TraceBuilder().at(50, event="model_change").at(70, event="model_change").build(99)

    async def main() -> list[tuple[str, int]]:
        loop = running_virtual_loop()
        server = TraceServer(trace, loop.time)
        seen = []
        async with httpx.AsyncClient(transport=server.transport(), base_url="http://s") as client:
            for t in (0, 50, 80):
                await _at(t)
                props = (await client.get("/props")).json()
                seen.append((props["model_path"], props["default_generation_settings"]["n_ctx"]))
        return seen

    assert run_virtual(main()) == [
        ("/models/Sim-Model-A.Q4_K_M.gguf", 32768),
        ("/models/Sim-Model-B.Q4_K_M.gguf", 32768),
        ("/models/Sim-Model-C.Q4_K_M.gguf", 32768),
    ]
    assert model_path(26) == "/models/Sim-Model-A1.Q4_K_M.gguf"


# --- the scrapes -------------------------------------------------------------------------


class _Families:
    """A collector whose families a test sets between scrapes."""

    def __init__(self) -> None:
        self.speed: float | None = 40.0
        self.tokens = 0.0
        self.label = "m"

    def collect(self) -> Iterable[Metric]:
        if self.speed is not None:
            gauge = GaugeMetricFamily("sim_speed", "speed", labels=["model"])
            gauge.add_metric([self.label], self.speed)
            yield gauge
        counter = CounterMetricFamily("sim_tokens", "tokens", labels=["model"])
        counter.add_metric([self.label], self.tokens, created=5.0)  # _created is not written
        yield counter
        ignored = GaugeMetricFamily("sim_ignored", "no rule reads it")
        ignored.add_metric([], 1.0)
        yield ignored


def _written(recorder: ScrapeRecorder) -> dict[str, list[tuple[dict[str, str], float, float]]]:
    out = io.StringIO()
    recorder.write_openmetrics(out)
    text = out.getvalue()
    assert text.endswith("# EOF\n")
    written: dict[str, list[tuple[dict[str, str], float, float]]] = {}
    for family in parse_openmetrics(text):  # also checks families are whole
        assert family.name not in written
        for s in family.samples:
            assert s.timestamp is not None
            at = float(s.timestamp)
            written.setdefault(s.name, []).append((s.labels, s.value, at))
    return written


@pytest.fixture
def recorder() -> ScrapeRecorder:
    return ScrapeRecorder({"sim_speed", "sim_tokens_total", "up"}, scrape_interval=30)


def test_a_sample_is_written_when_it_changes_or_at_a_heartbeat(recorder: ScrapeRecorder) -> None:
    source = _Families()
    for k in range(20):
        source.tokens = 100.0 if k >= 5 else 0.0
        recorder.scrape_up(1000 + 30 * k, source, 990)
    written = _written(recorder)
    labels = {"model": "m", "job": "llama-speed", "instance": "sim:18088"}
    # Every 8th scrape (240 s) is a heartbeat for all series alike; changes come between.
    assert [(v, t) for _, v, t in written["sim_speed"]] == [(40, 1000), (40, 1240), (40, 1480)]
    assert written["sim_tokens_total"] == [
        (labels, 0, 1000), (labels, 100, 1150), (labels, 100, 1240), (labels, 100, 1480),
    ]  # fmt: skip
    assert [(v, t) for _, v, t in written["up"]] == [(1, 1000), (1, 1240), (1, 1480)]
    assert {s[0]["job"] for s in written["process_start_time_seconds"]} == {"llama-speed"}
    assert [v for _, v, _ in written["process_start_time_seconds"]] == [990] * 3
    assert "sim_ignored" not in written and "sim_tokens_created" not in written
    assert recorder.scrapes == 20
    assert recorder.samples_written == 3 + 4 + 3 + 3
    assert recorder.seconds_per_scrape > 0


def test_an_exporter_restart_writes_up_0_and_nothing_else(recorder: ScrapeRecorder) -> None:
    source = _Families()
    for k in range(4):
        recorder.scrape_up(30 * k, source, 0)
    recorder.scrape_down(120)
    source.tokens = 7
    recorder.scrape_up(150, source, 125)
    written = _written(recorder)
    # The series gone in the gap keep their last value, written at the last scrape they were in.
    assert [(v, t) for _, v, t in written["sim_speed"]] == [(40, 0), (40, 90), (40, 150)]
    assert [(v, t) for _, v, t in written["up"]] == [(1, 0), (0, 120), (1, 150)]
    assert [(v, t) for _, v, t in written["process_start_time_seconds"]] == [
        (0, 0), (0, 90), (125, 150),
    ]  # fmt: skip
    assert [(v, t) for _, v, t in written["sim_tokens_total"]] == [(0, 0), (0, 90), (7, 150)]


def test_a_series_that_disappears_is_written_where_it_was_last_seen(
    recorder: ScrapeRecorder,
) -> None:
    source = _Families()
    for k in range(6):
        source.label = "old" if k < 3 else "new"  # another model name: another series
        source.speed = None if k == 5 else 40.0
        recorder.scrape_up(30 * k, source, 0)
    speeds = [(labels["model"], v, t) for labels, v, t in _written(recorder)["sim_speed"]]
    assert speeds == [("old", 40, 0), ("old", 40, 60), ("new", 40, 90), ("new", 40, 120)]


def test_labels_are_escaped_and_scrape_labels_win(recorder: ScrapeRecorder) -> None:
    class Odd:
        def collect(self) -> Iterator[Metric]:
            gauge = GaugeMetricFamily("sim_speed", "x", labels=["model", "job", "instance"])
            gauge.add_metric(['a "b"\\c\nd', "own-job", "own-instance"], math.nan)
            yield gauge

    recorder.scrape_up(0, Odd(), 0)
    recorder.scrape_up(30, Odd(), 0)  # NaN is unchanged: not written again
    [(labels, value, _)] = _written(recorder)["sim_speed"]
    assert labels == {
        "model": 'a "b"\\c\nd', "exported_job": "own-job", "exported_instance": "own-instance",
        "job": "llama-speed", "instance": "sim:18088",
    }  # fmt: skip
    assert math.isnan(value)


def test_the_kept_families_are_those_the_rules_name(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yml"
    rules.write_text(
        "groups:\n"
        "  - name: g\n"
        "    rules:\n"
        "      - record: a:b:rate1h\n"
        '        expr: rate(sim_tokens_total{reason=~"busy|sleeping"}[1h])\n'
        "      - alert: A\n"
        "        expr: up{job='llama-speed'} == 0 and on (target) sim_speed > 0\n"
    )
    names = rule_identifiers([rules])
    assert {"sim_tokens_total", "up", "sim_speed", "rate", "target"} <= names
    assert "busy" not in names and "llama" not in names  # label values are not names
    shipped = rule_identifiers(sorted((ROOT / "deploy" / "prometheus" / "rules").glob("*.yml")))
    assert "llama_speed_probe_generated_tokens_total" in shipped
    assert "process_start_time_seconds" in shipped


# --- the simulation (without Prometheus) -------------------------------------------------


def test_the_scheduler_runs_one_instance_at_a_time_and_coalesces() -> None:
    async def main() -> tuple[list[float], list[float]]:
        loop = running_virtual_loop()
        started: list[float] = []
        skipped: list[float] = []

        async def slow(_: str) -> None:
            started.append(loop.time())
            await asyncio.sleep(25)

        job = alert_sim.IntervalJob(
            slow, "t", interval=10, jitter=0, first_delay=1, wall=loop.wall,
            on_max_instances=lambda _: skipped.append(loop.time()),
        )  # fmt: skip
        task = asyncio.create_task(job.run_forever())
        await asyncio.sleep(60)
        task.cancel()
        await job.stop()
        return started, skipped

    assert run_virtual(main()) == ([1, 31], [11, 21, 41, 51])


def _shipped_rules() -> tuple[Path, ...]:
    return tuple(sorted((ROOT / "deploy" / "prometheus" / "rules").glob("*.yml")))


def test_the_daemon_runs_its_rounds_on_the_virtual_clock(tmp_path: Path) -> None:
    hours = 3600.0
    trace = TraceBuilder(tg_tps=40, pp_tps=800).at(2 * hours + 10, event="exporter_restart")
    options = alert_sim.SimOptions(noise_cv=0.02, seed=3, rules=_shipped_rules())
    began = time.perf_counter()
    sim = alert_sim.run_simulation(trace.build(4 * hours), tmp_path, options)
    assert time.perf_counter() - began < 60  # four hours of rounds and scrapes

    # The first round 1 to 6 s after each start, then one every 1200 s plus up to 10 s.
    starts = sim.round_starts
    assert 1 <= starts[0] <= 6
    restart = next(i for i, t in enumerate(starts) if t > 2 * hours)
    assert 2 * hours + 10 + 10 + 1 <= starts[restart] <= 2 * hours + 10 + 10 + 6
    gaps = [b - a for a, b in itertools.pairwise(starts) if b < 2 * hours or a > 2 * hours]
    assert all(1200 <= gap <= 1210 for gap in gaps)
    assert sim.rounds == len(starts) == 6 + 6
    assert sim.start_unix == BASE_UNIX and sim.end_unix == BASE_UNIX + 4 * hours
    assert (tmp_path / "state" / "baselines.json").is_file()  # the bands survive the restart

    written = {f.name: f for f in parse_openmetrics(sim.openmetrics.read_text())}
    gauge = written["llama_speed_generation_tokens_per_second"]
    speeds = {round(s.value) for s in gauge.samples}
    assert speeds and all(36 <= v <= 44 for v in speeds)  # 40 t/s with 2% noise
    up = [(s.value, float(s.timestamp)) for s in written["up"].samples if s.timestamp]
    assert (0.0, BASE_UNIX + 2 * hours + 15) in up  # the scrape in the exporter's 10 s gap
    counters = [s.value for s in written["llama_speed_probe_generated_tokens"].samples]
    assert min(counters[counters.index(max(counters)) :]) < max(counters)  # restarted at 0
    starts_seen = {s.value for s in written["process_start_time_seconds"].samples}
    assert starts_seen == {BASE_UNIX, BASE_UNIX + 2 * hours + 20}


def test_a_bad_trace_or_argument_is_one_line_and_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text(HEADER + "0,40,800,\n10,40,0,\n")
    assert alert_sim.main(["--trace", str(bad), "--json"]) == 2
    assert capsys.readouterr().err == (f"alert_sim.py: {bad} line 3, column pp_tps: must be > 0\n")
    with pytest.raises(SystemExit) as exited:
        alert_sim.main(["--trace", str(bad), "--noise-cv", "-1"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--noise-cv" in err


def test_the_command_reports_episodes_in_trace_seconds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole command, with Prometheus' part replaced by a stand-in that checks what it is
    handed and returns one episode that fired and one that only went pending."""
    trace = tmp_path / "trace.csv"
    write_trace(trace, TraceBuilder().build(3600))
    workdir = tmp_path / "work"
    handed: dict[str, Any] = {}

    def evaluate_rules(
        openmetrics: Path, rule_files: Any, *, start: float, end: float, eval_interval: float,
        workdir: Path,
    ) -> list[AlertEpisode]:  # fmt: skip
        handed.update(
            families={f.name for f in parse_openmetrics(openmetrics.read_text())},
            rules=list(rule_files), span=(start, end, eval_interval), workdir=workdir,
        )  # fmt: skip
        at = BASE_UNIX  # the trace's start
        return [
            AlertEpisode("B", {"target": "sim", "alertname": "B"}, at + 600, None, at + 900),
            AlertEpisode("A", {"target": "sim"}, at + 60, at + 360, None),
        ]

    monkeypatch.setattr(alert_sim, "evaluate_rules", evaluate_rules)
    args = ["--trace", str(trace), "--workdir", str(workdir), "--seed", "2", "--json"]
    assert alert_sim.main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result == {
        "alerts": [{"name": "A", "labels": {"target": "sim"}, "pending_at": 60,
                    "fired_at": 360, "resolved_at": None}],
        "pending_only": [{"name": "B", "labels": {"alertname": "B", "target": "sim"},
                          "pending_at": 600, "fired_at": None, "resolved_at": 900}],
        "rounds": 3, "confirmations": 0,
    }  # fmt: skip
    assert {"up", "llama_speed_probe_generated_tokens"} <= handed["families"]
    assert handed["rules"] == sorted((ROOT / "deploy" / "prometheus" / "rules").glob("*.yml"))
    # From the first evaluation after the first scrape (at 15 s): one before would find no `up`.
    assert handed["span"] == (BASE_UNIX + 60, BASE_UNIX + 3600, 60)
    assert handed["workdir"] == workdir / "prometheus"
    assert workdir.is_dir()  # a directory given is kept

    assert alert_sim.main([*args[:-1], "--no-storage"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["alert", "labels", "pending", "fired", "resolved"]
    assert table[1].split() == ["A", "target=sim", "0+00:01:00", "0+00:06:00", "-"]
    assert table[2].split() == ["B", "target=sim", "0+00:10:00", "-", "0+00:15:00"]
    assert table[3] == "rounds 3, confirmations 0"


def test_a_job_that_raises_stops_the_simulation_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """APScheduler would log it and go on; a simulation must not report alerts of an exporter
    that stopped probing."""

    async def broken(self: Any, name: str) -> None:
        raise RuntimeError(f"probe of {name} broke")

    monkeypatch.setattr(Daemon, "probe", broken)
    began = time.perf_counter()
    with pytest.raises(RuntimeError, match="probe of sim broke"):
        alert_sim.run_simulation(TraceBuilder().build(30 * DAY), tmp_path, alert_sim.SimOptions())
    assert time.perf_counter() - began < 10  # stopped at the first round, not after 30 days
