"""The models behind one router or llama-swap: their list, and whether any of them is busy.

They share the GPUs: a probe of model A is disturbed by production on model B as much as by
production on A. So the busy check of a model's round (`FleetActivity`) reads the `/slots` of
every loaded model, its own and the others', and counts a model that is loading as busy (a
request waits for it, and loading weights takes the GPUs too).
"""

from __future__ import annotations

import itertools

from exporter.llama.activity import Activity, ActivityReader
from exporter.llama.client import NOT_LOADED, LlamaClient, ServerError
from exporter.llama.router import (
    RouterModel,
    parse_swap_running,
    read_router_models,
    read_swap_models,
)
from exporter.llama.scoped import ModelClient, MultiKind

# Other models' slots join the own model's in one Activity under ids of their own: far past
# any real slot id (activity._MAX_SLOTS is 4096), one block per model name.
_SLOT_BLOCK = 1 << 13


class Fleet:
    """A router's or llama-swap's models, and a client for each, over the target's client."""

    def __init__(self, client: LlamaClient, kind: MultiKind) -> None:
        self.client = client
        self.kind = kind
        self._clients: dict[str, ModelClient] = {}

    async def models(self) -> tuple[RouterModel, ...]:
        """Every model the server knows, loaded or not; reads that name no model."""
        if self.kind == "router":
            return await read_router_models(self.client)
        return await read_swap_models(self.client)

    async def running(self) -> tuple[RouterModel, ...]:
        """The models that may be serving: for llama-swap `/running` alone, a cheaper read."""
        if self.kind == "router":
            return await read_router_models(self.client)
        return parse_swap_running(await self.client.get_json("/running"))

    def model_client(self, model: str) -> ModelClient:
        found = self._clients.get(model)
        if found is None:
            found = self._clients[model] = ModelClient(self.client, self.kind, model)
        return found


class FleetActivity:
    """`ActivityReader`'s interface for one model's round, watching the whole fleet.

    The own model's slots are read as on a single server (the probe's own slot is told apart
    from production's); every other loaded model's requests count as production in flight,
    and a task id that changed in one of its slots as production that came and went."""

    def __init__(self, fleet: Fleet, model: str) -> None:
        self._fleet = fleet
        self._model = model
        self._own = ActivityReader(fleet.model_client(model))
        self._others: dict[str, ActivityReader] = {}
        self._blocks: dict[str, int] = {}
        self._next_block = itertools.count(1)

    def reset(self) -> None:
        self._own.reset()
        for reader in self._others.values():
            reader.reset()

    async def read(self, metrics_enabled: bool) -> Activity | None:
        listed = await self._fleet.running()
        own = await self._own.read(metrics_enabled)
        if own is None:
            return None
        elsewhere = 0  # requests in flight or waiting on other models
        tasks = list(own.tasks) if own.tasks is not None else None
        for model in listed:
            if model.name == self._model:
                continue
            if model.status == "loading":
                elsewhere += 1
                continue
            if not model.loaded:
                continue
            reader = self._others.setdefault(
                model.name, ActivityReader(self._fleet.model_client(model.name))
            )
            try:
                theirs = await reader.read(metrics_enabled)
            except ServerError as exc:
                if exc.reason == NOT_LOADED:
                    continue  # unloaded since the list was read: serving nothing
                raise
            if theirs is None:
                return None  # loaded, but nothing tells whether it is busy: nor the fleet
            elsewhere += theirs.processing + theirs.deferred
            if tasks is not None and theirs.tasks is not None:
                block = self._block(model.name)
                tasks += [(block + slot, task) for slot, task in theirs.tasks]
        return Activity(
            own.processing,
            own.deferred + elsewhere,
            own.busy_slots,
            None if tasks is None else tuple(tasks),
            own.tokens_held,
        )

    def _block(self, model: str) -> int:
        # Fixed per name for the reader's life: a model's slots must keep their ids between
        # two reads, or its unchanged tasks would look like new production.
        block = self._blocks.get(model)
        if block is None:
            block = self._blocks[model] = next(self._next_block) * _SLOT_BLOCK
        return block
