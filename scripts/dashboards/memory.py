"""llama-speed / Memory and power: VRAM per GPU and llama-server's share of it, the KV cache,
power, heat, energy per token and TG against its memory-bandwidth ceiling."""

from __future__ import annotations

from grafana_foundation_sdk.builders.dashboard import Dashboard, Row, ThresholdsConfig
from grafana_foundation_sdk.builders.timeseries import Panel as TimeSeries

from .panels import (
    NO_GPU,
    NO_KV,
    NO_PROCESS_MEMORY,
    bar_gauge,
    dashed,
    reasons,
    single_stat,
    steps,
    threshold_areas,
    time_series,
    up_or_down,
)
from .queries import (
    BY_CACHE,
    BY_CTX,
    BY_DEPTH,
    BY_GPU,
    EXPORTER,
    MODEL,
    SERVED,
    SERVED_BY,
    TARGET,
    instant,
    matchers,
    series,
)
from .shell import board

UID = "llama-speed-memory"
USED = "llama_speed_gpu_memory_used_bytes"
INSTALLED = "llama_speed_gpu_memory_total_bytes"
PROCESS = "llama_speed_gpu_process_memory_used_bytes"
KV = "llama_speed_kv_cache"
CEILING = "llama_speed_generation_ceiling_tokens_per_second"


def nearly_full() -> ThresholdsConfig:
    return steps("green", ("orange", 0.9), ("red", 0.95))


def per_gpu(title: str, description: str, unit: str, metric: str) -> TimeSeries:
    return (
        time_series(title, description)
        .unit(unit)
        .thresholds(steps("green"))
        .no_value(NO_GPU)
        .with_target(series(f"{metric}{EXPORTER}", BY_GPU))
        .span(8)
        .height(8)
    )


def energy_per_token(probe: str, tokens: str) -> str:
    """Joules of one probe kind over its tokens: the energy counter carries the probe label,
    the token counters do not."""
    energy = f"llama_speed_probe_energy_joules_total{matchers(*SERVED_BY, probe=probe)}"
    return (
        f"rate({energy}[1h])\n"
        f"/ ignoring(probe) rate(llama_speed_probe_{tokens}_tokens_total{SERVED}[1h])"
    )


def gpu_memory(built: Dashboard) -> Dashboard:
    return (
        built.with_row(Row("GPU memory"))
        .with_panel(
            up_or_down(
                "GPU up",
                "1 if NVML answered on the last scrape. Down: see the errors by reason.",
                "down",
                "up",
            )
            .no_value("no GPU collector: --collector.gpu=false on this exporter")
            .with_target(instant(f"llama_speed_gpu_up{EXPORTER}", "{{instance}}"))
            .span(4)
            .height(5)
        )
        .with_panel(
            reasons(
                "GPU read errors by reason (time range)",
                "library_not_found, driver_not_loaded, driver_mismatch, no_permission, no_gpu,"
                " gpu_lost, error. 'none' when NVML answered every time.",
                metric="llama_speed_gpu_errors_total",
                by="instance",
                selector=EXPORTER,
                unit="errors",
                thresholds=steps("green", ("red", 0.5)),
                no_value=NO_GPU,
            )
            .span(8)
            .height(5)
        )
        .with_panel(
            bar_gauge(
                "VRAM used per GPU",
                "Memory in use on each card (all processes and the driver) over the memory"
                " installed. Orange above 90%, red above 95%.",
            )
            .unit("percentunit")
            .max(1)
            .thresholds(nearly_full())
            .no_value(NO_GPU)
            .with_target(instant(f"{USED}{EXPORTER}\n/ {INSTALLED}{EXPORTER}", BY_GPU))
            .span(12)
            .height(5)
        )
        .with_panel(
            time_series(
                "VRAM per GPU: used, installed and llama-server's own",
                "Each card's memory in use (all processes), installed (dashed) and held by the"
                " target's llama-server process, as nvidia-smi shows per process.",
            )
            .unit("bytes")
            .min(0)
            .thresholds(steps("green"))
            .no_value(NO_GPU)
            .override_by_regexp(".* installed$", dashed())
            .with_target(series(f"{USED}{EXPORTER}", "GPU {{gpu}} used (all processes)", "A"))
            .with_target(series(f"{INSTALLED}{EXPORTER}", "GPU {{gpu}} installed", "B"))
            .with_target(series(f"{PROCESS}{TARGET}", "GPU {{gpu}} llama-server {{target}}", "C"))
            .span(16)
            .height(9)
        )
        .with_panel(
            bar_gauge(
                "llama-server's share of each GPU",
                "Memory the target's llama-server process holds on each card over the card's"
                " memory: a tensor split (-ts 1,1) shows one bar per card.",
            )
            .unit("percentunit")
            .max(1)
            .thresholds(nearly_full())
            .no_value(NO_PROCESS_MEMORY)
            .with_target(
                instant(
                    f"{PROCESS}{TARGET}\n/ on(instance, uuid) group_left(name)\n"
                    f"{INSTALLED}{EXPORTER}",
                    "{{target}} on GPU {{gpu}} {{name}}",
                )
            )
            .span(8)
            .height(9)
        )
    )


