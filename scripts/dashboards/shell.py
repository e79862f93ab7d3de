"""The dashboard shell the three share: metadata, the link between them, the chained template
variables, and the panel ids."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from grafana_foundation_sdk.builders.dashboard import (
    Dashboard,
    DashboardLink,
    DatasourceVariable,
    QueryVariable,
)
from grafana_foundation_sdk.models import dashboard as model

from .queries import DATASOURCE, matchers

TAG = "llama-speed"
# The uid grafana/provisioning/datasources/prometheus.yml gives the Prometheus it provisions.
PROVISIONED_UID = "llama-speed-prometheus"


def _variables() -> Iterator[DatasourceVariable | QueryVariable]:
    yield (
        DatasourceVariable("datasource")
        .label("Prometheus")
        .description(f"Defaults to the provisioned datasource (uid {PROVISIONED_UID})")
        .type("prometheus")
        .current(
            model.VariableOption(
                selected=True, text="Prometheus (llama-speed)", value=PROVISIONED_UID
            )
        )
        .regex("")
        .include_all(False)
        .multi(False)
        .hide(model.VariableHide.DONT_HIDE)
    )
    chain = (
        ("instance", "Exporter", "The exporter's scrape address (Prometheus' instance label)"),
        ("target", "Target", "The llama-server, as the exporter's config names it"),
        ("model", "Model", "Models served in the time range"),
        ("ctx", "Context", "Per-slot context sizes served in the time range"),
    )
    for i, (name, label, description) in enumerate(chain):
        earlier = matchers(*(name for name, _, _ in chain[:i])) if i else ""
        yield (
            QueryVariable(name)
            .label(label)
            .description(description)
            .datasource(DATASOURCE)
            .query(f"label_values(llama_speed_server_info{earlier}, {name})")
            .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .include_all(True)
            # Matches series that lack the label too, which a regex of the listed values does not.
            .all_value(".*")
            .multi(True)
            .current(model.VariableOption(selected=True, text=["All"], value=["$__all"]))
            .options([])
            .regex("")
            .sort(model.VariableSort.ALPHABETICAL_ASC)
            .hide(model.VariableHide.DONT_HIDE)
        )


Section = Callable[[Dashboard], Dashboard]


def board(
    uid: str, title: str, description: str, since: str, sections: Sequence[Section]
) -> Dashboard:
    """The dashboard shell with its `sections` in order: `since` is how far back it opens."""
    built = (
        Dashboard(f"{TAG} / {title}")
        .uid(uid)
        .description(description)
        .tags([TAG])
        .timezone("browser")
        .editable()
        .tooltip(model.DashboardCursorSync.CROSSHAIR)
        .fiscal_year_start_month(0)
        .live_now(False)
        .refresh("1m")
        .version(1)
        .week_start("")
        .time(since, "now")
        .annotations([])
        .link(
            DashboardLink(TAG)
            .type(model.DashboardLinkType.DASHBOARDS)
            .tags([TAG])
            .as_dropdown(False)
            .include_vars(True)
            .keep_time(True)
            .icon("external link")
            .target_blank(False)
            .tooltip("")
            .url("")
        )
        .variables(list(_variables()))
    )
    for section in sections:
        built = section(built)
    return built


def numbered(built: model.Dashboard) -> model.Dashboard:
    """Number the panels top to bottom, rows included: the builders leave ids to the caller, and
    the ids must be unique within a dashboard for Grafana to keep each panel's state apart."""
    number = 0
    for panel in built.panels or []:
        number += 1
        panel.id_val = number
        if isinstance(panel, model.RowPanel):
            for child in panel.panels:
                number += 1
                child.id_val = number
    return built
