"""The daemon against a real b11434 router and the llama-swap stand-in over real servers.

Issue 12's done-when: over at least 20 probe rounds the unloaded model stays unloaded and
no child of it appears; both models' series appear, labelled, when both are loaded, and one's
go when it unloads; production on one model makes the other's rounds skip and none of its
probes run meanwhile; each child's KV capacity equals its own `llama_kv_cache: size =` line;
behind llama-swap, nothing is ever swapped in and the running model is probed.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Final

import httpx
import pytest

from exporter.cli import EXIT_CONFIG, main
from exporter.config import Target
from exporter.daemon import Daemon
from exporter.probe.results import SKIP_BUSY, RoundResult
from exporter.state.store import Recorded
from tests import router_fixtures, test_llama_swap_standin
from tests.daemon_harness import fast_target, running_daemon, sample, wait_for_metrics
from tests.router_fixtures import StartRouter, load, router_models, statuses, unload
from tests.test_kv_real_server import MIB, PRINT_TOLERANCE_MIB
from tests.test_llama_swap_standin import StartSwap, start_as_production_does

pytestmark = pytest.mark.real_server
# pytest finds a fixture by its name in the test's module.
llama_router = router_fixtures.llama_router
router_models_dir = router_fixtures.router_models_dir
llama_swap = test_llama_swap_standin.llama_swap

ROUNDS: Final = 20
# Real llama.cpp on a loaded 2-core machine: generous deadlines, tiny requests.
DEADLINE_S: Final = 240.0
_HTTP_TIMEOUT_S: Final = 60.0


def real_target(url: str) -> Target:
    """Rounds every second, tiny requests, and a timeout a loaded machine cannot miss."""
    return fast_target("r", url, timeout=30.0, prompt_tokens=16, generation_tokens=4, repetitions=1)


def speed(text: str, model: str) -> float | None:
    return sample(text, "llama_speed_generation_tokens_per_second", target="r", model=model)


@contextmanager
def recording(daemon: Daemon) -> Iterator[list[RoundResult]]:
    """Every round the daemon records from here on."""
    seen: list[RoundResult] = []
    record = daemon.store.record_round

    def spy(result: RoundResult) -> Recorded:
        seen.append(result)
        return record(result)

    daemon.store.record_round = spy  # type: ignore[method-assign]
    yield seen


def test_the_unloaded_model_is_never_loaded_over_20_rounds(llama_router: StartRouter) -> None:
    router = llama_router("--models-max", "1")
    load(router.url, "alpha")
    children = router.children()
    seen_statuses: list[dict[str, str]] = []

    def rounds_done(text: str) -> bool:
        seen_statuses.append(statuses(router.url))
        assert "beta" not in router.children()
        skipped = sample(text, "llama_speed_probes_skipped_total", target="r", reason="not_loaded")
        return (skipped or 0) >= ROUNDS and speed(text, "alpha") is not None

    with running_daemon([real_target(router.url)]) as (_, base):
        text = wait_for_metrics(base, rounds_done, timeout=DEADLINE_S)
    assert all(s == {"alpha": "loaded", "beta": "unloaded"} for s in seen_statuses)
    assert router.children() == children  # alpha's same child: nothing evicted it either
    assert sample(text, "llama_speed_model_loaded", target="r", model="beta") == 0.0
    assert sample(text, "llama_speed_model_loaded", target="r", model="alpha") == 1.0
    assert "model is not loaded" not in router.log_text()  # nothing even asked for beta


def test_both_models_labelled_one_unloads_and_kv_matches_each_childs_log(
    llama_router: StartRouter,
) -> None:
    router = llama_router("--models-max", "2", "-lv", "4")
    load(router.url, "alpha")
    load(router.url, "beta")
    ports = {name: child_port(m.args) for name, m in router_models(router.url).items()}
    with running_daemon([real_target(router.url)]) as (_, base):
        both = wait_for_metrics(
            base,
            lambda t: all(
                speed(t, m) is not None
                and sample(t, "llama_speed_kv_cache_capacity_bytes", model=m) is not None
                for m in ("alpha", "beta")
            ),
            timeout=DEADLINE_S,
        )
        unload(router.url, "beta")
        after = wait_for_metrics(
            base,
            lambda t: sample(t, "llama_speed_model_loaded", model="beta") == 0.0,
            timeout=DEADLINE_S,
        )
    for name in (
        "llama_speed_generation_tokens_per_second", "llama_speed_server_info",
        "llama_speed_kv_cache_capacity_tokens", "llama_speed_canary_info",
    ):  # fmt: skip
        assert sample(after, name, model="beta") is None, name
    assert speed(after, "alpha") is not None
    assert statuses(router.url)["alpha"] == "loaded"

    for model, port in ports.items():
        logged = logged_kv(router.log_text(), port)
        cells = sample(both, "llama_speed_kv_cache_capacity_tokens", model=model)
        total = sample(both, "llama_speed_kv_cache_capacity_bytes", model=model)
        assert cells == logged[0], (model, logged)
        assert total is not None and abs(logged[1] - total / MIB) <= PRINT_TOLERANCE_MIB


_KV_LINE: Final = re.compile(
    r"^\[(?P<port>\d+)\].*llama_kv_cache: size = +(?P<mib>[\d.]+) MiB \( *(?P<cells>\d+) cells",
    re.MULTILINE,
)


def logged_kv(log: str, port: int) -> tuple[int, float]:
    """A child's (cells, MiB) from its own log lines, which the router prefixes `[port]`."""
    (found,) = [m for m in _KV_LINE.finditer(log) if int(m["port"]) == port]
    return int(found["cells"]), float(found["mib"])


