"""What the output canary has seen for one served model: its settled output and the changes.

A change counts only once the new output repeats on the next answer, so a kernel that gives
one odd answer now and then (a nondeterministic reduction, a near-tie between two tokens)
never counts. The first output is the baseline; until it repeats, a different next output
replaces it without counting, since nothing says which of the two is the usual one.
"""

from __future__ import annotations

from dataclasses import dataclass

from exporter.probe.results import CanaryOutput


@dataclass
class CanaryState:
    """One served model's canary (the store starts a new one when the model or ctx changes)."""

    fingerprint: str | None = None  # the settled output; None before the first answer
    repeated: bool = False  # whether `fingerprint` came back in a later answer
    candidate: str | None = None  # a different output seen once, waiting for its repeat
    changes: int = 0
    last_change_time: float | None = None  # Unix time of the answer that confirmed one
    mean_probability: float | None = None  # of the last answer

    def observe(self, output: CanaryOutput, at: float) -> str | None:
        """Take one answer; returns the fingerprint it replaced when a change is confirmed."""
        seen = output.fingerprint
        self.mean_probability = output.mean_probability
        if self.fingerprint is None or seen == self.fingerprint:
            self.repeated = self.fingerprint is not None
            self.fingerprint, self.candidate = seen, None
            return None
        if seen != self.candidate:
            self.candidate = seen  # the next answer decides
            return None
        before, counts = self.fingerprint, self.repeated
        self.fingerprint, self.repeated, self.candidate = seen, True, None
        if not counts:
            return None  # the baseline itself never repeated: it was the odd one
        self.changes += 1
        self.last_change_time = at
        return before
