"""The llama-swap stand-in: its API as llama-swap's handlers define it, and what swaps a model.

Tests marked real_server start real llama-servers behind it; the others never start one (their
models' commands could not run) and check the answers that need no upstream.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final, Protocol

import httpx
import pytest

from exporter.llama.client import LlamaClient
from exporter.llama.router import (
    RouterModel,
    TargetKind,
    detect_kind,
    parse_swap_listing,
    parse_swap_running,
    read_swap_models,
    swap_path,
)
from tests import router_fixtures
from tests.conftest import DEFAULT_CTX
from tests.llama_swap_standin import DEFAULT_IGNORE_PATHS, LlamaSwapStandin, SwapModel
from tests.router_fixtures import with_client

FIXTURES = Path(__file__).parent / "fixtures" / "router"
# pytest finds a fixture by its name in the test's module: the tiny models of the router tests.
router_models_dir = router_fixtures.router_models_dir

# More than the 20 probe rounds.
READ_ROUNDS: Final = 25
_TIMEOUT_S: Final = 120.0  # a request that starts a model waits for its load


class StartSwap(Protocol):
    def __call__(self, *, swap: bool = True, ignore: str | None = None) -> LlamaSwapStandin: ...


@pytest.fixture
def llama_swap(
    router_models_dir: Path, llama_server_binary: Path, tmp_path: Path
) -> Iterator[StartSwap]:
    """A factory of stand-ins over `alpha` and `beta`, each a real llama-server command as an
    owner would write it in llama-swap's config; every one is stopped at teardown."""

    def command(name: str) -> list[str]:
        model = str(router_models_dir / f"{name}.gguf")
        listen = ("--host", "127.0.0.1", "--port", "${PORT}")
        options = ("-m", model, "--alias", name, "-c", DEFAULT_CTX, "-t", "2", "--metrics")
        return [str(llama_server_binary), *listen, *options]

    with contextlib.ExitStack() as stack:

        def start(*, swap: bool = True, ignore: str | None = None) -> LlamaSwapStandin:
            models = {name: SwapModel(command(name)) for name in ("alpha", "beta")}
            ignore_paths = DEFAULT_IGNORE_PATHS if ignore is None else (re.compile(ignore),)
            standin = LlamaSwapStandin(
                models, log_dir=tmp_path, swap=swap, ignore_paths=ignore_paths
            )
            return stack.enter_context(standin)

        yield start


@pytest.fixture
def offline_swap(tmp_path: Path) -> Iterator[LlamaSwapStandin]:
    """A stand-in whose models cannot start: for the answers that need no upstream."""
    models = {"alpha": SwapModel(["/nonexistent/llama-server", "--port", "${PORT}"])}
    with LlamaSwapStandin(models, log_dir=tmp_path) as standin:
        yield standin


def get(url: str, **kwargs: Any) -> httpx.Response:
    return httpx.get(url, timeout=_TIMEOUT_S, trust_env=False, **kwargs)


def complete(url: str, path: str, body: dict[str, Any]) -> httpx.Response:
    base = {"prompt": "the llama", "n_predict": 4, "cache_prompt": False}
    return httpx.post(f"{url}{path}", json={**base, **body}, timeout=_TIMEOUT_S, trust_env=False)


def start_as_production_does(standin: LlamaSwapStandin, model: str) -> None:
    """A client's completion naming `model`: how a model comes to run under llama-swap."""
    answer = complete(standin.url, "/v1/completions", {"model": model})
    assert answer.status_code == 200, answer.text


# --- answers that need no upstream ---------------------------------------------------------


def test_detect_kind_says_llama_swap_and_starts_nothing(offline_swap: LlamaSwapStandin) -> None:
    kind: TargetKind = with_client(offline_swap.url, detect_kind)
    assert kind == "llama-swap"
    assert offline_swap.requests == ["GET /props", "GET /running"]
    assert offline_swap.starts == {}


def test_answers_have_the_shape_of_llama_swaps(offline_swap: LlamaSwapStandin) -> None:
    running = json.loads((FIXTURES / "llama_swap_running.json").read_text())
    listing = json.loads((FIXTURES / "llama_swap_v1_models.json").read_text())
    (entry,) = offline_swap.models_answer()["data"]
    assert set(entry) <= set(listing["data"][0])
    assert entry["status"] == {"value": "unloaded"}
    assert offline_swap.running_answer() == {"running": []}
    assert set(running["running"][0]) == {
        "model",
        "state",
        "cmd",
        "proxy",
        "ttl",
        "name",
        "description",
    }
    props = get(f"{offline_swap.url}/props")
    assert props.status_code == 404
    assert props.json() == json.loads((FIXTURES / "llama_swap_props_no_model.404.json").read_text())


@pytest.mark.parametrize(
    ("method", "path", "status", "message"),
    [
        ("GET", "/slots", 404, "404 page not found\n"),  # not a llama-swap route
        ("GET", "/props?model=nonexistent", 404, "no router for requested model"),
        ("POST", "/v1/completions", 404, "no model id could be identified"),
        ("GET", "/upstream/nonexistent/props", 404, "model not found"),
        ("GET", "/upstream/alpha/index.json", 409, "model alpha is not loaded"),
    ],
)
def test_answers_that_start_nothing(
    offline_swap: LlamaSwapStandin, method: str, path: str, status: int, message: str
) -> None:
    answer = httpx.request(method, f"{offline_swap.url}{path}", json={}, trust_env=False)
    assert answer.status_code == status
    if answer.headers["content-type"].startswith("application/json"):
        assert answer.json()["src"] == "llama-swap"
        assert answer.json()["error"]["message"].startswith(message)
    else:
        assert answer.text == message
    assert offline_swap.starts == {}


