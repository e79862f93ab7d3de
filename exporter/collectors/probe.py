"""Probe results: speeds, token counters, and how the probes fared."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from prometheus_client.core import Metric as Family

from exporter.collectors import catalogue as m
from exporter.probe.results import DISCARD_REASONS, FAILURE_REASONS, KINDS, SKIP_REASONS
from exporter.schedule.plan import Schedule
from exporter.state.store import TargetState


class ProbeCollector:
    def __init__(self, schedules: Mapping[str, Schedule]) -> None:
        self._schedules = schedules

    def collect(self, targets: Sequence[TargetState]) -> Iterable[Family]:
        yield from self._speeds(targets)
        yield from self._outcomes(targets)

    @staticmethod
    def _speeds(targets: Sequence[TargetState]) -> Iterable[Family]:
        fams = {
            metric: metric.family()
            for metric in (
                m.PROMPT_TPS, m.GENERATION_TPS, m.TTFT,
                m.PROMPT_TOKENS, m.PROMPT_SECONDS, m.GENERATED_TOKENS, m.GENERATION_SECONDS,
            )
        }  # fmt: skip
        energy = m.PROBE_ENERGY.family()
        for t, view in ((target, v) for target in targets for v in target.views()):
            if view.server is None:
                continue
            for depth, s in sorted(view.series.items()):
                labels = [t.name, view.server.model, str(view.server.ctx), str(depth)]
                for metric, value in (
                    (m.PROMPT_TPS, s.prompt_tokens_per_second),
                    (m.GENERATION_TPS, s.generation_tokens_per_second),
                    (m.TTFT, s.time_to_first_token),
                ):
                    if value is not None:
                        fams[metric].add_metric(labels, value)
                if s.prompt_seconds > 0:
                    fams[m.PROMPT_TOKENS].add_metric(labels, s.prompt_tokens)
                    fams[m.PROMPT_SECONDS].add_metric(labels, s.prompt_seconds)
                if s.generation_seconds > 0:
                    fams[m.GENERATED_TOKENS].add_metric(labels, s.generated_tokens)
                    fams[m.GENERATION_SECONDS].add_metric(labels, s.generation_seconds)
                for kind, joules in sorted(s.energy_joules.items()):
                    energy.add_metric([*labels, kind], joules)
        yield from (*fams.values(), energy)

    def _outcomes(self, targets: Sequence[TargetState]) -> Iterable[Family]:
        success, duration, last_ok = (
            m.PROBE_SUCCESS.family(), m.PROBE_DURATION.family(), m.PROBE_LAST_SUCCESS.family(),
        )  # fmt: skip
        probes, failures, discarded = (
            m.PROBES.family(), m.PROBE_FAILURES.family(), m.PROBES_DISCARDED.family(),
        )  # fmt: skip
        skipped, duty, budget, interval = (
            m.PROBES_SKIPPED.family(), m.DUTY_RATIO.family(),
            m.DUTY_BUDGET.family(), m.PROBE_INTERVAL.family(),
        )  # fmt: skip
        for t in targets:
            for kind in KINDS:
                k = t.kinds[kind]
                labels = [t.name, kind]
                if k.success is not None:
                    success.add_metric(labels, 1.0 if k.success else 0.0)
                if k.duration is not None:
                    duration.add_metric(labels, k.duration)
                if k.last_success_time is not None:
                    last_ok.add_metric(labels, k.last_success_time)
                probes.add_metric(labels, k.attempts)
                # Every known reason is exported from the start, so rate() sees the first one.
                for reason in FAILURE_REASONS:
                    failures.add_metric([*labels, reason], k.failures[reason])
                for reason in DISCARD_REASONS:
                    discarded.add_metric([*labels, reason], k.discards[reason])
            for reason in SKIP_REASONS:
                skipped.add_metric([t.name, reason], t.skips[reason])
            duty.add_metric([t.name], t.duty_ratio)
            schedule = self._schedules[t.name]
            budget.add_metric([t.name], schedule.duty_budget)
            interval.add_metric([t.name], schedule.interval)
        yield from (success, duration, last_ok, probes, failures, discarded)
        yield from (skipped, duty, budget, interval)
