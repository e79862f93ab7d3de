"""The whole daemon against a fake llama-server that fails in each way a real one does.

/metrics must keep answering, success must drop to 0 with the right reason, and the exporter
must recover by itself when the server does.
"""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from exporter.config import Target
from exporter.gpu.nvml import Nvml
from tests import fake_pynvml
from tests.daemon_harness import fast_target, running_daemon, sample, wait_for_metrics
from tests.fake_pynvml import FakePynvml
from tests.fakes import FakeLlama


def factory(fake: FakeLlama) -> Callable[[Target], httpx.AsyncBaseTransport]:
    return lambda target: fake.transport()


def succeeded(text: str) -> bool:
    return all(
        sample(text, "llama_speed_probe_success", target="t", probe=kind) == 1.0
        for kind in ("prompt", "generation")
    )


def test_probes_are_exported_and_endpoints_answer() -> None:
    fake = FakeLlama()
    with running_daemon([fast_target("t", "http://llama")], factory(fake)) as (_, base):
        text = wait_for_metrics(base, succeeded)
        labels = {"target": "t", "model": "Tiny-Model.Q8_0", "ctx": "4096", "depth": "0"}
        assert sample(text, "llama_speed_prompt_tokens_per_second", **labels) == pytest.approx(
            10000
        )
        assert sample(text, "llama_speed_generation_tokens_per_second", **labels) == (
            pytest.approx(2000)
        )
        assert sample(text, "llama_speed_server_up", target="t") == 1.0
        assert sample(text, "llama_speed_server_info", target="t", quant="all F32") == 1.0
        assert "process_cpu_seconds_total" in text
        assert httpx.get(f"{base}/healthz").text == "ok\n"
        page = httpx.get(f"{base}/").text
        assert "Tiny-Model.Q8_0" in page and "http://llama" in page
        assert httpx.get(f"{base}/nope").status_code == 404


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("absent", "connect"),
        ("loading", "loading"),
        ("hang", "timeout"),
        ("error", "http_error"),
        ("malformed", "bad_response"),
    ],
)
def test_failing_server_reports_reason_and_recovers(mode: str, reason: str) -> None:
    fake = FakeLlama()
    with running_daemon([fast_target("t", "http://llama")], factory(fake)) as (_, base):
        wait_for_metrics(base, succeeded)
        fake.mode = mode
        text = wait_for_metrics(
            base,
            lambda t: sample(t, "llama_speed_probe_success", target="t", probe="prompt") == 0.0,
        )
        assert (
            sample(
                text, "llama_speed_probe_failures_total", target="t", probe="prompt", reason=reason
            )
            or 0
        ) >= 1
        assert sample(text, "llama_speed_server_up", target="t") == 0.0
        # The last valid figures stay, dated by the last-success timestamp.
        assert sample(text, "llama_speed_prompt_tokens_per_second", target="t") is not None
        fake.mode = "ok"
        text = wait_for_metrics(base, succeeded)
        assert sample(text, "llama_speed_server_up", target="t") == 1.0


def test_server_restarting_with_another_model_swaps_the_label_sets() -> None:
    fake = FakeLlama(model_path="/models/first.gguf")
    with running_daemon([fast_target("t", "http://llama")], factory(fake)) as (_, base):
        wait_for_metrics(base, lambda t: 'model="first"' in t and succeeded(t))
        fake.model_path, fake.n_ctx = "/models/second.gguf", 8192
        text = wait_for_metrics(
            base,
            lambda t: sample(t, "llama_speed_prompt_tokens_per_second", model="second") is not None,
        )
        assert 'model="first"' not in text
        assert sample(text, "llama_speed_server_info", model="second", ctx="8192") == 1.0


def test_busy_server_skips_and_counts() -> None:
    fake = FakeLlama(busy_slots={0})
    with running_daemon([fast_target("t", "http://llama")], factory(fake)) as (_, base):
        text = wait_for_metrics(
            base,
            lambda t: (sample(t, "llama_speed_probes_skipped_total", target="t", reason="busy")
                       or 0) >= 2,
        )  # fmt: skip
        assert sample(text, "llama_speed_probe_success", target="t") is None
        assert not [b for p, b in fake.requests if p == "/completion"]


def test_two_targets_are_probed_independently() -> None:
    good, bad = FakeLlama(), FakeLlama(mode="absent")
    targets = [fast_target("good", "http://good"), fast_target("bad", "http://bad")]

    def pick(target: Target) -> httpx.AsyncBaseTransport:
        return (good if target.name == "good" else bad).transport()

    with running_daemon(targets, pick) as (_, base):
        text = wait_for_metrics(
            base,
            lambda t: (
                sample(t, "llama_speed_probe_success", target="good", probe="prompt") == 1.0
                and sample(t, "llama_speed_probe_success", target="bad", probe="prompt") == 0.0
            ),
        )
        assert sample(text, "llama_speed_server_up", target="bad") == 0.0


def test_gpus_and_energy_per_probe_with_nvml() -> None:
    gpus = FakePynvml()
    fake = FakeLlama()

    def burn(body: object) -> None:
        for gpu in gpus.gpus:  # each request costs each card 1 J
            gpu.energy_mj += 1000

    fake.on_completion = burn
    with running_daemon(
        [fast_target("t", "http://llama")],
        factory(fake),
        nvml=Nvml(gpus),
    ) as (_, base):
        text = wait_for_metrics(base, succeeded)
        assert sample(text, "llama_speed_gpu_up") == 1.0
        assert sample(text, "llama_speed_gpu_memory_total_bytes", gpu="1") == 12_884_901_888
        energy = sample(text, "llama_speed_probe_energy_joules_total", probe="generation",
                        depth="0")  # fmt: skip
        assert energy is not None and energy > 0
        assert energy % 2.0 == 0  # whole requests of 2 J: read around each request, no more


def test_no_nvml_keeps_everything_else_working() -> None:
    gpus = FakePynvml()
    gpus.fail("nvmlInit", fake_pynvml.NVMLError_LibraryNotFound)
    with running_daemon(
        [fast_target("t", "http://llama")],
        factory(FakeLlama()),
        nvml=Nvml(gpus),
    ) as (_, base):
        text = wait_for_metrics(base, succeeded)
        assert sample(text, "llama_speed_gpu_up") == 0.0
        assert sample(text, "llama_speed_gpu_errors_total", reason="library_not_found")
        assert sample(text, "llama_speed_collector_success", collector="gpu") == 1.0
        assert "llama_speed_probe_energy_joules_total{" not in text
