"""A served model's KV facts, read in the daemon: off the event loop, within a deadline.

The GGUF header a server names may sit on a mount that hangs; the read runs on a thread of
its own (`BlockingSlot`) and discovery goes on without it. One function for a single server
and for each model behind a router or llama-swap, whose options come from its own process
or, where that is not visible here, from the command line the router reports.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import structlog

from exporter.host.blocking import BlockingSlot, DeadlineExceededError, StillBlockedError
from exporter.host.proc import read_cmdline, read_cwd, read_environ
from exporter.kv.facts import MODEL_UNREADABLE, FactsError, KvOverrides, ModelFacts, model_facts
from exporter.llama.discovery import ServerInfo
from exporter.llama.untrusted import clean_text

log = structlog.get_logger(__name__)


async def read_facts(
    reads: BlockingSlot,
    info: ServerInfo,
    kv: KvOverrides,
    pid: int | None,
    *,
    proc_root: Path,
    target: str,
    model: str | None = None,
    reported_argv: Sequence[str] = (),
) -> tuple[ModelFacts | None, str | None, bool]:
    """The facts, or None and the reason (one of KV_REASONS), logged; and whether to read
    again at the next discovery (a read that did not finish). Raises nothing."""
    argv = read_cmdline(pid, proc_root=proc_root) if pid is not None else None
    environ = read_environ(pid, proc_root=proc_root) if pid is not None else None
    cwd = read_cwd(pid, proc_root=proc_root) if pid is not None else None
    if argv is None and reported_argv:
        # Not visible here: a router's `status.args` (llama-swap's `cmd`) is the child's own
        # command line, short of the environment it inherited.
        argv = tuple(reported_argv)
    where = {"target": target} if model is None else {"target": target, "model": model}
    work = functools.partial(
        model_facts, info, kv, list(argv) if argv else None, environ, server_cwd=cwd
    )
    try:
        # Off the event loop, and off asyncio's executor too, which the exit joins: a file
        # on a hung mount never answers, and discovery goes on without it.
        name = f"model-read:{target}" if model is None else f"model-read:{target}:{model}"
        return await reads.run(work, name=name), None, False
    except (DeadlineExceededError, StillBlockedError) as exc:
        timed_out = isinstance(exc, DeadlineExceededError)
        detail = (
            f"timed out reading the model file ({reads.deadline:g} s)"
            if timed_out
            else "an earlier read of the model file is still blocked; not reading again"
        )
        log.warning("kv_cache_unknown", **where, reason=MODEL_UNREADABLE, detail=detail,
                    model_path=clean_text(info.model_path, 512))  # fmt: skip
        return None, MODEL_UNREADABLE, True
    except FactsError as exc:
        log.warning("kv_cache_unknown", **where, reason=exc.reason, detail=exc.detail)
        return None, exc.reason, False
