"""Read the header of a GGUF file: its key-value metadata and tensor infos, never tensor data.

`gguf.GGUFReader` is not used: it memory-maps the whole file and turns every element of every
metadata array into its own numpy object, so a real model's 150k-token vocabulary (and its
merges) costs seconds, and a truncated or hostile file surfaces as numpy errors deep inside it.
The header is a few megabytes at the front of a file that may be tens of gigabytes, so this
module reads it sequentially in chunks and stops where the tensor data begins.

The checks mirror llama.cpp b11434's `gguf_init_from_file_impl` (`ggml/src/gguf.cpp`), so a file
that llama-server would refuse is refused here too, with a message that says why.

The path comes from llama-server (`/props`), so the file is opened only if it is a regular file
(`exporter.host.files`), and what it holds never reaches a message: no bytes, and its keys,
tensor and architecture names only when they are plain short names (`shown_name`).
"""

from __future__ import annotations

import math
import os
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import BinaryIO, Final, TypeAlias

from exporter.host.files import NotRegularFileError, open_regular

MetaScalar: TypeAlias = int | float | bool | str
# llama.cpp rejects nested arrays, so an array value is always a flat tuple of scalars.
MetaValue: TypeAlias = MetaScalar | tuple[MetaScalar, ...]

_MAGIC: Final = b"GGUF"
_SUPPORTED_VERSIONS: Final = (2, 3)
_DEFAULT_ALIGNMENT: Final = 32
_MAX_DIMS: Final = 4  # GGML_MAX_DIMS
# Large enough that a header is a handful of reads, small enough not to drag tensor data in.
_CHUNK: Final = 1 << 20
# What a key, tensor or architecture name may be to appear in a message: llama.cpp's own names
# (`llama.block_count`, `blk.0.attn_q.weight`, `gpt-oss`) all are.
_PLAIN_NAME: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def shown_name(name: str) -> str:
    """`name` quoted for a message if it is a plain name, else only its length: a crafted
    file must not write into the exporter's log (control characters, megabytes of text)."""
    if _PLAIN_NAME.fullmatch(name):
        return repr(name)
    return f"<a {len(name)}-character name>"


def shown_value(value: MetaValue) -> str:
    """A metadata value for a message: numbers as they are, strings and arrays by size."""
    if isinstance(value, str):
        return f"a {len(value)}-character string"
    if isinstance(value, tuple):
        return f"an array of {len(value)}"
    return repr(value)


class ModelFileError(Exception):
    """The file is missing, unreadable, not GGUF, truncated or malformed.

    `unreadable`: it could not be opened or read (or is not a regular file), as opposed to read
    and found wrong; told here, where it is known, rather than by a stat of the path later.
    """

    def __init__(self, path: Path | str, reason: str, *, unreadable: bool = False) -> None:
        self.path = Path(path)
        self.reason = reason
        self.unreadable = unreadable
        super().__init__(f"{path}: {reason}")


@dataclass(frozen=True)
class GgmlType:
    """Storage of one ggml tensor type: `type_size` bytes hold `block_size` elements."""

    id: int
    name: str
    block_size: int
    type_size: int

    def row_bytes(self, n_elements: int) -> int:
        """Bytes of `n_elements` consecutive elements, as ggml_row_size computes them."""
        if n_elements % self.block_size:
            raise ValueError(
                f"{n_elements} elements of {self.name} are not a whole number of "
                f"{self.block_size}-element blocks"
            )
        return n_elements // self.block_size * self.type_size


