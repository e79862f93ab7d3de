"""The one reader of llama-server's command line (exporter/llama/argv.py)."""

from __future__ import annotations

import pytest

from exporter.llama.argv import ArgvError, find_options, has_option, without_options
from exporter.llama.redact import redacted

TAKES = {"-c": True, "--ctx-size": True, "--port": True, "-kvu": False}


def test_options_are_found_in_every_spelling_llama_cpp_reads() -> None:
    argv = ["-m", "m.gguf", "--ctx_size", "4096", "-kvu", "--port=9000", "-c", "8192"]
    found = [(o.name, o.value) for o in find_options(argv, TAKES)]
    assert found == [("--ctx-size", "4096"), ("-kvu", None), ("--port", "9000"), ("-c", "8192")]


def test_an_unknown_options_value_is_never_mistaken_for_an_option_asked_about() -> None:
    argv = ["--alias", "c", "-ngl", "99", "--port", "8080"]
    assert [(o.name, o.value) for o in find_options(argv, TAKES)] == [("--port", "8080")]


def test_without_options_drops_each_occurrence_and_its_value() -> None:
    argv = ["llama-server", "-m", "m.gguf", "-c", "4096", "--port=1", "-ngl", "99"]
    assert without_options(argv, TAKES) == ["llama-server", "-m", "m.gguf", "-ngl", "99"]


def test_has_option() -> None:
    assert has_option(["-t", "4"], "-t", "--threads")
    assert has_option(["--threads=4"], "-t", "--threads")
    assert not has_option(["-m", "-t.gguf"], "-t")


def test_a_missing_value_is_an_error() -> None:
    with pytest.raises(ArgvError, match="-c needs a value"):
        list(find_options(["-m", "m.gguf", "-c"], TAKES))


def test_redaction_reads_every_spelling_the_parser_reads() -> None:
    # Hidden in each form find_options accepts; the owner's own spelling is kept (test_redact.py
    # has the rules in full).
    argv = ["env", "HF_TOKEN=t0", "llama-server", "--api_key=k1", "--api-key", "k2", "-m", "m"]
    assert redacted(argv) == [
        "env", "HF_TOKEN=***", "llama-server", "--api_key=***", "--api-key", "***", "-m", "m",
    ]  # fmt: skip
    assert redacted(["llama-server", "--api-key"]) == ["llama-server", "--api-key"]
