"""`bench --target` against a router (the fake b11434 one) or a single server: which model it
measures, what it refuses, and that no request it sends ever loads a model.

The bench runs in-process over the fakes' transports; the choices that end before a server is
asked anything run as the installed command. A real router is in test_bench_router_real.py.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from exporter.bench.progress import LogProgress
from exporter.bench.record import BenchRecord, PlanRecord, RunRecord
from exporter.bench.report import render_report
from exporter.bench.sweep import Bench, BenchSettings
from exporter.bench.target import BenchTarget, RefusedError, SeveralModelsError, choose_at
from exporter.llama.client import LlamaClient
from exporter.llama.discovery import discover
from exporter.probe.results import SKIP_BUSY
from tests.fake_router import FakeRouter
from tests.fakes import FakeLlama

URL = "http://router"
EXIT_USAGE = 2


def settings(tmp_path: Path, model: str | None) -> BenchSettings:
    plan = PlanRecord(
        prompt_tokens=(32,), generation_tokens=(8,), depths=(0,), repetitions=1, warmup=False
    )
    return BenchSettings(
        plan=plan, probe_timeout=30, load_timeout=30, log_dir=tmp_path, target=URL,
        model=model, busy_retries=0,  # one try: a busy round is reported, not waited out
    )  # fmt: skip


def run_bench(
    transport: httpx.AsyncBaseTransport, tmp_path: Path, model: str | None
) -> BenchRecord:
    bench = Bench(
        settings(tmp_path, model), nvml=None, observer=LogProgress(),
        on_update=lambda _: None, transport=transport,
    )  # fmt: skip
    return bench.execute()


def only_run(record: BenchRecord) -> RunRecord:
    (run,) = record.runs
    return run


def choose(transport: httpx.AsyncBaseTransport, model: str | None) -> BenchTarget:
    return asyncio.run(choose_at(URL, None, model, timeout=30, transport=transport))


def assert_never_loads(fake: FakeRouter) -> None:
    assert fake.loads == []
    for path, query, body in fake.requests:
        named = query.get("model") or (body or {}).get("model")
        if named is not None:
            assert query.get("autoload") == "false", (path, query)


# --- the model measured ---


def test_the_named_loaded_model_is_measured_and_recorded(tmp_path: Path) -> None:
    fake = FakeRouter.of("alpha", "beta", loaded=("alpha",))
    record = run_bench(fake.transport(), tmp_path, "alpha")
    run = only_run(record)
    assert run.status == "stable", run.reason
    assert {s.kind for s in run.samples} == {"prompt", "generation"}
    assert (record.target_kind, record.target_model) == ("router", "alpha")
    assert run.server is not None and run.server.model == "alpha"
    assert record.label == "alpha"
    # Every completion went to alpha, and beta was never named.
    completions = [q for path, q, _ in fake.requests if path == "/completion"]
    assert completions and all(q["model"] == "alpha" for q in completions)
    assert fake.named() == {"alpha"}
    assert_never_loads(fake)
    assert "**Server:** model `alpha` of the router at `http://router`" in render_report(record)


def test_without_model_the_one_loaded_model_is_measured(tmp_path: Path) -> None:
    fake = FakeRouter.of("alpha", "beta", loaded=("beta",))
    record = run_bench(fake.transport(), tmp_path, None)
    assert only_run(record).status == "stable"
    assert record.target_model == "beta"
    assert fake.named() == {"beta"}
    assert_never_loads(fake)


def test_a_single_server_records_its_kind_and_accepts_the_model_it_serves(tmp_path: Path) -> None:
    fake = FakeLlama()
    served = choose(fake.transport(), None)
    assert (served.kind, served.model) == ("single", None)
    name = asyncio.run(_served_name(fake))
    record = run_bench(fake.transport(), tmp_path, name)
    assert only_run(record).status == "stable"
    assert (record.target_kind, record.target_model) == ("single", name)
    assert "(already running)" in render_report(record)


async def _served_name(fake: FakeLlama) -> str:
    client = LlamaClient(URL, transport=fake.transport())
    try:
        return (await discover(client)).model
    finally:
        await client.aclose()


# --- what is refused, before any request names a model ---


def test_a_model_that_is_not_loaded_is_refused_before_it_is_named() -> None:
    fake = FakeRouter.of("alpha", "beta", loaded=("alpha",))
    with pytest.raises(RefusedError, match=r"'beta' on http://router is unloaded, not loaded"):
        choose(fake.transport(), "beta")
    assert fake.named() == set()
    assert fake.loaded == ["alpha"]
    assert_never_loads(fake)


def test_an_unknown_model_is_refused_with_the_models_there() -> None:
    fake = FakeRouter.of("alpha", "beta", loaded=("alpha",))
    with pytest.raises(RefusedError, match=r"no model 'gamma' \(models: alpha, beta\)"):
        choose(fake.transport(), "gamma")
    assert fake.named() == set()


def test_several_loaded_models_and_none_named_is_a_usage_error_listing_them() -> None:
    fake = FakeRouter.of("alpha", "beta", loaded=("alpha", "beta"))
    with pytest.raises(SeveralModelsError, match=r"several models loaded \(alpha, beta\).*--model"):
        choose(fake.transport(), None)
    assert fake.named() == set()


def test_nothing_loaded_is_refused_and_nothing_is_loaded() -> None:
    fake = FakeRouter.of("alpha", "beta")
    with pytest.raises(RefusedError, match=r"no model loaded .*bench will not load one"):
        choose(fake.transport(), None)
    assert fake.named() == set()
    assert_never_loads(fake)


def test_a_single_server_serving_another_model_is_refused() -> None:
    with pytest.raises(RefusedError, match=r"serves '.+', not 'alpha'"):
        choose(FakeLlama().transport(), "alpha")


def test_a_model_unloaded_before_the_run_is_not_measured_and_not_loaded(tmp_path: Path) -> None:
    # Chosen by the command, then unloaded by its owner before the run read the list again.
    fake = FakeRouter.of("alpha", "beta", loaded=("beta",))
    run = only_run(run_bench(fake.transport(), tmp_path, "alpha"))
    assert run.status == "probe_failed"
    assert "'alpha' on http://router is unloaded, not loaded" in run.reason
    assert run.samples == ()
    assert fake.named() == set()
    assert_never_loads(fake)


# --- the busy check across the router ---


def test_production_on_another_loaded_model_makes_the_round_busy(tmp_path: Path) -> None:
    fake = FakeRouter.of("alpha", "beta", loaded=("alpha", "beta"))
    fake.models["beta"].busy_slots = {0}  # the models share the GPUs
    run = only_run(run_bench(fake.transport(), tmp_path, "alpha"))
    assert (run.status, run.problems[0], run.samples) == ("probe_failed", SKIP_BUSY, ())
    assert not any(path == "/completion" for path, _, _ in fake.requests)
    assert_never_loads(fake)


# --- as a command ---


def bench(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "exporter", "bench", *args],
        capture_output=True, text=True, timeout=60, check=False, cwd=cwd,
    )  # fmt: skip


def test_model_with_server_cmd_is_a_usage_error(tmp_path: Path) -> None:
    done = bench("--server-cmd", "llama-server -m m.gguf", "--model", "alpha", cwd=tmp_path)
    assert done.returncode == EXIT_USAGE, done.stderr
    assert "--model needs --target" in done.stderr
    assert list(tmp_path.iterdir()) == []
