"""Confirmation rounds in the daemon, end to end against the recorded-answer fake server.

Each test drives `Daemon.probe` itself, one scheduled round at a time, so that what follows a
round is exact: a round outside its series' band brings up to `confirmations` more rounds
within the same `probe` call, a lone outlier only one, a settled change none. The fake answers
at once and claims its timings from its speeds, which stay high (>= 2000 t/s) so that its
claimed times are never longer than the requests really took. The wall clock is the test's:
each scheduled round is one default interval after the last, so history figures are exact.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from exporter.cli import main, parse
from exporter.config import Config, ConfigError, Target
from exporter.daemon import Daemon
from exporter.probe.results import SKIP_BUSY, SKIP_DUTY_BUDGET, RoundResult
from exporter.schedule.clock import Clock
from exporter.state.baseline import MIN_BAND_ROUNDS
from exporter.state.storage import FILE_NAME
from tests.daemon_harness import fast_target
from tests.fake_router import FakeRouter
from tests.fakes import FakeLlama

T = TypeVar("T")
NAME = "t"
T0 = 1_700_000_000.0
STEP = 1200.0  # wall seconds between scheduled rounds, as at the default interval
STEADY_TPS = 4000.0
SLOW_TPS = 2000.0  # 50% down: far below the band's 5% floor
REASONS = ("below_band", "above_band", "back_in_band")


class Bench:
    """A daemon over one fake server (or router), driven round by round."""

    def __init__(
        self,
        fake: FakeLlama | FakeRouter,
        target: Target,
        *,
        storage_path: Path | None = None,
    ) -> None:
        self.now = T0  # the wall clock the daemon reads
        self.results: list[RoundResult] = []
        self.last: RoundResult | None = None  # what the last `probe` call returned
        # Called with each recorded round, before the daemon decides what follows it.
        self.after_round: Callable[[RoundResult], None] = lambda _: None
        config = Config(
            (target,), "127.0.0.1:0", "/metrics", "console", "warning", gpu=False,
            storage_path=storage_path,
        )  # fmt: skip
        self.daemon = Daemon(
            config,
            transport_factory=lambda _: fake.transport(),
            clock=Clock(wall=lambda: self.now),
            on_round=self._on_round,
        )

    def _on_round(self, result: RoundResult) -> None:
        self.results.append(result)
        self.after_round(result)

    async def probe(self) -> list[RoundResult]:
        """One scheduled round, one interval after the last, and the confirmation rounds it
        brings; returns every round it recorded."""
        self.now += STEP
        first = len(self.results)
        self.last = await self.daemon.probe(NAME)
        return self.results[first:]

    async def steady(self, count: int = MIN_BAND_ROUNDS) -> None:
        for _ in range(count):
            assert [r.confirmation for r in await self.probe()] == [None]

    def metrics(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        """Every sample in the exposition, by sample name."""
        text = generate_latest(self.daemon.registry).decode()
        found: dict[str, list[tuple[dict[str, str], float]]] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                found.setdefault(s.name, []).append((s.labels, s.value))
        return found

    def value(self, name: str, **labels: str) -> float | None:
        matching = [
            v
            for found, v in self.metrics().get(name, [])
            if all(found.get(k) == want for k, want in labels.items())
        ]
        assert len(matching) <= 1, (name, labels, matching)
        return matching[0] if matching else None

    def confirmations(self) -> dict[str, float | None]:
        return {
            reason: self.value("llama_speed_probe_confirmations_total", target=NAME, reason=reason)
            for reason in REASONS
        }


def single(**changes: Any) -> Target:
    # Confirmations 10 ms apart: far below the interval, so that they run, and quick.
    values: dict[str, Any] = {"interval": 60, "confirmation_delay": 0.01, **changes}
    return fast_target(NAME, "http://llama:8080", **values)


def run(bench: Bench, scenario: Callable[[], Awaitable[T]]) -> T:
    daemon = bench.daemon

    async def go() -> T:
        try:
            await daemon.discover(NAME)
            return await scenario()
        finally:
            for rt in daemon._runtimes.values():
                await rt.client.aclose()

    try:
        return asyncio.run(go())
    finally:
        daemon.web.start()  # close() waits for a serve loop, so there must be one
        daemon.web.close()


def bench_of(fake: FakeLlama | None = None, **changes: Any) -> tuple[Bench, FakeLlama]:
    """A bench over one server, and that server, at STEADY_TPS unless given."""
    fake = fake or FakeLlama(gen_tps=STEADY_TPS)
    storage_path = changes.pop("storage_path", None)
    return Bench(fake, single(**changes), storage_path=storage_path), fake


def generation_speeds(rounds: list[RoundResult]) -> list[float]:
    """Each round's generation speed, as the band records it."""
    speeds = []
    for r in rounds:
        samples = [s for s in r.samples if s.kind == "generation"]
        tokens = sum(s.tokens for s in samples)
        seconds = sum(s.seconds for s in samples)
        speeds.append(tokens / seconds if seconds else 0.0)
    return speeds


