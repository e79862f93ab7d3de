"""Probe results: speeds, token counters, and how the probes fared."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from prometheus_client.core import Metric as Family

from exporter.collectors import catalogue as m
from exporter.probe.results import DISCARD_REASONS, FAILURE_REASONS, KINDS, SKIP_REASONS
from exporter.schedule.plan import Schedule
from exporter.state.baseline import CONFIRMATION_REASONS
from exporter.state.storage import STORAGE_OPERATIONS
from exporter.state.store import TargetState


class ProbeCollector:
    def __init__(self, schedules: Mapping[str, Schedule]) -> None:
        self._schedules = schedules

    def collect(self, targets: Sequence[TargetState]) -> Iterable[Family]:
        yield from self._speeds(targets)
        yield from self._bands(targets)
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

    @staticmethod
    def _bands(targets: Sequence[TargetState]) -> Iterable[Family]:
        by_kind = {
            "prompt": (m.PROMPT_BASELINE, m.PROMPT_BASELINE_SPREAD, m.PROMPT_RECENT),
            "generation": (
                m.GENERATION_BASELINE, m.GENERATION_BASELINE_SPREAD, m.GENERATION_RECENT,
            ),
        }  # fmt: skip
        fams = {metric: metric.family() for group in by_kind.values() for metric in group}
        rounds, history = m.BASELINE_ROUNDS.family(), m.BASELINE_HISTORY.family()
        for t, view in ((target, v) for target in targets for v in target.views()):
            if view.server is None:
                continue
            for depth, s in sorted(view.series.items()):
                labels = [t.name, view.server.model, str(view.server.ctx), str(depth)]
                for kind, band in sorted(s.bands.items()):
                    baseline, spread, recent = by_kind[kind]
                    fams[recent].add_metric(labels, band.recent)
                    if band.median is not None and band.spread is not None:
                        fams[baseline].add_metric(labels, band.median)
                        fams[spread].add_metric(labels, band.spread)
                    rounds.add_metric([*labels, kind], band.rounds)
                    history.add_metric([*labels, kind], band.history_seconds)
        yield from (*fams.values(), rounds, history)

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
        confirmations, storage = m.CONFIRMATIONS.family(), m.STORAGE_ERRORS.family()
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
            for reason in CONFIRMATION_REASONS:
                confirmations.add_metric([t.name, reason], t.confirmations[reason])
            for operation in STORAGE_OPERATIONS:
                storage.add_metric([t.name, operation], t.storage_errors[operation])
            duty.add_metric([t.name], t.duty_ratio)
            schedule = self._schedules[t.name]
            budget.add_metric([t.name], schedule.duty_budget)
            interval.add_metric([t.name], schedule.interval)
        yield from (success, duration, last_ok, probes, failures, discarded)
        yield from (skipped, duty, budget, interval, confirmations, storage)
