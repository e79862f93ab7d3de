"""The bands' state file (`--storage.path`): what lets a restarted exporter keep its baselines.

Without it a restart forgets every band, and regression alerts stay unarmed until the new
process has gathered its minimum history again. The file is small (at most
`MAX_SERIES` x `MAX_BAND_ROUNDS` rounds) and written whole after each round, to a temporary
name then renamed over the old one, so a crash mid-write leaves the previous file.

The file is read back like any input: a part that is not what this module writes (another
version, a hand edit, a truncated disk) is dropped entry by entry, and a file that cannot be
used at all starts every band afresh, counted in `llama_speed_storage_errors_total`. Both reads
and writes run on `exporter.host.blocking`'s threads: a state directory on a hung network
mount must not stop the probes.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Final, TypeGuard

import structlog

from exporter.host.blocking import BlockedCallError, BlockingSlot
from exporter.host.files import open_regular
from exporter.probe.results import KINDS
from exporter.state.baseline import MAX_BAND_ROUNDS, MAX_SERIES, SeriesKey
from exporter.state.store import Store

log = structlog.get_logger(__name__)

FILE_NAME: Final = "baselines.json"
VERSION: Final = 1
# Far above what MAX_SERIES x MAX_BAND_ROUNDS rounds take (about 3 MiB): a larger file is not
# one this module wrote.
MAX_FILE_BYTES: Final = 16 << 20
LOAD, SAVE = "load", "save"
STORAGE_OPERATIONS: Final = (LOAD, SAVE)
MAX_NAME_CHARS: Final = 4096  # a model's name and file path together


class BandStorage:
    def __init__(
        self,
        directory: Path,
        store: Store,
        targets: tuple[str, ...],
        *,
        slot: BlockingSlot | None = None,
    ) -> None:
        self.path = directory / FILE_NAME
        self._store = store
        self._targets = targets
        self._slot = slot or BlockingSlot()

    async def load(self, now: float) -> None:
        """Restore the bands from the file, if there is one."""
        try:
            text = await self._slot.run(self._read, name="storage-load")
        except FileNotFoundError:
            return
        except (OSError, ValueError, BlockedCallError) as exc:
            self._failed(LOAD, exc)
            return
        try:
            entries = _entries(json.loads(text))
        # JSONDecodeError among the ValueErrors; RecursionError for nesting too deep to parse.
        except (ValueError, RecursionError) as exc:
            self._failed(LOAD, exc)
            return
        restored = 0
        with self._store.locked():
            for entry in entries:
                checked = _checked(entry, self._targets)
                if checked is not None:
                    self._store.baselines.load(*checked, now=now)
                    restored += 1
        log.info(
            "bands_restored", path=str(self.path), series=restored, dropped=len(entries) - restored
        )

    async def save(self) -> None:
        """Write every band's rounds; a failure is logged and counted, never raised."""
        with self._store.locked():
            data = {"version": VERSION, "bands": self._store.baselines.dump()}
        text = json.dumps(data, separators=(",", ":"))
        try:
            await self._slot.run(lambda: self._write(text), name="storage-save")
        except (OSError, BlockedCallError) as exc:
            self._failed(SAVE, exc)

    def _read(self) -> str:
        with open_regular(self.path) as file:
            data = file.read(MAX_FILE_BYTES + 1)
        if len(data) > MAX_FILE_BYTES:
            raise ValueError(f"larger than {MAX_FILE_BYTES} bytes")
        return data.decode("utf-8")

    def _write(self, text: str) -> None:
        temporary = self.path.with_name(f".{FILE_NAME}.tmp")
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, self.path)

    def _failed(self, operation: str, exc: BaseException) -> None:
        log.warning("storage_failed", operation=operation, path=str(self.path), error=str(exc))
        for target in self._targets:
            self._store.record_storage_error(target, operation)


def _entries(data: Any) -> list[Any]:
    if not isinstance(data, dict) or data.get("version") != VERSION:
        raise ValueError(f"not a version {VERSION} state file")
    bands = data.get("bands")
    if not isinstance(bands, list):
        raise ValueError("no list of bands")  # noqa: TRY004 - a bad file, as load reports it
    return bands[:MAX_SERIES]


def _checked(
    entry: Any, targets: tuple[str, ...]
) -> tuple[SeriesKey, str, list[tuple[float, float]]] | None:
    """An entry's key, file and rounds, or None where any of it is not what `save` writes
    (or names a target no longer configured)."""
    if not isinstance(entry, dict):
        return None
    target, model, ctx, depth, kind, file, rounds = (
        entry.get(k) for k in ("target", "model", "ctx", "depth", "probe", "file", "rounds")
    )
    if not (
        target in targets
        and isinstance(model, str)
        and isinstance(file, str)
        and len(model) + len(file) <= MAX_NAME_CHARS
        and kind in KINDS
        and isinstance(rounds, list)
        and len(rounds) <= MAX_BAND_ROUNDS
    ):
        return None
    checked = []
    for r in rounds:
        if not (isinstance(r, list) and len(r) == 2 and all(_positive(v) for v in r)):
            return None
        checked.append((float(r[0]), float(r[1])))
    if not (_count(ctx) and _count(depth)):
        return None
    return SeriesKey(target, model, ctx, depth, kind), file, checked


def _count(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 32


def _positive(value: Any) -> bool:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        number = float(value)  # an integer of hundreds of digits overflows here
    except OverflowError:
        return False
    return math.isfinite(number) and number > 0
