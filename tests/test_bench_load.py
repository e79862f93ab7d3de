"""Host load over a run (exporter/bench/load.py) from fake /proc readings, and how it is judged.

Each test writes /proc/stat, /proc/loadavg and the processes' stat files as they read at the
start of a run's window, starts the meter, rewrites them as they read at its end, and checks
the figures to the tick: other processes' CPU time is what every CPU did less what the bench
and the server did, whichever of their processes came or went in between.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from exporter.bench.load import LoadMeter
from exporter.bench.record import OTHER_CORES_LIMIT, HostLoadRecord

HZ = 100  # ticks per second, as USER_HZ is on Linux
BENCH_PID = 4000
SERVER_PID = 4242  # the launched server: its own process group
SERVER_CHILD = 4250


@dataclass
class Cpu:
    """The all-CPU line of /proc/stat, in ticks."""

    user: int = 0
    nice: int = 0
    system: int = 0
    idle: int = 0
    iowait: int = 0
    irq: int = 0
    softirq: int = 0
    steal: int = 0
    guest: int = 0  # inside user already: must not be counted twice

    def line(self) -> str:
        fields = (self.user, self.nice, self.system, self.idle, self.iowait, self.irq)
        rest = (self.softirq, self.steal, self.guest, 0)
        return "cpu  " + " ".join(str(v) for v in (*fields, *rest))


def write_proc(
    root: Path, cpu: Cpu, *, cores: int = 2, load1: float = 0.5, procs: dict[int, int] | None = None
) -> None:
    """`procs`: pid -> utime ticks (stime, cutime and cstime zero unless set by `proc_times`)."""
    root.mkdir(exist_ok=True)
    per_cpu = "".join(f"cpu{i} 1 2 3 4 5 6 7 8 0 0\n" for i in range(cores))
    (root / "stat").write_text(f"{cpu.line()}\n{per_cpu}intr 12345\nctxt 678\n")
    (root / "loadavg").write_text(f"{load1:.2f} 0.40 0.30 2/345 6789\n")
    for pid, utime in (procs or {}).items():
        proc_times(root, pid, utime=utime)


def proc_times(
    root: Path, pid: int, *, utime: int, stime: int = 0, cutime: int = 0, cstime: int = 0
) -> None:
    d = root / str(pid)
    d.mkdir(exist_ok=True)
    # pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime ...
    head = f"{pid} (llama ) server) S 1 {SERVER_PID} {SERVER_PID} 0 -1 4194560 10 0 0 0"
    (d / "stat").write_text(f"{head} {utime} {stime} {cutime} {cstime} 20 0 1 0 100\n")


def gone(root: Path, pid: int) -> None:
    (root / str(pid) / "stat").unlink()
    (root / str(pid)).rmdir()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def proc(tmp_path: Path) -> Path:
    return tmp_path / "proc"


def meter(proc: Path, clock: Clock, server: set[int] | None = None) -> LoadMeter:
    pids = {SERVER_PID} if server is None else server
    return LoadMeter(
        lambda: {p for p in pids if (proc / str(p)).exists()},
        proc_root=proc,
        clock=clock,
        own_pid=BENCH_PID,
        ticks_per_second=HZ,
    )


@pytest.fixture
def window(proc: Path, clock: Clock) -> LoadMeter:
    """A started meter over a 10 s window on 2 cores; the test writes the end state."""
    write_proc(proc, Cpu(user=10_000, system=2_000, idle=50_000), procs={BENCH_PID: 100})
    proc_times(proc, SERVER_PID, utime=500)
    m = meter(proc, clock)
    m.start()
    clock.now += 10.0
    return m


def test_a_quiet_host_shows_only_the_bench_and_the_server(proc: Path, window: LoadMeter) -> None:
    # 10 s on 2 cores: the server used 15 CPU-seconds, the bench 1, and nothing else ran.
    write_proc(proc, Cpu(user=11_500, system=2_100, idle=50_400), load1=1.8)
    proc_times(proc, BENCH_PID, utime=200)
    proc_times(proc, SERVER_PID, utime=2_000)
    load = window.finish()
    assert load is not None
    assert load.seconds == 10.0
    assert load.cores == 2
    assert (load.load1_start, load.load1_end) == (0.5, 1.8)
    assert load.other_cpu_seconds == 0.0
    assert load.steal_percent == 0.0
    assert load.server_seen
    assert load.disturbed == ()


def test_other_processes_cpu_time_is_what_the_bench_and_server_did_not_use(
    proc: Path, window: LoadMeter
) -> None:
    # Every CPU was busy 2,000 ticks more; the bench and server account for 1,300 of them.
    write_proc(proc, Cpu(user=11_700, system=2_300, idle=50_000))
    proc_times(proc, BENCH_PID, utime=150, stime=50)  # 100 ticks
    proc_times(proc, SERVER_PID, utime=1_700)  # 1,200 ticks
    load = window.finish()
    assert load is not None
    assert load.other_cpu_seconds == pytest.approx(7.0)  # 700 ticks at 100 Hz
    assert load.other_cores == pytest.approx(0.7)  # over 10 s
    assert load.other_percent == pytest.approx(35.0)  # of 2 cores
    assert load.disturbed == ("other processes used 0.70 cores on average (35 % of 2; limit 0.25)",)


def test_a_quarter_of_a_core_is_still_quiet(proc: Path, window: LoadMeter) -> None:
    # Exactly the limit: 2.5 CPU-seconds of others over 10 s.
    write_proc(proc, Cpu(user=10_250, system=2_000, idle=51_750))
    proc_times(proc, BENCH_PID, utime=100)
    proc_times(proc, SERVER_PID, utime=500)
    load = window.finish()
    assert load is not None
    assert load.other_cores == pytest.approx(OTHER_CORES_LIMIT)
    assert load.disturbed == ()


def test_guest_idle_and_iowait_are_not_counted_as_work(proc: Path, window: LoadMeter) -> None:
    write_proc(proc, Cpu(user=10_000, system=2_000, idle=51_000, iowait=900, guest=800))
    load = window.finish()
    assert load is not None
    assert load.other_cpu_seconds == 0.0


def test_irq_and_softirq_count_as_other_work(proc: Path, window: LoadMeter) -> None:
    write_proc(proc, Cpu(user=10_000, system=2_000, idle=51_000, irq=300, softirq=200))
    load = window.finish()
    assert load is not None
    assert load.other_cpu_seconds == pytest.approx(5.0)


def test_steal_past_five_percent_disturbs_a_run(proc: Path, window: LoadMeter) -> None:
    # 2,000 ticks elapsed over both CPUs, 140 of them stolen by the hypervisor: 7 %.
    write_proc(proc, Cpu(user=10_000, system=2_000, idle=51_860, steal=140))
    load = window.finish()
    assert load is not None
    assert load.steal_percent == pytest.approx(7.0)
    assert load.disturbed == ("CPU steal 7.0 % (limit 5 %)",)


def test_a_child_that_exits_in_the_window_is_still_the_servers(proc: Path, clock: Clock) -> None:
    write_proc(proc, Cpu(idle=50_000), procs={BENCH_PID: 0})
    proc_times(proc, SERVER_PID, utime=100)
    proc_times(proc, SERVER_CHILD, utime=300)  # e.g. the server under a `sh -c` wrapper
    m = meter(proc, clock, {SERVER_PID, SERVER_CHILD})
    m.start()
    clock.now += 10.0
    # The child used 400 more ticks, exited, and was reaped: its whole life (700) is now in
    # its parent's cutime. The CPUs did exactly that work.
    write_proc(proc, Cpu(user=400, idle=51_600))
    gone(proc, SERVER_CHILD)
    proc_times(proc, SERVER_PID, utime=100, cutime=700)
    load = m.finish()
    assert load is not None
    assert load.other_cpu_seconds == 0.0


def test_a_server_that_cannot_be_seen_is_not_judged_as_other_load(proc: Path, clock: Clock) -> None:
    # A running server on another host: nothing of it in this /proc.
    write_proc(proc, Cpu(idle=50_000), procs={BENCH_PID: 0})
    m = meter(proc, clock, set())
    m.start()
    clock.now += 10.0
    write_proc(proc, Cpu(user=1_500, idle=50_500))
    load = m.finish()
    assert load is not None
    assert not load.server_seen
    assert load.other_cores == pytest.approx(1.5)
    assert load.disturbed == ()


def test_accounting_skew_never_reads_as_negative_load(proc: Path, window: LoadMeter) -> None:
    # The processes' own times ran a few ticks ahead of the per-CPU tick counts.
    write_proc(proc, Cpu(user=10_500, system=2_000, idle=51_500))
    proc_times(proc, BENCH_PID, utime=100)
    proc_times(proc, SERVER_PID, utime=1_010)
    load = window.finish()
    assert load is not None
    assert load.other_cpu_seconds == 0.0


def test_an_old_kernel_without_steal_has_none(proc: Path, clock: Clock) -> None:
    proc.mkdir()
    (proc / "stat").write_text("cpu  100 0 50 1000\ncpu0 100 0 50 1000\n")
    m = meter(proc, clock, set())
    m.start()
    clock.now += 1.0
    (proc / "stat").write_text("cpu  150 0 50 1050\ncpu0 150 0 50 1050\n")
    load = m.finish()
    assert load is not None
    assert load.steal_percent == 0.0
    assert load.cores == 1
    assert load.load1_start is None  # no /proc/loadavg


@pytest.mark.parametrize("stat_text", [None, "intr 1 2 3\n", "cpu  1 2 x 4\n"])
def test_without_a_readable_proc_stat_there_is_no_record(
    proc: Path, clock: Clock, stat_text: str | None
) -> None:
    proc.mkdir()
    if stat_text is not None:
        (proc / "stat").write_text(stat_text)
    m = meter(proc, clock, set())
    m.start()
    assert m.finish() is None


def test_a_meter_never_started_has_no_record(proc: Path, clock: Clock) -> None:
    write_proc(proc, Cpu(idle=1))
    assert meter(proc, clock).finish() is None


def test_the_record_round_trips_through_json_with_its_verdict() -> None:
    load = HostLoadRecord(seconds=10.0, cores=2, steal_percent=9.0, other_cpu_seconds=0.0)
    data = load.model_dump(mode="json")
    assert data["disturbed"] == ["CPU steal 9.0 % (limit 5 %)"]
    assert HostLoadRecord.model_validate(data) == load
