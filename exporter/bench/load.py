"""How busy the host was while a run measured, read from /proc at the window's two ends.

Two identical configurations can differ by +300 % when something else took the CPU during one
of them: a compile, a backup, a noisy neighbour on the same hypervisor. So a run records, from
the server's readiness to its last sample:

- the 1-minute load average at both ends (/proc/loadavg): context only, since it counts the
  server's own threads;
- steal: the share of all CPU time the hypervisor gave to other guests (/proc/stat);
- other processes' CPU time: every CPU's busy time (/proc/stat user, nice, system, irq,
  softirq) less the time of the bench's own process and the server's processes
  (/proc/<pid>/stat utime and stime, plus cutime and cstime: the children they reaped in the
  window, such as a wrapper's short-lived helpers).

Both ends sum the processes alive then: a process that exits during the window leaves its
start figure subtracted and its whole life added to its parent's cutime, which nets out to
its time inside the window. Everything is read from a proc root that tests replace.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from exporter.bench.record import HostLoadRecord
from exporter.host.proc import PROC

# /proc/stat's cpu line: user nice system idle iowait irq softirq steal guest guest_nice. Guest
# time is already inside user and nice; idle and iowait are no one's work.
_BUSY_FIELDS: Final = (0, 1, 2, 5, 6)
_STEAL_FIELD: Final = 7
_ALL_FIELDS: Final = slice(0, 8)
# /proc/<pid>/stat after the ")" that ends the command name: state is field 3 of the man page,
# so utime (14), stime (15), cutime (16) and cstime (17) are 11 to 14 here.
_TIMES: Final = slice(11, 15)


@dataclass(frozen=True)
class _Snapshot:
    at: float  # the clock's seconds
    all_ticks: int  # every CPU, every state
    busy_ticks: int
    steal_ticks: int
    own_ticks: int  # the bench's and the server's processes
    cores: int
    load1: float | None


@dataclass
class LoadMeter:
    """One run's window: `start()` when the server is ready, `finish()` after the last sample."""

    server_pids: Callable[[], set[int]]  # the server's processes now; none for a remote one
    proc_root: Path = PROC
    clock: Callable[[], float] = time.monotonic
    own_pid: int = field(default_factory=os.getpid)
    ticks_per_second: int = field(default_factory=lambda: os.sysconf("SC_CLK_TCK"))
    _start: _Snapshot | None = None
    _server_seen: bool = False

    def start(self) -> None:
        self._start = self._snapshot()

    def finish(self) -> HostLoadRecord | None:
        """The window's figures; None when /proc/stat could not be read at either end."""
        start, end = self._start, self._snapshot()
        if start is None or end is None:
            return None
        seconds = max(end.at - start.at, 0.0)
        all_ticks = end.all_ticks - start.all_ticks
        other = (end.busy_ticks - start.busy_ticks) - (end.own_ticks - start.own_ticks)
        return HostLoadRecord(
            seconds=seconds,
            cores=end.cores,
            load1_start=start.load1,
            load1_end=end.load1,
            steal_percent=(end.steal_ticks - start.steal_ticks) / all_ticks * 100
            if all_ticks > 0
            else None,
            # /proc/stat counts per CPU at each tick, a process's times are its own: the two
            # disagree by a tick or so, which must not read as negative load.
            other_cpu_seconds=max(other, 0) / self.ticks_per_second,
            server_seen=self._server_seen,
        )

    def _snapshot(self) -> _Snapshot | None:
        cpu = _cpu_ticks(self.proc_root)
        if cpu is None:
            return None
        ticks, cores = cpu
        servers = self.server_pids()
        self._server_seen = self._server_seen or bool(servers)
        return _Snapshot(
            at=self.clock(),
            all_ticks=sum(ticks[_ALL_FIELDS]),
            busy_ticks=sum(ticks[i] for i in _BUSY_FIELDS),
            steal_ticks=ticks[_STEAL_FIELD],
            own_ticks=_process_ticks({self.own_pid, *servers}, self.proc_root),
            cores=cores,
            load1=_load1(self.proc_root),
        )


def _cpu_ticks(proc_root: Path) -> tuple[list[int], int] | None:
    """The all-CPU line of /proc/stat, padded to its 8 fields, and the number of CPUs."""
    try:
        lines = (proc_root / "stat").read_text(encoding="ascii", errors="replace").splitlines()
    except OSError:
        return None
    total = None
    cores = 0
    for line in lines:
        name, _, rest = line.partition(" ")
        if name == "cpu":
            try:
                total = [int(v) for v in rest.split()]
            except ValueError:
                return None
        elif name.startswith("cpu") and name[3:].isdigit():
            cores += 1
    if total is None:
        return None
    # Old kernels end the line before steal: missing fields are zero.
    return [*total, *([0] * (8 - len(total)))], cores or os.cpu_count() or 1


def _process_ticks(pids: Iterable[int], proc_root: Path) -> int:
    total = 0
    for pid in pids:
        try:
            raw = (proc_root / str(pid) / "stat").read_text(encoding="ascii", errors="replace")
        except OSError:
            continue  # exited: its time is in its parent's cutime now, or was never ours
        # The command name may hold spaces and parentheses: split after the last ")".
        times = raw[raw.rfind(")") + 2 :].split()[_TIMES]
        try:
            total += sum(int(v) for v in times) if len(times) == 4 else 0
        except ValueError:
            continue
    return total


def _load1(proc_root: Path) -> float | None:
    try:
        return float((proc_root / "loadavg").read_text(encoding="ascii").split()[0])
    except (OSError, ValueError, IndexError):
        return None
