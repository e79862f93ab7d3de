"""What a server sends never breaks a scrape, a log line or a round, and never sticks."""

from __future__ import annotations

import json
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from exporter.collectors import catalogue as m
from exporter.collectors import exporter_collectors
from exporter.llama.client import LlamaClient, ServerError
from exporter.llama.discovery import parse_server_info
from exporter.llama.redact import redacted_text
from exporter.llama.untrusted import LABEL_MAX_CHARS, clean_text
from exporter.probe.runner import ProbeRunner
from exporter.schedule.plan import Schedule
from exporter.state.store import Store
from exporter.web.endpoint import landing_page
from tests.fakes import FakeLlama, fixture_json
from tests.test_runner import one_round, plan, run

SURROGATE = json.loads('"bad\\udc80name"')  # valid JSON, not encodable as UTF-8


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("Qwen3-Coder-Next", "Qwen3-Coder-Next"),
        (SURROGATE, "bad\ufffdname"),
        ("two\nlines\x1b[31m", "twolines[31m"),
        ("zero\u200bwidth", "zerowidth"),
        ("\U0001f600 ok", "\U0001f600 ok"),
        (42, "42"),
    ],
)
def test_clean_text(raw: Any, clean: str) -> None:
    assert clean_text(raw) == clean


def test_clean_text_caps_length() -> None:
    assert len(clean_text("x" * 10_000)) == LABEL_MAX_CHARS
    assert len(clean_text("\u00e9" * 10_000)) == LABEL_MAX_CHARS


def props_and_models(**props_changes: Any) -> tuple[Any, Any]:
    props = fixture_json("props.json")
    props.update(props_changes)
    return props, fixture_json("models.json")


def test_a_surrogate_in_every_label_field_still_renders_a_scrape() -> None:
    props, models = props_and_models(model_alias=SURROGATE, build_info=SURROGATE)
    props["model_ftype"] = SURROGATE
    info = parse_server_info(props, models)
    store = Store([("t", "http://x")])
    store.record_discovery("t", info, None)
    registry = CollectorRegistry()
    registry.register(exporter_collectors(store.snapshot, {"t": Schedule()}))
    text = generate_latest(registry).decode()
    assert 'model="bad\ufffdname"' in text and 'build="bad\ufffdname"' in text


def test_a_surrogate_reaching_a_family_directly_fails_only_its_value() -> None:
    family = m.SERVER_UP.family()
    family.add_metric([SURROGATE + "\n" + "y" * 500], 1.0)
    (sample,) = family.samples
    assert sample.labels["target"] == clean_text(SURROGATE + "y" * 500)
    assert sample.labels["target"].encode("utf-8")


@pytest.mark.parametrize(
    ("where", "value"),
    [
        ("n_ctx", float("inf")),
        ("n_ctx", float("nan")),
        ("n_ctx", 1e300),
        ("n_ctx", -1),
        ("n_ctx", 4096.5),
        ("total_slots", float("inf")),
        ("total_slots", 10**9),
        ("n_vocab", float("inf")),
        ("n_vocab", 0),
    ],
)
def test_absurd_numbers_in_discovery_are_a_bad_response(where: str, value: Any) -> None:
    props, models = props_and_models()
    if where == "n_ctx":
        props["default_generation_settings"]["n_ctx"] = value
    elif where == "total_slots":
        props["total_slots"] = value
    else:
        models["data"][0]["meta"]["n_vocab"] = value
    with pytest.raises(ServerError) as info:
        parse_server_info(props, models)
    assert info.value.reason == "bad_response"


def test_optional_figures_that_are_absurd_are_left_out() -> None:
    props, models = props_and_models()
    models["data"][0]["meta"].update(n_params=float("inf"), size=-5, n_ctx_train=float("nan"))
    info = parse_server_info(props, models)
    assert (info.n_params, info.size_bytes, info.n_ctx_train) == (None, None, None)


def test_slots_that_come_back_on_the_same_model_end_the_busy_unknown_skips() -> None:
    fake = FakeLlama(slots_endpoint=False)

    async def rounds() -> list[Any]:
        client = LlamaClient("http://llama", transport=fake.transport())
        runner = ProbeRunner("t", client, plan())
        try:
            first = await runner.run_round()
            fake.slots_endpoint = True  # same model, same ctx: nothing else changed
            second = await runner.run_round()
            return [first, second]
        finally:
            await client.aclose()

    first, second = run(rounds())
    assert first.skips == ("busy_unknown",)
    assert second.skips == () and all(o.succeeded for o in second.outcomes.values())


def test_a_password_in_a_target_url_is_not_on_the_landing_page() -> None:
    store = Store([("t", redacted_text("http://admin:hunter2@llama:8080"))])
    page = landing_page(store.snapshot(), "/metrics", 0.0)
    assert "hunter2" not in page and "http://admin:***@llama:8080" in page


def test_a_server_error_detail_on_the_landing_page_is_clean() -> None:
    result = run(one_round(FakeLlama(mode="error")))
    assert result.detail.isprintable()
