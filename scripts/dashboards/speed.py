"""llama-speed / Speed: PP, TG and time to first token against their baselines, and the probes'
own health."""

from __future__ import annotations

from grafana_foundation_sdk.builders.dashboard import Dashboard, Row
from grafana_foundation_sdk.builders.stat import Panel as Stat
from grafana_foundation_sdk.builders.table import Panel as Table
from grafana_foundation_sdk.builders.timeseries import Panel as TimeSeries
from grafana_foundation_sdk.models import dashboard as model
from grafana_foundation_sdk.models.common import (
    LineInterpolation,
    TableCellBackgroundDisplayMode,
    TableColoredBackgroundCellOptions,
)
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

from .panels import (
    NO_PROBE,
    SPEED_CALCS,
    bar_gauge,
    dashed,
    data_table,
    dotted,
    organize,
    prop,
    reasons,
    round_points,
    single_stat,
    steps,
    threshold_areas,
    time_series,
    transformation,
    up_or_down,
)
from .queries import (
    BY_DEPTH,
    EXPORTER,
    MODEL,
    RULE,
    SERVED,
    TARGET,
    instant,
    matchers,
    series,
)
from .settings import (
    CRITICAL_SHARE,
    CRITICAL_SPREAD_MULTIPLE,
    MIN_BAND_ROUNDS,
    MIN_HISTORY_HOURS,
    SPREAD_MULTIPLE,
    WARNING_SHARE,
    min_history_hours,
    setting,
    threshold,
)
from .shell import board

UID = "llama-speed-speed"
NO_BASELINE = (
    f"no baseline yet: the exporter gives a series one from its {MIN_BAND_ROUNDS}th valid round"
    " on (see Regression alerting)"
)
BY_PROBE = "{{target}} {{probe}}"
BY_SERIES = "instance, target, model, ctx, depth, probe"
TTFT = "llama_speed_time_to_first_token_seconds"
RED = prop("color", model.FieldColor(mode=model.FieldColorModeId.FIXED, fixed_color="red"))


def rule(kind: str, window: str) -> str:
    """A recording rule of deploy/prometheus/rules: kind is prompt or generation."""
    return f"target_model_ctx_depth:llama_speed_{kind}_tokens_per_second:{window}{RULE}"


def exported(kind: str, figure: str) -> str:
    """One of the exporter's per-series speed gauges: figure is "" (the latest round),
    "recent_" (median of the last 3 rounds) or "baseline_" (the band's median)."""
    return f"llama_speed_{kind}_{figure}tokens_per_second{SERVED}"


def share(name: str) -> float:
    """A regression share as the level a speed falls to: 0.10 is 90% of the baseline."""
    return round(1 - setting(name), 6)


def share_of_baseline(title: str, kind: str) -> Stat:
    warning, critical = share(WARNING_SHARE), share(CRITICAL_SHARE)
    return (
        single_stat(
            title,
            "Median of the last 3 rounds (confirmation rounds included) as a share of the"
            " exporter's baseline, the median of the series' last 3 days of rounds: the figure"
            f" the regression alerts compare. Orange below {warning:.0%}, red below"
            f" {critical:.0%}: the alerts' warning and critical shares ({WARNING_SHARE},"
            f" {CRITICAL_SHARE}). A noisy series pages only further down, at"
            f" {setting(SPREAD_MULTIPLE):g} of its spreads (critical:"
            f" {setting(CRITICAL_SPREAD_MULTIPLE):g}): the speed graphs below draw its own"
            " warning line. An alert also needs the series armed (Regression alerting).",
        )
        .unit("percentunit")
        .decimals(1)
        .thresholds(steps("red", ("orange", critical), ("green", warning)))
        .no_value(NO_BASELINE)
        .with_target(
            instant(f"{exported(kind, 'recent_')}\n/ {exported(kind, 'baseline_')}", BY_DEPTH)
        )
        .span(6)
        .height(5)
    )