# The confirmation sequence


def test_a_sustained_drop_is_confirmed_by_two_rounds_then_settles() -> None:
    bench, fake = bench_of()

    async def scenario() -> None:
        await bench.steady()
        fake.gen_tps = SLOW_TPS
        drop = await bench.probe()
        assert [r.confirmation for r in drop] == [None, "below_band", "below_band"]
        # Each confirmation round measured: the band holds them too.
        assert generation_speeds(drop) == pytest.approx([SLOW_TPS] * 3)
        assert bench.confirmations() == {
            "below_band": 2.0, "above_band": 0.0, "back_in_band": 0.0,
        }  # fmt: skip
        # Settled on "below": the same speed at the next round asks nothing.
        assert [r.confirmation for r in await bench.probe()] == [None]
        assert bench.confirmations()["below_band"] == 2.0

    run(bench, scenario)


def test_recovery_after_a_confirmed_drop_is_confirmed_back_in_band() -> None:
    bench, fake = bench_of()

    async def scenario() -> None:
        await bench.steady()
        fake.gen_tps = SLOW_TPS
        await bench.probe()
        fake.gen_tps = STEADY_TPS
        back = await bench.probe()
        assert [r.confirmation for r in back] == [None, "back_in_band", "back_in_band"]
        assert bench.confirmations() == {
            "below_band": 2.0, "above_band": 0.0, "back_in_band": 2.0,
        }  # fmt: skip
        assert [r.confirmation for r in await bench.probe()] == [None]

    run(bench, scenario)


def test_a_rise_is_confirmed_above_band() -> None:
    bench, fake = bench_of(FakeLlama(gen_tps=2500.0))

    async def scenario() -> None:
        await bench.steady()
        fake.gen_tps = 5000.0
        assert [r.confirmation for r in await bench.probe()] == [
            None, "above_band", "above_band",
        ]  # fmt: skip
        assert bench.confirmations()["above_band"] == 2.0

    run(bench, scenario)


def test_a_one_round_outlier_brings_one_confirmation_and_moves_nothing() -> None:
    bench, fake = bench_of()

    def restore(result: RoundResult) -> None:
        fake.gen_tps = STEADY_TPS  # slow for one round only

    async def scenario() -> None:
        await bench.steady()
        labels = {"target": NAME, "depth": "0"}
        fake.gen_tps = SLOW_TPS
        bench.after_round = restore
        outlier = await bench.probe()
        assert [r.confirmation for r in outlier] == [None, "below_band"]
        assert generation_speeds(outlier) == pytest.approx([SLOW_TPS, STEADY_TPS])
        assert bench.confirmations() == {
            "below_band": 1.0, "above_band": 0.0, "back_in_band": 0.0,
        }  # fmt: skip
        # The median of the last three (steady, slow, steady) does not move.
        recent = bench.value("llama_speed_generation_recent_tokens_per_second", **labels)
        assert recent == pytest.approx(STEADY_TPS)
        # Still settled within: the next round asks nothing.
        assert [r.confirmation for r in await bench.probe()] == [None]

    run(bench, scenario)


def test_recent_follows_a_drop_from_the_first_agreeing_confirmation() -> None:
    bench, fake = bench_of()
    seen: list[float | None] = []

    def read_recent(result: RoundResult) -> None:
        name = "llama_speed_generation_recent_tokens_per_second"
        seen.append(bench.value(name, target=NAME, depth="0"))

    async def scenario() -> None:
        await bench.steady()
        fake.gen_tps = SLOW_TPS
        bench.after_round = read_recent
        await bench.probe()

    run(bench, scenario)
    assert seen == [
        pytest.approx(STEADY_TPS),  # steady, steady, slow
        pytest.approx(SLOW_TPS),  # steady, slow, slow
        pytest.approx(SLOW_TPS),
    ]