def child_port(args: tuple[str, ...]) -> int:
    return int(args[args.index("--port") + 1])


def test_production_on_one_model_skips_the_others_rounds(llama_router: StartRouter) -> None:
    # With context shift, production generates until the test closes its stream: it outlasts
    # the test's wait however fast the machine (a slot's context alone ends it in a second).
    router = llama_router("--models-max", "2", "--context-shift")
    load(router.url, "alpha")
    load(router.url, "beta")
    grace = 1.0  # production shows in /slots within a poll; a beta round running then is discarded
    with running_daemon([real_target(router.url)]) as (daemon, base):
        wait_for_metrics(
            base, lambda t: speed(t, "beta") is not None and speed(t, "alpha") is not None,
            timeout=DEADLINE_S,
        )  # fmt: skip
        with recording(daemon) as rounds, production(router.url, "alpha") as window:

            def beta_rounds_during() -> list[RoundResult]:
                began = window.started
                return [
                    r for r in rounds
                    if began is not None and r.model == "beta" and r.started_at > began + grace
                ]  # fmt: skip

            deadline = time.monotonic() + DEADLINE_S
            while len(beta_rounds_during()) < 2 and time.monotonic() < deadline:
                assert window.running(), "production ended before two rounds of beta came"
                time.sleep(0.1)  # polling the recorded rounds within the deadline
            during = beta_rounds_during()
        text = wait_for_metrics(base, lambda t: True)
    assert len(during) >= 2, "no round of beta came while production ran"
    # From a poll after production began to its end, no round of beta sends anything.
    assert all(r.skips == (SKIP_BUSY,) and not r.outcomes for r in during), during
    assert sample(text, "llama_speed_probes_skipped_total", target="r", reason=SKIP_BUSY)


# More tokens than the test waits for at any speed; the test closes the stream first.
PRODUCTION_TOKENS: Final = 10_000_000


class _Production:
    """A long streamed completion on one model, as a client sends it, until closed."""

    def __init__(self) -> None:
        self.started: float | None = None  # unix time of its first streamed token
        self.stop = threading.Event()
        self.ended = threading.Event()

    def running(self) -> bool:
        return not self.ended.is_set()


@contextmanager
def production(url: str, model: str) -> Iterator[_Production]:
    window = _Production()
    body: dict[str, Any] = {
        "model": model, "prompt": "the llama", "n_predict": PRODUCTION_TOKENS,
        "ignore_eos": True, "cache_prompt": False, "stream": True,
    }  # fmt: skip

    def run() -> None:
        try:
            with httpx.stream(
                "POST", f"{url}/completion", json=body, timeout=600, trust_env=False
            ) as answer:
                for _ in answer.iter_lines():
                    if window.started is None:
                        window.started = time.time()
                    if window.stop.is_set():
                        break  # closing the stream makes llama-server drop the task
        finally:
            window.ended.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield window
    finally:
        window.stop.set()
        thread.join(timeout=60)


def test_llama_swap_running_model_probed_and_nothing_swapped_in(llama_swap: StartSwap) -> None:
    standin = llama_swap()
    start_as_production_does(standin, "alpha")
    starts = dict(standin.starts)

    def rounds_done(text: str) -> bool:
        assert standin.running() == {"alpha": "ready"}
        skipped = sample(text, "llama_speed_probes_skipped_total", target="r", reason="not_loaded")
        return (skipped or 0) >= ROUNDS and speed(text, "alpha") is not None

    with running_daemon([real_target(standin.url)]) as (_, base):
        text = wait_for_metrics(base, rounds_done, timeout=DEADLINE_S)
    assert dict(standin.starts) == starts == {"alpha": 1}
    assert standin.swaps == 0
    assert sample(text, "llama_speed_model_loaded", target="r", model="beta") == 0.0
    assert not [r for r in standin.requests if "beta" in r]


def test_probe_command_refuses_a_model_that_is_not_loaded(
    llama_router: StartRouter, capsys: pytest.CaptureFixture[str]
) -> None:
    router = llama_router("--models-max", "1")
    load(router.url, "alpha")
    fast = ["--probe.prompt-tokens", "16", "--probe.generation-tokens", "4"]
    fast += ["--probe.repetitions", "1", "--target", router.url]
    assert main(["probe", *fast, "--model", "beta"]) == EXIT_CONFIG
    assert "'beta'" in capsys.readouterr().err
    assert main(["probe", *fast, "--model", "gamma"]) == EXIT_CONFIG
    assert main(["probe", *fast, "--json"]) == 0
    (probed,) = json.loads(capsys.readouterr().out)
    assert probed["model"] == "alpha" and probed["ok"]
    assert statuses(router.url) == {"alpha": "loaded", "beta": "unloaded"}
    assert list(router.children()) == ["alpha"]
