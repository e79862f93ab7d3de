"""The speed trace a simulation follows: a CSV of the server's speeds and events over time.

    t_seconds,tg_tps,pp_tps,event
    0,40,800,
    86400,32,800,
    90000,40,800,restart
    172800,40,800,

Each row sets the server's token generation (`tg_tps`) and prompt processing (`pp_tps`)
speeds, in tokens per second, from its time on; the simulation ends at the last row's time.
The first row is at t=0, times strictly increase, and speeds are finite and positive. The
event, when there is one, happens at the row's time:

* `restart`: llama-server restarts: connections are refused for `RESTART_DOWN_SECONDS`, then a
  fresh server (empty slots) answers;
* `exporter_restart`: the exporter restarts: it is down for a few seconds (Prometheus' scrapes
  fail), then a new process starts with the same configuration and state directory;
* `model_change`: the same target serves another model from then on (a new model name).

Writing a trace in code (`TraceBuilder`), the usual shapes are:

* steady noise for 30 days: one row at 0 and the end (`TraceBuilder().build(30 * DAY)`);
  the noise is the server's (`alertsim.trace_server`), not the trace's;
* a lasting drop at time X: `.at(X, tg_tps=32)`;
* a single-round outlier: a row that lowers the speed for about a minute around one scheduled
  round, then a row that restores it (`.outlier(round_start, 0.6)`), so that the confirmation
  round the exporter runs 90 s later sees the normal speed again. Rounds start where
  `expected_round_start` says: the first a few seconds after the exporter starts, then one
  every interval plus up to `jitter` seconds. APScheduler adds each jitter to the previous
  fire time, so the delays add up: the k-th round comes about k x (interval + jitter / 2)
  seconds after the first, give or take about sqrt(k) x jitter / 3.5. Far into a trace that
  is minutes, wider than an outlier's window may be (it must end before the confirmation
  round): take the round's exact time from `alert_sim.scheduled_round_starts`, which replays
  the schedule of a run with the same seed in a moment (`alertsim.scenarios` does);
* restarts: `.at(X, event="restart")`, `.at(X, event="exporter_restart")`.
"""

from __future__ import annotations

import bisect
import csv
import io
import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from exporter.schedule.plan import FIRST_ROUND_DELAY_SECONDS, FIRST_ROUND_SPREAD_SECONDS, Schedule

HEADER: Final = ("t_seconds", "tg_tps", "pp_tps", "event")
RESTART: Final = "restart"
EXPORTER_RESTART: Final = "exporter_restart"
MODEL_CHANGE: Final = "model_change"
EVENTS: Final = ("", RESTART, EXPORTER_RESTART, MODEL_CHANGE)
# How long a restarted llama-server refuses connections: loading a model takes about a minute.
RESTART_DOWN_SECONDS: Final = 60.0
DAY: Final = 86400.0
# A mid-range GPU's speeds for a 7-8B model at Q4: a round of the default plan (512 prompt
# tokens, 128 generated, 3 repetitions) then takes about 15 s, as on a real box.
DEFAULT_TG_TPS: Final = 40.0
DEFAULT_PP_TPS: Final = 800.0
# The daemon's schedule defaults, for the expected round starts.
_DEFAULTS: Final = Schedule()


class TraceError(ValueError):
    """A trace that cannot be simulated; the message names the line and column."""


@dataclass(frozen=True)
class TraceRow:
    t: float  # seconds since the start of the trace
    tg_tps: float
    pp_tps: float
    event: str = ""


