"""Fault injection from the outside: the daemon as a user runs it, against a hostile server.

The exporter runs as a subprocess (`python -m exporter run`) probing `HostileLlamaServer`,
which answers like b11434 until its control endpoint switches a fault on. Each case scrapes
/metrics throughout, and checks what an operator relies on:

* /metrics answers 200 while the fault lasts;
* the fault is counted under the right reason;
* no wrong figure is exported: the fake's honest figures are exact (PROMPT_TPS and
  GENERATION_TPS), so a gauge or a counter ratio off them came from the fault; a kind that
  failed in a round adds nothing to the counters and does not move its last-success time;
* the daemon recovers once the fault is healed: a new successful round, server_up 1;
* the daemon's memory stays bounded while a server sends endless or oversized answers.

One daemon serves a group of cases (faults are switched at runtime), and a case leaves it
healthy; one that could not (a failed case) makes the next case restart it.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from exporter.llama.server_process import free_port
from tests.hostile_server import GENERATION_TPS, PROMPT_TPS, REPETITIONS, HostileLlamaServer

pytestmark = pytest.mark.faults

Kind = Literal["prompt", "generation"]
KINDS: Final[tuple[Kind, ...]] = ("prompt", "generation")

# Discovery's deadline, short so that a dripping server is down within a case's time.
DISCOVERY_TIMEOUT_S: Final = 1.0
EXTRA_FLAGS: Final[tuple[str, ...]] = ("--probe.discovery-timeout", f"{DISCOVERY_TIMEOUT_S:g}")

# Polling: a scrape every POLL_S within a deadline. A scrape must answer within
# SCRAPE_TIMEOUT_S: the daemon serves /metrics from threads that a probe never blocks.
POLL_S: Final = 0.1
SCRAPE_TIMEOUT_S: Final = 3.0
# Slack for a loaded 2-core machine on top of what the product promises.
MARGIN_S: Final = 2.5
STARTUP_DEADLINE_S: Final = 60.0
# The exporter ends within 5 s of SIGTERM; the test waits twice that before calling it a hang.
SIGTERM_DEADLINE_S: Final = 10.0
# Rounds a case waits for its reason before it gives up: the fault's first round may have begun
# before the switch, so two more make sure whole rounds ran under it.
GIVE_UP_ROUNDS: Final = 3
# Some 55 MiB is the daemon's own; a 64 MiB answer read whole, or an endless one read for a
# second, is far past the bound, while the 8 MiB cap and its copies fit under it.
RSS_BOUND_BYTES: Final = 150 * 1024 * 1024
# The fake's honest figures are exact: any mix of honest samples gives exactly the nominal
# speed. A fault's figure mixed into a round moves it by far more than this.
SPEED_TOLERANCE: Final = 1.05
NOMINAL_TPS: Final[dict[Kind, float]] = {"prompt": PROMPT_TPS, "generation": GENERATION_TPS}

UP: Final = "llama_speed_server_up"
INFO: Final = "llama_speed_server_info"
ATTEMPTS: Final = "llama_speed_probes_total"
FAILURES: Final = "llama_speed_probe_failures_total"
DISCARDS: Final = "llama_speed_probes_discarded_total"
SKIPS: Final = "llama_speed_probes_skipped_total"
SUCCESS: Final = "llama_speed_probe_success"
LAST_OK: Final = "llama_speed_probe_last_success_timestamp_seconds"
TTFT: Final = "llama_speed_time_to_first_token_seconds"
KV_ERRORS: Final = "llama_speed_kv_cache_errors_total"
RSS: Final = "process_resident_memory_bytes"
SPEED: Final[dict[Kind, str]] = {
    "prompt": "llama_speed_prompt_tokens_per_second",
    "generation": "llama_speed_generation_tokens_per_second",
}
TOKENS: Final[dict[Kind, str]] = {
    "prompt": "llama_speed_probe_prompt_tokens_total",
    "generation": "llama_speed_probe_generated_tokens_total",
}
SECONDS: Final[dict[Kind, str]] = {
    "prompt": "llama_speed_probe_prompt_seconds_total",
    "generation": "llama_speed_probe_generation_seconds_total",
}
SERIES_LABELS: Final = ("model", "ctx", "depth")
PROXY_VARIABLES: Final = (
    "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY",
    "http_proxy", "https_proxy", "all_proxy", "no_proxy",
)  # fmt: skip


@dataclass(frozen=True)
class DaemonConfig:
    """How a group's daemon runs. The round's timeout must stay below the interval."""

    name: str
    interval: float
    timeout: float
    discovery_interval: float = 0.5
    proxied: bool = False  # HTTP_PROXY and friends point at a closed port
    rounds: bool = True  # whether health means successful rounds, or only server_up

    def args(self, target: str) -> list[str]:
        return [
            "--target", target,
            "--probe.interval", f"{self.interval:g}",
            "--probe.timeout", f"{self.timeout:g}",
            "--probe.jitter", "0",
            "--probe.discovery-interval", f"{self.discovery_interval:g}",
            "--probe.prompt-tokens", "32",
            "--probe.generation-tokens", "8",
            "--probe.depths", "0",
            "--probe.repetitions", str(REPETITIONS),
            "--probe.duty-budget", "1",
            "--probe.warmup", "false",
            "--collector.gpu", "false",
            *EXTRA_FLAGS,
        ]  # fmt: skip

    @property
    def round_wait(self) -> float:
        """The longest a round can take to start and end."""
        return self.interval + self.timeout

    @property
    def discovery_wait(self) -> float:
        """How soon discovery must notice a server that drips, stalls or recovers."""
        return self.discovery_interval + DISCOVERY_TIMEOUT_S


# Rounds every 1.5 s: an honest round takes about 0.5 s, 0.33 s of it the fake's own pacing.
FAST: Final = DaemonConfig("fast", interval=1.5, timeout=1.3)
# For faults whose rounds take long while looking honest: tiny timings on one kind make three
# repetitions of 0.3 s or 0.45 s, a round of some 1.7 s, well within the 2.2 s timeout.
SLOW: Final = DaemonConfig("slow", interval=2.5, timeout=2.2)
# Rounds so rare and slow that only discovery's own deadline can report a dripping server
# down before the test's deadline: a round would take 5.5 s to time out.
DISCOVERY: Final = DaemonConfig("discovery", interval=6.0, timeout=5.5, rounds=False)
PROXIED: Final = DaemonConfig("proxied", interval=1.5, timeout=1.3, proxied=True)


# -- the exposition --------------------------------------------------------------------------


@dataclass(frozen=True)
class Scrape:
    at: float  # time.time() when read
    samples: tuple[tuple[str, dict[str, str], float], ...]

    @classmethod
    def parse(cls, text: str) -> Scrape:
        samples = tuple(
            (s.name, dict(s.labels), s.value)
            for family in text_string_to_metric_families(text)
            for s in family.samples
        )
        return cls(time.time(), samples)

    def matching(self, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
        return [
            (have, value)
            for sample, have, value in self.samples
            if sample == name and all(have.get(k) == v for k, v in labels.items())
        ]

    def value(self, name: str, **labels: str) -> float | None:
        found = self.matching(name, **labels)
        return found[0][1] if found else None

    def total(self, name: str, **labels: str) -> float:
        """Sum over the matching samples; 0 where there are none (a reason not exported yet)."""
        return sum(value for _, value in self.matching(name, **labels))

    def series(self, name: str) -> dict[tuple[str, ...], float]:
        found = self.matching(name)
        return {tuple(labels.get(k, "") for k in SERIES_LABELS): v for labels, v in found}

    def reasons(self, name: str, kind: Kind) -> dict[str, float]:
        return {labels["reason"]: v for labels, v in self.matching(name, probe=kind)}


def delta(a: Scrape, b: Scrape, name: str, **labels: str) -> float:
    return b.total(name, **labels) - a.total(name, **labels)


def reason_deltas(a: Scrape, b: Scrape, name: str, kind: Kind) -> dict[str, float]:
    before, after = a.reasons(name, kind), b.reasons(name, kind)
    moved = {r: after[r] - before.get(r, 0.0) for r in after}
    return {r: d for r, d in moved.items() if d}


# -- the daemon ------------------------------------------------------------------------------


def daemon_env(*, proxy: str | None) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("LLAMA_SPEED_") and k not in PROXY_VARIABLES
    }
    if proxy is not None:
        env.update({k: proxy for k in PROXY_VARIABLES if "no_" not in k.lower()})
    return env


class ExporterProcess:
    """`python -m exporter run` on a free port, its log in a file (a pipe would fill)."""

    def __init__(self, config: DaemonConfig, target: str, workdir: Path) -> None:
        self.config = config
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        self.log_path = workdir / f"exporter-{config.name}-{time.monotonic_ns()}.log"
        proxy = f"http://127.0.0.1:{free_port()}" if config.proxied else None
        command = [sys.executable, "-m", "exporter", "run", "--web.listen-address",
                   f"127.0.0.1:{port}", "--log.format", "json", *config.args(target)]  # fmt: skip
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=daemon_env(proxy=proxy),
                cwd=workdir,
            )  # fmt: skip
        self.http = httpx.Client(trust_env=False, timeout=SCRAPE_TIMEOUT_S)
        deadline = time.monotonic() + STARTUP_DEADLINE_S
        while True:
            with contextlib.suppress(httpx.TransportError):
                if self.http.get(f"{self.base}/healthz").status_code == 200:
                    return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"exporter did not start:\n{self.log()}")
            time.sleep(POLL_S)  # polling for the port to open, within the deadline

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def scrape(self) -> Scrape:
        """One scrape, which must answer 200 within SCRAPE_TIMEOUT_S."""
        try:
            response = self.http.get(f"{self.base}/metrics")
        except httpx.HTTPError as exc:
            raise AssertionError(f"/metrics did not answer: {exc!r}") from None
        assert response.status_code == 200, f"/metrics answered {response.status_code}"
        return Scrape.parse(response.text)

    def sigterm(self) -> tuple[int | None, float]:
        """SIGTERM, then the exit code and how long it took; None where it did not end."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=SIGTERM_DEADLINE_S)
        except subprocess.TimeoutExpired:
            self.stop()
            return None, time.monotonic() - started
        return code, time.monotonic() - started

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.http.close()