# ggml/src/ggml.c type_traits and ggml/src/ggml-common.h block sizes, as of b11434. Removed ids
# (4, 5, 31-33, 36-38) are absent on purpose: llama.cpp refuses tensors of those types.
_GGML_TYPE_ROWS: Final = (
    (0, "f32", 1, 4),
    (1, "f16", 1, 2),
    (2, "q4_0", 32, 18),
    (3, "q4_1", 32, 20),
    (6, "q5_0", 32, 22),
    (7, "q5_1", 32, 24),
    (8, "q8_0", 32, 34),
    (9, "q8_1", 32, 36),
    (10, "q2_K", 256, 84),
    (11, "q3_K", 256, 110),
    (12, "q4_K", 256, 144),
    (13, "q5_K", 256, 176),
    (14, "q6_K", 256, 210),
    (15, "q8_K", 256, 292),
    (16, "iq2_xxs", 256, 66),
    (17, "iq2_xs", 256, 74),
    (18, "iq3_xxs", 256, 98),
    (19, "iq1_s", 256, 50),
    (20, "iq4_nl", 32, 18),
    (21, "iq3_s", 256, 110),
    (22, "iq2_s", 256, 82),
    (23, "iq4_xs", 256, 136),
    (24, "i8", 1, 1),
    (25, "i16", 1, 2),
    (26, "i32", 1, 4),
    (27, "i64", 1, 8),
    (28, "f64", 1, 8),
    (29, "iq1_m", 256, 56),
    (30, "bf16", 1, 2),
    (34, "tq1_0", 256, 54),
    (35, "tq2_0", 256, 66),
    (39, "mxfp4", 32, 17),
    (40, "nvfp4", 64, 36),
    (41, "q1_0", 128, 18),
    (42, "q2_0", 64, 18),
)
GGML_TYPES: Final[Mapping[int, GgmlType]] = MappingProxyType(
    {row[0]: GgmlType(*row) for row in _GGML_TYPE_ROWS}
)
GGML_TYPES_BY_NAME: Final[Mapping[str, GgmlType]] = MappingProxyType(
    {t.name: t for t in GGML_TYPES.values()}
)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's header entry. `shape` is in ggml order (ne[0] is the row length)."""

    name: str
    ggml_type: GgmlType
    shape: tuple[int, ...]
    # Relative to the start of the data section, as stored in the file.
    offset: int

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def n_bytes(self) -> int:
        # A 0-dimensional tensor is one element: ggml pads missing dimensions with 1.
        row = self.shape[0] if self.shape else 1
        return self.ggml_type.row_bytes(row) * math.prod(self.shape[1:])


@dataclass(frozen=True)
class ModelMeta:
    """What a GGUF header says: architecture, metadata and tensor infos."""

    architecture: str
    metadata: Mapping[str, MetaValue]
    tensors: tuple[TensorInfo, ...] = ()
    path: Path | None = None
    version: int = 3
    alignment: int = _DEFAULT_ALIGNMENT
    # Absolute file offset where tensor data starts; 0 for metadata built without a file.
    data_offset: int = 0
    file_size: int = 0

    def get(self, key: str, default: MetaValue | None = None) -> MetaValue | None:
        return self.metadata.get(key, default)

    def arch_key(self, suffix: str) -> str:
        """The full name of an architecture-scoped key, e.g. `llama.block_count`."""
        return f"{self.architecture}.{suffix}"


def read_model_meta(path: Path) -> ModelMeta:
    """Parse the GGUF header of `path`.

    Raises ModelFileError for a missing or unreadable file, for anything but a regular file
    (never blocking on a FIFO or a device), and for anything llama.cpp would refuse to load
    (bad magic, unknown version or type, truncation, inconsistent offsets). A hung mount can
    still block it in the kernel: the daemon calls it through `exporter.host.blocking`.
    """
    try:
        with open_regular(path) as f:
            file_size = os.fstat(f.fileno()).st_size
            return _HeaderParser(f, path, file_size).parse()
    except FileNotFoundError:
        raise ModelFileError(path, "file not found", unreadable=True) from None
    except NotRegularFileError as exc:
        raise ModelFileError(path, f"is {exc.kind}, not a GGUF file", unreadable=True) from None
    except PermissionError:
        raise ModelFileError(path, "permission denied", unreadable=True) from None
    except OSError as exc:
        raise ModelFileError(path, f"cannot read: {exc.strerror or exc}", unreadable=True) from None


