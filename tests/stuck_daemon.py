"""The real daemon with a call on asyncio's default executor that never returns, as a DNS
lookup on a resolver that does not answer would be; run as a process by tests/test_shutdown.py.

`python -m tests.stuck_daemon LISTEN_ADDRESS`: serves until SIGTERM, then stops; `asyncio.run`
joins the default executor at its end, so only the watchdog can end the process.
"""

from __future__ import annotations

import asyncio
import sys
import threading

from exporter import log
from exporter.config import Config, Target
from exporter.daemon import SHUTDOWN_DEADLINE_SECONDS, Daemon

STUCK_THREAD = "asyncio_0"  # the name of the default executor's first worker


async def main(listen_address: str) -> None:
    never = threading.Event()
    asyncio.get_running_loop().run_in_executor(None, never.wait)
    # Port 9 (discard) is closed here: discovery fails at once, and nothing else runs.
    config = Config(
        (Target("stuck", "http://127.0.0.1:9"),), listen_address, "/metrics", "json", "info",
        gpu=False,
    )  # fmt: skip
    await Daemon(config).run(exit_deadline=SHUTDOWN_DEADLINE_SECONDS)


if __name__ == "__main__":
    log.configure("json", "info")
    asyncio.run(main(sys.argv[1]))