class Lab:
    """The hostile server, and the one daemon running against it at a time."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.fake = HostileLlamaServer(model_path=str(workdir / "missing.gguf"))
        self.control = httpx.Client(base_url=self.fake.url, trust_env=False, timeout=10)
        self.exporter: ExporterProcess | None = None
        self.clean = False  # the last case saw the daemon recover, healthy, after its fault

    def switch(self, fault: str | None, **params: Any) -> None:
        # ASCII JSON, so that a lone surrogate travels as its escape, as the fake sends it on.
        order = json.dumps({"fault": fault, **params})
        response = self.control.post(
            "/_control", content=order, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 200, response.text

    def heal(self) -> None:
        self.switch(None)

    def fake_state(self) -> dict[str, Any]:
        state: dict[str, Any] = self.control.get("/_control").json()
        return state

    def start(self, config: DaemonConfig) -> ExporterProcess:
        self.retire()
        self.exporter = ExporterProcess(config, self.fake.url, self.workdir)
        return self.exporter

    def retire(self) -> None:
        if self.exporter is not None:
            self.exporter.stop()
        self.exporter = None
        self.clean = False

    def ready(self, config: DaemonConfig) -> ExporterProcess:
        """A healed server and a daemon of `config` that has shown it works.

        A daemon that a case left in a state it could not verify (a failed case) is replaced:
        what the fault left behind in it (an infinite counter, a stuck task) would fail every
        case after it for the same cause."""
        self.heal()
        exporter = self.exporter
        if (
            exporter is None
            or exporter.config != config
            or exporter.proc.poll() is not None
            or not self.clean
        ):
            exporter = self.start(config)
        if not self._healthy(exporter):
            pytest.fail(f"the exporter never became healthy:\n{exporter.log()[-4000:]}")
        self.clean = False
        return exporter

    @staticmethod
    def _healthy(exporter: ExporterProcess) -> bool:
        config = exporter.config

        def healthy(s: Scrape) -> bool:
            if s.value(UP) != 1:
                return False
            return not config.rounds or all(s.value(SUCCESS, probe=k) == 1 for k in KINDS)

        return healthy(watch(exporter, lambda s: healthy(s[-1]), STARTUP_DEADLINE_S)[-1])

    def close(self) -> None:
        self.retire()
        self.control.close()
        self.fake.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    lab = Lab(tmp_path_factory.mktemp("faults"))
    try:
        yield lab
    finally:
        lab.close()


def last_ok(s: Scrape, kind: Kind) -> float:
    value = s.value(LAST_OK, probe=kind)
    return -math.inf if value is None else value


def watch(
    exporter: ExporterProcess,
    until: Callable[[list[Scrape]], bool],
    deadline_s: float,
    *,
    guard: Callable[[Scrape], None] = lambda _: None,
) -> list[Scrape]:
    """Scrape every POLL_S until `until` holds or the deadline passes; every scrape must
    answer 200, and `guard` sees each one. The caller asserts what it waited for."""
    deadline = time.monotonic() + deadline_s
    scrapes: list[Scrape] = []
    while True:
        scrapes.append(exporter.scrape())
        guard(scrapes[-1])
        if until(scrapes) or time.monotonic() > deadline:
            return scrapes
        time.sleep(POLL_S)  # the interval between scrapes, within the deadline


def rss_guard(lab: Lab, exporter: ExporterProcess) -> Callable[[Scrape], None]:
    """Fails at the first scrape past the bound, after healing the server so that an
    exporter without a cap stops growing (the fake ends its endless answers at once)."""

    def check(s: Scrape) -> None:
        exported = s.value(RSS)
        assert exported is not None, "the daemon does not export process_resident_memory_bytes"
        if exported >= RSS_BOUND_BYTES:
            lab.heal()
            exporter.stop()
            raise AssertionError(f"daemon RSS {exported / 2**20:.0f} MiB, over the bound")

    return check


# -- what every case checks ------------------------------------------------------------------


def assert_no_wrong_figure(scrapes: Sequence[Scrape], config: DaemonConfig) -> None:
    """Every figure exported is the honest server's, and a failed kind added nothing."""
    for s in scrapes:
        for name, labels, value in s.samples:
            if name.startswith("llama_speed_"):
                assert math.isfinite(value), f"{name}{labels} = {value}"
        for kind in KINDS:
            for labels, value in s.matching(SPEED[kind]):
                ratio = value / NOMINAL_TPS[kind]
                assert 1 / SPEED_TOLERANCE <= ratio <= SPEED_TOLERANCE, (
                    f"{SPEED[kind]}{labels} = {value}: the server's real speed is "
                    f"{NOMINAL_TPS[kind]}"
                )
        for labels, value in s.matching(TTFT):
            assert 0 < value <= config.timeout, f"{TTFT}{labels} = {value}"
    for a, b in itertools.pairwise(scrapes):
        for kind in KINDS:
            _assert_round_figures(a, b, kind)


