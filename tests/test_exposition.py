"""What /metrics renders from the store: a golden file, label-set turnover, collector isolation."""

from __future__ import annotations

import dataclasses
import re
import subprocess
from collections.abc import Iterable, Sequence

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric as Family

from exporter.collectors import catalogue as metrics
from exporter.collectors import exporter_collectors
from exporter.collectors.gpu import GpuCollector
from exporter.collectors.guard import GuardedCollectors, SnapshotCollector
from exporter.daemon import round_event
from exporter.gpu.nvml import Nvml
from exporter.kv.cache import KvCapacity
from exporter.kv.facts import ModelFacts
from exporter.llama.client import Timings
from exporter.llama.discovery import ServerInfo
from exporter.probe.results import (
    KINDS,
    CanaryOutcome,
    CanaryOutput,
    Kind,
    KindOutcome,
    RoundResult,
    Sample,
)
from exporter.schedule.plan import Schedule
from exporter.state.baseline import SeriesKey
from exporter.state.store import Store, TargetState
from tests import fake_pynvml
from tests.fake_pynvml import FakePynvml
from tests.golden_files import GOLDEN, check_golden

SCHEDULE = Schedule()


def server(model: str = "Qwen3-Coder-Next-REAP-40B-A3B.i1-IQ3_M", ctx: int = 262144) -> ServerInfo:
    return ServerInfo(
        model=model,
        model_path=f"/models/{model}.gguf",
        ctx=ctx,
        slots=2,
        quant="IQ3_M - 3.66 bpw",
        build="b11434-abc1234",
        n_vocab=151936,
        n_params=40_000_000_000,
        size_bytes=18_200_000_000,
        n_ctx_train=262144,
        slots_endpoint=True,
        metrics_endpoint=False,
    )


def pp(depth: int, tokens: int, ms: float, ttft: float) -> Sample:
    t = Timings(prompt_n=tokens, prompt_ms=ms, cache_n=depth, predicted_n=1, predicted_ms=0.001)
    return Sample("prompt", depth, tokens, ms / 1000, ttft, t)


def tg(depth: int, steps: int, ms: float) -> Sample:
    t = Timings(prompt_n=1, prompt_ms=45.0, cache_n=depth, predicted_n=steps + 1, predicted_ms=ms)
    # Two cards at about 115 W each during the request.
    return Sample("generation", depth, steps, ms / 1000, None, t, energy_joules=ms * 0.23)


CANARY_BEFORE = CanaryOutput(tuple(range(32)), 0.61)
CANARY_AFTER = CanaryOutput(tuple(range(1, 33)), 0.58)


def canary_round(info: ServerInfo, at: float, canary: CanaryOutcome) -> RoundResult:
    """A round that measured nothing but its canary."""
    return RoundResult("prod", at, 0.2, info, canary=canary)


def good_round(
    info: ServerInfo, at: float = 1_790_000_000.0, canary: CanaryOutcome | None = None
) -> RoundResult:
    return RoundResult(
        target="prod",
        started_at=at,
        duration=14.5,
        server=info,
        canary=canary,
        outcomes={
            "prompt": KindOutcome(
                "prompt", (pp(0, 512, 640.0, 0.71), pp(8192, 512, 800.0, 0.93)), duration=1.9,
                attempted=True,
            ),
            "generation": KindOutcome(
                "generation", (tg(0, 127, 5644.4), tg(8192, 127, 6047.6)), duration=11.9,
                attempted=True,
            ),
        },
    )  # fmt: skip


