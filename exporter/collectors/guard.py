"""Runs each collector in isolation, so one failing collector never fails a scrape."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

import structlog
from prometheus_client.core import Metric as Family
from prometheus_client.registry import Collector

from exporter import metrics as m

log = structlog.get_logger(__name__)


class GuardedCollectors:
    """node_exporter's pattern: per-collector success and duration beside their metrics."""

    def __init__(
        self,
        collectors: Sequence[tuple[str, Collector]],
        build_labels: tuple[str, str],
    ) -> None:
        self._collectors = collectors
        self._build_labels = build_labels
        self._failing: set[str] = set()

    def collect(self) -> Iterable[Family]:
        success, duration = m.COLLECTOR_SUCCESS.family(), m.COLLECTOR_DURATION.family()
        for name, collector in self._collectors:
            started = time.perf_counter()
            try:
                families = list(collector.collect())
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