def _assert_round_figures(a: Scrape, b: Scrape, kind: Kind) -> None:
    """Between two scrapes: the counters grew at the honest speed, and not at all when every
    round of this kind in between failed."""
    rounds = delta(a, b, ATTEMPTS, probe=kind)
    failed = delta(a, b, FAILURES, probe=kind)
    tokens_a, tokens_b = a.series(TOKENS[kind]), b.series(TOKENS[kind])
    seconds_a, seconds_b = a.series(SECONDS[kind]), b.series(SECONDS[kind])
    for key in tokens_a.keys() & tokens_b.keys() & seconds_a.keys() & seconds_b.keys():
        d_tokens, d_seconds = tokens_b[key] - tokens_a[key], seconds_b[key] - seconds_a[key]
        if rounds > 0 and failed == rounds:
            assert (d_tokens, d_seconds) == (0, 0), (
                f"{kind}: {int(rounds)} round(s) failed "
                f"({reason_deltas(a, b, FAILURES, kind)}), yet its counters {key} grew by "
                f"{d_tokens} tokens and {d_seconds} s"
            )
        elif d_seconds > 0:
            speed = d_tokens / d_seconds
            assert 1 / SPEED_TOLERANCE <= speed / NOMINAL_TPS[kind] <= SPEED_TOLERANCE, (
                f"{kind}: counters {key} grew by {d_tokens} tokens in {d_seconds} s, "
                f"{speed:.1f} t/s; the server's real speed is {NOMINAL_TPS[kind]}"
            )
    if rounds > 0 and failed == rounds:
        assert last_ok(b, kind) == last_ok(a, kind), (
            f"{kind}: last success moved over {int(rounds)} failed round(s)"
        )