def populated_store() -> Store:
    store = Store([("prod", "http://gpu-box:8080"), ("lab", "http://lab:8080")])
    # The canary's output settled, then changed and repeated: one change, confirmed by the
    # last round; one canary overlapped by production.
    earlier = (CANARY_BEFORE, CANARY_BEFORE, None, CANARY_AFTER)
    for n, output in enumerate(earlier):
        outcome = CanaryOutcome(output, None if output else "overlap")
        store.record_round(canary_round(server(), 1_789_990_000.0 + 1200 * n, outcome))
    # Depth 0's bands as a state file restores them: twelve earlier rounds, so the good
    # round below completes a baseline; depth 8192's has only that round.
    info = server()
    bands: tuple[tuple[Kind, float], ...] = (("prompt", 700.0), ("generation", 44.0))
    for kind, speed in bands:
        key = SeriesKey("prod", info.model, info.ctx, 0, kind)
        rounds = [(1_789_900_000.0 + 1200 * n, speed * (1 + (n % 3 - 1) / 50)) for n in range(12)]
        store.baselines.load(key, f"{info.model_path}|{info.quant}", rounds, now=1_790_000_000.0)
    store.record_round(good_round(info, canary=CanaryOutcome(CANARY_AFTER)))
    store.record_skip("prod", "busy")
    # The seed's geometry: 9,984 B/token, 262,144 cells, two slots of recurrent state; an
    # A3B mixture of experts at IQ3_M reads about 1.5 GB of weights per token.
    cache = KvCapacity(
        n_ctx=262144,
        n_ctx_seq=262144,
        n_seq=2,
        unified=True,
        cells=262144,
        swa_cells=0,
        bytes=262144 * 9984,
        recurrent_bytes=2 * 79_036_416,
        parts=(),
    )
    facts = ModelFacts("q8_0", "q4_0", 9984, cache, 1_500_000_000)  # fmt: skip
    store.record_model("prod", facts, None, 70_000)
    store.record_model("lab", None, "model_unreadable", None)
    store.record_model("lab", None, "unknown_architecture", None)
    store.record_duty("prod", 0.004)
    store.record_round(
        RoundResult(
            "lab", 1_790_000_100.0, 0.01, None, server_error="connect",
            outcomes={
                k: KindOutcome(k, failure="connect", attempted=True) for k in KINDS
            },
        )
    )  # fmt: skip
    return store


def render(store: Store, nvml: Nvml | None = None) -> str:
    registry = CollectorRegistry()
    schedules = {"prod": SCHEDULE, "lab": SCHEDULE}
    extra: list[tuple[str, SnapshotCollector]] = []
    if nvml is not None:
        pids = {"prod": fake_pynvml.LLAMA_PID, "lab": None}
        extra.append(("gpu", GpuCollector(nvml, lambda: pids)))
    registry.register(exporter_collectors(store.snapshot, schedules, ("0.1.0", "3.11.7"), extra))
    text = generate_latest(registry).decode()
    # Durations of the scrape itself vary: pin them for the comparison.
    return re.sub(r"(llama_speed_collector_duration_seconds\{[^}]*\}) \S+", r"\1 0.0", text)


def test_a_scrape_takes_one_snapshot_for_every_collector() -> None:
    """One copy of the store per scrape: server_info, speeds and KV come from one moment."""
    store = populated_store()
    calls: list[int] = []

    def counted() -> list[TargetState]:
        calls.append(1)
        return store.snapshot()

    registry = CollectorRegistry()
    gpu = GpuCollector(Nvml(FakePynvml()), lambda: {"prod": fake_pynvml.LLAMA_PID})
    registry.register(exporter_collectors(counted, {"prod": SCHEDULE, "lab": SCHEDULE},
                                          extra=[("gpu", gpu)]))  # fmt: skip
    text = generate_latest(registry).decode()
    assert len(calls) == 1
    assert "llama_speed_generation_ceiling_tokens_per_second{" in text  # the GPU one, too


def test_golden_exposition() -> None:
    check_golden("exposition.prom", render(populated_store()))


def test_golden_exposition_two_gpus() -> None:
    check_golden("exposition_gpu.prom", render(populated_store(), Nvml(FakePynvml())))


def test_golden_exposition_without_nvml() -> None:
    gpus = FakePynvml()
    gpus.fail("nvmlInit", fake_pynvml.NVMLError_LibraryNotFound)
    check_golden("exposition_no_nvml.prom", render(populated_store(), Nvml(gpus)))