def speed_curve(title: str, kind: str, tokens: str) -> TimeSeries:
    return (
        time_series(
            title,
            f"{tokens} tokens per second of the last valid round (points, confirmation rounds"
            " included), the token-weighted speed over the last hour (recording rule rate1h),"
            " the exporter's baseline (dashed: the median of the series' last 3 days of rounds)"
            " and the warning threshold (dotted red: the baseline less the series' own"
            f" threshold, {setting(WARNING_SHARE):.0%} or {setting(SPREAD_MULTIPLE):g} of its"
            " spreads, whichever is larger). Rounds below the red line that their confirmation"
            " rounds repeat page: a new build, driver, quant or a hot GPU. Baseline and"
            f" threshold appear from the series' {MIN_BAND_ROUNDS}th valid round on.",
            SPEED_CALCS,
        )
        .unit("suffix: tok/s")
        .min(0)
        .thresholds(steps("green"))
        .no_value(NO_PROBE)
        .override_by_regexp(".*last round$", round_points())
        .override_by_regexp(".*baseline$", dashed())
        .override_by_regexp(".*warning threshold$", dotted(RED))
        .with_target(series(exported(kind, ""), f"{BY_DEPTH} · last round", "A"))
        .with_target(series(rule(kind, "rate1h"), f"{BY_DEPTH} · 1h", "B"))
        .with_target(series(exported(kind, "baseline_"), f"{BY_DEPTH} · baseline", "C"))
        .with_target(
            series(
                f"{exported(kind, 'baseline_')}\n* (1 - {threshold(kind)}{SERVED})",
                f"{BY_DEPTH} · warning threshold",
                "D",
            )
        )
        .span(12)
        .height(10)
    )


def arming_states(hours: int) -> list[model.ValueMapping]:
    """The words for the arming table's state figure: rounds short of a baseline (negative),
    whole hours of band history while arming, and `hours` once armed."""
    words = [
        *((have - MIN_BAND_ROUNDS, f"no baseline: {have} of {MIN_BAND_ROUNDS} rounds", "blue")
          for have in range(MIN_BAND_ROUNDS)),
        *((have, f"arming: {have} h of {hours} h", "orange") for have in range(hours)),
        (hours, "armed", "green"),
    ]  # fmt: skip
    return [
        model.ValueMap(
            options={
                str(value): model.ValueMappingResult(text=text, color=color, index=i)
                for i, (value, text, color) in enumerate(words)
            }
        )
    ]


def arming_table() -> Table:
    hours = min_history_hours()
    rounds = f"llama_speed_baseline_rounds{SERVED}"
    history = f"llama_speed_baseline_history_seconds{SERVED}"
    # One figure per series and kind that the mappings word: the whole hours of history its
    # band spans once it has a baseline, up to the hours that arm it, or before that its
    # rounds less the 12 it needs (negative). `or` keeps the second only where the first has
    # no series.
    state = (
        f"max by ({BY_SERIES}) (\n"
        f"  clamp_max(floor({history} / 3600), {hours}) and {rounds} >= {MIN_BAND_ROUNDS}\n"
        f"  or {rounds} - {MIN_BAND_ROUNDS}\n"
        ")"
    )
    table_query = PromQueryFormat.TABLE
    return (
        data_table(
            "Regression alerting armed",
            "Whether the regression alerts can fire for each series (target, model, ctx, depth)"
            f" and kind. A series has a baseline from its {MIN_BAND_ROUNDS}th valid round on"
            f" (about 4 hours at the default 1200 s interval), and the alerts arm once its band"
            f" spans {hours} hours of rounds ({MIN_HISTORY_HOURS}). A new model, ctx, depth or"
            " quant starts again from nothing, and so does every series after an exporter"
            " restart without --storage.path; with it, the bands survive restarts. Band history"
            " is the span from the band's oldest round to its newest (3 days at most).",
        )
        .unit("none")
        .no_value("no band yet: no valid round for the selected targets")
        .override_by_name(
            "Regression alerts",
            [
                prop("mappings", arming_states(hours)),
                prop(
                    "custom.cellOptions",
                    TableColoredBackgroundCellOptions(mode=TableCellBackgroundDisplayMode.BASIC),
                ),
            ],
        )
        .override_by_name("Band history", [prop("unit", "s"), prop("decimals", 1)])
        .with_target(instant(state, ref="A", fmt=table_query))
        .with_target(instant(f"max by ({BY_SERIES}) ({rounds})", ref="B", fmt=table_query))
        .with_target(instant(f"max by ({BY_SERIES}) ({history})", ref="C", fmt=table_query))
        .with_transformation(transformation("merge"))
        .with_transformation(
            organize(
                [
                    ("target", "Target"),
                    ("model", "Model"),
                    ("ctx", "Context"),
                    ("depth", "Depth"),
                    ("probe", "Kind"),
                    ("Value #A", "Regression alerts"),
                    ("Value #B", "Rounds"),
                    ("Value #C", "Band history"),
                    ("instance", "Exporter"),
                ],
                hidden=["Time"],
            )
        )
        .span(16)
        .height(8)
    )


