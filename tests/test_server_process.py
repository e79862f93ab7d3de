"""LlamaServerProcess and the tiny model against a real llama-server."""

from __future__ import annotations

import os
import random
import re
import stat
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from exporter.llama.server_process import ServerStartError
from testbed.llama_server import LlamaServerProcess
from testbed.tiny_model import write_tiny_model

# Emitted at verbosity 4 (`-lv 4`) only: one line per KV cache, sizes in MiB.
KV_SIZE = re.compile(r"llama_kv_cache: size = +([\d.]+) MiB \( *(\d+) cells, +(\d+) layers")
MIB = 1024 * 1024
F16_BYTES = 2

# The `llama_server` fixture of conftest.py: start(*args, model=None) -> a ready server.
StartServer = Callable[..., LlamaServerProcess]


def _get(server: LlamaServerProcess, path: str, api_key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.get(f"{server.url}{path}", headers=headers, timeout=10, trust_env=False)


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kv_caches(server: LlamaServerProcess) -> list[tuple[float, int, int]]:
    """(MiB, cells, layers) of each KV cache the server logged."""
    return [(float(m[1]), int(m[2]), int(m[3])) for m in KV_SIZE.finditer(server.log_text())]


def _kv_mib(cells: int, n_layer: int, n_embd: int, n_head: int, n_head_kv: int) -> float:
    n_embd_kv = n_embd // n_head * n_head_kv
    return cells * n_layer * n_embd_kv * F16_BYTES * 2 / MIB  # K and V


@pytest.mark.real_server
def test_tiny_model_loads_and_reports_its_geometry(llama_server: StartServer) -> None:
    server = llama_server()

    assert _get(server, "/health").json() == {"status": "ok"}
    models = _get(server, "/v1/models").json()
    meta = models["data"][0]["meta"]
    assert meta["n_embd"] == 256
    assert meta["n_ctx_train"] == 8192
    props = _get(server, "/props").json()
    assert props["model_ftype"] == "all F32"


@pytest.mark.real_server
@pytest.mark.parametrize(
    ("args", "n_ctx_slot", "slots"),
    [
        # Without -np the server picks 4 slots that share one unified 4096-cell cache.
        ((), 4096, 4),
        # An explicit -np turns the unified cache off: each slot gets n_ctx / np cells.
        (("-np", "2"), 2048, 2),
    ],
)
def test_props_show_context_and_slots(
    llama_server: StartServer, args: tuple[str, ...], n_ctx_slot: int, slots: int
) -> None:
    server = llama_server(*args, "--metrics")

    props = _get(server, "/props").json()

    assert props["default_generation_settings"]["n_ctx"] == n_ctx_slot
    assert props["total_slots"] == slots
    assert props["endpoint_metrics"] is True


@pytest.mark.real_server
def test_completion_of_a_token_id_prompt_has_exact_timings(llama_server: StartServer) -> None:
    server = llama_server()
    n_vocab = _get(server, "/v1/models").json()["data"][0]["meta"]["n_vocab"]
    rng = random.Random(0)
    # Token ids get no BOS, so the server decodes exactly these 64 tokens.
    prompt = [rng.randrange(3, n_vocab) for _ in range(64)]

    response = httpx.post(
        f"{server.url}/completion",
        json={"prompt": prompt, "n_predict": 8, "cache_prompt": False, "ignore_eos": True},
        timeout=60,
        trust_env=False,
    )

    assert response.status_code == 200, response.text
    timings = response.json()["timings"]
    assert timings["prompt_n"] == 64
    assert timings["cache_n"] == 0
    assert timings["predicted_n"] == 8


@pytest.mark.real_server
def test_models_of_different_geometry_load_with_their_own_kv_cache(
    llama_server: StartServer, tiny_model: Path, tmp_path: Path
) -> None:
    small = write_tiny_model(
        tmp_path / "small.gguf", n_layer=2, n_embd=128, n_head=2, n_head_kv=1, n_ff=256
    )

    default_server = llama_server("-lv", "4")
    small_server = llama_server("-lv", "4", model=small)

    assert _get(small_server, "/v1/models").json()["data"][0]["meta"]["n_embd"] == 128
    assert _kv_caches(default_server) == [(_kv_mib(4096, 4, 256, 4, 2), 4096, 4)]
    assert _kv_caches(small_server) == [(_kv_mib(4096, 2, 128, 2, 1), 4096, 2)]


@pytest.mark.real_server
def test_sliding_window_model_gets_a_swa_cache_and_serves(
    llama_server: StartServer, tmp_path: Path
) -> None:
    model = write_tiny_model(tmp_path / "swa.gguf", sliding_window=256)

    server = llama_server("-lv", "4", "-np", "1", model=model)

    log = server.log_text()
    assert re.search(r"n_swa += 256$", log, re.MULTILINE)
    # gemma2 alternates: layers 0 and 2 slide, 1 and 3 see the whole context. The SWA cache
    # holds the window for each sequence plus one micro-batch (512), padded to 256 cells.
    assert _kv_caches(server) == [
        (_kv_mib(4096, 2, 256, 4, 2), 4096, 2),
        (_kv_mib(768, 2, 256, 4, 2), 768, 2),
    ]
    response = httpx.post(
        f"{server.url}/completion",
        json={"prompt": list(range(3, 300)), "n_predict": 4, "ignore_eos": True},
        timeout=60,
        trust_env=False,
    )
    assert response.status_code == 200, response.text
    assert response.json()["timings"]["predicted_n"] == 4


@pytest.mark.real_server
def test_api_key_does_not_stop_readiness(llama_server: StartServer) -> None:
    server = llama_server("--api-key", "K")

    assert _get(server, "/props").status_code == 401
    assert _get(server, "/props", api_key="K").status_code == 200


@pytest.mark.real_server
def test_server_that_exits_at_once_raises_with_its_log(
    tiny_model: Path, llama_server_binary: Path, tmp_path: Path
) -> None:
    server = LlamaServerProcess(
        tiny_model,
        ["--this-flag-does-not-exist"],
        log_path=tmp_path / "bad.log",
        binary=llama_server_binary,
    )

    with pytest.raises(ServerStartError) as info, server:
        pytest.fail("a server with an unknown flag became ready")

    assert "exited with status" in str(info.value)
    assert any("--this-flag-does-not-exist" in line for line in info.value.log_lines)
    assert len(info.value.log_lines) <= 20
    assert server.returncode not in (None, 0)
    assert not _pid_exists(server.pid)


def test_server_that_never_answers_is_stopped_at_the_deadline(
    tiny_model: Path, tmp_path: Path
) -> None:
    # Stands in for a server hung while loading: alive, but never listening.
    binary = tmp_path / "hung-server"
    binary.write_text("#!/bin/sh\necho loading forever\nexec sleep 600\n")
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    server = LlamaServerProcess(tiny_model, binary=binary, log_path=tmp_path / "hung.log")
    server.start()

    with pytest.raises(ServerStartError, match=r"not ready after 0\.5 s") as info:
        server.wait_ready(timeout=0.5)

    assert info.value.log_lines == ["loading forever"]
    assert not _pid_exists(server.pid)


@pytest.mark.real_server
def test_stop_ends_the_process_and_can_be_repeated(llama_server: StartServer) -> None:
    server = llama_server()
    pid = server.pid
    assert _pid_exists(pid)

    server.stop()
    server.stop()

    assert not _pid_exists(pid)
    assert server.returncode is not None


@pytest.mark.real_server
def test_context_manager_starts_ready_and_stops(
    tiny_model: Path, llama_server_binary: Path, tmp_path: Path
) -> None:
    with LlamaServerProcess(
        tiny_model, ["-c", "1024"], log_path=tmp_path / "cm.log", binary=llama_server_binary
    ) as server:
        assert _get(server, "/health").status_code == 200
        pid = server.pid

    assert not _pid_exists(pid)
    assert server.last_log_lines(3)
