"""Real llama-server routers for the tests that need one, and what those tests ask of them.

A test module that needs a router binds the fixtures to module names (`llama_router =
router_fixtures.llama_router`, and `router_models_dir`, which it depends on): pytest finds a
fixture by its name in the test's module. tests/conftest.py is shared by the whole suite, and
these are needed by a few modules only.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Final, Protocol, TypeVar

import httpx
import pytest

from exporter.llama.argv import has_option
from exporter.llama.client import LlamaClient
from exporter.llama.router import RouterModel, parse_router_models
from testbed.router import LlamaRouterProcess, write_router_models
from tests.conftest import DEFAULT_CTX, READY_TIMEOUT_S

# A child loads a tiny model in about a second on 2 quiet cores; real llama.cpp runs 10-50x
# slower on a loaded CI machine, and a load is a whole process start.
LOAD_TIMEOUT_S: Final = 120.0
_POLL_S: Final = 0.05
_HTTP_TIMEOUT_S: Final = 30.0


class StartRouter(Protocol):
    def __call__(self, *args: str) -> LlamaRouterProcess: ...


@pytest.fixture(scope="session")
def router_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two tiny models, `alpha` and `beta`, written once per session."""
    return write_router_models(tmp_path_factory.mktemp("router-models"))


@pytest.fixture
def llama_router(
    router_models_dir: Path, llama_server_binary: Path, tmp_path: Path
) -> Iterator[StartRouter]:
    """A factory that starts ready routers over `alpha` and `beta`; each stops at teardown,
    and its children with it. Routers run with `-c 4096 -t 2` unless the arguments set those;
    logs (the router's and, prefixed with their port, its children's) go to
    `tmp_path/llama-router-<n>.log`."""
    started: list[LlamaRouterProcess] = []
    with contextlib.ExitStack() as stack:

        def start(*args: str) -> LlamaRouterProcess:
            full = list(args)
            if not has_option(full, "-c", "--ctx-size"):
                full = ["-c", DEFAULT_CTX, *full]
            router = LlamaRouterProcess(
                router_models_dir,
                full,
                log_path=tmp_path / f"llama-router-{len(started)}.log",
                binary=llama_server_binary,
            )
            stack.callback(router.stop)  # before starting: a half-started router is stopped too
            started.append(router)
            router.start()
            router.wait_ready(READY_TIMEOUT_S)
            return router

        yield start


def router_models(url: str) -> dict[str, RouterModel]:
    """The router's `GET /models`, by name, through the exporter's own parser."""
    response = httpx.get(f"{url}/models", timeout=_HTTP_TIMEOUT_S, trust_env=False)
    assert response.status_code == 200, response.text
    return {model.name: model for model in parse_router_models(response.json())}


def statuses(url: str) -> dict[str, str]:
    return {name: model.status for name, model in router_models(url).items()}


def wait_for_status(url: str, model: str, status: str, timeout: float = LOAD_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    seen = statuses(url)
    while seen.get(model) != status:
        if time.monotonic() > deadline:
            raise AssertionError(f"{model} not {status} within {timeout} s: {seen}")
        time.sleep(_POLL_S)  # poll interval inside a deadline, not a wait for an event
        seen = statuses(url)


def load(url: str, model: str) -> None:
    """Load `model` as an owner would (`POST /models/load`) and wait until it serves."""
    response = httpx.post(
        f"{url}/models/load", json={"model": model}, timeout=_HTTP_TIMEOUT_S, trust_env=False
    )
    assert response.json() == {"success": True}, response.text
    wait_for_status(url, model, "loaded")


def unload(url: str, model: str) -> None:
    response = httpx.post(
        f"{url}/models/unload", json={"model": model}, timeout=_HTTP_TIMEOUT_S, trust_env=False
    )
    assert response.json() == {"success": True}, response.text
    wait_for_status(url, model, "unloaded")


T = TypeVar("T")
# Per request: a request through llama-swap that starts a model waits for its load.
CLIENT_TIMEOUT_S: Final = 120.0


def with_client(url: str, use: Callable[[LlamaClient], Awaitable[T]]) -> T:
    """`use` run with a client of the project's own, in an event loop of its own."""

    async def go() -> T:
        client = LlamaClient(url, timeout=CLIENT_TIMEOUT_S)
        try:
            return await use(client)
        finally:
            await client.aclose()

    return asyncio.run(go())
