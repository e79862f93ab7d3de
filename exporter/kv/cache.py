"""The KV-cache size llama.cpp b11434 allocates, computed from a model's GGUF metadata.

Every rule here is read from the b11434 sources and checked against the
`llama_kv_cache: size = ...` lines llama-server prints with `-lv 4`:

* Which layers hold KV, and how wide their K and V rows are: `llama_hparams` (`n_embd_k_gqa`,
  `n_embd_v_gqa`, `is_swa`, `is_recr`) as each architecture's `load_arch_hparams` fills it.
* How many cells: `llama_context` pads `n_ctx` up to a multiple of 256; a unified cache is one
  stream of `n_ctx` cells, otherwise each of the `n_seq` sequences gets its own stream of
  `pad(n_ctx / n_seq, 256)` cells (`src/llama-context.cpp`).
* Sliding-window layers live in a second, smaller cache unless `--swa-full`:
  `pad(min(n_ctx_seq, n_swa * (n_seq if unified else 1) + n_ubatch), 256)` cells per stream
  (`src/llama-kv-cache-iswa.cpp`). With -np 1 and n_swa 256 that is 256 + 512 -> 768 cells.
* Recurrent (linear-attention) layers of hybrid models keep an f32 state per sequence whose size
  does not depend on the context (`src/llama-memory-recurrent.cpp`).

An architecture whose rules have not been checked raises UnknownArchitecture: a wrong number on a
dashboard is worse than none.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from exporter.kv.gguf_meta import (
    GGML_TYPES_BY_NAME,
    GgmlType,
    MetaValue,
    ModelMeta,
    shown_name,
    shown_value,
)

# common/arg.cpp kv_cache_types: what -ctk/-ctv accept.
CACHE_TYPE_NAMES: Final = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")
CACHE_TYPES: Final[Mapping[str, GgmlType]] = MappingProxyType(
    {name: GGML_TYPES_BY_NAME[name] for name in CACHE_TYPE_NAMES}
)
DEFAULT_CACHE_TYPE: Final = "f16"

# llama.cpp's defaults for the values that size the cache (common/common.h).
DEFAULT_N_BATCH: Final = 2048
DEFAULT_N_UBATCH: Final = 512
# GGML_PAD(n_ctx, 256) in llama_context, and the padding of the SWA cache.
CELL_PADDING: Final = 256
_MAX_LAYERS: Final = 512  # LLAMA_MAX_LAYERS
_RECURRENT_STATE_BYTES: Final = 4  # R and S are always f32, whatever -ctk/-ctv say


class KvCacheError(ValueError):
    """The cache cannot be computed: bad metadata, an unsupported option, or llama.cpp refuses."""


class UnknownArchitecture(KvCacheError):  # noqa: N818  # the name the issue asked for
    """No verified KV rules for this architecture; raised instead of guessing a number."""

    def __init__(self, arch: str) -> None:
        self.arch = arch
        supported = ", ".join(sorted(SUPPORTED_ARCHITECTURES))
        super().__init__(
            f"no KV-cache rules for architecture {shown_name(arch)} (supported: {supported})"
        )


class UnknownCacheTypeError(KvCacheError):
    """Not one of the cache types llama-server accepts for -ctk/-ctv."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(
            f"unknown KV cache type {name!r} (llama-server accepts: {', '.join(CACHE_TYPE_NAMES)})"
        )


def cache_type(name: str) -> GgmlType:
    """The ggml type of a -ctk/-ctv value; the names are case-sensitive, as in llama.cpp."""
    try:
        return CACHE_TYPES[name]
    except KeyError:
        raise UnknownCacheTypeError(name) from None


@dataclass(frozen=True)
class _SwaRule:
    # The layer pattern when the GGUF has no attention.sliding_window_pattern: of every
    # `pattern` layers, all but the last use the window (llama_hparams::set_swa_pattern).
    pattern: int
    # The window when the GGUF has no attention.sliding_window; None: the key is required.
    default_window: int | None = None
    # Only a window present and > 0 turns SWA on (the model also ships without it).
    optional: bool = False


