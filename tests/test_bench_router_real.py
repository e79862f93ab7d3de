"""`bench --target URL --model NAME` against a real b11434 router over two tiny models.

With `--models-max 1`, a request naming the unloaded model would evict the loaded one: the
bench measures the loaded model only, and refuses the other without loading it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from exporter.bench.record import load as load_record
from tests import router_fixtures, test_llama_swap_standin
from tests.router_fixtures import StartRouter, load, statuses
from tests.test_llama_swap_standin import StartSwap, start_as_production_does

pytestmark = pytest.mark.real_server
# pytest finds a fixture by its name in the test's module; these live with the router tools.
llama_router = router_fixtures.llama_router
router_models_dir = router_fixtures.router_models_dir
llama_swap = test_llama_swap_standin.llama_swap

EXIT_USAGE = 2
# One tiny round: PP and TG once each, at depth 0.
TINY = ["-p", "32", "-n", "8", "-d", "0", "-r", "1", "--no-warmup", "--no-gpu", "--no-chart",
        "--log.format", "json"]  # fmt: skip


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "exporter", "bench", *args],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


def test_bench_measures_the_loaded_model_and_refuses_the_other(
    llama_router: StartRouter, tmp_path: Path
) -> None:
    router = llama_router("--models-max", "1")
    load(router.url, "alpha")
    alpha = router.children()["alpha"]

    out = tmp_path / "alpha"
    done = bench("--target", router.url, "--model", "alpha", *TINY, "-o", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    record = load_record(out / "results.json")
    (run,) = record.runs
    assert (record.target_kind, record.target_model) == ("router", "alpha")
    assert run.status == "stable", run.reason
    assert run.server is not None and run.server.model == "alpha"
    assert {(s.kind, s.depth) for s in run.samples} == {("prompt", 0), ("generation", 0)}
    # alpha's own process (found by its --port), not the router's, holds its cache.
    assert run.kv is not None and run.kv.cells == 4096, run.kv_note
    assert run.host_load is not None and run.host_load.server_seen
    assert "model `alpha` of the router" in (out / "report.md").read_text()

    refused = tmp_path / "beta"
    done = bench("--target", router.url, "--model", "beta", *TINY, "-o", str(refused))
    assert done.returncode == EXIT_USAGE, done.stderr[-3000:]
    (line,) = done.stderr.strip().splitlines()
    assert "refused: model 'beta'" in line and "not loaded" in line, line
    assert not refused.exists()
    # beta was never named: not loaded, no child; alpha kept its process.
    assert statuses(router.url) == {"alpha": "loaded", "beta": "unloaded"}
    assert router.children() == {"alpha": alpha}


def test_bench_through_llama_swap_measures_the_running_model_and_swaps_nothing_in(
    llama_swap: StartSwap, tmp_path: Path
) -> None:
    standin = llama_swap()
    start_as_production_does(standin, "alpha")
    starts = dict(standin.starts)

    out = tmp_path / "alpha"
    done = bench("--target", standin.url, "--model", "alpha", *TINY, "-o", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    record = load_record(out / "results.json")
    (run,) = record.runs
    assert (record.target_kind, record.target_model) == ("llama-swap", "alpha")
    assert run.status == "stable", run.reason
    assert {(s.kind, s.depth) for s in run.samples} == {("prompt", 0), ("generation", 0)}

    refused = bench("--target", standin.url, "--model", "beta", *TINY, "-o", str(tmp_path / "b"))
    assert refused.returncode == EXIT_USAGE, refused.stderr[-3000:]
    # Nothing the bench sent started or swapped a model, nor named the stopped one.
    assert dict(standin.starts) == starts == {"alpha": 1}
    assert standin.swaps == 0
    assert not [r for r in standin.requests if "beta" in r]
