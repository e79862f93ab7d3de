"""The output canary: its request, what a valid answer is, when a change counts, its metrics.

Answers come from tests/fixtures/llama/completion_canary.json, recorded from llama-server
b11434 on the tiny test model (n_vocab 314, four slots) for the canary's own request.
"""

from __future__ import annotations

import asyncio
import copy
import json
import math
import random
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import httpx
import pytest
import structlog
from prometheus_client import CollectorRegistry, generate_latest

from exporter.collectors import exporter_collectors
from exporter.daemon import round_event
from exporter.llama.client import LlamaClient, ServerError
from exporter.llama.discovery import ServerInfo
from exporter.llama.limits import RequestLimits
from exporter.probe import canary
from exporter.probe.plan import MeasurePlan
from exporter.probe.results import (
    CANARY_FAILURE_REASONS,
    CanaryOutcome,
    CanaryOutput,
    RoundResult,
)
from exporter.probe.runner import ProbeRunner
from exporter.schedule.plan import Schedule
from exporter.state.canary import CanaryState
from exporter.state.store import Store
from tests.daemon_harness import fast_target, running_daemon, sample, wait_for_metrics
from tests.fakes import FakeLlama, fixture_json

T = TypeVar("T")
RECORDED = fixture_json("completion_canary.json")
RECORDED_FINGERPRINT = "24a450b734ef"  # of the recorded token ids; a label: keep it stable
N_VOCAB = 314


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def plan(**changes: Any) -> MeasurePlan:
    base = {"prompt_tokens": 64, "generation_tokens": 16, "warmup": False, "repetitions": 1}
    return MeasurePlan(**{**base, **changes})


async def one_round(
    transport: httpx.AsyncBaseTransport, p: MeasurePlan | None = None
) -> RoundResult:
    client = LlamaClient("http://llama", transport=transport)
    runner = ProbeRunner("t", client, p or plan(), rng=random.Random(1), overlap_poll_interval=0.05)
    try:
        return await runner.run_round()
    finally:
        await client.aclose()


def canary_requests(fake: FakeLlama) -> list[dict[str, Any]]:
    return [b for path, b in fake.requests if path == "/completion" and b["stream"] is False]


def output(*tokens: int, probability: float | None = 0.5) -> CanaryOutput:
    return CanaryOutput(tokens, probability)


# --- the request ------------------------------------------------------------------------------


def test_the_prompt_depends_on_the_vocabulary_size_only() -> None:
    assert canary.prompt(N_VOCAB) == canary.prompt(N_VOCAB)
    assert len(canary.prompt(N_VOCAB)) == canary.PROMPT_TOKENS
    for n_vocab in (1, 2, N_VOCAB, 151_936):
        assert all(0 <= t < n_vocab for t in canary.prompt(n_vocab))
    # Pinned: another prompt would be another baseline for every exporter upgraded to it.
    assert canary.prompt(151_936)[:4] == canary.prompt(151_936)[:4]
    assert len(set(canary.prompt(151_936))) > canary.PROMPT_TOKENS // 2


def test_the_request_is_greedy_seeded_uncached_and_in_the_probe_slot() -> None:
    fake = FakeLlama()
    result = run(one_round(fake.transport()))
    (body,) = canary_requests(fake)
    assert body["prompt"] == canary.prompt(fake.n_vocab)
    assert body["n_predict"] == 32 and body["ignore_eos"] is True
    assert body["temperature"] == 0 and body["top_k"] == 1 and body["samplers"] == ["top_k"]
    assert body["seed"] == canary.SEED
    assert body["cache_prompt"] is False and body["id_slot"] == 3
    assert body["n_probs"] == 1 and body["return_tokens"] is True
    assert body["post_sampling_probs"] is False
    # After the measured samples, so that it never delays or disturbs them.
    completions = [b for path, b in fake.requests if path == "/completion"]
    assert completions[-1] is body
    assert all(o.succeeded for o in result.outcomes.values())
    assert result.canary == CanaryOutcome(
        CanaryOutput(tuple(RECORDED["tokens"]), math.exp(-4.87297248840332))
    )
    assert result.canary.output is not None
    assert result.canary.output.fingerprint == RECORDED_FINGERPRINT


