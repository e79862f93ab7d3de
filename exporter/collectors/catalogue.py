"""The metric catalogue: every name the exporter serves, its type, labels and meaning.

The names are the public API (dashboards, rules and users depend on them), so they live in one
place; collectors build their families from here and the README table is checked against it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from exporter.llama.untrusted import clean_text

MetricType = Literal["gauge", "counter"]


@dataclass(frozen=True)
class Metric:
    name: str  # counters without the _total suffix, which the exposition adds
    type: MetricType
    labels: tuple[str, ...]
    help: str

    @property
    def exposed_name(self) -> str:
        return f"{self.name}_total" if self.type == "counter" else self.name

    def family(self) -> GaugeMetricFamily | CounterMetricFamily:
        if self.type == "counter":
            return _CleanCounter(self.name, self.help, labels=self.labels)
        return _CleanGauge(self.name, self.help, labels=self.labels)


# Label values come from servers and devices: each is made safe as it is added, so that one
# bad value (a lone surrogate, a control character, megabytes) changes only its own series
# and never fails the encoding of the whole exposition.
class _CleanGauge(GaugeMetricFamily):
    def add_metric(self, labels: Sequence[str], value: float, timestamp: Any = None) -> None:
        super().add_metric([clean_text(v) for v in labels], value, timestamp)


class _CleanCounter(CounterMetricFamily):
    def add_metric(
        self,
        labels: Sequence[str],
        value: float,
        created: float | None = None,
        timestamp: Any = None,
        exemplar: Any = None,
    ) -> None:
        labels = [clean_text(v) for v in labels]
        super().add_metric(labels, value, created, timestamp, exemplar)


SERIES: Final = ("target", "model", "ctx", "depth")
PER_KIND: Final = ("target", "probe")
_CACHED = (
    "Cached from the last valid probe round; see llama_speed_probe_last_success_timestamp_seconds."
)

PROMPT_TPS = Metric(
    "llama_speed_prompt_tokens_per_second",
    "gauge",
    SERIES,
    f"Prompt processing speed: fresh prompt tokens per second, from server timings. {_CACHED}",
)
GENERATION_TPS = Metric(
    "llama_speed_generation_tokens_per_second",
    "gauge",
    SERIES,
    f"Token generation speed (predicted_per_second), from the server's timings. {_CACHED}",
)
TTFT = Metric(
    "llama_speed_time_to_first_token_seconds",
    "gauge",
    SERIES,
    f"Client-measured time from sending a prompt probe to its first streamed token. {_CACHED}",
)
PROMPT_TOKENS = Metric(
    "llama_speed_probe_prompt_tokens",
    "counter",
    SERIES,
    "Prompt tokens decoded by valid prompt probes (the server's prompt_n).",
)
PROMPT_SECONDS = Metric(
    "llama_speed_probe_prompt_seconds",
    "counter",
    SERIES,
    "Seconds the server spent on valid prompt probes (prompt_ms / 1000).",
)
GENERATED_TOKENS = Metric(
    "llama_speed_probe_generated_tokens",
    "counter",
    SERIES,
    "Timed generation steps of valid generation probes (predicted_n - 1).",
)
GENERATION_SECONDS = Metric(
    "llama_speed_probe_generation_seconds",
    "counter",
    SERIES,
    "Seconds the server spent generating in valid generation probes (predicted_ms / 1000).",
)
PROBE_ENERGY = Metric(
    "llama_speed_probe_energy_joules",
    "counter",
    (*SERIES, "probe"),
    "GPU energy spent during valid probes (all GPUs' energy counters, read around each "
    "request); divide by the token counters for joules per token.",
)
_BAND = (
    "The band: the median of this series' valid rounds over the last 3 days (at most 256), "
    "from 12 rounds on; see docs/alerting.md."
)
PROMPT_BASELINE = Metric(
    "llama_speed_prompt_baseline_tokens_per_second",
    "gauge",
    SERIES,
    f"Usual prompt processing speed. {_BAND}",
)
PROMPT_BASELINE_SPREAD = Metric(
    "llama_speed_prompt_baseline_spread_tokens_per_second",
    "gauge",
    SERIES,
    "Robust spread of the rounds behind llama_speed_prompt_baseline_tokens_per_second: "
    "1.4826 x their median absolute deviation, a standard deviation unmoved by outliers.",
)
PROMPT_RECENT = Metric(
    "llama_speed_prompt_recent_tokens_per_second",
    "gauge",
    SERIES,
    "Median prompt processing speed of the last 3 valid rounds, confirmation rounds "
    "included: what the regression alerts compare with the baseline.",
)
GENERATION_BASELINE = Metric(
    "llama_speed_generation_baseline_tokens_per_second",
    "gauge",
    SERIES,
    f"Usual token generation speed. {_BAND}",
)
GENERATION_BASELINE_SPREAD = Metric(
    "llama_speed_generation_baseline_spread_tokens_per_second",
    "gauge",
    SERIES,
    "Robust spread of the rounds behind llama_speed_generation_baseline_tokens_per_second: "
    "1.4826 x their median absolute deviation, a standard deviation unmoved by outliers.",
)
GENERATION_RECENT = Metric(
    "llama_speed_generation_recent_tokens_per_second",
    "gauge",
    SERIES,
    "Median token generation speed of the last 3 valid rounds, confirmation rounds "
    "included: what the regression alerts compare with the baseline.",
)
BASELINE_ROUNDS = Metric(
    "llama_speed_baseline_rounds",
    "gauge",
    (*SERIES, "probe"),
    "Valid rounds the series' band holds (a baseline needs 12).",
)
BASELINE_HISTORY = Metric(
    "llama_speed_baseline_history_seconds",
    "gauge",
    (*SERIES, "probe"),
    "Seconds from the oldest round of the series' band to its newest: the regression alerts "
    "arm once it reaches their minimum history.",
)
CONFIRMATIONS = Metric(
    "llama_speed_probe_confirmations",
    "counter",
    ("target", "reason"),
    "Confirmation rounds run, by why: a round fell below_band or above_band of its series, "
    "or came back_in_band after a confirmed change.",
)
STORAGE_ERRORS = Metric(
    "llama_speed_storage_errors",
    "counter",
    ("target", "operation"),
    "Failed loads and saves of the bands' state file (--storage.path); the log says why.",
)
PROBE_SUCCESS = Metric(
    "llama_speed_probe_success",
    "gauge",
    PER_KIND,
    "1 if the last finished probe of this kind gave a valid sample, 0 if it failed.",
)
PROBE_DURATION = Metric(
    "llama_speed_probe_duration_seconds",
    "gauge",
    PER_KIND,
    "Wall-clock seconds of the last probe round's requests of this kind.",
)
PROBE_LAST_SUCCESS = Metric(
    "llama_speed_probe_last_success_timestamp_seconds",
    "gauge",
    PER_KIND,
    "Unix time of the last probe of this kind that gave a valid sample.",
)
PROBES = Metric(
    "llama_speed_probes",
    "counter",
    PER_KIND,
    "Probes started, whatever their outcome.",
)
PROBE_FAILURES = Metric(
    "llama_speed_probe_failures",
    "counter",
    (*PER_KIND, "reason"),
    "Probes that failed, by reason.",
)
PROBES_DISCARDED = Metric(
    "llama_speed_probes_discarded",
    "counter",
    (*PER_KIND, "reason"),
    "Probes whose sample was thrown away because production traffic overlapped them.",
)
PROBES_SKIPPED = Metric(
    "llama_speed_probes_skipped",
    "counter",
    ("target", "reason"),
    "Probe rounds (or depths) not started, by reason.",
)
DUTY_RATIO = Metric(
    "llama_speed_probe_duty_ratio",
    "gauge",
    ("target",),
    "Share of wall time spent probing this target over the trailing hour, or over one probe "
    "interval where that is longer.",
)
DUTY_BUDGET = Metric(
    "llama_speed_probe_duty_budget_ratio",
    "gauge",
    ("target",),
    "Configured maximum share of wall time for probes; rounds past it are skipped.",
)
PROBE_INTERVAL = Metric(
    "llama_speed_probe_interval_seconds",
    "gauge",
    ("target",),
    "Configured seconds between probe rounds.",
)
SERVER_UP = Metric(
    "llama_speed_server_up",
    "gauge",
    ("target",),
    "1 if the last read of the server's /props and /v1/models succeeded.",
)
SERVER_INFO = Metric(
    "llama_speed_server_info",
    "gauge",
    ("target", "model", "ctx", "quant", "build", "slots"),
    "What the server is serving, from /props; always 1.",
)
MODEL_LOADED = Metric(
    "llama_speed_model_loaded",
    "gauge",
    ("target", "model"),
    "1 if the model is loaded (router) or running (llama-swap), 0 if the server knows it but "
    "it is not; a single server's model is 1 while the server is up. Only loaded models are "
    "probed: a request naming another would load it.",
)
MODEL_PARAMETERS = Metric(
    "llama_speed_model_parameters",
    "gauge",
    ("target", "model"),
    "Parameters of the served model (meta.n_params of /v1/models).",
)
MODEL_SIZE = Metric(
    "llama_speed_model_size_bytes",
    "gauge",
    ("target", "model"),
    "Size of the served model's weights in bytes (meta.size of /v1/models).",
)
MODEL_TRAIN_CTX = Metric(
    "llama_speed_model_train_context_tokens",
    "gauge",
    ("target", "model"),
    "Context length the model was trained for (meta.n_ctx_train of /v1/models).",
)
BUILD_INFO = Metric(
    "llama_speed_exporter_build_info",
    "gauge",
    ("version", "python_version"),
    "Version of llama-speed-exporter; always 1.",
)
COLLECTOR_SUCCESS = Metric(
    "llama_speed_collector_success",
    "gauge",
    ("collector",),
    "1 if the collector rendered its metrics on this scrape, 0 if it failed.",
)
COLLECTOR_DURATION = Metric(
    "llama_speed_collector_duration_seconds",
    "gauge",
    ("collector",),
    "Seconds the collector took on this scrape.",
)

KV_LABELS: Final = ("target", "model", "ctx", "type_k", "type_v")
KV_BYTES_PER_TOKEN = Metric(
    "llama_speed_kv_cache_bytes_per_token",
    "gauge",
    KV_LABELS,
    "K and V bytes one token of context costs in the full-context attention layers, computed "
    "from the model's GGUF header and the cache types as llama.cpp allocates them.",
)
KV_CAPACITY_TOKENS = Metric(
    "llama_speed_kv_cache_capacity_tokens",
    "gauge",
    KV_LABELS,
    "Cells of the full-context KV cache over all slots (ctx padded to 256, per slot unless "
    "unified).",
)
KV_CAPACITY_BYTES = Metric(
    "llama_speed_kv_cache_capacity_bytes",
    "gauge",
    KV_LABELS,
    "Bytes of the KV cache as allocated, sliding-window caches and recurrent state included.",
)
KV_USED_TOKENS = Metric(
    "llama_speed_kv_cache_used_tokens",
    "gauge",
    KV_LABELS,
    "Tokens the slots hold now (sum of n_prompt_tokens in /slots).",
)
KV_ERRORS = Metric(
    "llama_speed_kv_cache_errors",
    "counter",
    ("target", "reason"),
    "Models whose KV cache could not be worked out, by reason; their KV gauges are absent.",
)
GENERATION_CEILING = Metric(
    "llama_speed_generation_ceiling_tokens_per_second",
    "gauge",
    ("target", "model"),
    "Memory-bandwidth bound on token generation: 1 / sum over GPUs of (weight bytes read per "
    "token x the process's share of memory on the GPU / the GPU's memory bandwidth).",
)

# The output canary (exporter/probe/canary.py): one fixed greedy request per round.
CANARY_LABELS: Final = ("target", "model")
CANARY_CHANGES = Metric(
    "llama_speed_canary_output_changes",
    "counter",
    CANARY_LABELS,
    "Times the canary's greedy output changed and the new output repeated on the next answer, "
    "while the model name and ctx stayed the same.",
)
CANARY_LAST_CHANGE = Metric(
    "llama_speed_canary_last_change_timestamp_seconds",
    "gauge",
    CANARY_LABELS,
    "Unix time of the canary answer that confirmed the last output change; absent before one.",
)
CANARY_PROBABILITY = Metric(
    "llama_speed_canary_token_probability",
    "gauge",
    CANARY_LABELS,
    "Mean probability the model gave the canary's chosen tokens in its last valid answer.",
)
CANARY_INFO = Metric(
    "llama_speed_canary_info",
    "gauge",
    (*CANARY_LABELS, "fingerprint"),
    "The canary's settled output: the first 12 hex digits of the SHA-256 of its token ids; "
    "always 1.",
)
CANARY_FAILURES = Metric(
    "llama_speed_canary_failures",
    "counter",
    ("target", "reason"),
    "Canary requests that gave no output to compare, by reason.",
)

# GPU state from NVML, read at scrape time (exporter/gpu).
GPU_LABELS: Final = ("gpu", "uuid", "name")
_JOIN = "gpu is NVML's index (PCI order, not CUDA's); join on uuid."

GPU_UP = Metric(
    "llama_speed_gpu_up",
    "gauge",
    (),
    "1 if NVML answered on this scrape, 0 if it could not (see llama_speed_gpu_errors_total).",
)
GPU_ERRORS = Metric(
    "llama_speed_gpu_errors",
    "counter",
    ("reason",),
    "GPU reads that failed, by reason: one per scrape while NVML cannot answer, one per GPU "
    "dropped or value lost on a scrape otherwise.",
)
GPU_INFO = Metric(
    "llama_speed_gpu_info",
    "gauge",
    ("gpu", "uuid", "name", "driver_version", "pci_bus_id"),
    f"Each GPU NVML lists; always 1. {_JOIN}",
)
GPU_MEMORY_USED = Metric(
    "llama_speed_gpu_memory_used_bytes",
    "gauge",
    GPU_LABELS,
    "GPU memory in use by all processes and the driver, in bytes.",
)
GPU_MEMORY_TOTAL = Metric(
    "llama_speed_gpu_memory_total_bytes",
    "gauge",
    GPU_LABELS,
    "GPU memory installed, in bytes.",
)
GPU_UTILIZATION = Metric(
    "llama_speed_gpu_utilization_ratio",
    "gauge",
    GPU_LABELS,
    "Share of NVML's last sample period (1/6 s to 1 s) in which a kernel ran on the GPU, 0-1.",
)
GPU_POWER = Metric(
    "llama_speed_gpu_power_watts",
    "gauge",
    GPU_LABELS,
    "Power draw of the GPU board in watts, as NVML reports it.",
)
GPU_ENERGY = Metric(
    "llama_speed_gpu_energy_joules",
    "counter",
    GPU_LABELS,
    "Energy the GPU consumed since the driver was loaded, in joules.",
)
GPU_TEMPERATURE = Metric(
    "llama_speed_gpu_temperature_celsius",
    "gauge",
    GPU_LABELS,
    "GPU core temperature in degrees Celsius.",
)
GPU_PROCESS_MEMORY = Metric(
    "llama_speed_gpu_process_memory_used_bytes",
    "gauge",
    ("target", "gpu", "uuid"),
    "GPU memory held by the target's llama-server process, in bytes; absent where the process "
    "is not on this host or not visible (see the exporter's log).",
)
GPU_MODEL_MEMORY = Metric(
    "llama_speed_gpu_model_memory_used_bytes",
    "gauge",
    ("target", "model", "gpu", "uuid"),
    "GPU memory held by the process serving one model behind a router (its child) or "
    "llama-swap, in bytes; absent where that process is not on this host or not visible.",
)

# The web config file's reloads (exporter/web/webconfig.py); served only with --web.config.file.
WEB_CONFIG_RELOAD_SUCCESS = Metric(
    "llama_speed_web_config_reload_success",
    "gauge",
    (),
    "1 if the last load of the web config file (--web.config.file) succeeded, 0 if it failed "
    "and the one before is still in force.",
)
LAST_WEB_CONFIG_RELOAD_SUCCESS = Metric(
    "llama_speed_web_config_last_reload_success_timestamp_seconds",
    "gauge",
    (),
    "Unix time of the last successful load of the web config file.",
)

GPU_METRICS: Final[tuple[Metric, ...]] = (
    GPU_UP, GPU_ERRORS, GPU_INFO,
    GPU_MEMORY_USED, GPU_MEMORY_TOTAL, GPU_UTILIZATION, GPU_POWER, GPU_ENERGY, GPU_TEMPERATURE,
    GPU_PROCESS_MEMORY, GPU_MODEL_MEMORY,
)  # fmt: skip

CATALOGUE: Final[tuple[Metric, ...]] = (
    PROMPT_TPS, GENERATION_TPS, TTFT,
    PROMPT_TOKENS, PROMPT_SECONDS, GENERATED_TOKENS, GENERATION_SECONDS, PROBE_ENERGY,
    PROMPT_BASELINE, PROMPT_BASELINE_SPREAD, PROMPT_RECENT,
    GENERATION_BASELINE, GENERATION_BASELINE_SPREAD, GENERATION_RECENT,
    BASELINE_ROUNDS, BASELINE_HISTORY, CONFIRMATIONS, STORAGE_ERRORS,
    PROBE_SUCCESS, PROBE_DURATION, PROBE_LAST_SUCCESS,
    PROBES, PROBE_FAILURES, PROBES_DISCARDED, PROBES_SKIPPED,
    DUTY_RATIO, DUTY_BUDGET, PROBE_INTERVAL,
    SERVER_UP, SERVER_INFO, MODEL_LOADED, MODEL_PARAMETERS, MODEL_SIZE, MODEL_TRAIN_CTX,
    BUILD_INFO, COLLECTOR_SUCCESS, COLLECTOR_DURATION,
    KV_BYTES_PER_TOKEN, KV_CAPACITY_TOKENS, KV_CAPACITY_BYTES, KV_USED_TOKENS, KV_ERRORS,
    GENERATION_CEILING,
    CANARY_CHANGES, CANARY_LAST_CHANGE, CANARY_PROBABILITY, CANARY_INFO, CANARY_FAILURES,
    *GPU_METRICS,
    WEB_CONFIG_RELOAD_SUCCESS, LAST_WEB_CONFIG_RELOAD_SUCCESS,
)  # fmt: skip
