"""The whole daemon, end to end, against a golden /metrics, as node_exporter's e2e test does.

The real daemon (scheduler, prober, store, collectors, web server with a web config file) runs
against the fake llama-server built from answers recorded from b11434, the contract-checked fake
NVML (two RTX 3060, the server's process on both) and a generated GGUF for the KV arithmetic.
After one round, the whole exposition is compared with `tests/golden/daemon.prom`. Values that
depend on the clock or the machine (durations, timestamps, the process's own metrics) are
replaced by `<varies>`; everything else, every name, label set, HELP and TYPE, must match.

After an intended change, rewrite the golden file with one command:

    UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden_daemon.py
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from pathlib import Path

import httpx

from exporter.gpu.nvml import Nvml
from exporter.kv.facts import KvOverrides
from testbed.tiny_model import write_tiny_model
from tests.daemon_harness import fast_target, running_daemon
from tests.fake_pynvml import FakeProcess, FakePynvml
from tests.fakes import FakeLlama
from tests.golden_files import check_golden
from tests.test_webconfig import bcrypt_hash, write_web_config

USER, PASSWORD = "prometheus", "scrape-me"
# Series whose values are the clock's or the machine's, not the exporter's logic.
VARYING = re.compile(
    r"^(llama_speed_(time_to_first_token_seconds|probe_duration_seconds"
    r"|probe_last_success_timestamp_seconds|probe_duty_ratio|collector_duration_seconds"
    r"|web_config_last_reload_success_timestamp_seconds)"
    r"(\{[^}]*\})?) \S+$"
)
BUILD_LABELS = re.compile(r'\b(version|python_version)="[^"]*"')
# The process's own metrics and the Python build differ from machine to machine.
MACHINE = re.compile(r"^(# (HELP|TYPE) )?(process_|python_info)")
ROUND_DEADLINE_S = 30.0
ROUND_RECORDED = (
    'llama_speed_probe_success{probe="generation",target="prod"}',
    'llama_speed_probe_success{probe="prompt",target="prod"}',
    "llama_speed_kv_cache_capacity_tokens{",
)


def normalise(text: str) -> str:
    lines = []
    for line in text.splitlines():
        if MACHINE.match(line):
            continue
        pinned = BUILD_LABELS.sub(r'\1="<\1>"', line)
        lines.append(VARYING.sub(r"\1 <varies>", pinned))
    return "\n".join(lines) + "\n"


def scrape_after_one_round(base: str) -> str:
    """The exposition once the first round is recorded (the next is an hour away)."""
    deadline = time.monotonic() + ROUND_DEADLINE_S
    while True:
        response = httpx.get(f"{base}/metrics", auth=(USER, PASSWORD), timeout=5)
        assert response.status_code == 200
        # Discovery works the KV cache out beside the round; both must be in.
        if all(marker in response.text for marker in ROUND_RECORDED):
            return response.text
        assert time.monotonic() < deadline, f"no round within {ROUND_DEADLINE_S} s"
        time.sleep(0.05)  # poll interval inside a deadline, not a wait for an event


def test_the_whole_daemon_serves_the_golden_exposition(tmp_path: Path) -> None:
    model = write_tiny_model(tmp_path / "tiny.gguf")
    fake = FakeLlama()
    pid_file = tmp_path / "llama-server.pid"
    pid_file.write_text(f"{os.getpid()}\n")  # a live process, standing in for llama-server
    nvml_fake = FakePynvml()
    for gpu, used in zip(nvml_fake.gpus, (6 * 2**30, 5 * 2**30), strict=True):
        gpu.compute_processes = [FakeProcess(os.getpid(), used)]
    target = dataclasses.replace(
        # One round only: the interval is far longer than the test.
        fast_target("prod", "http://llama", interval=3600.0, timeout=20.0, depths=(0, 512)),
        pid_file=pid_file,
        kv=KvOverrides(model_path=model, cache_type_k="q8_0", cache_type_v="q4_0", kv_unified=True),
    )
    web_config = write_web_config(
        tmp_path / "web.yml", {"basic_auth_users": {USER: bcrypt_hash(PASSWORD)}}
    )
    with running_daemon(
        [target],
        lambda t: fake.transport(),
        web_config_file=web_config,
        nvml=Nvml(nvml_fake),
    ) as (_, base):
        text = scrape_after_one_round(base)
    check_golden("daemon.prom", normalise(text))
