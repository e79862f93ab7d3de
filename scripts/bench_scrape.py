"""How the scrape endpoint holds under load and against slow clients.

Starts the real daemon in a child process, the way the product serves it (its web server,
registry and collectors, a fake llama-server target with one recorded round, two fake GPUs),
and drives it from this process with asyncio over raw sockets, so that the load generator
and the server do not share an interpreter. In one run, for each server given:

(a) `--scrapers` scrapers, each scraping once a second (at random phases, like Prometheus'
    targets), for `--duration` seconds while `--slow` slow clients hold connections open: half
    send a request line and then one byte every 3 s, half send nothing; a slow client the
    server closes connects again at once;
(b) scrapers scraping back to back, at each of `--concurrency` levels, on kept-alive
    connections (as Prometheus scrapes), then at the highest level with a new connection per
    scrape.

The old server (the thread-per-connection one) is the endpoint module at `--old-ref`,
loaded from git into the child in place of today's.

    .venv/bin/python scripts/bench_scrape.py --json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# The commit whose exporter/web/endpoint.py is the thread-per-connection server.
OLD_REF = "36ffea3"
SCRAPE_TIMEOUT_S = 10.0  # Prometheus' default scrape timeout
SLOW_PERIOD_S = 3.0
READY_TIMEOUT_S = 60.0


# The child: the daemon.


def serve(which: str, old_ref: str, ready: Path) -> None:
    """Runs the daemon until stdin closes; writes its port to `ready` once a round is in."""
    sys.path.insert(0, str(ROOT))
    from exporter import daemon as daemon_module  # noqa: PLC0415 - after the path is set
    from exporter import log  # noqa: PLC0415
    from exporter.gpu.nvml import Nvml  # noqa: PLC0415
    from tests.daemon_harness import fast_target, running_daemon, wait_for_metrics  # noqa: PLC0415
    from tests.fake_pynvml import FakePynvml  # noqa: PLC0415
    from tests.fakes import FakeLlama  # noqa: PLC0415

    log.configure("json", "warning")
    if which == "old":
        setattr(daemon_module, "WebServer", old_web_server(old_ref))  # noqa: B010
    fake = FakeLlama()
    # One round, recorded at start; the next is an hour away, so none runs during the bench.
    target = fast_target("prod", "http://llama", interval=3600.0, discovery_interval=600.0)
    with running_daemon([target], lambda t: fake.transport(), nvml=Nvml(FakePynvml())) as (
        _,
        base,
    ):
        wait_for_metrics(base, lambda text: 'llama_speed_probe_success{probe="prompt"' in text)
        ready.write_text(base.rsplit(":", 1)[1])
        sys.stdin.read()  # until the parent closes it


def old_web_server(ref: str) -> Any:
    source = subprocess.run(
        ["git", "show", f"{ref}:exporter/web/endpoint.py"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    module = types.ModuleType("exporter.web._endpoint_old")
    exec(compile(source, f"{ref}:exporter/web/endpoint.py", "exec"), module.__dict__)  # noqa: S102
    return module.WebServer


# The parent: the load.


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    failures: dict[str, int] = field(default_factory=dict)

    def fail(self, why: str) -> None:
        self.failures[why] = self.failures.get(why, 0) + 1

    def summary(self, seconds: float | None = None) -> dict[str, Any]:
        ordered = sorted(self.latencies)
        result: dict[str, Any] = {
            "scrapes": len(ordered),
            "failed": sum(self.failures.values()),
            "failures": dict(self.failures),
            "p50_ms": percentile(ordered, 0.50) * 1e3,
            "p99_ms": percentile(ordered, 0.99) * 1e3,
            "max_ms": (ordered[-1] if ordered else float("nan")) * 1e3,
        }
        if seconds:
            result["per_second"] = len(ordered) / seconds
        return result


def percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.5) - 1))]


class Scraper:
    """One Prometheus-like client: keeps its connection when the server lets it."""

    def __init__(self, port: int, keep_alive: bool) -> None:
        self.port = port
        self.keep_alive = keep_alive
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self.request = (
            b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/plain\r\n"
            + (b"" if keep_alive else b"Connection: close\r\n")
            + b"\r\n"
        )
        self.size = 0

    async def scrape(self, tally: Tally) -> None:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(SCRAPE_TIMEOUT_S):
                status = await self._exchange()
        except TimeoutError:
            tally.fail("timeout")
            self.drop()
            return
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            tally.fail(type(exc).__name__)
            self.drop()
            return
        if status != 200:
            tally.fail(f"status {status}")
            return
        tally.latencies.append(time.perf_counter() - started)

    async def _exchange(self) -> int:
        if self.streams is None:
            self.streams = await asyncio.open_connection("127.0.0.1", self.port)
        reader, writer = self.streams
        writer.write(self.request)
        status_line = await reader.readline()
        if not status_line:
            raise ConnectionResetError("closed before answering")
        version, status = status_line.split(b" ", 2)[:2]
        headers: dict[bytes, bytes] = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip().lower()
        if b"content-length" in headers:
            body = await reader.readexactly(int(headers[b"content-length"]))
        else:
            body = await reader.read()
        self.size = len(body)
        kept = headers.get(b"connection") != b"close" and (
            version == b"HTTP/1.1" or headers.get(b"connection") == b"keep-alive"
        )
        if not (kept and self.keep_alive and b"content-length" in headers):
            self.drop()
        return int(status)

    def drop(self) -> None:
        if self.streams is not None:
            self.streams[1].close()
            self.streams = None


@dataclass
class SlowCounts:
    wanted: int
    connects: int = 0
    closed_by_server: int = 0
    errors: int = 0
    all_connected: asyncio.Event = field(default_factory=asyncio.Event)


async def slow_client(port: int, trickle: bool, stop: asyncio.Event, counts: SlowCounts) -> None:
    """Holds a connection open without finishing a request; connects again when closed."""
    while not stop.is_set():
        writer = None
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            counts.connects += 1
            if counts.connects >= counts.wanted:
                counts.all_connected.set()
            if trickle:
                writer.write(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            while not stop.is_set():
                try:
                    async with asyncio.timeout(SLOW_PERIOD_S):
                        if not await reader.read(4096):
                            counts.closed_by_server += 1
                            break
                except TimeoutError:
                    if trickle:
                        writer.write(b"X")
                        await writer.drain()
        except OSError:
            counts.errors += 1
            await asyncio.sleep(0.1)  # a refused connect: do not spin
        finally:
            if writer is not None:
                writer.close()


async def paced(scraper: Scraper, tally: Tally, until: float, period: float) -> None:
    await asyncio.sleep(random.uniform(0, period))
    while (now := time.perf_counter()) < until:
        await scraper.scrape(tally)
        next_at = now + period
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
    scraper.drop()


async def hammer(scraper: Scraper, tally: Tally, until: float) -> None:
    while time.perf_counter() < until:
        await scraper.scrape(tally)
    scraper.drop()


def proc_figures(pid: int) -> dict[str, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return {
        "threads": int(fields["Threads"]),
        "rss_mib": int(fields["VmRSS"].split()[0]) / 1024,
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "cpu_s": (int(stat[11]) + int(stat[12])) / ticks,
    }


async def slow_clients_phase(port: int, pid: int, args: argparse.Namespace) -> dict[str, Any]:
    stop = asyncio.Event()
    counts = SlowCounts(args.slow)
    slow = [
        asyncio.create_task(slow_client(port, i % 2 == 0, stop, counts)) for i in range(args.slow)
    ]
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(counts.all_connected.wait(), 10)
    tally = Tally()
    cpu = proc_figures(pid)["cpu_s"]
    until = time.perf_counter() + args.duration
    await asyncio.gather(
        *(paced(Scraper(port, True), tally, until, 1.0) for _ in range(args.scrapers))
    )
    figures = proc_figures(pid)
    stop.set()
    await asyncio.gather(*slow)
    result = tally.summary()
    result["slow_clients"] = args.slow
    result["slow_reconnects"] = counts.closed_by_server
    result["slow_connect_errors"] = counts.errors
    result["server_threads"] = figures["threads"]
    result["server_fds"] = figures["fds"]
    result["server_rss_mib"] = figures["rss_mib"]
    result["server_cpu_ms_per_scrape"] = (figures["cpu_s"] - cpu) * 1e3 / max(1, result["scrapes"])
    return result


async def hammer_phase(
    port: int, pid: int, concurrency: int, seconds: float, keep_alive: bool
) -> dict[str, Any]:
    scrapers = [Scraper(port, keep_alive) for _ in range(concurrency)]
    await asyncio.gather(*(hammer(s, Tally(), time.perf_counter() + 1.0) for s in scrapers))
    tally = Tally()
    cpu = proc_figures(pid)["cpu_s"]
    until = time.perf_counter() + seconds
    await asyncio.gather(*(hammer(s, tally, until) for s in scrapers))
    result = tally.summary(seconds)
    result["concurrency"] = concurrency
    result["keep_alive"] = keep_alive
    result["server_threads"] = proc_figures(pid)["threads"]
    result["server_cpu_ms_per_scrape"] = (
        (proc_figures(pid)["cpu_s"] - cpu) * 1e3 / max(1, result["scrapes"])
    )
    result["body_bytes"] = scrapers[0].size
    return result


async def measure(port: int, pid: int, args: argparse.Namespace) -> dict[str, Any]:
    slow = await slow_clients_phase(port, pid, args)
    hammered = []
    for level in args.concurrency:
        hammered.append(await hammer_phase(port, pid, level, args.hammer_seconds, True))
    top = max(args.concurrency)
    hammered.append(await hammer_phase(port, pid, top, args.hammer_seconds, False))
    return {"slow_clients": slow, "back_to_back": hammered}


def run_server(which: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        ready = Path(tmp) / "port"
        errors = Path(tmp) / "stderr"
        with errors.open("wb") as stderr:
            child = subprocess.Popen(
                [sys.executable, __file__, "--serve", which, "--old-ref", args.old_ref,
                 "--ready-file", str(ready)],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=stderr, cwd=ROOT,
            )  # fmt: skip
        try:
            deadline = time.monotonic() + READY_TIMEOUT_S
            while not ready.exists() or not ready.read_text():
                if child.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{which} server did not start:\n{errors.read_text()}")
                time.sleep(0.1)
            result = asyncio.run(measure(int(ready.read_text()), child.pid, args))
        finally:
            if child.stdin is not None:
                with contextlib.suppress(BrokenPipeError):
                    child.stdin.close()
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        result["server"] = which
        # The events the daemon logged at warning and above, whatever the load.
        events = [json.loads(line).get("event") for line in errors.read_text().splitlines()]
        result["server_log_events"] = sorted(set(events))
        return result


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"{report['scrapers']} scrapers at 1/s for {report['duration']} s, with "
        f"{report['slow']} slow clients holding connections:",
        "",
        "| server | scrapes | failed | p50 ms | p99 ms | max ms | slow clients closed by the "
        "server | server threads | server CPU ms/scrape |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in report["runs"]:
        s = run["slow_clients"]
        lines.append(
            f"| {run['server']} | {s['scrapes']:,} | {s['failed']} | {s['p50_ms']:.1f} | "
            f"{s['p99_ms']:.1f} | {s['max_ms']:.1f} | {s['slow_reconnects']:,} | "
            f"{s['server_threads']} | {s['server_cpu_ms_per_scrape']:.2f} |"
        )
    lines += [
        "",
        f"Scrapers back to back, {report['hammer_seconds']} s per level:",
        "",
        "| server | concurrency | connection | scrapes/s | failed | p50 ms | p99 ms | max ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in report["runs"]:
        for h in run["back_to_back"]:
            connection = "kept alive" if h["keep_alive"] else "new per scrape"
            lines.append(
                f"| {run['server']} | {h['concurrency']} | {connection} | "
                f"{h['per_second']:.0f} | {h['failed']} | {h['p50_ms']:.1f} | "
                f"{h['p99_ms']:.1f} | {h['max_ms']:.1f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", default="new,old", help="new, old or both (new,old)")
    parser.add_argument("--old-ref", default=OLD_REF, help="git ref of the old endpoint module")
    parser.add_argument("--scrapers", type=int, default=50)
    parser.add_argument("--slow", type=int, default=400)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--hammer-seconds", type=float, default=5.0)
    parser.add_argument(
        "--concurrency", type=lambda v: [int(x) for x in v.split(",")], default=[1, 10, 25, 50]
    )
    parser.add_argument("--json", action="store_true", help="print JSON, not Markdown")
    parser.add_argument("--serve", choices=["new", "old"], help=argparse.SUPPRESS)
    parser.add_argument("--ready-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.old_ref, args.ready_file)
        return
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} CPUs, Python {platform.python_version()}",
        "scrapers": args.scrapers,
        "slow": args.slow,
        "duration": args.duration,
        "hammer_seconds": args.hammer_seconds,
        "runs": [],
    }
    for which in args.servers.split(","):
        try:
            report["runs"].append(run_server(which, args))
        except (RuntimeError, subprocess.CalledProcessError) as exc:
            report.setdefault("skipped", {})[which] = str(exc)
    if args.json:
        print(json.dumps(report, indent=2, default=asdict))
    else:
        print(markdown(report))


if __name__ == "__main__":
    main()