@pytest.mark.parametrize(
    "name", ["exposition.prom", "exposition_gpu.prom", "exposition_no_nvml.prom"]
)
def test_golden_passes_promtool_check_metrics(name: str, promtool: str) -> None:
    done = subprocess.run(
        [promtool, "check", "metrics"],
        input=(GOLDEN / name).read_text(),
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout + done.stderr == ""


def test_every_catalogued_metric_is_in_a_golden_file() -> None:
    names = ("exposition.prom", "exposition_gpu.prom", "daemon.prom")
    text = "".join((GOLDEN / name).read_text() for name in names)
    for metric in metrics.CATALOGUE:
        assert f"# TYPE {metric.exposed_name} {metric.type}" in text, metric.name


def test_speed_values_are_the_server_timings() -> None:
    text = render(populated_store())
    labels = 'ctx="262144",depth="0",model="Qwen3-Coder-Next-REAP-40B-A3B.i1-IQ3_M",target="prod"'
    assert f"llama_speed_prompt_tokens_per_second{{{labels}}} 800.0" in text
    assert f"llama_speed_generation_tokens_per_second{{{labels}}} 22.5" in text


def test_model_change_replaces_the_label_sets() -> None:
    store = populated_store()
    assert 'model="Qwen3-Coder-Next-REAP-40B-A3B.i1-IQ3_M"' in render(store)
    store.record_discovery("prod", server("Q2_K_XL", 65536), None)
    text = render(store)
    assert "IQ3_M" not in text.replace('quant="IQ3_M - 3.66 bpw"', "")
    assert 'llama_speed_server_info{build="b11434-abc1234",ctx="65536",model="Q2_K_XL"' in text
    assert "llama_speed_prompt_tokens_per_second{" not in text  # nothing measured yet
    store.record_round(good_round(server("Q2_K_XL", 65536)))
    assert 'llama_speed_prompt_tokens_per_second{ctx="65536",depth="0",model="Q2_K_XL"' in (
        render(store)
    )


def test_down_server_keeps_last_speeds_but_drops_info() -> None:
    store = populated_store()
    store.record_discovery("prod", None, "connect")
    text = render(store)
    assert 'llama_speed_server_up{target="prod"} 0.0' in text
    assert 'llama_speed_server_info{build="b11434-abc1234"' not in text
    assert 'llama_speed_generation_tokens_per_second{ctx="262144"' in text


def test_counters_accumulate_token_weighted() -> None:
    store = populated_store()
    store.record_round(good_round(server(), at=1_790_000_600.0))
    text = render(store)
    labels = 'ctx="262144",depth="0",model="Qwen3-Coder-Next-REAP-40B-A3B.i1-IQ3_M",target="prod"'
    assert f"llama_speed_probe_prompt_tokens_total{{{labels}}} 1024.0" in text
    assert f"llama_speed_probe_prompt_seconds_total{{{labels}}} 1.28" in text
    assert f"llama_speed_probe_generated_tokens_total{{{labels}}} 254.0" in text
    assert 'llama_speed_probes_total{probe="prompt",target="prod"} 2.0' in text


def test_discarded_round_keeps_success_unchanged() -> None:
    store = populated_store()
    store.record_round(
        RoundResult(
            "prod", 1_790_000_900.0, 0.2, server(),
            outcomes={"prompt": KindOutcome("prompt", discards=("overlap",), attempted=True)},
        )
    )  # fmt: skip
    text = render(store)
    assert 'llama_speed_probe_success{probe="prompt",target="prod"} 1.0' in text
    assert (
        'llama_speed_probes_discarded_total{probe="prompt",reason="overlap",target="prod"} 1.0'
        in text
    )


class Broken:
    def collect(self, targets: Sequence[TargetState]) -> Iterable[Family]:
        raise RuntimeError("boom")


def test_a_failing_collector_does_not_fail_the_scrape() -> None:
    store = populated_store()
    registry = CollectorRegistry()
    registry.register(
        GuardedCollectors(
            store.snapshot,
            [("broken", Broken()),
             *exporter_collectors(store.snapshot, {"prod": SCHEDULE, "lab": SCHEDULE})._collectors],
            ("0.1.0", "3.11.7"),
        )
    )  # fmt: skip
    text = generate_latest(registry).decode()
    assert 'llama_speed_collector_success{collector="broken"} 0.0' in text
    assert 'llama_speed_collector_success{collector="probe"} 1.0' in text
    assert "llama_speed_prompt_tokens_per_second{" in text


def test_the_round_log_event_carries_the_exported_figures() -> None:
    result = good_round(server())
    two_reps = dataclasses.replace(
        result,
        outcomes={**result.outcomes,
                  "prompt": KindOutcome("prompt", (pp(0, 512, 640.0, 0.7), pp(0, 512, 1280.0, 0.9)),
                                        attempted=True)},
    )  # fmt: skip
    event = round_event(two_reps)
    assert event["pp_d0_tps"] == round(1024 / 1.92, 2)  # token-weighted, as the gauge
    assert event["ttft_d0_ms"] == 800.0
    assert event["tg_d8192_tps"] == round(127 / 6.0476, 2)
    assert event["model"] == "Qwen3-Coder-Next-REAP-40B-A3B.i1-IQ3_M"