@dataclass(frozen=True)
class Trace:
    rows: tuple[TraceRow, ...]
    _times: tuple[float, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        problem = _rows_problem(self.rows)
        if problem is not None:
            raise TraceError(problem)
        # For the look-up by time the server makes on every request.
        object.__setattr__(self, "_times", tuple(row.t for row in self.rows))

    @property
    def end(self) -> float:
        """When the simulation ends: the last row's time."""
        return self.rows[-1].t

    def row_at(self, t: float) -> TraceRow:
        """The row in force at `t`: the last one at or before it."""
        return self.rows[max(bisect.bisect_right(self._times, t) - 1, 0)]

    def events(self, kind: str) -> tuple[float, ...]:
        """The times of the events of one kind, in order."""
        return tuple(row.t for row in self.rows if row.event == kind)


def _rows_problem(rows: Sequence[TraceRow]) -> str | None:
    """What is wrong with rows made in code (a parsed file is checked line by line)."""
    if len(rows) < 2:
        return "a trace needs a row at t=0 and a later one where it ends"
    if rows[0].t != 0:
        return f"the first row must be at t=0, not {rows[0].t:g}"
    for before, row in itertools.pairwise(rows):
        if not row.t > before.t:
            return f"times must strictly increase: {row.t:g} after {before.t:g}"
    for row in rows:
        for name, value in (("tg_tps", row.tg_tps), ("pp_tps", row.pp_tps)):
            if not (math.isfinite(value) and value > 0):
                return f"{name} at t={row.t:g} must be finite and > 0, not {value!r}"
        if row.event not in EVENTS:
            return f"unknown event {row.event!r} at t={row.t:g}"
    return None


def parse_trace(text: str, source: str = "trace") -> Trace:
    """Read a trace's CSV text; raises TraceError naming `source`, the line and the column."""
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None or tuple(cell.strip() for cell in header) != HEADER:
        raise TraceError(f"{source} line 1: the header must be exactly {','.join(HEADER)}")
    rows: list[TraceRow] = []
    for cells in reader:
        line = reader.line_num
        if not cells:
            continue  # a blank line, as a trailing newline or two leave
        if len(cells) != len(HEADER):
            raise TraceError(f"{source} line {line}: {len(cells)} columns, expected {len(HEADER)}")
        t = _number(cells[0], source, line, "t_seconds")
        tg = _number(cells[1], source, line, "tg_tps")
        pp = _number(cells[2], source, line, "pp_tps")
        event = cells[3].strip()
        if not rows and t != 0:
            raise TraceError(f"{source} line {line}, column t_seconds: the first row must be at 0")
        if rows and not t > rows[-1].t:
            raise TraceError(
                f"{source} line {line}, column t_seconds: {t:g} does not come after {rows[-1].t:g}"
            )
        for column, value in (("tg_tps", tg), ("pp_tps", pp)):
            if not value > 0:
                raise TraceError(f"{source} line {line}, column {column}: must be > 0")
        if event not in EVENTS:
            raise TraceError(
                f"{source} line {line}, column event: {event!r} is not one of "
                + ", ".join(repr(e) for e in EVENTS)
            )
        rows.append(TraceRow(t, tg, pp, event))
    if len(rows) < 2:
        raise TraceError(f"{source}: a trace needs a row at t=0 and a later one where it ends")
    return Trace(tuple(rows))


def _number(cell: str, source: str, line: int, column: str) -> float:
    try:
        value = float(cell)
    except ValueError:
        raise TraceError(
            f"{source} line {line}, column {column}: {cell!r} is not a number"
        ) from None
    if not math.isfinite(value):
        raise TraceError(f"{source} line {line}, column {column}: {cell!r} is not finite")
    return value


def read_trace(path: Path) -> Trace:
    """Read a trace file; raises TraceError, or OSError when it cannot be read."""
    return parse_trace(path.read_text(encoding="utf-8"), str(path))


def format_trace(rows: Iterable[TraceRow]) -> str:
    """The CSV text of `rows`, as `parse_trace` reads it back."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(HEADER)
    for row in rows:
        writer.writerow((_text(row.t), _text(row.tg_tps), _text(row.pp_tps), row.event))
    return out.getvalue()


def write_trace(path: Path, trace: Trace) -> None:
    path.write_text(format_trace(trace.rows), encoding="utf-8")


def _text(value: float) -> str:
    # Whole numbers as integers, the rest exactly (repr round-trips a float).
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


def expected_round_start(
    k: int, interval: float = _DEFAULTS.interval, jitter: float = _DEFAULTS.jitter
) -> float:
    """About when the k-th scheduled round (k = 0 first) after an exporter start begins, in
    seconds from that start: the mean of the daemon's first delay and of k jittered intervals.
    The actual time of a seeded run differs by up to a few times sqrt(k) x jitter / 3.5;
    `alert_sim.scheduled_round_starts` gives it exactly."""
    first = FIRST_ROUND_DELAY_SECONDS + min(jitter, FIRST_ROUND_SPREAD_SECONDS) / 2
    return first + k * (interval + jitter / 2)


class TraceBuilder:
    """A trace written in code, in time order: each call adds or amends the row at its time.

    Speeds not given keep the values in force at that time; a call at the time of the last
    row amends it (a speed change and an event at the same moment are one row).
    """

    def __init__(self, tg_tps: float = DEFAULT_TG_TPS, pp_tps: float = DEFAULT_PP_TPS) -> None:
        self._rows: list[TraceRow] = [TraceRow(0.0, tg_tps, pp_tps)]

    def at(
        self,
        t: float,
        *,
        tg_tps: float | None = None,
        pp_tps: float | None = None,
        event: str = "",
    ) -> TraceBuilder:
        last = self._rows[-1]
        if t < last.t:
            raise TraceError(f"rows must be added in time order: {t:g} after {last.t:g}")
        row = TraceRow(
            t,
            last.tg_tps if tg_tps is None else tg_tps,
            last.pp_tps if pp_tps is None else pp_tps,
            event or (last.event if t == last.t else ""),
        )
        if t == last.t:
            self._rows[-1] = row
        else:
            self._rows.append(row)
        return self

    def scaled(self, t: float, factor: float, *, tg: bool = True, pp: bool = True) -> TraceBuilder:
        """From `t` on, the speeds in force times `factor` (0.8: a 20% drop)."""
        last = self._rows[-1]
        return self.at(
            t,
            tg_tps=last.tg_tps * factor if tg else None,
            pp_tps=last.pp_tps * factor if pp else None,
        )

    def outlier(
        self,
        round_start: float,
        factor: float,
        *,
        before: float = 20.0,
        after: float = 40.0,
        tg: bool = True,
        pp: bool = True,
    ) -> TraceBuilder:
        """One slow round: the speeds times `factor` from `before` seconds before the round
        starts to `after` seconds after it, then back; the confirmation round comes 90 s
        after the round, on normal speeds."""
        last = self._rows[-1]
        self.scaled(round_start - before, factor, tg=tg, pp=pp)
        return self.at(round_start + after, tg_tps=last.tg_tps, pp_tps=last.pp_tps)

    def build(self, end: float) -> Trace:
        """The trace, ending at `end` with the speeds in force then."""
        if end < self._rows[-1].t:
            raise TraceError(
                f"the trace cannot end at {end:g}, before its row at {self._rows[-1].t:g}"
            )
        self.at(end)
        return Trace(tuple(self._rows))
