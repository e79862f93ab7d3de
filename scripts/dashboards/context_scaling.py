"""llama-speed / Context scaling: PP, TG, VRAM per GPU and KV cache per model, context and depth,
side by side like a hand-made benchmark report."""

from __future__ import annotations

from grafana_foundation_sdk.builders.bargauge import Panel as BarGauge
from grafana_foundation_sdk.builders.dashboard import Dashboard, Row
from grafana_foundation_sdk.models import dashboard as model
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

from .panels import (
    NO_KV,
    NO_PROBE,
    NO_PROCESS_MEMORY,
    bar_gauge,
    data_table,
    organize,
    prop,
    steps,
    transformation,
)
from .queries import (
    BY_CACHE,
    BY_CTX,
    BY_DEPTH,
    SERVED,
    SERVED_BY,
    TARGET,
    instant,
    matchers,
)
from .shell import board

UID = "llama-speed-context-scaling"
PP = "llama_speed_prompt_tokens_per_second"
TG = "llama_speed_generation_tokens_per_second"
TTFT = "llama_speed_time_to_first_token_seconds"
KV = "llama_speed_kv_cache"
KV_BYTES = f"{KV}_capacity_bytes"
# One row per cache layout: the same model and ctx with another -ctk/-ctv is another figure.
PER_CACHE = "target, model, ctx, type_k, type_v"
TABLE = PromQueryFormat.TABLE
KEPT = (
    "Median speed at each depth over the median at depth 0, for the same target, model and ctx:"
    " 100% is a flat curve. Orange below 80%, red below 50%."
)


def median(metric: str, selector: str = SERVED, by: str = "target, model, ctx, depth") -> str:
    """The median over the time range: one figure per configuration, as a report gives it."""
    return f"max by ({by}) (quantile_over_time(0.5, {metric}{selector}[$__range]))"


def latest(metric: str, by: str) -> str:
    return f"max by ({by}) (last_over_time({metric}{SERVED}[$__range]))"


def peak_vram(per_gpu: bool) -> str:
    """The most memory llama-server's process held (per GPU, or on all together) while it served
    each model and ctx: the process metric has neither label, so it borrows them from the
    target's llama_speed_server_info. Only a target that serves one model can lend them: behind
    a router or llama-swap several models share the target, the join would match each of them
    and Prometheus would refuse the whole query, so the `== 1` leaves such targets out."""
    held = (
        "max by (instance, target, gpu)" if per_gpu else "sum by (instance, target)"
    ) + f" (llama_speed_gpu_process_memory_used_bytes{TARGET})"
    by = "target, model, ctx, gpu" if per_gpu else "target, model, ctx"
    return (
        f"max by ({by}) (max_over_time((\n"
        f"  {held}\n"
        "  * on(instance, target) group_left(model, ctx)\n"
        f"  (max by (instance, target, model, ctx) (llama_speed_server_info{SERVED})\n"
        "   and on(instance, target)\n"
        f"   count by (instance, target) (llama_speed_server_info{TARGET}) == 1)\n"
        ")[$__range:$__interval]))"
    )


def one_decimal(unit: str) -> list[model.DynamicConfigValue]:
    return [prop("unit", unit), prop("decimals", 1)]


def by_depth(title: str, metric: str, unit: str, decimals: int) -> BarGauge:
    return (
        bar_gauge(title, "Median over the time range for each target, model, ctx and depth.")
        .unit(unit)
        .decimals(decimals)
        .thresholds(steps("blue"))
        .no_value(NO_PROBE)
        .with_target(instant(median(metric), BY_DEPTH))
        .span(8)
        .height(10)
    )


def kept_at_depth(title: str, metric: str) -> BarGauge:
    at_depth_0 = median(metric, matchers(*SERVED_BY, depth="0"), by="target, model, ctx")
    return (
        bar_gauge(title, KEPT)
        .unit("percentunit")
        .max(1)
        .thresholds(steps("red", ("orange", 0.5), ("green", 0.8)))
        .no_value("no depth-0 figures: probe.depths must include 0 and a deeper depth")
        .with_target(
            instant(
                f"{median(metric)}\n/ on(target, model, ctx) group_left\n{at_depth_0}", BY_DEPTH
            )
        )
        .span(12)
        .height(8)
    )


