"""Bench's output files are its owner's alone (exporter/bench/files.py), whatever the umask.

A permissive umask is set for each test, so that a file that is private only because the
test runner's umask happened to be strict would fail here.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from exporter.bench.files import create_private, make_private_dir, write_private
from tests.test_bench_cli import bench, q2_record
from tests.test_bench_report import seed_record


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.fixture(autouse=True)
def permissive_umask() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_a_written_file_is_private(tmp_path: Path) -> None:
    path = tmp_path / "report.md"
    write_private(path, "# report\n")
    assert path.read_text() == "# report\n"
    assert mode(path) == 0o600


def test_rewriting_a_file_that_others_could_read_makes_it_private(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    path.write_text("old")
    path.chmod(0o644)
    write_private(path, b"new")
    assert path.read_bytes() == b"new"
    assert mode(path) == 0o600
    # Atomic: the temporary file was renamed, not left beside the result.
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "results.json"
    path.write_text("old")

    def fail(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="No space left"):
        write_private(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_a_file_for_another_writer_is_created_private_and_empty(tmp_path: Path) -> None:
    path = tmp_path / "llama-server.log"
    create_private(path)
    assert mode(path) == 0o600
    assert path.read_bytes() == b""
    # A log left by an earlier bench in the same directory: emptied and made private.
    path.write_text("old key")
    path.chmod(0o644)
    create_private(path)
    assert mode(path) == 0o600
    assert path.read_bytes() == b""
    # As the server process opens it: truncating keeps the mode.
    with path.open("wb") as log:
        log.write(b"loading\n")
    assert mode(path) == 0o600


def test_a_log_path_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("not ours to truncate")
    (tmp_path / "link.log").symlink_to(target)
    with pytest.raises(OSError, match="symbolic links"):  # ELOOP: O_NOFOLLOW met a link
        create_private(tmp_path / "link.log")
    assert target.read_text() == "not ours to truncate"


def test_a_new_output_directory_is_private_and_an_existing_one_is_left_as_is(
    tmp_path: Path,
) -> None:
    new = tmp_path / "a" / "bench-1"
    make_private_dir(new)
    assert mode(new) == 0o700
    existing = tmp_path / "shared"
    existing.mkdir(mode=0o755)
    make_private_dir(existing)
    assert mode(existing) == 0o755


def test_a_saved_result_is_private(tmp_path: Path) -> None:
    seed_record().save(tmp_path / "results.json")
    assert mode(tmp_path / "results.json") == 0o600


@pytest.mark.parametrize(
    "args",
    [
        ["report", "a.json", "-o", "out.md"],
        ["compare", "a.json", "b.json", "-o", "out.md"],
        ["compare", "a.json", "b.json", "--format", "json", "-o", "out.md"],
    ],
)
def test_what_report_and_compare_write_is_private(tmp_path: Path, args: list[str]) -> None:
    seed_record().save(tmp_path / "a.json")
    q2_record().save(tmp_path / "b.json")
    done = bench(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert mode(tmp_path / "out.md") == 0o600
