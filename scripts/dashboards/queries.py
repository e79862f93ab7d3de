"""PromQL for the dashboards: the label selectors the template variables fill, the legends,
and the Prometheus queries as the SDK builds them."""

from __future__ import annotations

from grafana_foundation_sdk.builders import prometheus
from grafana_foundation_sdk.models import dashboard as model
from grafana_foundation_sdk.models.prometheus import PromQueryFormat, QueryEditorMode

# Every panel and query reads the datasource variable, so one dashboard serves any Prometheus.
DATASOURCE = model.DataSourceRef(type_val="prometheus", uid="${datasource}")

# Legends name the series by the labels that tell two apart.
BY_DEPTH = "{{target}} · {{model}} · ctx {{ctx}} · depth {{depth}}"
BY_CTX = "{{target}} · {{model}} · ctx {{ctx}}"
BY_CACHE = f"{BY_CTX} ({{{{type_k}}}}/{{{{type_v}}}})"
BY_GPU = "GPU {{gpu}} {{name}}"


def matchers(*variables: str, **fixed: str) -> str:
    """A label selector: each label in `variables` matches its own template variable (any of
    the values picked), each of `fixed` one value."""
    parts = [f'{label}=~"${label}"' for label in variables]
    parts += [f'{label}="{value}"' for label, value in fixed.items()]
    return "{" + ", ".join(parts) + "}"


# The variables chain in this order: each lists only what the ones before it leave.
EXPORTER = matchers("instance")
TARGET = matchers("instance", "target")
MODEL = matchers("instance", "target", "model")
SERVED_BY = ("instance", "target", "model", "ctx")
SERVED = matchers(*SERVED_BY)
# The recording rules aggregate the instance label away.
RULE = matchers("target", "model", "ctx")


def counted_by_reason(metric: str, by: str, selector: str, over_range: bool = True) -> str:
    """Counts by reason, and a 'none' series per `by` where all are 0: an empty bar gauge reads as
    'no data' rather than 'nothing went wrong'. `over_range`: counted over the time range, not
    since the exporter started."""

    def total(labels: str) -> str:
        counted = f"{metric}{selector}"
        if over_range:
            counted = f"increase({counted}[$__range])"
        return f"sum by ({labels}) ({counted})"

    return (
        f"({total(f'{by}, reason')} > 0)\n"
        f'or label_replace({total(by)} == 0, "reason", "none", "", "")'
    )


def series(expr: str, legend: str, ref: str = "A") -> prometheus.Dataquery:
    """A range query, for a time series."""
    return _query(expr, legend, ref).range().format(PromQueryFormat.TIME_SERIES)


def instant(
    expr: str,
    legend: str = "__auto",
    ref: str = "A",
    fmt: PromQueryFormat = PromQueryFormat.TIME_SERIES,
) -> prometheus.Dataquery:
    """An instant query, for a stat, a bar gauge or a table row."""
    return _query(expr, legend, ref).instant().format(fmt)


def _query(expr: str, legend: str, ref: str) -> prometheus.Dataquery:
    return (
        prometheus.Dataquery()
        .datasource(DATASOURCE)
        .editor_mode(QueryEditorMode.CODE)
        .expr(expr)
        .legend_format(legend)
        .ref_id(ref)
    )
