"""KV-cache arithmetic, GGUF header reading and llama-server argument parsing, without a server.

The numbers are llama.cpp b11434's; test_kv_real_server.py checks the same rules against the
sizes a real llama-server logs.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Mapping
from pathlib import Path

import pytest

from exporter.kv.cache import (
    CACHE_TYPE_NAMES,
    KvCacheError,
    KvGeometry,
    UnknownArchitecture,
    UnknownCacheTypeError,
    bytes_per_token,
    cache_type,
    capacity,
)
from exporter.kv.gguf_meta import GGML_TYPES, MetaValue, ModelFileError, ModelMeta, read_model_meta
from exporter.kv.server_args import (
    KvServerArgs,
    ServerArgsError,
    server_kv_args,
)
from testbed.tiny_model import write_tiny_model
from tests.model_meta import meta_of

KIB = 1024
MIB = 1024 * KIB


def meta(arch: str, **keys: MetaValue) -> ModelMeta:
    """Metadata for `arch`; keyword names are the key suffixes with `__` for `.`."""
    metadata: dict[str, MetaValue] = {
        "general.architecture": arch,
        f"{arch}.context_length": 8192,
        f"{arch}.embedding_length": 256,
        f"{arch}.block_count": 4,
        f"{arch}.attention.head_count": 4,
    }
    for name, value in keys.items():
        metadata[f"{arch}.{name.replace('__', '.')}"] = value
    return meta_of(metadata)


def geometry(arch: str, **keys: MetaValue) -> KvGeometry:
    return KvGeometry.from_meta(meta(arch, **keys))


# --- the seed's model: qwen3next-like, 48 blocks, attention every 4th -------------------------


@pytest.fixture
def seed_geometry() -> KvGeometry:
    # Public Qwen3-Next-80B values: 16 key heads and 32 value heads of 128, conv kernel 4.
    return geometry(
        "qwen3next",
        block_count=48,
        context_length=262144,
        embedding_length=2048,
        attention__head_count=16,
        attention__head_count_kv=2,
        attention__key_length=256,
        attention__value_length=256,
        ssm__conv_kernel=4,
        ssm__inner_size=4096,
        ssm__state_size=128,
        ssm__group_count=16,
        ssm__time_step_rank=32,
    )


def test_seed_geometry_has_twelve_attention_layers(seed_geometry: KvGeometry) -> None:
    assert [layer.index for layer in seed_geometry.kv_layers] == list(range(3, 48, 4))
    assert {layer.n_embd_k_gqa for layer in seed_geometry.kv_layers} == {512}
    assert seed_geometry.recurrent is not None
    assert len(seed_geometry.recurrent.layers) == 36


def test_seed_bytes_per_token_is_9984(seed_geometry: KvGeometry) -> None:
    # 512/32 blocks x 34 B (q8_0) + 512/32 x 18 B (q4_0) = 832 B per layer, x 12 layers.
    assert bytes_per_token(seed_geometry, "q8_0", "q4_0") == 9_984
    # The reference's comparison points, in KiB per token.
    assert bytes_per_token(seed_geometry, "f16", "f16") == 24 * KIB
    assert bytes_per_token(seed_geometry, "q8_0", "q8_0") == 12.75 * KIB
    assert bytes_per_token(seed_geometry, "q4_0", "q4_0") == 6.75 * KIB


@pytest.mark.parametrize(
    ("n_ctx", "expected_bytes", "seed_text"),
    [
        # The seed's "320 MB" and "2.6 GB" are 9.75 KiB x tokens read as 1000-based units
        # (319,488 KiB and 2,555,904 KiB), rounded to two figures; in bytes they are 327 MB
        # (312 MiB) and 2.62 GB (2.44 GiB).
        (32_768, 327_155_712, "320 MB"),
        (262_144, 2_617_245_696, "2.6 GB"),
    ],
)
def test_seed_capacities(
    seed_geometry: KvGeometry, n_ctx: int, expected_bytes: int, seed_text: str
) -> None:
    for n_seq, unified in [(1, True), (4, True), (4, False), (2, False)]:
        cap = capacity(
            seed_geometry, n_ctx=n_ctx, n_seq=n_seq, unified=unified, type_k="q8_0", type_v="q4_0"
        )
        # Both sizes are multiples of 256 per sequence, so no padding cell is added.
        assert cap.cells == n_ctx
        assert cap.bytes == expected_bytes
    number, unit = seed_text.split()
    scale = {"MB": 1e3, "GB": 1e6}[unit]
    # Two significant figures, as the seed quotes them.
    assert float(f"{expected_bytes / KIB / scale:.2g}") == float(number)


def test_seed_recurrent_state_is_f32_per_sequence(seed_geometry: KvGeometry) -> None:
    one = capacity(seed_geometry, n_ctx=4096, n_seq=1, unified=True, type_k="q8_0", type_v="q4_0")
    # R = 3 * (4096 + 2*16*128) = 24,576 and S = 128 * 4096 = 524,288 floats per layer.
    assert one.recurrent_bytes == 36 * (24_576 + 524_288) * 4 == 79_036_416
    four = capacity(seed_geometry, n_ctx=4096, n_seq=4, unified=True, type_k="f16", type_v="f16")
    assert four.recurrent_bytes == 4 * 79_036_416
    assert four.total_bytes == four.bytes + four.recurrent_bytes


def test_seed_cells_split_per_sequence(seed_geometry: KvGeometry) -> None:
    cap = capacity(
        seed_geometry, n_ctx=32_768, n_seq=3, unified=False, type_k="q8_0", type_v="q4_0"
    )
    # 32768 / 3 = 10922 -> padded to 11008 per stream; n_ctx grows to 3 x 11008.
    assert (cap.n_ctx_seq, cap.n_ctx, cap.cells, cap.n_stream) == (11_008, 33_024, 33_024, 3)
    assert cap.bytes == 33_024 * 9_984


# --- cells ------------------------------------------------------------------------------------


def llama_geometry(**keys: MetaValue) -> KvGeometry:
    # 4 layers, 2 KV heads of 64: 128 K and 128 V elements per layer and token.
    return geometry("llama", **({"attention__head_count_kv": 2} | keys))


def test_cells_are_padded_to_256() -> None:
    cap = capacity(llama_geometry(), n_ctx=1000, n_seq=1, unified=True, type_k="f16", type_v="f16")
    assert (cap.cells, cap.n_ctx, cap.n_ctx_seq) == (1024, 1024, 1024)
    assert cap.bytes == 1024 * 4 * (128 + 128) * 2


def test_unified_cache_is_one_stream_of_n_ctx() -> None:
    cap = capacity(llama_geometry(), n_ctx=4096, n_seq=4, unified=True, type_k="f16", type_v="f16")
    assert (cap.cells, cap.n_ctx_seq, cap.n_stream) == (4096, 4096, 1)
    assert [(p.cells, p.n_stream) for p in cap.parts] == [(4096, 1)]


def test_split_cache_gives_each_sequence_a_padded_share() -> None:
    cap = capacity(llama_geometry(), n_ctx=5000, n_seq=3, unified=False, type_k="f16", type_v="f16")
    # 5000 -> 5120; 5120 // 3 = 1706 -> 1792 per stream: llama.cpp logs n_ctx 5376.
    assert (cap.n_ctx_seq, cap.n_ctx, cap.cells) == (1792, 5376, 5376)
    assert [(p.cells, p.n_stream) for p in cap.parts] == [(1792, 3)]


def test_zero_n_ctx_means_training_context() -> None:
    cap = capacity(llama_geometry(), n_ctx=0, n_seq=1, unified=True, type_k="f16", type_v="f16")
    assert cap.cells == 8192


def test_bad_sequence_counts_raise() -> None:
    with pytest.raises(KvCacheError, match="n_seq"):
        capacity(llama_geometry(), n_ctx=4096, n_seq=0, unified=True, type_k="f16", type_v="f16")
    with pytest.raises(KvCacheError, match="too small"):
        capacity(llama_geometry(), n_ctx=256, n_seq=300, unified=False, type_k="f16", type_v="f16")


# --- sliding window ---------------------------------------------------------------------------


def gemma2(window: int = 256, **keys: MetaValue) -> KvGeometry:
    return geometry("gemma2", attention__head_count_kv=2, attention__sliding_window=window, **keys)


def test_gemma2_uses_the_window_on_even_layers() -> None:
    geo = gemma2()
    assert [layer.index for layer in geo.swa_layers] == [0, 2]
    assert [layer.index for layer in geo.full_layers] == [1, 3]
    assert geo.n_swa == 256


def test_gemma2_window_defaults_to_4096() -> None:
    geo = geometry("gemma2")
    assert geo.n_swa == 4096


@pytest.mark.parametrize(
    ("n_seq", "unified", "n_ubatch", "swa_cells_per_stream"),
    [
        (1, False, 512, 768),  # 256 + 512: the helper's observation
        (2, False, 512, 768),  # per stream: the window of one sequence
        (3, True, 512, 1280),  # unified: 3 windows + one ubatch
        (4, True, 512, 1536),  # llama-server's default -np auto
        (2, False, 100, 512),  # 256 + 100 = 356 -> 512
    ],
)
def test_swa_cache_holds_windows_plus_a_ubatch(
    n_seq: int, unified: bool, n_ubatch: int, swa_cells_per_stream: int
) -> None:
    cap = capacity(
        gemma2(),
        n_ctx=4096,
        n_seq=n_seq,
        unified=unified,
        type_k="f16",
        type_v="f16",
        n_ubatch=n_ubatch,
    )
    full, swa = cap.parts
    assert (full.swa, swa.swa) == (False, True)
    assert full.cells == cap.n_ctx_seq
    assert swa.cells == swa_cells_per_stream
    assert cap.swa_cells == swa_cells_per_stream * cap.n_stream
    # 2 layers x 2 heads x 64 x 2 bytes x 2 (K and V) per cell and stream.
    assert swa.bytes == swa.cells * swa.n_stream * 2 * 512
    assert cap.bytes == full.bytes + swa.bytes
    # Only the full-context layers count per token.
    assert bytes_per_token(gemma2(), "f16", "f16") == 2 * 512


def test_swa_cache_never_exceeds_the_full_cache() -> None:
    cap = capacity(
        gemma2(window=4096), n_ctx=2048, n_seq=1, unified=True, type_k="f16", type_v="f16"
    )
    assert [p.cells for p in cap.parts] == [2048, 2048]


def test_swa_full_sizes_the_window_layers_like_the_others() -> None:
    cap = capacity(
        gemma2(), n_ctx=4096, n_seq=2, unified=False, type_k="f16", type_v="f16", swa_full=True
    )
    assert [p.cells for p in cap.parts] == [2048, 2048]


def test_small_batch_limits_the_ubatch() -> None:
    # n_batch is capped by the unpadded context and n_ubatch by n_batch: 300 + 64 -> 512.
    cap = capacity(
        gemma2(window=64),
        n_ctx=4096,
        n_seq=1,
        unified=True,
        type_k="f16",
        type_v="f16",
        n_batch=300,
    )
    assert cap.parts[1].cells == 512


def test_swa_pattern_scalar_and_array() -> None:
    scalar = gemma2(block_count=6, attention__sliding_window_pattern=3)
    assert [layer.index for layer in scalar.swa_layers] == [0, 1, 3, 4]
    array = gemma2(attention__sliding_window_pattern=(True, True, False))
    assert [layer.index for layer in array.swa_layers] == [0, 1]
    with pytest.raises(KvCacheError, match="no sliding-window layer"):
        gemma2(attention__sliding_window_pattern=(False, False, False, False))


def test_swa_head_sizes_can_differ() -> None:
    geo = gemma2(attention__key_length_swa=32, attention__value_length_swa=32)
    assert {(layer.swa, layer.head_dim_k) for layer in geo.kv_layers} == {(True, 32), (False, 64)}


def test_gemma3_window_is_optional_and_every_sixth_layer_is_full() -> None:
    assert geometry("gemma3", block_count=12).n_swa is None
    geo = geometry("gemma3", block_count=12, attention__sliding_window=512)
    assert [layer.index for layer in geo.full_layers] == [5, 11]
    assert geo.n_swa == 512


def test_window_required_where_llama_cpp_requires_it() -> None:
    with pytest.raises(KvCacheError, match="sliding_window is missing"):
        geometry("cohere2")
    assert [
        layer.index for layer in geometry("cohere2", attention__sliding_window=4096).full_layers
    ] == [3]


def test_phi3_sliding_window_is_ignored() -> None:
    # b11434 disables SWA for phi3 even when the GGUF has a window.
    assert geometry("phi3", attention__sliding_window=2047).n_swa is None


# --- hybrid recurrent, MLA, NextN ------------------------------------------------------------


def qwen3next(**keys: MetaValue) -> KvGeometry:
    ssm: dict[str, MetaValue] = {
        "ssm__conv_kernel": 4,
        "ssm__inner_size": 256,
        "ssm__state_size": 64,
        "ssm__group_count": 2,
        "ssm__time_step_rank": 4,
    }
    return geometry("qwen3next", **(ssm | keys))


def test_qwen3next_recurrent_layers_from_the_array() -> None:
    geo = qwen3next(block_count=5, attention__recurrent_layers=(True, False, True, True, False))
    assert [layer.index for layer in geo.kv_layers] == [1, 4]
    assert geo.recurrent is not None
    assert geo.recurrent.layers == (0, 2, 3)
    # (4-1) * (256 + 2*2*64) and 64 * 256 floats.
    assert (geo.recurrent.n_embd_r, geo.recurrent.n_embd_s) == (1536, 16_384)


def test_qwen3next_interval() -> None:
    geo = qwen3next(block_count=6, full_attention_interval=2)
    assert [layer.index for layer in geo.kv_layers] == [1, 3, 5]


def test_qwen3next_needs_its_ssm_keys() -> None:
    with pytest.raises(KvCacheError, match=r"ssm\.conv_kernel is missing"):
        geometry("qwen3next")


def test_qwen3next_nextn_block_stays_out_of_both_caches() -> None:
    geo = qwen3next(block_count=5, nextn_predict_layers=1)
    assert [layer.index for layer in geo.kv_layers] == [3]
    assert geo.recurrent is not None
    assert geo.recurrent.layers == (0, 1, 2)


def deepseek2(*, mla: bool, **keys: MetaValue) -> KvGeometry:
    base: dict[str, MetaValue] = {"attention__kv_lora_rank": 512, "rope__dimension_count": 64}
    if mla:
        base |= {
            "attention__head_count_kv": 1,
            "attention__key_length": 576,
            "attention__value_length": 512,
            "attention__key_length_mla": 192,
            "attention__value_length_mla": 128,
        }
    else:
        base |= {"attention__key_length": 192, "attention__value_length": 128}
    return geometry("deepseek2", **(base | keys))


def test_deepseek2_mla_caches_the_latent_in_k_and_has_no_v() -> None:
    geo = deepseek2(mla=True)
    assert not geo.has_v
    # kv_lora_rank 512 + 64 RoPE dimensions, one head, f16.
    assert bytes_per_token(geo, "f16", "f16") == 4 * 576 * 2
    cap = capacity(geo, n_ctx=4096, n_seq=1, unified=True, type_k="q8_0", type_v="q8_0")
    assert cap.parts[0].v_bytes == 0
    assert cap.bytes == 4096 * 4 * 576 // 32 * 34


def test_deepseek2_mla_needs_equal_cache_types() -> None:
    with pytest.raises(KvCacheError, match="equal K and V"):
        capacity(
            deepseek2(mla=True), n_ctx=4096, n_seq=1, unified=True, type_k="q8_0", type_v="f16"
        )


def test_deepseek2_without_mla_keys_caches_every_head() -> None:
    geo = deepseek2(mla=False)
    assert geo.has_v
    # 4 heads (head_count_kv defaults to head_count) x (192 + 128) x 2 bytes, 4 layers.
    assert bytes_per_token(geo, "f16", "f16") == 4 * 4 * (192 + 128) * 2


def test_nextn_layers_are_left_out() -> None:
    geo = deepseek2(mla=True, block_count=4, nextn_predict_layers=1)
    assert [layer.index for layer in geo.kv_layers] == [0, 1, 2]


# --- per-layer heads, types, refusals ---------------------------------------------------------


def test_per_layer_head_count_kv() -> None:
    geo = llama_geometry(attention__head_count_kv=(1, 2, 4, 0))
    assert [layer.n_embd_k_gqa for layer in geo.kv_layers] == [64, 128, 256, 0]
    assert geo.n_embd_v_gqa_max == 256
    with pytest.raises(KvCacheError, match="3 entries for 4 layers"):
        llama_geometry(attention__head_count_kv=(1, 2, 4))


def test_without_flash_attention_v_is_padded_to_the_widest_layer() -> None:
    geo = llama_geometry(attention__head_count_kv=(1, 2, 4, 1))
    on = capacity(geo, n_ctx=256, n_seq=1, unified=True, type_k="f16", type_v="f16")
    off = capacity(
        geo, n_ctx=256, n_seq=1, unified=True, type_k="f16", type_v="f16", flash_attn=False
    )
    assert on.parts[0].k_bytes == off.parts[0].k_bytes == 256 * (64 + 128 + 256 + 64) * 2
    assert on.parts[0].v_bytes == on.parts[0].k_bytes
    assert off.parts[0].v_bytes == 256 * 4 * 256 * 2


def test_head_size_defaults_to_n_embd_over_n_head() -> None:
    geo = geometry("qwen2", embedding_length=512, attention__head_count=8)
    assert {(layer.head_dim_k, layer.head_dim_v, layer.n_head_kv) for layer in geo.kv_layers} == {
        (64, 64, 8)
    }


def test_cache_types_table() -> None:
    sizes = {
        name: (cache_type(name).block_size, cache_type(name).type_size) for name in CACHE_TYPE_NAMES
    }
    assert sizes == {
        "f32": (1, 4),
        "f16": (1, 2),
        "bf16": (1, 2),
        "q8_0": (32, 34),
        "q4_0": (32, 18),
        "q4_1": (32, 20),
        "iq4_nl": (32, 18),
        "q5_0": (32, 22),
        "q5_1": (32, 24),
    }


@pytest.mark.parametrize("name", ["q4_K", "Q8_0", "f8", ""])
def test_unknown_cache_type_raises(name: str) -> None:
    with pytest.raises(UnknownCacheTypeError, match="llama-server accepts: f32, f16"):
        bytes_per_token(llama_geometry(), name, "f16")


def test_quantized_v_needs_flash_attention() -> None:
    with pytest.raises(KvCacheError, match="needs flash attention"):
        capacity(
            llama_geometry(),
            n_ctx=256,
            n_seq=1,
            unified=True,
            type_k="f16",
            type_v="q4_0",
            flash_attn=False,
        )


def test_quantized_types_need_head_sizes_divisible_by_the_block() -> None:
    geo = geometry("llama", embedding_length=192, attention__head_count=4)  # head 48
    with pytest.raises(KvCacheError, match="does not divide the key head size 48"):
        capacity(geo, n_ctx=256, n_seq=1, unified=True, type_k="q8_0", type_v="f16")


@pytest.mark.parametrize("arch", ["mamba", "bert", "llama4", "gemma3n", "future-arch"])
def test_unknown_architecture_raises(arch: str) -> None:
    with pytest.raises(
        UnknownArchitecture, match=f"no KV-cache rules for architecture '{arch}'"
    ) as info:
        geometry(arch)
    assert info.value.arch == arch
    assert isinstance(info.value, KvCacheError)


def test_missing_required_keys_raise() -> None:
    bare = meta_of({"general.architecture": "llama"})
    with pytest.raises(KvCacheError, match=r"required key llama\.block_count is missing"):
        KvGeometry.from_meta(bare)
    with pytest.raises(KvCacheError, match="not an integer"):
        geometry("llama", block_count="four")


def test_geometry_of_a_real_file(tmp_path: Path) -> None:
    path = write_tiny_model(tmp_path / "m.gguf", n_layer=3, n_embd=128, n_head=4, n_head_kv=1)
    geo = KvGeometry.from_meta(read_model_meta(path))
    assert geo.architecture == "llama"
    assert (geo.n_layer, geo.n_ctx_train) == (3, 8192)
    assert [(layer.n_head_kv, layer.head_dim_k) for layer in geo.kv_layers] == [(1, 32)] * 3


# --- GGUF header ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def test_read_model_meta(tiny_gguf: Path) -> None:
    m = read_model_meta(tiny_gguf)
    assert m.architecture == "llama"
    assert m.path == tiny_gguf
    assert m.version == 3
    assert m.metadata["llama.block_count"] == 4
    assert m.metadata["general.name"] == "tiny"
    assert m.metadata["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    tokens = m.metadata["tokenizer.ggml.tokens"]
    assert isinstance(tokens, tuple)
    assert tokens[:3] == ("<unk>", "<s>", "</s>")
    names = [t.name for t in m.tensors]
    assert names[:3] == ["token_embd.weight", "output_norm.weight", "output.weight"]
    assert len(names) == 3 + 4 * 9
    embd = m.tensors[0]
    assert (embd.ggml_type.name, embd.shape, embd.n_elements) == (
        "f32",
        (256, len(tokens)),
        256 * len(tokens),
    )
    assert embd.n_bytes == 4 * embd.n_elements
    # The data section is exactly the tensors plus alignment padding, up to the end of the file.
    assert m.data_offset % m.alignment == 0
    last = m.tensors[-1]
    assert m.data_offset + last.offset + last.n_bytes == m.file_size == tiny_gguf.stat().st_size


def test_tensor_sizes_of_quantized_types() -> None:
    from exporter.kv.gguf_meta import TensorInfo  # noqa: PLC0415

    q4_k = TensorInfo("w", GGML_TYPES[12], (4096, 11008), 0)
    assert q4_k.n_bytes == 4096 // 256 * 144 * 11008
    q8_0 = TensorInfo("w", GGML_TYPES[8], (64, 3, 2), 0)
    assert (q8_0.n_elements, q8_0.n_bytes) == (384, 2 * 34 * 6)


def test_reading_a_huge_file_reads_only_the_header(tmp_path: Path) -> None:
    path = write_tiny_model(tmp_path / "huge.gguf")
    # Two sparse gigabytes after the tensors: a stand-in for a 20 GB model's data.
    os.truncate(path, path.stat().st_size + 2 * 1024 * MIB)
    io_before = _bytes_read()
    started = time.monotonic()
    m = read_model_meta(path)
    elapsed = time.monotonic() - started
    io_after = _bytes_read()
    assert m.file_size > 2 * 1024 * MIB
    assert elapsed < 0.5
    if io_before is not None and io_after is not None:
        # The header is a few kilobytes; one read chunk is 1 MiB.
        assert io_after - io_before < 4 * MIB


def _bytes_read() -> int | None:
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def test_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="file not found") as info:
        read_model_meta(tmp_path / "nope.gguf")
    assert info.value.path == tmp_path / "nope.gguf"


def test_directory_raises(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="is a directory"):
        read_model_meta(tmp_path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "not a GGUF file: only 0 bytes long"),
        (b"GG", "not a GGUF file: only 2 bytes long"),
        (b"PK\x03\x04" + b"\x00" * 100, "not a GGUF file: it does not start with the GGUF magic"),
        (b"GGUF" + struct.pack("<I", 1) + b"\x00" * 16, "unsupported GGUF version 1"),
        (b"GGUF" + struct.pack(">I", 3) + b"\x00" * 16, "big-endian"),
        (b"GGUF" + struct.pack("<I", 3), "truncated: the tensor count needs 8 bytes"),
    ],
)
def test_garbage_raises(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(ModelFileError, match=message):
        read_model_meta(path)


def _gguf(kvs: Mapping[str, tuple[int, bytes]], n_tensors: int = 0, tail: bytes = b"") -> bytes:
    out = b"GGUF" + struct.pack("<IQQ", 3, n_tensors, len(kvs))
    for key, (vtype, payload) in kvs.items():
        out += _str(key) + struct.pack("<I", vtype) + payload
    return out + tail


def _str(s: str) -> bytes:
    raw = s.encode()
    return struct.pack("<Q", len(raw)) + raw


_ARCH_KV = {"general.architecture": (8, _str("llama"))}


def test_hand_made_header(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    kvs = _ARCH_KV | {
        "a.u8s": (9, struct.pack("<IQ", 0, 3) + bytes([1, 2, 3])),
        "a.flag": (7, b"\x01"),
        "a.f64": (12, struct.pack("<d", 0.5)),
        "a.i64": (11, struct.pack("<q", -7)),
        "a.strs": (9, struct.pack("<IQ", 8, 2) + _str("x") + _str("yz")),
    }
    path.write_bytes(_gguf(kvs))
    m = read_model_meta(path)
    assert dict(m.metadata) == {
        "general.architecture": "llama",
        "a.u8s": (1, 2, 3),
        "a.flag": True,
        "a.f64": 0.5,
        "a.i64": -7,
        "a.strs": ("x", "yz"),
    }
    assert m.tensors == ()


@pytest.mark.parametrize(
    ("kvs", "message"),
    [
        ({"general.name": (8, _str("x"))}, "no general.architecture"),
        (_ARCH_KV | {"a": (13, b"")}, "invalid GGUF type 13"),
        (_ARCH_KV | {"a": (9, struct.pack("<IQ", 9, 1))}, "array of unsupported type 9"),
        (_ARCH_KV | {"a": (8, struct.pack("<Q", 2**40))}, "claims 1099511627776 bytes"),
        (_ARCH_KV | {"a": (9, struct.pack("<IQ", 4, 2**40))}, "claims 1099511627776 entries"),
        (_ARCH_KV | {"general.alignment": (4, struct.pack("<I", 24))}, "not a power of 2"),
    ],
)
def test_malformed_headers_raise(
    tmp_path: Path, kvs: Mapping[str, tuple[int, bytes]], message: str
) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(_gguf(kvs))
    with pytest.raises(ModelFileError, match=message):
        read_model_meta(path)


def test_duplicate_key_raises(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    one = _str("general.architecture") + struct.pack("<I", 8) + _str("llama")
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 2) + one + one)
    with pytest.raises(ModelFileError, match=r"duplicate key 'general\.architecture'"):
        read_model_meta(path)


def test_bad_tensor_infos_raise(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"

    def info(name: str, dims: tuple[int, ...], ggml_type: int, offset: int) -> bytes:
        return (
            _str(name)
            + struct.pack(f"<I{len(dims)}Q", len(dims), *dims)
            + struct.pack("<IQ", ggml_type, offset)
        )

    cases = [
        ([info("t", (1, 1, 1, 1, 1), 0, 0)], "5 dimensions"),
        ([info("t", (4,), 4, 0)], "unknown ggml type 4"),
        ([info("t", (48,), 8, 0)], "not a multiple of the q8_0 block size 32"),
        ([info("t", (8,), 0, 0), info("u", (8,), 0, 0)], "'u' has data offset 0, expected 32"),
        ([info("t", (4096,), 0, 0)], "truncated: tensor 't' ends at byte"),
    ]
    for infos, message in cases:
        # Room for the data of small tensors, so that only the broken part fails.
        data = b"\0" * 256
        path.write_bytes(_gguf(_ARCH_KV, n_tensors=len(infos), tail=b"".join(infos) + data))
        with pytest.raises(ModelFileError, match=message):
            read_model_meta(path)


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9, 0.999])
def test_truncated_model_raises(tiny_gguf: Path, tmp_path: Path, keep: float) -> None:
    data = tiny_gguf.read_bytes()
    path = tmp_path / "cut.gguf"
    # 0.1 cuts into the header (the vocabulary), the others into the tensor data.
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ModelFileError, match="truncated"):
        read_model_meta(path)


# --- llama-server arguments -------------------------------------------------------------------


def cache_types(argv: list[str], environ: dict[str, str]) -> tuple[str, str]:
    args = server_kv_args(argv, environ)
    return args.type_k, args.type_v


def test_cache_types_default_to_f16() -> None:
    assert cache_types(["llama-server", "-m", "m.gguf"], {}) == ("f16", "f16")


@pytest.mark.parametrize(
    "argv",
    [
        ["-ctk", "q8_0", "-ctv", "q4_0"],
        ["--cache-type-k", "q8_0", "--cache-type-v", "q4_0"],
        ["--cache-type-k=q8_0", "--cache-type-v=q4_0"],
        ["--cache_type_k", "q8_0", "--cache_type_v", "q4_0"],
        ["-ctk", "f16", "-ctv", "f32", "-ctk", "q8_0", "-ctv", "q4_0"],  # the last one wins
    ],
)
def test_cache_types_from_argv(argv: list[str]) -> None:
    assert cache_types(["/usr/bin/llama-server", "-m", "x.gguf", *argv], {}) == ("q8_0", "q4_0")


def test_cache_types_from_env_and_cli_wins() -> None:
    env = {"LLAMA_ARG_CACHE_TYPE_K": "q8_0", "LLAMA_ARG_CACHE_TYPE_V": "q5_1"}
    assert cache_types([], env) == ("q8_0", "q5_1")
    assert cache_types(["-ctv", "iq4_nl"], env) == ("q8_0", "iq4_nl")


def test_other_options_values_are_not_mistaken_for_cache_types() -> None:
    argv = ["-m", "q8_0.gguf", "--alias", "ctk", "-ngl", "99", "-ctv", "q4_0"]
    assert cache_types(argv, {}) == ("f16", "q4_0")


def test_bad_values_raise() -> None:
    with pytest.raises(UnknownCacheTypeError):
        cache_types(["-ctk", "Q8_0"], {})
    with pytest.raises(ServerArgsError, match="needs a value"):
        cache_types(["-ctk"], {})
    with pytest.raises(ServerArgsError, match="not an integer"):
        server_kv_args(["-c", "lots"], {})
    with pytest.raises(ServerArgsError, match="0 slots"):
        server_kv_args(["-np", "0"], {})
    with pytest.raises(ServerArgsError, match="not a boolean"):
        server_kv_args([], {"LLAMA_ARG_KV_UNIFIED": "maybe"})


def test_server_defaults_are_four_unified_slots() -> None:
    args = server_kv_args(["llama-server", "-m", "m.gguf"], {})
    assert args == KvServerArgs()
    assert (args.n_parallel, args.kv_unified, args.ctx_size) == (4, True, 0)


def test_auto_slots_override_no_kv_unified() -> None:
    # server.cpp sets kv_unified after parsing when -np is auto.
    assert server_kv_args(["-np", "-1", "--no-kv-unified"], {}).kv_unified is True


def test_explicit_slots_are_not_unified_unless_asked() -> None:
    assert server_kv_args(["-np", "2"], {}).kv_unified is False
    assert server_kv_args(["-np", "2", "-kvu"], {}).kv_unified is True
    assert server_kv_args(["-np", "2", "-kvu", "-no-kvu"], {}).kv_unified is False


@pytest.mark.parametrize(
    ("env", "unified"),
    [
        ({"LLAMA_ARG_KV_UNIFIED": "1"}, True),
        ({"LLAMA_ARG_KV_UNIFIED": "off"}, False),
        ({"LLAMA_ARG_KV_UNIFIED": "true", "LLAMA_ARG_NO_KV_UNIFIED": ""}, False),
    ],
)
def test_kv_unified_from_env(env: dict[str, str], unified: bool) -> None:
    assert server_kv_args([], env | {"LLAMA_ARG_N_PARALLEL": "3"}).kv_unified is unified


def test_all_kv_options_from_argv() -> None:
    argv = [
        "llama-server",
        "-m",
        "m.gguf",
        "-c",
        "8192",
        "--parallel",
        "3",
        "--kv-unified",
        "--swa-full",
        "-b",
        "1024",
        "-ub",
        "256",
        "-fa",
        "off",
        "-ctk",
        "f32",
    ]
    args = server_kv_args(argv, {})
    assert args == KvServerArgs(
        type_k="f32",
        ctx_size=8192,
        n_parallel=3,
        kv_unified=True,
        swa_full=True,
        n_batch=1024,
        n_ubatch=256,
        flash_attn="off",
    )


def test_all_kv_options_from_env_and_argv_beats_env() -> None:
    env = {
        "LLAMA_ARG_CTX_SIZE": "16384",
        "LLAMA_ARG_N_PARALLEL": "2",
        "LLAMA_ARG_SWA_FULL": "1",
        "LLAMA_ARG_BATCH": "512",
        "LLAMA_ARG_UBATCH": "128",
        "LLAMA_ARG_FLASH_ATTN": "on",
    }
    args = server_kv_args([], env)
    assert (args.ctx_size, args.n_parallel, args.kv_unified, args.swa_full) == (
        16384,
        2,
        False,
        True,
    )
    assert (args.n_batch, args.n_ubatch, args.flash_attn) == (512, 128, "on")
    assert server_kv_args(["-c", "4096", "-np", "-1"], env).ctx_size == 4096
    # A flag-only option from the env needs a truthy value.
    assert server_kv_args([], {"LLAMA_ARG_SWA_FULL": "0"}).swa_full is False


def test_kv_unified_per_slot_sizes_an_unset_context() -> None:
    per_slot = ["-np", "3", "--kv-unified-per-slot", "1000"]
    assert server_kv_args(per_slot, {}).effective_ctx_size == 3000
    assert server_kv_args([*per_slot, "-c", "8192"], {}).effective_ctx_size == 8192
    # -c 0 explicitly asks for the training context.
    assert server_kv_args([*per_slot, "-c", "0"], {}).effective_ctx_size == 0
