"""A fake llama-server whose speeds follow a trace on the simulation's clock.

It wraps the recorded-answer fake of the test suite (`tests.fakes.FakeLlama`), so /props,
/v1/models, /slots and /completion answer as llama-server b11434 does, and adds time:

* each completion request is served at the trace's speeds at the current virtual time, times
  a noise factor, and answers only after the time its timings claim ((prompt_ms +
  predicted_ms) / 1000, slept on the virtual clock), so the exporter's own clock agrees with
  the server's timings, as its validation demands (`exporter.probe.validate`);
* the noise: `noise_cv` is the coefficient of variation of one round's figure. Each round
  draws one factor, 1 + noise_cv x N(0, 1) (kept above 0.2); a completion request more than
  `ROUND_GAP_SECONDS` after the previous one starts a new round. Each request adds a jitter
  a tenth as large, so that a round's repetitions differ as a real server's do;
* `restart` events refuse connections for `RESTART_DOWN_SECONDS`, then a fresh server with
  empty slots answers; a request in flight when the server goes down loses its connection;
* `model_change` events serve another model from then on: /models/Sim-Model-A.Q4_K_M.gguf,
  then -B, -C and so on, on the same target.
"""

from __future__ import annotations

import asyncio
import bisect
import random
from collections.abc import Callable
from typing import Any, Final

import httpx

from alertsim.trace import MODEL_CHANGE, RESTART, RESTART_DOWN_SECONDS, Trace
from tests.fakes import FakeLlama

# Requests further apart than this belong to different rounds: a round of the default plan
# sends its requests back to back within about 15 s, its confirmation comes 90 s later.
ROUND_GAP_SECONDS: Final = 30.0
MIN_NOISE_FACTOR: Final = 0.2
REQUEST_JITTER_SHARE: Final = 0.1  # of noise_cv
DEFAULT_N_CTX: Final = 32768


def model_path(index: int) -> str:
    """The file the server serves after `index` model changes: Sim-Model-A, -B, ... -Z,
    then -A1, -B1 and so on."""
    letter, lap = chr(ord("A") + index % 26), index // 26
    return f"/models/Sim-Model-{letter}{lap or ''}.Q4_K_M.gguf"


class TraceServer:
    def __init__(
        self,
        trace: Trace,
        clock: Callable[[], float],
        *,
        noise_cv: float = 0.02,
        seed: int = 1,
        n_ctx: int = DEFAULT_N_CTX,
    ) -> None:
        if not noise_cv >= 0:
            raise ValueError(f"noise_cv must be >= 0, not {noise_cv!r}")
        self.trace = trace
        self.noise_cv = noise_cv
        self.n_ctx = n_ctx
        self._clock = clock  # seconds since the trace's start
        self._rng = random.Random(seed)
        self._restarts = trace.events(RESTART)
        self._back_up = tuple(r + RESTART_DOWN_SECONDS for r in self._restarts)
        self._model_changes = trace.events(MODEL_CHANGE)
        self._generation = 0  # restarts the server has come back from
        self._server = self._fresh_server()
        self._down = FakeLlama(mode="absent")
        self._last_completion: float | None = None
        self.round_factor = 1.0  # the current round's noise factor
        self.rounds = 0  # rounds of completion requests served so far
        self._claimed: float | None = None

    def transport(self) -> httpx.AsyncBaseTransport:
        return httpx.MockTransport(self.handle)

    def _fresh_server(self) -> FakeLlama:
        server = FakeLlama(model_path=model_path(0), n_ctx=self.n_ctx)
        server.tamper = self._note_claim
        return server

    def _note_claim(self, timings: dict[str, Any]) -> None:
        # FakeLlama hands over the timings it is about to report: the time they claim is
        # how long this request must take on the virtual clock.
        self._claimed = (timings["prompt_ms"] + timings["predicted_ms"]) / 1000

    def _down_since(self, now: float) -> float | None:
        """When the restart the server is down for began, or None while it is up."""
        i = bisect.bisect_right(self._restarts, now)
        if i and now < self._restarts[i - 1] + RESTART_DOWN_SECONDS:
            return self._restarts[i - 1]
        return None

    def server_at(self, now: float) -> FakeLlama:
        """The server as it is at `now`: down, or up with the model of the time."""
        if self._down_since(now) is not None:
            return self._down
        generation = bisect.bisect_right(self._back_up, now)
        if generation != self._generation:
            self._generation = generation
            self._server = self._fresh_server()  # a restarted server holds nothing in its slots
        self._server.model_path = model_path(bisect.bisect_right(self._model_changes, now))
        return self._server

    def _set_speeds(self, server: FakeLlama, now: float) -> None:
        if self._last_completion is None or now - self._last_completion > ROUND_GAP_SECONDS:
            self.round_factor = self._factor(self.noise_cv)
            self.rounds += 1
        self._last_completion = now
        factor = self.round_factor * self._factor(self.noise_cv * REQUEST_JITTER_SHARE)
        row = self.trace.row_at(now)
        server.prompt_tps = row.pp_tps * factor
        server.gen_tps = row.tg_tps * factor

    def _factor(self, cv: float) -> float:
        return max(MIN_NOISE_FACTOR, 1 + cv * self._rng.gauss(0.0, 1.0))

    async def handle(self, request: httpx.Request) -> httpx.Response:
        started = self._clock()
        server = self.server_at(started)
        if request.url.path == "/completion" and server is not self._down:
            self._set_speeds(server, started)
        # Set by the fake as it builds the answer, in this same step: nothing can run between.
        self._claimed = None
        try:
            response = await server.handle(request)
        finally:
            server.requests.clear()  # the fake's request log would grow for the whole run
        claimed, self._claimed = self._claimed, None
        if claimed is not None:
            await asyncio.sleep(claimed)
            restarts_then = bisect.bisect_right(self._restarts, started)
            if bisect.bisect_right(self._restarts, self._clock()) > restarts_then:
                raise httpx.RemoteProtocolError(
                    "Server disconnected without sending a response.", request=request
                )
        return response
