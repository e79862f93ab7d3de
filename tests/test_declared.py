"""Plans check themselves when built, whoever builds them: one check per bound."""

from __future__ import annotations

import math
from typing import Any

import pytest

from exporter.config.resolved import Config, Target, config_from_json, config_to_json
from exporter.declared import SettingError
from exporter.llama.limits import RequestLimits
from exporter.llama.secret import Secret
from exporter.probe.plan import MeasurePlan
from exporter.schedule.plan import Schedule


@pytest.mark.parametrize(
    ("build", "loc", "problem"),
    [
        (lambda: MeasurePlan(timeout=math.nan), "timeout", "finite"),
        (lambda: MeasurePlan(timeout=math.inf), "timeout", "finite"),
        (lambda: MeasurePlan(depths=(0, -1)), "depths.1", "greater than or equal to 0"),
        (lambda: MeasurePlan(depths=()), "depths", "at least one depth"),
        (lambda: MeasurePlan(generation_tokens=1), "generation_tokens", "at least 2"),
        (lambda: MeasurePlan(prompt_tokens=0, generation_tokens=0), "", "nothing to measure"),
        (lambda: Schedule(duty_budget=0.0), "duty_budget", "greater than 0"),
        (lambda: RequestLimits(max_response_bytes=1), "max_response_bytes", "65536"),
    ],
)
def test_a_value_outside_its_declaration_is_refused_naming_the_field(
    build: Any, loc: str, problem: str
) -> None:
    with pytest.raises(SettingError, match=problem) as caught:
        build()
    assert caught.value.loc == loc


def test_a_plan_keeps_its_depths_sorted_and_distinct_however_it_is_given() -> None:
    assert MeasurePlan(depths=(4096, 0, 4096)).depths == (0, 4096)
    from_json: Any = [4096, 0]  # as config_from_json reads them back
    assert MeasurePlan(depths=from_json).depths == (0, 4096)


def test_the_handed_over_configuration_reads_back_equal() -> None:
    target = Target(
        "t",
        "http://127.0.0.1:8080",
        Secret("k3y"),
        plan=MeasurePlan(depths=(0, 4096), slot=1),
        schedule=Schedule(interval=60.0, confirmations=0),
        limits=RequestLimits(discovery_timeout=3.0),
    )
    config = Config((target,), ":18088", "/metrics", "json", "info")
    assert config_from_json(config_to_json(config)) == config


def test_an_api_key_never_shows_in_a_repr() -> None:
    key = Secret("hunter2")
    target = Target("t", "http://h:1", key)
    assert "hunter2" not in repr(key) + str(key) + repr(target)
    assert key.get_secret_value() == "hunter2"
