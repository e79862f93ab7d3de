"""Files a server names: opened only when regular, never blocking; their content kept out of
messages; a relative model path found from the server's working directory."""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from exporter.host.files import NotRegularFileError, open_regular
from exporter.host.proc import read_cwd, read_pid_file
from exporter.kv.cache import KvCacheError, KvGeometry
from exporter.kv.facts import FactsError, KvOverrides, model_facts, served_model_path
from exporter.kv.gguf_meta import ModelFileError, read_model_meta, shown_name, shown_value
from exporter.llama.discovery import ServerInfo
from testbed.tiny_model import write_tiny_model
from tests.model_meta import meta_of

T = TypeVar("T")

# Long enough for a loaded 2-core machine; a call that blocks on a FIFO never returns at all.
PROMPT_S = 10.0
# What a crafted file might try to write into the exporter's log.
HOSTILE = "\x1b[2J\x1b[31mEVIL\nlevel=error event=forged"


def within(seconds: float, call: Callable[[], T]) -> T:
    """`call()`'s result, or a failure if it has not returned in `seconds`. It runs on a
    daemon thread, so a call that blocks for good fails the test instead of hanging it."""
    outcome: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still blocked after {seconds} s"
    if errors:
        raise errors[0]
    return outcome[0]


def info(model_path: str | Path) -> ServerInfo:
    return ServerInfo(
        model="m", model_path=str(model_path), ctx=4096, slots=4,
        quant="all F32", build="b0", n_vocab=314, n_params=1, size_bytes=1, n_ctx_train=8192,
        slots_endpoint=True, metrics_endpoint=False,
    )  # fmt: skip


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "model.gguf"
    os.mkfifo(path)
    return path


# --- opening -----------------------------------------------------------------------------------


def test_a_regular_file_opens(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"GGUF")
    with open_regular(path) as f:
        assert f.read() == b"GGUF"


@pytest.mark.parametrize(
    ("where", "kind"),
    [("fifo", "a FIFO"), ("/dev/zero", "a character device"), ("/dev/null", "a character device"),
     ("dir", "a directory")],
)  # fmt: skip
def test_anything_but_a_regular_file_is_refused_at_once(
    fifo: Path, tmp_path: Path, where: str, kind: str
) -> None:
    path = {"fifo": fifo, "dir": tmp_path}.get(where, Path(where))
    if not path.exists():
        pytest.skip(f"no {path} here")
    with pytest.raises(NotRegularFileError) as err:
        within(PROMPT_S, lambda: open_regular(path))
    assert err.value.kind == kind


def test_a_fifo_model_is_unreadable_without_waiting_for_a_writer(fifo: Path) -> None:
    with pytest.raises(ModelFileError, match="is a FIFO, not a GGUF file") as err:
        within(PROMPT_S, lambda: read_model_meta(fifo))
    assert err.value.unreadable
    with pytest.raises(FactsError) as facts_err:
        within(PROMPT_S, lambda: model_facts(info(fifo), KvOverrides(), None, None))
    assert facts_err.value.reason == "model_unreadable"


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/null"])
def test_a_device_model_is_unreadable(device: str) -> None:
    if not Path(device).exists():
        pytest.skip(f"no {device} here")
    with pytest.raises(FactsError) as err:
        within(PROMPT_S, lambda: model_facts(info(device), KvOverrides(), None, None))
    assert err.value.reason == "model_unreadable"
    assert "character device" in err.value.detail


def test_the_config_override_is_opened_the_same_way(fifo: Path, tmp_path: Path) -> None:
    overrides = KvOverrides(model_path=fifo)
    with pytest.raises(FactsError) as err:
        within(PROMPT_S, lambda: model_facts(info(tmp_path / "x"), overrides, None, None))
    assert err.value.reason == "model_unreadable"


def test_a_missing_file_is_unreadable_and_garbage_invalid(tmp_path: Path) -> None:
    with pytest.raises(FactsError) as err:
        model_facts(info(tmp_path / "missing.gguf"), KvOverrides(), None, None)
    assert err.value.reason == "model_unreadable"
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a model at all" * 10)
    with pytest.raises(FactsError) as err:
        model_facts(info(bad), KvOverrides(), None, None)
    assert err.value.reason == "model_invalid"


def test_a_fifo_pid_file_is_unreadable_at_once(fifo: Path, tmp_path: Path) -> None:
    found = within(PROMPT_S, lambda: read_pid_file(fifo, proc_root=tmp_path))
    assert found.reason == "pid_file_unreadable"


# --- what reaches a message --------------------------------------------------------------------


def _str(s: str) -> bytes:
    raw = s.encode()
    return struct.pack("<Q", len(raw)) + raw


