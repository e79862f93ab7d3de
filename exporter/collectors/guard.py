"""Runs each collector in isolation, so one failing collector never fails a scrape, and gives
them all the same snapshot of the store, so a scrape is one consistent view."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import structlog
from prometheus_client.core import Metric as Family

from exporter.collectors import catalogue as m
from exporter.state.store import TargetState

log = structlog.get_logger(__name__)


class SnapshotCollector(Protocol):
    def collect(self, targets: Sequence[TargetState]) -> Iterable[Family]: ...


class GuardedCollectors:
    """node_exporter's pattern: per-collector success and duration beside their metrics."""

    def __init__(
        self,
        snapshot: Callable[[], Sequence[TargetState]],
        collectors: Sequence[tuple[str, SnapshotCollector]],
        build_labels: tuple[str, str],
    ) -> None:
        self._snapshot = snapshot
        self._collectors = collectors
        self._build_labels = build_labels
        self._failing: set[str] = set()

    def collect(self) -> Iterable[Family]:
        success, duration = m.COLLECTOR_SUCCESS.family(), m.COLLECTOR_DURATION.family()
        # One copy of the store per scrape: server_info, speeds and KV of a target all come
        # from the same moment, and no collector pays for a copy of its own.
        targets = self._snapshot()
        for name, collector in self._collectors:
            started = time.perf_counter()
            try:
                families = list(collector.collect(targets))
            except Exception as exc:
                families = []
                ok = False
                if name not in self._failing:  # log once per failure spell, not every scrape
                    log.error("collector_failed", collector=name, error=repr(exc))
                self._failing.add(name)
            else:
                ok = True
                if name in self._failing:
                    log.info("collector_recovered", collector=name)
                self._failing.discard(name)
            yield from families
            success.add_metric([name], 1.0 if ok else 0.0)
            duration.add_metric([name], time.perf_counter() - started)
        build = m.BUILD_INFO.family()
        build.add_metric(list(self._build_labels), 1.0)
        yield from (success, duration, build)
