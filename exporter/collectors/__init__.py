"""Custom collectors: each renders families on every scrape from one snapshot of the store."""

from __future__ import annotations

import platform
from collections.abc import Callable, Mapping, Sequence

from exporter import __version__
from exporter.collectors.canary import CanaryCollector
from exporter.collectors.guard import GuardedCollectors, SnapshotCollector
from exporter.collectors.kv import KvCollector
from exporter.collectors.probe import ProbeCollector
from exporter.collectors.server import ServerCollector
from exporter.schedule.plan import Schedule
from exporter.state.store import TargetState


def exporter_collectors(
    snapshot: Callable[[], Sequence[TargetState]],
    schedules: Mapping[str, Schedule],
    build_labels: tuple[str, str] = (__version__, platform.python_version()),
    extra: Sequence[tuple[str, SnapshotCollector]] = (),
) -> GuardedCollectors:
    """Every collector of the exporter's own metrics, each isolated from the others."""
    return GuardedCollectors(
        snapshot,
        [
            ("server", ServerCollector()),
            ("probe", ProbeCollector(schedules)),
            ("kv", KvCollector()),
            ("canary", CanaryCollector()),
            *extra,
        ],
        build_labels,
    )