def _gguf(kvs: list[tuple[str, int, bytes]], tensors: bytes = b"", n_tensors: int = 0) -> bytes:
    out = b"GGUF" + struct.pack("<IQQ", 3, n_tensors, len(kvs))
    for key, vtype, payload in kvs:
        out += _str(key) + struct.pack("<I", vtype) + payload
    return out + tensors + b"\0" * 256


def _message_of(path: Path) -> str:
    with pytest.raises(ModelFileError) as err:
        read_model_meta(path)
    return str(err.value)


def test_the_bytes_of_a_bad_magic_stay_out_of_the_message(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(HOSTILE.encode() + b"\0" * 64)
    message = _message_of(path)
    assert "does not start with the GGUF magic" in message
    assert "EVIL" not in message and "\x1b" not in message


def test_names_from_the_file_appear_only_when_plain(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    arch = ("general.architecture", 8, _str("llama"))
    # A duplicate key, an unsupported array type, a bad tensor: each message names the thing.
    cases = [
        _gguf([arch, (HOSTILE, 8, _str("x")), (HOSTILE, 8, _str("x"))]),
        _gguf([arch, (HOSTILE, 9, struct.pack("<IQ", 9, 1))]),
        _gguf([arch], _str(HOSTILE) + struct.pack("<I", 5), n_tensors=1),
        _gguf([arch], _str(HOSTILE) + struct.pack("<IQIQ", 1, 4, 4, 0), n_tensors=1),
    ]
    for content in cases:
        path.write_bytes(content)
        message = _message_of(path)
        assert f"<a {len(HOSTILE)}-character name>" in message
        assert "EVIL" not in message and "\x1b" not in message and "\n" not in message
    path.write_bytes(_gguf([arch, ("llama.x", 8, _str("a")), ("llama.x", 8, _str("a"))]))
    assert "duplicate key 'llama.x'" in _message_of(path)


@pytest.mark.parametrize("arch", [HOSTILE, "a" * 65, "llama 3", ""])
def test_an_architecture_that_is_not_a_plain_name_is_refused(tmp_path: Path, arch: str) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(_gguf([("general.architecture", 8, _str(arch))]))
    message = _message_of(path)
    assert arch == "" or arch not in message
    with pytest.raises(FactsError) as err:
        model_facts(info(path), KvOverrides(), None, None)
    assert err.value.reason == "model_invalid"


def test_metadata_values_are_described_not_quoted() -> None:
    with pytest.raises(KvCacheError) as err:
        KvGeometry.from_meta(meta_of({"general.architecture": "llama",
                                      "llama.block_count": HOSTILE}))  # fmt: skip
    assert "EVIL" not in str(err.value)
    assert f"is a {len(HOSTILE)}-character string, not an integer" in str(err.value)
    assert shown_value(("x",) * 150_000) == "an array of 150000"
    assert shown_value(7) == "7"
    assert shown_name("blk.0.attn_q.weight") == "'blk.0.attn_q.weight'"
    assert shown_name("gpt-oss") == "'gpt-oss'"


# --- a relative model path ---------------------------------------------------------------------


def fake_process(proc: Path, pid: int, cwd: Path) -> None:
    d = proc / str(pid)
    d.mkdir(parents=True)
    (d / "cmdline").write_bytes(b"llama-server\0-m\0models/m.gguf\0")
    (d / "environ").write_bytes(b"")
    (d / "cwd").symlink_to(cwd)


def test_read_cwd_follows_the_link_of_a_fake_proc_tree(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    fake_process(proc, 4242, tmp_path / "srv")
    assert read_cwd(4242, proc_root=proc) == tmp_path / "srv"
    assert read_cwd(4243, proc_root=proc) is None  # gone
    (proc / "77").mkdir()
    (proc / "77" / "cwd").symlink_to("relative/target")
    assert read_cwd(77, proc_root=proc) is None  # not what the kernel writes


def test_read_cwd_of_this_process() -> None:
    if not Path("/proc/self/cwd").exists():
        pytest.skip("no Linux /proc here")
    assert read_cwd(os.getpid()) == Path.cwd()


def test_a_relative_model_path_is_the_servers_not_ours(tmp_path: Path) -> None:
    srv = tmp_path / "srv"
    (srv / "models").mkdir(parents=True)
    model = write_tiny_model(srv / "models" / "m.gguf")
    assert served_model_path("models/m.gguf", srv) == model
    assert served_model_path(str(model), tmp_path / "elsewhere") == model
    # Without the server's directory (its process is not visible), today's reading stands.
    assert served_model_path("models/m.gguf", None) == Path("models/m.gguf")
    facts = model_facts(info("models/m.gguf"), KvOverrides(), None, None, server_cwd=srv)
    assert facts.bytes_per_token > 0