def test_upstream_root_redirects(offline_swap: LlamaSwapStandin) -> None:
    answer = get(f"{offline_swap.url}/upstream/alpha?x=1")
    assert answer.status_code == 301
    assert answer.headers["location"] == "/upstream/alpha/?x=1"
    assert offline_swap.starts == {}


def test_a_model_that_cannot_start_is_a_bad_gateway(offline_swap: LlamaSwapStandin) -> None:
    answer = complete(offline_swap.url, "/v1/completions", {"model": "alpha"})
    assert answer.status_code == 502
    assert offline_swap.starts == {"alpha": 1}
    assert offline_swap.running() == {}


# --- real llama-servers behind it ------------------------------------------------------------


@pytest.mark.real_server
def test_running_and_listing_parse(llama_swap: StartSwap) -> None:
    standin = llama_swap()
    start_as_production_does(standin, "alpha")
    models: tuple[RouterModel, ...] = with_client(standin.url, read_swap_models)
    assert [(m.name, m.status) for m in models] == [("alpha", "loaded"), ("beta", "unloaded")]
    assert models[0].args[models[0].args.index("--alias") + 1] == "alpha"
    assert parse_swap_listing(get(f"{standin.url}/v1/models").json()) == ("alpha", "beta")
    (running,) = parse_swap_running(get(f"{standin.url}/running").json())
    assert running.loaded


@pytest.mark.real_server
def test_reads_through_upstream_of_the_running_model_start_nothing(
    llama_swap: StartSwap,
) -> None:
    standin = llama_swap()
    start_as_production_does(standin, "alpha")

    async def reads(client: LlamaClient) -> None:
        for _ in range(READ_ROUNDS):
            props = await client.get_json(swap_path("/props", "alpha"))
            assert props["default_generation_settings"]["n_ctx"] == 4096
            slots = await client.get_json(swap_path("/slots", "alpha"))
            assert len(slots) == props["total_slots"]
            metrics = await client.get_text(swap_path("/metrics", "alpha"))
            assert "llamacpp:prompt_tokens_total" in metrics
            await client.get_json("/running")
            await client.get_json("/v1/models")

    with_client(standin.url, reads)
    # A probe's completion goes the same way, and names no model in its body.
    answer = complete(standin.url, swap_path("/completion", "alpha"), {})
    assert answer.json()["timings"]["predicted_n"] == 4
    assert standin.starts == {"alpha": 1}
    assert standin.swaps == 0
    assert standin.running() == {"alpha": "ready"}


@pytest.mark.real_server
def test_a_completion_naming_a_stopped_model_swaps_it_in(llama_swap: StartSwap) -> None:
    standin = llama_swap()
    start_as_production_does(standin, "alpha")
    start_as_production_does(standin, "beta")
    assert standin.starts == {"alpha": 1, "beta": 1}
    assert standin.swaps == 1
    assert standin.stops == {"alpha": 1}
    assert standin.running() == {"beta": "ready"}


@pytest.mark.real_server
def test_reads_naming_a_stopped_model_swap_it_in_too(llama_swap: StartSwap) -> None:
    """llama-swap dispatches `GET /props?model=` by its model, and `/upstream/<model>/...`
    starts the model unless the path is one it ignores: neither is safe for a model that is
    not running, which is why the exporter reads `/running` first."""
    standin = llama_swap()
    start_as_production_does(standin, "alpha")
    assert get(f"{standin.url}/props?model=beta").status_code == 200
    assert standin.running() == {"beta": "ready"}
    assert get(f"{standin.url}{swap_path('/slots', 'alpha')}").status_code == 200
    assert standin.running() == {"alpha": "ready"}
    assert standin.starts == {"alpha": 2, "beta": 1}
    assert standin.swaps == 2


@pytest.mark.real_server
def test_ignore_paths_make_reads_of_a_stopped_model_refuse(llama_swap: StartSwap) -> None:
    """With `upstream.ignorePaths` naming the exporter's reads, the pass-through refuses them
    for a model that is not ready instead of swapping it in, and still serves a ready one."""
    standin = llama_swap(ignore=r"^/(props|slots|metrics)$")
    start_as_production_does(standin, "alpha")
    refused = get(f"{standin.url}{swap_path('/props', 'beta')}")
    assert refused.status_code == 409
    assert get(f"{standin.url}{swap_path('/props', 'alpha')}").status_code == 200
    assert standin.starts == {"alpha": 1}
    assert standin.running() == {"alpha": "ready"}


@pytest.mark.real_server
def test_side_by_side_and_unload(llama_swap: StartSwap) -> None:
    standin = llama_swap(swap=False)
    start_as_production_does(standin, "alpha")
    start_as_production_does(standin, "beta")
    assert standin.running() == {"alpha": "ready", "beta": "ready"}
    assert standin.swaps == 0
    unloaded = httpx.post(f"{standin.url}/api/models/unload/alpha", trust_env=False)
    assert unloaded.text == "OK"
    assert standin.running() == {"beta": "ready"}
    assert get(f"{standin.url}/unload").text == "OK"
    assert standin.running() == {}
    models: tuple[RouterModel, ...] = with_client(standin.url, read_swap_models)
    assert [m.status for m in models] == ["unloaded", "unloaded"]