@dataclass(frozen=True)
class Fault:
    name: str
    params: dict[str, Any] = field(default_factory=dict)
    reasons: frozenset[str] = frozenset()  # any of these is the right reason
    kinds: tuple[Kind, ...] = KINDS  # the kinds that must fail with it
    down: bool = False  # discovery fails too: server_up must go to 0
    memory: bool = False  # RSS must stay bounded


def exercise(lab: Lab, fault: Fault, config: DaemonConfig) -> list[Scrape]:
    """Switch `fault` on, watch the daemon through it, heal, watch it recover.

    Returns the scrapes taken under the fault, after asserting what every case asserts."""
    exporter = lab.ready(config)
    guard = rss_guard(lab, exporter) if fault.memory else (lambda _: None)
    try:
        during = _under_fault(lab, exporter, fault, guard)
        recover(lab, exporter, during[-1], guard=guard)
    finally:
        lab.heal()  # whatever failed, an endless answer must not outlive its case
    return during


def _under_fault(
    lab: Lab, exporter: ExporterProcess, fault: Fault, guard: Callable[[Scrape], None]
) -> list[Scrape]:
    config = exporter.config
    before = exporter.scrape()
    lab.switch(fault.name, **fault.params)
    base = exporter.scrape()

    def counted(scrapes: list[Scrape]) -> bool:
        last = scrapes[-1]
        hit = all(
            any(reason_deltas(base, last, FAILURES, k).get(r) for r in fault.reasons)
            for k in fault.kinds
        )
        went_down = not fault.down or any(s.value(UP) == 0 for s in scrapes)
        gave_up = all(delta(base, last, ATTEMPTS, probe=k) >= GIVE_UP_ROUNDS for k in KINDS)
        return (hit and went_down) or gave_up

    deadline = GIVE_UP_ROUNDS * config.round_wait + MARGIN_S
    during = [base, *watch(exporter, counted, deadline, guard=guard)]
    last = during[-1]
    assert_no_wrong_figure([before, *during], config)
    for kind in fault.kinds:
        moved = reason_deltas(base, last, FAILURES, kind)
        assert fault.reasons & moved.keys(), (
            f"{fault.name}: {kind} probes failed with {moved or 'nothing'}, "
            f"expected {sorted(fault.reasons)}"
        )
    for kind in set(KINDS) - set(fault.kinds):
        # The other kind may time out with a slow round on a loaded machine; it must not be
        # blamed for the fault.
        moved = reason_deltas(base, last, FAILURES, kind)
        assert not fault.reasons & moved.keys(), (
            f"{fault.name} spares {kind} probes, yet they failed with {moved}"
        )
    if fault.down:
        assert any(s.value(UP) == 0 for s in during), f"{fault.name}: server_up never went to 0"
    return during


