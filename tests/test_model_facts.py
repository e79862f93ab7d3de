"""A target's KV cache and weight traffic, worked out at discovery and exported."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import gguf
import numpy as np
import pytest

from exporter.kv.facts import FactsError, KvOverrides, model_facts
from exporter.llama.discovery import ServerInfo
from testbed.llama_server import LlamaServerProcess
from testbed.tiny_model import write_tiny_model
from tests.conftest import StartServer
from tests.daemon_harness import fast_target, running_daemon, sample, wait_for_metrics
from tests.test_kv_real_server import _SLOTS_LINE, LoggedKvCache, parse_kv_log, wait_for_log

MIB = 1024 * 1024


def info(path: Path, ctx: int = 4096, slots: int = 4) -> ServerInfo:
    return ServerInfo(
        model="m", model_path=str(path), ctx=ctx, slots=slots,
        quant="all F32", build="b0", n_vocab=314, n_params=1, size_bytes=1, n_ctx_train=8192,
        slots_endpoint=True, metrics_endpoint=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("facts") / "m.gguf")


def test_unreadable_model_file(tmp_path: Path) -> None:
    with pytest.raises(FactsError) as err:
        model_facts(info(tmp_path / "missing.gguf"), KvOverrides(), None, None)
    assert err.value.reason == "model_unreadable"


def test_a_file_that_is_not_gguf(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"this is not a model" * 10)
    with pytest.raises(FactsError) as err:
        model_facts(info(bad), KvOverrides(), None, None)
    assert err.value.reason == "model_invalid"


def test_unknown_architecture_gives_a_reason_not_a_number(tmp_path: Path) -> None:
    path = tmp_path / "mamba.gguf"
    writer = gguf.GGUFWriter(str(path), "mamba")
    writer.add_block_count(2)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(FactsError) as err:
        model_facts(info(path), KvOverrides(), None, None)
    assert err.value.reason == "unknown_architecture"


def test_cache_types_config_beats_process_beats_f16(model: Path) -> None:
    argv = ["llama-server", "-m", str(model), "-ctk", "q8_0", "-ctv", "q4_0"]
    from_process = model_facts(info(model), KvOverrides(), argv, {})
    assert (from_process.type_k, from_process.type_v) == ("q8_0", "q4_0")
    overridden = model_facts(info(model), KvOverrides(cache_type_v="q8_0"), argv, {})
    assert (overridden.type_k, overridden.type_v) == ("q8_0", "q8_0")
    default = model_facts(info(model), KvOverrides(), None, None)
    assert (default.type_k, default.type_v) == ("f16", "f16")
    # Without the process's options the layout (unified or per slot) is unknown.
    assert default.capacity is None and default.bytes_per_token == 4 * (128 + 128) * 2
    unified = model_facts(info(model), KvOverrides(kv_unified=True), None, None)
    assert unified.capacity is not None and unified.capacity.cells == 4096


def test_an_explicit_context_is_what_is_allocated_even_past_the_training_context(
    model: Path,
) -> None:
    # -c 16384 on a model trained for 8192: llama.cpp allocates 16384 cells, and llama-server
    # then caps each slot, so /props says 8192.
    argv = ["llama-server", "-m", str(model), "-c", "16384"]
    facts = model_facts(info(model, ctx=8192), KvOverrides(), argv, {})
    assert facts.capacity is not None and facts.capacity.cells == 16384
    # Without -c (or -c 0) the server's context is only known from /props.
    auto = model_facts(info(model, ctx=8192), KvOverrides(), ["llama-server", "-m", str(model)], {})
    assert auto.capacity is not None and auto.capacity.cells == 8192


def test_unknown_cache_type(model: Path) -> None:
    with pytest.raises(FactsError) as err:
        model_facts(info(model), KvOverrides(cache_type_k="q3_x"), None, None)
    assert err.value.reason == "unknown_cache_type"


@pytest.mark.real_server
def test_daemon_exports_the_kv_cache_llama_server_allocates(
    llama_server: StartServer, tmp_path: Path
) -> None:
    server = llama_server("-np", "2", "-ctk", "q8_0", "-ctv", "q4_0", "-fa", "on", "-lv", "4")
    logged: list[LoggedKvCache] = parse_kv_log(wait_for_log(server, _SLOTS_LINE))[0]
    target = fast_target("t", server.url, timeout=2.5, interval=3.0)
    with running_daemon([target]) as (_, base):
        text = wait_for_metrics(
            base,
            lambda t: (
                sample(t, "llama_speed_kv_cache_capacity_bytes") is not None
                and (sample(t, "llama_speed_kv_cache_used_tokens") or 0) > 0
            ),
            timeout=60,
        )
    labels = {"target": "t", "model": "tiny", "ctx": "2048", "type_k": "q8_0", "type_v": "q4_0"}
    assert sample(text, "llama_speed_kv_cache_capacity_bytes", **labels) == pytest.approx(
        sum(part.mib for part in logged) * MIB, rel=0.01
    )
    assert sample(text, "llama_speed_kv_cache_capacity_tokens", **labels) == 4096
    assert sample(text, "llama_speed_kv_cache_bytes_per_token", **labels) == 4 * (
        128 // 32 * 34 + 128 // 32 * 18
    )
    assert sample(text, "llama_speed_kv_cache_errors_total", reason="model_unreadable") == 0


@pytest.mark.real_server
def test_model_file_out_of_reach_counts_a_reason(
    tiny_model: Path, llama_server_binary: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "moved.gguf"
    copy.write_bytes(tiny_model.read_bytes())
    with LlamaServerProcess(copy, ["-c", "2048"], binary=llama_server_binary) as server:
        copy.unlink()  # as a container would see a host path it does not mount
        # A round timeout that a loaded 2-core machine cannot miss: probes must succeed.
        target = dataclasses.replace(
            fast_target("t", server.url, timeout=2.5, interval=3.0), kv=KvOverrides()
        )
        with running_daemon([target]) as (_, base):
            text = wait_for_metrics(
                base,
                lambda t: (sample(t, "llama_speed_kv_cache_errors_total",
                                  reason="model_unreadable") or 0) >= 1
                and sample(t, "llama_speed_probe_success", probe="prompt") == 1.0,
                timeout=60,
            )  # fmt: skip
    # The model file out of reach costs the KV figures, nothing else.
    assert "llama_speed_kv_cache_bytes_per_token{" not in text
