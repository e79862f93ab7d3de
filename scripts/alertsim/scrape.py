"""What Prometheus would have scraped from the exporter, written as OpenMetrics for backfilling.

At each scrape time (virtual; every `scrape_interval`, 30 s as in
deploy/prometheus/prometheus.yml) the exporter's collectors are called directly: no HTTP and
no text round trip, so that a scrape costs what rendering the families costs. Only the metric
families the rule files' expressions name are kept (`rule_identifiers`), with the labels a
scrape adds (`job`, `instance`; an exporter's own `job` or `instance` label becomes
`exported_job` or `exported_instance`, as Prometheus renames them). Two series Prometheus makes
itself are added: `up` (1 while the exporter is up, 0 for a scrape during an exporter restart,
which writes no other series) and `process_start_time_seconds` (the simulated unix time the
running exporter started).

To keep 30 days small, a series' sample is written only when its value changed since the last
sample written, when the scrape before lacked the series, or at a heartbeat: every scrape whose
number is a multiple of heartbeat / scrape_interval (8 at 240 s and 30 s). Prometheus looks
back 5 minutes for an instant value, so every evaluation sees the value the full scrapes would
have given. The heartbeats fall on the same scrapes for every series, not 240 s after each
one's last sample: two series exported at the same scrapes then have the same samples apart
from their changes, so `count_over_time` comparisons between them (the regression alerts
compare a label set's counter with `llama_speed_server_up`) and `rate` ratios of counters that
change together (tokens over seconds) come out as they would from every scrape.

What this cannot show: Prometheus marks a series stale at the first scrape that lacks it, and
the text format has no staleness marker. A series that disappears gets its last value written
at the last scrape that had it, so it lingers for the 5-minute lookback after that, as it
would in Prometheus without staleness handling.
"""

from __future__ import annotations

import math
import re
import time
from array import array
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Final, Protocol

import yaml
from prometheus_client.metrics_core import Metric

JOB: Final = "llama-speed"
INSTANCE: Final = "sim:18088"
SCRAPE_INTERVAL_SECONDS: Final = 30.0
HEARTBEAT_SECONDS: Final = 240.0  # under Prometheus' 5-minute lookback, with room for a scrape
_IDENTIFIER = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_SCRAPE_LABELS: Final = ("job", "instance")


class MetricSource(Protocol):
    def collect(self) -> Iterable[Metric]: ...


def rule_identifiers(rule_files: Iterable[Path]) -> frozenset[str]:
    """Every name an `expr` of the rule files may use as a metric: its identifiers outside
    string literals (function and label names come along; they match no family)."""
    names: set[str] = set()
    for path in rule_files:
        document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for group in document.get("groups") or ():
            for rule in group.get("rules") or ():
                expr = str(rule.get("expr", ""))
                names.update(_IDENTIFIER.findall(_QUOTED.sub(" ", expr)))
    return frozenset(names)


@dataclass(eq=False)
class _Series:
    name: str  # the sample's name: a counter's ends in _total
    labels: str  # rendered, braces included
    times: array[float] = field(default_factory=lambda: array("d"))
    values: array[float] = field(default_factory=lambda: array("d"))
    seen_at: float = math.nan  # the last scrape that had it

    def written_last_seen(self) -> bool:
        return bool(self.times) and self.times[-1] == self.seen_at


@dataclass
class _Scrape:
    at: float
    heartbeat: bool  # every series is written at this scrape
    present: set[_Series] = field(default_factory=set)


@dataclass
class _Family:
    type: str  # gauge, counter or unknown
    series: dict[tuple[str, str], _Series] = field(default_factory=dict)