def recover(
    lab: Lab,
    exporter: ExporterProcess,
    last: Scrape,
    *,
    guard: Callable[[Scrape], None] = lambda _: None,
) -> list[Scrape]:
    """Heal, then a new successful round of each kind and server_up 1."""
    config = exporter.config
    lab.heal()
    healed = time.time()

    def recovered(scrapes: list[Scrape]) -> bool:
        s = scrapes[-1]
        return s.value(UP) == 1 and all(last_ok(s, k) > healed for k in KINDS)

    after = watch(exporter, recovered, 2 * config.round_wait + MARGIN_S, guard=guard)
    final = after[-1]
    assert recovered(after), (
        f"no successful round after healing: server_up {final.value(UP)}, failures since "
        f"{ {k: reason_deltas(last, final, FAILURES, k) for k in KINDS} }, skipped "
        f"{[(labels['reason'], v) for labels, v in final.matching(SKIPS) if v]}"
    )
    assert_no_wrong_figure([last, *after], config)
    lab.clean = True
    return after


# -- the cases -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fault",
    [
        Fault("drip", {"path": "/props", "interval_s": 1.0}),
        Fault("stall_mid_stream", {"path": "/props"}),
    ],
    ids=["drip", "stall_props"],
)
def test_discovery_reports_a_dripping_or_stalled_server_down_within_its_deadline(
    lab: Lab, fault: Fault
) -> None:
    # The round's own timeout is past the test's deadline: only discovery's can meet it.
    assert DISCOVERY.discovery_wait + MARGIN_S < DISCOVERY.timeout
    exporter = lab.ready(DISCOVERY)
    lab.switch(fault.name, **fault.params)
    switched = time.monotonic()
    deadline = DISCOVERY.discovery_wait + MARGIN_S
    during = watch(exporter, lambda s: s[-1].value(UP) == 0, deadline)
    took = time.monotonic() - switched
    assert during[-1].value(UP) == 0, (
        f"server_up still {during[-1].value(UP)} {took:.1f} s into the {fault.name}; discovery "
        f"should give up within {DISCOVERY.discovery_wait:g} s"
    )
    lab.heal()
    after = watch(exporter, lambda s: s[-1].value(UP) == 1, deadline)
    assert after[-1].value(UP) == 1, "server_up did not come back after the server recovered"
    assert_no_wrong_figure([*during, *after], DISCOVERY)
    lab.clean = True


