"""Discovery reads the served model's header on a daemon thread, with a deadline, one read at a
time per target, from where the server's process says the file is."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from exporter.config import Config, Target
from exporter.daemon import Daemon
from exporter.host.blocking import BlockingSlot
from exporter.host.targets import TargetProcesses
from exporter.kv.facts import MODEL_INVALID, FactsError, KvOverrides
from exporter.state.store import TargetState
from testbed.tiny_model import write_tiny_model
from tests.fakes import FakeLlama

# Generous against a loaded 2-core machine: these check that discovery ends, not how fast.
PROMPT_S = 10.0
PID = 4242


@contextmanager
def daemon_for(target: Target, fake: FakeLlama) -> Iterator[Daemon]:
    """A daemon whose discovery the test drives itself: no scheduler, no timing."""
    config = Config((target,), "127.0.0.1:0", "/metrics", "console", "warning", gpu=False)
    daemon = Daemon(config, transport_factory=lambda t: fake.transport())
    try:
        yield daemon
    finally:
        daemon.web.start()  # close() waits for a serve loop, so there must be one
        daemon.web.close()


def discover(daemon: Daemon, times: int = 1) -> TargetState:
    async def main() -> None:
        for _ in range(times):
            await asyncio.wait_for(daemon.discover("t"), PROMPT_S)

    asyncio.run(main())
    (state,) = daemon.store.snapshot()
    return state


def readers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "model-read:t"]


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero", "/dev/null"])
def test_a_model_path_that_is_no_file_ends_discovery_at_once(tmp_path: Path, kind: str) -> None:
    path = Path(kind)
    if kind == "fifo":
        path = tmp_path / "model.gguf"
        os.mkfifo(path)
    elif not path.exists():
        pytest.skip(f"no {kind} here")
    fake = FakeLlama(model_path=str(path))
    with daemon_for(Target("t", "http://llama"), fake) as daemon:
        state = discover(daemon)
    assert state.up and state.model_facts is None
    assert state.kv_errors == {"model_unreadable": 1}
    # Its read answered, so its thread ends: nothing is left for the exit to wait on.
    for reader in readers():
        reader.join(PROMPT_S)
        assert not reader.is_alive()


def test_a_config_override_naming_a_fifo_is_refused_the_same_way(tmp_path: Path) -> None:
    fifo = tmp_path / "override.gguf"
    os.mkfifo(fifo)
    target = Target("t", "http://llama", kv=KvOverrides(model_path=fifo))
    with daemon_for(target, FakeLlama()) as daemon:
        assert discover(daemon).kv_errors == {"model_unreadable": 1}


def test_a_hung_read_meets_its_deadline_and_is_not_repeated_while_hung(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    release = threading.Event()
    calls: list[int] = []

    def hung_model_facts(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        release.wait()  # a read on a mount that does not answer
        raise FactsError(MODEL_INVALID, "the file, once it answered")

    monkeypatch.setattr("exporter.kv.reads.model_facts", hung_model_facts)
    try:
        with daemon_for(Target("t", "http://llama"), FakeLlama()) as daemon:
            daemon._runtimes["t"].model_reads = BlockingSlot(deadline=0.2)
            started = time.monotonic()
            state = discover(daemon)
            assert time.monotonic() - started < PROMPT_S
            assert state.up and state.kv_errors == {"model_unreadable": 1}
            (reader,) = readers()
            assert reader.daemon

            # Still hung: each discovery reports it, none starts another read.
            state = discover(daemon, times=2)
            assert state.kv_errors == {"model_unreadable": 3} and len(calls) == 1

            release.set()
            reader.join(PROMPT_S)
            assert not reader.is_alive()
            # Free again, the next discovery reads the file again and gets its answer.
            state = discover(daemon)
            assert len(calls) == 2
            assert state.kv_errors == {"model_unreadable": 3, "model_invalid": 1}
    finally:
        release.set()


def fake_proc(root: Path, cwd: Path) -> None:
    d = root / str(PID)
    d.mkdir(parents=True)
    (d / "cmdline").write_bytes(b"llama-server\0-m\0models/m.gguf\0-c\0" + b"4096\0")
    (d / "environ").write_bytes(b"")
    (d / "cwd").symlink_to(cwd)


def test_a_relative_model_path_is_read_from_the_servers_directory(tmp_path: Path) -> None:
    srv = tmp_path / "srv"
    (srv / "models").mkdir(parents=True)
    write_tiny_model(srv / "models" / "m.gguf")
    fake_proc(tmp_path / "proc", srv)
    pid_file = tmp_path / "llama.pid"
    pid_file.write_text(f"{PID}\n")
    target = Target("t", "http://llama", pid_file=pid_file)
    fake = FakeLlama(model_path="models/m.gguf")
    with daemon_for(target, fake) as daemon:
        daemon._processes = TargetProcesses([target], proc_root=tmp_path / "proc")
        state = discover(daemon)
    assert state.kv_errors == {}
    assert state.model_facts is not None and state.model_facts.capacity is not None


def test_without_the_process_a_relative_path_is_taken_as_it_stands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "models").mkdir()
    write_tiny_model(tmp_path / "models" / "m.gguf")
    monkeypatch.chdir(tmp_path)  # where the exporter runs: today's reading of the path
    fake = FakeLlama(model_path="models/m.gguf")
    with daemon_for(Target("t", "http://llama"), fake) as daemon:
        daemon._processes = TargetProcesses([], proc_root=tmp_path / "no-proc")
        state = discover(daemon)
    assert state.kv_errors == {} and state.model_facts is not None
    assert state.model_facts.capacity is None  # no process: the cache layout is unknown