def test_the_same_answer_gives_the_same_fingerprint_and_another_another() -> None:
    fake = FakeLlama()
    first = run(one_round(fake.transport())).canary
    second = run(one_round(fake.transport())).canary
    fake.canary_variant = 1
    third = run(one_round(fake.transport())).canary
    assert first is not None and second is not None and third is not None
    assert first.output is not None and second.output is not None and third.output is not None
    assert first.output.fingerprint == second.output.fingerprint
    assert third.output.fingerprint != first.output.fingerprint


def test_disabled_it_sends_nothing() -> None:
    fake = FakeLlama()
    result = run(one_round(fake.transport(), plan(canary=False)))
    assert canary_requests(fake) == [] and result.canary is None


@pytest.mark.parametrize(
    ("fake", "why"),
    [
        (FakeLlama(busy_slots={0}), "a busy server is not probed at all"),
        (FakeLlama(sleeping=True), "a sleeping server is not woken"),
        (FakeLlama(mode="error"), "a round that failed has no server to ask"),
    ],
    ids=["busy", "sleeping", "error"],
)
def test_no_canary_where_the_round_did_not_measure(fake: FakeLlama, why: str) -> None:
    result = run(one_round(fake.transport()))
    assert canary_requests(fake) == [] and result.canary is None, why


def test_no_canary_after_production_overlapped_a_sample() -> None:
    fake = FakeLlama()
    fake.on_completion = lambda body: fake.busy_slots.add(1)
    result = run(one_round(fake.transport()))
    assert result.outcomes["prompt"].discards == ("overlap",)
    assert canary_requests(fake) == [] and result.canary is None


def test_production_during_the_canary_discards_it_and_keeps_the_samples() -> None:
    fake = FakeLlama()

    def production(body: dict[str, Any]) -> None:
        if body["stream"] is False:
            fake.busy_slots.add(1)

    fake.on_completion = production
    result = run(one_round(fake.transport()))
    assert result.canary == CanaryOutcome(failure="overlap", detail="production overlapped it")
    assert all(o.succeeded for o in result.outcomes.values())


def test_a_failing_canary_fails_alone() -> None:
    fake = FakeLlama()

    async def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/completion" and json.loads(request.content)["stream"] is False:
            return httpx.Response(500, json={"error": {"code": 500, "message": "boom"}})
        return await fake.handle(request)

    result = run(one_round(httpx.MockTransport(handle)))
    assert result.canary is not None and result.canary.failure == "http_error"
    assert all(o.succeeded for o in result.outcomes.values())


def test_a_hung_canary_ends_at_the_rounds_timeout_and_fails_alone() -> None:
    fake = FakeLlama()

    async def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/completion" and json.loads(request.content)["stream"] is False:
            await asyncio.Event().wait()
        return await fake.handle(request)

    async def timed() -> tuple[RoundResult, float]:
        loop = asyncio.get_running_loop()
        began = loop.time()
        result = await one_round(httpx.MockTransport(handle), plan(timeout=2.0))
        return result, loop.time() - began

    result, took = run(timed())
    assert result.canary is not None and result.canary.failure == "timeout"
    assert all(o.succeeded for o in result.outcomes.values())
    assert took < 2.0 + 5.0  # the round's timeout, plus room for a loaded machine


def test_a_context_too_small_for_it_is_a_failure_not_a_request() -> None:
    fake = FakeLlama(n_ctx=64)  # 32 prompt tokens and 32 generated ones, plus one, do not fit
    result = run(one_round(fake.transport(), plan(prompt_tokens=8, generation_tokens=4)))
    assert result.canary == CanaryOutcome(failure="context_exceeded", detail="ctx 64 too small")
    assert canary_requests(fake) == []


# --- what a valid answer is ---------------------------------------------------------------------


def test_the_recorded_answer_reads_as_its_tokens_and_probability() -> None:
    got = canary.read_answer(copy.deepcopy(RECORDED), N_VOCAB)
    assert got.tokens == tuple(RECORDED["tokens"]) and len(got.tokens) == 32
    # b11434 leaves out the probability of a token whose text ends inside a UTF-8 character:
    # of this answer's 32 (byte tokens mostly), only the first has one.
    assert got.mean_probability == pytest.approx(math.exp(-4.87297248840332))
    assert got.fingerprint == RECORDED_FINGERPRINT


