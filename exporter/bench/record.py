"""What a bench writes to its JSON file: every sample, and everything known about each run.

The JSON is the source of truth: the Markdown report, `bench compare` and the chart are all
rendered from it, so a result recorded today can be compared with one recorded next year.
Loading validates it and says which field is wrong rather than failing somewhere in a renderer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, computed_field

from exporter.bench.files import write_private
from exporter.llama.router import TargetKind
from exporter.probe.results import Kind, Sample
from exporter.probe.stats import TestStats, summarize

SCHEMA: Final = "llama-speed-exporter/bench/v1"

# stable: the server loaded, stayed up, and every test measured cleanly.
# not_stable: the server did not load (exit, out of memory, timeout) or died while probed.
# probe_failed: the server stayed up but a test could not be measured (see `problems`).
# interrupted: Ctrl-C or SIGTERM arrived during the run; its samples so far are kept.
Status = Literal["stable", "not_stable", "probe_failed", "interrupted"]
Mode = Literal["launch", "target"]
STATUS_TEXT: Final[dict[Status, str]] = {
    "stable": "✅ Stable",
    "not_stable": "❌ Not stable",
    "probe_failed": "⚠️ Probe failed",
    "interrupted": "⏹️ Interrupted",
}


class BenchFileError(Exception):
    """A file that is not a readable bench result."""


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class SampleRecord(_Record):
    kind: Kind
    depth: int
    tokens: int  # prompt tokens decoded, or generation steps timed
    seconds: float
    time_to_first_token_seconds: float | None = None
    energy_joules: float | None = None
    timings: dict[str, float] = {}

    @computed_field  # type: ignore[prop-decorator]
    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @classmethod
    def of(cls, sample: Sample) -> SampleRecord:
        return cls(
            kind=sample.kind,
            depth=sample.depth,
            tokens=sample.tokens,
            seconds=sample.seconds,
            time_to_first_token_seconds=sample.time_to_first_token_seconds,
            energy_joules=sample.energy_joules,
            timings={k: float(v) for k, v in vars(sample.timings).items()},
        )


class GpuMemory(_Record):
    index: int
    name: str
    used_bytes: int | None  # the whole GPU, as nvidia-smi shows it
    total_bytes: int | None
    server_bytes: int | None  # what the server's processes hold on it, per NVML


class KvRecord(_Record):
    type_k: str
    type_v: str
    bytes_per_token: int
    cells: int | None = None
    bytes: int | None = None  # the cache the server allocates, from the GGUF header and options
    log_bytes: int | None = None  # what llama-server logged (needs -lv 4), for a cross-check


class ServerRecord(_Record):
    model: str
    model_path: str
    quant: str
    build: str
    n_ctx: int  # per slot, as /props reports it
    slots: int
    size_bytes: int | None = None
    n_ctx_train: int | None = None


# When a run's figures cannot be trusted to measure the server alone (docs/bench.md, "Host
# load"): other processes used more than a quarter of a core on average, or the hypervisor took
# more than 5 % of the CPU time. Either is enough to move a CPU-bound figure by more than the
# repetitions' noise, which Welch's test would then call a real difference.
OTHER_CORES_LIMIT: Final = 0.25
STEAL_PERCENT_LIMIT: Final = 5.0


class HostLoadRecord(_Record):
    """How busy the host was while a run measured, from the server's readiness to its last sample.

    Measured by `exporter.bench.load`; judged here, so that every renderer judges alike.
    """

    seconds: float  # wall time of the window
    cores: int  # CPUs in /proc/stat
    load1_start: float | None = None  # 1-minute load average; counts the server's own threads
    load1_end: float | None = None
    steal_percent: float | None = None  # of all CPU time in the window
    other_cpu_seconds: float | None = None  # busy CPU time not used by the bench or the server
    # Whether the server's processes were found and left out of `other_cpu_seconds`: a running
    # server on another host, or another user's, is not, and then is counted as "other".
    server_seen: bool = True

    @property
    def other_cores(self) -> float | None:
        """Other processes' CPU time per second of the window: cores kept busy on average."""
        if self.other_cpu_seconds is None or self.seconds <= 0:
            return None
        return self.other_cpu_seconds / self.seconds

    @property
    def other_percent(self) -> float | None:
        """The same, as a share of every core over the window."""
        cores = self.other_cores
        return None if cores is None else cores / self.cores * 100

    @computed_field  # type: ignore[prop-decorator]
    @property
    def disturbed(self) -> tuple[str, ...]:
        """Why the run's figures may not be the server's alone; empty when they are."""
        reasons = []
        cores = self.other_cores
        if self.server_seen and cores is not None and cores > OTHER_CORES_LIMIT:
            reasons.append(
                f"other processes used {cores:.2f} cores on average ({self.other_percent:.0f} % "
                f"of {self.cores}; limit {OTHER_CORES_LIMIT:g})"
            )
        if self.steal_percent is not None and self.steal_percent > STEAL_PERCENT_LIMIT:
            reasons.append(
                f"CPU steal {self.steal_percent:.1f} % (limit {STEAL_PERCENT_LIMIT:g} %)"
            )
        return tuple(reasons)


