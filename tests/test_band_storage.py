"""The bands' state file: written whole and atomically, read back like any untrusted input.

A restart must keep every band the file holds, a bad file must cost only what is bad in it,
and no file, however broken, may stop the exporter: `load` and `save` never raise, and
only a file unusable as a whole counts in llama_speed_storage_errors_total.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import structlog

from exporter.host.blocking import BlockingSlot
from exporter.state.baseline import BAND_WINDOW_SECONDS, MAX_BAND_ROUNDS, SeriesKey
from exporter.state.storage import FILE_NAME, MAX_FILE_BYTES, MAX_NAME_CHARS, VERSION, BandStorage
from exporter.state.store import Store

T0 = 1_700_000_000.0
STEP = 1200.0
NOW = T0 + 20 * STEP  # when the file is read: every round below is inside the window
TARGETS = ("a", "b")
FILE = "/models/a.gguf|Q8_0"
KEY = SeriesKey("a", "model-a", 4096, 0, "generation")
OTHER = SeriesKey("b", "model-b", 8192, 2048, "prompt")


def new_store() -> Store:
    return Store([(name, f"http://{name}:8080") for name in TARGETS])


def storage(directory: Path, store: Store) -> BandStorage:
    return BandStorage(directory, store, TARGETS, slot=BlockingSlot())


def fill(store: Store, key: SeriesKey, values: list[float], file: str = FILE) -> None:
    with store.locked():
        for i, value in enumerate(values):
            store.baselines.record(key, file, T0 + i * STEP, value, confirmation=False, needed=2)


def errors(store: Store, operation: str) -> dict[str, int]:
    return {t.name: t.storage_errors[operation] for t in store.snapshot()}


def no_errors() -> dict[str, int]:
    return dict.fromkeys(TARGETS, 0)


def one_error() -> dict[str, int]:
    return dict.fromkeys(TARGETS, 1)


def loaded(directory: Path) -> Store:
    """A fresh store, after loading what the directory holds."""
    store = new_store()
    asyncio.run(storage(directory, store).load(NOW))
    return store


def good_entry(**changes: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "target": "a",
        "model": "model-a",
        "ctx": 4096,
        "depth": 0,
        "probe": "generation",
        "file": FILE,
        "rounds": [[T0 + i * STEP, 100.0] for i in range(12)],
    }
    entry.update(changes)
    return entry


def write_state(directory: Path, bands: Any, version: Any = VERSION) -> None:
    (directory / FILE_NAME).write_text(json.dumps({"version": version, "bands": bands}))


# Saving and restoring


def test_save_then_load_in_a_new_store_restores_every_band(tmp_path: Path) -> None:
    store = new_store()
    fill(store, KEY, [90.0, 110.0] * 7)
    fill(store, OTHER, [1000.0 + i for i in range(5)], file="/models/b.gguf|Q4_K_M")
    asyncio.run(storage(tmp_path, store).save())
    restored = loaded(tmp_path)
    for key in (KEY, OTHER):
        assert restored.baselines.figures(key) == store.baselines.figures(key)
    figures = restored.baselines.figures(KEY)
    assert figures is not None
    assert (figures.recent, figures.rounds, figures.median) == (110.0, 14, 100.0)
    assert figures.history_seconds == 13 * STEP
    assert figures.spread == pytest.approx(14.826, abs=1e-9)
    assert errors(restored, "load") == no_errors()
    assert errors(store, "save") == no_errors()


def test_the_file_is_versioned_json_and_no_temporary_file_is_left(tmp_path: Path) -> None:
    store = new_store()
    fill(store, KEY, [100.0, 101.0])
    asyncio.run(storage(tmp_path, store).save())
    assert os.listdir(tmp_path) == [FILE_NAME]
    data = json.loads((tmp_path / FILE_NAME).read_text())
    assert data == {
        "version": VERSION,
        "bands": [good_entry(rounds=[[T0, 100.0], [T0 + STEP, 101.0]])],
    }


def test_a_restored_band_keeps_its_file_identity(tmp_path: Path) -> None:
    store = new_store()
    fill(store, KEY, [100.0] * 12)
    asyncio.run(storage(tmp_path, store).save())
    restored = loaded(tmp_path)
    with restored.locked():
        # The same file: the restored band judges the round.
        _, reason = restored.baselines.record(KEY, FILE, NOW, 50.0, confirmation=False, needed=2)
        assert reason == "below_band"
        # Another file under the same name: a new band, nothing to judge by.
        figures, reason = restored.baselines.record(
            KEY, "/models/a.gguf|Q4_0", NOW + 1, 50.0, confirmation=False, needed=2
        )
    assert reason is None
    assert figures.rounds == 1


def test_an_empty_store_saves_a_file_that_restores_nothing(tmp_path: Path) -> None:
    asyncio.run(storage(tmp_path, new_store()).save())
    restored = loaded(tmp_path)
    assert restored.baselines.dump() == []
    assert errors(restored, "load") == no_errors()


def test_a_missing_file_is_no_error(tmp_path: Path) -> None:
    with structlog.testing.capture_logs() as logs:
        store = loaded(tmp_path)
    assert store.baselines.dump() == []
    assert errors(store, "load") == no_errors()
    assert not [e for e in logs if e["event"] == "storage_failed"]


def test_rounds_past_the_window_are_not_restored(tmp_path: Path) -> None:
    write_state(tmp_path, [good_entry(rounds=[[NOW - BAND_WINDOW_SECONDS - 1, 100.0]])])
    store = loaded(tmp_path)
    assert store.baselines.dump() == []
    assert errors(store, "load") == no_errors()


# Files unusable as a whole: nothing restored, one load error per target, a warning


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"{not json", id="not-json"),
        pytest.param(b"", id="empty"),
        pytest.param(b'{"version": 1, "bands": [', id="truncated"),
        pytest.param(b"\xff\xfe{}", id="not-utf8"),
        pytest.param(b'{"version": 2, "bands": []}', id="another-version"),
        pytest.param(b'{"bands": []}', id="no-version"),
        pytest.param(b'[{"version": 1, "bands": []}]', id="not-a-dict"),
        pytest.param(b'"version 1"', id="a-string"),
        pytest.param(b'{"version": 1, "bands": {"a": []}}', id="bands-not-a-list"),
        pytest.param(b'{"version": 1}', id="no-bands"),
        pytest.param(b'{"version": "1", "bands": []}', id="version-as-text"),
    ],
)
def test_a_file_that_is_not_a_state_file_counts_a_load_error(
    tmp_path: Path, content: bytes
) -> None:
    (tmp_path / FILE_NAME).write_bytes(content)
    with structlog.testing.capture_logs() as logs:
        store = loaded(tmp_path)
    assert store.baselines.dump() == []
    assert errors(store, "load") == one_error()
    assert errors(store, "save") == no_errors()
    failed = [e for e in logs if e["event"] == "storage_failed"]
    assert len(failed) == 1
    assert failed[0]["log_level"] == "warning"
    assert failed[0]["operation"] == "load"
    assert failed[0]["path"] == str(tmp_path / FILE_NAME)


def test_deeply_nested_json_counts_a_load_error_and_does_not_raise(tmp_path: Path) -> None:
    # Well under the size limit, yet past the JSON parser's recursion limit.
    (tmp_path / FILE_NAME).write_text("[" * 200_000 + "]" * 200_000)
    store = loaded(tmp_path)
    assert store.baselines.dump() == []
    assert errors(store, "load") == one_error()


def test_a_directory_at_the_path_counts_a_load_error(tmp_path: Path) -> None:
    (tmp_path / FILE_NAME).mkdir()
    store = loaded(tmp_path)
    assert store.baselines.dump() == []
    assert errors(store, "load") == one_error()


def test_a_fifo_at_the_path_counts_a_load_error_without_blocking(tmp_path: Path) -> None:
    # Opened plainly, a FIFO with no writer would block the read for good.
    os.mkfifo(tmp_path / FILE_NAME)
    store = loaded(tmp_path)
    assert store.baselines.dump() == []
    assert errors(store, "load") == one_error()


def test_a_file_over_the_size_limit_counts_a_load_error(tmp_path: Path) -> None:
    # Valid JSON, padded past the limit: the size alone refuses it.
    text = json.dumps({"version": VERSION, "bands": [good_entry()]})
    (tmp_path / FILE_NAME).write_text(text + " " * (MAX_FILE_BYTES + 1 - len(text)))
    store = loaded(tmp_path)
    assert store.baselines.dump() == []
    assert errors(store, "load") == one_error()


def test_a_file_of_exactly_the_size_limit_is_read(tmp_path: Path) -> None:
    text = json.dumps({"version": VERSION, "bands": [good_entry()]})
    (tmp_path / FILE_NAME).write_text(text + " " * (MAX_FILE_BYTES - len(text)))
    store = loaded(tmp_path)
    assert store.baselines.figures(KEY) is not None
    assert errors(store, "load") == no_errors()


def test_a_read_that_cannot_start_counts_a_load_error_and_returns(tmp_path: Path) -> None:
    # The slot's previous call is still blocked (a hung mount): the load is refused at once.
    write_state(tmp_path, [good_entry()])
    store = new_store()
    slot = BlockingSlot()
    gate = threading.Event()

    async def main() -> None:
        hung = asyncio.ensure_future(slot.run(gate.wait, name="hung"))
        await asyncio.sleep(0)  # lets the hung call start its thread
        assert slot.outstanding
        try:
            await BandStorage(tmp_path, store, TARGETS, slot=slot).load(NOW)
            await BandStorage(tmp_path, store, TARGETS, slot=slot).save()
        finally:
            gate.set()
            await hung

    asyncio.run(main())
    assert store.baselines.dump() == []
    assert errors(store, "load") == one_error()
    assert errors(store, "save") == one_error()


# Entries: each bad one is dropped, the good ones restored, and no error counted


def nan_round(entry: dict[str, Any]) -> None:
    entry["rounds"][3] = [T0 + 3 * STEP, math.nan]


def set_round(index: int, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(entry: dict[str, Any]) -> None:
        entry["rounds"][index] = value

    return change


def set_key(name: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(entry: dict[str, Any]) -> None:
        entry[name] = value

    return change


def drop_key(name: str) -> Callable[[dict[str, Any]], None]:
    def change(entry: dict[str, Any]) -> None:
        del entry[name]

    return change


BAD_ENTRIES = [
    pytest.param(set_key("target", "c"), id="unknown-target"),
    pytest.param(set_key("target", ["a"]), id="target-not-text"),
    pytest.param(set_key("model", 5), id="model-not-text"),
    pytest.param(set_key("model", "m" * (MAX_NAME_CHARS + 1)), id="huge-model"),
    pytest.param(set_key("file", "f" * (MAX_NAME_CHARS - 6)), id="huge-name-and-file"),
    pytest.param(set_key("file", None), id="file-null"),
    pytest.param(set_key("ctx", "4096"), id="ctx-text"),
    pytest.param(set_key("ctx", -1), id="ctx-negative"),
    pytest.param(set_key("ctx", True), id="ctx-bool"),
    pytest.param(set_key("ctx", 1 << 32), id="ctx-huge"),
    pytest.param(set_key("ctx", 4096.0), id="ctx-float"),
    pytest.param(set_key("depth", None), id="depth-null"),
    pytest.param(set_key("probe", "decode"), id="unknown-probe"),
    pytest.param(drop_key("probe"), id="no-probe"),
    pytest.param(set_key("rounds", {"0": [T0, 100.0]}), id="rounds-not-a-list"),
    pytest.param(
        set_key("rounds", [[T0 + i, 100.0] for i in range(MAX_BAND_ROUNDS + 1)]),
        id="too-many-rounds",
    ),
    pytest.param(nan_round, id="nan-speed"),
    pytest.param(set_round(3, [T0, math.inf]), id="infinite-speed"),
    pytest.param(set_round(3, [T0, -100.0]), id="negative-speed"),
    pytest.param(set_round(3, [T0, 0]), id="zero-speed"),
    pytest.param(set_round(3, [-T0, 100.0]), id="negative-time"),
    pytest.param(set_round(3, [T0, True]), id="bool-speed"),
    pytest.param(set_round(3, ["1700000000", 100.0]), id="time-as-text"),
    pytest.param(set_round(3, [T0]), id="round-of-one"),
    pytest.param(set_round(3, [T0, 100.0, 1.0]), id="round-of-three"),
    pytest.param(set_round(3, {"at": T0, "tps": 100.0}), id="round-not-a-list"),
    pytest.param(set_round(3, [T0, 10**400]), id="speed-past-float"),
]


@pytest.mark.parametrize("spoil", BAD_ENTRIES)
def test_a_bad_entry_is_dropped_and_the_good_ones_restored(
    tmp_path: Path, spoil: Callable[[dict[str, Any]], None]
) -> None:
    bad = good_entry()
    spoil(bad)
    good = good_entry(target="b", model="model-b", probe="prompt")
    write_state(tmp_path, [bad, good])
    store = loaded(tmp_path)
    assert store.baselines.figures(SeriesKey("a", "model-a", 4096, 0, "generation")) is None
    restored = store.baselines.figures(SeriesKey("b", "model-b", 4096, 0, "prompt"))
    assert restored is not None
    assert (restored.rounds, restored.median) == (12, 100.0)
    assert errors(store, "load") == no_errors()


@pytest.mark.parametrize("entry", [None, "a", 5, [], [good_entry()]])
def test_an_entry_that_is_not_a_mapping_is_dropped(tmp_path: Path, entry: Any) -> None:
    write_state(tmp_path, [entry, good_entry()])
    store = loaded(tmp_path)
    assert len(store.baselines.dump()) == 1
    assert errors(store, "load") == no_errors()


def test_the_largest_names_and_integer_rounds_are_accepted(tmp_path: Path) -> None:
    # At the limits, and with whole numbers where save writes floats: still what save means.
    entry = good_entry(
        model="m" * (MAX_NAME_CHARS // 2),
        file="f" * (MAX_NAME_CHARS // 2),
        ctx=(1 << 32) - 1,
        rounds=[[int(T0) + i, 100] for i in range(MAX_BAND_ROUNDS)],
    )
    write_state(tmp_path, [entry])
    store = loaded(tmp_path)
    key = SeriesKey("a", "m" * (MAX_NAME_CHARS // 2), (1 << 32) - 1, 0, "generation")
    figures = store.baselines.figures(key)
    assert figures is not None
    assert (figures.rounds, figures.median) == (MAX_BAND_ROUNDS, 100.0)


# Saving


def test_a_save_to_a_directory_that_is_gone_counts_a_save_error(tmp_path: Path) -> None:
    directory = tmp_path / "state"
    directory.mkdir()
    store = new_store()
    fill(store, KEY, [100.0])
    saver = storage(directory, store)
    directory.rmdir()
    with structlog.testing.capture_logs() as logs:
        asyncio.run(saver.save())  # must not raise
    assert errors(store, "save") == one_error()
    assert errors(store, "load") == no_errors()
    assert [e["operation"] for e in logs if e["event"] == "storage_failed"] == ["save"]


def test_a_failed_write_leaves_the_previous_file_whole(tmp_path: Path) -> None:
    store = new_store()
    fill(store, KEY, [100.0] * 12)
    saver = storage(tmp_path, store)
    asyncio.run(saver.save())
    before = (tmp_path / FILE_NAME).read_bytes()
    # The temporary name taken by a directory: the write to it fails before any rename.
    (tmp_path / f".{FILE_NAME}.tmp").mkdir()
    fill(store, OTHER, [5.0])
    asyncio.run(saver.save())
    assert errors(store, "save") == one_error()
    assert (tmp_path / FILE_NAME).read_bytes() == before
    assert loaded(tmp_path).baselines.figures(OTHER) is None
    # Once the name is free again, the next save writes the whole state.
    (tmp_path / f".{FILE_NAME}.tmp").rmdir()
    asyncio.run(saver.save())
    assert loaded(tmp_path).baselines.figures(OTHER) is not None
    assert errors(store, "save") == one_error()


def test_each_save_replaces_the_whole_file(tmp_path: Path) -> None:
    store = new_store()
    fill(store, KEY, [100.0])
    saver = storage(tmp_path, store)
    asyncio.run(saver.save())
    fill(store, OTHER, [5.0])
    asyncio.run(saver.save())
    restored = loaded(tmp_path)
    assert restored.baselines.figures(KEY) is not None
    assert restored.baselines.figures(OTHER) is not None
    assert sorted(os.listdir(tmp_path)) == [FILE_NAME]