def test_no_confirmation_rounds_when_confirmations_are_zero() -> None:
    bench, fake = bench_of(confirmations=0)

    async def scenario() -> None:
        await bench.steady()
        fake.gen_tps = SLOW_TPS
        assert [r.confirmation for r in await bench.probe()] == [None]
        fake.gen_tps = STEADY_TPS
        assert [r.confirmation for r in await bench.probe()] == [None]
        assert bench.confirmations() == dict.fromkeys(REASONS, 0.0)

    run(bench, scenario)


def test_no_confirmation_rounds_when_the_delay_is_not_below_the_interval() -> None:
    # The next scheduled round comes as soon as a confirmation would.
    bench, fake = bench_of(confirmation_delay=60)

    async def scenario() -> None:
        await bench.steady()
        fake.gen_tps = SLOW_TPS
        assert [r.confirmation for r in await bench.probe()] == [None]
        assert bench.confirmations() == dict.fromkeys(REASONS, 0.0)

    run(bench, scenario)


def test_more_confirmations_need_more_agreeing_rounds() -> None:
    bench, fake = bench_of(confirmations=4)

    async def scenario() -> None:
        await bench.steady()
        fake.gen_tps = SLOW_TPS
        drop = await bench.probe()
        assert [r.confirmation for r in drop] == [None] + ["below_band"] * 4
        assert bench.confirmations()["below_band"] == 4.0

    run(bench, scenario)


def test_a_confirmation_round_skipped_by_the_duty_budget_ends_the_sequence() -> None:
    bench, fake = bench_of()
    budget = bench.daemon._runtimes[NAME].rounds.budget

    def exhaust(result: RoundResult) -> None:
        if result.confirmation is None:
            budget.spend(2 * budget.window, measured=False)  # the whole share and more

    async def scenario() -> None:
        await bench.steady()
        fake.gen_tps = SLOW_TPS
        bench.after_round = exhaust
        drop = await bench.probe()
        assert [r.confirmation for r in drop] == [None, "below_band"]
        assert drop[1].skips == (SKIP_DUTY_BUDGET,)
        assert drop[1].outcomes == {}

    run(bench, scenario)


def test_a_confirmation_round_skipped_for_busy_slots_ends_the_sequence() -> None:
    bench, fake = bench_of()

    def production_starts(result: RoundResult) -> None:
        if result.confirmation is None:
            fake.busy_slots = {0}

    async def scenario() -> None:
        await bench.steady()
        fake.gen_tps = SLOW_TPS
        bench.after_round = production_starts
        drop = await bench.probe()
        assert [r.confirmation for r in drop] == [None, "below_band"]
        assert drop[1].skips == (SKIP_BUSY,)
        # Never confirmed: the next round, idle again, asks afresh and is confirmed.
        bench.after_round = lambda _: None
        fake.busy_slots = set()
        again = await bench.probe()
        assert [r.confirmation for r in again] == [None, "below_band", "below_band"]
        assert [r.confirmation for r in await bench.probe()] == [None]

    run(bench, scenario)


def test_a_drop_in_both_kinds_asks_for_one_sequence() -> None:
    # Prompt and generation both dropping ask for one sequence, not one per series.
    bench, fake = bench_of(FakeLlama(prompt_tps=20000.0, gen_tps=STEADY_TPS))

    async def scenario() -> None:
        await bench.steady()
        fake.prompt_tps, fake.gen_tps = 10000.0, SLOW_TPS
        drop = await bench.probe()
        assert [r.confirmation for r in drop] == [None, "below_band", "below_band"]
        assert bench.confirmations()["below_band"] == 2.0

    run(bench, scenario)


def test_probe_returns_the_last_round_it_recorded() -> None:
    bench, fake = bench_of()

    async def scenario() -> None:
        await bench.steady(1)
        assert bench.last is bench.results[-1]
        await bench.steady(MIN_BAND_ROUNDS - 1)
        fake.gen_tps = SLOW_TPS
        drop = await bench.probe()
        assert len(drop) == 3
        assert bench.last is not None
        # The second confirmation round, as recorded: marked with its reason.
        assert bench.last.started_at == drop[-1].started_at
        assert bench.last.confirmation == "below_band"

    run(bench, scenario)


# Gauges


def band_gauges(bench: Bench) -> dict[str, list[tuple[dict[str, str], float]]]:
    names = [
        f"llama_speed_{kind}_{figure}_tokens_per_second"
        for kind in ("prompt", "generation")
        for figure in ("baseline", "baseline_spread", "recent")
    ] + ["llama_speed_baseline_rounds", "llama_speed_baseline_history_seconds"]
    found = bench.metrics()
    return {name: found.get(name, []) for name in names}