class ScrapeRecorder:
    def __init__(
        self,
        wanted: Collection[str],
        *,
        scrape_interval: float = SCRAPE_INTERVAL_SECONDS,
        heartbeat: float = HEARTBEAT_SECONDS,
        job: str = JOB,
        instance: str = INSTANCE,
    ) -> None:
        if not 0 < scrape_interval <= heartbeat:
            raise ValueError("the scrape interval must be positive and at most the heartbeat")
        self._wanted = frozenset(wanted)
        self._keep: dict[str, bool] = {}  # sample or family name -> wanted, as first looked up
        self._beat_every = int(heartbeat // scrape_interval)
        self._target = f'job="{_escape(job)}",instance="{_escape(instance)}"'
        self._families: dict[str, _Family] = {}
        self._present: set[_Series] = set()  # the series the last scrape had
        self._rendered: dict[tuple[tuple[str, str], ...], str] = {}
        self.scrapes = 0
        self.samples_written = 0
        self.collect_seconds = 0.0  # real time spent collecting and recording, all scrapes

    @property
    def seconds_per_scrape(self) -> float:
        return self.collect_seconds / self.scrapes if self.scrapes else 0.0

    def scrape_up(self, at: float, source: MetricSource, process_start: float) -> None:
        """A scrape at unix time `at` of a running exporter started at `process_start`."""
        began = time.perf_counter()
        scrape = self._begin(at)
        self._record(scrape, ("up", "gauge"), "up", "", 1.0)
        start = ("process_start_time_seconds", "gauge")
        self._record(scrape, start, "process_start_time_seconds", "", process_start)
        for family in source.collect():
            for sample in family.samples:
                where = self._family_of(family, sample.name)
                if where is not None:
                    labels = self._labels(sample.labels)
                    self._record(scrape, where, sample.name, labels, sample.value)
        self._end(scrape)
        self.collect_seconds += time.perf_counter() - began

    def scrape_down(self, at: float) -> None:
        """A failed scrape at `at`: the exporter is not running."""
        began = time.perf_counter()
        scrape = self._begin(at)
        self._record(scrape, ("up", "gauge"), "up", "", 0.0)
        self._end(scrape)
        self.collect_seconds += time.perf_counter() - began

    def _begin(self, at: float) -> _Scrape:
        return _Scrape(at, heartbeat=self.scrapes % self._beat_every == 0)

    def _end(self, scrape: _Scrape) -> None:
        # A series gone from this scrape keeps its last value written where it was last seen.
        for gone in self._present - scrape.present:
            if not gone.written_last_seen():
                self._write(gone, gone.seen_at, gone.values[-1])
        self._present = scrape.present
        self.scrapes += 1

    def _family_of(self, family: Metric, sample_name: str) -> tuple[str, str] | None:
        """The family and type a sample is written under, or None when no rule reads it."""
        keep = self._keep.get(sample_name)
        if keep is None:
            keep = sample_name in self._wanted or family.name in self._wanted
            self._keep[sample_name] = keep
        if not keep:
            return None
        if family.type == "gauge":
            return family.name, "gauge"
        if family.type == "counter":
            # A counter's _created sample is no counter value; Prometheus drops it by default.
            return (family.name, "counter") if sample_name == family.name + "_total" else None
        # Histograms, summaries, info: each sample name its own untyped family.
        return sample_name, "unknown"

    def _labels(self, labels: dict[str, str]) -> str:
        # Rendered once per label set: a scrape then costs a tuple and a look-up per sample.
        key = tuple(labels.items())
        rendered = self._rendered.get(key)
        if rendered is None:
            rendered = self._rendered[key] = _render(labels)
        return rendered

    def _record(
        self, scrape: _Scrape, where: tuple[str, str], name: str, labels: str, value: float
    ) -> None:
        family_name, kind = where
        family = self._families.get(family_name)
        if family is None:
            family = self._families[family_name] = _Family(kind)
        series = family.series.get((name, labels))
        if series is None:
            own = f"{labels}," if labels else ""
            series = family.series[(name, labels)] = _Series(name, f"{{{own}{self._target}}}")
        returning = series not in self._present  # new, or back after a gap
        if scrape.heartbeat or returning or not _same(series.values[-1], value):
            self._write(series, scrape.at, value)
        series.seen_at = scrape.at
        scrape.present.add(series)

    def _write(self, series: _Series, at: float, value: float) -> None:
        series.times.append(at)
        series.values.append(value)
        self.samples_written += 1

    def write_openmetrics(self, out: IO[str]) -> None:
        """All samples, family by family (OpenMetrics wants each family's lines together),
        each series in time order, then `# EOF`."""
        for family_name, family in self._families.items():
            out.write(f"# TYPE {family_name} {family.type}\n")
            for series in family.series.values():
                head = series.name + series.labels
                out.writelines(
                    f"{head} {_number(v)} {_number(t)}\n"
                    for t, v in zip(series.times, series.values, strict=True)
                )
        out.write("# EOF\n")

    def samples_by_family(self) -> dict[str, int]:
        """Samples written per family: what a run kept, for its log line."""
        return {
            name: sum(len(s.times) for s in family.series.values())
            for name, family in self._families.items()
        }

    def save(self, path: Path) -> None:
        with path.open("w", encoding="utf-8") as out:
            self.write_openmetrics(out)


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def _render(labels: dict[str, str]) -> str:
    """A sample's own labels as OpenMetrics writes them, without braces; a `job` or
    `instance` of its own is renamed as Prometheus does, so the scrape's labels win."""
    return ",".join(
        f'{"exported_" + k if k in _SCRAPE_LABELS else k}="{_escape(v)}"' for k, v in labels.items()
    )


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))
