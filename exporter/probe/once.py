"""The `probe` command's rounds: one per target, or one per loaded model of a router or
llama-swap, and never a round that would load a model (docs/multi-model.md)."""

from __future__ import annotations

from collections.abc import Mapping

from exporter.config.resolved import Target
from exporter.llama.client import LlamaClient, ServerApi, ServerError
from exporter.llama.discovery import discover
from exporter.llama.fleet import Fleet, FleetActivity
from exporter.llama.router import RouterModel, TargetKind, detect_kind
from exporter.probe.results import RoundResult
from exporter.probe.runner import ProbeRunner


class RefusedError(Exception):
    """A model the command was asked for that a round would have to load: not probed."""


async def probe_target(target: Target, model: str | None) -> list[RoundResult]:
    """The rounds of `target`: its server's, or each loaded (or the named) model's.

    Raises `RefusedError` where `model` is not loaded (or not there): naming it would load it."""
    client = LlamaClient(
        target.url, target.api_key, timeout=target.plan.timeout,
        limits=target.limits, proxy=target.proxy,
    )  # fmt: skip
    try:
        kind = await _kind(target, client)
        if kind in ("router", "llama-swap"):
            return await _models(target, Fleet(client, kind), model)
        if model is not None:
            await check_served(client, model, target.name)
        return [await ProbeRunner(target.name, client, target.plan).run_round()]
    finally:
        await client.aclose()


async def _kind(target: Target, client: LlamaClient) -> TargetKind | None:
    if target.mode != "auto":
        return target.mode
    try:
        return await detect_kind(client)
    except ServerError:
        return None  # the round says what is wrong, as it would for a single server


async def check_served(client: ServerApi, model: str, where: str) -> None:
    """A single server asked for `model`: raises `RefusedError` unless it serves that one.

    A read that fails is let pass: the round that follows reports what is wrong."""
    try:
        served = (await discover(client)).model
    except ServerError:
        return
    if served != model:
        raise RefusedError(f"{where} serves {served!r}, not {model!r}")


def loaded_model(listed: Mapping[str, RouterModel], model: str, where: str) -> RouterModel:
    """`model` of a router's or llama-swap's list, if it is loaded; else `RefusedError`, which
    says why: a request naming it would load it."""
    found = listed.get(model)
    if found is None:
        known = ", ".join(sorted(listed)) or "none"
        raise RefusedError(f"{where} has no model {model!r} (models: {known})")
    if not found.loaded:
        raise RefusedError(
            f"model {model!r} on {where} is {found.status}, not loaded: probing it "
            "would load it (and could evict the model in use); load it first"
        )
    return found


async def _models(target: Target, fleet: Fleet, model: str | None) -> list[RoundResult]:
    listed = {m.name: m for m in await fleet.models() if target.models.watched(m.name)}
    if model is not None:
        names = [loaded_model(listed, model, target.name).name]
    else:
        names = sorted(name for name, m in listed.items() if m.loaded)
    results = []
    for name in names:
        plan = target.models.plan_for(name, target.plan) or target.plan
        runner = ProbeRunner(
            target.name, fleet.model_client(name), plan,
            model=name, activity=FleetActivity(fleet, name),
        )  # fmt: skip
        results.append(await runner.run_round())
    return results
