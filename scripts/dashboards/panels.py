"""One preset builder per panel type, with the options every panel of that type has here, and
the thresholds, overrides, mappings and transformations the panels pick from: a dashboard
module adds only what differs (unit, thresholds, queries, size)."""

from __future__ import annotations

from collections.abc import Sequence

from grafana_foundation_sdk.builders import bargauge, common, stat, table, timeseries
from grafana_foundation_sdk.builders.dashboard import (
    FieldColor,
    ThresholdsConfig,
)
from grafana_foundation_sdk.models import dashboard as model
from grafana_foundation_sdk.models.common import (
    AxisPlacement,
    BarGaugeDisplayMode,
    BarGaugeNamePlacement,
    BarGaugeSizing,
    BarGaugeValueMode,
    BigValueColorMode,
    BigValueGraphMode,
    BigValueJustifyMode,
    BigValueTextMode,
    FieldTextAlignment,
    GraphDrawStyle,
    GraphGradientMode,
    GraphThresholdsStyleMode,
    LegendDisplayMode,
    LegendPlacement,
    LineInterpolation,
    LineStyle,
    ScaleDistribution,
    SortOrder,
    StackingMode,
    TableAutoCellOptions,
    TableCellHeight,
    TooltipDisplayMode,
    VisibilityMode,
    VizOrientation,
)

from .queries import DATASOURCE, counted_by_reason, instant

LAST = "lastNotNull"
# Speeds are compared by their mean; the rest by their extremes.
SPEED_CALCS = (LAST, "mean")
RANGE_CALCS = (LAST, "min", "max")

NO_PROBE = "no valid probe in this range for the selected target, model and ctx"
NO_GPU = "no GPU metrics: NVML unavailable or --collector.gpu=false (see llama_speed_gpu_up)"
NO_KV = (
    "no KV capacity: model file not readable here, or the cache layout (unified or per slot)"
    " is unknown; see llama_speed_kv_cache_errors_total and kv_unified in the config"
)
NO_PROCESS_MEMORY = (
    "no per-process GPU memory: llama-server is not visible from the exporter (another host,"
    " or a container without --pid=host / hostPID: true), or no GPU metrics (NVML unavailable"
    " or --collector.gpu=false)"
)


def steps(base: str, *rising: tuple[str, float]) -> ThresholdsConfig:
    """Absolute thresholds: `base` below the first of `rising`, each (color, from) after it."""
    first = model.Threshold(value=None, color=base)
    return (
        ThresholdsConfig()
        .mode(model.ThresholdsMode.ABSOLUTE)
        .steps([first, *(model.Threshold(value=value, color=color) for color, value in rising)])
    )


def prop(name: str, value: object) -> model.DynamicConfigValue:
    return model.DynamicConfigValue(id_val=name, value=value)


def dashed(*more: model.DynamicConfigValue) -> list[model.DynamicConfigValue]:
    """A reference line (a baseline, a capacity, a budget) drawn apart from what it bounds."""
    return [
        prop("custom.lineStyle", LineStyle(fill="dash", dash=[10, 10])),
        prop("custom.lineWidth", 2),
        *more,
    ]


def dotted(*more: model.DynamicConfigValue) -> list[model.DynamicConfigValue]:
    """A limit drawn under or over a reference line (a threshold under a baseline): dots, so
    that it does not read as a second reference."""
    return [
        prop("custom.lineStyle", LineStyle(fill="dot", dash=[0, 10])),
        prop("custom.lineWidth", 2),
        *more,
    ]


def round_points() -> list[model.DynamicConfigValue]:
    """One probe round is one sample: a step with its point, not a slope between rounds."""
    return [
        prop("custom.lineInterpolation", LineInterpolation.STEP_AFTER.value),
        prop("custom.showPoints", VisibilityMode.ALWAYS.value),
        prop("custom.pointSize", 4),
    ]


def two_state(off: str, on: str) -> list[model.ValueMapping]:
    """A 0/1 gauge read as words."""
    return [
        model.ValueMap(
            options={
                "0": model.ValueMappingResult(text=off, color="red", index=0),
                "1": model.ValueMappingResult(text=on, color="green", index=1),
            }
        )
    ]


def transformation(
    kind: str, options: dict[str, object] | None = None
) -> model.DataTransformerConfig:
    return model.DataTransformerConfig(id_val=kind, options=options or {})


def organize(
    columns: Sequence[tuple[str, str | None]], hidden: Sequence[str]
) -> model.DataTransformerConfig:
    """A table's columns in this order, each renamed (None: keeps its name), `hidden` dropped."""
    return transformation(
        "organize",
        {
            "excludeByName": dict.fromkeys(hidden, True),
            "indexByName": {field: i for i, (field, _) in enumerate(columns)},
            "renameByName": {field: name for field, name in columns if name is not None},
        },
    )


