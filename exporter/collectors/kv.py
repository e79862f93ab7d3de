"""Each target's KV cache: what one token costs, how many fit, how many are held."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client.core import Metric as Family

from exporter import metrics as m
from exporter.kv.facts import KV_REASONS
from exporter.state import TargetState


class KvCollector:
    def __init__(self, snapshot: Callable[[], list[TargetState]]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterable[Family]:
        per_token, cap_tokens, cap_bytes, used, errors = (
            m.KV_BYTES_PER_TOKEN.family(), m.KV_CAPACITY_TOKENS.family(),
            m.KV_CAPACITY_BYTES.family(), m.KV_USED_TOKENS.family(), m.KV_ERRORS.family(),
        )  # fmt: skip
        for t in self._snapshot():
            for reason in KV_REASONS:
                errors.add_metric([t.name, reason], t.kv_errors[reason])
            facts, server = t.model_facts, t.server
            if facts is None or server is None or not t.up:
                continue
            labels = [t.name, server.model, str(server.ctx), facts.type_k, facts.type_v]
            per_token.add_metric(labels, facts.bytes_per_token)
            if facts.capacity_tokens is not None and facts.capacity_bytes is not None:
                cap_tokens.add_metric(labels, facts.capacity_tokens)
                cap_bytes.add_metric(labels, facts.capacity_bytes)
            if t.tokens_held is not None:
                used.add_metric(labels, t.tokens_held)
        yield from (per_token, cap_tokens, cap_bytes, used, errors)