def test_every_probability_counts_in_the_mean() -> None:
    answer = copy.deepcopy(RECORDED)
    answer["completion_probabilities"] = [
        {"id": t, "logprob": math.log(p)}
        for t, p in zip(answer["tokens"], [0.5, 0.25] * 16, strict=True)
    ]
    assert canary.read_answer(answer, N_VOCAB).mean_probability == pytest.approx(0.375)
    answer["completion_probabilities"] = []
    assert canary.read_answer(answer, N_VOCAB).mean_probability is None


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(answer: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = answer
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        node[int(last) if last.isdigit() else last] = value

    return change


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (_set("tokens.3", N_VOCAB), "invalid_output"),
        (_set("tokens.3", -1), "invalid_output"),
        (_set("tokens.3", True), "invalid_output"),
        (_set("tokens.3", 5.0), "invalid_output"),
        (_set("tokens.3", "5"), "invalid_output"),
        (_set("tokens", list(range(31))), "invalid_output"),
        (_set("tokens", list(range(33))), "invalid_output"),
        (_set("tokens", None), "invalid_output"),
        (_set("completion_probabilities.0.logprob", 0.1), "invalid_output"),
        (_set("completion_probabilities.0.logprob", float("nan")), "invalid_output"),
        (_set("completion_probabilities.0.logprob", float("-inf")), "invalid_output"),
        (_set("completion_probabilities.0.logprob", -(10**400)), "invalid_output"),
        (_set("completion_probabilities.0.logprob", "-1"), "invalid_output"),
        (_set("completion_probabilities.0.logprob", None), "invalid_output"),
        (_set("completion_probabilities.0.id", 7), "invalid_output"),
        (_set("completion_probabilities.0", [94]), "invalid_output"),
        (_set("completion_probabilities", {"id": 94}), "invalid_output"),
        (_set("completion_probabilities", [{"id": 94, "logprob": -1.0}] * 2), "invalid_output"),
        (_set("completion_probabilities", [{"id": 94, "logprob": -1.0}] * 33), "invalid_output"),
        (_set("timings.predicted_n", 31), "predicted_n_mismatch"),
        (_set("timings.predicted_n", "32"), "bad_response"),
        (lambda answer: answer.pop("timings"), "invalid_output"),
    ],
)
def test_an_answer_that_is_not_the_output_asked_for_is_a_failure(
    tamper: Callable[[dict[str, Any]], None], reason: str
) -> None:
    answer = copy.deepcopy(RECORDED)
    tamper(answer)
    with pytest.raises(ServerError) as caught:
        canary.read_answer(answer, N_VOCAB)
    assert caught.value.reason == reason


@pytest.mark.parametrize("answer", [[], "x", None, 3])
def test_an_answer_that_is_no_object_is_a_failure(answer: Any) -> None:
    with pytest.raises(ServerError) as caught:
        canary.read_answer(answer, N_VOCAB)
    assert caught.value.reason == "invalid_output"


def test_a_bad_answer_from_the_server_is_a_failure_with_its_reason() -> None:
    fake = FakeLlama(canary_tamper=_set("tokens.0", N_VOCAB + 7))
    result = run(one_round(fake.transport()))
    assert result.canary is not None and result.canary.output is None
    assert result.canary.failure == "invalid_output"
    assert "outside the vocabulary" in result.canary.detail
    assert all(o.succeeded for o in result.outcomes.values())


def test_the_whole_answer_is_read_within_the_size_cap() -> None:
    async def huge(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"[" + b"0," * (1 << 20) + b"0]")

    with pytest.raises(ServerError) as caught:
        run(_with_limit(huge, 64 * 1024))
    assert caught.value.reason == "oversized"


async def _with_limit(handler: Any, limit: int) -> Any:
    client = LlamaClient(
        "http://llama",
        transport=httpx.MockTransport(handler),
        limits=RequestLimits(max_response_bytes=limit),
    )
    try:
        return await client.complete_whole({"prompt": [1]}, 5.0)
    finally:
        await client.aclose()


def test_a_malformed_whole_answer_is_a_bad_response() -> None:
    async def broken(request: httpx.Request) -> httpx.Response:
        assert json.loads(request.content)["stream"] is False
        return httpx.Response(200, content=b"{not json")

    with pytest.raises(ServerError) as caught:
        run(_with_limit(broken, 64 * 1024))
    assert caught.value.reason == "bad_response"


# --- when a change counts -----------------------------------------------------------------------


def test_the_first_output_is_the_baseline_and_a_repeat_changes_nothing() -> None:
    state = CanaryState()
    assert state.observe(output(1, 2), 10.0) is None
    assert state.observe(output(1, 2), 20.0) is None
    assert state.fingerprint == output(1, 2).fingerprint
    assert state.changes == 0 and state.last_change_time is None


