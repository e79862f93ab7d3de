"""Router mode and llama-swap: the listings parsed strictly, the target's kind told apart.

The router fixtures were recorded from a real b11434 router (`tests/fixtures/router/router_*`);
the llama-swap ones were written from its handlers' structs (see docs/multi-model.md), since
no llama-swap binary is available here.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from exporter.llama.client import LlamaClient, ServerError
from exporter.llama.router import (
    MAX_ARGS,
    MAX_MODELS,
    RouterModel,
    TargetKind,
    detect_kind,
    is_not_loaded,
    kind_from_props,
    merge_swap_models,
    parse_router_models,
    parse_swap_listing,
    parse_swap_running,
    read_router_models,
    read_swap_models,
    router_path,
    swap_path,
)

FIXTURES = Path(__file__).parent / "fixtures" / "router"
SINGLE = Path(__file__).parent / "fixtures" / "llama"
T = TypeVar("T")


def fixture(name: str, directory: Path = FIXTURES) -> Any:
    return json.loads((directory / name).read_text())


def statuses(models: tuple[RouterModel, ...]) -> dict[str, str]:
    return {m.name: m.status for m in models}


def bad(parse: Callable[[Any], object], data: Any) -> ServerError:
    with pytest.raises(ServerError) as info:
        parse(data)
    assert info.value.reason == "bad_response"
    return info.value


# --- llama-server router mode: GET /models --------------------------------------------------


def test_router_models_one_loaded() -> None:
    models = parse_router_models(fixture("router_models_one_loaded.json"))
    assert statuses(models) == {"alpha": "loaded", "beta": "unloaded"}
    alpha = models[0]
    assert alpha.loaded
    # The child's argv: the real port once loaded, its options for the KV arithmetic.
    assert alpha.args[0].endswith("llama-server")
    assert alpha.args[alpha.args.index("--ctx-size") + 1] == "4096"
    assert alpha.args[alpha.args.index("--model") + 1].endswith("alpha.gguf")
    assert alpha.args[alpha.args.index("--port") + 1] != "0"
    assert models[1].args[models[1].args.index("--port") + 1] == "0"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("router_models_both_loaded.json", {"alpha": "loaded", "beta": "loaded"}),
        ("router_models_loading.json", {"alpha": "loaded", "beta": "loading"}),
        ("router_models_child_killed.json", {"alpha": "loaded", "beta": "failed"}),
        ("router_v1_models.json", {"alpha": "loaded", "beta": "unloaded"}),
        ("router_noautoload_models_one_loaded.json", {"alpha": "loaded", "beta": "unloaded"}),
    ],
)
def test_router_models_recorded(name: str, expected: dict[str, str]) -> None:
    models = parse_router_models(fixture(name))
    assert statuses(models) == expected
    assert [m.name for m in models if m.loaded] == [n for n, s in expected.items() if s == "loaded"]


def test_router_args_carry_the_routers_own_options_to_each_child() -> None:
    (alpha, _) = parse_router_models(fixture("router_noautoload_models_one_loaded.json"))
    assert "--metrics" in alpha.args  # the router was started with --metrics


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ({"value": "loaded"}, "loaded"),
        ({"value": "unloaded", "failed": True, "exit_code": 1}, "failed"),
        ({"value": "unloaded", "failed": 1}, "unloaded"),  # only JSON true is a failure
        ({"value": "downloading"}, "unknown"),  # a later release's state: never probed
        ({"value": 1}, "unknown"),
        ({}, "unknown"),
        ("loaded", "unknown"),  # not the object b11434 sends
        (None, "unknown"),
    ],
)
def test_router_status_values(status: Any, expected: str) -> None:
    (model,) = parse_router_models({"data": [{"id": "m", "status": status}]})
    assert model.status == expected
    assert model.loaded is (expected == "loaded")


def test_router_repr_hides_secrets_in_args() -> None:
    args = ["llama-server", "--api-key", "sk-secret", "--model", "/m.gguf"]
    (model,) = parse_router_models(
        {"data": [{"id": "m", "status": {"value": "loaded", "args": args}}]}
    )
    assert model.args == tuple(args)
    assert "sk-secret" not in repr(model)
    assert "/m.gguf" in repr(model)


def test_router_args_are_cleaned_for_logs() -> None:
    args = ["--model", "/m\x1b[31m\ud800.gguf"]
    (model,) = parse_router_models(
        {"data": [{"id": "m", "status": {"value": "loaded", "args": args}}]}
    )
    assert model.args == ("--model", "/m[31m\ufffd.gguf")


# Hostile and broken answers: each a fixed reason, never an exception of another kind.
ENTRY: Any = {"id": "m", "status": {"value": "loaded", "args": []}}


@pytest.mark.parametrize(
    "data",
    [
        None,
        [],
        [ENTRY],
        "models",
        {"data": None},
        {"data": {"id": "m"}},
        {"data": [ENTRY] * (MAX_MODELS + 1)},
        {"data": [*[{"id": f"m{i}"} for i in range(MAX_MODELS)], {"id": "extra"}]},
        {"data": [ENTRY, "m"]},
        {"data": [{"status": {"value": "loaded"}}]},  # no id
        {"data": [{"id": 7}]},
        {"data": [{"id": float("inf")}]},  # json.loads reads `Infinity`
        {"data": [{"id": None}]},
        {"data": [{"id": ["m"]}]},
        {"data": [{"id": ""}]},
        {"data": [{"id": "a\ud800b"}]},  # a lone surrogate: cannot be sent back as UTF-8
        {"data": [{"id": "a\nb"}]},  # would forge a log line, and cleaning it names another
        {"data": [{"id": "a\u200bb"}]},  # a format character, invisible on a dashboard
        {"data": [{"id": "m" * 129}]},  # longer than a label may be
        {"data": [ENTRY, ENTRY]},  # twice: two series with one label
        {"data": [{"id": "m", "status": {"value": "loaded", "args": "llama-server -m x"}}]},
        {"data": [{"id": "m", "status": {"value": "loaded", "args": [1, 2]}}]},
        {"data": [{"id": "m", "status": {"value": "loaded", "args": None}}]},
        {"data": [{"id": "m", "status": {"value": "loaded", "args": ["a"] * (MAX_ARGS + 1)}}]},
        {"data": [{"id": "m", "status": {"value": "loaded", "args": ["a" * 5000]}}]},
    ],
)
def test_router_models_refuses_what_a_router_does_not_send(data: Any) -> None:
    bad(parse_router_models, data)


def test_router_models_accepts_the_bound_exactly() -> None:
    data = {"data": [{"id": f"m{i}", "status": {"value": "unloaded"}} for i in range(MAX_MODELS)]}
    assert len(parse_router_models(data)) == MAX_MODELS


def test_router_models_keeps_real_world_names() -> None:
    # Hugging Face cache names and presets: slashes, colons, dots, non-ASCII letters.
    names = ["ggml-org/gemma-3-1b-it-GGUF:Q4_K_M", "qwen2.5-7b", "modèle-été"]
    data = {"data": [{"id": n, "status": {"value": "unloaded"}} for n in names]}
    assert [m.name for m in parse_router_models(data)] == names


def test_router_models_is_immutable() -> None:
    models = parse_router_models(fixture("router_models_one_loaded.json"))
    assert isinstance(models, tuple)
    with pytest.raises(AttributeError):
        models[0].status = "unloaded"  # type: ignore[misc]


# --- which kind of target ------------------------------------------------------------------


def test_kind_from_props() -> None:
    assert kind_from_props(fixture("router_props.json")) == "router"
    assert kind_from_props(fixture("router_noautoload_props.json")) == "router"
    assert kind_from_props(fixture("props.json", SINGLE)) == "single"
    # A router's child answers /props?model= with its own props: no role.
    assert kind_from_props(fixture("router_props_model_loaded.json")) == "single"
    assert kind_from_props({"role": "ROUTER"}) == "single"
    bad(kind_from_props, ["role", "router"])


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def served(answers: dict[str, tuple[int, bytes]], seen: list[str]) -> LlamaClient:
    """A client whose server answers each path from `answers` (404 for any other)."""

    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.raw_path.decode()
        seen.append(f"{request.method} {path}")
        status, body = answers.get(path, (404, (FIXTURES / "router_running.404.json").read_bytes()))
        return httpx.Response(status, content=body)

    return LlamaClient("http://target", transport=httpx.MockTransport(handler))


def detect(answers: dict[str, tuple[int, bytes]]) -> tuple[TargetKind, list[str]]:
    seen: list[str] = []

    async def go() -> TargetKind:
        client = served(answers, seen)
        try:
            return await detect_kind(client)
        finally:
            await client.aclose()

    return run(go()), seen


def recorded(name: str, directory: Path = FIXTURES) -> tuple[int, bytes]:
    status = int(name.split(".")[-2]) if name.count(".") == 2 else 200
    return status, (directory / name).read_bytes()


def test_detect_router_from_props_alone() -> None:
    kind, seen = detect({"/props": recorded("router_props.json")})
    assert kind == "router"
    assert seen == ["GET /props"]  # no request names a model


def test_detect_single_server() -> None:
    kind, seen = detect({"/props": recorded("props.json", SINGLE)})
    assert kind == "single"
    assert seen == ["GET /props"]


def test_detect_llama_swap_by_its_running_list() -> None:
    kind, seen = detect(
        {
            "/props": recorded("llama_swap_props_no_model.404.json"),
            "/running": recorded("llama_swap_running_empty.json"),
        }
    )
    assert kind == "llama-swap"
    assert seen == ["GET /props", "GET /running"]


def test_detect_neither_reports_the_props_failure() -> None:
    with pytest.raises(ServerError) as info:
        detect({"/props": (404, b'{"error":{"message":"File Not Found"}}')})
    assert info.value.reason == "http_error"
    assert "File Not Found" in info.value.detail


@pytest.mark.parametrize(
    ("status", "reason"), [(401, "unauthorized"), (503, "loading"), (501, "not_supported")]
)
def test_detect_passes_on_what_every_kind_can_answer(status: int, reason: str) -> None:
    with pytest.raises(ServerError) as info:
        detect({"/props": (status, b"{}"), "/running": recorded("llama_swap_running.json")})
    assert info.value.reason == reason


def test_detect_refuses_a_running_list_of_the_wrong_shape() -> None:
    with pytest.raises(ServerError) as info:
        detect({"/props": (404, b"{}"), "/running": (200, b'{"running": "alpha"}')})
    assert info.value.reason == "bad_response"


def test_detect_refuses_props_that_is_not_an_object() -> None:
    with pytest.raises(ServerError) as info:
        detect({"/props": (200, b"[1, 2]")})
    assert info.value.reason == "bad_response"


# --- llama-swap: /running and /v1/models -------------------------------------------------


def test_swap_running() -> None:
    running = parse_swap_running(fixture("llama_swap_running.json"))
    assert statuses(running) == {"alpha": "loaded", "gamma": "loading"}
    alpha = running[0]
    assert alpha.args[:2] == ("/opt/llama/llama-server", "--port")
    assert "sk-not-a-real-key" not in repr(alpha)
    assert parse_swap_running(fixture("llama_swap_running_empty.json")) == ()


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        ("ready", "loaded"),
        ("starting", "loading"),
        ("stopping", "unloading"),
        ("stopped", "unloaded"),
        ("shutdown", "unloaded"),
        ("swapping", "unknown"),
        (None, "unknown"),
        (1, "unknown"),
    ],
)
def test_swap_states(state: Any, expected: str) -> None:
    (model,) = parse_swap_running({"running": [{"model": "m", "state": state}]})
    assert model.status == expected


@pytest.mark.parametrize(
    "cmd",
    [
        "llama-server -m 'unbalanced",  # shell-words refuses it: options unknown, model kept
        None,
        42,
        "x" * (64 * 1024 + 1),
        " ".join(["-x"] * (MAX_ARGS + 1)),
    ],
)
def test_swap_command_that_cannot_be_read_leaves_no_args(cmd: Any) -> None:
    (model,) = parse_swap_running({"running": [{"model": "m", "state": "ready", "cmd": cmd}]})
    assert model.args == ()
    assert model.loaded


@pytest.mark.parametrize(
    "data",
    [
        None,
        {"running": None},
        {"running": {"alpha": "ready"}},
        {"data": []},
        {"running": ["alpha"]},
        {"running": [{"model": "m", "state": "ready"}] * (MAX_MODELS + 1)},
        {"running": [{"model": 1, "state": "ready"}]},
        {"running": [{"model": float("-inf"), "state": "ready"}]},
        {"running": [{"state": "ready"}]},
        {"running": [{"model": "m\udfff", "state": "ready"}]},
        {"running": [{"model": "m", "state": "ready"}, {"model": "m", "state": "starting"}]},
        {"running": [{"model": "../props", "state": "ready"}]},  # would leave /upstream/
        {"running": [{"model": "a//b", "state": "ready"}]},
        {"running": [{"model": "/a", "state": "ready"}]},
    ],
)
def test_swap_running_refuses_what_llama_swap_does_not_send(data: Any) -> None:
    bad(parse_swap_running, data)


def test_swap_listing_skips_entries_of_no_known_type() -> None:
    data = {
        "data": [
            {"id": "a", "meta": {"llamaswap": {"type": ["model"]}}},
            {"id": "b", "meta": {"llamaswap": {"type": None}}},
            {"id": "c", "meta": {"llamaswap": "model"}},
            {"id": "d", "meta": []},
        ]
    }
    assert parse_swap_listing(data) == ("c", "d")  # no type given: a listing before #901


def test_swap_listing_keeps_only_its_own_models() -> None:
    # Aliases, selectors and peers' models route to a model or another machine: never probed.
    assert parse_swap_listing(fixture("llama_swap_v1_models.json")) == ("alpha", "beta", "gamma")
    # Before llama-swap #901 the listing had no status and no meta: every entry is a model.
    assert parse_swap_listing(fixture("llama_swap_v1_models_before_status.json")) == (
        "alpha",
        "beta",
    )


@pytest.mark.parametrize(
    "data",
    [
        {"data": [{"id": "a"}, {"id": "a"}]},
        {"data": [{"id": None}]},
        {"data": [{"id": "a"}] * (MAX_MODELS + 1)},
        {"object": "list"},
        {"data": [{"id": "x/../y"}]},
    ],
)
def test_swap_listing_refuses_what_llama_swap_does_not_send(data: Any) -> None:
    bad(parse_swap_listing, data)


def test_swap_merge_takes_state_from_running() -> None:
    listed = parse_swap_listing(fixture("llama_swap_v1_models.json"))
    running = parse_swap_running(fixture("llama_swap_running.json"))
    merged = merge_swap_models(listed, running)
    # gamma: /v1/models says loaded while it starts; /running says starting.
    assert statuses(merged) == {"alpha": "loaded", "beta": "unloaded", "gamma": "loading"}


def test_swap_merge_keeps_an_unlisted_running_model() -> None:
    running = parse_swap_running({"running": [{"model": "hidden", "state": "ready"}]})
    assert statuses(merge_swap_models(["alpha"], running)) == {
        "alpha": "unloaded",
        "hidden": "loaded",
    }


def test_read_swap_models_through_the_client() -> None:
    seen: list[str] = []
    answers = {
        "/v1/models": recorded("llama_swap_v1_models.json"),
        "/running": recorded("llama_swap_running.json"),
    }

    async def go() -> tuple[RouterModel, ...]:
        client = served(answers, seen)
        try:
            return await read_swap_models(client)
        finally:
            await client.aclose()

    assert statuses(run(go())) == {"alpha": "loaded", "beta": "unloaded", "gamma": "loading"}
    assert seen == ["GET /v1/models", "GET /running"]


def test_read_router_models_through_the_client() -> None:
    seen: list[str] = []

    async def go() -> tuple[RouterModel, ...]:
        client = served({"/models": recorded("router_models_loading.json")}, seen)
        try:
            return await read_router_models(client)
        finally:
            await client.aclose()

    assert statuses(run(go())) == {"alpha": "loaded", "beta": "loading"}
    assert seen == ["GET /models"]


# --- the paths that name a model -------------------------------------------------------------


def test_router_path_names_the_model_and_forbids_a_load() -> None:
    assert router_path("/props", "alpha") == "/props?model=alpha&autoload=false"
    assert (
        router_path("/slots", "org/m-GGUF:Q4_K_M")
        == "/slots?model=org%2Fm-GGUF%3AQ4_K_M&autoload=false"
    )
    # Nothing in a name can add a parameter of its own.
    assert router_path("/metrics", "a&autoload=true") == (
        "/metrics?model=a%26autoload%3Dtrue&autoload=false"
    )


def test_swap_path_goes_through_the_upstream_pass_through() -> None:
    assert swap_path("/props", "alpha") == "/upstream/alpha/props"
    assert swap_path("/slots", "org/m:Q4 x?y#z") == "/upstream/org/m%3AQ4%20x%3Fy%23z/slots"
    with pytest.raises(ValueError, match="start with"):
        swap_path("props", "alpha")


# --- a refusal that means the model unloaded meanwhile -------------------------------------


def refusal(status: int, body: bytes, path: str = "/props?model=m&autoload=false") -> ServerError:
    async def go() -> ServerError:
        client = served({path: (status, body)}, [])
        try:
            await client.get_json(path)
        except ServerError as exc:
            return exc
        finally:
            await client.aclose()
        raise AssertionError("no error")

    return run(go())


@pytest.mark.parametrize(
    "name",
    [
        "router_props_model_unloaded_autoload_false.400.json",
        "router_noautoload_slots_model_unloaded.400.json",
        "router_noautoload_completion_unloaded.400.json",
    ],
)
def test_recorded_refusals_mean_not_loaded(name: str) -> None:
    assert is_not_loaded(refusal(*recorded(name)))


def test_llama_swap_ignored_path_refusal_means_not_loaded() -> None:
    body = (
        b'{"src":"llama-swap","error":{"message":"model org/m is not loaded; path matches '
        b'upstream.ignorePaths","type":"invalid_request_error","param":null,"code":"conflict"}}'
    )
    assert is_not_loaded(refusal(409, body, "/upstream/org/m/props"))


@pytest.mark.parametrize(
    "name",
    [
        "router_props_unknown_model.400.json",
        "router_slots_no_model.400.json",
        "router_props_model_loading.503.json",
        "router_props_model_loading.500.txt",
        "router_load_already_loaded.400.json",
        "llama_swap_props_no_model.404.json",
    ],
)
def test_other_refusals_are_not_not_loaded(name: str) -> None:
    assert not is_not_loaded(refusal(*recorded(name)))
