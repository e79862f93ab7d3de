"""Custom collectors: each renders families from current state on every scrape."""

from __future__ import annotations

import platform
from collections.abc import Callable, Mapping, Sequence

from prometheus_client.registry import Collector

from exporter import __version__
from exporter.collectors.guard import GuardedCollectors
from exporter.collectors.kv import KvCollector
from exporter.collectors.probe import ProbeCollector
from exporter.collectors.server import ServerCollector
from exporter.config import ProbePlan
from exporter.state import TargetState


def exporter_collectors(
    snapshot: Callable[[], list[TargetState]],
    plans: Mapping[str, ProbePlan],
    build_labels: tuple[str, str] = (__version__, platform.python_version()),
    extra: Sequence[tuple[str, Collector]] = (),
) -> GuardedCollectors:
    """Every collector of the exporter's own metrics, each isolated from the others."""
    return GuardedCollectors(
        [
            ("server", ServerCollector(snapshot)),
            ("probe", ProbeCollector(snapshot, plans)),
            ("kv", KvCollector(snapshot)),
            *extra,
        ],
        build_labels,
    )