def report(built: Dashboard) -> Dashboard:
    return built.with_row(Row("Configurations compared (like the benchmark report)")).with_panel(
        data_table(
            "Speed and memory per model, context and depth",
            "One row per target, model, ctx and depth seen in the time range: PP, TG and TTFT are"
            " the medians of the probe rounds in the range; GPU n VRAM and Total VRAM the peak"
            " that llama-server's process held while it served that model and ctx; KV cache the"
            " allocated size and its bytes per token. Widen the time range to compare runs of two"
            " quants (or two contexts) one after the other, as the owner's report does. Sorted by"
            " context.",
        )
        .unit("bytes")
        .no_value(NO_PROBE)
        .override_by_name("PP", one_decimal("suffix: tok/s"))
        .override_by_name("TG", one_decimal("suffix: tok/s"))
        .override_by_name("TTFT", [prop("unit", "s"), prop("decimals", 2)])
        .override_by_name("Context", [prop("unit", "locale")])
        .override_by_name("Depth", [prop("unit", "locale")])
        .override_by_name("Model", [prop("custom.width", 380)])
        .override_by_regexp("^GPU[0-9]+ VRAM$", one_decimal("bytes"))
        .override_by_name("Total VRAM", one_decimal("bytes"))
        .override_by_name("KV cache", one_decimal("bytes"))
        .override_by_name("KV per token", one_decimal("bytes"))
        .with_target(instant(median(PP), ref="A", fmt=TABLE))
        .with_target(instant(median(TG), ref="B", fmt=TABLE))
        .with_target(instant(median(TTFT), ref="C", fmt=TABLE))
        # A series per GPU, which labelsToFields turns into a column per GPU.
        .with_target(instant(peak_vram(per_gpu=True), ref="D"))
        .with_target(instant(peak_vram(per_gpu=False), ref="E", fmt=TABLE))
        .with_target(instant(latest(KV_BYTES, PER_CACHE), ref="F", fmt=TABLE))
        .with_target(instant(latest(f"{KV}_bytes_per_token", PER_CACHE), ref="G", fmt=TABLE))
        .with_target(
            instant(
                latest("llama_speed_server_info", "target, model, ctx, quant"), ref="H", fmt=TABLE
            )
        )
        .with_transformation(
            transformation("labelsToFields", {"mode": "columns", "valueLabel": "gpu"})
        )
        .with_transformation(transformation("merge"))
        .with_transformation(
            transformation(
                "convertFieldType",
                {
                    "fields": {},
                    # Labels are strings: as numbers, 32768 sorts after 4096.
                    "conversions": [
                        {"targetField": "ctx", "destinationType": "number"},
                        {"targetField": "depth", "destinationType": "number"},
                    ],
                },
            )
        )
        .with_transformation(transformation("sortBy", {"fields": {}, "sort": [{"field": "ctx"}]}))
        .with_transformation(
            organize(
                [
                    ("ctx", "Context"),
                    ("model", "Model"),
                    ("quant", "Quant"),
                    ("depth", "Depth"),
                    ("Value #A", "PP"),
                    ("Value #B", "TG"),
                    ("Value #C", "TTFT"),
                    # The GPU columns, up to four, named by the renameByRegex below.
                    ("0", None),
                    ("1", None),
                    ("2", None),
                    ("3", None),
                    ("Value #E", "Total VRAM"),
                    ("Value #F", "KV cache"),
                    ("Value #G", "KV per token"),
                    ("type_k", "K cache"),
                    ("type_v", "V cache"),
                    ("target", "Target"),
                ],
                # Value #H is llama_speed_server_info's constant 1, queried for its quant label.
                hidden=["Time", "Value #H", "Value"],
            )
        )
        .with_transformation(
            transformation("renameByRegex", {"regex": "^([0-9]+)$", "renamePattern": "GPU$1 VRAM"})
        )
        .span(24)
        .height(11)
    )


def speed_against_depth(built: Dashboard) -> Dashboard:
    return (
        built.with_row(Row("Speed against depth"))
        .with_panel(by_depth("PP against depth", PP, "suffix: tok/s", 1))
        .with_panel(by_depth("TG against depth", TG, "suffix: tok/s", 1))
        .with_panel(by_depth("Time to first token against depth", TTFT, "s", 2))
        .with_panel(kept_at_depth("PP kept at depth (share of depth 0)", PP))
        .with_panel(kept_at_depth("TG kept at depth (share of depth 0)", TG))
    )


def memory_against_context(built: Dashboard) -> Dashboard:
    return (
        built.with_row(Row("Memory against context"))
        .with_panel(
            bar_gauge(
                "Total VRAM per model and context (peak)",
                "The most memory llama-server's process held on all GPUs together while it"
                " served each model and ctx in the time range.",
            )
            .unit("bytes")
            .decimals(1)
            .thresholds(steps("blue"))
            .no_value(NO_PROCESS_MEMORY)
            .with_target(instant(peak_vram(per_gpu=False), BY_CTX))
            .span(12)
            .height(8)
        )
        .with_panel(
            bar_gauge(
                "KV cache per model and context",
                "Allocated KV cache for each model and ctx seen in the time range.",
            )
            .unit("bytes")
            .decimals(1)
            .thresholds(steps("blue"))
            .no_value(NO_KV)
            .with_target(instant(latest(KV_BYTES, PER_CACHE), BY_CACHE))
            .span(12)
            .height(8)
        )
    )


def dashboard() -> Dashboard:
    return board(
        UID,
        "Context scaling",
        "PP, TG, VRAM per GPU and KV cache per model, context and depth, side by side, like a"
        " hand-made benchmark report: widen the time range to compare two quants or contexts.",
        "now-7d",
        (report, speed_against_depth, memory_against_context),
    )