def kv_cache(built: Dashboard) -> Dashboard:
    return (
        built.with_row(Row("KV cache"))
        .with_panel(
            single_stat(
                "KV cache allocated",
                "Bytes of the whole KV cache as llama.cpp allocates it: full-context cells,"
                " sliding-window cache and recurrent state.",
            )
            .unit("bytes")
            .thresholds(steps("green"))
            .no_value(NO_KV)
            .with_target(instant(f"{KV}_capacity_bytes{SERVED}", BY_CACHE))
            .span(6)
            .height(6)
        )
        .with_panel(
            single_stat(
                "KV bytes per token",
                "K+V bytes one token of context costs in the full-context attention layers.",
            )
            .unit("bytes")
            .thresholds(steps("green"))
            .no_value(
                "no KV figures: model file not readable here; see llama_speed_kv_cache_errors_total"
            )
            .with_target(instant(f"{KV}_bytes_per_token{SERVED}", BY_CACHE))
            .span(6)
            .height(6)
        )
        .with_panel(
            bar_gauge(
                "KV cache in use",
                "Tokens the slots hold over the cells of the full-context cache. Orange above"
                " 90%, red above 95%.",
            )
            .unit("percentunit")
            .max(1)
            .thresholds(nearly_full())
            .no_value(NO_KV)
            .with_target(
                instant(f"{KV}_used_tokens{SERVED}\n/ {KV}_capacity_tokens{SERVED}", BY_CACHE)
            )
            .span(6)
            .height(6)
        )
        .with_panel(
            reasons(
                "KV errors by reason (since exporter start)",
                "Models whose cache could not be worked out: model_unreadable, model_invalid,"
                " unknown_architecture, unknown_cache_type, bad_server_args. 'none' when every"
                " model was read.",
                metric=f"{KV}_errors_total",
                by="target",
                selector=TARGET,
                over_range=False,
                unit="models",
                thresholds=steps("green", ("red", 1)),
                no_value="no KV counters for the selected targets",
            )
            .span(6)
            .height(6)
        )
        .with_panel(
            time_series(
                "KV cache tokens: held and capacity",
                "Tokens the slots hold (n_prompt_tokens over /slots) and the full-context cells"
                " (dashed).",
            )
            .unit("suffix: tok")
            .min(0)
            .thresholds(steps("green"))
            .no_value(NO_KV)
            .override_by_regexp(".* capacity$", dashed())
            .with_target(series(f"{KV}_used_tokens{SERVED}", f"{BY_CTX} held", "A"))
            .with_target(series(f"{KV}_capacity_tokens{SERVED}", f"{BY_CTX} capacity", "B"))
            .span(12)
            .height(8)
        )
        .with_panel(
            time_series(
                "KV cache bytes: held and allocated",
                "Bytes the held tokens take in the full-context layers (tokens x bytes per"
                " token) and the bytes allocated for the whole cache (dashed).",
            )
            .unit("bytes")
            .min(0)
            .thresholds(steps("green"))
            .no_value(NO_KV)
            .override_by_regexp(".* allocated$", dashed())
            .with_target(
                series(
                    f"{KV}_used_tokens{SERVED}\n* {KV}_bytes_per_token{SERVED}",
                    f"{BY_CTX} held",
                    "A",
                )
            )
            .with_target(series(f"{KV}_capacity_bytes{SERVED}", f"{BY_CTX} allocated", "B"))
            .span(12)
            .height(8)
        )
    )