@pytest.mark.parametrize(
    ("alias", "build", "want_model", "want_build"),
    [
        ("bad\udc80name", "b11434-\udc80", "bad\ufffdname", "b11434-\ufffd"),
        ("bad\x07\x1b\nname\x7f", "b1\x00\x1b[31m", "badname", "b1[31m"),
        ("m" * 300, "b" * 1000, "m" * 128, "b" * 128),
    ],
    ids=["lone_surrogate", "control_characters", "long"],
)
def test_labels_from_the_server_are_sanitised(
    lab: Lab, alias: str, build: str, want_model: str, want_build: str
) -> None:
    exporter = lab.ready(DISCOVERY)
    lab.switch("surrogate_label", alias=alias, build=build)

    def relabelled(scrapes: list[Scrape]) -> bool:
        return any(labels.get("model") != "tiny" for labels, _ in scrapes[-1].matching(INFO))

    during = watch(exporter, relabelled, DISCOVERY.discovery_wait + MARGIN_S)
    infos = [labels for labels, _ in during[-1].matching(INFO)]
    assert infos, "no llama_speed_server_info while the server is up"
    (info,) = infos
    # Capped at 128 characters: the prefix is kept (an ellipsis may end it).
    assert len(info["model"]) <= 128 and len(info["build"]) <= 128, info
    assert info["model"].rstrip("\u2026") == want_model[: len(info["model"].rstrip("\u2026"))]
    assert len(info["model"]) >= min(len(want_model), 100), info
    assert info["build"].rstrip("\u2026") == want_build[: len(info["build"].rstrip("\u2026"))]
    assert len(info["build"]) >= min(len(want_build), 100), info
    for s in during:
        for name, labels, _ in s.samples:
            for value in labels.values():
                assert value.isprintable() and len(value) <= 128, f"{name}{labels}"
                value.encode("utf-8")  # no lone surrogate
    lab.heal()
    after = watch(exporter, lambda s: not relabelled(s), DISCOVERY.discovery_wait + MARGIN_S)
    assert not relabelled(after), "the model label did not come back after the server did"
    lab.clean = True


