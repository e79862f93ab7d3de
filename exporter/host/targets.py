"""Which process serves each target on this host, kept while it lives."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import structlog

from exporter.config.resolved import Target
from exporter.host.address import local_port
from exporter.host.proc import PROC, ProcessLookup, find_server_pid

log = structlog.get_logger(__name__)


class TargetProcesses:
    """Looks a target's process up when unknown, at most every `retry_s`, and keeps its pid
    while /proc/<pid> exists: a scan of every process's fds on each scrape would cost more
    than the scrape itself."""

    def __init__(
        self,
        targets: Sequence[Target],
        *,
        proc_root: Path = PROC,
        retry_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._targets = list(targets)
        self._proc = proc_root
        self._retry_s = retry_s
        self._clock = clock
        self._pids: dict[str, int | None] = {t.name: None for t in targets}
        self._next_lookup: dict[str, float] = {t.name: 0.0 for t in targets}
        self._last_reason: dict[str, str | None] = {}
        self._lock = threading.Lock()
        # Worked out once, here: whether a URL names this host may take a DNS lookup
        # (socket.getfqdn), which must not run on the event loop, where a resolver that does
        # not answer would also hold up the handling of SIGTERM.
        self._ports = {t.name: local_port(t.url) for t in targets}

    @property
    def proc_root(self) -> Path:
        """Where the processes' /proc entries are read: their argv, environment, cwd too."""
        return self._proc

    def pids(self) -> dict[str, int | None]:
        # Scrapes (web threads) and discovery (the event loop) both ask.
        with self._lock:
            return self._pids_locked()

    def _pids_locked(self) -> dict[str, int | None]:
        now = self._clock()
        for t in self._targets:
            pid = self._pids[t.name]
            if pid is not None and (self._proc / str(pid)).is_dir():
                continue
            if now < self._next_lookup[t.name]:
                self._pids[t.name] = None
                continue
            self._next_lookup[t.name] = now + self._retry_s
            found = self._lookup(t)
            self._pids[t.name] = found.pid
            reason = found.reason if found.pid is None else None
            if reason != self._last_reason.get(t.name, "unset"):
                self._last_reason[t.name] = reason
                if found.pid is None:
                    log.info("server_process_not_found", target=t.name, reason=reason)
                else:
                    log.info("server_process_found", target=t.name, pid=found.pid,
                             method=found.method)  # fmt: skip
        return dict(self._pids)

    def _lookup(self, t: Target) -> ProcessLookup:
        return find_server_pid(
            port=self._ports[t.name],
            pid_file=t.pid_file,
            name=t.process_name,
            proc_root=self._proc,
        )
