"""Bench's output files, readable and writable by their owner only.

A command line, a target URL or llama-server's own log may hold a secret that redaction did not
recognise, so every file bench writes is created with mode 0600 (and its output directory
0700): created so, never chmod-ed after the bytes are already there for others to read.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Final

PRIVATE_FILE: Final = 0o600
PRIVATE_DIR: Final = 0o700


def make_private_dir(path: Path) -> None:
    """Create `path` 0700 if it is new; an existing directory is the owner's to keep as it is."""
    path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)


def write_private(path: Path, data: str | bytes) -> None:
    """Replace `path` atomically: an interrupted bench must not leave half a file behind.

    mkstemp creates the temporary file 0600 whatever the umask, and the rename keeps its mode,
    so the new file is private even where an older one was not.
    """
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(payload)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def create_private(path: Path) -> None:
    """An empty file at `path`, 0600, for another writer (llama-server's log) to fill.

    Its writer opens it with truncation, which keeps the mode. An existing file keeps its old
    mode on open, so it is set on the descriptor while the file is still empty.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, PRIVATE_FILE)
    try:
        os.fchmod(fd, PRIVATE_FILE)
    finally:
        os.close(fd)