def regression_alerting(built: Dashboard) -> Dashboard:
    return (
        built.with_row(Row("Regression alerting"))
        .with_panel(arming_table())
        .with_panel(
            reasons(
                "Confirmation rounds by reason (time range)",
                "Rounds run soon after one outside its series' band (90 s by default,"
                " --probe.confirmation-delay), by why: below_band, above_band, or back_in_band"
                " after a confirmed change. A below_band confirmation without an alert was a lone"
                " slow round that the rounds after it did not repeat. 'none' when none ran.",
                metric="llama_speed_probe_confirmations_total",
                by="target",
                selector=TARGET,
                unit="rounds",
                thresholds=steps("blue"),
                no_value="no confirmation counters for the selected targets",
            )
            .span(8)
            .height(8)
        )
    )


def now(built: Dashboard) -> Dashboard:
    return (
        built.with_row(Row("Now"))
        .with_panel(share_of_baseline("PP: % of baseline", "prompt"))
        .with_panel(share_of_baseline("TG: % of baseline", "generation"))
        .with_panel(
            single_stat(
                "TTFT: % of 7-day median",
                "Time to first token of the last round as a share of its trailing 7-day median."
                " Above 100% is slower; red above 115%.",
            )
            .unit("percentunit")
            .decimals(1)
            .thresholds(steps("green", ("orange", 1.05), ("red", 1.15)))
            .no_value(NO_PROBE)
            .with_target(
                instant(f"{TTFT}{SERVED}\n/ quantile_over_time(0.5, {TTFT}{SERVED}[7d])", BY_DEPTH)
            )
            .span(6)
            .height(5)
        )
        .with_panel(
            up_or_down(
                "Probe success",
                "Whether the last finished probe of each kind gave a valid sample.",
                "failed",
                "ok",
            )
            .no_value("no probe has finished yet for the selected targets")
            .with_target(instant(f"llama_speed_probe_success{TARGET}", BY_PROBE))
            .span(3)
            .height(5)
        )
        .with_panel(
            up_or_down(
                "Server up",
                "Whether /props and /v1/models answered at the exporter's last look.",
                "down",
                "up",
            )
            .no_value("no target: is the exporter scraped? (up{job=...})")
            .with_target(instant(f"llama_speed_server_up{TARGET}", "{{target}}"))
            .span(3)
            .height(5)
        )
    )