# Architectures whose load_arch_hparams reads nothing that changes the cache layout: every
# layer is a plain (grouped-query) attention layer. phi3 reads attention.sliding_window but
# b11434 disables SWA for it, so its cache is plain too.
_PLAIN_ARCHS: Final = frozenset(
    {"llama", "qwen2", "qwen2moe", "qwen3", "qwen3moe", "gemma", "mistral3", "phi3"}
)
_SWA_ARCHS: Final[Mapping[str, _SwaRule]] = MappingProxyType(
    {
        "gemma2": _SwaRule(pattern=2, default_window=4096),
        "gemma3": _SwaRule(pattern=6, optional=True),
        "cohere2": _SwaRule(pattern=4),
        "gpt-oss": _SwaRule(pattern=2),
        "olmo2": _SwaRule(pattern=4, optional=True),
    }
)
_HYBRID_ARCHS: Final = frozenset({"qwen3next"})
_MLA_ARCHS: Final = frozenset({"deepseek2"})
SUPPORTED_ARCHITECTURES: Final = frozenset(
    _PLAIN_ARCHS | _SWA_ARCHS.keys() | _HYBRID_ARCHS | _MLA_ARCHS
)


@dataclass(frozen=True)
class KvLayer:
    """One layer that holds K (and V) rows in the cache."""

    index: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    swa: bool

    @property
    def n_embd_k_gqa(self) -> int:
        return self.head_dim_k * self.n_head_kv

    @property
    def n_embd_v_gqa(self) -> int:
        return self.head_dim_v * self.n_head_kv


@dataclass(frozen=True)
class RecurrentGeometry:
    """The per-sequence f32 state of a hybrid model's recurrent layers."""

    layers: tuple[int, ...]
    # Floats per layer and sequence: R is the convolution state, S the SSM/delta-net state.
    n_embd_r: int
    n_embd_s: int

    @property
    def bytes_per_seq(self) -> int:
        return len(self.layers) * (self.n_embd_r + self.n_embd_s) * _RECURRENT_STATE_BYTES


@dataclass(frozen=True)
class KvGeometry:
    """What of a model's shape decides its KV-cache size."""

    architecture: str
    # block_count: all blocks, including NextN/MTP blocks the main cache leaves out.
    n_layer: int
    n_ctx_train: int
    kv_layers: tuple[KvLayer, ...]
    # False for multi-head latent attention: the compressed latent lives in K, there is no V.
    has_v: bool = True
    # The sliding window when some layers use one, else None.
    n_swa: int | None = None
    # Without flash attention V is stored transposed, padded to the widest V row of any layer.
    n_embd_v_gqa_max: int = 0
    recurrent: RecurrentGeometry | None = None

    @property
    def full_layers(self) -> tuple[KvLayer, ...]:
        return tuple(layer for layer in self.kv_layers if not layer.swa)

    @property
    def swa_layers(self) -> tuple[KvLayer, ...]:
        return tuple(layer for layer in self.kv_layers if layer.swa)

    @classmethod
    def from_meta(cls, meta: ModelMeta) -> KvGeometry:
        """The geometry llama.cpp b11434 derives; UnknownArchitecture for unverified models."""
        return _GeometryReader(meta).read()


@dataclass(frozen=True)
class KvCachePart:
    """One llama_kv_cache instance: one `llama_kv_cache: size = ...` log line."""

    swa: bool
    # Cells per stream, as the log line prints them.
    cells: int
    n_stream: int
    n_layers: int
    k_bytes: int
    v_bytes: int

    @property
    def bytes(self) -> int:
        return self.k_bytes + self.v_bytes


@dataclass(frozen=True)
class KvCapacity:
    """The memory llama.cpp allocates for one context's KV cache and recurrent state."""

    # n_ctx after llama.cpp's padding and rounding: what all sequences share in total.
    n_ctx: int
    # The context one sequence (one llama-server slot) can hold.
    n_ctx_seq: int
    n_seq: int
    unified: bool
    # Cells of the full-context cache over all streams, and of the sliding-window cache
    # (0 when the model has none).
    cells: int
    swa_cells: int
    # Bytes of all attention KV caches (K and V of full-context and sliding-window layers).
    bytes: int
    recurrent_bytes: int
    parts: tuple[KvCachePart, ...]

    @property
    def n_stream(self) -> int:
        return 1 if self.unified else self.n_seq

    @property
    def total_bytes(self) -> int:
        return self.bytes + self.recurrent_bytes


def bytes_per_token(
    geometry: KvGeometry, type_k: str, type_v: str, *, flash_attn: bool = True
) -> int:
    """K+V bytes one cell costs across the full-context attention layers.

    Sliding-window layers are left out: their cache does not grow with the context.
    """
    return _row_bytes(geometry, geometry.full_layers, type_k, type_v, flash_attn=flash_attn)