class Estimate(_Record):
    """A figure with the ± llama-perplexity prints beside it: the standard error of a mean."""

    value: float
    error: float


# measured: llama-perplexity printed every figure asked for.
# failed: it could not run, crashed, timed out, or printed no result (see `reason`).
# interrupted: Ctrl-C or SIGTERM arrived while it ran.
QualityStatus = Literal["measured", "failed", "interrupted"]
QualityMode = Literal["perplexity", "kl_divergence"]


class QualityRecord(_Record):
    """What llama-perplexity measured of a run's model and options (docs/quality.md).

    `perplexity`: PPL of the text. `kl_divergence`: the same text's tokens, read from the
    baseline's file, and how far this model's distributions are from the baseline's.
    """

    status: QualityStatus
    reason: str = ""
    mode: QualityMode
    text: str  # the text's file name
    text_sha256: str
    ctx: int  # llama-perplexity's -c
    chunks: int | None = None  # chunks evaluated, as llama-perplexity said
    baseline_model: str | None = None  # kl_divergence: the baseline model's file name
    baseline_model_bytes: int | None = None
    ppl: Estimate | None = None
    ppl_base: Estimate | None = None  # the baseline's PPL over the same tokens
    ppl_ratio: Estimate | None = None  # Mean PPL(Q)/PPL(base)
    ln_ppl_ratio: Estimate | None = None  # Mean ln(PPL(Q)/PPL(base))
    kld: Estimate | None = None  # mean KL divergence from the baseline, nats per token
    kld_median: float | None = None
    kld_p99: float | None = None
    kld_max: float | None = None
    same_top_percent: Estimate | None = None  # tokens whose most likely next token agrees
    command: tuple[str, ...] = ()  # as run, secrets redacted
    dropped_options: tuple[str, ...] = ()  # the server command's options left out, by name
    measured_in_run: int | None = None  # the run (1-based) after which it was measured
    seconds: float | None = None
    log_file: str | None = None
    log_lines: tuple[str, ...] = ()  # the tool's last lines when it failed, redacted


BaselineStatus = Literal["measured", "reused", "failed", "interrupted"]


class QualityBaselineRecord(_Record):
    """The reference distributions every run's KL divergence is measured against."""

    status: BaselineStatus
    reason: str = ""
    model: str | None = None  # file name of the baseline model; None for a reused file
    model_bytes: int | None = None
    logits_file: str  # llama-perplexity's --kl-divergence-base file
    logits_bytes: int | None = None  # its size once written
    estimated_bytes: int | None = None  # the most it could take, said before it was written
    n_vocab: int | None = None
    text: str
    text_sha256: str
    ctx: int
    chunks: int  # asked for
    n_chunk: int | None = None  # in the file: fewer when the text is short
    ppl: Estimate | None = None  # the baseline's own PPL
    command: tuple[str, ...] = ()
    seconds: float | None = None
    log_file: str | None = None
    log_lines: tuple[str, ...] = ()