def models(built: Dashboard) -> Dashboard:
    by_model = "{{target}} · {{model}}"
    # The exporter says which models are loaded (a single server's is, while it answers). An
    # exporter from before several models per target has no llama_speed_model_loaded: its
    # server's llama_speed_server_info stands in, so a mixed fleet still shows every model.
    # `or` adds a server_info series only where no llama_speed_model_loaded series has the
    # same target and model.
    loaded = (
        f"max by (instance, target, model) (llama_speed_model_loaded{MODEL})\n"
        f"or max by (instance, target, model) (llama_speed_server_info{MODEL})"
    )
    # Every target has the skip counter with reason not_loaded, at 0 until a model is skipped;
    # the 0 from llama_speed_server_up keeps the bar for an exporter from before that reason.
    skipped = (
        "sum by (target) (increase(llama_speed_probes_skipped_total"
        f"{matchers('instance', 'target', reason='not_loaded')}[$__range]))\n"
        f"or 0 * max by (target) (llama_speed_server_up{TARGET})"
    )
    # Not loaded is a router's normal state for most of its models, not a fault: blue.
    states: list[model.ValueMapping] = [
        model.ValueMap(
            options={
                "0": model.ValueMappingResult(text="not loaded", color="blue", index=0),
                "1": model.ValueMappingResult(text="loaded", color="green", index=1),
            }
        )
    ]
    return (
        built.with_row(Row("Models"))
        .with_panel(
            single_stat(
                "Model loaded",
                "Whether each model a router or llama-swap knows is loaded (running) now: the"
                " exporter probes loaded models only and never loads one. A single server's"
                " model shows as loaded while the server answers.",
            )
            .unit("bool_yes_no")
            .thresholds(steps("blue", ("green", 1)))
            .mappings(states)
            .no_value("no model listed: see Server up")
            .with_target(instant(loaded, by_model))
            .span(10)
            .height(6)
        )
        .with_panel(
            time_series(
                "Models loaded over time",
                "1 while a model is loaded, 0 while it is known but not loaded: its speed series"
                " pause while it is not loaded. A slow first round after a model loads again"
                " moves no regression alert unless its confirmation rounds repeat it.",
            )
            .unit("bool_yes_no")
            .min(0)
            .max(1)
            .line_interpolation(LineInterpolation.STEP_AFTER)
            .thresholds(steps("green"))
            .no_value("no model listed in this range: see Server up")
            .with_target(series(loaded, by_model))
            .span(8)
            .height(6)
        )
        .with_panel(
            bar_gauge(
                "Rounds skipped: model not loaded (time range)",
                "Probe rounds of a model skipped because it was not loaded when its turn came"
                " (reason not_loaded): the exporter waits for production to load it.",
            )
            .unit("suffix: rounds")
            .decimals(0)
            .thresholds(steps("blue"))
            .no_value("no skip counters for the selected targets")
            .with_target(instant(skipped, "{{target}}"))
            .span(6)
            .height(6)
        )
    )


def against_baseline(built: Dashboard) -> Dashboard:
    # One row per model picked: behind a router or llama-swap, five models' PP and TG in one
    # graph are unreadable, and each model has its own baseline. A single server serves one
    # model, so it gets one row, as before.
    return (
        built.with_row(Row("Speed against its baseline: $model").repeat("model"))
        .with_panel(speed_curve("Prompt processing (PP)", "prompt", "Fresh prompt"))
        .with_panel(speed_curve("Token generation (TG)", "generation", "Generated"))
        .with_panel(
            time_series(
                "Time to first token",
                "Client-measured time from sending a PP probe to its first streamed token"
                " (points), and its trailing 7-day median (dashed; computed at 1h steps).",
                SPEED_CALCS,
            )
            .unit("s")
            .min(0)
            .thresholds(steps("green"))
            .no_value(NO_PROBE)
            .override_by_regexp(".*last round$", round_points())
            .override_by_regexp(".*7d median$", dashed())
            .with_target(series(f"{TTFT}{SERVED}", f"{BY_DEPTH} · last round", "A"))
            .with_target(
                series(
                    f"quantile_over_time(0.5, {TTFT}{SERVED}[7d])", f"{BY_DEPTH} · 7d median", "B"
                )
                # A 7-day window at every step of the range would be a heavy query for a line
                # that barely moves within an hour.
                .interval("1h")
            )
            .span(24)
            .height(9)
        )
    )


