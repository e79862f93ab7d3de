"""A real b11434 router over two tiny models: what loads a model, and what never does.

The safety property under test: with `--models-max 1`, a request that names the unloaded
model evicts the loaded one, the model production uses. The exporter's reads name only a
loaded model, and carry `autoload=false` so that the router refuses rather than loads.
"""

from __future__ import annotations

from typing import Any, Final

import httpx
import pytest

from exporter.llama.client import LlamaClient, ServerError
from exporter.llama.router import (
    RouterModel,
    TargetKind,
    detect_kind,
    is_not_loaded,
    read_router_models,
    router_path,
)
from tests import router_fixtures
from tests.conftest import StartServer
from tests.router_fixtures import StartRouter, load, router_models, statuses, unload, with_client

pytestmark = pytest.mark.real_server
# pytest finds a fixture by its name in the test's module; these live with the router tools.
llama_router = router_fixtures.llama_router
router_models_dir = router_fixtures.router_models_dir

# More than the 20 probe rounds, each of which reads /props, /slots and /metrics.
READ_ROUNDS: Final = 25
_TIMEOUT_S: Final = 30.0


def post(url: str, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=_TIMEOUT_S, trust_env=False)


def test_detect_kind_says_router_and_loads_nothing(llama_router: StartRouter) -> None:
    router = llama_router("--models-max", "1")
    kind: TargetKind = with_client(router.url, detect_kind)
    assert kind == "router"
    assert statuses(router.url) == {"alpha": "unloaded", "beta": "unloaded"}
    assert router.children() == {}


def test_detect_kind_says_single_for_a_plain_server(llama_server: StartServer) -> None:
    server = llama_server()
    kind: TargetKind = with_client(server.url, detect_kind)
    assert kind == "single"


def test_models_shows_the_loaded_one_with_its_childs_options(llama_router: StartRouter) -> None:
    router = llama_router("--models-max", "2")
    load(router.url, "alpha")
    models: tuple[RouterModel, ...] = with_client(router.url, read_router_models)
    assert [(m.name, m.status) for m in models] == [("alpha", "loaded"), ("beta", "unloaded")]
    alpha = models[0]
    assert alpha.args[alpha.args.index("--ctx-size") + 1] == "4096"
    # status.args names the child's real port once it runs, and ps shows that child.
    port = alpha.args[alpha.args.index("--port") + 1]
    assert port != "0"
    assert list(router.children()) == ["alpha"]
    child = httpx.get(f"http://127.0.0.1:{port}/health", timeout=_TIMEOUT_S, trust_env=False)
    assert child.status_code == 200


def test_reads_of_the_loaded_model_never_touch_the_other(llama_router: StartRouter) -> None:
    """/props, /slots and /metrics for the loaded model, and the router's own /props,
    /models, /v1/models and /health, over and over: the other model stays unloaded, with no
    child, and the loaded one keeps its process."""
    router = llama_router("--models-max", "1", "--metrics")
    load(router.url, "alpha")
    child = router.children()["alpha"]

    async def reads(client: LlamaClient) -> None:
        for _ in range(READ_ROUNDS):
            props = await client.get_json(router_path("/props", "alpha"))
            assert props["default_generation_settings"]["n_ctx"] == 4096
            slots = await client.get_json(router_path("/slots", "alpha"))
            assert len(slots) == props["total_slots"]
            metrics = await client.get_text(router_path("/metrics", "alpha"))
            assert "llamacpp:prompt_tokens_total" in metrics
            for path in ("/props", "/models", "/v1/models", "/health"):
                await client.get_json(path)
            assert statuses(router.url) == {"alpha": "loaded", "beta": "unloaded"}

    with_client(router.url, reads)
    assert router.children() == {"alpha": child}


def test_autoload_false_refuses_the_unloaded_model(llama_router: StartRouter) -> None:
    router = llama_router("--models-max", "1", "--metrics")
    load(router.url, "alpha")
    child = router.children()["alpha"]

    async def refused(client: LlamaClient) -> list[ServerError]:
        errors = []
        for path in ("/props", "/slots", "/metrics"):
            with pytest.raises(ServerError) as info:
                await client.get_json(router_path(path, "beta"))
            errors.append(info.value)
        return errors

    for error in with_client(router.url, refused):
        assert is_not_loaded(error), error.detail
    answer = post(router.url, router_path("/completion", "beta"), {"model": "beta", "prompt": "x"})
    assert answer.status_code == 400
    assert answer.json()["error"]["message"] == "model is not loaded"
    assert statuses(router.url) == {"alpha": "loaded", "beta": "unloaded"}
    assert router.children() == {"alpha": child}


def test_a_completion_for_the_loaded_model_with_autoload_false(llama_router: StartRouter) -> None:
    router = llama_router("--models-max", "1")
    load(router.url, "alpha")
    body = {"model": "alpha", "prompt": "the llama", "n_predict": 4, "cache_prompt": False}
    answer = post(router.url, router_path("/completion", "alpha"), body)
    assert answer.status_code == 200, answer.text
    assert answer.json()["timings"]["predicted_n"] == 4
    assert statuses(router.url) == {"alpha": "loaded", "beta": "unloaded"}


def test_a_read_naming_the_unloaded_model_evicts_the_loaded_one(
    llama_router: StartRouter,
) -> None:
    """Why the exporter needs all the above: a bare `/props?model=beta`, a read, loads beta
    and, at `--models-max 1`, stops alpha. Should a later release stop doing so, this fails
    and docs/multi-model.md needs its facts checked again."""
    router = llama_router("--models-max", "1")
    load(router.url, "alpha")
    answer = httpx.get(f"{router.url}/props?model=beta", timeout=120, trust_env=False)
    assert answer.status_code == 200  # answered once beta had loaded
    assert statuses(router.url) == {"alpha": "unloaded", "beta": "loaded"}
    assert list(router.children()) == ["beta"]


def test_the_servers_no_autoload_flag_is_not_enough(llama_router: StartRouter) -> None:
    """`--no-models-autoload` refuses a bare read of an unloaded model, but a request's own
    `autoload=true` still loads it: only the request's parameter decides."""
    router = llama_router("--models-max", "2", "--no-models-autoload")
    answer = httpx.get(f"{router.url}/slots?model=alpha", timeout=_TIMEOUT_S, trust_env=False)
    assert answer.status_code == 400
    assert answer.json()["error"]["message"] == "model is not loaded"
    assert statuses(router.url) == {"alpha": "unloaded", "beta": "unloaded"}
    answer = httpx.get(
        f"{router.url}/props?model=alpha&autoload=true", timeout=120, trust_env=False
    )
    assert answer.status_code == 200
    assert statuses(router.url)["alpha"] == "loaded"
    unload(router.url, "alpha")
    assert router_models(router.url)["alpha"].status == "unloaded"
    assert router.children() == {}
