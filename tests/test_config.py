"""Layering of flags, environment and config file, and one readable line per bad config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from exporter.cli import main, parse
from exporter.config import ConfigError
from exporter.config.resolved import config_from_json, config_to_json
from exporter.config.settings import DEFAULT_LISTEN_ADDRESS


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("LLAMA_SPEED_"):
            monkeypatch.delenv(name)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_probe_llama_servers_default_address() -> None:
    _, config = parse([])
    assert [t.url for t in config.targets] == ["http://127.0.0.1:8080"]
    assert config.targets[0].name == "127.0.0.1:8080"
    assert config.listen_address == DEFAULT_LISTEN_ADDRESS
    plan, schedule = config.targets[0].plan, config.targets[0].schedule
    assert (plan.prompt_tokens, plan.generation_tokens, plan.depths) == (512, 128, (0,))
    assert schedule.duty_budget == 0.03


def test_flag_beats_env_beats_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write(
        tmp_path,
        "c.yaml",
        "probe:\n  interval: 900\n  prompt_tokens: 64\n  generation_tokens: 16\n"
        "web:\n  listen_address: ':1111'\n",
    )
    monkeypatch.setenv("LLAMA_SPEED_PROBE_INTERVAL", "700")
    monkeypatch.setenv("LLAMA_SPEED_PROBE_PROMPT_TOKENS", "32")
    monkeypatch.setenv("LLAMA_SPEED_WEB_LISTEN_ADDRESS", ":2222")
    _, config = parse(["--config.file", str(cfg), "--probe.interval", "500"])
    plan = config.targets[0].plan
    assert config.targets[0].schedule.interval == 500  # flag
    assert plan.prompt_tokens == 32  # env over file
    assert plan.generation_tokens == 16  # file
    assert config.listen_address == ":2222"


def test_toml_file_with_targets_and_per_target_plan(tmp_path: Path) -> None:
    key = write(tmp_path, "key", "# llama-server key file\nsecret-key\n")
    cfg = write(
        tmp_path,
        "c.toml",
        f"""
[probe]
depths = [0, 2048]

[[targets]]
name = "prod"
url = "http://10.0.0.5:8080/"
api_key_file = "{key}"

[targets.probe]
repetitions = 3
depths = [4096, 0]