def probe_health(built: Dashboard) -> Dashboard:
    failures = "llama_speed_probe_failures_total"
    return (
        built.with_row(Row("Probe health"))
        .with_panel(
            single_stat(
                "Time since the last valid probe",
                "time() - llama_speed_probe_last_success_timestamp_seconds. With the default"
                " 1200 s interval, orange after two missed rounds, red after an hour.",
            )
            .unit("s")
            .decimals(0)
            .thresholds(steps("green", ("orange", 2400), ("red", 3600)))
            .no_value("no valid probe since the exporter started")
            .with_target(
                instant(
                    f"time() - llama_speed_probe_last_success_timestamp_seconds{TARGET}", BY_PROBE
                )
            )
            .span(6)
            .height(8)
        )
        .with_panel(
            time_series(
                "Probe duty against its budget",
                "Share of the trailing hour spent probing (solid) and the configured maximum"
                " (dashed): a round that would pass the budget is skipped (duty_budget).",
            )
            .unit("percentunit")
            .min(0)
            .thresholds(steps("green"))
            .no_value("no duty figures for the selected targets")
            .override_by_regexp(
                ".* budget$",
                dashed(
                    prop(
                        "color",
                        model.FieldColor(mode=model.FieldColorModeId.FIXED, fixed_color="red"),
                    )
                ),
            )
            .with_target(series(f"llama_speed_probe_duty_ratio{TARGET}", "{{target}} used", "A"))
            .with_target(
                series(f"llama_speed_probe_duty_budget_ratio{TARGET}", "{{target}} budget", "B")
            )
            .span(9)
            .height(8)
        )
        .with_panel(
            time_series(
                "Share of probes that failed (1h)",
                "Failed probes over probes started in the trailing hour, by kind.",
            )
            .unit("percentunit")
            .min(0)
            .max(1)
            .thresholds(steps("green", ("red", 0.1)))
            .thresholds_style(threshold_areas())
            .no_value("no probe started in the last hour")
            .with_target(
                series(
                    f"sum by (target, probe) (increase({failures}{TARGET}[1h]))\n"
                    f"/ sum by (target, probe) (increase(llama_speed_probes_total{TARGET}[1h]))",
                    BY_PROBE,
                )
            )
            .span(9)
            .height(8)
        )
        .with_panel(
            reasons(
                "Skipped rounds by reason (time range)",
                "Rounds (or depths) not started: busy (production in flight), busy_unknown,"
                " sleeping, duty_budget, depth_exceeds_context, in_progress, not_loaded (a model"
                " behind a router or llama-swap that is not loaded). 'none' when nothing was"
                " skipped.",
                metric="llama_speed_probes_skipped_total",
                by="target",
                selector=TARGET,
                unit="rounds",
                thresholds=steps("blue"),
                no_value="no skip counters for the selected targets",
            )
            .span(8)
            .height(8)
        )
        .with_panel(
            reasons(
                "Failed probes by reason (time range)",
                "Probes that failed, by kind and reason (connect, timeout, unauthorized, loading,"
                " http_error, bad_response, context_exceeded, not_supported, *_mismatch,"
                " slot_out_of_range); docs/probes.md explains each. 'none' when nothing failed.",
                metric=failures,
                by="target, probe",
                selector=TARGET,
                unit="probes",
                thresholds=steps("green", ("red", 0.5)),
                no_value="no failure counters for the selected targets",
            )
            .span(8)
            .height(8)
        )
        .with_panel(
            reasons(
                "Discarded samples (time range)",
                "Probe samples thrown away because a production request overlapped them. 'none'"
                " when nothing was discarded.",
                metric="llama_speed_probes_discarded_total",
                by="target, probe",
                selector=TARGET,
                unit="probes",
                thresholds=steps("green", ("orange", 0.5)),
                no_value="no discard counters for the selected targets",
            )
            .span(8)
            .height(8)
        )
        .with_panel(
            time_series(
                "Probe request time per round",
                "Wall-clock seconds of the last round's requests of each kind: what the probes"
                " cost the server each round.",
            )
            .unit("s")
            .min(0)
            .thresholds(steps("green"))
            .no_value("no probe round yet for the selected targets")
            .with_target(series(f"llama_speed_probe_duration_seconds{TARGET}", BY_PROBE))
            .span(24)
            .height(8)
        )
    )


