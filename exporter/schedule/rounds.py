"""A target's scheduled rounds: each one asks the duty budget first, then probes or skips."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from exporter.probe.results import SKIP_DUTY_BUDGET, RoundResult
from exporter.schedule.budget import DutyBudget


class BudgetedRounds:
    def __init__(
        self,
        target: str,
        run_round: Callable[[], Awaitable[RoundResult]],
        budget: DutyBudget,
        *,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.target = target
        self.budget = budget
        self._run_round = run_round
        self._wall = wall_clock

    async def next(self) -> RoundResult:
        if not self.budget.admits():
            return RoundResult(
                self.target,
                self._wall(),
                0.0,
                None,
                skips=(SKIP_DUTY_BUDGET,),
                detail=f"probes used {self.budget.used():.1%} of the last {self.budget.window:g} s",
            )
        result = await self._run_round()
        # A round that measured is what the next one will cost; a skipped one is not.
        self.budget.spend(result.duration, measured=bool(result.outcomes))
        return result