def _by_color_thresholds() -> FieldColor:
    return FieldColor().mode(model.FieldColorModeId.THRESHOLDS)


def _last_value() -> common.ReduceDataOptions:
    return common.ReduceDataOptions().calcs([LAST]).fields("").values(False)


def time_series(
    title: str, description: str, calcs: Sequence[str] = RANGE_CALCS
) -> timeseries.Panel:
    return (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .color_scheme(FieldColor().mode(model.FieldColorModeId.PALETTE_CLASSIC))
        .mappings([])
        .draw_style(GraphDrawStyle.LINE)
        .line_interpolation(LineInterpolation.LINEAR)
        .line_width(1)
        .fill_opacity(0)
        .gradient_mode(GraphGradientMode.NONE)
        .show_points(VisibilityMode.NEVER)
        .point_size(4)
        # Bridge gaps up to an hour (in ms), a missed round or two, so that one blip does not
        # break the line; a longer outage still shows as a gap.
        .span_nulls(3600000)
        .axis_placement(AxisPlacement.AUTO)
        .axis_label("")
        .scale_distribution(common.ScaleDistributionConfig().type(ScaleDistribution.LINEAR))
        .stacking(common.StackingConfig().mode(StackingMode.NONE).group("A"))
        .thresholds_style(common.GraphThresholdsStyleConfig().mode(GraphThresholdsStyleMode.OFF))
        .hide_from(common.HideSeriesConfig().legend(False).tooltip(False).viz(False))
        .legend(
            common.VizLegendOptions()
            .show_legend(True)
            .display_mode(LegendDisplayMode.TABLE)
            .placement(LegendPlacement.BOTTOM)
            .calcs(list(calcs))
        )
        .tooltip(
            common.VizTooltipOptions().mode(TooltipDisplayMode.MULTI).sort(SortOrder.DESCENDING)
        )
    )


def threshold_areas() -> common.GraphThresholdsStyleConfig:
    """Shade a time series past its thresholds, where crossing them is the point."""
    return common.GraphThresholdsStyleConfig().mode(GraphThresholdsStyleMode.LINE_AND_AREA)


def single_stat(title: str, description: str) -> stat.Panel:
    return (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .color_scheme(_by_color_thresholds())
        .mappings([])
        .reduce_options(_last_value())
        .color_mode(BigValueColorMode.BACKGROUND)
        .graph_mode(BigValueGraphMode.NONE)
        .justify_mode(BigValueJustifyMode.AUTO)
        .orientation(VizOrientation.AUTO)
        .text_mode(BigValueTextMode.VALUE_AND_NAME)
        .wide_layout(True)
        .show_percent_change(False)
    )


def up_or_down(title: str, description: str, off: str, on: str) -> stat.Panel:
    """A stat of 0/1 gauges: red and `off` at 0, green and `on` at 1."""
    return (
        single_stat(title, description)
        .unit("bool_yes_no")
        .thresholds(steps("red", ("green", 1)))
        .mappings(two_state(off, on))
    )


def bar_gauge(title: str, description: str) -> bargauge.Panel:
    return (
        bargauge.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .color_scheme(_by_color_thresholds())
        .mappings([])
        .min(0)
        .reduce_options(_last_value())
        .orientation(VizOrientation.HORIZONTAL)
        .display_mode(BarGaugeDisplayMode.GRADIENT)
        .value_mode(BarGaugeValueMode.COLOR)
        .name_placement(BarGaugeNamePlacement.TOP)
        .show_unfilled(True)
        .sizing(BarGaugeSizing.AUTO)
        .min_viz_width(8)
        .min_viz_height(16)
        .max_viz_height(300)
    )


def reasons(
    title: str,
    description: str,
    *,
    metric: str,
    by: str,
    selector: str,
    unit: str,
    thresholds: ThresholdsConfig,
    no_value: str,
    over_range: bool = True,
) -> bargauge.Panel:
    """A bar per `by` series and reason of a counter (`counted_by_reason`), named by both."""
    legend = " ".join(f"{{{{{label.strip()}}}}}" for label in (*by.split(","), "reason"))
    return (
        bar_gauge(title, description)
        .unit(f"suffix: {unit}")
        .decimals(0)
        .thresholds(thresholds)
        .no_value(no_value)
        .with_target(instant(counted_by_reason(metric, by, selector, over_range), legend))
    )


def data_table(title: str, description: str) -> table.Panel:
    return (
        table.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .color_scheme(_by_color_thresholds())
        .thresholds(steps("green"))
        .mappings([])
        .align(FieldTextAlignment.AUTO)
        .cell_options(TableAutoCellOptions())
        .inspect(False)
        .filterable(True)
        .show_header(True)
        .cell_height(TableCellHeight.SM)
        .footer(
            common.TableFooterOptions().show(False).reducer(["sum"]).count_rows(False).fields([])
        )
        .sort_by([])
    )