def output_canary(built: Dashboard) -> Dashboard:
    by_model = "{{target}} · {{model}}"
    changes = "llama_speed_canary_output_changes_total"
    return (
        built.with_row(Row("Output canary"))
        .with_panel(
            bar_gauge(
                "Output changes (time range)",
                "Confirmed changes of the canary's greedy output under the same model name and"
                " ctx: another file behind the alias, a build, backend or setting that computes"
                " differently (docs/quality.md). LlamaSpeedOutputChanged fires on those that no"
                " quant or build change explains.",
            )
            .unit("suffix: changes")
            .decimals(0)
            .thresholds(steps("green", ("orange", 0.5)))
            .no_value("no canary baseline yet for the selected models")
            .with_target(
                instant(f"sum by (target, model) (increase({changes}{MODEL}[$__range]))", by_model)
            )
            .span(6)
            .height(8)
        )
        .with_panel(
            time_series(
                "Canary token probability",
                "Mean probability the model gave the canary's chosen tokens, each round: the"
                " same output at another probability means the arithmetic moved (a KV cache"
                " type, flash attention, a driver) before any token flipped.",
            )
            .unit("percentunit")
            .min(0)
            .thresholds(steps("green"))
            .no_value("no canary answer yet for the selected models")
            .with_target(series(f"llama_speed_canary_token_probability{MODEL}", by_model))
            .span(12)
            .height(8)
        )
        .with_panel(
            reasons(
                "Canary failures by reason (time range)",
                "Canary requests that gave no output to compare: overlap (production arrived),"
                " invalid_output, predicted_n_mismatch and the transport reasons. 'none' when"
                " nothing failed.",
                metric="llama_speed_canary_failures_total",
                by="target",
                selector=TARGET,
                unit="requests",
                thresholds=steps("green", ("orange", 0.5)),
                no_value="no canary counters for the selected targets",
            )
            .span(6)
            .height(8)
        )
    )


def server_and_exporter(built: Dashboard) -> Dashboard:
    by_model = "max by (instance, target, model)"
    table_query = PromQueryFormat.TABLE
    return (
        built.with_row(Row("Server and exporter"))
        .with_panel(
            data_table(
                "Server info",
                "What each target serves now (llama_speed_server_info) with the model's size,"
                " parameters and trained context from /v1/models, and the probe interval.",
            )
            .unit("none")
            .no_value("no server answers: see Server up")
            .override_by_name("Weights", [prop("unit", "bytes")])
            .override_by_name("Parameters", [prop("unit", "short")])
            .override_by_name("Trained ctx", [prop("unit", "locale")])
            .override_by_name("Probe interval", [prop("unit", "s")])
            .with_target(
                instant(
                    "max by (instance, target, model, ctx, quant, build, slots)"
                    f" (llama_speed_server_info{SERVED})",
                    ref="A",
                    fmt=table_query,
                )
            )
            .with_target(
                instant(
                    f"{by_model} (llama_speed_model_size_bytes{MODEL})", ref="B", fmt=table_query
                )
            )
            .with_target(
                instant(
                    f"{by_model} (llama_speed_model_parameters{MODEL})", ref="C", fmt=table_query
                )
            )
            .with_target(
                instant(
                    f"{by_model} (llama_speed_model_train_context_tokens{MODEL})",
                    ref="D",
                    fmt=table_query,
                )
            )
            .with_target(
                instant(
                    f"max by (instance, target) (llama_speed_probe_interval_seconds{TARGET})",
                    ref="E",
                    fmt=table_query,
                )
            )
            .with_transformation(transformation("merge"))
            .with_transformation(
                organize(
                    [
                        ("target", "Target"),
                        ("model", "Model"),
                        ("quant", "Quant"),
                        ("ctx", "Context"),
                        ("slots", "Slots"),
                        ("build", "Build"),
                        ("Value #B", "Weights"),
                        ("Value #C", "Parameters"),
                        ("Value #D", "Trained ctx"),
                        ("Value #E", "Probe interval"),
                        ("instance", "Exporter"),
                    ],
                    # Value #A is llama_speed_server_info's constant 1: its labels are the point.
                    hidden=["Time", "Value #A"],
                )
            )
            .span(18)
            .height(7)
        )
        .with_panel(
            up_or_down(
                "Exporter collectors",
                "Whether each of the exporter's collectors rendered on the last scrape.",
                "failed",
                "ok",
            )
            .no_value("no exporter answers for the selected instance")
            .with_target(
                instant(f"llama_speed_collector_success{EXPORTER}", "{{instance}} {{collector}}")
            )
            .span(6)
            .height(7)
        )
    )


def dashboard() -> Dashboard:
    return board(
        UID,
        "Speed",
        "PP, TG and time to first token per model, ctx and depth against their baselines,"
        " whether the regression alerts are armed, and the probes' own health.",
        "now-24h",
        (
            now,
            regression_alerting,
            models,
            against_baseline,
            probe_health,
            output_canary,
            server_and_exporter,
        ),
    )
