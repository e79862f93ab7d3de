"""Whether a sample's timings can be true: the server's figures against the exporter's own clock.

A server's `timings` become the exported speeds, so they are checked before they count:
- every duration finite and positive where the kind measures it;
- no more server time than the whole request took, as the exporter timed it;
- no less than a fraction of what the exporter saw over the same interval: the prompt's time
  against the time to the first streamed token, generation against the span from the first
  token to the last. The exporter's view includes HTTP and scheduling on top of the server's,
  hence the factor and the fixed allowance; a server claiming a speed several times its real
  one is past both.
"""

from __future__ import annotations

import math
from typing import Final

from exporter.llama.client import Completion
from exporter.probe.results import INCONSISTENT_TIMINGS, INVALID_TIMINGS, Kind

# Two clocks read the same interval: allow for their ticks and the exporter's read of it.
CLOCK_ALLOWANCE_SECONDS: Final = 0.01
# What the exporter may see on top of the server's own time: HTTP, the server's queue and
# thread hand-offs, the exporter's event loop. Generous for a loaded machine, yet a claim
# of a fifth of the real time fails it on any request that takes half a second.
SEEN_FACTOR: Final = 2.0
SEEN_ALLOWANCE_SECONDS: Final = 0.25


def timing_problem(kind: Kind, done: Completion) -> tuple[str, str] | None:
    """The reason and detail why `done`'s timings cannot be true, or None when they can."""
    t = done.timings
    if not (math.isfinite(t.prompt_ms) and math.isfinite(t.predicted_ms)):
        return INVALID_TIMINGS, "server timings are not finite"
    if t.prompt_ms < 0 or t.predicted_ms < 0:
        return INVALID_TIMINGS, "server timings are negative"
    server_ms = t.prompt_ms if kind == "prompt" else t.predicted_ms
    if server_ms <= 0:
        return INVALID_TIMINGS, f"server reported {kind} time {server_ms:g} ms"
    claimed = (t.prompt_ms + t.predicted_ms) / 1000
    if claimed > done.total_seconds + CLOCK_ALLOWANCE_SECONDS:
        return INCONSISTENT_TIMINGS, (
            f"server reported {claimed:.3f} s for a request that took {done.total_seconds:.3f} s"
        )
    seen = (
        done.first_chunk_seconds
        if kind == "prompt"
        else done.total_seconds - done.first_chunk_seconds
    )
    if seen > SEEN_FACTOR * server_ms / 1000 + SEEN_ALLOWANCE_SECONDS:
        return INCONSISTENT_TIMINGS, (
            f"server reported {server_ms / 1000:.3f} s of {kind} work the exporter saw take "
            f"{seen:.3f} s"
        )
    return None
