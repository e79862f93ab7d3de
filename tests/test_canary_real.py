"""The output canary against a real llama-server (b11434): a file swapped under the same alias
counts one change once it repeats; a restart with the same file counts none."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from exporter.llama.client import LlamaClient
from exporter.probe.plan import MeasurePlan
from exporter.probe.results import RoundResult
from exporter.probe.runner import ProbeRunner
from exporter.state.store import Store
from testbed.quantize import quantize
from tests.conftest import StartServer

pytestmark = pytest.mark.real_server

# The measured samples are not this test's subject: as small as a round allows.
PLAN = MeasurePlan(prompt_tokens=16, generation_tokens=4, repetitions=1, warmup=False, timeout=60.0)


async def rounds(url: str, count: int) -> list[RoundResult]:
    client = LlamaClient(url, timeout=PLAN.timeout)
    runner = ProbeRunner("tiny", client, PLAN, overlap_poll_interval=0.1)
    try:
        return [await runner.run_round() for _ in range(count)]
    finally:
        await client.aclose()


def fingerprints(results: list[RoundResult]) -> list[str]:
    found = []
    for result in results:
        assert result.canary is not None and result.canary.output is not None, result
        found.append(result.canary.output.fingerprint)
    return found


def test_a_quant_swapped_under_the_same_alias_counts_once_and_a_restart_none(
    llama_server: StartServer, tiny_model: Path, tmp_path: Path
) -> None:
    served = tmp_path / "served.gguf"  # the one path the server is started on each time
    shutil.copyfile(tiny_model, served)
    q4_0 = quantize(tiny_model, tmp_path / "tiny-q4_0.gguf", "Q4_0")
    store = Store([("tiny", "http://llama")])
    args = ("--alias", "tiny")

    def serve_rounds(count: int) -> list[RoundResult]:
        server = llama_server(*args, model=served)
        try:
            results = asyncio.run(rounds(server.url, count))
        finally:
            server.stop()
        for result in results:
            store.record_round(result)
        return results

    f32 = serve_rounds(2) + serve_rounds(1)  # and a restart with the same file
    assert len(set(fingerprints(f32))) == 1, "greedy decoding on one slot is deterministic"
    (state,) = store.snapshot()
    assert state.server is not None and state.server.quant == "all F32"
    assert state.canary.changes == 0

    shutil.copyfile(q4_0, served)  # the silent swap: same path, same alias, same ctx
    swapped = serve_rounds(1)
    assert fingerprints(swapped) != fingerprints(f32)[:1], "Q4_0 must answer differently"
    (state,) = store.snapshot()
    assert state.server is not None and state.server.model == "tiny"
    assert state.server.quant != "all F32"  # what the alert joins on to stay silent
    assert state.canary.changes == 0, "a change counts only once it repeats"

    confirmed = serve_rounds(1)  # a restart too, with the new file
    assert fingerprints(confirmed) == fingerprints(swapped)
    (state,) = store.snapshot()
    assert state.canary.changes == 1
    assert state.canary.fingerprint == fingerprints(swapped)[0]

    again = serve_rounds(2)  # restarts with the same file count nothing
    assert set(fingerprints(again)) == set(fingerprints(swapped))
    (state,) = store.snapshot()
    assert state.canary.changes == 1
