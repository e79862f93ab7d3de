"""Open a file that another program named (llama-server's model path, a pid file) for reading,
only when it is a regular file.

A path from elsewhere may name a FIFO (open blocks until a writer comes), a terminal (open
would make it our controlling terminal), or a device (/dev/zero reads for ever). Opening with
O_NONBLOCK returns at once for all of them, and fstat of the opened descriptor says what was
opened: a stat of the path before the open could describe another file than the one opened,
if the path is swapped in between.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO, Final

_FLAGS: Final = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC

# st_mode file types, as `is <kind>, not a regular file` says them.
_KINDS: Final = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


class NotRegularFileError(OSError):
    """The path opened, but names something other than a regular file."""

    def __init__(self, path: Path, kind: str) -> None:
        super().__init__(f"{path} is {kind}, not a regular file")
        self.path = path
        self.kind = kind


def open_regular(path: Path) -> BinaryIO:
    """`path` opened for binary reading; NotRegularFileError, or the OSError of the open.

    Never blocks on the file's type; a hung mount can still block open() or read() in the
    kernel, so callers that must not hang run this on `exporter.host.blocking`'s threads.
    """
    fd = os.open(path, _FLAGS)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((k for test, k in _KINDS if test(mode)), "something else")
            raise NotRegularFileError(path, kind)
        # O_NONBLOCK was for the open alone. Cleared, reads of the regular file behave as
        # ever: a buffered read never returns None for "try again".
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
