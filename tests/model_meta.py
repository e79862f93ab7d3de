"""GGUF metadata built in memory, for tests that need no file."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType

from exporter.kv.gguf_meta import MetaValue, ModelMeta, TensorInfo


def meta_of(metadata: Mapping[str, MetaValue], tensors: Sequence[TensorInfo] = ()) -> ModelMeta:
    arch = metadata["general.architecture"]
    assert isinstance(arch, str) and arch, "metadata needs general.architecture"
    return ModelMeta(arch, MappingProxyType(dict(metadata)), tuple(tensors))