class RunRecord(_Record):
    ctx: int | None  # the -c asked for; None against a running server
    status: Status
    reason: str = ""
    server: ServerRecord | None = None
    samples: tuple[SampleRecord, ...] = ()
    gpus: tuple[GpuMemory, ...] = ()
    gpu_note: str = ""  # why there are no VRAM figures
    server_rss_bytes: int | None = None
    kv: KvRecord | None = None
    kv_note: str = ""
    skipped_depths: tuple[int, ...] = ()
    problems: tuple[str, ...] = ()
    log_lines: tuple[str, ...] = ()
    log_file: str | None = None
    load_seconds: float | None = None
    duration_seconds: float = 0.0
    host_load: HostLoadRecord | None = None  # None: not recorded (a failed start, an old file)
    quality: QualityRecord | None = None  # None: not asked for (no --quality-text)

    @property
    def disturbed(self) -> tuple[str, ...]:
        """Why host load makes this run's figures untrustworthy; empty when it does not."""
        return self.host_load.disturbed if self.host_load is not None else ()

    @property
    def n_ctx(self) -> int | None:
        """The server's context per slot, as /props reports it."""
        return self.server.n_ctx if self.server else self.ctx

    @property
    def context(self) -> int | None:
        """What a run is known by: the -c it was launched with, else the server's context."""
        return self.ctx if self.ctx is not None else self.n_ctx

    @computed_field  # type: ignore[prop-decorator]
    @property
    def tests(self) -> tuple[TestStats, ...]:
        """Mean and spread per test, derived from `samples`; ignored when a file is loaded."""
        return summarize(self.samples)

    @property
    def vram_used_bytes(self) -> int | None:
        used = [g.used_bytes for g in self.gpus if g.used_bytes is not None]
        return sum(used) if used else None

    @property
    def vram_server_bytes(self) -> int | None:
        held = [g.server_bytes for g in self.gpus if g.server_bytes is not None]
        return sum(held) if held else None


class HostGpu(_Record):
    index: int
    name: str
    total_bytes: int | None


class HostRecord(_Record):
    hostname: str
    cpu: str
    cpu_count: int
    memory_bytes: int | None
    gpus: tuple[HostGpu, ...] = ()
    driver_version: str | None = None


class PlanRecord(_Record):
    prompt_tokens: tuple[int, ...]
    generation_tokens: tuple[int, ...]
    depths: tuple[int, ...]
    repetitions: int
    warmup: bool


class BenchRecord(_Record):
    schema_: str = SCHEMA
    label: str
    mode: Mode
    started_at: str  # ISO 8601, UTC
    finished_at: str | None = None
    exporter_version: str
    command: tuple[str, ...] | None = None  # launch mode, secrets redacted, without -c/--port
    target: str | None = None  # target mode
    # Target mode: what answered at `target` ("single", "router" or "llama-swap"; None where
    # it could not be asked), and the model measured there (behind a router or llama-swap,
    # or named with --model). None in a file written before bench knew of them.
    target_kind: TargetKind | None = None
    target_model: str | None = None
    llama_cpp_build: str = "unknown"
    host: HostRecord
    plan: PlanRecord
    runs: tuple[RunRecord, ...] = ()
    interrupted: bool = False
    quality_baseline: QualityBaselineRecord | None = None  # None: no --quality-baseline

    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)

    def to_json(self) -> str:
        data = {"schema": self.schema_, **self.model_dump(mode="json", exclude={"schema_"})}
        return json.dumps(data, indent=2, ensure_ascii=False) + "\n"

    def save(self, path: Path) -> None:
        """Write atomically and privately (see `exporter.bench.files`)."""
        write_private(path, self.to_json())


def load(path: Path) -> BenchRecord:
    """Read a bench JSON file; raises BenchFileError naming the file and what is wrong."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise BenchFileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BenchFileError(f"{path}: not JSON: {exc}") from None
    if not isinstance(data, dict):
        kind = "list" if isinstance(data, list) else "string" if isinstance(data, str) else "value"
        raise BenchFileError(f"{path}: not a bench result (a JSON {kind}, not an object)")
    if data.get("schema") != SCHEMA:
        found = data.get("schema")
        raise BenchFileError(f"{path}: not a bench result (schema {found!r}, want {SCHEMA!r})")
    data["schema_"] = data.pop("schema")
    try:
        return BenchRecord.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise BenchFileError(f"{path}: {where}: {first['msg']}") from None