def power_and_efficiency(built: Dashboard) -> Dashboard:
    return (
        built.with_row(Row("Power, heat and efficiency"))
        .with_panel(
            per_gpu(
                "Power draw", "Board power of each GPU.", "watt", "llama_speed_gpu_power_watts"
            ).min(0)
        )
        .with_panel(
            per_gpu(
                "Temperature",
                "Core temperature of each GPU. Orange above 80 °C, red above 90 °C: a hot card"
                " throttles, and TG drops with it.",
                "celsius",
                "llama_speed_gpu_temperature_celsius",
            )
            .thresholds(steps("green", ("orange", 80), ("red", 90)))
            .thresholds_style(threshold_areas())
        )
        .with_panel(
            per_gpu(
                "Utilization",
                "Share of NVML's sample period in which a kernel ran on each GPU.",
                "percentunit",
                "llama_speed_gpu_utilization_ratio",
            )
            .min(0)
            .max(1)
        )
        .with_panel(
            time_series(
                "Energy per token (1h)",
                "GPU energy of valid probes over their tokens in the trailing hour: joules per"
                " generated token and per prompt token. Includes the cards' idle draw.",
            )
            .unit("suffix: J/tok")
            .min(0)
            .thresholds(steps("green"))
            .no_value("no energy figures: needs GPU metrics and a valid probe in the last hour")
            .with_target(
                series(energy_per_token("generation", "generated"), f"{BY_DEPTH} · TG", "A")
            )
            .with_target(series(energy_per_token("prompt", "prompt"), f"{BY_DEPTH} · PP", "B"))
            .span(12)
            .height(8)
        )
        .with_panel(
            time_series(
                "TG as a share of the memory-bandwidth ceiling",
                "TG speed over the bound that memory bandwidth puts on it (every weight read once"
                " per token): how much of the hardware the setup uses. Above 100% means the"
                " ceiling's assumptions do not hold (docs/kv-cache.md).",
            )
            .unit("percentunit")
            .min(0)
            .thresholds(steps("green", ("orange", 1)))
            .no_value(
                "no ceiling: needs the model file and llama-server's memory per GPU (process"
                " visible to the exporter)"
            )
            .with_target(
                series(
                    f"llama_speed_generation_tokens_per_second{SERVED}\n"
                    f"/ on(instance, target, model) group_left\n{CEILING}{MODEL}",
                    BY_DEPTH,
                )
            )
            .span(8)
            .height(8)
        )
        .with_panel(
            single_stat("TG ceiling", "The memory-bandwidth bound on TG for each model.")
            .unit("suffix: tok/s")
            .decimals(1)
            .thresholds(steps("green"))
            .no_value("no ceiling: needs the model file and llama-server's memory per GPU")
            .with_target(instant(f"{CEILING}{MODEL}", "{{target}} · {{model}}"))
            .span(4)
            .height(8)
        )
    )


def dashboard() -> Dashboard:
    return board(
        UID,
        "Memory and power",
        "VRAM per GPU and llama-server's share, the KV cache, power, temperature, energy per"
        " token and TG against its memory-bandwidth ceiling.",
        "now-6h",
        (gpu_memory, kv_cache, power_and_efficiency),
    )