def one(labels: dict[str, str], found: list[tuple[dict[str, str], float]]) -> float:
    """The value of the only sample found, which must carry exactly `labels`."""
    assert [f[0] for f in found] == [labels]
    return found[0][1]


def test_band_gauges_show_recent_first_and_the_baseline_from_twelve_rounds() -> None:
    bench, _ = bench_of(FakeLlama(prompt_tps=10000.0, gen_tps=STEADY_TPS))

    async def scenario() -> None:
        assert all(not v for v in band_gauges(bench).values())
        await bench.steady(MIN_BAND_ROUNDS - 1)
        model = bench.daemon.store.snapshot()[0].server
        assert model is not None
        series = {"target": NAME, "model": model.model, "ctx": "4096", "depth": "0"}
        early = band_gauges(bench)
        assert early["llama_speed_prompt_baseline_tokens_per_second"] == []
        assert early["llama_speed_generation_baseline_tokens_per_second"] == []
        assert early["llama_speed_prompt_baseline_spread_tokens_per_second"] == []
        assert early["llama_speed_generation_baseline_spread_tokens_per_second"] == []
        assert one(
            series, early["llama_speed_generation_recent_tokens_per_second"]
        ) == pytest.approx(STEADY_TPS)
        assert one(series, early["llama_speed_prompt_recent_tokens_per_second"]) == pytest.approx(
            10000.0
        )
        assert sorted(early["llama_speed_baseline_rounds"], key=str) == [
            ({**series, "probe": "generation"}, 11.0),
            ({**series, "probe": "prompt"}, 11.0),
        ]
        assert sorted(early["llama_speed_baseline_history_seconds"], key=str) == [
            ({**series, "probe": "generation"}, 10 * STEP),
            ({**series, "probe": "prompt"}, 10 * STEP),
        ]

        await bench.steady(1)
        full = band_gauges(bench)
        assert one(
            series, full["llama_speed_generation_baseline_tokens_per_second"]
        ) == pytest.approx(STEADY_TPS)
        assert one(series, full["llama_speed_prompt_baseline_tokens_per_second"]) == pytest.approx(
            10000.0
        )
        for kind in ("prompt", "generation"):
            spread = full[f"llama_speed_{kind}_baseline_spread_tokens_per_second"]
            assert one(series, spread) == pytest.approx(0.0, abs=1e-6)
        assert sorted(full["llama_speed_baseline_rounds"], key=str) == [
            ({**series, "probe": "generation"}, 12.0),
            ({**series, "probe": "prompt"}, 12.0),
        ]
        assert sorted(full["llama_speed_baseline_history_seconds"], key=str) == [
            ({**series, "probe": "generation"}, 11 * STEP),
            ({**series, "probe": "prompt"}, 11 * STEP),
        ]

    run(bench, scenario)


def test_the_counters_of_every_reason_are_exported_from_the_start() -> None:
    bench, _ = bench_of()

    async def scenario() -> None:
        assert bench.confirmations() == dict.fromkeys(REASONS, 0.0)
        for operation in ("load", "save"):
            errors = bench.value(
                "llama_speed_storage_errors_total", target=NAME, operation=operation
            )
            assert errors == 0.0

    run(bench, scenario)


# The state file across a restart


def test_each_round_saves_the_state_file(tmp_path: Path) -> None:
    bench, _ = bench_of(storage_path=tmp_path)

    async def scenario() -> None:
        assert not (tmp_path / FILE_NAME).exists()
        await bench.steady(1)
        assert os.listdir(tmp_path) == [FILE_NAME]

    run(bench, scenario)


def test_a_restarted_daemon_judges_its_first_round_by_the_restored_band(tmp_path: Path) -> None:
    first, _ = bench_of(storage_path=tmp_path)
    run(first, first.steady)
    fake = FakeLlama(gen_tps=SLOW_TPS)
    second, _ = bench_of(fake, storage_path=tmp_path)
    second.now = first.now
    storage = second.daemon.storage
    assert storage is not None

    async def scenario() -> None:
        await storage.load(second.now)
        # Without the restored band this round would have nothing to be judged by.
        drop = await second.probe()
        assert [r.confirmation for r in drop] == [None, "below_band", "below_band"]
        model = second.daemon.store.snapshot()[0].server
        assert model is not None
        series = {"target": NAME, "model": model.model, "ctx": "4096", "depth": "0"}
        rounds = second.value("llama_speed_baseline_rounds", probe="generation", **series)
        assert rounds == MIN_BAND_ROUNDS + 3
        baseline = "llama_speed_generation_baseline_tokens_per_second"
        assert second.value(baseline, **series) == pytest.approx(STEADY_TPS)
        assert second.value("llama_speed_storage_errors_total", operation="load") == 0.0

    run(second, scenario)