def test_a_change_counts_once_the_new_output_repeats() -> None:
    state = CanaryState()
    for at in (10.0, 20.0):
        state.observe(output(1, 2), at)
    assert state.observe(output(3, 4), 30.0) is None
    assert state.changes == 0 and state.fingerprint == output(1, 2).fingerprint
    assert state.observe(output(3, 4), 40.0) == output(1, 2).fingerprint
    assert state.changes == 1 and state.last_change_time == 40.0
    assert state.fingerprint == output(3, 4).fingerprint
    assert state.observe(output(3, 4), 50.0) is None and state.changes == 1


def test_an_odd_answer_now_and_then_never_counts() -> None:
    """A nondeterministic kernel: the usual output, with another one between."""
    state = CanaryState()
    for n in range(12):
        state.observe(output(1, 2) if n % 2 == 0 or n % 3 else output(9, 9), float(n))
    assert state.changes == 0 and state.fingerprint == output(1, 2).fingerprint
    # Two different odd answers in a row are not a repeat either.
    state.observe(output(7, 7), 20.0)
    state.observe(output(8, 8), 21.0)
    assert state.changes == 0


def test_a_baseline_that_never_repeated_is_replaced_without_counting() -> None:
    state = CanaryState()
    state.observe(output(9, 9), 1.0)  # the odd one, seen first
    state.observe(output(1, 2), 2.0)
    state.observe(output(1, 2), 3.0)
    assert state.changes == 0 and state.fingerprint == output(1, 2).fingerprint
    state.observe(output(3, 4), 4.0)
    state.observe(output(3, 4), 5.0)
    assert state.changes == 1


def test_the_probability_follows_the_last_answer() -> None:
    state = CanaryState()
    state.observe(output(1, probability=0.6), 1.0)
    state.observe(output(5, probability=0.2), 2.0)
    assert state.mean_probability == 0.2
    state.observe(output(5, probability=None), 3.0)
    assert state.mean_probability is None


def server(model: str = "coder", ctx: int = 4096, quant: str = "Q4_0") -> ServerInfo:
    return ServerInfo(
        model=model, model_path=f"/models/{model}.gguf", ctx=ctx, slots=4, quant=quant,
        build="b11434-abc1234", n_vocab=N_VOCAB, n_params=None, size_bytes=None,
        n_ctx_train=None, slots_endpoint=True, metrics_endpoint=False,
    )  # fmt: skip


def canary_round(info: ServerInfo | None, result: CanaryOutput | str, at: float) -> RoundResult:
    outcome = CanaryOutcome(failure=result) if isinstance(result, str) else CanaryOutcome(result)
    return RoundResult("prod", at, 1.0, info, canary=outcome)


def render(store: Store) -> str:
    registry = CollectorRegistry()
    registry.register(exporter_collectors(store.snapshot, {"prod": Schedule()}))
    return generate_latest(registry).decode()


def test_a_swap_under_the_same_alias_counts_and_a_new_name_or_ctx_starts_again() -> None:
    store = Store([("prod", "http://gpu-box:8080")])
    for n, (info, out) in enumerate(
        [
            (server(quant="F32"), output(1)), (server(quant="F32"), output(1)),
            # The same name and ctx, another file: the canary's whole point.
            (server(), output(2)), (server(), output(2)),
        ]
    ):  # fmt: skip
        replaced = store.record_round(canary_round(info, out, 100.0 * n)).canary_replaced
    assert replaced == output(1).fingerprint
    (state,) = store.snapshot()
    assert state.canary.changes == 1 and state.canary.last_change_time == 301.0
    for info in (server(ctx=8192), server(model="coder-v2", ctx=8192)):
        store.record_discovery("prod", info, None)
        (state,) = store.snapshot()
        assert state.canary == CanaryState(), "another model's output is a new baseline"
        store.record_round(canary_round(info, output(3), 500.0))
        store.record_round(canary_round(info, output(3), 600.0))
        assert store.snapshot()[0].canary.changes == 0