def capacity(
    geometry: KvGeometry,
    *,
    n_ctx: int,
    n_seq: int,
    unified: bool,
    type_k: str,
    type_v: str,
    swa_full: bool = False,
    n_batch: int = DEFAULT_N_BATCH,
    n_ubatch: int = DEFAULT_N_UBATCH,
    flash_attn: bool = True,
) -> KvCapacity:
    """The cache llama.cpp allocates for a context of `n_ctx` tokens and `n_seq` sequences.

    `n_ctx` 0 means the model's training context, as in llama.cpp (with `--fit`, llama-server may
    shrink an unset context on a GPU; its `/props` tells the effective value). `n_seq` is
    llama-server's slot count after its own resolution (`-np -1` is 4 slots, unified).
    `flash_attn` False means `-fa off`: `auto` decides after the cache is allocated, which is
    allocated as if flash attention were on.
    """
    if n_seq < 1:
        raise KvCacheError(f"n_seq must be at least 1, got {n_seq}")
    if n_ctx < 0:
        raise KvCacheError(f"n_ctx must not be negative, got {n_ctx}")
    k_type, v_type = cache_type(type_k), cache_type(type_v)
    _check_supported(geometry, k_type, v_type, flash_attn=flash_attn)

    requested = n_ctx or geometry.n_ctx_train
    if requested == 0:
        raise KvCacheError("n_ctx is 0 and the model has no training context length")
    # With causal attention llama_context caps the batch by the unpadded context.
    n_batch_eff = min(requested, n_batch)
    n_ubatch_eff = min(n_batch_eff, n_ubatch or n_batch_eff)
    n_ctx_padded = _pad(requested, CELL_PADDING)
    if unified:
        n_ctx_seq = n_ctx_padded
        n_ctx_total = n_ctx_padded
    else:
        n_ctx_seq = _pad(n_ctx_padded // n_seq, CELL_PADDING)
        if n_ctx_seq == 0:
            raise KvCacheError(f"n_ctx {requested} is too small for {n_seq} sequences")
        n_ctx_total = n_ctx_seq * n_seq
    n_stream = 1 if unified else n_seq

    def part(layers: Sequence[KvLayer], cells: int, *, swa: bool) -> KvCachePart:
        return _part(
            geometry,
            layers,
            cells=cells,
            n_stream=n_stream,
            types=(k_type, v_type),
            flash_attn=flash_attn,
            swa=swa,
        )

    if geometry.n_swa is None:
        parts = [part(geometry.kv_layers, n_ctx_seq, swa=False)]
        swa_cells = 0
    else:
        size_swa = n_ctx_seq
        if not swa_full:
            window_cells = geometry.n_swa * (n_seq if unified else 1) + n_ubatch_eff
            size_swa = _pad(min(n_ctx_seq, window_cells), CELL_PADDING)
        parts = [
            part(geometry.full_layers, n_ctx_seq, swa=False),
            part(geometry.swa_layers, size_swa, swa=True),
        ]
        swa_cells = size_swa * n_stream

    recurrent_bytes = 0
    if geometry.recurrent is not None:
        # One state row per sequence.
        recurrent_bytes = geometry.recurrent.bytes_per_seq * n_seq

    return KvCapacity(
        n_ctx=n_ctx_total,
        n_ctx_seq=n_ctx_seq,
        n_seq=n_seq,
        unified=unified,
        cells=n_ctx_seq * n_stream,
        swa_cells=swa_cells,
        bytes=sum(p.bytes for p in parts),
        recurrent_bytes=recurrent_bytes,
        parts=tuple(parts),
    )


def _pad(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _check_supported(
    geometry: KvGeometry, k_type: GgmlType, v_type: GgmlType, *, flash_attn: bool
) -> None:
    # llama_init_from_model refuses these combinations, so there is no cache to size.
    if not geometry.has_v and k_type != v_type:
        raise KvCacheError(
            f"multi-head latent attention needs equal K and V cache types, "
            f"got {k_type.name} and {v_type.name}"
        )
    # Checked even without a V tensor (MLA), as llama.cpp does.
    quantized_v = v_type.block_size > 1
    if quantized_v and not flash_attn:
        raise KvCacheError(f"V cache type {v_type.name} needs flash attention, which is off")
    if not flash_attn:
        return
    for layer in geometry.kv_layers:
        if layer.head_dim_k % k_type.block_size:
            raise KvCacheError(
                f"K cache type {k_type.name} (block {k_type.block_size}) does not divide "
                f"the key head size {layer.head_dim_k} of layer {layer.index}"
            )
        if layer.head_dim_v % v_type.block_size:
            raise KvCacheError(
                f"V cache type {v_type.name} (block {v_type.block_size}) does not divide "
                f"the value head size {layer.head_dim_v} of layer {layer.index}"
            )


def _layer_row_bytes(
    geometry: KvGeometry,
    layer: KvLayer,
    k_type: GgmlType,
    v_type: GgmlType,
    *,
    flash_attn: bool,
) -> tuple[int, int]:
    try:
        k = k_type.row_bytes(layer.n_embd_k_gqa)
        v = 0
        if geometry.has_v:
            width = layer.n_embd_v_gqa if flash_attn else geometry.n_embd_v_gqa_max
            v = v_type.row_bytes(width)
    except ValueError as exc:
        raise KvCacheError(f"layer {layer.index}: {exc}") from None
    return k, v


def _row_bytes(
    geometry: KvGeometry,
    layers: Sequence[KvLayer],
    type_k: str,
    type_v: str,
    *,
    flash_attn: bool,
) -> int:
    k_type, v_type = cache_type(type_k), cache_type(type_v)
    return sum(
        sum(_layer_row_bytes(geometry, layer, k_type, v_type, flash_attn=flash_attn))
        for layer in layers
    )


def _part(
    geometry: KvGeometry,
    layers: Sequence[KvLayer],
    *,
    cells: int,
    n_stream: int,
    types: tuple[GgmlType, GgmlType],
    flash_attn: bool,
    swa: bool,
) -> KvCachePart:
    k_type, v_type = types
    k_bytes = v_bytes = 0
    for layer in layers:
        k, v = _layer_row_bytes(geometry, layer, k_type, v_type, flash_attn=flash_attn)
        k_bytes += k * cells * n_stream
        v_bytes += v * cells * n_stream
    return KvCachePart(swa, cells, n_stream, len(layers), k_bytes, v_bytes)


class _GeometryReader:
    """Reads metadata the way llama_model_base::load_hparams and load_arch_hparams do."""

    def __init__(self, meta: ModelMeta) -> None:
        self._meta = meta
        self._arch = meta.architecture

    def _key(self, suffix: str) -> str:
        return f"{self._arch}.{suffix}"

    def _error(self, message: str) -> KvCacheError:
        where = f"{self._meta.path}: " if self._meta.path is not None else ""
        return KvCacheError(f"{where}model metadata: {message}")

    def _int(self, suffix: str, default: int | None = None) -> int:
        key = self._key(suffix)
        value = self._meta.metadata.get(key)
        if value is None:
            if default is None:
                raise self._error(f"required key {key} is missing")
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._error(f"{key} is {shown_value(value)}, not an integer")
        if value < 0:
            raise self._error(f"{key} is negative ({value})")
        return value

    def _per_layer(self, suffix: str, n: int, default: Sequence[int]) -> list[int]:
        # get_key_or_arr: a scalar applies to every layer, an array must have one per layer.
        key = self._key(suffix)
        value = self._meta.metadata.get(key)
        if value is None:
            return list(default)
        if isinstance(value, tuple):
            if len(value) != n:
                raise self._error(f"{key} has {len(value)} entries for {n} layers")
            return [self._layer_int(key, v) for v in value]
        return [self._layer_int(key, value)] * n

    def _layer_int(self, key: str, value: MetaValue) -> int:
        # llama.cpp reads bool arrays into integer arrays as 0/1.
        if not isinstance(value, int) or value < 0:
            raise self._error(f"{key} has entry {shown_value(value)}, not a non-negative integer")
        return int(value)

    def read(self) -> KvGeometry:
        if self._arch not in SUPPORTED_ARCHITECTURES:
            raise UnknownArchitecture(self._arch)
        n_layer_all = self._int("block_count")
        if not 0 < n_layer_all <= _MAX_LAYERS:
            raise self._error(f"block_count {n_layer_all} is outside 1..{_MAX_LAYERS}")
        n_nextn = self._int("nextn_predict_layers", 0)
        if n_nextn > n_layer_all:
            raise self._error(f"{n_nextn} NextN layers exceed block_count {n_layer_all}")
        n_layer = n_layer_all - n_nextn
        n_ctx_train = self._int("context_length")
        n_embd = self._int("embedding_length")

        n_head = self._per_layer("attention.head_count", n_layer_all, [0] * n_layer_all)
        n_head_kv = self._per_layer("attention.head_count_kv", n_layer_all, n_head)
        if n_head[0] == 0:
            raise self._error(f"{self._key('attention.head_count')} is missing or 0")
        head_k = self._int("attention.key_length", n_embd // n_head[0])
        head_v = self._int("attention.value_length", n_embd // n_head[0])
        head_k_swa = self._int("attention.key_length_swa", head_k)
        head_v_swa = self._int("attention.value_length_swa", head_v)

        is_swa, n_swa = self._sliding_window(n_layer_all, n_layer)
        recurrent: RecurrentGeometry | None = None
        if self._arch in _HYBRID_ARCHS:
            is_recr = self._recurrent_layers(n_layer_all, n_layer)
            # The hybrid memory's attention filter: trunk layers that are not recurrent.
            kv_indices = [il for il in range(n_layer) if not is_recr[il]]
            recurrent = self._recurrent_state([il for il in range(n_layer) if is_recr[il]])
        elif n_nextn > 0 and n_layer > 0:
            # NextN/MTP blocks only serve a draft context; the main cache leaves them out.
            kv_indices = list(range(n_layer))
        else:
            kv_indices = list(range(n_layer_all))

        def dims(il: int) -> tuple[int, int]:
            return (head_k_swa, head_v_swa) if is_swa[il] else (head_k, head_v)

        kv_layers = tuple(
            KvLayer(il, n_head_kv[il], *dims(il), swa=is_swa[il]) for il in kv_indices
        )
        n_embd_v_gqa_max = max(dims(il)[1] * n_head_kv[il] for il in range(n_layer_all))
        return KvGeometry(
            architecture=self._arch,
            n_layer=n_layer_all,
            n_ctx_train=n_ctx_train,
            kv_layers=kv_layers,
            has_v=not self._is_mla(),
            n_swa=n_swa,
            n_embd_v_gqa_max=n_embd_v_gqa_max,
            recurrent=recurrent,
        )

    def _is_mla(self) -> bool:
        # deepseek2 GGUFs converted for MLA store the latent (kv_lora_rank) plus the RoPE part
        # as one K head (key_length) with head_count_kv 1 and flag it with the *_mla keys; only
        # then does llama_kv_cache skip V. Older conversions keep per-head K and V.
        if self._arch not in _MLA_ARCHS:
            return False
        return (
            self._int("attention.key_length_mla", 0) != 0
            and self._int("attention.value_length_mla", 0) != 0
        )

    def _sliding_window(self, n_layer_all: int, n_layer: int) -> tuple[list[bool], int | None]:
        no_swa = [False] * n_layer_all
        rule = _SWA_ARCHS.get(self._arch)
        if rule is None:
            return no_swa, None
        key = self._key("attention.sliding_window")
        present = key in self._meta.metadata
        if rule.optional and (not present or self._int("attention.sliding_window") == 0):
            return no_swa, None
        n_swa = self._int("attention.sliding_window", rule.default_window)

        pattern_key = self._key("attention.sliding_window_pattern")
        pattern = self._meta.metadata.get(pattern_key)
        if isinstance(pattern, tuple):
            # A per-layer array of flags; layers past its end are full attention.
            flags = [self._layer_int(pattern_key, v) != 0 for v in pattern[:n_layer_all]]
            is_swa = flags + [False] * (n_layer_all - len(flags))
        else:
            n_pattern = self._int("attention.sliding_window_pattern", rule.pattern)
            is_swa = [
                il < n_layer and (n_pattern == 0 or il % n_pattern < n_pattern - 1)
                for il in range(n_layer_all)
            ]
        if not any(is_swa):
            # llama.cpp asserts here (GGML_ASSERT(hparams.is_swa_any())) and aborts.
            raise self._error(f"{pattern_key} leaves no sliding-window layer")
        return is_swa, n_swa

    def _recurrent_layers(self, n_layer_all: int, n_layer: int) -> list[bool]:
        key = self._key("attention.recurrent_layers")
        if key in self._meta.metadata:
            return [v != 0 for v in self._per_layer("attention.recurrent_layers", n_layer_all, [])]
        interval = self._int("full_attention_interval", 4)
        if interval == 0:
            raise self._error(f"{self._key('full_attention_interval')} is 0")
        return [il < n_layer and (il + 1) % interval != 0 for il in range(n_layer_all)]

    def _recurrent_state(self, layers: list[int]) -> RecurrentGeometry:
        d_conv = self._int("ssm.conv_kernel")
        d_inner = self._int("ssm.inner_size")
        d_state = self._int("ssm.state_size")
        n_group = self._int("ssm.group_count")
        self._int("ssm.time_step_rank")  # required by llama.cpp, though it does not size R or S
        # llama_hparams::n_embd_r: the first conv column is shifted out, so d_conv - 1 columns.
        n_embd_r = max(d_conv - 1, 0) * (d_inner + 2 * n_group * d_state)
        n_embd_s = d_state * d_inner
        return RecurrentGeometry(tuple(layers), n_embd_r, n_embd_s)