# GGUF value type ids and how one element of each is stored (little-endian).
_UINT8, _INT8, _UINT16, _INT16, _UINT32, _INT32, _FLOAT32, _BOOL, _STRING, _ARRAY = range(10)
_UINT64, _INT64, _FLOAT64 = 10, 11, 12
_SCALAR_FORMATS: Final[Mapping[int, str]] = MappingProxyType(
    {
        _UINT8: "B",
        _INT8: "b",
        _UINT16: "H",
        _INT16: "h",
        _UINT32: "I",
        _INT32: "i",
        _FLOAT32: "f",
        _BOOL: "?",
        _UINT64: "Q",
        _INT64: "q",
        _FLOAT64: "d",
    }
)
_U32: Final = struct.Struct("<I")
_U64: Final = struct.Struct("<Q")


class _HeaderParser:
    def __init__(self, f: BinaryIO, path: Path, file_size: int) -> None:
        self._f = f
        self._path = path
        self._file_size = file_size
        self._buf = b""
        self._pos = 0  # read position within _buf
        self._base = 0  # file offset of _buf[0]

    def _error(self, reason: str) -> ModelFileError:
        return ModelFileError(self._path, reason)

    @property
    def _offset(self) -> int:
        return self._base + self._pos

    def _take(self, n: int, what: str) -> bytes:
        if len(self._buf) - self._pos < n:
            if self._offset + n > self._file_size:
                raise self._error(
                    f"truncated: {what} needs {n} bytes at offset {self._offset}, "
                    f"but the file has {self._file_size} bytes"
                )
            rest = self._buf[self._pos :]
            more = self._f.read(max(n - len(rest), _CHUNK))
            self._base += self._pos
            self._buf, self._pos = rest + more, 0
            if len(self._buf) < n:
                raise self._error(f"truncated: the file ended while reading {what}")
        data = self._buf[self._pos : self._pos + n]
        self._pos += n
        return data

    def _u32(self, what: str) -> int:
        value: int = _U32.unpack(self._take(4, what))[0]
        return value

    def _u64(self, what: str) -> int:
        value: int = _U64.unpack(self._take(8, what))[0]
        return value

    def _string(self, what: str) -> str:
        n = self._u64(f"the length of {what}")
        if n > self._file_size - self._offset:
            raise self._error(f"truncated or corrupt: {what} claims {n} bytes")
        return self._take(n, what).decode("utf-8", errors="replace")

    def _count(self, n: int, min_bytes_each: int, what: str) -> int:
        # A corrupt count would otherwise make us allocate (or loop) far beyond the file.
        if n * min_bytes_each > self._file_size - self._offset:
            raise self._error(f"truncated or corrupt: {what} claims {n} entries")
        return n

    def _value(self, vtype: int, key: str) -> MetaValue:
        shown = shown_name(key)
        if vtype == _STRING:
            return self._string(f"the value of {shown}")
        if vtype == _ARRAY:
            etype = self._u32(f"the element type of {shown}")
            n = self._u64(f"the length of {shown}")
            if etype == _STRING:
                self._count(n, 8, f"array {shown}")
                return tuple(self._string(f"element {i} of {shown}") for i in range(n))
            fmt = _SCALAR_FORMATS.get(etype)
            if fmt is None:
                # Nested arrays are valid in the GGUF spec but llama.cpp refuses them.
                raise self._error(f"key {shown} has an array of unsupported type {etype}")
            size = struct.calcsize(fmt)
            self._count(n, size, f"array {shown}")
            return struct.unpack(f"<{n}{fmt}", self._take(n * size, f"array {shown}"))
        fmt = _SCALAR_FORMATS.get(vtype)
        if fmt is None:
            raise self._error(f"key {shown} has invalid GGUF type {vtype}")
        value: MetaScalar = struct.unpack(f"<{fmt}", self._take(struct.calcsize(fmt), shown))[0]
        return value

    def parse(self) -> ModelMeta:
        magic = self._f.read(4)
        self._base = len(magic)
        if magic != _MAGIC:
            if len(magic) < 4:
                raise self._error(f"not a GGUF file: only {self._file_size} bytes long")
            # What it starts with instead stays out: the message is logged.
            raise self._error("not a GGUF file: it does not start with the GGUF magic")
        version = self._u32("the GGUF version")
        if version not in _SUPPORTED_VERSIONS:
            if version & 0xFFFF == 0:
                raise self._error("big-endian GGUF files are not supported")
            raise self._error(
                f"unsupported GGUF version {version} (llama.cpp reads versions 2 and 3)"
            )
        n_tensors = self._count(self._u64("the tensor count"), 8, "the tensor table")
        n_kv = self._count(self._u64("the key-value count"), 12, "the key-value table")

        metadata: dict[str, MetaValue] = {}
        for i in range(n_kv):
            key = self._string(f"key {i}")
            if key in metadata:
                raise self._error(f"duplicate key {shown_name(key)}")
            metadata[key] = self._value(self._u32(f"the type of {shown_name(key)}"), key)

        alignment = self._alignment(metadata)
        tensors = tuple(self._tensor_info(i) for i in range(n_tensors))
        data_offset = self._offset
        if n_tensors:
            data_offset += -data_offset % alignment
        self._check_data(tensors, data_offset, alignment)

        arch = metadata.get("general.architecture")
        if not isinstance(arch, str) or not arch:
            raise self._error("no general.architecture key: not a llama.cpp model")
        if not _PLAIN_NAME.fullmatch(arch):
            # Every llama.cpp architecture is a plain name; this one would be quoted in
            # messages (no KV-cache rules for ...), so it is refused here instead.
            raise self._error(f"general.architecture is {shown_name(arch)}, not an architecture")
        return ModelMeta(
            architecture=arch,
            metadata=MappingProxyType(metadata),
            tensors=tensors,
            path=self._path,
            version=version,
            alignment=alignment,
            data_offset=data_offset,
            file_size=self._file_size,
        )

    def _alignment(self, metadata: Mapping[str, MetaValue]) -> int:
        alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
        # bool is an int subclass; a bool alignment is a malformed file, not 1.
        if not isinstance(alignment, int) or isinstance(alignment, bool):
            raise self._error("general.alignment is not an integer")
        if alignment <= 0 or alignment & (alignment - 1):
            raise self._error(f"general.alignment {alignment} is not a power of 2")
        return alignment

    def _tensor_info(self, i: int) -> TensorInfo:
        name = self._string(f"the name of tensor {i}")
        shown = shown_name(name)
        n_dims = self._u32(f"the rank of tensor {shown}")
        if n_dims > _MAX_DIMS:
            raise self._error(f"tensor {shown} has {n_dims} dimensions, at most 4 are allowed")
        shape = tuple(self._u64(f"the shape of tensor {shown}") for _ in range(n_dims))
        type_id = self._u32(f"the type of tensor {shown}")
        ggml_type = GGML_TYPES.get(type_id)
        if ggml_type is None:
            raise self._error(f"tensor {shown} has unknown ggml type {type_id}")
        row = shape[0] if shape else 1
        if row % ggml_type.block_size:
            raise self._error(
                f"tensor {shown} rows of {row} elements are not a multiple of the "
                f"{ggml_type.name} block size {ggml_type.block_size}"
            )
        offset = self._u64(f"the data offset of tensor {shown}")
        return TensorInfo(name, ggml_type, shape, offset)

    def _check_data(self, tensors: Sequence[TensorInfo], data_offset: int, alignment: int) -> None:
        expected = 0
        for t in tensors:
            # llama.cpp requires the tensors packed in header order, each padded to alignment.
            if t.offset != expected:
                raise self._error(
                    f"tensor {shown_name(t.name)} has data offset {t.offset}, expected {expected}"
                )
            end = data_offset + t.offset + t.n_bytes
            if end > self._file_size:
                raise self._error(
                    f"truncated: tensor {shown_name(t.name)} ends at byte {end}, "
                    f"but the file has {self._file_size} bytes"
                )
            expected = t.offset + t.n_bytes + (-t.n_bytes % alignment)
