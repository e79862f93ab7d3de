"""The output canary: its settled output, its confirmed changes, its drift signal."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from prometheus_client.core import Metric as Family

from exporter.collectors import catalogue as m
from exporter.probe.results import CANARY_FAILURE_REASONS
from exporter.state.store import TargetState


class CanaryCollector:
    def collect(self, targets: Sequence[TargetState]) -> Iterable[Family]:
        changes, last_change, probability, info, failures = (
            m.CANARY_CHANGES.family(), m.CANARY_LAST_CHANGE.family(),
            m.CANARY_PROBABILITY.family(), m.CANARY_INFO.family(), m.CANARY_FAILURES.family(),
        )  # fmt: skip
        for t in targets:
            # Every known reason from the start, so that rate() sees the first one.
            for reason in CANARY_FAILURE_REASONS:
                failures.add_metric([t.name, reason], t.canary_failures[reason])
            for view in t.views():
                c = view.canary
                if view.server is None or c.fingerprint is None:
                    continue  # no baseline yet: nothing to compare, no change to count
                labels = [t.name, view.server.model]
                # One info series at a time: the settled output, which moves only with a change.
                info.add_metric([*labels, c.fingerprint], 1.0)
                changes.add_metric(labels, c.changes)
                if c.last_change_time is not None:
                    last_change.add_metric(labels, c.last_change_time)
                if c.mean_probability is not None:
                    probability.add_metric(labels, c.mean_probability)
        yield from (changes, last_change, probability, info, failures)