FAULTS: Final = [
    Fault("reset_mid_stream", reasons=frozenset({"connect"})),
    Fault("stall_mid_stream", reasons=frozenset({"timeout"})),
    Fault("oversized_body", reasons=frozenset({"oversized"}), down=True, memory=True),
    Fault("endless_stream", {"path": "/props"}, frozenset({"oversized"}), down=True, memory=True),
    # The contract caps "a response body or an SSE line": a stream of short events that never
    # ends is cut by the cap on the body, or by the round's deadline where only lines are.
    Fault("endless_stream", {"path": "/completion"}, frozenset({"bad_response"}), memory=True),
    Fault("line_without_newline", reasons=frozenset({"oversized"}), memory=True),
    Fault("nan_timings", reasons=frozenset({"invalid_timings"})),
    Fault("inf_timings", {"literal": "Infinity"}, frozenset({"invalid_timings"})),
    Fault("inf_timings", {"literal": "1e999"}, frozenset({"invalid_timings"})),
    Fault("zero_timings", reasons=frozenset({"invalid_timings"})),
    Fault("negative_timings", reasons=frozenset({"invalid_timings"})),
    Fault("inflated_timings", reasons=frozenset({"inconsistent_timings"})),
    Fault("http_401_mid_run", {"after": 2}, frozenset({"unauthorized"}), down=True),
    Fault("http_500_mid_run", {"after": 2}, frozenset({"http_error"})),
    Fault("down", reasons=frozenset({"connect"}), down=True),
]


def _fault_id(fault: Fault) -> str:
    detail = fault.params.get("path") or fault.params.get("literal") or fault.params.get("kinds")
    if isinstance(detail, list):
        detail = "+".join(detail)
    return f"{fault.name}[{str(detail).strip('/')}]" if detail else fault.name


@pytest.mark.parametrize("fault", FAULTS, ids=[_fault_id(f) for f in FAULTS])
def test_fault_is_counted_exports_no_wrong_figure_and_heals(lab: Lab, fault: Fault) -> None:
    during = exercise(lab, fault, FAST)
    if fault.memory:
        peak = max(s.value(RSS) or 0.0 for s in during)
        assert peak < RSS_BOUND_BYTES, f"RSS peaked at {peak / 2**20:.0f} MiB"


def test_production_between_polls_discards_the_sample(lab: Lab) -> None:
    exporter = lab.ready(FAST)
    before = exporter.scrape()
    lab.switch("production_between_polls")
    base = exporter.scrape()

    def discarded(scrapes: list[Scrape]) -> bool:
        return any(delta(base, scrapes[-1], DISCARDS, probe=k, reason="overlap") for k in KINDS)

    during = [base, *watch(exporter, discarded, 2 * FAST.round_wait + MARGIN_S)]
    assert discarded(during), "no sample was discarded while production ran between polls"
    for kind in KINDS:
        moved = reason_deltas(base, during[-1], FAILURES, kind)
        assert not moved, f"an overlap is a discard, not a failure: {kind} failed with {moved}"
    assert_no_wrong_figure([before, *during], FAST)
    recover(lab, exporter, during[-1])


def test_slots_toggling_off_and_on_lets_rounds_resume(lab: Lab) -> None:
    exporter = lab.ready(FAST)
    lab.switch("slots_toggle")
    base = exporter.scrape()

    def skipped(scrapes: list[Scrape]) -> bool:
        return delta(base, scrapes[-1], SKIPS, reason="busy_unknown") > 0

    during = [base, *watch(exporter, skipped, 2 * FAST.round_wait + MARGIN_S)]
    assert skipped(during), "rounds were not skipped as busy_unknown while /slots was off"
    assert_no_wrong_figure(during, FAST)
    recover(lab, exporter, during[-1])