def test_a_restarted_daemon_shows_the_restored_band_before_its_first_round(
    tmp_path: Path,
) -> None:
    first, _ = bench_of(storage_path=tmp_path)
    run(first, first.steady)
    second, _ = bench_of(storage_path=tmp_path)
    second.now = first.now
    storage = second.daemon.storage
    assert storage is not None

    async def scenario() -> None:
        await storage.load(second.now)
        await second.daemon.discover(NAME)  # the server is known; no round has run
        assert second.results == []
        model = second.daemon.store.snapshot()[0].server
        assert model is not None
        series = {"target": NAME, "model": model.model, "ctx": "4096", "depth": "0"}
        baseline = "llama_speed_generation_baseline_tokens_per_second"
        assert second.value(baseline, **series) == pytest.approx(STEADY_TPS)
        rounds = second.value("llama_speed_baseline_rounds", probe="generation", **series)
        assert rounds == MIN_BAND_ROUNDS

    run(second, scenario)


# Several models behind one endpoint


def test_a_router_confirms_only_the_model_that_asked() -> None:
    fake = FakeRouter.of("alpha", "beta", loaded=("alpha", "beta"))
    for model in fake.models.values():
        model.gen_tps = STEADY_TPS
    target = fast_target(NAME, "http://router", interval=60, confirmation_delay=0.01)
    bench = Bench(fake, target)

    async def steady_then_drop() -> list[RoundResult]:
        for _ in range(MIN_BAND_ROUNDS):
            rounds = await bench.probe()
            assert sorted((r.model, r.confirmation) for r in rounds) == [
                ("alpha", None), ("beta", None),
            ]  # fmt: skip
        fake.models["alpha"].gen_tps = SLOW_TPS
        return await bench.probe()

    drop = run(bench, steady_then_drop)
    scheduled = sorted((r.model, r.confirmation) for r in drop if r.confirmation is None)
    confirming = [(r.model, r.confirmation) for r in drop if r.confirmation is not None]
    assert scheduled == [("alpha", None), ("beta", None)]
    assert confirming == [("alpha", "below_band"), ("alpha", "below_band")]
    assert bench.confirmations()["below_band"] == 2.0


# Configuration


@pytest.fixture
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("LLAMA_SPEED_"):
            monkeypatch.delenv(name)


@pytest.mark.usefixtures("_clean_env")
def test_the_confirmation_and_storage_flags_parse(tmp_path: Path) -> None:
    _, config = parse(
        [
            "--probe.confirmations", "3",
            "--probe.confirmation-delay", "45",
            "--storage.path", str(tmp_path),
        ]
    )  # fmt: skip
    schedule = config.targets[0].schedule
    assert (schedule.confirmations, schedule.confirmation_delay) == (3, 45.0)
    assert schedule.confirmation_rounds == 3
    assert config.storage_path == tmp_path


@pytest.mark.usefixtures("_clean_env")
def test_the_defaults_are_two_confirmations_90_seconds_apart_and_no_state_file() -> None:
    _, config = parse([])
    schedule = config.targets[0].schedule
    assert (schedule.confirmations, schedule.confirmation_delay) == (2, 90.0)
    assert schedule.confirmation_rounds == 2
    assert config.storage_path is None


@pytest.mark.usefixtures("_clean_env")
@pytest.mark.parametrize(
    ("flags", "key"),
    [
        (["--probe.confirmations", "6"], "probe.confirmations"),
        (["--probe.confirmations", "-1"], "probe.confirmations"),
        (["--probe.confirmation-delay", "0"], "probe.confirmation_delay"),
        (["--probe.confirmation-delay", "nan"], "probe.confirmation_delay"),
    ],
)
def test_bad_confirmation_flags_name_their_key(flags: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(flags)
    assert str(info.value).startswith(f"{key}: ")


@pytest.mark.usefixtures("_clean_env")
@pytest.mark.parametrize("kind", ["missing", "a-file"])
def test_a_storage_path_that_is_no_directory_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    path = tmp_path / kind
    if kind == "a-file":
        path.write_text("not a directory\n")
    assert main(["--storage.path", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == f"llama-speed-exporter: config error: storage.path: {path} is not a directory\n"
