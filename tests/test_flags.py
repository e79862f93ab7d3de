"""The command line: Prometheus-style flags from the settings' declarations, the earlier
spellings as deprecated aliases, no abbreviations, and `--config.check`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from exporter.cli import deprecations, main, parse
from exporter.config import ConfigError
from exporter.config.flags import SETTINGS
from exporter.probe.plan import MeasurePlan
from exporter.schedule.plan import Schedule


def test_every_plan_and_schedule_field_has_one_flag_in_the_prometheus_style() -> None:
    flags = {s.flag: s for s in SETTINGS}
    for model in (Schedule, MeasurePlan):
        for name in model.field_names():
            setting = flags[f"--probe.{name.replace('_', '-')}"]
            assert setting.path == ("probe", name)
            assert setting.env == f"LLAMA_SPEED_PROBE_{name.upper()}"
    assert {"--log.format", "--log.level", "--web.config.file", "--collector.gpu"} <= set(flags)
    assert len(flags) == len(SETTINGS)


@pytest.mark.parametrize(
    ("old", "new", "value"),
    [
        ("--probe-interval", "--probe.interval", "500"),
        ("--probe-depths", "--probe.depths", "0,4096"),
        ("--probe-duty-budget", "--probe.duty-budget", "0.5"),
        ("--log-level", "--log.level", "debug"),
    ],
)
def test_an_earlier_spelling_sets_the_same_value_and_is_warned_about(
    old: str, new: str, value: str
) -> None:
    _, by_new = parse([new, value])
    args, by_old = parse([old, value])
    assert by_old == by_new
    assert deprecations(args) == [(old, new)]


def test_the_warning_is_one_log_line_naming_both_spellings() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "exporter", "--config.check", "--log.format", "json",
         "--probe-interval", "500"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (line,) = done.stderr.splitlines()
    event = json.loads(line)
    assert (event["event"], event["level"]) == ("deprecated_flag", "warning")
    assert (event["used"], event["use"]) == ("--probe-interval", "--probe.interval")


def test_the_earlier_config_flag_and_variable_still_load_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("probe:\n  depths: [0, 2048]\n")
    _, by_flag = parse(["--config", str(config)])
    monkeypatch.setenv("LLAMA_SPEED_CONFIG", str(config))
    _, by_old_variable = parse([])
    monkeypatch.setenv("LLAMA_SPEED_CONFIG_FILE", str(config))
    _, by_variable = parse([])
    assert by_flag.targets[0].plan.depths == (0, 2048)
    assert by_flag == by_old_variable == by_variable


@pytest.mark.parametrize("abbreviated", ["--probe.int", "--config.ch", "--web.listen"])
def test_flags_are_not_abbreviated(abbreviated: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse([abbreviated, "1"])
    assert exited.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_config_check_prints_every_target_with_its_resolved_plan(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        "probe:\n  interval: 900\n  depths: [0, 16384]\n"
        "targets:\n"
        "  - name: coder\n    url: http://127.0.0.1:8080\n    api_key: sekrit\n"
        "    probe:\n      depths: [0, 32768]\n      generation_tokens: 0\n"
        "  - url: http://gpu-box:8081\n"
    )
    assert main(["--config.file", str(config), "--config.check"]) == 0
    out = capsys.readouterr().out
    assert "sekrit" not in out
    shown = yaml.safe_load(out)
    coder, other = shown["targets"]
    assert (coder["name"], coder["api_key"], other["name"]) == ("coder", "set", "gpu-box:8081")
    assert coder["plan"]["depths"] == [0, 32768] and coder["plan"]["generation_tokens"] == 0
    assert other["plan"]["depths"] == [0, 16384]
    assert coder["schedule"]["interval"] == other["schedule"]["interval"] == 900
    assert shown["web"]["listen_address"] == ":18088"


def test_config_check_exits_2_with_one_line_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("targets:\n  - url: http://a:1\n    probe:\n      prompt_tokens: 0\n"
                      "      generation_tokens: 0\n")  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "exporter", "--config.file", str(config), "--config.check"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    assert done.stderr.startswith("llama-speed-exporter: config error: targets.0.probe: ")
    assert "nothing to measure" in done.stderr and done.stderr.count("\n") == 1


def test_config_check_reads_the_web_config_file_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    web = tmp_path / "web.yml"
    web.write_text("basic_auth_users:\n  alice: not-a-bcrypt-hash\n")
    assert main(["--web.config.file", str(web), "--config.check"]) == 2
    assert capsys.readouterr().err.startswith("llama-speed-exporter: config error: web.config_file")


@pytest.mark.parametrize(
    ("flags", "key"),
    [
        (["--probe.interval", "inf"], "probe.interval"),
        (["--probe.generation-tokens", "1"], "probe.generation_tokens"),
        (["--probe.depths", "0,-1"], "probe.depths.1"),
        (["--probe.duty-budget", "0"], "probe.duty_budget"),
    ],
)
def test_bad_probe_flags_name_their_key(flags: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse(flags)
    assert error.value.key == key


def test_a_plan_without_generation_probes_measures_prompt_processing_only() -> None:
    _, config = parse(["--probe.generation-tokens", "0"])
    assert config.targets[0].plan.kinds == ("prompt",)
