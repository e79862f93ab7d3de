"""Secrets out of command lines, URLs and log lines (exporter/llama/redact.py), by rule.

Each spelling an owner may write is checked on its own: the rule must hide the value whatever
the option's dashes, separators and case, keep everything else as written, and leave the
command's meaning readable (the name stays, only the value becomes ***).
"""

from __future__ import annotations

import shlex

import pytest

from exporter.llama.redact import MASK, is_secret_name, redacted, redacted_text

SECRET = "s3cr3t-VALUE-42"


@pytest.mark.parametrize(
    "option",
    [
        "--api-key",
        "--api_key",
        "--apiKey",
        "--API-KEY",
        "-api-key",
        "--api-key-file",
        "--ssl-key-file",
        "-hft",
        "--hf-token",
        "--hf_token",
        "--auth-token",
        "--password",
        "--db-passwd",
        "--client-secret",
        "--basic-auth",
    ],
)
def test_a_secret_option_given_as_option_then_value_is_hidden(option: str) -> None:
    argv = ["llama-server", "-m", "m.gguf", option, SECRET, "-ngl", "99"]
    assert redacted(argv) == ["llama-server", "-m", "m.gguf", option, MASK, "-ngl", "99"]


@pytest.mark.parametrize(
    "option", ["--api-key", "--api_key", "--apiKey", "-password", "--hf_token", "--auth-token"]
)
def test_a_secret_option_given_with_equals_is_hidden_and_keeps_its_spelling(option: str) -> None:
    argv = ["llama-server", f"{option}={SECRET}", "-c", "4096"]
    assert redacted(argv) == ["llama-server", f"{option}={MASK}", "-c", "4096"]


@pytest.mark.parametrize(
    "option",
    [
        # Counts of tokens, and a switch: the report must keep showing them.
        "--image-max-tokens",
        "--mtmd-batch-max-tokens",
        "--cors-credentials",
        # Nothing secret in these names at all.
        "--keep",
        "-ctk",
        "--cache-type-k",
        "--kv-unified",
        "--ctx-size",
    ],
)
def test_options_that_only_look_alike_are_kept(option: str) -> None:
    argv = ["llama-server", option, "1024", "-m", "m.gguf"]
    assert redacted(argv) == argv
    assert not is_secret_name(option)


def test_the_value_of_a_secret_option_is_hidden_even_when_it_starts_with_a_dash() -> None:
    assert redacted(["llama-server", "--api-key", "-k3y"]) == ["llama-server", "--api-key", MASK]


def test_a_secret_option_at_the_end_has_nothing_to_hide() -> None:
    assert redacted(["llama-server", "--api-key"]) == ["llama-server", "--api-key"]


@pytest.mark.parametrize(
    "argv",
    [
        ["env", f"HF_TOKEN={SECRET}", "llama-server", "-m", "m.gguf"],
        ["env", f"LLAMA_API_KEY={SECRET}", "llama-server"],
        [f"HF_TOKEN={SECRET}", "llama-server"],
        ["env", f"db_password={SECRET}", "x"],
        ["env", f"MyAuthHeader={SECRET}", "x"],
    ],
)
def test_an_assignment_to_a_secret_variable_is_hidden(argv: list[str]) -> None:
    shown = redacted(argv)
    assert SECRET not in " ".join(shown)
    name = next(a for a in argv if SECRET in a).split("=", 1)[0]
    assert f"{name}={MASK}" in shown


def test_other_assignments_are_kept() -> None:
    argv = ["env", "CUDA_VISIBLE_DEVICES=0,1", "GGML_CUDA_NO_PINNED=1", "llama-server"]
    assert redacted(argv) == argv


@pytest.mark.parametrize(
    ("shell", "script"),
    [
        ("sh", f"exec llama-server -m m.gguf --api-key {SECRET} -ngl 99"),
        ("bash", f"llama-server -m m.gguf --api-key={SECRET}"),
        ("sh", f"HF_TOKEN={SECRET} llama-server -hf org/model"),
        ("sh", f"export LLAMA_API_KEY={SECRET}; exec llama-server"),
        ("bash", f"llama-server -hft {SECRET} -m 'my model.gguf' && echo done"),
        # A shell inside a shell.
        ("bash", f"sh -c 'llama-server --hf-token {SECRET}'"),
    ],
)
def test_secrets_inside_a_shell_script_are_hidden(shell: str, script: str) -> None:
    shown = redacted([shell, "-c", script])
    assert shown[:2] == [shell, "-c"]
    assert SECRET not in shown[2]
    assert MASK in shown[2]
    # The script is still one readable command line: what is not secret is still there.
    assert "llama-server" in shown[2]


def test_a_script_is_requoted_so_its_words_stay_apart() -> None:
    shown = redacted(["sh", "-c", f"llama-server -m 'my model.gguf' --api-key {SECRET}"])
    assert shlex.split(shown[2]) == ["llama-server", "-m", "my model.gguf", "--api-key", MASK]


def test_a_script_without_a_secret_keeps_its_own_quoting() -> None:
    script = 'exec "$0" -c 4096 "$@"'
    assert redacted(["sh", "-c", script, "llama-server"]) == ["sh", "-c", script, "llama-server"]


def test_a_script_with_unbalanced_quotes_is_still_redacted() -> None:
    shown = redacted(["sh", "-c", f"llama-server --api-key {SECRET} --alias 'unterminated"])
    assert SECRET not in shown[2]


def test_a_url_password_and_a_secret_query_value_are_hidden() -> None:
    argv = ["llama-server", "--model-url", f"https://user:{SECRET}@host/m.gguf?token={SECRET}&x=1"]
    assert redacted(argv)[2] == f"https://user:{MASK}@host/m.gguf?token={MASK}&x=1"


def test_redacting_twice_changes_nothing_more() -> None:
    argv = ["sh", "-c", f"HF_TOKEN={SECRET} llama-server --api-key {SECRET}", "--password", "x"]
    once = redacted(argv)
    assert redacted(once) == once


# --- free text: log lines and URLs ---


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        (f"main: --api-key {SECRET} given", f"main: --api-key {MASK} given"),
        (f"args: --verbose --api-key {SECRET}", f"args: --verbose --api-key {MASK}"),
        (f"-hft={SECRET} and HF_TOKEN={SECRET}", f"-hft={MASK} and HF_TOKEN={MASK}"),
        (f"--password '{SECRET} with spaces'", f"--password {MASK}"),
        (f"http://admin:{SECRET}@127.0.0.1:8080", f"http://admin:{MASK}@127.0.0.1:8080"),
        (f"http://h/v1?api_key={SECRET}&n=1", f"http://h/v1?api_key={MASK}&n=1"),
        ("llama_kv_cache: CPU KV buffer size = 6.00 MiB", None),
        ("print_info: n_ctx_train = 8192; tokenizer.ggml.add_bos_token=true", None),
    ],
)
def test_free_text(text: str, shown: str | None) -> None:
    assert redacted_text(text) == (text if shown is None else shown)


def test_an_assignment_whose_value_has_spaces_is_hidden_whole() -> None:
    assert redacted(["env", f"PASSWORD={SECRET} more", "x"]) == ["env", f"PASSWORD={MASK}", "x"]