def test_fifo_model_path_neither_blocks_discovery_nor_sigterm(lab: Lab) -> None:
    exporter = lab.ready(FAST)
    fifo = lab.workdir / "model.gguf"
    with contextlib.suppress(FileExistsError):
        os.mkfifo(fifo)
    base = exporter.scrape()
    lab.switch("fifo_model_path", path=str(fifo))

    def counted(scrapes: list[Scrape]) -> bool:
        return delta(base, scrapes[-1], KV_ERRORS, reason="model_unreadable") > 0

    during = watch(exporter, counted, FAST.discovery_wait + MARGIN_S)
    # SIGTERM while the FIFO is still the model path: where discovery blocked on it, this is
    # where the process would hang.
    code, took = exporter.sigterm()
    lab.retire()
    lab.heal()
    log = exporter.log()
    assert counted(during), "reading a FIFO as the model did not count model_unreadable"
    assert code is not None, f"still running {SIGTERM_DEADLINE_S:g} s after SIGTERM:\n{log[-3000:]}"
    assert code == 0, log[-3000:]
    assert "exporter_stopped" in log and "Traceback" not in log, log[-3000:]
    assert took < SIGTERM_DEADLINE_S


# Timings that look honest but are not: the work takes far longer than claimed.
TIMING_FAULTS: Final = [
    Fault(
        "tiny_timings",
        {"kinds": ["prompt"]},
        frozenset({"inconsistent_timings"}),
        kinds=("prompt",),
    ),
    Fault(
        "tiny_timings",
        {"kinds": ["generation"]},
        frozenset({"inconsistent_timings"}),
        kinds=("generation",),
    ),
    Fault("one_bad_repetition", {"repetition": 2}, frozenset({"inconsistent_timings"})),
]


@pytest.mark.parametrize("fault", TIMING_FAULTS, ids=[_fault_id(f) for f in TIMING_FAULTS])
def test_timings_at_odds_with_the_clock_are_counted_and_export_nothing(
    lab: Lab, fault: Fault
) -> None:
    exercise(lab, fault, SLOW)


def test_sigterm_ends_the_daemon_during_a_stalled_completion(lab: Lab) -> None:
    exporter = lab.ready(SLOW)
    lab.switch("stall_mid_stream")
    deadline = time.monotonic() + SLOW.round_wait + MARGIN_S
    while lab.fake_state()["stalled"] == 0 and time.monotonic() < deadline:
        time.sleep(POLL_S)  # polling the fake for a held stream, within the deadline
    assert lab.fake_state()["stalled"] > 0, "no completion stream was stalled"
    assert exporter.scrape().value(UP) == 1
    code, took = exporter.sigterm()
    lab.retire()
    lab.heal()
    log = exporter.log()
    assert code is not None, f"still running {SIGTERM_DEADLINE_S:g} s after SIGTERM:\n{log[-3000:]}"
    assert code == 0, log[-3000:]
    assert "exporter_stopped" in log and "Traceback" not in log, log[-3000:]
    assert took < SIGTERM_DEADLINE_S


def test_proxy_variables_do_not_divert_target_traffic(lab: Lab) -> None:
    """HTTP_PROXY, HTTPS_PROXY and ALL_PROXY name a closed port: probes must still reach
    the server directly."""
    lab.heal()
    exporter = lab.start(PROXIED)

    def succeeded(scrapes: list[Scrape]) -> bool:
        s = scrapes[-1]
        return s.value(UP) == 1 and all(s.value(SUCCESS, probe=k) == 1 for k in KINDS)

    scrapes = watch(exporter, succeeded, STARTUP_DEADLINE_S / 2)
    last = scrapes[-1]
    assert succeeded(scrapes), (
        f"with proxy variables set: server_up {last.value(UP)}, failures "
        f"{ {k: reason_deltas(scrapes[0], last, FAILURES, k) for k in KINDS} }"
    )
    assert_no_wrong_figure(scrapes, PROXIED)
    lab.retire()