def test_a_restart_with_the_same_file_counts_nothing() -> None:
    store = Store([("prod", "http://gpu-box:8080")])
    store.record_round(canary_round(server(), output(1), 0.0))
    store.record_round(canary_round(server(), output(1), 1.0))
    store.record_discovery("prod", None, "connect")  # down while it restarts
    store.record_round(canary_round(None, "connect", 2.0))
    store.record_discovery("prod", server(), None)
    store.record_round(canary_round(server(), output(1), 3.0))
    (state,) = store.snapshot()
    assert state.canary.changes == 0 and state.canary_failures["connect"] == 1


def test_failures_are_counted_by_reason_and_outlive_a_model_change() -> None:
    store = Store([("prod", "http://gpu-box:8080")])
    store.record_round(canary_round(server(), "overlap", 0.0))
    store.record_round(canary_round(server(), "invalid_output", 1.0))
    store.record_discovery("prod", server(model="other"), None)
    text = render(store)
    for reason in CANARY_FAILURE_REASONS:
        want = 1.0 if reason in ("overlap", "invalid_output") else 0.0
        assert sample(text, "llama_speed_canary_failures_total", reason=reason) == want


def test_the_metrics_show_the_settled_output_its_changes_and_drift() -> None:
    store = Store([("prod", "http://gpu-box:8080")])
    assert "llama_speed_canary_info{" not in render(store)  # no baseline, nothing to show
    outputs = [output(1, probability=0.6)] * 2 + [output(2, probability=0.4)]
    for n, out in enumerate(outputs):
        store.record_round(canary_round(server(), out, 1000.0 * n))
    text = render(store)
    labels = {"model": "coder", "target": "prod"}
    assert sample(text, "llama_speed_canary_info", fingerprint=output(1).fingerprint) == 1.0
    assert text.count("llama_speed_canary_info{") == 1  # the candidate is not settled yet
    assert sample(text, "llama_speed_canary_output_changes_total", **labels) == 0.0
    assert sample(text, "llama_speed_canary_token_probability", **labels) == 0.4
    assert "llama_speed_canary_last_change_timestamp_seconds{" not in text
    store.record_round(canary_round(server(), output(2, probability=0.4), 3000.0))
    text = render(store)
    assert sample(text, "llama_speed_canary_info", fingerprint=output(2).fingerprint) == 1.0
    assert text.count("llama_speed_canary_info{") == 1  # one series at a time
    assert sample(text, "llama_speed_canary_output_changes_total", **labels) == 1.0
    assert sample(text, "llama_speed_canary_last_change_timestamp_seconds", **labels) == 3001.0


def test_the_daemon_counts_a_changed_output_once_it_repeats() -> None:
    fake = FakeLlama()
    target = fast_target("t", "http://llama", timeout=5.0, interval=1.0)
    before = CanaryOutput(tuple(RECORDED["tokens"]), None).fingerprint
    after = CanaryOutput(tuple((t + 1) % N_VOCAB for t in RECORDED["tokens"]), None).fingerprint

    def rounds(text: str) -> float:
        return sample(text, "llama_speed_probes_total", probe="prompt", target="t") or 0.0

    with (
        structlog.testing.capture_logs() as logs,
        running_daemon([target], lambda t: fake.transport()) as (_, base),
    ):
        # Two rounds on the first output: a baseline that repeated.
        text = wait_for_metrics(
            base, lambda t: rounds(t) >= 2 and f'fingerprint="{before}"' in t, timeout=60
        )
        assert sample(text, "llama_speed_canary_output_changes_total", target="t") == 0.0
        fake.canary_variant = 1
        text = wait_for_metrics(
            base,
            lambda t: sample(t, "llama_speed_canary_output_changes_total", target="t") == 1.0,
            timeout=60,
        )
        assert sample(text, "llama_speed_canary_info", fingerprint=after) == 1.0
        assert f'fingerprint="{before}"' not in text
    (changed,) = [e for e in logs if e["event"] == "canary_output_changed"]
    assert changed["was"] == before and changed["now"] == after and changed["target"] == "t"
    assert {e.get("canary") for e in logs if e["event"] == "probe_round"} >= {before, after}


def test_the_round_log_names_the_canary_output_or_why_there_is_none() -> None:
    info = server()
    event = round_event(canary_round(info, output(1, 2), 0.0))
    assert event["canary"] == output(1, 2).fingerprint
    failed = RoundResult(
        "prod", 0.0, 1.0, info, canary=CanaryOutcome(failure="timeout", detail="x")
    )
    assert (
        round_event(failed).items() >= {"canary_failure": "timeout", "canary_detail": "x"}.items()
    )