[[targets]]
url = "https://gpu-box:8443"
""",
    )
    _, config = parse(["--config.file", str(cfg)])
    prod, other = config.targets
    assert (prod.name, prod.url) == ("prod", "http://10.0.0.5:8080")
    assert prod.api_key is not None and prod.api_key.get_secret_value() == "secret-key"
    assert prod.plan.depths == (0, 4096) and prod.plan.repetitions == 3
    assert other.name == "gpu-box:8443" and other.plan.depths == (0, 2048)
    assert other.api_key is None


def test_target_flag_replaces_file_targets(tmp_path: Path) -> None:
    cfg = write(tmp_path, "c.yaml", "targets:\n  - url: http://a:1\n")
    _, config = parse(
        ["--config.file", str(cfg), "--target", "http://b:2", "--target", "http://c:3"]
    )
    assert [t.url for t in config.targets] == ["http://b:2", "http://c:3"]


def test_env_lists_accept_commas(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMA_SPEED_TARGET", "http://a:1, http://b:2")
    monkeypatch.setenv("LLAMA_SPEED_PROBE_DEPTHS", "0,4096")
    _, config = parse([])
    assert [t.url for t in config.targets] == ["http://a:1", "http://b:2"]
    assert config.targets[0].plan.depths == (0, 4096)


def test_api_key_from_env_var_never_shows_in_repr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MY_LLAMA_KEY", "hunter2")
    cfg = write(
        tmp_path, "c.yaml", "targets:\n  - url: http://a:1\n    api_key_env: MY_LLAMA_KEY\n"
    )
    _, config = parse(["--config.file", str(cfg)])
    assert config.targets[0].api_key is not None
    assert config.targets[0].api_key.get_secret_value() == "hunter2"
    assert "hunter2" not in repr(config)


BAD_CONFIGS = [
    ("targets:\n  - url: http://a:1\n    bogus: 1\n", "targets.0.bogus: unknown key"),
    ("nonsense_key: 3\n", "nonsense_key: unknown key"),
    ("targets:\n  - url: ftp://a\n", "targets.0.url: 'ftp://a' is not an http:// or https://"),
    ("targets:\n  - url: 'http://a:99999'\n", "targets.0.url: 'http://a:99999' has an invalid"),
    ("targets:\n  - name: x\n", "targets.0.url: required key is missing"),
    (
        "probe:\n  interval: 30\n  timeout: 60\n",
        "probe.interval: 30 s must be longer than the probe timeout plus jitter (60 s + 10 s)",
    ),
    (
        "targets:\n  - url: http://a:1\n    probe:\n      interval: 10\n",
        "targets.0.probe.interval: 10 s must be longer than the probe timeout plus jitter "
        "(120 s + 10 s)",
    ),
    ("probe:\n  depths: [0, -5]\n", "probe.depths.1: Input should be greater than or equal to 0"),
    ("probe:\n  prompt_tokens: lots\n", "probe.prompt_tokens: Input should be a valid integer"),
    ("probe:\n  duty_budget: 2\n", "probe.duty_budget: Input should be less than or equal to 1"),
    (
        "targets:\n  - url: http://a:1\n  - url: http://a:1\n",
        "targets.1.name: duplicate target name 'a:1'",
    ),
    (
        "targets:\n  - url: http://a:1\n    api_key: k\n    api_key_env: E\n",
        "targets.0: set only one of api_key, api_key_env",
    ),
    (
        "targets:\n  - url: http://a:1\n    api_key_file: /nonexistent/key\n",
        "targets.0.api_key_file: cannot read /nonexistent/key",
    ),
    (
        "targets:\n  - url: http://a:1\n    api_key_env: UNSET_VAR_FOR_TEST\n",
        "targets.0.api_key_env: environment variable UNSET_VAR_FOR_TEST is unset",
    ),
    ("web:\n  listen_address: nowhere\n", "web.listen_address: 'nowhere' is not HOST:PORT"),
    (
        "targets:\n  - url: http://a:1\n    api_key: 'cl\u00e9'\n",
        "targets.0.api_key: the API key must be printable ASCII",
    ),
    (
        "targets:\n  - url: http://a:1\n    proxy: socks://p:1\n",
        "targets.0.proxy: 'socks://p:1' is not an http:// or https://",
    ),
    ("probe:\n  max_response_bytes: 10\n", "probe.max_response_bytes: Input should be greater"),
    ("probe:\n  discovery_timeout: .inf\n", "probe.discovery_timeout: Input should be a finite"),
    (
        "targets:\n  - url: 'http://h\u00f6st:1'\n",
        "targets.0.url: must be a URL of printable ASCII",
    ),
    ("log:\n  format: xml\n", "log.format: Input should be 'json' or 'console'"),
    ("targets: [\n", "config: "),
    ("- just\n- a list\n", "config: "),
]


@pytest.mark.parametrize(("text", "message"), BAD_CONFIGS)
def test_bad_config_names_key_and_problem(tmp_path: Path, text: str, message: str) -> None:
    cfg = write(tmp_path, "bad.yaml", text)
    with pytest.raises(ConfigError) as info:
        parse(["--config.file", str(cfg)])
    assert str(info.value).startswith(message.split(": Value error, ", maxsplit=1)[0])
    assert message.replace("Value error, ", "") in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_flag_value_is_reported_like_a_bad_file() -> None:
    with pytest.raises(ConfigError, match=r"^probe\.interval: Input should be a valid number"):
        parse(["--probe.interval", "soon"])


def test_missing_config_file() -> None:
    with pytest.raises(ConfigError, match=r"^config: cannot read /no/such/file\.yaml"):
        parse(["--config.file", "/no/such/file.yaml"])


def test_main_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write(tmp_path, "bad.yaml", "probe:\n  interval: 5\n")
    assert main(["--config.file", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err == (
        "llama-speed-exporter: config error: probe.interval: "
        "5 s must be longer than the probe timeout plus jitter (120 s + 10 s)\n"
    )


def test_console_script_bad_config_has_no_traceback(tmp_path: Path) -> None:
    cfg = write(tmp_path, "bad.toml", "[probe]\nslot = -1\n")
    done = subprocess.run(
        [sys.executable, "-m", "exporter", "run", "--config.file", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("llama-speed-exporter: config error: probe.slot: ")
    assert "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1


def test_a_non_ascii_key_file_is_one_line_naming_the_key(tmp_path: Path) -> None:
    key = write(tmp_path, "key", "cl\u00e9-secr\u00e8te\n")
    with pytest.raises(ConfigError) as info:
        parse(["--target", "http://a:1", "--api-key-file", str(key)])
    assert str(info.value).startswith("api_key_file: the API key must be printable ASCII")
    assert "secr" not in str(info.value)


def test_request_limits_and_proxy_reach_the_target(tmp_path: Path) -> None:
    cfg = write(
        tmp_path,
        "c.yaml",
        "probe:\n  discovery_timeout: 3\ntargets:\n"
        "  - url: http://a:1\n    proxy: http://proxy:3128\n"
        "    probe:\n      max_response_bytes: 100000\n",
    )
    _, config = parse(["--config.file", str(cfg)])
    (target,) = config.targets
    assert target.limits.discovery_timeout == 3
    assert target.limits.max_response_bytes == 100000
    assert target.proxy == "http://proxy:3128"


def test_config_check_shows_no_password_of_a_url(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--target", "http://user:hunter2@a:1", "--config.check"]) == 0
    out = capsys.readouterr().out
    assert "hunter2" not in out and "http://user:***@a:1" in out


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "--api-key", "s3cr3t-value"],
        ["--api-key=s3cr3t-value"],
        ["probe", "--target", "http://a:1", "--hf-token", "s3cr3t-value"],
    ],
)
def test_an_unknown_secret_flag_is_refused_without_echoing_its_value(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments" in err and "s3cr3t-value" not in err


def test_the_handed_over_configuration_is_the_resolved_one(tmp_path: Path) -> None:
    cfg = write(
        tmp_path,
        "c.yaml",
        "probe:\n  depths: [0, 4096]\n  discovery_timeout: 3\n"
        "web:\n  telemetry_path: /m\n  config_file: /etc/web.yml\n"
        "targets:\n  - name: a\n    url: http://a:1\n    api_key: k1\n    proxy: http://p:3\n"
        "    pid_file: /run/a.pid\n    model_path: /models/a.gguf\n    cache_type_k: q8_0\n"
        "    kv_unified: true\n    probe:\n      repetitions: 2\n"
        "  - url: http://b:2\n    process_name: llama-server\n",
    )
    _, config = parse(["--config.file", str(cfg), "--collector.gpu", "false"])
    assert config_from_json(config_to_json(config)) == config
